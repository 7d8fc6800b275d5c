"""The chunked GATED delta rule (fla's GatedDeltaNet) with every chunk-boundary state as an output whose gradient the
backward accepts.

``chunk_gated_delta_rule_with_boundary_states`` computes fla 0.6.0's ``chunk_gated_delta_rule`` (layout
``[B, T, H, *]``, chunks of 64 tokens, per-token log-decay ``g`` per head, as ``naive_recurrent_gated_delta_rule``)::

    S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T,     o_t = scale * S_t^T q_t

and returns, besides ``o`` and the final state, the state at the START of every chunk as ``boundary_states
[B, H, NT, K, V]`` (fp32; c = 0 is the initial state; ``[B, H, NT, V, K]`` with ``state_v_first=True``, the
layout of fla's GatedDeltaNet layer). Its backward is exact for gradients on all three outputs.

Parts: fla's chunk-local kernels for the forward (``chunk_local_cumsum``, ``chunk_gated_delta_rule_fwd_intra``,
``chunk_fwd_o``) and for ``chunk_bwd_dv_local``, ``recompute_w_u_fwd`` and ``prepare_wy_repr_bwd``; the two
recurrences over the chunks are ours (``_chunk_recurrence``, shared with the plain delta rule); and the chunk-local
gradients of q, k, w and g (fla's ``chunk_bwd_dqkwg``) are computed here in PyTorch (``_chunk_grads``), batched over
the chunks. That last part keeps this op's backward clear of fla's Hopper refusal: fla 0.6.0 refuses its gated
``chunk_bwd_dqkwg`` on Hopper with 3.4.0 <= triton < 3.7.1 (``fla/ops/common/chunk_o.py:727-732``, fla #640: Triton
mis-lowers its ``tl.trans`` of an accumulated dot result), the only refusal on fla's gated chunk path, so fla's
GatedDeltaNet cannot train on our H200 image (triton 3.6.0); this op never calls that function (its GPU check:
tests/gpu/test_gpu_gated_boundary_kernel.py). Our recurrence kernels transpose loaded tiles only.

q and k go in as the layer uses them (GatedDeltaNet l2-normalises them: do that outside, with autograd), g as the
raw per-token log-decay (natural log, the layer's ``-A.exp() * softplus(a + dt_bias)``), beta after its sigmoid.
"""

from __future__ import annotations

import math

import torch

# fla 0.6.0 internals used for the chunk-local parts. tests/test_gated_delta_rule_boundary.py checks that these names
# still exist with the arguments used here; if an fla upgrade moves them, fix this block.
from fla.ops.common.chunk_o import chunk_bwd_dv_local, chunk_fwd_o
from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
from fla.ops.utils import chunk_local_cumsum

from trl_refine.kernels._chunk_recurrence import (
    CHUNK,
    add_chunk_grads,
    check_inputs,
    for_fla,
    position_chunks,
    recurrent_backward,
    recurrent_forward,
    states_after_counts,
    states_in_chunks,
    states_in_chunks_backward,
    validate_counts,
)

__all__ = [
    "CHUNK",
    "chunk_gated_delta_rule_states_at",
    "chunk_gated_delta_rule_with_boundary_states",
    "gated_states_after",
]

_RCP_LN2 = 1.0 / math.log(2.0)  # fla's kernels take the cumulative gate in log2 units (exp2)


def _chunks(x: torch.Tensor, NT: int) -> torch.Tensor:
    """[B, T, H, *] -> [B, NT, H, CHUNK, *] fp32, zero-padded past T."""
    B, T, H = x.shape[:3]
    pad = [0, 0] * (x.dim() - 3) + [0, 0, 0, NT * CHUNK - T]
    x = torch.nn.functional.pad(x.float(), pad).view(B, NT, CHUNK, H, *x.shape[3:])
    return x.transpose(2, 3)


def _unchunk(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, NT, H, CHUNK, *] -> [B, T, H, *]."""
    B, NT, H = x.shape[:3]
    return x.transpose(2, 3).reshape(B, NT * CHUNK, H, *x.shape[4:])[:, :T]


def _chunk_grads(q, k, v_new, g_cum, S, dh, do, dv2, scale):
    """The chunk-local gradients that fla's gated ``chunk_bwd_dqkwg`` computes, in PyTorch (fp32): dq, dk, dw and the
    gradient of the chunk-local cumulative gate G (natural units), the last as (per token [B, NT, H, C], per chunk
    for its last token [B, NT, H]: it reaches every token of the chunk through the cumulative sum).

    Within a chunk with start state S, end-state gradient D and G = ln 2 * g_cum:
    o_i = scale (e^G_i q_i^T S + sum_{j<=i} e^(G_i - G_j) (q_i.k_j) v'_j), S_end = e^G_last S + sum_j
    e^(G_last - G_j) k_j v'_j^T, v' = u - w S. ``S``: the chunk-start states in fla's layout [B, NT, H, K, V]."""
    B, T, H, K = q.shape
    NT = S.shape[1]
    qc, kc, vc, doc, dvc = (_chunks(x, NT) for x in (q, k, v_new, do, dv2))
    G = torch.cat([g_cum, g_cum[:, -1:].expand(B, NT * CHUNK - T, H)], 1) * math.log(2.0)  # last token's past T
    G = G.view(B, NT, CHUNK, H).transpose(2, 3)  # [B, NT, H, C]
    S = S.float()
    D = dh.float()  # [B, NT, H, K, V]
    G_last = G[..., -1:]
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    ds = (doc @ vc.transpose(-1, -2)) * torch.exp(
        (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    ) * scale  # fmt: skip
    dq = scale * G.exp()[..., None] * (doc @ S.transpose(-1, -2)) + ds @ kc
    dk_state = (G_last - G).exp()[..., None] * (vc @ D.transpose(-1, -2))
    dk = dk_state + ds.transpose(-1, -2) @ qc
    dw = -(dvc @ S.transpose(-1, -2))
    dg_last = G_last[..., 0].exp() * (S * D).sum((-1, -2)) + (dk_state * kc).sum((-1, -2))
    dg_tok = (dq * qc).sum(-1) - (dk * kc).sum(-1)
    return _unchunk(dq, T), _unchunk(dk, T), _unchunk(dw, T), dg_tok, dg_last


def _backward(q, k, v, g_cum, beta, A, w, S, v_new, do, dht, scale, want_dh0, dhb=None, chunks=None, ds0=None):
    """The op's backward from the recomputed w and the chunk-start states S (fla's layout): (dq, dk, dv, dg of the
    raw gate, dbeta, dh0), the start states' gradients dense (``dhb``) or sparse (``ds0`` at ``chunks``)."""
    T = q.shape[1]
    do = torch.zeros_like(v) if do is None else do.to(q.dtype).contiguous()
    dv = chunk_bwd_dv_local(q=q, k=k, do=do, g=g_cum, scale=scale, chunk_size=CHUNK)
    dh, dh0, dv2 = recurrent_backward(q, k, w, g_cum, do, dv, dht, dhb, scale, want_dh0, chunks=chunks, ds0=ds0)
    dq, dk, dw, dg_tok, dg_last = _chunk_grads(q, k, v_new, g_cum, S, dh, do, dv2, scale)
    dk2, dv_in, dbeta, dg2 = prepare_wy_repr_bwd(
        k=k, v=v, beta=beta, A=A, dw=dw.to(w.dtype).contiguous(), du=dv2, g=g_cum, cu_seqlens=None
    )
    # gradient of the raw gate: reverse cumulative sum over each chunk of the cumulative gate's gradient
    dG = dg_tok + _chunks(dg2[..., None], S.shape[1])[..., 0]
    dg = dG.flip(-1).cumsum(-1).flip(-1) + dg_last[..., None]
    return dq, dk + dk2.float(), dv_in, _unchunk(dg, T), dbeta, dh0


class _ChunkGatedDeltaRuleBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state):
        g_cum = chunk_local_cumsum(g, chunk_size=CHUNK, scale=_RCP_LN2)  # fp32, log2 units
        w, u, A = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g_cum, beta=beta, cu_seqlens=None, chunk_size=CHUNK)
        hs, v_new, ht, _ = recurrent_forward(k, w, u, g_cum, initial_state)
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=for_fla(hs, k.dtype), g=g_cum, scale=scale, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, g_cum, beta, A, hs, v_new)
        ctx.scale = scale
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.g_dtype = g.dtype
        return o.to(v.dtype), hs, ht

    @staticmethod
    def backward(ctx, do, dhb, dht):
        q, k, v, g_cum, beta, A, hs, v_new = ctx.saved_tensors
        w, _ = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g_cum, cu_seqlens=None)
        S = hs.transpose(1, 2)
        dq, dk, dv, dg, dbeta, dh0 = _backward(
            q, k, v, g_cum, beta, A, w, S, v_new, do, dht, ctx.scale, ctx.has_h0, dhb=dhb
        )
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), dbeta.to(beta.dtype), None, dh0,
        )  # fmt: skip


class _ChunkGatedDeltaRuleStatesAt(torch.autograd.Function):
    """The gated op with the states at the positions fused in (as the plain ``_ChunkDeltaRuleStatesAt``): only the n
    start states of the positions' chunks leave the recurrence (fp32), the chunk-start states for chunk_fwd_o are
    written in fla's layout and dtype, and nothing of size NT is saved (the backward recomputes the cumulative gate,
    w, u, the chunk-start states, in fp32 for ``_chunk_grads``, and v_new)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, counts):
        chunks, rem = position_chunks(counts, q.shape[1])
        g_cum = chunk_local_cumsum(g, chunk_size=CHUNK, scale=_RCP_LN2)
        w, u, A = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g_cum, beta=beta, cu_seqlens=None, chunk_size=CHUNK)
        h, v_new, ht, s0 = recurrent_forward(
            k, w, u, g_cum, initial_state, chunks=chunks, fla_layout=True, h_dtype=k.dtype
        )
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g_cum, scale=scale, chunk_size=CHUNK)
        states = states_in_chunks(s0, k, v, beta, g, chunks, rem)
        ctx.save_for_backward(q, k, v, g, beta, A, initial_state, s0, chunks, rem)
        ctx.scale = scale
        return o.to(v.dtype), states, ht

    @staticmethod
    def backward(ctx, do, dstates, dht):
        q, k, v, g, beta, A, h0, s0, chunks, rem = ctx.saved_tensors
        g_cum = chunk_local_cumsum(g, chunk_size=CHUNK, scale=_RCP_LN2)
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g_cum, cu_seqlens=None)
        S, v_new, _, _ = recurrent_forward(k, w, u, g_cum, h0, fla_layout=True)
        ds0 = dkc = None
        if dstates is not None:
            ds0, dkc, dvc, dbc, dgc = states_in_chunks_backward(s0, k, v, beta, g, chunks, rem, dstates)
        dq, dk, dv, dg, dbeta, dh0 = _backward(
            q, k, v, g_cum, beta, A, w, S, v_new, do, dht, ctx.scale, h0 is not None, chunks=chunks, ds0=ds0
        )
        if dkc is not None:  # the partial chunks' direct gradients, into the op's own buffers
            pairs = ((dk, dkc), (dv, dvc), (dbeta, dbc), (dg, dgc))
            dk, dv, dbeta, dg = (add_chunk_grads(dx, dxc, chunks) for dx, dxc in pairs)
        dh0 = dh0.to(h0.dtype) if dh0 is not None else None
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype), None, dh0, None,
        )  # fmt: skip


def chunk_gated_delta_rule_with_boundary_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    state_v_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated delta rule over ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``g, beta [B, T, H]`` from
    ``initial_state`` (zeros if None), ``scale`` defaulting to ``K ** -0.5``.

    Returns ``(o [B, T, H, V] in v's dtype, boundary_states [B, H, NT, K, V] fp32, final_state [B, H, K, V] fp32)``
    with NT = ceil(T / 64): ``boundary_states[:, :, c]`` is the state after the first 64·c tokens. With
    ``state_v_first=True`` the states (initial, boundary, final) are V-first, ``[..., V, K]``, as fla's
    GatedDeltaNet keeps them. Differentiable in q, k, v, g, beta and initial_state, with gradients accepted on all
    three outputs.
    """
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)  # V-first [B, H, V, K] in, checked as K-first
    check_inputs("chunk_gated_delta_rule_with_boundary_states", q, k, v, beta, initial_state, g=g)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o, hs, ht = _ChunkGatedDeltaRuleBoundary.apply(q, k, v, g, beta, scale, initial_state)
    if state_v_first:
        return o, hs.transpose(-1, -2), ht.transpose(-1, -2)
    return o, hs, ht


def gated_states_after(
    boundary_states: torch.Tensor,
    final_state: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    counts: torch.Tensor,
    state_v_first: bool = False,
    *,
    check_counts: bool = True,
) -> torch.Tensor:
    """States after the first ``counts[b, j]`` tokens (0 .. T) of row b, ``[B, n, H, K, V]`` fp32 (``[..., V, K]``
    with ``state_v_first``), differentiable.

    ``boundary_states``/``final_state`` as returned by :func:`chunk_gated_delta_rule_with_boundary_states` on the
    same ``k, v, g, beta`` and ``state_v_first``. The state after 64·c + r tokens is boundary state c decayed by the
    chunk's first r gates plus the masked WY update of those r tokens (one batched unit-triangular solve, fixed
    shapes; see ``_chunk_recurrence.states_after_counts``). ``check_counts=False`` skips the check that counts lie
    in [0, T] (a host-device sync): only for counts checked already.
    """
    if g.shape != k.shape[:3]:
        raise ValueError(f"gated_states_after: g must be [B, T, H] = {tuple(k.shape[:3])}, got {tuple(g.shape)}")
    if state_v_first:
        boundary_states, final_state = boundary_states.transpose(-1, -2), final_state.transpose(-1, -2)
    out = states_after_counts(boundary_states, final_state, k, v, beta, counts, g=g, check_counts=check_counts)
    return out.transpose(-1, -2) if state_v_first else out


def chunk_gated_delta_rule_states_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    counts: torch.Tensor,
    state_v_first: bool = False,
    *,
    check_counts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated delta rule as :func:`chunk_gated_delta_rule_with_boundary_states` with the states after
    ``counts[b, j]`` tokens (``counts`` [B, n] integers in 0 .. T) fused in: returns ``(o, states [B, n, H, K, V]
    fp32, final_state fp32)`` (states ``[..., V, K]`` with ``state_v_first``, the initial state too), what
    :func:`gated_states_after` gives from that op's outputs, without the dense boundary states in between.
    Differentiable in q, k, v, g, beta and initial_state with gradients on all three outputs (the backward as the
    plain ``chunk_delta_rule_states_at``'s). ``check_counts=False`` skips the check that counts lie in [0, T] (a
    host-device sync): only for counts checked already.
    """
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    check_inputs("chunk_gated_delta_rule_states_at", q, k, v, beta, initial_state, g=g)
    validate_counts("chunk_gated_delta_rule_states_at", counts, q.shape[0], q.shape[1], in_range=check_counts)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o, states, ht = _ChunkGatedDeltaRuleStatesAt.apply(
        q, k, v, g, beta, scale, initial_state, counts.to(q.device).long()
    )
    if state_v_first:
        return o, states.transpose(-1, -2), ht.transpose(-1, -2)
    return o, states, ht
