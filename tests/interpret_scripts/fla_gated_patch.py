"""trl_refine.kernels.fla_gated_patch on CPU under TRITON_INTERPRET=1 (fp32), against fla's pure-PyTorch gated
recurrence (``_naive_ops.chunk_gated_delta_rule``: naive_recurrent_gated_delta_rule, autograd; fla's own chunk op
cannot run under the interpreter), whose forward is first checked against fla's Triton fused_recurrent op:

* the op with the flags fla's GatedDeltaNet passes, grouped value heads, an initial state and the final state, dense
  and varlen (``cu_seqlens``), ``allow_neg_eigval``: outputs, final states, gradients wrt every input;
* a tiny fla GatedDeltaNetForCausalLM (with a left-padded row, which the layer unpads into ``cu_seqlens``): logits
  and the gradients of an NTP loss wrt every parameter, the patched model against the same model with the naive op;
* the cache as generation uses it: a prefix with ``use_cache=True`` then a continuation from that cache, with grad
  (initial state and final state on the kernel's path): continuation logits, cache states, parameter gradients.

``python fla_gated_patch.py engines`` instead runs trl_refine's one-pass engine (whose readout forward imports fla's
public op name at call time) and the snapshot engine (fla's layer, from cached states) on one GatedDeltaNet with
the swap, with grad: document and rollout log-probs and every parameter's gradient, and how many op calls were ours.

Run by tests/test_fla_gated_patch.py in a subprocess; prints one JSON line."""

import copy
import json
import os
import sys
import time

import torch
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from _naive_ops import chunk_gated_delta_rule as naive_op  # noqa: E402
from _naive_ops import patch as naive_patch  # noqa: E402
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402
from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import trl_refine.kernels.fla_gated_patch as fla_gated_patch  # noqa: E402
from trl_refine.kernels.fla_gated_patch import chunk_gated_delta_rule, use_trl_refine_gated_kernel  # noqa: E402

t_start = time.time()
res = {}
gen = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=gen)


def engines():
    """The one-pass engine against the snapshot engine, both with the swap, with grad (module docstring)."""
    from trl_refine.modeling_utils import ensure_fused_lm_head
    from trl_refine.rollout import DocumentBatch, OnePassEngine, RolloutPlan, SnapshotEngine

    calls = {"n": 0}
    ours_op = fla_gated_patch.chunk_gated_delta_rule

    def counted(*args, **kwargs):
        calls["n"] += 1
        return ours_op(*args, **kwargs)

    fla_gated_patch.chunk_gated_delta_rule = counted  # what the block installs
    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(
        hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16, vocab_size=64, attn_mode="chunk",
        fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=False,
    )  # fmt: skip
    model = GatedDeltaNetForCausalLM(cfg).float()
    ensure_fused_lm_head(model)
    ids = torch.randint(3, 64, (2, 40), generator=gen)  # + 2 x 16 readout tokens: two chunks
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    docs = DocumentBatch(ids, mask)
    plan = RolloutPlan(torch.tensor([[10, 25], [20, 30]]), 2, 3)
    outs = []
    with use_trl_refine_gated_kernel(model):
        for engine in (SnapshotEngine(), OnePassEngine()):
            with torch.no_grad():
                comp = outs[0][0] if outs else engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
                comp = comp if outs else comp.completion_ids
            model.zero_grad()
            before = calls["n"]
            fwd = engine.forward_train(model, docs, plan, comp)
            ((fwd.doc_logps * mask).sum() + fwd.rollout_logps.sum()).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            outs.append((comp, fwd.doc_logps.detach() * mask, fwd.rollout_logps.detach(), grads, calls["n"] - before))
    (_, s_doc, s_roll, s_grad, s_calls), (_, o_doc, o_roll, o_grad, o_calls) = outs
    res = {
        "doc_logps_rel": rel(o_doc, s_doc), "rollout_logps_rel": rel(o_roll, s_roll), "grad_rel": rel(o_grad, s_grad),
        "snapshot_op_calls": s_calls, "onepass_op_calls": o_calls, "grad_norm": s_grad.norm().item(),
    }  # fmt: skip
    print(json.dumps(res))
    sys.exit(0)


if sys.argv[1:] == ["engines"]:
    engines()

# --- the op -----------------------------------------------------------------------------------------------------
H, HV, K, V = 2, 4, 16, 16
LAYER_FLAGS = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True)


def op_case(tag, B, T, cu=None, neg=False):
    n = B if cu is None else len(cu) - 1
    inputs = dict(
        q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, V), g=randn(B, T, HV), beta=randn(B, T, HV),
        A_log=randn(HV), dt_bias=randn(HV), initial_state=randn(n, HV, V, K),
    )  # fmt: skip
    flags = dict(LAYER_FLAGS, allow_neg_eigval=neg, state_v_first=True, output_final_state=True, cu_seqlens=cu)
    up = None
    outs, grads = [], []
    for fn in (naive_op, chunk_gated_delta_rule):
        leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
        o, ht = fn(**leaves, **flags)
        up = up or (randn(*o.shape), randn(*ht.shape))
        ((o * up[0]).sum() + (ht * up[1]).sum()).backward()
        outs.append((o.detach(), ht.detach()))
        grads.append({name: x.grad for name, x in leaves.items()})
    res[f"{tag}/o"] = rel(outs[1][0], outs[0][0])
    res[f"{tag}/final"] = rel(outs[1][1], outs[0][1])
    for name in inputs:
        res[f"{tag}/d{name}"] = rel(grads[1][name], grads[0][name])
    if cu is not None or B == 1:  # the naive reference against fla's Triton fused_recurrent op (forward)
        with torch.no_grad():
            o, ht = fused_recurrent_gated_delta_rule(**inputs, **flags)
        res[f"{tag}/naive_vs_fla_fused_recurrent_o"] = rel(outs[0][0], o)
        res[f"{tag}/naive_vs_fla_fused_recurrent_final"] = rel(outs[0][1], ht)


op_case("op_varlen_neg_eigval", B=1, T=24, cu=torch.tensor([0, 5, 5, 24]), neg=True)  # an empty sequence

# --- the model --------------------------------------------------------------------------------------------------
torch.manual_seed(0)
cfg = GatedDeltaNetConfig(
    hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, num_v_heads=4, vocab_size=64, attn_mode="chunk",
    fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=False,
)  # fmt: skip
model = GatedDeltaNetForCausalLM(cfg).float()
naive_model = copy.deepcopy(model)
ids = torch.randint(3, 64, (2, 66), generator=gen)  # two chunks
mask = torch.ones_like(ids)
mask[1, :12] = 0  # left padding: the layer unpads into cu_seqlens


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def worst(grads, ref_grads):
    """The parameter whose gradient differs most (relative), with its gradient's norm."""
    return max((rel(grads[n], ref_grads[n]), n, ref_grads[n].norm().item()) for n in ref_grads)


def ntp(m, patched, **kw):
    m.zero_grad()
    if patched:
        with use_trl_refine_gated_kernel(m) as layers:
            out = m(input_ids=ids, attention_mask=mask, **kw)
        res["model/layers_swapped"] = layers
    else:
        out = m(input_ids=ids, attention_mask=mask, **kw)
    logits = out.logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    loss.backward()  # after the block: autograd keeps the swapped kernel for the backward
    return logits.detach() * mask[..., None], {n: p.grad.clone() for n, p in m.named_parameters()}


naive_patch("gated_deltanet")  # the unpatched model's op: fla's naive recurrence (the layer's module name)
ref_logits, ref_grads = ntp(naive_model, False)
logits, grads = ntp(model, True)
res["model/logits"] = rel(logits, ref_logits)
res["model/grad_all"] = rel(flat(grads), flat(ref_grads))
res["model/grad_worst_param"] = worst(grads, ref_grads)
res["model/grads_nonzero"] = all(bool(g.abs().sum() > 0) for g in ref_grads.values())
res["model/params"] = len(ref_grads)
res["model/restored"] = sys.modules["fla.layers.gated_deltanet"].chunk_gated_delta_rule.__module__


# --- the cache, as generation uses it, with grad ------------------------------------------------------------------
def with_cache(m, patched):
    m.zero_grad()
    ctx = use_trl_refine_gated_kernel(m) if patched else torch.enable_grad()
    with ctx:
        prefix = m(input_ids=ids[:, :40], use_cache=True)
        states = [prefix.past_key_values[i]["recurrent_state"].detach().clone() for i in range(2)]
        cont = m(input_ids=ids[:, 40:], past_key_values=prefix.past_key_values, use_cache=True)
    logp = cont.logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 41:, None])[..., 0]
    (-logp.mean()).backward()
    states += [cont.past_key_values[i]["recurrent_state"].detach() for i in range(2)]
    return cont.logits.detach(), states, {n: p.grad.clone() for n, p in m.named_parameters()}


ref = with_cache(naive_model, False)
ours = with_cache(model, True)
res["cache/logits"] = rel(ours[0], ref[0])
res["cache/states"] = max(rel(a, b) for a, b in zip(ours[1], ref[1]))
res["cache/state_shape"] = list(ours[1][0].shape)
res["cache/grad_all"] = rel(flat(ours[2]), flat(ref[2]))
res["cache/grad_worst_param"] = worst(ours[2], ref[2])
res["seconds"] = time.time() - t_start
print(json.dumps(res))
