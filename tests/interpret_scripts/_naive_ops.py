"""fla's own pure-PyTorch references in place of the chunk ops whose Triton kernels the interpreter cannot run in fp32
(``chunk_kda``, ``chunk_gated_delta_product``, ``chunk_rwkv7``, ``chunk_gated_delta_rule``, ``chunk_hgrn``,
``chunk_comba``; and GLA's
``fused_recurrent_gla``, whose kernels the interpreter runs but slowly, for the fla hybrid test fla_hybrid.py), with
the op's signature and return ``(o, final_state)``: the in-kernel preprocessing (q/k L2 norm, beta sigmoid, KDA and
GDN gates) in torch, varlen ``cu_seqlens`` as one recurrence per sequence, ``initial_state`` / ``output_final_state``
and fla's state layouts. Autograd differentiates them, so the gradients are those of fla's reference recurrences.
`patch` installs one where the fla layer module imports the op; the rest of fla's kernels stay under the
interpreter. naive_ops_check.py compares each with fla's Triton fused_recurrent op under the interpreter (the
substitution is faithful; ``chunk_gated_delta_rule``: fla_gated_patch.py does)."""

import torch
from fla.ops.comba.naive import naive_chunk_comba
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
from fla.ops.gla.naive import naive_recurrent_gla
from fla.ops.hgrn.naive import naive_recurrent_hgrn
from fla.ops.kda.gate import naive_kda_gate
from fla.ops.kda.naive import naive_recurrent_kda


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm (modules/norm/l2norm.py): x / sqrt(sum x^2 + eps)."""
    return x * torch.rsqrt((x.float() * x.float()).sum(-1, keepdim=True) + eps).to(x.dtype)


def _per_sequence(fn, cu_seqlens, initial_state, tensors, output_final_state):
    """``fn(*tensors, initial_state)`` per sequence of ``cu_seqlens`` (batch-first tensors, batch 1 when varlen);
    returns (o concatenated over time, final states stacked or None)."""
    if cu_seqlens is None:
        o, ht = fn(*tensors, initial_state)
        return o, ht if output_final_state else None
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, ht = fn(*(t[:, bos:eos] for t in tensors), h0)
        outs.append(o)
        states.append(ht)
    return torch.cat(outs, 1), torch.cat(states) if output_final_state else None


def chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, safe_gate=False,
    lower_bound=None, state_v_first=False, cu_seqlens=None, A_log=None, dt_bias=None, **kwargs,
):  # fmt: skip
    """fla.ops.kda.chunk_kda by naive_recurrent_kda (+ naive_kda_gate for the in-kernel gate)."""
    if lower_bound is not None or safe_gate:
        raise NotImplementedError("the naive KDA substitute covers the softplus gate only (lower_bound=None)")
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    if use_gate_in_kernel:
        g = naive_kda_gate(g, A_log, dt_bias)
    flip = (lambda s: s.transpose(-1, -2)) if state_v_first else (lambda s: s)  # [N, HV, V, K] <-> [N, HV, K, V]

    def one(q, k, v, g, beta, h0):
        o, ht = naive_recurrent_kda(
            q, k, v, g, beta, scale=scale, initial_state=None if h0 is None else flip(h0), output_final_state=True
        )
        return o, flip(ht)

    return _per_sequence(one, cu_seqlens, initial_state, (q, k, v, g, beta), output_final_state)


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
    use_gate_in_kernel=False, A_log=None, dt_bias=None, **kwargs,
):  # fmt: skip
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule by naive_recurrent_gated_delta_rule (+ naive_gdn_gate for the
    in-kernel gate; grouped value heads by repeating q, k per value head)."""
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate

    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    if use_gate_in_kernel:
        g = naive_gdn_gate(g, A_log, dt_bias)
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    flip = (lambda s: s.transpose(-1, -2)) if state_v_first else (lambda s: s)  # [N, HV, V, K] <-> [N, HV, K, V]

    def one(q, k, v, g, beta, h0):
        o, ht = naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=None if h0 is None else flip(h0), output_final_state=True
        )
        return o, flip(ht)

    return _per_sequence(one, cu_seqlens, initial_state, (q, k, v, g, beta), output_final_state)


def chunk_gated_delta_product(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, num_householder=1,
    use_qk_l2norm_in_kernel=False, **kwargs,
):  # fmt: skip
    """fla.ops.gated_delta_product.chunk_gated_delta_product by naive_recurrent_gated_delta_product."""
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, ht = naive_recurrent_gated_delta_product(
        q, k, v, g, beta, scale, cu_seqlens=cu_seqlens, initial_state=initial_state,
        output_final_state=output_final_state, num_householder=num_householder,
    )  # fmt: skip
    return o, ht if output_final_state else None


def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    """fla.ops.rwkv7.chunk_rwkv7 (= chunk_dplr_delta_rule with gk=w) by fla's dplr_recurrence; that reference
    scales q by K^-0.5 itself, so r comes in as r * scale * K^0.5."""
    r = r * (scale * r.shape[-1] ** 0.5)

    def one(r, w, k, v, a, b, h0):
        heads_first = [t.transpose(1, 2) for t in (r, k, v, a, b, w)]  # [B, T, H, D] -> [B, H, T, D]
        o, ht = dplr_recurrence(*heads_first, initial_state=h0, output_final_state=True)
        return o.transpose(1, 2), ht

    return _per_sequence(one, cu_seqlens, initial_state, (r, w, k, v, a, b), output_final_state)


def fused_recurrent_gla(
    q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False, reverse=False,
    state_v_first=False, cu_seqlens=None, **kwargs,
):  # fmt: skip
    """fla.ops.gla.fused_recurrent_gla (the GLA layer's path for up to 64 tokens) by naive_recurrent_gla (gk only,
    the default scale K^-0.5, forward in time)."""
    if gv is not None or reverse or (scale is not None and scale != q.shape[-1] ** -0.5):
        raise NotImplementedError("the naive GLA substitute covers gk, the default scale, forward order only")
    flip = (lambda s: s.transpose(-1, -2)) if state_v_first else (lambda s: s)  # [N, H, V, K] <-> [N, H, K, V]

    def one(q, k, v, gk, h0):
        o, ht = naive_recurrent_gla(
            q, k, v, gk, initial_state=None if h0 is None else flip(h0), output_final_state=True
        )
        return o, flip(ht)

    return _per_sequence(one, cu_seqlens, initial_state, (q, k, v, gk), output_final_state)


def chunk_hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """fla.ops.hgrn.chunk_hgrn (x, g [B, T, D]; state [N, D]) by naive_recurrent_hgrn (fp32 state, output in x's
    dtype), one recurrence per sequence with ``cu_seqlens`` (fla's chunk op refuses varlen; its fused_recurrent takes
    it, as this does)."""

    def one(x, g, h0):
        return naive_recurrent_hgrn(x, g, initial_state=h0, output_final_state=True)

    return _per_sequence(one, cu_seqlens, initial_state, (x, g), output_final_state)


def chunk_comba(
    q, k, v, p, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, **kwargs,
):  # fmt: skip
    """fla.ops.comba.chunk_comba by fla's pure-PyTorch naive_chunk_comba. Not by its naive_recurrent_comba: that one
    decays the state before the correction term reads it (S_t = a_t S_{t-1}, then v_t - S_t p_t), while the chunk and
    fused_recurrent kernels (and the Comba paper) read the undecayed S_{t-1}; on random inputs it is 8% off both
    kernels, naive_chunk_comba 1.4e-7 (CPU fp32, interpreter). ``use_qk_l2norm_in_kernel`` normalizes q, k **and p**,
    as fla's chunk op (``chunk_comba_fwd``: l2norm_fwd on all three) and fused_recurrent kernel (b_q, b_k, b_p) do."""
    if use_qk_l2norm_in_kernel:
        q, k, p = _l2norm(q), _l2norm(k), _l2norm(p)

    def one(q, k, v, p, beta, g, h0):
        return naive_chunk_comba(q, k, v, p, g, beta, scale=scale, initial_state=h0, output_final_state=True)

    return _per_sequence(one, cu_seqlens, initial_state, (q, k, v, p, beta, g), output_final_state)


#: per family: the fla layer module, the name under which it imports the op, the substitute, fla's reference in it
SUBSTITUTES = {
    "kda": ("fla.layers.kda", "chunk_kda", chunk_kda, "fla.ops.kda.naive.naive_recurrent_kda"),
    "gated_deltanet": (
        "fla.layers.gated_deltanet", "chunk_gated_delta_rule", chunk_gated_delta_rule,
        "fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule",
    ),
    "gated_deltaproduct": (
        "fla.layers.gated_deltaproduct", "chunk_gated_delta_product", chunk_gated_delta_product,
        "fla.ops.gated_delta_product.naive.naive_recurrent_gated_delta_product",
    ),
    "rwkv7": ("fla.layers.rwkv7", "chunk_rwkv7", chunk_rwkv7, "fla.ops.generalized_delta_rule.dplr.naive.dplr_recurrence"),
    "gla": ("fla.layers.gla", "fused_recurrent_gla", fused_recurrent_gla, "fla.ops.gla.naive.naive_recurrent_gla"),
    "hgrn": ("fla.layers.hgrn", "chunk_hgrn", chunk_hgrn, "fla.ops.hgrn.naive.naive_recurrent_hgrn"),
    "comba": ("fla.layers.comba", "chunk_comba", chunk_comba, "fla.ops.comba.naive.naive_chunk_comba"),
}  # fmt: skip


def patch(family: str) -> str:
    """Install the substitute for ``family`` in its fla layer module; returns what was substituted."""
    import importlib

    module, name, fn, reference = SUBSTITUTES[family]
    setattr(importlib.import_module(module), name, fn)
    return f"{module}.{name} -> {reference} (tests/interpret_scripts/_naive_ops.py)"
