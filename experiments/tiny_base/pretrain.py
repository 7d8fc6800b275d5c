"""Pretrain a tiny reference DeltaNet for the embedded CPU defaults' needle task (issue 13 item 4; not shipped yet:
no run so far retrieved a held-out needle, see docs/replication.md).

Plain next-token prediction on a stream of fresh synthetic needle documents (``generate_niah``, the same
template, essay haystack and 7-digit values as the recipes' embedded default; no document is ever repeated), short
contexts so that a 2-layer DeltaNet learns associative recall within minutes on a CPU. Every ``--eval_every`` steps
it scores greedy needle accuracy on a held-out set (a seed no training document uses) and stops as soon as the
accuracy is inside ``[--target_low, --target_high]`` (a base that post-training can still move), or at
``--max_steps`` / ``--max_minutes``. fp32, fixed seed, one thread by default::

    nice -n 10 python experiments/tiny_base/pretrain.py --output_dir outputs/tiny_needle_base
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def documents(tokenizer, step: int, batch_size: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """``batch_size`` fresh documents (prompt + " " + needle value + "."), a different generator seed per step."""
    from trl_refine.eval import generate_niah

    rng = random.Random(seed * 1_000_003 + step)
    length = rng.randint(*lengths)
    ds = generate_niah(
        "single", num_examples=batch_size, context_length=length, tokenizer=None, haystack="essay",
        seed=10_000 + seed * 1_000_003 + step,
    )  # fmt: skip
    return [
        tokenizer(f"{p} {a[0]}.", add_special_tokens=False)["input_ids"] for p, a in zip(ds["prompt"], ds["answer"])
    ]


def batch_tensors(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


@torch.no_grad()
def needle_accuracy(model, tokenizer, eval_set) -> float:
    """Greedy decoding, RULER string_match_all, the scorer the recipes report."""
    from trl_refine.eval.niah import niah_score

    model.eval()
    hits = 0.0
    for prompt, answer in zip(eval_set["prompt"], eval_set["answer"]):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += niah_score(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), answer)
    model.train()
    return 100.0 * hits / len(eval_set)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="outputs/tiny_needle_base")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--min_length", type=int, default=450, help="Shortest training prompt (characters = bytes).")
    p.add_argument("--max_length", type=int, default=700, help="Longest training prompt.")
    p.add_argument("--eval_length", type=int, default=700, help="Held-out prompt length (the default's).")
    p.add_argument("--eval_examples", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--max_steps", type=int, default=3000)
    p.add_argument("--max_minutes", type=float, default=15.0)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--target_low", type=float, default=20.0)
    p.add_argument("--target_high", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    import trl_refine.models  # noqa: F401  (registers refine_delta_net)
    from trl_refine.eval import generate_niah
    from trl_refine.models.delta_net import RefDeltaNetConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tokenizer = ByT5Tokenizer()
    config = RefDeltaNetConfig(
        vocab_size=len(tokenizer), hidden_size=a.hidden_size, num_hidden_layers=a.layers, num_heads=a.heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).float()
    # held out: a seed no training document uses (training seeds are >= 10_000)
    eval_set = generate_niah(
        "single", num_examples=a.eval_examples, context_length=a.eval_length, tokenizer=None, haystack="essay", seed=7
    )
    opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    t0 = time.perf_counter()
    history = []
    acc = needle_accuracy(model, tokenizer, eval_set)
    print(f"step 0: held-out needle accuracy {acc:.1f}", flush=True)
    for step in range(1, a.max_steps + 1):
        ids, labels = batch_tensors(
            documents(tokenizer, step, a.batch_size, (a.min_length, a.max_length), a.seed), tokenizer.pad_token_id
        )
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}; lower --learning_rate")
        minutes = (time.perf_counter() - t0) / 60
        if step % 20 == 0:
            print(f"step {step}: loss {loss.item():.4f} ({step / (minutes * 60):.2f} steps/s)", flush=True)
        if step % a.eval_every == 0 or minutes > a.max_minutes:
            acc = needle_accuracy(model, tokenizer, eval_set)
            history.append({"step": step, "loss": loss.item(), "needle_accuracy": acc, "minutes": minutes})
            print(f"step {step}: held-out needle accuracy {acc:.1f} ({minutes:.1f} min)", flush=True)
            if a.target_low <= acc <= a.target_high or acc > a.target_high or minutes > a.max_minutes:
                break
    model.save_pretrained(a.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(a.output_dir)
    with open(os.path.join(a.output_dir, "build_log.json"), "w") as f:
        json.dump({"arguments": vars(a), "history": history, "documents_seen": step * a.batch_size}, f, indent=1)
    print(f"saved {a.output_dir} after {step} steps ({step * a.batch_size} fresh documents), accuracy {acc:.1f}")


if __name__ == "__main__":
    main()
