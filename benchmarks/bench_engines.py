"""Wall time, tokens/s and peak memory of one optimizer step: NTP only vs the official procedure vs our engines.

DeltaNet with the 1.3B configuration (fla, random init, AdamW), n = 8, k = 5. For every precision (``weights``:
the model in ``--dtype``, as before; ``amp``: fp32 master weights under ``--dtype`` autocast, as users train and
as the release does) and every (L, G, documents) the variants run on the same documents; each is warmed up once and
timed over `--repeats` steps. Steps with phases (the official procedure, our engines) also record a per-phase time
breakdown (a device synchronisation at each phase end). Out-of-memory is recorded as such.

Variants: ``ntp`` (the NTP loss alone: the floor), ``official`` (the release's per-prefix procedure,
`official_procedure.py`), ``generic``, ``snapshot``, ``snapshot_ckpt``, ``snapshot_reuse``,
``snapshot_ckpt_reuse`` (our engines, docs/engines.md), ``onepass`` / ``onepass_reuse`` (the one-pass engine, for
models that compute states at given positions in one forward; fla models through readout tokens),
``onepass_boundary`` / ``onepass_boundary_reuse`` (the one-pass engine with ``states="boundary"``: fla DeltaNet's
states from the boundary-state kernel, no readout tokens), ``onepass_fused`` / ``onepass_boundary_fused`` (the
``_reuse`` variants with the fused scan, ``nsp_fuse_scan``: the scan's entropies from the loss's document pass).

    python benchmarks/bench_engines.py --out results.json                 # on a GPU, with fla installed
    python benchmarks/bench_engines.py --layers 2 --hidden 256 --lengths 1024 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from trl_refine.modeling_utils import ensure_fused_lm_head, score_tokens
from trl_refine.rollout import DocumentBatch, GenericEngine, OnePassEngine, RolloutPlan, SnapshotEngine
from trl_refine.selection import select_positions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_procedure import official_step  # noqa: E402

LACT_760M = dict(  # the published 760M config (research/lact.md §5), vocab of the Llama-2 tokenizer
    hidden_size=1536,
    num_attn_heads=24,
    num_hidden_layers=24,
    num_lact_heads=4,
    inter_multi=1,
    lact_chunk_size=2048,
    window_size=2048,
    w0_w2_low_rank=32,
    rope_theta=1e6,
    max_position_embeddings=32768,
    initializer_range=0.02,
)


def build_model(args, dtype: torch.dtype | None = None):
    """The benchmark's model in ``dtype`` (default: ``--dtype``), random init, train mode."""
    dtype = dtype or DTYPE
    if args.model == "lact":
        from trl_refine.models.lact import LaCTConfig, LaCTForCausalLM

        torch.manual_seed(0)
        model = (
            LaCTForCausalLM(LaCTConfig(**{**LACT_760M, "num_hidden_layers": args.layers}, vocab_size=args.vocab))
            .to(DEVICE, dtype)
            .train()
        )
        ensure_fused_lm_head(model)
        return model
    extra = {}
    if args.model == "reference":
        from trl_refine.models.delta_net import RefDeltaNetConfig as DeltaNetConfig
        from trl_refine.models.delta_net import RefDeltaNetForCausalLM as DeltaNetForCausalLM
    elif args.model == "gated":  # DeltaNet's shapes (heads of hidden/heads, K = V), with the gates
        from fla.models import GatedDeltaNetConfig as DeltaNetConfig
        from fla.models import GatedDeltaNetForCausalLM as DeltaNetForCausalLM

        extra = dict(head_dim=args.hidden // args.heads, expand_v=1)
    else:
        from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    cfg = DeltaNetConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_heads=args.heads,
        vocab_size=args.vocab,
        fuse_cross_entropy=False,
        **extra,
        **({"use_short_conv": False} if args.no_short_conv else {}),
    )
    torch.manual_seed(0)
    model = DeltaNetForCausalLM(cfg).to(DEVICE, dtype).train()
    ensure_fused_lm_head(model)
    return model


DEVICE, DTYPE = "cuda", torch.bfloat16


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "flash-linear-attention", "trl"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def documents(batch: int, length: int, vocab: int) -> DocumentBatch:
    g = torch.Generator().manual_seed(length * 31 + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return DocumentBatch(ids, torch.ones_like(ids)).to(DEVICE)


def ntp_step(model, opt, docs, n, g, k):
    logps, _, _ = score_tokens(model, docs.input_ids, docs.attention_mask, docs.label_mask())
    m = docs.label_mask()
    loss = -(logps.float() * m).sum() / m.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def refine_step(engine, mark=None, reuse: bool = False, fuse: bool = False):
    """One ReFINE step through ``engine`` (scan, selection, sampling + cosine reward, loss forward, backward, AdamW).
    ``mark(phase)``, if given, is called at the end of each phase (`profile_snapshot.py` times them). ``reuse``: the
    sampling segments run with gradients and serve the loss (the trainer's ``nsp_reuse_sampling_pass``); ``fuse``
    (with ``reuse``): the scan comes from that pass (``nsp_fuse_scan``, `OnePassEngine.fused_scan`)."""
    mark = mark or (lambda _phase: None)

    def step(model, opt, docs, n, g, k):
        pending = None
        if fuse:
            scan, pending = engine.fused_scan(model, docs, model)
            mark("fused scan (document pass with grad + head)")
        with torch.no_grad():
            if pending is None:
                scan = engine.scan(model, docs)
                mark("scan")
            pos = select_positions(
                scan.entropy,
                docs.attention_mask,
                num_chunks=n,
                rollout_length=k,
                margin=20,
                generator=torch.Generator(device=DEVICE).manual_seed(0),
            )
            plan = RolloutPlan(pos, g, k)
            mark("select")
            gen = torch.Generator(device=DEVICE).manual_seed(1)
            if pending is None:
                out = engine.generate(model, docs, plan, gen, train_model=model if reuse else None)
            else:
                out = engine.generate_fused(model, docs, plan, pending, gen)
            truth = plan.ground_truth_hidden(scan)
            reward = torch.nn.functional.cosine_similarity(out.hidden_states.float(), truth.float(), dim=-1).mean(-1)
            adv = (reward.view(-1, n * g) - reward.view(-1, n * g).mean(-1, keepdim=True)).flatten()
            mark("generate (document pass + decode) + reward")
        fwd = engine.forward_train(model, docs, plan, out.completion_ids, sampling_pass=out.sampling_pass)
        m = docs.label_mask()
        ntp = -(fwd.doc_logps.float() * m).sum() / m.sum()
        ratio = torch.exp(fwd.rollout_logps - out.old_logps)
        pg = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]).mean()
        loss = ntp + 0.2 * pg
        mark("forward_train (document pass + branch + head)")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")

    return step


def one_step_parser(out: str) -> argparse.ArgumentParser:
    """Arguments of the one-step scripts (`profile_snapshot.py`, `sync_sites.py`): the step's geometry and model."""
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model", default="fla")
    p.add_argument("--out", default=out)
    return p


class PhaseTimer:
    """``mark(phase)`` callback: seconds per phase, summed over the steps it saw (a device sync at each mark)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.t = None

    def start(self):
        sync()
        self.t = time.perf_counter()
        self.steps += 1

    def __call__(self, phase: str):
        if self.t is None:
            return
        sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.t
        self.t = now

    def reset(self):
        self.totals, self.steps, self.t = {}, 0, None

    def mean(self) -> dict[str, float]:
        return {name: total / max(self.steps, 1) for name, total in self.totals.items()}


def precision_context(precision: str):
    """``weights``: no autocast (the model is in ``--dtype``); ``amp``: ``--dtype`` autocast over fp32 weights."""
    if precision == "amp":
        return torch.autocast(device_type=torch.device(DEVICE).type, dtype=DTYPE)
    return contextlib.nullcontext()


def timed(step, model, opt, docs, n, g, k, repeats, precision="weights", phases: PhaseTimer | None = None):
    sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    with precision_context(precision):
        step(model, opt, docs, n, g, k)  # warm-up (Triton autotuning)
    sync()
    print(f"    warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = cpu = 0.0
    for _ in range(repeats):
        if phases is not None:
            phases.start()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with precision_context(precision):
            step(model, opt, docs, n, g, k)
        sync()
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
    seconds, cpu = seconds / repeats, cpu / repeats
    print(f"    {seconds:.3f} s/step wall, {cpu:.3f} s/step process CPU", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    return seconds, peak, cpu


#: variants compared with the NTP step in the ratios
REFINE_VARIANTS = (
    "official",
    "generic",
    "snapshot",
    "snapshot_ckpt",
    "snapshot_reuse",
    "snapshot_ckpt_reuse",
    "onepass",
    "onepass_reuse",
    "onepass_boundary",
    "onepass_boundary_reuse",
    "onepass_fused",
    "onepass_boundary_fused",
)


def make_steps(args) -> tuple[dict, dict[str, PhaseTimer]]:
    """The step function of every variant and the phase timer it reports to."""
    timers = {name: PhaseTimer() for name in REFINE_VARIANTS}
    engines = {
        "generic": (GenericEngine(rows_per_call=args.generic_rows_per_call), False),
        "snapshot": (SnapshotEngine(), False),
        "snapshot_ckpt": (SnapshotEngine(checkpoint_segments=True), False),
        "snapshot_reuse": (SnapshotEngine(), True),
        "snapshot_ckpt_reuse": (SnapshotEngine(checkpoint_segments=True), True),
        "onepass": (OnePassEngine(), False),
        "onepass_reuse": (OnePassEngine(), True),
        "onepass_boundary": (OnePassEngine(states="boundary"), False),
        "onepass_boundary_reuse": (OnePassEngine(states="boundary"), True),
        "onepass_fused": (OnePassEngine(), True),
        "onepass_boundary_fused": (OnePassEngine(states="boundary"), True),
    }
    steps = {"ntp": ntp_step, "official": official_step(mark=timers["official"])}
    for name, (engine, reuse) in engines.items():
        steps[name] = refine_step(engine, timers[name], reuse=reuse, fuse=name.endswith("_fused"))
    return steps, timers


def write_results(args, results, params):
    with open(args.out, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                "params": params,
                "versions": versions(),
                "args": vars(args),
                "results": results,
            },
            f,
            indent=2,
        )


def run_row(args, steps, timers, model, opt, precision, length, g, b, n, k) -> dict:
    docs = documents(b, length, args.vocab)
    row = {"precision": precision, "L": length, "G": g, "docs": b, "n": n, "k": k}
    for name in args.variants:
        if name in ("generic", "official") and b * n * g * length > args.skip_generic_above:
            row[name] = {"skipped": f"B·n·G·L = {b * n * g * length} above --skip-generic-above"}
            continue
        print(f"{precision} L={length} G={g} docs={b} {name} ...", flush=True)
        timer = timers.get(name)
        try:
            repeats = 1 if args.quick else (args.official_repeats if name == "official" else args.repeats)
            sec, mem, cpu = timed(steps[name], model, opt, docs, n, g, k, repeats, precision, timer)
            # process CPU seconds per step: equal to the wall time when the step is host-bound
            row[name] = {"s_per_step": sec, "tokens_per_s": b * length / sec, "peak_gib": mem, "cpu_s_per_step": cpu}
            if timer is not None and timer.steps:
                row[name]["phases_s"] = timer.mean()
        except (torch.cuda.OutOfMemoryError, MemoryError):
            opt.zero_grad(set_to_none=True)
            row[name] = {"oom": True}
        except RuntimeError as err:  # recorded, so that one failing variant does not lose the others
            opt.zero_grad(set_to_none=True)
            row[name] = {"error": str(err)[:500]}
            print(f"    ERROR {str(err)[:500]}", flush=True)
        finally:
            if timer is not None:
                timer.reset()
            model.train()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    base = row.get("ntp", {}).get("s_per_step")
    for name in REFINE_VARIANTS:
        if base and "s_per_step" in row.get(name, {}):
            row[name]["x_ntp_time"] = row[name]["s_per_step"] / base
            row[name]["x_ntp_mem"] = row[name]["peak_gib"] / row["ntp"]["peak_gib"] if DEVICE == "cuda" else None
    if "s_per_step" in row.get("generic", {}) and "s_per_step" in row.get("snapshot", {}):
        row["snapshot_speedup_vs_generic"] = row["generic"]["s_per_step"] / row["snapshot"]["s_per_step"]
    return row


def print_table(results, variants):
    cols = [v for v in variants]
    print("\n| precision | L | G | docs | " + " | ".join(f"{c} s (×NTP) [GiB]" for c in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for r in results:

        def cell(name, r=r):
            v = r.get(name, {})
            if "s_per_step" not in v:
                return "OOM" if v.get("oom") else ("error" if "error" in v else "skipped")
            out = f"{v['s_per_step']:.3f}" + (f" ({v['x_ntp_time']:.2f}×)" if "x_ntp_time" in v else "")
            return out + (f" [{v['peak_gib']:.1f}]" if v["peak_gib"] == v["peak_gib"] else "")

        print(f"| {r['precision']} | {r['L']} | {r['G']} | {r['docs']} | " + " | ".join(cell(c) for c in cols) + " |")
    for r in results:
        for name in variants:
            phases = r.get(name, {}).get("phases_s")
            if phases:
                text = ", ".join(f"{p} {s:.3f}" for p, s in phases.items())
                print(f"phases {r['precision']} L={r['L']} G={r['G']} docs={r['docs']} {name}: {text}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--rollouts", type=int, nargs="+", default=[1, 8])
    p.add_argument("--docs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--variants", nargs="+", default=["ntp", "generic", "snapshot", "snapshot_ckpt"])
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=["weights", "amp"],
        default=["weights", "amp"],
        help="weights: the model in --dtype; amp: fp32 master weights with --dtype autocast (each its own model)",
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--official-repeats", type=int, default=1, help="timed steps of the (slow) official procedure")
    p.add_argument("--generic-rows-per-call", type=int, default=8)
    p.add_argument(
        "--skip-generic-above",
        type=int,
        default=10**9,
        help="skip generic and official when B·n·G·L exceeds this",
    )
    p.add_argument("--out", default="bench_engines.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--model",
        choices=["fla", "gated", "reference", "lact"],
        default="fla",
        help="fla DeltaNet (GPU); fla GatedDeltaNet with DeltaNet's shapes, every variant (NTP included) through "
        "trl_refine's gated kernel (fla_gated_kernel='trl_refine': fla 0.6.0 refuses its gated backward on Hopper with "
        "triton < 3.7.1); our reference DeltaNet (CPU); or LaCT with the published 760M config (of the size options "
        "only --layers applies)",
    )
    p.add_argument(
        "--no-short-conv",
        action="store_true",
        help="DeltaNet / GatedDeltaNet without short convolutions (a CPU smoke under the Triton interpreter, which cannot "
        "run fla's conv backward from a cache); timings keep the default, with them",
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    unknown = sorted(set(args.variants) - {"ntp", *REFINE_VARIANTS})
    if unknown:
        p.error(f"unknown variants {unknown}; known: ntp {' '.join(REFINE_VARIANTS)}")
    global DEVICE, DTYPE
    DEVICE, DTYPE = args.device, getattr(torch, args.dtype)
    n, k = 8, 5
    steps, timers = make_steps(args)
    results = []
    params = None
    for precision in args.precisions:
        model = build_model(args, torch.float32 if precision == "amp" else DTYPE)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
        swap = contextlib.nullcontext()
        if args.model == "gated":
            from trl_refine.kernels.fla_gated_patch import use_trl_refine_gated_kernel

            swap = use_trl_refine_gated_kernel(model)
        with swap:
            for length in args.lengths:
                for g in args.rollouts:
                    for b in args.docs:
                        row = run_row(args, steps, timers, model, opt, precision, length, g, b, n, k)
                        results.append(row)
                        print(json.dumps(row), flush=True)
                        write_results(args, results, params)
        del model, opt
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print_table(results, args.variants)


if __name__ == "__main__":
    main()
