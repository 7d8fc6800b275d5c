"""GPU check and timing of `trl_refine.kernels.delta_rule_boundary` (marked `gpu`, skipped without CUDA).

Parity: fp32 against the reference DeltaNet's pure-PyTorch chunkwise delta rule (exact in fp32, with the states after
arbitrary token counts and autograd through them), and bf16 against fla 0.6.0's `chunk_delta_rule` (outputs, final
state, gradients from upstream gradients on both). Timing: forward + backward of one layer's delta-rule op at the
1.3B benchmark's head geometry (16 heads of 128), 8K tokens, 4 documents: fla's op on the documents, fla's op on the
documents plus the readout tokens the one-pass engine splices in (n·K = 8·128 per document), and ours (boundary
states kept, with a gradient on them), and the fused `chunk_delta_rule_states_at` (also checked against the op +
`states_after`, fp32 and bf16, and for run-to-run identical gradients with several positions in one chunk; with
``check_counts=False``, as the one-pass engine calls it, for no host-device sync). Results
go to the JSON named by TRL_REFINE_GPU_RESULTS."""

import json
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU for the Triton kernels", allow_module_level=True)

fla = pytest.importorskip("fla")

from fla.ops.delta_rule import chunk_delta_rule  # noqa: E402

from trl_refine.kernels.delta_rule_boundary import (  # noqa: E402
    CHUNK,
    chunk_delta_rule_states_at,
    chunk_delta_rule_with_boundary_states,
    states_after,
)
from trl_refine.models.delta_net.modeling_delta_net import delta_rule_chunkwise, l2norm  # noqa: E402

DEV = "cuda"
RESULTS: dict = {}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def record(name, **values):
    RESULTS[name] = values
    out = os.environ.get("TRL_REFINE_GPU_RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=2)


def inputs(B, T, H, K, V, dtype, seed=0, h0=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, device=DEV)
    k = torch.randn(B, T, H, K, generator=g, device=DEV)
    v = torch.randn(B, T, H, V, generator=g, device=DEV)
    beta = torch.rand(B, T, H, generator=g, device=DEV)
    s0 = torch.randn(B, H, K, V, generator=g, device=DEV) if h0 else None
    q, k = l2norm(q), l2norm(k)
    return [x.to(dtype) for x in (q, k, v)] + [beta.to(dtype), s0]


def test_fp32_matches_reference_chunkwise_with_states_and_gradients():
    B, T, H, K, V = 2, 1000, 4, 64, 64
    q, k, v, beta, s0 = inputs(B, T, H, K, V, torch.float32)
    g = torch.Generator(device=DEV).manual_seed(1)
    counts = torch.randint(0, T + 1, (B, 6), generator=g, device=DEV)
    counts[0, :3] = torch.tensor([0, CHUNK, 3 * CHUNK + 1], device=DEV)
    outs, grads = {}, {}
    upstream = None
    for name in ("ref", "ours"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]
        if name == "ref":
            o, ht, after = delta_rule_chunkwise(*leaves[:4], leaves[4], 0.5, False, state_counts=counts)
        else:
            o, hs, ht = chunk_delta_rule_with_boundary_states(*leaves[:4], 0.5, leaves[4])
            after = states_after(hs, ht, leaves[1], leaves[2], leaves[3], counts)
        res = (o, ht, after)
        if upstream is None:
            upstream = [torch.randn_like(x) for x in res]
        torch.autograd.backward(res, upstream)
        outs[name], grads[name] = res, [x.grad for x in leaves]
    errs = {n: rel(a, b) for n, a, b in zip(("o", "final", "after"), outs["ours"], outs["ref"])}
    errs.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "dbeta", "dh0"), grads["ours"], grads["ref"])})
    record("fp32_vs_reference_chunkwise", shape=[B, T, H, K, V], **errs)
    # fp32 tl.dot runs in TF32 on the GPU (ours and fla's chunk-local kernels alike): 1-2e-3 on the H200 (2026-12-03,
    # benchmarks/results/boundary_kernel_h200/parity.json); the exact fp32 check is the CPU interpreter's (<= 4.6e-7)
    assert max(errs.values()) < 5e-3, errs


def test_bf16_matches_fla_chunk_delta_rule():
    B, T, H, K, V = 2, 2048, 8, 128, 128
    q, k, v, beta, s0 = inputs(B, T, H, K, V, torch.bfloat16)
    outs, grads, upstream = {}, {}, None
    for name in ("fla", "ours"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]
        if name == "fla":
            o, ht = chunk_delta_rule(*leaves[:4], scale=K**-0.5, initial_state=leaves[4], output_final_state=True)
        else:
            o, _, ht = chunk_delta_rule_with_boundary_states(*leaves[:4], K**-0.5, leaves[4])
        if upstream is None:
            upstream = [torch.randn_like(o), torch.randn_like(ht.float())]
        torch.autograd.backward([o, ht.float()], upstream)
        outs[name], grads[name] = (o, ht), [x.grad for x in leaves]
    errs = {n: rel(a, b) for n, a, b in zip(("o", "final"), outs["ours"], outs["fla"])}
    errs.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "dbeta", "dh0"), grads["ours"], grads["fla"])})
    record("bf16_vs_fla_chunk_delta_rule", shape=[B, T, H, K, V], **errs)
    assert max(errs.values()) < 2e-2, errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_states_at_matches_the_op_with_states_after_and_repeats_exactly(dtype):
    B, T, H, K, V = 2, 1000, 4, 128, 128
    q, k, v, beta, s0 = inputs(B, T, H, K, V, dtype)
    # on and next to chunk boundaries, three positions in chunk 1, count 0 and count T
    counts = torch.tensor([[0, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 999, T], [5, 70, 100, 127, 640, 1]], device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(2)
    upstream = [
        torch.randn(B, T, H, V, generator=gen, device=DEV).to(dtype),
        torch.randn(B, counts.shape[1], H, K, V, generator=gen, device=DEV),
        torch.randn(B, H, K, V, generator=gen, device=DEV),
    ]

    def run(fused):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]
        if fused:
            o, after, ht = chunk_delta_rule_states_at(*leaves[:4], K**-0.5, leaves[4], counts)
        else:
            o, hs, ht = chunk_delta_rule_with_boundary_states(*leaves[:4], K**-0.5, leaves[4])
            after = states_after(hs, ht, leaves[1], leaves[2], leaves[3], counts)
        torch.autograd.backward([o, after, ht], upstream)
        return [o, after, ht] + [x.grad for x in leaves]

    ref, ours, again = run(False), run(True), run(True)
    names = ("o", "after", "final", "dq", "dk", "dv", "dbeta", "dh0")
    errs = {n: rel(a, b) for n, a, b in zip(names, ours, ref)}
    repeat = all(torch.equal(a, b) for a, b in zip(ours, again))
    record(f"fused_states_at_vs_op_with_states_after_{str(dtype).split('.')[-1]}", **errs, repeats_exactly=repeat)
    assert repeat, "the fused op's outputs or gradients differ between two identical runs"
    # fp32: TF32 tl.dot in both paths (summed in other orders); bf16: the same bf16 chunk-start states in both
    assert max(errs.values()) < (5e-3 if dtype == torch.float32 else 2e-2), errs


def test_fused_states_at_without_the_count_check_never_syncs():
    """What the one-pass engine's provider calls per layer (``check_counts=False``) runs forward and backward without
    a host-device sync (CUDA-graph capturable in that respect); the default range check does sync, and is what
    catches bad counts for direct users."""
    B, T, H, K, V = 2, 200, 2, 64, 64
    q, k, v, beta, _ = inputs(B, T, H, K, V, torch.bfloat16, h0=False)
    counts = torch.tensor([[1, 64, 130], [3, 65, 200]], device=DEV)

    def step(check):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o, after, ht = chunk_delta_rule_states_at(*leaves, K**-0.5, None, counts, check_counts=check)
        (o.float().sum() + after.sum() + ht.sum()).backward()

    step(True)  # compile and autotune first (they synchronize)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step(False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            step(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _time(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def test_time_against_fla_and_readout_tokens():
    B, T, H, K, V, n = 4, 8192, 16, 128, 128, 8
    q, k, v, beta, _ = inputs(B, T, H, K, V, torch.bfloat16, h0=False)
    qr, kr, vr, br, _ = inputs(B, T + n * K, H, K, V, torch.bfloat16, h0=False)
    counts = torch.randint(1, T, (B, n), device=DEV)

    def fla_op(q, k, v, beta):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o, ht = chunk_delta_rule(*leaves, scale=K**-0.5, output_final_state=True)
        (o.float().square().mean() + ht.float().square().mean()).backward()

    def ours():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o, hs, ht = chunk_delta_rule_with_boundary_states(*leaves, K**-0.5)
        after = states_after(hs, ht, leaves[1], leaves[2], leaves[3], counts)
        (o.float().square().mean() + ht.square().mean() + after.square().mean()).backward()

    torch.cuda.reset_peak_memory_stats()
    t_fla = _time(lambda: fla_op(q, k, v, beta))
    m_fla = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    t_readout = _time(lambda: fla_op(qr, kr, vr, br))
    m_readout = torch.cuda.max_memory_allocated() / 2**30

    def fused():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta)]
        o, after, ht = chunk_delta_rule_states_at(*leaves, K**-0.5, None, counts)
        (o.float().square().mean() + ht.square().mean() + after.square().mean()).backward()

    torch.cuda.reset_peak_memory_stats()
    t_ours = _time(ours)
    m_ours = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    t_fused = _time(fused)
    m_fused = torch.cuda.max_memory_allocated() / 2**30
    record(
        "time_fwd_bwd_one_layer",
        shape=[B, T, H, K, V],
        positions_per_row=n,
        fla_chunk_delta_rule_ms=round(t_fla * 1e3, 3),
        fla_with_readout_tokens_ms=round(t_readout * 1e3, 3),
        ours_boundary_states_ms=round(t_ours * 1e3, 3),
        ours_fused_states_at_ms=round(t_fused * 1e3, 3),
        fla_peak_gib=round(m_fla, 2),
        readout_peak_gib=round(m_readout, 2),
        ours_peak_gib=round(m_ours, 2),
        fused_peak_gib=round(m_fused, 2),
        device=torch.cuda.get_device_name(),
    )
    assert t_ours > 0 and t_fla > 0 and t_fused > 0
