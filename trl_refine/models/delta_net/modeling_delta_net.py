"""A pure-PyTorch reference DeltaNet, weight- and cache-compatible with fla 0.6.0's ``DeltaNetForCausalLM``.

It reproduces the math of ``fla/layers/delta_net.py`` and ``fla/models/delta_net/modeling_delta_net.py`` with plain
torch ops (no Triton), so it runs on CPU in fp32 / bf16 and serves as the oracle of the GPU parity tests:

* identical parameter names and shapes (an fla state dict loads with ``strict=True``);
* the recurrent cache is fla's ``Cache`` (``fla.models.utils.Cache`` = ``FLACache``), one dict per layer
  ``{"recurrent_state": [B, H, K, V] fp32, "attn_state": None, "conv_state": (q, k, v) each [B, D, W],
  "ffn_state": None}``; slot ``W-1`` of a conv state is the newest pre-conv input;
* padding (``attention_mask``) and packed sequences (``cu_seqlens``) follow fla's varlen semantics: every row is the
  sequence of its valid tokens, continued from that row's cached state.

Unlike fla, the forward never writes into a cache tensor in place (new tensors are rebound with
``cache.update``), always writes the conv state next to the recurrent state when a cache is passed (fla trap P3),
and propagates gradients into cached states that require grad.

fla itself is imported lazily (only when a cache is needed), because ``import fla`` costs ~10 s on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache as HFCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_delta_net import RefDeltaNetConfig

# Sequences up to this length use the token-by-token recurrence, longer ones the chunkwise (WY/UT) form.
RECURRENT_MAX_LEN = 4
CHUNK_SIZE = 64


# ============================================================================ cache helpers
def fla_cache_class() -> type:
    """fla's cache class (``fla.models.utils.Cache``, a plain-torch ``FLACache``); imports fla on first use."""
    from fla.models.utils import Cache

    return Cache


def new_cache(layer_states: list[dict[str, Any]] | tuple | None = None, seen_tokens: int = 0):
    """Build an fla ``Cache`` from per-layer state dicts (see module docstring for the layout), or an empty one."""
    return fla_cache_class().from_legacy_cache(tuple(layer_states) if layer_states is not None else None, seen_tokens)


def _as_fla_cache(past_key_values: Any):
    cache_cls = fla_cache_class()
    if past_key_values is None or isinstance(past_key_values, cache_cls):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        return cache_cls.from_legacy_cache(tuple(past_key_values))
    if isinstance(past_key_values, HFCache) and past_key_values.get_seq_length() == 0:
        # e.g. an empty DynamicCache created by a caller: replace it by an (empty) recurrent cache
        return cache_cls()
    raise TypeError(
        f"RefDeltaNet expects an fla Cache (fla.models.utils.Cache) or a sequence of per-layer state dicts as "
        f"past_key_values, got {type(past_key_values).__name__}."
    )


def _layer_state(past_key_values: Any, layer_idx: int) -> dict[str, Any] | None:
    if past_key_values is None or len(past_key_values) <= layer_idx:
        return None
    return past_key_values[layer_idx]


# ============================================================================ delta rule
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for fp32 / bf16 / fp16 inputs (as fla's kernels accumulate), fp64 kept for fp64 inputs
    return torch.promote_types(x.dtype, torch.float32)


def _prepare_qkvb(q, k, v, beta, scale, use_qk_l2norm):
    dtype = _compute_dtype(v)
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    if use_qk_l2norm:
        q = l2norm(q)
        k = l2norm(k)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return q * scale, k, v, beta


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm: ``x / sqrt(sum(x^2) + eps)`` over the last dim (computed in fp32, returned in x's dtype)."""
    xf = x.to(_compute_dtype(x))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token delta rule, as fla's ``fused_recurrent_delta_rule`` (layout ``[B, T, H, *]``).

    ``S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T``, ``o_t = S_t^T (q_t * scale)``, state ``[B, H, K, V]``
    in fp32. Returns ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] fp32)``. Differentiable in every
    input, ``initial_state`` included; never writes into its inputs.
    """
    out_dtype = v.dtype
    q, k, v, beta = _prepare_qkvb(q, k, v, beta, scale, use_qk_l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for t in range(T):
        k_t = k[:, t]
        v_old = torch.einsum("bhkv,bhk->bhv", S, k_t)
        u_t = beta[:, t, :, None] * (v[:, t] - v_old)
        S = S + k_t[..., :, None] * u_t[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), S


def delta_rule_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = CHUNK_SIZE,
    state_counts: torch.Tensor | None = None,
    keep_boundaries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, Any]:
    """Chunkwise (WY / UT-transform) delta rule; same contract as :func:`delta_rule_recurrent`, exact in fp32.

    ``state_counts`` [B, n] (0..T): also return the states after the first ``state_counts[b, j]`` tokens of row
    b, [B, n, H, K, V] fp32, from the same pass (see `_states_after`); differentiable like the final state.
    ``keep_boundaries``: instead, return as third output what `_states_after` needs to give those states for counts
    chosen after the pass, ``(boundaries, k, w, u_tilde)`` (the chunk-boundary states and the chunks' WY factors,
    part of the graph).

    Within a chunk starting from state ``S0`` the pseudo-values ``U = beta * (V - S_{t-1}^T k_t)`` solve
    ``(I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S0)``, so ``U = Ũ - W S0`` with ``Ũ, W`` from one
    unit-triangular solve per chunk (batched over all chunks); then ``O = Q S0 + tril(Q K^T) U`` and
    ``S = S0 + K^T U``. Only the cheap state-dependent part loops over chunks.
    """
    out_dtype = v.dtype
    q, k, v, beta = _prepare_qkvb(q, k, v, beta, scale, use_qk_l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, T))
    n_chunks = (T + C - 1) // C
    pad = n_chunks * C - T
    if pad:
        # zero keys / values / betas leave the state untouched
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D]
        return x.transpose(1, 2).reshape(B, H, n_chunks, C, x.shape[-1])

    q, k, v = chunks(q), chunks(k), chunks(v)
    beta = beta.transpose(1, 2).reshape(B, H, n_chunks, C, 1)
    k_beta = k * beta
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    lower = (k_beta @ k.transpose(-1, -2)).tril(-1) + eye
    rhs = torch.cat([k_beta, v * beta], dim=-1)
    solved = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    w, u_tilde = solved[..., :K], solved[..., K:]
    qk = (q @ k.transpose(-1, -2)).tril()

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs, boundaries = [], [S]
    for n in range(n_chunks):
        u = u_tilde[:, :, n] - w[:, :, n] @ S
        outputs.append(q[:, :, n] @ S + qk[:, :, n] @ u)
        S = S + k[:, :, n].transpose(-1, -2) @ u
        boundaries.append(S)
    o = torch.stack(outputs, dim=2).reshape(B, H, n_chunks * C, V)[:, :, :T].transpose(1, 2)
    if keep_boundaries:
        return o.to(out_dtype), S, (torch.stack(boundaries, dim=2), k, w, u_tilde)
    if state_counts is None:
        return o.to(out_dtype), S
    return o.to(out_dtype), S, _states_after(torch.stack(boundaries, dim=2), k, w, u_tilde, state_counts)


def _states_after(
    boundaries: torch.Tensor, k: torch.Tensor, w: torch.Tensor, u_tilde: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """States after ``counts`` [B, n] tokens, from the chunk-boundary states ``boundaries`` [B, H, N+1, K, V] and the
    chunks' WY factors (``k``, ``w`` [B, H, N, C, K], ``u_tilde`` [B, H, N, C, V]).

    The state after ``c * C + r`` tokens is the boundary state ``S_c`` plus the first r tokens of chunk c:
    ``S_c + K[:r]^T (Ũ[:r] - W[:r] S_c)``. The chunk's triangular system makes its first r pseudo-values depend
    on its first r tokens only, so this is the full-chunk formula with the rows from r on masked: fixed shapes.
    """
    bsz, n = counts.shape
    chunk = k.size(3)
    c = torch.div(counts, chunk, rounding_mode="floor")
    rem = counts - c * chunk
    row = torch.arange(bsz, device=counts.device)[:, None].expand(bsz, n)
    s_c = boundaries.transpose(1, 2)[row, c]  # [B, n, H, K, V]
    cc = c.clamp(max=k.size(2) - 1)  # c = N only when rem = 0 (nothing of chunk N is read)
    k_c, w_c, u_c = (x.transpose(1, 2)[row, cc] for x in (k, w, u_tilde))  # [B, n, H, C, *]
    keep = (torch.arange(chunk, device=counts.device) < rem[..., None]).to(k.dtype)  # [B, n, C]
    keep = keep[:, :, None, :, None]
    u = u_c - w_c @ s_c
    return s_c + (k_c * keep).transpose(-1, -2) @ u


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    state_counts: torch.Tensor | None = None,
    keep_boundaries: bool = False,
):
    """Delta rule: the recurrence for short inputs (decoding), the chunkwise form otherwise (always with
    ``state_counts`` or ``keep_boundaries``, which then add a third output, see :func:`delta_rule_chunkwise`)."""
    if state_counts is not None or keep_boundaries:
        return delta_rule_chunkwise(
            q,
            k,
            v,
            beta,
            initial_state,
            scale,
            use_qk_l2norm,
            state_counts=state_counts,
            keep_boundaries=keep_boundaries,
        )
    if q.shape[1] <= RECURRENT_MAX_LEN:
        return delta_rule_recurrent(q, k, v, beta, initial_state, scale, use_qk_l2norm)
    return delta_rule_chunkwise(q, k, v, beta, initial_state, scale, use_qk_l2norm)


# ============================================================================ padding / packing
class _Packing:
    """Maps ``[B, T, ...]`` inputs to compact rows ``[N, L, ...]``: each row holds one sequence's valid tokens first,
    then zero padding. This reproduces fla's varlen semantics (``attention_mask`` or ``cu_seqlens``) exactly:
    a row's conv window and recurrent state see only its own valid tokens, continued from its cached state."""

    def __init__(self, valid: torch.Tensor, n_valid: torch.Tensor, src_mask: torch.Tensor | None, index=None):
        self.valid = valid  # [N, L] bool
        self.n_valid = n_valid  # [N] long
        self.src_mask = src_mask  # [B, T] bool (mask mode) or None (varlen mode)
        self.index = index  # [N, L] long into the packed token axis (varlen mode)

    @classmethod
    def build(
        cls, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch_size: int, q_len: int
    ) -> _Packing | None:
        if cu_seqlens is not None:
            if batch_size != 1:
                raise ValueError(f"cu_seqlens requires batch size 1 (packed inputs), got batch size {batch_size}.")
            cu_seqlens = cu_seqlens.to(torch.long)
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            length = max(int(lens.max()), 1)
            pos = torch.arange(length, device=cu_seqlens.device)
            valid = pos[None, :] < lens[:, None]
            index = (cu_seqlens[:-1, None] + pos[None, :]).clamp(max=max(q_len - 1, 0))
            return cls(valid, lens, None, index)
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(
                "Expected attention_mask as a 0-1 matrix of shape [batch_size, seq_len] (0 = padding); "
                f"got shape {tuple(attention_mask.shape)}."
            )
        mask = attention_mask[:, -q_len:].bool()
        if bool(mask.all()):
            return None
        n_valid = mask.sum(-1)
        length = max(int(n_valid.max()), 1)
        valid = torch.arange(length, device=mask.device)[None, :] < n_valid[:, None]
        return cls(valid, n_valid, mask)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if self.src_mask is None:
            return x[0][self.index] * self.valid[..., None].to(x.dtype)
        out = x.new_zeros(*self.valid.shape, *x.shape[2:])
        return out.index_put((self.valid,), x[self.src_mask])

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        if self.src_mask is None:
            return y[self.valid].unsqueeze(0)
        out = y.new_zeros(*self.src_mask.shape, *y.shape[2:])
        return out.index_put((self.src_mask,), y[self.valid])


class PositionStates:
    """Request and result of a forward that also returns every layer's cache state at given positions.

    ``counts`` [N, n]: for each (packed) row, the numbers of its tokens after which the states are wanted. Each
    layer writes ``layers[layer_idx] = {"recurrent_state": [N, n, H, K, V] fp32, "conv_state": (q, k, v) each
    [N, n, D, W] or None}`` (fla's cache layout with a chunk dim after the batch dim)."""

    def __init__(self, counts: torch.Tensor):
        self.counts = counts
        self.layers: dict[int, dict[str, Any]] = {}

    @classmethod
    def for_positions(cls, positions: torch.Tensor, packing: _Packing | None) -> PositionStates:
        """From ``positions`` [B, n] (input coordinates, the last token to include) of an unpacked or
        ``attention_mask``-packed call."""
        if packing is None:
            return cls(positions + 1)
        if packing.src_mask is None:
            raise ValueError("state_positions cannot be combined with cu_seqlens (pass one document per row)")
        counts = packing.src_mask.long().cumsum(-1).gather(1, positions)
        return cls(counts)

    def as_states(self) -> list[dict[str, Any]]:
        """Per layer, in layer order."""
        return [self.layers[i] for i in sorted(self.layers)]


class DeferredStates:
    """What a forward keeps so that every layer's cache state after positions chosen *after* it can be computed
    from it (``forward(deferred_states=True)`` → ``deferred_states``; the one-pass engine's fused scan, where the
    positions depend on that forward's entropies).

    Per layer: the chunk-boundary recurrent states and the chunks' WY factors (`delta_rule_chunkwise`'s
    ``keep_boundaries``) and the short convolutions' inputs (the cache followed by the projected tokens). All are
    part of the forward's graph, so the states that `at` returns are differentiable into the prefix, and they are
    the very tensors and formulas of ``forward(state_positions=...)``: the same values."""

    def __init__(self, packing: _Packing | None):
        if packing is not None and packing.src_mask is None:
            raise ValueError("deferred_states cannot be combined with cu_seqlens (pass one document per row)")
        self.packing = packing
        self.layers: dict[int, dict[str, Any]] = {}

    def at(self, positions: torch.LongTensor) -> list[dict[str, Any]]:
        """Per layer, fla's cache layout with a chunk dim after the batch dim, as ``position_states``: the states
        after ``positions`` [B, n] (input coordinates, the last token to include)."""
        counts = PositionStates.for_positions(positions, self.packing).counts
        out = []
        for i in sorted(self.layers):
            kept = self.layers[i]
            convs = kept["conv_inputs"]
            out.append(
                {
                    "recurrent_state": _states_after(*kept["boundaries"], counts),
                    "attn_state": None,
                    "conv_state": None if convs is None else tuple(conv_states_at(x, counts, w) for x, w in convs),
                    "ffn_state": None,
                }
            )
        return out


# ============================================================================ modules
class RMSNorm(nn.Module):
    """fla's ``RMSNorm`` (``fla.modules.RMSNorm``): computed in fp32, returned in the input dtype.

    ``forward(x, residual, prenorm=True)`` returns ``(rmsnorm(x + residual), x + residual)`` like fla's fused
    pre-norm residual (the sum is normalised in fp32 and stored in the residual's dtype).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        dtype = x.dtype
        xf = x.float()
        if residual is not None:
            xf = xf + residual.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        y = y.to(dtype)
        if not prenorm:
            return y
        return y, xf.to(residual.dtype if residual is not None else dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """fla's ``FusedRMSNormGated`` with the swish gate: ``rmsnorm(x) * weight * g * sigmoid(g)`` (fp32 math)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        xf, gf = x.float(), g.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (y * F.silu(gf)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv (fla's ``ShortConvolution``; same ``weight`` ``[D, 1, W]``) with a cache.

    ``forward(x [N, L, D], cache [N, D, W] | None, n_valid [N] | None)`` returns ``(y [N, L, D], new_cache)``.
    ``y[t] = act(sum_j w[:, j] * x[t - W + 1 + j])`` where positions before the first token come from the cache
    (slots ``1..W-1``; slot ``W-1`` is the newest). ``new_cache`` holds the last ``W`` inputs up to each row's last
    valid token (all ``L`` tokens when ``n_valid`` is None) and is a fresh tensor. With ``state_counts`` [N, n] a
    third output holds the caches after ``state_counts[:, j]`` tokens, [N, n, D, W].
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(
            in_channels=hidden_size,
            out_channels=hidden_size,
            kernel_size=kernel_size,
            padding=kernel_size - 1,
            groups=hidden_size,
            bias=bias,
        )
        self.hidden_size = hidden_size
        self.activation = activation

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        cache: torch.Tensor | None = None,
        n_valid: torch.Tensor | None = None,
        state_counts: torch.Tensor | None = None,
        return_inputs: bool = False,
    ):
        N, L, D = x.shape
        W = self.kernel_size[0]
        xt = x.transpose(1, 2)
        cache = xt.new_zeros(N, D, W) if cache is None else cache.to(xt.dtype)
        full = torch.cat([cache, xt], dim=-1)  # [N, D, W + L]; column W + t is token t
        # W shifted multiply-adds == F.conv1d(full[..., 1:], weight, groups=D), but much faster on CPU for the
        # small shapes of decoding (depthwise conv1d costs ~50 ms with its backward there)
        src = full.to(_compute_dtype(full))
        weight = self.weight[:, 0, :].to(src.dtype)
        y = src[..., 1 : 1 + L] * weight[:, 0, None]
        for j in range(1, W):
            y = y + src[..., 1 + j : 1 + j + L] * weight[:, j, None]
        if self.bias is not None:
            y = y + self.bias.to(src.dtype)[:, None]
        if self.activation is not None:
            y = F.silu(y)
        y = y.to(x.dtype).transpose(1, 2)
        if n_valid is None:
            new_cache = full[..., L:].contiguous()
        else:
            idx = n_valid[:, None] + torch.arange(W, device=x.device)[None, :]
            new_cache = full.gather(-1, idx[:, None, :].expand(N, D, W))
        if return_inputs:  # for `conv_states_at` with counts chosen later
            return y, new_cache, full
        if state_counts is None:
            return y, new_cache
        return y, new_cache, conv_states_at(full, state_counts, W)


def conv_states_at(full: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """The conv caches after ``counts[:, j]`` tokens, [N, n, D, W]: the last ``width`` columns up to there of
    ``full`` [N, D, W + L] (the cache, then the layer's inputs; column W + t is token t)."""
    N, D, total = full.shape
    n = counts.size(1)
    idx = counts[..., None] + torch.arange(width, device=full.device)
    return full[:, None].expand(N, n, D, total).gather(-1, idx[:, :, None, :].expand(N, n, D, width))


def _elu_p1(x: torch.Tensor) -> torch.Tensor:
    return (F.elu(x.float(), 1.0, False) + 1.0).to(x)


def _sum_norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=1, dim=-1, eps=1e-6).to(x)


class RefDeltaNetAttention(nn.Module):
    """The DeltaNet token mixer (fla's ``fla.layers.DeltaNet``), same parameter names."""

    def __init__(self, config: RefDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.key_dim, self.value_dim = config.key_dim, config.value_dim
        self.head_k_dim, self.head_v_dim = config.head_k_dim, config.head_v_dim
        self.qk_activation = config.qk_activation
        self.qk_norm = config.qk_norm
        self.use_beta = config.use_beta
        self.use_gate = config.use_gate
        self.use_short_conv = config.use_short_conv
        self.allow_neg_eigval = config.allow_neg_eigval
        self.conv_size = config.conv_size

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        if self.use_beta:
            self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        if self.use_short_conv:
            qk_conv_act = "silu" if self.qk_activation == "silu" else None
            self.q_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=qk_conv_act)
            self.k_conv1d = ShortConvolution(self.key_dim, config.conv_size, activation=qk_conv_act)
            self.v_conv1d = ShortConvolution(self.value_dim, config.conv_size, activation="silu")
        if self.use_gate:
            self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Any = None,
        packing: _Packing | None = None,
        position_states: PositionStates | DeferredStates | None = None,
    ) -> torch.Tensor:
        q_len = hidden_states.shape[1]
        deferred = position_states if isinstance(position_states, DeferredStates) else None
        counts = position_states.counts if position_states is not None and deferred is None else None
        state = _layer_state(past_key_values, self.layer_idx)
        recurrent_state = state.get("recurrent_state") if state is not None else None
        conv_states = state.get("conv_state") if state is not None else None

        x = packing.pack(hidden_states) if packing is not None else hidden_states
        n_valid = packing.n_valid if packing is not None else None
        N, L, _ = x.shape

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv_states = None
        if self.use_short_conv:
            conv_q, conv_k, conv_v = conv_states if conv_states is not None else (None, None, None)
            if deferred is not None:
                q, conv_q, full_q = self.q_conv1d(q, conv_q, n_valid, return_inputs=True)
                k, conv_k, full_k = self.k_conv1d(k, conv_k, n_valid, return_inputs=True)
                v, conv_v, full_v = self.v_conv1d(v, conv_v, n_valid, return_inputs=True)
                conv_inputs = tuple((f, self.conv_size) for f in (full_q, full_k, full_v))
            elif counts is None:
                q, conv_q = self.q_conv1d(q, conv_q, n_valid)
                k, conv_k = self.k_conv1d(k, conv_k, n_valid)
                v, conv_v = self.v_conv1d(v, conv_v, n_valid)
            else:
                q, conv_q, at_q = self.q_conv1d(q, conv_q, n_valid, counts)
                k, conv_k, at_k = self.k_conv1d(k, conv_k, n_valid, counts)
                v, conv_v, at_v = self.v_conv1d(v, conv_v, n_valid, counts)
                conv_at = (at_q, at_k, at_v)
            new_conv_states = (conv_q, conv_k, conv_v)
        else:
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)

        q = q.view(N, L, self.num_heads, self.head_k_dim)
        k = k.view(N, L, self.num_heads, self.head_k_dim)
        v = v.view(N, L, self.num_heads, self.head_v_dim)
        if self.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif self.qk_activation == "elu":
            q, k = _elu_p1(q), _elu_p1(k)
        if self.qk_norm == "sum":
            q, k = _sum_norm(q), _sum_norm(k)

        if self.use_beta:
            beta = self.b_proj(x).sigmoid()
        else:
            beta = torch.ones_like(q[..., 0])
        if self.allow_neg_eigval:
            beta = beta * 2.0
        if packing is not None:
            beta = beta * packing.valid[..., None].to(beta.dtype)  # padding never touches the state

        if deferred is not None:
            o, recurrent_state, boundaries = delta_rule(
                q, k, v, beta, recurrent_state, use_qk_l2norm=(self.qk_norm == "l2"), keep_boundaries=True
            )
            deferred.layers[self.layer_idx] = {
                "boundaries": boundaries,
                "conv_inputs": conv_inputs if self.use_short_conv else None,
            }
        elif counts is None:
            o, recurrent_state = delta_rule(
                q, k, v, beta, initial_state=recurrent_state, use_qk_l2norm=(self.qk_norm == "l2")
            )
        else:
            o, recurrent_state, recurrent_at = delta_rule(
                q, k, v, beta, recurrent_state, use_qk_l2norm=(self.qk_norm == "l2"), state_counts=counts
            )
            position_states.layers[self.layer_idx] = {
                "recurrent_state": recurrent_at,
                "attn_state": None,
                "conv_state": conv_at if self.use_short_conv else None,
                "ffn_state": None,
            }

        if past_key_values is not None:
            past_key_values.update(
                recurrent_state=recurrent_state,
                conv_state=new_conv_states,
                layer_idx=self.layer_idx,
                offset=q_len,
            )

        if self.use_gate:
            g = self.g_proj(x).view(N, L, self.num_heads, self.head_v_dim)
            o = self.o_norm(o, g)
        else:
            o = self.o_norm(o)
        o = self.o_proj(o.reshape(N, L, self.value_dim))
        if packing is not None:
            o = packing.unpack(o)
        return o


class RefDeltaNetMLP(nn.Module):
    """fla's ``GatedMLP`` with ``hidden_act='swish'``: ``down(silu(gate(x)) * up(x))`` (SwiGLU in fp32)."""

    def __init__(self, config: RefDeltaNetConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.mlp_intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj((F.silu(gate.float()) * up.float()).to(x.dtype))


def _make_norm(config: RefDeltaNetConfig) -> nn.Module:
    if config.fuse_norm:
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class RefDeltaNetBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``h += attn(attn_norm(h)); h += mlp(mlp_norm(h))`` (fla's ``DeltaNetBlock``)."""

    def __init__(self, config: RefDeltaNetConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = _make_norm(config)
        self.attn = RefDeltaNetAttention(config, layer_idx)
        self.mlp_norm = _make_norm(config)
        self.mlp = RefDeltaNetMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Any = None,
        packing: _Packing | None = None,
        position_states: PositionStates | DeferredStates | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.attn(
            self.attn_norm(hidden_states),
            past_key_values=past_key_values,
            packing=packing,
            position_states=position_states,
        )
        if self.config.fuse_norm:
            hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.mlp_norm(hidden_states)
        return residual + self.mlp(hidden_states)


# ============================================================================ models
@dataclass
class RefDeltaNetModelOutput(BaseModelOutputWithPast):
    #: per layer, the cache state after each of ``state_positions`` (see `PositionStates`), or None
    position_states: list[dict[str, Any]] | None = None
    #: with ``deferred_states=True``: what gives those states for positions chosen after the forward (`DeferredStates`)
    deferred_states: DeferredStates | None = None


@dataclass
class RefDeltaNetCausalLMOutput(CausalLMOutputWithPast):
    #: per layer, the cache state after each of ``state_positions`` (see `PositionStates`), or None
    position_states: list[dict[str, Any]] | None = None
    #: with ``deferred_states=True``: what gives those states for positions chosen after the forward (`DeferredStates`)
    deferred_states: DeferredStates | None = None


class RefDeltaNetPreTrainedModel(PreTrainedModel):
    config_class = RefDeltaNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RefDeltaNetBlock"]
    _supports_cache_class = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm, nn.RMSNorm)) and module.weight is not None:
            init.ones_(module.weight)


class RefDeltaNetModel(RefDeltaNetPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` DeltaNet blocks and the final norm (fla's ``DeltaNetModel``)."""

    def __init__(self, config: RefDeltaNetConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RefDeltaNetBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state_positions: torch.LongTensor | None = None,
        deferred_states: bool = False,
        **kwargs: Any,
    ) -> tuple | BaseModelOutputWithPast:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        hidden_states = inputs_embeds
        batch_size, q_len = hidden_states.shape[:2]

        if past_key_values is not None or use_cache:
            past_key_values = _as_fla_cache(past_key_values)
            if past_key_values is None:
                past_key_values = fla_cache_class()()
        if (
            past_key_values is not None
            and self.training
            and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        ):
            raise ValueError(
                "HF gradient checkpointing drops the recurrent cache in training (every call would silently start "
                "from a zero state). Disable it (model.gradient_checkpointing_disable()) when passing a cache, or "
                "checkpoint segments yourself with the states as explicit inputs."
            )

        packing = _Packing.build(attention_mask, cu_seqlens, batch_size, q_len)
        if deferred_states and state_positions is not None:
            raise ValueError("pass state_positions (positions known before the forward) or deferred_states, not both")
        position_states = None if state_positions is None else PositionStates.for_positions(state_positions, packing)
        if deferred_states:
            position_states = DeferredStates(packing)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states, past_key_values=past_key_values, packing=packing, position_states=position_states
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(x for x in (hidden_states, past_key_values, all_hidden_states) if x is not None)
        return RefDeltaNetModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=all_hidden_states,
            attentions=None,
            position_states=None if state_positions is None else position_states.as_states(),
            deferred_states=position_states if deferred_states else None,
        )


class RefDeltaNetForCausalLM(RefDeltaNetPreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`RefDeltaNetModel` (fla's ``DeltaNetForCausalLM``; same state-dict keys)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    #: ``forward(state_positions=...)`` returns every layer's cache state after those positions, from the same pass
    #: (``position_states``; the one-pass engine, trl_refine.rollout.onepass)
    supports_state_positions = True
    #: ``forward(deferred_states=True)`` keeps what gives those states for positions chosen after the forward
    #: (``deferred_states.at(positions)``; the one-pass engine's fused scan)
    supports_deferred_states = True

    def __init__(self, config: RefDeltaNetConfig):
        super().__init__(config)
        self.model = RefDeltaNetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model builds its own recurrent (fla) cache; never a DynamicCache
        return False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> RefDeltaNetModel:
        return self.model

    def set_decoder(self, decoder: RefDeltaNetModel) -> None:
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state_positions: torch.LongTensor | None = None,
        deferred_states: bool = False,
        **kwargs: Any,
    ) -> tuple | CausalLMOutputWithPast:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cu_seqlens=cu_seqlens,
            state_positions=state_positions,
            deferred_states=deferred_states,
        )
        hidden_states = outputs.last_hidden_state
        has_labels = labels is not None or shift_labels is not None

        if has_labels or logits_to_keep is None:
            logits = self.lm_head(hidden_states)
        elif isinstance(logits_to_keep, int):
            # 0 keeps every position (hidden_states[:, -0:] is the whole sequence)
            logits = self.lm_head(hidden_states[:, -logits_to_keep:])
        else:
            logits = self.lm_head(hidden_states[:, logits_to_keep])

        loss = None
        if has_labels:
            if shift_labels is None:
                labels = labels.to(logits.device)
                shift_labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], -100)], dim=-1)
            shift_labels = shift_labels.to(logits.device)
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction=reduction,
            )
            if num_items_in_batch is not None:
                if isinstance(num_items_in_batch, torch.Tensor):
                    num_items_in_batch = num_items_in_batch.to(loss.device)
                loss = loss / num_items_in_batch

        if not return_dict:
            output = tuple(x for x in (logits, outputs.past_key_values, outputs.hidden_states) if x is not None)
            return (loss, *output) if loss is not None else output
        return RefDeltaNetCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=None,
            position_states=outputs.position_states,
            deferred_states=outputs.deferred_states,
        )


__all__ = [
    "DeferredStates",
    "PositionStates",
    "RefDeltaNetAttention",
    "RefDeltaNetBlock",
    "RefDeltaNetForCausalLM",
    "RefDeltaNetModel",
    "RefDeltaNetPreTrainedModel",
    "delta_rule",
    "delta_rule_chunkwise",
    "delta_rule_recurrent",
    "fla_cache_class",
    "new_cache",
]
