"""trl-refine: ReFINE (next-sequence-prediction RL, arXiv 2602.16704) for fast-weight language models, on TRL."""

__version__ = "0.1.0"

import trl_refine._warnings  # noqa: F401  (first: silences known harmless warnings)
from trl_refine.config import NSPGRPOConfig
from trl_refine.posttrain import NSPPostTrainer, PostTrainConfig
from trl_refine.rewards import cosine_reward, exact_match_reward, hybrid_reward
from trl_refine.testtime import TestTimeConfig, TestTimeRefine, test_time_refine
from trl_refine.trainer import NSPGRPOTrainer

__all__ = [
    "NSPGRPOConfig",
    "NSPGRPOTrainer",
    "cosine_reward",
    "exact_match_reward",
    "hybrid_reward",
    "__version__",
    "NSPPostTrainer",
    "PostTrainConfig",
    "TestTimeConfig",
    "TestTimeRefine",
    "test_time_refine",
]
