"""Bar charts of scores per task and run (e.g. before / after training), with the spread over the examples."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: error bars: this many standard errors of the mean over the examples (≈ a 95% interval)
ERROR_BAR_SE = 1.96


def standard_error(scores: Sequence[float]) -> float | None:
    """Standard error of the mean of per-example scores (None for fewer than two)."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def result_spread(result: Any) -> dict[str, float]:
    """{task: standard error} from an `evaluate` result that kept its examples (per task when it has several)."""
    if not isinstance(result, Mapping) or "examples" not in result:
        return {}
    by_task: dict[str, list[float]] = {}
    for example in result["examples"]:
        by_task.setdefault(str(example.get("task")), []).append(float(example["score"]))
    name = str(result.get("name") or result.get("task") or "score")
    if len(by_task) == 1:
        se = standard_error(next(iter(by_task.values())))
        return {} if se is None else {name: se}
    return {task: se for task, scores in by_task.items() if (se := standard_error(scores)) is not None}


def _bars(ax, labels, tasks, table, errors, scale: float, digits: int) -> None:
    width = 0.8 / max(len(labels), 1)
    top = 0.0
    for j, lab in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(tasks))]
        values = [table[lab].get(t) for t in tasks]
        ys = [scale * (v or 0.0) for v in values]
        err = [scale * ERROR_BAR_SE * errors.get(lab, {}).get(t, 0.0) for t in tasks]
        bars = ax.bar(xs, ys, width=width, label=lab, yerr=err if any(err) else None, capsize=3)
        for bar, v, e in zip(bars, values, err):
            text = "n/a" if v is None else f"{scale * v:.{digits}f}"
            x = bar.get_x() + bar.get_width() / 2
            ax.annotate(text, (x, bar.get_height() + e), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")  # fmt: skip
            top = max(top, bar.get_height() + e)
    ax.set_ylim(0, max(10.0 if scale == 100 else 1.0, top * 1.15))
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=20 if len(tasks) > 2 else 0, ha="right" if len(tasks) > 2 else "center")
    if len(labels) > 1:
        ax.legend()


def plot_scores(
    labels: Sequence[str],
    tasks: Sequence[str],
    table: Mapping[str, Mapping[str, float | None]],
    path: str | Path,
    title: str,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    extra: tuple[str, Mapping[str, Mapping[str, float | None]]] | None = None,
) -> Path:
    """Grouped bars (×100) of ``table[label][task]``, each bar labelled with its value (a zero is a visible "0.0",
    a missing score "n/a"), with ±``ERROR_BAR_SE``·SE error bars where ``errors[label][task]`` is known.
    ``extra = (y label, {label: {task: value}})`` adds a second panel of raw values (e.g. the answer NLL)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not tasks:
        raise ValueError("nothing to plot: no tasks")
    errors = errors or {}
    panels = 2 if extra is not None else 1
    width = max(4.5, 1.4 * len(tasks) * max(1, len(labels)) / 2 + 2.0)
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    _bars(ax, labels, tasks, table, errors, 100.0, 1)
    ylabel = "score (×100)"
    if any(v for lab in labels for v in errors.get(lab, {}).values()):
        ylabel += f"\nbars: ±{ERROR_BAR_SE}·SE over examples"
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if extra is not None:
        extra_label, extra_table = extra
        _bars(axes[0][1], labels, tasks, extra_table, {}, 1.0, 3)
        axes[0][1].set_ylabel(extra_label)
        axes[0][1].set_title(extra_label.split(" (")[0])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(
    runs: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str,
    extra: tuple[str, Mapping[str, Mapping[str, float | None]]] | None = None,
) -> Path:
    """``runs``: {run label: {task: evaluate result or score}} (e.g. {"before": ..., "after": ...}) -> the bar
    chart, error bars from the results' examples; ``extra`` as in `plot_scores`."""
    labels = list(runs)
    tasks: list[str] = []
    table: dict[str, dict[str, float | None]] = {}
    errors: dict[str, dict[str, float]] = {}
    for lab, per_task in runs.items():
        table[lab], errors[lab] = {}, {}
        for task, result in per_task.items():
            if task not in tasks:
                tasks.append(task)
            table[lab][task] = float(result["score"]) if isinstance(result, Mapping) else float(result)
            spread = result_spread(result)
            if len(spread) == 1:
                errors[lab][task] = next(iter(spread.values()))
    return plot_scores(labels, tasks, table, path, title, errors, extra)
