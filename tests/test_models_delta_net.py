"""Tests of the pure-PyTorch reference DeltaNet (trl_refine.models.delta_net). CPU, fp32."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from trl_refine.models.delta_net import (
    RefDeltaNetConfig,
    RefDeltaNetForCausalLM,
    RefDeltaNetModel,
    delta_rule_chunkwise,
    delta_rule_recurrent,
    fla_cache_class,
    new_cache,
)
from trl_refine.models.delta_net.modeling_delta_net import l2norm

fla = pytest.importorskip("fla")
from fla.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402

VOCAB = 97
TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=VOCAB, pad_token_id=0, eos_token_id=None)


def tiny_model(seed: int = 0, **overrides) -> RefDeltaNetForCausalLM:
    torch.manual_seed(seed)
    model = RefDeltaNetForCausalLM(RefDeltaNetConfig(**{**TINY, **overrides})).float()
    # larger-than-default weights so that the recurrent/conv states matter for the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    return model.eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= tol * scale, f"max abs diff {err:.3e} (scale {scale:.3e})"


def cache_tensors(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache:
        out.append(layer["recurrent_state"])
        out.extend(layer["conv_state"])
    return out


# ----------------------------------------------------------------------------- config
def _init_params(cls) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def test_config_fields_and_defaults_match_fla():
    assert _init_params(RefDeltaNetConfig) == _init_params(DeltaNetConfig)
    ours, theirs = RefDeltaNetConfig().to_dict(), DeltaNetConfig().to_dict()
    for key in ("model_type", "transformers_version"):
        ours.pop(key, None)
        theirs.pop(key, None)
    assert ours == theirs
    assert RefDeltaNetConfig.model_type == "refine_delta_net" != DeltaNetConfig.model_type


@pytest.mark.parametrize(
    "field, value",
    [
        ("attn", {"layers": [0], "num_heads": 2}),
        ("attnres_block_size", 2),
        ("hidden_act", "powlu"),
        ("qk_activation", "tanh"),
        ("qk_norm", "layer"),
        ("attn_mode", "fused_chunk"),
        ("use_l2warp", True),
        ("expand_k", 0.3),
        ("num_heads", 3),
        ("conv_size", 0),
    ],
)
def test_config_rejects_unsupported_values(field, value):
    with pytest.raises(ValueError, match=field):
        RefDeltaNetConfig(**{**TINY, field: value})


def test_config_from_fla_config_and_fla_config_json(tmp_path):
    fla_cfg = DeltaNetConfig(**TINY, use_gate=True, expand_v=2.0)
    ref = RefDeltaNetConfig.from_fla_config(fla_cfg)
    assert ref.model_type == "refine_delta_net"
    assert ref.use_gate and ref.expand_v == 2.0 and ref.hidden_size == 64
    fla_cfg.save_pretrained(tmp_path)
    loaded = RefDeltaNetConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RefDeltaNetConfig) and loaded.expand_v == 2.0 and loaded.use_gate
    with pytest.raises(ValueError, match="attn"):
        RefDeltaNetConfig.from_fla_config(DeltaNetConfig(**TINY, attn={"layers": [1], "num_heads": 2}))


# ----------------------------------------------------------------------------- state dict vs fla
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_gate": True, "use_short_conv": False, "use_beta": False, "expand_k": 0.5, "intermediate_size": 96},
        {"tie_word_embeddings": True, "hidden_ratio": None, "fuse_norm": False},
    ],
)
def test_state_dict_matches_fla(overrides):
    cfg = {**TINY, **overrides}
    torch.manual_seed(0)
    theirs = DeltaNetForCausalLM(DeltaNetConfig(**cfg))
    ours = RefDeltaNetForCausalLM(RefDeltaNetConfig(**cfg))
    shapes_theirs = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    shapes_ours = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes_ours == shapes_theirs
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_from_pretrained_loads_fla_checkpoint(tmp_path):
    torch.manual_seed(0)
    theirs = DeltaNetForCausalLM(DeltaNetConfig(**TINY))
    theirs.save_pretrained(tmp_path)
    ours = RefDeltaNetForCausalLM.from_pretrained(tmp_path)
    assert isinstance(ours.config, RefDeltaNetConfig)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


# ----------------------------------------------------------------------------- delta rule
def test_chunkwise_delta_rule_matches_recurrence_with_state_and_grad():
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 150, 3, 16, 8  # T not a multiple of the chunk size
    leaves = [
        torch.randn(B, T, H, K, generator=g),
        torch.randn(B, T, H, K, generator=g),
        torch.randn(B, T, H, V, generator=g),
        torch.rand(B, T, H, generator=g) * 2.0,  # allow_neg_eigval range
        torch.randn(B, H, K, V, generator=g),
    ]
    w_o, w_s = torch.randn(B, T, H, V, generator=g), torch.randn(B, H, K, V, generator=g)

    def run(fn):
        inputs = [x.clone().requires_grad_(True) for x in leaves]
        o, s = fn(*inputs[:4], initial_state=inputs[4], use_qk_l2norm=True)
        ((o * w_o).sum() + (s * w_s).sum()).backward()
        return o, s, [x.grad for x in inputs]

    o_r, s_r, g_r = run(delta_rule_recurrent)
    o_c, s_c, g_c = run(delta_rule_chunkwise)
    assert s_r.dtype == torch.float32 and s_r.shape == (B, H, K, V)
    assert_close(o_c, o_r)
    assert_close(s_c, s_r)
    for a, b in zip(g_c, g_r):
        assert_close(a, b, 2e-5)
    assert g_r[4].abs().sum() > 0  # gradient reaches the initial state


def test_recurrence_matches_fla_naive_reference():
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    g = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 20, 2, 8, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g) for D in (K, K, V))
    beta, h0 = torch.rand(B, T, H, generator=g), torch.randn(B, H, K, V, generator=g)
    o, s = delta_rule_recurrent(q, k, v, beta, initial_state=h0, use_qk_l2norm=True)
    o_ref, s_ref = delta_rule_recurrence(
        *(x.transpose(1, 2) for x in (l2norm(q), l2norm(k), v, beta)), initial_state=h0
    )
    assert_close(o, o_ref.transpose(1, 2))
    assert_close(s, s_ref)


def _naive_block(block, h):
    """One DeltaNet block from fla's own torch references (rms_norm_ref, naive delta_rule_recurrence) and
    nn.Conv1d's causal forward, written from research/fla.md section 6.2, independent of the model code."""
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    attn, T = block.attn, h.shape[1]

    def conv(mod, x):  # causal depthwise conv: nn.Conv1d pads W-1 on both sides; keep the first T outputs
        return F.silu(torch.nn.Conv1d.forward(mod, x.transpose(1, 2))[..., :T].transpose(1, 2))

    def heads(x):  # [B, T, H*D] -> [B, H, T, D]
        return x.view(x.shape[0], T, attn.num_heads, -1).transpose(1, 2)

    def l2(x):
        return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)

    x = rms_norm_ref(h, block.attn_norm.weight, None, eps=block.attn_norm.eps)
    q, k, v = (conv(c, p(x)) for c, p in ((attn.q_conv1d, attn.q_proj), (attn.k_conv1d, attn.k_proj),
                                          (attn.v_conv1d, attn.v_proj)))  # fmt: skip
    beta = attn.b_proj(x).sigmoid().transpose(1, 2)
    if attn.allow_neg_eigval:
        beta = beta * 2
    o, _ = delta_rule_recurrence(l2(heads(q)), l2(heads(k)), heads(v), beta)
    o = rms_norm_ref(o.transpose(1, 2), attn.o_norm.weight, None, eps=attn.o_norm.eps)
    h = h + attn.o_proj(o.reshape(h.shape[0], T, -1))
    x = rms_norm_ref(h, block.mlp_norm.weight, None, eps=block.mlp_norm.eps)
    mlp = block.mlp
    return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


@pytest.mark.parametrize("overrides", [{}, {"allow_neg_eigval": True, "expand_v": 2.0, "conv_size": 3}])
@torch.no_grad()
def test_forward_matches_naive_composition_of_fla_references(overrides):
    model = tiny_model(**overrides)
    x = ids(2, 90)
    h = model.model.embeddings(x)
    for block in model.model.layers:
        h = _naive_block(block, h)
    logits = model.lm_head(F.rms_norm(h, (h.shape[-1],), model.model.norm.weight, model.config.norm_eps))
    assert_close(model(x).logits, logits)


# ----------------------------------------------------------------------------- cache / segments
@torch.no_grad()
def test_cached_decoding_matches_full_forward():
    model = tiny_model()
    x = ids(2, 40)
    full = model(x).logits
    # pure token-by-token from an empty cache
    cache, steps = None, []
    for t in range(x.shape[1]):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full)
    assert cache.get_seq_length() == 40
    layer = cache[0]
    assert layer["recurrent_state"].shape == (2, 2, 32, 32) and layer["recurrent_state"].dtype == torch.float32
    assert [tuple(c.shape) for c in layer["conv_state"]] == [(2, 64, 4)] * 3
    assert layer["attn_state"] is None and layer["ffn_state"] is None
    # prefill (chunkwise path) + decode (recurrent path)
    out = model(x[:, :29], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(29, 40):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full)


def test_segmented_forward_and_parameter_grads_match_single_pass():
    model = tiny_model().train()
    x = ids(2, 200)
    cuts = [0, 100, 103, 130, 200]  # one segment short enough for the token recurrence

    def loss_fn(logits, start):  # NTP loss on the tokens of the last segment only
        targets = x[:, start + 1 :]
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1))

    model.zero_grad()
    full = model(x).logits
    loss_fn(full[:, cuts[-2] :], cuts[-2]).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    cache, seg_logits = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out = model(x[:, a:b], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        seg_logits.append(out.logits)
    assert_close(torch.cat(seg_logits, 1), full)
    loss_fn(seg_logits[-1], cuts[-2]).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], 1e-5)
    # the loss on the last segment depends on the earlier segments only through the cache
    assert model.model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_use_cache_false_with_a_cache_still_updates_conv_and_recurrent_states():
    model = tiny_model().train()  # use_cache defaults to False in training (fla trap P3)
    x = ids(1, 30)
    cache = model(x[:, :10], use_cache=True).past_key_values
    before = cache_tensors(cache)
    out = model(x[:, 10:20], past_key_values=cache)  # use_cache not given
    after = cache_tensors(out.past_key_values)
    assert all(b is not a for a, b in zip(before, after))
    assert cache.get_seq_length() == 20
    full = model(x[:, :30]).logits[:, 20:]
    assert_close(model(x[:, 20:], past_key_values=cache).logits, full)


@torch.no_grad()
def test_snapshot_stays_valid_and_expanded_branches_match_full_recompute():
    model = tiny_model()
    doc = ids(2, 60)
    p = 37
    cache = model(doc[:, :p], use_cache=True).past_key_values
    # snapshot = references to the cache's tensors after the prefix (no copy)
    snap = [{"recurrent_state": s["recurrent_state"], "conv_state": tuple(s["conv_state"])} for s in cache]
    frozen = [t.clone() for t in cache_tensors(cache)]
    refs = [t for s in snap for t in (s["recurrent_state"], *s["conv_state"])]
    # keep decoding from the same cache (token steps, then a chunkwise segment): the snapshot must not change
    for t in range(p, 42):
        model(doc[:, t : t + 1], past_key_values=cache, use_cache=True)
    model(doc[:, 42:50], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 50
    assert all(torch.equal(a, b) for a, b in zip(refs, frozen))
    # a chunkwise segment straight from a cache rebuilt on the snapshot tensors leaves them unchanged too
    rebuilt = new_cache([{**s, "attn_state": None, "ffn_state": None} for s in snap], seen_tokens=p)
    model(doc[:, p:50], past_key_values=rebuilt, use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(refs, frozen))

    # expand: G branches per row (torch.cat of per-row snapshots, then repeat_interleave), rebuild, decode
    G, k = 3, 5

    def row(state, i):  # one document's snapshot of one layer (a per-prefix snapshot in the engine)
        return {"recurrent_state": state["recurrent_state"][i : i + 1],
                "conv_state": tuple(c[i : i + 1] for c in state["conv_state"])}  # fmt: skip

    rows = [[row(s, i) for s in snap] for i in range(2)]
    layer_states = []
    for layer in range(len(snap)):
        rec = torch.cat([r[layer]["recurrent_state"] for r in rows]).repeat_interleave(G, 0)
        conv = tuple(torch.cat([r[layer]["conv_state"][j] for r in rows]).repeat_interleave(G, 0) for j in range(3))
        layer_states.append({"recurrent_state": rec, "attn_state": None, "conv_state": conv, "ffn_state": None})
    branch_cache = new_cache(layer_states, seen_tokens=p)
    assert isinstance(branch_cache, fla_cache_class())
    cont = ids(2 * G, k, seed=5)
    branch_logits = model(cont, past_key_values=branch_cache, use_cache=True).logits
    full = model(torch.cat([doc[:, :p].repeat_interleave(G, 0), cont], 1)).logits[:, p:]
    assert_close(branch_logits, full)
    assert all(torch.equal(a, b) for a, b in zip(refs, frozen))


def test_gradients_flow_into_cached_states():
    model = tiny_model()
    x = ids(2, 12)
    cache = model(x[:, :6], use_cache=True).past_key_values
    leaves = []
    layer_states = []
    for s in cache:
        rec = s["recurrent_state"].detach().requires_grad_(True)
        conv = tuple(c.detach().requires_grad_(True) for c in s["conv_state"])
        leaves.append((rec, conv))
        layer_states.append({"recurrent_state": rec, "attn_state": None, "conv_state": conv, "ffn_state": None})
    out = model(x[:, 6:], past_key_values=new_cache(layer_states), use_cache=True)
    out.logits.square().sum().backward()
    for rec, conv in leaves:
        assert rec.grad is not None and rec.grad.abs().sum() > 0
        for c in conv:
            assert c.grad is not None and c.grad[..., 1:].abs().sum() > 0
            assert c.grad[..., 0].abs().sum() == 0  # slot 0 is never read (as in fla)

    # the state gradient equals the one obtained through the prefix computation
    model.zero_grad()
    states = {}

    def keep(name):
        def hook(grad):
            states[name] = grad

        return hook

    cache2 = model(x[:, :6], use_cache=True).past_key_values
    cache2[0]["recurrent_state"].register_hook(keep("rec0"))
    model(x[:, 6:], past_key_values=cache2, use_cache=True).logits.square().sum().backward()
    assert_close(states["rec0"], leaves[0][0].grad)


# ----------------------------------------------------------------------------- padding / packing
@torch.no_grad()
def test_left_padding_matches_unpadded_rows_and_continues_from_cache():
    model = tiny_model()
    lengths = [30, 17, 1]
    T = max(lengths)
    rows = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    padded = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, T - r.shape[1] :] = r[0]
        mask[i, T - r.shape[1] :] = 1
    out = model(padded, attention_mask=mask, use_cache=True)
    nxt = ids(len(rows), 3, seed=99)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    out2 = model(nxt, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
    for i, r in enumerate(rows):
        n = r.shape[1]
        ref = model(r, use_cache=True)
        assert_close(out.logits[i, T - n :], ref.logits[0])
        ref2 = model(nxt[i : i + 1], past_key_values=ref.past_key_values, use_cache=True)
        assert_close(out2.logits[i], ref2.logits[0])
        for a, b in zip(cache_tensors(out2.past_key_values), cache_tensors(ref2.past_key_values)):
            assert_close(a[i], b[0])


@torch.no_grad()
def test_cu_seqlens_packing_matches_separate_rows():
    model = tiny_model()
    rows = [ids(1, n, seed=20 + n) for n in (9, 70, 2)]
    packed = torch.cat(rows, 1)
    cu = torch.tensor([0, 9, 79, 81])
    out = model(packed, cu_seqlens=cu, use_cache=True)
    assert out.past_key_values[0]["recurrent_state"].shape[0] == 3
    for i, r in enumerate(rows):
        ref = model(r, use_cache=True)
        assert_close(out.logits[0, cu[i] : cu[i + 1]], ref.logits[0])
        for a, b in zip(cache_tensors(out.past_key_values), cache_tensors(ref.past_key_values)):
            assert_close(a[i], b[0])


# ----------------------------------------------------------------------------- HF API
def test_loss_logits_to_keep_base_model_and_unknown_kwargs():
    model = tiny_model()
    x = ids(2, 20)
    out = model(x, labels=x, position_ids=torch.arange(20)[None], some_unknown_flag=True)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert_close(out.loss, ref)
    assert_close(model(x, logits_to_keep=3).logits, out.logits[:, -3:])
    assert model(x, logits_to_keep=0).logits.shape == (2, 20, VOCAB)
    hidden = model.base_model(input_ids=x).last_hidden_state
    assert model.base_model is model.get_decoder() and isinstance(model.get_decoder(), RefDeltaNetModel)
    assert_close(hidden @ model.get_output_embeddings().weight.T, out.logits)
    tup = model(x, return_dict=False, use_cache=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)
    hs = model(x, output_hidden_states=True).hidden_states
    assert len(hs) == 3 and torch.equal(hs[-1], hidden)


def test_gradient_checkpointing_trains_and_refuses_a_cache():
    model = tiny_model().train()
    x = ids(2, 40)
    model(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, ref[n])
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(x, use_cache=True)


def test_save_load_roundtrip_and_auto_classes(tmp_path):
    model = tiny_model()
    x = ids(2, 25)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    for loader in (RefDeltaNetForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is RefDeltaNetForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)

    import fla.models  # noqa: F401  (fla registers model_type "delta_net"; ours must survive and vice versa)

    assert AutoConfig.for_model("refine_delta_net").__class__ is RefDeltaNetConfig
    assert AutoConfig.for_model("delta_net").__class__ is DeltaNetConfig
    cfg = RefDeltaNetConfig(**TINY)
    assert type(AutoModelForCausalLM.from_config(cfg)) is RefDeltaNetForCausalLM
    assert type(AutoModel.from_config(cfg)) is RefDeltaNetModel
    assert type(AutoModelForCausalLM.from_config(DeltaNetConfig(**TINY))) is DeltaNetForCausalLM


# ----------------------------------------------------------------------------- generate
@torch.no_grad()
def test_generate_greedy_and_sampling():
    model = tiny_model()
    prompt = ids(1, 7)
    new = 10
    out = model.generate(prompt, max_new_tokens=new, do_sample=False)
    manual = prompt
    for _ in range(new):  # full recomputation every step, no cache
        nxt = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, nxt], 1)
    assert torch.equal(out, manual)
    # sampling with top_k=1 is greedy
    sampled = model.generate(prompt, max_new_tokens=new, do_sample=True, top_k=1)
    assert torch.equal(sampled, manual)
    torch.manual_seed(0)
    sampled = model.generate(prompt.repeat(3, 1), max_new_tokens=new, do_sample=True, temperature=1.5)
    assert sampled.shape == (3, 7 + new)

    # batched, left-padded prompts give the same continuations as one prompt at a time
    prompts = [ids(1, 7, seed=3), ids(1, 4, seed=4)]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 7 - p.shape[1] :] = p[0]
        mask[i, 7 - p.shape[1] :] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False)
    for i, p in enumerate(prompts):
        single = model.generate(p, max_new_tokens=new, do_sample=False)
        assert torch.equal(out[i, 7:], single[0, p.shape[1] :])


# ----------------------------------------------------------------------------- GPU parity with fla kernels
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and fla's Triton kernels")
def test_matches_fla_kernels_on_gpu():
    cfg = {**TINY, "fuse_cross_entropy": False}
    torch.manual_seed(0)
    theirs = DeltaNetForCausalLM(DeltaNetConfig(**cfg, attn_mode="fused_recurrent")).cuda().float().eval()
    ours = RefDeltaNetForCausalLM(RefDeltaNetConfig(**cfg)).cuda().float().eval()
    ours.load_state_dict(theirs.state_dict())
    x = ids(2, 100).cuda()
    mask = torch.ones_like(x)
    mask[1, :37] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a = theirs(x, use_cache=True, **kwargs)
            b = ours(x, use_cache=True, **kwargs)
            valid = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
            assert_close(b.logits[valid], a.logits[valid], 1e-4)
            for ta, tb in zip(cache_tensors(a.past_key_values), cache_tensors(b.past_key_values)):
                assert_close(tb, ta, 1e-4)
