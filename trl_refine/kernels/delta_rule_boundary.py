"""The chunked (ungated) delta rule with every chunk-boundary state as an output whose gradient the backward accepts.

``chunk_delta_rule_with_boundary_states`` computes the delta rule of fla's ``chunk_delta_rule`` (layout
``[B, T, H, *]``, chunks of 64 tokens)::

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,     o_t = scale * S_t^T q_t

and returns, besides ``o`` and the final state, the state at the START of every chunk, ``S_{64 c}`` for
c = 0 .. NT-1, as ``boundary_states [B, H, NT, K, V]`` (fp32; c = 0 is the initial state). Its backward is exact
for gradients on ``o``, on the final state and on every boundary state: fla's own backward recurrence
(``chunk_gated_delta_rule_bwd_dhu``) takes the final state's gradient only, so the two recurrent passes over the
chunks are Triton kernels of ours (``_boundary_fwd_kernel``, ``_boundary_bwd_kernel``, the latter adding the
supplied gradient at each boundary); the chunk-local parts (the WY representation, the outputs, their gradients)
are fla's kernels. ``states_after`` then gives the differentiable state after any number of tokens from those
boundary states plus at most 63 tokens of the chunk (one masked triangular solve in PyTorch), so positions can be
chosen after the pass.

q and k go in as the layer uses them (fla DeltaNet l2-normalises them first: do that outside, with autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fla 0.6.0 internals used for the chunk-local (non-recurrent) parts. tests/test_delta_rule_boundary.py checks
# that these names still exist with the arguments used here; if an fla upgrade moves them, fix this block.
from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
from fla.ops.delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_fwd, recompute_w_u_fwd

CHUNK = 64  # fla's chunk size for these ops; the boundary states are every CHUNK tokens

__all__ = ["CHUNK", "chunk_delta_rule_with_boundary_states", "states_after"]


@triton.jit
def _tile(base, rows, cols, n_rows, n_cols, stride):
    """Pointers and mask of a [rows, cols] tile of a row-major matrix (row stride ``stride``) cut at its edges."""
    return base + rows[:, None] * stride + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _boundary_fwd_kernel(
    k,  # [B, T, H, K]
    w,  # [B, T, H, K]
    u,  # [B, T, H, V]
    h0,  # [B, H, K, V] fp32 or None
    hs,  # out [B, H, NT, K, V] fp32: state at the start of each chunk
    v_new,  # out [B, T, H, V]: u - w S (the chunk's pseudo-values)
    ht,  # out [B, H, K, V] fp32: final state
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    """Forward recurrence over the chunks of one (batch, head) and one V block: S_{c+1} = S_c + K_c^T (U_c - W_c S_c)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    p_kv, m_kv = _tile(0, o_k, o_v, K, V, V)  # offsets within one [K, V] state
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    tok = i_b * T * H + i_h  # token 0 of this (b, h), in units of one head's row
    for i_t in range(NT):
        tl.store(hs + (i_bh * NT + i_t) * K * V + p_kv, b_h.to(hs.dtype.element_ty), mask=m_kv)
        rows = i_t * BT + o_t
        p_tk, m_tk = _tile(tok * K, rows, o_k, T, K, H * K)
        p_tv, m_tv = _tile(tok * V, rows, o_v, T, V, H * V)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
        b_vn = tl.load(u + p_tv, mask=m_tv, other=0.0).to(tl.float32) - tl.dot(b_w, b_h.to(b_w.dtype))
        tl.store(v_new + p_tv, b_vn.to(v_new.dtype.element_ty), mask=m_tv)
        b_h += tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype))
    tl.store(ht + i_bh * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit
def _boundary_bwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    w,  # [B, T, H, K]
    do,  # [B, T, H, V]
    dv,  # [B, T, H, V]: the chunk-local part of dL/d(v_new)
    dht,  # [B, H, K, V] fp32 or None: gradient of the final state
    dhb,  # [B, H, NT, K, V] fp32 or None: gradients of the boundary states
    dh,  # out [B, NT, H, K, V] (fla's layout): total gradient of the state at the END of each chunk
    dh0,  # out [B, H, K, V] fp32 or None: total gradient of the initial state
    dv2,  # out [B, T, H, V]: total dL/d(v_new) = dv + K dS_end
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_DHB: tl.constexpr,
    HAS_DH0: tl.constexpr,
):
    """Backward recurrence over the chunks, last first. With G_c the total gradient of the state at the end of chunk
    c (G_{NT-1} = dht): dV'_c = dv_c + K_c G_c and the gradient of the chunk's start state is
    G_c + scale Q_c^T dO_c - W_c^T dV'_c + dhb[c] (the supplied boundary gradient), which is G_{c-1}."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    p_kv, m_kv = _tile(0, o_k, o_v, K, V, V)  # offsets within one [K, V] state
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    tok = i_b * T * H + i_h
    for j in range(NT):
        i_t = NT - 1 - j
        tl.store(dh + ((i_b * NT + i_t) * H + i_h) * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        rows = i_t * BT + o_t
        p_tk, m_tk = _tile(tok * K, rows, o_k, T, K, H * K)
        p_tv, m_tv = _tile(tok * V, rows, o_v, T, V, H * V)
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.0)
        b_w = tl.load(w + p_tk, mask=m_tk, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
        b_dv2 = tl.load(dv + p_tv, mask=m_tv, other=0.0).to(tl.float32) + tl.dot(b_k, b_dh.to(b_k.dtype))
        tl.store(dv2 + p_tv, b_dv2.to(dv2.dtype.element_ty), mask=m_tv)
        b_dh += tl.dot(tl.trans(b_q), b_do) * scale - tl.dot(tl.trans(b_w), b_dv2.to(b_w.dtype))
        if HAS_DHB:
            b_dh += tl.load(dhb + (i_bh * NT + i_t) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_DH0:
        tl.store(dh0 + i_bh * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int]:
    if K > 256:
        raise ValueError(f"chunk_delta_rule_with_boundary_states: head dim K = {K} > 256 is not supported")
    return max(16, triton.next_power_of_2(K)), min(64, max(16, triton.next_power_of_2(V)))


def _recurrent_forward(k, w, u, initial_state):
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, BV = _blocks(K, V)
    hs = k.new_empty(B, H, NT, K, V, dtype=torch.float32)
    v_new = torch.empty_like(u)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    grid = (triton.cdiv(V, BV), B * H)
    _boundary_fwd_kernel[grid](
        k, w, u, h0, hs, v_new, ht, T, NT, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, HAS_H0=h0 is not None
    )
    return hs, v_new, ht


def _recurrent_backward(q, k, w, do, dv, dht, dhb, scale, want_dh0):
    B, T, H, K = k.shape
    V = do.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, BV = _blocks(K, V)
    dh = q.new_empty(B, NT, H, K, V)
    dh0 = q.new_empty(B, H, K, V, dtype=torch.float32) if want_dh0 else None
    dv2 = torch.empty_like(dv)
    dht = dht.float().contiguous() if dht is not None else None
    dhb = dhb.float().contiguous() if dhb is not None else None
    grid = (triton.cdiv(V, BV), B * H)
    _boundary_bwd_kernel[grid](
        q, k, w, do, dv, dht, dhb, dh, dh0, dv2, scale, T, NT, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
        HAS_DHT=dht is not None, HAS_DHB=dhb is not None, HAS_DH0=want_dh0,
    )  # fmt: skip
    return dh, dh0, dv2


def _for_fla(hs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our [B, H, NT, K, V] fp32 boundary states in fla's layout [B, NT, H, K, V] and the inputs' dtype."""
    return hs.transpose(1, 2).to(dtype).contiguous()


class _ChunkDeltaRuleBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state):
        w, u, A = prepare_wy_repr_fwd(k=k, v=v, beta=beta, cu_seqlens=None, chunk_size=CHUNK)
        hs, v_new, ht = _recurrent_forward(k, w, u, initial_state)
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=_for_fla(hs, k.dtype), g=None, scale=scale, chunk_size=CHUNK)
        ctx.save_for_backward(q, k, v, beta, A, hs, v_new)
        ctx.scale = scale
        ctx.has_h0 = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o.to(v.dtype), hs, ht

    @staticmethod
    def backward(ctx, do, dhb, dht):
        q, k, v, beta, A, hs, v_new = ctx.saved_tensors
        scale = ctx.scale
        if do is None:
            do = torch.zeros_like(v)
        do = do.to(q.dtype).contiguous()
        w, _ = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, cu_seqlens=None)
        dv = chunk_bwd_dv_local(q=q, k=k, do=do, g=None, scale=scale, chunk_size=CHUNK)
        dh, dh0, dv2 = _recurrent_backward(q, k, w, do, dv, dht, dhb, scale, ctx.has_h0)
        h = _for_fla(hs, k.dtype)
        dq, dk, dw, _ = chunk_bwd_dqkwg(
            q=q, k=k, v=v_new, h=h, w=w, dv=dv2, do=do, dh=dh, g=None, scale=scale, chunk_size=CHUNK
        )
        dk2, dv_in, dbeta = prepare_wy_repr_bwd(k=k, v=v, beta=beta, A=A, dw=dw, du=dv2, cu_seqlens=None)
        dk = dk + dk2
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv_in.to(v.dtype), dbeta.to(beta.dtype), None, dh0


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
    beta and initial_state, with gradients accepted on all three outputs.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            "chunk_delta_rule_with_boundary_states: expected q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype}): cast them first")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("chunk_delta_rule_with_boundary_states: T = 0 (no tokens); skip the call instead")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}"
        )
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
) -> torch.Tensor:
    """States after the first ``counts[b, j]`` tokens (0 .. T) of row b, ``[B, n, H, K, V]`` fp32, differentiable.

    ``boundary_states``/``final_state`` as returned by :func:`chunk_delta_rule_with_boundary_states` on the same
    ``k, v, beta`` (those given to it, after any normalisation). The state after 64·c + r tokens is boundary state c
    advanced by the first r tokens of chunk c: the WY form of the whole chunk with beta zeroed from token r on (a
    token with beta = 0 leaves the state as it is), one batched unit-triangular solve over [B, n, H] — fixed shapes.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = boundary_states.shape[2]
    if counts.dim() != 2 or counts.shape[0] != B:
        raise ValueError(f"states_after: counts must be [B, n] = [{B}, n], got {tuple(counts.shape)}")
    if triton.cdiv(T, CHUNK) != NT or boundary_states.shape != (B, H, NT, K, V):
        raise ValueError(
            f"states_after: boundary_states {tuple(boundary_states.shape)} do not belong to k of shape {tuple(k.shape)}"
        )
    if bool(((counts < 0) | (counts > T)).any()):
        raise ValueError(f"states_after: counts must lie in [0, T = {T}]")
    dtype = boundary_states.dtype
    pad = NT * CHUNK - T
    kp, vp = (torch.nn.functional.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)) for x in (k, v))
    bp = torch.nn.functional.pad(beta.to(dtype), (0, 0, 0, pad))
    c = torch.div(counts, CHUNK, rounding_mode="floor")
    rem = counts - c * CHUNK
    row = torch.arange(B, device=counts.device)[:, None].expand_as(counts)
    starts = torch.cat([boundary_states, final_state[:, :, None].to(dtype)], dim=2)  # [B, H, NT + 1, K, V]
    s0 = starts.transpose(1, 2)[row, c]  # [B, n, H, K, V]
    cc = c.clamp(max=NT - 1)  # c = NT only with rem = 0: no token of that chunk is read

    def chunk_of(x):  # [B, NT*C, H, D] -> [B, n, H, C, D] for the chosen chunks
        x = x.view(B, NT, CHUNK, H, x.shape[-1])[row, cc]
        return x.transpose(2, 3)

    kc, vc = chunk_of(kp), chunk_of(vp)
    keep = torch.arange(CHUNK, device=counts.device) < rem[..., None]  # [B, n, C]
    bc = bp.view(B, NT, CHUNK, H)[row, cc].transpose(2, 3) * keep[:, :, None, :].to(dtype)  # [B, n, H, C]
    kb = kc * bc[..., None]
    eye = torch.eye(CHUNK, dtype=dtype, device=k.device)
    lower = (kb @ kc.transpose(-1, -2)).tril(-1) + eye
    solved = torch.linalg.solve_triangular(
        lower, torch.cat([kb, vc * bc[..., None]], -1), upper=False, unitriangular=True
    )
    w, u_tilde = solved[..., :K], solved[..., K:]
    return s0 + kc.transpose(-1, -2) @ (u_tilde - w @ s0)
