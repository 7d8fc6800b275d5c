"""RULER multi-document QA (SQuADQA, HotpotQA) scoring and dataset loading.

Scoring follows the ReFINE release (``verl/utils/reward_score/ruler.py``): the response is cut at its first
newline, stripped, control characters become newlines, and the example scores 1 if **any** gold answer is a
case-insensitive substring of what is left, else 0. The dataset score is the mean (in [0, 1]; the paper's tables
show it x100). The paper decodes greedily with at most 32 new tokens and the raw prompt (no chat template, no
special tokens).

Note the cut comes before the strip, as in the release: a response that *starts* with a newline scores 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import datasets

from trl_refine.data import load_any_dataset

__all__ = [
    "load_qa_dataset",
    "postprocess_ruler_response",
    "ruler_qa_accuracy",
    "ruler_qa_score",
]

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_ruler_response(prediction: str) -> str:
    """First line of the prediction, stripped, control characters turned into newlines and stripped again."""
    first = prediction.split("\n")[0].strip()
    return _CONTROL.sub("\n", first).strip()


def ruler_qa_score(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any gold answer is a case-insensitive substring of the prediction's first line, else 0.0."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("ruler_qa_score needs at least one gold answer")
    response = postprocess_ruler_response(prediction).lower()
    return 1.0 if any(str(g).lower() in response for g in golds) else 0.0


def ruler_qa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean of :func:`ruler_qa_score` over a dataset (in [0, 1])."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(ruler_qa_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def load_qa_dataset(
    path_or_hub_id: str | os.PathLike,
    split: str | None = None,
    *,
    name: str | None = None,
    required_columns: Sequence[str] = ("prompt", "answer"),
) -> datasets.Dataset:
    """Load an evaluation set from a local parquet / jsonl / json / csv / arrow file, a directory (saved with
    ``save_to_disk`` or loadable by ``datasets.load_dataset``) or a hub dataset id, and check its columns.

    Args:
        path_or_hub_id: file, directory or hub id.
        split: split to return; may be omitted when there is only one (local files load as ``"train"``).
        name: dataset configuration name (hub datasets / loading scripts only).
        required_columns: columns that must exist; a :class:`ValueError` names the missing ones and lists what is
            available.
    """
    ds = load_any_dataset(os.fspath(path_or_hub_id), split, name)
    missing = [c for c in required_columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"dataset {os.fspath(path_or_hub_id)!r} is missing required column(s) {missing}; "
            f"available columns: {ds.column_names}"
        )
    return ds
