"""The main recipes run end to end on CPU (shortened by flags) and save a loadable model."""

import importlib.util
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
def test_midtrain_default_runs_and_saves(tmp_path, capsys):
    recipe = load_recipe("midtrain")
    out = tmp_path / "mid"
    argv = ["--config", recipe.DEFAULT_CONFIG, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1"]
    argv += ["--synthetic_documents", "4", "--disable_tqdm", "true"]
    recipe.main(argv)
    assert "Saved the trained model to" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    import trl_refine.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "refine_delta_net"
    assert (out / "checkpoint-2").is_dir()


def test_midtrain_random_lact_model(tmp_path):
    """--tiny_model_type picks the random model; without --config the embedded default still applies."""
    recipe = load_recipe("midtrain")
    out = tmp_path / "lact"
    argv = ["--tiny_model_type", "lact_swiglu", "--tiny_hidden_size", "32", "--tiny_heads", "2"]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--synthetic_documents", "2", "--synthetic_chars", "400"]
    argv += ["--save_strategy", "no", "--disable_tqdm", "true"]
    recipe.main(argv)
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
