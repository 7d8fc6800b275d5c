"""The replication experiment (experiments/replication) end to end at toy size: every phase runs through the
library's public API and the report table is produced. Nothing is asserted about the result (toy size)."""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "replication")
sys.path.insert(0, HERE)

import replicate  # noqa: E402
import tasks  # noqa: E402


def test_held_out_text_is_disjoint_from_train_text():
    train, _ = tasks.passages("train")
    held, _ = tasks.passages("held_out")
    assert train and held
    assert not set(train) & set(held)


def test_eval_grid_is_deterministic_and_covers_every_cell():
    a = tasks.eval_grid(lengths=[800], depths=[0.1, 0.9], per_cell=1, seed=3)
    b = tasks.eval_grid(lengths=[800], depths=[0.1, 0.9], per_cell=1, seed=3)
    assert a["prompt"] == b["prompt"]
    assert sorted(set(a["task"])) == sorted([f"niah_{t}" for t in tasks.NIAH_FAMILIES] + ["doc_qa"])
    assert len(a) == 5 * 2
    for row in a:  # every gold answer is in its prompt: the task is solvable from the context
        assert all(ans in row["prompt"] for ans in row["answer"])


def test_pretraining_stream_yields_distinct_documents_with_answers_in_context():
    stream = tasks.pretraining_stream(0, lengths=[700], dense_fraction=1.0, qa_fraction=0.0, essay_fraction=0.0)
    docs = [next(stream) for _ in range(5)]
    assert len(set(docs)) == 5
    assert all("special magic number for" in d for d in docs)


@pytest.mark.slow
def test_smoke_pipeline_writes_its_tables(tmp_path):
    out = tmp_path / "smoke"
    text = replicate.main(["--config", os.path.join(HERE, "configs", "smoke.yaml"), "--out", str(out)])
    for phase, arms in (
        ("midtrain", replicate.MIDTRAIN_ARMS),
        ("posttrain", replicate.POSTTRAIN_ARMS),
        ("testtime", replicate.TESTTIME_ARMS),
    ):
        assert f"## {phase}" in text
        for arm in arms:
            assert f"| {arm} |" in text
            result = json.loads((out / phase / arm / "seed0.json").read_text())
            assert result["train"]["wall_s"] >= 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["phases"]) == {"midtrain", "posttrain", "testtime"}
    assert (out / "report.md").exists()


def test_paired_difference_interval_and_direction():
    arm = {0: 12.0, 1: 11.0, 2: 13.0, 3: 12.0}
    base = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0, 9: 99.0}  # seed 9 has no pair: ignored
    p = replicate.paired_difference(arm, base)
    assert p["seeds"] == [0, 1, 2, 3] and p["mean"] == pytest.approx(2.0) and p["ahead"] == 4
    half = 3.182 * p["std"] / 2  # t(0.975, df 3) * s / sqrt(4)
    assert p["ci95"] == pytest.approx([2.0 - half, 2.0 + half]) and p["excludes_zero"]
    noisy = replicate.paired_difference({0: 12.0, 1: 8.0, 2: 11.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert not noisy["excludes_zero"] and noisy["ahead"] == 2
    loss = replicate.paired_difference({0: 1.0, 1: 1.1}, {0: 1.2, 1: 1.2}, lower_is_better=True)
    assert loss["ahead"] == 2 and loss["mean"] < 0
    assert replicate.paired_difference({0: 1.0}, {0: 2.0}) is None
