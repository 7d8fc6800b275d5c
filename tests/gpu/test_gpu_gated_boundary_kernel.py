"""GPU (marked `gpu`, skipped without CUDA): trl_refine.kernels.gated_delta_rule_boundary against fla 0.6.0's
chunk_gated_delta_rule and a token recurrence (fp32, PyTorch), bf16 and fp32, forward and backward; and the time of
its forward + backward at B = 1, T = 8192, H = 16, K = V = 128 against fla's op. fla refuses its own gated chunk
backward on Hopper with 3.4.0 <= triton < 3.7.1 (fla #640); then only the forward is compared with fla and the
gradients with the token recurrence, and the refusal is recorded. Records go to $TRL_REFINE_GPU_RESULTS (merged into
the file if it exists)."""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU for the Triton kernels", allow_module_level=True)

pytest.importorskip("fla")

import triton  # noqa: E402
from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: E402

from trl_refine.kernels.gated_delta_rule_boundary import (  # noqa: E402
    CHUNK,
    chunk_gated_delta_rule_with_boundary_states,
    gated_states_after,
)

DEV = "cuda"
PARITY_SHAPE = (2, 300, 4, 128, 128)  # B, T, H, K, V: five chunks, the last one partial
TIME_SHAPE = (1, 8192, 16, 128, 128)  # the DeltaNet / GatedDeltaNet 1.3B geometry
normalize = torch.nn.functional.normalize


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def record(name, **values):
    out = os.environ.get("TRL_REFINE_GPU_RESULTS")
    if out:
        results = {}
        if os.path.exists(out):
            with open(out) as f:
                results = json.load(f)
        results[name] = values
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


def inputs(B, T, H, K, V, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=DEV, generator=gen)
    k = torch.randn(B, T, H, K, device=DEV, generator=gen)
    v = torch.randn(B, T, H, V, device=DEV, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=DEV, generator=gen) + 2)
    beta = torch.rand(B, T, H, device=DEV, generator=gen)
    h0 = torch.randn(B, H, K, V, device=DEV, generator=gen)
    return [x.to(dtype) for x in (q, k, v)] + [g, beta.to(dtype), h0]


def token_recurrence(q, k, v, g, beta, h0, scale, counts):
    """fp32 reference: o, states at the chunk starts, final state, states after ``counts`` [B, n]."""
    q, k, v, g, beta, S = (x.float() for x in (q, k, v, g, beta, h0))
    B, T = q.shape[:2]
    marks = {*range(0, T, CHUNK), *counts.flatten().tolist(), T}
    at, outs = {0: S}, []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        if t + 1 in marks:
            at[t + 1] = S
    hs = torch.stack([at[c] for c in range(0, T, CHUNK)], dim=2)
    after = torch.stack([torch.stack([at[int(c)][i] for c in counts[i]]) for i in range(B)])
    return torch.stack(outs, 1), hs, S, after


def run(fn, leaves, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs], [x.grad for x in leaves]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-2), (torch.bfloat16, 5e-2)])
def test_gated_boundary_kernel_matches_fla_and_the_token_recurrence(dtype, tol):
    B, T, H, K, V = PARITY_SHAPE
    scale = K**-0.5
    q, k, v, g, beta, h0 = inputs(B, T, H, K, V, dtype)
    counts = torch.tensor([[0, 1, 63, 64, 65, T], [T - 1, 128, 2, 130, 191 % T, T - 44]], device=DEV)

    def ours(q, k, v, g, beta, h0):
        qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
        o, hs, ht = chunk_gated_delta_rule_with_boundary_states(qn, kn, v, g, beta, scale, initial_state=h0)
        return o, hs, ht, gated_states_after(hs, ht, kn, v, g, beta, counts)

    def reference(q, k, v, g, beta, h0):
        return token_recurrence(normalize(q, dim=-1), normalize(k, dim=-1), v, g, beta, h0, scale, counts)

    def ours_o_final(*leaves):
        o, _, ht, _ = ours(*leaves)
        return o, ht

    def fla_op(q, k, v, g, beta, h0):
        qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
        return chunk_gated_delta_rule(qn, kn, v, g, beta, scale, initial_state=h0, output_final_state=True)

    leaves = [q, k, v, g, beta, h0]
    gen = torch.Generator(device=DEV).manual_seed(1)
    shapes = [(B, T, H, V), (B, H, triton.cdiv(T, CHUNK), K, V), (B, H, K, V), (B, counts.shape[1], H, K, V)]
    upstream = [torch.randn(s, device=DEV, generator=gen) for s in shapes]
    (o, hs, ht, after), grads = run(ours, leaves, upstream)
    (o_r, hs_r, ht_r, after_r), grads_r = run(reference, leaves, upstream)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    res = {"o": rel(o, o_r), "boundary": rel(hs, hs_r), "final": rel(ht, ht_r), "after": rel(after, after_r)}
    res.update({n: rel(a, b) for n, a, b in zip(names, grads, grads_r)})
    # fla's op: forward always; backward (upstream on o and the final state) unless fla refuses it
    with torch.no_grad():
        o_f, ht_f = fla_op(*leaves)
    res["o_vs_fla"], res["final_vs_fla"] = rel(o, o_f), rel(ht, ht_f)
    try:
        _, grads_f = run(fla_op, leaves, [upstream[0], upstream[2]])
    except RuntimeError as err:
        if "640" not in str(err):
            raise
        res["fla_backward"] = f"refused by fla: {str(err)[:200]}"
    else:
        _, grads_o = run(ours_o_final, leaves, [upstream[0], upstream[2]])
        res.update({f"{n}_vs_fla": rel(a, b) for n, a, b in zip(names, grads_o, grads_f)})
    record(f"gated_boundary_kernel_{str(dtype).split('.')[-1]}", tolerance=tol, **res)
    bad = {n: e for n, e in res.items() if isinstance(e, float) and not e < tol}
    assert not bad, bad


def _time(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_gated_boundary_kernel_time_against_fla():
    """Forward + backward at the 1.3B geometry (bf16, B = 1, T = 8192, H = 16, K = V = 128): ours with gradients on
    o, the boundary states and the final state; fla's chunk_gated_delta_rule with gradients on o and the final state
    (its forward alone if fla refuses the backward)."""
    B, T, H, K, V = TIME_SHAPE
    q, k, v, g, beta, h0 = inputs(B, T, H, K, V, torch.bfloat16)
    q, k = normalize(q.float(), dim=-1).bfloat16(), normalize(k.float(), dim=-1).bfloat16()
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    do = torch.randn_like(v)
    dht = torch.randn_like(h0)
    dhb = torch.randn(B, H, triton.cdiv(T, CHUNK), K, V, device=DEV)

    def ours_fwd_bwd():
        o, hs, ht = chunk_gated_delta_rule_with_boundary_states(*leaves[:5], initial_state=leaves[5])
        torch.autograd.backward([o, hs, ht], [do, dhb, dht])

    def fla_fwd_bwd():
        o, ht = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        torch.autograd.backward([o, ht], [do, dht])

    def fla_fwd():
        with torch.no_grad():
            chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)

    def ours_fwd():
        with torch.no_grad():
            chunk_gated_delta_rule_with_boundary_states(*leaves[:5], initial_state=leaves[5])

    torch.cuda.reset_peak_memory_stats()
    res = {"ours_fwd_ms": _time(ours_fwd), "ours_fwd_bwd_ms": _time(ours_fwd_bwd)}
    res["ours_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["fla_fwd_ms"] = _time(fla_fwd)
    try:
        torch.cuda.reset_peak_memory_stats()
        res["fla_fwd_bwd_ms"] = _time(fla_fwd_bwd)
        res["fla_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except RuntimeError as err:
        if "640" not in str(err):
            raise
        res["fla_fwd_bwd_ms"] = f"refused by fla: {str(err)[:200]}"
    res.update(shape=[B, T, H, K, V], dtype="bfloat16", device=torch.cuda.get_device_name(), triton=triton.__version__)
    record("gated_boundary_kernel_time", **res)
    assert res["ours_fwd_bwd_ms"] > 0
