"""flash_attn's two entry points that fla's `Attention` layer calls (``flash_attn_func``, ``flash_attn_varlen_func``),
in plain PyTorch, so that fla's hybrid models (``config.attn``) run on a CPU without flash_attn: `install` puts them
into ``fla.layers.attn`` before a model is built (fla's `Attention.__init__` refuses to build without them).

flash_attn's semantics (flash_attn >= 2.1): queries ``[.., Tq, H, D]`` against keys ``[.., Tk, H_kv, D]``
(grouped-query: query head h reads key head ``h // (H / H_kv)``), scale ``D^-0.5``; ``causal`` aligns the causal
mask to the bottom right (query i sees key j when ``j <= i + Tk - Tq``), a window ``(left, right)`` also hides keys
``j < i + Tk - Tq - left``. Everything in fp32 softmax; no dropout."""

import torch


def _attend(q, k, v, causal: bool, window_size=(-1, -1), softmax_scale=None):
    """One sequence: q [Tq, H, D], k / v [Tk, H_kv, D] -> [Tq, H, D]."""
    tq, heads, dim = q.shape
    tk, kv_heads = k.shape[0], k.shape[1]
    rep = heads // kv_heads
    k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    left, right = window_size
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    """[B, Tq, H, D] x [B, Tk, H_kv, D] -> [B, Tq, H, D]."""
    if dropout_p:
        raise NotImplementedError("dropout")
    return torch.stack([_attend(q[b], k[b], v[b], causal, window_size, softmax_scale) for b in range(q.shape[0])])


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), **kwargs,
):  # fmt: skip
    """Packed sequences: q [Σq, H, D], k / v [Σk, H_kv, D], sequence b = rows ``cu[b]:cu[b+1]``."""
    if dropout_p:
        raise NotImplementedError("dropout")
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = [
        _attend(q[bq[b] : bq[b + 1]], k[bk[b] : bk[b + 1]], v[bk[b] : bk[b + 1]], causal, window_size, softmax_scale)
        for b in range(len(bq) - 1)
    ]
    return torch.cat(outs)


def install() -> None:
    """Make fla's `Attention` layer use the functions above (call before building a model)."""
    import fla.layers.attn as attn

    attn.flash_attn_func = flash_attn_func
    attn.flash_attn_varlen_func = flash_attn_varlen_func
