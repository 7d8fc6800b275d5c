"""GPU (marked `gpu`, skipped without CUDA): every family the snapshot engine serves, snapshot vs generic engine
(rollout ids, old / rollout / document log-probs, hidden states, gradients) in bf16, and one step's wall time
against an NTP step on the same documents. fla families run only here (Triton); the transformers hybrids are
also checked on CPU in fp32 (tests/test_hybrid_engines.py). Results of the real run are committed in
`benchmarks/results/gpu_families.json` and tabled in docs/models.md."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU for fla's Triton kernels", allow_module_level=True)

pytest.importorskip("fla")

from gpu.test_gpu_parity import DEV, docs_batch, engine_comparison, record  # noqa: E402
from trl_refine.models.tiny_configs import TRANSFORMERS_HYBRIDS, tiny_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from families_speed import step_times  # noqa: E402

#: fla families new to the snapshot engine (delta_net and gated_deltanet are covered by test_gpu_parity.py)
FLA_NEW = ("gla", "gated_deltaproduct", "kda", "rwkv7", "hgrn2")


def compare(model, docs, **kw) -> tuple[dict, bool]:
    """The engine comparison with gradients, unless fla itself refuses the backward (its fla #640 guard: Hopper with
    triton in [3.4, 3.7.1) for the gated chunk kernels); then forward only, with fla's own message recorded. Whether
    a family reaches that guard is fla's decision, not a list of ours (KDA and RWKV-7 may not)."""
    try:
        return engine_comparison(model, docs, backward=True, **kw), True
    except RuntimeError as err:
        if "640" not in str(err):
            raise
        torch.cuda.empty_cache()
        res = engine_comparison(model, docs, backward=False, **kw)
        res["gradients"] = res["speed"] = f"not compared: fla refused the backward ({str(err)[:200]})"
        return res, False


def build(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(model_type, vocab_size=512, hidden_size=128, layers=2, heads=2)
    return AutoModelForCausalLM.from_config(cfg).to(DEV, torch.bfloat16)


@pytest.mark.parametrize("model_type", FLA_NEW)
def test_fla_family_snapshot_vs_generic(model_type):
    model = build(model_type)
    res, backward = compare(model, docs_batch((600, 450)), n=4, g=2, k=5)
    if backward:
        res.update(step_times(model, docs_batch((1024, 1024), seed=3)))
    record(f"family_{model_type}_bf16", **res)
    # bf16: a near-tie can pick another token, after which rollouts diverge; log-probs are compared on one token set
    assert res["rollout_ids_equal_fraction"] > 0.5
    assert res["rollout_logps_rel"] < 0.05 and res["doc_logps_rel"] < 0.05
    if backward:
        assert res["grad_cos"] > 0.98


@pytest.mark.parametrize("model_type", TRANSFORMERS_HYBRIDS)
def test_transformers_hybrid_on_gpu(model_type):
    pytest.importorskip("transformers.cache_utils").__dict__.get("LinearAttentionLayer") or pytest.skip(
        "transformers without the layered linear-attention cache (needs >= 5.20)"
    )
    model = build(model_type)
    res, backward = compare(model, docs_batch((600, 450)), n=4, g=2, k=5)
    if backward:
        res.update(step_times(model, docs_batch((1024, 1024), seed=3)))
    record(f"family_{model_type}_bf16", **res)
    assert res["rollout_logps_rel"] < 0.05 and res["doc_logps_rel"] < 0.05
    if backward:
        assert res["grad_cos"] > 0.98
