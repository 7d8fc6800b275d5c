"""Offline long documents for demos and tests: no downloads.

Each document is a deterministic "registry" of facts about made-up entities, written in varied sentences, where
facts introduced early are restated later. Predicting the restatements needs the early context, which is what a
fast-weight model has to store: a small, learnable long-range signal for the embedded demos.
"""

from __future__ import annotations

import random

from datasets import Dataset

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ran",
    "te",
    "vu",
    "zo",
    "pel",
    "dar",
    "sin",
    "ko",
    "ba",
    "ri",
    "nu",
    "fey",
    "tam",
    "gor",
    "lis",
]
_COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "golden", "crimson", "teal", "ivory"]
_CITIES = ["Arvel", "Brisk", "Corran", "Dunmere", "Elsby", "Farrow", "Glenholt", "Harrowgate", "Isling", "Jesmond"]
_FILLER = [
    "The archive was quiet that morning.",
    "Nobody remembered when the ledger was first opened.",
    "Clerks copied each entry twice to be safe.",
    "Rain tapped on the tall windows of the hall.",
    "A visitor asked about the old maps and left without an answer.",
    "The index cards were sorted by the colour of their ink.",
]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def synthetic_document(seed: int, num_chars: int = 2000) -> str:
    rng = random.Random(seed)
    facts = []
    for _ in range(max(4, num_chars // 250)):
        facts.append((_name(rng), rng.choice(_COLOURS), rng.choice(_CITIES), rng.randint(100, 999)))
    parts: list[str] = []
    i = 0
    while sum(len(p) + 1 for p in parts) < num_chars:
        name, colour, city, code = facts[i % len(facts)] if i >= len(facts) else facts[i]
        if i < len(facts):
            parts.append(f"Record {i}: {name} lives in {city}, wears {colour}, and holds code {code}.")
        else:
            template = rng.choice(
                [
                    "Later, {n} from {c} was seen again; the code of {n} is {k}.",
                    "Reminder: {n} holds code {k} and wears {o}.",
                    "As noted, {n} lives in {c} and wears {o}.",
                ]
            )
            parts.append(template.format(n=name, c=city, k=code, o=colour))
        if rng.random() < 0.3:
            parts.append(rng.choice(_FILLER))
        i += 1
    return " ".join(parts)[:num_chars]


def synthetic_documents(num_documents: int = 64, num_chars: int = 2000, seed: int = 0) -> Dataset:
    """A `datasets.Dataset` with a ``text`` column of ``num_documents`` documents of about ``num_chars`` chars."""
    return Dataset.from_dict(
        {"text": [synthetic_document(seed * 100_003 + i, num_chars) for i in range(num_documents)]}
    )
