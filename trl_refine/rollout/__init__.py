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

# `auto` tries them in this order: the one-pass engine where it applies (one document pass per step instead of n+1
# segment calls; exact against the snapshot engine, tests/test_onepass_engine.py), else the snapshot engine
register_engine("onepass", OnePassEngine)
register_engine("snapshot", SnapshotEngine)

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
