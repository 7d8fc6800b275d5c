"""fla DeltaNet on CPU under TRITON_INTERPRET=1 (fp32, fused_recurrent): the one-pass engine's readout states and its
outputs against the snapshot engine on the reference DeltaNet with the same weights. Run by tests/test_onepass_engine.py in a subprocess (the interpreter must be on
before fla's kernels are defined); prints one JSON line of relative differences."""

import json
import os
import sys

import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from fla.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.rollout import DocumentBatch, OnePassEngine, RolloutPlan, SnapshotEngine  # noqa: E402


def models(use_short_conv: bool):
    """fla DeltaNet (fp32, fused_recurrent) and the reference DeltaNet with the same weights (the oracle)."""
    from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM

    torch.manual_seed(0)
    cfg = DeltaNetConfig(
        hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64, attn_mode="fused_recurrent",
        fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=use_short_conv,
    )  # fmt: skip
    fla_model = DeltaNetForCausalLM(cfg).float()
    ref = RefDeltaNetForCausalLM(
        RefDeltaNetConfig(**{k: v for k, v in cfg.to_dict().items() if k in RefDeltaNetConfig().to_dict()})
    ).float()
    ref.load_state_dict(fla_model.state_dict(), strict=True)
    for m in (fla_model, ref):
        ensure_fused_lm_head(m)
    return fla_model, ref


g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 70), generator=g)
mask = torch.ones_like(ids)
mask[1, :15] = 0
docs = DocumentBatch(ids, mask)
plan = RolloutPlan(torch.tensor([[10, 10, 40], [30, 50, 60]]), 2, 3)
adv = torch.linspace(-1, 1, plan.num_rows)
res = {}
# fla's conv backward with an initial state (the branch call) does not run in the interpreter: with short convs the
# comparison is forward-only, without them it includes the parameter gradients
for use_short_conv in (True, False):
    fla_model, ref = models(use_short_conv)
    tag = "conv" if use_short_conv else "noconv"
    outs = []
    for engine, model in ((SnapshotEngine(), ref), (OnePassEngine(), fla_model)):
        with torch.no_grad():
            snaps, hidden = engine.document_pass(model, docs, plan)
            out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
        comp = outs[0][1].completion_ids if outs else out.completion_ids
        with torch.set_grad_enabled(not use_short_conv):
            fwd = engine.forward_train(model, docs, plan, comp)
        grad = None
        if not use_short_conv:
            m = docs.label_mask()
            (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        outs.append((snaps, out, fwd, grad, hidden))
    (s_snaps, s_out, s_fwd, s_grad, s_hidden), (o_snaps, o_out, o_fwd, o_grad, o_hidden) = outs
    res[f"{tag}_recurrent_state_rel"] = max(
        rel(o[i]["recurrent_state"], s[i]["recurrent_state"]) for o, s in zip(o_snaps, s_snaps) for i in range(2)
    )
    if use_short_conv:
        res[f"{tag}_conv_state_rel"] = max(
            rel(a, b) for o, s in zip(o_snaps, s_snaps) for i in range(2)
            for a, b in zip(o[i]["conv_state"], s[i]["conv_state"])
        )  # fmt: skip
    res[f"{tag}_doc_hidden_rel"] = rel(o_hidden * mask[..., None], s_hidden * mask[..., None])
    res[f"{tag}_rollout_ids_equal"] = bool(torch.equal(o_out.completion_ids, s_out.completion_ids))
    res[f"{tag}_old_logps_rel"] = rel(o_out.old_logps, s_out.old_logps)
    res[f"{tag}_hidden_states_rel"] = rel(o_out.hidden_states, s_out.hidden_states)
    res[f"{tag}_doc_logps_rel"] = rel(o_fwd.doc_logps, s_fwd.doc_logps)
    res[f"{tag}_rollout_logps_rel"] = rel(o_fwd.rollout_logps, s_fwd.rollout_logps)
    if not use_short_conv:
        res[f"{tag}_grad_rel"] = rel(o_grad, s_grad)
print(json.dumps(res))
