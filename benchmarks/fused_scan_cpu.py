"""CPU wall and process-CPU time of one ReFINE step of the reference DeltaNet or LaCT (``--model lact``: hidden,
layers and heads as given, large chunks and window of ``--chunk``; fp32, random init, AdamW; n = 8, k = 5): the one-pass engine with the reused sampling pass, without (`bench_engines.py`'s ``onepass_reuse``: a no-grad
scan, then the document pass) and with the fused scan (``onepass_fused``: one document forward), the two steps
alternated so that the load of a shared machine falls on both alike; prints minima and medians as one JSON line
(on a loaded machine the minimum is the estimate least disturbed by the other processes).

    python benchmarks/fused_scan_cpu.py --length 1024 --docs 2 --rollouts 4
    python benchmarks/fused_scan_cpu.py --model lact --chunk 256 --length 1024 --docs 2 --rollouts 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_engines as be  # noqa: E402

from trl_refine.rollout import OnePassEngine  # noqa: E402


def build_lact(args):
    """A small LaCT (the 760M config's switches at the given sizes), fp32, train mode, with the fused LM head."""
    from trl_refine.modeling_utils import ensure_fused_lm_head
    from trl_refine.models.lact import LaCTConfig, LaCTForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attn_heads=args.heads)
    sizes.update(num_lact_heads=args.heads, lact_chunk_size=args.chunk, window_size=args.chunk, vocab_size=args.vocab)
    model = LaCTForCausalLM(LaCTConfig(**{**be.LACT_760M, **sizes})).float().train()
    ensure_fused_lm_head(model)
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("vocab", 4096), ("length", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("docs", 2), ("rollouts", 4), ("repeats", 5), ("threads", 2), ("chunk", 256)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--model", choices=["reference", "lact"], default="reference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    be.DEVICE, be.DTYPE = "cpu", torch.float32
    model = build_lact(args) if args.model == "lact" else be.build_model(args, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    docs = be.documents(args.docs, args.length, args.vocab)
    n, k = 8, 5
    steps = {
        "two_forwards": be.refine_step(OnePassEngine(), reuse=True),
        "fused": be.refine_step(OnePassEngine(), reuse=True, fuse=True),
    }
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(model, opt, docs, n, args.rollouts, k)  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opt, docs, n, args.rollouts, k)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    result = {
        name: {
            "wall_s_min": round(min(wall[name]), 3),
            "wall_s_median": round(statistics.median(wall[name]), 3),
            "cpu_s_min": round(min(cpu[name]), 3),
            "cpu_s_median": round(statistics.median(cpu[name]), 3),
            "wall_s": [round(x, 3) for x in wall[name]],
        }
        for name in steps
    }
    print(json.dumps({**result, "args": vars(args)}))


if __name__ == "__main__":
    main()
