"""The fast-weight SwiGLU branch of LaCT: apply-then-update chunked test-time training, in pure PyTorch.

Notation (docs/lact.md, research/lact.md §3): per head ``h`` the fast weights are ``W0, W2: [d_h, d]`` and
``W1: [d, d_h]``, ``f_W(x) = W1 (silu(W0 x) * (W2 x))``. Tokens are grouped in chunks of ``C`` counted from the first
valid token of the sequence. A token's output uses the weights updated by the *previous* chunks only; a chunk updates
the weights once it is full and a later token arrives (lazy application: a full chunk at the end of a call stays
"pending" in the state and is applied by the next call).

Everything here works on head-major tensors ``[B, n, L, ...]`` and never writes into a tensor it did not create,
so states handed out earlier stay valid and differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BASE_LR_INV",
    "FastWeightSpec",
    "KeptFastWeights",
    "fw_apply",
    "fw_grads",
    "newton_schulz5",
    "row_normalize",
    "silu_prime",
    "states_at_counts",
    "tokens_in_chunk",
]

#: ``inv_softplus(1e-3)``: the learning-rate logits are shifted by it so that a zero logit gives lr = 1e-3
BASE_LR_INV = math.log(math.expm1(1e-3))

_NS5_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

ROW_NORM_EPS = 1e-5


@dataclass(frozen=True)
class FastWeightSpec:
    """What the update rule needs to know besides tensors."""

    chunk_size: int
    use_momentum: bool
    use_muon: bool
    prenorm: bool
    muon_dtype: torch.dtype
    fp32_states: bool


def tokens_in_chunk(pos: torch.Tensor | int, chunk_size: int):
    """Tokens of the current (not yet applied) chunk after ``pos`` tokens: 0 at pos 0, else in ``[1, C]``.

    ``C`` means a full chunk is pending: it is applied before the next token.
    """
    if isinstance(pos, int):
        return 0 if pos == 0 else pos - chunk_size * ((pos - 1) // chunk_size)
    return torch.where(
        pos == 0, torch.zeros_like(pos), pos - chunk_size * torch.div(pos - 1, chunk_size, rounding_mode="floor")
    )


def silu_prime(x: torch.Tensor) -> torch.Tensor:
    """d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def row_normalize(w: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """``w / (||w||_row + 1e-5) * target_norm`` with row norms over the last dim (computed in float32)."""
    wf = w.float()
    out = wf / (torch.linalg.vector_norm(wf, dim=-1, keepdim=True) + ROW_NORM_EPS) * target_norm.float()
    return out.to(w.dtype)


def newton_schulz5(g: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation of the last two dims (the Muon step), computed in ``dtype``."""
    shape = g.shape
    x = g.reshape(-1, shape[-2], shape[-1]).to(dtype)
    transpose = x.size(-2) > x.size(-1)
    if transpose:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x.float(), dim=(-2, -1), keepdim=True).to(dtype) + 1e-7)
    for a, b, c in _NS5_COEFFS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transpose:
        x = x.mT
    return x.reshape(shape)


def fw_apply(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``f_W(q)`` for ``q: [B, n, L, d]`` and weights ``[B, n, ...]`` -> ``[B, n, L, d]`` (in q's dtype)."""
    cd = q.dtype
    hidden = F.silu(q @ w0.to(cd).mT) * (q @ w2.to(cd).mT)
    return hidden @ w1.to(cd).mT


def fw_grads(
    w0: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    fp32_products: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learning-rate weighted ascent directions of ``sum_t <f_W(k_t), v_t>`` over the L tokens given.

    ``k, v: [B, n, L, d]``, ``lr: [B, n, L, 3]`` (float32; channel j scales the update of ``W_j``; zero it for tokens
    that must not count). Returns float32 ``(G0, G1, G2)`` with the shapes of ``(W0, W1, W2)``.

    With ``fp32_products=False`` the final products are taken in the feature dtype, as the reference's one bmm per
    chunk does; ``True`` (used token by token) takes them in float32, which is exact for bf16 factors.
    """
    cd = k.dtype
    gate = k @ w0.to(cd).mT  # [B, n, L, d_h]
    up = k @ w2.to(cd).mT
    gate_act = F.silu(gate)
    hidden = gate_act * up
    d_hidden = v @ w1.to(cd)  # W1^T v, [B, n, L, d_h]
    d_up = d_hidden * gate_act
    d_gate = silu_prime(gate) * (d_hidden * up)
    lr0, lr1, lr2 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]
    if fp32_products:
        kf = k.float()
        g1 = v.float().mT @ (hidden.float() * lr1)
        g2 = d_up.float().mT @ (kf * lr2)
        g0 = d_gate.float().mT @ (kf * lr0)
        return g0, g1, g2
    g1 = v.mT @ (hidden * lr1).to(cd)
    g2 = d_up.mT @ (k * lr2).to(cd)
    g0 = d_gate.mT @ (k * lr0).to(cd)
    return g0.float(), g1.float(), g2.float()


def _rows(mask: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    return None if mask is None else mask.view(mask.shape[0], *([1] * (ndim - 1)))


def masked(new: torch.Tensor, old: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows where ``rows`` is True from ``new``, the others from ``old`` (``rows=None``: all from ``new``)."""
    if rows is None:
        return new
    return torch.where(_rows(rows, new.dim()), new.to(old.dtype), old)


def apply_update(
    weights: dict[str, torch.Tensor],
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    msum: torch.Tensor | None,
    target_norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    spec: FastWeightSpec,
    delta_dtype: torch.dtype,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Apply one full chunk's update to the fast weights of the rows selected by ``rows`` (None: all rows).

    ``weights`` holds ``w0, w1, w2`` (the weights the outputs use), ``w{j}_raw`` (pre-norm only) and ``m{j}``
    (momentum only). ``grads`` are the float32 chunk sums ``G_j``; ``msum [B, n]`` the chunk sum of the momentum gate.
    """
    out = dict(weights)
    mbar = None
    if spec.use_momentum:
        mbar = (msum / spec.chunk_size)[..., None, None]
    for j in range(3):
        w = weights[f"w{j}"]
        delta = grads[j].to(delta_dtype)
        if spec.use_momentum:
            prev = weights[f"m{j}"]
            delta = delta + mbar.to(delta.dtype) * prev.to(delta.dtype)
            out[f"m{j}"] = masked(delta, prev, rows)
        step = newton_schulz5(delta, spec.muon_dtype) if spec.use_muon else delta
        if spec.prenorm:
            raw = weights[f"w{j}_raw"]
            new_raw = (raw + step).to(raw.dtype)
            out[f"w{j}_raw"] = masked(new_raw, raw, rows)
            new_w = row_normalize(new_raw, target_norms[j])
        else:
            new_w = row_normalize((w + step).to(w.dtype), target_norms[j])
        out[f"w{j}"] = masked(new_w, w, rows)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Schedules: which rows apply an update where. Built once per model call (host ints, one device sync) and shared by
# every layer, since all layers see the same tokens.
# ---------------------------------------------------------------------------------------------------------------------

#: segments of at most this many tokens run token by token (decode, short branches)
RECURRENT_MAX_TOKENS = 16


def _row_mask(flags: list[bool], device) -> tuple[torch.Tensor | None, bool]:
    """(mask or None when every row is set, any row set)."""
    if all(flags):
        return None, True
    return torch.tensor(flags, dtype=torch.bool, device=device), any(flags)


class ChunkSchedule:
    """Plan of one call of the chunked path.

    Every row's new tokens are placed in an aligned layout so that chunk boundaries are the same columns for all
    rows: row b's j-th valid token goes to column ``o_b + j`` where ``o_b = s_b - s_min`` and ``s_b`` is the number of
    tokens the row already has in its current chunk. Chunk k of the layout covers columns
    ``[max(0, kC - s_min), min(La, (k+1)C - s_min))``.
    """

    mode = "chunk"

    def __init__(self, n_valid: list[int], pos0: list[int], seq_len: int, chunk_size: int, device):
        C = chunk_size
        B = len(n_valid)
        r0 = [tokens_in_chunk(p, C) for p in pos0]
        active = [n > 0 for n in n_valid]
        pending = [a and r == C for a, r in zip(active, r0)]
        self.pending_rows, self.any_pending = _row_mask(pending, device)
        s = [0 if (p or not a) else r for a, p, r in zip(active, pending, r0)]
        act_s = [sb for sb, a in zip(s, active) if a]
        self.s_min = s_min = min(act_s) if act_s else 0
        self.offsets = offsets = [(sb - s_min) if a else 0 for sb, a in zip(s, active)]
        self.layout_len = La = max([o + n for o, n, a in zip(offsets, n_valid, active) if a], default=0)
        n_chunks = -(-(s_min + La) // C) if La > 0 else 0
        self.chunks = [(max(0, k * C - s_min), min(La, (k + 1) * C - s_min)) for k in range(n_chunks)]
        last = [(s_min + o + n - 1) // C if a else -1 for o, n, a in zip(offsets, n_valid, active)]
        self.apply_rows, self.apply_any, self.last_rows, self.last_any = [], [], [], []
        for k in range(n_chunks):
            m, anyf = _row_mask([lk > k for lk in last], device)
            self.apply_rows.append(m)
            self.apply_any.append(anyf)
            m, anyf = _row_mask([lk == k for lk in last], device)
            self.last_rows.append(m)
            self.last_any.append(anyf)
        self.gather = any(o != 0 for o in offsets)
        full = all(n == seq_len for n in n_valid)
        if self.gather:
            cols = torch.arange(La, device=device)
            off = torch.tensor(offsets, device=device)[:, None]
            nv = torch.tensor(n_valid, device=device)[:, None]
            rel = cols[None, :] - off  # [B, La] index into the compact layout
            self.layout_valid = (rel >= 0) & (rel < nv)
            self.to_layout = rel.clamp(0, max(seq_len - 1, 0))
            back = torch.arange(seq_len, device=device)[None, :] + off
            self.to_compact = back.clamp(0, max(La - 1, 0))
        else:
            self.to_layout = self.to_compact = None
            if full and La == seq_len:
                self.layout_valid = None
            else:
                nv = torch.tensor(n_valid, device=device)[:, None]
                self.layout_valid = torch.arange(La, device=device)[None, :] < nv
        self.batch_size = B
        self.seq_len = seq_len


class RecurrentSchedule:
    """Plan of one call of the token-by-token path over compact columns ``j = 0..T-1``."""

    mode = "recurrent"

    def __init__(self, n_valid: list[int], pos0: list[int], seq_len: int, chunk_size: int, device):
        C = chunk_size
        self.steps = []
        for j in range(seq_len):
            valid = [n > j for n in n_valid]
            apply = [v and tokens_in_chunk(p + j, C) == C for v, p in zip(valid, pos0)]
            valid_rows, any_valid = _row_mask(valid, device)
            apply_rows, any_apply = _row_mask(apply, device)
            self.steps.append((valid_rows, any_valid, apply_rows, any_apply))
        self.later_apply = [any(step[3] for step in self.steps[j + 1 :]) for j in range(seq_len)]
        self.seq_len = seq_len


def make_schedule(
    n_valid: list[int], pos0: list[int], seq_len: int, chunk_size: int, device, force_chunks: bool = False
):
    """Token by token for short segments (or when rows are so misaligned that chunk layouts would be mostly empty),
    chunked otherwise or with ``force_chunks``. Both compute the same function."""
    if seq_len <= RECURRENT_MAX_TOKENS and not force_chunks:
        return RecurrentSchedule(n_valid, pos0, seq_len, chunk_size, device)
    sched = ChunkSchedule(n_valid, pos0, seq_len, chunk_size, device)
    if sched.layout_len > 8 * seq_len and not force_chunks:
        return RecurrentSchedule(n_valid, pos0, seq_len, chunk_size, device)
    return sched


# ---------------------------------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------------------------------

_ACC = ("g0", "g1", "g2")


@dataclass
class KeptFastWeights:
    """What one chunked pass from the fresh state keeps so that the fast-weight state after any token counts can be
    computed from it, during the forward or after it (`states_at_counts`): the weights each chunk's outputs used and
    the branch's inputs in the compact layout. All are tensors of the pass's graph, so the states are differentiable
    into it."""

    chunk_weights: list[dict[str, torch.Tensor]]
    k: torch.Tensor
    v: torch.Tensor
    lr: torch.Tensor
    mom: torch.Tensor | None
    spec: FastWeightSpec

    def at(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state after each row's first ``counts [B, P]`` tokens (keys without the ``fw_`` prefix, [B, P, ...])."""
        return states_at_counts(self.chunk_weights, self.k, self.v, self.lr, self.mom, counts, self.spec)


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x: [B, n, T, ...]``, ``index: [B, L]`` -> ``x[b, :, index[b, l]]`` of shape ``[B, n, L, ...]``."""
    idx = index[:, None, :].expand(x.shape[0], x.shape[1], index.shape[1])
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return x.gather(2, idx)


def run_fast_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    mom: torch.Tensor | None,
    state: dict[str, torch.Tensor],
    target_norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    spec: FastWeightSpec,
    schedule: ChunkSchedule | RecurrentSchedule,
    need_state: bool,
    keep_states: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, KeptFastWeights | None]:
    """Run the fast-weight branch over one segment.

    ``q, k, v: [B, n, T, d]`` in the compact layout (row b's valid tokens are columns ``0..n_b-1``);
    ``lr: [B, n, T, 3]`` float32; ``mom: [B, n, T]`` or None. ``state`` holds ``w{j}``, ``w{j}_raw`` (pre-norm),
    ``m{j}`` (momentum), the float32 chunk accumulators ``g{j}`` and ``msum`` (momentum). Returns the outputs
    ``[B, n, T, d]`` (pad columns are arbitrary), the new state (when ``need_state``) and, with ``keep_states``,
    what gives the state after any token counts (`KeptFastWeights`; a call from the fresh state on a `ChunkSchedule`
    only), else None.
    """
    delta_dtype = torch.float32 if spec.fp32_states else v.dtype
    weights = {key: val for key, val in state.items() if key not in _ACC and key != "msum"}
    acc = tuple(state[key] for key in _ACC)
    msum = state.get("msum")
    if schedule.mode == "recurrent":
        if keep_states:
            raise ValueError("states at given token counts need the chunked schedule (make_schedule(force_chunks))")
        out, new_state = _run_recurrent(
            q, k, v, lr, mom, weights, acc, msum, target_norms, spec, schedule, need_state, delta_dtype
        )
        return out, new_state, None
    return _run_chunked(
        q, k, v, lr, mom, weights, acc, msum, target_norms, spec, schedule, need_state, delta_dtype, keep_states
    )


def _reset_rows(acc, msum, rows):
    zero = [torch.zeros_like(a) if rows is None else masked(torch.zeros_like(a), a, rows) for a in acc]
    if msum is not None:
        msum = torch.zeros_like(msum) if rows is None else masked(torch.zeros_like(msum), msum, rows)
    return tuple(zero), msum


def _run_recurrent(q, k, v, lr, mom, weights, acc, msum, target_norms, spec, sched, need_state, delta_dtype):
    outs = []
    for j, (valid_rows, any_valid, apply_rows, any_apply) in enumerate(sched.steps):
        if any_apply:
            weights = apply_update(weights, acc, msum, target_norms, spec, delta_dtype, apply_rows)
            acc, msum = _reset_rows(acc, msum, apply_rows)
        qj = q[:, :, j : j + 1]
        if not any_valid:
            outs.append(torch.zeros_like(qj))
            continue
        outs.append(fw_apply(weights["w0"], weights["w1"], weights["w2"], qj))
        if not (need_state or sched.later_apply[j]):
            continue  # this token's update direction would never be used
        lr_j = lr[:, :, j : j + 1]
        if valid_rows is not None:
            lr_j = lr_j * valid_rows.view(-1, 1, 1, 1)
        g = fw_grads(weights["w0"], weights["w1"], weights["w2"], k[:, :, j : j + 1], v[:, :, j : j + 1], lr_j, True)
        acc = tuple(a + gj for a, gj in zip(acc, g))
        if spec.use_momentum:
            m_j = mom[:, :, j].float()
            if valid_rows is not None:
                m_j = m_j * valid_rows.view(-1, 1)
            msum = msum + m_j
    return torch.cat(outs, dim=2), (_pack(weights, acc, msum) if need_state else None)


def _run_chunked(
    q, k, v, lr, mom, weights, acc, msum, target_norms, spec, sched, need_state, delta_dtype, keep_states=False
):
    B, n, T, d = q.shape
    if keep_states and (sched.any_pending or sched.gather or sched.s_min):
        raise ValueError("states at given token counts are computed from the fresh state only (no past state)")
    if sched.any_pending:
        weights = apply_update(weights, acc, msum, target_norms, spec, delta_dtype, sched.pending_rows)
        acc, msum = _reset_rows(acc, msum, sched.pending_rows)
    La = sched.layout_len
    if La == 0:  # no valid token in any row: nothing changes
        kept = KeptFastWeights([weights], k, v, lr, mom, spec) if keep_states else None
        return torch.zeros_like(q), (_pack(weights, acc, msum) if need_state else None), kept
    if sched.gather:
        Q, K, V, LR = (_gather_seq(x, sched.to_layout) for x in (q, k, v, lr))
        M = _gather_seq(mom, sched.to_layout) if mom is not None else None
    else:
        Q, K, V, LR = q[:, :, :La], k[:, :, :La], v[:, :, :La], lr[:, :, :La]
        M = mom[:, :, :La] if mom is not None else None
    if sched.layout_valid is not None:
        LR = LR * sched.layout_valid[:, None, :, None]
        if M is not None:
            M = M * sched.layout_valid[:, None, :].to(M.dtype)
    final_acc, final_msum = acc, msum
    outs = []
    chunk_weights = []  # the weights each chunk's outputs use (for the states at given counts)
    for c, (cs, ce) in enumerate(sched.chunks):
        chunk_weights.append(weights)
        outs.append(fw_apply(weights["w0"], weights["w1"], weights["w2"], Q[:, :, cs:ce]))
        want_final = need_state and sched.last_any[c]
        if not (sched.apply_any[c] or want_final):
            continue
        g = fw_grads(weights["w0"], weights["w1"], weights["w2"], K[:, :, cs:ce], V[:, :, cs:ce], LR[:, :, cs:ce])
        ms = M[:, :, cs:ce].float().sum(dim=2) if M is not None else None
        if c == 0:
            g = tuple(a + gi for a, gi in zip(acc, g))
            if ms is not None:
                ms = msum + ms
        if want_final:
            rows = sched.last_rows[c]
            final_acc = tuple(masked(gi, a, rows) for gi, a in zip(g, final_acc))
            if ms is not None:
                final_msum = masked(ms, final_msum, rows)
        if sched.apply_any[c]:
            weights = apply_update(weights, g, ms, target_norms, spec, delta_dtype, sched.apply_rows[c])
    out = torch.cat(outs, dim=2)
    if sched.gather:
        out = _gather_seq(out, sched.to_compact)
    elif La < T:
        out = torch.cat([out, out.new_zeros(B, n, T - La, d)], dim=2)
    kept = KeptFastWeights(chunk_weights, k, v, lr, mom, spec) if keep_states else None
    return out, (_pack(weights, final_acc, final_msum) if need_state else None), kept


def states_at_counts(
    chunk_weights: list[dict[str, torch.Tensor]],
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    mom: torch.Tensor | None,
    counts: torch.Tensor,
    spec: FastWeightSpec,
) -> dict[str, torch.Tensor]:
    """The fast-weight state after each row's first ``counts[b, i]`` tokens, from one chunked pass that started
    from the fresh state: what a call on those tokens alone leaves (`run_fast_weights` with ``need_state``).

    ``chunk_weights[c]``: the weights (``w{j}``, ``w{j}_raw``, ``m{j}``) chunk c's outputs used, i.e. after the
    updates of chunks ``0..c-1``; ``k, v: [B, n, T, d]``, ``lr: [B, n, T, 3]``, ``mom: [B, n, T]`` in the compact
    layout; ``counts: [B, P]`` in ``[0, T]``. After ``t >= 1`` tokens the current chunk is ``c = (t-1) // C`` (a full
    chunk stays pending), its weights are ``chunk_weights[c]`` and the accumulators ``g{j}`` / ``msum`` sum the
    chunk's tokens ``cC .. t-1`` (one masked `fw_grads` per position over the chunk's columns); ``t = 0`` is the
    fresh state. Returns the state's keys (no ``fw_`` prefix) with a position dim after the batch: ``[B, P, ...]``.
    """
    C = spec.chunk_size
    B, n, T, d = k.shape
    P = counts.shape[1]
    chunk = (counts - 1).clamp(min=0) // C  # [B, P]
    out = {}
    for key in chunk_weights[0]:
        stacked = torch.stack([w[key] for w in chunk_weights], dim=1)  # [B, chunks, ...]
        index = chunk.view(B, P, *([1] * (stacked.dim() - 2))).expand(B, P, *stacked.shape[2:])
        out[key] = stacked.gather(1, index)
    width = min(C, T)
    cols = chunk[..., None] * C + torch.arange(width, device=k.device)  # [B, P, width]
    seen = (cols < counts[..., None])[:, :, None, :]  # [B, P, 1, width]
    rows = torch.arange(B, device=k.device)[:, None, None]
    cols = cols.clamp(max=T - 1)

    def per_position(x: torch.Tensor) -> torch.Tensor:  # [B, n, T, ...] -> [B, P, n, width, ...]
        return x.transpose(1, 2)[rows, cols].transpose(2, 3)

    kc, vc = per_position(k), per_position(v)
    lrc = per_position(lr) * seen[..., None]
    flat = lambda x: x.flatten(0, 1)  # noqa: E731 - [B, P, ...] -> [B*P, ...]
    grads = fw_grads(flat(out["w0"]), flat(out["w1"]), flat(out["w2"]), flat(kc), flat(vc), flat(lrc))
    for key, g in zip(_ACC, grads):
        out[key] = g.view(B, P, *g.shape[1:])
    if mom is not None:
        out["msum"] = (per_position(mom[..., None])[..., 0] * seen.to(mom.dtype)).float().sum(dim=-1)
    return out


def _pack(weights, acc, msum) -> dict[str, torch.Tensor]:
    state = dict(weights)
    state.update(zip(_ACC, acc))
    if msum is not None:
        state["msum"] = msum
    return state
