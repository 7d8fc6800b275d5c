"""GRPO advantages for ReFINE's groupings (DESIGN.md §2 step 5). Pure torch."""

from __future__ import annotations

import torch

#: the official code divides by (std + 1e-6) with the unbiased std
ADVANTAGE_EPS = 1e-6


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = ADVANTAGE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``(R - mean_g R) / (std_g R + eps)`` over contiguous groups of ``group_size`` rows.

    Args:
        rewards: [N] total reward per rollout, rows ordered so each group is contiguous. NaN = unscorable row
            (ignored in the statistics, advantage 0).
        scale: ``group`` (std per group, official), ``batch`` (one std over all rows) or ``none`` (no division).
    Returns:
        (advantages [N], group std broadcast to [N]). A group of one member gets mean 0 and std 1 (official), so
        all-equal rewards give zero advantages, never NaN.
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)  # float64 statistics: equal rewards give exactly 0
    valid = ~torch.isnan(grouped)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(-1, keepdim=True) / count
    var = (torch.where(valid, grouped - mean, torch.zeros_like(grouped)) ** 2).sum(-1, keepdim=True) / (
        count - 1
    ).clamp(min=1)
    std = var.sqrt()
    single = count <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    centred = torch.where(std == 0, torch.zeros_like(grouped), grouped - mean)
    if scale == "group":
        adv = centred / (std + eps)
    elif scale == "batch":
        flat = rewards.double()[~torch.isnan(rewards)]
        batch_std = flat.std() if flat.numel() > 1 else torch.tensor(1.0, dtype=flat.dtype, device=rewards.device)
        adv = centred / (batch_std + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = torch.nan_to_num(adv, nan=0.0).reshape(-1).to(rewards.dtype)
    return adv, std.expand_as(grouped).reshape(-1).to(rewards.dtype)
