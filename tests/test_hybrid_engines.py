"""transformers' hybrid models (linear-recurrent + attention layers) on the snapshot engine: the same rollouts,
log-probs, hidden states and gradients as the generic engine (CPU, fp32, left-padded variable-length batches)."""

import pytest
import torch
from _engine_harness import (
    assert_checkpointed_and_reused_pass_match,
    assert_gradient_flows_through_snapshots,
    assert_snapshot_equals_generic,
    batch,
    rel,
    tiny_transformers_model,
)

from trl_refine._compat import attn_implementation
from trl_refine.models.tiny_configs import TRANSFORMERS_HYBRIDS, tiny_config
from trl_refine.rollout import GenericEngine, RolloutPlan, SnapshotEngine
from trl_refine.rollout.adapters.transformers_hybrid import SHARED_PREFIX_MODEL_TYPES, TransformersHybridStateAdapter
from trl_refine.rollout.registry import build_engine

VOCAB = 96


def tiny_hybrid(model_type: str, seed: int = 0):
    return tiny_transformers_model(model_type, VOCAB, seed=seed)


@pytest.mark.parametrize("model_type", TRANSFORMERS_HYBRIDS)
def test_hybrid_snapshot_equals_generic(model_type):
    assert_snapshot_equals_generic(tiny_hybrid(model_type), VOCAB)


@pytest.mark.parametrize("model_type", SHARED_PREFIX_MODEL_TYPES)
def test_hybrid_shared_prefix_kv_equals_copied_and_generic(model_type, monkeypatch):
    """The G branches of a prefix read one copy of its attention K/V (the default): rollouts, log-probs, hidden states
    and gradients equal those of G copies and of the generic engine (fp32, left padding, GQA), the branch calls go
    through the shared-prefix attention, and the model's attention implementation is its own again afterwards."""
    from transformers import AttentionInterface

    from trl_refine.rollout.adapters import shared_prefix_attention as spa

    model = tiny_hybrid(model_type, seed=3)
    original = attn_implementation(model)
    docs = batch((40, 27), vocab=VOCAB, seed=2)
    plan = RolloutPlan(torch.tensor([[9, 21, 30], [16, 20, 33]]), 3, 4)
    calls = []
    inner = spa.shared_prefix_attention

    def counted(module, query, key, *args, **kwargs):
        prefix_keys, prefix_values = getattr(key, spa._PREFIX_ATTR)
        calls.append((key.shape[0], prefix_keys.shape[0], prefix_values.shape[0]))
        return inner(module, query, key, *args, **kwargs)

    spa.register()
    monkeypatch.setitem(AttentionInterface._global_mapping, spa.ATTENTION_NAME, counted)
    engines = {
        "share": SnapshotEngine(),
        "copy": SnapshotEngine(adapter=TransformersHybridStateAdapter(model.config, share_prefix_kv=False)),
        "generic": GenericEngine(),
    }
    adv = torch.linspace(-1, 1, plan.num_rows)
    results = {}
    for name, engine in engines.items():
        with torch.no_grad():
            out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
        model.zero_grad()
        fwd = engine.forward_train(model, docs, plan, out.completion_ids)
        mask = docs.label_mask()
        (-(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (out, fwd, grad)
        assert attn_implementation(model) == original
        if name == "share":  # k decode calls (the last reads hidden states) + one branch call, every attention layer
            attention_layers = sum(1 for t in model.config.layer_types if t in ("full_attention", "attention"))
            attention_layers = attention_layers or model.config.num_hidden_layers  # falcon_h1: every layer
            prefixes = plan.num_rows // plan.num_rollouts  # the prefix K/V reach the attention once per prefix
            expected = [(plan.num_rows, prefixes, prefixes)] * (plan.rollout_length + 1) * attention_layers
            assert calls == expected
    assert calls == expected  # the copied path and the generic engine do not use it
    assert engines["share"]._adapter(model).share_prefix_kv
    assert not engines["copy"].adapter.share_prefix_kv
    assert results["share"][2].abs().sum() > 0
    for other in ("copy", "generic"):
        (o1, f1, g1), (o2, f2, g2) = results["share"], results[other]
        assert torch.equal(o1.completion_ids, o2.completion_ids)
        assert rel(o1.old_logps, o2.old_logps) < 1e-5
        assert rel(o1.hidden_states, o2.hidden_states) < 1e-5
        assert rel(f1.rollout_logps, f2.rollout_logps) < 1e-5
        assert rel(f1.doc_logps, f2.doc_logps) < 1e-5
        assert rel(g1, g2) < 1e-5


def test_hybrid_shared_prefix_state_and_attention_switch():
    """The branch state holds one K/V copy per prefix; a cache built from it refuses to run outside the shared-prefix
    attention; the switch restores the model's implementation even when the call fails."""
    from trl_refine.rollout.adapters.shared_prefix_attention import ATTENTION_NAME, shared_prefix_attention_for
    from trl_refine.rollout.adapters.transformers_hybrid import shared_prefix_layout

    model = tiny_hybrid("lfm2")
    adapter = TransformersHybridStateAdapter(model.config)
    docs = batch((30, 24), vocab=VOCAB)
    plan = RolloutPlan(torch.tensor([[10, 20], [12, 22]]), 4, 3)
    engine = SnapshotEngine(adapter=adapter)
    with torch.no_grad():
        snapshots, _ = engine.document_pass(model, docs, plan)
        rows = engine._branch_rows(snapshots, plan)
    assert shared_prefix_layout(rows) == (4, 0)
    attn = next(e for e in rows if "keys" in e)
    assert attn["keys"].shape[0] == 4 and attn["keys_branch"].shape[0] == plan.num_rows
    assert next(e for e in rows if "conv" in e)["conv"][0].shape[0] == plan.num_rows
    with pytest.raises(ValueError, match="shares its prefix K/V"):
        adapter.concat([rows])
    ids = torch.zeros(plan.num_rows, 1, dtype=torch.long)
    extra = adapter.continuation_kwargs(rows, 0, 1, ids.device)
    assert extra["attention_mask"].shape == (plan.num_rows, attn["keys"].shape[2] + 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match=ATTENTION_NAME):
        model(input_ids=ids, past_key_values=adapter.build_cache(rows), use_cache=True, **extra)
    original = attn_implementation(model)
    with pytest.raises(KeyError), shared_prefix_attention_for(model):
        assert attn_implementation(model) == ATTENTION_NAME
        raise KeyError("inside")
    assert attn_implementation(model) == original != ATTENTION_NAME
    with torch.no_grad(), shared_prefix_attention_for(model):
        out = model(input_ids=ids, past_key_values=adapter.build_cache(rows), use_cache=True, **extra)
    assert torch.isfinite(out.logits).all()


def _attention_cache_bytes(state) -> int:
    """Bytes of the distinct storages behind a state's attention cache (keys / values / valid, prefix and own)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for entry in state
        for k in ("keys", "values", "valid", "keys_branch", "values_branch")
        if k in entry and (t := entry[k]).numel()
    }
    return sum(storages.values())


def test_kimi_linear_mla_latents_are_kept_once_per_prefix():
    """kimi_linear's branch state keeps the MLA latents (kv_nope, k_rot) of a prefix once: the attention cache's
    memory does not grow with G (the copying path's does, G-fold); decode and the loss's branch call expand the
    prefix latents for one row per prefix, and the layers' own expansion is back after the branch calls."""
    from trl_refine._compat import mla_expand_kv_wrapped
    from trl_refine.rollout.adapters import shared_prefix_attention as spa

    model = tiny_hybrid("kimi_linear", seed=1)
    mla = [m for m in model.modules() if type(m).__name__ == "KimiLinearAttention"]
    assert mla and all("expand_kv" not in vars(m) for m in mla)
    docs = batch((40, 27), vocab=VOCAB, seed=3)
    positions = torch.tensor([[9, 21, 30], [16, 20, 24]])
    cfg = model.config
    memory = {}
    for share in (True, False):
        engine = SnapshotEngine(adapter=TransformersHybridStateAdapter(cfg, share_prefix_kv=share))
        for group in (1, 8):
            plan = RolloutPlan(positions, group, 3)
            with torch.no_grad():
                snapshots, _ = engine.document_pass(model, docs, plan)
                rows = engine._branch_rows(snapshots, plan)
            memory[share, group] = _attention_cache_bytes(rows)
            attn = next(e for e in rows if "keys" in e)
            assert attn["keys"].shape[-1] == cfg.kv_lora_rank and attn["values"].shape[-1] == cfg.qk_rope_head_dim
            assert attn["keys"].shape[0] == (6 if share or group == 1 else 6 * group)
    assert memory[True, 8] == memory[True, 1] == memory[False, 1] > 0
    assert memory[False, 8] == 8 * memory[False, 1]

    expanded = []
    expand = spa.expanding_prefix

    def recording(inner):
        def run(a, b):
            keys, values = expand(inner)(a, b)
            expanded.append((keys.shape[0], getattr(keys, spa._PREFIX_ATTR)[0].shape[0]))
            return keys, values

        return run

    plan = RolloutPlan(positions, 4, 3)
    engine = SnapshotEngine()
    adapter = engine._adapter(model)
    with torch.no_grad():
        rows = engine._branch_rows(engine.document_pass(model, docs, plan)[0], plan)
        ids = torch.zeros(plan.num_rows, 2, dtype=torch.long)
        extra = adapter.continuation_kwargs(rows, 0, 2, ids.device)
        with spa.shared_prefix_attention_for(model), mla_expand_kv_wrapped(model, recording):
            model(input_ids=ids, past_key_values=adapter.build_cache(rows), use_cache=True, **extra)
    assert expanded == [(plan.num_rows, 6)] * len(mla)
    assert all("expand_kv" not in vars(m) for m in mla)
    # the layers' own expansion again: the attention gets untagged keys
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="shared-prefix cache"),
        spa.shared_prefix_attention_for(model),
    ):
        model(input_ids=ids, past_key_values=adapter.build_cache(rows), use_cache=True, **extra)


@pytest.mark.parametrize("model_type", TRANSFORMERS_HYBRIDS)
def test_auto_picks_snapshot_for_hybrids(model_type, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", tiny_hybrid(model_type)).name == "snapshot"
    assert "rollout engine = snapshot" in caplog.text


def test_hybrid_gradient_flows_through_snapshots():
    """Detaching the branch states (conv, recurrent and attention K/V) changes the rollout gradient a lot."""
    docs = batch((40, 33), vocab=VOCAB, seed=4)
    plan = RolloutPlan(torch.tensor([[12, 25], [15, 27]]), 2, 4)
    assert_gradient_flows_through_snapshots(tiny_hybrid("qwen3_next", seed=2), docs, plan)


def test_mamba_hybrid_refuses_one_token_calls_with_gradients():
    """transformers' Mamba-2 single-token step writes its state in place: a one-token branch call (k = 2) with
    gradients fails early with the fix, instead of an autograd error in the backward."""
    model = tiny_hybrid("bamba")
    docs = batch((30,), vocab=VOCAB)
    plan = RolloutPlan(torch.tensor([[10, 20]]), 1, 2)
    snap = SnapshotEngine()
    with torch.no_grad():
        comp = snap.generate(model, docs, plan, torch.Generator().manual_seed(0)).completion_ids
    with pytest.raises(ValueError, match="rollout length of at least 3"):
        snap.forward_train(model, docs, plan, comp)


def test_unsupported_families_fall_back_with_the_reason(caplog, monkeypatch):
    import logging

    import trl_refine.rollout.state as state

    pytest.importorskip("fla")
    from transformers import AutoModelForCausalLM

    for family in ("mamba2", "mamba"):  # compared under the Triton interpreter (tests/test_fla_families_interpret.py)
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=VOCAB, hidden_size=32))
        assert type(model).__module__.startswith("fla.")
        assert build_engine("auto", model).name == "snapshot"
    grouped = tiny_config("mamba2", vocab_size=VOCAB, hidden_size=32)
    grouped.n_groups = 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", AutoModelForCausalLM.from_config(grouped)).name == "generic"
    assert "n_groups > 1" in caplog.text

    kda = AutoModelForCausalLM.from_config(tiny_config("kda", vocab_size=VOCAB, hidden_size=32))
    assert build_engine("auto", kda).name == "snapshot"  # gradients compared (tests/test_fla_families_interpret.py)
    monkeypatch.setattr(state, "UNVERIFIED_MODEL_TYPES", ("kda",))  # a family whose gradients were not compared
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert build_engine("auto", kda).name == "generic"
        assert "gradients have not been compared" in caplog.text
        caplog.clear()
        assert build_engine("snapshot", kda).name == "snapshot"
    assert any(r.levelname == "WARNING" and "not been compared" in r.message for r in caplog.records)
    gla = AutoModelForCausalLM.from_config(tiny_config("gla", vocab_size=VOCAB, hidden_size=32))
    assert build_engine("auto", gla).name == "snapshot"


@pytest.mark.parametrize("model_type", ["lfm2", "qwen3_next"])
def test_recipe_tiny_model_of_a_hybrid_gets_the_snapshot_engine(model_type):
    from trl_refine.recipe_utils import ModelArguments, build_model_and_tokenizer

    args = ModelArguments(tiny_model_type=model_type, tiny_hidden_size=32, tiny_layers=2, tiny_heads=2)
    model, tokenizer = build_model_and_tokenizer(args)
    assert model.config.model_type == model_type and model.config.vocab_size == len(tokenizer)
    assert build_engine("auto", model).name == "snapshot"
    ids = torch.tensor([tokenizer.encode("a tiny model")])
    assert torch.isfinite(model(input_ids=ids).logits).all()  # runs on this machine (CPU kernels when no CUDA)


def test_hybrid_checkpointed_segments_and_reused_sampling_pass_give_the_same_gradients():
    docs = batch((40, 27), vocab=VOCAB, seed=1)
    plan = RolloutPlan(torch.tensor([[9, 9, 21, 30], [16, 20, 24, 33]]), 2, 3)
    assert_checkpointed_and_reused_pass_match(tiny_hybrid("lfm2"), docs, plan)


def test_trainer_steps_agree_between_engines_on_a_hybrid(tmp_path, byte_tokenizer):
    """Two NSPGRPOTrainer steps on lfm2 (short convolutions + attention): the same losses, rewards and exact-match
    rates with either engine, and the weights move."""
    from conftest import documents, small_config
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_refine import NSPGRPOTrainer

    ds = Dataset.from_dict({"text": documents(4)})
    logs = {}
    for name in ("generic", "snapshot"):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(tiny_config("lfm2", vocab_size=len(byte_tokenizer), hidden_size=32))
        before = [p.detach().clone() for p in model.parameters()]
        args = small_config(tmp_path / name, max_steps=2, nsp_engine=name, documents_per_device=2, seed=3)
        trainer = NSPGRPOTrainer(model, args=args, train_dataset=ds, processing_class=byte_tokenizer)
        assert trainer.engine.name == name
        trainer.train()
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
        logs[name] = [
            v for h in trainer.state.log_history if "loss" in h for v in (h["loss"], h["reward"], h["nsp/exact_match"])
        ]
    assert logs["generic"] == pytest.approx(logs["snapshot"], rel=1e-4, abs=1e-6)
