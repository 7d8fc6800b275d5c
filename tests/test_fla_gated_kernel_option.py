"""``fla_gated_kernel``: the config field (validation, its reach into test time, the recipes and the README), the
trainer's and test-time ReFINE's wiring of the swap (the op name fla's GatedDeltaNet layers call is ours during the
rollouts, the loss forward, the backward and evaluation, and fla's again afterwards; nothing swapped with ``fla``), the
refusal of ``trl_refine`` for a model without such layers at construction, and ``auto``'s rule. The wiring tests run
a tiny Llama that also holds an (unused) fla GatedDeltaNet layer, so they take seconds without the Triton
interpreter; the opt-in interpreter test trains a real one-layer GatedDeltaNet through our kernel."""

import importlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import documents, small_config, tiny_delta_net, tiny_llama
from datasets import Dataset

pytest.importorskip("fla")

from trl_refine import (  # noqa: E402
    NSPGRPOConfig,
    NSPGRPOTrainer,
    NSPPostTrainer,
    PostTrainConfig,
    TestTimeConfig,
    TestTimeRefine,
)
from trl_refine.kernels import fla_gated_choice as choice  # noqa: E402
from trl_refine.kernels import fla_gated_patch as patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYER_MODULE = importlib.import_module(patch.FLA_LAYER_MODULE)
FLA_OP = getattr(LAYER_MODULE, patch.FLA_OP_NAME)


def swapped() -> bool:
    """Whether the name fla's GatedDeltaNet layer calls is our kernel right now."""
    current = getattr(LAYER_MODULE, patch.FLA_OP_NAME)
    assert current in (FLA_OP, patch.chunk_gated_delta_rule)
    return current is patch.chunk_gated_delta_rule


def llama_with_gated_layer():
    """A tiny Llama that holds one (unused) fla GatedDeltaNet layer: the swap's check accepts it, and its steps run
    on CPU without Triton."""
    from fla.layers.gated_deltanet import GatedDeltaNet

    model = tiny_llama()
    model.unused_gated = GatedDeltaNet(hidden_size=32, head_dim=16, num_heads=2, use_short_conv=False)
    return model


def spy(trainer, model) -> list[tuple[str, bool]]:
    """Record whether the swap is active at each rollout generation, loss forward, answer loss (post-training) and
    backward (a gradient hook on the embedding, reached at the end of every backward)."""
    seen: list[tuple[str, bool]] = []

    def wrap(name: str, tag) -> None:
        original = getattr(trainer, name)

        def wrapped(*args, **kwargs):
            seen.append((tag(), swapped()))
            return original(*args, **kwargs)

        setattr(trainer, name, wrapped)

    wrap("_generate_and_score_completions", lambda: "rollouts")
    wrap("compute_loss", lambda: "loss" if trainer.model.training else "eval")
    if hasattr(trainer, "answer_loss"):
        wrap("answer_loss", lambda: "answer")
    model.get_input_embeddings().weight.register_hook(lambda grad: seen.append(("backward", swapped())))
    return seen


def short_documents(num: int = 2) -> list[str]:
    """``num`` documents of 12 words (about 60 byte tokens; ReFINE here needs 36): short, so a step takes a second."""
    return [" ".join(d.split()[:12]) for d in documents(num, base=1)]


def make_trainer(tmp_path, tok, model, trainer_class=NSPGRPOTrainer, **overrides):
    if trainer_class is NSPPostTrainer:
        docs = short_documents()
        data = {"prompt": [d + " Answer:" for d in docs], "answer": [d.split()[0] for d in docs]}
        args = small_config(tmp_path, config_class=PostTrainConfig, max_length=256, **overrides)
    else:
        data = {"text": short_documents()}
        args = small_config(tmp_path, **overrides)
    ds = Dataset.from_dict(data)
    return trainer_class(model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)


# ---------------------------------------------------------------------------------------------------------------------
# the field


def test_the_field_defaults_to_fla_and_refuses_unknown_values(tmp_path):
    assert NSPGRPOConfig.__dataclass_fields__["fla_gated_kernel"].default == "fla"
    assert TestTimeConfig().fla_gated_kernel == "fla"
    message = r"fla_gated_kernel='triton' is not one of fla, trl_refine, auto: 'fla' \(the default"
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, fla_gated_kernel="triton")
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, config_class=PostTrainConfig, fla_gated_kernel="triton")
    with pytest.raises(ValueError, match=message):
        TestTimeConfig(fla_gated_kernel="triton")
    # an NSPGRPOConfig's choice carries over to test time, as the other ReFINE fields do
    assert TestTimeConfig.from_any(small_config(tmp_path, fla_gated_kernel="auto")).fla_gated_kernel == "auto"


def test_the_recipes_and_the_readme_expose_the_field():
    from trl import TrlParser

    for name in ("midtrain", "posttrain", "testtime"):
        recipe = importlib.import_module(f"trl_refine.recipes.{name}")
        parsed = TrlParser(recipe.ARGUMENT_CLASSES).parse_args_and_config(
            args=["--config", recipe.DEFAULT_CONFIG, "--fla_gated_kernel", "trl_refine"]
        )
        assert parsed[-1].fla_gated_kernel == "trl_refine", name
    readme = (ROOT / "README.md").read_text()
    row = re.search(r"\| `fla_gated_kernel` \| `([^`]+)` \|", readme)
    assert row and row.group(1) == "fla"
    assert "fla_gated_kernel" in (ROOT / "docs" / "faithfulness.md").read_text()
    gated_row = next(
        line for line in (ROOT / "docs" / "models.md").read_text().splitlines() if "`gated_deltanet`" in line
    )
    assert "fla_gated_kernel" in gated_row and "no config option" not in gated_row


def test_the_choice_module_names_the_patch_module():
    assert choice._FLA_LAYER_MODULE == patch.FLA_LAYER_MODULE


# ---------------------------------------------------------------------------------------------------------------------
# the trainer


@pytest.mark.parametrize("kernel", ["trl_refine", "fla"])
def test_the_training_step_and_evaluation_run_inside_the_swap_and_fla_is_back_after(tmp_path, byte_tokenizer, kernel):
    model = llama_with_gated_layer()
    trainer = make_trainer(tmp_path, byte_tokenizer, model, max_steps=1, fla_gated_kernel=kernel)
    assert trainer.fla_gated_kernel == kernel and not swapped()
    seen = spy(trainer, model)
    trainer.train()
    assert not swapped()
    trainer.evaluate()
    assert not swapped()
    assert {tag for tag, _ in seen} == {"rollouts", "loss", "backward", "eval"}
    assert all(active == (kernel == "trl_refine") for _, active in seen), seen


def test_nested_post_training_takes_its_answer_step_inside_the_swap(tmp_path, byte_tokenizer):
    model = llama_with_gated_layer()
    trainer = make_trainer(
        tmp_path,
        byte_tokenizer,
        model,
        NSPPostTrainer,
        max_steps=1,
        posttrain_mode="nested",
        fla_gated_kernel="trl_refine",
    )
    seen = spy(trainer, model)
    trainer.train()
    assert not swapped()
    tags = [tag for tag, _ in seen]
    assert "answer" in tags and tags.count("backward") >= 2, tags  # the inner step's backward and the answer's
    assert all(active for _, active in seen), seen


def test_trl_refine_on_a_model_without_fla_gated_layers_fails_at_construction(tmp_path, byte_tokenizer):
    message = (
        r"fla_gated_kernel='trl_refine' swaps the chunk op of fla's GatedDeltaNet layers .* RefDeltaNetForCausalLM"
    )
    with pytest.raises(ValueError, match=message + r" has none .* Set fla_gated_kernel='fla'"):
        make_trainer(tmp_path, byte_tokenizer, tiny_delta_net(), fla_gated_kernel="trl_refine")
    model = tiny_delta_net()
    before = [p.detach().clone() for p in model.parameters()]
    prompts = [d + " Answer:" for d in short_documents()]
    adapter = TestTimeRefine(fla_gated_kernel="trl_refine", nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2)
    with pytest.raises(ValueError, match=message):
        adapter.adapt(model, byte_tokenizer, prompts)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # refused before any step
    assert not adapter.history


# ---------------------------------------------------------------------------------------------------------------------
# test time


def test_test_time_adaptation_and_the_answers_run_inside_the_swap(byte_tokenizer):
    model = llama_with_gated_layer()
    seen = []
    model.get_input_embeddings().weight.register_hook(lambda grad: seen.append(swapped()))
    adapter = TestTimeRefine(fla_gated_kernel="trl_refine", nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2)
    prompts = [d + " Answer:" for d in short_documents()]
    with adapter(model, byte_tokenizer, prompts) as stats:
        inside = swapped()  # where the evaluator decodes the answers
    assert stats["steps"] and seen and all(seen) and inside
    assert not swapped()
    seen.clear()
    TestTimeRefine(nsp_num_chunks=4, nsp_margin=8, learning_rate=1e-2).adapt(model, byte_tokenizer, prompts)
    assert seen and not any(seen)  # fla (the default): nothing swapped


# ---------------------------------------------------------------------------------------------------------------------
# auto


def fake_gpu(monkeypatch, capability, triton_version):
    import triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", triton_version)


@pytest.mark.parametrize(
    ("device", "capability", "triton_version", "kernel", "why"),
    [
        ("cpu", None, None, "fla", "the device is cpu, not a CUDA GPU"),
        ("cuda:0", (9, 0), "3.6.0", "trl_refine", r"refuses its gated backward here: Hopper \(capability 9.0\) with "
         r"triton 3.6.0 in \[3.4.0, 3.7.1\) \(fla #640\)"),
        ("cuda:0", (9, 0), "3.4.0", "trl_refine", "triton 3.4.0 in"),
        ("cuda:0", (9, 0), "3.7.1", "fla", r"fla's backward runs here: .* triton 3.7.1, outside \[3.4.0, 3.7.1\)"),
        ("cuda:0", (9, 0), "3.3.1", "fla", "outside"),
        ("cuda:0", (8, 0), "3.6.0", "fla", r"compute capability 8.0 is not Hopper \(9.x\)"),
    ],
)  # fmt: skip
def test_auto_swaps_exactly_where_fla_refuses_and_says_why(
    monkeypatch, caplog, device, capability, triton_version, kernel, why
):
    if capability is not None:
        fake_gpu(monkeypatch, capability, triton_version)
    model = llama_with_gated_layer()
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert choice.resolve_fla_gated_kernel("auto", model, device) == kernel
    lines = [r.getMessage() for r in caplog.records if "fla_gated_kernel=auto" in r.getMessage()]
    assert len(lines) == 1 and re.search(why, lines[0]), lines
    assert ("trl_refine's gated chunk kernel runs" in lines[0]) == (kernel == "trl_refine")


def test_auto_leaves_models_without_fla_gated_layers_alone(monkeypatch, caplog, tmp_path, byte_tokenizer):
    fake_gpu(monkeypatch, (9, 0), "3.6.0")  # where fla would refuse, if the model had a gated layer
    with caplog.at_level(logging.INFO, logger="trl_refine"):
        assert choice.resolve_fla_gated_kernel("auto", tiny_delta_net(), "cuda:0") == "fla"
    assert any("RefDeltaNetForCausalLM has no fla GatedDeltaNet layer" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    trainer = make_trainer(tmp_path, byte_tokenizer, llama_with_gated_layer(), fla_gated_kernel="auto")
    assert trainer.fla_gated_kernel == "fla"  # CPU: fla's kernel
    assert choice.resolve_fla_gated_kernel("fla", tiny_delta_net(), "cuda:0") == "fla"  # the default checks nothing


# ---------------------------------------------------------------------------------------------------------------------
# a real GatedDeltaNet through our kernel (Triton interpreter, opt-in)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRL_REFINE_INTERPRET_ALL") != "1",
    reason="recorded run (docs/models.md; 20 s of CI, most of it the subprocess's imports): the wiring tests above "
    "cover the trainer; set TRL_REFINE_INTERPRET_ALL=1 to rerun it",
)
def test_a_tiny_gated_deltanet_trains_through_our_kernel_under_the_triton_interpreter():
    """One NSPGRPOTrainer step (one-pass engine) on a one-layer fla GatedDeltaNet with fla_gated_kernel='trl_refine',
    CPU fp32 under TRITON_INTERPRET=1: our op ran (fla's chunk op cannot run in the interpreter, so every chunk-mode
    call was ours), the weights moved, and fla's op name is back after train()."""
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = ROOT / "tests" / "interpret_scripts" / "fla_gated_trainer.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["engine"] == "onepass" and res["op_calls"] >= 2 and res["restored"] is True, res
    assert res["max_weight_change"] > 1e-4, res
