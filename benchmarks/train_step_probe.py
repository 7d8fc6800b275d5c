"""Time one pretraining step (forward + backward + AdamW) of ~100M-parameter fast-weight models on one GPU, at the
replication's pretraining shape (batch 32 x 1200 bytes, byte vocabulary), to size issue 13's GPU-size runs:
the reference DeltaNet (fp32 + TF32, pure PyTorch; run 3's base), fla DeltaNet and fla GatedDeltaNet (fp32 weights +
bf16 autocast; GatedDeltaNet through ``use_trl_refine_gated_kernel``, since fla refuses its gated backward on Hopper
with triton < 3.7.1, fla #640) and LaCT (bf16 autocast). Writes one JSON row per model.

    python benchmarks/train_step_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch


def build(kind: str, hidden: int, layers: int, heads: int):
    import trl_refine.models  # noqa: F401

    common = dict(vocab_size=384, hidden_size=hidden, num_hidden_layers=layers, pad_token_id=0, eos_token_id=1,
                  bos_token_id=None)  # fmt: skip
    if kind == "reference_delta_net":
        from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM

        return RefDeltaNetForCausalLM(RefDeltaNetConfig(**common, num_heads=heads))
    if kind in ("fla_delta_net", "fla_gated_deltanet"):
        from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        if kind == "fla_delta_net":
            return DeltaNetForCausalLM(DeltaNetConfig(**common, num_heads=heads, fuse_cross_entropy=False))
        return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**common, num_heads=heads, fuse_cross_entropy=False))
    if kind == "lact":
        from transformers import AutoModelForCausalLM

        from trl_refine.models.lact import LaCTConfig

        cfg = LaCTConfig(**common, num_attn_heads=heads, num_lact_heads=heads, lact_chunk_size=256, window_size=256)
        return AutoModelForCausalLM.from_config(cfg)
    raise ValueError(kind)


def probe(kind: str, hidden: int, layers: int, heads: int, batch: int, length: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build(kind, hidden, layers, heads).cuda().float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, 300, (batch, length), device="cuda")
    amp = kind != "reference_delta_net"
    swap = contextlib.nullcontext(0)
    if kind == "fla_gated_deltanet":
        from trl_refine.kernels.fla_gated_patch import use_trl_refine_gated_kernel

        swap = use_trl_refine_gated_kernel(model)
    before = [p.detach().clone() for p in model.parameters()]
    times, losses = [], []
    with swap:
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    return dict(
        model=kind,
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        batch=batch,
        length=length,
        s_per_step=round(sorted(times)[len(times) // 2], 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        max_weight_change=moved,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["reference_delta_net", "fla_delta_net", "fla_gated_deltanet", "lact"]
    )
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=1200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for kind in a.models:
        try:
            rows.append(probe(kind, a.hidden, a.layers, a.heads, a.batch, a.length, a.steps))
        except Exception as err:  # noqa: BLE001  (a probe: record the failure, go on with the next model)
            rows.append(dict(model=kind, error=f"{type(err).__name__}: {str(err)[:300]}"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps(rows[-1]), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
