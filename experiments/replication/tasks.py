"""Data of the replication: real text from the parquet samples with retrieval facts woven in, offline.

Two disjoint sources of real text keep every evaluation set out of training:

* **train text**: the passages of ``ruler_squadqa_*`` and LongBench ``multifieldqa_en`` / ``samsum`` prompts;
* **held-out text**: the passages of ``ruler_hotpotqa_*`` prompts (another dataset: no passage is shared).

On that text we weave two kinds of facts:

* RULER needles (``trl_refine.eval.generate_niah`` with the passage as haystack): single, multi-key, multi-query
  and multi-value, 7-digit values;
* "document QA": a named entity's attribute stated once in the passage and asked at the end
  ("Question: In which city does Kalomi live? Answer: Corran").

A *document* (pretraining / mid-training) is a prompt followed by its answer, so next-token prediction of the answer
needs the woven fact. Each example uses its own passage, its own needle keys and values (everything is a function
of the seed).
"""

from __future__ import annotations

import glob
import os
import random
import re
from collections.abc import Sequence
from functools import lru_cache

import datasets
import pandas as pd

from trl_refine.eval import generate_niah
from trl_refine.eval.niah import essay_sentences

NIAH_FAMILIES = ("single", "multikey", "multiquery", "multivalue")
QA_CITIES = ("Arvel", "Brisk", "Corran", "Dunmere", "Elsby", "Farrow", "Glenholt", "Harrow", "Isling", "Jesmond")
_SYLLABLES = ("ka", "lo", "mi", "ran", "te", "vu", "zo", "pel", "dar", "sin", "ko", "ba", "ri", "nu", "tam", "gor")

TRAIN_SOURCES = ("ruler/ruler_squadqa_*.parquet", "longbench/multifieldqa_en_*.parquet", "longbench/samsum_*.parquet")
HELD_OUT_SOURCES = ("ruler/ruler_hotpotqa_*.parquet",)


def data_dirs() -> list[str]:
    """Where the parquet samples are looked for: ``$REPLICATION_DATA``, then ``shared/data`` beside or above the
    repository (a worktree sits one level deeper than the main checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.join(here, "..", "..")
    out = [os.environ["REPLICATION_DATA"]] if os.environ.get("REPLICATION_DATA") else []
    out += [os.path.join(repo, *up, "shared", "data") for up in ([], [".."], ["..", ".."])]
    return [os.path.abspath(d) for d in out]


@lru_cache(maxsize=4)
def passages(split: str, min_chars: int = 200) -> tuple[tuple[str, ...], str]:
    """(deduplicated paragraphs of ≥ ``min_chars`` of the train or held-out text, their source).

    Without the parquet samples (a bare CI checkout), essay-like filler from ``trl_refine.eval.niah`` stands in,
    seeded differently for the two splits; the source says so."""
    patterns = TRAIN_SOURCES if split == "train" else HELD_OUT_SOURCES
    for data_dir in data_dirs():
        files = sorted(f for p in patterns for f in glob.glob(os.path.join(data_dir, p)))
        if files:
            break
    else:
        return essay_pool(0 if split == "train" else 1), "essay (no parquet found)"
    seen, out = set(), []
    for f in files:
        for prompt in pd.read_parquet(f, columns=["prompt"])["prompt"]:
            for para in re.split(r"\n\s*\n|\nDocument \d+:\n", prompt):
                para = " ".join(para.split())
                if len(para) >= min_chars and "?" not in para[-80:] and para not in seen:
                    seen.add(para)
                    out.append(para)
    return tuple(out), ", ".join(os.path.relpath(f, data_dir) for f in files)


@lru_cache(maxsize=4)
def essay_pool(seed: int) -> tuple[str, ...]:
    """Paragraphs of the essay-like filler that the recipes' synthetic NIAH sets use as haystack."""
    sentences = essay_sentences(4000, seed=seed)
    return tuple(" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8))


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _haystack(rng: random.Random, pool: Sequence[str], chars: int) -> str:
    """Consecutive paragraphs of a random passage, at least ``chars`` long."""
    start = rng.randrange(len(pool))
    text, i = "", start
    while len(text) < chars:
        text += (" " if text else "") + pool[i % len(pool)]
        i += 1
    return text


def niah_example(task: str, length: int, seed: int, pool: Sequence[str], depth: float | None = None) -> dict:
    rng = random.Random(f"niah-{task}-{length}-{seed}")
    row = generate_niah(
        task,
        num_examples=1,
        context_length=length,
        haystack=_haystack(rng, pool, 2 * length),
        depth=depth,
        seed=seed,
        max_gen_tokens=10 if task in ("single", "multikey") else 40,
    )[0]
    return {
        "prompt": row["prompt"],
        "answer": list(row["answer"]),
        "task": row["task"],
        "length": length,
        "depth": -1.0 if depth is None else depth,
        "max_gen_tokens": row["max_gen_tokens"],
    }


def qa_example(length: int, seed: int, pool: Sequence[str], depth: float | None = None) -> dict:
    """A fact about a made-up person woven into real text, asked at the end (answer: one of 10 cities)."""
    rng = random.Random(f"qa-{length}-{seed}")
    name, city = _name(rng), rng.choice(QA_CITIES)
    question = f"\nQuestion: In which city does {name} live? Answer:"
    fact = f"{name} lives in {city}."
    text = _haystack(rng, pool, length)
    budget = max(0, length - len(question) - len(fact) - 1)
    sentences = re.split(r"(?<=[.!?]) ", text)
    context, kept = [], 0
    for s in sentences:
        if kept + len(s) + 1 > budget:
            break
        context.append(s)
        kept += len(s) + 1
    at = round((rng.random() if depth is None else depth) * len(context))
    context.insert(at, fact)
    return {
        "prompt": "Read the text and answer the question.\n" + " ".join(context) + question,
        "answer": [city],
        "task": "doc_qa",
        "length": length,
        "depth": -1.0 if depth is None else depth,
        "max_gen_tokens": 6,
    }


def answer_text(answers: Sequence[str]) -> str:
    return ", ".join(answers)


def mixed_examples(
    n: int, *, split: str, seed: int, lengths: Sequence[int], qa_fraction: float = 0.2, essay_fraction: float = 0.0
) -> list[dict]:
    """``n`` examples at random lengths and depths: doc-QA with probability ``qa_fraction``, else a NIAH family
    (equally likely); the haystack is essay-like filler with probability ``essay_fraction``, else real text."""
    pool = passages(split)[0]
    essays = essay_pool(2 + seed)
    rng = random.Random(f"mixed-{split}-{seed}")
    out = []
    for i in range(n):
        length = rng.choice(list(lengths))
        ex_seed = seed * 1_000_003 + i
        hay = essays if rng.random() < essay_fraction else pool
        if rng.random() < qa_fraction:
            out.append(qa_example(length, ex_seed, hay))
        else:
            out.append(niah_example(rng.choice(NIAH_FAMILIES), length, ex_seed, hay))
    return out


def documents(examples: Sequence[dict]) -> datasets.Dataset:
    """Prompt + " " + answer as one ``text`` document (pretraining / mid-training)."""
    return datasets.Dataset.from_dict({"text": [e["prompt"] + " " + answer_text(e["answer"]) for e in examples]})


def qa_dataset(examples: Sequence[dict], *, train: bool) -> datasets.Dataset:
    """prompt/answer rows; for training the answer is one string (all values), for evaluation the gold list."""
    rows = {k: [e[k] for e in examples] for k in ("prompt", "task", "length", "depth", "max_gen_tokens")}
    rows["answer"] = [answer_text(e["answer"]) if train else e["answer"] for e in examples]
    return datasets.Dataset.from_dict(rows)


def eval_grid(*, lengths: list[int], depths: list[float], per_cell: int, seed: int) -> datasets.Dataset:
    """The fixed held-out evaluation set: every NIAH family and doc-QA × length × depth, ``per_cell`` each."""
    pool = passages("held_out")[0]
    out = []
    for task in (*NIAH_FAMILIES, "doc_qa"):
        for length in lengths:
            for depth in depths:
                for j in range(per_cell):
                    cell = (*NIAH_FAMILIES, "doc_qa").index(task), lengths.index(length), depths.index(depth)
                    ex_seed = 10_000_000 * (seed + 1) + 100_000 * cell[0] + 10_000 * cell[1] + 1_000 * cell[2] + j
                    if task == "doc_qa":
                        out.append(qa_example(length, ex_seed, pool, depth))
                    else:
                        out.append(niah_example(task, length, ex_seed, pool, depth))
    return qa_dataset(out, train=False)


def dense_retrieval_document(seed: int, length: int, pool: Sequence[str]) -> str:
    """Real text with several RULER needles woven in and, later in the text, questions about them answered in
    RULER's answer format: every question is a retrieval the next-token loss trains (a denser signal than one
    question per document). Keys/values come from the same generators as the NIAH sets."""
    rng = random.Random(f"dense-{length}-{seed}")
    from trl_refine.eval.niah import _unique_items

    n = rng.randint(3, 6)
    keys = _unique_items(rng, "words", n, set())
    values = _unique_items(rng, "numbers", n, set())
    sentences = re.split(r"(?<=[.!?]) ", _haystack(rng, pool, length))
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    # needles in the first 60% of the text, each question after its needle
    events: list[tuple[float, str]] = [(rng.uniform(0.0, 0.6), s) for s in needles]
    for (at, _), k, v in zip(list(events), keys, values):
        q = (
            f"What is the special magic number for {k} mentioned in the provided text? The special magic number for "
            f"{k} mentioned in the provided text is {v}."
        )
        events.append((rng.uniform(at + 0.05, 1.0), q))
    budget = length - sum(len(s) + 1 for _, s in events)
    body, kept = [], 0
    for s in sentences:
        if kept + len(s) + 1 > max(budget, 0):
            break
        body.append(s)
        kept += len(s) + 1
    out = list(body)
    for at, s in sorted(events, key=lambda e: -e[0]):
        out.insert(round(at * len(body)), s)
    return " ".join(out)


def pretraining_stream(
    seed: int, *, lengths: Sequence[int], dense_fraction: float, qa_fraction: float, essay_fraction: float
):
    """An endless stream of distinct pretraining documents (no document repeats, so nothing is memorised):
    dense retrieval documents with probability ``dense_fraction``, else prompt+answer of ``mixed_examples``."""
    pool, essays = passages("train")[0], essay_pool(2 + seed)
    rng = random.Random(f"stream-{seed}")
    i = 0
    while True:
        i += 1
        length = rng.choice(list(lengths))
        hay = essays if rng.random() < essay_fraction else pool
        if rng.random() < dense_fraction:
            yield dense_retrieval_document(seed * 1_000_003 + i, length, hay)
            continue
        ex_seed = seed * 1_000_003 + i
        if rng.random() < qa_fraction:
            e = qa_example(length, ex_seed, hay)
        else:
            e = niah_example(rng.choice(NIAH_FAMILIES), length, ex_seed, hay)
        yield e["prompt"] + " " + answer_text(e["answer"])
