"""Test-time training with ReFINE: answer every test prompt after a few ReFINE steps on the prompt itself.

    accelerate launch recipes/testtime.py                         # embedded default: CPU, about a minute
    accelerate launch recipes/testtime.py --quick                 # shortened for CI
    accelerate launch recipes/testtime.py --model_name_or_path outputs/posttrain-default   # chain the CPU demos
    accelerate launch --num_processes 4 recipes/testtime.py --config recipes/configs/testtime_delta_net_1.3B.yaml

For each batch of ``batch_size`` prompts: ``steps`` ReFINE passes on the prompts (exact-match reward, 1.0·NTP +
0.4·PPO-clip, n = 8, k = 5, lr 1e-6 by default), greedy answers (≤ ``max_new_tokens``), then the weights are
restored bit-exactly (``reset: batch``, default) or kept (``reset: never``, the official behaviour, one process
only). The same prompts are also answered without adaptation (unless ``--skip_baseline``) and, with
``--baseline_mode sft`` (the embedded default's), after the same steps with next-token prediction alone; the
table and one line saying what it shows are printed and written to ``<output_dir>/testtime_report.md`` (``.json``
has every prediction).
Evaluation sets are split over the processes of an ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from trl import ScriptArguments, TrlParser

from trl_refine.data import load_any_dataset
from trl_refine.eval import generate_niah, get_scorer
from trl_refine.eval.evaluator import DECODING_HELP
from trl_refine.eval.plot import plot_runs
from trl_refine.posttrain import PostTrainConfig, answer_nll
from trl_refine.recipe_utils import (
    ModelArguments,
    answer_nll_config,
    baseline_off,
    before_after_table,
    build_model_and_tokenizer,
    combine_across_processes,
    compare_arms,
    dataset_label,
    evaluate_sharded,
    peft_config_of,
    split_names,
    with_embedded_default,
    write_json,
)
from trl_refine.testtime import TestTimeConfig, TestTimeRefine

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "testtime_default.yaml")


@dataclass
class TesttimeArguments(ScriptArguments):
    """TRL's `trl.ScriptArguments` (``--dataset_name``: test sets, parquet/jsonl/json/csv file(s), comma-separated, or
    Hub ids, None: synthetic; ``--dataset_config``; ``--dataset_test_split``, the split read from Hub datasets and
    folders) plus the recipe's own options."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    task: str | None = field(
        default=None,
        metadata={"help": "Scorer (ruler_qa, niah, a LongBench task). None: the 'task' column, else ruler_qa."},
    )
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate at most this many per set."})
    max_new_tokens: int = field(default=32, metadata={"help": "Answer budget (paper: 32)."})
    decoding: str = field(
        default="greedy",
        metadata={"help": DECODING_HELP},
    )
    batch_size: int = field(default=1, metadata={"help": "Prompts per adaptation + generation batch (official: 8)."})
    skip_baseline: bool = field(default=False, metadata={"help": "Do not also answer without adaptation."})
    baseline_mode: str | None = field(
        default=None,
        metadata={
            "help": "sft: also answer after adapting with next-token prediction alone (nsp_coef = 0: no rollouts; "
            "the same steps, learning rate and seed), reported in a column beside ReFINE. none: ReFINE only."
        },
    )
    answer_nll: bool = field(
        default=False,
        metadata={"help": "Also report the gold answer's NLL with/without adaptation (adapts once more per batch)."},
    )
    output_dir: str = field(default="outputs/testtime", metadata={"help": "Where the report goes."})
    synthetic_examples: int = field(default=16, metadata={"help": "Synthetic default: test examples."})
    synthetic_context_length: int = field(default=700, metadata={"help": "Synthetic default: prompt characters."})
    synthetic_task: str = field(default="single", metadata={"help": "Synthetic default: NIAH task family."})
    quick: bool = field(default=False, metadata={"help": "Shorten for CI: 3 examples, 8 answer tokens, 1 step."})


ARGUMENT_CLASSES = (ModelArguments, TesttimeArguments, TestTimeConfig)  # parsed by main(), in this order
BASELINE_MODES = ("sft",)


def load_sets(script: TesttimeArguments, cfg: TestTimeConfig) -> dict:
    if script.dataset_name is None:
        ds = generate_niah(
            script.synthetic_task,
            num_examples=script.synthetic_examples,
            context_length=script.synthetic_context_length,
            seed=cfg.seed + 2,  # the held-out needles of recipes/posttrain.py's default
        )
        sets = {f"niah_{script.synthetic_task}": ds}
    else:
        sets = {
            dataset_label(name): load_any_dataset(
                name, None if os.path.isfile(name) else script.dataset_test_split, script.dataset_config
            )
            for name in split_names(script.dataset_name)
        }
    if script.max_examples is not None:
        sets = {k: v.select(range(min(script.max_examples, len(v)))) for k, v in sets.items()}
    return sets


class _WithAnswerNLL:
    """Wrap an adapt hook so that, inside each adapted batch, the gold answers' NLL is measured too."""

    def __init__(self, adapter, answers: dict[str, object], nll_config: PostTrainConfig):
        self.adapter, self.answers, self.nll_config = adapter, answers, nll_config
        self.total, self.tokens = 0.0, 0.0

    @contextlib.contextmanager
    def __call__(self, model, tokenizer, prompts):
        ctx = self.adapter(model, tokenizer, prompts) if self.adapter is not None else contextlib.nullcontext()
        with ctx:
            from datasets import Dataset

            rows = Dataset.from_dict({"prompt": list(prompts), "answer": [self.answers[p] for p in prompts]})
            nll = answer_nll(model, tokenizer, rows, self.nll_config)
            self.total += nll["nll"] * nll["tokens"]
            self.tokens += nll["tokens"]
            yield

    @property
    def nll(self) -> float | None:
        """Over all processes (each adapted its own share of the examples)."""
        return combine_across_processes(self.total, self.tokens)


def adaptation_line(name: str, summary: dict) -> str:
    """One report line per adapted arm: what its optimizer steps saw, first step → last (means over batches)."""
    steps = summary["per_step"]
    if not steps:
        return f"\nAdaptation ({name}): no prompt was adapted on ({summary['skipped_prompts']} too short).\n"
    shown = [
        ("ntp_loss", "NTP loss"),
        ("policy_loss", "policy loss"),
        ("reward", "reward"),
        ("grad_norm", "grad norm"),
    ]
    parts = []
    for key, label in shown:
        values = [step.get(key, float("nan")) for step in (steps[0], steps[-1])]
        if all(v == v for v in values):  # skip the stats an arm does not have (NaN: the NTP-only arm's reward)
            parts.append(f"{label} {values[0]:.4g}" + (f" → {values[1]:.4g}" if len(steps) > 1 else ""))
    return (
        f"\nAdaptation ({name}): {summary['batches']} batch(es), {summary['optimizer_steps']} optimizer step(s)"
        + (f" ({len(steps)} per batch, first → last)" if len(steps) > 1 else "")
        + ": "
        + ", ".join(parts)
        + ".\n"
    )


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = with_embedded_default(argv, DEFAULT_CONFIG)  # the embedded CPU default, with any overrides
    parser = TrlParser(ARGUMENT_CLASSES)
    model_args, script, cfg = parser.parse_args_and_config(args=argv)
    script.baseline_mode = baseline_off(script.baseline_mode)
    if script.quick:
        script.synthetic_examples = min(script.synthetic_examples, 3)
        script.max_examples = min(script.max_examples or 3, 3)
        script.max_new_tokens = min(script.max_new_tokens, 8)
        cfg.steps = 1
    if script.baseline_mode is not None and script.baseline_mode not in BASELINE_MODES:
        raise ValueError(
            f"baseline_mode={script.baseline_mode!r}; choose {', '.join(BASELINE_MODES)} (NTP-only adaptation)."
        )
    from accelerate import PartialState

    state = PartialState()
    if cfg.reset == "never" and state.num_processes > 1:
        raise ValueError(
            "reset='never' adapts one model sequentially over the whole test set; run it with one process "
            "(accelerate launch --num_processes 1), or use reset='batch'."
        )
    t0 = time.perf_counter()
    model, tokenizer = build_model_and_tokenizer(model_args, trust_remote_code=script.trust_remote_code, seed=cfg.seed)
    model.to(state.device)
    peft_config = peft_config_of(model_args)  # LoRA adapters only, restored after each batch
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    sets = load_sets(script, cfg)
    for ds in sets.values():
        if script.task is not None or "task" not in ds.column_names:
            get_scorer(script.task or "ruler_qa")
    # the answer NLL uses the post-training tokenization of the gold answer (separator, EOS)
    nll_cfg = answer_nll_config(
        script.output_dir, state.device.type == "cpu", cfg.max_prompt_tokens, cfg.add_special_tokens
    )

    # the runs, in table order: no adaptation, the NTP-only baseline, ReFINE
    arms = {"without": None}
    if script.baseline_mode == "sft":
        arms["with sft"] = TestTimeRefine(dataclasses.replace(cfg, nsp_coef=0.0))
    arms["with"] = TestTimeRefine(cfg)
    if script.skip_baseline:
        del arms["without"]
    results: dict[str, dict] = {run: {} for run in arms}
    nlls: dict[str, dict] = {run: {} for run in arms}
    autocast = contextlib.nullcontext()
    if cfg.mixed_precision is not None:
        dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        autocast = torch.autocast(device_type=state.device.type, dtype=dtype)
    for label, ds in sets.items():
        task = script.task if script.task is not None else (None if "task" in ds.column_names else "ruler_qa")
        answers = {p: a for p, a in zip(ds["prompt"], ds["answer" if "answer" in ds.column_names else "answers"])}
        common = dict(
            max_new_tokens=script.max_new_tokens,
            batch_size=script.batch_size,
            add_special_tokens=cfg.add_special_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            show_progress=False,
            decoding=script.decoding,
            seed=cfg.seed,
        )
        for run, hook in arms.items():
            if script.answer_nll:
                hook = _WithAnswerNLL(hook, answers, nll_cfg)
            with autocast:  # generation in the adaptation's precision (fla's chunk kernels reject fp32)
                results[run][label] = evaluate_sharded(model, tokenizer, ds, task, adapt=hook, name=label, **common)
            if script.answer_nll:
                nlls[run][label] = hook.nll
        if cfg.reset == "never":
            for hook in arms.values():
                if hook is not None:
                    hook.reset_state()  # each test set starts from the loaded weights' optimizer state
    t1 = time.perf_counter()

    if state.is_main_process:
        out = os.path.abspath(script.output_dir)
        os.makedirs(out, exist_ok=True)
        runs_shown = ("without", *(("with sft",) if "with sft" in arms else ()), "with")
        shown = {run: ("with ReFINE" if run == "with" and "with sft" in arms else run) for run in runs_shown}
        labels = tuple(shown.values())
        rows = []
        for label in sets:
            res = results["with"][label]
            score = {shown[run]: results.get(run, {}).get(label, {}).get("score") for run in runs_shown}
            rows.append({"metric": f"{label}: {res['metric']} (×100)", **score})
            if script.answer_nll:
                nll_row = {shown[run]: nlls.get(run, {}).get(label) for run in runs_shown}
                rows.append({"metric": f"{label}: answer NLL (nats/token)", **nll_row, "scale": 1.0, "digits": 3})
        title = (
            f"# Test-time ReFINE: {cfg.steps} step(s) per batch of {script.batch_size}, reset={cfg.reset}\n\n"
            f"Model: {model_args.model_label}; lr {cfg.learning_rate}, "
            f"reward {cfg.nsp_reward}, {cfg.ntp_coef}·NTP + {cfg.nsp_coef}·PPO-clip; {script.decoding} decoding, ≤ "
            f"{script.max_new_tokens} new tokens.\n\n"
        )
        adaptation = {shown[run]: arms[run].summary() for run in runs_shown if arms.get(run) is not None}
        table = before_after_table(rows, labels=labels)
        first = next(iter(sets))
        res = results["with"][first]
        explanation = (
            f"\nWhat you are looking at: {model_args.model_label} answering {first} prompts it never trained on, "
            "without adaptation"
            + (f", after {cfg.steps} NTP-only step(s) on each prompt (with sft)" if "with sft" in arms else "")
            + f" and after {cfg.steps} ReFINE step(s) on each prompt, the weights restored between batches"
            + (", same steps, learning rate and seed. " if "with sft" in arms else ". ")
            + compare_arms(
                res["metric"],
                results.get("without", {}).get(first, {}).get("score"),
                ("sft", results["with sft"][first]["score"]) if "with sft" in arms else None,
                ("ReFINE", res["score"]),
                res["num_examples"],
                before_name="without adaptation",
            )
            + "\n"
        )
        explanation += "".join(adaptation_line(name, summary) for name, summary in adaptation.items())
        with open(os.path.join(out, "testtime_report.md"), "w") as f:
            f.write(title + table + explanation)
        write_json(
            os.path.join(out, "testtime_report.json"),
            {
                "config": cfg.__dict__,
                "results": results,
                "answer_nll": nlls,
                "adaptation": adaptation,
                "seconds": t1 - t0,
            },
        )
        runs = {shown[run]: results[run] for run in runs_shown if results.get(run)}
        extra = None
        if script.answer_nll:
            extra = ("answer NLL (nats/token, lower is better)", {shown[r]: nlls[r] for r in runs_shown if r in nlls})
        plot_runs(runs, os.path.join(out, "testtime_report.png"), f"Test-time ReFINE ({cfg.steps} step(s))", extra)
        print("\n" + title + table + explanation)
        print(f"Report: {os.path.join(out, 'testtime_report.md')} (plot .png; predictions in testtime_report.json)")
        print(f"Total time: {t1 - t0:.0f} s")
    return script.output_dir


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
