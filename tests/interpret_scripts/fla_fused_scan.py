"""fla DeltaNet on CPU under TRITON_INTERPRET=1 (fp32): a full ReFINE step with the fused scan (``nsp_fuse_scan``,
the one-pass engine with ``states="boundary"``: our boundary-state kernel keeps every chunk-boundary state, the
entropies come from the same forward, `states_after` reads the states at the positions selected from them) against
the step of the snapshot engine on the reference DeltaNet with the same weights (its own no-grad scan, then n+1
segments). One layer without short convolutions (their backward from a cache does not run in the interpreter),
left-padded documents of 2 chunks. Run by tests/test_fused_scan.py in a subprocess; prints one JSON line.

``--gated``: the fused step on fla GatedDeltaNet (our gated boundary kernel keeps the chunk-boundary states,
`gated_states_after` reads the V-first states; grouped value heads, HV = 2H) against the snapshot step on a copy
whose chunk op is fla's pure-PyTorch gated recurrence (``_naive_ops.chunk_gated_delta_rule``: fla's own gated chunk
kernels do not run in the interpreter; the plain keys), and against the two-forward step of the one-pass engine on
another copy (``states="boundary"``, ``nsp_fuse_scan=False``: a no-grad scan, then the document pass; ``twopass_*``
keys)."""

import copy
import json
import os
import sys
import time

import torch  # noqa: E402
from _interpreter import rel  # noqa: E402  (first: turns the Triton interpreter on)
from fla.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import trl_refine.rollout.fla_boundary as fla_boundary  # noqa: E402
from trl_refine.losses import masked_token_nll, ppo_clip_loss  # noqa: E402
from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM  # noqa: E402
from trl_refine.rewards import builtin_reward_funcs  # noqa: E402
from trl_refine.rollout import DocumentBatch, OnePassEngine, SnapshotEngine  # noqa: E402
from trl_refine.step import reward_rows, rollout_generators, sample_rollouts, score_rewards, step_advantages  # noqa: E402
from trl_refine.testtime import TestTimeConfig  # noqa: E402

# count the layer calls of the deferred boundary forward: the step must have taken it
_keeping = fla_boundary._forward_keeping_boundary_states
calls = {"layers": 0}


def _counted(*args, **kwargs):
    calls["layers"] += 1
    return _keeping(*args, **kwargs)


fla_boundary._forward_keeping_boundary_states = _counted

torch.manual_seed(0)
if "--gated" in sys.argv:
    from _naive_ops import patch as naive_patch
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    naive_patch("gated_deltanet")  # the fla layer's own chunk calls (the snapshot segments, the branch calls)
    cfg = GatedDeltaNetConfig(
        hidden_size=32, num_hidden_layers=1, num_heads=2, num_v_heads=4, head_dim=16, vocab_size=64,
        attn_mode="chunk", fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=False,
    )  # fmt: skip
    fla_model = GatedDeltaNetForCausalLM(cfg).float()
    ref = copy.deepcopy(fla_model)
    twins = [copy.deepcopy(fla_model)]  # for the two-forward one-pass step
else:
    twins = []
    cfg = DeltaNetConfig(
        hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=64, attn_mode="fused_recurrent",
        fuse_cross_entropy=False, fuse_norm=False, fuse_swiglu=False, use_short_conv=False,
    )  # fmt: skip
    fla_model = DeltaNetForCausalLM(cfg).float()
    ref = RefDeltaNetForCausalLM(
        RefDeltaNetConfig(**{k: v for k, v in cfg.to_dict().items() if k in RefDeltaNetConfig().to_dict()})
    ).float()
    ref.load_state_dict(fla_model.state_dict(), strict=True)
for m in (fla_model, ref, *twins):
    ensure_fused_lm_head(m)

g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 64, (2, 100), generator=g)
mask = torch.ones_like(ids)
mask[1, :30] = 0  # 70 valid tokens
docs = DocumentBatch(ids, mask)
tokenizer = ByT5Tokenizer()
res = {}
outs = {}
for name, engine, model, fuse in [
    ("snapshot", SnapshotEngine(), ref, False),
    ("fused", OnePassEngine(states="boundary"), fla_model, True),
    *(("twopass", OnePassEngine(states="boundary"), twin, False) for twin in twins),
]:
    t0 = time.time()
    step_cfg = TestTimeConfig(
        nsp_num_chunks=3, nsp_num_rollouts=2, nsp_rollout_length=3, nsp_margin=4, nsp_reward="hybrid",
        nsp_fuse_scan=fuse,
    )  # fmt: skip
    assert (engine.fused_scan_problem(model) == "") == (name != "snapshot")
    model.zero_grad(set_to_none=True)
    forwards = {"n": 0}

    def count(_module, args, kwargs, _forwards=forwards):  # model calls over the whole [B, L] documents
        _forwards["n"] += kwargs.get("input_ids", args[0] if args else None).shape == ids.shape

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    step = sample_rollouts(
        engine, model, docs, step_cfg, generators=rollout_generators(11, "cpu"), train_model=model, need_hidden=True
    )
    handle.remove()
    with torch.no_grad():
        funcs, weights = builtin_reward_funcs("hybrid")
        rewards = score_rewards(funcs, weights, reward_rows(step, tokenizer, tail_tokens=8, need_hidden=True), "cpu")
        adv, _ = step_advantages(rewards, step_cfg)
    fwd = engine.forward_train(
        model, docs, step.plan, step.rollout.completion_ids, sampling_pass=step.rollout.sampling_pass
    )
    nll, count = masked_token_nll(fwd.doc_logps, docs.label_mask())
    pg, _ = ppo_clip_loss(fwd.rollout_logps, step.rollout.old_logps, adv)
    loss = nll / count + 0.2 * pg
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    outs[name] = (step, rewards, fwd, loss.detach(), grad)
    res[f"{name}_document_forwards"] = forwards["n"]
    res[f"{name}_seconds"] = round(time.time() - t0, 1)
a, ra, fa, la, ga = outs["fused"]
valid = mask[..., None]


def compare(prefix: str, other) -> dict:
    """The fused step against ``other``'s, keys ``prefix + name``."""
    b, rb, fb, lb, gb = other
    out = dict(
        positions_equal=bool(torch.equal(a.positions, b.positions)),
        rollout_ids_equal=bool(torch.equal(a.rollout.completion_ids, b.rollout.completion_ids)),
        scan_entropy_rel=rel(a.scan.entropy, b.scan.entropy),
        scan_logps_rel=rel(a.scan.logps, b.scan.logps),
        scan_hidden_rel=rel(a.scan.hidden_states * valid, b.scan.hidden_states * valid),
        old_logps_rel=rel(a.rollout.old_logps, b.rollout.old_logps),
        rollout_hidden_rel=rel(a.rollout.hidden_states, b.rollout.hidden_states),
        rewards_rel=rel(ra, rb),
        doc_logps_rel=rel(fa.doc_logps, fb.doc_logps),
        rollout_logps_rel=rel(fa.rollout_logps, fb.rollout_logps),
        loss_rel=rel(la, lb),
        grad_rel=rel(ga, gb),
    )
    return {prefix + key: value for key, value in out.items()}


res.update(sampling_pass_used=bool(a.rollout.sampling_pass.used), keeping_layer_calls=calls["layers"])
res.update(compare("", outs["snapshot"]))
if "twopass" in outs:  # the same engine and provider, the scan as its own no-grad forward
    res.update(compare("twopass_", outs["twopass"]))
print(json.dumps(res))
