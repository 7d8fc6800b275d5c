"""trl_refine.kernels.delta_rule_boundary: the chunked delta rule whose backward accepts gradients on every
chunk-boundary state. The Triton kernels run under the Triton interpreter on CPU (fp32) in a subprocess
(tests/interpret_scripts/delta_rule_boundary.py) against the reference DeltaNet's token recurrence."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the fla 0.6.0 internals the module imports, with the keyword arguments it passes them
FLA_INTERNALS = {
    "fla.ops.common.chunk_o": {
        "chunk_fwd_o": ("q", "k", "v", "h", "g", "scale", "chunk_size"),
        "chunk_bwd_dv_local": ("q", "k", "do", "g", "scale", "chunk_size"),
        "chunk_bwd_dqkwg": ("q", "k", "v", "h", "w", "dv", "do", "dh", "g", "scale", "chunk_size"),
    },
    "fla.ops.delta_rule.wy_fast": {
        "prepare_wy_repr_fwd": ("k", "v", "beta", "cu_seqlens", "chunk_size"),
        "recompute_w_u_fwd": ("k", "v", "beta", "A", "cu_seqlens"),
        "prepare_wy_repr_bwd": ("k", "v", "beta", "A", "dw", "du", "cu_seqlens"),
    },
}


def test_fla_internals_exist_with_the_arguments_used():
    import importlib

    pytest.importorskip("fla")
    for module, functions in FLA_INTERNALS.items():
        mod = importlib.import_module(module)
        for name, args in functions.items():
            assert hasattr(mod, name), f"{module}.{name} is gone: update trl_refine/kernels/delta_rule_boundary.py"
            params = inspect.signature(getattr(mod, name)).parameters
            missing = [a for a in args if a not in params]
            assert not missing, f"{module}.{name} lost the arguments {missing}"


def test_bad_input_fails_early_with_a_message():
    pytest.importorskip("fla")
    from trl_refine.kernels.delta_rule_boundary import (
        chunk_delta_rule_states_at,
        chunk_delta_rule_with_boundary_states,
        states_after,
    )

    q = torch.randn(1, 70, 2, 16)
    with pytest.raises(ValueError, match="beta"):
        chunk_delta_rule_with_boundary_states(q, q, q, torch.rand(1, 70))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_rule_with_boundary_states(q, q, q, torch.rand(1, 70, 2), initial_state=torch.zeros(1, 2, 16))
    hs, ht = torch.zeros(1, 2, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    with pytest.raises(ValueError, match="counts must lie"):
        states_after(hs, ht, q, q, torch.rand(1, 70, 2), torch.tensor([[71]]))
    with pytest.raises(ValueError, match="do not belong"):
        states_after(hs[:, :, :1], ht, q, q, torch.rand(1, 70, 2), torch.tensor([[3]]))
    beta = torch.rand(1, 70, 2)
    with pytest.raises(ValueError, match=r"counts must lie in \[0, T = 70\].*got \[-1\]; clamp or fix the positions"):
        chunk_delta_rule_states_at(q, q, q, beta, None, None, torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="counts must be"):
        chunk_delta_rule_states_at(q, q, q, beta, None, None, torch.tensor([3]))
    with pytest.raises(ValueError, match="integer"):
        chunk_delta_rule_states_at(q, q, q, beta, None, None, torch.tensor([[3.0]]))


def test_check_counts_false_reads_no_count_values_and_the_partial_chunks_ignore_autocast():
    """``check_counts=False`` (what the one-pass engine passes, having checked the counts once per forward) skips the
    only data-dependent host read: with every input on the meta device (no data to read, as a CUDA-graph capture
    forbids a sync) states_after runs through, while the default check cannot read the counts there. Under a bf16
    autocast region the states are the same fp32 values as without (the op disables autocast inside)."""
    pytest.importorskip("fla")
    from trl_refine.kernels.delta_rule_boundary import states_after

    B, T, H, K, V = 2, 70, 2, 16, 8
    NT = (T + 63) // 64
    gen = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(B, H, NT, K, V, generator=gen), torch.randn(B, H, K, V, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v, beta = torch.randn(B, T, H, V, generator=gen), torch.rand(B, T, H, generator=gen)
    counts = torch.tensor([[3, 64, 70], [0, 65, 66]])
    meta = [x.to("meta") for x in (hs, ht, k, v, beta, counts)]
    assert states_after(*meta, check_counts=False).shape == (B, 3, H, K, V)
    with pytest.raises((RuntimeError, NotImplementedError)):  # reading meta values: the sync the engine avoids
        states_after(*meta)
    want = states_after(hs, ht, k, v, beta, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = states_after(hs, ht, k, v, beta, counts, check_counts=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_boundary_states_and_gradients_equal_the_token_recurrence_under_the_triton_interpreter():
    """o, boundary states, final state, states after positions on and next to chunk boundaries, and the gradients
    wrt q, k, v, beta, initial state from random upstream gradients on all outputs (and on the boundary states
    alone), T = 130 and 128, one and two V blocks: within 1e-5 relative of the reference (fp32). The same for the
    fused chunk_delta_rule_states_at (positions sharing a chunk, count 0 and T), which saves no dense per-chunk
    states for its backward and under half the bytes of the op + states_after."""
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = root / "tests" / "interpret_scripts" / "delta_rule_boundary.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("T128_K32_V80_boundary_grad_only/dq_both_zero") is True
    unfused, fused = (
        ("T130_K16_V32_h0", "T128_K32_V80_boundary_grad_only"),
        ("fused_T130_K16_V32_h0", "fused_T128_K32_V80"),
    )
    saved = {}
    for tag in unfused + fused:
        assert res.pop(f"{tag}/seconds_ours") >= 0
        saved[tag] = res.pop(f"{tag}/saved_bytes"), res.pop(f"{tag}/saved_dense")
    assert all(saved[t][1] >= 1 for t in unfused) and all(saved[t][1] == 0 for t in fused), saved
    assert saved[fused[0]][0] < saved[unfused[0]][0] / 2, saved  # the same shapes
    expected = {"o", "boundary", "final", "after", "dq", "dk", "dv", "dbeta"}
    assert {k.split("/")[1] for k in res if k.startswith("T130")} == expected | {"dh0"}
    assert {k.split("/")[1] for k in res if k.startswith("T128")} == expected - {"dq"}
    assert {k.split("/")[1] for k in res if k.startswith(fused[0])} == expected - {"boundary"} | {"dh0"}
    assert {k.split("/")[1] for k in res if k.startswith(fused[1])} == expected - {"boundary"}
    for key, value in res.items():
        assert value < 1e-5, (key, value)
