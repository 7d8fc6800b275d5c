"""Bad input fails at construction with a message that names the fix (issue 15; docs/reliability.md lists them all).

Config ranges and types, bad data (streams, pre-tokenized ids, too few documents), reward-function outputs, resume
checks and test-time training after an exception. Faults during training (NaN, SIGKILL) are in tests/test_faults.py.
"""

from __future__ import annotations

import json
import math

import pytest

from trl_refine import NSPGRPOConfig


def make(**kw):
    return NSPGRPOConfig(output_dir="/tmp/nsp-test", bf16=False, use_cpu=True, report_to="none", **kw)


# ----------------------------------------------------------------------------------------------------------------------
# config ranges and types
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"documents_per_device": 0}, ValueError, "documents_per_device must be >= 1, got 0"),
        ({"documents_per_device": -2}, ValueError, "documents_per_device must be >= 1"),
        ({"per_device_train_batch_size": 0}, ValueError, "per_device_train_batch_size must be >= 1.*documents_per"),
        ({"per_device_eval_batch_size": 0}, ValueError, "per_device_eval_batch_size must be >= 1"),
        ({"nsp_smoothing_width": 4}, ValueError, "nsp_smoothing_width=4 is even.*Use 5"),
        ({"nsp_generic_rows_per_call": 0}, ValueError, "nsp_generic_rows_per_call must be >= 1"),
        ({"num_iterations": 0}, ValueError, "num_iterations must be >= 1"),
        ({"loss_type": "ppo"}, ValueError, "loss_type='ppo' is not one of grpo, bnpo"),
        ({"scale_rewards": "mean"}, ValueError, "scale_rewards='mean' is not one of group, batch, none"),
        ({"nsp_num_chunks": "8"}, TypeError, "nsp_num_chunks must be an integer, got '8'"),
        ({"nsp_rollout_length": 2.5}, TypeError, "nsp_rollout_length must be an integer"),
        ({"documents_per_device": True}, TypeError, "documents_per_device must be an integer"),
        ({"nsp_coef": "0.2"}, TypeError, "nsp_coef must be a number, got '0.2'"),
        ({"ntp_coef": math.nan}, ValueError, "ntp_coef=nan is not a finite number"),
        ({"nsp_coef": math.inf}, ValueError, "nsp_coef=inf is not a finite number"),
        ({"nsp_selection_temperature": math.inf}, ValueError, "nsp_selection_temperature=inf is not a finite"),
        ({"nsp_selection_temperature": math.nan}, ValueError, "nsp_selection_temperature=nan is not a finite"),
        ({"learning_rate": math.nan}, ValueError, "learning_rate=nan is not a finite number"),
        ({"epsilon": math.nan}, ValueError, "epsilon=nan is not a finite number"),
        ({"delta": math.inf}, ValueError, "delta=inf is not a finite number"),
        ({"nsp_on_divergence": "ignore"}, ValueError, "nsp_on_divergence='ignore' is not one of stop, skip"),
    ],
)
def test_bad_config_values_are_refused_at_construction(overrides, error, message):
    with pytest.raises(error, match=message):
        make(**overrides)


def test_valid_edge_values_still_pass():
    assert make(nsp_smoothing_width=1).smoothing_width == 1
    assert make(nsp_smoothing_width=7).smoothing_width == 7
    assert make(scale_rewards=False).scale_rewards == "none"
    assert make(loss_type="dr_grpo", nsp_generic_rows_per_call=4, num_iterations=2).num_iterations == 2
    assert make(nsp_on_divergence="skip").nsp_on_divergence == "skip"


# ----------------------------------------------------------------------------------------------------------------------
# resume: which checkpoint, and whether the settings still match
def _fake_checkpoint(path, *, state: str | None = "{}", weights: bool = True):
    path.mkdir(parents=True)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_resume_last_skips_incomplete_checkpoints_and_names_the_one_used(tmp_path, caplog):
    from trl_refine.checkpoints import resolve_resume_checkpoint

    _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-10")
    _fake_checkpoint(tmp_path / "checkpoint-12", state='{"global_st')  # killed while writing the trainer state
    _fake_checkpoint(tmp_path / "checkpoint-14", state=None)  # killed after the weights
    with caplog.at_level("WARNING", logger="trl_refine"):
        for value in ("last", True, "true", "latest"):
            assert resolve_resume_checkpoint(value, str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert "skipping the incomplete checkpoint" in caplog.text and "trainer_state.json is truncated" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-10'}" in caplog.text
    for value in (None, False, "false", ""):
        assert resolve_resume_checkpoint(value, str(tmp_path)) is None
    with pytest.raises(ValueError, match="checkpoint-14.*no trainer_state.json.*newest complete.*checkpoint-10"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-14"), str(tmp_path))
    with pytest.raises(ValueError, match="no complete checkpoint in output_dir"):
        resolve_resume_checkpoint("last", str(tmp_path / "elsewhere"))
    _fake_checkpoint(tmp_path / "nothing" / "checkpoint-1", weights=False)
    with pytest.raises(ValueError, match=r"no complete checkpoint.*\(1 incomplete ones skipped\)"):
        resolve_resume_checkpoint("last", str(tmp_path / "nothing"))


def test_resume_with_changed_settings_is_refused_or_warned(tmp_path, byte_tokenizer, caplog):
    """A changed documents_per_device used to skip documents silently; now it is refused. A changed k is warned."""
    from conftest import documents, small_config, tiny_llama
    from datasets import Dataset

    from trl_refine import NSPGRPOTrainer

    def trainer(**overrides):
        args = small_config(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, nsp_max_length=96, **overrides)
        ds = Dataset.from_dict({"text": documents(4)})
        return NSPGRPOTrainer(tiny_llama(), args=args, train_dataset=ds, processing_class=byte_tokenizer)

    trainer().train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    saved = json.loads((checkpoint / "refine_settings.json").read_text())
    assert saved["documents_per_device"] == 1 and saved["engine"] == "generic" and saved["rewards"] == ["cosine"]
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-1: documents_per_device: 1 -> 2"):
        trainer(documents_per_device=2).train(resume_from_checkpoint="last")
    with caplog.at_level("WARNING", logger="trl_refine"):
        trainer(nsp_rollout_length=4).train(resume_from_checkpoint="last")
    assert "nsp_rollout_length changed from 5 to 4" in caplog.text


def test_recipe_takes_resume_from_checkpoint_last(tmp_path, caplog):
    """`--resume_from_checkpoint last` resumes from the newest complete checkpoint (`true` used to fail with "Can't
    find a valid checkpoint at true"; both spellings map to the same rule, see the test above)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "midtrain.py"
    spec = importlib.util.spec_from_file_location("recipe_midtrain_resume", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["recipe_midtrain_resume"] = recipe
    spec.loader.exec_module(recipe)
    out = tmp_path / "mid"
    argv = ["--output_dir", str(out), "--save_steps", "1", "--synthetic_documents", "4", "--synthetic_chars", "400"]
    argv += ["--disable_tqdm", "true", "--nsp_max_length", "128", "--nsp_num_chunks", "2", "--nsp_margin", "8"]
    argv += ["--tiny_hidden_size", "32", "--tiny_heads", "2"]
    recipe.main([*argv, "--max_steps", "1"])
    with caplog.at_level("WARNING", logger="trl_refine"):
        recipe.main([*argv, "--max_steps", "2", "--resume_from_checkpoint", "last"])
    assert f"resuming from {out / 'checkpoint-1'}" in caplog.text
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
