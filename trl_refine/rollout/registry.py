"""Engine choice: `auto` picks the fastest engine that supports the model, and says which and why."""

from __future__ import annotations

import logging

import torch

from trl_refine.rollout.base import RolloutEngine
from trl_refine.rollout.generic import GenericEngine

logger = logging.getLogger("trl_refine")

#: engines faster than the generic one, tried in registration order by `auto` (trl_refine/rollout/__init__.py
#: registers the one-pass engine, then the snapshot engine)
FAST_ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(name: str, cls: type[RolloutEngine]) -> None:
    FAST_ENGINES[name] = cls


def auto_problem(cls: type[RolloutEngine], model: torch.nn.Module, *, checkpoint_segments: bool = False) -> str:
    """Why `auto` does not pick ``cls`` for ``model`` with these engine options ('' when it does): the engine cannot
    run the model, is not yet verified on it (only forcing it runs it then), or cannot honour an option."""
    ok, why = cls.supports(model)
    if not ok:
        return why
    return getattr(cls, "unverified_reason", lambda m: "")(model) or cls.options_problem(
        checkpoint_segments=checkpoint_segments
    )


def build_engine(
    name: str,
    model: torch.nn.Module,
    *,
    pad_token_id: int = 0,
    rows_per_call: int | None = None,
    checkpoint_segments: bool = False,
) -> RolloutEngine:
    """Build the engine ``name`` (auto | generic | snapshot | onepass | any registered name) for ``model``.

    ``auto`` takes the first of `FAST_ENGINES` that `auto_problem` lets through (else the generic engine) and logs
    one line saying which and why, with the reasons the engines tried before it did not apply."""
    if name == "generic":
        logger.info("trl_refine: rollout engine = generic (forced by nsp_engine='generic')")
        return GenericEngine(rows_per_call=rows_per_call, pad_token_id=pad_token_id)
    if name != "auto":
        if name not in FAST_ENGINES:
            raise ValueError(
                f"nsp_engine={name!r} is not available (known: generic, {', '.join(FAST_ENGINES) or 'none'}). "
                "Use nsp_engine='auto' or 'generic'."
            )
        ok, why = FAST_ENGINES[name].supports(model)
        if not ok:
            raise ValueError(
                f"nsp_engine={name!r} cannot run {type(model).__name__}: {why}. Use nsp_engine='generic'."
            )
        logger.info("trl_refine: rollout engine = %s (forced by nsp_engine)", name)
        unverified = getattr(FAST_ENGINES[name], "unverified_reason", lambda m: "")(model)
        if unverified:
            logger.warning("trl_refine: %s", unverified)
        return FAST_ENGINES[name](pad_token_id=pad_token_id, checkpoint_segments=checkpoint_segments)
    skipped = []
    for engine_name, cls in FAST_ENGINES.items():
        why = auto_problem(cls, model, checkpoint_segments=checkpoint_segments)
        if not why:
            reason = "; ".join([cls.auto_reason(model)] + [f"not {s}" for s in skipped])
            logger.info("trl_refine: rollout engine = %s (auto: %s)", engine_name, reason)
            return cls(pad_token_id=pad_token_id, checkpoint_segments=checkpoint_segments)
        skipped.append(f"{engine_name}: {why}")
    logger.info(
        "trl_refine: rollout engine = generic (auto: %s)", "; ".join(skipped) or "no faster engine is installed"
    )
    return GenericEngine(rows_per_call=rows_per_call, pad_token_id=pad_token_id)
