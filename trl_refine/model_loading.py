"""Loading ``model="<hub id or local path>"`` for every model family we support.

TRL's ``create_model_from_path`` picks the architecture from ``transformers`` by name and falls back to the config's
``auto_map``, so it fails for model types that are registered with the Auto classes instead (fla's models, the
reference DeltaNet and LaCT of this package). We register them first (``import fla``, ``import trl_refine.models``)
and load through ``AutoModelForCausalLM``, with TRL's handling of ``model_init_kwargs`` (``dtype`` strings,
``device_map``, ``trust_remote_code``).

``trl-refine:<name>`` names a small checkpoint shipped inside the package (``trl_refine/assets/<name>/``, package
data, so ``pip install`` carries it): the embedded CPU defaults of the recipes start from one.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import trl_refine.models  # noqa: F401  (registers refine_delta_net and lact_swiglu)

PACKAGED_PREFIX = "trl-refine:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def register_model_families() -> list[str]:
    """Import the packages that register fast-weight model types with the Auto classes; returns those found."""
    found = ["trl_refine.models"]
    for name in ("fla",):  # flash-linear-attention: delta_net, gated_deltanet, ... (no kernels needed to load)
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append(name)
    return found


def packaged_models() -> list[str]:
    """Names of the checkpoints shipped in the package (``trl-refine:<name>``)."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_path(model_id: str) -> str:
    """The folder of a packaged checkpoint for ``trl-refine:<name>``; any other id or path unchanged."""
    if not isinstance(model_id, str) or not model_id.startswith(PACKAGED_PREFIX):
        return model_id
    name = model_id[len(PACKAGED_PREFIX) :]
    path = ASSETS_DIR / name
    if name and "/" not in name and (path / "config.json").is_file():
        return str(path)
    shipped = ", ".join(f"{PACKAGED_PREFIX}{n}" for n in packaged_models()) or "none"
    raise FileNotFoundError(
        f"model {model_id!r}: no such checkpoint shipped with trl-refine (looked for {path / 'config.json'}; "
        f"shipped: {shipped}). Reinstall the package (pip install -e . keeps the assets), pass another "
        "--model_name_or_path, or --random_model true for a randomly initialised tiny model."
    )


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} in model_init_kwargs: expected 'auto', 'bfloat16', 'float16' or 'float32'.")


def load_causal_lm(model_id: str, model_init_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(model_id, **model_init_kwargs)`` after registering our families
    (``model_id`` may name a packaged checkpoint, ``trl-refine:<name>``).

    As TRL: ``dtype`` defaults to float32 and may be a string, ``device_map`` defaults to None on CPU / in
    distributed runs and "auto" otherwise. An unknown model type fails with what to install or set.
    """
    model_id = resolve_model_path(model_id)
    kwargs = dict(model_init_kwargs or {})
    kwargs["dtype"] = _resolve_dtype(kwargs.get("dtype", "float32"))
    state = PartialState()
    if "device_map" not in kwargs:
        distributed = state.distributed_type.value in ("MULTI_GPU", "DEEPSPEED", "FSDP") or state.num_processes > 1
        kwargs["device_map"] = None if distributed or state.device.type in ("cpu", "mps") else "auto"
    families = register_model_families()
    trust = bool(kwargs.get("trust_remote_code", False))
    try:
        AutoConfig.from_pretrained(model_id, trust_remote_code=trust, revision=kwargs.get("revision"))
    except (ValueError, KeyError) as err:
        if "model type" not in str(err) and "model_type" not in str(err):
            raise
        raise ValueError(
            f"cannot load {model_id!r}: its model type is not registered ({err}). Registered families come from "
            f"{', '.join(families)}. Install flash-linear-attention for fla models, import the package that defines "
            "the model, or pass model_init_kwargs={'trust_remote_code': True} if the checkpoint ships its code."
        ) from err
    return AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
