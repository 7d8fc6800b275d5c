"""State adapter for fla's hybrid models: fla linear-recurrent layers mixed with fla `Attention` layers
(``config.attn``, any fla family whose blocks build their mixer with ``fla.models.modeling_utils.get_attention``).

fla keeps both kinds in one `fla.models.utils.Cache`: the recurrent layers' dicts as for the pure families
(`FlaStateAdapter`), the attention layers' ``attn_state = (keys, values)``, each ``[N, T, H_kv·D]``. A snapshot is
fla's per-layer dicts, with ``valid [N, T]`` (bool) added to the attention layers'. Two mechanisms:

* recurrent / conv states have a fixed size per row and are selected and concatenated as they are;
* attention K/V grow with the prefix: snapshots of prefixes of different lengths are **left-padded** when
  concatenated, ``valid`` marks the real slots, and every call continuing such a state gets the matching
  ``attention_mask`` [N, cached + new] (`continuation_kwargs`). fla's `Attention` reads such a mask as flash_attn's
  varlen input and counts rotary positions over the valid tokens only; fla's recurrent layers read its last
  ``q_len`` columns (all valid), so they run exactly as without it.

fla's `Attention` refuses ``cu_seqlens`` once its cache holds K/V, so documents run one per call
(``packing = "serial"``, as for transformers' hybrids): B·(n+1) segment calls per pass, each one unpadded row that
fla's own `Attention` continues (flash_attn's causal attention over cached + new K/V). fla's `Attention` also takes a
padding mask only for one new token or an empty cache, so the branch calls (`branch_calls`: decoding, the loss's
branch call over k-1 tokens) run its layers through `branch_attention_forward`: fla's projections, q/k norm and
rotary, then attention in plain PyTorch (no flash_attn).

**Shared prefix K/V** (``share_prefix_kv``, on by default): the G rollout branches of a prefix read one copy of its
attention K/V: `branch_rows` keeps ``prefix_attn_state`` ``[P, L, H_kv·D]`` once per prefix and the branches' own K/V
in ``attn_state`` ``[P·G, t, H_kv·D]``, and the branch calls attend with the split softmax of
`trl_refine.rollout.adapters.shared_prefix_attention` (the G branches' queries stacked against the one prefix copy),
which never expands the prefix K/V to rows; ``share_prefix_kv=False`` copies it per branch (scaled-dot-product
attention over each row's K/V).
"""

from __future__ import annotations

import contextlib

import torch

from trl_refine.rollout.adapters.shared_prefix_attention import shared_prefix_attention, with_prefix
from trl_refine.rollout.state import FlaStateAdapter, State, map_tensors, zip_tensors

_PREFIX = "prefix_attn_state"
#: the keys of fla's per-layer cache dict
_FLA_KEYS = ("recurrent_state", "attn_state", "conv_state", "ffn_state")


def attention_specs(config) -> list[dict]:
    """The attention specs of an fla config's ``attn`` (a dict or a list of dicts; [] when None)."""
    attn = getattr(config, "attn", None)
    if not attn:
        return []
    return [attn] if isinstance(attn, dict) else list(attn)


def hybrid_problem(config) -> str:
    """Why the fla hybrid ``config`` cannot run on the snapshot engine ('' when it can)."""
    for spec in attention_specs(config):
        if spec.get("window_size") is not None:
            return (
                f"fla {config.model_type} with sliding-window attention layers (attn window_size "
                f"{spec['window_size']}: fla's cache then rolls its K/V window in place, not supported)"
            )
    return ""


def _left_pad(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """Left-pad dim 1 of ``t`` to ``width``."""
    missing = width - t.size(1)
    if missing == 0:
        return t
    return torch.cat([t.new_full((t.size(0), missing, *t.shape[2:]), value), t], dim=1)


def _is_attention(entry: dict) -> bool:
    return entry.get("attn_state") is not None


class FlaHybridStateAdapter(FlaStateAdapter):
    """Snapshots of an fla hybrid's `Cache` (recurrent + attention layers), see the module doc."""

    packing = "serial"

    def __init__(self, config, share_prefix_kv: bool = True):
        self.config = config
        #: the G branches of one prefix read one copy of its attention K/V instead of G copies; equal to copying up
        #: to float summation order (docs/engines.md)
        self.share_prefix_kv = share_prefix_kv

    # ------------------------------------------------------------------------------------------------ caches
    def snapshot(self, cache) -> State:
        state = []
        for layer in cache:
            entry = {k: layer[k] for k in _FLA_KEYS}
            if _is_attention(entry):
                if _PREFIX in layer:
                    raise ValueError("a branch cache (shared prefix K/V) is no snapshot; use the document pass's")
                keys = entry["attn_state"][0]
                entry["attn_state"] = tuple(entry["attn_state"])
                entry["valid"] = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
            state.append(entry)
        return state

    def build_cache(self, state: State):
        """fla's `Cache` continuing ``state``; each layer counts the K/V slots it holds (prefix + own), which fla's
        `Attention` reads as the cached length (the mask then removes the padded ones)."""
        from fla.models.utils import Cache

        seen = max((_width(e) for e in state if _is_attention(e)), default=0)
        layers = tuple({k: v for k, v in e.items() if k != "valid"} for e in state)  # the mask carries it
        return Cache.from_legacy_cache(layers, seen_tokens=seen)

    # ------------------------------------------------------------------------------------------------ rows
    def branch_rows(self, state: State, index: torch.Tensor, group: int) -> State:
        """With ``share_prefix_kv``: recurrent / conv states copied per branch, attention K/V (and ``valid``) selected
        once per prefix into ``prefix_attn_state``, and empty own K/V ``[P·G, 0, H_kv·D]`` in ``attn_state``."""
        if not self.share_prefix_kv or group == 1:
            return super().branch_rows(state, index, group)
        _refuse_shared(state, "branch_rows")
        rows = index.repeat_interleave(group)
        out = []
        for entry in state:
            if not _is_attention(entry):
                out.append(map_tensors(entry, lambda t: t.index_select(0, rows)))
                continue
            prefix = tuple(t.index_select(0, index) for t in entry["attn_state"])
            own = tuple(t.new_zeros(rows.numel(), 0, t.shape[-1]) for t in prefix)
            out.append({**entry, "attn_state": own, _PREFIX: prefix, "valid": entry["valid"].index_select(0, index)})
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
        width = max((_width(e) for s in states for e in s if _is_attention(e)), default=0)
        padded = [
            [
                {
                    **e,
                    "attn_state": tuple(_left_pad(t, width) for t in e["attn_state"]),
                    "valid": _left_pad(e["valid"], width, False),
                }
                if _is_attention(e)
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
        """``attention_mask`` [N, slots + offset + width] for a call feeding ``width`` new tokens to every row,
        ``offset`` tokens after ``state`` (its K/V slots: the prefix's, with ``valid``, then the rows' own)."""
        entry = None if state is None else next((e for e in state if _is_attention(e)), None)
        if entry is None or (entry["valid"].shape[0] == 1 and _PREFIX not in entry):
            return {}  # one row: no padding (fla's Attention takes a mask only for q_len 1 or an empty cache)
        valid = entry["valid"]
        own = entry["attn_state"][0].shape[1]
        if _PREFIX in entry:
            valid = valid.repeat_interleave(entry["attn_state"][0].shape[0] // valid.shape[0], dim=0)
        else:
            own = 0  # the row's K/V are all in ``valid``
        ones = valid.new_ones(valid.size(0), own + offset + width)
        return {"attention_mask": torch.cat([valid, ones], dim=1).long()}

    def branch_calls(self, model, state: State):
        """The branch calls run fla's `Attention` layers through `branch_attention_forward` (their own forward is
        restored on exit): fla's refuses a padding mask for several tokens once its cache holds K/V."""
        from trl_refine.modeling_utils import unwrap

        return _branch_attention(unwrap(model))


def _width(entry: dict) -> int:
    return entry["attn_state"][0].shape[1] + (entry[_PREFIX][0].shape[1] if _PREFIX in entry else 0)


def _refuse_shared(state: State, what: str) -> None:
    if any(_PREFIX in entry for entry in state):
        raise ValueError(f"{what}: this state shares its prefix K/V between rows (a branch state); use the snapshots")


@contextlib.contextmanager
def _branch_attention(model: torch.nn.Module):
    from fla.layers.attn import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no fla Attention layer found (config.attn)")
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (a hook) comes back
    for layer in layers:
        layer.forward = branch_attention_forward.__get__(layer)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def branch_attention_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    output_attentions: bool = False,
    use_cache: bool = False,
    **kwargs,
):
    """fla's `Attention.forward` (fla 0.6.0, ``fla/layers/attn.py``) for the rows of a branch state: the same
    projections, q/k norm and rotary (positions count the valid slots of ``attention_mask`` [B, slots + T], as fla's
    do), the new K/V appended to the cache's, then plain PyTorch attention with the mask's padding and causality:
    `shared_prefix_attention` over [prefix ; own] when the layer's prefix K/V are shared (``prefix_attn_state``),
    else scaled-dot-product attention over the cached K/V. No flash_attn."""
    from einops import rearrange

    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("a branch call takes no cu_seqlens")
    if self.window_size is not None:
        raise ValueError("fla attention with a sliding window is not supported (FlaHybridStateAdapter)")
    layer = past_key_values[self.layer_idx]
    prefix = layer.get(_PREFIX)
    bsz, q_len, _ = hidden_states.shape
    q = rearrange(self.q_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
    k = rearrange(self.k_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
    v = rearrange(self.v_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
    if self.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    slots = layer["attn_state"][0].shape[1] + (prefix[0].shape[1] if prefix is not None else 0)  # before this call
    if attention_mask is None:
        attention_mask = torch.ones(bsz, slots + q_len, dtype=torch.bool, device=hidden_states.device)
    if attention_mask.shape != (bsz, slots + q_len):
        raise ValueError(
            f"a branch call needs attention_mask [{bsz}, {slots + q_len}] (FlaHybridStateAdapter.continuation_kwargs), "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    offset = mask[:, :slots].sum(-1)  # valid tokens before this call's, per row
    max_seqlen = q_len + slots
    if self.max_position_embeddings is not None:
        max_seqlen = max(max_seqlen, self.max_position_embeddings)
    q, k = self.rotary(q, k, seqlen_offset=offset, max_seqlen=max_seqlen)
    own_k, own_v = past_key_values.update(
        attn_state=(k.flatten(-2, -1), v.flatten(-2, -1)), layer_idx=self.layer_idx, offset=q_len
    )["attn_state"]

    def heads(t: torch.Tensor) -> torch.Tensor:  # [N, S, H·D] -> [N, H, S, D]
        return rearrange(t, "n s (h d) -> n h s d", d=self.head_dim)

    total = mask.shape[1]
    causal = torch.arange(total, device=mask.device)[None, :] <= (
        torch.arange(q_len, device=mask.device)[:, None] + total - q_len
    )
    mask4d = (mask[:, None, :] & causal[None])[:, None]  # [B, 1, T, slots + T]
    query = q.transpose(1, 2)
    if prefix is not None:
        keys = with_prefix(heads(own_k), heads(prefix[0]), heads(prefix[1]))
        o, _ = shared_prefix_attention(self, query, keys, heads(own_v), mask4d)
    else:
        keys, values = (heads(t).repeat_interleave(self.num_kv_groups, dim=1) for t in (own_k, own_v))
        o = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask4d).transpose(1, 2)
    o = self.o_proj(o.reshape(bsz, q_len, -1))
    return o, None, past_key_values
