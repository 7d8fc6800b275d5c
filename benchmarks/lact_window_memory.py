"""Peak memory of one LaCT ReFINE step with the attention window shared between the G branches of a prefix, against
copying it per branch (``LaCTStateAdapter(share_prefix_kv=...)``).

One step as the trainer runs it by default: the sampling pass with gradients (`SnapshotEngine.generate` with
``train_model``), the k decode steps, the loss forward reusing that pass, the backward. Each variant runs in a fresh
process; two peaks are reported:

* ``tensor_peak_mib``: the peak of live tensor bytes over the step above what was live before it, from the torch
  profiler's allocation events (exact, independent of the allocator);
* ``rss_peak_mib``: the process's peak resident set (``ru_maxrss``) minus its resident set before the step.

    OMP_NUM_THREADS=1 python benchmarks/lact_window_memory.py --out benchmarks/results/lact_window_memory_cpu.json

``--device cuda`` reports ``torch.cuda.max_memory_allocated`` instead (tests/gpu/test_gpu_lact_shared_window.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_refine.modeling_utils import ensure_fused_lm_head  # noqa: E402
from trl_refine.models.lact import LaCTConfig, LaCTForCausalLM  # noqa: E402
from trl_refine.rollout import DocumentBatch, RolloutPlan, SnapshotEngine  # noqa: E402
from trl_refine.rollout.state import LaCTStateAdapter  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def setup(args, device: str):
    torch.manual_seed(0)
    cfg = LaCTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attn_heads=args.heads,
        num_lact_heads=args.lact_heads,
        lact_chunk_size=args.window,
        window_size=args.window,
        w0_w2_low_rank=args.low_rank,
    )
    model = LaCTForCausalLM(cfg).to(device).train()
    ensure_fused_lm_head(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.docs, args.length), generator=g)
    docs = DocumentBatch(ids, torch.ones_like(ids)).to(device)
    # n positions spread over the document, each with room for the rollout
    pos = torch.linspace(args.length // (args.chunks + 1), args.length - args.rollout_length - 1, args.chunks)
    plan = RolloutPlan(pos.long().repeat(args.docs, 1).to(device), args.rollouts, args.rollout_length)
    return model, docs, plan


def step(model, docs, plan, share: bool):
    engine = SnapshotEngine(adapter=LaCTStateAdapter(share_prefix_kv=share))
    with torch.no_grad():
        out = engine.generate(model, docs, plan, torch.Generator().manual_seed(5), train_model=model)
    fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
    mask = docs.label_mask()
    adv = torch.linspace(-1, 1, plan.num_rows, device=mask.device)
    loss = -(fwd.doc_logps * mask).sum() / mask.sum() - (adv[:, None] * fwd.rollout_logps).mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, fwd, grad


def tensor_peak_bytes(prof) -> int:
    """Peak of the running sum of the profiler's allocation (+) and free (-) events, in time order."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(args, share: bool) -> tuple[dict, dict]:
    """One variant in this process: its peaks and its outputs (ids, log-probs, hidden states, gradient)."""
    model, docs, plan = setup(args, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out, fwd, grad = step(model, docs, plan, share)
        torch.cuda.synchronize()
        row = {
            "wall_s": time.perf_counter() - t0,
            "cuda_peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
        }
    elif args.profile:
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
    return {"variant": "share" if share else "copy", **row}, {k: v.float().cpu() for k, v in tensors.items()}


def parity(share: dict, copy: dict) -> dict:
    """Rollout ids equal, and the relative differences of the rest (shared window against copied)."""

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()

    return {
        "rollout_ids_equal": bool(torch.equal(share["ids"], copy["ids"])),
        **{f"{key}_rel": rel(share[key], copy[key]) for key in ("logps", "hidden", "rollout_logps", "grad")},
    }


def run_json(cmd: list[str]) -> dict:
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def window_mib(args, copies: int) -> float:
    """Bytes of ``copies`` per-row attention windows (K and V, every layer) in float32."""
    head_dim = args.hidden // args.heads
    return copies * args.layers * 2 * args.heads * (args.window - 1) * head_dim * 4 / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--lact-heads", type=int, default=2)
    p.add_argument("--low-rank", type=int, default=-1, help="w0_w2_low_rank (-1: full rank)")
    p.add_argument("--window", type=int, default=512, help="window_size = lact_chunk_size")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--rollout-length", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=["copy", "share"], help=argparse.SUPPRESS)
    p.add_argument("--tensors", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    return p.parse_args(argv)


def summary(args, rows: list[dict], outputs: dict) -> dict:
    num_rows = args.docs * args.chunks * args.rollouts
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("variant", "tensors", "out", "profile")},
        "branch_rows": num_rows,
        "windows_mib": {"copied": window_mib(args, num_rows), "shared": window_mib(args, num_rows // args.rollouts)},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "variants": rows,
        "parity_share_vs_copy": parity(outputs["share"], outputs["copy"]),
    }


def main() -> None:
    args = parse_args()
    if args.variant:
        row, tensors = measure(args, args.variant == "share")
        if args.tensors:
            torch.save(tensors, args.tensors)
        print(json.dumps(row))
        return
    rows, outputs = [], {}
    for variant in ("copy", "share"):
        if args.device == "cuda":
            row, outputs[variant] = measure(args, variant == "share")
        else:  # fresh processes: the resident set of one variant must not carry the other's
            tensors = f"/tmp/lact_window_memory_{os.getpid()}_{variant}.pt"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--tensors", tensors]
            if "--out" in cmd:
                i = cmd.index("--out")
                del cmd[i : i + 2]
            row = run_json(cmd)
            outputs[variant] = torch.load(tensors)
            os.remove(tensors)
            row.update(run_json([*cmd[:-2], "--profile"]))  # the profiler's own memory would show in the RSS
        rows.append(row)
    result = summary(args, rows, outputs)
    print(json.dumps(result, indent=2))
    key = "cuda_peak_mib" if args.device == "cuda" else "tensor_peak_mib"
    print("variant | " + " | ".join(k for k in rows[0] if k != "variant"))
    for r in rows:
        print(r["variant"] + " | " + " | ".join(f"{v:.1f}" for k, v in r.items() if k != "variant"))
    print(f"shared / copied {key}: {rows[1][key] / rows[0][key]:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
