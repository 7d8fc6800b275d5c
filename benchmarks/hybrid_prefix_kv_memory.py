"""Peak memory of one ReFINE step on a transformers hybrid with the prefix's attention K/V shared between the G
branches of a prefix, against copying it per branch (``TransformersHybridStateAdapter(share_prefix_kv=...)``).

The same step and the same two peaks as `benchmarks/lact_window_memory.py` (whose helpers it uses): the sampling pass
with gradients, the k decode steps, the loss forward reusing that pass, the backward; each variant in a fresh process;
``tensor_peak_mib`` from the torch profiler's allocation events, ``rss_peak_mib`` from ``ru_maxrss``.

    OMP_NUM_THREADS=1 python benchmarks/hybrid_prefix_kv_memory.py --out benchmarks/results/hybrid_prefix_kv_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lact_window_memory import parity, rss_mib, run_json, tensor_peak_bytes  # noqa: E402

from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.models.tiny_configs import tiny_config  # noqa: E402
from trl_refine.rollout import DocumentBatch, RolloutPlan, SnapshotEngine  # noqa: E402
from trl_refine.rollout.adapters.transformers_hybrid import TransformersHybridStateAdapter  # noqa: E402


def setup(args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(
        args.model_type, vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers, heads=args.heads
    )
    model = AutoModelForCausalLM.from_config(config).float().train()
    ensure_fused_lm_head(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.docs, args.length), generator=g)
    docs = DocumentBatch(ids, torch.ones_like(ids))
    pos = torch.linspace(args.length // (args.chunks + 1), args.length - args.rollout_length - 1, args.chunks)
    plan = RolloutPlan(pos.long().repeat(args.docs, 1), args.rollouts, args.rollout_length)
    return model, docs, plan


def step(model, docs, plan, share: bool):
    engine = SnapshotEngine(adapter=TransformersHybridStateAdapter(model.config, share_prefix_kv=share))
    with torch.no_grad():
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5), train_model=model)
    fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
    mask = docs.label_mask()
    adv = torch.linspace(-1, 1, plan.num_rows)
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, fwd, grad


def measure(args, share: bool) -> tuple[dict, dict]:
    model, docs, plan = setup(args)
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out, fwd, grad = step(model, docs, plan, share)
        row = {"tensor_peak_mib": tensor_peak_bytes(prof) / 2**20}
    else:
        rss0 = rss_mib()
        cpu0, t0 = time.process_time(), time.perf_counter()
        out, fwd, grad = step(model, docs, plan, share)
        row = {
            "wall_s": time.perf_counter() - t0,
            "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
            "cpu_s": time.process_time() - cpu0,
        }
    tensors = {"ids": out.completion_ids, "logps": out.old_logps, "hidden": out.hidden_states,
               "rollout_logps": fwd.rollout_logps.detach(), "grad": grad}  # fmt: skip
    return {"variant": "share" if share else "copy", **row}, {k: v.float() for k, v in tensors.items()}


def prefix_kv_mib(args, model_config, copies: int) -> float:
    """Bytes of ``copies`` prefix K/V (every attention layer, the longest prefix) in float32."""
    layers = sum(1 for t in model_config.layer_types if t in ("full_attention", "attention"))
    layers = layers or model_config.num_hidden_layers  # falcon_h1: attention in every layer
    kv_heads = model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or args.hidden // args.heads
    return copies * layers * 2 * kv_heads * args.length * head_dim * 4 / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-type", default="lfm2")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="alternating recurrent / attention")
    p.add_argument("--heads", type=int, default=8, help="attention heads (K/V heads: half)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--rollout-length", type=int, default=5)
    p.add_argument("--variant", choices=["copy", "share"], help=argparse.SUPPRESS)
    p.add_argument("--tensors", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.variant:
        row, tensors = measure(args, args.variant == "share")
        if args.tensors:
            torch.save(tensors, args.tensors)
        print(json.dumps(row))
        return
    rows, outputs = [], {}
    for variant in ("copy", "share"):  # fresh processes: the resident set of one variant must not carry the other's
        tensors = f"/tmp/hybrid_prefix_kv_memory_{os.getpid()}_{variant}.pt"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--tensors", tensors]
        if "--out" in cmd:
            i = cmd.index("--out")
            del cmd[i : i + 2]
        row = run_json(cmd)
        outputs[variant] = torch.load(tensors)
        os.remove(tensors)
        row.update(run_json([*cmd[:-2], "--profile"]))  # the profiler's own memory would show in the RSS
        rows.append(row)
    model_config = setup(args)[0].config
    num_rows = args.docs * args.chunks * args.rollouts
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("variant", "tensors", "out", "profile")},
        "branch_rows": num_rows,
        "prefix_kv_mib_at_full_length": {
            "copied": prefix_kv_mib(args, model_config, num_rows),
            "shared": prefix_kv_mib(args, model_config, num_rows // args.rollouts),
        },
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": rows,
        "parity_share_vs_copy": parity(outputs["share"], outputs["copy"]),
    }
    print(json.dumps(result, indent=2))
    print(f"shared / copied tensor_peak_mib: {rows[1]['tensor_peak_mib'] / rows[0]['tensor_peak_mib']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
