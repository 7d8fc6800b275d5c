"""Mid-training with ReFINE on raw long documents.

    accelerate launch recipes/midtrain.py                                   # embedded default, CPU, minutes
    accelerate launch recipes/midtrain.py --config recipes/configs/midtrain_delta_net_1.3B.yaml   # GPU

With no arguments it uses recipes/configs/midtrain_default.yaml: a tiny reference DeltaNet built from a config, a
byte-level tokenizer and synthetic long documents generated offline. Any option of NSPGRPOConfig or of
MidtrainArguments below can be set in the YAML or on the command line.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer
from trl import TrlParser

from trl_refine import NSPGRPOConfig, NSPGRPOTrainer
from trl_refine.data import load_any_dataset
from trl_refine.synthetic import synthetic_documents

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "midtrain_default.yaml")


@dataclass
class MidtrainArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path. None: a tiny reference DeltaNet built from a config."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Defaults to the model's tokenizer; a byte tokenizer for the tiny model."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "parquet/jsonl/json/csv file or folder, or a Hub id. None: synthetic."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Optional split to evaluate on."})
    max_documents: int | None = field(default=None, metadata={"help": "Use at most this many documents."})
    synthetic_documents: int = field(default=64, metadata={"help": "Synthetic documents (embedded default)."})
    synthetic_chars: int = field(default=1500, metadata={"help": "Characters (= byte tokens) per synthetic document."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Tiny reference DeltaNet: hidden size."})
    tiny_layers: int = field(default=2, metadata={"help": "Tiny reference DeltaNet: layers."})
    tiny_heads: int = field(default=2, metadata={"help": "Tiny reference DeltaNet: heads."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32."})


def build_model_and_tokenizer(script: MidtrainArguments, trust_remote_code: bool = False):
    if script.model_name_or_path is None:
        from trl_refine.models.delta_net import RefDeltaNetConfig, RefDeltaNetForCausalLM

        tokenizer = ByT5Tokenizer()
        config = RefDeltaNetConfig(
            vocab_size=len(tokenizer),
            hidden_size=script.tiny_hidden_size,
            num_hidden_layers=script.tiny_layers,
            num_heads=script.tiny_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        return RefDeltaNetForCausalLM(config), tokenizer
    import fla  # noqa: F401  (registers flash-linear-attention models with the Auto classes)

    import trl_refine.models  # noqa: F401

    dtype = script.torch_dtype if script.torch_dtype == "auto" else getattr(torch, script.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        script.model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(script.tokenizer_name_or_path or script.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(format="%(message)s")
    logging.getLogger("trl_refine").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["--config", DEFAULT_CONFIG]
    parser = TrlParser((MidtrainArguments, NSPGRPOConfig))
    script, args = parser.parse_args_and_config(args=argv)

    model, tokenizer = build_model_and_tokenizer(script, getattr(args, "trust_remote_code", False))
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
