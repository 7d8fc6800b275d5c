"""Pure loss functions (no TRL): the PPO-clip surrogate of the official release and token-mean cross-entropy.

The trainers reuse TRL's own ``_compute_loss`` for the policy term (with ``loss_type="bnpo"`` and ``delta=3`` it is
the same function); these standalone versions serve loops that do not run a ``Trainer``, such as test-time training
(`trl_refine.testtime`).
"""

from __future__ import annotations

import torch

#: the official clip range (verl ``clip_ratio`` 0.2, low = high) and dual-clip constant (``clip_ratio_c`` 3.0)
CLIP_EPSILON = 0.2
DUAL_CLIP = 3.0


def ppo_clip_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    epsilon_low: float = CLIP_EPSILON,
    epsilon_high: float | None = None,
    dual_clip: float | None = DUAL_CLIP,
    reduction: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-clip surrogate with dual clip, as in the official ReFINE code (verl ``compute_policy_loss``).

    Per token, with ρ = exp(logp − old_logp) and A the advantage::

        l = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))
        l = min(l, −A·c)          for A < 0 (dual clip, c = ``dual_clip``)

    Args:
        logps: [R, k] log-probs of the sampled tokens under the current policy (with gradients).
        old_logps: [R, k] log-probs under the sampling policy (no gradients needed).
        advantages: [R] (broadcast over the k tokens) or [R, k].
        mask: [R, k] tokens that count (default: all).
        epsilon_low / epsilon_high: clip range; ``epsilon_high=None`` means ``epsilon_low``.
        dual_clip: c > 1 for the dual clip of negative advantages, or None to disable it.
        reduction: ``"token-mean"`` (sum over the masked tokens / their number, official), ``"sum"`` or ``"none"``
            (the [R, k] per-token losses, masked to 0).
    Returns:
        (loss, stats) where stats holds detached ``clip_fraction`` (tokens whose ratio left the clip range in the
        direction that clips), ``dual_clip_fraction``, ``ratio_mean`` and ``num_tokens``.
    """
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError("clip epsilons must be >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (official 3.0) or None, got {dual_clip}")
    if logps.shape != old_logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and old_logps {tuple(old_logps.shape)} differ in shape")
    adv = advantages.to(logps.dtype)
    if adv.dim() == logps.dim() - 1:
        adv = adv.unsqueeze(-1)
    adv = adv.expand_as(logps)
    if mask is None:
        mask = torch.ones_like(logps, dtype=torch.bool)
    mask = mask.bool()

    log_ratio = (logps - old_logps.to(logps.dtype)).clamp(-20.0, 20.0)  # as verl: keeps exp() finite
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    per_token = per_token.masked_fill(~mask, 0.0)

    count = mask.sum()
    if reduction == "token-mean":
        loss = per_token.sum() / count.clamp(min=1)
    elif reduction == "sum":
        loss = per_token.sum()
    elif reduction == "none":
        loss = per_token
    else:
        raise ValueError(f"reduction must be 'token-mean', 'sum' or 'none', got {reduction!r}")

    with torch.no_grad():
        denom = count.clamp(min=1).float()
        clip_hit = (clipped > unclipped) & mask
        stats = {
            "clip_fraction": clip_hit.sum().float() / denom,
            "dual_clip_fraction": (dual & mask).sum().float() / denom,
            "ratio_mean": (ratio.detach() * mask).sum().float() / denom,
            "num_tokens": count.detach(),
        }
    return loss, stats


def masked_token_nll(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of −logp over the masked tokens, number of masked tokens). Divide one by the other for a token mean."""
    mask = mask.bool()
    return -(logps.float() * mask).sum(), mask.sum()
