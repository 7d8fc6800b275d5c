"""trl_refine.kernels.gated_delta_rule_boundary: the chunked gated delta rule (fla GatedDeltaNet) whose backward
accepts gradients on every chunk-boundary state. The Triton kernels run under the Triton interpreter on CPU (fp32)
in a subprocess (tests/interpret_scripts/gated_delta_rule_boundary.py) against a token recurrence in PyTorch."""

import importlib
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
    },
    "fla.ops.gated_delta_rule.chunk_fwd": {
        "chunk_gated_delta_rule_fwd_intra": ("k", "v", "g", "beta", "cu_seqlens", "chunk_size"),
    },
    "fla.ops.gated_delta_rule.wy_fast": {
        "recompute_w_u_fwd": ("k", "v", "beta", "A", "g", "cu_seqlens"),
        "prepare_wy_repr_bwd": ("k", "v", "beta", "A", "dw", "du", "g", "cu_seqlens"),
    },
    "fla.ops.utils": {"chunk_local_cumsum": ("g", "chunk_size", "scale")},
}


def test_fla_internals_exist_with_the_arguments_used():
    pytest.importorskip("fla")
    for module, functions in FLA_INTERNALS.items():
        mod = importlib.import_module(module)
        for name, args in functions.items():
            assert hasattr(mod, name), (
                f"{module}.{name} is gone: update trl_refine/kernels/gated_delta_rule_boundary.py"
            )
            params = inspect.signature(getattr(mod, name)).parameters
            missing = [a for a in args if a not in params]
            assert not missing, f"{module}.{name} lost the arguments {missing}"


def test_the_refused_function_is_not_on_our_path():
    """fla 0.6.0 refuses its gated chunk_bwd_dqkwg on Hopper with 3.4.0 <= triton < 3.7.1 (fla #640); our gated op
    computes those gradients itself, so it must not import that function."""
    pytest.importorskip("fla")
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    source = inspect.getsource(chunk_o)
    assert source.count("#640") == 1 and "#640" in inspect.getsource(chunk_o.chunk_bwd_dqkwg), (
        "fla moved its Hopper refusal (fla #640): recheck which of its functions our gated op may call"
    )
    mod = importlib.import_module("trl_refine.kernels.gated_delta_rule_boundary")
    assert not hasattr(mod, "chunk_bwd_dqkwg") and not hasattr(mod, "chunk_gated_delta_rule_bwd_dhu")


def test_bad_input_fails_early_with_a_message():
    pytest.importorskip("fla")
    from trl_refine.kernels.gated_delta_rule_boundary import (
        chunk_gated_delta_rule_states_at,
        chunk_gated_delta_rule_with_boundary_states,
        gated_states_after,
    )

    q, g, beta = torch.randn(1, 70, 2, 16), -torch.rand(1, 70, 2), torch.rand(1, 70, 2)
    with pytest.raises(ValueError, match="g, beta"):
        chunk_gated_delta_rule_with_boundary_states(q, q, q, g[..., 0], beta)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_with_boundary_states(q, q, q, g, beta, initial_state=torch.zeros(1, 2, 16))
    v = torch.randn(1, 70, 2, 32)
    with pytest.raises(ValueError, match="initial_state"):  # K-first state given with state_v_first
        chunk_gated_delta_rule_with_boundary_states(
            q, q, v, g, beta, initial_state=torch.zeros(1, 2, 16, 32), state_v_first=True
        )
    hs, ht = torch.zeros(1, 2, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    with pytest.raises(ValueError, match="g must be"):
        gated_states_after(hs, ht, q, q, g[:, :5], beta, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="counts must lie"):
        gated_states_after(hs, ht, q, q, g, beta, torch.tensor([[71]]))
    with pytest.raises(ValueError, match="counts must lie"):
        chunk_gated_delta_rule_states_at(q, q, q, g, beta, None, None, torch.tensor([[71]]))
    with pytest.raises(ValueError, match="g, beta"):
        chunk_gated_delta_rule_states_at(q, q, q, g[..., 0], beta, None, None, torch.tensor([[3]]))


@pytest.mark.slow
def test_gated_boundary_states_and_gradients_equal_the_token_recurrence_under_the_triton_interpreter():
    """o, boundary states, final state, states after positions on and next to chunk boundaries, and the gradients
    wrt q, k, v, g, beta, initial state from random upstream gradients on all outputs (and on the boundary states
    alone, V-first), T = 130 and 128, one and two V blocks: within 1e-5 relative of the token recurrence (fp32),
    whose forward is fla's naive_recurrent_gated_delta_rule's. The same for the fused
    chunk_gated_delta_rule_states_at (positions sharing a chunk, count 0 and T, V-first), which saves no dense
    per-chunk states for its backward and under half the bytes of the op + gated_states_after."""
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = root / "tests" / "interpret_scripts" / "gated_delta_rule_boundary.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = "T130_K16_V32_h0", "T128_K32_V80_h0_vfirst_boundary_grad_only"
    fused = ("fused_T130_K16_V32_h0", "fused_T128_K32_V80_h0_vfirst")
    assert res.pop(f"{two}/dq_both_zero") is True
    saved = {}
    for tag in (one, two) + fused:
        assert res.pop(f"{tag}/seconds_ours") >= 0
        saved[tag] = res.pop(f"{tag}/saved_bytes"), res.pop(f"{tag}/saved_dense")
    assert saved[one][1] >= 1 and saved[two][1] >= 1 and all(saved[t][1] == 0 for t in fused), saved
    assert saved[fused[0]][0] < saved[one][0] / 2, saved  # the same shapes
    expected = {"o", "boundary", "final", "after", "dq", "dk", "dv", "dg", "dbeta", "dh0", "reference_vs_fla_naive"}
    assert {k.split("/")[1] for k in res if k.startswith(one)} == expected
    assert {k.split("/")[1] for k in res if k.startswith(two)} == expected - {"dq"}
    for tag in fused:
        assert {k.split("/")[1] for k in res if k.startswith(tag)} == expected - {"boundary"}
    for key, value in res.items():
        assert value < 1e-5, (key, value)
