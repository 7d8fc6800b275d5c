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
