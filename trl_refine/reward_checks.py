"""What a reward function returned, checked: one real number (or None, "no reward") per rollout.

TRL converts a custom reward's output with ``torch.tensor(...)``, so ``None``, a string, a nested list or a 2-D
tensor fail inside torch with no word of which function returned what. `checked_reward_func` wraps a user callable
so that such output fails with the function's name, what it returned and what was expected; `check_reward_output`
is the check itself (test-time training calls it directly). `AllNoneRewardWarning` replaces TRL's warning for
rollouts no reward function scored, which prints every keyword argument (hidden-state tensors included, ~10 KB a
step), by one short line per run.
"""

from __future__ import annotations

import functools
import inspect
import logging
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger("trl_refine")


def _shown(value, limit: int = 120) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:limit]}{'...' if len(text) > limit else ''}"


def check_reward_output(name: str, output, expected: int) -> list[float | None]:
    """``output`` as a list of ``expected`` floats / Nones, or an error naming reward function ``name``."""
    head = f"reward function {name!r} returned"
    want = f"it must return one float (or None for no reward) per rollout: a list of {expected}"
    if output is None:
        raise TypeError(f"{head} None; {want}.")
    if isinstance(output, (str, bytes)):
        raise TypeError(f"{head} a string ({_shown(output)}); {want}.")
    if isinstance(output, (torch.Tensor, np.ndarray)):
        if output.ndim != 1:
            raise ValueError(f"{head} an array of shape {tuple(output.shape)}; {want} (shape ({expected},)).")
        output = output.tolist()
    if not isinstance(output, Sequence):
        raise TypeError(f"{head} {_shown(output)}; {want}.")
    if len(output) != expected:
        raise ValueError(f"{head} {len(output)} values for {expected} rollouts; {want}.")
    values: list[float | None] = []
    for i, value in enumerate(output):
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
            value = value.item()
        if value is None:
            values.append(None)
        elif isinstance(value, numbers.Real):
            values.append(float(value))
        else:
            raise TypeError(f"{head} {_shown(value)} for rollout {i}; {want}.")
    return values


def checked_reward_func(func: Callable) -> Callable:
    """``func`` with its output checked by `check_reward_output` (its name, attributes and signature are kept).
    Coroutine functions and reward models (``nn.Module``) are returned as they are."""
    if isinstance(func, torch.nn.Module) or inspect.iscoroutinefunction(func) or getattr(func, "_nsp_checked", False):
        return func
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        prompts = kwargs["prompts"] if "prompts" in kwargs else args[0]
        return check_reward_output(name, func(*args, **kwargs), len(prompts))

    checked._nsp_checked = True
    return checked


class AllNoneRewardWarning:
    """Say once, briefly, that no reward function scored some rollouts; silence TRL's per-step dump of them."""

    #: start of TRL's message in `GRPOTrainer._calculate_rewards` (a drift test checks it is still there)
    TRL_MESSAGE = "All reward functions returned None"
    TRL_LOGGER = "trl.trainer.grpo_trainer"

    def __init__(self):
        self.warned = False
        logging.getLogger(self.TRL_LOGGER).addFilter(_DropTrlAllNone())

    def observe(self, unscorable: torch.Tensor, reward_names: Sequence[str]) -> None:
        """``unscorable``: [rollouts] True where every reward function returned None / NaN."""
        if self.warned or not bool(unscorable.any()):
            return
        self.warned = True
        logger.warning(
            "trl_refine: no reward function (%s) scored %d of %d rollouts (first: rollout %d): they returned None or "
            "NaN; those rollouts get no advantage. Shown once.",
            ", ".join(reward_names),
            int(unscorable.sum()),
            unscorable.numel(),
            int(unscorable.nonzero()[0, 0]),
        )


class _DropTrlAllNone(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return AllNoneRewardWarning.TRL_MESSAGE not in str(record.msg)[:200]  # accelerate prefixes "[RANK r] "

    def __eq__(self, other) -> bool:  # one filter per logger however many trainers are built
        return isinstance(other, _DropTrlAllNone)

    def __hash__(self) -> int:
        return hash(_DropTrlAllNone)
