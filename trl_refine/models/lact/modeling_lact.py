"""LaCT-SwiGLU language model in pure PyTorch: sliding-window attention plus a chunked fast-weight SwiGLU branch.

A clean-room implementation of the published LaCT language model (arXiv 2505.23884; the model ReFINE, arXiv
2602.16704, trains) written from the specification in ``research/lact.md``. It loads the published checkpoint
format (same state-dict keys and shapes), runs on CPU and GPU without flash-attn or Triton, and carries a recurrent
decode state (:mod:`.state`) so that ``generate`` and segmented forwards never recompute the sequence.

Padding semantics: padded positions (``attention_mask == 0``) are removed from the sequence. Each row is the
sequence of its valid tokens; positions, chunk boundaries and attention windows count valid tokens only. So left
(or any) padding does not change the outputs of valid tokens. This deliberately differs from the reference, whose
pads take part in the fast-weight updates and shift RoPE positions (see ``docs/lact.md``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .configuration_lact import LaCTConfig
from .fast_weight import BASE_LR_INV, FastWeightSpec, KeptFastWeights, make_schedule, run_fast_weights
from .state import LaCTCache, shared_window_layout

logger = logging.get_logger(__name__)

__all__ = [
    "LaCTBlock",
    "LaCTCausalLMOutput",
    "LaCTDeferredStates",
    "LaCTForCausalLM",
    "LaCTModel",
    "LaCTModelOutput",
    "LaCTPreTrainedModel",
    "check_lact_checkpoint",
    "convert_lact_state_dict",
    "infer_lact_dims",
    "lact_causal_lm_loss",
]

TTT_NORM_EPS = 1e-5  # fla RMSNorm default, used by the reference for the fast-weight output norm
QK_NORM_EPS = 1e-5
L2_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------------------------------------------------


class LaCTRMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class LaCTMLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate(z)) * up(z))`` without biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LowRankWeight(nn.Module):
    """Low-rank initial fast weight ``w_left @ w_right + 0.5 * I`` (``[n, out, r] @ [n, r, in]``)."""

    IDENTITY_GAIN = 0.5

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def forward(self) -> torch.Tensor:
        w = self.w_left @ self.w_right
        eye = torch.eye(w.shape[-2], w.shape[-1], dtype=w.dtype, device=w.device)
        return w + self.IDENTITY_GAIN * eye


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[B, T, 1, head_dim/2]`` of NeoX RoPE, computed in float32 and rounded to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (non-interleaved) of ``x: [B, T, h, hd]`` in float32, cast back."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos.float(), sin.float()
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf / (torch.linalg.vector_norm(xf, dim=-1, keepdim=True) + L2_EPS)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# One model call's plan: which tokens are valid, their positions, fast-weight schedule, window bookkeeping
# ---------------------------------------------------------------------------------------------------------------------


class _ForwardPlan:
    """Everything the layers share in one call (built with at most one host sync)."""

    def __init__(
        self,
        config: LaCTConfig,
        batch_size: int,
        seq_len: int,
        n_valid_t: torch.Tensor,
        pos0_t: torch.Tensor,
        n_valid: list[int],
        pos0: list[int],
        has_state: bool,
        device: torch.device,
        group: int = 1,
        branch_len: int = 0,
        state_counts: torch.Tensor | None = None,
        deferred: LaCTDeferredStates | None = None,
    ):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_valid_t, self.pos0_t = n_valid_t, pos0_t
        self.n_valid, self.pos0 = n_valid, pos0
        self.has_state = has_state
        self.full = all(n == seq_len for n in n_valid)
        self.positions = pos0_t[:, None] + torch.arange(seq_len, device=device)[None, :]
        #: ``[B, P]`` valid tokens after which every layer's state is wanted (``state_positions``), or None; the
        #: layers write them to ``position_states[layer_idx]``
        self.state_counts = state_counts
        self.position_states: dict[int, dict[str, torch.Tensor]] = {}
        #: with ``deferred_states=True``: where the layers keep what gives their states at counts chosen later
        self.deferred = deferred
        #: the layers keep what gives their states at token counts (`_KeptLayer`), for now or for later
        self.keep_states = state_counts is not None or deferred is not None
        force_chunks = self.keep_states  # the states at the counts come from the chunked path
        self.schedule = make_schedule(n_valid, pos0, seq_len, config.lact_chunk_size, device, force_chunks)
        self.head_dim = config.head_dim
        self.theta = float(config.rope_theta)
        W = config.window_size
        self.window = W
        self.cache_valid = None
        #: a state whose window is shared by groups of ``group`` consecutive rows (see `.state.share_window`): the
        #: rows have fed ``branch_len`` tokens each since the shared window's position
        self.group, self.branch_len = group, branch_len
        window_pos = pos0_t[::group] - branch_len  # position after the (shared) window's last slot
        if has_state and W > 1 and min(pos0) - branch_len < W - 1:
            # slot i of the cached window holds position window_pos - (W-1) + i; it is real iff that is >= 0
            self.cache_valid = torch.arange(W - 1, device=device)[None, :] >= (W - 1 - window_pos)[:, None]
        self.cache_index = n_valid_t[:, None] + torch.arange(max(W - 1, 0), device=device)[None, :]
        self._rope: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._rope:
            self._rope[dtype] = _rope_tables(self.positions, self.head_dim, self.theta, dtype)
        return self._rope[dtype]


#: segments of at most this many tokens that continue a state attend to the cached window without copying it
SHORT_SEGMENT_TOKENS = 64


def _sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    window: int,
    cache_valid: torch.Tensor | None,
    branch_len: int = 0,
) -> torch.Tensor:
    """Causal sliding-window attention, head-major: ``q, k, v: [B, H, T, hd]`` (post-RoPE), optional cached window
    ``k_cache, v_cache: [B, H, W-1, hd]`` holding the ``W-1`` tokens before the segment (slot ``c`` sits at offset
    ``c - (W-1)``; slots marked False in ``cache_valid [B, W-1]`` are ignored). Query i sees the keys at offsets
    ``(i - window, i]``. Returns ``[B, H, T, hd]``.

    A window shared by groups of G consecutive rows (``k_cache: [B/G, H, W-1, hd]``, `.state.share_window`) comes
    with ``k, v: [B, H, branch_len + T, hd]``: each row's own tokens since the window, this call's last; the
    queries are the last T of them.

    * no cache, ``T <= W``: one causal SDPA call;
    * cache and a short segment (decode, rollout branches), or a shared window: scores against the cache and
      against the segment are computed separately and softmaxed jointly, so the window is never copied (or saved
      twice for backward);
    * otherwise: SDPA over query blocks of ``max(W, 64)`` with a banded boolean mask (memory O(T * W)).
    """
    B, H, T, hd = q.shape
    if k_cache is not None and (k_cache.shape[0] != B or branch_len):
        return _attend_cache_and_segment(q, k, v, k_cache, v_cache, window, cache_valid, branch_len)
    if k_cache is None:
        cache_len = 0
        if q.shape[2] <= window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys, values = k, v
    else:
        cache_len = k_cache.shape[2]
        if T <= SHORT_SEGMENT_TOKENS:
            return _attend_cache_and_segment(q, k, v, k_cache, v_cache, window, cache_valid)
        keys, values = torch.cat([k_cache.to(k.dtype), k], dim=2), torch.cat([v_cache.to(v.dtype), v], dim=2)
    block = max(window, 64)
    outs = []
    for qs in range(0, T, block):
        qe = min(T, qs + block)
        ks, ke = max(0, qs + cache_len - window + 1), qe + cache_len
        i = torch.arange(qs, qe, device=q.device)[:, None]
        j = torch.arange(ks, ke, device=q.device)[None, :] - cache_len
        mask = ((j <= i) & (i - j < window))[None, None]
        if cache_valid is not None and ks < cache_len:
            keys_ok = torch.cat([cache_valid[:, ks:], cache_valid.new_ones(B, ke - cache_len)], dim=1)
            mask = mask & keys_ok[:, None, None, :]
        outs.append(
            F.scaled_dot_product_attention(q[:, :, qs:qe], keys[:, :, ks:ke], values[:, :, ks:ke], attn_mask=mask)
        )
    return torch.cat(outs, dim=2)


def _attend_cache_and_segment(q, k, v, k_cache, v_cache, window, cache_valid, branch_len=0):
    """Queries ``q [B, H, T, hd]`` (the last T of the segment ``k, v [B, H, S, hd]``, ``S = branch_len + T``)
    against the cached window and the segment, one softmax over both. The window may be shared by groups of
    ``G = B / P`` consecutive rows (``k_cache: [P, H, W-1, hd]``, ``cache_valid [P, W-1]``): their queries are then
    stacked along the query axis, so each group reads its one window (and the backward sums the G rows' gradients
    into it) without it ever being expanded."""
    B, H, T, hd = q.shape
    P, cache_len, S = k_cache.shape[0], k_cache.shape[2], k.shape[2]
    G = B // P
    scale = hd**-0.5

    def grouped(x):  # [B, H, T, X] -> [P, H, G*T, X] (a view when G == 1)
        return x if G == 1 else x.view(P, G, H, T, -1).transpose(1, 2).reshape(P, H, G * T, -1)

    def ungrouped(x):  # inverse of grouped
        return x if G == 1 else x.view(P, H, G, T, -1).transpose(1, 2).reshape(B, H, T, -1)

    s_cache = (grouped(q) @ k_cache.to(q.dtype).mT).float() * scale  # [P, H, G*T, W-1]
    s_seg = (q @ k.mT).float() * scale  # [B, H, T, S]
    i = torch.arange(T, device=q.device)[:, None] + branch_len  # the queries' offsets after the window
    c = torch.arange(cache_len, device=q.device)[None, :]
    ok_cache = (i - (c - cache_len) < window).repeat(G, 1)[None, None]  # causal by construction
    if cache_valid is not None:
        ok_cache = ok_cache & cache_valid[:, None, None, :]
    j = torch.arange(S, device=q.device)[None, :]
    ok_seg = ((j <= i) & (i - j < window))[None, None]
    s_cache = s_cache.masked_fill(~ok_cache, float("-inf"))
    s_seg = s_seg.masked_fill(~ok_seg, float("-inf"))
    probs = torch.cat([s_cache, grouped(s_seg)], dim=-1).softmax(dim=-1).to(v.dtype)
    out_cache = probs[..., :cache_len] @ v_cache.to(v.dtype)  # [P, H, G*T, hd]
    if G == 1:
        return out_cache + probs[..., cache_len:] @ v
    return ungrouped(out_cache) + ungrouped(probs[..., cache_len:]) @ v


# ---------------------------------------------------------------------------------------------------------------------
# The LaCT layer
# ---------------------------------------------------------------------------------------------------------------------


class LaCTAttention(nn.Module):
    """Shared qkv projection, a sliding-window attention branch and a fast-weight SwiGLU branch, summed before
    ``o_proj``. Parameter names follow the published checkpoint (``model.layers.{i}.attn.*``)."""

    def __init__(self, config: LaCTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D = config.hidden_size
        self.hidden_size = D
        self.num_heads = config.num_attn_heads
        self.head_dim = config.head_dim
        self.num_fw_heads = n = config.num_lact_heads
        self.fw_head_dim = d = config.fw_head_dim
        self.fw_hidden_dim = d_h = config.fw_hidden_dim
        self.window_size = config.window_size

        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)
        if config.attn_qk_norm:
            self.q_norm = LaCTRMSNorm(D, QK_NORM_EPS)
            self.k_norm = LaCTRMSNorm(D, QK_NORM_EPS)
        self.o_proj = nn.Linear(D, D, bias=False)

        rank = config.low_rank
        if rank is not None:
            self.w0 = LowRankWeight(n, d_h, d, rank)
            self.w2 = LowRankWeight(n, d_h, d, rank)
        else:
            self.w0 = nn.Parameter(torch.empty(n, d_h, d))
            self.w2 = nn.Parameter(torch.empty(n, d_h, d))
        self.w1 = nn.Parameter(torch.empty(n, d, d_h))

        self.lr_proj = nn.Linear(D, 3 * n * config.lr_dim)
        self.qk_scale = nn.Parameter(torch.ones(D, 2))
        self.qk_offset = nn.Parameter(torch.zeros(D, 2))
        if config.learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(D, n)
        self.ttt_norm = LaCTRMSNorm(d, TTT_NORM_EPS)
        if config.use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(D, n), nn.Sigmoid())

        self.spec = FastWeightSpec(
            chunk_size=config.lact_chunk_size,
            use_momentum=config.use_momentum,
            use_muon=config.use_muon,
            prenorm=config.ttt_prenorm,
            muon_dtype=getattr(torch, config.muon_dtype),
            fp32_states=config.fp32_states,
        )

    # ------------------------------------------------------------------ fast-weight initial state
    def initial_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W0, W1, W2)`` at the start of a sequence: ``[n, d_h, d], [n, d, d_h], [n, d_h, d]``."""
        w0 = self.w0() if isinstance(self.w0, LowRankWeight) else self.w0
        w2 = self.w2() if isinstance(self.w2, LowRankWeight) else self.w2
        ws = (w0, self.w1, w2)
        if self.config.fp32_states:
            ws = tuple(w.float() for w in ws)
        return ws

    def _fresh_fw_state(self, ws, batch_size: int, delta_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n = self.num_fw_heads
        state = {}
        for j, w in enumerate(ws):
            wb = w.unsqueeze(0).expand(batch_size, *w.shape)
            state[f"w{j}"] = wb
            if self.config.ttt_prenorm:
                state[f"w{j}_raw"] = wb
            if self.config.use_momentum:
                state[f"m{j}"] = w.new_zeros((), dtype=delta_dtype).expand(batch_size, *w.shape)
            state[f"g{j}"] = w.new_zeros((), dtype=torch.float32).expand(batch_size, *w.shape)
        if self.config.use_momentum:
            state["msum"] = ws[0].new_zeros((), dtype=torch.float32).expand(batch_size, n)
        return state

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, plan: _ForwardPlan, state: dict[str, torch.Tensor] | None, need_state: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        cfg = self.config
        B, T, D = x.shape
        H, hd, n, d = self.num_heads, self.head_dim, self.num_fw_heads, self.fw_head_dim
        W = self.window_size

        q, k, v = self.qkv(x).split(D, dim=-1)
        if cfg.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fv = v

        # ---- sliding-window attention (head-major)
        cos, sin = plan.rope(q.dtype)
        qa = _apply_rope(q.view(B, T, H, hd), cos, sin).transpose(1, 2)
        ka = _apply_rope(k.view(B, T, H, hd), cos, sin).transpose(1, 2)
        va = v.view(B, T, H, hd).transpose(1, 2)
        k_cache = v_cache = None
        ks, vs = ka, va  # the segment's keys / values: with a shared window, the branch's tokens since it
        if state is not None and W > 1:
            k_cache, v_cache = state["attn_k"], state["attn_v"]
            if plan.group > 1 or plan.branch_len:
                ks = torch.cat([state["attn_k_branch"].to(ka.dtype), ka], dim=2)
                vs = torch.cat([state["attn_v_branch"].to(va.dtype), va], dim=2)
        o_attn = _sliding_window_attention(qa, ks, vs, k_cache, v_cache, W, plan.cache_valid, plan.branch_len)
        o_attn = o_attn.transpose(1, 2).reshape(B, T, D)

        # ---- fast-weight branch
        fq, fk, fv = fq.view(B, T, n, d), fk.view(B, T, n, d), fv.view(B, T, n, d)
        if cfg.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            if not cfg.no_v_silu:
                fv = F.silu(fv)
        fq, fk = _l2_normalize(fq), _l2_normalize(fk)
        if not cfg.ttt_nope:
            fq = _apply_rope(fq.reshape(B, T, H, hd), cos, sin).view(B, T, n, d)
            fk = _apply_rope(fk.reshape(B, T, H, hd), cos, sin).view(B, T, n, d)
        lr = F.softplus(self.lr_proj(x).float() + BASE_LR_INV).view(B, T, n, 3)
        mom = self.momentum_proj(x) if cfg.use_momentum else None  # [B, T, n]
        ws = self.initial_weights()
        target_norms = tuple(torch.linalg.vector_norm(w.float(), dim=-1, keepdim=True) for w in ws)
        delta_dtype = torch.float32 if cfg.fp32_states else fv.dtype
        if state is None:
            fw_state = self._fresh_fw_state(ws, B, delta_dtype)
        else:
            fw_state = {key[3:]: val for key, val in state.items() if key.startswith("fw_")}
        u, new_fw, kept_fw = run_fast_weights(
            fq.transpose(1, 2),
            fk.transpose(1, 2),
            fv.transpose(1, 2),
            lr.transpose(1, 2),
            mom.transpose(1, 2) if mom is not None else None,
            fw_state,
            target_norms,
            self.spec,
            plan.schedule,
            need_state,
            plan.keep_states,
        )
        if kept_fw is not None:
            kept = _KeptLayer(ka, va, kept_fw, self.window_size)
            if plan.deferred is not None:
                plan.deferred.layers[self.layer_idx] = kept
            else:
                plan.position_states[self.layer_idx] = kept.at(plan.state_counts)
        y = self.ttt_norm(u.transpose(1, 2))  # [B, T, n, d]
        if cfg.learnable_ttt_scale:
            y = y * F.silu(self.ttt_scale_proj(x))[..., None]
        out = self.o_proj(o_attn + y.reshape(B, T, D))

        if not need_state:
            return out, None
        new_state = {"pos": plan.pos0_t + plan.n_valid_t}
        if ks is not ka:  # shared window: it stays shared (by reference) while it is still in every row's window
            if ks.shape[2] < W - 1:
                new_state.update(attn_k=k_cache, attn_v=v_cache, attn_k_branch=ks, attn_v_branch=vs)
            else:  # the window now holds the row's own tokens only
                new_state.update(attn_k=ks[:, :, 1 - W :], attn_v=vs[:, :, 1 - W :])
            new_state.update({f"fw_{key}": val for key, val in new_fw.items()})
            return out, new_state
        if k_cache is None:
            k_cache = ka.new_zeros(B, H, W - 1, hd)
            v_cache = va.new_zeros(B, H, W - 1, hd)
        # the last W-1 valid tokens of [old window | segment]: row b's segment ends at column W-1+n_b
        idx = plan.cache_index[:, None, :, None].expand(B, H, W - 1, hd)
        new_state["attn_k"] = torch.cat([k_cache.to(ka.dtype), ka], dim=2).gather(2, idx)
        new_state["attn_v"] = torch.cat([v_cache.to(va.dtype), va], dim=2).gather(2, idx)
        new_state.update({f"fw_{key}": val for key, val in new_fw.items()})
        return out, new_state


@dataclass
class _KeptLayer:
    """What one layer's pass from the fresh state keeps for its states at token counts: the post-RoPE attention keys
    and values ``ka, va [B, H, T, hd]`` (compact layout) and the fast-weight branch's `KeptFastWeights`."""

    ka: torch.Tensor
    va: torch.Tensor
    fast_weights: KeptFastWeights
    window_size: int

    def at(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's state after each row's first ``counts [B, P]`` valid tokens, keys and shapes of the state
        with a position dim after the batch: the window holds the ``W-1`` keys/values before ``counts`` (zeros
        before the start), gathered here per position."""
        ka, va = self.ka, self.va
        B, H, _, hd = ka.shape
        slots = max(self.window_size - 1, 0)
        index = (counts[..., None] + torch.arange(slots, device=ka.device)).view(B, -1)  # [B, P * slots]
        state = {"pos": counts}
        for key, x in (("attn_k", ka), ("attn_v", va)):
            padded = torch.cat([x.new_zeros(B, H, slots, hd), x], dim=2)
            window = padded.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], hd))
            state[key] = window.view(B, H, counts.shape[1], slots, hd).transpose(1, 2)  # [B, P, H, W-1, hd]
        state.update({f"fw_{key}": val for key, val in self.fast_weights.at(counts).items()})
        return state


class LaCTDeferredStates:
    """What a forward keeps so that every layer's state after positions chosen *after* it can be computed from it
    (``forward(deferred_states=True)`` → ``deferred_states``; the one-pass engine's fused scan, where the positions
    depend on that forward's entropies).

    Per layer (`_KeptLayer`): the post-RoPE attention keys and values, the fast-weight inputs (k, v, learning rates,
    momentum gates) and the weights each large chunk's outputs used. All are part of the forward's graph, and `at`
    applies the very formulas of ``forward(state_positions=...)`` to them (the window gathered per position, the
    chunk's weights and its masked update sums): the same values, differentiable into the prefix."""

    def __init__(self, mask: torch.Tensor | None, batch_size: int, seq_len: int):
        self.mask, self.batch_size, self.seq_len = mask, batch_size, seq_len
        self.layers: dict[int, _KeptLayer] = {}

    def at(self, positions: torch.LongTensor) -> list[dict[str, torch.Tensor]]:
        """Per layer, as ``position_states``: the states after ``positions [B, P]`` (input columns, the last token
        to include)."""
        counts = _state_counts(positions, self.mask, None, self.batch_size, self.seq_len)
        return [self.layers[i].at(counts) for i in sorted(self.layers)]


class LaCTBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: LaCTConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = LaCTRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = LaCTAttention(config, layer_idx)
        self.mlp_norm = LaCTRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LaCTMLP(config.hidden_size, config.mlp_intermediate_size)

    def forward(self, hidden: torch.Tensor, plan: _ForwardPlan, state, need_state: bool):
        attn_out, new_state = self.attn(self.attn_norm(hidden), plan, state, need_state)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return hidden, new_state


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layout: inference of sizes from tensor shapes, checks, conversion
# ---------------------------------------------------------------------------------------------------------------------

_IGNORED_KEY_SUFFIXES = ("rotary.inv_freq",)


def _shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state_dict.items()}


def _layer_prefix(shapes: dict[str, tuple[int, ...]]) -> str:
    """The prefix before ``layers.`` (``"model."`` for a causal-LM checkpoint, ``""`` for a base model)."""
    for key in shapes:
        if key.endswith("layers.0.attn.w1"):
            return key[: -len("layers.0.attn.w1")]
    raise ValueError(
        f"This does not look like a LaCT checkpoint: no '*layers.0.attn.w1' tensor (first keys: {sorted(shapes)[:5]})."
    )


def infer_lact_dims(state_dict_or_shapes) -> dict:
    """Sizes and switches of a LaCT checkpoint, read from tensor shapes (a state dict or ``{key: shape}``).

    Returns ``num_hidden_layers, hidden_size, vocab_size, num_lact_heads, fw_head_dim, fw_hidden_dim,
    w0_w2_low_rank (-1 = full rank), intermediate_size, fused_gate_proj, lr_proj_rows, qkv_bias, attn_qk_norm,
    learnable_ttt_scale, use_momentum, has_lm_head`` (the number of attention heads leaves no trace in shapes).
    """
    shapes = _shapes(state_dict_or_shapes)
    pre = _layer_prefix(shapes)
    a = f"{pre}layers.0.attn."
    m = f"{pre}layers.0.mlp."
    n, d, d_h = shapes[a + "w1"]
    layers = {int(k[len(pre) + len("layers.") :].split(".")[0]) for k in shapes if k.startswith(pre + "layers.")}
    dims = {
        "num_hidden_layers": len(layers),
        "hidden_size": shapes[a + "qkv.weight"][1],
        "vocab_size": shapes[f"{pre}embeddings.weight"][0] if f"{pre}embeddings.weight" in shapes else None,
        "num_lact_heads": n,
        "fw_head_dim": d,
        "fw_hidden_dim": d_h,
        "w0_w2_low_rank": shapes[a + "w0.w_left"][-1] if a + "w0.w_left" in shapes else -1,
        "lr_proj_rows": shapes[a + "lr_proj.weight"][0] if a + "lr_proj.weight" in shapes else None,
        "qkv_bias": a + "qkv.bias" in shapes,
        "attn_qk_norm": a + "q_norm.weight" in shapes,
        "learnable_ttt_scale": a + "ttt_scale_proj.weight" in shapes,
        "use_momentum": a + "momentum_proj.0.weight" in shapes,
        "has_lm_head": "lm_head.weight" in shapes,
    }
    gate = shapes.get(m + "gate_proj.weight")
    dims["fused_gate_proj"] = gate is not None and m + "up_proj.weight" not in shapes
    dims["intermediate_size"] = None if gate is None else (gate[0] // 2 if dims["fused_gate_proj"] else gate[0])
    return dims


def check_lact_checkpoint(config: LaCTConfig, state_dict_or_shapes, source: str = "checkpoint") -> dict:
    """Check a checkpoint's shapes against ``config``; raise one ``ValueError`` listing every mismatch and its fix.

    Returns the inferred dims (:func:`infer_lact_dims`).
    """
    shapes = _shapes(state_dict_or_shapes)
    dims = infer_lact_dims(shapes)
    pre = _layer_prefix(shapes)
    a = f"{pre}layers.0.attn."
    problems = []

    def need(field: str, found, expected, where: str, fix: str):
        if found is not None and found != expected:
            problems.append(
                f"- {field}: the {source} has {found} ({where}) but the config gives {expected}; fix: {fix}"
            )

    w1 = f"{a}w1 is {list(shapes[a + 'w1'])}"
    need(
        "hidden_size",
        dims["hidden_size"],
        config.hidden_size,
        f"{a}qkv.weight is {list(shapes[a + 'qkv.weight'])}",
        f"set hidden_size={dims['hidden_size']}",
    )
    need(
        "num_hidden_layers",
        dims["num_hidden_layers"],
        config.num_hidden_layers,
        "layers in the state dict",
        f"set num_hidden_layers={dims['num_hidden_layers']}",
    )
    need(
        "vocab_size",
        dims["vocab_size"],
        config.vocab_size,
        f"{pre}embeddings.weight",
        f"set vocab_size={dims['vocab_size']}",
    )
    need(
        "num_lact_heads",
        dims["num_lact_heads"],
        config.num_lact_heads,
        w1,
        f"set num_lact_heads={dims['num_lact_heads']}",
    )
    if dims["num_lact_heads"] == config.num_lact_heads:
        need("fast-weight head dim", dims["fw_head_dim"], config.fw_head_dim, w1, "check hidden_size / num_lact_heads")
        need(
            "fast-weight hidden dim",
            dims["fw_hidden_dim"],
            config.fw_hidden_dim,
            w1,
            f"set inter_multi={dims['fw_hidden_dim'] / max(dims['fw_head_dim'], 1):g}",
        )
    cfg_rank = config.low_rank or -1
    if dims["w0_w2_low_rank"] != cfg_rank:
        found = (
            "full-rank W0/W2 (attn.w0 is a tensor)"
            if dims["w0_w2_low_rank"] == -1
            else (f"low-rank W0/W2 of rank {dims['w0_w2_low_rank']} ({a}w0.w_left is {list(shapes[a + 'w0.w_left'])})")
        )
        problems.append(
            f"- w0_w2_low_rank: the {source} has {found} but the config gives {config.w0_w2_low_rank}; "
            f"fix: set w0_w2_low_rank={dims['w0_w2_low_rank']}"
        )
    need(
        "lr_proj rows (3 * num_lact_heads * lr_dim)",
        dims["lr_proj_rows"],
        3 * config.num_lact_heads * config.lr_dim,
        f"{a}lr_proj.weight",
        "check num_lact_heads and lr_dim",
    )
    for field in ("qkv_bias", "attn_qk_norm", "learnable_ttt_scale", "use_momentum"):
        need(field, dims[field], bool(getattr(config, field)), "presence of its tensors", f"set {field}={dims[field]}")
    need(
        "intermediate size",
        dims["intermediate_size"],
        config.mlp_intermediate_size,
        f"{pre}layers.0.mlp.gate_proj",
        f"set intermediate_size={dims['intermediate_size']}",
    )
    if pre == "model." and not dims["has_lm_head"] and not config.tie_word_embeddings:
        problems.append(
            f"- lm_head.weight is missing from the {source} but tie_word_embeddings=False; "
            "fix: set tie_word_embeddings=True if the head is tied"
        )
    if problems:
        raise ValueError(f"The LaCT {source} does not match the config:\n" + "\n".join(problems))
    return dims


def convert_lact_state_dict(state_dict: dict) -> dict:
    """Drop non-persistent RoPE buffers and split an old fused ``mlp.gate_proj`` ``[2I, D]`` (gate first) into
    ``gate_proj`` and ``up_proj``. Returns a new dict; tensors are not copied."""
    out = {}
    for key, val in state_dict.items():
        if key.endswith(_IGNORED_KEY_SUFFIXES):
            continue
        out[key] = val
    for key in list(out):
        if key.endswith("mlp.gate_proj.weight") and key.replace("gate_proj", "up_proj") not in out:
            gate, up = out[key].chunk(2, dim=0)
            out[key] = gate
            out[key.replace("gate_proj", "up_proj")] = up
    return out


def _read_checkpoint_shapes(path: str, **hub_kwargs) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a checkpoint (safetensors headers or an mmap'd torch file) without loading it."""
    from transformers.utils import cached_file

    def locate(name: str) -> str | None:
        sub = hub_kwargs.get("subfolder") or ""
        local = os.path.join(path, sub, name)
        if os.path.isdir(path):
            return local if os.path.isfile(local) else None
        try:
            return cached_file(
                path,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub_kwargs,
            )
        except Exception:  # noqa: BLE001 - any resolution problem: let from_pretrained report it
            return None

    def st_shapes(file: str) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    def pt_shapes(file: str) -> dict[str, tuple[int, ...]]:
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return {k: tuple(v.shape) for k, v in sd.items()}

    for index_name, reader in (
        ("model.safetensors.index.json", st_shapes),
        ("pytorch_model.bin.index.json", pt_shapes),
    ):
        index = locate(index_name)
        if index:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            shapes = {}
            for name in files:
                file = locate(name)
                if file is None:
                    return None
                shapes.update(reader(file))
            return shapes
    for name, reader in (("model.safetensors", st_shapes), ("pytorch_model.bin", pt_shapes)):
        file = locate(name)
        if file:
            return reader(file)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# ---------------------------------------------------------------------------------------------------------------------


class LaCTPreTrainedModel(PreTrainedModel):
    config_class = LaCTConfig
    config: LaCTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LaCTBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = [r"rotary\.inv_freq"]
    _is_stateful = True
    _input_embed_layer = "embeddings"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        gain = self.config.fw_init_gain
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LaCTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LowRankWeight):
            init.normal_(module.w_left, mean=0.0, std=gain / math.sqrt(module.w_left.shape[-1]))
            init.normal_(module.w_right, mean=0.0, std=gain / math.sqrt(module.w_right.shape[-1]))
        elif isinstance(module, LaCTAttention):
            for name in ("w0", "w2"):
                p = getattr(module, name)
                if isinstance(p, nn.Parameter):
                    init.normal_(p, mean=0.0, std=1.0 / math.sqrt(p.shape[-1]))
            init.normal_(module.w1, mean=0.0, std=1.0 / math.sqrt(module.w1.shape[-1]))
            init.ones_(module.qk_scale)
            init.zeros_(module.qk_offset)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own LaCTCache

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :func:`convert_lact_state_dict` and :func:`check_lact_checkpoint`
        (a clear error when heads, rank or sizes disagree with the config)."""
        state_dict = convert_lact_state_dict(state_dict)
        check_lact_checkpoint(self.config, state_dict, source="state dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` preceded by a shape check of the checkpoint against its config:
        heads, low rank and sizes are read from the tensor shapes and any disagreement is one clear error."""
        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            hub_kwargs = {
                k: kwargs[k]
                for k in ("cache_dir", "revision", "subfolder", "token", "local_files_only", "force_download")
                if kwargs.get(k) is not None
            }
            shapes = _read_checkpoint_shapes(str(pretrained_model_name_or_path), **hub_kwargs)
            if shapes is not None:
                config = kwargs.get("config")
                if not isinstance(config, LaCTConfig):
                    config = LaCTConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
                dims = check_lact_checkpoint(config, shapes, source=f"checkpoint {pretrained_model_name_or_path}")
                if dims["fused_gate_proj"]:
                    raise ValueError(
                        "This LaCT checkpoint stores a fused mlp.gate_proj [2I, D]; load its tensors, convert them "
                        "with convert_lact_state_dict(state_dict) and call model.load_state_dict(...) instead."
                    )
        elif kwargs.get("state_dict") is not None:
            kwargs["state_dict"] = convert_lact_state_dict(kwargs["state_dict"])
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


@dataclass
class LaCTModelOutput(BaseModelOutputWithPast):
    #: with ``state_positions [B, P]``: per layer, the state after each position, the keys of `.state` with a position
    #: dim after the batch (``pos [B, P]``, ``attn_k [B, P, H, W-1, hd]``, ``fw_w0 [B, P, n, d_h, d]``, ...); else None
    position_states: list[dict[str, torch.Tensor]] | None = None
    #: with ``deferred_states=True``: what gives those states for positions chosen after the forward
    #: (`LaCTDeferredStates`, ``.at(positions)``)
    deferred_states: LaCTDeferredStates | None = None


@dataclass
class LaCTCausalLMOutput(CausalLMOutputWithPast):
    #: see `LaCTModelOutput.position_states`
    position_states: list[dict[str, torch.Tensor]] | None = None
    #: see `LaCTModelOutput.deferred_states`
    deferred_states: LaCTDeferredStates | None = None


def _coerce_states(past_key_values) -> tuple[LaCTCache | None, list | None]:
    if past_key_values is None:
        return None, None
    if isinstance(past_key_values, LaCTCache):
        return past_key_values, (past_key_values.states or None)
    if isinstance(past_key_values, (list, tuple)) and all(isinstance(s, dict) for s in past_key_values):
        return None, (list(past_key_values) or None)
    raise TypeError(
        f"past_key_values must be a LaCTCache or a list of per-layer state dicts, not {type(past_key_values).__name__}"
    )


class LaCTModel(LaCTPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` LaCT blocks and the final RMSNorm."""

    def __init__(self, config: LaCTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LaCTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LaCTRMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: LaCTCache | list | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        state_positions: torch.LongTensor | None = None,
        deferred_states: bool = False,
        **kwargs,
    ) -> LaCTModelOutput | tuple:
        """Run the model over one segment.

        * ``attention_mask [B, T']`` (``T' >= T``; the last ``T`` columns are used, as ``generate`` passes the
          whole mask): 0 marks pads, which are removed from the sequence (outputs at pads are zeros).
        * ``past_key_values``: a :class:`LaCTCache` (updated by rebinding and returned) or a list of per-layer
          state dicts (left untouched; a new cache is returned). Positions come from the state, so
          ``position_ids`` is accepted for API compatibility and not used.
        * ``use_cache`` defaults to True when a state is passed, else to ``config.use_cache`` in eval mode and False
          in training.
        * ``state_positions [B, P]`` (input columns, the last token to include; a call without a past state): also
          return every layer's state after each of those positions (``position_states``, see `LaCTModelOutput`),
          as autograd outputs of this pass.
        * ``deferred_states=True`` (a call without a past state): keep what gives those states for positions chosen
          after the forward (``deferred_states.at(positions)``, see `LaCTDeferredStates`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if output_attentions:
            raise ValueError("LaCT does not return attention weights (output_attentions=True is not supported).")
        if kwargs.get("cu_seqlens") is not None:
            raise ValueError("LaCT does not support packed sequences (cu_seqlens); pad the batch instead.")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache_in, states = _coerce_states(past_key_values)
        if use_cache is None:
            use_cache = past_key_values is not None or (self.config.use_cache and not self.training)

        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, D = hidden.shape
        if T == 0:
            raise ValueError("LaCT needs at least one input token per call.")
        device = hidden.device
        if states is not None:
            if len(states) != len(self.layers):
                raise ValueError(f"The state has {len(states)} layers, the model {len(self.layers)}.")
            if states[0]["pos"].shape[0] != B:
                raise ValueError(f"The state has batch size {states[0]['pos'].shape[0]}, the input {B}.")

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask must be a 0/1 tensor [batch, >= seq_len]; got {tuple(attention_mask.shape)} "
                    f"for inputs of shape {(B, T)}."
                )
            mask = attention_mask[:, -T:].to(device=device).bool()
        if mask is None and states is None:
            n_valid, pos0 = [T] * B, [0] * B
            n_valid_t = torch.full((B,), T, dtype=torch.long, device=device)
            pos0_t = torch.zeros(B, dtype=torch.long, device=device)
        else:
            n_valid_t = mask.sum(-1) if mask is not None else torch.full((B,), T, dtype=torch.long, device=device)
            pos0_t = states[0]["pos"].to(device) if states is not None else torch.zeros_like(n_valid_t)
            n_valid, pos0 = torch.stack([n_valid_t, pos0_t]).tolist()
        compact = mask is not None and any(nv != T for nv in n_valid)
        if compact:
            # stable sort: valid tokens first, in order -> row b's tokens are columns 0..n_b-1
            perm = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
            hidden = hidden.gather(1, perm[:, :, None].expand(B, T, D))
            inverse = torch.argsort(perm, dim=1)
            pads = ~mask[:, :, None]

            def restore(x: torch.Tensor) -> torch.Tensor:
                return x.gather(1, inverse[:, :, None].expand(B, T, x.shape[-1])).masked_fill(pads, 0)
        else:

            def restore(x: torch.Tensor) -> torch.Tensor:
                return x

        state_counts = deferred = None
        if deferred_states and state_positions is not None:
            raise ValueError("pass state_positions (positions known before the forward) or deferred_states, not both")
        if state_positions is not None:
            state_counts = _state_counts(state_positions, mask, states, B, T)
        if deferred_states:
            if states is not None:
                raise ValueError("deferred_states needs a call from the start of the documents (no past_key_values)")
            deferred = LaCTDeferredStates(mask, B, T)
        group, branch_len = shared_window_layout(states) if states is not None else (1, 0)
        if (group > 1 or branch_len) and compact:
            raise ValueError(
                "a state whose attention window is shared between rows (share_window) takes no padded tokens: every "
                "row must feed the same number of tokens (pass no attention_mask, or unshare_window(states) first)"
            )
        plan = _ForwardPlan(
            self.config, B, T, n_valid_t, pos0_t, n_valid, pos0, states is not None, device, group, branch_len,
            state_counts, deferred,
        )  # fmt: skip
        all_hidden = [] if output_hidden_states else None
        new_states = []
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(restore(hidden))
            state = states[i] if states is not None else None
            if checkpointing:
                hidden, new_state = torch.utils.checkpoint.checkpoint(
                    layer, hidden, plan, state, use_cache, use_reentrant=False
                )
            else:
                hidden, new_state = layer(hidden, plan, state, use_cache)
            new_states.append(new_state)
        hidden = restore(self.norm(hidden))
        if all_hidden is not None:
            all_hidden.append(hidden)

        cache_out = None
        if use_cache:
            if cache_in is not None:
                cache_in.states = new_states
                cache_in._seen_tokens += T
                cache_out = cache_in
            else:
                cache_out = LaCTCache(new_states, seen_tokens=(max(pos0) if states is not None else 0) + T)
        position_states = None
        if state_counts is not None:
            position_states = [plan.position_states[i] for i in range(len(self.layers))]
        if not return_dict:
            return tuple(x for x in (hidden, cache_out, tuple(all_hidden) if all_hidden else None) if x is not None)
        return LaCTModelOutput(
            last_hidden_state=hidden,
            past_key_values=cache_out,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            position_states=position_states,
            deferred_states=deferred,
        )


def _state_counts(
    positions: torch.Tensor, mask: torch.Tensor | None, states: list | None, batch_size: int, seq_len: int
) -> torch.Tensor:
    """``state_positions [B, P]`` (input columns) -> the numbers of valid tokens up to and including them."""
    if states is not None:
        raise ValueError("state_positions needs a call from the start of the documents (no past_key_values)")
    if positions.dim() != 2 or positions.shape[0] != batch_size or positions.dtype != torch.long:
        raise ValueError(
            f"state_positions must be a LongTensor [batch, P]; got {positions.dtype} {tuple(positions.shape)} for "
            f"a batch of {batch_size}"
        )
    positions = positions.to(mask.device if mask is not None else positions.device)
    if positions.numel() and not bool(((positions >= 0) & (positions < seq_len)).all()):
        raise ValueError(f"state_positions must lie in [0, {seq_len}) (the input columns)")
    if mask is None:
        return positions + 1
    return mask.long().cumsum(-1).gather(1, positions)


def lact_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t+1]``; positions whose input or target is a
    pad (``attention_mask == 0``) or whose label is ``ignore_index`` do not count. Mean over counted tokens, or sum
    divided by ``num_items_in_batch`` when given (gradient accumulation)."""
    T = logits.shape[1]
    target = labels[:, -T:][:, 1:]
    if attention_mask is not None:
        m = attention_mask[:, -T:].to(target.device).bool()
        target = target.masked_fill(~(m[:, 1:] & m[:, :-1]), ignore_index)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index)
    loss = F.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class LaCTForCausalLM(LaCTPreTrainedModel, GenerationMixin):
    """LaCT language model with an (untied by default) LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}
    #: ``forward(state_positions=...)`` returns every layer's state after those positions, from the same pass
    #: (``position_states``; the one-pass engine, trl_refine.rollout.onepass)
    supports_state_positions = True
    #: ``forward(deferred_states=True)`` keeps what gives those states for positions chosen after the forward
    #: (``deferred_states.at(positions)``; the one-pass engine's fused scan)
    supports_deferred_states = True

    def __init__(self, config: LaCTConfig):
        super().__init__(config)
        self.model = LaCTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: LaCTCache | list | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        state_positions: torch.LongTensor | None = None,
        deferred_states: bool = False,
        **kwargs,
    ) -> LaCTCausalLMOutput | tuple:
        """See :meth:`LaCTModel.forward`. ``labels`` are the unshifted targets (usually ``input_ids``); the loss
        shifts them (:func:`lact_causal_lm_loss`). ``logits_to_keep``: an int keeps the last that many positions
        (0 = all), a 1-D tensor keeps those positions."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            state_positions=state_positions,
            deferred_states=deferred_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("logits_to_keep must be 0 when labels are given (the loss needs every position).")
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = lact_causal_lm_loss(logits, labels, attention_mask, num_items_in_batch)
        if not return_dict:
            out = (logits,) + tuple(x for x in (outputs.past_key_values, outputs.hidden_states) if x is not None)
            return ((loss,) + out) if loss is not None else out
        return LaCTCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            position_states=outputs.position_states,
            deferred_states=outputs.deferred_states,
        )
