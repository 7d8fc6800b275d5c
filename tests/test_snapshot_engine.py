"""The state-snapshot engine is the generic engine, faster: same seed → same rollouts, log-probs, hidden states,
rewards and parameter gradients (reference DeltaNet, fp32), with left-padded, variable-length batches."""

import pytest
import torch
from _engine_harness import batch, rel, rollout_grad
from conftest import documents, small_config, tiny_delta_net, tiny_llama
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.rewards import cosine_scores
from trl_refine.rollout import GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine
from trl_refine.selection import select_positions


@pytest.fixture(scope="module")
def model():
    from trl_refine.modeling_utils import ensure_fused_lm_head

    m = tiny_delta_net(seed=3)
    ensure_fused_lm_head(m)
    return m


@pytest.mark.parametrize("lengths, n, g", [((150, 97, 150), 4, 2), ((120,), 3, 1), ((90, 140), 6, 3)])
def test_snapshot_equals_generic(model, lengths, n, g):
    docs = batch(lengths)
    k = 5
    generic, snap = GenericEngine(), SnapshotEngine()
    with torch.no_grad():
        scan_g = generic.scan(model, docs)
        scan_s = snap.scan(model, docs)
        assert torch.allclose(scan_g.entropy, scan_s.entropy)
        pos = select_positions(
            scan_g.entropy,
            docs.attention_mask,
            num_chunks=n,
            rollout_length=k,
            margin=8,
            generator=torch.Generator().manual_seed(1),
        )
        pos[:, 1] = pos[:, 0]  # two chunks on the same prefix: an empty middle segment
        plan = RolloutPlan(pos, g, k)
        out_g = generic.generate(model, docs, plan, torch.Generator().manual_seed(5))
        out_s = snap.generate(model, docs, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out_g.completion_ids, out_s.completion_ids)
    assert rel(out_s.old_logps, out_g.old_logps) < 1e-5
    assert rel(out_s.hidden_states, out_g.hidden_states) < 1e-5
    truth = plan.ground_truth_hidden(scan_g)
    assert torch.allclose(
        cosine_scores(out_s.hidden_states, truth), cosine_scores(out_g.hidden_states, truth), atol=1e-5
    )

    # the loss forward: document and rollout log-probs, then parameter gradients of a combined loss
    adv = torch.linspace(-1, 1, plan.num_rows)
    grads = []
    for engine in (generic, snap):
        model.zero_grad()
        fwd = engine.forward_train(model, docs, plan, out_g.completion_ids)
        mask = docs.label_mask()
        loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
        loss.backward()
        grads.append((fwd, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (fg, gg), (fs, gs) = grads
    assert rel(fs.doc_logps, fg.doc_logps) < 1e-5
    assert rel(fs.rollout_logps, fg.rollout_logps) < 1e-5
    assert rel(fs.rollout_logps, out_g.old_logps) < 1e-5  # on-policy: ratio 1
    assert rel(fs.rollout_entropy, fg.rollout_entropy) < 1e-5
    assert rel(gs, gg) < 1e-5


def test_gradient_flows_through_snapshots(model):
    """Detaching the snapshot states changes the rollout gradient a lot: the signal goes through the prefix."""
    docs = batch((160, 130), seed=2)
    snap = SnapshotEngine()
    with torch.no_grad():
        scan = snap.scan(model, docs)
        pos = select_positions(scan.entropy, docs.attention_mask, num_chunks=4, rollout_length=5, margin=8)
        plan = RolloutPlan(pos, 1, 5)
        comp = snap.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
    full = rollout_grad(snap, model, docs, plan, comp, detach=False)
    detached = rollout_grad(snap, model, docs, plan, comp, detach=True)
    assert rel(detached, full) > 0.1


def test_auto_picks_generic_without_a_state_adapter_and_forcing_picks_the_engine(caplog):
    import logging

    # our DeltaNet and LaCT: `auto` picks the one-pass engine (tests/test_onepass_engine.py)
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", tiny_llama()).name == "generic"
    assert "model_type 'llama' has no state adapter" in caplog.text
    assert build_engine("generic", tiny_delta_net()).name == "generic"
    assert type(build_engine("snapshot", tiny_delta_net())) is SnapshotEngine
    with pytest.raises(ValueError, match="cannot run"):
        build_engine("snapshot", tiny_llama())


@pytest.mark.parametrize("factory", ["delta_net", "lact"])
def test_trainer_steps_agree_between_engines(tmp_path, byte_tokenizer, factory):
    make = {"delta_net": tiny_delta_net, "lact": lambda seed: tiny_lact(seed=seed)}[factory]
    ds = Dataset.from_dict({"text": documents(4)})
    losses = {}
    for name in ("generic", "snapshot"):
        args = small_config(tmp_path / name, max_steps=2, nsp_engine=name, documents_per_device=2, seed=3)
        tr = NSPGRPOTrainer(make(seed=1), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        assert tr.engine.name == name
        tr.train()
        losses[name] = [
            v for h in tr.state.log_history if "loss" in h for v in (h["loss"], h["reward"], h["nsp/exact_match"])
        ]
    assert losses["generic"] == pytest.approx(losses["snapshot"], rel=1e-4, abs=1e-6)


def test_refuses_hf_gradient_checkpointing(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(2)})
    with pytest.raises(ValueError, match="checkpointing"):
        NSPGRPOTrainer(
            tiny_delta_net(),
            args=small_config(tmp_path, gradient_checkpointing=True),
            train_dataset=ds,
            processing_class=byte_tokenizer,
        )


def test_segment_checkpointing_keeps_states_and_gradients_exact(model):
    docs = batch((150, 110), seed=4)
    plain, ckpt = SnapshotEngine(), SnapshotEngine(checkpoint_segments=True)
    with torch.no_grad():
        scan = plain.scan(model, docs)
        pos = select_positions(scan.entropy, docs.attention_mask, num_chunks=4, rollout_length=5, margin=8)
        plan = RolloutPlan(pos, 2, 5)
        comp = plain.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
    adv = torch.linspace(-1, 1, plan.num_rows)
    grads = []
    for engine in (plain, ckpt):
        model.zero_grad()
        fwd = engine.forward_train(model, docs, plan, comp)
        m = docs.label_mask()
        (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-6


def tiny_lact(seed=0, vocab=384, window=16):
    from trl_refine.models.lact import LaCTConfig, LaCTForCausalLM

    torch.manual_seed(seed)
    cfg = LaCTConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attn_heads=2,
        num_lact_heads=2,
        lact_chunk_size=16,
        window_size=window,
    )
    return LaCTForCausalLM(cfg).float()


def test_snapshot_equals_generic_on_lact():
    from trl_refine.modeling_utils import ensure_fused_lm_head

    model = tiny_lact(seed=2)
    ensure_fused_lm_head(model)
    assert SnapshotEngine.supports(model)[0]
    docs = batch((120, 90), seed=6)
    generic, snap = GenericEngine(), SnapshotEngine()
    with torch.no_grad():
        scan = generic.scan(model, docs)
        pos = select_positions(scan.entropy, docs.attention_mask, num_chunks=3, rollout_length=4, margin=8)
        plan = RolloutPlan(pos, 2, 4)
        out_g = generic.generate(model, docs, plan, torch.Generator().manual_seed(5))
        out_s = snap.generate(model, docs, plan, torch.Generator().manual_seed(5))
    assert torch.equal(out_g.completion_ids, out_s.completion_ids)
    assert rel(out_s.old_logps, out_g.old_logps) < 1e-4
    assert rel(out_s.hidden_states, out_g.hidden_states) < 1e-4
    adv = torch.linspace(-1, 1, plan.num_rows)
    grads = []
    for engine in (generic, snap):
        model.zero_grad()
        fwd = engine.forward_train(model, docs, plan, out_g.completion_ids)
        m = docs.label_mask()
        (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert rel(grads[1], grads[0]) < 1e-4


@pytest.mark.parametrize("family, checkpoint_segments", [("delta_net", False), ("delta_net", True), ("lact", False)])
def test_reused_sampling_pass_equals_two_passes(model, family, checkpoint_segments):
    """generate(train_model=...) + forward_train(sampling_pass=...) gives exactly what sampling without gradients and
    a second segmented pass give: the same rollouts, log-probs and parameter gradients, with n+1 model calls fewer."""
    if family == "lact":  # left-padded packing instead of varlen
        from trl_refine.modeling_utils import ensure_fused_lm_head

        model = tiny_lact(seed=2)
        ensure_fused_lm_head(model)
    docs = batch((150, 97, 150))
    k, n, g = 5, 4, 2
    engine = SnapshotEngine(checkpoint_segments=checkpoint_segments)
    with torch.no_grad():
        scan = engine.scan(model, docs)
    pos = select_positions(
        scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    pos[:, 1] = pos[:, 0]  # an empty middle segment
    plan = RolloutPlan(pos, g, k)
    adv = torch.linspace(-1, 1, plan.num_rows)
    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    results = []
    try:
        for reuse in (False, True):
            model.zero_grad()
            calls["n"] = 0
            with torch.no_grad():
                out = engine.generate(
                    model, docs, plan, torch.Generator().manual_seed(5), train_model=model if reuse else None
                )
            assert (out.sampling_pass is not None) == reuse
            fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
            mask = docs.label_mask()
            loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((out, fwd, grad, calls["n"]))
    finally:
        hook.remove()
    (o2, f2, g2, c2), (o1, f1, g1, c1) = results
    assert torch.equal(o1.completion_ids, o2.completion_ids)
    assert torch.allclose(o1.old_logps, o2.old_logps, atol=1e-6, rtol=0)
    assert torch.allclose(o1.hidden_states, o2.hidden_states, atol=1e-6, rtol=0)
    assert torch.allclose(f1.doc_logps, f2.doc_logps, atol=1e-6, rtol=0)
    assert torch.allclose(f1.rollout_logps, f2.rollout_logps, atol=1e-6, rtol=0)
    assert rel(g1, g2) < 1e-6
    # n+1 segment calls + k decode calls + 1 branch call, against 2(n+1) + k + 1 (checkpointing recomputes the
    # segments in the backward in both cases)
    assert c2 - c1 == n + 1


def test_reused_sampling_pass_is_refused_by_the_generic_engine():
    m = tiny_llama()
    docs = batch((60,), vocab=100)
    plan = RolloutPlan(torch.tensor([[30]]), 1, 3)
    with pytest.raises(ValueError, match="does not reuse"):
        GenericEngine().generate(m, docs, plan, train_model=m)
    with pytest.raises(ValueError, match="does not reuse"):
        GenericEngine().forward_train(m, docs, plan, torch.zeros(1, 3, dtype=torch.long), sampling_pass=object())


def _train_recording(tmp_path, tok, **overrides):
    """Train a tiny reference DeltaNet (snapshot engine unless ``nsp_engine`` is given); returns the trainer, its
    logged metrics and the model calls per step."""
    ds = Dataset.from_dict({"text": documents(4)})
    defaults = {"max_steps": 2, "documents_per_device": 2, "seed": 3, "nsp_engine": "snapshot"}
    args = small_config(tmp_path, **{**defaults, **overrides})
    tr = NSPGRPOTrainer(tiny_delta_net(seed=1), args=args, train_dataset=ds, processing_class=tok)
    calls = []
    tr.model.register_forward_pre_hook(lambda *_: calls.append(tr.state.global_step))
    tr.train()
    keys = ("loss", "ntp_loss", "nsp/policy_loss", "reward", "nsp/exact_match", "grad_norm")
    logged = [h[key] for h in tr.state.log_history if "loss" in h for key in keys]
    per_step = [calls.count(step) for step in range(args.max_steps)]
    return tr, logged, per_step


@pytest.mark.parametrize("engine", ["snapshot", "onepass"])
def test_trainer_reusing_the_sampling_pass_trains_the_same(tmp_path, byte_tokenizer, caplog, engine):
    import logging

    with caplog.at_level(logging.INFO, logger="trl_refine"):
        reused, logged_reused, calls_reused = _train_recording(tmp_path / "reuse", byte_tokenizer, nsp_engine=engine)
    assert reused.engine.name == engine and reused.reused_sampling_pass is True
    assert "sampling pass also serves the loss" in caplog.text
    # the one-time line says where the scan comes from (the reference DeltaNet declares deferred states)
    if engine == "onepass":
        assert "scan: from the loss's document forward (nsp_fuse_scan" in caplog.text
    else:
        assert "scan: a no-grad pass of its own (the snapshot engine has no fused scan)" in caplog.text
    two, logged_two, calls_two = _train_recording(
        tmp_path / "two", byte_tokenizer, nsp_engine=engine, nsp_reuse_sampling_pass=False
    )
    assert two.reused_sampling_pass is None  # never considered
    assert logged_reused == pytest.approx(logged_two, rel=1e-6, abs=1e-9)
    for a, b in zip(reused.model.parameters(), two.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    # the loss's own document pass; the one-pass engine also folds its scan into the reused pass (nsp_fuse_scan)
    saved = reused.args.nsp_num_chunks + 1 if engine == "snapshot" else 2
    assert [c + saved for c in calls_reused] == calls_two


def test_reuse_does_not_apply_when_a_generation_serves_several_micro_steps(tmp_path, byte_tokenizer, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trl_refine"):
        tr, _, _ = _train_recording(tmp_path, byte_tokenizer, documents_per_device=1, gradient_accumulation_steps=2)
    assert tr.args.steps_per_generation == 2
    assert tr.reused_sampling_pass is False
    assert "set steps_per_generation=1" in caplog.text


def test_a_sampling_pass_serves_one_loss_of_its_own_model_with_unchanged_weights(model):
    docs = batch((120, 90))
    plan = RolloutPlan(torch.tensor([[40, 70], [40, 60]]), 1, 3)
    engine = SnapshotEngine()

    def sample():
        with torch.no_grad():
            return engine.generate(model, docs, plan, torch.Generator().manual_seed(0), train_model=model)

    out = sample()
    assert out.sampling_pass.usable_by(model) and not out.sampling_pass.usable_by(tiny_delta_net(seed=9))
    engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
    with pytest.raises(ValueError, match="already used"):  # its graph belongs to the first loss
        engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
    out = sample()
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # an in-place update (an optimizer step) after sampling
    assert not out.sampling_pass.usable_by(model)
    with pytest.raises(ValueError, match="weights changed"):
        engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)


def test_trainer_warns_and_runs_its_own_pass_when_the_kept_pass_does_not_fit(tmp_path, byte_tokenizer, caplog):
    import logging

    ds = Dataset.from_dict({"text": documents(2)})
    tr = NSPGRPOTrainer(
        tiny_delta_net(seed=1), args=small_config(tmp_path), train_dataset=ds, processing_class=byte_tokenizer
    )
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    per_doc = tr.args.nsp_num_chunks * tr.args.nsp_num_rollouts
    inputs = tr._prepare_inputs([tr.train_dataset[0]] * per_doc)
    assert "nsp_sampling_pass" in inputs
    other = tiny_delta_net(seed=1)  # same weights, another object
    other.train()
    with caplog.at_level(logging.WARNING, logger="trl_refine"):
        loss_other = tr.compute_loss(other, dict(inputs))
    assert "could not be used" in caplog.text
    loss = tr.compute_loss(tr.model, inputs)  # the pass itself, on the model that sampled
    assert "nsp_sampling_pass" not in inputs  # popped: its graph does not stay in the buffered batch
    assert loss.item() == pytest.approx(loss_other.item(), rel=1e-6)


@pytest.mark.parametrize("engine_cls", [SnapshotEngine, GenericEngine])
def test_without_hidden_states_the_rollouts_are_the_same_and_the_snapshot_engine_skips_a_call(model, engine_cls):
    docs = batch((150, 97))
    plan = RolloutPlan(torch.tensor([[40, 90], [70, 120]]), 2, 4)
    engine = engine_cls()
    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    outs, counts = [], []
    try:
        for need_hidden in (True, False):
            calls["n"] = 0
            with torch.no_grad():
                outs.append(
                    engine.generate(model, docs, plan, torch.Generator().manual_seed(3), need_hidden=need_hidden)
                )
            counts.append(calls["n"])
    finally:
        hook.remove()
    with_h, without = outs
    assert torch.equal(with_h.completion_ids, without.completion_ids)
    assert torch.equal(with_h.old_logps, without.old_logps)
    assert with_h.hidden_states is not None and without.hidden_states is None
    # the snapshot engine's last decode call only computes the last token's hidden state
    assert counts[0] - counts[1] == (1 if engine_cls is SnapshotEngine else 0)


def test_rewards_get_hidden_states_only_when_some_reward_reads_them(tmp_path, byte_tokenizer):
    seen = []

    def custom(prompts, completions, completion_ids, rollout_hidden_states, ground_truth_hidden_states, **kw):
        seen.append((rollout_hidden_states[0], ground_truth_hidden_states[0]))
        return [0.0] * len(completions)

    ds = Dataset.from_dict({"text": documents(2)})
    runs = {}
    for name, funcs, reward in (("exact", None, "exact"), ("custom", [custom], "exact")):
        tr = NSPGRPOTrainer(
            tiny_delta_net(seed=1),
            reward_funcs=funcs,
            args=small_config(tmp_path / name, max_steps=1, nsp_reward=reward),
            train_dataset=ds,
            processing_class=byte_tokenizer,
        )
        calls = []
        tr.model.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        tr.train()
        runs[name] = len(calls)
    # the custom reward got real hidden states (the README's promise), [k, H] each
    k = small_config(tmp_path).nsp_rollout_length
    assert seen and all(r is not None and r.shape[0] == k and t.shape == r.shape for r, t in seen)
    # the built-in exact reward alone needs none: one decode call fewer per step
    assert runs["custom"] - runs["exact"] == 1


@pytest.mark.parametrize("window, g", [(16, 3), (4, 2)])
def test_lact_shared_window_equals_copied_window_and_generic(window, g):
    """The G branches of a prefix read one copy of its attention window (the default): rollouts, log-probs, hidden
    states and gradients equal those of G copies and of the generic engine (fp32), and the branch call's backward
    keeps (G-1)/G of the copied windows fewer. Window 4 < k: the branches leave the shared window while decoding."""
    from trl_refine.modeling_utils import ensure_fused_lm_head
    from trl_refine.rollout.state import LaCTStateAdapter

    model = tiny_lact(seed=2, window=window)
    ensure_fused_lm_head(model)
    docs = batch((120, 90), seed=6)
    k, n = 5, 3
    engines = {
        "share": SnapshotEngine(),
        "copy": SnapshotEngine(adapter=LaCTStateAdapter(share_prefix_kv=False)),
        "generic": GenericEngine(),
    }
    with torch.no_grad():
        scan = engines["generic"].scan(model, docs)
        pos = select_positions(scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8)
    plan = RolloutPlan(pos, g, k)
    adv = torch.linspace(-1, 1, plan.num_rows)
    results = {}
    for name, engine in engines.items():
        with torch.no_grad():
            out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fwd = engine.forward_train(model, docs, plan, out.completion_ids)
        m = docs.label_mask()
        (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (out, fwd, grad, sum(saved.values()))
    assert engines["share"]._adapter(model).share_prefix_kv
    for other in ("copy", "generic"):
        (o1, f1, g1, _), (o2, f2, g2, _) = results["share"], results[other]
        assert torch.equal(o1.completion_ids, o2.completion_ids)
        assert rel(o1.old_logps, o2.old_logps) < 1e-5
        assert rel(o1.hidden_states, o2.hidden_states) < 1e-5
        assert rel(f1.rollout_logps, f2.rollout_logps) < 1e-5
        assert rel(f1.doc_logps, f2.doc_logps) < 1e-5
        assert rel(g1, g2) < 1e-5
    cfg = model.config
    window_bytes = 2 * cfg.num_hidden_layers * cfg.hidden_size * (window - 1) * 4  # K and V of one row, all layers
    fewer = results["copy"][3] - results["share"][3]
    print(f"saved for backward: {results['copy'][3]} B copied, {results['share'][3]} B shared")
    assert fewer >= 0.9 * (plan.num_rows - plan.num_rows // g) * window_bytes
