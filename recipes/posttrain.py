"""Post-training with ReFINE on prompt/answer data: evaluate, post-train, evaluate again, save.

    accelerate launch recipes/posttrain.py                       # embedded default: CPU, under 2 minutes
    accelerate launch recipes/posttrain.py --quick               # the same, shortened for CI (seconds)
    accelerate launch recipes/posttrain.py --dataset_name ../shared/data/ruler/ruler_squadqa_delta_net_4096_200_test.parquet
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/posttrain.py \\
        --config recipes/configs/posttrain_delta_net_1.3B.yaml                # the paper's setting (8 GPUs)

With no arguments it uses recipes/configs/posttrain_default.yaml: a tiny reference DeltaNet built from a config,
``ByT5Tokenizer()`` and a synthetic needle-in-a-haystack QA set generated offline (train and held-out eval sets
with different needles). ``--posttrain_mode`` picks the row of the paper's post-training table: ``nested``
(Nested ReFINE), ``nested_sft`` (Nested SFT), ``sft`` (SFT), plus ``joint``; ``--baseline_mode`` trains another
row from the same base with the same data, steps, learning rate and seed (the default: ``sft``; ``none`` drops it).
Any option of PostTrainConfig or of PosttrainArguments below or of recipe_utils.ModelArguments can be set in the
YAML or on the command line. The before / baseline / after table and one line saying what it shows are printed and
written to ``<output_dir>/posttrain_report.md`` (and ``.json`` with every prediction).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import datasets
from trl import ScriptArguments, TrlParser

from trl_refine import NSPPostTrainer, PostTrainConfig
from trl_refine.data import load_any_dataset
from trl_refine.eval import generate_niah, get_scorer
from trl_refine.eval.evaluator import DECODING_HELP
from trl_refine.eval.plot import plot_runs
from trl_refine.posttrain import eval_prompt_truncation
from trl_refine.recipe_utils import (
    ModelArguments,
    answer_nll_sharded,
    baseline_off,
    before_after_table,
    build_model_and_tokenizer,
    compare_arms,
    dataset_label,
    evaluate_sharded,
    evaluation_context,
    peft_config_of,
    save_and_publish,
    split_names,
    with_embedded_default,
    write_json,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "posttrain_default.yaml")


@dataclass
class PosttrainArguments(ScriptArguments):
    """TRL's `trl.ScriptArguments` (``--dataset_name``: training data, parquet/jsonl/json/csv file(s), comma-separated,
    or a Hub id, None: synthetic; ``--dataset_config``, ``--dataset_train_split``) plus the recipe's own options."""

    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation sets (comma-separated; each is reported as its own task). None: hold out "
            "num_eval_examples from the training data (they are not trained on)."
        },
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split of Hub evaluation datasets."})
    num_eval_examples: int = field(
        default=32, metadata={"help": "Held-out examples when there is no eval_dataset_name."}
    )
    eval_max_examples: int | None = field(default=None, metadata={"help": "Evaluate at most this many per set."})
    eval_task: str | None = field(
        default=None,
        metadata={
            "help": "Scorer name (ruler_qa, niah, a LongBench task). None: each example's 'task' column, else ruler_qa."
        },
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Answer budget (paper: 32)."})
    eval_decoding: str = field(
        default="greedy",
        metadata={"help": DECODING_HELP},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    skip_eval: bool = field(default=False, metadata={"help": "Train and save only (no before/after evaluation)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Train on at most this many examples."})
    synthetic_train_examples: int = field(default=64, metadata={"help": "Synthetic default: training examples."})
    synthetic_eval_examples: int = field(default=32, metadata={"help": "Synthetic default: held-out examples."})
    synthetic_context_length: int = field(
        default=700, metadata={"help": "Synthetic default: prompt length in characters (= byte tokens)."}
    )
    synthetic_task: str = field(default="single", metadata={"help": "Synthetic default: NIAH task family."})
    baseline_mode: str | None = field(
        default=None,
        metadata={
            "help": "Also post-train this posttrain_mode (e.g. sft) from the same base model with the same data, "
            "steps, learning rate and seed, and report it in a column beside the main run. none: the main run only."
        },
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Shorten everything for CI: 2 steps, 4 tiny examples, 4 eval examples, 8 answer tokens."},
    )


ARGUMENT_CLASSES = (ModelArguments, PosttrainArguments, PostTrainConfig)  # parsed by main(), in this order
MODE_NAMES = {"nested": "Nested ReFINE", "nested_sft": "Nested SFT", "sft": "SFT", "joint": "joint ReFINE + SFT"}


def apply_quick(script: PosttrainArguments, args: PostTrainConfig) -> None:
    script.synthetic_train_examples = min(script.synthetic_train_examples, 4)
    script.synthetic_eval_examples = min(script.synthetic_eval_examples, 4)
    script.num_eval_examples = min(script.num_eval_examples, 4)
    script.eval_max_examples = min(script.eval_max_examples or 4, 4)
    script.max_train_examples = min(script.max_train_examples or 8, 8)
    script.eval_max_new_tokens = min(script.eval_max_new_tokens, 8)
    args.max_steps = 2
    args.logging_steps = 1
    args.save_strategy = "no"


def load_data(script: PosttrainArguments, args: PostTrainConfig, tokenizer):
    """(train dataset, {label: eval dataset})."""
    if script.dataset_name is None:
        common = dict(context_length=script.synthetic_context_length, tokenizer=None, haystack="essay")
        train = generate_niah(
            script.synthetic_task, num_examples=script.synthetic_train_examples, seed=args.seed + 1, **common
        )
        evals = {
            f"niah_{script.synthetic_task}": generate_niah(
                script.synthetic_task, num_examples=script.synthetic_eval_examples, seed=args.seed + 2, **common
            )
        }
        return train, evals
    parts = [
        load_any_dataset(name, script.dataset_train_split, script.dataset_config)
        for name in split_names(script.dataset_name)
    ]
    train = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if script.eval_dataset_name:
        evals = {
            dataset_label(name): load_any_dataset(name, script.eval_split, script.dataset_config)
            for name in split_names(script.eval_dataset_name)
        }
    elif script.skip_eval:
        evals = {}
    else:
        if len(train) <= script.num_eval_examples:
            raise ValueError(
                f"the training data has {len(train)} examples: too few to hold out num_eval_examples="
                f"{script.num_eval_examples}. Pass --eval_dataset_name or lower --num_eval_examples."
            )
        split = train.train_test_split(test_size=script.num_eval_examples, seed=args.seed, shuffle=True)
        train = split["train"]
        evals = {f"{dataset_label(split_names(script.dataset_name)[0])} (held out)": split["test"]}
    return train, evals


def task_of(script: PosttrainArguments, ds: datasets.Dataset):
    if script.eval_task is not None:
        return script.eval_task
    if "task" in ds.column_names:
        return None  # each example's own task
    return "ruler_qa"


def run_eval(model, tokenizer, evals, script, args, stage: str) -> dict:
    max_prompt_tokens, prompt_truncation = eval_prompt_truncation(args)  # prompts cut as training cut them
    out = {}
    for label, ds in evals.items():
        if script.eval_max_examples is not None:
            ds = ds.select(range(min(script.eval_max_examples, len(ds))))
        result = evaluate_sharded(
            model,
            tokenizer,
            ds,
            task_of(script, ds),
            max_new_tokens=script.eval_max_new_tokens,
            batch_size=script.eval_batch_size,
            decoding=script.eval_decoding,
            seed=args.seed,
            add_special_tokens=args.prompt_add_special_tokens,
            max_prompt_tokens=max_prompt_tokens,
            prompt_truncation=prompt_truncation,
            show_progress=False,
            name=f"{label} ({stage})",
        )
        out[label] = {"result": result, "answer_nll": answer_nll_sharded(model, tokenizer, ds, args)}
    return out


def run_baseline_arm(argv: list[str], mode: str, output_dir: str, train, evals) -> dict:
    """Post-train ``mode`` from a fresh copy of the same base model (the options of ``argv`` otherwise: data, steps,
    learning rate, seed) and evaluate it as the main run is evaluated; nothing of it is saved."""
    overrides = ["--posttrain_mode", mode, "--output_dir", os.path.join(output_dir, f"baseline-{mode}")]
    model_args, script, base_args = TrlParser(ARGUMENT_CLASSES).parse_args_and_config(
        args=[*argv, *overrides, "--save_strategy", "no", "--push_to_hub", "false"]
    )
    if script.quick:
        apply_quick(script, base_args)
    model, tokenizer = build_model_and_tokenizer(
        model_args, trust_remote_code=base_args.trust_remote_code, seed=base_args.seed
    )
    trainer = NSPPostTrainer(
        model, args=base_args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config_of(model_args)
    )
    trainer.accelerator.unwrap_model(trainer.model).to(trainer.accelerator.device)
    trainer.train()
    with evaluation_context(trainer) as eval_model:
        return run_eval(eval_model, tokenizer, evals, script, base_args, f"after {mode}")


def explain(model_label: str, script: PosttrainArguments, args: PostTrainConfig, steps: int, before, after, baseline):
    """The report's one line: what the table shows, and how the arms compare on the first evaluation set."""
    first = next(iter(before))
    main_name = MODE_NAMES.get(args.posttrain_mode, args.posttrain_mode)
    base_name = MODE_NAMES.get(script.baseline_mode, script.baseline_mode)
    arms = (
        f"{base_name} (the baseline) and of {main_name}, same data, steps, learning rate and seed"
        if baseline
        else main_name
    )
    comparison = compare_arms(
        before[first]["result"]["metric"],
        before[first]["result"]["score"],
        (base_name, baseline[first]["result"]["score"]) if baseline else None,
        (main_name, after[first]["result"]["score"]),
        after[first]["result"]["num_examples"],
    )
    return (
        f"\nWhat you are looking at: {model_label} on held-out examples of {first} (no training example has their "
        f"answers) before post-training and after {steps} steps of {arms}. {comparison}\n"
    )


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = with_embedded_default(argv, DEFAULT_CONFIG)  # the embedded CPU default, with any overrides
    parser = TrlParser(ARGUMENT_CLASSES)
    model_args, script, args = parser.parse_args_and_config(args=argv)
    script.baseline_mode = baseline_off(script.baseline_mode)
    if script.quick:
        apply_quick(script, args)
    t0 = time.perf_counter()

    model, tokenizer = build_model_and_tokenizer(model_args, trust_remote_code=args.trust_remote_code, seed=args.seed)
    train, evals = load_data(script, args, tokenizer)
    if script.max_train_examples is not None:
        train = train.select(range(min(script.max_train_examples, len(train))))
    for ds in evals.values():  # fail on a bad scorer name or missing columns before any work
        if task_of(script, ds) is not None:
            get_scorer(task_of(script, ds))
    peft_config = peft_config_of(model_args)

    # the trainer validates and tokenizes the data (bad input fails here, before any evaluation)
    trainer = NSPPostTrainer(
        model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    main_process = trainer.accelerator.is_main_process
    trainer.accelerator.unwrap_model(trainer.model).to(trainer.accelerator.device)

    # evaluation under the training precision, in step across processes under FSDP / ZeRO-3 (recipe_utils)
    with evaluation_context(trainer) as eval_model:
        before = {} if script.skip_eval else run_eval(eval_model, tokenizer, evals, script, args, "before")
    t1 = time.perf_counter()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    t2 = time.perf_counter()
    with evaluation_context(trainer) as eval_model:
        after = {} if script.skip_eval else run_eval(eval_model, tokenizer, evals, script, args, "after")
    t3 = time.perf_counter()
    baseline = {}
    if script.baseline_mode is not None and before:
        baseline = run_baseline_arm(argv, script.baseline_mode, args.output_dir, train, evals)
    t4 = time.perf_counter()

    out = save_and_publish(trainer, tokenizer, dataset_name=script.dataset_name)
    if main_process:
        if before:
            main_label = f"after {args.posttrain_mode}" if baseline else "after"
            baseline_label = f"after {script.baseline_mode}"
            labels = ("before", baseline_label, main_label) if baseline else ("before", main_label)
            rows = []
            for label in evals:
                metric = before[label]["result"]["metric"]
                score = {"before": before[label]["result"]["score"], main_label: after[label]["result"]["score"]}
                nll_row = {"before": before[label]["answer_nll"], main_label: after[label]["answer_nll"]}
                if baseline:
                    score[baseline_label] = baseline[label]["result"]["score"]
                    nll_row[baseline_label] = baseline[label]["answer_nll"]
                rows.append({"metric": f"{label}: {metric} (×100)", **score})
                rows.append({"metric": f"{label}: answer NLL (nats/token)", **nll_row, "scale": 1.0, "digits": 3})
            n_eval = {label: after[label]["result"]["num_examples"] for label in evals}
            title = (
                f"# Post-training ({args.posttrain_mode}), {trainer.state.global_step} steps\n\n"
                f"Model: {model_args.model_label}; "
                f"eval examples: {n_eval}; {script.eval_decoding} decoding, ≤ {script.eval_max_new_tokens} new tokens.\n\n"
            )
            table = before_after_table(rows, labels=labels)
            steps = trainer.state.global_step
            explanation = explain(model_args.model_label, script, args, steps, before, after, baseline)
            with open(os.path.join(out, "posttrain_report.md"), "w") as f:
                f.write(title + table + explanation)
            write_json(
                os.path.join(out, "posttrain_report.json"),
                {
                    "posttrain_mode": args.posttrain_mode,
                    "global_step": trainer.state.global_step,
                    "inner_optimizer_steps": trainer.inner_optimizer_steps,
                    "seconds": {"eval_before": t1 - t0, "train": t2 - t1, "eval_after": t3 - t2, "baseline": t4 - t3},
                    "before": before,
                    "after": after,
                    "baseline_mode": script.baseline_mode,
                    "baseline": baseline,
                },
            )
            stages = (("before", before), *(((baseline_label, baseline),) if baseline else ()), (main_label, after))
            runs = {stage: {label: res[label]["result"] for label in evals} for stage, res in stages}
            nll = {stage: {label: res[label]["answer_nll"] for label in evals} for stage, res in stages}
            plot_runs(
                runs,
                os.path.join(out, "posttrain_report.png"),
                f"Post-training ({args.posttrain_mode})",
                extra=("answer NLL (nats/token, lower is better)", nll),
            )
            print("\n" + title + table + explanation)
            print(
                f"Report: {os.path.join(out, 'posttrain_report.md')} (plot .png; predictions in posttrain_report.json)"
            )
        print(f"\nSaved the post-trained model to {out}")
        print(f"Load it with: AutoModelForCausalLM.from_pretrained({out!r})  (after `import trl_refine`)")
        print(f"Total time: {time.perf_counter() - t0:.0f} s (training {t2 - t1:.0f} s)")
    return args.output_dir


if __name__ == "__main__":
    main()
