"""transformers' pure state-space models (``mamba2``: `Mamba2ForCausalLM`, ``mamba``: `MambaForCausalLM`) on the
snapshot engine: the same rollouts, log-probs, hidden states and gradients as the generic engine (CPU, fp32,
left-padded variable-length batches, segments spanning several Mamba-2 scan chunks)."""

import logging

import pytest
import torch
from _engine_harness import (
    assert_checkpointed_and_reused_pass_match,
    assert_gradient_flows_through_snapshots,
    assert_snapshot_equals_generic,
    batch,
    loss_grads,
    rel,
    tiny_transformers_model,
)

from trl_refine.models.tiny_configs import TRANSFORMERS_SSMS
from trl_refine.rollout import GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine

VOCAB = 96


def tiny_ssm(family: str, seed: int = 0):
    # Mamba-2: segments span several chunks of the scan, each continuing the state
    overrides = {"chunk_size": 8} if family == "transformers_mamba2" else {}
    return tiny_transformers_model(family, VOCAB, seed=seed, **overrides)


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_snapshot_equals_generic(family):
    assert_snapshot_equals_generic(tiny_ssm(family), VOCAB)


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_checkpointed_segments_and_reused_sampling_pass(family):
    docs = batch((40, 27), vocab=VOCAB, seed=2)
    plan = RolloutPlan(torch.tensor([[9, 21, 30], [16, 20, 33]]), 3, 4)
    assert_checkpointed_and_reused_pass_match(tiny_ssm(family, seed=1), docs, plan)


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_gradient_flows_through_snapshots(family):
    """Detaching the branch states (conv window and SSM state) changes the rollout gradient a lot."""
    docs = batch((40, 33), vocab=VOCAB, seed=4)
    plan = RolloutPlan(torch.tensor([[12, 25], [15, 27]]), 2, 4)
    assert_gradient_flows_through_snapshots(tiny_ssm(family, seed=2), docs, plan)


def test_mamba_one_token_calls_with_gradients():
    """k = 2 (a one-token branch call with gradients): Mamba's continuing mixer is out of place and matches the
    generic engine; Mamba-2's single-token step writes in place, so it is refused early with the fix."""
    docs = batch((30,), vocab=VOCAB)
    plan = RolloutPlan(torch.tensor([[10, 20]]), 2, 2)
    for family in TRANSFORMERS_SSMS:
        model = tiny_ssm(family)
        snap = SnapshotEngine()
        with torch.no_grad():
            comp = snap.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
        if family == "transformers_mamba2":
            with pytest.raises(ValueError, match="rollout length of at least 3"):
                snap.forward_train(model, docs, plan, comp)
            continue
        _, gs = loss_grads(snap, model, docs, plan, comp)
        _, gg = loss_grads(GenericEngine(), model, docs, plan, comp)
        assert rel(gs, gg) < 1e-5


def test_continuing_mixer_only_on_engine_caches():
    """The swapped Mamba mixer is transformers' own forward outside the engine: generation with transformers' cache
    and plain forwards give what they gave before the swap."""
    model = tiny_ssm("transformers_mamba", seed=4)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        gen_before = model.generate(ids, max_new_tokens=4, do_sample=False)
        SnapshotEngine()._adapter(model)  # prepares the model
        assert {type(m).__name__ for m in model.modules()} >= {"ContinuingMambaMixer"}
        assert "MambaMixer" not in {type(m).__name__ for m in model.modules()}
        assert torch.equal(model(input_ids=ids).logits, before)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), gen_before)


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_auto_picks_snapshot_for_transformers_mamba(family, caplog):
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", tiny_ssm(family)).name == "snapshot"
    assert "rollout engine = snapshot" in caplog.text


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_recipe_tiny_model_of_a_mamba_gets_the_snapshot_engine(family):
    from trl_refine.recipe_utils import ModelArguments, build_model_and_tokenizer

    args = ModelArguments(tiny_model_type=family, tiny_hidden_size=32, tiny_layers=2, tiny_heads=2)
    model, tokenizer = build_model_and_tokenizer(args)
    assert model.config.model_type == family.removeprefix("transformers_")
    assert model.config.vocab_size == len(tokenizer)
    assert type(model).__module__.startswith("transformers.")
    assert build_engine("auto", model).name == "snapshot"
    ids = torch.tensor([tokenizer.encode("a tiny model")])
    assert torch.isfinite(model(input_ids=ids).logits).all()
