"""fla GatedDeltaNet on CPU under TRITON_INTERPRET=1 (fp32, fused_recurrent, eval, no grad: fla's fused_recurrent
gated kernel has no backward): the one-pass engine's readout states and outputs against the snapshot engine on the
same model (fused_recurrent runs the same token recurrence either way, so they agree to the last bit). Run by tests/test_onepass_engine.py in a subprocess; prints one JSON line of relative differences."""

import json
import os
import sys

import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import trl_refine.rollout.fla_readout as fla_readout  # noqa: E402
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.rollout import DocumentBatch, OnePassEngine, RolloutPlan, SnapshotEngine  # noqa: E402

# count the layer calls of the readout forward: the one-pass engine must have taken it
_readout = fla_readout._gated_forward_with_readout
calls = {"n": 0}


def _counted(*args, **kwargs):
    calls["n"] += 1
    return _readout(*args, **kwargs)


fla_readout._gated_forward_with_readout = _counted


torch.manual_seed(0)
cfg = GatedDeltaNetConfig(
    hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=64, attn_mode="fused_recurrent",
    fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False,
)  # fmt: skip
model = GatedDeltaNetForCausalLM(cfg).float().eval()
ensure_fused_lm_head(model)
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 70), generator=g)
mask = torch.ones_like(ids)
mask[1, :15] = 0
docs = DocumentBatch(ids, mask)
plan = RolloutPlan(torch.tensor([[10, 10, 40], [30, 50, 60]]), 2, 3)
outs = []
with torch.no_grad():
    for engine in (SnapshotEngine(), OnePassEngine()):
        snaps, hidden = engine.document_pass(model, docs, plan)
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
        fwd = engine.forward_train(model, docs, plan, outs[0][1].completion_ids if outs else out.completion_ids)
        outs.append((snaps, out, fwd, hidden))
(s_snaps, s_out, s_fwd, s_hidden), (o_snaps, o_out, o_fwd, o_hidden) = outs
res = {
    "recurrent_state_rel": max(
        rel(o[i]["recurrent_state"], s[i]["recurrent_state"]) for o, s in zip(o_snaps, s_snaps) for i in range(2)
    ),
    "conv_state_rel": max(
        rel(a, b)
        for o, s in zip(o_snaps, s_snaps)
        for i in range(2)
        for a, b in zip(o[i]["conv_state"], s[i]["conv_state"])
    ),  # fmt: skip
    "doc_hidden_rel": rel(o_hidden * mask[..., None], s_hidden * mask[..., None]),
    "rollout_ids_equal": bool(torch.equal(o_out.completion_ids, s_out.completion_ids)),
    "old_logps_rel": rel(o_out.old_logps, s_out.old_logps),
    "hidden_states_rel": rel(o_out.hidden_states, s_out.hidden_states),
    "doc_logps_rel": rel(o_fwd.doc_logps, s_fwd.doc_logps),
    "rollout_logps_rel": rel(o_fwd.rollout_logps, s_fwd.rollout_logps),
    "readout_layer_calls": calls["n"],  # 2 layers x (document_pass + generate + forward_train)
}
print(json.dumps(res))
