"""The one-pass engine is the snapshot engine (and so the generic engine) with one document pass instead of n+1
segments: same seed → same rollouts, log-probs, hidden states, rewards and parameter gradients (reference DeltaNet,
fp32, left-padded variable-length batches, positions on both sides of 64-token chunk boundaries)."""

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net, tiny_llama
from datasets import Dataset
from test_snapshot_engine import batch, rel

from trl_refine import NSPGRPOTrainer
from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rewards import cosine_scores
from trl_refine.rollout import GenericEngine, OnePassEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine
from trl_refine.selection import select_positions


@pytest.fixture(scope="module")
def model():
    m = tiny_delta_net(seed=4)
    ensure_fused_lm_head(m)
    return m


def test_states_at_positions_equal_the_caches_of_the_prefixes(model):
    """forward(state_positions=...) returns, from one pass, each layer's recurrent and conv state after each
    position: what a separate call on the prefix alone leaves in its cache (positions before, at and after the
    64-token chunk boundaries, left padding)."""
    docs = batch((200, 163, 70), seed=1)
    pos = torch.tensor([[20, 63, 64, 199], [40, 100, 127, 128], [131, 140, 193, 199]])
    with torch.no_grad():
        out = model(input_ids=docs.input_ids, attention_mask=docs.attention_mask, state_positions=pos)
        first = docs.first_valid
        for b in range(pos.size(0)):
            for j in range(pos.size(1)):
                ref = model(input_ids=docs.input_ids[b : b + 1, first[b] : pos[b, j] + 1], use_cache=True)
                for layer, want in enumerate(ref.past_key_values):
                    got = out.position_states[layer]
                    assert rel(got["recurrent_state"][b, j], want["recurrent_state"][0]) < 1e-5
                    for got_conv, want_conv in zip(got["conv_state"], want["conv_state"]):
                        assert rel(got_conv[b, j], want_conv[0]) < 1e-5
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(
            input_ids=docs.input_ids[:1],
            cu_seqlens=torch.tensor([0, 100, 200], dtype=torch.int32),
            state_positions=pos[:1],
        )


def _engine_outputs(engine, model, docs, plan, reuse):
    with torch.no_grad():
        out = engine.generate(
            model, docs, plan, torch.Generator().manual_seed(5), train_model=model if reuse else None
        )
    adv = torch.linspace(-1, 1, plan.num_rows)
    model.zero_grad()
    fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
    mask = docs.label_mask()
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
    loss.backward()
    return out, fwd, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("lengths, n, g, reuse", [((200, 97, 170), 4, 2, False), ((150, 90), 6, 3, True)])
def test_onepass_equals_snapshot_and_generic(model, lengths, n, g, reuse):
    docs = batch(lengths, seed=3)
    k = 5
    onepass, snap, generic = OnePassEngine(), SnapshotEngine(), GenericEngine()
    with torch.no_grad():
        scan = onepass.scan(model, docs)
    pos = select_positions(
        scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    pos[:, 1] = pos[:, 0]  # two chunks on the same prefix
    plan = RolloutPlan(pos, g, k)
    out_o, fwd_o, grad_o = _engine_outputs(onepass, model, docs, plan, reuse)
    for engine in (snap, generic):
        out, fwd, grad = _engine_outputs(engine, model, docs, plan, reuse and engine is snap)
        assert torch.equal(out_o.completion_ids, out.completion_ids)
        assert rel(out_o.old_logps, out.old_logps) < 1e-5
        assert rel(out_o.hidden_states, out.hidden_states) < 1e-5
        truth = plan.ground_truth_hidden(scan)
        assert torch.allclose(
            cosine_scores(out_o.hidden_states, truth), cosine_scores(out.hidden_states, truth), atol=1e-5
        )
        assert rel(fwd_o.doc_logps, fwd.doc_logps) < 1e-5
        assert rel(fwd_o.rollout_logps, fwd.rollout_logps) < 1e-5
        assert rel(fwd_o.rollout_entropy, fwd.rollout_entropy) < 1e-5
        assert rel(grad_o, grad) < 1e-5


def test_one_document_call_per_pass_and_the_gradient_goes_through_the_states(model):
    docs = batch((180, 140), seed=2)
    n, g, k = 4, 2, 5
    engine = OnePassEngine()
    with torch.no_grad():
        scan = engine.scan(model, docs)
    pos = select_positions(scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8)
    plan = RolloutPlan(pos, g, k)
    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        with torch.no_grad():
            comp = engine.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
        assert calls["n"] == 1 + k  # the document pass, k-1 decode steps, the last token's hidden state
        calls["n"] = 0
        engine.forward_train(model, docs, plan, comp)
        assert calls["n"] == 2  # the document pass and the branch call
    finally:
        hook.remove()

    adv = torch.linspace(-1, 1, plan.num_rows)

    def grad(detach):
        model.zero_grad()
        original = engine.document_pass
        if detach:  # the rollouts' states cut off from the prefix

            def cut(*a):
                snaps, hidden = original(*a)
                return [[{key: _detach(v) for key, v in layer.items()} for layer in s] for s in snaps], hidden

            engine.document_pass = cut
        try:
            fwd = engine.forward_train(model, docs, plan, comp)
        finally:
            engine.document_pass = original
        (-(adv[:, None] * fwd.rollout_logps[:, 1:]).mean()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert rel(grad(True), grad(False)) > 0.1


def _detach(v):
    if torch.is_tensor(v):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(t.detach() for t in v)
    return v


def test_choosing_the_onepass_engine(caplog):
    assert build_engine("onepass", tiny_delta_net()).name == "onepass"
    assert OnePassEngine.supports(tiny_llama())[1].endswith("is not one of fla's delta_net, gated_deltanet")
    assert build_engine("auto", tiny_delta_net()).name == "snapshot"  # opt-in for now
    with pytest.raises(ValueError, match="cannot run LlamaForCausalLM"):
        build_engine("onepass", tiny_llama())
    with pytest.raises(ValueError, match="nsp_segment_checkpointing=False"):
        build_engine("onepass", tiny_delta_net(), checkpoint_segments=True)


def test_trainer_with_the_onepass_engine_logs_what_the_snapshot_engine_logs(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(4)})
    logs, weights = {}, {}
    for name in ("snapshot", "onepass"):
        args = small_config(tmp_path / name, max_steps=2, nsp_engine=name, documents_per_device=2, seed=3)
        tr = NSPGRPOTrainer(tiny_delta_net(seed=1), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        assert tr.engine.name == name
        before = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
        tr.train()
        weights[name] = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        assert rel(weights[name], before) > 0  # it trained
        logs[name] = [
            v for h in tr.state.log_history if "loss" in h for v in (h["loss"], h["reward"], h["nsp/exact_match"])
        ]
    assert logs["onepass"] == pytest.approx(logs["snapshot"], rel=1e-4, abs=1e-6)
    assert rel(weights["onepass"], weights["snapshot"]) < 1e-5


def _interpret(script: str) -> dict:
    """Run ``tests/interpret_scripts/<script>`` (fla's kernels under the Triton interpreter) in a subprocess."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("fla")
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / "interpret_scripts" / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fla_gated_delta_net_readout_equals_the_snapshot_engine():
    """fla's GatedDeltaNet through the one-pass engine (readout tokens with a zero log-gate, V-first state) against
    the snapshot engine on the same model, fp32 fused_recurrent under the Triton interpreter, forward only (fla's
    fused_recurrent gated kernel has no backward)."""
    res = _interpret("fla_onepass_gated.py")
    assert res.pop("readout_layer_calls") == 6  # 2 layers x 3 document passes
    assert res.pop("rollout_ids_equal") is True
    for key, value in res.items():
        assert value < 1e-5, (key, value)


@pytest.mark.slow
def test_fla_delta_net_readout_equals_the_reference_snapshot_engine():
    """fla's DeltaNet through the one-pass engine (readout tokens in fla's own kernels, run by the Triton interpreter
    on CPU, fp32) against the snapshot engine on the reference DeltaNet with the same weights: states at the
    positions, rollouts, log-probs, hidden states and (without short convs, whose backward from a cache the
    interpreter cannot run) parameter gradients."""
    res = _interpret("fla_onepass.py")
    for key, value in res.items():
        if key.endswith("_equal"):
            assert value is True, key
        else:
            assert value < 1e-5, (key, value)
    assert "noconv_grad_rel" in res and "conv_conv_state_rel" in res
