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


_LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


def _load_any(path_or_hub_id: str, split: str | None, name: str | None) -> datasets.Dataset:
    path = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, name=name, split=split)
    elif os.path.isfile(path):
        ext = next((e for e in _LOCAL_BUILDERS if path.lower().endswith(e)), None)
        if ext is None:
            raise ValueError(
                f"cannot load {path!r}: unknown file type (use one of {sorted(_LOCAL_BUILDERS)}, a directory, "
                "or a hub dataset id)"
            )
        loaded = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=path, split=split or "train")
    else:
        looks_local = path.startswith((".", "/", "~")) or any(path.lower().endswith(e) for e in _LOCAL_BUILDERS)
        if looks_local:
            raise FileNotFoundError(f"no such file or directory: {path!r}")
        loaded = datasets.load_dataset(path_or_hub_id, name=name, split=split)

    if isinstance(loaded, datasets.DatasetDict):
        if split is not None:
            if split not in loaded:
                raise ValueError(f"split {split!r} not in {path_or_hub_id!r}; available splits: {list(loaded)}")
            return loaded[split]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise ValueError(f"{path_or_hub_id!r} has several splits {list(loaded)}; pass split=...")
    return loaded


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
    ds = _load_any(os.fspath(path_or_hub_id), split, name)
    missing = [c for c in required_columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"dataset {os.fspath(path_or_hub_id)!r} is missing required column(s) {missing}; "
            f"available columns: {ds.column_names}"
        )
    return ds
