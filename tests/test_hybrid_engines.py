"""transformers' hybrid models (linear-recurrent + attention layers) on the snapshot engine: the same rollouts,
log-probs, hidden states and gradients as the generic engine (CPU, fp32, left-padded variable-length batches)."""

import pytest
import torch
from test_snapshot_engine import batch, rel

from trl_refine._compat import use_transformers_torch_kernels
from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.models.tiny_configs import TRANSFORMERS_HYBRIDS, tiny_config
from trl_refine.rollout import GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine

VOCAB = 96


def tiny_hybrid(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    use_transformers_torch_kernels(model_type)  # fla's Triton kernels would be picked on CPU
    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size=VOCAB, hidden_size=32, layers=2, heads=2)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    ensure_fused_lm_head(model)
    return model


@pytest.mark.parametrize("model_type", TRANSFORMERS_HYBRIDS)
def test_hybrid_snapshot_equals_generic(model_type):
    model = tiny_hybrid(model_type)
    docs = batch((40, 27), vocab=VOCAB, seed=1)
    # left padding in doc 1; chunks 0 and 1 on the same prefix (an empty segment); k = 3
    pos = torch.tensor([[9, 9, 21, 30], [16, 20, 24, 33]])
    plan = RolloutPlan(pos, 2, 3)
    generic, snap = GenericEngine(), SnapshotEngine()
    with torch.no_grad():
        out_g = generic.generate(model, docs, plan, torch.Generator().manual_seed(5))
        out_s = snap.generate(model, docs, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out_g.completion_ids, out_s.completion_ids)
    assert rel(out_s.old_logps, out_g.old_logps) < 1e-5
    assert rel(out_s.hidden_states, out_g.hidden_states) < 1e-5

    adv = torch.linspace(-1, 1, plan.num_rows)
    grads = []
    for engine in (generic, snap):
        model.zero_grad()
        fwd = engine.forward_train(model, docs, plan, out_g.completion_ids)
        mask = docs.label_mask()
        loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
        loss.backward()
        grads.append((fwd, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (fg, gg), (fs, gs) = grads
    assert rel(fs.doc_logps, fg.doc_logps) < 1e-5
    assert rel(fs.rollout_logps, fg.rollout_logps) < 1e-5
    assert rel(gs, gg) < 1e-5
    assert gs.abs().sum() > 0


@pytest.mark.parametrize("model_type", TRANSFORMERS_HYBRIDS)
def test_auto_picks_snapshot_for_hybrids(model_type, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", tiny_hybrid(model_type)).name == "snapshot"
    assert "rollout engine = snapshot" in caplog.text
