"""Synthetic RULER needle-in-a-haystack (NIAH) tasks, offline and deterministic.

Four task families, as in RULER (Hsieh et al., 2024) and the ReFINE NIAH table:

============  =====================================================  =======================
task          needles                                                answer
============  =====================================================  =======================
single        1 key, 1 value                                         the value
multikey      4 keys (3 distractors), 1 value each; 1 key queried    the queried key's value
multivalue    1 key, 4 values                                        all 4 values
multiquery    4 keys, 1 value each; all 4 queried                    all 4 values
============  =====================================================  =======================

Each needle is RULER's sentence ``"One of the special magic numbers for {key} is: {value}."``; the prompt is
RULER's template followed by its answer prefix, so the answer comes next::

    Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you
    about the numbers afterwards.
    <context: haystack sentences with the needles inserted>
    What are all the special magic numbers for <query> mentioned in the provided text? The special magic numbers
    for <query> mentioned in the provided text are

(with RULER's singular wording, "A special magic number is ...", when only one value is asked for).

Haystacks (all built in, nothing is downloaded): ``"essay"`` -- essay-like filler sentences generated from a
small seeded grammar (RULER uses Paul Graham essays, which we do not ship); ``"noise"`` -- RULER's "The grass is
green. The sky is blue. The sun is yellow. Here we go. There and back again."; ``"needle"`` -- distractor needles
with other keys (RULER's ``multikey_2/3``); or any text you pass, split into sentences and repeated as needed.

Scoring (:func:`niah_score`) is RULER's ``string_match_all`` by default: the fraction of gold values that occur
(case-insensitively) anywhere in the prediction, averaged over examples. ``mode="any"`` gives RULER's
``string_match_part`` (1 if any gold value occurs) and ``mode="strict"`` gives 1 only if all occur.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import uuid
from collections.abc import Sequence
from typing import Any

import datasets

__all__ = [
    "NIAH_TASKS",
    "NOISE_SENTENCES",
    "essay_sentences",
    "generate_niah",
    "niah_accuracy",
    "niah_score",
    "normalize_niah_task",
]

NIAH_TASKS: tuple[str, ...] = ("single", "multikey", "multiquery", "multivalue")

#: RULER's defaults per task: (number of keys, values per key, queried keys).
_TASK_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "single": (1, 1, 1),
    "multikey": (4, 1, 1),
    "multivalue": (1, 4, 1),
    "multiquery": (4, 1, 4),
}

_TASK_ALIASES = {
    "s": "single",
    "s_niah": "single",
    "single": "single",
    "mk": "multikey",
    "mk_niah": "multikey",
    "multikey": "multikey",
    "mv": "multivalue",
    "mv_niah": "multivalue",
    "multivalue": "multivalue",
    "mq": "multiquery",
    "mq_niah": "multiquery",
    "multiquery": "multiquery",
}

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
_PREFIX = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n"
)
_SUFFIX = (
    "\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
    " The special magic {type_v} for {query} mentioned in the provided text are"
)
_TYPE_NAMES = {"numbers": "numbers", "words": "words", "uuids": "uuids"}

#: RULER draws needle depths from 40 evenly spaced points in [0, 1].
_DEPTH_GRID = tuple(round(i / 39, 6) for i in range(40))


def normalize_niah_task(task: str) -> str:
    """Map ``"single"``, ``"niah_single"``, ``"multi-key"``, ``"MK-NIAH"``, ... to one of :data:`NIAH_TASKS`."""
    name = re.sub(r"[\s\-]+", "_", task.strip().lower())
    name = re.sub(r"^(ruler_)?niah_", "", name)
    name = re.sub(r"_\d+$", "", name)  # RULER's niah_single_1 etc.
    name = name.replace("multi_", "multi")
    if name not in _TASK_ALIASES:
        raise ValueError(f"unknown NIAH task {task!r}; use one of {NIAH_TASKS}")
    return _TASK_ALIASES[name]


# ----------------------------------------------------------------------------------------------------------------
# Built-in haystacks
# ----------------------------------------------------------------------------------------------------------------

_SUBJECTS = (
    "The old librarian",
    "A young engineer",
    "The town council",
    "Every good teacher",
    "The river",
    "A patient gardener",
    "The small company",
    "Our neighbor",
    "The committee",
    "A curious student",
    "The ship's captain",
    "The market",
    "A careful writer",
    "The orchestra",
    "The founder",
    "A tired traveler",
    "The museum",
    "The village baker",
    "A quiet painter",
    "The research team",
    "The mountain path",
    "A stubborn investor",
    "The evening train",
    "The local newspaper",
)
_VERBS = (
    "remembered",
    "studied",
    "described",
    "questioned",
    "repaired",
    "ignored",
    "celebrated",
    "measured",
    "explained",
    "rebuilt",
    "discovered",
    "borrowed",
    "painted",
    "organized",
    "defended",
    "simplified",
    "collected",
    "watched",
    "improved",
    "forgot",
)
_OBJECTS = (
    "the long history of the harbor",
    "a quiet corner of the garden",
    "the rules of the game",
    "an unfinished letter",
    "the shape of the hills",
    "a map of the northern roads",
    "the cost of the new bridge",
    "an old wooden chair",
    "the habits of migrating birds",
    "the meaning of a forgotten word",
    "the sound of the bells",
    "a plan for the winter",
    "the color of the morning sky",
    "a recipe for bread",
    "the structure of the argument",
    "the weight of the evidence",
    "a collection of maps",
    "the design of the tower",
    "an argument about taste",
    "the pattern in the fabric",
)
_TAILS = (
    "before the rain began",
    "with great care",
    "for reasons nobody understood",
    "while the city slept",
    "as the seasons changed",
    "without asking for help",
    "after a long discussion",
    "in the spring",
    "despite the cold weather",
    "because it seemed important",
    "during the long summer",
    "at the end of the day",
    "with a sense of humor",
    "under the old oak tree",
    "for the first time",
    "in a surprising way",
    "before anyone noticed",
    "with surprising patience",
)
_CONNECTORS = (
    "",
    "",
    "",
    "Later, ",
    "In the end, ",
    "Meanwhile, ",
    "Some say that ",
    "It is said that ",
    "Of course, ",
    "Years ago, ",
)

_ADJECTIVES = (
    "abundant",
    "agreeable",
    "ancient",
    "bashful",
    "bitter",
    "brave",
    "breezy",
    "bright",
    "calm",
    "careful",
    "cheerful",
    "clever",
    "cloudy",
    "crooked",
    "curious",
    "damp",
    "eager",
    "elegant",
    "fancy",
    "fierce",
    "fragile",
    "gentle",
    "gigantic",
    "glossy",
    "grumpy",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "kind",
    "lively",
    "lonely",
    "loud",
    "lucky",
    "mighty",
    "modern",
    "nervous",
    "noisy",
    "odd",
    "polite",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rare",
    "rough",
    "rustic",
    "shiny",
    "silent",
    "silly",
    "sleepy",
    "smooth",
    "spicy",
    "steady",
    "sturdy",
    "tame",
    "tender",
    "tiny",
    "vast",
    "wise",
)
_NOUNS = (
    "anchor",
    "apron",
    "badge",
    "basket",
    "beacon",
    "blanket",
    "bottle",
    "bucket",
    "cabin",
    "candle",
    "canyon",
    "carpet",
    "castle",
    "cellar",
    "chimney",
    "compass",
    "cottage",
    "crayon",
    "dolphin",
    "engine",
    "falcon",
    "feather",
    "fountain",
    "garden",
    "glacier",
    "hammer",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "lantern",
    "meadow",
    "mirror",
    "needle",
    "orchard",
    "paddle",
    "pebble",
    "pillow",
    "planet",
    "pocket",
    "puzzle",
    "quilt",
    "rabbit",
    "ribbon",
    "saddle",
    "sandal",
    "scarf",
    "shovel",
    "spoon",
    "statue",
    "teapot",
    "tent",
    "tunnel",
    "umbrella",
    "valley",
    "violin",
    "wagon",
    "whistle",
)


def essay_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` essay-like filler sentences from a seeded grammar (no digits, never "special magic")."""
    rng = random.Random(f"essay-{seed}")
    out = []
    for _ in range(n):
        lead = rng.choice(_CONNECTORS)
        subject = rng.choice(_SUBJECTS)
        if lead:
            subject = subject[0].lower() + subject[1:] if not subject.startswith("A ") else "a" + subject[1:]
        out.append(f"{lead}{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}.")
    return out


def _split_sentences(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip())]
    return [p for p in parts if p]


class _Stream:
    """An endless, deterministic list of haystack sentences, extended on demand."""

    def __init__(self, kind: str, seed: int, custom: Sequence[str] | None = None):
        self.kind, self.seed, self.custom = kind, seed, custom
        self.items: list[str] = []

    def get(self, n: int) -> list[str]:
        if n > len(self.items):
            need = max(n, 2 * len(self.items), 64)
            if self.kind == "essay":
                self.items = essay_sentences(need, self.seed)
            else:
                base = NOISE_SENTENCES if self.kind == "noise" else self.custom
                assert base
                self.items = [base[i % len(base)] for i in range(need)]
        return self.items[:n]


# ----------------------------------------------------------------------------------------------------------------
# Keys / values
# ----------------------------------------------------------------------------------------------------------------


def _random_item(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; use 'numbers', 'words' or 'uuids'")


def _unique_items(rng: random.Random, kind: str, count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    for _ in range(1000 * count + 1000):
        if len(out) == count:
            break
        item = _random_item(rng, kind)
        if item not in taken:
            taken.add(item)
            out.append(item)
    if len(out) < count:
        raise ValueError(f"could not draw {count} distinct {kind}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------------


class _Measure:
    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self.unit = "chars" if tokenizer is None else "tokens"

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def many(self, texts: Sequence[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t) for t in texts]
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _depth_list(depth: float | Sequence[float] | None) -> list[float] | None:
    if depth is None:
        return None
    values = [float(depth)] if isinstance(depth, (int, float)) else [float(d) for d in depth]
    if not values:
        raise ValueError("depth must be a number in [0, 1], a non-empty list of them, or None")
    for d in values:
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise ValueError(f"depth must be a fraction in [0, 1], got {d}")
    return values


def generate_niah(
    task: str = "single",
    *,
    num_examples: int = 100,
    context_length: int = 4096,
    tokenizer: Any | None = None,
    depth: float | Sequence[float] | None = None,
    num_keys: int | None = None,
    num_values: int | None = None,
    num_queries: int | None = None,
    haystack: str = "essay",
    key_type: str = "words",
    value_type: str = "numbers",
    seed: int = 0,
    max_gen_tokens: int = 128,
) -> datasets.Dataset:
    """Generate a RULER NIAH evaluation set.

    Args:
        task: ``"single"``, ``"multikey"``, ``"multiquery"`` or ``"multivalue"`` (aliases such as
            ``"niah_single"``, ``"multi-key"``, ``"MK"`` work too). Sets RULER's needle counts, which
            ``num_keys`` / ``num_values`` / ``num_queries`` override.
        num_examples: number of examples.
        context_length: target prompt length (template + context + question + answer prefix), in tokens of
            ``tokenizer`` (counted without special tokens, as the evaluator feeds prompts) or in characters when
            ``tokenizer`` is None. Each prompt is the longest that fits: ``length <= context_length`` and
            ``context_length - length`` is less than about one haystack sentence.
        tokenizer: a Hugging Face tokenizer, or None to count characters.
        depth: where the first queried needle goes, as a fraction of the context (0 = start, 1 = end): one number
            for all examples, a list cycled over examples, or None for a random depth per example drawn from
            RULER's 40-point grid. All other needles (distractor keys, extra values, extra queries) go to random
            grid depths.
        num_keys: number of distinct keys inserted (RULER ``num_needle_k``).
        num_values: values per key (RULER ``num_needle_v``).
        num_queries: keys asked about, at most ``num_keys`` (RULER ``num_needle_q``).
        haystack: ``"essay"``, ``"noise"``, ``"needle"`` or your own text (used when it contains a space).
        key_type / value_type: ``"words"``, ``"numbers"`` (7 digits) or ``"uuids"``.
        seed: everything is a function of ``seed`` (same seed -> identical dataset).
        max_gen_tokens: stored per example (RULER generates up to 128 tokens for NIAH); the evaluator uses it as
            the per-example budget, capped by its own ``max_new_tokens``.

    Returns:
        A :class:`datasets.Dataset` with columns ``prompt``, ``answer`` (list of gold strings), ``task``
        (``"niah_<task>"``), ``length`` (actual prompt length), ``target_length``, ``length_unit``
        (``"tokens"``/``"chars"``), ``depth`` (measured: characters of context before the first queried needle
        divided by the characters of context other than that needle), ``needle_depths`` (same measure for every
        needle, in context order), ``query``, ``haystack``, ``max_gen_tokens`` and ``index``.
    """
    task = normalize_niah_task(task)
    k0, v0, q0 = _TASK_DEFAULTS[task]
    k = k0 if num_keys is None else int(num_keys)
    v = v0 if num_values is None else int(num_values)
    q = q0 if num_queries is None else int(num_queries)
    if k < 1 or v < 1 or q < 1:
        raise ValueError("num_keys, num_values and num_queries must be >= 1")
    if q > k:
        raise ValueError(f"num_queries ({q}) cannot exceed num_keys ({k})")
    if num_examples < 1:
        raise ValueError("num_examples must be >= 1")
    if context_length < 1:
        raise ValueError("context_length must be >= 1")
    for kind in (key_type, value_type):
        if kind not in _TYPE_NAMES:
            raise ValueError(f"unknown needle type {kind!r}; use 'numbers', 'words' or 'uuids'")
    depths = _depth_list(depth)

    custom: list[str] | None = None
    if haystack in ("essay", "noise", "needle"):
        kind = haystack
    elif isinstance(haystack, str) and " " in haystack:
        kind = "custom"
        custom = _split_sentences(haystack)
        if not custom:
            raise ValueError("custom haystack text has no sentences")
    else:
        raise ValueError(f"haystack must be 'essay', 'noise', 'needle' or a text, got {haystack!r}")
    sep = "\n" if kind == "needle" else " "
    measure = _Measure(tokenizer)
    shared_stream = None if kind == "needle" else _Stream(kind, seed, custom)
    shared_units: list[int] = []

    type_v = _TYPE_NAMES[value_type]
    rows: list[dict[str, Any]] = []
    prev_n: int | None = None
    for index in range(num_examples):
        rng = random.Random(f"niah-{seed}-{index}")
        taken: set[str] = set()
        keys = _unique_items(rng, key_type, k, taken)
        values = [_unique_items(rng, value_type, v, taken) for _ in range(k)]
        query_idx = rng.sample(range(k), q)
        queries = [keys[i] for i in query_idx]
        answers = [val for i in query_idx for val in values[i]]
        query = queries[0] if q == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]

        single = q * v == 1
        tv = type_v[:-1] if single else type_v
        # the needle sentence keeps the plural, as in RULER (it is formatted before the template is singularized)
        needles = [_NEEDLE.format(type_v=type_v, key=keys[i], value=val) for i in range(k) for val in values[i]]
        target = _NEEDLE.format(type_v=type_v, key=keys[query_idx[0]], value=values[query_idx[0]][0])
        target_depth = depths[index % len(depths)] if depths is not None else rng.choice(_DEPTH_GRID)
        needle_depth = {nd: (target_depth if nd == target else rng.choice(_DEPTH_GRID)) for nd in needles}
        order = list(needles)
        rng.shuffle(order)  # tie-break among needles at the same depth

        prefix, suffix = _PREFIX, _SUFFIX
        if single:  # RULER's singular wording
            prefix = prefix.replace("Some", "A").replace("are", "is")
            suffix = suffix.replace("are all", "is").replace("are", "is")
        prefix = prefix.format(type_v=tv)
        suffix = suffix.format(type_v=tv, query=query)

        if kind == "needle":
            stream_items: list[str] = []
            example_units: list[int] = []
            hay_rng = random.Random(f"niah-hay-{seed}-{index}")

            def get_sentences(n: int, _items=stream_items, _units=example_units, _rng=hay_rng, _taken=taken):
                while len(_items) < n:
                    add = max(n - len(_items), 64)
                    new = [
                        _NEEDLE.format(
                            type_v=type_v,
                            key=_unique_items(_rng, key_type, 1, _taken)[0],
                            value=_unique_items(_rng, value_type, 1, _taken)[0],
                        )
                        for _ in range(add)
                    ]
                    _items.extend(new)
                    _units.extend(measure.many([sep + s for s in new]))
                return _items[:n], _units[:n]

        else:

            def get_sentences(n: int):
                items = shared_stream.get(n)
                if len(shared_units) < len(items):
                    shared_units.extend(measure.many([sep + s for s in items[len(shared_units) :]]))
                return items, shared_units[:n]

        def build(n: int, _get=get_sentences, _prefix=prefix, _suffix=suffix, _order=order, _nd=needle_depth):
            hay, units = _get(n)
            cum = [0]
            for u in units:
                cum.append(cum[-1] + u)
            total = cum[-1]
            slots: list[tuple[int, float, int, str]] = []
            for j, nd in enumerate(_order):
                d = _nd[nd]
                # sentence boundary closest to the requested fraction of the haystack
                x = d * total
                pos = bisect.bisect_left(cum, x)
                if pos > 0 and (pos == len(cum) or x - cum[pos - 1] <= cum[pos] - x):
                    pos -= 1
                slots.append((pos, d, j, nd))
            slots.sort()
            pieces: list[str] = []
            si = 0
            for i in range(n + 1):
                while si < len(slots) and slots[si][0] == i:
                    pieces.append(slots[si][3])
                    si += 1
                if i < n:
                    pieces.append(hay[i])
            context = sep.join(pieces)
            return _prefix + context + _suffix, context

        prompt_n, context_n, n, length = _fit(build, measure, context_length, prev_n, get_sentences)
        if kind != "needle":
            prev_n = n

        target_off = context_n.index(target)
        rest = len(context_n) - len(target)
        measured_depth = target_off / rest if rest > 0 else 0.0
        positions = sorted((context_n.index(nd), nd) for nd in needles)
        needle_depths = [
            off / (len(context_n) - len(nd)) if len(context_n) > len(nd) else 0.0 for off, nd in positions
        ]
        rows.append(
            {
                "prompt": prompt_n,
                "answer": answers,
                "task": f"niah_{task}",
                "length": length,
                "target_length": int(context_length),
                "length_unit": measure.unit,
                "depth": measured_depth,
                "needle_depths": needle_depths,
                "query": query,
                "haystack": kind,
                "max_gen_tokens": int(max_gen_tokens),
                "index": index,
            }
        )
    return datasets.Dataset.from_list(rows)


def _fit(build, measure: _Measure, target: int, start: int | None, get_sentences) -> tuple[str, str, int, int]:
    """Largest number of haystack sentences ``n`` whose prompt fits in ``target`` units; exact, by measuring."""
    prompt0, context0 = build(0)
    overhead = measure(prompt0)
    if overhead > target:
        raise ValueError(
            f"context_length={target} {measure.unit} is too small: template, question and needles alone take "
            f"{overhead} {measure.unit}"
        )
    if start is None:
        # estimate from the per-sentence units (exact for characters, approximate for tokens)
        n = 64
        while True:
            _, units = get_sentences(n)
            if sum(units) + overhead > target:
                break
            n *= 2
        cum = 0
        start = 0
        for i, u in enumerate(units):
            cum += u
            if overhead + cum > target:
                break
            start = i + 1
    best: tuple[str, str, int, int] = (prompt0, context0, 0, overhead)
    lo, hi = 0, None  # n = lo fits (n = 0 always does); n = hi does not
    n = max(start, 1)
    for step in range(200):
        prompt, context = build(n)
        length = measure(prompt)
        if length <= target:
            lo, best = n, (prompt, context, n, length)
        else:
            hi = n
        if hi is not None and hi == lo + 1:
            break
        if step >= 6 and hi is not None:  # safety net: plain bisection
            n = (lo + hi) // 2
            continue
        per = max((length - overhead) / n, 1e-9)  # measured units per haystack sentence
        guess = n + math.floor((target - length) / per)
        guess = max(guess, n + 1) if length <= target else min(guess, n - 1)
        guess = max(guess, lo + 1)
        if hi is not None:
            guess = min(guess, hi - 1)
        n = guess
    return best


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")


def niah_score(prediction: str, answers: str | Sequence[str], mode: str = "all") -> float:
    """Score one NIAH prediction against its gold values (case-insensitive substring match).

    ``mode="all"`` (default, RULER's ``string_match_all``): fraction of gold values present in the prediction.
    ``mode="any"`` (RULER's ``string_match_part``): 1 if any gold value is present. ``mode="strict"``: 1 only if
    every gold value is present.
    """
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("niah_score needs at least one gold answer")
    pred = _CONTROL.sub("\n", prediction).strip().lower()
    hits = [str(g).lower() in pred for g in golds]
    if mode == "all":
        return sum(hits) / len(hits)
    if mode == "any":
        return float(any(hits))
    if mode == "strict":
        return float(all(hits))
    raise ValueError(f"unknown NIAH scoring mode {mode!r}; use 'all', 'any' or 'strict'")


def niah_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]], mode: str = "all") -> float:
    """Mean :func:`niah_score` over a dataset, in [0, 1] (RULER reports x100)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(niah_score(p, a, mode) for p, a in zip(predictions, answers)) / len(predictions)
