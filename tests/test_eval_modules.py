"""The scorers as an `evaluate` module that loads offline from the package and equals the evaluator's scores."""

from pathlib import Path

import pandas as pd
import pytest

from trl_refine.eval import load_metric, longbench_task_score, score_predictions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"


@pytest.fixture(autouse=True)
def offline_module_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_ruler_and_niah_modules_equal_the_evaluator():
    preds, refs = ["Paris, France", "no idea", "Berlin"], [["paris"], ["rome"], ["Berlin", "Bonn"]]
    got = load_metric("ruler_qa").compute(predictions=preds, references=refs)
    assert got["score"] == pytest.approx(2 / 3) and got["num_examples"] == 3
    assert got["score"] == score_predictions(preds, refs, "ruler_qa")["score"]
    niah = load_metric("niah").compute(predictions=["the value is 123 and 456"], references=[["123", "789"]])
    assert niah["score"] == pytest.approx(0.5) and niah["metric"] == "string_match_all"


@pytest.mark.parametrize("task", ["lcc", "samsum", "trec", "multifieldqa_en"])
def test_longbench_module_equals_longbench_task_score(task):
    path = DATA / f"{task}_16384.parquet"
    if not path.exists():
        pytest.skip("shared LongBench samples not available")
    answers = [list(a) for a in pd.read_parquet(path)["answers"]][:60]
    preds = [a[0] for a in answers[1:]] + [answers[0][0]]  # another example's gold: scores strictly between 0 and 1
    metric = load_metric(task)
    for variant in ("release", "thudm"):
        got = metric.compute(predictions=preds, references=answers, code_sim=variant)["score"]
        assert got == pytest.approx(longbench_task_score(task, preds, answers, code_sim=variant), abs=1e-12)


def test_module_needs_a_task_name():
    import evaluate

    from trl_refine.eval import metric_path

    with pytest.raises(ValueError, match="name the task"):
        evaluate.load(metric_path()).compute(predictions=["a"], references=[["a"]])
