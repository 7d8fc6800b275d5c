"""ReFINE vs next-token prediction, controlled, at small scale: pretrain once, then every arm from that checkpoint.

    python experiments/replication/replicate.py --config experiments/replication/configs/cpu.yaml --out runs/cpu
    python experiments/replication/replicate.py --config .../smoke.yaml --out /tmp/smoke      # CI: seconds

Phases (``--phases``, default all): ``pretrain`` (NTP from scratch, plain PyTorch; stops when a *validation* set,
not the test grid, is neither at 0 nor saturated), ``midtrain`` (arms ``ntp``, ``refine_cosine``, ``refine_exact``
through NSPGRPOTrainer, plus ``ntp_equal_time``: NTP for the CPU seconds the cosine arm took), ``posttrain`` (arms
``sft``, ``nested_sft``, ``nested`` through NSPPostTrainer), ``testtime`` (arms ``none``, ``sft``, ``refine``
through TestTimeRefine), ``report`` (tables, plot). Each (phase, arm, seed) writes ``<out>/<phase>/<arm>/seed<k>.json``
and is skipped when that file exists, so a run resumes and arms can be split over processes (``--arms``).
The protocol (held-out sets, seeds, budgets, metrics) is in README.md beside this file and fixed in the YAML.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

log = logging.getLogger("replication")
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

PHASES = ("pretrain", "midtrain", "posttrain", "testtime", "report")
MIDTRAIN_ARMS = ("ntp", "refine_cosine", "refine_exact", "ntp_equal_time")
POSTTRAIN_ARMS = ("sft", "nested_sft", "nested")
TESTTIME_ARMS = ("none", "sft", "refine")


# ------------------------------------------------------------------------------------------------ model / data
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def new_model(cfg: dict, tok, device: str):
    """The reference DeltaNet (pure PyTorch) or, on CUDA with ``model.kind: fla_*``, an fla model of the same shape."""
    import trl_refine.models  # noqa: F401

    m = cfg["model"]
    common = dict(
        vocab_size=len(tok),
        hidden_size=m["hidden_size"],
        num_hidden_layers=m["layers"],
        num_heads=m["heads"],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    kind = m.get("kind", "refine_delta_net")
    if kind == "refine_delta_net":
        from trl_refine.models.delta_net import RefDeltaNetConfig as config_class
    elif kind in ("fla_delta_net", "fla_gated_deltanet"):
        from fla.models import DeltaNetConfig, GatedDeltaNetConfig

        config_class = DeltaNetConfig if kind == "fla_delta_net" else GatedDeltaNetConfig
        common["fuse_cross_entropy"] = False
    elif kind == "lact_swiglu":
        from trl_refine.models.lact import LaCTConfig

        heads = common.pop("num_heads")
        chunk = m.get("lact_chunk_size", 256)
        return _init(
            LaCTConfig(**common, num_attn_heads=heads, num_lact_heads=heads, lact_chunk_size=chunk, window_size=chunk),
            device,
        )
    else:
        raise ValueError(f"model.kind={kind!r}: use refine_delta_net, fla_delta_net, fla_gated_deltanet, lact_swiglu")
    return _init(config_class(**common), device)


def _init(config, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).to(device)


def load_model(path: str, device: str):
    from transformers import AutoModelForCausalLM

    import trl_refine.models  # noqa: F401

    with contextlib.suppress(ImportError):
        import fla  # noqa: F401  (registers fla's model types when present)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def check_fla_device(device: str) -> None:
    """fla's Triton kernels need a GPU, or the Triton interpreter on CPU (slow: tiny shapes only)."""
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            f"an fla GatedDeltaNet on device {device!r} runs fla's Triton kernels: use --device cuda, or set "
            "TRITON_INTERPRET=1 on CPU (the Triton interpreter; slow, tiny shapes only: run the script through "
            "experiments/replication/interpret.py, which also keeps one configuration per autotuner)"
        )


def base_folder(cfg: dict, out: str) -> str | None:
    """The saved base the phases will load: ``<out>/pretrain/base``, else ``pretrain.checkpoint`` (relative paths
    from the repository root), if it holds a ``config.json``."""
    src = cfg["pretrain"].get("checkpoint")
    for folder in (base_path(out), src and (src if os.path.isabs(src) else os.path.join(REPO, src))):
        if folder and os.path.exists(os.path.join(folder, "config.json")):
            return folder
    return None


def model_type(cfg: dict, out: str) -> str:
    """The ``model_type`` of the model the phases load: the saved base's when there is one, else ``model.kind``'s."""
    folder = base_folder(cfg, out)
    if folder:
        return read_json(os.path.join(folder, "config.json")).get("model_type", "?")
    kind = cfg["model"].get("kind", "refine_delta_net")
    return {"fla_gated_deltanet": "gated_deltanet", "fla_delta_net": "delta_net"}.get(kind, kind)


def gated_kernel(cfg: dict, out: str, device: str, tok) -> contextlib.AbstractContextManager:
    """``model.gated_kernel``: the kernel an fla GatedDeltaNet's layers run for the whole process (every phase, each
    step with its backward, evaluation included), with the library's choices (``fla_gated_kernel``,
    trl_refine/kernels/fla_gated_choice.py): ``fla`` (its own), ``trl_refine`` (``use_trl_refine_gated_kernel``: the
    same math by our gated kernel, whose backward fla 0.6.0 does not refuse; docs/faithfulness.md) or ``auto``.
    Default here ``trl_refine``: fla refuses its own gated backward on Hopper with triton < 3.7.1 (fla #640), and its
    chunk op does not run under the CPU interpreter. Other models: nothing to swap; ``trl_refine`` is refused."""
    from trl_refine.kernels.fla_gated_choice import (
        FLA_GATED_KERNELS,
        fla_gated_kernel_block,
        resolve_fla_gated_kernel,
    )

    kind = model_type(cfg, out)
    choice = cfg["model"].get("gated_kernel")
    if choice is not None and choice not in FLA_GATED_KERNELS:
        raise SystemExit(f"model.gated_kernel={choice!r}: choose one of {', '.join(FLA_GATED_KERNELS)}")
    if kind != "gated_deltanet":
        if choice == "trl_refine":
            raise SystemExit(
                f"model.gated_kernel=trl_refine needs an fla GatedDeltaNet, but the model is {kind!r}: drop the field"
            )
        return contextlib.nullcontext()
    check_fla_device(device)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = base_folder(cfg, out)
    with torch.device("meta"):  # the architecture alone (no weights), for the choice's check of its layers
        if folder:
            import fla  # noqa: F401  (registers fla's model types)

            shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        else:
            shape = new_model(cfg, tok, "meta")
    kernel = resolve_fla_gated_kernel(choice or "trl_refine", shape, device)
    log.info(
        "fla GatedDeltaNet on %s: every phase runs %s (model.gated_kernel=%s)",
        device,
        "through trl_refine's gated kernel (use_trl_refine_gated_kernel; fla 0.6.0 refuses its own gated backward "
        "on Hopper with triton < 3.7.1, fla #640)"
        if kernel == "trl_refine"
        else "fla's own gated kernel",
        choice or "trl_refine (default)",
    )
    return fla_gated_kernel_block(kernel, shape)


def encode_documents(texts: list[str], tok) -> list[list[int]]:
    return [ids + [tok.eos_token_id] for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def padded(batch: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids.to(device), mask.to(device)


def autocast(device: str):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )


# ------------------------------------------------------------------------------------------------ evaluation
class HeldOut:
    """The held-out sets, built once from the YAML before any arm runs (no arm trains on held-out text)."""

    def __init__(self, cfg: dict, tok):
        e = cfg["eval"]
        self.grid = tasks.eval_grid(lengths=e["lengths"], depths=e["depths"], per_cell=e["per_cell"], seed=e["seed"])
        t = cfg["testtime"]
        self.testtime = tasks.eval_grid(
            lengths=e["lengths"], depths=e["depths"], per_cell=t["per_cell"], seed=e["seed"] + 1
        )
        docs = tasks.mixed_examples(
            e["ntp_documents"], split="held_out", seed=e["seed"] + 2, lengths=cfg["data"]["train_lengths"]
        )
        self.ntp_docs = encode_documents([d["prompt"] + " " + tasks.answer_text(d["answer"]) for d in docs], tok)
        self.batch_size = e.get("batch_size", 8)


def ntp_loss(model, docs: list[list[int]], pad: int, device: str, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats/token) over the documents, pads excluded."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for i in range(0, len(docs), batch_size):
            ids, mask = padded(docs[i : i + batch_size], pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += nll[keep].sum().item()
            count += int(keep.sum())
    return total / max(count, 1)


def task_scores(model, tok, ds, device: str, batch_size: int, adapt=None) -> dict[str, Any]:
    """Greedy answers scored by RULER's string_match_all (×100): per task, per length, per depth, and the mean."""
    from trl_refine.eval import evaluate

    model.eval()
    with autocast(device):
        res = evaluate(
            model, tok, ds, "niah", max_new_tokens=40, batch_size=batch_size, adapt=adapt, show_progress=False
        )
    by: dict[str, dict[str, list[float]]] = {"task": {}, "length": {}, "depth": {}}
    for ex, row in zip(res["examples"], ds):
        for key, value in (("task", row["task"]), ("length", row["length"]), ("depth", row["depth"])):
            by[key].setdefault(str(value), []).append(100.0 * ex["score"])
    mean = {k: {v: sum(s) / len(s) for v, s in d.items()} for k, d in by.items()}
    niah = [v for k, v in mean["task"].items() if k.startswith("niah_")]
    return {
        "niah_avg": sum(niah) / len(niah),
        "doc_qa": mean["task"].get("doc_qa"),
        "all": 100.0 * res["score"],
        **{f"by_{k}": v for k, v in mean.items()},
        "seconds": res["seconds"],
        "predictions": [e["prediction"] for e in res["examples"]][:12],
    }


def evaluate_model(model, tok, held: HeldOut, device: str, ntp: bool = True) -> dict[str, Any]:
    out = task_scores(model, tok, held.grid, device, held.batch_size)
    if ntp:
        out["heldout_ntp_loss"] = ntp_loss(model, held.ntp_docs, tok.pad_token_id, device, held.batch_size)
    return out


# ------------------------------------------------------------------------------------------------ phases
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def ntp_train(
    model,
    docs: list[list[int]],
    *,
    steps: int | None,
    batch: int,
    lr: float,
    warmup: int,
    device: str,
    seed: int,
    cpu_seconds: float | None = None,
    max_seconds: float | None = None,
    weight_decay: float = 0.0,
    log_every: int = 50,
    on_eval=None,
    eval_every: int | None = None,
) -> dict[str, Any]:
    """Plain next-token training (pretraining, and the equal-time NTP arm): AdamW, linear warmup, clip 1.0,
    fp32 weights (+ bf16 autocast on CUDA). Stops after ``steps``, ``cpu_seconds`` of process CPU time or
    ``max_seconds`` of wall time, whichever comes first."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    rng = random.Random(seed)
    order: list[int] = []
    pad = 0
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    step, history = 0, []
    while (
        (steps is None or step < steps)
        and (cpu_seconds is None or time.process_time() - t_cpu < cpu_seconds)
        and (max_seconds is None or time.perf_counter() - t_wall < max_seconds)
    ):
        if callable(docs):  # a stream: fresh documents every step
            chosen = docs(batch)
        else:
            if len(order) < batch:
                perm = list(range(len(docs)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:batch], order[batch:]
            chosen = [docs[i] for i in idx]
        model.train()
        ids, mask = padded(chosen, pad, device)
        labels = ids.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        with autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"NTP loss {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0:
            history.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t_wall})
            log.info("ntp step %d loss %.4f", step, loss.item())
        if on_eval is not None and eval_every and step % eval_every == 0 and on_eval(step):
            break
    return {
        "steps": step,
        "wall_s": time.perf_counter() - t_wall,
        "cpu_s": time.process_time() - t_cpu,
        "history": history,
    }


class DocumentStream(torch.utils.data.IterableDataset):
    """`tasks.pretraining_stream` as a dataset; each DataLoader worker draws its own stream (seed, worker)."""

    def __init__(self, p: dict, cfg: dict, lengths):
        self.p, self.cfg, self.lengths = p, cfg, lengths

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        return tasks.pretraining_stream(
            self.p["seed"] * 1000 + worker,
            lengths=self.lengths,
            dense_fraction=self.p["dense_fraction"],
            qa_fraction=self.cfg["data"]["qa_fraction"],
            essay_fraction=self.cfg["data"]["essay_fraction"],
        )


def import_base(cfg: dict, out: str, device: str, held: HeldOut, tok, src: str) -> None:
    """Start from a given base checkpoint instead of pretraining (run 2: ``pretrain.checkpoint`` or ``--base``):
    copy it to ``<out>/pretrain/base`` (unless the weights are there already) and score it on the held-out sets."""
    path = base_path(out)
    if not os.path.isabs(src):
        src = os.path.join(REPO, src)
    if not os.path.exists(os.path.join(src, "config.json")):
        raise SystemExit(f"base checkpoint {src}: no config.json (pass a folder written by save_pretrained)")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        shutil.copytree(src, path, dirs_exist_ok=True)
    model = load_model(path, device)
    build = (
        read_json(os.path.join(src, "build_log.json")) if os.path.exists(os.path.join(src, "build_log.json")) else {}
    )
    curve = build.get("curve", [])
    result = {
        "params": sum(x.numel() for x in model.parameters()),
        "source": os.path.relpath(src, REPO) if src.startswith(REPO) else src,
        "train": {
            "steps": curve[-1]["step"] if curve else None,
            "wall_s": 60 * curve[-1]["minutes"] if curve else None,
            "build": {k: build[k] for k in ("config", "result", "arguments") if k in build},
        },
        "validation_curve": curve,
        "eval_device": device,
        "eval": evaluate_model(model, tok, held, device),
    }
    write_json(os.path.join(path, "result.json"), result)


def phase_pretrain(cfg: dict, out: str, device: str, held: HeldOut, tok) -> None:
    path = os.path.join(out, "pretrain", "base")
    if os.path.exists(os.path.join(path, "result.json")):
        result = read_json(os.path.join(path, "result.json"))
        if result.get("eval_device") != device:  # e.g. pretrained on a GPU, arms on CPUs: the base is scored there
            model = load_model(path, device)
            result.setdefault("eval_by_device", {})[result.get("eval_device", "?")] = result["eval"]
            result["eval"], result["eval_device"] = evaluate_model(model, tok, held, device), device
            write_json(os.path.join(path, "result.json"), result)
        return
    p = cfg["pretrain"]
    if p.get("checkpoint"):
        return import_base(cfg, out, device, held, tok, p["checkpoint"])
    if "checkpoint" in p:  # `checkpoint: null`: the YAML starts from a base made elsewhere
        raise SystemExit(f"{cfg['name']}: pretrain.checkpoint is null: pass the base with --base <folder>")
    seed_everything(p["seed"])
    model = new_model(cfg, tok, device)
    lengths = p.get("lengths", cfg["data"]["train_lengths"])
    if p.get("stream"):  # distinct documents every step (nothing to memorise), dense retrieval ones among them
        batches = iter(
            torch.utils.data.DataLoader(
                DocumentStream(p, cfg, lengths),
                batch_size=p["batch"],
                collate_fn=lambda texts: encode_documents(texts, tok),
                num_workers=p.get("workers", 0),  # generation keeps up with a GPU only with several workers
            )
        )

        def docs(n: int) -> list[list[int]]:
            return next(batches)
    else:
        examples = tasks.mixed_examples(
            p["documents"],
            split="train",
            seed=p["seed"],
            lengths=lengths,
            qa_fraction=cfg["data"]["qa_fraction"],
            essay_fraction=cfg["data"]["essay_fraction"],
        )
        docs = encode_documents(tasks.documents(examples)["text"], tok)
    # the stopping rule reads a *validation* set from the train text (never the held-out grid)
    val = tasks.qa_dataset(
        tasks.mixed_examples(
            p["val_examples"], split="train", seed=p["seed"] + 999, lengths=cfg["data"]["train_lengths"]
        ),
        train=False,
    )
    curve = []

    def on_eval(step: int) -> bool:
        score = task_scores(model, tok, val, device, held.batch_size)["all"]
        curve.append({"step": step, "val_score": score})
        log.info("pretrain step %d validation score %.1f", step, score)
        return score >= p["stop_val_score"]

    n_params = sum(x.numel() for x in model.parameters())
    log.info("pretraining %s (%.2fM params)", cfg["model"].get("kind", "refine_delta_net"), n_params / 1e6)
    train = ntp_train(
        model,
        docs,
        steps=p["max_steps"],
        batch=p["batch"],
        lr=p["lr"],
        warmup=p["warmup"],
        device=device,
        seed=p["seed"],
        on_eval=on_eval,
        eval_every=p["eval_every"],
        max_seconds=p.get("max_seconds"),
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    result = {
        "params": n_params,
        "train": train,
        "validation_curve": curve,
        "eval_device": device,
        "eval": evaluate_model(model, tok, held, device),
    }
    write_json(os.path.join(path, "result.json"), result)


def base_path(out: str) -> str:
    return os.path.join(out, "pretrain", "base")


def result_path(out: str, phase: str, arm: str, seed: int) -> str:
    return os.path.join(out, phase, arm, f"seed{seed}.json")


def _grpo_common(cfg_phase: dict, device: str, seed: int, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir,
        max_steps=cfg_phase["steps"],
        learning_rate=cfg_phase["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        documents_per_device=cfg_phase.get("documents_per_device", 1),
        gradient_accumulation_steps=1,
        nsp_num_chunks=cfg_phase["nsp_num_chunks"],
        nsp_rollout_length=cfg_phase["nsp_rollout_length"],
        nsp_num_rollouts=cfg_phase.get("nsp_num_rollouts", 1),
        nsp_margin=cfg_phase["nsp_margin"],
        use_cpu=not device.startswith("cuda"),
        bf16=device.startswith("cuda"),
        logging_steps=max(1, cfg_phase["steps"] // 10),
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_tqdm=True,
    )


def phase_midtrain(cfg: dict, out: str, device: str, held: HeldOut, tok, arms, seeds) -> None:
    from trl_refine import NSPGRPOConfig, NSPGRPOTrainer

    m = cfg["midtrain"]
    examples = tasks.mixed_examples(
        m["documents"],
        split="train",
        seed=m["data_seed"],
        lengths=cfg["data"]["train_lengths"],
        qa_fraction=cfg["data"]["qa_fraction"],
        essay_fraction=cfg["data"]["essay_fraction"],
    )
    train_docs = tasks.documents(examples)
    for seed in seeds:
        for arm in arms:
            path = result_path(out, "midtrain", arm, seed)
            if os.path.exists(path):
                continue
            seed_everything(seed)
            model = load_model(base_path(out), device)
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            if arm == "ntp_equal_time":
                ref = result_path(out, "midtrain", "refine_cosine", seed)
                if not os.path.exists(ref):
                    raise RuntimeError(f"ntp_equal_time needs {ref}: run the refine_cosine arm first")
                budget = read_json(ref)["train"]["cpu_s"]
                info = ntp_train(
                    model,
                    encode_documents(train_docs["text"], tok),
                    steps=None,
                    batch=1,
                    lr=m["lr"],
                    warmup=0,
                    device=device,
                    seed=seed,
                    cpu_seconds=budget,
                    weight_decay=0.0,
                )
                train = {
                    "steps": info["steps"],
                    "wall_s": info["wall_s"],
                    "cpu_s": info["cpu_s"],
                    "log": info["history"],
                }
            else:
                reward = {"ntp": "cosine", "refine_cosine": "cosine", "refine_exact": "exact"}[arm]
                args = NSPGRPOConfig(
                    **_grpo_common(m, device, seed, os.path.join(out, "tmp", f"mid-{arm}-{seed}")),
                    nsp_reward=reward,
                    ntp_coef=m["ntp_coef"],
                    nsp_coef=0.0 if arm == "ntp" else m["nsp_coef"],
                    nsp_max_length=m["max_length"],
                    weight_decay=0.0,
                )
                trainer = NSPGRPOTrainer(model, args=args, train_dataset=train_docs, processing_class=tok)
                t_wall, t_cpu = time.perf_counter(), time.process_time()  # the optimisation alone
                trainer.train()
                model = trainer.model
                train = {
                    "steps": trainer.state.global_step,
                    "wall_s": time.perf_counter() - t_wall,
                    "cpu_s": time.process_time() - t_cpu,
                    "log": trainer.state.log_history,
                }
            log.info("midtrain %s seed %d: %d steps in %.0f s", arm, seed, train["steps"], train["wall_s"])
            write_json(
                path, {"arm": arm, "seed": seed, "train": train, "eval": evaluate_model(model, tok, held, device)}
            )


def phase_posttrain(cfg: dict, out: str, device: str, held: HeldOut, tok, arms, seeds) -> None:
    from trl_refine import NSPPostTrainer, PostTrainConfig

    p = cfg["posttrain"]
    train = tasks.qa_dataset(
        tasks.mixed_examples(
            p["examples"],
            split="train",
            seed=p["data_seed"],
            lengths=cfg["data"]["train_lengths"],
            qa_fraction=cfg["data"]["qa_fraction"],
            essay_fraction=cfg["data"]["essay_fraction"],
        ),
        train=True,
    )
    for seed in seeds:
        for arm in arms:
            path = result_path(out, "posttrain", arm, seed)
            if os.path.exists(path):
                continue
            seed_everything(seed)
            model = load_model(base_path(out), device)
            common = _grpo_common(p, device, seed, os.path.join(out, "tmp", f"post-{arm}-{seed}"))
            args = PostTrainConfig(
                **common,
                posttrain_mode=arm,
                nsp_reward=p["nsp_reward"],
                ntp_coef=p["ntp_coef"],
                nsp_coef=p["nsp_coef"],
                sft_coef=1.0,
                max_answer_length=48,
                max_length=p["max_length"],
                weight_decay=0.0,
            )
            trainer = NSPPostTrainer(model, args=args, train_dataset=train, processing_class=tok)
            t_wall, t_cpu = time.perf_counter(), time.process_time()  # the optimisation alone
            trainer.train()
            info = {
                "steps": trainer.state.global_step,
                "wall_s": time.perf_counter() - t_wall,
                "cpu_s": time.process_time() - t_cpu,
                "log": trainer.state.log_history,
            }
            log.info("posttrain %s seed %d: %d steps in %.0f s", arm, seed, info["steps"], info["wall_s"])
            write_json(
                path,
                {
                    "arm": arm,
                    "seed": seed,
                    "train": info,
                    "eval": evaluate_model(trainer.model, tok, held, device, ntp=False),
                },
            )


def phase_testtime(cfg: dict, out: str, device: str, held: HeldOut, tok, arms, seeds) -> None:
    from trl_refine.testtime import TestTimeConfig, TestTimeRefine

    t = cfg["testtime"]
    for seed in seeds:
        for arm in arms:
            path = result_path(out, "testtime", arm, seed)
            if os.path.exists(path):
                continue
            seed_everything(seed)
            model = load_model(base_path(out), device)
            adapter = None
            if arm != "none":
                adapter = TestTimeRefine(
                    TestTimeConfig(
                        steps=t["steps"],
                        learning_rate=t["lr"],
                        nsp_reward="exact",
                        ntp_coef=1.0,
                        nsp_coef=0.0 if arm == "sft" else t["nsp_coef"],
                        nsp_num_chunks=t["nsp_num_chunks"],
                        nsp_rollout_length=t["nsp_rollout_length"],
                        nsp_margin=t["nsp_margin"],
                        reset="batch",
                        seed=seed,
                        mixed_precision="bf16" if device.startswith("cuda") else None,
                    )
                )
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            scores = task_scores(model, tok, held.testtime, device, batch_size=1, adapt=adapter)
            info = {
                "steps_per_prompt": 0 if arm == "none" else t["steps"],
                "wall_s": time.perf_counter() - t_wall,
                "cpu_s": time.process_time() - t_cpu,
            }
            log.info("testtime %s seed %d: %.1f in %.0f s", arm, seed, scores["all"], info["wall_s"])
            write_json(path, {"arm": arm, "seed": seed, "train": info, "eval": scores})


# ------------------------------------------------------------------------------------------------ report
def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mu = sum(values) / n
    return mu, (math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


BASELINE_ARM = {"midtrain": "ntp", "posttrain": "sft", "testtime": "none"}

PHASE_METRICS = {
    "midtrain": ("niah_avg", "doc_qa", "heldout_ntp_loss"),
    "posttrain": ("niah_avg", "doc_qa"),
    "testtime": ("niah_avg", "doc_qa"),
}


def phase_report(cfg: dict, out: str) -> str:
    base = read_json(os.path.join(base_path(out), "result.json"))
    lines = [
        f"# Replication results: {cfg['name']}\n",
        f"Base model: {cfg['model'].get('kind', 'refine_delta_net')} {base['params'] / 1e6:.2f}M params, "
        + (
            f"from `{base['source']}` ({base['train']['steps']} pretraining steps). "
            if base.get("source")
            else f"pretrained {base['train']['steps']} steps ({base['train']['wall_s']:.0f} s). "
        )
        + f"Base on the held-out grid: NIAH avg {base['eval']['niah_avg']:.1f}, doc-QA {base['eval']['doc_qa']:.1f}, "
        f"held-out NTP loss {base['eval']['heldout_ntp_loss']:.4f}.\n",
    ]
    summary: dict[str, Any] = {"base": base["eval"], "phases": {}}
    for phase, arms in (("midtrain", MIDTRAIN_ARMS), ("posttrain", POSTTRAIN_ARMS), ("testtime", TESTTIME_ARMS)):
        metrics = PHASE_METRICS[phase]
        header = ["arm", "seeds", *metrics, "steps", "wall s"]
        rows, phase_sum = [], {}
        for arm in arms:
            folder = os.path.join(out, phase, arm)
            runs = (
                [read_json(os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
                if os.path.isdir(folder)
                else []
            )
            if not runs:
                continue
            cells, arm_sum = [], {"seeds": [r["seed"] for r in runs]}
            for metric in metrics:
                by_seed = {r["seed"]: r["eval"][metric] for r in runs if r["eval"].get(metric) is not None}
                vals = list(by_seed.values())
                mu, sd = mean_std(vals)
                arm_sum[metric] = {"mean": mu, "std": sd, "values": vals, "by_seed": by_seed}
                cells.append(f"{mu:.4f} ± {sd:.4f}" if "loss" in metric else f"{mu:.1f} ± {sd:.1f}")
            steps = [r["train"].get("steps", r["train"].get("steps_per_prompt")) for r in runs]
            wall = [r["train"]["wall_s"] for r in runs]
            arm_sum["steps"], arm_sum["wall_s"] = steps, wall
            rows.append(
                [
                    arm,
                    str(len(runs)),
                    *cells,
                    "/".join(str(s) for s in sorted(set(steps))),
                    f"{sum(wall) / len(wall):.0f}",
                ]
            )
            phase_sum[arm] = arm_sum
        if not rows:
            continue
        summary["phases"][phase] = phase_sum
        lines.append(f"\n## {phase}\n")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += comparisons(phase, phase_sum, metrics)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(out, "report.json"), summary)
    plot(summary, os.path.join(out, "report.png"), cfg["name"])
    print(text)
    return text


#: two-sided 95% quantiles of Student's t, by degrees of freedom (1-30); larger df use the normal 1.96
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def paired_difference(arm: dict, base: dict, lower_is_better: bool = False) -> dict | None:
    """Per-seed differences ``arm - base`` over the seeds both ran (same trainer seed: same data order and
    rollout seed): mean, sample std, the 95% t-interval of the mean, and on how many seeds the arm is better.
    ``None`` with fewer than 2 shared seeds."""
    seeds = sorted(set(arm) & set(base))
    if len(seeds) < 2:
        return None
    diffs = [arm[s] - base[s] for s in seeds]
    mu, sd = mean_std(diffs)
    half = (T_975[len(diffs) - 2] if len(diffs) - 1 <= len(T_975) else 1.96) * sd / math.sqrt(len(diffs))
    return {
        "seeds": seeds,
        "mean": mu,
        "std": sd,
        "ci95": [mu - half, mu + half],
        "ahead": sum((d < -1e-9) if lower_is_better else (d > 1e-9) for d in diffs),  # ties (float noise) are not
        "excludes_zero": mu - half > 0 or mu + half < 0,
    }


def comparisons(phase: str, phase_sum: dict, metrics: tuple[str, ...]) -> list[str]:
    """Each arm against the phase's baseline arm: difference of means, and whether it exceeds the seed spread
    (|difference| > std_arm + std_baseline; the protocol's rule, fixed in advance)."""
    base = BASELINE_ARM[phase]
    if base not in phase_sum:
        return []
    out = [f"\nAgainst `{base}` (difference of means; `beyond spread` = |difference| > sum of the two stds):\n"]
    for arm, s in phase_sum.items():
        if arm == base:
            continue
        parts = []
        for metric in metrics:
            if metric not in s or metric not in phase_sum[base] or not s[metric]["values"]:
                continue
            d = s[metric]["mean"] - phase_sum[base][metric]["mean"]
            spread = s[metric]["std"] + phase_sum[base][metric]["std"]
            beyond = abs(d) > spread if len(s[metric]["values"]) > 1 else None
            paired = paired_difference(
                s[metric].get("by_seed", {}),
                phase_sum[base][metric].get("by_seed", {}),
                lower_is_better="loss" in metric,
            )
            s.setdefault("vs_baseline", {})[metric] = {"difference": d, "beyond_spread": beyond, "paired": paired}
            fmt = (lambda x: f"{x:+.4f}") if "loss" in metric else (lambda x: f"{x:+.1f}")
            text = f"{metric} {fmt(d)} ({'beyond spread' if beyond else 'within spread' if beyond is not None else 'one seed'}"
            if paired:
                lo, hi = paired["ci95"]
                text += (
                    f"; paired over {len(paired['seeds'])} seeds {fmt(paired['mean'])}, 95% CI [{fmt(lo)}, {fmt(hi)}]"
                    f"{' excludes 0' if paired['excludes_zero'] else ''}, better on {paired['ahead']}"
                )
            parts.append(text + ")")
        out.append(f"* `{arm}`: " + "; ".join(parts))
    return out


def plot(summary: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    phases = list(summary["phases"])
    metrics = ("niah_avg", "doc_qa", "heldout_ntp_loss")
    labels = {"niah_avg": "NIAH avg (×100)", "doc_qa": "doc-QA (×100)", "heldout_ntp_loss": "held-out NTP loss"}
    fig, axes = plt.subplots(
        len(metrics), max(1, len(phases)), figsize=(4.2 * max(1, len(phases)), 7.5), squeeze=False
    )
    for col, phase in enumerate(phases):
        arms = list(summary["phases"][phase])
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            if metric not in summary["phases"][phase][arms[0]]:
                ax.axis("off")
                continue
            mus = [summary["phases"][phase][a][metric]["mean"] for a in arms]
            sds = [summary["phases"][phase][a][metric]["std"] for a in arms]
            ax.bar(range(len(arms)), mus, yerr=sds, capsize=4, color="#4c72b0")
            for i, a in enumerate(arms):
                vals = summary["phases"][phase][a][metric]["values"]
                ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
            if summary["base"].get(metric) is not None:
                ax.axhline(summary["base"][metric], color="grey", ls="--", lw=1, label="base")
                ax.legend(fontsize=7)
            if "loss" in metric:
                lo = min(m - s for m, s in zip(mus, sds))
                ax.set_ylim(lo - 0.05 * abs(lo), None)
            ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
            ax.set_title(f"{phase}: {labels[metric]}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--arms", default=None, help="comma-separated subset of the phase's arms (default: all)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the YAML's)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the YAML's, else cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--base", default=None, help="start every arm from this checkpoint (sets pretrain.checkpoint)")
    ap.add_argument("--pretrain_seconds", type=float, default=None, help="override pretrain.max_seconds")
    ap.add_argument(
        "--pretrain_workers", type=int, default=None, help="streamed pretraining: document-generating workers"
    )
    a = ap.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    with open(a.config) as f:
        cfg = yaml.safe_load(f)
    device = a.device or cfg.get("device", "cpu")
    if a.base is not None:
        cfg["pretrain"]["checkpoint"] = a.base
    if a.pretrain_seconds is not None:
        cfg["pretrain"]["max_seconds"] = a.pretrain_seconds
    if a.pretrain_workers is not None:
        cfg["pretrain"]["workers"] = a.pretrain_workers
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(cfg["seeds"])
    phases = a.phases.split(",")
    bad = set(phases) - set(PHASES)
    if bad:
        raise SystemExit(f"--phases: unknown {sorted(bad)}; choose from {', '.join(PHASES)}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    tok = tokenizer()
    held = HeldOut(cfg, tok) if set(phases) - {"report"} else None

    def pick(phase, all_arms):
        wanted = a.arms.split(",") if a.arms else cfg[phase].get("arms", all_arms)
        return [x for x in all_arms if x in wanted]

    kernel = gated_kernel(cfg, a.out, device, tok) if set(phases) - {"report"} else contextlib.nullcontext()
    with kernel:
        if "pretrain" in phases:
            phase_pretrain(cfg, a.out, device, held, tok)
        if "midtrain" in phases:
            phase_midtrain(cfg, a.out, device, held, tok, pick("midtrain", MIDTRAIN_ARMS), seeds)
        if "posttrain" in phases:
            phase_posttrain(cfg, a.out, device, held, tok, pick("posttrain", POSTTRAIN_ARMS), seeds)
        if "testtime" in phases:
            phase_testtime(cfg, a.out, device, held, tok, pick("testtime", TESTTIME_ARMS), seeds)
    return phase_report(cfg, a.out) if "report" in phases else ""


if __name__ == "__main__":
    main()
