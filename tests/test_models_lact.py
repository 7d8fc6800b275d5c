"""CPU tests of the clean-room LaCT (trl_refine.models.lact) on tiny configs.

The oracle is twofold: ``_naive_logits`` below transcribes research/lact.md §2-§3 directly (full sequence, explicit
masks, per-chunk loop ``range(0, T - C, C)`` of the reference, no state), and the model's own full forward, against
which token-by-token decoding, segmented forwards and padded batches must agree.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import trl_refine.models.lact as lact
from trl_refine.models.lact import (
    LaCTCache,
    LaCTConfig,
    LaCTForCausalLM,
    LaCTModel,
    cat_states,
    check_lact_checkpoint,
    convert_lact_state_dict,
    infer_lact_dims,
    lact_causal_lm_loss,
)
from trl_refine.models.lact import fast_weight as fw_mod
from trl_refine.models.lact import modeling_lact as modeling_mod

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is faster and immune to a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**overrides) -> LaCTConfig:
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attn_heads=4,
        num_lact_heads=2,
        lact_chunk_size=4,
        window_size=4,
        vocab_size=VOCAB,
        intermediate_size=48,
        initializer_range=0.2,
        muon_dtype="float32",
        rope_theta=500.0,
    )
    base.update(overrides)
    return LaCTConfig(**base)


def _model(seed: int = 0, **overrides) -> LaCTForCausalLM:
    """A tiny random model whose fast-weight updates matter (learning rates ~0.5 instead of ~1e-3)."""
    torch.manual_seed(seed)
    model = LaCTForCausalLM(_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lr_proj.bias"):
                p.uniform_(6.0, 7.5)
            elif name.endswith(("qk_scale", "qk_offset")):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(("momentum_proj.0.bias", "ttt_scale_proj.bias")):
                p.normal_(0.0, 1.0)
    return model


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------------------------------
# Independent transcription of the spec
# ---------------------------------------------------------------------------------------------------------------------


def _ns5(g: torch.Tensor) -> torch.Tensor:
    x = g.float()
    tr = x.shape[0] > x.shape[1]
    if tr:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for a, b, c in [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ]:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tr else x


def _naive_logits(model: LaCTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    B, T = ids.shape
    D, H, n, C, Wn = cfg.hidden_size, cfg.num_attn_heads, cfg.num_lact_heads, cfg.lact_chunk_size, cfg.window_size
    hd, d = D // H, D // n

    def rms(t, w, eps):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    ang = torch.arange(T, dtype=torch.float32)[:, None] * cfg.rope_theta ** (-torch.arange(0, hd, 2) / hd)

    def rope(t):  # [B, T, heads, hd]
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat([a * c - b * s, a * s + b * c], -1)

    x = model.model.embeddings.weight[ids]
    for blk in model.model.layers:
        at = blk.attn
        h = rms(x, blk.attn_norm.weight, cfg.norm_eps)
        q, k, v = F.linear(h, at.qkv.weight, at.qkv.bias).split(D, -1)
        if cfg.attn_qk_norm:
            q, k = rms(q, at.q_norm.weight, 1e-5), rms(k, at.k_norm.weight, 1e-5)
        fq, fk, fv = q * at.qk_scale[:, 0] + at.qk_offset[:, 0], k * at.qk_scale[:, 1] + at.qk_offset[:, 1], v
        # sliding-window attention, explicit mask
        qa, ka = rope(q.view(B, T, H, hd)), rope(k.view(B, T, H, hd))
        sc = torch.einsum("bihe,bjhe->bhij", qa, ka) / math.sqrt(hd)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        sc = sc.masked_fill(~((j <= i) & (i - j < Wn)), float("-inf"))
        o_attn = torch.einsum("bhij,bjhe->bihe", sc.softmax(-1), v.view(B, T, H, hd)).reshape(B, T, D)
        # fast-weight features
        fq, fk, fv = (t.reshape(B, T, n, d) for t in (fq, fk, fv))
        if cfg.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            fv = fv if cfg.no_v_silu else F.silu(fv)
        fq = fq / (fq.norm(dim=-1, keepdim=True) + 1e-5)
        fk = fk / (fk.norm(dim=-1, keepdim=True) + 1e-5)
        if not cfg.ttt_nope:
            fq = rope(fq.reshape(B, T, H, hd)).reshape(B, T, n, d)
            fk = rope(fk.reshape(B, T, H, hd)).reshape(B, T, n, d)
        lr = F.softplus(F.linear(h, at.lr_proj.weight, at.lr_proj.bias) + math.log(math.expm1(1e-3))).view(B, T, n, 3)
        mom = (
            torch.sigmoid(F.linear(h, at.momentum_proj[0].weight, at.momentum_proj[0].bias))
            if cfg.use_momentum
            else None
        )
        if cfg.low_rank:
            eye = torch.eye(at.w0.w_left.shape[1], d)
            init = [at.w0.w_left @ at.w0.w_right + 0.5 * eye, at.w1, at.w2.w_left @ at.w2.w_right + 0.5 * eye]
        else:
            init = [at.w0, at.w1, at.w2]
        u = torch.zeros(B, T, n, d)
        for b in range(B):
            for hh in range(n):
                W = [w[hh] for w in init]
                nu = [w.norm(dim=-1, keepdim=True) for w in W]
                raw = list(W)
                M = [torch.zeros_like(w) for w in W]

                def f(x_, W=W):
                    return W[1] @ (F.silu(W[0] @ x_) * (W[2] @ x_))

                e = 0
                for s in range(0, T - C, C):
                    e = s + C
                    for t in range(s, e):
                        u[b, t, hh] = f(fq[b, t, hh])
                    G = [torch.zeros_like(w) for w in W]
                    for t in range(s, e):
                        kt, vt = fk[b, t, hh], fv[b, t, hh]
                        g, p = W[0] @ kt, W[2] @ kt
                        hid, delta = F.silu(g) * p, W[1].T @ vt
                        sg = torch.sigmoid(g)
                        G[1] = G[1] + lr[b, t, hh, 1] * torch.outer(vt, hid)
                        G[2] = G[2] + lr[b, t, hh, 2] * torch.outer(delta * F.silu(g), kt)
                        G[0] = G[0] + lr[b, t, hh, 0] * torch.outer(delta * p * sg * (1 + g * (1 - sg)), kt)
                    for jj in range(3):
                        upd = G[jj]
                        if cfg.use_momentum:
                            upd = upd + mom[b, s:e, hh].mean() * M[jj]
                            M[jj] = upd
                        if cfg.use_muon:
                            upd = _ns5(upd)
                        if cfg.ttt_prenorm:
                            raw[jj] = raw[jj] + upd
                            W[jj] = raw[jj] / (raw[jj].norm(dim=-1, keepdim=True) + 1e-5) * nu[jj]
                        else:
                            W[jj] = (W[jj] + upd) / ((W[jj] + upd).norm(dim=-1, keepdim=True) + 1e-5) * nu[jj]
                for t in range(e, T):
                    u[b, t, hh] = f(fq[b, t, hh])
        y = rms(u, at.ttt_norm.weight, 1e-5)
        if cfg.learnable_ttt_scale:
            y = y * F.silu(F.linear(h, at.ttt_scale_proj.weight, at.ttt_scale_proj.bias))[..., None]
        x = x + F.linear(o_attn + y.reshape(B, T, D), at.o_proj.weight)
        z = rms(x, blk.mlp_norm.weight, cfg.norm_eps)
        x = x + blk.mlp.down_proj(F.silu(blk.mlp.gate_proj(z)) * blk.mlp.up_proj(z))
    return rms(x, model.model.norm.weight, cfg.norm_eps) @ model.lm_head.weight.T


VARIANTS = {
    "default": {},
    "lowrank_prenorm": dict(w0_w2_low_rank=3, ttt_prenorm=True),
    "muon": dict(use_muon=True),
    "nope_plain": dict(ttt_nope=True, use_momentum=False, learnable_ttt_scale=False, no_v_silu=True),
    "window_ne_chunk": dict(window_size=3, lact_chunk_size=5, inter_multi=1.5, qkv_bias=True, attn_qk_norm=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_forward_matches_spec_transcription(variant):
    model = _model(**VARIANTS[variant])
    tol = 1e-3 if variant == "muon" else 2e-5  # Newton-Schulz amplifies rounding differences
    with torch.no_grad():
        for t in (3, 8, 13):  # T < C, T = 2C (last full chunk not applied), partial tail
            ids = _ids(2, t, seed=t)
            _close(model(ids).logits, _naive_logits(model, ids), tol)


def test_fast_weight_updates_matter():
    """Guard for the other tests: with these tiny random weights the chunk updates change the logits a lot."""
    model = _model()
    ids = _ids(2, 13)
    frozen = _model(lact_chunk_size=1000)
    frozen.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (model(ids).logits - frozen(ids).logits).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Recurrent state: decoding, segments, padding, snapshots
# ---------------------------------------------------------------------------------------------------------------------


def _decode(model, ids, prefill: int, attention_mask=None):
    """Prefill ``prefill`` columns, then feed one column at a time."""
    outs, cache = [], None
    kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, :prefill]}
    out = model(ids[:, :prefill], use_cache=True, **kw)
    outs.append(out.logits)
    cache = out.past_key_values
    for t in range(prefill, ids.shape[1]):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, : t + 1]}
        out = model(ids[:, t : t + 1], past_key_values=cache, **kw)
        outs.append(out.logits)
        cache = out.past_key_values
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("variant", ["default", "lowrank_prenorm", "muon", "window_ne_chunk"])
@pytest.mark.parametrize("prefill", [1, 8, 6])  # token by token, prefill ends on a chunk boundary (C=4), mid-chunk
def test_token_by_token_matches_full_forward(variant, prefill):
    model = _model(**VARIANTS[variant])
    tol = 1e-3 if variant == "muon" else 1e-5
    ids = _ids(2, 19)
    with torch.no_grad():
        full = model(ids).logits
        stepped, cache = _decode(model, ids, prefill)
    _close(stepped, full, tol)
    assert cache.get_seq_length() == 19 and cache.positions.tolist() == [19, 19]


@pytest.mark.parametrize("force", ["chunk", "recurrent"])
@pytest.mark.parametrize("cut", [4, 5, 9, 12, 21])
def test_segmented_forward_matches_one_pass(monkeypatch, force, cut):
    # "chunk": chunked fast weights + banded SDPA over [window | segment]; "recurrent": token by token + split softmax
    monkeypatch.setattr(fw_mod, "RECURRENT_MAX_TOKENS", 0 if force == "chunk" else 10**6)
    monkeypatch.setattr(modeling_mod, "SHORT_SEGMENT_TOKENS", 0 if force == "chunk" else 10**6)
    model = _model()
    ids = _ids(2, 26)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :cut], use_cache=True)
        second = model(ids[:, cut:], past_key_values=first.past_key_values.states)  # a plain list works too
    _close(torch.cat([first.logits, second.logits], 1), full)


@pytest.mark.parametrize("force", ["chunk", "recurrent"])
def test_left_padding_does_not_change_valid_tokens(monkeypatch, force):
    """Rows of different lengths: prefill left-padded, a second (misaligned) segment, then decode steps."""
    monkeypatch.setattr(fw_mod, "RECURRENT_MAX_TOKENS", 3 if force == "chunk" else 10**6)
    monkeypatch.setattr(modeling_mod, "SHORT_SEGMENT_TOKENS", 3 if force == "chunk" else 10**6)
    model = _model(window_size=3, lact_chunk_size=5)
    lens, more = [7, 2, 11, 5], 17
    B, T = len(lens), max(lens)
    seqs = [_ids(1, n + more + 3, seed=10 + i)[0] for i, n in enumerate(lens)]
    ids, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - n :], mask[b, T - n :] = seqs[b][:n], 1
    seg2 = torch.stack([s[n : n + more] for s, n in zip(seqs, lens)])
    with torch.no_grad():
        o1 = model(ids, attention_mask=mask, use_cache=True)
        mask2 = torch.cat([mask, torch.ones(B, more, dtype=torch.long)], 1)
        o2 = model(seg2, attention_mask=mask2, past_key_values=o1.past_key_values)
        cache, steps = o2.past_key_values, []
        for j in range(3):
            tok = torch.stack([s[n + more + j] for s, n in zip(seqs, lens)])[:, None]
            out = model(tok, past_key_values=cache)
            cache, steps = out.past_key_values, steps + [out.logits]
        for b, n in enumerate(lens):
            ref = model(seqs[b][None]).logits[0]
            got = torch.cat([o1.logits[b, T - n :], o2.logits[b], torch.cat(steps, 1)[b]])
            _close(got, ref)
            assert (o1.logits[b, : T - n] == 0).all()
    assert cache.positions.tolist() == [n + more + 3 for n in lens]


@pytest.mark.parametrize("seg_len", [2, 20])
def test_fully_padded_row_keeps_its_state(seg_len):
    model = _model()
    ids = _ids(2, 9 + seg_len + 1)
    with torch.no_grad():
        cache = model(ids[:, :9], use_cache=True).past_key_values
        before = cache.snapshot()
        mask = torch.ones(2, 9 + seg_len, dtype=torch.long)
        mask[0, 9:] = 0  # row 0 gets no token in this call
        out = model(ids[:, 9 : 9 + seg_len], attention_mask=mask, past_key_values=cache)
        assert (out.logits[0] == 0).all()
        for key, val in before[1].items():
            assert torch.equal(cache[1][key][0], val[0]), key
        ref = model(ids[1:, : 9 + seg_len]).logits[0, 9:]
        _close(out.logits[1], ref)
        # row 0 resumes where it was
        nxt = model(ids[:, 9 + seg_len :], past_key_values=cache).logits[0, -1]
        _close(nxt, model(torch.cat([ids[:1, :9], ids[:1, -1:]], 1)).logits[0, -1])


def test_snapshots_stay_valid_and_branches_match():
    model = _model()
    ids = _ids(2, 10)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        snap = cache.snapshot()
        frozen = {k: v.clone() for k, v in snap[0].items()}
        cont = _ids(2, 6, seed=5)
        first = model(cont, past_key_values=cache).logits  # rebinds `cache`, never touches `snap`'s tensors
        assert all(torch.equal(snap[0][k], frozen[k]) for k in frozen)
        again = model(cont, past_key_values=snap.snapshot()).logits
        _close(again, first, 0)

        # branch G=3 continuations per row from the snapshot: repeat_interleave, decode, compare with full passes
        G, k = 3, 5
        branches = snap.repeat_interleave(G)
        toks = _ids(2 * G, k, seed=7)
        dec = []
        for j in range(k):
            out = model(toks[:, j : j + 1], past_key_values=branches)
            dec.append(out.logits)
        dec = torch.cat(dec, 1)
        full = model(torch.cat([ids.repeat_interleave(G, 0), toks], 1)).logits[:, 10:]
        _close(dec, full)

        # select / cat round trip
        rebuilt = LaCTCache.cat([snap.select([1]), snap.select([0])])
        assert len(cat_states([snap.states, snap.states])) == len(snap)
        swapped = model(cont.flip(0), past_key_values=rebuilt).logits
        _close(swapped, again.flip(0))


def test_state_carries_gradients():
    model = _model()
    model.train()
    ids = _ids(2, 11)
    first = model(ids[:, :7], use_cache=True)
    leaf = first.past_key_values.detach()
    leaf.states = [{k: (v.requires_grad_() if v.is_floating_point() else v) for k, v in s.items()} for s in leaf]
    out = model(ids[:, 7:], past_key_values=leaf.snapshot())
    out.logits.square().sum().backward()
    for key in ("fw_w0", "fw_w1", "fw_g0", "attn_k", "fw_m1"):
        assert leaf[0][key].grad is not None and leaf[0][key].grad.abs().sum() > 0, key

    # parameter gradients of a segmented pass equal those of one pass
    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(model(ids, labels=ids).loss)
    o1 = model(ids[:, :5], use_cache=True)
    o2 = model(ids[:, 5:], past_key_values=o1.past_key_values)
    seg = grads(lact_causal_lm_loss(torch.cat([o1.logits, o2.logits], 1), ids))
    assert ref.keys() == seg.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        _close(seg[name], ref[name], 1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face integration
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_greedy_uses_the_state_and_matches_recompute():
    model = _model(pad_token_id=0)
    lens = [5, 9]
    seqs = [_ids(1, n, seed=20 + n)[0] for n in lens]
    T = max(lens)
    ids, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - n :], mask[b, T - n :] = seqs[b], 1
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    hook.remove()
    assert seen == [T] + [1] * 9  # prefill once, then one token per step
    for b in range(2):
        seq = seqs[b]
        with torch.no_grad():
            for _ in range(10):
                seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
        assert torch.equal(seq[lens[b] :], out[b, T:])
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, pad_token_id=0)
    assert beams.shape == (2, T + 4)


def test_outputs_hidden_states_logits_to_keep_and_loss():
    model = _model()
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, labels=ids)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1
        base = model.base_model(input_ids=ids, attention_mask=mask)
        _close(out.hidden_states[-1], base.last_hidden_state, 0)
        _close(base.last_hidden_state @ model.get_output_embeddings().weight.T, out.logits, 1e-6)
        assert model.get_decoder() is model.model and model.base_model is model.model
        _close(model(ids, attention_mask=mask, logits_to_keep=2).logits, out.logits[:, -2:], 1e-6)
        target = ids[:, 1:].clone()
        target[1, :3] = -100  # targets that are pads or follow a pad input
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
        _close(out.loss, manual, 1e-6)
        as_tuple = model(ids, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, labels=ids, logits_to_keep=1)


def test_save_load_round_trip(tmp_path):
    model = _model(w0_w2_low_rank=3)
    ids = _ids(2, 11)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LaCTForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), LaCTModel)
    assert isinstance(AutoConfig.for_model("lact_swiglu"), LaCTConfig)


# ---------------------------------------------------------------------------------------------------------------------
# Published checkpoint layout (research/lact.md §4), built synthetically at tiny size
# ---------------------------------------------------------------------------------------------------------------------


def _published_layout(D=24, L=2, H=4, n=2, r=3, V=VOCAB, inter=40, fused_gate=False) -> dict[str, torch.Tensor]:
    """Keys and shapes as listed in the spec's state_dict table (full rank when r is None)."""
    g = torch.Generator().manual_seed(3)

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    d = D // n
    sd = {"model.embeddings.weight": t(V, D), "model.norm.weight": 1 + t(D), "lm_head.weight": t(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "attn_norm.weight": 1 + t(D),
                p + "mlp_norm.weight": 1 + t(D),
                p + "attn.qkv.weight": t(3 * D, D),
                p + "attn.o_proj.weight": t(D, D),
                p + "attn.w1": t(n, d, d, scale=d**-0.5),
                p + "attn.qk_scale": 1 + t(D, 2),
                p + "attn.qk_offset": t(D, 2),
                p + "attn.lr_proj.weight": t(3 * n, D),
                p + "attn.lr_proj.bias": t(3 * n),
                p + "attn.ttt_scale_proj.weight": t(n, D),
                p + "attn.ttt_scale_proj.bias": t(n),
                p + "attn.momentum_proj.0.weight": t(n, D),
                p + "attn.momentum_proj.0.bias": t(n),
                p + "attn.ttt_norm.weight": 1 + t(d),
                p + "attn.rotary.inv_freq": torch.ones(D // H // 2),  # non-persistent upstream; must be ignored
                p + "mlp.down_proj.weight": t(D, inter),
            }
        )
        if fused_gate:
            sd[p + "mlp.gate_proj.weight"] = t(2 * inter, D)
        else:
            sd[p + "mlp.gate_proj.weight"] = t(inter, D)
            sd[p + "mlp.up_proj.weight"] = t(inter, D)
        for w in ("w0", "w2"):
            if r is None:
                sd[p + f"attn.{w}"] = t(n, d, d, scale=d**-0.5)
            else:
                sd[p + f"attn.{w}.w_left"] = t(n, d, r)
                sd[p + f"attn.{w}.w_right"] = t(n, r, d)
    return sd


def _published_config_dict(**overrides) -> dict:
    """The published 760M config.json fields (research/lact.md §5) at tiny size."""
    cfg = {
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "fuse_cross_entropy": True,
        "fuse_norm": True,
        "hidden_act": "swish",
        "hidden_size": 24,
        "num_attn_heads": 4,
        "num_hidden_layers": 2,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "model_type": "lact_swiglu",
        "num_lact_heads": 2,
        "inter_multi": 1,
        "qkv_bias": False,
        "attn_qk_norm": False,
        "qkv_silu": True,
        "lact_chunk_size": 4,
        "window_size": 4,
        "use_muon": False,
        "lr_dim": 1,
        "lr_parameterization": "mamba",
        "learnable_ttt_scale": True,
        "w0_w2_low_rank": 3,
        "fw_init_gain": 0.5,
        "use_momentum": True,
        "rope_theta": 1000000.0,
        "norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": VOCAB,
        "intermediate_size": 40,
    }
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("rank", [3, None])
def test_published_layout_loads_and_dims_are_inferred(tmp_path, rank):
    sd = _published_layout(r=rank)
    dims = infer_lact_dims(sd)
    assert (dims["num_lact_heads"], dims["fw_head_dim"], dims["fw_hidden_dim"]) == (2, 12, 12)
    assert dims["w0_w2_low_rank"] == (rank or -1) and dims["num_hidden_layers"] == 2
    config = LaCTConfig(
        **{k: v for k, v in _published_config_dict(w0_w2_low_rank=rank or -1).items() if k != "model_type"}
    )
    model = LaCTForCausalLM(config).eval()
    model.load_state_dict(sd)  # strict; the inv_freq buffers are dropped
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits
    (tmp_path / "config.json").write_text(json.dumps(_published_config_dict(w0_w2_low_rank=rank or -1)))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_mismatched_checkpoint_fails_clearly(tmp_path):
    sd = _published_layout(n=2, r=3)
    wrong = LaCTConfig(
        **{k: v for k, v in _published_config_dict(num_lact_heads=4, w0_w2_low_rank=-1).items() if k != "model_type"}
    )
    with pytest.raises(ValueError, match=r"num_lact_heads: .* has 2 .*set num_lact_heads=2") as err:
        check_lact_checkpoint(wrong, sd)
    assert "w0_w2_low_rank" in str(err.value) and "set w0_w2_low_rank=3" in str(err.value)
    with pytest.raises(ValueError, match="num_lact_heads"):
        LaCTForCausalLM(wrong).load_state_dict(sd)
    (tmp_path / "config.json").write_text(json.dumps(_published_config_dict(w0_w2_low_rank=7)))
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"rank 3 .*set w0_w2_low_rank=3"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_fused_gate_proj_is_split():
    sd = _published_layout(fused_gate=True)
    assert infer_lact_dims(sd)["fused_gate_proj"]
    config = LaCTConfig(**{k: v for k, v in _published_config_dict().items() if k != "model_type"})
    model = LaCTForCausalLM(config)
    model.load_state_dict(sd)
    gate = sd["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, gate[40:])
    assert set(convert_lact_state_dict(sd)) == set(model.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_published_760m_config_sizes():
    cfg = LaCTConfig(
        **{
            k: v
            for k, v in _published_config_dict(
                hidden_size=1536,
                num_attn_heads=24,
                num_hidden_layers=24,
                vocab_size=32000,
                intermediate_size=None,
                lact_chunk_size=2048,
                window_size=2048,
                w0_w2_low_rank=32,
                num_lact_heads=4,
            ).items()
            if k != "model_type"
        }
    )
    assert (cfg.head_dim, cfg.fw_head_dim, cfg.fw_hidden_dim, cfg.low_rank) == (64, 384, 384, 32)
    assert cfg.mlp_intermediate_size == 4096 and cfg.num_attention_heads == 24
    with torch.device("meta"):
        model = LaCTForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(797.6e6, rel=1e-3)  # spec §4


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr_dim", 2),
        ("ttt_loss_type", "l2"),
        ("lr_parameterization", "linear"),
        ("window_size", None),
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("num_lact_heads", 5),
        ("muon_dtype", "float16"),
    ],
)
def test_unsupported_config_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"LaCTConfig\.{field}=.*Fix:"):
        _config(**{field: value})


def test_registered_with_auto_classes():
    assert AutoConfig.for_model("lact_swiglu").__class__ is LaCTConfig
    model = AutoModelForCausalLM.from_config(_config())
    assert isinstance(model, LaCTForCausalLM)
    assert lact.LaCTSWIGLUConfig is LaCTConfig


# ---------------------------------------------------------------------------------------------------------------------
# One attention window shared by the rollout branches of a prefix
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [4, 8])
def test_shared_window_branches_equal_copied_branches(window):
    """G branches per prefix read one copy of its window (never expanded, the same tensor through every call while
    it is still in the window) and give what G copies give: logits, states and gradients, and the window's
    gradient is the sum over the G branches, each of which contributes. Window 4 leaves the shared window after
    3 tokens (the state turns ordinary); row 1 is left-padded and shorter than the window (invalid slots)."""
    from trl_refine.models.lact import select_states, share_window, shared_window_layout, unshare_window

    model = _model(window_size=window).train()
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1: 3 valid tokens
    prefix = model(ids, attention_mask=mask, use_cache=True).past_key_values.detach()
    leaves = [{k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in s.items()} for s in prefix]
    index, G = torch.tensor([1, 0]), 3
    toks = _ids(2 * G, 5, seed=9)
    weights = torch.randn(2 * G, 5, VOCAB, generator=torch.Generator().manual_seed(3))

    def run(share: bool):
        states = share_window(leaves, index, G) if share else select_states(leaves, index.repeat_interleave(G))
        for s in states:
            for key in ("attn_k", "attn_v"):
                s[key].retain_grad()
        window_k = states[0]["attn_k"]
        cache = LaCTCache(states)
        logits, layouts = [], []
        for a, b in ((0, 2), (2, 3), (3, 4), (4, 5)):  # a 2-token call, then single tokens
            logits.append(model(toks[:, a:b], past_key_values=cache).logits)
            layouts.append(shared_window_layout(cache.states))
            if share and layouts[-1][0] > 1:
                assert cache.states[0]["attn_k"] is window_k  # no call copies or rebuilds the shared window
        logits = torch.cat(logits, 1)
        (logits * weights).sum().backward()
        return logits, unshare_window(cache.states), states, layouts

    shared, copied = run(True), run(False)
    assert shared[2][0]["attn_k"].shape[0] == 2 and copied[2][0]["attn_k"].shape[0] == 2 * G
    assert [g for g, _ in shared[3]] == [G if t < window - 1 else 1 for t in (2, 3, 4, 5)]
    assert all(layout == (1, 0) for layout in copied[3])
    _close(shared[0], copied[0])
    for a, b in zip(shared[1], copied[1]):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key].float(), b[key].float())
    for i in range(len(leaves)):
        for key in ("attn_k", "attn_v"):
            per_branch = copied[2][i][key].grad.view(2, G, *copied[2][i][key].shape[1:])
            assert all(per_branch[:, g].abs().sum() > 0 for g in range(G)), "every branch reaches the window"
            _close(shared[2][i][key].grad, per_branch.sum(1))
    # the gradients reach the prefix's states (and so the parameters) the same way
    grads = []
    for share in (True, False):
        for s in leaves:
            for v in s.values():
                v.grad = None
        run(share)
        grads.append(torch.cat([v.grad.flatten() for s in leaves for v in s.values() if v.grad is not None]))
    _close(grads[0], grads[1])


def test_shared_window_state_helpers_and_padding():
    """Selecting, concatenating or repeating rows of a shared-window state goes through its ordinary layout; a
    padded call on it is refused with the fix."""
    from trl_refine.models.lact import select_states, share_window, unshare_window

    model = _model(window_size=8)
    with torch.no_grad():
        prefix = model(_ids(2, 9), use_cache=True).past_key_values
        shared = LaCTCache(share_window(prefix.states, torch.tensor([0, 1]), 2))
        model(_ids(4, 2, seed=4), past_key_values=shared)
        ordinary = LaCTCache(unshare_window(shared.states))
        assert ordinary[0]["attn_k"].shape[0] == 4 and "attn_k_branch" not in ordinary[0]
        nxt = _ids(4, 1, seed=5)
        ref = model(nxt, past_key_values=ordinary.snapshot()).logits
        _close(model(nxt, past_key_values=shared.snapshot()).logits, ref)  # float summation order
        _close(model(nxt[[3, 0]], past_key_values=shared.select([3, 0])).logits, ref[[3, 0]])
        _close(model(nxt, past_key_values=LaCTCache.cat([shared.select([0, 1]), shared.select([2, 3])])).logits, ref)
        assert select_states(shared.states, [2])[0]["attn_k"].shape[0] == 1
        with pytest.raises(ValueError, match="already shares"):
            share_window(shared.states, torch.tensor([0]), 2)
        with pytest.raises(ValueError, match="unshare_window"):
            model(_ids(4, 2), attention_mask=torch.tensor([[1, 1], [0, 1], [1, 1], [1, 1]]), past_key_values=shared)
