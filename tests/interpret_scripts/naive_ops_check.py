"""The substitutes in _naive_ops.py against fla's Triton fused_recurrent ops run by the Triton interpreter (fp32),
forward on tiny varlen inputs (2 sequences, 3 and 5 tokens) with an initial state and the final state, with the
flags the fla layers pass: ``python naive_ops_check.py FAMILY``; prints one JSON line (output and final-state
relative errors). Run by tests/test_fla_families_interpret.py."""

import json
import sys

import torch
from _interpreter import rel  # first: turns the Triton interpreter on
from _naive_ops import chunk_comba, chunk_gated_delta_product, chunk_hgrn, chunk_kda, chunk_rwkv7, fused_recurrent_gla

family = sys.argv[1]
torch.manual_seed(0)
T, H, K, V = 8, 2, 16, 16
cu = torch.tensor([0, 3, 8])
n = len(cu) - 1


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def compare(tag, naive, triton):
    return {f"{tag}o_rel": rel(naive[0], triton[0]), f"{tag}final_state_rel": rel(naive[1], triton[1])}


res = {}
if family == "kda":
    from fla.ops.kda import fused_recurrent_kda

    q, k, g = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, K)
    v, beta, h0 = randn(1, T, H, V), randn(1, T, H), randn(n, H, V, K)  # state_v_first: [N, HV, V, K]
    A_log, dt_bias = randn(H), randn(H * K)
    flags = dict(
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, state_v_first=True
    )
    args = dict(q=q, k=k, v=v, g=g, beta=beta, A_log=A_log, dt_bias=dt_bias, output_final_state=True, cu_seqlens=cu)
    for neg in (False, True):
        tag = "neg_eigval_" if neg else ""
        naive = chunk_kda(**args, **flags, initial_state=h0.clone(), allow_neg_eigval=neg)
        triton = fused_recurrent_kda(**args, **flags, initial_state=h0.clone(), allow_neg_eigval=neg)
        res.update(compare(tag, naive, triton))
elif family == "gated_deltaproduct":
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    for nh, gated in ((1, False), (2, True)):  # the tiny config (no forget gate, one Householder step); the default
        q, k, v = randn(1, T, H, K), randn(1, T * nh, H, K), randn(1, T * nh, H, V)
        beta, h0 = torch.rand(1, T * nh, H), randn(n, H, K, V)
        g = -torch.rand(1, T, H) if gated else None
        naive = chunk_gated_delta_product(
            q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True, cu_seqlens=cu,
            num_householder=nh, use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        # the layer's fused_recurrent path: q on the last of each token's nh steps, g on the first
        q_steps = q.new_zeros(1, T, nh, H, K)
        q_steps[:, :, -1] = q
        g_steps = None
        if gated:
            g_steps = g.new_zeros(1, T, nh, H)
            g_steps[:, :, 0] = g
            g_steps = g_steps.flatten(1, 2)
        o, ht = fused_recurrent_gated_delta_rule(
            q=q_steps.flatten(1, 2), k=k, v=v, g=g_steps, beta=beta, initial_state=h0.clone(),
            output_final_state=True, cu_seqlens=cu * nh, use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        o = o.unflatten(1, (T, nh))[:, :, -1]
        res.update(compare(f"householder{nh}_{'gated_' if gated else ''}", naive, (o, ht)))
elif family == "rwkv7":
    from fla.modules.l2norm import l2_norm
    from fla.ops.rwkv7 import fused_recurrent_rwkv7

    r, k, v, h0 = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, V), randn(n, H, K, V)
    w = -0.6065306597126334 * torch.sigmoid(randn(1, T, H, K))  # the layer's log decay, in [-e^-0.5, 0)
    kk, a_gate = l2_norm(randn(1, T, H, K)), torch.rand(1, T, H, K)
    args = dict(r=r, w=w, k=k, v=v, a=-kk, b=kk * a_gate, scale=1.0, output_final_state=True, cu_seqlens=cu)
    naive = chunk_rwkv7(**args, initial_state=h0.clone())
    res.update(compare("", naive, fused_recurrent_rwkv7(**args, initial_state=h0.clone())))
elif family == "gla":
    from fla.ops.gla import fused_recurrent_gla as triton_gla

    q, k, v, h0 = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, V), randn(n, H, V, K)  # state_v_first
    gk = torch.nn.functional.logsigmoid(randn(1, T, H, K)) / 16  # the layer's gate (gate_logit_normalizer 16)
    args = dict(q=q, k=k, v=v, gk=gk, output_final_state=True, state_v_first=True, cu_seqlens=cu)
    naive = fused_recurrent_gla(**args, initial_state=h0.clone())
    res.update(compare("", naive, triton_gla(**args, initial_state=h0.clone())))
elif family == "hgrn":
    from fla.ops.hgrn import fused_recurrent_hgrn

    D = H * K
    x, h0 = randn(1, T, D), randn(n, D)
    g = torch.nn.functional.logsigmoid(randn(1, T, D))  # the layer's forget gate, a log in (-inf, 0)
    args = dict(x=x, g=g, output_final_state=True, cu_seqlens=cu)
    naive = chunk_hgrn(**args, initial_state=h0.clone())
    res.update(compare("", naive, fused_recurrent_hgrn(**args, initial_state=h0.clone())))
elif family == "comba":
    from fla.ops.comba import fused_recurrent_comba

    q, k, v, h0 = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, V), randn(n, H, K, V)
    p = k * torch.rand(1, 1, H, 1)  # the layer's inner decay: p = k * sigmoid(decay)
    beta, g = torch.rand(1, T, H), -torch.rand(1, T, H)
    args = dict(
        q=q, k=k, v=v, p=p, g=g, beta=beta, output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True
    )
    naive = chunk_comba(**args, initial_state=h0.clone())
    res.update(compare("", naive, fused_recurrent_comba(**args, initial_state=h0.clone())))
else:
    raise SystemExit(f"unknown family {family!r} (kda, gated_deltaproduct, rwkv7, gla, hgrn, comba)")
print(json.dumps(res))
