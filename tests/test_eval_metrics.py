"""RULER QA and LongBench scorers: hand-worked cases and the shared parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from trl_refine.eval.longbench import (
    LONGBENCH_TASK_METRICS,
    TREC_CLASSES,
    classification_score,
    code_sim_score,
    count_score,
    f1_score,
    fuzz_ratio,
    indel_ratio,
    longbench_metric_name,
    longbench_score,
    longbench_task_score,
    normalize_answer,
    postprocess_longbench,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
)
from trl_refine.eval.ruler import load_qa_dataset, ruler_qa_accuracy, ruler_qa_score

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RULER_FILES = sorted((DATA / "ruler").glob("*.parquet"))
LONGBENCH_FILES = {t: DATA / "longbench" / f"{t}_16384.parquet" for t in ("trec", "samsum", "lcc", "multifieldqa_en")}
WRONG = "\u2603\u2603"  # shares no character, word or class name with any gold answer

needs_data = pytest.mark.skipif(not RULER_FILES, reason="shared/data not available")


# ---------------------------------------------------------------------------------------------------- RULER QA


def test_ruler_qa_hand_cases():
    assert ruler_qa_score("Frank Lowy", ["Frank Lowy"]) == 1.0
    assert ruler_qa_score("  frank LOWY was born in 1930  ", ["Frank Lowy"]) == 1.0  # case-insensitive substring
    assert ruler_qa_score("Frank", ["Frank Lowy"]) == 0.0  # the gold must be inside the prediction
    assert ruler_qa_score("I think so.\nFrank Lowy", ["Frank Lowy"]) == 0.0  # only the first line counts
    assert ruler_qa_score("\nFrank Lowy", ["Frank Lowy"]) == 0.0  # cut before strip, as in the release
    assert ruler_qa_score("in the 11th century\tmaybe", ["early 11th century", "11th century"]) == 1.0  # any gold
    assert ruler_qa_score("Frank Lowy", "Frank Lowy") == 1.0  # a bare string is one gold
    assert ruler_qa_accuracy(["a b", "c", "B"], [["b"], ["x"], ["b"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ruler_qa_accuracy(["a"], [["a"], ["b"]])


@needs_data
@pytest.mark.parametrize("path", RULER_FILES, ids=lambda p: p.stem)
def test_ruler_gold_scores_one_and_wrong_scores_zero(path):
    ds = load_qa_dataset(path)
    assert len(ds) == 200
    answers = ds["answer"]
    assert ruler_qa_accuracy([a[0] for a in answers], answers) == 1.0
    # a gold answer followed by more text on the same line still counts; on the next line it does not
    assert ruler_qa_accuracy([f"{a[-1]} is the answer" for a in answers], answers) == 1.0
    assert ruler_qa_accuracy([f"Answer:\n{a[0]}" for a in answers], answers) == 0.0
    assert ruler_qa_accuracy([WRONG] * len(answers), answers) == 0.0


def test_load_qa_dataset_formats_and_errors(tmp_path):
    rows = [{"prompt": "p1", "answer": ["a"]}, {"prompt": "p2", "answer": ["b", "c"]}]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_qa_dataset(jsonl)
    assert ds["prompt"] == ["p1", "p2"] and ds["answer"][1] == ["b", "c"]
    pq = tmp_path / "qa.parquet"
    pd.DataFrame(rows).to_parquet(pq)
    assert load_qa_dataset(str(pq))["answer"][0] == ["a"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['prompt', 'answer'\].*question"):
        load_qa_dataset(bad)
    with pytest.raises(FileNotFoundError):
        load_qa_dataset(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_qa_dataset(tmp_path / "x.txt")


# ---------------------------------------------------------------------------------------------------- LongBench


def test_normalize_and_qa_f1_hand_values():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    # "eiffel tower paris" vs "eiffel tower": 2 common, P = 2/3, R = 1 -> F1 = 0.8
    assert qa_f1_score("The Eiffel Tower, Paris", "Eiffel Tower") == pytest.approx(0.8)
    # counts clip: {cat:2, dog:1} & {cat:1, dog:2} = 2 common of 3 and 3 -> 2/3
    assert f1_score(["cat", "cat", "dog"], ["cat", "dog", "dog"]) == pytest.approx(2 / 3)
    assert qa_f1_score("Paris", "London") == 0.0
    assert qa_f1_score("the", "a") == 0.0  # both normalize to nothing
    assert qa_f1_score("South West Ultras fan club.", "south west ultras FAN club") == 1.0


def test_rouge_l_hand_values():
    # the `rouge` package counts distinct words: m = n = 5, union LCS {the, cat, on, mat} = 4 -> F = 0.8
    assert rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level over "."-sentences: hyp {Emilia, is, angry, William, apologizes} (n = 5),
    # ref {Emilia, is, still, angry} (m = 4), union LCS = {Emilia, is, angry} -> P = 3/5, R = 3/4, F = 2/3
    assert rouge_l_score("Emilia is angry. William apologizes.", "Emilia is still angry.") == pytest.approx(
        2 / 3, abs=1e-6
    )
    assert rouge_l_score("identical text here", "identical text here") == pytest.approx(1.0, abs=1e-6)
    assert rouge_l_score("", "something") == 0.0
    assert rouge_l_score("...", "something") == 0.0
    assert rouge_l_score("Cat", "cat") == 0.0  # case-sensitive, like the package


def test_code_similarity_hand_values():
    # LCS("abcd", "abce") = 3 -> 2 * 3 / 8 = 0.75
    assert indel_ratio("abcd", "abce") == pytest.approx(0.75)
    # LCS("kitten", "sitting") = "ittn" = 4 -> 8 / 13 = 0.615 -> fuzz.ratio 62
    assert fuzz_ratio("kitten", "sitting", backend="levenshtein") == 62
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "a") == 0
    # the first line without `, # or // is compared
    assert code_sim_score("# a comment\n\tx = f(y)\nmore", "\tx = f(y)") == 1.0
    assert code_sim_score("\n\nreturn a", "return b") == pytest.approx(fuzz_ratio("return a", "return b") / 100)
    assert code_sim_score("// only\n```", "x = 1", variant="thudm") == 0.0  # no code line -> "" (THUDM)
    # the release keeps the whole response when no line qualifies
    assert code_sim_score("# x = 1", "# x = 1") == 1.0
    assert code_sim_score("# x = 1", "# x = 1", variant="thudm") == 0.0
    assert code_sim_score("x = 1", "x = 1") == 1.0
    assert 0.0 < code_sim_score("x = 10", "x = 1") < 1.0
    with pytest.raises(ValueError, match="thudm"):
        code_sim_score("a", "b", variant="levenshtein")


def test_classification_retrieval_count_hand_values():
    assert classification_score("Other location", "Other location") == 1.0
    assert classification_score("City or Country", "City") == 0.5  # two class names found
    assert classification_score("Country", "City") == 0.0
    # a found class that is a part of the gold (but not the gold) is dropped
    assert classification_score("Date of birth", "Date of birth", all_classes=["Date", "Date of birth"]) == 1.0
    assert len(TREC_CLASSES) == 50
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3, not 5", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    assert count_score("There are 7 unique paragraphs", "7") == 1.0
    assert count_score("7 or 8", "7") == 0.5


def test_task_map_and_first_line_rules():
    expected = {
        "narrativeqa": "qa_f1",
        "qasper": "qa_f1",
        "multifieldqa_en": "qa_f1",
        "hotpotqa": "qa_f1",
        "2wikimqa": "qa_f1",
        "musique": "qa_f1",
        "gov_report": "rouge_l",
        "qmsum": "rouge_l",
        "multi_news": "rouge_l",
        "trec": "classification",
        "triviaqa": "qa_f1",
        "samsum": "rouge_l",
        "lsht": "classification",
        "passage_retrieval_en": "retrieval",
        "passage_count": "count",
        "lcc": "code_sim",
        "repobench-p": "code_sim",
    }
    assert expected == LONGBENCH_TASK_METRICS
    assert longbench_metric_name("longbench/trec") == "classification"
    with pytest.raises(ValueError, match="unknown LongBench task"):
        longbench_score("nope", "x", ["x"])
    with pytest.raises(ValueError, match="jieba"):
        longbench_score("dureader", "x", ["x"])

    assert postprocess_longbench("trec", "\n\nCity\nCountry") == "City"
    assert postprocess_longbench("samsum", "\nA met B.\nDialogue: ...") == "A met B."
    assert postprocess_longbench("hotpotqa", "Paris\nBecause") == "Paris"
    assert postprocess_longbench("multifieldqa_en", "\nParis") == ""  # no leading-newline strip for QA (ReFINE)
    assert postprocess_longbench("gov_report", "a\nb") == "a\nb"
    assert postprocess_longbench("lcc", "\n# c\nx = 1") == "\n# c\nx = 1"
    # the cut matters for the score
    assert longbench_score("samsum", "Emilia is angry.\nWilliam: sorry", ["Emilia is angry."]) == pytest.approx(
        1.0, abs=1e-6
    )
    assert longbench_score("gov_report", "Emilia is angry.\nWilliam sorry", ["Emilia is angry."]) < 1.0
    # max over golds
    assert longbench_score("triviaqa", "Paris", ["London", "paris"]) == 1.0


@needs_data
@pytest.mark.parametrize("task", sorted(LONGBENCH_FILES))
def test_longbench_gold_scores_one_and_wrong_scores_zero(task):
    df = pd.read_parquet(LONGBENCH_FILES[task])
    answers = [list(a) for a in df["answers"]]
    assert set(df["task"]) == {task}
    gold_scores = [longbench_score(task, a[0], a) for a in answers]
    if task == "lcc":
        # a gold line containing `, # or // is skipped: THUDM compares "" and scores 0, the release compares the whole
        # response and scores 1
        commented = [any(c in a[0] for c in ("`", "#", "//")) for a in answers]
        assert sum(commented) == 4
        assert gold_scores == [1.0] * len(answers)
        thudm = [longbench_score(task, a[0], a, code_sim="thudm") for a in answers]
        assert all(s == 0.0 if c else s == 1.0 for s, c in zip(thudm, commented))
    elif task == "samsum":
        # the prediction is stripped, the gold is not: a gold with a trailing space has one more "sentence" (an
        # empty word) in the rouge package's split, so it scores a bit under 1 against itself (as in LongBench)
        padded = [a[0] != a[0].strip() for a in answers]
        assert sum(padded) == 16
        for s, p in zip(gold_scores, padded):
            assert 0.9 < s < 0.999 if p else s == pytest.approx(1.0, abs=1e-6)
    else:
        assert gold_scores == pytest.approx([1.0] * len(answers), abs=1e-6)
    assert longbench_task_score(task, [WRONG] * len(answers), answers) == 0.0
    if task == "trec":  # another example's class scores 0 whenever the classes differ
        for a, b in zip(answers, answers[1:]):
            assert longbench_score(task, b[0], a) == (1.0 if a[0] == b[0] else 0.0)


# ------------------------------------------------------------------- our scores equal the packages' (the release's)


def fuzzywuzzy_without_levenshtein():
    """``fuzzywuzzy.fuzz`` as the release's environment imports it: python-Levenshtein absent -> difflib.
    ``sys.modules`` is restored afterwards, so later importers get the python-Levenshtein build again."""
    import importlib
    import sys
    import warnings

    saved = {m: mod for m, mod in sys.modules.items() if m.startswith("fuzzywuzzy") or m == "Levenshtein"}
    for name in saved:
        del sys.modules[name]
    sys.modules["Levenshtein"] = None  # the import fails, as when it is not installed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("fuzzywuzzy.fuzz")
    finally:
        for name in [m for m in sys.modules if m.startswith("fuzzywuzzy") or m == "Levenshtein"]:
            del sys.modules[name]
        sys.modules.update(saved)


def release_code_line(response: str) -> str:
    """The line the release compares: the first without `, # or //, else the whole response."""
    for line in response.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return response


def code_pairs():
    import random

    rng = random.Random(0)
    pairs = [("kitten", "sitting"), ("\t\tZ_.add_edge(e_u, e_v)", "Z_.add_edge(u, v)"), ("abc", "xyz"), ("", "a")]
    alphabet = "ab c(){}=_.\n#/`xyz"
    for _ in range(2000):
        pairs.append(tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(2)))
    if LONGBENCH_FILES["lcc"].exists():
        df = pd.read_parquet(LONGBENCH_FILES["lcc"])
        golds = [list(a)[0] for a in df["answers"]]
        pairs += list(zip(golds, golds[1:])) + [(g[: len(g) // 2] + "\n# tail", g) for g in golds]
    return pairs


def test_code_sim_release_variant_equals_fuzzywuzzy_with_difflib():
    fuzz = fuzzywuzzy_without_levenshtein()
    assert fuzz.SequenceMatcher.__module__ == "difflib"
    for pred, gold in code_pairs():
        assert fuzz_ratio(pred, gold) == fuzz.ratio(pred, gold)
        assert code_sim_score(pred, gold) == fuzz.ratio(release_code_line(pred), gold) / 100


def test_code_sim_thudm_variant_equals_fuzzywuzzy_with_python_levenshtein():
    pytest.importorskip("Levenshtein")
    from fuzzywuzzy import fuzz

    assert fuzz.SequenceMatcher.__module__ != "difflib"
    differ = 0
    for pred, gold in code_pairs():
        assert fuzz_ratio(pred, gold, backend="levenshtein") == fuzz.ratio(pred, gold)
        differ += fuzz_ratio(pred, gold, backend="difflib") != fuzz.ratio(pred, gold)
    assert differ > 0  # the two variants are different functions: the choice matters


def test_rouge_l_equals_the_rouge_package():
    import rouge

    ref = rouge.Rouge()
    pairs = [
        ("the cat sat on the mat", "the cat is on the mat"),
        ("Emilia is angry. William apologizes.", "Emilia is still angry."),
        ("a b c. d e. f", "f e d. c b a. a"),
    ]
    if LONGBENCH_FILES["samsum"].exists():
        golds = [list(a)[0] for a in pd.read_parquet(LONGBENCH_FILES["samsum"])["answers"]]
        pairs += list(zip(golds, golds[1:]))
    for hyp, gold in pairs:
        assert rouge_l_score(hyp, gold) == ref.get_scores([hyp], [gold], avg=True)["rouge-l"]["f"]
