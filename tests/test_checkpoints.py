"""Resume checks: every config field of ours is compared on resume (or says why not), and a change is flagged.

The end-to-end resume through `NSPGRPOTrainer.train` is in tests/test_reliability.py; here the settings of a config
are written to a checkpoint folder and read back by `check_resume_settings`, without training.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from trl import GRPOConfig

from trl_refine import NSPGRPOConfig
from trl_refine.checkpoints import (
    DATA_ORDER_SETTINGS,
    NOT_COMPARED_SETTINGS,
    OBJECTIVE_SETTINGS,
    SETTINGS_FILE,
    check_resume_settings,
    refine_settings,
)
from trl_refine.config import RefineFields
from trl_refine.posttrain import PostTrainConfig

COMMON = {"output_dir": "/tmp/nsp-test", "bf16": False, "use_cpu": True, "report_to": "none"}


def our_fields() -> set[str]:
    """Fields declared by trl_refine (RefineFields, NSPGRPOConfig, PostTrainConfig), not inherited from TRL."""
    trl = {f.name for f in dataclasses.fields(GRPOConfig)}
    names = {f.name for f in dataclasses.fields(PostTrainConfig)} - trl
    return names | {f.name for f in dataclasses.fields(RefineFields)}


def test_every_field_of_ours_is_compared_on_resume_or_says_why_not():
    classified = set(DATA_ORDER_SETTINGS) | set(OBJECTIVE_SETTINGS) | set(NOT_COMPARED_SETTINGS)
    assert our_fields() - classified == set(), "classify the new field in trl_refine/checkpoints.py"
    assert not set(DATA_ORDER_SETTINGS) & set(OBJECTIVE_SETTINGS)
    assert not (set(DATA_ORDER_SETTINGS) | set(OBJECTIVE_SETTINGS)) & set(NOT_COMPARED_SETTINGS)


def fake_trainer(config, *, documents: int = 8):
    return SimpleNamespace(
        args=config,
        accelerator=SimpleNamespace(num_processes=1),
        reward_func_names=[config.nsp_reward],
        engine=SimpleNamespace(name="generic"),
        train_dataset=list(range(documents)),
    )


def checkpoint_of(tmp_path, config, **kw):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / SETTINGS_FILE).write_text(json.dumps(refine_settings(fake_trainer(config, **kw))))
    return str(folder)


@pytest.mark.parametrize(
    "config_class, name, value",
    [
        (NSPGRPOConfig, "ntp_count_pad_targets", True),
        (NSPGRPOConfig, "nsp_sample_eos", True),
        (NSPGRPOConfig, "nsp_smoothing_width", 1),
        (NSPGRPOConfig, "nsp_selection_temperature", 0.5),
        (NSPGRPOConfig, "nsp_add_special_tokens", True),
        (NSPGRPOConfig, "nsp_max_length", 4096),
        (NSPGRPOConfig, "nsp_min_length", 128),
        (NSPGRPOConfig, "delta", None),
        (NSPGRPOConfig, "epsilon_high", 0.28),
        (NSPGRPOConfig, "scale_rewards", "batch"),
        (PostTrainConfig, "answer_tokenization", "joint"),
        (PostTrainConfig, "answer_append_eos", True),
        (PostTrainConfig, "prompt_add_special_tokens", True),
        (PostTrainConfig, "long_examples", "truncate"),
        (PostTrainConfig, "max_answer_length", 16),
        (PostTrainConfig, "posttrain_inner_steps", 2),
        (PostTrainConfig, "posttrain_mode", "joint"),
        (PostTrainConfig, "sft_coef", 0.5),
    ],
)
def test_resume_with_a_changed_objective_setting_is_warned(tmp_path, caplog, config_class, name, value):
    before = config_class(**COMMON)
    after = config_class(**COMMON, **{name: value})
    checkpoint = checkpoint_of(tmp_path, before)
    with caplog.at_level("WARNING", logger="trl_refine"):
        check_resume_settings(checkpoint, refine_settings(fake_trainer(after)))
    assert f"with {name} changed from {getattr(before, name)!r} to {value!r}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_refine"):
        check_resume_settings(checkpoint, refine_settings(fake_trainer(before)))
    assert caplog.text == ""  # the same settings: nothing to say


def test_resume_after_a_filter_change_that_drops_documents_is_refused(tmp_path):
    """nsp_min_length left fewer documents: the steps already done counted batches of the other dataset."""
    checkpoint = checkpoint_of(tmp_path, NSPGRPOConfig(**COMMON), documents=8)
    current = refine_settings(fake_trainer(NSPGRPOConfig(**COMMON, nsp_min_length=128), documents=6))
    with pytest.raises(ValueError, match=r"train_documents: 8 -> 6 \(also changed: nsp_min_length: None -> 128\)"):
        check_resume_settings(checkpoint, current)


def test_resume_with_changed_num_iterations_is_refused(tmp_path):
    """TRL's sampler repeats each batch num_iterations · steps_per_generation times: other documents per step."""
    checkpoint = checkpoint_of(tmp_path, NSPGRPOConfig(**COMMON))
    current = refine_settings(fake_trainer(NSPGRPOConfig(**COMMON, num_iterations=2)))
    with pytest.raises(ValueError, match="num_iterations: 1 -> 2"):
        check_resume_settings(checkpoint, current)
