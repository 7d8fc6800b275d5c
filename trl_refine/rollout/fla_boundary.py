"""States at given positions from one forward of fla's DeltaNet or GatedDeltaNet, without readout tokens: *boundary
states*.

The one-pass engine's second provider for fla ``DeltaNetForCausalLM`` and ``GatedDeltaNetForCausalLM``
(``OnePassEngine(states="boundary")``). Each layer runs fla's projections, short convolutions and output norm as
`trl_refine.rollout.fla_readout` does, but the delta rule itself is our kernel,
`trl_refine.kernels.delta_rule_boundary.chunk_delta_rule_states_at` (DeltaNet) or
`trl_refine.kernels.gated_delta_rule_boundary.chunk_gated_delta_rule_states_at` (GatedDeltaNet), which returns the
states after the positions' token counts from the same pass over the chunks (the start state of each position's
64-token chunk plus ≤ 63 tokens of it, a masked triangular solve; gated: decayed by the chunk's gates) and whose
backward takes those states' gradients sparsely; no dense per-chunk states are kept. So the delta-rule op sees the
documents alone: no n·K extra tokens in its forward and backward. The counts' range is checked once per forward,
where `PackedLayout` derives them from the positions (``1 <= counts <= L`` by construction), so the per-layer op
runs with ``check_counts=False``: no host-device sync inside a layer.

Layout: the kernels take ``[B, T, H, *]`` without ``cu_seqlens``, so every document goes in its own row from column
0 (token r of document b at ``[b, r]``, T = L; chunks start at the document's first token, as in fla's varlen
call), and the columns after a document's end hold ``k = v = beta = 0`` (and log-decay 0): such a token leaves the
state unchanged (``S += k (beta (v - Sᵀk))ᵀ = 0``), and its outputs are dropped. What fla applies inside its kernel
is done before, with autograd: DeltaNet's q/k l2 norm (fla's ``l2norm``); GatedDeltaNet's l2 norm, beta sigmoid,
gate ``-exp(A_log) * softplus(a + dt_bias)`` and q/k per value head (`fla_gated_patch.gated_layer_kernel_inputs`,
shared with the gated kernel swap). The states come in fla's cache layout: ``[B, n, H, K, V]`` for DeltaNet, V-first
``[B, n, HV, V, K]`` for GatedDeltaNet (its ``state_v_first=True``). The conv states at a position are the last
``conv_size`` projected inputs (`PackedLayout.conv_windows`, shared with the readout provider).

`record_boundary_deferred_states` is the same forward for positions chosen after it (the one-pass engine's fused
scan): the delta rule is `chunk_delta_rule_with_boundary_states` / `chunk_gated_delta_rule_with_boundary_states`,
whose every chunk-boundary state (with their gradients) is kept with the layer's k, v, beta (g) and conv inputs,
and `DeferredBoundaryStates.at` then reads the states after any positions from those (`states_after` /
`gated_states_after`: the boundary state plus ≤ 63 tokens of its chunk).

Precision: the states at the positions are fp32 whatever the model's dtype (the partial-chunk part runs in fp32,
autocast off); the readout provider's states pass through the kernel's output dtype instead (bf16 in bf16 models).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from trl_refine.modeling_utils import unwrap
from trl_refine.rollout.fla_readout import (
    PackedLayout,
    check_whole_documents,
    delta_net_inputs,
    fla_readout_support,
    gated_delta_net_qkv,
    layer_output,
    packed_input,
    patch_layers,
)


def fla_boundary_support(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether every token mixer of ``model`` is fla's ``DeltaNet`` or ``GatedDeltaNet`` layer (the boundary-state
    provider serves the readout provider's families: the delta rule by `trl_refine.kernels.delta_rule_boundary`, the
    gated one by `trl_refine.kernels.gated_delta_rule_boundary`), and why not."""
    return fla_readout_support(model)


def _row_index(layout: PackedLayout, length: int) -> torch.Tensor:
    """[Σ] index of every packed token in the [B·L] layout of documents that start at column 0."""
    lens = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
    first = length - lens  # left padding of each document
    return layout.real_flat - first[torch.div(layout.real_flat, length, rounding_mode="floor")]


def _is_gated(attn) -> bool:
    from fla.layers import GatedDeltaNet

    return isinstance(attn, GatedDeltaNet)


def _kernel_inputs(attn, hidden_states, layout: PackedLayout, conv_inputs: bool):
    """The layer's delta-rule inputs as our kernels take them, in the [B, L] layout of documents that start at column
    0 (zeros after each document: ``k = v = beta = 0`` and, gated, log-decay 0 leave the state unchanged): ``(x
    [1, Σ, D] packed, q, k, v, g or None (DeltaNet), beta, conv, rows)``; ``conv`` the conv caches at the positions
    or, with ``conv_inputs``, the convs' inputs. DeltaNet: fla's projections / convs (`delta_net_inputs`) and the l2
    norm fla applies in its kernel; GatedDeltaNet: `gated_delta_net_qkv` and the in-kernel preprocessing of fla's
    gated op (`gated_layer_kernel_inputs`: l2 norm, beta sigmoid, gate, q/k per value head)."""
    from fla.modules.norm.l2norm import l2norm

    bsz, q_len, _ = hidden_states.shape
    x = packed_input(hidden_states, layout)
    if _is_gated(attn):
        from trl_refine.kernels.fla_gated_patch import gated_layer_kernel_inputs

        q, k, v, conv = gated_delta_net_qkv(attn, x, layout, conv_inputs=conv_inputs)
        q, k, v, g, beta = gated_layer_kernel_inputs(attn, q, k, v, attn.a_proj(x), attn.b_proj(x))
    else:
        q, k, v, beta, conv = delta_net_inputs(attn, x, layout, conv_inputs=conv_inputs)
        g = None
        if attn.qk_norm == "l2":
            q, k = l2norm(q), l2norm(k)
    rows = _row_index(layout, q_len)

    def unpack(t: torch.Tensor) -> torch.Tensor:  # [1, Σ, H, *] -> [B, L, H, *], zeros after each document
        out = t.new_zeros(bsz * q_len, *t.shape[2:]).index_copy(0, rows, t[0])
        return out.view(bsz, q_len, *t.shape[2:])

    q, k, v, beta = (unpack(t) for t in (q, k, v, beta))
    return x, q, k, v, None if g is None else unpack(g), beta, conv, rows


def _forward_with_boundary_states(
    attn, layout: PackedLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """fla's ``DeltaNet.forward`` / ``GatedDeltaNet.forward`` (fla/layers, 0.6.0) for a cache-free call over
    left-padded documents, with the delta rule of `chunk_delta_rule_states_at` / `chunk_gated_delta_rule_states_at`;
    the states after ``layout``'s positions go into ``store[layer_idx]`` (fla's cache layout: [B, n, H, K, V], and
    V-first [B, n, HV, V, K] for GatedDeltaNet)."""
    from trl_refine.kernels.delta_rule_boundary import chunk_delta_rule_states_at
    from trl_refine.kernels.gated_delta_rule_boundary import chunk_gated_delta_rule_states_at

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    x, q, k, v, g, beta, conv_states, rows = _kernel_inputs(attn, hidden_states, layout, conv_inputs=False)
    # counts checked by PackedLayout.parts (once per forward): no per-layer sync. The ops' partial-chunk matmuls and
    # solve run in fp32 with autocast off inside them.
    scale, counts = attn.head_k_dim**-0.5, layout.counts
    if g is None:
        o, states, _ = chunk_delta_rule_states_at(q, k, v, beta, scale, None, counts, check_counts=False)
    else:
        o, states, _ = chunk_gated_delta_rule_states_at(
            q, k, v, g, beta, scale, None, counts, state_v_first=True, check_counts=False
        )
    store[attn.layer_idx] = {
        "recurrent_state": states,  # fp32
        "attn_state": None,
        "conv_state": conv_states,
        "ffn_state": None,
    }
    o = o.reshape(bsz * q_len, *o.shape[2:]).index_select(0, rows)[None]
    return layer_output(attn, o, x, layout, bsz, q_len), None, past_key_values


def _forward_keeping_boundary_states(
    attn, layout: PackedLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """`_forward_with_boundary_states` with the delta rule of `chunk_delta_rule_with_boundary_states` /
    `chunk_gated_delta_rule_with_boundary_states`: the layer keeps, in ``store[layer_idx]``, what gives its states
    after any positions (`DeferredBoundaryStates.at`)."""
    from trl_refine.kernels.delta_rule_boundary import chunk_delta_rule_with_boundary_states, states_after
    from trl_refine.kernels.gated_delta_rule_boundary import (
        chunk_gated_delta_rule_with_boundary_states,
        gated_states_after,
    )

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    x, q, k, v, g, beta, conv_inputs, rows = _kernel_inputs(attn, hidden_states, layout, conv_inputs=True)
    scale = attn.head_k_dim**-0.5
    if g is None:
        o, boundary_states, final_state = chunk_delta_rule_with_boundary_states(q, k, v, beta, scale)
        read = partial(states_after, boundary_states, final_state, k, v, beta, check_counts=False)
    else:
        o, boundary_states, final_state = chunk_gated_delta_rule_with_boundary_states(
            q, k, v, g, beta, scale, state_v_first=True
        )
        read = partial(
            gated_states_after, boundary_states, final_state, k, v, g, beta, state_v_first=True, check_counts=False
        )
    store[attn.layer_idx] = {
        "states_after": read,  # counts [B, n] (checked by the caller) -> the states after them, fla's cache layout
        "conv_inputs": conv_inputs,
        "conv_width": attn.q_conv1d.kernel_size[0] if attn.use_short_conv else None,
    }
    o = o.reshape(bsz * q_len, *o.shape[2:]).index_select(0, rows)[None]
    return layer_output(attn, o, x, layout, bsz, q_len), None, past_key_values


class DeferredBoundaryStates:
    """What a forward under `record_boundary_deferred_states` kept per layer; `at` gives the states after positions
    chosen after it (differentiable through the kept tensors, which are part of the forward's graph)."""

    def __init__(self, attention_mask: torch.Tensor):
        self.attention_mask = attention_mask
        self.layers: dict[int, dict[str, Any]] = {}

    def at(self, positions: torch.LongTensor) -> list[dict[str, Any]]:
        """Per layer, fla's cache layout with a chunk dim after the batch dim: the states after ``positions``
        [B, n] (padded coordinates, the last prefix token)."""
        layout = PackedLayout(**PackedLayout.parts(self.attention_mask, positions)[0])  # checks the positions
        out = []
        for i in sorted(self.layers):
            kept = self.layers[i]
            inputs = kept["conv_inputs"]
            out.append(
                {
                    "recurrent_state": kept["states_after"](layout.counts),
                    "attn_state": None,
                    "conv_state": None
                    if inputs is None
                    else tuple(layout.conv_windows(x, kept["conv_width"]) for x in inputs),
                    "ffn_state": None,
                }
            )
        return out


@contextmanager
def record_boundary_deferred_states(model: torch.nn.Module, attention_mask: torch.Tensor):
    """While active, a forward of ``model`` (fla DeltaNet / GatedDeltaNet, whole left-padded documents, no cache)
    also fills the yielded `DeferredBoundaryStates` with what gives every layer's states after positions chosen
    later."""
    ok, why = fla_boundary_support(model)
    if not ok:
        raise ValueError(f"the boundary-state provider cannot run {type(unwrap(model)).__name__}: {why}")
    last = (attention_mask.size(1) - 1) * torch.ones_like(attention_mask[:, :1], dtype=torch.long)
    layout = PackedLayout(**PackedLayout.parts(attention_mask, last)[0])  # the packing only: no positions yet
    deferred = DeferredBoundaryStates(attention_mask)
    with patch_layers(
        model,
        lambda attn, *args, **kwargs: _forward_keeping_boundary_states(attn, layout, deferred.layers, *args, **kwargs),
    ):
        yield deferred


@contextmanager
def record_boundary_position_states(model: torch.nn.Module, attention_mask: torch.Tensor, positions: torch.Tensor):
    """While active, a forward of ``model`` (fla DeltaNet / GatedDeltaNet, whole left-padded documents, no cache)
    also fills the yielded dict with every layer's states after ``positions`` [B, n] (fla's cache layout, a chunk
    dim after the batch dim), from the fused boundary-state kernels (`chunk_delta_rule_states_at`,
    `chunk_gated_delta_rule_states_at`)."""
    ok, why = fla_boundary_support(model)
    if not ok:
        raise ValueError(f"the boundary-state provider cannot run {type(unwrap(model)).__name__}: {why}")
    layout = PackedLayout(**PackedLayout.parts(attention_mask, positions)[0])
    store: dict[int, dict[str, Any]] = {}
    with patch_layers(
        model, lambda attn, *args, **kwargs: _forward_with_boundary_states(attn, layout, store, *args, **kwargs)
    ):
        yield store
