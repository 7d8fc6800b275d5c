"""The chunked (ungated) delta rule with every chunk-boundary state as an output whose gradient the backward accepts.

``chunk_delta_rule_with_boundary_states`` computes the delta rule of fla's ``chunk_delta_rule`` (layout
``[B, T, H, *]``, chunks of 64 tokens)::

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,     o_t = scale * S_t^T q_t

and returns, besides ``o`` and the final state, the state at the START of every chunk, ``S_{64 c}`` for
c = 0 .. NT-1, as ``boundary_states [B, H, NT, K, V]`` (fp32; c = 0 is the initial state). Its backward is exact
for gradients on ``o``, on the final state and on every boundary state: fla's own backward recurrence
(``chunk_gated_delta_rule_bwd_dhu``) takes the final state's gradient only, so the two recurrent passes over the
chunks are Triton kernels of ours (``_chunk_recurrence``, shared with the gated rule; the backward one adds the
supplied gradient at each boundary); the chunk-local parts (the WY representation, the outputs, their gradients)
are fla's kernels. ``states_after`` then gives the differentiable state after any number of tokens from those
boundary states plus at most 63 tokens of the chunk (one masked triangular solve in PyTorch), so positions can be
chosen after the pass. ``chunk_delta_rule_states_at`` fuses the two for positions known before the pass: it takes
the token counts and returns only the states there, saves nothing per chunk for its backward (it recomputes the
chunk-start states, as fla's backward does) and hands the backward recurrence the positions' gradients sparsely.

q and k go in as the layer uses them (fla DeltaNet l2-normalises them first: do that outside, with autograd).
"""

from __future__ import annotations

import torch

# fla 0.6.0 internals used for the chunk-local (non-recurrent) parts. tests/test_delta_rule_boundary.py checks
# that these names still exist with the arguments used here; if an fla upgrade moves them, fix this block.
from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
from fla.ops.delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_fwd, recompute_w_u_fwd

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

__all__ = ["CHUNK", "chunk_delta_rule_states_at", "chunk_delta_rule_with_boundary_states", "states_after"]


def _backward(q, k, v, beta, A, w, h, v_new, do, dht, scale, want_dh0, dhb=None, chunks=None, ds0=None):
    """The op's backward from the recomputed w and the chunk-start states h (fla's layout, k's dtype): (dq, dk, dv,
    dbeta, dh0), the start states' gradients dense (``dhb``) or sparse (``ds0`` at ``chunks``)."""
    do = torch.zeros_like(v) if do is None else do.to(q.dtype).contiguous()
    dv = chunk_bwd_dv_local(q=q, k=k, do=do, g=None, scale=scale, chunk_size=CHUNK)
    dh, dh0, dv2 = recurrent_backward(q, k, w, None, do, dv, dht, dhb, scale, want_dh0, chunks=chunks, ds0=ds0)
    dq, dk, dw, _ = chunk_bwd_dqkwg(
        q=q, k=k, v=v_new, h=h, w=w, dv=dv2, do=do, dh=dh, g=None, scale=scale, chunk_size=CHUNK
    )
    dk2, dv_in, dbeta = prepare_wy_repr_bwd(k=k, v=v, beta=beta, A=A, dw=dw, du=dv2, cu_seqlens=None)
    return dq, dk + dk2, dv_in, dbeta, dh0


class _ChunkDeltaRuleBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state):
        w, u, A = prepare_wy_repr_fwd(k=k, v=v, beta=beta, cu_seqlens=None, chunk_size=CHUNK)
        hs, v_new, ht, _ = recurrent_forward(k, w, u, None, initial_state)
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=for_fla(hs, k.dtype), g=None, scale=scale, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, beta, A, hs, v_new)
        ctx.scale = scale
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o.to(v.dtype), hs, ht

    @staticmethod
    def backward(ctx, do, dhb, dht):
        q, k, v, beta, A, hs, v_new = ctx.saved_tensors
        w, _ = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, cu_seqlens=None)
        h = for_fla(hs, k.dtype)
        dq, dk, dv, dbeta, dh0 = _backward(q, k, v, beta, A, w, h, v_new, do, dht, ctx.scale, ctx.has_h0, dhb=dhb)
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), None, dh0


class _ChunkDeltaRuleStatesAt(torch.autograd.Function):
    """The op with the states at the positions fused in: only the n start states of the positions' chunks leave the
    recurrence (fp32), the chunk-start states for chunk_fwd_o are written in fla's layout and dtype, and nothing of
    size NT is saved: the backward recomputes w, u, h and v_new as fla's own backward does."""

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, counts):
        chunks, rem = position_chunks(counts, q.shape[1])
        w, u, A = prepare_wy_repr_fwd(k=k, v=v, beta=beta, cu_seqlens=None, chunk_size=CHUNK)
        h, v_new, ht, s0 = recurrent_forward(
            k, w, u, None, initial_state, chunks=chunks, fla_layout=True, h_dtype=k.dtype
        )
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=None, scale=scale, chunk_size=CHUNK)
        states = states_in_chunks(s0, k, v, beta, None, chunks, rem)
        ctx.save_for_backward(q, k, v, beta, A, initial_state, s0, chunks, rem)
        ctx.scale = scale
        return o.to(v.dtype), states, ht

    @staticmethod
    def backward(ctx, do, dstates, dht):
        q, k, v, beta, A, h0, s0, chunks, rem = ctx.saved_tensors
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, cu_seqlens=None)
        h, v_new, _, _ = recurrent_forward(k, w, u, None, h0, fla_layout=True, h_dtype=k.dtype)
        ds0 = dkc = None
        if dstates is not None:
            ds0, dkc, dvc, dbc, _ = states_in_chunks_backward(s0, k, v, beta, None, chunks, rem, dstates)
        dq, dk, dv, dbeta, dh0 = _backward(
            q, k, v, beta, A, w, h, v_new, do, dht, ctx.scale, h0 is not None, chunks=chunks, ds0=ds0
        )
        if dkc is not None:  # the partial chunks' direct gradients, into the op's own buffers
            dk, dv, dbeta = (add_chunk_grads(dx, dxc, chunks) for dx, dxc in ((dk, dkc), (dv, dvc), (dbeta, dbc)))
        dh0 = dh0.to(h0.dtype) if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), None, dh0, None


def chunk_delta_rule_with_boundary_states(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta rule over ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]`` from ``initial_state``
    ``[B, H, K, V]`` (zeros if None), ``scale`` defaulting to ``K ** -0.5``.

    Returns ``(o [B, T, H, V] in v's dtype, boundary_states [B, H, NT, K, V] fp32, final_state [B, H, K, V] fp32)``
    with NT = ceil(T / 64): ``boundary_states[:, :, c]`` is the state after the first 64·c tokens (the state at the
    START of chunk c; c = 0 is the initial state), the final state the one after all T. Differentiable in q, k, v,
    beta and initial_state, with gradients accepted on all three outputs. With :func:`states_after` it gives the
    states after positions chosen after the pass; the one-pass engine's boundary provider knows its positions before
    the pass and calls the fused :func:`chunk_delta_rule_states_at` instead (no dense boundary states saved, sparse
    boundary gradients).
    """
    check_inputs("chunk_delta_rule_with_boundary_states", q, k, v, beta, initial_state)
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    return _ChunkDeltaRuleBoundary.apply(q, k, v, beta, scale, initial_state)


def states_after(
    boundary_states: torch.Tensor,
    final_state: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    counts: torch.Tensor,
    *,
    check_counts: bool = True,
) -> torch.Tensor:
    """States after the first ``counts[b, j]`` tokens (0 .. T) of row b, ``[B, n, H, K, V]`` fp32, differentiable.

    ``boundary_states``/``final_state`` as returned by :func:`chunk_delta_rule_with_boundary_states` on the same
    ``k, v, beta`` (those given to it, after any normalisation). The state after 64·c + r tokens is boundary state c
    advanced by the first r tokens of chunk c: the WY form of the whole chunk with beta zeroed from token r on (a
    token with beta = 0 leaves the state as it is), one batched unit-triangular solve over [B, n, H] — fixed shapes.
    ``check_counts=False`` skips the check that counts lie in [0, T] (a host-device sync): only for counts checked
    already. The one-pass engine does not use this pair of ops but the fused :func:`chunk_delta_rule_states_at`.
    """
    return states_after_counts(boundary_states, final_state, k, v, beta, counts, check_counts=check_counts)


def chunk_delta_rule_states_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    check_counts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta rule as :func:`chunk_delta_rule_with_boundary_states` with the states after ``counts[b, j]`` tokens
    (``counts`` [B, n] integers in 0 .. T) fused in: returns ``(o, states [B, n, H, K, V] fp32, final_state fp32)``,
    what :func:`states_after` gives from that op's outputs, without the dense boundary states in between.

    Differentiable in q, k, v, beta and initial_state with gradients on all three outputs; the backward hands the
    recurrence the n positions' gradients sparsely (summed in a fixed order where positions share a chunk) and adds
    the partial chunks' gradients into its own dk, dv, dbeta at those chunks' tokens. ``check_counts=False`` skips
    the check that counts lie in [0, T] (reading them is a host-device sync, which blocks CUDA-graph capture): only for
    counts checked already (the one-pass engine checks them once per forward, where it derives them).
    """
    check_inputs("chunk_delta_rule_states_at", q, k, v, beta, initial_state)
    validate_counts("chunk_delta_rule_states_at", counts, q.shape[0], q.shape[1], in_range=check_counts)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    return _ChunkDeltaRuleStatesAt.apply(q, k, v, beta, scale, initial_state, counts.to(q.device).long())
