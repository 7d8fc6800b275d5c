"""Small helpers with one home each: left padding, middle truncation, a model's device, exact weight restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from trl_refine.rollout.base import DocumentBatch

__all__ = ["left_pad", "model_device", "restored_weights", "truncate_middle"]


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None) -> DocumentBatch:
    """Left-padded ids and attention mask of token sequences (the layout every engine and decoder expects)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    batch = DocumentBatch(ids, mask)
    return batch if device is None else batch.to(device)


def truncate_middle(ids: list[int], limit: int | None) -> list[int]:
    """Keep the first ``limit // 2`` and the last ``limit - limit // 2`` ids (LongBench's middle truncation)."""
    if limit is None or len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


#: how a prompt longer than a limit is cut: ``middle`` (LongBench; post-training's ``long_examples="truncate"``)
#: keeps its start and its end with the question, ``end`` (post-training's ``long_examples="truncate_end"``, the
#: release's ``rl_dataset.py`` for training and validation prompts alike) keeps its first ``limit`` ids
PROMPT_TRUNCATIONS = ("middle", "end")


def truncate_prompt(ids: list[int], limit: int | None, how: str = "middle") -> list[int]:
    """``ids`` cut to ``limit`` tokens the way ``how`` (`PROMPT_TRUNCATIONS`) says; unchanged if they fit."""
    if how not in PROMPT_TRUNCATIONS:
        raise ValueError(f"prompt_truncation={how!r} is not one of {', '.join(PROMPT_TRUNCATIONS)}")
    if how == "end":
        return ids if limit is None else ids[:limit]
    return truncate_middle(ids, limit)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (``model.device`` when it has one; CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def restored_weights(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put the trainable parameters and all buffers back exactly (same storage, copied bits) on exit."""
    if not enabled:
        yield
        return
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(params[name])
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
