"""State adapter for transformers' hybrid models: linear-recurrent layers (Gated DeltaNet, KDA, Mamba-2, short
convolutions) mixed with attention layers, all sharing transformers' layered `DynamicCache`.

transformers >= 5.20 gives every such model one cache: a `DynamicCache(config=...)` whose layers are
`LinearAttentionLayer` (conv and recurrent states), `DynamicLayer` (attention K/V) or both in one layer
(`LinearAttentionAndFullAttentionLayer`, Falcon-H1). A snapshot is, per layer, ``{"conv": (...), "recurrent": (...),
"keys": [N, H, T, D], "values": ..., "valid": [N, T] bool}`` (absent entries omitted). Two mechanisms, one each:

* conv / recurrent states have a fixed size per row: rows are selected and concatenated as they are
  (`trl_refine.rollout.state.map_tensors`);
* attention K/V grow with the prefix: snapshots of prefixes of different lengths are **left-padded** to a common
  length when concatenated, ``valid`` marks the real slots, and every call continuing from such a state gets the
  matching ``attention_mask`` and ``position_ids`` (`continuation_kwargs`), so a padded slot is never attended to and
  rotary positions count valid tokens only.

transformers' cache layers write states in place (``copy_`` into preallocated buffers, for CUDA graphs), which
would overwrite snapshots and break autograd. The caches built here use layer classes that **rebind** new tensors
instead (`rebinding_layer_class`), and route single-token conv updates through the same rebinding path.

**Shared prefix K/V** (``share_prefix_kv``, on by default): the G rollout branches of a prefix read one copy of
its attention cache (`branch_rows`; layout and attention in `trl_refine.rollout.adapters.shared_prefix_attention`)
instead of G copies. For ``kimi_linear`` that copy is the MLA layer's cached latents (``kv_nope``, ``k_rot``): its
layer expands what the cache returns (``kv_b_proj``) before attention, so the branch calls also wrap that expansion
(`expanding_prefix`, through `trl_refine._compat.mla_expand_kv_wrapped`) to expand the prefix latents once per
prefix per call.

Documents are run one per call (``packing = "serial"``): transformers' recurrent layers zero padded inputs but do not
keep the state still across them (a Mamba-2 or Gated DeltaNet state still decays on a padded token), so a padded row
continuing from a non-empty state would not be exact.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from trl_refine import _compat
from trl_refine.rollout.adapters.shared_prefix_attention import (
    SharedPrefixKV,
    expanding_prefix,
    shared_prefix_attention_for,
    shared_prefix_layer_class,
)
from trl_refine.rollout.state import FlaStateAdapter, State, map_tensors, zip_tensors

#: transformers model types served by this adapter (the text model of each; all run on CPU with torch fallbacks)
HYBRID_MODEL_TYPES = ("qwen3_next", "kimi_linear", "falcon_h1", "bamba", "granitemoehybrid", "lfm2")

#: families whose recurrent single-token step (transformers' ``mamba2_selective_state_update``) writes the state in
#: place: a call of one token with gradients cannot be differentiated
_IN_PLACE_SINGLE_STEP = ("falcon_h1", "bamba", "granitemoehybrid")

#: families whose branches can share the prefix's attention cache (`trl_refine.rollout.adapters.shared_prefix_attention`):
#: their attention layer calls ``past_key_values.update`` and hands the result straight to the attention interface,
#: or, for `LATENT_KV_MODEL_TYPES`, through a latent expansion that the branch calls wrap
SHARED_PREFIX_MODEL_TYPES = ("qwen3_next", "kimi_linear", "falcon_h1", "bamba", "granitemoehybrid", "lfm2")
#: families whose attention layer (MLA) caches latents and expands them into K/V after the cache update
LATENT_KV_MODEL_TYPES = ("kimi_linear",)


class _RebindingStates:
    """Mixin for transformers' linear-attention cache layers: updates bind new tensors (never ``copy_``), and
    ``record_past`` is always on so that models take the multi-token conv path (which goes through
    `update_conv_state`) instead of the in-place single-token conv kernel."""

    __slots__ = ()  # adds no instance layout, so a layer's ``__class__`` can be swapped to the mixed class

    @property
    def record_past(self) -> bool:
        return True

    @record_past.setter
    def record_past(self, value: bool) -> None:  # set by the layer's __init__; always on here
        pass

    def update_conv_state(self, conv_states, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs):
        if not self.is_conv_states_initialized[state_idx]:
            size = conv_kernel_size or conv_states.shape[-1]
            self.conv_kernel_size[state_idx] = size
            self.is_conv_states_initialized[state_idx] = True
            self.dtype, self.device = conv_states.dtype, conv_states.device
            full = conv_states
            kept = torch.nn.functional.pad(conv_states, (max(size - conv_states.shape[-1], 0), 0))
        else:
            full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
            kept = full
        self.has_previous_state[state_idx] = True
        self.conv_states[state_idx] = kept[..., -self.conv_kernel_size[state_idx] :]
        return full

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        return recurrent_states

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a snapshot-engine cache cannot be rolled back; keep a snapshot instead")


@functools.cache
def rebinding_layer_class(cls: type) -> type:
    """``cls`` (a transformers linear-attention cache layer class) with `_RebindingStates` mixed in."""
    return type(f"Rebinding{cls.__name__}", (_RebindingStates, cls), {"__slots__": ()})


def _with_class(layer, cls: type):
    """A ``cls`` object with ``layer``'s attributes (``__class__`` assignment fails across transformers' layer bases)."""
    new = object.__new__(cls)
    new.__dict__.update(vars(layer))
    return new


def _left_pad(t: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - t.size(dim)
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_full(shape, value), t], dim=dim)


class TransformersHybridStateAdapter(FlaStateAdapter):
    """Snapshots of transformers' layered `DynamicCache` (linear-recurrent + attention layers), see module doc."""

    packing = "serial"

    def __init__(self, config, share_prefix_kv: bool | None = None):
        self.config = config
        self.model_type = config.model_type
        if share_prefix_kv and self.model_type not in SHARED_PREFIX_MODEL_TYPES:
            raise ValueError(
                f"share_prefix_kv=True: {self.model_type} cannot share the prefix K/V (only "
                f"{', '.join(SHARED_PREFIX_MODEL_TYPES)}); pass None"
            )
        #: the G branches of one prefix read one copy of its attention K/V (None: where the model allows it, see
        #: `SHARED_PREFIX_MODEL_TYPES`); equal to copying up to float summation order (docs/engines.md)
        self.share_prefix_kv = (
            self.model_type in SHARED_PREFIX_MODEL_TYPES if share_prefix_kv is None else share_prefix_kv
        )

    # ------------------------------------------------------------------------------------------------ caches
    def empty_cache(self):
        """A fresh cache for the model whose layers rebind instead of writing in place."""
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        cache = DynamicCache(config=self.config)
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                cache.layers[i] = _with_class(layer, rebinding_layer_class(type(layer)))
                cache.layers[i].__dict__.pop("record_past", None)
        return cache

    def snapshot(self, cache) -> State:
        from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

        state = []
        for layer in cache.layers:
            entry = {}
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                entry["conv"] = tuple(
                    layer.conv_states[i] if layer.has_previous_state[i] else None
                    for i in range(layer.number_of_states)
                )
                entry["recurrent"] = tuple(
                    layer.recurrent_states[i] if layer.is_recurrent_states_initialized[i] else None
                    for i in range(layer.number_of_states)
                )
            if isinstance(layer, SharedPrefixKV):
                entry.update(keys=layer.prefix_keys, values=layer.prefix_values, valid=layer.prefix_valid)
                entry.update(keys_branch=layer.keys, values_branch=layer.values)
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
                entry["keys"], entry["values"] = layer.keys, layer.values
                entry["valid"] = torch.ones(
                    layer.keys.shape[0], layer.keys.shape[-2], dtype=torch.bool, device=layer.keys.device
                )
            state.append(entry)
        return state

    def build_cache(self, state: State):
        """A cache continuing from ``state``. Conv / recurrent tensors are cloned (differentiably): some models still
        write them in place (single-token steps), which must touch neither the snapshot nor its autograd history."""
        cache = self.empty_cache()
        for i, entry in enumerate(state):
            if "keys_branch" in entry:  # prefix K/V shared by groups of rows (`branch_rows`)
                cache.layers[i] = _with_class(cache.layers[i], shared_prefix_layer_class(type(cache.layers[i])))
        for layer, entry in zip(cache.layers, state):
            for i, t in enumerate(entry.get("conv", ())):
                if t is not None:
                    layer.conv_states[i] = t.clone()
                    layer.conv_kernel_size[i] = t.shape[-1]
                    layer.is_conv_states_initialized[i] = layer.has_previous_state[i] = True
                    layer.dtype, layer.device = t.dtype, t.device
            for i, t in enumerate(entry.get("recurrent", ())):
                if t is not None:
                    layer.recurrent_states[i] = t.clone()
                    layer.is_recurrent_states_initialized[i] = layer.has_previous_state[i] = True
            if "keys_branch" in entry:
                layer.prefix_keys, layer.prefix_values = entry["keys"], entry["values"]
                layer.prefix_valid = entry["valid"]
                layer.keys, layer.values = entry["keys_branch"], entry["values_branch"]
            elif "keys" in entry:
                layer.keys, layer.values = entry["keys"], entry["values"]
            if "keys" in entry:
                layer.dtype, layer.device = entry["keys"].dtype, entry["keys"].device
                layer.is_initialized = True
        return cache

    # ------------------------------------------------------------------------------------------------ rows
    def branch_rows(self, state: State, index: torch.Tensor, group: int) -> State:
        """With ``share_prefix_kv``: conv / recurrent states copied per branch, attention K/V (and ``valid``) selected
        once per prefix, plus empty ``keys_branch`` / ``values_branch`` ``[B, H, 0, D]`` for the branches' own."""
        if not self.share_prefix_kv or group == 1:
            return super().branch_rows(state, index, group)
        _refuse_shared(state, "branch_rows")
        rows = index.repeat_interleave(group)
        out = []
        for entry in state:
            new = {
                k: map_tensors(entry[k], lambda t: t.index_select(0, rows))
                for k in ("conv", "recurrent")
                if k in entry
            }
            if "keys" in entry:
                new.update({k: entry[k].index_select(0, index) for k in ("keys", "values", "valid")})
                for k in ("keys", "values"):
                    new[f"{k}_branch"] = new[k].new_zeros(rows.numel(), new[k].shape[1], 0, new[k].shape[3])
            out.append(new)
        return out

    @staticmethod
    def select_rows(state: State, index: torch.Tensor) -> State:
        _refuse_shared(state, "select_rows")
        return FlaStateAdapter.select_rows(state, index)

    @staticmethod
    def concat(states: list[State]) -> State:
        """Concatenate along rows; attention K/V of different prefix lengths are left-padded (``valid`` False)."""
        for state in states:
            _refuse_shared(state, "concat")
        width = max((e["keys"].shape[-2] for s in states for e in s if "keys" in e), default=0)
        padded = [
            [
                {
                    **e,
                    "keys": _left_pad(e["keys"], width, -2),
                    "values": _left_pad(e["values"], width, -2),
                    "valid": _left_pad(e["valid"], width, -1, False),
                }
                if "keys" in e
                else e
                for e in s
            ]
            for s in states
        ]
        return zip_tensors(padded, lambda ts: torch.cat(ts, dim=0))

    @staticmethod
    def scatter_rows(state: State, index: torch.Tensor, rows: State) -> State:
        raise NotImplementedError("serial packing never scatters rows")

    # ------------------------------------------------------------------------------------------------ calls
    def continuation_kwargs(self, state: State | None, offset: int, width: int, device) -> dict:
        """``attention_mask`` / ``position_ids`` for a call feeding ``width`` new (valid) tokens to every row,
        ``offset`` tokens after ``state`` (None: from the empty state, one row)."""
        if width == 1 and torch.is_grad_enabled() and self.model_type in _IN_PLACE_SINGLE_STEP:
            raise ValueError(
                f"{self.model_type}: transformers' Mamba-2 single-token step updates its state in place, so a "
                "one-token call cannot be differentiated (rollout_length 2, or two chosen positions next to each "
                "other). Use a rollout length of at least 3, or nsp_engine='generic'."
            )
        valid = None if state is None else next((e["valid"] for e in state if "valid" in e), None)
        steps = torch.arange(offset, offset + width, device=device)
        if valid is None:
            if state is None:
                return {"position_ids": steps[None]}
            return {}
        group, own = shared_prefix_layout(state)
        if group > 1 or own:  # the prefix's slots, per row, then the row's own tokens (all valid)
            valid = valid.repeat_interleave(group, dim=0)
            valid = torch.cat([valid, valid.new_ones(valid.size(0), own)], dim=1)
        seen = valid.sum(-1, keepdim=True)
        mask = torch.cat([valid.long(), valid.new_ones(valid.size(0), offset + width, dtype=torch.long)], dim=1)
        return {"position_ids": seen + steps[None], "attention_mask": mask}

    def branch_calls(self, model, state: State):
        """Model calls from a state whose prefix K/V are shared (`branch_rows`) run with the shared-prefix attention
        and, for MLA, the wrapped latent expansion (the model's own attention implementation and expansion are
        restored on exit)."""
        if shared_prefix_layout(state) == (1, 0):
            return contextlib.nullcontext()
        from trl_refine.modeling_utils import unwrap

        return _shared_prefix_calls(unwrap(model), self.model_type in LATENT_KV_MODEL_TYPES)


@contextlib.contextmanager
def _shared_prefix_calls(model, latent: bool):
    with shared_prefix_attention_for(model):
        if not latent:
            yield
            return
        with _compat.mla_expand_kv_wrapped(model, expanding_prefix) as layers:
            if not layers:
                raise ValueError(
                    f"{type(model).__name__}: no MLA layer found to wrap ({_compat.MLA_EXPANDING_CLASSES})"
                )
            yield


def shared_prefix_layout(state: State) -> tuple[int, int]:
    """``(G, t)`` of a state whose prefix K/V are shared by groups of G rows that have t own tokens each;
    ``(1, 0)`` for an ordinary state."""
    for entry in state:
        if "keys_branch" in entry:
            return entry["keys_branch"].shape[0] // entry["keys"].shape[0], entry["keys_branch"].shape[-2]
    return 1, 0


def _refuse_shared(state: State, what: str) -> None:
    if any("keys_branch" in entry for entry in state):
        raise ValueError(f"{what}: this state shares its prefix K/V between rows (a branch state); use the snapshots")
