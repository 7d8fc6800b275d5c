"""The report's bar chart: before/after per task with the spread over the examples, from declared dependencies."""

import math

import matplotlib.image
import pytest

from trl_refine.eval import write_report
from trl_refine.eval.evaluator import _runs_errors
from trl_refine.eval.plot import plot_runs, result_spread, standard_error


def result(name, scores):
    examples = [{"index": i, "task": name, "prediction": "", "answers": [], "score": s} for i, s in enumerate(scores)]
    mean = sum(scores) / len(scores)
    return {
        "name": name,
        "task": name,
        "metric": "m",
        "score": mean,
        "num_examples": len(scores),
        "examples": examples,
    }


def test_standard_error_and_spread():
    assert standard_error([1.0]) is None
    assert standard_error([0.0, 1.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    assert result_spread(result("qa", [0.0, 1.0, 1.0, 0.0])) == {"qa": pytest.approx(math.sqrt(1 / 12))}
    assert result_spread({"score": 0.5}) == {}


def test_report_plots_before_after_with_error_bars(tmp_path):
    runs = {
        "before": {"qa": result("qa", [0.0, 0.0, 1.0, 0.0]), "niah": result("niah", [0.0, 0.0, 0.0])},
        "after": {"qa": result("qa", [1.0, 0.0, 1.0, 1.0]), "niah": result("niah", [0.0, 1.0, 0.0])},
    }
    errors = _runs_errors(runs, ["before", "after"])
    assert errors["before"]["niah"] == 0.0 and errors["after"]["qa"] == pytest.approx(standard_error([1, 0, 1, 1]))
    paths = write_report(runs, tmp_path, name="r", title="t")
    image = matplotlib.image.imread(paths["plot"])
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.01  # bars, labels and axes: not a blank canvas


def test_all_zero_scores_still_draw_a_labelled_chart(tmp_path):
    path = plot_runs({"before": {"qa": 0.0}, "after": {"qa": 0.0}}, tmp_path / "zero.png", "zeros")
    assert path.stat().st_size > 0
