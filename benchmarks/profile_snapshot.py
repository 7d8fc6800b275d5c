"""Where the time of one snapshot-engine step goes (torch.profiler), DeltaNet 1.3B configuration, bf16.

    python benchmarks/profile_snapshot.py --length 8192 --rollouts 8 --docs 4 --out profile.json

Times each phase of `bench_engines.refine_step` (the benchmark's step) separately (scan, selection, sampling
segments + decoding + reward, training segments + branch, backward, optimizer), then profiles one whole step and reports the host (CPU) and device (CUDA) totals, the number of kernel
launches and of host-device synchronisations, and the top operators by self CPU time.
"""

from __future__ import annotations

import json
import time

import torch
from bench_engines import build_model, documents, one_step_parser, refine_step, sync

from trl_refine.rollout import SnapshotEngine


def phases(model, opt, engine, docs, n, g, k, reuse=False) -> dict[str, float]:
    """Seconds per phase of one `bench_engines.refine_step` (synchronising at each phase boundary)."""
    t = {}
    last = [time.perf_counter()]

    def mark(name):
        sync()
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - last[0]
        last[0] = now

    refine_step(engine, mark, reuse=reuse)(model, opt, docs, n, g, k)
    return t


def main():
    p = one_step_parser("profile_snapshot.json")
    p.add_argument(
        "--reuse", action="store_true", help="reuse the sampling pass for the loss (nsp_reuse_sampling_pass)"
    )
    args = p.parse_args()
    n, k = 8, 5
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    engine = SnapshotEngine()
    docs = documents(args.docs, args.length, args.vocab)
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    t0 = time.perf_counter()
    phases(model, opt, engine, docs, n, args.rollouts, k, args.reuse)  # warm-up (compilation)
    print(f"warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    calls["n"] = 0
    timing = phases(model, opt, engine, docs, n, args.rollouts, k, args.reuse)
    model_calls = calls["n"]
    print(json.dumps({"phase_seconds": timing, "model_calls_per_step": model_calls}), flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        phases(model, opt, engine, docs, n, args.rollouts, k, args.reuse)
        sync()
    events = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in events) / 1e6
    cuda_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    syncs = {
        e.key: e.count
        for e in events
        if any(s in e.key for s in ("Synchronize", "cudaMemcpy", "aten::item", "aten::_local_scalar_dense"))
    }
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    result = {
        "device": torch.cuda.get_device_name(0),
        "args": vars(args),
        "phase_seconds": timing,
        "step_seconds": sum(timing.values()),
        "model_calls_per_step": model_calls,
        "profiled_self_cpu_s": cpu_total,
        "profiled_self_cuda_s": cuda_total,
        "kernel_launches": launches,
        "sync_ops": syncs,
        "top_self_cpu": [
            {
                "op": e.key,
                "count": e.count,
                "self_cpu_s": e.self_cpu_time_total / 1e6,
                "self_cuda_s": getattr(e, "self_device_time_total", 0) / 1e6,
            }
            for e in top
        ],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "top_self_cpu"}, indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
