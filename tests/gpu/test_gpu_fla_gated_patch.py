"""GPU (marked `gpu`, skipped without CUDA): fla GatedDeltaNet trained through trl_refine's gated kernel
(``use_trl_refine_gated_kernel``). A tiny GatedDeltaNetForCausalLM (tests/conftest.py tiny_fla_config; bf16, fp32,
and fp32 under bf16 autocast as the recipes train; a left-padded row, so the layers take the varlen path) computes
an NTP loss and its backward with the swap; the logits and every parameter's gradient are compared with the same
model in fp32 with fla's pure-PyTorch gated recurrence in the op's place (tests/interpret_scripts/_naive_ops.py).
Unpatched, fla's own backward is tried too: on Hopper with 3.4.0 <= triton < 3.7.1 fla refuses it (fla #640) and the
refusal is recorded; elsewhere its gradients are compared as well. Records go to $TRL_REFINE_GPU_RESULTS (merged
into the file if it exists)."""

import copy
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU for the Triton kernels", allow_module_level=True)

pytest.importorskip("fla")

import triton  # noqa: E402
from conftest import tiny_fla_config  # noqa: E402
from fla.models import GatedDeltaNetForCausalLM  # noqa: E402

from trl_refine.kernels.fla_gated_patch import FLA_LAYER_MODULE, FLA_OP_NAME, use_trl_refine_gated_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interpret_scripts"))
from _naive_ops import chunk_gated_delta_rule as naive_op  # noqa: E402

DEV = "cuda"
B, T = 2, 200  # four chunks, the last partial


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


def ntp(model, ids, mask, autocast=False):
    """Logits (padding zeroed) and every parameter's gradient of the mean NTP loss over the real tokens."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.backward()
    return logits.detach().float() * mask[..., None], {n: p.grad.float() for n, p in model.named_parameters()}


def compare(tag, out, ref):
    logits, grads = out
    ref_logits, ref_grads = ref
    worst = max((rel(grads[n], ref_grads[n]), n) for n in ref_grads)
    flat = [torch.cat([g[n].flatten() for n in ref_grads]) for g in (grads, ref_grads)]
    return {f"{tag}logits": rel(logits, ref_logits), f"{tag}grad_all": rel(*flat), f"{tag}grad_worst_param": worst}


@pytest.mark.parametrize(
    "dtype, autocast, tol",
    [(torch.float32, False, 1e-2), (torch.bfloat16, False, 5e-2), (torch.float32, True, 5e-2)],
    ids=["fp32", "bf16", "fp32_autocast_bf16"],  # the last: the recipes' precision (fp32 master + bf16 autocast)
)
def test_patched_gated_deltanet_trains_and_matches_the_fp32_recurrence(dtype, autocast, tol, monkeypatch):
    torch.manual_seed(0)
    base = GatedDeltaNetForCausalLM(tiny_fla_config("gated_deltanet", fuse_cross_entropy=False)).to(DEV).float()
    gen = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (B, T), device=DEV, generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding: the layers unpad into cu_seqlens
    model = copy.deepcopy(base).to(dtype)

    layer_module = importlib.import_module(FLA_LAYER_MODULE)
    with monkeypatch.context() as m:  # the reference: fp32, fla's naive recurrence in the layer's op
        m.setattr(layer_module, FLA_OP_NAME, naive_op)
        ref = ntp(base, ids, mask)

    res = {"dtype": str(dtype).split(".")[-1] + ("_autocast_bf16" if autocast else ""), "tolerance": tol}
    with use_trl_refine_gated_kernel(model) as layers:
        ours = ntp(model, ids, mask, autocast)
    res["layers_swapped"] = layers
    res.update(compare("", ours, ref))
    try:  # fla's own kernel, unpatched
        fla = ntp(model, ids, mask, autocast)
    except RuntimeError as err:
        if "640" not in str(err):
            raise
        res["fla_backward"] = f"refused by fla: {str(err)[:200]}"
    else:
        res["fla_backward"] = "ran"
        res.update(compare("fla_", fla, ref))
    res.update(device=torch.cuda.get_device_name(), triton=triton.__version__, shape=[B, T])
    record(f"fla_gated_patch_{res['dtype']}", **res)
    assert layers == base.config.num_hidden_layers
    assert res["logits"] < tol and res["grad_all"] < tol, res
    assert res["grad_worst_param"][0] < 2 * tol, res
