"""Divergence guard: no non-finite step reaches the weights or a checkpoint.

The trainer reports the values every rank shares (the gathered losses, the reduced entropy sums, the all-reduced
gradient norm) with `DivergenceGuard.observe`, so all ranks take the same decision. With
``nsp_on_divergence="stop"`` a non-finite value raises `DivergenceError` at once, before the optimizer step and the
save of that step, naming the step and the last complete checkpoint. With ``"skip"`` the step's gradients are
dropped before the optimizer step (the weights, including weight decay, stay as they were), and the run stops after
`MAX_CONSECUTIVE_SKIPS` skipped steps in a row. Before every save the weights are checked to be finite as well.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from trl_refine.checkpoints import last_complete_checkpoint
from trl_refine.utils import local_tensor, model_device

logger = logging.getLogger("trl_refine")

#: a run that only produces non-finite steps is stopped after this many skipped steps in a row
MAX_CONSECUTIVE_SKIPS = 5


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient, entropy or weight."""


def _is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return value is None or math.isfinite(float(value))


class DivergenceGuard(TrainerCallback):
    """Stops (or skips) a step whose loss, gradient norm or entropy is not finite; see the module docstring."""

    def __init__(self, policy: str, accelerator=None):
        if policy not in ("stop", "skip"):
            raise ValueError(f"nsp_on_divergence={policy!r} is not one of stop, skip.")
        self.policy = policy
        self.accelerator = accelerator
        self.output_dir: str | None = None
        self.pending: list[str] = []  # what was non-finite in the optimizer step under way ("skip")
        self.skipped_steps: list[int] = []
        self._consecutive = 0

    # ---- called by the trainer with values all ranks share ------------------------------------------------------
    def observe(self, state, name: str, value) -> None:
        """Record ``name = value`` for the optimizer step under way; non-finite stops or marks the step."""
        if _is_finite(value):
            return
        shown = float(value.float().sum()) if isinstance(value, torch.Tensor) else value
        what = f"{name} is {shown}"
        if self.policy == "stop":
            raise DivergenceError(self.message(state.global_step + 1, what))
        if what not in self.pending:
            self.pending.append(what)

    def message(self, step: int, what: str, applied: bool = False) -> str:
        checkpoint = last_complete_checkpoint(self.output_dir) if self.output_dir else None
        where = (
            f"The last good checkpoint is {checkpoint}: resume from it with resume_from_checkpoint='last'"
            if checkpoint
            else "No checkpoint was saved before it"
        )
        done = "it was not saved" if applied else "nothing of it was applied or saved"
        return (
            f"training diverged at step {step}: {what}; {done}. {where} after lowering learning_rate or "
            "max_grad_norm, or set nsp_on_divergence='skip' to skip such steps."
        )

    # ---- Trainer events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.output_dir = args.output_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.pending:
            self._consecutive = 0
            return
        step, what = state.global_step + 1, "; ".join(self.pending)
        self.pending = []
        self._consecutive += 1
        if self._consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise DivergenceError(
                self.message(step, f"{what}, for the {self._consecutive}th optimizer step in a row (all skipped)")
            )
        for p in model.parameters():
            p.grad = None  # torch optimizers leave parameters without a gradient untouched
        self.skipped_steps.append(step)
        logger.warning("trl_refine: skipped optimizer step %d (%s); the weights are unchanged", step, what)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            finite = torch.tensor(
                float(all(_is_finite(local_tensor(p)) for p in model.parameters())), device=model_device(model)
            )
            if self.accelerator is not None and self.accelerator.num_processes > 1:  # FSDP: each rank a shard
                finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
            if float(finite) < 1.0:
                control.should_save = False
                raise DivergenceError(self.message(state.global_step, "a weight of the model is not finite", True))
