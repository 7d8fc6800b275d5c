"""Small helpers with one home each: left padding, middle truncation, a model's device, exact weight restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from trl_refine.rollout.base import DocumentBatch

__all__ = ["RESTORED_TENSORS", "left_pad", "local_tensor", "model_device", "restoring", "truncate_middle"]


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str | None = None) -> DocumentBatch:
    """Left-padded ids and attention mask of token sequences (the layout every engine and decoder expects)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s if isinstance(s, torch.Tensor) else list(s), dtype=torch.long)
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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: the device of its first parameter's local shard (FSDP2 shards parameters as
    DTensors), else ``model.device`` when it has one, else CPU."""
    p = next(model.parameters(), None)
    if p is not None:
        return local_tensor(p).device
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


#: which tensors `restoring` puts back: ``state_dict`` (everything ``model.state_dict()`` holds, loaded back with
#: ``load_state_dict``; the evaluator's adaptation hooks), ``trainable`` (the trainable parameters and all buffers,
#: persistent or not, copied back in place; test-time ReFINE), ``none`` (only the train flag)
RESTORED_TENSORS = ("state_dict", "trainable", "none")


@contextlib.contextmanager
def restoring(model: torch.nn.Module, tensors: str = "state_dict") -> Iterator[None]:
    """Snapshot the model's ``tensors`` (`RESTORED_TENSORS`; detached copies) and its train flag, and put both back
    exactly (same storage, copied bits) on exit. Optimizer state or other objects an adaptation creates are the
    caller's business."""
    if tensors not in RESTORED_TENSORS:
        raise ValueError(f"tensors={tensors!r} is not one of {', '.join(RESTORED_TENSORS)}")
    if tensors == "state_dict":
        saved = {name: t.detach().clone() for name, t in model.state_dict().items()}
    elif tensors == "trainable":
        named = [*((n, p) for n, p in model.named_parameters() if p.requires_grad), *model.named_buffers()]
        saved = {name: t.detach().clone() for name, t in named}
    else:
        saved = {}
    was_training = model.training
    try:
        yield
    finally:
        if tensors == "state_dict":
            model.load_state_dict(saved)
        elif saved:
            with torch.no_grad():
                for name, t in [*model.named_parameters(), *model.named_buffers()]:
                    if name in saved:
                        t.copy_(saved[name])
        model.train(was_training)
