"""Greedy evaluator, adapt hook and reports, with a tiny random Llama and the byte-level ByT5 tokenizer."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from trl_refine.eval import compare, evaluate, generate_answers, restoring, write_report
from trl_refine.eval.niah import generate_niah

RULER_QA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ruler" / "ruler_squadqa_lact_4096_200_test.parquet"
)
PROMPTS = ["Question: who?\nAnswer:", "The sky is", "a", "0123456789 " * 5]


@pytest.fixture(scope="module")
def tok():
    return transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # make EOS rare so answers have some length
        m.lm_head.weight[tok.eos_token_id].zero_()
    return m.eval()


def manual_greedy(model, tok, prompt: str, budget: int) -> str:
    """Reference: one prompt, no padding, full forward each step, argmax, stop at EOS."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(budget):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_generate_answers_returns_strings_in_order(model, tok):
    answers = generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, show_progress=False)
    assert isinstance(answers, list) and len(answers) == len(PROMPTS)
    assert all(isinstance(a, str) for a in answers)
    assert any(answers)
    assert generate_answers(model, tok, [], show_progress=False) == []
    with pytest.raises(TypeError):
        generate_answers(model, tok, "a single string", show_progress=False)


@pytest.fixture(scope="module")
def expected8(model, tok):
    return [manual_greedy(model, tok, p, 8) for p in PROMPTS]


@pytest.mark.parametrize("use_generate", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_matches_manual_argmax(model, tok, expected8, use_generate, batch_size):
    budget = 8
    expected = expected8
    got = generate_answers(
        model,
        tok,
        PROMPTS,
        max_new_tokens=budget,
        batch_size=batch_size,
        use_generate=use_generate,
        show_progress=False,
    )
    assert got == expected


def test_per_prompt_budgets(model, tok):
    budgets = [1, 5, 0, 3]
    got = generate_answers(model, tok, PROMPTS, max_new_tokens=budgets, batch_size=4, show_progress=False)
    assert got == [manual_greedy(model, tok, p, b) for p, b in zip(PROMPTS, budgets)]
    assert got[2] == ""
    with pytest.raises(ValueError, match="budgets"):
        generate_answers(model, tok, PROMPTS, max_new_tokens=[1, 2], show_progress=False)


def test_adapt_hook_called_per_batch_and_restored(model, tok):
    calls, events = [], []
    before = {k: v.clone() for k, v in model.state_dict().items()}

    @contextlib.contextmanager
    def adapt(m, t, prompts):
        assert m is model and t is tok
        calls.append(list(prompts))
        with restoring(m):
            events.append("enter")
            m.train()
            # the hook may use autograd: one SGD step on the prompts
            ids = t(prompts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            with torch.no_grad():
                for p in m.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-50.0)
                        p.grad = None
            yield
            assert not m.training  # generation ran in eval mode
            events.append("exit")

    prompts = PROMPTS + ["one more prompt"]
    adapted = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=2, adapt=adapt, show_progress=False)
    assert len(calls) == 3 and events == ["enter", "exit"] * 3
    assert sorted(p for batch in calls for p in batch) == sorted(prompts)
    assert all(len(batch) <= 2 for batch in calls)
    for k, v in model.state_dict().items():  # weights restored after each batch
        assert torch.equal(v, before[k]), k
    plain = generate_answers(model, tok, prompts, max_new_tokens=8, batch_size=2, show_progress=False)
    assert adapted != plain  # the adaptation did change the generations

    with pytest.raises(TypeError, match="context manager"):
        generate_answers(model, tok, PROMPTS, adapt=lambda m, t, p: None, show_progress=False)


def test_evaluate_in_memory_and_per_example_budget(model, tok):
    expected = [manual_greedy(model, tok, p, 3) for p in PROMPTS[:2]]
    rows = [
        {"prompt": PROMPTS[0], "answer": [expected[0] or "x"], "max_gen_tokens": 3},
        {"prompt": PROMPTS[1], "answer": ["\u2603"], "max_gen_tokens": 100},
    ]
    res = evaluate(model, tok, rows, "ruler_qa", max_new_tokens=3, batch_size=2, show_progress=False)
    assert res["num_examples"] == 2 and res["metric"] == "ruler_qa_substring"
    assert [e["prediction"] for e in res["examples"]] == expected  # min(3, max_gen_tokens)
    assert res["length_column"] == "max_gen_tokens"
    assert res["score"] == pytest.approx(sum(e["score"] for e in res["examples"]) / 2)
    assert res["examples"][1]["score"] == 0.0

    seen = []

    def scorer(prediction, answers):
        seen.append((prediction, answers))
        return 1.0

    res = evaluate(
        model, tok, {"prompt": PROMPTS, "answers": [["a"]] * 4}, scorer, max_new_tokens=2, show_progress=False
    )
    assert res["score"] == 1.0 and len(seen) == 4 and res["length_column"] is None
    assert seen[0] == (manual_greedy(model, tok, PROMPTS[0], 2), ["a"])


def test_evaluate_per_example_tasks_and_niah(model, tok):
    rows = [
        {"prompt": "Type:", "answers": ["City"], "task": "trec"},
        {"prompt": "Answer:", "answers": ["Paris"], "task": "hotpotqa"},
    ]
    res = evaluate(model, tok, rows, None, max_new_tokens=4, show_progress=False)
    assert set(res["per_task"]) == {"trec", "hotpotqa"}
    with pytest.raises(ValueError, match="'task' column"):
        evaluate(model, tok, [{"prompt": "p", "answer": ["a"]}], None, show_progress=False)

    ds = generate_niah("single", num_examples=2, context_length=400)
    res = evaluate(model, tok, ds, "niah_single", max_new_tokens=4, keep_predictions=False, show_progress=False)
    assert 0.0 <= res["score"] <= 1.0 and "examples" not in res and res["metric"] == "string_match_all"


@pytest.mark.skipif(not RULER_QA.exists(), reason="shared/data not available")
def test_evaluate_shared_parquet_path(model, tok):
    res = evaluate(
        model,
        tok,
        str(RULER_QA),
        "ruler_qa",
        max_new_tokens=4,
        max_examples=3,
        max_prompt_tokens=128,
        show_progress=False,
    )
    assert res["num_examples"] == 3 and 0.0 <= res["score"] <= 1.0
    assert all(len(e["answers"]) >= 1 for e in res["examples"])


def test_bad_input_fails_early(tok):
    # model=None: these must fail before any generation is attempted
    with pytest.raises(ValueError, match="empty"):
        evaluate(None, tok, [], "ruler_qa")
    with pytest.raises(ValueError, match="empty"):
        evaluate(None, tok, datasets.Dataset.from_dict({"prompt": [], "answer": []}), "ruler_qa")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['answer \(or answers\)'\].*question"):
        evaluate(None, tok, [{"prompt": "p", "question": "q"}], "ruler_qa")
    with pytest.raises(ValueError, match=r"missing.*'prompt'"):
        evaluate(None, tok, [{"input": "p", "answer": ["a"]}], "ruler_qa")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(None, tok, [{"prompt": "p", "answer": ["a"]}], "not_a_task")
    with pytest.raises(ValueError, match="length_column"):
        evaluate(None, tok, [{"prompt": "p", "answer": ["a"]}], "ruler_qa", length_column="max_answer_length")


def test_compare_and_write_report(tmp_path):
    def result(score, name):
        return {"name": name, "task": name, "score": score, "num_examples": 10, "examples": []}

    without = {"squadqa": result(0.127, "squadqa"), "hotpotqa": result(0.157, "hotpotqa")}
    with_ = {"squadqa": result(0.27, "squadqa"), "hotpotqa": result(0.23, "hotpotqa"), "extra": result(0.5, "extra")}
    cmp = compare(without, with_, labels=("base", "refine"))
    rows = {r["task"]: r for r in cmp["rows"]}
    assert rows["squadqa"]["delta"] == pytest.approx(0.143)
    assert rows["extra"]["base"] is None and rows["extra"]["delta"] is None
    assert cmp["mean"]["base"] == pytest.approx(0.142) and cmp["mean"]["refine"] == pytest.approx(0.25)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report({"base": without, "refine": with_}, tmp_path / "out", name="qa", title="RULER QA")
    data = json.loads(paths["json"].read_text())
    assert data["comparison"]["rows"][0]["delta"] == pytest.approx(0.143)
    assert data["results"]["base"]["squadqa"]["score"] == 0.127
    md = paths["markdown"].read_text()
    assert "| task | base | refine | Δ |" in md
    assert "| squadqa | 12.7 | 27.0 | +14.3 |" in md
    assert "| **Avg** | 14.2 | 25.0 | +10.8 |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["plot"] is None
        assert any("matplotlib" in str(w.message) for w in caught)
    else:
        assert paths["plot"].exists() and paths["plot"].stat().st_size > 0

    # a compare() output and a single result are accepted too
    p2 = write_report(cmp, tmp_path / "out2", plot=False)
    assert "| hotpotqa | 15.7 | 23.0 | +7.3 |" in p2["markdown"].read_text() and p2["plot"] is None
    p3 = write_report(result(0.5, "trec"), tmp_path / "out3", plot=False)
    assert "| trec | 50.0 |" in p3["markdown"].read_text()


def test_prompt_truncation_end_keeps_the_start_of_the_prompt(model, tok):
    """``prompt_truncation="end"`` (post-training's truncate_end, the release's cut) keeps the first
    ``max_prompt_tokens``; the default ``middle`` keeps both ends."""
    prompt = "abcdefghij" * 3
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0][0].tolist()))
    try:
        for how in ("end", "middle"):
            generate_answers(
                model,
                tok,
                [prompt],
                max_new_tokens=1,
                batch_size=1,
                max_prompt_tokens=8,
                prompt_truncation=how,
                use_generate=False,
                show_progress=False,
            )
    finally:
        handle.remove()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert seen == [ids[:8], ids[:4] + ids[-4:]]
    with pytest.raises(ValueError, match="prompt_truncation='start' is not one of middle, end"):
        generate_answers(model, tok, [prompt], prompt_truncation="start", show_progress=False)
