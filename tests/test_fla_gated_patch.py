"""trl_refine.kernels.fla_gated_patch: fla's GatedDeltaNet through our gated kernel (opt-in). The fla names it relies
on, its refusals, the swap's scope; and, under the Triton interpreter in a subprocess
(tests/interpret_scripts/fla_gated_patch.py), the op, a tiny GatedDeltaNetForCausalLM and its cache against fla's
pure-PyTorch gated recurrence."""

import ast
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("fla")

from trl_refine.kernels import fla_gated_patch as patch  # noqa: E402

# what the drop-in pops from **kwargs, as fla's chunk_gated_delta_rule does
KWARGS = {"use_gate_in_kernel", "A_log", "dt_bias", "chunk_size", "transpose_state_layout"}


def _tiny_model():
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cfg = GatedDeltaNetConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=64)
    return GatedDeltaNetForCausalLM(cfg)


def test_fla_names_the_swap_relies_on():
    """The documented block of fla names: the layer's module holds fla's op under the name its forward calls, every
    keyword the layer passes is one the drop-in takes, and the drop-in takes every named parameter of fla's op."""
    layer_module = importlib.import_module(patch.FLA_LAYER_MODULE)
    ops = importlib.import_module(patch.FLA_OPS_PACKAGE)
    fla_op = getattr(ops, patch.FLA_OP_NAME)
    assert getattr(layer_module, patch.FLA_OP_NAME) is fla_op, "the GatedDeltaNet module no longer imports fla's op"
    layer_class = getattr(layer_module, patch.FLA_LAYER_CLASS)
    tree = ast.parse(textwrap.dedent(inspect.getsource(layer_class.forward)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == patch.FLA_OP_NAME
    ]
    assert len(calls) == 1, f"GatedDeltaNet.forward calls {patch.FLA_OP_NAME} {len(calls)} times (expected once)"
    ours = set(inspect.signature(patch.chunk_gated_delta_rule).parameters) - {"kwargs"}
    passed = {kw.arg for kw in calls[0].keywords}
    assert passed <= ours | KWARGS, f"the layer passes arguments the drop-in does not know: {passed - ours - KWARGS}"
    fla_params = set(inspect.signature(fla_op).parameters) - {"kwargs"}
    assert fla_params == ours, f"fla's op changed its parameters: {fla_params ^ ours}"
    source = inspect.getsource(importlib.import_module("fla.ops.gated_delta_rule.chunk").chunk_gated_delta_rule)
    read = set(re.findall(r"kwargs\.(?:get|pop)\('(\w+)'", source))
    assert read == KWARGS, f"fla's op reads other keyword options now: {read ^ KWARGS}"


def test_the_swap_holds_inside_the_block_only():
    model = _tiny_model()
    layer_module = importlib.import_module(patch.FLA_LAYER_MODULE)
    ops = importlib.import_module(patch.FLA_OPS_PACKAGE)
    before = getattr(layer_module, patch.FLA_OP_NAME), getattr(ops, patch.FLA_OP_NAME)
    with patch.use_trl_refine_gated_kernel(model) as layers:
        assert layers == 2
        assert getattr(layer_module, patch.FLA_OP_NAME) is patch.chunk_gated_delta_rule
        assert getattr(ops, patch.FLA_OP_NAME) is patch.chunk_gated_delta_rule
        with patch.use_trl_refine_gated_kernel(model):  # nested
            pass
        assert getattr(layer_module, patch.FLA_OP_NAME) is patch.chunk_gated_delta_rule
    assert (getattr(layer_module, patch.FLA_OP_NAME), getattr(ops, patch.FLA_OP_NAME)) == before
    with pytest.raises(RuntimeError, match="boom"), patch.use_trl_refine_gated_kernel(model):
        raise RuntimeError("boom")
    assert (getattr(layer_module, patch.FLA_OP_NAME), getattr(ops, patch.FLA_OP_NAME)) == before


def test_bad_input_fails_early_with_a_message():
    with (
        pytest.raises(ValueError, match="no fla GatedDeltaNet layer"),
        patch.use_trl_refine_gated_kernel(torch.nn.Linear(2, 2)),
    ):
        pass
    q, v, g = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 4, 16), torch.randn(2, 8, 4)
    op = patch.chunk_gated_delta_rule
    with pytest.raises(TypeError, match="does not know the arguments"):
        op(q, q, v, g, g, head_first=False)
    with pytest.raises(NotImplementedError, match="cp_context"):
        op(q, q, v, g, g, cp_context=object())
    with pytest.raises(ValueError, match="chunks of 64"):
        op(q, q, v, g, g, chunk_size=32)
    with pytest.raises(ValueError, match="multiple HV"):
        op(q, q, torch.randn(2, 8, 3, 16), g[..., :3], g[..., :3])
    with pytest.raises(ValueError, match="A_log"):
        op(q, q, v, g, g, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        op(q, q, v, g, g, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        op(q, q, v, g, g, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        op(q[:1], q[:1], v[:1], g[:1], g[:1], cu_seqlens=torch.tensor([0, 5, 7]))
    with pytest.raises(ValueError, match="one initial state per sequence"):
        op(
            q[:1],
            q[:1],
            v[:1],
            g[:1],
            g[:1],
            initial_state=torch.zeros(1, 4, 16, 16),
            cu_seqlens=torch.tensor([0, 3, 8]),
        )


@pytest.mark.slow
def test_patched_gated_deltanet_equals_fla_naive_recurrence_under_the_triton_interpreter():
    """fp32 on CPU, against fla's naive_recurrent_gated_delta_rule (autograd) in the layer's place, whose forward
    matches fla's Triton fused_recurrent op: the op with the layer's flags, grouped value heads, varlen with an empty
    sequence, allow_neg_eigval, initial and final states (outputs, states, every input's gradient); a tiny
    GatedDeltaNetForCausalLM with a left-padded row (logits, every parameter's NTP-loss gradient); a prefix with
    use_cache then a continuation from it, with grad (logits, cache states, gradients). All gradients together within
    1e-5 relative, each parameter's within 1e-4 (the per-head gate parameters' small gradients sum 66 tokens' fp32
    roundoff), everything else within 1e-5."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = root / "tests" / "interpret_scripts" / "fla_gated_patch.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("seconds") > 0
    assert res.pop("model/layers_swapped") == 2 and res.pop("model/params") == 33
    assert res.pop("model/grads_nonzero") is True
    assert res.pop("model/restored") == "_naive_ops"  # the block put back what it found
    assert res.pop("cache/state_shape") == [2, 4, 32, 16]  # [B, HV, V, K]: fla's V-first cache layout
    for key in ("model/grad_worst_param", "cache/grad_worst_param"):
        value, name, _ = res.pop(key)
        assert value < 1e-4, (key, name, value)
    ops = {k.split("/")[1] for k in res if k.startswith("op_")}
    inputs = {"dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dinitial_state"}
    assert ops == {"o", "final", *inputs, "naive_vs_fla_fused_recurrent_o", "naive_vs_fla_fused_recurrent_final"}
    assert {"model/logits", "model/grad_all", "cache/logits", "cache/states", "cache/grad_all"} <= set(res)
    for key, value in res.items():
        assert value < 1e-5, (key, value)


@pytest.mark.slow
def test_onepass_readout_takes_the_swap_and_equals_the_snapshot_engine_under_the_triton_interpreter():
    """With the swap, the one-pass engine's readout forward (which imports fla's public op name at call time) runs our
    kernel too, and its forward_train with grad equals the snapshot engine's (fla's layer from cached states): document
    and rollout log-probs and all parameter gradients within 1e-6 relative (fp32, CPU). fla's own chunk op cannot run
    under the interpreter, so a run that reached the end took ours on both paths; the op calls are counted too."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = root / "tests" / "interpret_scripts" / "fla_gated_patch.py"
    proc = subprocess.run(
        [sys.executable, str(script), "engines"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["onepass_op_calls"] >= 1 and res["snapshot_op_calls"] >= 1, res  # 1 layer: the readout pass, segments
    assert res["grad_norm"] > 0
    for key in ("doc_logps_rel", "rollout_logps_rel", "grad_rel"):
        assert res[key] < 1e-6, (key, res)
