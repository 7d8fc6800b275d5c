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
from trl_refine.rollout.registry import build_engine, register_engine
from trl_refine.rollout.snapshot import SnapshotEngine

register_engine("snapshot", SnapshotEngine)

__all__ = [
    "DocumentBatch",
    "GenericEngine",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutPlan",
    "ScanOutput",
    "SnapshotEngine",
    "build_engine",
    "register_engine",
    "TrainForward",
]
