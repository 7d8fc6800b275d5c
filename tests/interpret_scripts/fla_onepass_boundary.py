"""fla DeltaNet on CPU under TRITON_INTERPRET=1 (fp32): the one-pass engine with the boundary-state provider
(``states="boundary"``: our chunk kernel + `states_after`) against the snapshot engine on the reference DeltaNet
with the same weights, without short convolutions (forward and parameter gradients); with ``--full`` also with short
convolutions (forward only) and against the readout provider on the same fla model (fla's conv kernels and the
readout's fused_recurrent kernel over the spliced tokens make that run minutes long under the interpreter). Left-padded
documents of 2 chunks, positions on and next to the chunk boundary, the reused sampling pass (its snapshots are the
compared states). Run by tests/test_onepass_engine.py in a subprocess; prints one JSON line of relative
differences (and timings).

``--gated``: the same on fla GatedDeltaNet (our gated boundary kernel, ``chunk_gated_delta_rule_states_at`` /
`gated_states_after`; V-first states, grouped value heads, HV = 2H), against the snapshot engine on a copy of the same
fla model whose chunk op is fla's pure-PyTorch gated recurrence (``_naive_ops.chunk_gated_delta_rule``: fla's own
gated chunk kernels do not run in the interpreter); ``--gated --full`` adds two layers with short convolutions
(forward only), not the readout provider (its gated chunk op is fla's kernel)."""

import copy
import json
import os
import sys
import time

import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from fla.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import trl_refine.rollout.fla_boundary as fla_boundary  # noqa: E402
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.rollout import DocumentBatch, OnePassEngine, RolloutPlan, SnapshotEngine  # noqa: E402

# count the layer calls of the boundary forward: the engine must have taken it
_boundary = fla_boundary._forward_with_boundary_states
calls = {"n": 0}


def _counted(*args, **kwargs):
    calls["n"] += 1
    return _boundary(*args, **kwargs)


fla_boundary._forward_with_boundary_states = _counted


def gated_models(use_short_conv: bool):
    """fla GatedDeltaNet (fp32, chunk mode) and a copy of it (the oracle) whose layer's chunk op is fla's naive
    recurrence."""
    from _naive_ops import patch as naive_patch
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    naive_patch("gated_deltanet")  # the fla layer's own chunk calls (the snapshot segments, the branch calls)
    torch.manual_seed(0)
    cfg = GatedDeltaNetConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_heads=2, num_v_heads=4, head_dim=16, vocab_size=64,
        attn_mode="chunk", fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=use_short_conv,
    )  # fmt: skip
    fla_model = GatedDeltaNetForCausalLM(cfg).float()
    ref = copy.deepcopy(fla_model)
    for m in (fla_model, ref):
        ensure_fused_lm_head(m)
    return fla_model, ref


def models(use_short_conv: bool):
    """fla DeltaNet (fp32; fused_recurrent for the decode and branch calls) and the reference DeltaNet with the same
    weights (the oracle)."""
    from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM

    torch.manual_seed(0)
    cfg = DeltaNetConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_heads=2, vocab_size=64, attn_mode="fused_recurrent",
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


FULL = "--full" in sys.argv
GATED = "--gated" in sys.argv
LAYERS = 2 if FULL else 1  # one layer keeps the default run at seconds; the full run checks the per-layer store
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 100), generator=g)
mask = torch.ones_like(ids)
mask[1, :30] = 0  # 70 valid tokens
docs = DocumentBatch(ids, mask)
# counts (valid tokens up to and including the position): 64 (a chunk boundary), 65, 90; 2, 63, 64
plan = RolloutPlan(torch.tensor([[63, 64, 89], [31, 92, 93]]), 2, 3)
adv = torch.linspace(-1, 1, plan.num_rows)
res = {}
# fla's conv backward with an initial state (the branch call) does not run in the interpreter: with short convs the
# comparison is forward-only, without them it includes the parameter gradients
for use_short_conv in (True, False) if FULL else (False,):
    fla_model, ref = (gated_models if GATED else models)(use_short_conv)
    tag = "conv" if use_short_conv else "noconv"
    outs = {}
    runs = [("snapshot", SnapshotEngine(), ref), ("boundary", OnePassEngine(states="boundary"), fla_model)]
    if FULL and not GATED:
        runs.append(("readout", OnePassEngine(states="readout"), fla_model))
    for name, engine, model in runs:
        t0 = time.time()
        model.zero_grad(set_to_none=True)
        # the reused sampling pass: one document pass with gradients serves sampling, the states and the loss
        with torch.no_grad():
            out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5), train_model=model)
        snaps, hidden = out.sampling_pass.snapshots, out.sampling_pass.doc_hidden
        comp = outs["snapshot"][1].completion_ids if outs else out.completion_ids
        fwd = engine.forward_train(model, docs, plan, comp, sampling_pass=out.sampling_pass)
        grad = None
        if not use_short_conv:
            m = docs.label_mask()
            (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        outs[name] = (snaps, out, fwd, grad, hidden.detach())
        res[f"{tag}_seconds_{name}"] = round(time.time() - t0, 1)
    o_snaps, o_out, o_fwd, o_grad, o_hidden = outs["boundary"]
    for other in [name for name, _, _ in runs if name != "boundary"]:
        s_snaps, s_out, s_fwd, s_grad, s_hidden = outs[other]
        key = f"{tag}_vs_{other}"
        res[f"{key}_recurrent_state_rel"] = max(
            rel(o[i]["recurrent_state"], s[i]["recurrent_state"])
            for o, s in zip(o_snaps, s_snaps)
            for i in range(LAYERS)
        )
        if use_short_conv:
            res[f"{key}_conv_state_rel"] = max(
                rel(a, b) for o, s in zip(o_snaps, s_snaps) for i in range(LAYERS)
                for a, b in zip(o[i]["conv_state"], s[i]["conv_state"])
            )  # fmt: skip
        res[f"{key}_doc_hidden_rel"] = rel(o_hidden * mask[..., None], s_hidden * mask[..., None])
        res[f"{key}_rollout_ids_equal"] = bool(torch.equal(o_out.completion_ids, s_out.completion_ids))
        res[f"{key}_old_logps_rel"] = rel(o_out.old_logps, s_out.old_logps)
        res[f"{key}_hidden_states_rel"] = rel(o_out.hidden_states, s_out.hidden_states)
        res[f"{key}_doc_logps_rel"] = rel(o_fwd.doc_logps, s_fwd.doc_logps)
        res[f"{key}_rollout_logps_rel"] = rel(o_fwd.rollout_logps, s_fwd.rollout_logps)
        if not use_short_conv:
            res[f"{key}_grad_rel"] = rel(o_grad, s_grad)
res["boundary_layer_calls"] = calls["n"]
print(json.dumps(res))
