"""Token sampling shared by all engines.

Noise is drawn up front as one uniform per (row, step), and tokens come from the inverse CDF of
softmax(logits). Any engine that consumes the same noise for the same logits samples the same tokens, however it
batches its model calls, which makes engines comparable token for token under a fixed seed.
"""

from __future__ import annotations

import torch


def draw_noise(num_rows: int, num_steps: int, generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(num_rows, num_steps, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device)


def sample_from_logits(
    logits: torch.Tensor, uniforms: torch.Tensor, masked_token_ids: tuple[int, ...] = ()
) -> torch.Tensor:
    """[R, V] logits (temperature 1, no top-k/top-p), [R] uniforms in [0, 1) -> [R] token ids.

    ``masked_token_ids`` (EOS by default, see `RolloutPlan.masked_token_ids`) are never drawn: the release generates
    with ``min_new_tokens = max_new_tokens = k``, whose logits processor sets EOS to -inf. The old log-probs stay
    those of the unmasked distribution (the release recomputes them with a plain forward)."""
    logits = logits.double()
    if masked_token_ids:
        logits = logits.index_fill(-1, torch.as_tensor(masked_token_ids, device=logits.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp(max=logits.size(-1) - 1)


def masked_rollout_tokens(tokenizer, sample_eos: bool = False) -> tuple[int, ...]:
    """The token ids rollouts may not sample: the tokenizer's EOS (the release's ``min_new_tokens = k``), or none
    with ``sample_eos``."""
    eos = getattr(getattr(tokenizer, "tokenizer", tokenizer), "eos_token_id", None)
    if sample_eos or eos is None:
        return ()
    return (int(eos),)
