"""Recurrent decode state of LaCT: a list of per-layer dicts of batch-first tensors, and a cache object around it.

Per layer (``n = num_lact_heads``, ``d = hidden_size // n``, ``d_h = int(d * inter_multi)``, ``D = hidden_size``,
``W = window_size``):

==================  =======================  =========================================================================
key                 shape / dtype            meaning
==================  =======================  =========================================================================
``pos``             ``[B]`` int64            valid tokens seen so far (= RoPE position of the next token)
``attn_k``          ``[B, H, W-1, hd]``      post-RoPE keys of the last ``W-1`` valid tokens, oldest first
                                             (head-major, ``H = num_attn_heads``, ``hd = D // H``); slot ``i``
                                             holds position ``pos - (W-1) + i`` and is zeros when that is < 0
``attn_v``          ``[B, H, W-1, hd]``      values, same layout
``fw_w0``/``fw_w2`` ``[B, n, d_h, d]``       fast weights used for the outputs of the current chunk
``fw_w1``           ``[B, n, d, d_h]``
``fw_w{j}_raw``     as ``fw_w{j}``           unnormalised weights (only with ``ttt_prenorm=True``)
``fw_m{j}``         as ``fw_w{j}``           momentum buffer, the last pre-Muon update (only with ``use_momentum``)
``fw_g{j}``         as ``fw_w{j}``, float32  sum of the lr-weighted update directions of the tokens of the current
                                             chunk (they all used the same weights, so summing as they arrive is
                                             exact)
``fw_msum``         ``[B, n]`` float32       sum of the momentum gate over the current chunk (only with momentum)
==================  =======================  =========================================================================

**Shared window.** The G rollout branches of one prefix start from the same window. `share_window` gives them one
copy: ``attn_k`` / ``attn_v`` then have ``B / G`` rows (row ``r`` of the state reads window row ``r // G``), and
``attn_k_branch`` / ``attn_v_branch`` ``[B, H, t, hd]`` hold each row's own ``t`` tokens since the window. Model calls
keep the window shared (the same tensors) until ``t`` reaches ``W-1``, then return an ordinary window.
`unshare_window` materialises the ordinary layout (the helpers that select or concatenate rows call it).

The number of tokens in the current chunk is ``tokens_in_chunk(pos, C)``: 0 at ``pos == 0``, else in ``[1, C]``; ``C``
means the chunk is full and is applied before the next token.

Tensors are never written in place: a model call builds new tensors and rebinds them. So a shallow copy of the
list of dicts (``snapshot``) stays valid after any amount of further decoding, and states carry gradients when
their inputs require grad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "LaCTCache",
    "cat_states",
    "detach_states",
    "map_states",
    "repeat_interleave_states",
    "select_states",
    "share_window",
    "shared_window_layout",
    "snapshot_states",
    "unshare_window",
]

LayerState = dict[str, torch.Tensor]


def map_states(states: Sequence[LayerState], fn: Callable[[torch.Tensor], torch.Tensor]) -> list[LayerState]:
    """Apply ``fn`` to every tensor; returns new dicts."""
    return [{key: fn(val) for key, val in layer.items()} for layer in states]


def shared_window_layout(states: Sequence[LayerState]) -> tuple[int, int]:
    """``(G, t)`` of a state whose window is shared by groups of G rows that fed t tokens since; ``(1, 0)`` for an
    ordinary state."""
    for layer in states:
        if "attn_k_branch" in layer:
            return layer["pos"].shape[0] // layer["attn_k"].shape[0], layer["attn_k_branch"].shape[2]
    return 1, 0


def share_window(states: Sequence[LayerState], index: torch.Tensor, group: int) -> list[LayerState]:
    """The state of ``len(index) * group`` rows where rows ``r*group .. r*group+group-1`` continue row ``index[r]``
    of ``states``: every tensor is selected per row, except the attention window, selected once per group and
    shared (see the module doc). Differentiable: the gradients of all rows of a group reach the one window."""
    if shared_window_layout(states) != (1, 0):
        raise ValueError("share_window needs an ordinary state (this one already shares its window)")
    rows = index.repeat_interleave(group)
    out = []
    for layer in states:
        new = {key: val.index_select(0, rows) for key, val in layer.items() if key not in ("attn_k", "attn_v")}
        if "attn_k" in layer:
            for key in ("attn_k", "attn_v"):
                window = layer[key].index_select(0, index)
                new[key] = window
                new[f"{key}_branch"] = window.new_zeros(rows.numel(), window.shape[1], 0, window.shape[3])
        out.append(new)
    return out


def unshare_window(states: Sequence[LayerState]) -> list[LayerState]:
    """The ordinary layout of a state (a copy of the window per row); an ordinary state is returned as it is."""
    group, _ = shared_window_layout(states)
    if group == 1 and not any("attn_k_branch" in layer for layer in states):
        return list(states)
    out = []
    for layer in states:
        new = {key: val for key, val in layer.items() if not key.endswith("_branch")}
        for key in ("attn_k", "attn_v"):
            if f"{key}_branch" in layer:
                window = layer[key].repeat_interleave(group, dim=0)
                slots = window.shape[2]
                new[key] = torch.cat([window, layer[f"{key}_branch"].to(window.dtype)], dim=2)[:, :, -slots:]
        out.append(new)
    return out


def snapshot_states(states: Sequence[LayerState]) -> list[LayerState]:
    """A snapshot: new dicts holding the same (never mutated) tensors. Free, and differentiable."""
    return [dict(layer) for layer in states]


def detach_states(states: Sequence[LayerState]) -> list[LayerState]:
    return map_states(states, torch.Tensor.detach)


def select_states(states: Sequence[LayerState], index: torch.Tensor | Sequence[int]) -> list[LayerState]:
    """Rows ``index`` (any order, repeats allowed) of every tensor."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(index, dtype=torch.long, device=t.device)
        return t.index_select(0, idx)

    return map_states(unshare_window(states), fn)


def repeat_interleave_states(states: Sequence[LayerState], repeats: int | torch.Tensor) -> list[LayerState]:
    """Row b becomes rows ``b*G .. b*G+G-1`` (``repeats`` may also be a per-row tensor)."""
    return map_states(unshare_window(states), lambda t: t.repeat_interleave(repeats, dim=0))


def cat_states(parts: Sequence[Sequence[LayerState]]) -> list[LayerState]:
    """Concatenate states of several batches along the batch dim (same model, same keys)."""
    parts = [unshare_window(p) for p in parts]
    if not parts:
        raise ValueError("cat_states needs at least one state")
    n_layers = len(parts[0])
    if any(len(p) != n_layers for p in parts):
        raise ValueError("cat_states: the states have different numbers of layers")
    out = []
    for i in range(n_layers):
        keys = parts[0][i].keys()
        if any(p[i].keys() != keys for p in parts):
            raise ValueError(f"cat_states: layer {i} has different keys across the states")
        out.append({key: torch.cat([p[i][key] for p in parts], dim=0) for key in keys})
    return out


class LaCTCache:
    """The LaCT decode state as a ``past_key_values`` object (``states``: one dict per layer, see module doc).

    Model calls update the cache object passed to them by *rebinding* ``states`` to new tensors; the tensors of a
    previous state are never modified. Keep a state with :meth:`snapshot` (free) before the next call.

    Functional helpers (return new caches): :meth:`snapshot`, :meth:`select`, :meth:`repeat_interleave`,
    :meth:`cat`, :meth:`detach`, :meth:`clone`, :meth:`to`. Hugging Face ``generate`` helpers (rebind in place):
    :meth:`reorder_cache`, :meth:`batch_repeat_interleave`, :meth:`batch_select_indices`.

    ``get_seq_length()`` counts the input *columns* consumed (pads included), which is what ``generate`` needs; the
    per-row number of valid tokens is :attr:`positions`.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, states: Iterable[LayerState] | None = None, seen_tokens: int = 0):
        self.states: list[LayerState] = [dict(s) for s in states] if states is not None else []
        self._seen_tokens = int(seen_tokens)

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> LayerState:
        return self.states[layer_idx]

    def __iter__(self):
        return iter(self.states)

    def __repr__(self) -> str:
        if not self.states:
            return "LaCTCache(empty)"
        return f"LaCTCache(layers={len(self.states)}, batch={self.batch_size}, seen_tokens={self._seen_tokens})"

    @property
    def batch_size(self) -> int:
        return int(self.states[0]["pos"].shape[0]) if self.states else 0

    @property
    def positions(self) -> torch.Tensor | None:
        """``[B]`` valid tokens seen per row (None when empty)."""
        return self.states[0]["pos"] if self.states else None

    def get_seq_length(self, layer_idx: int | None = 0, *args, **kwargs) -> int:
        return self._seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    # ------------------------------------------------------------------ functional helpers
    def _new(self, states: list[LayerState]) -> LaCTCache:
        return LaCTCache(states, seen_tokens=self._seen_tokens)

    def snapshot(self) -> LaCTCache:
        return self._new(snapshot_states(self.states))

    def select(self, index: torch.Tensor | Sequence[int]) -> LaCTCache:
        return self._new(select_states(self.states, index))

    def repeat_interleave(self, repeats: int | torch.Tensor) -> LaCTCache:
        return self._new(repeat_interleave_states(self.states, repeats))

    def detach(self) -> LaCTCache:
        return self._new(detach_states(self.states))

    def clone(self) -> LaCTCache:
        return self._new(map_states(self.states, torch.Tensor.clone))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LaCTCache:
        """Move to ``device``; ``dtype`` applies to the window and the fast weights only (``pos`` stays int64 and
        the chunk accumulators ``fw_g*`` / ``fw_msum`` stay float32)."""
        states = []
        for layer in self.states:
            new = {}
            for key, val in layer.items():
                keep = key == "pos" or key.startswith("fw_g") or key == "fw_msum"
                new[key] = val.to(device=device, dtype=None if keep else dtype)
            states.append(new)
        return self._new(states)

    @classmethod
    def cat(cls, caches: Sequence[LaCTCache]) -> LaCTCache:
        """Concatenate along the batch. ``seen_tokens`` becomes the maximum (it is only ``generate`` bookkeeping)."""
        return cls(cat_states([c.states for c in caches]), seen_tokens=max(c._seen_tokens for c in caches))

    # ------------------------------------------------------------------ Hugging Face Cache API (rebinding)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = select_states(self.states, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = repeat_interleave_states(self.states, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = select_states(self.states, indices)

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self._seen_tokens + max_length
        if max_length >= self._seen_tokens:
            return
        raise NotImplementedError("A LaCT state cannot be rolled back; keep a snapshot() instead.")

    def reset(self) -> None:
        self.states = []
        self._seen_tokens = 0

    def to_legacy_cache(self) -> tuple[LayerState, ...]:
        return tuple(self.states)

    @classmethod
    def from_legacy_cache(cls, past_key_values: Sequence[LayerState] | None = None, seen_tokens: int = 0) -> LaCTCache:
        if isinstance(past_key_values, LaCTCache):
            return past_key_values
        return cls(past_key_values, seen_tokens=seen_tokens)
