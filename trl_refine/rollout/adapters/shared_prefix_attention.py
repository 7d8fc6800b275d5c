"""Attention of the G rollout branches of a prefix over one shared copy of the prefix's K/V (transformers hybrids).

The branch state of `TransformersHybridStateAdapter` with ``share_prefix_kv`` keeps, per attention layer, the prefix
K/V once per prefix (``keys`` / ``values`` ``[P, H_kv, L, D]``, ``valid [P, L]``) and each branch row's own tokens
apart (``keys_branch`` / ``values_branch`` ``[B, H_kv, t, D]``, ``B = P·G``, row ``r`` continues prefix ``r // G``),
the layout of LaCT's shared window (`trl_refine.models.lact.share_window`). Two pieces read it:

* the cache layer (`shared_prefix_layer_class`): ``update`` appends only to the branch's own K/V and returns them,
  tagged with the layer's prefix; it reports the full length (prefix + own) to the mask and position code, so the
  model builds the same ``[B, 1, T, L + t + T]`` mask as for copied K/V;
* the attention function ``trl_refine_shared_prefix_sdpa`` (`shared_prefix_attention`), registered through
  transformers' ``AttentionInterface`` (and the SDPA mask under the same name): the G branches' queries are stacked
  along the query axis against the one prefix copy, their scores concatenated with those against their own keys,
  one softmax over both. The prefix K/V is never expanded to rows, neither in the forward nor among the tensors the
  backward keeps, and the backward sums the G branches' gradients into it.

The model switches to that implementation only inside `shared_prefix_attention_for` (the engine's branch calls,
`TransformersHybridStateAdapter.branch_calls`), which restores the model's own implementation on exit. Valid for
models whose attention layer calls ``past_key_values.update`` and passes what it returns straight to the attention
interface (qwen3_next, falcon_h1, bamba, granitemoehybrid, lfm2 in transformers 5.23), and for models that cache
latents and expand what ``update`` returned into K/V before the attention interface (kimi_linear's MLA: the cache
holds ``kv_nope`` / ``k_rot`` as its keys / values, ``kv_b_proj`` expands them): there the expansion is wrapped
(`expanding_prefix`) so that the own latents expand as before and the tagged prefix latents are expanded once per
prefix, tagging the expanded own keys with the expanded prefix K/V. The cache then keeps the prefix's latents once
per prefix, and each call expands them for P prefix rows instead of B = P·G branch rows.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from trl_refine import _compat

#: the name under which the attention function (and its mask) are registered in transformers
ATTENTION_NAME = "trl_refine_shared_prefix_sdpa"

#: attribute of the own keys returned by a shared-prefix layer's ``update``: ``(prefix_keys, prefix_values)``
_PREFIX_ATTR = "trl_refine_shared_prefix"

_active = 0  # depth of `shared_prefix_attention_for` contexts (a shared-prefix cache refuses updates outside them)


class SharedPrefixKV:
    """Mixin for transformers' attention cache layers (`DynamicLayer`, Falcon-H1's combined layer): K/V of a prefix
    shared by groups of G rows (``prefix_keys [P, H, L, D]``, ``prefix_valid [P, L]``) plus each row's own K/V
    (``keys`` / ``values [B, H, t, D]``), see the module doc. Updates rebind new tensors (no ``copy_``)."""

    __slots__ = ()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not _active:
            raise RuntimeError(
                "a cache whose prefix K/V is shared between rows needs the attention implementation "
                f"{ATTENTION_NAME!r}: run the model inside shared_prefix_attention_for(model) "
                "(TransformersHybridStateAdapter.branch_calls)"
            )
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2)
        keys = self.keys
        setattr(keys, _PREFIX_ATTR, (self.prefix_keys, self.prefix_values))
        return keys, self.values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("a cache with shared prefix K/V cannot be cropped or reordered; keep a snapshot")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _refuse


@functools.cache
def shared_prefix_layer_class(cls: type) -> type:
    """``cls`` (a transformers attention cache layer class, possibly already rebinding) with `SharedPrefixKV`."""
    return type(f"SharedPrefix{cls.__name__}", (SharedPrefixKV, cls), {"__slots__": ()})


def expanding_prefix(expand):
    """Wrap a layer's expansion of the latents its cache returned into K/V (``expand(a, b) -> (keys, values)``,
    kimi_linear's MLA ``expand_kv(kv_nope, k_rot)``): latents tagged by a shared-prefix layer (the row's own, with the
    prefix's latents ``[P, ...]`` attached) also get the prefix expanded, once per prefix, and the expanded own keys
    carry the expanded prefix K/V for `shared_prefix_attention`. Untagged latents expand as before."""

    @functools.wraps(expand)
    def wrapped(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = expand(a, b)
        prefix = getattr(a, _PREFIX_ATTR, None)
        if prefix is not None:
            setattr(keys, _PREFIX_ATTR, tuple(expand(*prefix)))
        return keys, values

    return wrapped


def with_prefix(keys: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """``keys`` (rows' own keys ``[B, H_kv, S, D]``) tagged with the shared prefix K/V ``[P, H_kv, L, D]`` that
    `shared_prefix_attention` reads with them: for attention layers that call it themselves rather than through a
    shared-prefix cache layer (fla's `Attention`, `trl_refine.rollout.adapters.fla_hybrid`)."""
    setattr(keys, _PREFIX_ATTR, (prefix_keys, prefix_values))
    return keys


def _grouped(x: torch.Tensor, prefixes: int, kv_heads: int) -> torch.Tensor:
    """``[B, H_q, T, X]`` -> ``[P, H_kv, G·rep·T, X]`` (``B = P·G``, ``H_q = H_kv·rep``): each prefix's rows and
    query heads of one K/V head stacked along the query axis."""
    B, Hq, T, X = x.shape
    group, rep = B // prefixes, Hq // kv_heads
    x = x.reshape(prefixes, group, kv_heads, rep, T, X).transpose(1, 2)
    return x.reshape(prefixes, kv_heads, group * rep * T, X)


def _ungrouped(x: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """Inverse of `_grouped`: ``[P, H_kv, G·rep·T, X]`` -> ``[B, H_q, T, X]``."""
    P, Hkv, GRT, X = x.shape
    group, rep = rows // P, heads // Hkv
    x = x.reshape(P, Hkv, group, rep, GRT // (group * rep), X).transpose(1, 2)
    return x.reshape(rows, heads, -1, X)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: queries ``[B, H_q, T, D]`` against [shared prefix ; own K/V].

    ``key`` / ``value`` are a row's own K/V ``[B, H_kv, S, D]`` as returned by a `shared_prefix_layer_class` layer,
    which tags them with the prefix K/V ``[P, H_kv, L, D]``; ``attention_mask`` is the model's ``[B, 1, T, L + S]``
    mask (boolean, or additive float), or None (everything visible for one query, else causal)."""
    prefix = getattr(key, _PREFIX_ATTR, None)
    if prefix is None:
        raise ValueError(
            f"attention {ATTENTION_NAME!r} got keys that do not come from a shared-prefix cache layer: the model "
            "transformed the cache's keys before attention, or a cache without shared prefix K/V is in use"
        )
    for name in ("softcap", "s_aux", "sliding_window"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attention {ATTENTION_NAME!r} does not implement {name!r}")
    prefix_k, prefix_v = prefix
    B, Hq, T, D = query.shape
    P, Hkv, L = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    S = key.shape[2]
    rep = Hq // Hkv
    scale = D**-0.5 if scaling is None else scaling

    s_prefix = (_grouped(query, P, Hkv) @ prefix_k.to(query.dtype).mT).float() * scale  # [P, Hkv, G·rep·T, L]
    own_k = key.repeat_interleave(rep, dim=1) if rep > 1 else key
    own_v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    s_own = (query @ own_k.mT).float() * scale  # [B, Hq, T, S]
    mask = attention_mask
    if mask is None and T > 1:  # causal, queries being the last T of [prefix ; own]
        i = torch.arange(T, device=query.device)[:, None] + (L + S - T)
        mask = (torch.arange(L + S, device=query.device)[None, :] <= i)[None, None].expand(B, 1, T, L + S)
    if mask is not None:
        if mask.shape[1] != 1 or mask.shape[-1] != L + S:
            raise ValueError(f"{ATTENTION_NAME}: expected a [B, 1, T, {L + S}] mask, got {tuple(mask.shape)}")
        mask = mask.expand(B, 1, T, L + S)
        # the prefix columns in the grouped query layout, broadcast over the K/V heads: [P, 1, G·rep·T, L]
        m_prefix = mask[:, 0, :, :L].reshape(P, B // P, 1, T, L).expand(-1, -1, rep, -1, -1).reshape(P, 1, -1, L)
        m_own = mask[..., L:]
        if mask.dtype == torch.bool:
            s_prefix = s_prefix.masked_fill(~m_prefix, float("-inf"))
            s_own = s_own.masked_fill(~m_own, float("-inf"))
        else:
            s_prefix = s_prefix + m_prefix.float()
            s_own = s_own + m_own.float()
    probs = torch.cat([s_prefix, _grouped(s_own, P, Hkv)], dim=-1).softmax(dim=-1).to(value.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = _ungrouped(probs[..., :L] @ prefix_v.to(value.dtype), B, Hq)
    out = out + _ungrouped(probs[..., L:].contiguous(), B, Hq) @ own_v
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Register the attention function and its mask (SDPA's) with transformers; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


@contextlib.contextmanager
def shared_prefix_attention_for(model: torch.nn.Module):
    """Run ``model`` (unwrapped) with the shared-prefix attention; its own implementation is restored on exit."""
    global _active
    original = _compat.attn_implementation(model)
    _compat.set_attn_implementation(model, register())
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        _compat.set_attn_implementation(model, original)
