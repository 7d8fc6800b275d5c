"""Diagnostic beside the fixed protocol: does ReFINE mid-training optimise its own objective on held-out text better
than NTP does? (If it did not, the null NIAH result could hide a broken policy gradient.)

Runs replicate.py's mid-training arms unchanged and adds to each arm's evaluation ``nsp_probe``: on the held-out NTP
documents (never trained on), at positions fixed by a seed before any arm runs, the model continues the prefix by
k tokens, greedily and by sampling at temperature 1 (the rollouts' policy); the score is the fraction of the k tokens
equal to the document's own continuation (the exact reward's per-token match) and the fraction of positions with all
k equal. Also the base model's probe, once.

    python experiments/replication/nsp_probe.py --config experiments/replication/configs/cpu_stream.yaml \
        --out runs/probe --arms ntp,refine_cosine,refine_exact --seeds 0,1,2,3,4
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replicate  # noqa: E402

PROBE = dict(k=5, positions=6, samples=4, margin=32, seed=4242, batch=16)


def probe_positions(docs: list[list[int]], k: int, positions: int, margin: int, seed: int) -> list[tuple[int, int]]:
    """(document index, prefix length) pairs drawn once from ``seed``: the same for every model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, doc in enumerate(docs):
        if len(doc) < margin + k + 1:
            continue
        for p in torch.randint(margin, len(doc) - k, (positions,), generator=g).tolist():
            out.append((i, p))
    return out


@torch.no_grad()
def nsp_probe(model, docs: list[list[int]], pad: int, device: str, **kw) -> dict[str, float]:
    cfg = {**PROBE, **kw}
    k, pairs = cfg["k"], probe_positions(docs, cfg["k"], cfg["positions"], cfg["margin"], cfg["seed"])
    model.eval()
    scores: dict[str, list[float]] = {"greedy_token": [], "greedy_all": [], "sampled_token": [], "sampled_all": []}
    torch.manual_seed(cfg["seed"])
    for start in range(0, len(pairs), cfg["batch"]):
        part = pairs[start : start + cfg["batch"]]
        prefixes = [docs[i][:p] for i, p in part]
        truth = torch.tensor([docs[i][p : p + k] for i, p in part], device=device)
        width = max(len(x) for x in prefixes)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prefixes], device=device)  # left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prefixes], device=device)
        for mode, extra in (
            ("greedy", dict(do_sample=False)),
            ("sampled", dict(do_sample=True, top_k=0, temperature=1.0, num_return_sequences=cfg["samples"])),
        ):
            with replicate.autocast(device):
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, pad_token_id=pad, **extra
                )
            new = out[:, ids.shape[1] :]
            ref = truth.repeat_interleave(new.shape[0] // truth.shape[0], dim=0)
            eq = (new == ref).float()
            scores[f"{mode}_token"] += eq.mean(dim=1).tolist()
            scores[f"{mode}_all"] += eq.min(dim=1).values.tolist()
    return {key: 100.0 * sum(v) / len(v) for key, v in scores.items()} | {"positions": len(pairs)}


def main(argv: list[str] | None = None) -> None:
    original = replicate.evaluate_model

    def with_probe(model, tok, held, device, ntp=True):
        out = original(model, tok, held, device, ntp)
        out["nsp_probe"] = nsp_probe(model, held.ntp_docs, tok.pad_token_id, device)
        return out

    replicate.evaluate_model = with_probe
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[argv.index("--out") + 1]
    replicate.main([*argv, "--phases", "midtrain"])
    base = os.path.join(out_dir, "base_probe.json")
    if not os.path.exists(base):
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            cfg = yaml.safe_load(f)
        tok = replicate.tokenizer()
        model = replicate.load_model(replicate.base_path(out_dir), "cpu")
        with open(base, "w") as f:
            json.dump(nsp_probe(model, replicate.HeldOut(cfg, tok).ntp_docs, tok.pad_token_id, "cpu"), f, indent=1)


if __name__ == "__main__":
    main()
