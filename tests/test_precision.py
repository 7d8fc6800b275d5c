"""fp32 master weights: one step at the official lr 1e-6 moves fp32 weights; bf16 weights trigger the warning."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import documents, small_config, tiny_delta_net
from datasets import Dataset

from trl_refine import NSPGRPOTrainer
from trl_refine.precision import lost_update_problem

ROOT = Path(__file__).resolve().parents[1]


def one_step(tmp_path, tok, model):
    ds = Dataset.from_dict({"text": documents(4)})
    args = small_config(tmp_path, learning_rate=1e-6, max_steps=1, weight_decay=0.0)
    trainer = NSPGRPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    moved = [(p.detach() != before[name]).float().mean().item() for name, p in model.named_parameters()]
    return sum(moved) / len(moved)


def test_one_step_at_lr_1e6_moves_fp32_weights(tmp_path, byte_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_refine"):
        moved = one_step(tmp_path, byte_tokenizer, tiny_delta_net())
    assert moved > 0.9, f"only {moved:.1%} of the fp32 weights changed"
    assert "round away" not in caplog.text


def test_bf16_weights_at_lr_1e6_warn_and_barely_move(tmp_path, byte_tokenizer, caplog):
    model = tiny_delta_net().to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="trl_refine"):
        moved = one_step(tmp_path, byte_tokenizer, model)
    assert caplog.text.count("round away") == 1
    assert "dtype=float32" in caplog.text and "bf16=True" in caplog.text
    assert moved < 0.5, f"{moved:.1%} of the bf16 weights changed: the warning's premise is wrong"


def test_rule_threshold():
    w = torch.nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        w.weight.fill_(0.02)
        w.bias.fill_(0.02)
    assert lost_update_problem(w, 1e-6) is not None
    assert lost_update_problem(w, 1e-3) is None  # above 0.02 · 2**-7 ≈ 1.6e-4
    assert lost_update_problem(w.float(), 1e-9) is None  # fp32 master weights never warn


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_configs_keep_fp32_master_weights(path):
    cfg = yaml.safe_load(path.read_text()) or {}
    assert cfg.get("dtype", "float32") == "float32", f"{path.name}: load fp32 weights, compute in bf16"


def test_model_arguments_default_to_fp32_and_readme_quickstart_too():
    from trl_refine.recipe_utils import ModelArguments

    assert ModelArguments().dtype == "float32"
    readme = (ROOT / "README.md").read_text()
    assert "--dtype bfloat16" not in readme and "torch_dtype" not in readme
