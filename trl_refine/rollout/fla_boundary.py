"""States at given positions from one forward of fla's DeltaNet, without readout tokens: *boundary states*.

The one-pass engine's second provider for fla ``DeltaNetForCausalLM`` (``OnePassEngine(states="boundary")``). Each
layer runs fla's projections, short convolutions and output norm as `trl_refine.rollout.fla_readout` does, but the
delta rule itself is `trl_refine.kernels.delta_rule_boundary.chunk_delta_rule_states_at`, which returns the states
after the positions' token counts from the same pass over the chunks (the start state of each position's 64-token
chunk plus ≤ 63 tokens of it, a masked triangular solve) and whose backward takes those states' gradients sparsely;
no dense per-chunk states are kept. So the delta-rule op sees the documents alone: no n·K extra tokens in its forward
and backward. The counts' range is checked once per forward, where `PackedLayout` derives them from the positions
(``1 <= counts <= L`` by construction), so the per-layer op runs with ``check_counts=False``: no host-device sync
inside a layer.

Layout: the kernel takes ``[B, T, H, *]`` without ``cu_seqlens``, so every document goes in its own row from column
0 (token r of document b at ``[b, r]``, T = L; chunks start at the document's first token, as in fla's varlen
call), and the columns after a document's end hold ``k = v = beta = 0``: such a token leaves the state unchanged
(``S += k (beta (v - Sᵀk))ᵀ = 0``), and its outputs are dropped. The l2 norm of q and k (which fla applies inside its
kernel) is fla's ``l2norm`` with autograd, applied before. The conv states at a position are the last ``conv_size``
projected inputs (`PackedLayout.conv_windows`, shared with the readout provider).

`record_boundary_deferred_states` is the same forward for positions chosen after it (the one-pass engine's fused
scan): the delta rule is `chunk_delta_rule_with_boundary_states`, whose every chunk-boundary state (with their
gradients) is kept with the layer's k, v, beta and conv inputs, and `DeferredBoundaryStates.at` then reads the
states after any positions from those (`states_after`: the boundary state plus ≤ 63 tokens of its chunk).

Precision: the states at the positions are fp32 whatever the model's dtype (the partial-chunk part runs in fp32,
autocast off); the readout provider's states pass through the kernel's output dtype instead (bf16 in bf16 models).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from trl_refine.modeling_utils import unwrap
from trl_refine.rollout.fla_readout import (
    PackedLayout,
    check_whole_documents,
    delta_net_inputs,
    fla_readout_support,
    layer_output,
    packed_input,
    patch_layers,
)


def fla_boundary_support(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether every token mixer of ``model`` is fla's ``DeltaNet`` layer (the boundary-state provider), and why
    not."""
    ok, why = fla_readout_support(model)
    if not ok:
        return False, why
    model_type = unwrap(model).config.model_type
    if model_type != "delta_net":
        return False, (
            f"the boundary-state kernel is the ungated delta rule (fla DeltaNet); model_type {model_type!r} needs the "
            "readout provider (OnePassEngine(states='readout'))"
        )
    return True, ""


def _row_index(layout: PackedLayout, length: int) -> torch.Tensor:
    """[Σ] index of every packed token in the [B·L] layout of documents that start at column 0."""
    lens = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
    first = length - lens  # left padding of each document
    return layout.real_flat - first[torch.div(layout.real_flat, length, rounding_mode="floor")]


def _forward_with_boundary_states(
    attn, layout: PackedLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """fla's ``DeltaNet.forward`` (fla/layers/delta_net.py, 0.6.0) for a cache-free call over left-padded documents,
    with the delta rule of `chunk_delta_rule_states_at`; the states after ``layout``'s positions go into
    ``store[layer_idx]``."""
    from fla.modules.norm.l2norm import l2norm

    from trl_refine.kernels.delta_rule_boundary import chunk_delta_rule_states_at

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    x = packed_input(hidden_states, layout)
    q, k, v, beta, conv_states = delta_net_inputs(attn, x, layout)
    if attn.qk_norm == "l2":
        q, k = l2norm(q), l2norm(k)
    rows = _row_index(layout, q_len)

    def unpack(t: torch.Tensor) -> torch.Tensor:  # [1, Σ, H, *] -> [B, L, H, *], zeros after each document
        out = t.new_zeros(bsz * q_len, *t.shape[2:]).index_copy(0, rows, t[0])
        return out.view(bsz, q_len, *t.shape[2:])

    q, k, v, beta = (unpack(t) for t in (q, k, v, beta))
    # counts checked by PackedLayout.parts (once per forward): no per-layer sync. The op's partial-chunk matmuls and
    # solve run in fp32 with autocast off inside it.
    o, states, _ = chunk_delta_rule_states_at(
        q, k, v, beta, attn.head_k_dim**-0.5, None, layout.counts, check_counts=False
    )  # states [B, n, H, K, V] fp32
    store[attn.layer_idx] = {
        "recurrent_state": states,
        "attn_state": None,
        "conv_state": conv_states,
        "ffn_state": None,
    }
    o = o.reshape(bsz * q_len, *o.shape[2:]).index_select(0, rows)[None]
    return layer_output(attn, o, x, layout, bsz, q_len), None, past_key_values


def _forward_keeping_boundary_states(
    attn, layout: PackedLayout, store: dict, hidden_states, attention_mask=None, past_key_values=None, **kwargs
):
    """`_forward_with_boundary_states` with the delta rule of `chunk_delta_rule_with_boundary_states`: the layer
    keeps, in ``store[layer_idx]``, what gives its states after any positions (`DeferredBoundaryStates.at`)."""
    from fla.modules.norm.l2norm import l2norm

    from trl_refine.kernels.delta_rule_boundary import chunk_delta_rule_with_boundary_states

    check_whole_documents(past_key_values, kwargs)
    bsz, q_len, _ = hidden_states.shape
    x = packed_input(hidden_states, layout)
    q, k, v, beta, conv_inputs = delta_net_inputs(attn, x, layout, conv_inputs=True)
    if attn.qk_norm == "l2":
        q, k = l2norm(q), l2norm(k)
    rows = _row_index(layout, q_len)

    def unpack(t: torch.Tensor) -> torch.Tensor:  # [1, Σ, H, *] -> [B, L, H, *], zeros after each document
        out = t.new_zeros(bsz * q_len, *t.shape[2:]).index_copy(0, rows, t[0])
        return out.view(bsz, q_len, *t.shape[2:])

    q, k, v, beta = (unpack(t) for t in (q, k, v, beta))
    o, boundary_states, final_state = chunk_delta_rule_with_boundary_states(q, k, v, beta, attn.head_k_dim**-0.5)
    store[attn.layer_idx] = {
        "recurrent": (boundary_states, final_state, k, v, beta),
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
        from trl_refine.kernels.delta_rule_boundary import states_after

        layout = PackedLayout(**PackedLayout.parts(self.attention_mask, positions)[0])  # checks the positions
        out = []
        for i in sorted(self.layers):
            kept = self.layers[i]
            inputs = kept["conv_inputs"]
            out.append(
                {
                    "recurrent_state": states_after(*kept["recurrent"], layout.counts, check_counts=False),
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
    """While active, a forward of ``model`` (fla DeltaNet, whole left-padded documents, no cache) also fills the
    yielded `DeferredBoundaryStates` with what gives every layer's states after positions chosen later."""
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
    """While active, a forward of ``model`` (fla DeltaNet, whole left-padded documents, no cache) also fills the
    yielded dict with every layer's states after ``positions`` [B, n] (fla's cache layout, a chunk dim after the
    batch dim), from the fused boundary-state kernel (`chunk_delta_rule_states_at`)."""
    ok, why = fla_boundary_support(model)
    if not ok:
        raise ValueError(f"the boundary-state provider cannot run {type(unwrap(model)).__name__}: {why}")
    layout = PackedLayout(**PackedLayout.parts(attention_mask, positions)[0])
    store: dict[int, dict[str, Any]] = {}
    with patch_layers(
        model, lambda attn, *args, **kwargs: _forward_with_boundary_states(attn, layout, store, *args, **kwargs)
    ):
        yield store
