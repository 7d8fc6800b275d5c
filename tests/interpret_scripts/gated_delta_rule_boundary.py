"""trl_refine.kernels.gated_delta_rule_boundary on CPU under TRITON_INTERPRET=1 (fp32) against a pure-PyTorch token
recurrence of the gated delta rule (autograd; its forward checked against fla's naive_recurrent_gated_delta_rule):
outputs, boundary and final states, states after arbitrary positions, and the gradients wrt q, k, v, g, beta and
the initial state from random upstream gradients on all of them; the same for the fused
``chunk_gated_delta_rule_states_at`` (o, states at the positions, final state), with the sizes of what the ops save
for their backward. Run by tests/test_gated_delta_rule_boundary.py in a
subprocess (the interpreter must be on before the kernels are defined); prints one JSON line of relative
differences."""

import json
import os
import sys
import time

import torch
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from trl_refine.kernels.gated_delta_rule_boundary import (  # noqa: E402
    CHUNK,
    chunk_gated_delta_rule_states_at,
    chunk_gated_delta_rule_with_boundary_states,
    gated_states_after,
)

normalize = torch.nn.functional.normalize


def recurrence(q, k, v, g, beta, S, scale):
    """S_t = e^g_t S_{t-1} + beta_t k_t (v_t - e^g_t S_{t-1}^T k_t)^T, o_t = scale S_t^T q_t; S [B, H, K, V]."""
    outs = []
    for t in range(q.shape[1]):
        S = S * g[:, t, :, None, None].exp()
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1), S


def reference(q, k, v, g, beta, h0, scale, counts, v_first):
    """The token recurrence over consecutive segments (l2-normalised q/k): o, the states at the chunk starts, the
    final state and the states after ``counts`` [B, n] tokens (K-first, or V-first as the kernel returns them)."""
    B, T, H, K = q.shape
    q, k = normalize(q, dim=-1), normalize(k, dim=-1)
    cuts = sorted({*range(0, T, CHUNK), *counts.flatten().tolist(), T})
    S = h0.transpose(-1, -2) if h0 is not None and v_first else h0
    S = S if S is not None else q.new_zeros(B, H, K, v.shape[-1])
    at, outs = {0: S}, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, S = recurrence(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], S, scale)
        outs.append(o)
        at[b] = S
    hs = torch.stack([at[c] for c in range(0, T, CHUNK)], dim=2)
    after = torch.stack([torch.stack([at[int(c)][i] for c in counts[i]]) for i in range(B)])
    flip = (lambda s: s.transpose(-1, -2)) if v_first else (lambda s: s)
    return torch.cat(outs, dim=1), flip(hs), flip(S), flip(after)


SAVED = []


def recording():
    """Records the tensors saved for backward inside the op calls (for their sizes)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: SAVED.append(t) or t, lambda t: t)


def ours(q, k, v, g, beta, h0, scale, counts, v_first):
    qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
    with recording():
        o, hs, ht = chunk_gated_delta_rule_with_boundary_states(
            qn, kn, v, g, beta, scale, initial_state=h0, state_v_first=v_first
        )
        return o, hs, ht, gated_states_after(hs, ht, kn, v, g, beta, counts, state_v_first=v_first)


def reference_fused(*args):
    o, _, S, after = reference(*args)
    return o, S, after


def ours_fused(q, k, v, g, beta, h0, scale, counts, v_first):
    qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
    with recording():
        o, states, ht = chunk_gated_delta_rule_states_at(qn, kn, v, g, beta, scale, h0, counts, state_v_first=v_first)
    return o, ht, states


def saved_report(tag, T, K, V, n):
    """What the op (with the states after) saved for its backward: total bytes (each memory once), and how many saved
    tensors are dense per-chunk states ([B, H, NT, K, V] or [B, NT, H, K, V], either state layout)."""
    NT = -(-T // CHUNK)
    dense = [
        t for t in SAVED if t.dim() == 5 and {*t.shape[-2:]} == {K, V} and NT in t.shape[1:3] and n not in t.shape
    ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in SAVED}
    SAVED.clear()
    return {f"{tag}/saved_bytes": sum(storages.values()), f"{tag}/saved_dense": len(dense)}


def case(B, T, H, K, V, with_h0, counts, seed, only_boundary=False, v_first=False, fused=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)  # decays e^g in (0, 1)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, *((V, K) if v_first else (K, V)), generator=gen) if with_h0 else None
    counts = torch.tensor(counts)
    inputs = [x for x in (q, k, v, g, beta, h0) if x is not None]
    res, grads, upstream = {}, {}, None
    fns = (("ref", reference_fused), ("ours", ours_fused)) if fused else (("ref", reference), ("ours", ours))
    names = ("o", "final", "after") if fused else ("o", "boundary", "final", "after")
    for name, fn in fns:
        leaves = [x.clone().requires_grad_() for x in inputs]
        args = leaves + ([None] if h0 is None else [])
        t0 = time.time()
        outs = fn(*args, 0.3, counts, v_first)
        if upstream is None:
            upstream = [torch.randn(x.shape, generator=gen) for x in outs]
            if only_boundary:  # the boundary states' gradient alone (the path fla's backward has no input for)
                upstream = [u if i == 1 else torch.zeros_like(u) for i, u in enumerate(upstream)]
        torch.autograd.backward(outs, upstream)
        res[name] = outs
        grads[name] = [x.grad for x in leaves]
        res[name + "_s"] = time.time() - t0
    tag = ("fused_" if fused else "") + f"T{T}_K{K}_V{V}" + ("_h0" if with_h0 else "") + ("_vfirst" if v_first else "")
    tag += "_boundary_grad_only" if only_boundary else ""
    out = {f"{tag}/{n}": rel(a, b) for n, a, b in zip(names, res["ours"], res["ref"])}
    for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads["ours"], grads["ref"]):
        if b.norm() > 0:  # dq is exactly zero with the boundary states' gradient alone
            out[f"{tag}/{n}"] = rel(a, b)
        else:
            out[f"{tag}/{n}_both_zero"] = bool(a.abs().max() == 0)
    out[f"{tag}/seconds_ours"] = round(res["ours_s"], 2)
    out.update(saved_report(tag, T, K, V, counts.shape[1]))
    # the reference's convention is fla's: its forward equals fla's naive_recurrent_gated_delta_rule
    q_n, k_n = normalize(q, dim=-1), normalize(k, dim=-1)
    h0_k = h0.transpose(-1, -2) if h0 is not None and v_first else h0
    o_fla, ht_fla = naive_recurrent_gated_delta_rule(q_n, k_n, v, beta, g, 0.3, h0_k, output_final_state=True)
    o_ref, ht_ref = res["ref"][0], res["ref"][-2]
    out[f"{tag}/reference_vs_fla_naive"] = max(
        rel(o_ref, o_fla), rel(ht_ref.transpose(-1, -2) if v_first else ht_ref, ht_fla)
    )
    return out


res = {}
# T not a multiple of 64, an initial state, V = 2 K, positions on and next to the chunk boundaries
res.update(case(2, 130, 2, 16, 32, True, [[0, 1, 63, 64, 65, 130], [129, 128, 2, 70, 127, 64]], seed=0))
# T a multiple of 64, V-first states (fla GatedDeltaNet's layout) with an initial state, two V blocks (the second
# cut at V = 80), only the boundary states' gradient
res.update(case(1, 128, 2, 32, 80, True, [[128, 5, 100, 63]], seed=1, only_boundary=True, v_first=True))
# the fused op: positions on and next to chunk boundaries, two in one chunk (65, 70; 5, 40), count 0 and count T
res.update(case(2, 130, 2, 16, 32, True, [[0, 65, 63, 64, 70, 130], [129, 128, 5, 40, 1, 64]], seed=2, fused=True))
# V-first, T a multiple of 64 (count T is the whole last chunk), two V blocks, four positions in one chunk
res.update(case(1, 128, 2, 32, 80, True, [[128, 100, 64, 127, 0]], seed=3, v_first=True, fused=True))
print(json.dumps(res))
