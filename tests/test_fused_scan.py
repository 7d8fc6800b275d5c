"""The fused scan (``nsp_fuse_scan``): the step's scan computed from the loss's document forward, which keeps what
gives the states at positions chosen after it. A full ReFINE step through it equals the one-pass engine's step with a
scan of its own and the snapshot engine's step (same positions, rollouts, log-probs, hidden states, rewards, loss and
gradients, CPU fp32), with one document forward instead of two."""

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset
from test_snapshot_engine import batch, rel

from trl_refine import NSPGRPOTrainer
from trl_refine.losses import masked_token_nll, ppo_clip_loss
from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rewards import builtin_reward_funcs
from trl_refine.rollout import GenericEngine, OnePassEngine, SnapshotEngine
from trl_refine.step import reward_rows, rollout_generators, sample_rollouts, score_rewards, step_advantages
from trl_refine.testtime import TestTimeConfig


def _model(seed=4):
    m = tiny_delta_net(seed=seed)
    ensure_fused_lm_head(m)
    return m


def test_deferred_states_equal_the_states_at_positions_and_their_gradients():
    """forward(deferred_states=True).deferred_states.at(positions) gives what forward(state_positions=positions)
    gives (the same tensors and formulas: bitwise), and the same parameter gradients through those states (positions
    before, at and after 64-token chunk boundaries, left padding)."""
    model = _model()
    docs = batch((200, 163, 70), seed=1)
    pos = torch.tensor([[20, 63, 64, 199], [40, 100, 127, 128], [131, 140, 193, 199]])
    kw = dict(input_ids=docs.input_ids, attention_mask=docs.attention_mask, use_cache=False)
    weights = torch.linspace(-1, 1, 7)

    def grads(states, logits):
        model.zero_grad()
        total = logits.sum()
        for i, layer in enumerate(states):
            total = total + (layer["recurrent_state"] * weights[i]).sum()
            total = total + sum((c * weights[i + 3]).sum() for c in layer["conv_state"])
        total.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    eager = model(**kw, state_positions=pos)
    deferred = model(**kw, deferred_states=True)
    assert eager.deferred_states is None and deferred.position_states is None
    states = deferred.deferred_states.at(pos)
    assert len(states) == len(eager.position_states) == 2
    for got, want in zip(states, eager.position_states):
        assert torch.equal(got["recurrent_state"], want["recurrent_state"])
        for g, w in zip(got["conv_state"], want["conv_state"]):
            assert torch.equal(g, w)
    assert torch.equal(deferred.logits, eager.logits)
    g_eager = grads(eager.position_states, eager.logits)
    g_deferred = grads(states, deferred.logits)
    assert g_eager.abs().sum() > 0 and rel(g_deferred, g_eager) < 1e-6
    with pytest.raises(ValueError, match="not both"):
        model(**kw, deferred_states=True, state_positions=pos)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(input_ids=docs.input_ids[:1], cu_seqlens=torch.tensor([0, 100, 200], dtype=torch.int32),
              deferred_states=True)  # fmt: skip


def _document_forwards(model, docs):
    """A counter of the model calls over the whole [B, L] document batch."""
    calls = {"n": 0}

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape == docs.input_ids.shape:
            calls["n"] += 1

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def _full_step(engine, model, docs, tokenizer, fuse: bool, *, n=4, g=2, k=5, seed=7):
    """Scan → selection → rollouts → rewards (cosine + exact) → advantages → loss → backward, as the step runs
    them with the sampling pass reused."""
    cfg = TestTimeConfig(
        nsp_num_chunks=n, nsp_num_rollouts=g, nsp_rollout_length=k, nsp_margin=8, nsp_reward="hybrid",
        nsp_fuse_scan=fuse,
    )  # fmt: skip
    model.zero_grad()
    calls, handle = _document_forwards(model, docs)
    try:
        step = sample_rollouts(
            engine, model, docs, cfg, generators=rollout_generators(seed, "cpu"), train_model=model, need_hidden=True
        )
        document_forwards = calls["n"]
        with torch.no_grad():
            funcs, weights = builtin_reward_funcs(cfg.nsp_reward)
            rows = reward_rows(step, tokenizer, tail_tokens=8, need_hidden=True)
            rewards = score_rewards(funcs, weights, rows, "cpu")
            advantages, _ = step_advantages(rewards, cfg)
        fwd = engine.forward_train(
            model, docs, step.plan, step.rollout.completion_ids, sampling_pass=step.rollout.sampling_pass
        )
    finally:
        handle.remove()
    nll, count = masked_token_nll(fwd.doc_logps, docs.label_mask())
    pg, _ = ppo_clip_loss(fwd.rollout_logps, step.rollout.old_logps, advantages)
    loss = cfg.ntp_coef * nll / count + cfg.nsp_coef * pg
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return dict(
        step=step, rewards=rewards, fwd=fwd, loss=loss.detach(), grad=grad, document_forwards=document_forwards
    )


def assert_fused_step_equals_the_onepass_and_snapshot_steps(fused: dict, model, docs, tokenizer, label: str) -> None:
    """The fused step (`_full_step` with ``fuse=True``) against the one-pass step with its own scan (2 document
    forwards) and the snapshot engine's step (which has no fused scan: with nsp_fuse_scan it scans as before; 1
    counted forward, the scan, then n+1 segments): the same positions and rollout ids, every tensor within 1e-5."""
    for engine, forwards in ((OnePassEngine(), 2), (SnapshotEngine(), 1)):
        other = _full_step(engine, model, docs, tokenizer, fuse=engine.name == "snapshot")
        assert other["document_forwards"] == forwards
        a, b = fused["step"], other["step"]
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.rollout.completion_ids, b.rollout.completion_ids)
        errors = {
            "scan_entropy": rel(a.scan.entropy, b.scan.entropy),
            "scan_logps": rel(a.scan.logps, b.scan.logps),
            "scan_hidden": rel(a.scan.hidden_states, b.scan.hidden_states),
            "old_logps": rel(a.rollout.old_logps, b.rollout.old_logps),
            "rollout_hidden": rel(a.rollout.hidden_states, b.rollout.hidden_states),
            "rewards": rel(fused["rewards"], other["rewards"]),
            "doc_logps": rel(fused["fwd"].doc_logps, other["fwd"].doc_logps),
            "rollout_logps": rel(fused["fwd"].rollout_logps, other["fwd"].rollout_logps),
            "loss": rel(fused["loss"], other["loss"]),
            "grad": rel(fused["grad"], other["grad"]),
        }
        print(f"{label} fused vs {engine.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        for key, err in errors.items():
            assert err < 1e-5, (engine.name, key, err)
        assert not a.scan.hidden_states.requires_grad and not a.scan.entropy.requires_grad


@pytest.mark.parametrize("lengths", [(200, 97, 170), (150, 90)])
def test_fused_step_equals_the_onepass_and_snapshot_steps(byte_tokenizer, lengths):
    model = _model()
    docs = batch(lengths, vocab=model.config.vocab_size, seed=3)
    fused = _full_step(OnePassEngine(), model, docs, byte_tokenizer, fuse=True)
    assert fused["document_forwards"] == 1  # the point: the scan and the document pass are one forward
    assert fused["step"].rollout.sampling_pass.used  # the loss reused the fused forward's states
    assert_fused_step_equals_the_onepass_and_snapshot_steps(fused, model, docs, byte_tokenizer, f"{lengths}")


def test_an_optimizer_step_after_the_fused_step_moves_the_weights_as_the_two_forward_step(byte_tokenizer):
    docs = batch((180, 140), seed=2)
    after = {}
    for fuse in (True, False):
        model = _model(seed=5)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _full_step(OnePassEngine(), model, docs, byte_tokenizer, fuse=fuse)
        opt.step()
        after[fuse] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert rel(after[fuse], before) > 1e-4  # it trained
    assert rel(after[True], after[False]) < 1e-5


def test_the_fused_scan_serves_once_and_says_where_it_does_not_apply():
    model = _model()
    docs = batch((100, 80), seed=1)
    engine = OnePassEngine()
    assert engine.fused_scan_problem(model) == ""
    assert "no fused scan" in SnapshotEngine().fused_scan_problem(model)
    assert "no fused scan" in GenericEngine().fused_scan_problem(model)
    scan, pending = engine.fused_scan(model, docs, model)
    plan_positions = torch.tensor([[40, 60], [50, 90]])
    from trl_refine.rollout import RolloutPlan

    plan = RolloutPlan(plan_positions, 2, 3)
    engine.generate_fused(model, docs, plan, pending, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="already used"):
        engine.generate_fused(model, docs, plan, pending, torch.Generator().manual_seed(0))
    _, pending = engine.fused_scan(model, docs, model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # weights changed between the scan and the sampling
    with pytest.raises(ValueError, match="before the weights changed"):
        engine.generate_fused(model, docs, plan, pending)
    from test_snapshot_engine import tiny_lact

    lact = tiny_lact()
    assert engine.fused_scan_problem(lact) == ""  # LaCT keeps its deferred states too (tests/test_lact_fused_scan.py)
    lact.supports_deferred_states = False  # a model with states at positions known before its forward only
    assert "supports_deferred_states" in engine.fused_scan_problem(lact)
    with pytest.raises(ValueError, match="nsp_fuse_scan=False"):
        engine.fused_scan(lact, docs, lact)


def test_trainer_with_the_fused_scan_logs_what_it_logs_without(tmp_path, byte_tokenizer):
    """A trainer step with and without ``nsp_fuse_scan`` (one-pass engine, the sampling pass reused): same
    losses, rewards and weights, and the fused scan ran in every step."""
    ds = Dataset.from_dict({"text": documents(4)})
    logs, weights = {}, {}
    for fuse in (False, True):
        args = small_config(
            tmp_path / str(fuse), max_steps=1, nsp_engine="onepass", documents_per_device=2, seed=3,
            nsp_fuse_scan=fuse,
        )  # fmt: skip
        tr = NSPGRPOTrainer(tiny_delta_net(seed=1), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        fused_calls = []

        def counted(*a, _calls=fused_calls, _original=tr.engine.fused_scan, **kw):
            _calls.append(1)
            return _original(*a, **kw)

        tr.engine.fused_scan = counted
        tr.train()
        assert len(fused_calls) == (1 if fuse else 0)
        weights[fuse] = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        logs[fuse] = [
            v for h in tr.state.log_history if "loss" in h for v in (h["loss"], h["reward"], h["nsp/exact_match"])
        ]
    assert logs[True] == pytest.approx(logs[False], rel=1e-5, abs=1e-7)
    assert rel(weights[True], weights[False]) < 1e-5


def test_fla_delta_net_fused_step_equals_the_reference_snapshot_step():
    """fla's DeltaNet (one layer, no short convs) through a full step with the fused scan (the one-pass engine with
    ``states="boundary"``: the boundary-state kernel keeps every chunk-boundary state, run by the Triton interpreter
    on CPU, fp32) against the snapshot engine's step on the reference DeltaNet with the same weights: one document
    forward, the same positions and rollout ids; scan, log-probs, hidden states, rewards, loss and parameter
    gradients within 1e-5 relative."""
    from test_onepass_engine import _interpret

    res = _interpret("fla_fused_scan.py")
    assert res.pop("keeping_layer_calls") == 1  # the deferred boundary forward ran (1 layer x 1 document pass)
    assert res.pop("fused_document_forwards") == 1 and res.pop("snapshot_document_forwards") == 1  # + n+1 segments
    assert "grad_rel" in res and "scan_entropy_rel" in res
    for key, value in res.items():
        if key.endswith(("_equal", "_used")):
            assert value is True, key
        elif key.endswith("_rel"):
            assert value < 1e-5, (key, value)


def test_fla_gated_delta_net_fused_step_equals_the_snapshot_and_two_forward_steps():
    """fla's GatedDeltaNet (one layer, HV = 2H, no short convs) through a full step with the fused scan (the one-pass
    engine with ``states="boundary"``: the gated boundary kernel keeps every chunk-boundary state, the Triton
    interpreter on CPU, fp32) against the snapshot engine's step on a copy of the model whose chunk op is fla's
    pure-PyTorch gated recurrence (fla's gated chunk kernels do not run in the interpreter), and against the
    one-pass engine's two-forward step (its own no-grad scan, then the document pass): one document forward instead
    of two, the same positions and rollout ids; scan, log-probs, hidden states, rewards, loss and parameter
    gradients within 1e-5 relative."""
    from test_onepass_engine import _interpret

    res = _interpret("fla_fused_scan.py", "--gated")
    assert res.pop("keeping_layer_calls") == 1  # the deferred boundary forward ran once (1 layer, the fused step)
    assert res.pop("fused_document_forwards") == 1 and res.pop("twopass_document_forwards") == 2
    assert res.pop("snapshot_document_forwards") == 1  # its scan, then n+1 segments
    assert "grad_rel" in res and "twopass_grad_rel" in res and "twopass_scan_entropy_rel" in res
    for key, value in res.items():
        if key.endswith(("_equal", "_used")):
            assert value is True, key
        elif key.endswith("_rel"):
            assert value < 1e-5, (key, value)
