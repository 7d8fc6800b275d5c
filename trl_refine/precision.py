"""Master-weight precision: warn when an optimizer step is too small to change low-precision weights.

The official release keeps fp32 master weights and computes in bf16 (verl's FSDP worker builds the actor in fp32
with a bf16 ``MixedPrecision`` policy). ReFINE trains at lr 1e-6: an AdamW update moves a weight by about ``lr``,
while a bf16 weight of magnitude ``|w|`` can only change by steps of about ``|w| · eps`` (eps = 2**-7 for bf16,
2**-10 for fp16). Below that, updates round away and the weights barely move.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("trl_refine")

LOW_PRECISION = (torch.bfloat16, torch.float16)


def lost_update_problem(model: torch.nn.Module, learning_rate: float) -> str | None:
    """Why an AdamW step at ``learning_rate`` would be lost in the model's low-precision trainable weights, or None.

    The rule: with ``|w|`` the mean absolute value of the trainable bf16/fp16 weights and ``eps`` their dtype's
    resolution (``torch.finfo(dtype).eps``), updates of ~``lr`` are lost when ``lr < |w| · eps``."""
    for dtype in LOW_PRECISION:
        params = [p for p in model.parameters() if p.requires_grad and p.dtype == dtype and p.device.type != "meta"]
        if not params or learning_rate <= 0:
            continue
        with torch.no_grad():
            total = sum(p.detach().abs().float().sum().item() for p in params)
            count = sum(p.numel() for p in params)
        typical = total / max(count, 1)
        resolution = typical * torch.finfo(dtype).eps
        if learning_rate < resolution:
            name = str(dtype).removeprefix("torch.")
            return (
                f"trainable weights are {name} and learning_rate={learning_rate:g} is below their resolution "
                f"(mean |w| {typical:.3g} × eps {torch.finfo(dtype).eps:g} = {resolution:.3g}): most updates round "
                f"away and the weights barely move. Load the model in float32 (dtype=float32 / "
                f"dtype=torch.float32) and train with bf16 autocast (bf16=True, or mixed_precision='bf16'), as the "
                "official release does"
            )
    return None


def warn_if_updates_vanish(model: torch.nn.Module, learning_rate: float) -> bool:
    """Log a warning (once per call site) naming the fix when `lost_update_problem` finds one; returns whether."""
    problem = lost_update_problem(model, learning_rate)
    if problem is not None:
        logger.warning("%s.", problem)
    return problem is not None
