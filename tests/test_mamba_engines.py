"""transformers' pure state-space models (``mamba2``: `Mamba2ForCausalLM`, ``mamba``: `MambaForCausalLM`) on the
snapshot engine: the same rollouts, log-probs, hidden states and gradients as the generic engine (CPU, fp32,
left-padded variable-length batches, segments spanning several Mamba-2 scan chunks)."""

import logging

import pytest
import torch
from test_snapshot_engine import batch, rel

from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.models.tiny_configs import TRANSFORMERS_SSMS, tiny_config
from trl_refine.rollout import GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine

VOCAB = 96


def tiny_ssm(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=VOCAB, hidden_size=32, layers=2, heads=2)
    if family == "transformers_mamba2":
        config.chunk_size = 8  # segments span several chunks of the scan, each continuing the state
    model = AutoModelForCausalLM.from_config(config).float().eval()
    ensure_fused_lm_head(model)
    return model


def _loss_grads(engine, model, docs, plan, completion_ids, **kw):
    model.zero_grad()
    fwd = engine.forward_train(model, docs, plan, completion_ids, **kw)
    mask = docs.label_mask()
    adv = torch.linspace(-1, 1, plan.num_rows)
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
    loss.backward()
    return fwd, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_snapshot_equals_generic(family):
    model = tiny_ssm(family)
    docs = batch((40, 27), vocab=VOCAB, seed=1)
    # left padding in doc 1; chunks 0 and 1 on the same prefix (an empty segment); k = 3
    plan = RolloutPlan(torch.tensor([[9, 9, 21, 30], [16, 20, 24, 33]]), 2, 3)
    generic, snap = GenericEngine(), SnapshotEngine()
    with torch.no_grad():
        out_g = generic.generate(model, docs, plan, torch.Generator().manual_seed(5))
        out_s = snap.generate(model, docs, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out_g.completion_ids, out_s.completion_ids)
    assert rel(out_s.old_logps, out_g.old_logps) < 1e-5
    assert rel(out_s.hidden_states, out_g.hidden_states) < 1e-5
    fg, gg = _loss_grads(generic, model, docs, plan, out_g.completion_ids)
    fs, gs = _loss_grads(snap, model, docs, plan, out_g.completion_ids)
    assert rel(fs.doc_logps, fg.doc_logps) < 1e-5
    assert rel(fs.rollout_logps, fg.rollout_logps) < 1e-5
    assert rel(gs, gg) < 1e-5
    assert gs.abs().sum() > 0


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_checkpointed_segments_and_reused_sampling_pass(family):
    model = tiny_ssm(family, seed=1)
    docs = batch((40, 27), vocab=VOCAB, seed=2)
    plan = RolloutPlan(torch.tensor([[9, 21, 30], [16, 20, 33]]), 3, 4)
    with torch.no_grad():
        comp = SnapshotEngine().generate(model, docs, plan, torch.Generator().manual_seed(5)).completion_ids
    _, plain = _loss_grads(SnapshotEngine(), model, docs, plan, comp)
    _, generic = _loss_grads(GenericEngine(), model, docs, plan, comp)
    assert rel(plain, generic) < 1e-5
    _, checkpointed = _loss_grads(SnapshotEngine(checkpoint_segments=True), model, docs, plan, comp)
    assert rel(checkpointed, plain) < 1e-6
    engine = SnapshotEngine()
    out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5), train_model=model)
    assert torch.equal(out.completion_ids, comp)
    _, reused = _loss_grads(engine, model, docs, plan, comp, sampling_pass=out.sampling_pass)
    assert rel(reused, plain) < 1e-6


@pytest.mark.parametrize("family", TRANSFORMERS_SSMS)
def test_mamba_gradient_flows_through_snapshots(family):
    """Detaching the branch states (conv window and SSM state) changes the rollout gradient a lot."""
    from trl_refine.rollout.state import map_tensors

    model = tiny_ssm(family, seed=2)
    docs = batch((40, 33), vocab=VOCAB, seed=4)
    plan = RolloutPlan(torch.tensor([[12, 25], [15, 27]]), 2, 4)
    snap = SnapshotEngine()
    with torch.no_grad():
        comp = snap.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
    adv = torch.linspace(-1, 1, plan.num_rows)

    def grad(detach: bool):
        model.zero_grad()
        original = snap._branch_rows
        if detach:
            snap._branch_rows = lambda s, p: map_tensors(original(s, p), torch.Tensor.detach)
        try:
            fwd = snap.forward_train(model, docs, plan, comp)
        finally:
            snap._branch_rows = original
        (-(adv[:, None] * fwd.rollout_logps[:, 1:]).mean()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert rel(grad(True), grad(False)) > 0.1


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
        _, gs = _loss_grads(snap, model, docs, plan, comp)
        _, gg = _loss_grads(GenericEngine(), model, docs, plan, comp)
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
