"""The only module that touches private names of TRL, transformers, accelerate and torch.

trl-refine subclasses `GRPOTrainer` and reuses some of its private methods (reward calculation, the PPO-clip loss with
all its loss types, and the log-prob hook that loss calls). These are not semver-protected, so we check them once at
import and fail loudly, with the supported range, if TRL drifted.

Post-training's nested step makes the calls the HF ``Trainer`` makes at a sync step (``Trainer._clip_grad_norm``,
``Trainer._defer_fsdp_gradient_reduction``, accelerate's ``GradientState._set_sync_gradients``), and the snapshot
engine's FSDP2 LM-head hold reads FSDP2's parameter groups (``FSDPModule._get_fsdp_state`` and the state's
``_fsdp_param_groups``, ``_auto_reshard_after_forward``, a group's ``_training_state`` and
``torch.distributed.fsdp._fully_shard._fsdp_common.TrainingState``); the shared-prefix attention of the transformers
hybrids switches a model's ``config._attn_implementation`` and, for kimi_linear, wraps its MLA layers' latent
expansion (``KimiLinearAttention.expand_kv``, which the layer's forward calls on what the cache returned); transformers'
Mamba mixer (``MambaMixer``, whose class the snapshot engine swaps for one continuing the cached state) and
Mamba-2 chunked scan (``mamba2_chunk_scan``, which fla's Mamba-2 layers continue a cached state through); the
snapshot engine's checkpointed segments flatten
recurrent states with ``torch.utils._pytree``. The wrappers below are the only users;
`check_private_api` (run by the drift test) says which one moved.
"""

from __future__ import annotations

import contextlib
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


# ---- transformers / accelerate / torch private names -------------------------------------------------------------
class PrivateAPIDrift(RuntimeError):
    pass


def _drift(what: str) -> PrivateAPIDrift:
    import accelerate
    import torch
    import transformers

    return PrivateAPIDrift(
        f"{what} (transformers {transformers.__version__}, accelerate {accelerate.__version__}, torch "
        f"{torch.__version__}); trl_refine relies on it, see trl_refine/_compat.py. Use the versions in setup.cfg."
    )


def trainer_clip_grad_norm(trainer, model):
    """``Trainer._clip_grad_norm(model)``: what the Trainer calls before ``optimizer.step()`` at a sync step."""
    method = getattr(trainer, "_clip_grad_norm", None)
    if method is None:
        raise _drift("transformers.Trainer._clip_grad_norm is missing")
    return method(model)


def trainer_defer_fsdp_gradient_reduction(trainer):
    """``Trainer._defer_fsdp_gradient_reduction()``: the Trainer's ``no_sync`` for FSDP loaded by transformers."""
    method = getattr(trainer, "_defer_fsdp_gradient_reduction", None)
    if method is None:
        raise _drift("transformers.Trainer._defer_fsdp_gradient_reduction is missing")
    return method()


def set_sync_gradients(gradient_state, value: bool) -> None:
    """accelerate's ``GradientState._set_sync_gradients`` (what ``accelerator.accumulate`` toggles)."""
    method = getattr(gradient_state, "_set_sync_gradients", None)
    if method is None:
        raise _drift("accelerate GradientState._set_sync_gradients is missing")
    method(value)


def is_fsdp_managed_module(model) -> bool:
    """transformers' ``is_fsdp_managed_module`` (False where this transformers has none)."""
    try:
        from transformers.distributed.fsdp import is_fsdp_managed_module as check
    except ImportError:  # pragma: no cover - other transformers layouts
        return False
    return bool(check(model))


def fsdp2_state(module):
    """``FSDPModule._get_fsdp_state()``."""
    getter = getattr(module, "_get_fsdp_state", None)
    if getter is None:
        raise _drift("torch FSDPModule._get_fsdp_state is missing")
    return getter()


def fsdp2_param_groups(module) -> list:
    """The FSDP2 parameter groups of one ``FSDPModule`` (torch >= 2.12 keeps a list, earlier ones a single group)."""
    state = fsdp2_state(module)
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def fsdp2_auto_reshard_after_forward(state):
    return getattr(state, "_auto_reshard_after_forward", None)


def set_fsdp2_auto_reshard_after_forward(state, value) -> None:
    state._auto_reshard_after_forward = value


def fsdp2_training_states(groups) -> list:
    return [group._training_state for group in groups]


def fsdp2_clear_leftover_forward_state(groups) -> None:
    """Set groups left in FSDP2's FORWARD training state back to IDLE (no model call is running)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    except ImportError as err:
        raise _drift("torch.distributed.fsdp._fully_shard._fsdp_common.TrainingState moved") from err
    for group in groups:
        if group._training_state == TrainingState.FORWARD:
            group._training_state = TrainingState.IDLE


def attn_implementation(model) -> str | None:
    """``model.config._attn_implementation``: the name transformers' attention layers look up in
    ``ALL_ATTENTION_FUNCTIONS`` at every call (so a change applies to the next call)."""
    return model.config._attn_implementation


def set_attn_implementation(model, name: str | None) -> None:
    """Set ``model.config._attn_implementation`` (and its sub-configs') without `PreTrainedModel.set_attn_implementation`'s
    checks and submodule walk: the shared-prefix attention switches it around the engine's branch calls only."""
    model.config._attn_implementation = name


#: the latent-attention (MLA) classes whose forward calls ``self.expand_kv(kv_nope, k_rot)`` on what
#: ``past_key_values.update`` returned, before the attention interface: ``(module, class name)``
MLA_EXPANDING_CLASSES = (("transformers.models.kimi_linear.modeling_kimi_linear", "KimiLinearAttention"),)


def _mla_classes() -> tuple[type, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(module), name) for module, name in MLA_EXPANDING_CLASSES)


@contextlib.contextmanager
def mla_expand_kv_wrapped(model, wrap):
    """Inside the context, every MLA layer of ``model`` (`MLA_EXPANDING_CLASSES`) expands its cached latents with
    ``wrap(its expand_kv)``; its own method again on exit (an instance attribute shadowing the class's, removed)."""
    layers = [m for m in model.modules() if isinstance(m, _mla_classes())]
    missing = object()
    saved = [m.__dict__.get("expand_kv", missing) for m in layers]
    for layer in layers:
        layer.expand_kv = wrap(layer.expand_kv)
    try:
        yield layers
    finally:
        for layer, before in zip(layers, saved):
            if before is missing:
                del layer.expand_kv
            else:
                layer.expand_kv = before


#: transformers' Mamba (v1) mixer: its PyTorch path starts every multi-token scan from a zero state (its selective
#: scan takes no initial state), so the snapshot engine swaps in a subclass whose forward continues the cached state
#: (`trl_refine.rollout.adapters.transformers_mamba`); ``(module, class name)``
MAMBA_MIXER = ("transformers.models.mamba.modeling_mamba", "MambaMixer")
#: the mixer attributes that subclass reads (set by ``MambaMixer.__init__``)
MAMBA_MIXER_ATTRIBUTES = (
    "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "act", "layer_idx", "time_step_rank",
    "ssm_state_size", "conv_kernel_size",
)  # fmt: skip


def mamba_mixer_class() -> type:
    """transformers' ``MambaMixer`` (`MAMBA_MIXER`)."""
    import importlib

    module, name = MAMBA_MIXER
    return getattr(importlib.import_module(module), name)


#: transformers' Mamba-2 chunked SSD scan (PyTorch, or mamba_ssm's kernel when installed), which takes an initial
#: state: fla's Mamba-2 layer, whose own scan does not, continues a cached state through it
#: (`trl_refine.rollout.adapters.fla_mamba`); ``(module, function name)`` and the keywords passed
MAMBA2_CHUNK_SCAN = ("transformers.models.mamba2.modeling_mamba2", "mamba2_chunk_scan")
MAMBA2_CHUNK_SCAN_KEYWORDS = (
    "chunk_size", "D", "dt_bias", "initial_states", "dt_softplus", "dt_limit", "return_final_states",
)  # fmt: skip


def _mamba2_chunk_scan():
    import importlib

    module, name = MAMBA2_CHUNK_SCAN
    return getattr(importlib.import_module(module), name)


def mamba2_chunk_scan(x, dt, A, B, C, **kwargs):
    """transformers' ``mamba2_chunk_scan`` (`MAMBA2_CHUNK_SCAN`): ``(y [B, T, H, P], final state [B, H, P, N])`` with
    ``return_final_states=True``."""
    return _mamba2_chunk_scan()(x, dt, A, B, C, **kwargs)


def tree_flatten(tree):
    """``torch.utils._pytree.tree_flatten``: the leaves of nested tuples / lists / dicts and how to rebuild them."""
    from torch.utils import _pytree

    return _pytree.tree_flatten(tree)


def tree_unflatten(leaves, spec):
    """``torch.utils._pytree.tree_unflatten``: the inverse of `tree_flatten`."""
    from torch.utils import _pytree

    return _pytree.tree_unflatten(leaves, spec)


def check_private_api() -> None:
    """Raise `PrivateAPIDrift` if a private transformers / accelerate / torch name we use is gone."""
    from accelerate.state import GradientState
    from transformers import Trainer

    for owner, name in (
        (Trainer, "_clip_grad_norm"),
        (Trainer, "_defer_fsdp_gradient_reduction"),
        (GradientState, "_set_sync_gradients"),
    ):
        if not callable(getattr(owner, name, None)):
            raise _drift(f"{owner.__module__}.{owner.__qualname__}.{name} is missing")
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as err:
        raise _drift(f"torch's FSDP2 internals moved: {err}") from err
    if not callable(getattr(FSDPModule, "_get_fsdp_state", None)):
        raise _drift("torch FSDPModule._get_fsdp_state is missing")
    if not {"FORWARD", "IDLE"} <= set(TrainingState.__members__):
        raise _drift("torch FSDP2 TrainingState lost FORWARD / IDLE")
    state = FSDPState()
    if not hasattr(state, "_fsdp_param_groups") and not hasattr(state, "_fsdp_param_group"):
        raise _drift("torch FSDPState has neither _fsdp_param_groups nor _fsdp_param_group")
    if not hasattr(state, "_auto_reshard_after_forward"):
        raise _drift("torch FSDPState._auto_reshard_after_forward is missing")
    from transformers import PreTrainedConfig

    prop = getattr(PreTrainedConfig, "_attn_implementation", None)
    if not isinstance(prop, property) or prop.fset is None:
        raise _drift("transformers PreTrainedConfig._attn_implementation is no longer a settable property")
    for cls in _mla_classes():
        expand = getattr(cls, "expand_kv", None)
        if not callable(expand) or tuple(inspect.signature(expand).parameters) != ("self", "kv_nope", "k_rot"):
            raise _drift(f"{cls.__module__}.{cls.__qualname__}.expand_kv(self, kv_nope, k_rot) is missing or changed")
        source = inspect.getsource(cls.forward)
        update = source.find("past_key_values.update(kv_nope, k_rot")
        if update < 0 or source.find("self.expand_kv(kv_nope, k_rot)", update) < 0:
            raise _drift(
                f"{cls.__qualname__}.forward no longer expands (expand_kv) the latents that past_key_values.update "
                "returns"
            )
    mixer = mamba_mixer_class()
    params = tuple(inspect.signature(mixer.forward).parameters)[:4]
    if params != ("self", "hidden_states", "cache_params", "attention_mask"):
        raise _drift(f"{MAMBA_MIXER[1]}.forward(self, hidden_states, cache_params, attention_mask) changed: {params}")
    init = inspect.getsource(mixer.__init__)
    missing = [a for a in MAMBA_MIXER_ATTRIBUTES if f"self.{a} =" not in init]
    if missing:
        raise _drift(f"{MAMBA_MIXER[1]}.__init__ no longer sets {', '.join(missing)}")
    scan = _mamba2_chunk_scan()
    params = inspect.signature(inspect.unwrap(scan)).parameters
    missing = [k for k in MAMBA2_CHUNK_SCAN_KEYWORDS if k not in params]
    if list(params)[:5] != ["hidden_states", "dt", "A", "B", "C"] or missing:
        raise _drift(f"{MAMBA2_CHUNK_SCAN[1]}(hidden_states, dt, A, B, C, ...) changed (missing: {missing})")
    from torch.utils import _pytree

    for name in ("tree_flatten", "tree_unflatten"):
        if not callable(getattr(_pytree, name, None)):
            raise _drift(f"torch.utils._pytree.{name} is missing")


__all__ = [
    "PrivateAPIDrift",
    "attn_implementation",
    "check_private_api",
    "fsdp2_auto_reshard_after_forward",
    "fsdp2_clear_leftover_forward_state",
    "fsdp2_param_groups",
    "fsdp2_state",
    "fsdp2_training_states",
    "is_fsdp_managed_module",
    "mamba2_chunk_scan",
    "mamba_mixer_class",
    "mla_expand_kv_wrapped",
    "set_attn_implementation",
    "set_fsdp2_auto_reshard_after_forward",
    "set_sync_gradients",
    "trainer_clip_grad_norm",
    "trainer_defer_fsdp_gradient_reduction",
    "tree_flatten",
    "tree_unflatten",
    "GRPOTrainer",
    "TRLCompatibilityError",
    "add_fused_lm_head",
    "check_trainer_attributes",
    "check_trl_api",
    "nanstd",
    "unwrap_model_for_generation",
    "use_transformers_torch_kernels",
]
