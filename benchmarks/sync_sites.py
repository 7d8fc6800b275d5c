"""Where the host-device synchronisations of one snapshot-engine step come from (DeltaNet 1.3B configuration, bf16).

    python benchmarks/sync_sites.py --length 8192 --rollouts 8 --docs 4 --out sync_sites.json

Runs one warm-up step, then one step of `bench_engines.refine_step` under ``torch.cuda.set_sync_debug_mode("warn")``:
PyTorch warns at every synchronising operation, and each warning's Python stack is reduced to its innermost frames
in fla, trl_refine, transformers and torch. Prints the call sites by count.
"""

from __future__ import annotations

import collections
import json
import time
import traceback
import warnings

import torch
from bench_engines import build_model, documents, one_step_parser, refine_step, sync

from trl_refine.rollout import SnapshotEngine

PACKAGES = ("/fla/", "/trl_refine/", "/transformers/", "/torch/")


def site(stack: list[traceback.FrameSummary]) -> str:
    frames = [f for f in stack if any(p in f.filename for p in PACKAGES) and "/warnings.py" not in f.filename]
    inner = frames[-4:] if frames else stack[-4:]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in reversed(inner))


def main() -> None:
    p = one_step_parser("sync_sites.json")
    args = p.parse_args()
    n, k = 8, 5
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    docs = documents(args.docs, args.length, args.vocab)
    step = refine_step(SnapshotEngine())
    t0 = time.perf_counter()
    step(model, opt, docs, n, args.rollouts, k)  # warm-up (compilation, autotuning)
    sync()
    print(f"warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    step(model, opt, docs, n, args.rollouts, k)
    sync()
    print(f"step {time.perf_counter() - t0:.3f}s", flush=True)
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[site(traceback.extract_stack()[:-1])] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            step(model, opt, docs, n, args.rollouts, k)
            torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    result = {"args": vars(args), "syncs": sum(sites.values()), "sites": sites.most_common()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['syncs']} synchronising operations in one step")
    for where, count in sites.most_common(15):
        print(f"{count:6d}  {where}")


if __name__ == "__main__":
    main()
