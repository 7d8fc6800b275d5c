"""The one-pass engine is the snapshot engine (and so the generic engine) with one document pass instead of n+1
segments: same seed → same rollouts, log-probs, hidden states, rewards and parameter gradients (reference DeltaNet
and LaCT, fp32, left-padded variable-length batches, positions on both sides of chunk boundaries)."""

import logging
import os

import pytest
import torch
from _engine_harness import batch, rel
from conftest import documents, small_config, tiny_delta_net, tiny_llama
from datasets import Dataset
from test_snapshot_engine import tiny_lact

from trl_refine import NSPGRPOTrainer
from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rewards import cosine_scores
from trl_refine.rollout import GenericEngine, OnePassEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.registry import build_engine
from trl_refine.rollout.state import LaCTStateAdapter
from trl_refine.selection import select_positions


@pytest.fixture(scope="module")
def model():
    m = tiny_delta_net(seed=4)
    ensure_fused_lm_head(m)
    return m


def strong_lact(seed=2, window=16):
    """`tiny_lact` (chunks of 16) with learning rates ~1 instead of ~1e-3 and spread momentum gates, so that the
    fast-weight updates (and a wrong chunk boundary) change the outputs."""
    m = tiny_lact(seed=seed, window=window)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lr_proj.bias"):
                p.uniform_(1.0, 2.0)
            elif name.endswith("momentum_proj.0.bias"):
                p.normal_(0.0, 1.0)
    ensure_fused_lm_head(m)
    return m


@pytest.fixture(scope="module")
def lact():
    return strong_lact()


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


@pytest.mark.parametrize("variant", ["default", "lowrank_prenorm", "nope_plain", "window_ne_chunk", "muon"])
def test_lact_states_at_positions_equal_the_caches_of_the_prefixes(variant):
    """LaCT's forward(state_positions=...): from one pass, each layer's state after each position (fast weights of
    the position's chunk, the chunk's update sums so far, momentum, the attention window, the position) equals what
    a call on the prefix alone leaves in its cache: positions in the first chunk, at a chunk's end (the full chunk
    pending) and just after it, at the first token, left padding, every config variant of tests/test_models_lact.py
    (chunks of 4, or 5 with a window of 3)."""
    from test_models_lact import VARIANTS, _model

    model = _model(**VARIANTS[variant])
    tol = 1e-4 if variant == "muon" else 1e-5  # fp32 Newton-Schulz amplifies summation-order rounding (~2e-5)
    docs = batch((23, 17, 9), vocab=model.config.vocab_size, seed=1)
    pos = torch.tensor([[0, 3, 4, 5, 22], [6, 9, 10, 14, 22], [14, 15, 18, 19, 22]])
    worst = 0.0
    with torch.no_grad():
        out = model(input_ids=docs.input_ids, attention_mask=docs.attention_mask, state_positions=pos)
        first = docs.first_valid
        for b in range(pos.size(0)):
            for j in range(pos.size(1)):
                ref = model(input_ids=docs.input_ids[b : b + 1, first[b] : pos[b, j] + 1], use_cache=True)
                for layer, want in enumerate(ref.past_key_values.states):
                    got = out.position_states[layer]
                    assert got.keys() == want.keys()
                    assert got["pos"][b, j] == want["pos"][0] == pos[b, j] - first[b] + 1
                    for key in want.keys() - {"pos"}:
                        g, w = got[key][b, j], want[key][0]
                        assert g.shape == w.shape and g.dtype == w.dtype, key
                        err = rel(g, w) if w.norm() > 0 else g.abs().max().item()
                        assert err < tol, (b, j, layer, key, err)
                        worst = max(worst, err)
        # the states moved: past the first chunk the fast weights are not the initial ones
        w0 = out.position_states[0]["fw_w0"]
        assert rel(w0[0, 4], w0[0, 0]) > 1e-2
    print(f"LaCT {variant}: worst state rel err {worst:.2e}")
    with pytest.raises(ValueError, match="no past_key_values"):
        model(input_ids=docs.input_ids[:1, :5], past_key_values=ref.past_key_values, state_positions=pos[:1, :1])
    with pytest.raises(ValueError, match="must lie in"):
        model(input_ids=docs.input_ids, state_positions=pos + 1)


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
    _assert_engines_agree(model, docs, RolloutPlan(pos, g, k), scan, reuse, onepass, snap, generic)


def _assert_engines_agree(model, docs, plan, scan, reuse, onepass, snap, generic) -> float:
    """The one-pass engine against the snapshot and generic engines; returns the largest relative error."""
    out_o, fwd_o, grad_o = _engine_outputs(onepass, model, docs, plan, reuse)
    truth = plan.ground_truth_hidden(scan)
    worst = 0.0
    for engine in (snap, generic):
        out, fwd, grad = _engine_outputs(engine, model, docs, plan, reuse and engine is snap)
        assert torch.equal(out_o.completion_ids, out.completion_ids)
        assert torch.allclose(
            cosine_scores(out_o.hidden_states, truth), cosine_scores(out.hidden_states, truth), atol=1e-5
        )
        errors = {
            "old_logps": rel(out_o.old_logps, out.old_logps),
            "hidden_states": rel(out_o.hidden_states, out.hidden_states),
            "doc_logps": rel(fwd_o.doc_logps, fwd.doc_logps),
            "rollout_logps": rel(fwd_o.rollout_logps, fwd.rollout_logps),
            "rollout_entropy": rel(fwd_o.rollout_entropy, fwd.rollout_entropy),
            "grad": rel(grad_o, grad),
        }
        for key, err in errors.items():
            assert err < 1e-5, (type(engine).__name__, key, err)
        worst = max(worst, *errors.values())
    return worst


@pytest.mark.parametrize(
    "lengths, n, g, reuse, window, share",
    [
        ((120, 47, 90), 4, 2, False, 16, True),  # hand-placed positions at / next to the 16-token chunk boundaries
        ((100, 70), 5, 3, True, 16, True),
        ((120, 47, 90), 4, 2, True, 4, True),  # window 4 < k: the branches leave the shared window while decoding
        ((100, 70), 5, 3, False, 16, False),  # a window copied per branch
    ],
)
def test_onepass_equals_snapshot_and_generic_on_lact(lengths, n, g, reuse, window, share):
    """LaCT through the one-pass engine (states from forward(state_positions=...)) against the snapshot engine
    (n+1 left-padded segment calls) and the generic engine, with the G branches of a prefix reading one shared copy
    of its attention window (or copies)."""
    model = strong_lact(window=window)
    docs = batch(lengths, seed=3)
    k = 5
    engines = [
        OnePassEngine(adapter=LaCTStateAdapter(share_prefix_kv=share)),
        SnapshotEngine(adapter=LaCTStateAdapter(share_prefix_kv=share)),
        GenericEngine(),
    ]
    with torch.no_grad():
        scan = engines[0].scan(model, docs)
    if len(lengths) == 3:  # first valid tokens 0, 73, 30: counts 16 (a full chunk pending), 17, 32, 33, ...
        pos = torch.tensor([[15, 15, 16, 109], [88, 88, 89, 111], [61, 61, 62, 111]])
    else:
        pos = select_positions(
            scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        pos[:, 1] = pos[:, 0]  # two chunks on the same prefix
    worst = _assert_engines_agree(model, docs, RolloutPlan(pos, g, k), scan, reuse, *engines)
    print(f"LaCT engines {lengths} G={g} window={window} share={share}: worst rel err {worst:.2e}")


@pytest.mark.parametrize("family", ["delta_net", "lact"])
def test_one_document_call_per_pass_and_the_gradient_goes_through_the_states(model, lact, family):
    if family == "lact":
        model = lact
    docs = batch((180, 140), seed=2)
    n, g, k = 4, 2, 5
    engine = OnePassEngine()
    with torch.no_grad():
        scan = engine.scan(model, docs)
    pos = select_positions(
        scan.entropy, docs.attention_mask, num_chunks=n, rollout_length=k, margin=8,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
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

    def grad(detach=lambda key: False):
        """The rollout gradient with the states' entries ``detach(key)`` cut off from the prefix."""
        model.zero_grad()
        original = engine.document_pass

        def cut(*a):
            snaps, hidden = original(*a)
            cut_off = [[{key: _detach(v) if detach(key) else v for key, v in ly.items()} for ly in s] for s in snaps]
            return cut_off, hidden

        engine.document_pass = cut
        try:
            fwd = engine.forward_train(model, docs, plan, comp)
        finally:
            engine.document_pass = original
        (-(adv[:, None] * fwd.rollout_logps[:, 1:]).mean()).backward()
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in model.parameters()])

    full = grad()
    if family == "delta_net":
        assert rel(grad(lambda key: True), full) > 0.1
    else:  # a smaller but clear share for LaCT (5.8 %, 0.4 % through the fast weights alone)
        cuts = {part: rel(grad(lambda key, part=part: key.startswith(part)), full) for part in ("", "fw_", "attn_")}
        print(f"LaCT rollout gradient change when detaching the states (all, fast weights, window): {cuts}")
        assert cuts[""] > 0.02
        assert cuts["fw_"] > 1e-3  # through the fast weights, momentum and chunk sums
        assert cuts["attn_"] > 1e-3  # through the attention window


def _detach(v):
    if torch.is_tensor(v):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(t.detach() for t in v)
    return v


def test_forcing_the_onepass_engine():
    assert build_engine("onepass", tiny_delta_net()).name == "onepass"
    assert build_engine("onepass", tiny_lact()).name == "onepass"  # supports_state_positions
    assert OnePassEngine.supports(tiny_llama())[1].endswith("is not one of fla's delta_net, gated_deltanet")
    with pytest.raises(ValueError, match="cannot run LlamaForCausalLM"):
        build_engine("onepass", tiny_llama())
    with pytest.raises(ValueError, match="nsp_segment_checkpointing=False"):
        build_engine("onepass", tiny_delta_net(), checkpoint_segments=True)


def _auto(model, caplog, **kw):
    """`build_engine("auto", ...)` and the one log line it wrote."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        engine = build_engine("auto", model, **kw)
    (line,) = [r.getMessage() for r in caplog.records if "rollout engine =" in r.getMessage()]
    return engine, line


def test_auto_picks_the_onepass_engine_and_says_why(caplog):
    engine, line = _auto(tiny_delta_net(), caplog)
    assert type(engine) is OnePassEngine
    assert line.startswith(
        "trl_refine: rollout engine = onepass (auto: RefDeltaNetForCausalLM returns its states at the positions from "
        "one forward (supports_state_positions): 1 document pass per step instead of n+1 segment calls"
    )


@pytest.mark.parametrize("kind, name", [("delta_net", "DeltaNet"), ("gated_deltanet", "GatedDeltaNet")])
def test_auto_picks_the_onepass_engine_for_fla_models(kind, name, caplog):
    pytest.importorskip("fla")
    from conftest import tiny_fla_config
    from transformers import AutoModelForCausalLM

    engine, line = _auto(AutoModelForCausalLM.from_config(tiny_fla_config(kind)), caplog)
    assert type(engine) is OnePassEngine
    assert f"onepass (auto: {name}ForCausalLM's states at the positions come from one forward of fla's kernels" in line


def test_auto_picks_the_onepass_engine_for_lact(caplog):
    engine, line = _auto(tiny_lact(), caplog)
    assert type(engine) is OnePassEngine
    assert "onepass (auto: LaCTForCausalLM returns its states at the positions from one forward" in line


def test_auto_falls_back_to_snapshot_then_generic_with_the_reason(caplog):
    from transformers import AutoModelForCausalLM

    from trl_refine.models.tiny_configs import tiny_config

    # model-dependent: lfm2 (a transformers hybrid) has a state adapter but no states-at-positions forward
    engine, line = _auto(AutoModelForCausalLM.from_config(tiny_config("lfm2", vocab_size=64, hidden_size=32)), caplog)
    assert type(engine) is SnapshotEngine
    assert line.startswith("trl_refine: rollout engine = snapshot (auto: Lfm2ForCausalLM supports it; not onepass: ")
    assert "model_type 'lfm2' is not one of fla's delta_net, gated_deltanet" in line
    # option-dependent: segment checkpointing needs the snapshot engine's segments
    engine, line = _auto(tiny_delta_net(), caplog, checkpoint_segments=True)
    assert type(engine) is SnapshotEngine and engine.checkpoint_segments
    assert (
        "snapshot (auto: RefDeltaNetForCausalLM supports it; not onepass: the one-pass engine has no segments" in line
    )
    # neither: the generic engine, with both reasons
    engine, line = _auto(tiny_llama(), caplog)
    assert type(engine) is GenericEngine
    assert "generic (auto: onepass: LlamaForCausalLM does not return its states" in line
    assert "; snapshot: model_type 'llama' has no state adapter" in line


def test_trainer_passes_segment_checkpointing_to_the_auto_choice(tmp_path, byte_tokenizer):
    ds = Dataset.from_dict({"text": documents(2)})
    for ckpt, name in ((False, "onepass"), (True, "snapshot")):
        args = small_config(tmp_path / name, nsp_segment_checkpointing=ckpt)
        tr = NSPGRPOTrainer(tiny_delta_net(), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        assert tr.engine.name == name


@pytest.mark.parametrize("family", ["delta_net", "lact"])
def test_trainer_with_the_onepass_engine_logs_what_the_snapshot_engine_logs(tmp_path, byte_tokenizer, family):
    """Forced and `auto` (which picks the one-pass engine) against the forced snapshot engine: two steps, same
    losses, rewards and weights."""
    make = {"delta_net": tiny_delta_net, "lact": lambda seed: tiny_lact(seed=seed)}[family]
    ds = Dataset.from_dict({"text": documents(4)})
    logs, weights = {}, {}
    for name, expected in (("snapshot", "snapshot"), ("onepass", "onepass"), ("auto", "onepass")):
        args = small_config(tmp_path / name, max_steps=2, nsp_engine=name, documents_per_device=2, seed=3)
        tr = NSPGRPOTrainer(make(seed=1), args=args, train_dataset=ds, processing_class=byte_tokenizer)
        assert tr.engine.name == expected
        before = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
        tr.train()
        weights[name] = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        assert rel(weights[name], before) > 0  # it trained
        logs[name] = [
            v for h in tr.state.log_history if "loss" in h for v in (h["loss"], h["reward"], h["nsp/exact_match"])
        ]
    for name in ("onepass", "auto"):
        assert logs[name] == pytest.approx(logs["snapshot"], rel=1e-4, abs=1e-6)
        assert rel(weights[name], weights["snapshot"]) < 1e-5


def _interpret(script: str, *args: str) -> dict:
    """Run ``tests/interpret_scripts/<script> [args]`` (fla's kernels under the Triton interpreter) in a
    subprocess."""
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
        [sys.executable, str(root / "tests" / "interpret_scripts" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRL_REFINE_INTERPRET_ALL") != "1",
    reason="recorded run (docs/engines.md; 309 s of a full-suite run): tests/test_fla_gated_patch.py's one-pass test covers the "
    "GatedDeltaNet readout forward, this file's fla DeltaNet readout test its conv states; set "
    "TRL_REFINE_INTERPRET_ALL=1 to rerun it",
)
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


def test_the_states_option_names_its_providers_and_the_boundary_provider_serves_fla_models_only():
    pytest.importorskip("fla")
    from conftest import tiny_fla_config
    from fla.models import GatedDeltaNetForCausalLM

    from trl_refine.rollout.fla_boundary import fla_boundary_support, record_boundary_position_states

    with pytest.raises(ValueError, match="use one of readout, boundary"):
        OnePassEngine(states="chunks")
    gated = GatedDeltaNetForCausalLM(tiny_fla_config("gated_deltanet", num_hidden_layers=1))
    assert fla_boundary_support(gated) == (True, "")  # the gated boundary kernel serves it
    assert OnePassEngine(states="boundary").fused_scan_problem(gated) == ""
    assert "boundary-state provider" in OnePassEngine(states="readout").fused_scan_problem(gated)
    ok, why = fla_boundary_support(tiny_delta_net())  # not fla's: it computes its own states
    assert not ok and "not one of fla's" in why
    mask = torch.ones(1, 8, dtype=torch.long)
    refused = pytest.raises(ValueError, match="boundary-state provider cannot run RefDeltaNetForCausalLM")
    with refused, record_boundary_position_states(tiny_delta_net(), mask, torch.tensor([[3]])):
        pass


def _check_boundary(res: dict, others: tuple[str, ...]) -> None:
    assert {k.split("_vs_")[1].split("_")[0] for k in res if "_vs_" in k} == set(others)
    for key, value in res.items():
        if key.endswith("_equal"):
            assert value is True, key
        elif "_vs_" in key:
            assert value < 1e-5, (key, value)


def test_fla_delta_net_boundary_states_equal_the_reference_snapshot_engine():
    """fla's DeltaNet (one layer) through the one-pass engine with ``states="boundary"`` (the boundary-state kernel
    and `states_after`, run by the Triton interpreter on CPU, fp32, the reused sampling pass), without short
    convolutions, against the snapshot engine on the reference DeltaNet with the same weights: states at positions
    on and next to a chunk boundary, rollout ids, old log-probs, hidden states, document and rollout log-probs and
    parameter gradients within 1e-5 relative."""
    res = _interpret("fla_onepass_boundary.py")
    assert res.pop("boundary_layer_calls") == 1  # 1 layer x 1 document pass (the reused one): the provider ran
    assert "noconv_vs_snapshot_grad_rel" in res
    _check_boundary(res, ("snapshot",))


def test_fla_gated_delta_net_boundary_states_equal_the_snapshot_engine():
    """fla's GatedDeltaNet (one layer, grouped value heads HV = 2H, no short convolutions) through the one-pass
    engine with ``states="boundary"`` (our gated boundary kernel, V-first states, run by the Triton interpreter on
    CPU, fp32, the reused sampling pass) against the snapshot engine on a copy of the model whose chunk op is fla's
    pure-PyTorch gated recurrence (fla's gated chunk kernels do not run in the interpreter): states at positions on
    and next to a chunk boundary, rollout ids, old log-probs, hidden states, document and rollout log-probs and
    parameter gradients within 1e-5 relative."""
    res = _interpret("fla_onepass_boundary.py", "--gated")
    assert res.pop("boundary_layer_calls") == 1  # 1 layer x 1 document pass (the reused one): the provider ran
    assert "noconv_vs_snapshot_grad_rel" in res and "noconv_vs_snapshot_recurrent_state_rel" in res
    _check_boundary(res, ("snapshot",))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRL_REFINE_INTERPRET_ALL") != "1",
    reason="recorded run (docs/engines.md): the fast gated boundary test covers the provider; set "
    "TRL_REFINE_INTERPRET_ALL=1 to rerun it",
)
def test_fla_gated_delta_net_boundary_states_with_short_convs_equal_the_snapshot_engine():
    """As the gated test above with two layers, also with short convolutions (forward only: fla's conv backward from
    a cache does not run in the interpreter): conv states and recurrent states of both layers."""
    res = _interpret("fla_onepass_boundary.py", "--gated", "--full")
    assert res.pop("boundary_layer_calls") == 4  # 2 layers x 1 document pass, with and without short convs
    assert "conv_vs_snapshot_conv_state_rel" in res and "noconv_vs_snapshot_grad_rel" in res
    _check_boundary(res, ("snapshot",))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRL_REFINE_INTERPRET_ALL") != "1",
    reason="recorded run (docs/engines.md; 157 s of CI): the fast boundary test covers the provider; set "
    "TRL_REFINE_INTERPRET_ALL=1 to rerun it",
)
def test_fla_delta_net_boundary_states_equal_the_readout_provider_and_the_snapshot_engine():
    """As above with two layers, also with short convolutions (forward only: fla's conv backward from a cache does
    not run in the interpreter) and against the readout provider on the same fla model (minutes under the
    interpreter)."""
    res = _interpret("fla_onepass_boundary.py", "--full")
    assert res.pop("boundary_layer_calls") == 4  # 2 layers x 1 document pass, with and without short convs
    assert "conv_vs_readout_conv_state_rel" in res and "noconv_vs_readout_grad_rel" in res
    _check_boundary(res, ("snapshot", "readout"))
