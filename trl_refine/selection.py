"""Entropy smoothing and position selection (DESIGN.md §2 step 2). Pure torch, no TRL.

A selected position ``t`` is the last prefix token; the continuation starts at ``t + 1``. Positions are in the
coordinates of the (left-padded) document tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_entropy(entropy: torch.Tensor, width: int) -> torch.Tensor:
    """Centred moving average of width ``width`` along the last dim, zero-padded at the edges (as the official
    ``avg_pool1d(..., padding=width // 2)`` with ``count_include_pad=True``). ``width`` must be odd; 1 = identity."""
    if width < 1 or width % 2 == 0:
        raise ValueError(f"smoothing width must be a positive odd number, got {width}")
    if width == 1:
        return entropy
    x = entropy.float().unsqueeze(1)
    return F.avg_pool1d(x, kernel_size=width, stride=1, padding=width // 2, count_include_pad=True).squeeze(1)


def chunk_bounds(first_valid: torch.Tensor, length: int, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, n] start (inclusive) and end (exclusive) of n equal chunks of the valid tokens ``[first, length)``.

    Each chunk has ``(length - first) // n`` tokens, as in the official code; the remainder at the end is unused.
    """
    valid = length - first_valid  # [B]
    size = torch.div(valid, num_chunks, rounding_mode="floor")
    j = torch.arange(num_chunks, device=first_valid.device)
    start = first_valid[:, None] + j[None, :] * size[:, None]
    return start, start + size[:, None]


def select_positions(
    entropy: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_chunks: int,
    rollout_length: int,
    margin: int,
    strategy: str = "entropy",
    smoothing_width: int = 5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.LongTensor:
    """Choose one prefix end per chunk for every document.

    Args:
        entropy: [B, L] next-token entropy at every position (values at pad positions are ignored).
        attention_mask: [B, L] left-padded validity mask.
    Returns:
        [B, n] positions t such that the continuation ``t + 1 .. t + k`` lies inside the document, with at least
        ``margin`` valid tokens before ``t + 1`` and ``max(k, margin)`` from ``t + 1`` to the end.
    """
    if strategy not in ("entropy", "uniform", "argmax", "argmin"):
        raise ValueError(f"unknown selection strategy {strategy!r}")
    bsz, length = entropy.shape
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("documents must be left-padded (the last column of attention_mask must be all ones)")
    first = length - mask.sum(-1)
    start, end = chunk_bounds(first, length, num_chunks)
    if bool(((end - start) < 1).any()):
        raise ValueError(f"a document has fewer valid tokens than num_chunks={num_chunks}")

    raw = entropy.float().masked_fill(~mask, 0.0)
    # the release smooths only for sampling (entropy, uniform); argmax / argmin read the raw entropy
    scores = raw if strategy in ("argmax", "argmin") else smooth_entropy(raw, smoothing_width)
    idx = torch.arange(length, device=entropy.device)
    in_chunk = (idx[None, None, :] >= start[..., None]) & (idx[None, None, :] < end[..., None])  # [B, n, L]
    if strategy == "argmin":
        # the last valid token has no next-token label (its entropy is 0 here, a real value in the release): never
        # the minimum
        has_label = torch.zeros_like(mask)
        has_label[:, :-1] = mask[:, :-1] & mask[:, 1:]
        scores = scores.masked_fill(~has_label, float("inf"))
    chunk_scores = scores[:, None, :].expand(bsz, num_chunks, length)

    if strategy == "argmax":
        pos = chunk_scores.masked_fill(~in_chunk, float("-inf")).argmax(-1)
    elif strategy == "argmin":
        pos = chunk_scores.masked_fill(~in_chunk, float("inf")).argmin(-1)
    else:
        if strategy == "uniform":
            logits = torch.zeros_like(chunk_scores)
        else:
            logits = chunk_scores / temperature
        probs = torch.softmax(logits.masked_fill(~in_chunk, float("-inf")), dim=-1)
        flat = probs.reshape(-1, length)
        if generator is not None and generator.device != flat.device:
            flat = flat.to(generator.device)
        pos = torch.multinomial(flat, 1, generator=generator).reshape(bsz, num_chunks).to(entropy.device)

    # continuation start r = t + 1 in [first + margin, length - max(k, margin)]
    lo = first[:, None] + margin
    hi = torch.full_like(lo, length - max(rollout_length, margin))
    if bool((hi < lo).any()):
        raise ValueError(
            f"a document is too short for margin={margin} and rollout_length={rollout_length}; "
            "filter short documents first"
        )
    r = torch.minimum(torch.maximum(pos + 1, lo), hi)
    return r - 1


def selection_probabilities(
    entropy: torch.Tensor, attention_mask: torch.Tensor, *, num_chunks: int, smoothing_width: int, temperature: float
) -> torch.Tensor:
    """[B, n, L] the per-chunk sampling distribution of the entropy strategy (before clamping), for tests/metrics."""
    bsz, length = entropy.shape
    mask = attention_mask.bool()
    first = length - mask.sum(-1)
    start, end = chunk_bounds(first, length, num_chunks)
    scores = smooth_entropy(entropy.float().masked_fill(~mask, 0.0), smoothing_width)
    idx = torch.arange(length, device=entropy.device)
    in_chunk = (idx[None, None, :] >= start[..., None]) & (idx[None, None, :] < end[..., None])
    logits = (scores[:, None, :] / temperature).expand(bsz, num_chunks, length)
    return torch.softmax(logits.masked_fill(~in_chunk, float("-inf")), dim=-1)
