"""State adapters: snapshot, stack, expand and rebuild the recurrent caches of fast-weight models.

A *snapshot* is a list (one entry per layer) of the layer's state dict, holding tensors with the batch on dim 0
(nested in tuples for conv states). Snapshots are references, not copies: caches of the supported models rebind
new tensors instead of writing into old ones, except fla's single-token no-grad conv step, so every cache built from
a snapshot goes through `select_rows`, which copies. The exceptions are attention K/V of a prefix, which
`LaCTStateAdapter.branch_rows` (LaCT's window; LaCT writes nothing in place) and
`TransformersHybridStateAdapter.branch_rows` (their cache layers append by concatenation) and
`FlaHybridStateAdapter.branch_rows` (fla's attention cache appends by concatenation) give the G rollout branches of a
prefix as one shared copy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

State = list[dict[str, Any]]


def map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def zip_tensors(values: list[Any], fn) -> Any:
    """Combine structurally identical nests leaf by leaf with ``fn(list_of_tensors)``."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return fn(values)
    if isinstance(first, (tuple, list)):
        return type(first)(zip_tensors([v[i] for v in values], fn) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: zip_tensors([v[k] for v in values], fn) for k in first}
    return first


def _per_device(index: torch.Tensor):
    """``device -> index`` on that device, copied at most once per device (callers pass indices that already live
    where the states are; a host index copied once per tensor would synchronise with the GPU for each)."""
    copies = {index.device: index}

    def on(device: torch.device) -> torch.Tensor:
        if device not in copies:
            copies[device] = index.to(device)
        return copies[device]

    return on


class FlaStateAdapter:
    """fla's per-layer dict layout: ``recurrent_state`` [N, ...], ``conv_state`` tuple of [N, D, W] (or None),
    ``attn_state`` / ``ffn_state`` None. Used by fla DeltaNet / GatedDeltaNet and by our reference DeltaNet."""

    #: how one segment call packs several documents: "varlen" ([1, Σ] + cu_seqlens) or "padded" (left padding +
    #: attention_mask, each row continuing its own state)
    packing = "varlen"

    def snapshot(self, cache) -> State:
        return [dict(layer) for layer in cache]

    def prepare(self, model: torch.nn.Module) -> None:
        """Make ``model`` (unwrapped) ready for the engine's calls; the engine calls it before every pass. Nothing
        here (transformers' Mamba swaps its mixers for ones that continue a cached state)."""

    def empty_cache(self):
        """The cache of a call that starts from the empty state (None: the model makes its own)."""
        return None

    def continuation_kwargs(self, state: State | None, offset: int, width: int, device) -> dict:
        """Extra model inputs of a call feeding ``width`` new tokens to every row, ``offset`` tokens after the rows
        of ``state`` (attention masks / positions for models with attention layers; none here)."""
        return {}

    def build_cache(self, state: State):
        from fla.models.utils import Cache

        return Cache.from_legacy_cache(tuple(dict(layer) for layer in state), seen_tokens=1)

    @staticmethod
    def select_rows(state: State, index: torch.Tensor) -> State:
        """Rows ``index`` of every tensor (a copy; also expands when ``index`` repeats rows)."""
        on_device = _per_device(index)
        return map_tensors(state, lambda t: t.index_select(0, on_device(t.device)))

    @staticmethod
    def concat(states: list[State]) -> State:
        return zip_tensors(states, lambda ts: torch.cat(ts, dim=0))

    def branch_rows(self, state: State, index: torch.Tensor, group: int) -> State:
        """The state of the rollout branches: rows ``r*group .. r*group+group-1`` continue row ``index[r]`` of
        ``state``. Here every tensor is copied per branch (`select_rows`); adapters whose models can read one copy
        per prefix (an attention window) override it."""
        return self.select_rows(state, index.repeat_interleave(group))

    def branch_calls(self, model: torch.nn.Module, state: State):
        """A context manager around the model calls that continue ``state``, a `branch_rows` state (decoding, the
        loss's branch call); adapters whose shared states need a different attention function switch it here."""
        return contextlib.nullcontext()

    @staticmethod
    def scatter_rows(state: State, index: torch.Tensor, rows: State) -> State:
        """``state`` with rows ``index`` replaced by ``rows`` (out of place, differentiable)."""
        on_device = _per_device(index)
        return zip_tensors(
            [state, rows], lambda ts: ts[0].index_copy(0, on_device(ts[0].device), ts[1].to(ts[0].dtype))
        )


class LaCTStateAdapter(FlaStateAdapter):
    """Our LaCT's decode state: one dict of batch-first tensors per layer (fast weights, momentum, partial-chunk
    sums, sliding K/V window, position). LaCT takes no ``cu_seqlens``; rows are left-padded instead."""

    packing = "padded"

    def __init__(self, share_prefix_kv: bool = True):
        #: the G branches of one prefix read one copy of its attention window (`trl_refine.models.lact.share_window`)
        #: instead of G copies; equal up to float summation order (docs/lact.md), False copies it per branch
        self.share_prefix_kv = share_prefix_kv

    def snapshot(self, cache) -> State:
        return [dict(layer) for layer in cache.states]

    def branch_rows(self, state: State, index: torch.Tensor, group: int) -> State:
        if not self.share_prefix_kv or group == 1:
            return super().branch_rows(state, index, group)
        from trl_refine.models.lact import share_window

        return share_window(state, index, group)

    def build_cache(self, state: State):
        from trl_refine.models.lact import LaCTCache

        return LaCTCache([dict(layer) for layer in state])


#: model types whose cache is fla's per-layer recurrent dict (recurrent state, short-conv / token-shift states),
#: whose layers continue a state over a multi-token varlen call (``cu_seqlens`` + ``initial_state``)
FLA_LAYOUT_MODEL_TYPES = (
    "refine_delta_net", "delta_net", "gated_deltanet", "gla", "gated_deltaproduct", "kda", "rwkv7", "hgrn2",
    "gsa", "hgrn", "comba",
)  # fmt: skip

#: fla families whose adapter is the one above but whose gradients through the states have not been compared with
#: the generic engine: `auto` does not pick them, ``nsp_engine="snapshot"`` runs them with a warning.
#: gated_deltaproduct, kda and rwkv7 were compared on CPU in fp32 (gradients < 1e-5 relative, measured <= 4.5e-7),
#: fla's Triton kernels under the interpreter except the chunk op, which it cannot run, replaced by fla's own
#: pure-PyTorch recurrence (tests/interpret_scripts/fla_families.py FAMILY naive; each substitute checked against
#: fla's Triton fused_recurrent op by naive_ops_check.py; benchmarks/results/fla_families_interpret.json).
#: On Hopper with triton in [3.4, 3.7.1) fla 0.6.0 refuses the gated chunk backward (fla #640, in chunk_bwd_dqkwg,
#: which gated_deltaproduct with a forget gate reaches): training there needs triton >= 3.7.1 or tilelang.
#: hgrn and comba (the survey of fla's model types, docs/models.md) were compared the same way on 2026-12-03 (their layers
#: take chunk kernels whenever gradients are on; substitutes fla's naive_recurrent_hgrn and naive_chunk_comba, not its
#: naive_recurrent_comba, which disagrees with both of fla's comba kernels): gradients 2.0e-7 and 4.9e-7 relative.
#: comba's chunk backward calls chunk_bwd_dqkwg with a gate too, so the fla #640 refusal above applies to it.
#: Empty now; the mechanism stays for the next family whose adapter serves it before its gradients are compared.
UNVERIFIED_MODEL_TYPES: tuple[str, ...] = ()


def unverified_reason(model: torch.nn.Module) -> str:
    """Why `auto` does not pick the snapshot engine for ``model`` although an adapter exists ('' if it does)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in UNVERIFIED_MODEL_TYPES:
        return ""
    return (
        f"fla {model_type}: the state adapter matches the generic engine in the forward, but its gradients have not "
        "been compared yet (tests/gpu/test_gpu_families.py); nsp_engine='snapshot' forces it"
    )


#: fla model types that cannot run on the snapshot engine, and why (checked against fla 0.6.0; fla's ``mamba2`` /
#: ``mamba``, whose layers only continue a cache one token at a time, run with layers that `fla_mamba` lets continue
#: it over many tokens; transformers' own, whose configs share these names, through `transformers_mamba`)
UNSUPPORTED_MODEL_TYPES = {
    "samba": "fla's Samba interleaves fla Mamba layers with sliding-window attention (a sliding K/V window is "
    "not supported)",
    "retnet": "fla's MultiScaleRetention takes its rotary offset from the cache's token count, one number for a "
    "packed call, not each document's position",
    "rwkv6": "fla's RWKV6 keeps one token-shift state per call (the packed batch's last token), not one per document",
    "linear_attn": "a packed segment call of fla's LinearAttention does not leave one state row per document",
    "log_linear_mamba2": "fla's LogLinearMamba2 only continues a cache one token at a time and takes no cu_seqlens",
    "mamba3": "fla's Mamba3 only continues a cache one token at a time (and needs CUDA)",
}


def state_adapter_for(model: torch.nn.Module) -> tuple[FlaStateAdapter | None, str]:
    """The adapter for ``model`` (already unwrapped), or None and the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "lact_swiglu":
        return LaCTStateAdapter(), ""
    from trl_refine.rollout.adapters.transformers_hybrid import HYBRID_MODEL_TYPES, TransformersHybridStateAdapter

    if model_type in HYBRID_MODEL_TYPES:
        sliding = sorted({t for t in getattr(config, "layer_types", None) or () if "sliding" in str(t)})
        if sliding:
            return None, f"{model_type} with {', '.join(sliding)} layers (a sliding K/V window is not supported)"
        return TransformersHybridStateAdapter(config), ""
    from trl_refine.rollout.adapters.transformers_mamba import TransformersMambaStateAdapter, is_transformers_mamba

    if is_transformers_mamba(config):
        return TransformersMambaStateAdapter(config), ""
    if model_type in ("mamba2", "mamba"):
        from trl_refine.rollout.adapters.fla_mamba import FlaMambaStateAdapter, unsupported_fla_mamba2

        why = unsupported_fla_mamba2(config) if model_type == "mamba2" else ""
        return (None, why) if why else (FlaMambaStateAdapter(), "")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return None, f"model_type {model_type!r}: {UNSUPPORTED_MODEL_TYPES[model_type]}"
    if model_type not in FLA_LAYOUT_MODEL_TYPES:
        supported = ", ".join((*FLA_LAYOUT_MODEL_TYPES, "lact_swiglu", *HYBRID_MODEL_TYPES, "mamba2", "mamba"))
        return None, f"model_type {model_type!r} has no state adapter (supported: {supported})"
    if getattr(config, "attn", None) and model_type != "refine_delta_net":  # ours refuses attn itself
        from trl_refine.rollout.adapters.fla_hybrid import FlaHybridStateAdapter, hybrid_problem

        why = hybrid_problem(config)
        return (None, why) if why else (FlaHybridStateAdapter(config), "")
    return FlaStateAdapter(), ""
