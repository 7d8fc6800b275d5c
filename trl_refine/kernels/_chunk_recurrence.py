"""What the plain and the gated boundary-state kernels share: the two recurrences over the 64-token chunks (Triton,
with an optional per-token log-decay), and the state after any token count from the boundary states (PyTorch).

The recurrence over chunk c, with S the state at its start (``[K, V]``, fp32), W, U its WY representation
(``v_new = U - W S``) and, when gated, G the chunk-local cumulative log-decay in fla's base-2 units
(``chunk_local_cumsum(g, scale=1/ln 2)``; G_last its value at the chunk's last token)::

    S_next = 2^G_last S + K^T (2^(G_last - G) * v_new)          (ungated: G = 0)

The backward runs it last chunk first and adds the gradient supplied for each boundary state (fla's
``chunk_gated_delta_rule_bwd_dhu`` takes the final state's only). No accumulated ``tl.dot`` result is transposed
before another ``tl.dot`` (the pattern Triton 3.4-3.7.0 miscompiles on Hopper, fla #640).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64  # fla's chunk size for these ops; the boundary states are every CHUNK tokens


@triton.jit
def _tile(base, rows, cols, n_rows, n_cols, stride):
    """Pointers and mask of a [rows, cols] tile of a row-major matrix (row stride ``stride``) cut at its edges."""
    return base + rows[:, None] * stride + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _chunk_gate(g, tok, rows, i_t, T, H: tl.constexpr, BT: tl.constexpr):
    """Gate of one chunk: its tokens' cumulative log2-decay (0 past T) and the value at its last token."""
    b_g = tl.load(g + tok + rows * H, mask=rows < T, other=0.0).to(tl.float32)
    b_g_last = tl.load(g + tok + (tl.minimum((i_t + 1) * BT, T) - 1) * H).to(tl.float32)
    return b_g, b_g_last


@triton.jit
def _boundary_fwd_kernel(
    k,  # [B, T, H, K]
    w,  # [B, T, H, K]
    u,  # [B, T, H, V]
    g,  # [B, T, H] fp32 chunk-local cumulative log2-decay, or None
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
    USE_G: tl.constexpr,
):
    """Forward recurrence over the chunks of one (batch, head) and one V block."""
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
        if USE_G:
            b_g, b_g_last = _chunk_gate(g, tok, rows, i_t, T, H, BT)
            b_vn = b_vn * tl.where(rows < T, tl.exp2(b_g_last - b_g), 0.0)[:, None]
            b_h = b_h * tl.exp2(b_g_last)
        b_h += tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype))
    tl.store(ht + i_bh * K * V + p_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit
def _boundary_bwd_kernel(
    q,  # [B, T, H, K]
    k,  # [B, T, H, K]
    w,  # [B, T, H, K]
    g,  # [B, T, H] fp32 chunk-local cumulative log2-decay, or None
    do,  # [B, T, H, V]
    dv,  # [B, T, H, V]: the chunk-local part of dL/d(v_new)
    dht,  # [B, H, K, V] fp32 or None: gradient of the final state
    dhb,  # [B, H, NT, K, V] fp32 or None: gradients of the boundary states
    dh,  # out [B, NT, H, K, V] (fla's layout): total gradient of the state at the END of each chunk
    dh0,  # out [B, H, K, V] fp32 or None: total gradient of the initial state
    dv2,  # out [B, T, H, V]: total dL/d(v_new) = dv + 2^(G_last - G) K dS_end
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
    USE_G: tl.constexpr,
):
    """Backward recurrence over the chunks, last first. With D_c the total gradient of the state at the end of chunk
    c (D_{NT-1} = dht): dV'_c = dv_c + 2^(G_last - G) K_c D_c and the gradient of the chunk's start state is
    2^G_last D_c + scale (2^G Q_c)^T dO_c - W_c^T dV'_c + dhb[c] (the supplied boundary gradient), which is D_{c-1}."""
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
        b_kdh = tl.dot(b_k, b_dh.to(b_k.dtype))
        if USE_G:
            b_g, b_g_last = _chunk_gate(g, tok, rows, i_t, T, H, BT)
            b_kdh = b_kdh * tl.where(rows < T, tl.exp2(b_g_last - b_g), 0.0)[:, None]
            b_q = (b_q * tl.exp2(b_g)[:, None]).to(b_k.dtype)
            b_dh = b_dh * tl.exp2(b_g_last)
        b_dv2 = tl.load(dv + p_tv, mask=m_tv, other=0.0).to(tl.float32) + b_kdh
        tl.store(dv2 + p_tv, b_dv2.to(dv2.dtype.element_ty), mask=m_tv)
        b_dh += tl.dot(tl.trans(b_q), b_do) * scale - tl.dot(tl.trans(b_w), b_dv2.to(b_w.dtype))
        if HAS_DHB:
            b_dh += tl.load(dhb + (i_bh * NT + i_t) * K * V + p_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_DH0:
        tl.store(dh0 + i_bh * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int]:
    if K > 256:
        raise ValueError(f"boundary-state kernels: head dim K = {K} > 256 is not supported")
    return max(16, triton.next_power_of_2(K)), min(64, max(16, triton.next_power_of_2(V)))


def recurrent_forward(k, w, u, g, initial_state):
    """The forward recurrence: (boundary states [B, H, NT, K, V] fp32, v_new like u, final state fp32).
    ``g``: fla's chunk-local cumulative log2-decay [B, T, H] fp32, or None (ungated)."""
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
        k, w, u, g, h0, hs, v_new, ht, T, NT, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, HAS_H0=h0 is not None,
        USE_G=g is not None,
    )  # fmt: skip
    return hs, v_new, ht


def recurrent_backward(q, k, w, g, do, dv, dht, dhb, scale, want_dh0):
    """The backward recurrence: (dh [B, NT, H, K, V] in fla's layout: gradient of each chunk's end state, dh0 fp32
    or None, dv2: the total gradient of v_new)."""
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
        q, k, w, g, do, dv, dht, dhb, dh, dh0, dv2, scale, T, NT, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
        HAS_DHT=dht is not None, HAS_DHB=dhb is not None, HAS_DH0=want_dh0, USE_G=g is not None,
    )  # fmt: skip
    return dh, dh0, dv2


def for_fla(hs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our [B, H, NT, K, V] fp32 boundary states in fla's layout [B, NT, H, K, V] and the inputs' dtype."""
    return hs.transpose(1, 2).to(dtype).contiguous()


def check_inputs(name: str, q, k, v, beta, initial_state, g=None) -> None:
    """Shapes and dtypes of the boundary-state ops' inputs, failing early with what to fix."""
    gate = g is None or g.shape == q.shape[:3]
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3] or not gate:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v, beta, g) if x is not None)
        want = "q, k [B, T, H, K], v [B, T, H, V], " + ("beta [B, T, H]" if g is None else "g, beta [B, T, H]")
        raise ValueError(f"{name}: expected {want}; got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype}): cast them first")
    if q.shape[1] == 0:
        raise ValueError(f"{name}: T = 0 (no tokens); skip the call instead")
    B, _, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(B, H, K, v.shape[-1])}, got {tuple(initial_state.shape)}"
        )


def states_after_counts(
    boundary_states: torch.Tensor,
    final_state: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    counts: torch.Tensor,
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    """States after the first ``counts[b, j]`` tokens of row b, ``[B, n, H, K, V]``, differentiable; ``g`` the raw
    per-token log-decay (natural log) for the gated rule, None for the plain one.

    The state after 64·c + r tokens is boundary state S_0 = S_{64c} advanced by the first r tokens of chunk c. With
    beta zeroed from token r on (such a token leaves the state as it is) and G the chunk's cumulative log-decay up
    to token i (constant from r on, G_r), the chunk's WY form gives the pseudo-values d = U - W S_0 by one
    unit-triangular solve with L = I + tril_-1(beta_i e^(G_i - G_j) k_i.k_j), W = L^-1 (beta e^G k), U = L^-1 (beta
    v), and S = e^G_r S_0 + sum_i e^(G_r - G_i) k_i d_i^T (ungated: G = 0). Batched over [B, n, H]: fixed shapes.
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
    c = torch.div(counts, CHUNK, rounding_mode="floor")
    rem = counts - c * CHUNK
    row = torch.arange(B, device=counts.device)[:, None].expand_as(counts)
    cc = c.clamp(max=NT - 1)  # c = NT only with rem = 0 (count T, T a multiple of 64): the final state, no token read
    # the start state: a gather of n states, not a copy of all NT (a cat with the final state would copy them all)
    s0 = boundary_states.transpose(1, 2)[row, cc]  # [B, n, H, K, V]
    s0 = torch.where((c == NT)[..., None, None, None], final_state[:, None].to(dtype), s0)
    # the chosen chunks' tokens, gathered before any cast (no fp32 copy of the whole sequence): token indices past T
    # (the last chunk's padding) are clamped to T - 1; their beta is masked to 0 below, so their values never count
    tok = (cc[..., None] * CHUNK + torch.arange(CHUNK, device=counts.device)).clamp(max=T - 1)  # [B, n, C]
    keep = (torch.arange(CHUNK, device=counts.device) < rem[..., None])[:, :, None, :].to(dtype)  # [B, n, 1, C]

    def chunk_of(x):  # [B, T, H, ...] -> [B, n, H, C, ...] (the chosen chunks), in the states' dtype
        return x[row[..., None], tok].transpose(2, 3).to(dtype)

    kc, vc = chunk_of(k), chunk_of(v)
    bc = chunk_of(beta) * keep  # [B, n, H, C]
    kb = kc * bc[..., None]
    kk = kb @ kc.transpose(-1, -2)
    rhs_w = kb
    if g is not None:
        G = (chunk_of(g) * keep).cumsum(-1)  # [B, n, H, C]
        lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=k.device).tril(-1)
        kk = kk * torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")))
        rhs_w = kb * G.exp()[..., None]
    eye = torch.eye(CHUNK, dtype=dtype, device=k.device)
    solved = torch.linalg.solve_triangular(
        kk.tril(-1) + eye, torch.cat([rhs_w, vc * bc[..., None]], -1), upper=False, unitriangular=True
    )
    w, u_tilde = solved[..., :K], solved[..., K:]
    d = u_tilde - w @ s0
    if g is None:
        return s0 + kc.transpose(-1, -2) @ d
    G_r = G[..., -1:]  # [B, n, H, 1]
    return G_r.exp()[..., None] * s0 + kc.transpose(-1, -2) @ (d * (G_r - G).exp()[..., None])
