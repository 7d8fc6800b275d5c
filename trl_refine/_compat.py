"""The only module that touches TRL's private names.

trl-refine subclasses `GRPOTrainer` and reuses some of its private methods (reward calculation, the PPO-clip loss with
all its loss types, and the log-prob hook that loss calls). These are not semver-protected, so we check them once at
import and fail loudly, with the supported range, if TRL drifted.
"""

from __future__ import annotations

import inspect

import trl
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, nanstd

SUPPORTED_TRL = ">=1.16.0,<1.17"

#: private GRPOTrainer methods we call or override, with the leading parameters we rely on
REQUIRED_METHODS: dict[str, tuple[str, ...]] = {
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_compute_loss": ("self", "model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ),
    "_prepare_inputs": ("self", "generation_batch"),
    "_generate_and_score_completions": ("self", "inputs"),
    # transformers.Trainer's: the all-reduced gradient norm, checked by the divergence guard
    "_get_grad_norm": ("self", "model", "grad_norm"),
}

#: private attributes set by GRPOTrainer.__init__ that we read or write
REQUIRED_ATTRIBUTES = ("_metrics", "_logs", "_buffered_inputs", "_step", "reward_func_names", "reward_weights")

#: fields of the fused LM head output we read
REQUIRED_FUSED_FIELDS = ("log_probs", "entropy", "label_mask")


class TRLCompatibilityError(RuntimeError):
    pass


def _fail(what: str) -> None:
    raise TRLCompatibilityError(
        f"trl_refine supports trl {SUPPORTED_TRL}, found trl {trl.__version__}: {what}. "
        f"Install a supported version: pip install 'trl{SUPPORTED_TRL}'."
    )


def check_trl_api() -> None:
    """Raise `TRLCompatibilityError` if a private TRL name we depend on is missing or changed."""
    for name, params in REQUIRED_METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            _fail(f"GRPOTrainer.{name} is missing")
        got = tuple(inspect.signature(method).parameters)[: len(params)]
        if got != params:
            _fail(f"GRPOTrainer.{name} parameters changed: expected {params}, got {got}")
    if getattr(GRPOTrainer, "loss_is_scaled_for_ga", None) is not True:
        _fail("GRPOTrainer.loss_is_scaled_for_ga is no longer True (gradient-accumulation scaling moved)")
    from trl.trainer.utils import FusedCausalLMOutput

    fields = set(getattr(FusedCausalLMOutput, "__dataclass_fields__", {}))
    missing = [f for f in REQUIRED_FUSED_FIELDS if f not in fields]
    if missing:
        _fail(f"FusedCausalLMOutput lost fields {missing}")
    if "fused_lm_head" not in inspect.getsource(add_fused_lm_head):
        _fail("add_fused_lm_head no longer takes the fused_lm_head keyword")


def check_trainer_attributes(trainer: GRPOTrainer) -> None:
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(trainer, a)]
    if missing:
        _fail(f"GRPOTrainer instances lack {missing}")


def use_transformers_torch_kernels(model_type: str) -> list[str]:
    """Make transformers' ``model_type`` modeling module call its own PyTorch reference kernels instead of the
    package kernels it bound at import (for ``qwen3_next`` and ``kimi_linear`` these are fla's Triton kernels when
    fla is installed, which fail on a CPU). Relies on transformers' kernel decorator keeping the reference function
    as ``__wrapped__`` (checked by a drift test). Returns the names it rebound; process-wide, for CPU runs."""
    import importlib
    import types

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    rebound = []
    for name, value in list(vars(module).items()):
        inner = getattr(value, "__wrapped__", None)
        is_kernel = isinstance(value, types.FunctionType) and isinstance(inner, types.FunctionType)
        if is_kernel and inner.__module__ == module.__name__ and inner is not value:
            setattr(module, name, inner)
            rebound.append(name)
    return rebound


check_trl_api()

__all__ = [
    "GRPOTrainer",
    "TRLCompatibilityError",
    "add_fused_lm_head",
    "check_trainer_attributes",
    "check_trl_api",
    "nanstd",
    "unwrap_model_for_generation",
    "use_transformers_torch_kernels",
]
