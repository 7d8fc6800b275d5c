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

__all__ = [
    "DocumentBatch",
    "GenericEngine",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutPlan",
    "ScanOutput",
    "TrainForward",
]
