"""What the plain and the gated boundary-state kernels share: the two recurrences over the 64-token chunks (Triton,
with an optional per-token log-decay), and the state after any token count from the boundary states (PyTorch).

The recurrence over chunk c, with S the state at its start (``[K, V]``, fp32), W, U its WY representation
(``v_new = U - W S``) and, when gated, G the chunk-local cumulative log-decay in fla's base-2 units
(``chunk_local_cumsum(g, scale=1/ln 2)``; G_last its value at the chunk's last token)::

    S_next = 2^G_last S + K^T (2^(G_last - G) * v_new)          (ungated: G = 0)

The backward runs it last chunk first and adds the gradient supplied for each boundary state (fla's
``chunk_gated_delta_rule_bwd_dhu`` takes the final state's only), either dense (every boundary) or sparse (the start
states of the chunks that hold a position, for the fused ``*_states_at`` ops). The partial-chunk part (the state
after the first r <= 64 tokens of a chunk from its start state) is PyTorch on the gathered chunks only. No accumulated ``tl.dot`` result is transposed
before another ``tl.dot`` (the pattern Triton 3.4-3.7.0 miscompiles on Hopper, fla #640).
"""

from __future__ import annotations

from contextlib import nullcontext

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
    sel,  # [B, n] int32 or None: the chunk of each position
    s0,  # out [B, n, H, K, V] fp32 or None: the start state of chunk sel[b, j]
    T,
    NT,
    NPOS,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    USE_G: tl.constexpr,
    FLA_LAYOUT: tl.constexpr,
    HAS_SEL: tl.constexpr,
):
    """Forward recurrence over the chunks of one (batch, head) and one V block; the chunk-start states go to ``hs`` as
    ``[B, H, NT, K, V]`` or, with FLA_LAYOUT, as fla's ``[B, NT, H, K, V]`` (in hs's dtype: what chunk_fwd_o reads),
    and in fp32 to ``s0`` for the chunks listed in ``sel``."""
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
        if FLA_LAYOUT:
            p_hs = hs + ((i_b * NT + i_t) * H + i_h) * K * V + p_kv
        else:
            p_hs = hs + (i_bh * NT + i_t) * K * V + p_kv
        tl.store(p_hs, b_h.to(hs.dtype.element_ty), mask=m_kv)
        if HAS_SEL:
            for j in range(NPOS):
                if tl.load(sel + i_b * NPOS + j) == i_t:
                    tl.store(s0 + ((i_b * NPOS + j) * H + i_h) * K * V + p_kv, b_h, mask=m_kv)
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
    sel,  # [B, n] int32 or None: the chunk of each position
    ds0,  # [B, n, H, K, V] fp32 or None: gradient of the start state of chunk sel[b, j]
    dh,  # out [B, NT, H, K, V] (fla's layout): total gradient of the state at the END of each chunk
    dh0,  # out [B, H, K, V] fp32 or None: total gradient of the initial state
    dv2,  # out [B, T, H, V]: total dL/d(v_new) = dv + 2^(G_last - G) K dS_end
    scale,
    T,
    NT,
    NPOS,
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
    HAS_SEL: tl.constexpr,
):
    """Backward recurrence over the chunks, last first. With D_c the total gradient of the state at the end of chunk
    c (D_{NT-1} = dht): dV'_c = dv_c + 2^(G_last - G) K_c D_c and the gradient of the chunk's start state is
    2^G_last D_c + scale (2^G Q_c)^T dO_c - W_c^T dV'_c + dhb[c] (the supplied boundary gradient), which is D_{c-1}.
    Sparse alternative to dhb: ds0[b, j] is added at chunk sel[b, j], positions in order j = 0 .. n-1 (several in one
    chunk are summed in that fixed order: no atomics, the same result every run)."""
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
        if HAS_SEL:
            for j in range(NPOS):
                if tl.load(sel + i_b * NPOS + j) == i_t:
                    b_dh += tl.load(ds0 + ((i_b * NPOS + j) * H + i_h) * K * V + p_kv, mask=m_kv, other=0.0)
    if HAS_DH0:
        tl.store(dh0 + i_bh * K * V + p_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


def _blocks(K: int, V: int) -> tuple[int, int]:
    if K > 256:
        raise ValueError(f"boundary-state kernels: head dim K = {K} > 256 is not supported")
    return max(16, triton.next_power_of_2(K)), min(64, max(16, triton.next_power_of_2(V)))


def _pipeline(x: torch.Tensor, BK: int) -> dict:
    """Launch options: fp32 tiles at K = 128 with Triton's default software pipelining (3 stages of the k/w/u tiles)
    ask for more shared memory than a Hopper SM has (H200, 2026-12-03: ``OutOfResources: shared memory, Required:
    278528, Hardware limit: 232448`` in the forward at K = V = 128), so fp32 inputs with BK > 64 load one stage at a
    time. bf16/fp16, what training under autocast runs, keep the default."""
    return {"num_stages": 1} if x.element_size() == 4 and BK > 64 else {}


def recurrent_forward(k, w, u, g, initial_state, *, chunks=None, fla_layout=False, h_dtype=torch.float32):
    """The forward recurrence: (chunk-start states ``[B, H, NT, K, V]``, or fla's ``[B, NT, H, K, V]`` with
    ``fla_layout``, in ``h_dtype``; v_new like u; final state fp32; the fp32 start states ``[B, n, H, K, V]`` of the
    chunks ``chunks`` [B, n] (int), or None). ``g``: fla's chunk-local cumulative log2-decay [B, T, H] fp32, or None
    (ungated)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, BV = _blocks(K, V)
    hs = k.new_empty(*((B, NT, H) if fla_layout else (B, H, NT)), K, V, dtype=h_dtype)
    v_new = torch.empty_like(u)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    sel = chunks.to(torch.int32).contiguous() if chunks is not None else None
    s0 = k.new_empty(B, sel.shape[1], H, K, V, dtype=torch.float32) if sel is not None else None
    grid = (triton.cdiv(V, BV), B * H)
    _boundary_fwd_kernel[grid](
        k, w, u, g, h0, hs, v_new, ht, sel, s0, T, NT, sel.shape[1] if sel is not None else 0, H=H, K=K, V=V,
        BT=CHUNK, BK=BK, BV=BV, HAS_H0=h0 is not None, USE_G=g is not None, FLA_LAYOUT=fla_layout,
        HAS_SEL=sel is not None, **_pipeline(k, BK),
    )  # fmt: skip
    return hs, v_new, ht, s0


def recurrent_backward(q, k, w, g, do, dv, dht, dhb, scale, want_dh0, *, chunks=None, ds0=None):
    """The backward recurrence: (dh [B, NT, H, K, V] in fla's layout: gradient of each chunk's end state, dh0 fp32
    or None, dv2: the total gradient of v_new). The chunk-start states' gradients come dense (``dhb``
    [B, H, NT, K, V]) or sparse: ``ds0`` [B, n, H, K, V] for the start states of the chunks ``chunks`` [B, n]."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    BK, BV = _blocks(K, V)
    dh = q.new_empty(B, NT, H, K, V)
    dh0 = q.new_empty(B, H, K, V, dtype=torch.float32) if want_dh0 else None
    dv2 = torch.empty_like(dv)
    dht = dht.float().contiguous() if dht is not None else None
    dhb = dhb.float().contiguous() if dhb is not None else None
    sparse = ds0 is not None
    sel = chunks.to(torch.int32).contiguous() if sparse else None
    ds0 = ds0.float().contiguous() if sparse else None
    grid = (triton.cdiv(V, BV), B * H)
    _boundary_bwd_kernel[grid](
        q, k, w, g, do, dv, dht, dhb, sel, ds0, dh, dh0, dv2, scale, T, NT, sel.shape[1] if sparse else 0, H=H, K=K,
        V=V, BT=CHUNK, BK=BK, BV=BV, HAS_DHT=dht is not None, HAS_DHB=dhb is not None, HAS_DH0=want_dh0,
        USE_G=g is not None, HAS_SEL=sparse, **_pipeline(k, BK),
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


def validate_counts(name: str, counts: torch.Tensor, B: int, T: int, *, in_range: bool = True) -> None:
    """Shape and dtype of ``counts`` (no sync) and, with ``in_range``, that they lie in [0, T]: that reads the values,
    a host-device sync per call (it blocks CUDA-graph capture), so callers that have already checked them once per
    step (the one-pass engine, where it derives them from the positions) pass ``check_counts=False`` to the ops."""
    if counts.dim() != 2 or counts.shape[0] != B or counts.shape[1] == 0:
        raise ValueError(f"{name}: counts must be [B, n] = [{B}, n >= 1], got {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{name}: counts must be an integer tensor, got {counts.dtype}")
    if in_range and bool(((counts < 0) | (counts > T)).any()):
        bad = counts[(counts < 0) | (counts > T)][:4].tolist()
        raise ValueError(
            f"{name}: counts must lie in [0, T = {T}] (token counts from each row's start), got {bad}; "
            "clamp or fix the positions"
        )


def no_autocast(device: torch.device):
    """Autocast off on ``device`` (a no-op where autocast does not exist, e.g. the meta device)."""
    return (
        torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()
    )


def chunk_tokens(chunks: torch.Tensor, T: int) -> torch.Tensor:
    """Token indices [B, n, CHUNK] of the chunks ``chunks`` [B, n], those past T (the last chunk's padding) clamped to
    T - 1 (their beta is masked to 0, so their values never count)."""
    return (chunks[..., None] * CHUNK + torch.arange(CHUNK, device=chunks.device)).clamp(max=T - 1)


def gather_chunks(x: torch.Tensor, tok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, n, H, CHUNK, ...] (the chosen chunks' tokens ``tok`` [B, n, C]), gathered before the cast
    to ``dtype`` (no copy of the whole sequence)."""
    row = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[row, tok].transpose(2, 3).to(dtype)


def advance_in_chunk(s0, kc, vc, bc, gc=None):
    """States [B, n, H, K, V] after the tokens of the gathered chunks ``kc, vc`` [B, n, H, C, *] whose masked
    ``bc`` [B, n, H, C] is nonzero, from their chunk's start state ``s0`` [B, n, H, K, V] (all in one dtype);
    ``gc`` the masked raw log-decay [B, n, H, C] (zero past the count), None ungated.

    A token with beta = 0 (and g = 0) leaves the state as it is, so the state after the first r tokens is the WY form
    of the whole chunk with beta and g zeroed from r on: the pseudo-values d = U - W S_0 by one unit-triangular solve
    with L = I + tril_-1(beta_i e^(G_i - G_j) k_i.k_j), W = L^-1 (beta e^G k), U = L^-1 (beta v), G the cumulative
    log-decay, and S = e^G_r S_0 + sum_i e^(G_r - G_i) k_i d_i^T (ungated: G = 0). Batched over [B, n, H]."""
    K = kc.shape[-1]
    kb = kc * bc[..., None]
    kk = kb @ kc.transpose(-1, -2)
    rhs_w = kb
    if gc is not None:
        G = gc.cumsum(-1)  # [B, n, H, C]
        lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=kc.device).tril(-1)
        kk = kk * torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")))
        rhs_w = kb * G.exp()[..., None]
    eye = torch.eye(CHUNK, dtype=kc.dtype, device=kc.device)
    solved = torch.linalg.solve_triangular(
        kk.tril(-1) + eye, torch.cat([rhs_w, vc * bc[..., None]], -1), upper=False, unitriangular=True
    )
    w, u_tilde = solved[..., :K], solved[..., K:]
    d = u_tilde - w @ s0
    if gc is None:
        return s0 + kc.transpose(-1, -2) @ d
    G_r = G[..., -1:]  # [B, n, H, 1]
    return G_r.exp()[..., None] * s0 + kc.transpose(-1, -2) @ (d * (G_r - G).exp()[..., None])


def position_chunks(counts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk c [B, n], tokens r of it [B, n]) with counts = 64 c + r, c <= NT - 1 (so r = 64 for count T when T is a
    multiple of 64: the whole last chunk, no final-state special case)."""
    c = torch.div(counts, CHUNK, rounding_mode="floor").clamp(max=triton.cdiv(T, CHUNK) - 1)
    return c, counts - c * CHUNK


def states_in_chunks(s0, k, v, beta, g, chunks, rem):
    """The states after ``rem`` [B, n] tokens (0 .. 64) of the chunks ``chunks`` [B, n] from their start states ``s0``
    [B, n, H, K, V], in s0's dtype (``g`` the raw log-decay or None): the partial-chunk part of ``states_after`` and of
    the fused ops. Autocast is off inside (its matmuls and solve stay in s0's dtype, fp32 in the ops)."""
    tok = chunk_tokens(chunks, k.shape[1])
    keep = (torch.arange(CHUNK, device=rem.device) < rem[..., None])[:, :, None, :].to(s0.dtype)  # [B, n, 1, C]
    with no_autocast(s0.device):
        kc, vc = gather_chunks(k, tok, s0.dtype), gather_chunks(v, tok, s0.dtype)
        gc = gather_chunks(g, tok, s0.dtype) * keep if g is not None else None
        return advance_in_chunk(s0, kc, vc, gather_chunks(beta, tok, s0.dtype) * keep, gc)


def states_in_chunks_backward(s0, k, v, beta, g, chunks, rem, dstates):
    """Backward of :func:`states_in_chunks` (recomputed with autograd on the gathered chunks only): (ds0, and the
    chunk gradients of k, v, beta, g as [B, n, H, C, ...] fp32 (g's None ungated), exactly zero at the tokens past
    each count), autocast off as in the forward (a backward called inside an autocast region recomputes in fp32)."""
    tok = chunk_tokens(chunks, k.shape[1])
    keep = (torch.arange(CHUNK, device=rem.device) < rem[..., None])[:, :, None, :].to(s0.dtype)
    with torch.enable_grad(), no_autocast(s0.device):
        leaves = [s0.detach().requires_grad_()]
        leaves += [
            gather_chunks(x, tok, s0.dtype).requires_grad_() for x in (k, v, beta) + ((g,) if g is not None else ())
        ]
        kc, vc, bc = leaves[1:4]
        gc = leaves[4] * keep if g is not None else None
        out = advance_in_chunk(leaves[0], kc, vc, bc * keep, gc)
        grads = torch.autograd.grad(out, leaves, dstates.to(out.dtype))
    ds0, dkc, dvc, dbc = grads[:4]
    dgc = grads[4] * keep if g is not None else None
    return ds0, dkc * keep[..., None], dvc * keep[..., None], dbc * keep, dgc


def add_chunk_grads(dx: torch.Tensor, dxc: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """dx [B, T, H, ...] plus the chunk gradients dxc [B, n, H, C, ...] at the chunks' tokens (in place where dx is
    contiguous), one position at a time (n is small): within one index_add the B·C target tokens are distinct but for
    the clamped padding tokens, whose gradients are exactly zero, so no sum depends on the order of the adds."""
    B, T = dx.shape[:2]
    dx = dx.contiguous()
    tok = chunk_tokens(chunks, T) + torch.arange(B, device=dx.device)[:, None, None] * T  # [B, n, C] flat tokens
    flat = dx.view(B * T, *dx.shape[2:])
    for j in range(chunks.shape[1]):
        flat.index_add_(0, tok[:, j].reshape(-1), dxc[:, j].transpose(1, 2).reshape(-1, *dx.shape[2:]).to(dx.dtype))
    return dx


def states_after_counts(
    boundary_states: torch.Tensor,
    final_state: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    counts: torch.Tensor,
    g: torch.Tensor | None = None,
    check_counts: bool = True,
) -> torch.Tensor:
    """States after the first ``counts[b, j]`` tokens of row b, ``[B, n, H, K, V]``, differentiable; ``g`` the raw
    per-token log-decay (natural log) for the gated rule, None for the plain one. The state after 64·c + r tokens is
    boundary state S_{64c} advanced by the first r tokens of chunk c (:func:`advance_in_chunk`); fixed shapes.
    ``check_counts=False`` skips the range check (:func:`validate_counts`) and its host-device sync.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = boundary_states.shape[2]
    validate_counts("states_after", counts, B, T, in_range=check_counts)
    if triton.cdiv(T, CHUNK) != NT or boundary_states.shape != (B, H, NT, K, V):
        raise ValueError(
            f"states_after: boundary_states {tuple(boundary_states.shape)} do not belong to k of shape {tuple(k.shape)}"
        )
    c = torch.div(counts, CHUNK, rounding_mode="floor")
    rem = counts - c * CHUNK
    row = torch.arange(B, device=counts.device)[:, None].expand_as(counts)
    cc = c.clamp(max=NT - 1)  # c = NT only with rem = 0 (count T, T a multiple of 64): the final state, no token read
    # the start state: a gather of n states, not a copy of all NT (a cat with the final state would copy them all)
    s0 = boundary_states.transpose(1, 2)[row, cc]  # [B, n, H, K, V]
    s0 = torch.where((c == NT)[..., None, None, None], final_state[:, None].to(s0.dtype), s0)
    return states_in_chunks(s0, k, v, beta, g, cc, rem)
