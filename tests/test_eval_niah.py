"""Synthetic RULER NIAH generator and scorer."""

from __future__ import annotations

import pytest
import transformers

from trl_refine.eval.niah import (
    NOISE_SENTENCES,
    essay_sentences,
    generate_niah,
    niah_accuracy,
    niah_score,
    normalize_niah_task,
)

TASKS = ("single", "multikey", "multiquery", "multivalue")


def _context(prompt: str) -> str:
    # the template puts the context between the first line and the question
    return prompt.split("\n", 1)[1].rsplit("\nWhat ", 1)[0]


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real fast (Rust) tokenizer, word level, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = set()
    for s in essay_sentences(3000) + list(NOISE_SENTENCES):
        words.update(s.replace(".", " . ").replace(",", " , ").split())
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    a = generate_niah(task, num_examples=3, context_length=2000, seed=7)
    b = generate_niah(task, num_examples=3, context_length=2000, seed=7)
    c = generate_niah(task, num_examples=3, context_length=2000, seed=8)
    assert a.to_list() == b.to_list()
    assert a["prompt"] != c["prompt"]
    assert a["answer"] != c["answer"]
    # examples within one set differ too
    assert len(set(a["prompt"])) == 3


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_needle_lands_at_requested_depth(task, depth):
    ds = generate_niah(task, num_examples=2, context_length=8000, depth=depth, seed=1)
    for ex in ds:
        first_query = ex["query"].split(", and ")[0].split(", ")[0]
        needle = _needle(first_query, ex["answer"][0])
        context = _context(ex["prompt"])
        assert context.count(needle) == 1
        measured = context.index(needle) / (len(context) - len(needle))
        # sentence granularity (~100 of 8000 chars) plus up to 3 other needles sharing the spot
        assert measured == pytest.approx(depth, abs=0.035)
        assert ex["depth"] == pytest.approx(measured, abs=1e-9)


def test_random_depths_are_spread_and_reported():
    ds = generate_niah("single", num_examples=20, context_length=3000, seed=3)
    depths = ds["depth"]
    assert min(depths) < 0.3 and max(depths) > 0.7
    assert all(0.0 <= d <= 1.0 for d in depths)


@pytest.mark.parametrize("haystack", ["essay", "noise", "needle"])
@pytest.mark.parametrize("length", [1000, 6000])
def test_char_length_within_tolerance(haystack, length):
    ds = generate_niah("multikey", num_examples=3, context_length=length, haystack=haystack, seed=2)
    for ex in ds:
        assert ex["length"] == len(ex["prompt"])
        assert ex["length_unit"] == "chars" and ex["target_length"] == length
        # longest that fits: never over, short by less than one haystack sentence (<= 110 chars)
        assert length - 110 <= ex["length"] <= length


def test_token_length_byt5():
    tok = transformers.ByT5Tokenizer()
    ds = generate_niah("multivalue", num_examples=3, context_length=2048, tokenizer=tok, seed=0)
    for ex in ds:
        n = len(tok(ex["prompt"], add_special_tokens=False)["input_ids"])
        assert n == ex["length"] and ex["length_unit"] == "tokens"
        assert 2048 - 110 <= n <= 2048


@pytest.mark.parametrize("task", ["single", "multiquery"])
def test_token_length_fast_tokenizer(word_tokenizer, task):
    ds = generate_niah(task, num_examples=2, context_length=4096, tokenizer=word_tokenizer, depth=0.5, seed=0)
    for ex in ds:
        n = len(word_tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"])
        assert n == ex["length"]
        assert 4096 - 30 <= n <= 4096  # a sentence is ~15 word tokens


def test_task_structure():
    single = generate_niah("single", num_examples=1, context_length=1500, seed=0)[0]
    assert single["prompt"].startswith("A special magic number is hidden within the following text.")
    assert single["prompt"].endswith(
        f"The special magic number for {single['query']} mentioned in the provided text is"
    )
    assert len(single["answer"]) == 1 and single["task"] == "niah_single"

    mk = generate_niah("multikey", num_examples=1, context_length=1500, seed=0)[0]
    assert len(mk["answer"]) == 1
    assert mk["prompt"].count("One of the special magic numbers for ") == 4  # 3 distractor keys
    assert _needle(mk["query"], mk["answer"][0]) in mk["prompt"]

    mv = generate_niah("multivalue", num_examples=1, context_length=1500, seed=0)[0]
    assert len(mv["answer"]) == 4
    assert all(_needle(mv["query"], v) in mv["prompt"] for v in mv["answer"])
    assert mv["prompt"].startswith("Some special magic numbers are hidden")
    assert mv["prompt"].endswith("mentioned in the provided text are")

    mq = generate_niah("multiquery", num_examples=1, context_length=1500, seed=0)[0]
    keys = mq["query"].replace(", and ", ", ").split(", ")
    assert len(keys) == 4 and len(mq["answer"]) == 4
    assert all(_needle(k, v) in mq["prompt"] for k, v in zip(keys, mq["answer"]))

    custom = generate_niah("single", num_examples=1, context_length=800, num_keys=3, num_values=2, seed=0)[0]
    assert len(custom["answer"]) == 2 and custom["prompt"].count("One of the special magic") == 6


def test_haystacks_and_types():
    noise = generate_niah("single", num_examples=1, context_length=1200, haystack="noise")[0]
    assert "The grass is green. The sky is blue." in noise["prompt"]
    needle_hay = generate_niah("single", num_examples=1, context_length=3000, haystack="needle")[0]
    assert needle_hay["prompt"].count("One of the special magic numbers") > 10
    text = "Alpha beta gamma. Delta epsilon zeta! Eta theta iota?"
    custom = generate_niah("single", num_examples=1, context_length=1000, haystack=text)[0]
    assert "Delta epsilon zeta! Eta theta iota? Alpha beta gamma." in custom["prompt"]
    uu = generate_niah("single", num_examples=1, context_length=1200, value_type="uuids", key_type="numbers")[0]
    assert len(uu["answer"][0]) == 36 and uu["query"].isdigit()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_queries"):
        generate_niah("single", num_keys=2, num_queries=3)
    with pytest.raises(ValueError, match="depth"):
        generate_niah("single", depth=1.5)
    with pytest.raises(ValueError, match="too small"):
        generate_niah("multivalue", context_length=200)
    with pytest.raises(ValueError, match="unknown NIAH task"):
        generate_niah("haystack")
    with pytest.raises(ValueError, match="haystack"):
        generate_niah("single", haystack="novel")
    assert normalize_niah_task("MK-NIAH") == "multikey"
    assert normalize_niah_task("niah_multi_query") == "multiquery"
    assert normalize_niah_task("niah_single_2") == "single"


def test_scorer():
    assert niah_score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert niah_score("The numbers are 1234567 and 0000000.", ["1234567", "7654321"]) == 0.5
    assert niah_score("1234567", ["1234567", "7654321"], mode="any") == 1.0
    assert niah_score("1234567", ["1234567", "7654321"], mode="strict") == 0.0
    assert niah_score("nothing", ["1234567"], mode="any") == 0.0
    assert niah_score("key is CALM-ANCHOR", ["calm-anchor"]) == 1.0  # case-insensitive
    assert niah_accuracy(["1", "2"], [["1"], ["3"]]) == 0.5
    with pytest.raises(ValueError, match="mode"):
        niah_score("x", ["x"], mode="fuzzy")
    ds = generate_niah("multiquery", num_examples=4, context_length=1500)
    assert niah_accuracy([" ".join(a) for a in ds["answer"]], ds["answer"]) == 1.0
    assert niah_accuracy([a[0] for a in ds["answer"]], ds["answer"]) == 0.25
