"""The evaluation scorers as a Hugging Face `evaluate` module shipped inside the package (no Hub download)."""

from __future__ import annotations

from pathlib import Path

_MODULE_DIR = Path(__file__).resolve().parent / "refine_eval"


def metric_path() -> str:
    """Local path of the ``refine_eval`` module: ``evaluate.load(metric_path(), task)``."""
    return str(_MODULE_DIR)


def load_metric(task: str, **kwargs):
    """``evaluate.load`` of the ``refine_eval`` module for ``task`` (``ruler_qa``, ``niah``, a LongBench task)."""
    import evaluate

    return evaluate.load(metric_path(), task, **kwargs)


__all__ = ["load_metric", "metric_path"]
