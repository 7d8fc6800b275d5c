"""Mid-training with ReFINE on raw long documents.

    accelerate launch recipes/midtrain.py                                   # embedded default, CPU, minutes
    accelerate launch recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml   # GPU

With no arguments it uses recipes/configs/midtrain_default.yaml: a tiny reference DeltaNet built from a config, a
byte-level tokenizer and synthetic long documents generated offline. Any option of NSPGRPOConfig or of
MidtrainArguments below or of recipe_utils.ModelArguments (model, random-model options) can be set in the YAML or on
the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from trl import TrlParser

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.data import load_any_dataset
from trl_refine.recipe_utils import ModelArguments, build_model_and_tokenizer
from trl_refine.synthetic import synthetic_documents

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "midtrain_default.yaml")


@dataclass
class MidtrainArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "parquet/jsonl/json/csv file or folder, or a Hub id. None: synthetic."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Optional split to evaluate on."})
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
    if script.dataset_name is None:
        train = synthetic_documents(script.synthetic_documents, script.synthetic_chars, seed=args.seed)
        evaluation = synthetic_documents(8, script.synthetic_chars, seed=args.seed + 1) if script.eval_split else None
    else:
        train = load_any_dataset(script.dataset_name, script.dataset_split, script.dataset_config)
        evaluation = (
            load_any_dataset(script.dataset_name, script.eval_split, script.dataset_config)
            if script.eval_split
            else None
        )
    if script.max_documents is not None:
        train = train.select(range(min(script.max_documents, len(train))))

    trainer = NSPGRPOTrainer(
        model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        print(f"\nSaved the trained model to {os.path.abspath(args.output_dir)}")
        print(f"Load it with: AutoModelForCausalLM.from_pretrained({os.path.abspath(args.output_dir)!r})")
    return args.output_dir


if __name__ == "__main__":
    main()
