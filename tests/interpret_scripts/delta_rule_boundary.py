"""trl_refine.kernels.delta_rule_boundary on CPU under TRITON_INTERPRET=1 (fp32) against the reference DeltaNet's
token-by-token recurrence (autograd): outputs, boundary and final states, states after arbitrary positions, and the
gradients wrt q, k, v, beta and the initial state from random upstream gradients on all of them; the same for the
fused ``chunk_delta_rule_states_at`` (o, states at the positions, final state), with the shapes of what it saves for
its backward. Run by
tests/test_delta_rule_boundary.py in a subprocess (the interpreter must be on before the kernels are defined); prints
one JSON line of relative differences."""

import json
import os
import sys
import time

import torch
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from trl_refine.kernels.delta_rule_boundary import (  # noqa: E402
    CHUNK,
    chunk_delta_rule_states_at,
    chunk_delta_rule_with_boundary_states,
    states_after,
)
from trl_refine.models.delta_net.modeling_delta_net import delta_rule_recurrent, l2norm  # noqa: E402


def reference(q, k, v, beta, h0, scale, counts):
    """The reference recurrence over consecutive segments (l2-normalised q/k as the model does): o, the states at
    the chunk starts, the final state and the states after ``counts`` [B, n] tokens."""
    B, T, H, K = q.shape
    cuts = sorted({*range(0, T, CHUNK), *counts.flatten().tolist(), T})
    S = h0 if h0 is not None else q.new_zeros(B, H, K, v.shape[-1])
    at, outs = {0: S}, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, S = delta_rule_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], S, scale, use_qk_l2norm=True)
        outs.append(o)
        at[b] = S
    hs = torch.stack([at[c] for c in range(0, T, CHUNK)], dim=2)
    after = torch.stack([torch.stack([at[int(c)][i] for c in counts[i]]) for i in range(B)])
    return torch.cat(outs, dim=1), hs, S, after


def ours(q, k, v, beta, h0, scale, counts):
    qn, kn = l2norm(q), l2norm(k)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: SAVED.append(t) or t, lambda t: t):
        o, hs, ht = chunk_delta_rule_with_boundary_states(qn, kn, v, beta, scale, initial_state=h0)
        return o, hs, ht, states_after(hs, ht, kn, v, beta, counts)


def reference_fused(q, k, v, beta, h0, scale, counts):
    o, _, S, after = reference(q, k, v, beta, h0, scale, counts)
    return o, S, after


def ours_fused(q, k, v, beta, h0, scale, counts):
    """The fused op, recording the tensors it saves for its backward (shape, dtype)."""
    qn, kn = l2norm(q), l2norm(k)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: SAVED.append(t) or t, lambda t: t):
        o, states, ht = chunk_delta_rule_states_at(qn, kn, v, beta, scale, h0, counts)
    return o, ht, states


SAVED = []


def saved_report(tag, T, K, V, n):
    """What the op (with states_after) saved for its backward: total bytes, and how many saved tensors are dense
    per-chunk states ([B, H, NT, K, V] or [B, NT, H, K, V])."""
    NT = -(-T // CHUNK)
    dense = [t for t in SAVED if t.dim() == 5 and t.shape[-2:] == (K, V) and NT in t.shape[1:3] and n not in t.shape]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in SAVED}  # each memory once
    out = {f"{tag}/saved_bytes": sum(storages.values()), f"{tag}/saved_dense": len(dense)}
    SAVED.clear()
    return out


def case(B, T, H, K, V, with_h0, counts, seed, only_boundary=False, fused=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    h0 = torch.randn(B, H, K, V, generator=g) if with_h0 else None
    counts = torch.tensor(counts)
    inputs = [x for x in (q, k, v, beta, h0) if x is not None]
    res, grads, upstream = {}, {}, None
    fns = (("ref", reference_fused), ("ours", ours_fused)) if fused else (("ref", reference), ("ours", ours))
    names = ("o", "final", "after") if fused else ("o", "boundary", "final", "after")
    for name, fn in fns:
        leaves = [x.clone().requires_grad_() for x in inputs]
        args = leaves + ([None] if h0 is None else [])
        t0 = time.time()
        outs = fn(*args, 0.3, counts)
        if upstream is None:
            upstream = [torch.randn(x.shape, generator=g) for x in outs]
            if only_boundary:  # the boundary states' gradient alone (the path fla's backward has no input for)
                upstream = [u if i == 1 else torch.zeros_like(u) for i, u in enumerate(upstream)]
        torch.autograd.backward(outs, upstream)
        res[name] = outs
        grads[name] = [x.grad for x in leaves]
        res[name + "_s"] = time.time() - t0
    tag = ("fused_" if fused else "") + f"T{T}_K{K}_V{V}" + ("_h0" if with_h0 else "")
    tag += "_boundary_grad_only" if only_boundary else ""
    out = {f"{tag}/{n}": rel(a, b) for n, a, b in zip(names, res["ours"], res["ref"])}
    names = ("dq", "dk", "dv", "dbeta", "dh0")
    for n, a, b in zip(names, grads["ours"], grads["ref"]):
        if b.norm() > 0:  # dq is exactly zero with the boundary states' gradient alone
            out[f"{tag}/{n}"] = rel(a, b)
        else:
            out[f"{tag}/{n}_both_zero"] = bool(a.abs().max() == 0)
    out[f"{tag}/seconds_ours"] = round(res["ours_s"], 2)
    out.update(saved_report(tag, T, K, V, counts.shape[1]))
    return out


res = {}
# T not a multiple of 64, an initial state, V = 2 K, positions on and next to the chunk boundaries
res.update(case(2, 130, 2, 16, 32, True, [[0, 1, 63, 64, 65, 130], [129, 128, 2, 70, 127, 64]], seed=0))
# T a multiple of 64, no initial state, two V blocks (the second cut at V = 80), only the boundary states' gradient
res.update(case(1, 128, 2, 32, 80, False, [[128, 5, 100]], seed=1, only_boundary=True))
# the fused op: positions on and next to chunk boundaries, two in one chunk (65, 70; 5, 40), count 0 and count T
res.update(case(2, 130, 2, 16, 32, True, [[0, 65, 63, 64, 70, 130], [129, 128, 5, 40, 1, 64]], seed=2, fused=True))
# T a multiple of 64 (count T is the whole last chunk), no initial state, two V blocks, the same chunk three times
res.update(case(1, 128, 2, 32, 80, False, [[128, 100, 64, 127, 0]], seed=3, fused=True))
print(json.dumps(res))
