"""LongBench metrics, offline.

The metric definitions follow THUDM/LongBench (``LongBench/metrics.py`` and ``eval.py``), which is what the ReFINE
release scores with (``verl/utils/reward_score/longbench.py``, "taken and slightly modified from THUDM/LongBench").
ROUGE-L is the ``rouge`` package's (as the release), code similarity is ``fuzzywuzzy.fuzz.ratio`` in one of two
named variants (:data:`CODE_SIM_VARIANTS`): ``"release"`` (default), the release's environment, where fuzzywuzzy
0.18 runs without python-Levenshtein and so uses ``difflib.SequenceMatcher``; ``"thudm"``, THUDM LongBench's setup
with python-Levenshtein (the normalized InDel ratio, computed by rapidfuzz). Nothing needs the network.

Every score is in ``[0, 1]``; tables in :mod:`trl_refine.eval.evaluator` multiply by 100 like the paper does.

Prediction post-processing (:func:`postprocess_longbench`), as in the ReFINE release:

* ``trec``, ``triviaqa``, ``samsum``, ``lsht``: leading newlines removed, then cut at the first newline
  (THUDM's rule);
* single- and multi-document QA (``narrativeqa``, ``qasper``, ``multifieldqa_en``, ``hotpotqa``, ``2wikimqa``,
  ``musique``): cut at the first newline (ReFINE's addition; THUDM does not cut these). No leading-newline strip,
  exactly as in the release: an answer that starts with a newline scores 0;
* summarization, code, ``passage_retrieval_en`` and ``passage_count``: not cut.

Then each score is the maximum over the gold answers.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "CODE_SIM_VARIANTS",
    "FUZZ_BACKENDS",
    "FIRST_LINE_TASKS",
    "LONGBENCH_TASK_METRICS",
    "QA_FIRST_LINE_TASKS",
    "TREC_CLASSES",
    "classification_score",
    "code_sim_score",
    "count_score",
    "f1_score",
    "fuzz_ratio",
    "indel_ratio",
    "longbench_metric_name",
    "longbench_score",
    "longbench_scorer",
    "longbench_task_score",
    "normalize_answer",
    "postprocess_longbench",
    "qa_f1_score",
    "retrieval_score",
    "rouge_l_score",
]

# --------------------------------------------------------------------------------------------------------------
# QA F1
# --------------------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation, the articles a/an/the, and collapse whitespace (SQuAD / LongBench)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when nothing overlaps)."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``qa_f1_score``: token F1 after :func:`normalize_answer` (whitespace tokens)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


# --------------------------------------------------------------------------------------------------------------
# ROUGE-L: the ``rouge`` package (pltrdy/rouge 1.0.1), as LongBench and the release call it
# --------------------------------------------------------------------------------------------------------------

_ROUGE = None


def rouge_l_score(prediction: str, reference: str) -> float:
    """ROUGE-L F of the ``rouge`` package: ``Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]``,
    0.0 when the package raises (an empty text), as LongBench's ``rouge_score`` and the release do.

    The package computes *summary-level* ROUGE-L with ``exclusive=True``: sentences split on ``"."``, words on single
    spaces, distinct words counted, so ``"the cat sat on the mat"`` vs ``"the cat is on the mat"`` scores 0.8, not the
    textbook 5/6. Case-sensitive.
    """
    global _ROUGE
    if _ROUGE is None:
        from rouge import Rouge

        _ROUGE = Rouge()
    try:
        return float(_ROUGE.get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except Exception:  # the package raises on texts with no words; LongBench and the release score those 0
        return 0.0


# --------------------------------------------------------------------------------------------------------------
# Classification (TREC), retrieval, count
# --------------------------------------------------------------------------------------------------------------

#: The 50 TREC fine-grained class names as LongBench spells them (its ``all_classes`` for ``trec``; note the
#: truncated "Lasting time of somethin", which is how the data spells it).
TREC_CLASSES: tuple[str, ...] = (
    "Food",
    "Date",
    "Order, rank",
    "Speed",
    "Disease and medicine",
    "Word with a special property",
    "Abbreviation",
    "Language",
    "Letter like a-z",
    "Other entity",
    "Animal",
    "Expression abbreviated",
    "Price",
    "Techniques and method",
    "Musical instrument",
    "Mountain",
    "Currency name",
    "Event",
    "Product",
    "State",
    "Individual",
    "Organ of body",
    "Reason",
    "Manner of an action",
    "City",
    "Religion",
    "Invention, book and other creative piece",
    "Distance, linear measure",
    "Temperature",
    "Postcode or other code",
    "Size, area and volume",
    "Sport",
    "Country",
    "Other location",
    "Lasting time of somethin",
    "Equivalent term",
    "Description of something",
    "Weight",
    "Vehicle",
    "Color",
    "Other number",
    "Definition of something",
    "Element and substance",
    "Description of a person",
    "Symbols and sign",
    "Number of something",
    "Plant",
    "Percent, fraction",
    "Group or organization of person",
    "Title of a person",
)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None) -> float:
    """LongBench ``classification_score``.

    Collect every class name that occurs (case-sensitive substring) in the prediction; drop matches that are
    substrings of the gold class but not the gold class itself; score ``1 / len(matches)`` if the gold class is
    among the matches, else 0. ``all_classes`` defaults to :data:`TREC_CLASSES`.

    LongBench removes items from the list it is iterating over, which skips the element after each removal; that
    quirk is kept so scores match the reference implementation.
    """
    classes = TREC_CLASSES if all_classes is None else all_classes
    matches = [c for c in classes if c in prediction]
    i = 0
    while i < len(matches):  # == `for t in matches: if ...: matches.remove(t)` in the reference
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            del matches[i]
        i += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en): the share of numbers in the prediction that equal the
    gold paragraph id (the ``N`` of ``"Paragraph N"`` in the gold answer)."""
    ids = re.findall(r"Paragraph (\d+)", ground_truth)
    if not ids:
        raise ValueError(f"retrieval gold answer has no 'Paragraph N': {ground_truth!r}")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == ids[0] for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``count_score`` (passage_count): the share of numbers in the prediction equal to the gold count."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


# --------------------------------------------------------------------------------------------------------------
# Code edit similarity
# --------------------------------------------------------------------------------------------------------------


def indel_ratio(a: str, b: str) -> float:
    """Normalized InDel similarity ``1 - indel_distance / (len(a) + len(b))`` = ``2·LCS / (len(a) + len(b))``.

    This is ``Levenshtein.ratio`` (python-Levenshtein is built on rapidfuzz; computed here by rapidfuzz), what
    ``fuzzywuzzy.fuzz.ratio`` uses when python-Levenshtein is installed. It is not difflib's ratio.
    """
    from rapidfuzz.distance import Indel

    return float(Indel.normalized_similarity(a, b))


#: ``fuzz_ratio`` backends: which ratio ``fuzzywuzzy.fuzz.ratio`` ends up using
FUZZ_BACKENDS = ("difflib", "levenshtein")


def fuzz_ratio(a: str, b: str, backend: str = "difflib") -> int:
    """``fuzzywuzzy.fuzz.ratio``: an integer 0..100 (100 if equal, 0 if either is empty, else ``round(100·ratio)``).

    ``backend="difflib"`` (default): ``difflib.SequenceMatcher(None, a, b).ratio()``, fuzzywuzzy without
    python-Levenshtein, as in the ReFINE release's requirements (fuzzywuzzy 0.18, no python-Levenshtein). A
    heuristic (its junk rule), so it can differ from the InDel ratio by many points on long strings.
    ``backend="levenshtein"``: :func:`indel_ratio`, fuzzywuzzy with python-Levenshtein (THUDM LongBench's setup).
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    if backend == "difflib":
        r = difflib.SequenceMatcher(None, a, b).ratio()
    elif backend == "levenshtein":
        r = indel_ratio(a, b)
    else:
        raise ValueError(f"unknown backend {backend!r}; use one of {FUZZ_BACKENDS}")
    return int(round(100 * r))


#: LongBench code-similarity variants: ``release`` (default, the ReFINE release's scoring) and ``thudm``
CODE_SIM_VARIANTS = ("release", "thudm")


def code_sim_score(prediction: str, ground_truth: str, variant: str = "release") -> float:
    """LongBench ``code_sim_score``: the first line of the prediction (leading newlines removed) that contains none
    of ``` ` ```, ``#``, ``//``, compared with :func:`fuzz_ratio`, / 100.

    ``variant="release"`` (default): as the ReFINE release runs it — difflib ratio (its environment has no
    python-Levenshtein), and when no line qualifies the whole response is compared.
    ``variant="thudm"``: THUDM LongBench with python-Levenshtein — InDel ratio, and ``""`` (score 0) when no line
    qualifies.
    """
    if variant not in CODE_SIM_VARIANTS:
        raise ValueError(f"unknown code_sim variant {variant!r}; use one of {CODE_SIM_VARIANTS}")
    line = prediction if variant == "release" else ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth, backend="difflib" if variant == "release" else "levenshtein") / 100


# --------------------------------------------------------------------------------------------------------------
# Task map
# --------------------------------------------------------------------------------------------------------------

#: Task name -> metric name (THUDM's ``dataset2metric``, English tasks plus ``lsht``).
LONGBENCH_TASK_METRICS: dict[str, str] = {
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

_METRIC_FNS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}

#: Tasks cut at their first line after stripping leading newlines (THUDM).
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
#: QA tasks cut at their first line (ReFINE's addition; no leading-newline strip).
QA_FIRST_LINE_TASKS = frozenset({"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique"})

_UNSUPPORTED_ZH = frozenset({"multifieldqa_zh", "dureader", "vcsum", "passage_retrieval_zh"})


def _canonical_task(task: str) -> str:
    name = task.strip()
    for prefix in ("longbench/", "longbench_", "longbench-"):
        if name.lower().startswith(prefix):
            name = name[len(prefix) :]
    if name.endswith("_e"):  # LongBench-E names, same metrics
        name = name[:-2]
    if name in LONGBENCH_TASK_METRICS:
        return name
    if name in _UNSUPPORTED_ZH:
        raise ValueError(f"LongBench task {task!r} needs Chinese word segmentation (jieba) and is not supported")
    raise ValueError(f"unknown LongBench task {task!r}; known tasks: {sorted(LONGBENCH_TASK_METRICS)}")


def longbench_metric_name(task: str) -> str:
    """The metric used for a LongBench task (``qa_f1``, ``rouge_l``, ``classification``, ...)."""
    return LONGBENCH_TASK_METRICS[_canonical_task(task)]


def postprocess_longbench(task: str, prediction: str) -> str:
    """Cut the prediction the way the ReFINE release does before scoring (see the module docstring)."""
    task = _canonical_task(task)
    if task in FIRST_LINE_TASKS:
        return prediction.lstrip("\n").split("\n")[0]
    if task in QA_FIRST_LINE_TASKS:
        return prediction.split("\n")[0]
    return prediction


def longbench_score(
    task: str,
    prediction: str,
    answers: str | Sequence[str],
    all_classes: Sequence[str] | None = None,
    *,
    postprocess: bool = True,
    code_sim: str = "release",
) -> float:
    """Score one prediction for a LongBench task: post-process, then the max of the task metric over the golds.
    ``code_sim`` picks the code-similarity variant of lcc / repobench-p (:func:`code_sim_score`).

    Predictions are stripped before the QA-F1, ROUGE, classification, retrieval and count metrics (as ReFINE does),
    not before code similarity (which strips leading newlines itself).
    """
    task = _canonical_task(task)
    metric = LONGBENCH_TASK_METRICS[task]
    fn = _METRIC_FNS[metric]
    golds = [answers] if isinstance(answers, str) else list(answers)
    if postprocess:
        prediction = postprocess_longbench(task, prediction)
    if metric != "code_sim":
        prediction = prediction.strip()
    if metric == "classification" and task == "lsht" and all_classes is None:
        raise ValueError("lsht needs the example's all_classes")
    best = 0.0
    for gold in golds:
        if metric == "classification":
            score = classification_score(prediction, gold, all_classes)
        elif metric == "code_sim":
            score = code_sim_score(prediction, gold, variant=code_sim)
        else:
            score = fn(prediction, gold)
        best = max(best, score)
    return float(best)


def longbench_scorer(task: str, code_sim: str = "release") -> Callable[..., float]:
    """A ``scorer(prediction, answers, all_classes=None) -> float`` for one LongBench task."""
    canonical = _canonical_task(task)
    if code_sim not in CODE_SIM_VARIANTS:
        raise ValueError(f"unknown code_sim variant {code_sim!r}; use one of {CODE_SIM_VARIANTS}")

    def scorer(prediction: str, answers: str | Sequence[str], all_classes: Sequence[str] | None = None) -> float:
        return longbench_score(canonical, prediction, answers, all_classes, code_sim=code_sim)

    scorer.__name__ = f"longbench_{canonical}"
    scorer.metric = LONGBENCH_TASK_METRICS[canonical]  # type: ignore[attr-defined]
    return scorer


def longbench_task_score(
    task: str,
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    all_classes: Sequence[str] | None = None,
    code_sim: str = "release",
) -> float:
    """Mean score over a dataset (in [0, 1]; LongBench's tables show ``round(100 * mean, 2)``)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return sum(
        longbench_score(task, p, a, all_classes, code_sim=code_sim) for p, a in zip(predictions, answers)
    ) / len(predictions)
