"""``fla_gated_kernel``: which kernel fla's GatedDeltaNet layers run while trl_refine trains, evaluates or adapts.

* ``fla`` (default, faithful): fla's own chunk op; nothing is swapped.
* ``trl_refine``: our gated chunk kernel, through `use_trl_refine_gated_kernel` (``fla_gated_patch``: the same math,
  a backward that never calls the function fla 0.6.0 refuses on Hopper with 3.4.0 <= triton < 3.7.1, fla #640).
  A model without fla GatedDeltaNet layers is refused when the choice is resolved (trainer construction, the start
  of test-time adaptation), not mid-step.
* ``auto``: ``trl_refine`` exactly where fla 0.6.0 would refuse its gated backward (the model has fla GatedDeltaNet
  layers, the device is a CUDA GPU of compute capability 9.x and 3.4.0 <= triton < 3.7.1, the condition of
  ``chunk_bwd_dqkwg``, ``fla/ops/common/chunk_o.py:727``), else ``fla``; one log line says which and why. It does
  not look for tilelang, fla's other way out: where that is installed ``auto`` still swaps (same math).

The default path imports nothing; the other two import fla_gated_patch (fla and triton) only when resolved.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

logger = logging.getLogger("trl_refine")

__all__ = [
    "FLA_GATED_KERNELS",
    "check_fla_gated_kernel",
    "fla_gated_kernel_block",
    "fla_refuses_gated_backward",
    "resolve_fla_gated_kernel",
]

FLA_GATED_KERNELS = ("fla", "trl_refine", "auto")
#: the triton versions [from, to) in which fla 0.6.0 refuses its gated chunk backward on Hopper (fla #640)
REFUSED_TRITON = ("3.4.0", "3.7.1")
#: the module fla's GatedDeltaNet layer class lives in (fla_gated_patch.FLA_LAYER_MODULE; a test checks they agree):
#: while it is not imported, no model can hold such a layer, so nothing needs fla or triton to tell
_FLA_LAYER_MODULE = "fla.layers.gated_deltanet"


def check_fla_gated_kernel(choice: str) -> None:
    """Refuse an unknown ``fla_gated_kernel``, naming the three choices."""
    if choice not in FLA_GATED_KERNELS:
        raise ValueError(
            f"fla_gated_kernel={choice!r} is not one of {', '.join(FLA_GATED_KERNELS)}: 'fla' (the default, fla's own "
            "kernel), 'trl_refine' (our gated chunk kernel for fla GatedDeltaNet models, e.g. to train them on Hopper "
            "with triton < 3.7.1) or 'auto' (trl_refine only where fla would refuse)."
        )


def fla_refuses_gated_backward(device: torch.device | str) -> tuple[bool, str]:
    """Whether fla 0.6.0 refuses its gated chunk backward on ``device`` (``auto``'s rule), and why in words."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"the device is {device.type}, not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"compute capability {major}.{minor} is not Hopper (9.x)"
    try:
        import triton
        from packaging.version import Version
    except ImportError as err:
        return False, f"triton is not importable ({err})"
    low, high = REFUSED_TRITON
    version = Version(triton.__version__)
    if not Version(low) <= version < Version(high):
        return False, f"Hopper (capability {major}.{minor}) with triton {triton.__version__}, outside [{low}, {high})"
    return True, f"Hopper (capability {major}.{minor}) with triton {triton.__version__} in [{low}, {high}) (fla #640)"


def _gated_layers(model: torch.nn.Module) -> int:
    if _FLA_LAYER_MODULE not in sys.modules:
        return 0
    from trl_refine.kernels.fla_gated_patch import gated_layer_count

    return gated_layer_count(model)


def resolve_fla_gated_kernel(choice: str, model: torch.nn.Module, device: torch.device | str) -> str:
    """The kernel ``choice`` means for ``model`` on ``device``: ``"fla"`` or ``"trl_refine"``. Raises ValueError for
    an unknown choice and for ``trl_refine`` on a model without fla GatedDeltaNet layers; logs ``auto``'s pick."""
    check_fla_gated_kernel(choice)
    if choice == "fla":
        return "fla"
    layers = _gated_layers(model)
    name = type(model).__name__
    if choice == "trl_refine":
        if layers == 0:
            raise ValueError(
                f"fla_gated_kernel='trl_refine' swaps the chunk op of fla's GatedDeltaNet layers ({_FLA_LAYER_MODULE}"
                f".GatedDeltaNet), and {name} has none (transformers' qwen3_next binds fla's op in its own module and "
                "is not covered). Set fla_gated_kernel='fla' (the default) or 'auto'."
            )
        return "trl_refine"
    if layers == 0:
        kernel, why = "fla", f"{name} has no fla GatedDeltaNet layer, nothing to swap"
    else:
        refuses, why = fla_refuses_gated_backward(device)
        kernel = "trl_refine" if refuses else "fla"
        why = ("fla 0.6.0 refuses its gated backward here: " if refuses else "fla's backward runs here: ") + why
    logger.info(
        "trl_refine: fla_gated_kernel=auto: %s (%s)",
        "trl_refine's gated chunk kernel runs fla's GatedDeltaNet layers"
        if kernel == "trl_refine"
        else "fla's kernel",
        why,
    )
    return kernel


def fla_gated_kernel_block(kernel: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The block a resolved kernel (`resolve_fla_gated_kernel`) runs in: nothing for ``fla``, the swap
    (`use_trl_refine_gated_kernel`, process-wide while active, nestable) for ``trl_refine``."""
    if kernel == "fla":
        return contextlib.nullcontext()
    if kernel != "trl_refine":
        raise ValueError(f"resolve fla_gated_kernel first: got {kernel!r}, expected 'fla' or 'trl_refine'")
    from trl_refine.kernels.fla_gated_patch import use_trl_refine_gated_kernel

    return use_trl_refine_gated_kernel(model)
