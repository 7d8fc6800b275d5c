"""Helpers to score token sequences with any causal LM: log-probs, entropies and last-layer hidden states.

Scoring goes through TRL's fused LM head (``model(..., labels=..., fused_lm_head=True)``), which never
materialises the ``[batch, length, vocab]`` logits and gathers sharded LM-head weights under FSDP / ZeRO-3.
Hidden states are captured with a forward hook on the backbone, so no submodule is called directly.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch

from trl_refine._compat import add_fused_lm_head


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed (``.module``) and PEFT wrappers down to the transformers model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    parameters = inspect.signature(cls.forward).parameters
    return (
        "cache_params" if "cache_params" in parameters and "past_key_values" not in parameters else "past_key_values"
    )


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` for a forward continuing ``cache``: ``past_key_values`` for most causal LMs,
    ``cache_params`` for transformers' Mamba / Mamba-2, which silently ignore a ``past_key_values`` argument (and
    would start from an empty state)."""
    return {_cache_keyword_of(type(unwrap(model))): cache}


def output_cache(out):
    """The cache a forward returned (``past_key_values``, or ``cache_params`` for transformers' Mamba / Mamba-2)."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache_params", None)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output carries ``last_hidden_state`` (what the fused head calls as ``base_model``)."""
    base = unwrap(model)
    return getattr(base, "base_model", base)


def has_fused_lm_head(model: torch.nn.Module) -> bool:
    return "forward" in vars(unwrap(model))


def ensure_fused_lm_head(model: torch.nn.Module) -> None:
    """Patch TRL's fused LM head onto ``model`` unless already done (the trainer does it at init)."""
    base = unwrap(model)
    if not has_fused_lm_head(base):
        add_fused_lm_head(base, outputs=("log_probs", "entropy"))


@contextmanager
def fused_lm_head(model: torch.nn.Module):
    """TRL's fused LM head for scoring, removed again afterwards if this call was the one to add it."""
    base = unwrap(model)
    had = has_fused_lm_head(base)
    ensure_fused_lm_head(base)
    try:
        yield
    finally:
        if not had and "forward" in vars(base):
            del base.forward


@contextmanager
def capture_last_hidden_state(model: torch.nn.Module):
    """Yield a dict whose ``"hidden"`` entry holds the backbone's ``last_hidden_state`` after each forward."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0] if isinstance(output, tuple) else output
        store["hidden"] = hidden

    handle = backbone_of(model).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def next_token_labels(input_ids: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """Labels for the fused head so that position t is scored on ``input_ids[t + 1]`` iff ``score_mask[t]``."""
    labels = torch.full_like(input_ids, -100)
    labels[:, 1:] = input_ids[:, 1:].masked_fill(~score_mask[:, :-1].bool(), -100)
    return labels


def score_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    want_hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward of ``model`` over ``input_ids``.

    Returns ``(logps, entropy, hidden)``, each aligned so that index t refers to predicting ``input_ids[t + 1]``:
    logps/entropy are [B, L] (0 where ``score_mask`` is False and in the last column) and hidden is the [B, L, H]
    backbone output (``None`` unless ``want_hidden``). Gradients flow if enabled by the caller.
    """
    labels = next_token_labels(input_ids, score_mask)
    if want_hidden:
        with capture_last_hidden_state(model) as store:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        hidden = store["hidden"]
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        hidden = None
    pad = input_ids.new_zeros((input_ids.size(0), 1), dtype=out.log_probs.dtype)
    logps = torch.cat([out.log_probs, pad], dim=1)
    entropy = None if out.entropy is None else torch.cat([out.entropy, pad.to(out.entropy.dtype)], dim=1)
    return logps, entropy, hidden


def _chunk_logps(hidden, weight, bias, labels, want_entropy: bool):
    try:
        released = weight.numel() > 0 and weight.untyped_storage().size() == 0
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        released = False
    if released:
        raise RuntimeError(
            "the LM-head weight has no storage any more: a sharding wrapper (FSDP2) released it before this chunk of "
            "the LM head was computed or recomputed in the backward. The snapshot engine keeps the head's FSDP2 group "
            "gathered through the backward (trl_refine.rollout.fsdp_head.hold_lm_head); code of your own that calls "
            "lm_head_logps under FSDP2 must do the same. Otherwise use nsp_engine='generic' with FSDP2."
        )
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    if not want_entropy:
        return logps, torch.zeros_like(logps)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def lm_head_logps(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    want_entropy: bool = False,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``labels`` [N] under ``lm_head(hidden)`` [N, H], in checkpointed chunks of tokens
    so the [N, vocab] logits never live at once (neither in the forward nor for the backward)."""
    head = unwrap(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.dtype)
    outs, ents = [], []
    for start in range(0, hidden.size(0), chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_logps, h, weight, bias, y, want_entropy, use_reentrant=False
            )
        else:
            lp, ent = _chunk_logps(h, weight, bias, y, want_entropy)
        outs.append(lp)
        ents.append(ent)
    if not outs:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if want_entropy else None)
    return torch.cat(outs), (torch.cat(ents).detach() if want_entropy else None)
