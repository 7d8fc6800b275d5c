"""Engine choice: `auto` picks the fastest engine that supports the model, and says which and why."""

from __future__ import annotations

import logging

import torch

from trl_refine.rollout.base import RolloutEngine
from trl_refine.rollout.generic import GenericEngine

logger = logging.getLogger("trl_refine")

#: engines faster than the generic one, tried in order by `auto`; the snapshot engine registers itself here
FAST_ENGINES: dict[str, type[RolloutEngine]] = {}


def register_engine(name: str, cls: type[RolloutEngine]) -> None:
    FAST_ENGINES[name] = cls


def build_engine(
    name: str,
    model: torch.nn.Module,
    *,
    pad_token_id: int = 0,
    rows_per_call: int | None = None,
    checkpoint_segments: bool = False,
) -> RolloutEngine:
    """Build the engine ``name`` (auto | generic | snapshot | any registered name) for ``model``."""
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
    reasons = []
    for engine_name, cls in FAST_ENGINES.items():
        ok, why = cls.supports(model)
        if ok:  # an engine may run a model it is not yet verified on: only forcing it picks it then
            why = getattr(cls, "unverified_reason", lambda m: "")(model)
            ok = not why
        if ok:
            logger.info("trl_refine: rollout engine = %s (auto: %s supports it)", engine_name, type(model).__name__)
            return cls(pad_token_id=pad_token_id, checkpoint_segments=checkpoint_segments)
        reasons.append(f"{engine_name}: {why}")
    logger.info(
        "trl_refine: rollout engine = generic (auto: %s)", "; ".join(reasons) or "no faster engine is installed"
    )
    return GenericEngine(rows_per_call=rows_per_call, pad_token_id=pad_token_id)
