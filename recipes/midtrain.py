"""Mid-training with ReFINE on raw long documents.

    accelerate launch recipes/midtrain.py                                   # embedded default, CPU, minutes
    accelerate launch recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml   # GPU

With no arguments it uses recipes/configs/midtrain_default.yaml: a tiny reference DeltaNet built from a config, a
byte-level tokenizer and synthetic long documents generated offline. Any option of NSPGRPOConfig or of
MidtrainArguments below (TRL's ScriptArguments) or of recipe_utils.ModelArguments (TRL's ModelConfig, random-model
options) can be set in the YAML or on
the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ScriptArguments, TrlParser

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.data import load_any_dataset
from trl_refine.recipe_utils import ModelArguments, build_model_and_tokenizer, save_and_publish
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


ARGUMENT_CLASSES = (ModelArguments, MidtrainArguments, NSPGRPOConfig)  # parsed by main(), in this order


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(format="%(message)s")
    logging.getLogger("trl_refine").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith(("--config", "--model_name_or_path")) for a in argv):
        # the embedded CPU default (tiny model), with any overrides: --max_steps, --tiny_model_type, ...
        argv = ["--config", DEFAULT_CONFIG, *argv]
    parser = TrlParser(ARGUMENT_CLASSES)
    model_args, script, args = parser.parse_args_and_config(args=argv)

    model, tokenizer = build_model_and_tokenizer(
        model_args, trust_remote_code=getattr(args, "trust_remote_code", False), seed=args.seed
    )
    evaluate = args.eval_strategy != "no"
    if script.dataset_name is None:
        train = synthetic_documents(script.synthetic_documents, script.synthetic_chars, seed=args.seed)
        evaluation = synthetic_documents(8, script.synthetic_chars, seed=args.seed + 1) if evaluate else None
    else:
        train = load_any_dataset(script.dataset_name, script.dataset_train_split, script.dataset_config)
        evaluation = (
            load_any_dataset(script.dataset_name, script.dataset_test_split, script.dataset_config)
            if evaluate
            else None
        )
    if script.max_documents is not None:
        train = train.select(range(min(script.max_documents, len(train))))

    trainer = NSPGRPOTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    out = save_and_publish(trainer, tokenizer, dataset_name=script.dataset_name)
    if trainer.accelerator.is_main_process:
        print(f"\nSaved the trained model to {out}")
        print(f"Load it with: AutoModelForCausalLM.from_pretrained({out!r})  (after `import trl_refine`)")
    return args.output_dir


if __name__ == "__main__":
    main()
