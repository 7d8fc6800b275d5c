"""Convert between fla's ``DeltaNetForCausalLM`` (Triton kernels, GPU) and the reference DeltaNet (pure PyTorch).

Both use the same config fields and parameter names, so a conversion is the config's ``model_type`` plus a strict
state-dict load; that the two compute the same function is what
``tests/gpu/test_gpu_parity.py::test_reference_delta_net_matches_fla`` checks on a GPU. Typical use: pretrain fla
DeltaNet on a GPU, ship the reference model for CPU users (``trl_refine/assets/``)::

    python -m trl_refine.models.delta_net.convert to-reference fla_checkpoint/ reference_checkpoint/
    python -m trl_refine.models.delta_net.convert to-fla reference_checkpoint/ fla_checkpoint/

Neither direction imports fla: an fla checkpoint is read and written as files (``config.json`` with
``model_type: delta_net`` and safetensors), and an fla model object is read through ``config`` / ``state_dict()``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from .configuration_delta_net import FLA_MODEL_TYPE, RefDeltaNetConfig
from .modeling_delta_net import RefDeltaNetForCausalLM

_NOT_CONFIG = ("_name_or_path", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")


def reference_from_fla(fla_model: Any, dtype: torch.dtype = torch.float32) -> RefDeltaNetForCausalLM:
    """The reference model with the weights of an fla ``DeltaNetForCausalLM`` object (any device; result on CPU)."""
    fields = {k: v for k, v in fla_model.config.to_dict().items() if k not in _NOT_CONFIG}
    config = RefDeltaNetConfig.from_fla_config(fields)
    return _load(config, {k: v.detach().to("cpu", dtype) for k, v in fla_model.state_dict().items()})


def load_fla_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> RefDeltaNetForCausalLM:
    """The reference model from an fla checkpoint folder (``config.json`` + ``*.safetensors``), without fla."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") not in (FLA_MODEL_TYPE, RefDeltaNetConfig.model_type):
        raise ValueError(
            f"{path}: model_type={raw.get('model_type')!r} is not a DeltaNet checkpoint (expected {FLA_MODEL_TYPE!r})."
        )
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (save the fla model with safe_serialization=True).")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    config = RefDeltaNetConfig.from_fla_config({k: v for k, v in raw.items() if k not in _NOT_CONFIG})
    return _load(config, {k: v.to(dtype) for k, v in state.items()})


def _load(config: RefDeltaNetConfig, state: dict[str, torch.Tensor]) -> RefDeltaNetForCausalLM:
    model = RefDeltaNetForCausalLM(config)
    if config.tie_word_embeddings and "lm_head.weight" not in state:  # tied checkpoints may store one copy
        state = {**state, "lm_head.weight": state["model.embeddings.weight"]}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def save_fla_checkpoint(model: RefDeltaNetForCausalLM, path: str) -> None:
    """Write the reference model as an fla checkpoint (``model_type: delta_net``) that
    ``fla.models.DeltaNetForCausalLM.from_pretrained`` (or ``AutoModelForCausalLM`` after ``import fla``) loads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_CONFIG}
    config.update(model_type=FLA_MODEL_TYPE, architectures=["DeltaNetForCausalLM"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("direction", choices=("to-reference", "to-fla"))
    p.add_argument("src")
    p.add_argument("dst")
    a = p.parse_args(argv)
    if a.direction == "to-reference":
        load_fla_checkpoint(a.src).save_pretrained(a.dst, safe_serialization=True)
    else:
        save_fla_checkpoint(RefDeltaNetForCausalLM.from_pretrained(a.src, dtype=torch.float32), a.dst)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
        if os.path.exists(os.path.join(a.src, name)):
            with open(os.path.join(a.src, name), "rb") as f, open(os.path.join(a.dst, name), "wb") as g:
                g.write(f.read())
    print(f"wrote {a.dst}")


if __name__ == "__main__":
    main()
