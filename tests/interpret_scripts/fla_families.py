"""fla families on CPU under TRITON_INTERPRET=1 (fp32): the snapshot engine against the generic engine on the same
model (rollout ids, old log-probs, hidden states, document and rollout log-probs, and parameter gradients where the
interpreter can run the backward: without short convolutions, whose backward from a cache it cannot run). Run by
tests/test_fla_families_interpret.py in a subprocess (the interpreter must be on before fla's kernels are
defined): ``python fla_families.py FAMILY [conv] [forward] [naive] [chunk8]`` (``conv``: with short convolutions,
which makes the comparison forward-only; ``forward``: no backward, for kernels whose backward the interpreter cannot
run in fp32; ``naive``: the family's chunk op, which the interpreter cannot run, replaced by fla's pure-PyTorch
reference, see _naive_ops.py; ``chunk8``: ``config.chunk_size = 8``, so that mamba2's segments span several scan
chunks); prints one JSON line."""

import json
import os
import sys

import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.models.tiny_configs import tiny_config  # noqa: E402
from trl_refine.rollout import DocumentBatch, GenericEngine, RolloutPlan, SnapshotEngine  # noqa: E402

family = sys.argv[1]
conv = "conv" in sys.argv[2:]
substituted = None
if "naive" in sys.argv[2:]:
    from _naive_ops import patch  # noqa: E402

    substituted = patch(family)
torch.manual_seed(0)
cfg = tiny_config(family, vocab_size=64, hidden_size=32, layers=2, heads=2)
for key, value in dict(fuse_norm=False, fuse_swiglu=False, attn_mode="fused_recurrent").items():
    if hasattr(cfg, key):
        setattr(cfg, key, value)
if "chunk8" in sys.argv[2:]:
    cfg.chunk_size = 8
if hasattr(cfg, "use_short_conv"):
    cfg.use_short_conv = conv
model = AutoModelForCausalLM.from_config(cfg).float().eval()
ensure_fused_lm_head(model)

g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 40), generator=g)
mask = torch.ones_like(ids)
mask[1, :9] = 0
docs = DocumentBatch(ids, mask)
plan = RolloutPlan(torch.tensor([[8, 8, 25], [20, 27, 33]]), 2, 3)  # an empty segment; left padding in doc 1
adv = torch.linspace(-1, 1, plan.num_rows)
backward = not conv and "forward" not in sys.argv[2:]
outs = []
for engine in (GenericEngine(), SnapshotEngine()):
    with torch.no_grad():
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
    comp = outs[0][0].completion_ids if outs else out.completion_ids
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        fwd = engine.forward_train(model, docs, plan, comp)
    grad = None
    if backward:
        m = docs.label_mask()
        (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    outs.append((out, fwd, grad))
(g_out, g_fwd, g_grad), (s_out, s_fwd, s_grad) = outs
res = {
    "rollout_ids_equal": bool(torch.equal(g_out.completion_ids, s_out.completion_ids)),
    "old_logps_rel": rel(s_out.old_logps, g_out.old_logps),
    "hidden_states_rel": rel(s_out.hidden_states, g_out.hidden_states),
    "hidden_states_norm": g_out.hidden_states.norm().item(),  # not a zero tensor compared with itself
    "doc_logps_rel": rel(s_fwd.doc_logps, g_fwd.doc_logps),
    "rollout_logps_rel": rel(s_fwd.rollout_logps, g_fwd.rollout_logps),
}
if backward:
    res["grad_rel"] = rel(s_grad, g_grad)
    res["grad_norm"] = g_grad.norm().item()
if substituted:
    res["substituted"] = substituted
print(json.dumps(res))
