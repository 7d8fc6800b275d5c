"""Rollout engines: given documents and positions, produce rollouts and the differentiable loss forward."""

from trl_refine.rollout.base import (
    DocumentBatch,
    RolloutEngine,
    RolloutOutput,
    RolloutPlan,
    ScanOutput,
    TrainForward,
)
from trl_refine.rollout.generic import GenericEngine
from trl_refine.rollout.onepass import OnePassEngine
from trl_refine.rollout.registry import build_engine, register_engine
from trl_refine.rollout.snapshot import SnapshotEngine

register_engine("snapshot", SnapshotEngine)
register_engine("onepass", OnePassEngine)  # after snapshot: `auto` keeps choosing the snapshot engine

__all__ = [
    "DocumentBatch",
    "GenericEngine",
    "OnePassEngine",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutPlan",
    "ScanOutput",
    "SnapshotEngine",
    "build_engine",
    "register_engine",
    "TrainForward",
]
