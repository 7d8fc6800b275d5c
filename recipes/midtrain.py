"""Mid-training with ReFINE on raw long documents.

    accelerate launch recipes/midtrain.py                                   # embedded default, CPU, minutes
    accelerate launch recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml   # GPU

With no arguments it uses recipes/configs/midtrain_default.yaml: the tiny pretrained reference DeltaNet shipped in
the package (``trl-refine:tiny-needle``; ``--random_model true`` for a random one), its byte-level tokenizer and
synthetic documents generated offline. With ``eval_needles`` > 0 it scores greedy needle accuracy on held-out
needle prompts before and after training, and with ``baseline_mode: ntp`` it also trains a next-token-only arm
(``nsp_coef = 0``) from the same base on the same documents, steps, learning rate and seed, printed as a column
beside ReFINE (``<output_dir>/midtrain_report.md``, ``.json``). Any option of NSPGRPOConfig or of
MidtrainArguments below (TRL's ScriptArguments) or of recipe_utils.ModelArguments (TRL's ModelConfig, random-model
options) can be set in the YAML or on the command line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
from trl import ScriptArguments, TrlParser

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.data import load_any_dataset
from trl_refine.eval import generate_niah
from trl_refine.recipe_utils import (
    ModelArguments,
    answer_nll_config,
    answer_nll_sharded,
    baseline_off,
    before_after_table,
    build_model_and_tokenizer,
    compare_arms,
    evaluate_sharded,
    evaluation_context,
    save_and_publish,
    with_embedded_default,
    write_json,
)
from trl_refine.synthetic import synthetic_documents

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "midtrain_default.yaml")


@dataclass
class MidtrainArguments(ScriptArguments):
    """TRL's `trl.ScriptArguments` (``--dataset_name``: a parquet/jsonl/json/csv file or folder, or a Hub id; None:
    synthetic documents; ``--dataset_config``, ``--dataset_train_split``, and ``--dataset_test_split``, evaluated
    when ``eval_strategy`` is not ``no``) plus the recipe's own options."""

    max_documents: int | None = field(default=None, metadata={"help": "Use at most this many documents."})
    synthetic_documents: int = field(default=64, metadata={"help": "Synthetic documents (embedded default)."})
    synthetic_chars: int = field(default=1500, metadata={"help": "Characters (= byte tokens) per synthetic document."})
    synthetic_format: str = field(
        default="registry",
        metadata={
            "help": "Synthetic documents: registry (facts restated later, trl_refine.synthetic) or needle (a "
            "needle-in-a-haystack prompt followed by its answer, the format of the held-out needle check)."
        },
    )
    eval_needles: int = field(
        default=0,
        metadata={
            "help": "Retrieval check before and after training: greedy needle accuracy on this many held-out "
            "needle prompts (needles no training document has). 0: none."
        },
    )
    eval_needle_chars: int = field(default=700, metadata={"help": "Characters per held-out needle prompt."})
    needle_task: str = field(
        default="single",
        metadata={
            "help": "NIAH family of the needle documents and of the held-out needle check (single, multikey, "
            "multivalue, multiquery)."
        },
    )
    baseline_mode: str | None = field(
        default=None,
        metadata={
            "help": "ntp: also train a next-token-only arm (nsp_coef = 0) from the same base model on the same "
            "documents, steps, learning rate and seed, scored beside ReFINE (needs eval_needles > 0). "
            "none: ReFINE only."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, MidtrainArguments, NSPGRPOConfig)  # parsed by main(), in this order
SYNTHETIC_FORMATS = ("registry", "needle")
BASELINE_MODES = ("ntp",)


def check_script(script: MidtrainArguments) -> None:
    script.baseline_mode = baseline_off(script.baseline_mode)
    if script.synthetic_format not in SYNTHETIC_FORMATS:
        raise ValueError(f"synthetic_format={script.synthetic_format!r}; choose {', '.join(SYNTHETIC_FORMATS)}.")
    if script.baseline_mode is not None:
        if script.baseline_mode not in BASELINE_MODES:
            raise ValueError(f"baseline_mode={script.baseline_mode!r}; choose {', '.join(BASELINE_MODES)}.")
        if script.eval_needles < 1:
            raise ValueError("baseline_mode needs a metric to compare the arms on: set eval_needles > 0.")


def needle_documents(num: int, chars: int, seed: int, task: str = "single") -> datasets.Dataset:
    """Needle prompts followed by their answer(s), as plain documents (the held-out check's format)."""
    ds = generate_niah(task, num_examples=num, context_length=chars, tokenizer=None, haystack="essay", seed=seed)
    return datasets.Dataset.from_dict({"text": [f"{p} {', '.join(a)}." for p, a in zip(ds["prompt"], ds["answer"])]})


def training_documents(script: MidtrainArguments, seed: int, num: int) -> datasets.Dataset:
    if script.synthetic_format == "needle":
        return needle_documents(num, script.synthetic_chars, seed, script.needle_task)
    return synthetic_documents(num, script.synthetic_chars, seed=seed)


def needle_check(trainer, tokenizer, needles: datasets.Dataset, nll_config, stage: str) -> dict:
    """Greedy RULER string_match_all on ``needles`` and the gold answers' NLL (``nll_config``: made before any
    trainer, as a new TrainingArguments resets accelerate's state), under the training precision."""
    with evaluation_context(trainer) as model:
        result = evaluate_sharded(
            model, tokenizer, needles, "niah", max_new_tokens=12, show_progress=False, name=f"needles ({stage})"
        )
        return {"result": result, "answer_nll": answer_nll_sharded(model, tokenizer, needles, nll_config)}


def run_baseline_arm(argv: list[str], script: MidtrainArguments, output_dir: str, train, needles, nll_config) -> dict:
    """Train the next-token-only arm from a fresh copy of the same base model (``argv``'s options otherwise) and
    score it as the main run is scored; nothing of it is saved."""
    overrides = ["--nsp_coef", "0", "--output_dir", os.path.join(output_dir, f"baseline-{script.baseline_mode}")]
    overrides += ["--save_strategy", "no", "--eval_strategy", "no", "--push_to_hub", "false"]
    model_args, _, args = TrlParser(ARGUMENT_CLASSES).parse_args_and_config(args=[*argv, *overrides])
    model, tokenizer = build_model_and_tokenizer(
        model_args, trust_remote_code=getattr(args, "trust_remote_code", False), seed=args.seed
    )
    trainer = NSPGRPOTrainer(model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    return needle_check(trainer, tokenizer, needles, nll_config, f"after {script.baseline_mode}")


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(format="%(message)s")
    logging.getLogger("trl_refine").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    argv = with_embedded_default(argv, DEFAULT_CONFIG)  # the embedded CPU default, with any overrides
    parser = TrlParser(ARGUMENT_CLASSES)
    model_args, script, args = parser.parse_args_and_config(args=argv)
    check_script(script)
    t0 = time.perf_counter()

    model, tokenizer = build_model_and_tokenizer(
        model_args, trust_remote_code=getattr(args, "trust_remote_code", False), seed=args.seed
    )
    evaluate = args.eval_strategy != "no"
    if script.dataset_name is None:
        train = training_documents(script, args.seed, script.synthetic_documents)
        evaluation = training_documents(script, args.seed + 1, 8) if evaluate else None
    else:
        train = load_any_dataset(script.dataset_name, script.dataset_train_split, script.dataset_config)
        evaluation = (
            load_any_dataset(script.dataset_name, script.dataset_test_split, script.dataset_config)
            if evaluate
            else None
        )
    if script.max_documents is not None:
        train = train.select(range(min(script.max_documents, len(train))))

    # held out: a generator seed that no training or evaluation document uses
    needles = nll_config = None
    if script.eval_needles > 0:
        needles = generate_niah(
            script.needle_task,
            num_examples=script.eval_needles,
            context_length=script.eval_needle_chars,
            seed=args.seed + 2,
        )
        nll_config = answer_nll_config(args.output_dir, args.use_cpu, None, False)

    trainer = NSPGRPOTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.accelerator.unwrap_model(trainer.model).to(trainer.accelerator.device)
    before = needle_check(trainer, tokenizer, needles, nll_config, "before") if needles is not None else None
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = needle_check(trainer, tokenizer, needles, nll_config, "after") if needles is not None else None
    baseline = None
    if script.baseline_mode is not None:
        baseline = run_baseline_arm(argv, script, args.output_dir, train, needles, nll_config)
    out = save_and_publish(trainer, tokenizer, dataset_name=script.dataset_name)
    if trainer.accelerator.is_main_process and before is not None:
        write_report(out, model_args, script, args, trainer.state.global_step, before, after, baseline)
    if trainer.accelerator.is_main_process:
        print(f"\nSaved the trained model to {out}")
        print(f"Load it with: AutoModelForCausalLM.from_pretrained({out!r})  (after `import trl_refine`)")
        print(f"Total time: {time.perf_counter() - t0:.0f} s")
    return args.output_dir


def write_report(out: str, model_args, script, args, steps: int, before: dict, after: dict, baseline) -> None:
    """The before / NTP baseline / ReFINE table of the needle check, printed and written to midtrain_report.*"""
    main_label = "after refine" if baseline is not None else "after"
    baseline_label = f"after {script.baseline_mode}"
    labels = ("before", baseline_label, main_label) if baseline is not None else ("before", main_label)
    arms = {"before": before, main_label: after, **({baseline_label: baseline} if baseline is not None else {})}
    metric = before["result"]["metric"]
    rows = [
        {"metric": f"held-out needles: {metric} (×100)", **{k: v["result"]["score"] for k, v in arms.items()}},
        {
            "metric": "held-out needles: answer NLL (nats/token)",
            **{k: v["answer_nll"] for k, v in arms.items()},
            "scale": 1.0,
            "digits": 3,
        },
    ]
    source = script.dataset_name or f"{script.synthetic_documents} synthetic {script.synthetic_format} documents"
    title = (
        f"# Mid-training, {steps} steps on {source}\n\n"
        f"Model: {model_args.model_label}; ReFINE: {args.ntp_coef}·NTP + {args.nsp_coef}·PPO-clip "
        f"({args.nsp_reward} reward), lr {args.learning_rate}; greedy needle answers, ≤ 12 new tokens.\n\n"
    )
    table = before_after_table(rows, labels=labels)
    explanation = (
        f"\nWhat you are looking at: whether mid-training on raw documents changes how well {model_args.model_label} "
        f"retrieves a fact from its context: held-out needle prompts (needles no training document has) before "
        f"training and after {steps} steps"
        + (f" of next-token prediction alone ({script.baseline_mode}) and" if baseline is not None else "")
        + " of ReFINE"
        + (", same documents, steps, learning rate and seed. " if baseline is not None else ". ")
        + compare_arms(
            metric,
            before["result"]["score"],
            (script.baseline_mode, baseline["result"]["score"]) if baseline is not None else None,
            ("ReFINE", after["result"]["score"]),
            after["result"]["num_examples"],
        )
        + "\n"
    )
    with open(os.path.join(out, "midtrain_report.md"), "w") as f:
        f.write(title + table + explanation)
    write_json(
        os.path.join(out, "midtrain_report.json"),
        {"global_step": steps, "before": before, "after": after, "baseline_mode": script.baseline_mode,
         "baseline": baseline},
    )  # fmt: skip
    print("\n" + title + table + explanation)
    print(f"Report: {os.path.join(out, 'midtrain_report.md')} (predictions in midtrain_report.json)")


if __name__ == "__main__":
    main()
