"""One ReFINE step on the snapshot engine against one NTP step, per model family (docs/models.md's speed column).

    python benchmarks/families_speed.py [--out benchmarks/results/families_speed_cpu.json] [--families lfm2 ...]

Builds each family's tiny random model (`trl_refine.models.tiny_configs`), on CUDA in bf16 when there is a GPU, else
on the CPU in fp32, and times both steps on the same documents after one warm-up of each. Tiny models are
host-bound: the ratio counts model calls more than arithmetic. tests/gpu/test_gpu_families.py uses `step_times`.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch

from trl_refine.modeling_utils import ensure_fused_lm_head
from trl_refine.rollout import DocumentBatch, RolloutPlan
from trl_refine.rollout.registry import build_engine


def step_times(model, docs, n=4, g=4, k=8, repeats=3, engines=("snapshot",)) -> dict:
    """Wall time of one NTP step (forward + backward with labels) and of one ReFINE step per engine (the
    entropy scan, sampling, the loss forward with NTP + rollout terms, the backward), same documents, after one
    warm-up of each. Keys ``ntp_step_s``, ``<engine>_step_s`` and ``<engine>_over_ntp``."""
    ensure_fused_lm_head(model)
    device = docs.input_ids.device
    length = docs.input_ids.size(1)  # documents of equal length (no padding)
    pos = torch.tensor([[length * (j + 1) // (n + 1) for j in range(n)]] * docs.batch_size, device=device)
    plan = RolloutPlan(pos, g, k)
    labels = docs.input_ids.masked_fill(docs.attention_mask == 0, -100)

    def ntp():
        model(input_ids=docs.input_ids, attention_mask=docs.attention_mask, labels=labels).loss.backward()

    def refine(engine):
        with torch.no_grad():
            engine.scan(model, docs)
            out = engine.generate(model, docs, plan, torch.Generator(device=device).manual_seed(0), need_hidden=False)
        fwd = engine.forward_train(model, docs, plan, out.completion_ids)
        (fwd.doc_logps.float().sum() + fwd.rollout_logps.float().sum()).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps = [("ntp", ntp)] + [(name, functools.partial(refine, build_engine(name, model))) for name in engines]
    res = {}
    for name, fn in steps:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model.zero_grad()
            fn()
        sync()
        res[f"{name}_step_s"] = (time.perf_counter() - start) / repeats
    for name in engines:
        res[f"{name}_over_ntp"] = res[f"{name}_step_s"] / res["ntp_step_s"]
    cfg, dtype = model.config, str(next(model.parameters()).dtype).split(".")[-1]
    res["geometry"] = (
        f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {dtype}, documents {docs.lengths.tolist()}, "
        f"n={n} G={g} k={k}"
    )
    return res


def main() -> None:
    from transformers import AutoModelForCausalLM

    from trl_refine.models.tiny_configs import TRANSFORMERS_HYBRIDS, tiny_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=list(TRANSFORMERS_HYBRIDS))
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.set_num_threads(1)
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or 'x86_64'}), 1 thread"
    }
    for family in args.families:
        torch.manual_seed(0)
        config = tiny_config(family, vocab_size=512, hidden_size=128, layers=2, heads=2)
        model = AutoModelForCausalLM.from_config(config).to(device, dtype)
        ids = torch.randint(3, 512, (2, args.length), generator=torch.Generator().manual_seed(0)).to(device)
        docs = DocumentBatch(ids, torch.ones_like(ids))
        results[family] = step_times(model, docs, repeats=2, engines=("snapshot", "generic"))
        print(family, {k: round(v, 4) if isinstance(v, float) else v for k, v in results[family].items()}, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
