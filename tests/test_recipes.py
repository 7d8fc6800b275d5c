"""The main recipes run end to end on CPU (shortened by flags) and save a loadable model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"recipe_{name}"] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_midtrain_default_runs_saves_and_reports_needles_with_the_ntp_arm_beside(tmp_path, capsys):
    recipe = load_recipe("midtrain")
    out = tmp_path / "mid"
    argv = ["--config", recipe.DEFAULT_CONFIG, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"]
    argv += ["--synthetic_documents", "4", "--eval_needles", "3", "--disable_tqdm", "true"]
    recipe.main(argv)
    printed = capsys.readouterr().out
    assert "Saved the trained model to" in printed and "| metric | before | after ntp | after refine | Δ |" in printed
    assert "What you are looking at: " in printed and "string_match_all on 3 held-out prompts" in printed
    report = json.loads((out / "midtrain_report.json").read_text())
    assert report["baseline_mode"] == "ntp" and report["global_step"] == 2
    nll = [report[arm]["answer_nll"] for arm in ("before", "baseline", "after")]
    assert len(set(nll)) == 3, nll  # both arms moved the weights, differently
    assert (
        report["before"]["result"]["num_examples"] == 3 and report["before"]["result"]["metric"] == "string_match_all"
    )
    assert not (out / "baseline-ntp").exists() or not any((out / "baseline-ntp").glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    import trl_refine.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "refine_delta_net"
    assert (out / "checkpoint-2").is_dir()


def test_midtrain_needle_documents_are_held_out_from_the_needle_check():
    recipe = load_recipe("midtrain")
    script = recipe.MidtrainArguments(synthetic_format="needle", synthetic_chars=500)
    docs = recipe.training_documents(script, seed=0, num=8)["text"]
    assert len(docs) == 8 and all(d.endswith(".") and len(d) <= 510 for d in docs)
    from trl_refine.eval import generate_niah

    held_out = generate_niah("single", num_examples=8, context_length=700, seed=2)  # the recipe's seed + 2
    assert not {a[0] for a in held_out["answer"]} & {d.rsplit(" ", 1)[1].rstrip(".") for d in docs}
    with pytest.raises(ValueError, match="baseline_mode needs a metric to compare the arms on: set eval_needles"):
        recipe.check_script(recipe.MidtrainArguments(baseline_mode="ntp"))
    with pytest.raises(ValueError, match="synthetic_format='poems'; choose registry, needle"):
        recipe.check_script(recipe.MidtrainArguments(synthetic_format="poems"))


def test_midtrain_random_lact_model(tmp_path):
    """--tiny_model_type picks the random model; without --config the embedded default still applies, and
    ``--baseline_mode none`` turns its baseline arm off."""
    recipe = load_recipe("midtrain")
    out = tmp_path / "lact"
    argv = ["--tiny_model_type", "lact_swiglu", "--tiny_hidden_size", "32", "--tiny_heads", "2"]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--synthetic_documents", "2", "--synthetic_chars", "600"]
    argv += ["--save_strategy", "no", "--disable_tqdm", "true", "--baseline_mode", "none", "--eval_needles", "0"]
    recipe.main(argv)
    assert not (out / "midtrain_report.md").exists()  # no needle check, no arms
    from transformers import AutoModelForCausalLM

    import trl_refine.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "lact_swiglu" and model.config.hidden_size == 32
    assert model.config.num_lact_heads == 2 and model.config.lact_chunk_size == 256


def test_model_arguments_reject_bad_values():
    from trl_refine.recipe_utils import ModelArguments

    with pytest.raises(ValueError, match="tiny_model_type='llama'; choose one of refine_delta_net"):
        ModelArguments(tiny_model_type="llama")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        ModelArguments(dtype="fp8")
