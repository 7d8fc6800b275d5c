"""The installed command: `trl-refine <recipe>` (also `python -m trl_refine`, `accelerate launch -m trl_refine`), and
the recipes and their configs shipped inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trl_refine.cli import RECIPES, main

ROOT = Path(__file__).resolve().parents[1]


def test_usage_and_unknown_command(capsys):
    assert main([]) is None
    assert "midtrain,posttrain,testtime" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'train'"):
        main(["train"])


def test_recipes_are_importable_from_the_package_with_their_default_configs():
    import importlib

    for name in RECIPES:
        recipe = importlib.import_module(f"trl_refine.recipes.{name}")
        assert os.path.isfile(recipe.DEFAULT_CONFIG), recipe.DEFAULT_CONFIG
        assert callable(recipe.main)


def test_wheel_ships_recipes_configs_templates_and_the_command(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "trl_refine", src / "trl_refine", symlinks=True, ignore=ignore)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("trl_refine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in RECIPES:
        assert f"trl_refine/recipes/{name}.py" in names
        assert f"trl_refine/recipes/configs/{name}_default.yaml" in names
    assert "trl_refine/recipes/accelerate/multi_gpu.yaml" in names
    assert "trl_refine/templates/model_card.md" in names
    assert "trl_refine/assets/tiny_retrieval_delta_net/model.safetensors" in names  # the embedded defaults' base
    assert "trl_refine/eval/metrics/refine_eval/refine_eval.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "trl-refine = trl_refine.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_accelerate_launch_of_the_command_trains_and_saves(tmp_path):
    out = tmp_path / "mid"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "-m", "trl_refine"]
    cmd += ["midtrain", "--output_dir", str(out), "--max_steps", "1", "--synthetic_documents", "2"]
    cmd += ["--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Saved the trained model to" in done.stdout
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
