"""Pretraining documents that make retrieval learnable for a tiny byte-level model (issue 13 item 1(a)).

Every document is a byte sequence (ByT5 ids: byte + 3) with a mask of its *answer bytes*: the values a reader can
only predict by retrieving a fact stated earlier in the same document. The trainer weights those bytes up in the
loss. Kinds (all drawn fresh from a seed, so no document ever repeats and nothing can be memorised):

* ``repeat``: a passage in which 7-digit numbers come back later (the copy itself, the simplest retrieval);
* ``dense_niah``: RULER's needle sentences (``One of the special magic numbers for K is: V.``, RULER's word keys
  and 7-digit values) woven into a passage, then *several* questions in RULER's own question/answer-prefix wording
  (single key, several keys, a key with several values), each followed by its answer: many retrievals per document.
* ``dense_qa``: several "Name lives in City." facts in a passage, then several "Question: In which city does Name
  live? Answer: City" lines (the replication's doc-QA format).
* ``ruler``: one RULER prompt of the four NIAH families (``tasks.niah_example``) followed by its answer, exactly
  the format of the replication's held-out grid (other text, other seeds).
* ``qa``: one doc-QA prompt and its answer (``tasks.qa_example``), the grid's doc-QA format.
* ``default``: the recipes' embedded default (``generate_niah("single", haystack="essay")``, prompt + " " + value).
* ``copy``: random digit strings, each followed at once by its copy (``code 8812. again: 8812.``): the induction
  copy on every copied byte, the densest signal there is (a 64-wide 2-layer reference DeltaNet learns it in a few
  hundred steps, where it never learned it from the sparse kinds above in 3400).
* ``kv``: RULER needle sentences back to back without filler, then every key asked and answered in RULER's wording:
  associative recall *by key* with the evaluation's own phrasing, one target per ~260 bytes.

Text comes from ``tasks.passages("train")`` (the replication's *train* text; never the held-out text) or the
essay-like filler. Lengths are in bytes (= characters for the filler; the passages are nearly all ASCII).
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "replication"))
import tasks  # noqa: E402

from trl_refine.eval import generate_niah  # noqa: E402
from trl_refine.eval.niah import _unique_items  # noqa: E402

KINDS = ("repeat", "dense_niah", "dense_qa", "ruler", "qa", "default", "copy", "kv")
CPU_MIX = {"repeat": 0.25, "dense_niah": 0.25, "dense_qa": 0.1, "ruler": 0.15, "qa": 0.05, "default": 0.2}
DEFAULT_MIX = {"dense_niah": 0.4, "dense_qa": 0.1, "ruler": 0.3, "qa": 0.1, "default": 0.1}
# run 3: the copy and key-value kinds first (STAGED_MIX[0] for the first --stage_a fraction of the steps), then all
STAGED_MIX = (
    {"copy": 0.35, "kv": 0.35, "default": 0.15, "dense_niah": 0.15},
    {
        "copy": 0.1,
        "kv": 0.15,
        "repeat": 0.05,
        "dense_niah": 0.2,
        "dense_qa": 0.1,
        "ruler": 0.2,
        "qa": 0.05,
        "default": 0.15,
    },
)
EOS = 1  # ByT5


def byte_ids(text: str) -> list[int]:
    """ByT5 ids without special tokens (identical to ``ByT5Tokenizer()(text, add_special_tokens=False)``)."""
    return [b + 3 for b in text.encode("utf-8")]


class Doc:
    """A document under construction: ids and a 0/1 answer mask, appended piece by piece."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.answer: list[int] = []

    def add(self, text: str, answer: bool = False) -> Doc:
        ids = byte_ids(text)
        self.ids += ids
        self.answer += [int(answer)] * len(ids)
        return self

    def done(self) -> tuple[list[int], list[int]]:
        return self.ids + [EOS], self.answer + [0]


def _sentences(rng: random.Random, pool: Sequence[str], chars: int) -> list[str]:
    text = tasks._haystack(rng, pool, chars + 200)
    out, kept = [], 0
    for s in re.split(r"(?<=[.!?]) ", text):
        if kept + len(s) + 1 > chars:
            break
        out.append(s)
        kept += len(s) + 1
    return out


def _weave(rng: random.Random, body: list[str], facts: list[str], max_depth: float = 1.0) -> str:
    out = list(body)
    for f in facts:
        out.insert(rng.randint(0, round(max_depth * len(out))), f)
    return " ".join(out)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def dense_niah(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    """Several needles, then several RULER-worded questions, each answered (answer bytes marked)."""
    n_keys = rng.randint(2, max(2, min(8, length // 220)))
    taken: set[str] = set()
    keys = _unique_items(rng, "words", n_keys, taken)
    values = [_unique_items(rng, "numbers", 1 if rng.random() < 0.75 else rng.randint(2, 4), taken) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    # questions: single keys (all values of that key), now and then several keys at once
    order = list(range(n_keys))
    rng.shuffle(order)
    questions: list[list[int]] = []
    while order:
        take = 1 if rng.random() < 0.7 or len(order) == 1 else rng.randint(2, min(4, len(order)))
        questions.append(order[:take])
        order = order[take:]
    q_text = []
    for q in questions:
        ks = [keys[i] for i in q]
        vals = [v for i in q for v in values[i]]
        single = len(vals) == 1
        noun = "number" if single else "numbers"
        ask = "is" if single else "are all"
        tell = "is" if single else "are"
        q_text.append(
            (
                f"\nWhat {ask} the special magic {noun} for {_and(ks)} mentioned in the provided text? "
                f"The special magic {noun} for {_and(ks)} mentioned in the provided text {tell}",
                ", ".join(vals),
            )
        )
    fixed = sum(len(t) + len(a) + 2 for t, a in q_text) + sum(len(s) + 1 for s in needles) + 140
    body = _sentences(rng, pool, max(0, length - fixed))
    intro = (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
        if len(needles) == 1
        else "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    doc = Doc().add(intro + _weave(rng, body, needles))
    for t, a in q_text:
        doc.add(t + " ").add(a, answer=True)
    return doc.done()


def dense_qa(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    n = rng.randint(2, max(2, min(8, length // 120)))
    names: list[str] = []
    while len(names) < n:
        name = tasks._name(rng)
        if name not in names:
            names.append(name)
    cities = [rng.choice(tasks.QA_CITIES) for _ in names]
    facts = [f"{p} lives in {c}." for p, c in zip(names, cities)]
    asked = rng.sample(range(n), rng.randint(1, n))
    fixed = sum(len(f) + 1 for f in facts) + 60 * len(asked) + 40
    body = _sentences(rng, pool, max(0, length - fixed))
    doc = Doc().add("Read the text and answer the question.\n" + _weave(rng, body, facts))
    for i in asked:
        doc.add(f"\nQuestion: In which city does {names[i]} live? Answer: ").add(cities[i], answer=True)
    return doc.done()


def repeat(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    """A passage with 7-digit numbers that come back later in it (the repetition is the answer): copying a span
    seen before is the circuit every retrieval above needs, and this trains it on every repeated digit."""
    n = rng.randint(1, max(1, length // 150))
    values = [str(rng.randint(10**6, 10**7 - 1)) for _ in range(n)]
    body = _sentences(rng, pool, max(0, length - 40 * n))
    slots = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, 2 * n))) if body else [0] * (2 * n)
    events = {}
    for i, v in enumerate(values):
        first, second = slots[2 * i : 2 * i + 2] if len(slots) >= 2 * i + 2 else (0, 0)
        events.setdefault(first, []).append((f"The code {v} was noted.", None))
        events.setdefault(second, []).append(("Once more, the code is ", v))
    doc = Doc()
    for j in range(len(body) + 1):
        for lead, v in events.get(j, []):
            doc.add(lead + " ") if v is None else doc.add(lead).add(v, answer=True).add(". ")
        if j < len(body):
            doc.add(body[j] + " ")
    return doc.done()


def copy(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    doc = Doc()
    while len(doc.ids) < length:
        code = "".join(rng.choice("0123456789") for _ in range(rng.randint(7, 24)))
        doc.add(f"code {code}. again: ").add(code, answer=True).add(". ")
    return doc.done()


def kv(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    n = max(2, min(16, length // 260))
    taken: set[str] = set()
    keys = _unique_items(rng, "words", n, taken)
    values = _unique_items(rng, "numbers", n, taken)
    doc = Doc().add(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
        + " ".join(f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values))
    )
    for i in rng.sample(range(n), n):
        doc.add(
            f"\nWhat is the special magic number for {keys[i]} mentioned in the provided text? "
            f"The special magic number for {keys[i]} mentioned in the provided text is "
        ).add(values[i], answer=True)
    return doc.done()


def _prompt_answer(prompt: str, answers: Sequence[str]) -> tuple[list[int], list[int]]:
    return Doc().add(prompt + " ").add(tasks.answer_text(answers), answer=True).done()


def ruler(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    e = tasks.niah_example(rng.choice(tasks.NIAH_FAMILIES), length, rng.randrange(1 << 40), pool)
    return _prompt_answer(e["prompt"], e["answer"])


def qa(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    e = tasks.qa_example(length, rng.randrange(1 << 40), pool)
    return _prompt_answer(e["prompt"], e["answer"])


def default(rng: random.Random, length: int, pool: Sequence[str]) -> tuple[list[int], list[int]]:
    """The recipes' embedded default format (essay haystack of its own; seeds >= 10**6, the recipes use 1, 2)."""
    row = generate_niah(
        "single", num_examples=1, context_length=length, haystack="essay", seed=rng.randrange(10**6, 1 << 40)
    )[0]
    return _prompt_answer(row["prompt"], row["answer"])


_BUILD = {
    "repeat": repeat,
    "dense_niah": dense_niah,
    "dense_qa": dense_qa,
    "ruler": ruler,
    "qa": qa,
    "default": default,
    "copy": copy,
    "kv": kv,
}


def document(kind: str, rng: random.Random, length: int, essay_fraction: float = 0.25):
    """One document of ``kind`` of about ``length`` bytes: (ids ending in EOS, answer mask)."""
    pool = tasks.essay_pool(2) if rng.random() < essay_fraction else tasks.passages("train")[0]
    floor = {"ruler": 760, "default": 420, "copy": 40, "kv": 400}.get(
        kind, 200
    )  # RULER templates and needles need room
    return _BUILD[kind](rng, max(length, floor), pool)


class Stream:
    """An endless iterator of fresh documents; ``lengths`` may be changed while iterating (a curriculum)."""

    def __init__(self, seed: int, *, lengths, mix=None, essay_fraction: float = 0.25):
        self.rng = random.Random(f"tiny-base-{seed}")
        self.lengths = tuple(lengths)
        mix = mix or DEFAULT_MIX
        bad = set(mix) - set(KINDS)
        if bad:
            raise ValueError(f"unknown document kinds {sorted(bad)}; choose from {KINDS}")
        self.kinds, self.weights = list(mix), [mix[k] for k in mix]
        self.essay_fraction = essay_fraction

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return document(kind, self.rng, self.rng.randint(*self.lengths), self.essay_fraction)
