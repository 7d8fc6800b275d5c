"""Greedy generation + scoring for RULER NIAH, RULER QA and LongBench, with a hook for test-time training.

Typical use::

    from trl_refine.eval import evaluate, compare, write_report

    base = evaluate(model, tok, "shared/data/ruler/ruler_squadqa_lact_4096_200_test.parquet", "ruler_qa")
    ttt = evaluate(model, tok, "shared/data/ruler/ruler_squadqa_lact_4096_200_test.parquet", "ruler_qa",
                   adapt=my_ttt, batch_size=1)
    write_report({"base": {"squadqa": base}, "ttt": {"squadqa": ttt}}, "outputs/eval")

The ``adapt`` hook
------------------
``adapt(model, tokenizer, prompts) -> context manager``. :func:`generate_answers` calls it once per batch with
that batch's prompt strings, enters the returned context manager, decodes the batch greedily inside it, and exits
it. Adapt the weights on ``__enter__`` and restore them on ``__exit__``; :func:`restoring` does the restoring::

    @contextlib.contextmanager
    def my_ttt(model, tokenizer, prompts):
        with restoring(model):          # snapshot of the parameters/buffers, put back on exit
            train_on(model, tokenizer, prompts)
            yield

Generation runs under ``torch.no_grad()`` and ``model.eval()`` *inside* the context, so the hook itself may use
autograd and train mode; the model's train/eval flag is restored at the end. Use ``batch_size=1`` for
per-example test-time training.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from trl_refine.conversational import prompts_from_messages
from trl_refine.eval.longbench import LONGBENCH_TASK_METRICS, longbench_scorer
from trl_refine.eval.niah import niah_score, normalize_niah_task
from trl_refine.eval.plot import plot_scores, result_spread
from trl_refine.eval.ruler import load_qa_dataset, ruler_qa_score
from trl_refine.utils import left_pad, model_device, restoring, truncate_prompt

__all__ = [
    "AdaptFn",
    "Scorer",
    "as_eval_dataset",
    "compare",
    "evaluate",
    "generate_answers",
    "get_scorer",
    "restoring",
    "score_predictions",
    "write_report",
]

#: ``scorer(prediction, answers) -> float in [0, 1]``.
Scorer = Callable[[str, Sequence[str]], float]
#: ``adapt(model, tokenizer, prompts) -> context manager`` (see the module docstring).
AdaptFn = Callable[[Any, Any, list[str]], AbstractContextManager]


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if source is None:
            continue
        for i in [source] if isinstance(source, int) else list(source):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return eos_ids[0] if eos_ids else 0


def _can_generate(model: Any) -> bool:
    if not callable(getattr(model, "generate", None)):
        return False
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else True
    except Exception:
        return False


def _hf_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budget: int,
    pad_id: int,
    eos_ids: list[int],
    synced_gpus: bool = False,
    mode: dict | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    from transformers import GenerationConfig

    mode = mode or DECODING_MODES["greedy"]
    config = GenerationConfig(
        max_new_tokens=budget,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        **mode,
    )
    extra = {"synced_gpus": True} if synced_gpus else {}
    rng = contextlib.nullcontext()
    if mode["do_sample"]:  # generate samples from the global RNG: seed it from the batch's generator, then restore it
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices)
    with rng:
        if mode["do_sample"]:
            device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on CUDA
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=device).item()))
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[:, input_ids.shape[1] :]


def _all_processes_done(done: bool, device: torch.device) -> bool:
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _manual_decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    budget: int,
    pad_id: int,
    eos_ids: list[int],
    synced_gpus: bool = False,
    mode: dict | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decoding (greedy or sampled, ``mode``) by re-running the full sequence each step (no cache): works for any
    causal LM forward.
    With ``synced_gpus`` a process that is done keeps making (discarded) steps until every process is done."""
    params = inspect.signature(model.forward).parameters
    takes_positions = "position_ids" in params
    eos = torch.tensor(eos_ids, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    ids, mask, new = input_ids, attention_mask, []
    step = 0
    while True:
        done = step >= budget or bool(finished.all())
        if _all_processes_done(done, input_ids.device) if synced_gpus else done:
            break
        step += 1
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(**kwargs)
        if done:  # a step only to keep the other processes' collectives company
            continue
        logits = out.logits if hasattr(out, "logits") else out[0]
        nxt = _pick_next(logits[:, -1, :], mode or DECODING_MODES["greedy"], generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        new.append(nxt)
        if len(eos):
            finished |= torch.isin(nxt, eos)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
    if not new:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.stack(new, dim=1)


#: evaluation decoding modes: ``greedy`` (the API default, what the paper's text says) and ``release`` (what the
#: release's code does: its validation passes ``do_sample=True`` to ``generate``, overriding its greedy config, so
#: answers are one sample at temperature 1 with transformers' default top-k 50)
DECODING_MODES = {
    "greedy": {"do_sample": False},
    "release": {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
}


#: the ``--decoding`` help of the recipes
DECODING_HELP = (
    "Answer decoding: greedy (default; what the paper's text says) or release (one sample at temperature 1, top-k "
    "50: what the release's evaluation code does; the paper-protocol configs use it)."
)


def _check_decoding(decoding: str) -> dict:
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding={decoding!r} is not one of {', '.join(DECODING_MODES)}")
    return DECODING_MODES[decoding]


def _pick_next(logits: torch.Tensor, mode: dict, generator: torch.Generator | None) -> torch.Tensor:
    """Next token from [B, V] logits: argmax, or a temperature / top-k / top-p sample with ``generator``."""
    if not mode["do_sample"]:
        return logits.argmax(-1)
    logits = logits.float() / mode["temperature"]
    if mode.get("top_k"):
        kth = torch.topk(logits, min(mode["top_k"], logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(-1).to(logits.device)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 32,
    batch_size: int = 8,
    adapt: AdaptFn | None = None,
    *,
    add_special_tokens: bool = False,
    max_prompt_tokens: int | None = None,
    prompt_truncation: str = "middle",
    sort_by_length: bool = True,
    use_generate: bool | None = None,
    show_progress: bool = True,
    desc: str = "generating",
    synced_gpus: bool = False,
    decoding: str = "greedy",
    seed: int = 0,
) -> list[str]:
    """Answers for ``prompts`` (new text only, special tokens removed, in the order of ``prompts``).

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``); ``model.generate`` is used when it can.
        tokenizer: its tokenizer. It is not modified: batches are left-padded here with its pad token (or, without
            one, its EOS token), exactly like ``padding_side="left"``.
        prompts: raw prompt strings (no chat template is applied).
        max_new_tokens: the budget, one int for all prompts or one per prompt. A batch is decoded to its largest
            budget and each answer is cut to its own (greedy decoding makes that identical to a shorter run).
        batch_size: prompts per batch. Models that do not mask left padding need ``batch_size=1``.
        adapt: optional test-time-training hook, ``adapt(model, tokenizer, batch_prompts) -> context manager``,
            called once per batch; the batch is decoded inside the context (see the module docstring).
        add_special_tokens: passed to the tokenizer (default False: the raw prompt, as in the paper).
        max_prompt_tokens: if set, longer prompts are cut to this many tokens as ``prompt_truncation`` says.
        prompt_truncation: ``middle`` (default, LongBench's): keep the first ``max_prompt_tokens // 2`` tokens and
            the last ones; ``end``: keep the first ``max_prompt_tokens`` (the release's prompt cut).
        sort_by_length: batch prompts of similar length together (longest first); results keep the input order.
        use_generate: force ``model.generate`` (True) or the cache-free manual greedy loop (False); default: generate
            when the model supports it.
        show_progress: tqdm progress bar.
        desc: progress-bar label.
        synced_gpus: keep several processes' forward calls in step (FSDP / ZeRO-3 gather parameters in every
            forward): a process whose batch is done keeps stepping until all are; every process must call with the
            same number of batches (`trl_refine.recipe_utils.evaluate_sharded` pads the shards for that).
        decoding: ``greedy`` (default) or ``release`` (one sample at temperature 1, top-k 50: what the release's
            evaluation code does although the paper's text says greedy; see `DECODING_MODES`).
        seed: the sampling seed of ``release`` decoding (batch ``i`` draws from a generator seeded ``seed + i``).
    """
    mode = _check_decoding(decoding)
    truncate_prompt([], None, prompt_truncation)  # a bad value fails before any work
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string")
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * n
    else:
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != n:
            raise ValueError(f"{len(budgets)} token budgets for {n} prompts")
    if any(b < 0 for b in budgets):
        raise ValueError("max_new_tokens must be >= 0")
    if adapt is not None and not callable(adapt):
        raise TypeError("adapt must be a callable adapt(model, tokenizer, prompts) -> context manager")

    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    encoded = [list(ids) for ids in encoded]
    if max_prompt_tokens is not None:
        encoded = [truncate_prompt(ids, max_prompt_tokens, prompt_truncation) for ids in encoded]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt(s) {empty[:10]} tokenize to nothing; cannot generate from an empty prompt")

    order = sorted(range(n), key=lambda i: -len(encoded[i])) if sort_by_length else list(range(n))
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, eos_ids)
    device = model_device(model)
    if use_generate is None:
        use_generate = _can_generate(model)
    decode_fn = _hf_generate if use_generate else _manual_decode
    eos_set = set(eos_ids)

    answers: list[str | None] = [None] * n
    was_training = model.training
    try:
        with tqdm(total=n, desc=desc, disable=not show_progress, unit="ex") as bar:
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch_prompts = [prompts[i] for i in idx]
                budget = max(budgets[i] for i in idx)
                if adapt is not None:
                    ctx = adapt(model, tokenizer, batch_prompts)
                    if not (hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__")):
                        raise TypeError(
                            "adapt(model, tokenizer, prompts) must return a context manager "
                            f"(got {type(ctx).__name__}); decorate a generator with @contextlib.contextmanager"
                        )
                else:
                    ctx = contextlib.nullcontext()
                with ctx:
                    if budget == 0 and not synced_gpus:
                        new_tokens = [[] for _ in idx]
                    else:
                        model.eval()
                        padded = left_pad([encoded[i] for i in idx], pad_id, device)
                        input_ids, attention_mask = padded.input_ids, padded.attention_mask
                        generator = None
                        if mode["do_sample"]:
                            generator = torch.Generator(device=device)
                            generator.manual_seed(seed + start // batch_size)
                        with torch.no_grad():
                            new = decode_fn(
                                model,
                                input_ids,
                                attention_mask,
                                max(budget, 1) if synced_gpus else budget,  # synced: every process steps
                                pad_id,
                                eos_ids,
                                synced_gpus,
                                mode,
                                generator,
                            )
                        new_tokens = new.tolist()
                for row, i in enumerate(idx):
                    toks = new_tokens[row][: budgets[i]]
                    for cut, tok in enumerate(toks):
                        if tok in eos_set:
                            toks = toks[:cut]
                            break
                    answers[i] = tokenizer.decode(toks, skip_special_tokens=True)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return [a if a is not None else "" for a in answers]


# ----------------------------------------------------------------------------------------------------------------
# Datasets and scorers
# ----------------------------------------------------------------------------------------------------------------


def as_eval_dataset(dataset: Any, split: str | None = None, tokenizer: Any = None) -> datasets.Dataset:
    """Turn ``dataset`` into a validated :class:`datasets.Dataset` with ``prompt`` and ``answer``/``answers``.
    With ``tokenizer``, TRL's conversational format is taken too: a ``prompt`` of messages goes through the chat
    template (with the generation prompt), a ``completion`` gives the ``answer`` (`trl_refine.conversational`).

    Accepts a ``Dataset``, a ``DatasetDict`` (with ``split``), a local parquet/jsonl/json/csv path or directory or
    hub id, a pandas ``DataFrame``, a list of dicts or a dict of lists. Raises ``ValueError`` for an empty dataset
    or missing columns, naming what is missing and what is there.
    """
    if isinstance(dataset, (str, os.PathLike)):
        ds = load_qa_dataset(dataset, split=split, required_columns=())
    elif isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"dataset has several splits {list(dataset)}; pass split=...")
            ds = next(iter(dataset.values()))
        else:
            ds = dataset[split]
    elif isinstance(dataset, datasets.Dataset):
        ds = dataset
    elif isinstance(dataset, Mapping):
        ds = datasets.Dataset.from_dict(dict(dataset))
    elif isinstance(dataset, list):
        if not dataset:
            raise ValueError("dataset is empty: nothing to evaluate")
        ds = datasets.Dataset.from_list(dataset)
    elif hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # pandas DataFrame
        ds = datasets.Dataset.from_pandas(dataset, preserve_index=False)
    else:
        raise TypeError(f"unsupported dataset type {type(dataset).__name__}")
    if tokenizer is not None:
        ds = prompts_from_messages(ds, tokenizer)

    missing = []
    if "prompt" not in ds.column_names:
        missing.append("prompt")
    if "answer" not in ds.column_names and "answers" not in ds.column_names:
        missing.append("answer (or answers)")
    if missing:
        raise ValueError(f"dataset is missing required column(s) {missing}; available columns: {ds.column_names}")
    if len(ds) == 0:
        raise ValueError("dataset is empty: nothing to evaluate")
    not_text = [i for i, p in enumerate(ds["prompt"]) if not isinstance(p, str)]
    if not_text:
        first = ds[not_text[0]]["prompt"]
        raise ValueError(
            f"{len(not_text)} prompt(s) of the dataset are not text (e.g. row {not_text[0]}: {first!r}); they would be "
            "scored as the text of that value. Drop or fill those rows (rows: "
            f"{not_text[:10]}{'...' if len(not_text) > 10 else ''})."
        )
    return ds


def _as_answer_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


_RULER_QA_NAMES = {"ruler_qa", "ruler_squadqa", "ruler_hotpotqa", "squadqa"}


def get_scorer(task_or_scorer: str | Callable) -> tuple[str, str, Callable]:
    """Resolve a task name or a callable to ``(task_name, metric_name, scorer)``.

    Names: ``"ruler_qa"`` and any ``"ruler_<x>qa"`` (RULER QA substring match); ``"niah"``, ``"niah_single"``,
    ``"multi-key"``, ... (NIAH ``string_match_all``); the LongBench task names (see
    :data:`~trl_refine.eval.longbench.LONGBENCH_TASK_METRICS`). A callable ``scorer(prediction, answers) -> float``
    is used as is.
    """
    if callable(task_or_scorer):
        name = getattr(task_or_scorer, "__name__", "custom")
        return name, getattr(task_or_scorer, "metric", name), task_or_scorer
    if not isinstance(task_or_scorer, str):
        raise TypeError(f"task_or_scorer must be a task name or a callable, got {type(task_or_scorer).__name__}")
    name = task_or_scorer.strip()
    low = name.lower()
    if low in _RULER_QA_NAMES or (low.startswith("ruler_") and low.endswith("qa")):
        return name, "ruler_qa_substring", ruler_qa_score
    if low == "niah" or "niah" in low or low in ("single", "multikey", "multiquery", "multivalue"):
        if low not in ("niah", "ruler_niah"):
            normalize_niah_task(name)  # validates the name
        return name, "string_match_all", niah_score
    try:
        scorer = longbench_scorer(name)
    except ValueError:
        known = sorted(["ruler_qa", "niah", *LONGBENCH_TASK_METRICS])
        raise ValueError(f"unknown task {task_or_scorer!r}; known: {known}, or pass a scorer callable") from None
    return name, scorer.metric, scorer  # type: ignore[attr-defined]


def _accepts_all_classes(fn: Callable) -> bool:
    try:
        return "all_classes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def score_predictions(
    predictions: Sequence[str],
    answers: Sequence[Any],
    task_or_scorer: str | Callable | None = None,
    *,
    tasks: Sequence[str] | None = None,
    all_classes: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, Any]:
    """Score predictions without a model.

    ``task_or_scorer`` applies to every example; when it is None, ``tasks`` gives each example's task name
    (mixed LongBench tasks, say). Returns ``{"score", "scores", "per_task", "metric"}`` with scores in [0, 1].
    """
    n = len(predictions)
    if n == 0:
        raise ValueError("no predictions to score")
    if len(answers) != n:
        raise ValueError(f"{n} predictions but {len(answers)} answer lists")
    if task_or_scorer is None:
        if tasks is None:
            raise ValueError("pass task_or_scorer, or per-example task names (the dataset's 'task' column)")
        task_names = [str(t) for t in tasks]
        if len(task_names) != n:
            raise ValueError(f"{n} predictions but {len(task_names)} task names")
    else:
        task_names = None
    resolved: dict[str, tuple[str, str, Callable]] = {}
    scores: list[float] = []
    example_tasks: list[str] = []
    for i, (pred, ans) in enumerate(zip(predictions, answers)):
        key = task_names[i] if task_names is not None else "__single__"
        if key not in resolved:
            resolved[key] = get_scorer(task_or_scorer if task_names is None else key)
        name, _, fn = resolved[key]
        golds = _as_answer_list(ans)
        if not golds:
            raise ValueError(f"example {i} has no gold answer")
        kwargs = {}
        if all_classes is not None and all_classes[i] is not None and _accepts_all_classes(fn):
            kwargs["all_classes"] = _as_answer_list(all_classes[i])
        scores.append(float(fn(pred or "", golds, **kwargs)))
        example_tasks.append(name)
    per_task: dict[str, list[float]] = {}
    for t, s in zip(example_tasks, scores):
        per_task.setdefault(t, []).append(s)
    metrics = sorted({m for _, m, _ in resolved.values()})
    return {
        "score": sum(scores) / n,
        "scores": scores,
        "tasks": example_tasks,
        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
        "metric": metrics[0] if len(metrics) == 1 else ",".join(metrics),
    }


def _resolve_length_column(ds: datasets.Dataset, length_column: str | None) -> str | None:
    if length_column is None:
        return None
    if length_column == "auto":
        return "max_gen_tokens" if "max_gen_tokens" in ds.column_names else None
    if length_column not in ds.column_names:
        raise ValueError(f"length_column {length_column!r} not in the dataset; available: {ds.column_names}")
    return length_column


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    task_or_scorer: str | Callable | None = None,
    *,
    max_new_tokens: int | None = 32,
    batch_size: int = 8,
    adapt: AdaptFn | None = None,
    length_column: str | None = "auto",
    split: str | None = None,
    max_examples: int | None = None,
    max_prompt_tokens: int | None = None,
    prompt_truncation: str = "middle",
    add_special_tokens: bool = False,
    use_generate: bool | None = None,
    show_progress: bool = True,
    keep_predictions: bool = True,
    synced_gpus: bool = False,
    name: str | None = None,
    decoding: str = "greedy",
    seed: int = 0,
) -> dict[str, Any]:
    """Generate answers (greedy by default; ``decoding="release"`` samples as the release's code) and score them.

    Args:
        model, tokenizer: the model under test.
        dataset: anything :func:`as_eval_dataset` accepts; needs ``prompt`` and ``answer`` or ``answers``.
        task_or_scorer: a task name or ``scorer(prediction, answers) -> float`` (see :func:`get_scorer`); None
            takes each example's task from the dataset's ``task`` column.
        max_new_tokens: the generation budget and cap (paper: 32 for RULER QA and LongBench; use 128 for NIAH).
            ``None`` means "the dataset's per-example budget only".
        batch_size, adapt, max_prompt_tokens, prompt_truncation, add_special_tokens, use_generate, show_progress: see
            :func:`generate_answers`.
        length_column: per-example budget column; ``"auto"`` uses ``max_gen_tokens`` when present. Each example
            gets ``min(max_new_tokens, row[length_column])``. ``max_answer_length`` (the gold answer's length in
            the data) is honored only when named explicitly, because the paper decodes RULER QA with 32 tokens.
        split: split to use when ``dataset`` is a path, hub id or ``DatasetDict``.
        max_examples: evaluate only the first N examples.
        keep_predictions: include per-example predictions and scores in the result.
        name: label for the result (default: the task name).
        synced_gpus, decoding, seed: see :func:`generate_answers`.

    Returns:
        ``{"name", "task", "metric", "score" (mean in [0, 1]), "num_examples", "per_task", "adapted",
        "max_new_tokens", "length_column", "batch_size", "seconds", "examples" (if keep_predictions)}``.
    """
    ds = as_eval_dataset(dataset, split=split, tokenizer=tokenizer)
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError("max_examples must be >= 1")
        ds = ds.select(range(min(max_examples, len(ds))))
    if task_or_scorer is None and "task" not in ds.column_names:
        raise ValueError(
            f"no task_or_scorer given and the dataset has no 'task' column; available columns: {ds.column_names}"
        )
    if task_or_scorer is not None:
        get_scorer(task_or_scorer)  # fail early on a bad name, before any generation
    else:
        for t in sorted(set(ds["task"])):
            get_scorer(str(t))

    column = _resolve_length_column(ds, length_column)
    if column is None:
        if max_new_tokens is None:
            raise ValueError("max_new_tokens=None needs a per-example budget column (length_column)")
        budgets: int | list[int] = int(max_new_tokens)
    else:
        values = [int(v) for v in ds[column]]
        budgets = values if max_new_tokens is None else [min(int(max_new_tokens), v) for v in values]

    prompts = [str(p) for p in ds["prompt"]]
    answer_col = "answer" if "answer" in ds.column_names else "answers"
    answers = [_as_answer_list(a) for a in ds[answer_col]]

    t0 = time.perf_counter()
    predictions = generate_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=budgets,
        batch_size=batch_size,
        adapt=adapt,
        add_special_tokens=add_special_tokens,
        max_prompt_tokens=max_prompt_tokens,
        prompt_truncation=prompt_truncation,
        use_generate=use_generate,
        show_progress=show_progress,
        synced_gpus=synced_gpus,
        decoding=decoding,
        seed=seed,
        desc=f"eval {name or task_or_scorer or 'dataset'}" + (" (adapt)" if adapt is not None else ""),
    )
    seconds = time.perf_counter() - t0
    scored = score_predictions(
        predictions,
        answers,
        task_or_scorer,
        tasks=ds["task"] if task_or_scorer is None else None,
        all_classes=ds["all_classes"] if "all_classes" in ds.column_names else None,
    )
    if task_or_scorer is None:
        task_label = ",".join(scored["per_task"])
    else:
        task_label = get_scorer(task_or_scorer)[0]
    result: dict[str, Any] = {
        "name": name or task_label,
        "task": task_label,
        "metric": scored["metric"],
        "score": scored["score"],
        "num_examples": len(predictions),
        "per_task": scored["per_task"],
        "adapted": adapt is not None,
        "max_new_tokens": max_new_tokens,
        "length_column": column,
        "batch_size": batch_size,
        "decoding": decoding,
        "seconds": seconds,
    }
    if keep_predictions:
        result["examples"] = [
            {"index": i, "task": t, "prediction": p, "answers": a, "score": s}
            for i, (t, p, a, s) in enumerate(zip(scored["tasks"], predictions, answers, scored["scores"]))
        ]
    return result


# ----------------------------------------------------------------------------------------------------------------
# Comparison and reports
# ----------------------------------------------------------------------------------------------------------------


def _is_result(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "score" in obj and "num_examples" in obj


def _task_scores(obj: Any) -> dict[str, float]:
    """evaluate() result -> {name: score}; {task: result or float} -> {task: score}."""
    if _is_result(obj):
        return {str(obj.get("name") or obj.get("task") or "score"): float(obj["score"])}
    if isinstance(obj, Mapping):
        out = {}
        for task, value in obj.items():
            if _is_result(value):
                out[str(task)] = float(value["score"])
            elif isinstance(value, (int, float)):
                out[str(task)] = float(value)
            else:
                raise TypeError(f"cannot read a score for {task!r} (expected an evaluate() result or a number)")
        return out
    raise TypeError(f"expected an evaluate() result or a mapping of them, got {type(obj).__name__}")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(results_without: Any, results_with: Any, labels: tuple[str, str] = ("without", "with")) -> dict[str, Any]:
    """Side-by-side scores of two runs (e.g. without / with test-time training).

    Each argument is an :func:`evaluate` result or a mapping ``task -> result`` (or ``task -> score``). Returns
    ``{"labels", "rows": [{"task", <label0>, <label1>, "delta"}], "mean": {<label0>, <label1>, "delta"}}``; the
    means are over the tasks present in both runs; scores stay in [0, 1].
    """
    a, b = _task_scores(results_without), _task_scores(results_with)
    if len(a) == 1 and len(b) == 1 and set(a) != set(b):  # two single results: compare them under one name
        b = {next(iter(a)): next(iter(b.values()))}
    l0, l1 = labels
    rows = []
    for task in list(a) + [t for t in b if t not in a]:
        s0, s1 = a.get(task), b.get(task)
        rows.append({"task": task, l0: s0, l1: s1, "delta": None if s0 is None or s1 is None else s1 - s0})
    both = [r for r in rows if r["delta"] is not None]
    m0, m1 = _mean([r[l0] for r in both]), _mean([r[l1] for r in both])
    return {
        "labels": [l0, l1],
        "rows": rows,
        "mean": {l0: m0, l1: m1, "delta": None if m0 is None else m1 - m0},
    }


def _runs_table(results: Any) -> tuple[list[str], list[str], dict[str, dict[str, float | None]]]:
    """Normalize anything write_report accepts to (labels, tasks, {label: {task: score}})."""
    if isinstance(results, Mapping) and "labels" in results and "rows" in results:  # compare() output
        labels = list(results["labels"])
        tasks = [r["task"] for r in results["rows"]]
        table = {lab: {r["task"]: r.get(lab) for r in results["rows"]} for lab in labels}
        return labels, tasks, table
    if _is_result(results) or (
        isinstance(results, Mapping) and all(_is_result(v) or isinstance(v, (int, float)) for v in results.values())
    ):
        scores = _task_scores(results)
        return ["score"], list(scores), {"score": dict(scores)}
    if isinstance(results, Mapping):
        labels, tasks, table = [], [], {}
        for label, run in results.items():
            scores = _task_scores(run)
            labels.append(str(label))
            table[str(label)] = dict(scores)
            tasks.extend(t for t in scores if t not in tasks)
        return labels, tasks, table
    raise TypeError(f"cannot make a report from {type(results).__name__}")


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _markdown(labels: list[str], tasks: list[str], table: dict[str, dict[str, float | None]], title: str) -> str:
    with_delta = len(labels) == 2
    header = ["task", *labels] + (["Δ"] if with_delta else [])
    lines = [f"# {title}", "", "Scores ×100.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name: str, values: list[float | None]) -> str:
        cells = [name, *(_fmt(v) for v in values)]
        if with_delta:
            v0, v1 = values
            cells.append("–" if v0 is None or v1 is None else f"{100 * (v1 - v0):+.1f}")
        return "| " + " | ".join(cells) + " |"

    for task in tasks:
        lines.append(row(task, [table[lab].get(task) for lab in labels]))
    if len(tasks) > 1:
        common = [t for t in tasks if all(table[lab].get(t) is not None for lab in labels)]
        if common:
            lines.append(row("**Avg**", [_mean([table[lab][t] for t in common]) for lab in labels]))
    return "\n".join(lines) + "\n"


def _single_spread(result: Any) -> float | None:
    spread = result_spread(result)
    return next(iter(spread.values())) if len(spread) == 1 else None


def _runs_errors(results: Any, labels: list[str]) -> dict[str, dict[str, float]]:
    """Standard errors over the examples for each (run, task) whose result kept its examples."""
    if _is_result(results):
        return {labels[0]: result_spread(results)}
    if not isinstance(results, Mapping) or "rows" in results:
        return {}
    if labels == ["score"]:  # task -> result
        runs = {"score": results}
    else:
        runs = {str(k): v for k, v in results.items() if isinstance(v, Mapping) and not _is_result(v)}
        runs.update({str(k): {str(k): v} for k, v in results.items() if _is_result(v)})
    errors = {}
    for label, run in runs.items():
        errors[label] = {str(t): se for t, r in run.items() if (se := _single_spread(r)) is not None}
    return errors


def _plot(labels, tasks, table, path: Path, title: str, errors=None) -> Path | None:
    try:
        import matplotlib  # noqa: F401  (a dependency; kept optional for minimal installs)
    except ImportError:
        warnings.warn("matplotlib is not available: skipping the plot (pip install matplotlib)", stacklevel=3)
        return None
    return plot_scores(labels, tasks, table, path, title, errors)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)


def write_report(
    results: Any,
    output_dir: str | os.PathLike,
    *,
    name: str = "report",
    title: str | None = None,
    plot: bool = True,
) -> dict[str, Path | None]:
    """Write ``<name>.json``, ``<name>.md`` (a table, scores ×100) and ``<name>.png`` (a bar chart) to
    ``output_dir``.

    ``results`` may be an :func:`evaluate` result, a mapping ``task -> result``, a mapping
    ``run label -> (task -> result)`` (with two runs the table gets a Δ column and the JSON a ``comparison``), or a
    :func:`compare` output. The plot needs matplotlib; without it the plot is skipped with a warning. Returns the
    written paths (``plot`` is None when skipped).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, tasks, table = _runs_table(results)
    if not tasks:
        raise ValueError("nothing to report: no tasks")
    title = title or name
    payload: dict[str, Any] = {"results": results}
    if len(labels) == 2 and not (isinstance(results, Mapping) and "rows" in results):
        payload["comparison"] = compare(
            {t: v for t, v in table[labels[0]].items() if v is not None},
            {t: v for t, v in table[labels[1]].items() if v is not None},
            labels=(labels[0], labels[1]),
        )
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n")
    md_path = out / f"{name}.md"
    md_path.write_text(_markdown(labels, tasks, table, title))
    errors = _runs_errors(results, labels)
    png_path = _plot(labels, tasks, table, out / f"{name}.png", title, errors) if plot else None
    return {"json": json_path, "markdown": md_path, "plot": png_path}
