"""trl_refine.kernels.gated_delta_rule_boundary on CPU under TRITON_INTERPRET=1 (fp32) against a pure-PyTorch token
recurrence of the gated delta rule (autograd; its forward checked against fla's naive_recurrent_gated_delta_rule):
outputs, boundary and final states, states after arbitrary positions, and the gradients wrt q, k, v, g, beta and
the initial state from random upstream gradients on all of them. Run by tests/test_gated_delta_rule_boundary.py in a
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


def ours(q, k, v, g, beta, h0, scale, counts, v_first):
    qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
    o, hs, ht = chunk_gated_delta_rule_with_boundary_states(
        qn, kn, v, g, beta, scale, initial_state=h0, state_v_first=v_first
    )
    return o, hs, ht, gated_states_after(hs, ht, kn, v, g, beta, counts, state_v_first=v_first)


def case(B, T, H, K, V, with_h0, counts, seed, only_boundary=False, v_first=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)  # decays e^g in (0, 1)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, *((V, K) if v_first else (K, V)), generator=gen) if with_h0 else None
    counts = torch.tensor(counts)
    inputs = [x for x in (q, k, v, g, beta, h0) if x is not None]
    res, grads, upstream = {}, {}, None
    for name, fn in (("ref", reference), ("ours", ours)):
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
    tag = f"T{T}_K{K}_V{V}" + ("_h0" if with_h0 else "") + ("_vfirst" if v_first else "")
    tag += "_boundary_grad_only" if only_boundary else ""
    out = {f"{tag}/{n}": rel(a, b) for n, a, b in zip(("o", "boundary", "final", "after"), res["ours"], res["ref"])}
    for n, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads["ours"], grads["ref"]):
        if b.norm() > 0:  # dq is exactly zero with the boundary states' gradient alone
            out[f"{tag}/{n}"] = rel(a, b)
        else:
            out[f"{tag}/{n}_both_zero"] = bool(a.abs().max() == 0)
    out[f"{tag}/seconds_ours"] = round(res["ours_s"], 2)
    # the reference's convention is fla's: its forward equals fla's naive_recurrent_gated_delta_rule
    q_n, k_n = normalize(q, dim=-1), normalize(k, dim=-1)
    h0_k = h0.transpose(-1, -2) if h0 is not None and v_first else h0
    o_fla, ht_fla = naive_recurrent_gated_delta_rule(q_n, k_n, v, beta, g, 0.3, h0_k, output_final_state=True)
    o_ref, _, ht_ref, _ = res["ref"]
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
print(json.dumps(res))
