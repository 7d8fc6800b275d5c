"""fla hybrids (an fla family with fla `Attention` layers, ``config.attn``) on CPU under TRITON_INTERPRET=1 (fp32):
the snapshot engine, with the prefix K/V shared between the G branches (the default) and copied per branch, against
the generic engine on the same model: rollout ids, old log-probs, hidden states, document and rollout log-probs,
parameter gradients. fla's Attention layer calls flash_attn, which has no CPU build: _flash_attn_torch.py puts
flash_attn's two functions, in plain PyTorch, where fla's layer looks them up, so the generic engine and the
snapshot engine's segment calls run fla's own Attention code; the shared-prefix branch calls run the adapter's own
attention (`trl_refine.rollout.adapters.fla_hybrid.branch_attention_forward`). Run by
tests/test_fla_families_interpret.py in a subprocess: ``python fla_hybrid.py FAMILY`` (``gla_hybrid``,
``delta_net_hybrid``, see `trl_refine.models.tiny_configs.FLA_HYBRIDS`) ``[naive]`` (``naive``: the recurrent
layer's op replaced by fla's pure-PyTorch reference, _naive_ops.py: the interpreter runs GLA's kernels, but slowly);
prints one JSON line."""

import json
import os
import sys
import time

import _flash_attn_torch  # noqa: E402
import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)

_flash_attn_torch.install()
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.models.tiny_configs import tiny_config  # noqa: E402
from trl_refine.rollout import DocumentBatch, GenericEngine, RolloutPlan, SnapshotEngine  # noqa: E402
from trl_refine.rollout.adapters import fla_hybrid  # noqa: E402
from trl_refine.rollout.state import state_adapter_for  # noqa: E402

family = sys.argv[1]
substituted = None
if "naive" in sys.argv[2:]:
    from _naive_ops import patch  # noqa: E402

    substituted = patch(family.removesuffix("_hybrid"))
torch.manual_seed(0)
cfg = tiny_config(family, vocab_size=64, hidden_size=32, layers=2, heads=4)
for key, value in dict(fuse_norm=False, fuse_swiglu=False, attn_mode="fused_recurrent", use_short_conv=False).items():
    if hasattr(cfg, key):
        setattr(cfg, key, value)
model = AutoModelForCausalLM.from_config(cfg).float().eval()
ensure_fused_lm_head(model)
adapter, why = state_adapter_for(model)
assert isinstance(adapter, fla_hybrid.FlaHybridStateAdapter), why

shared_calls = []
inner = fla_hybrid.shared_prefix_attention


def counted(module, query, key, *args, **kwargs):
    shared_calls.append((query.shape[0], key.trl_refine_shared_prefix[0].shape[0]))
    return inner(module, query, key, *args, **kwargs)


fla_hybrid.shared_prefix_attention = counted

g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 24), generator=g)
mask = torch.ones_like(ids)
mask[1, :6] = 0
docs = DocumentBatch(ids, mask)
plan = RolloutPlan(torch.tensor([[5, 5, 15], [10, 13, 18]]), 2, 3)  # an empty segment; left padding in doc 1
adv = torch.linspace(-1, 1, plan.num_rows)
engines = {
    "generic": GenericEngine(),
    "copied": SnapshotEngine(adapter=fla_hybrid.FlaHybridStateAdapter(cfg, share_prefix_kv=False)),
    "shared": SnapshotEngine(),
}
outs = {}
seconds = {}
for name, engine in engines.items():
    start = time.perf_counter()
    before = len(shared_calls)
    with torch.no_grad():
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5))
    comp = outs["generic"][0].completion_ids if outs else out.completion_ids
    model.zero_grad()
    fwd = engine.forward_train(model, docs, plan, comp)
    m = docs.label_mask()
    (-(fwd.doc_logps * m).sum() / m.sum() - (adv[:, None] * fwd.rollout_logps).mean()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    outs[name] = (out, fwd, grad, shared_calls[before:])
    seconds[name] = round(time.perf_counter() - start, 1)
g_out, g_fwd, g_grad, g_calls = outs["generic"]
res = {"shared_calls": len(outs["shared"][3]), "other_shared_calls": len(g_calls) + len(outs["copied"][3])}
# every shared call: the B = P·G branch rows against P prefix copies
res["shared_rows_per_prefix"] = sorted({b // p for b, p in outs["shared"][3]})
for name in ("copied", "shared"):
    out, fwd, grad, _ = outs[name]
    res[name] = {
        "rollout_ids_equal": bool(torch.equal(g_out.completion_ids, out.completion_ids)),
        "old_logps_rel": rel(out.old_logps, g_out.old_logps),
        "hidden_states_rel": rel(out.hidden_states, g_out.hidden_states),
        "doc_logps_rel": rel(fwd.doc_logps, g_fwd.doc_logps),
        "rollout_logps_rel": rel(fwd.rollout_logps, g_fwd.rollout_logps),
        "grad_rel": rel(grad, g_grad),
    }
res["shared_vs_copied_grad_rel"] = rel(outs["shared"][2], outs["copied"][2])
res["hidden_states_norm"] = g_out.hidden_states.norm().item()
res["grad_norm"] = g_grad.norm().item()
res["seconds"] = seconds
if substituted:
    res["substituted"] = substituted
print(json.dumps(res))
