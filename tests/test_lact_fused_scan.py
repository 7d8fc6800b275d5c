"""The fused scan (``nsp_fuse_scan``) on LaCT: ``forward(deferred_states=True)`` keeps what gives every layer's state
at positions chosen after the forward (the post-RoPE attention keys/values, the fast-weight inputs and each large
chunk's weights), so a ReFINE step makes one document forward instead of two. Its states equal those of
``forward(state_positions=...)`` (bitwise, with their gradients), and a full step through it equals the one-pass
step with a scan of its own and the snapshot engine's step (left-padded documents, CPU fp32)."""

import pytest
import torch
from _engine_harness import batch, rel
from test_fused_scan import _full_step, assert_fused_step_equals_the_onepass_and_snapshot_steps
from test_onepass_engine import strong_lact

from trl_refine.rollout import OnePassEngine, RolloutPlan

CHUNK = 16  # strong_lact's lact_chunk_size (and window)


@pytest.mark.parametrize("variant", ["default", "lowrank_prenorm", "window_ne_chunk"])
def test_lact_deferred_states_equal_the_states_at_positions_and_their_gradients(variant):
    """deferred_states.at(positions) is forward(state_positions=positions)'s position_states, bitwise (every key:
    the window, the chunk's fast weights, its update sums and momentum), with the same parameter gradients through
    them; positions in the first chunk, at a chunk's end (full chunk pending), just after it, at the first token,
    left padding (config variants of tests/test_models_lact.py: chunks of 4, or 5 with a window of 3)."""
    from test_models_lact import VARIANTS, _model

    model = _model(**VARIANTS[variant]).train()
    docs = batch((23, 17, 9), vocab=model.config.vocab_size, seed=1)
    pos = torch.tensor([[0, 3, 4, 5, 22], [6, 9, 10, 14, 22], [14, 15, 18, 19, 22]])
    kw = dict(input_ids=docs.input_ids, attention_mask=docs.attention_mask, use_cache=False)

    def grads(states, logits):
        model.zero_grad()
        total = logits.sum()
        for i, layer in enumerate(states):
            for j, key in enumerate(sorted(layer.keys() - {"pos"})):
                total = total + (layer[key] * (0.1 * (i + 1) + 0.01 * j)).sum()
        total.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    eager = model(**kw, state_positions=pos)
    deferred = model(**kw, deferred_states=True)
    assert eager.deferred_states is None and deferred.position_states is None
    states = deferred.deferred_states.at(pos)
    assert len(states) == len(eager.position_states) == model.config.num_hidden_layers
    for got, want in zip(states, eager.position_states):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert torch.equal(deferred.logits, eager.logits)
    g_eager = grads(eager.position_states, eager.logits)
    g_deferred = grads(states, deferred.logits)
    assert g_eager.abs().sum() > 0 and rel(g_deferred, g_eager) < 1e-6
    with pytest.raises(ValueError, match="not both"):
        model(**kw, deferred_states=True, state_positions=pos)
    with pytest.raises(ValueError, match="must lie in"):
        deferred.deferred_states.at(pos + 1)
    cache = model(input_ids=docs.input_ids[:1, :5], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="no past_key_values"):
        model(input_ids=docs.input_ids[:1, 5:9], past_key_values=cache, deferred_states=True)


def test_the_onepass_engine_serves_lact_with_the_fused_scan():
    assert OnePassEngine().fused_scan_problem(strong_lact()) == ""


@pytest.mark.parametrize("lengths", [(120, 47, 90), (100, 70)])
def test_lact_fused_step_equals_the_onepass_and_snapshot_steps(byte_tokenizer, lengths):
    model = strong_lact()
    docs = batch(lengths, vocab=model.config.vocab_size, seed=3)
    fused = _full_step(OnePassEngine(), model, docs, byte_tokenizer, fuse=True)
    assert fused["document_forwards"] == 1  # the point: the scan and the document pass are one forward
    assert fused["step"].rollout.sampling_pass.used  # the loss reused the fused forward's states
    # the positions cover what the states must get right: several large chunks, and chunks still partial
    counts = docs.attention_mask.cumsum(-1).gather(1, fused["step"].positions)
    assert (counts % CHUNK != 0).any() and ((counts - 1) // CHUNK).unique().numel() > 1
    assert_fused_step_equals_the_onepass_and_snapshot_steps(fused, model, docs, byte_tokenizer, f"LaCT {lengths}")


def test_lact_fused_step_gradient_reaches_the_prefix_through_the_states(byte_tokenizer):
    """The rollouts' policy gradient flows into the prefix through the deferred states: detaching them (the
    window and the fast weights read at the positions) changes the gradient of the rollout log-probs."""
    model = strong_lact()
    docs = batch((120, 47, 90), vocab=model.config.vocab_size, seed=3)
    engine = OnePassEngine()
    plan = RolloutPlan(torch.tensor([[15, 16, 40, 109], [88, 89, 100, 111], [61, 62, 80, 111]]), 2, 4)
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        _, pending = engine.fused_scan(model, docs, model)
        if detach:
            inner = pending.states.at
            pending.states.at = lambda p, _at=inner: [{k: v.detach() for k, v in s.items()} for s in _at(p)]
        out = engine.generate_fused(model, docs, plan, pending, torch.Generator().manual_seed(0))
        fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
        fwd.rollout_logps.sum().backward()
        grads[detach] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    cut = rel(grads[True], grads[False])
    print(f"LaCT fused step: rollout gradient change when detaching the deferred states {cut:.1e}")
    assert cut > 1e-3


def test_an_optimizer_step_after_the_lact_fused_step_moves_the_weights_as_the_two_forward_step(byte_tokenizer):
    docs = batch((100, 70), seed=2)
    after = {}
    for fuse in (True, False):
        model = strong_lact(seed=5)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _full_step(OnePassEngine(), model, docs, byte_tokenizer, fuse=fuse)
        opt.step()
        after[fuse] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert rel(after[fuse], before) > 1e-4  # it trained
    assert rel(after[True], after[False]) < 1e-5
