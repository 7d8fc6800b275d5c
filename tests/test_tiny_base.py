"""The tiny-base pretraining of experiments/tiny_base (issue 13 item 1(a)): its documents, its batches, its
selection rule, and a toy CPU run whose base the replication starts from (``--base``). Toy size: nothing is asserted
about what the model learns."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
sys.path.insert(0, os.path.join(ROOT, "tiny_base"))
sys.path.insert(0, os.path.join(ROOT, "replication"))

import pretrain  # noqa: E402
import replicate  # noqa: E402
import retrieval_data  # noqa: E402


def text(ids):
    return bytes(i - 3 for i in ids if i >= 3).decode()


@pytest.mark.parametrize("kind", retrieval_data.KINDS)
def test_every_answer_byte_is_retrievable_from_earlier_in_the_document(kind):
    rng = random.Random(f"test-{kind}")
    for _ in range(3):
        ids, answer = retrieval_data.document(kind, rng, 900)
        assert len(ids) == len(answer) and ids[-1] == retrieval_data.EOS and sum(answer) > 0
        assert ids[:-1] == retrieval_data.byte_ids(text(ids))
        # each maximal run of answer bytes holds values (7 digits, or a city) stated before the run starts
        runs, start = [], None
        for i, m in enumerate(answer + [0]):
            if m and start is None:
                start = i
            if not m and start is not None:
                runs.append((start, i))
                start = None
        for a, b in runs:
            for value in text(ids[a:b]).split(", "):
                assert value and value in text(ids[:a]), (kind, value)


def test_batches_are_a_function_of_seed_and_index_and_follow_the_curriculum():
    short = pretrain.Batches(0, 4, lambda b: (250, 300))
    ids, kind = short.make(5)
    again, kind2 = pretrain.Batches(0, 4, lambda b: (250, 300)).make(5)
    assert torch.equal(ids, again) and torch.equal(kind, kind2)
    assert not torch.equal(short.make(6)[0][:, :50], ids[:, :50])
    assert set(kind.unique().tolist()) == {0, 1, 2} or set(kind.unique().tolist()) == {1, 2}
    assert ((kind > 0).sum(1) < 1200).all()  # short documents (the RULER kinds have a floor of 760 bytes)


def test_weighted_loss_weights_answer_bytes():
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 12))
    kind = torch.ones_like(ids, dtype=torch.int8)
    kind[:, 8:] = 2
    logits = torch.randn(2, 12, 384)
    plain, text_nll, ans = pretrain.weighted_loss(logits, ids, kind, 1.0)
    heavy, _, ans2 = pretrain.weighted_loss(logits, ids, kind, 10.0)
    assert torch.allclose(ans, ans2)
    expected = (7 * text_nll + 10.0 * 4 * ans) / (7 + 40)  # 7 text targets, 4 answer targets per row
    assert torch.allclose(heavy, expected, atol=1e-5) and not torch.allclose(heavy, plain)


def test_choice_rule():
    r = lambda v, n: {"result": {"V": v}, "params": n}  # noqa: E731
    assert pretrain.choose({"a": r(90, 1), "b": r(45, 2), "c": r(60, 3)}, 20, 80) == "c"
    assert pretrain.choose({"a": r(90, 1), "b": r(5, 2)}, 20, 80) == "a"  # none inside: closest (10 vs 15)
    assert pretrain.choose({"a": r(50, 2), "b": r(50, 1)}, 20, 80) == "b"  # tie: fewer parameters


@pytest.mark.slow
def test_toy_pretraining_then_replication_from_its_base(tmp_path):
    out = tmp_path / "tb"
    choice = pretrain.main(
        ["--out", str(out), "--device", "cpu", "--sweep", "smoke", "--batch", "2", "--steps", "4", "--eval_every", "2",
         "--warmup", "2", "--val_rep", "2", "--val_default", "2", "--start_length", "250", "--max_length", "300"]
    )  # fmt: skip
    assert choice["chosen"] == "h32l1" and (out / "base" / "model.safetensors").exists()
    log = json.loads((out / "base" / "build_log.json").read_text())
    assert [c["step"] for c in log["curve"]] == [2, 4] and log["parity_with_trained_model"]["logits_rel_error"] == 0.0
    rep = tmp_path / "rep"
    cfg = os.path.join(ROOT, "replication", "configs", "smoke.yaml")
    text = replicate.main(
        ["--config", cfg, "--out", str(rep), "--phases", "pretrain,report", "--base", str(out / "base")]
    )
    base = json.loads((rep / "pretrain" / "base" / "result.json").read_text())
    assert base["source"] == str(out / "base") and base["train"]["steps"] == 4
    assert "held-out NTP loss" in text and base["eval"]["heldout_ntp_loss"] > 0


def test_a_staged_mix_is_a_function_of_the_batch_index():
    staged = pretrain.Batches(0, 3, lambda b: (250, 300), mix=lambda b: {"copy": 1.0} if b < 2 else {"kv": 1.0})
    first, later = (text(row.tolist()) for row in (staged.make(1)[0][0], staged.make(2)[0][0]))
    assert "again: " in first and "special magic number" not in first
    assert "special magic number" in later and "again: " not in later
    assert set(retrieval_data.STAGED_MIX[0]) <= set(retrieval_data.KINDS)
    assert set(retrieval_data.STAGED_MIX[1]) <= set(retrieval_data.KINDS)


def test_calibrated_steps_fit_the_time_budget_and_leave_the_models_untouched():
    fields = pretrain.model_fields(32, 1, 1, 64)
    model = pretrain.new_model(fields, "cpu", "reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = type("A", (), {"batch": 2, "max_length": 200, "device": "cpu", "max_minutes": 0.5})()
    from contextlib import nullcontext

    steps = pretrain.calibrate_steps({"m": {"model": model}}, args, nullcontext)
    assert 100 <= steps < 0.5 * 60 / 1e-4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
