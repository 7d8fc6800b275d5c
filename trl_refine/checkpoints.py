"""Resuming safely: which checkpoint to use, and whether the run's ReFINE settings still match it.

A checkpoint is complete when its ``trainer_state.json`` (the Trainer writes it after the weights, optimizer and RNG
states) parses and a weights file is present; a run killed during a save leaves an incomplete one, which
``resume_from_checkpoint="last"`` (or ``True``) skips with a message naming the checkpoint it uses instead.

Every checkpoint also gets ``refine_settings.json`` with the settings that decide what a resumed run does. On resume,
a change of the settings that decide which documents each optimizer step reads (resuming skips the batches already
seen, counted in steps) is refused; a change of the objective (n, k, G, reward, engine, EOS masking, NTP padding
rule, answer target, ...) is warned about.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger("trl_refine")

SETTINGS_FILE = "refine_settings.json"
TRAINER_STATE_FILE = "trainer_state.json"
#: a checkpoint holds one of these (full weights, sharded index, PEFT adapter) or an FSDP / DeepSpeed folder
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
#: settings whose change makes a resumed run read other documents than the interrupted run would have
#: (``train_documents``: the training documents left after filtering, which nsp_min_length, nsp_short_documents and
#: post-training's long_examples / max_length decide; ``num_iterations``: TRL's sampler repeats every batch
#: num_iterations · steps_per_generation times)
DATA_ORDER_SETTINGS = (
    "documents_per_device",
    "num_processes",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "seed",
    "shuffle_dataset",
    "train_documents",
)
#: settings whose change alters the objective from the resumed step on (warned about)
OBJECTIVE_SETTINGS = (
    # the ReFINE step (RefineFields)
    "nsp_num_chunks",
    "nsp_rollout_length",
    "nsp_num_rollouts",
    "nsp_selection",
    "nsp_smoothing_width",
    "nsp_selection_temperature",
    "nsp_margin",
    "nsp_group_by",
    "nsp_sample_eos",
    "ntp_coef",
    "ntp_count_pad_targets",
    "nsp_coef",
    "nsp_prompt_tail_tokens",
    "rewards",
    "engine",
    # the documents (NSPGRPOConfig)
    "document_column",
    "nsp_max_length",
    "nsp_min_length",
    "nsp_add_special_tokens",
    # the PPO-clip loss (GRPOConfig fields ReFINE uses)
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "scale_rewards",
    # post-training (PostTrainConfig)
    "posttrain_mode",
    "answer_column",
    "max_answer_length",
    "max_length",
    "long_examples",
    "sft_coef",
    "posttrain_inner_steps",
    "answer_tokenization",
    "answer_separator",
    "answer_append_eos",
    "prompt_add_special_tokens",
)
#: our config fields that are not compared, and why (tests/test_checkpoints.py checks that every field of
#: RefineFields, NSPGRPOConfig and PostTrainConfig is in one of the three)
NOT_COMPARED_SETTINGS = {
    "nsp_reward": "compared as `rewards` (the reward functions in use)",
    "nsp_engine": "compared as `engine` (the engine it resolves to)",
    "nsp_reuse_sampling_pass": "same rollouts, losses and gradients either way",
    "nsp_fuse_scan": "same positions, rollouts, losses and gradients either way (the scan's entropies to rounding)",
    "nsp_generic_rows_per_call": "memory only",
    "nsp_segment_checkpointing": "memory only",
    "fla_gated_kernel": "the same math by another kernel (kernel numerics only)",
    "nsp_on_divergence": "decides what a fault does, not what a step optimises",
    "nsp_short_documents": "decides which documents are kept: compared as `train_documents`",
}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RESUME_LAST = ("last", "latest", "true")


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is one."""
    if not os.path.isdir(path):
        return "it is not a directory"
    state = os.path.join(path, TRAINER_STATE_FILE)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE_FILE} (the save was interrupted)"
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return f"its {TRAINER_STATE_FILE} is truncated (the save was interrupted)"
    names = set(os.listdir(path))
    has_sharded = any(name.startswith(("pytorch_model_fsdp", "global_step")) for name in names)
    if not names.intersection(WEIGHT_FILES) and not has_sharded:
        return "it holds no model weights"
    return None


def checkpoints_in(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str, *, log_skipped: bool = False) -> str | None:
    """The newest complete checkpoint of ``output_dir`` (None if there is none)."""
    for path in checkpoints_in(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if log_skipped:
            logger.warning("trl_refine: skipping the incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: ``True`` / ``"last"`` / ``"true"`` = the newest complete one of
    ``output_dir``; a path must be a complete checkpoint; ``None`` / ``False`` / ``"false"`` = no resume."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in RESUME_LAST):
        path = last_complete_checkpoint(output_dir, log_skipped=True)
        if path is None:
            found = checkpoints_in(output_dir)
            raise ValueError(
                f"resume_from_checkpoint={value!r}: no complete checkpoint in output_dir={output_dir!r}"
                + (f" ({len(found)} incomplete ones skipped)" if found else "")
                + ". Start without resume_from_checkpoint, or point output_dir at the interrupted run."
            )
        logger.warning("trl_refine: resuming from %s", path)
        return path
    path = str(value)
    problem = checkpoint_problem(path)
    if problem is not None:
        fallback = last_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
        hint = f" The newest complete checkpoint beside it is {fallback}." if fallback else ""
        raise ValueError(
            f"resume_from_checkpoint={path!r} cannot be resumed: {problem}.{hint} Pass a complete checkpoint "
            "folder, or resume_from_checkpoint='last' for the newest complete one of output_dir."
        )
    return path


def read_settings(checkpoint: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(checkpoint, SETTINGS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_resume_settings(checkpoint: str, current: dict[str, Any]) -> None:
    """Refuse a resume that would read other documents than the interrupted run; warn about objective changes."""
    saved = read_settings(checkpoint)
    if saved is None:
        logger.warning(
            "trl_refine: %s has no readable %s; the ReFINE settings of the resumed run cannot be checked against it",
            checkpoint,
            SETTINGS_FILE,
        )
        return
    changed = {key: (saved[key], current.get(key)) for key in saved if key in current and saved[key] != current[key]}
    refused = {key: change for key, change in changed.items() if key in DATA_ORDER_SETTINGS}
    if refused:
        what = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        others = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items() if key not in refused)
        if others:
            what += f" (also changed: {others})"
        raise ValueError(
            f"cannot resume from {checkpoint}: {what}. Resuming skips the batches already trained on, counted in "
            "steps, so with these changed the run would skip or repeat other documents than it trained on. Resume "
            "with the checkpoint's values, or start a new run (another output_dir) from the checkpoint's weights."
        )
    for key, (old, new) in changed.items():
        logger.warning(
            "trl_refine: resuming from %s with %s changed from %r to %r; the steps from here on optimise another "
            "objective than the checkpoint's",
            checkpoint,
            key,
            old,
            new,
        )


def refine_settings(trainer) -> dict[str, Any]:
    """What `check_resume_settings` compares: `DATA_ORDER_SETTINGS` and `OBJECTIVE_SETTINGS` of a trainer."""
    args = trainer.args
    settings = {name: getattr(args, name, None) for name in DATA_ORDER_SETTINGS + OBJECTIVE_SETTINGS}
    dataset = getattr(trainer, "train_dataset", None)
    settings.update(
        num_processes=trainer.accelerator.num_processes,
        rewards=list(trainer.reward_func_names),
        engine=trainer.engine.name,
        train_documents=len(dataset) if hasattr(dataset, "__len__") else None,  # None for a stream
    )
    return settings


class RefineSettingsCallback(TrainerCallback):
    """Writes the run's ReFINE settings into every checkpoint (main process), for `check_resume_settings`."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, SETTINGS_FILE), "w") as f:
                json.dump(self.settings, f, indent=1, sort_keys=True)
