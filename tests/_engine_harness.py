"""The shared harness of the engine-equivalence tests: tiny batches, the relative error, a tiny transformers model,
and the comparisons that the snapshot-engine test files (plain, hybrid, Mamba) run on each family. One copy, so a
fix to how a comparison is made reaches every family."""

import torch

from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rollout import DocumentBatch, GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.state import map_tensors


def batch(lengths, vocab=384, seed=0):
    """Left-padded random documents of the given lengths (ids from 3, so no special token)."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, total - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, total - n :] = 1
    return DocumentBatch(ids, mask)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def tiny_transformers_model(model_type: str, vocab: int, seed: int = 0, **config_overrides):
    """A 2-layer, hidden-32 transformers model of ``model_type`` (trl_refine's tiny config), fp32, eval mode, with
    the fused LM head the engines use."""
    from transformers import AutoModelForCausalLM

    from trl_refine.models.tiny_configs import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size=vocab, hidden_size=32, layers=2, heads=2)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    ensure_fused_lm_head(model)
    return model


def loss_grads(engine, model, docs, plan, completion_ids, **kw):
    """``forward_train`` then the backward of a loss that mixes the document NTP term and signed rollout terms:
    returns the forward's outputs and the flattened gradient."""
    model.zero_grad()
    fwd = engine.forward_train(model, docs, plan, completion_ids, **kw)
    mask = docs.label_mask()
    adv = torch.linspace(-1, 1, plan.num_rows)
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
    loss.backward()
    return fwd, flat_grads(model)


# left padding in doc 1; chunks 0 and 1 on the same prefix (an empty segment); k = 3
PADDED_PLAN_LENGTHS = (40, 27)
PADDED_PLAN = ([[9, 9, 21, 30], [16, 20, 24, 33]], 2, 3)


def assert_snapshot_equals_generic(model, vocab: int, seed: int = 1, tol: float = 1e-5):
    """The snapshot engine gives the generic engine's rollouts, log-probs, hidden states and gradients on a
    left-padded two-document batch with an empty segment (PADDED_PLAN)."""
    docs = batch(PADDED_PLAN_LENGTHS, vocab=vocab, seed=seed)
    positions, n, k = PADDED_PLAN
    plan = RolloutPlan(torch.tensor(positions), n, k)
    generic, snap = GenericEngine(), SnapshotEngine()
    with torch.no_grad():
        out_g = generic.generate(model, docs, plan, torch.Generator().manual_seed(5))
        out_s = snap.generate(model, docs, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out_g.completion_ids, out_s.completion_ids)
    assert rel(out_s.old_logps, out_g.old_logps) < tol
    assert rel(out_s.hidden_states, out_g.hidden_states) < tol
    fg, gg = loss_grads(generic, model, docs, plan, out_g.completion_ids)
    fs, gs = loss_grads(snap, model, docs, plan, out_g.completion_ids)
    assert rel(fs.doc_logps, fg.doc_logps) < tol
    assert rel(fs.rollout_logps, fg.rollout_logps) < tol
    assert rel(gs, gg) < tol
    assert gs.abs().sum() > 0


def rollout_grad(snap: SnapshotEngine, model, docs, plan, completion_ids, detach: bool) -> torch.Tensor:
    """The gradient of a signed rollout loss (tokens after the first) through ``snap``; with ``detach`` the branch
    states are cut off from the prefix, so only the branch's own tokens carry the signal."""
    model.zero_grad()
    original = snap._branch_rows
    if detach:
        snap._branch_rows = lambda s, p: map_tensors(original(s, p), torch.Tensor.detach)
    try:
        fwd = snap.forward_train(model, docs, plan, completion_ids)
    finally:
        snap._branch_rows = original
    adv = torch.linspace(-1, 1, plan.num_rows)
    (-(adv[:, None] * fwd.rollout_logps[:, 1:]).mean()).backward()
    return flat_grads(model)


def assert_gradient_flows_through_snapshots(model, docs, plan, seed: int = 0, min_change: float = 0.1):
    """Detaching the branch states changes the rollout gradient by more than ``min_change`` (relative): the
    gradient does go through the snapshots into the prefix."""
    snap = SnapshotEngine()
    with torch.no_grad():
        comp = snap.generate(model, docs, plan, torch.Generator().manual_seed(seed)).completion_ids
    full = rollout_grad(snap, model, docs, plan, comp, detach=False)
    detached = rollout_grad(snap, model, docs, plan, comp, detach=True)
    assert rel(detached, full) > min_change


def assert_checkpointed_and_reused_pass_match(model, docs, plan, generic_tol: float = 1e-5, tol: float = 1e-6):
    """The snapshot engine's gradients equal the generic engine's, and stay the same with checkpointed segments
    and with the sampling pass kept from ``generate`` and reused by ``forward_train``."""
    with torch.no_grad():
        comp = SnapshotEngine().generate(model, docs, plan, torch.Generator().manual_seed(5)).completion_ids
    _, plain = loss_grads(SnapshotEngine(), model, docs, plan, comp)
    _, generic = loss_grads(GenericEngine(), model, docs, plan, comp)
    assert rel(plain, generic) < generic_tol
    _, checkpointed = loss_grads(SnapshotEngine(checkpoint_segments=True), model, docs, plan, comp)
    assert rel(checkpointed, plain) < tol
    engine = SnapshotEngine()
    out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5), train_model=model)
    assert torch.equal(out.completion_ids, comp)
    _, reused = loss_grads(engine, model, docs, plan, comp, sampling_pass=out.sampling_pass)
    assert rel(reused, plain) < tol
