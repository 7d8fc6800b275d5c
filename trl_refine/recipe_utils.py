"""Small helpers shared by the post-training and test-time recipes: model/tokenizer loading, dataset lists,
evaluation sharded over the processes of an ``accelerate launch``, and before/after tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import torch
from trl import ModelConfig

from trl_refine.model_loading import load_causal_lm, resolve_model_path
from trl_refine.models.tiny_configs import FLA_FAMILIES, FLA_HYBRIDS, TRANSFORMERS_HYBRIDS, TRANSFORMERS_SSMS

TINY_MODEL_TYPES = (
    "refine_delta_net", "lact_swiglu", *FLA_FAMILIES, *FLA_HYBRIDS, *TRANSFORMERS_HYBRIDS, *TRANSFORMERS_SSMS,
)  # fmt: skip


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `trl.ModelConfig` (``--model_name_or_path``, ``--dtype``, ``--model_revision``, ``--attn_implementation``,
    ``--use_peft``, ``--lora_r``, ...) plus what the recipes add. ``model_name_or_path`` may name a checkpoint shipped
    in the package (``trl-refine:<name>``, what the embedded defaults use). Without it, or with ``random_model``, a
    small randomly initialised model is built from a config (``tiny_*``) with ``ByT5Tokenizer()``: nothing is
    downloaded. ``dtype`` defaults to float32: fp32 master weights, bf16 compute with ``bf16=true`` (the official
    release)."""

    random_model: bool = field(
        default=False,
        metadata={
            "help": "Build a randomly initialised model from the tiny_* options instead of loading "
            "model_name_or_path (e.g. the embedded defaults' shipped checkpoint)."
        },
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model's."})
    tiny_model_type: str = field(
        default="refine_delta_net",
        metadata={
            "help": "Random model when model_name_or_path is None: refine_delta_net (ours, pure PyTorch, runs on "
            "CPU), lact_swiglu (ours), a flash-linear-attention family (needs a GPU: "
            + ", ".join(FLA_FAMILIES)
            + "), an fla hybrid with fla attention layers (needs a GPU and flash_attn: "
            + ", ".join(FLA_HYBRIDS)
            + "), a transformers hybrid (runs on CPU too: "
            + ", ".join(TRANSFORMERS_HYBRIDS)
            + ") or transformers' Mamba-2 / Mamba (runs on CPU too: "
            + ", ".join(TRANSFORMERS_SSMS)
            + "); docs/models.md tables which engine each gets."
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Random model: hidden size."})
    tiny_layers: int = field(default=2, metadata={"help": "Random model: layers."})
    tiny_heads: int = field(default=2, metadata={"help": "Random model: heads."})
    tiny_attn_mode: str | None = field(
        default=None,
        metadata={"help": "Random DeltaNet models: chunk or fused_recurrent (None: the model's default, chunk)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.tiny_model_type not in TINY_MODEL_TYPES:
            raise ValueError(f"tiny_model_type={self.tiny_model_type!r}; choose one of {', '.join(TINY_MODEL_TYPES)}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r}; choose auto, bfloat16, float16 or float32")
        if self.model_name_or_path is not None and not self.random_model:
            changed = [
                f"{f.name}={getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name.startswith("tiny_") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} describe a random model, but model_name_or_path="
                    f"{self.model_name_or_path!r} is loaded: add --random_model true to build the random model "
                    "(or drop the tiny_* options)."
                )

    @property
    def model_label(self) -> str:
        """What the reports name as the model: its id, or ``random <tiny_model_type>``."""
        if self.random_model or self.model_name_or_path is None:
            return f"random {self.tiny_model_type}"
        return self.model_name_or_path


def with_embedded_default(argv: Sequence[str], default_config: str) -> list[str]:
    """``argv`` over a recipe's embedded default (``default_config``), unless it names its own ``--config`` or
    ``--model_name_or_path``. On the embedded default, ``--tiny_*`` options ask for the random tiny model instead of
    the shipped checkpoint: they imply ``--random_model true``."""
    argv = list(argv)
    if any(a.startswith(("--config", "--model_name_or_path")) for a in argv):
        return argv
    random = any(a.startswith("--tiny_") for a in argv) and not any(a.startswith("--random_model") for a in argv)
    return ["--config", default_config, *argv, *(["--random_model", "true"] if random else [])]


def peft_config_of(model_args: ModelArguments):
    """TRL's `get_peft_config` (None without ``use_peft``), targeting every linear layer unless
    ``lora_target_modules`` is given: our model types have no PEFT default."""
    from trl import get_peft_config

    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = "all-linear"
    return get_peft_config(model_args)


def tiny_model_config(args: ModelArguments, tokenizer):
    """The config of the random model ``args`` describes (``tiny_model_type`` and ``tiny_*`` sizes)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.tiny_hidden_size,
        num_hidden_layers=args.tiny_layers,
        num_heads=args.tiny_heads,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if args.tiny_model_type == "lact_swiglu":
        from trl_refine.models.lact import LaCTConfig

        heads = common.pop("num_heads")
        # chunk and window scaled down with the model so that short documents cross several fast-weight updates
        return LaCTConfig(**common, num_attn_heads=heads, num_lact_heads=heads, lact_chunk_size=256, window_size=256)
    if args.tiny_model_type not in ("refine_delta_net", "delta_net", "gated_deltanet"):
        from trl_refine.models.tiny_configs import tiny_config

        sizes = dict(hidden_size=args.tiny_hidden_size, layers=args.tiny_layers, heads=args.tiny_heads)
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tiny_config(args.tiny_model_type, vocab_size=len(tokenizer), **sizes, **ids)
    if args.tiny_model_type == "refine_delta_net":
        from trl_refine.models.delta_net import RefDeltaNetConfig as config_class
    else:
        try:
            import fla  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"tiny_model_type={args.tiny_model_type!r} needs flash-linear-attention (pip install "
                "flash-linear-attention) and a GPU; on CPU use tiny_model_type=refine_delta_net"
            ) from err
        from fla.models import DeltaNetConfig, GatedDeltaNetConfig

        config_class = DeltaNetConfig if args.tiny_model_type == "delta_net" else GatedDeltaNetConfig
        common["fuse_cross_entropy"] = False
    if args.tiny_attn_mode is not None:
        common["attn_mode"] = args.tiny_attn_mode
    return config_class(**common)


def build_model_and_tokenizer(args: ModelArguments, *, trust_remote_code: bool = False, seed: int = 0):
    """A hub / local / packaged (``trl-refine:<name>``) causal LM and its tokenizer (pad token set to EOS when
    missing), or, without ``model_name_or_path`` or with ``random_model``, a small randomly initialised model
    (``tiny_model_config``) with ``ByT5Tokenizer()``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

    import trl_refine.models  # noqa: F401  (registers refine_delta_net and lact_swiglu)

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model_name_or_path is None or args.random_model:
        tokenizer = ByT5Tokenizer()
        config = tiny_model_config(args, tokenizer)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        return (model if dtype == "auto" else model.to(dtype)), tokenizer
    model = load_causal_lm(
        args.model_name_or_path,
        {
            "dtype": dtype,
            "revision": args.model_revision,
            "attn_implementation": args.attn_implementation,
            "trust_remote_code": trust_remote_code,
            "device_map": None,  # the trainer places the model (and shards it under FSDP / DeepSpeed)
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(args.tokenizer_name_or_path or args.model_name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_and_publish(trainer, tokenizer, dataset_name: str | None = None) -> str:
    """Save the model, its tokenizer and model card (base model, quick start, ReFINE citation) in ``output_dir``, and
    push them to the Hub with ``--push_to_hub`` (every process calls this: saving is collective under FSDP)."""
    args = trainer.args
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        trainer.create_model_card(dataset_name=dataset_name)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    return os.path.abspath(args.output_dir)


def baseline_off(value: str | None) -> str | None:
    """``--baseline_mode none`` (or an empty value) turns a YAML's baseline arm off from the command line."""
    return None if value is None or str(value).strip().lower() in ("", "none") else value


def split_names(value: str | None) -> list[str]:
    """``"a.parquet,b.parquet"`` -> ``["a.parquet", "b.parquet"]``."""
    if not value:
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]


def dataset_label(name: str) -> str:
    """A short task label for a dataset path: ``.../ruler_squadqa_delta_net_4096_200_test.parquet`` -> its stem."""
    return Path(name).stem if os.path.exists(name) else name.replace("/", "_")


def _process_info() -> tuple[int, int]:
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def parameters_sharded() -> bool:
    """Whether the launched backend shards the parameters, so that every forward all-gathers them (FSDP, DeepSpeed
    ZeRO-3): then every process must make the same number of forward calls, also when evaluating."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:  # no Accelerator created yet: nothing is sharded
        return False
    state = AcceleratorState()
    if state.num_processes == 1:
        return False
    if state.distributed_type == DistributedType.FSDP:
        return True
    plugin = state.deepspeed_plugin if state.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def evaluation_context(trainer):
    """Evaluate ``trainer``'s model outside its training steps: yields the unwrapped model, under the training
    precision (``bf16`` / ``fp16`` autocast: fla's chunk kernels reject fp32, and DeepSpeed's own precision applies
    only inside its engine), and with the kernel training runs (`NSPGRPOTrainer.kernel_block`, ``fla_gated_kernel``).
    Before training under ZeRO-3 the parameters are partitioned but DeepSpeed's gathering hooks are not installed
    yet, so they are gathered for the evaluation (the whole model on every process)."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    device = trainer.accelerator.device
    with contextlib.ExitStack() as stack:
        stack.enter_context(trainer.kernel_block())
        if dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
        if partitioned and getattr(trainer, "deepspeed", None) is None:  # ZeRO-3 before the engine exists
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None))
        yield model


def shard_indices(num_examples: int, state=None, *, equal: bool) -> tuple[list[int], int]:
    """This process's contiguous shard of ``range(num_examples)``, by accelerate's ``split_between_processes``:
    ``(indices, real)``. With ``equal`` every process gets the same number of indices (accelerate's padding repeats
    the last example after the ``real`` ones, so every process makes the same calls). ``state``: the
    `accelerate.PartialState` (default: the current one)."""
    from accelerate import PartialState

    state = state if state is not None else PartialState()
    if num_examples == 0:
        return [], 0
    everything = list(range(num_examples))
    with PartialState.split_between_processes(state, everything) as mine:
        real = len(mine)
    if not equal:
        return list(mine), real
    with PartialState.split_between_processes(state, everything, apply_padding=True) as padded:
        return list(padded), real


def evaluate_sharded(
    model, tokenizer, dataset: datasets.Dataset, task: str | Callable | None, *, lockstep: bool | None = None, **kwargs
) -> dict:
    """`trl_refine.eval.evaluate` with the examples split over the processes (contiguous shards) and the
    per-example results gathered, so every process returns the same full result. Single process: plain evaluate.

    ``lockstep`` (default: `parameters_sharded`) keeps the processes' forward calls in step, as FSDP and ZeRO-3 need
    (each forward is a collective): equal shards (padded with a repeated example whose result is dropped), and
    generation synchronised across processes (``synced_gpus``) so that a process whose answers ended early keeps
    stepping until every process is done."""
    from accelerate.utils import gather_object

    from trl_refine.eval import evaluate, score_predictions

    rank, world = _process_info()
    if world == 1:
        return evaluate(model, tokenizer, dataset, task, **kwargs)
    if lockstep is None:
        lockstep = parameters_sharded()
    indices, real = shard_indices(len(dataset), equal=lockstep)
    shard = dataset.select(indices)
    kwargs = {**kwargs, "keep_predictions": True}
    if lockstep:
        kwargs["synced_gpus"] = True
    local = evaluate(model, tokenizer, shard, task, **kwargs) if len(shard) else None
    examples = local["examples"][:real] if local else []
    seconds = local["seconds"] if local else 0.0
    gathered = gather_object([(rank, examples, seconds)])
    gathered.sort(key=lambda item: item[0])
    all_examples = [ex for _, exs, _ in gathered for ex in exs]
    for i, ex in enumerate(all_examples):
        ex["index"] = i
    scored = score_predictions(
        [ex["prediction"] for ex in all_examples],
        [ex["answers"] for ex in all_examples],
        task,
        tasks=[ex["task"] for ex in all_examples] if task is None else None,
    )
    result = {k: v for k, v in (local or {}).items() if k not in ("examples", "seconds")}
    result.update(
        name=result.get("name") or kwargs.get("name") or str(task),
        task=result.get("task") or (",".join(scored["per_task"]) if task is None else str(task)),
        metric=scored["metric"],
        score=scored["score"],
        num_examples=len(all_examples),
        per_task=scored["per_task"],
        adapted=kwargs.get("adapt") is not None,
        seconds=max(s for _, _, s in gathered),
        examples=all_examples,
    )
    return result


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{scale * value:.{digits}f}"


def before_after_table(rows: Sequence[dict[str, Any]], labels: Sequence[str] = ("before", "after")) -> str:
    """Markdown table, one column per label (e.g. before, a baseline arm, after) and Δ = last − first. Each row:
    ``{"metric", <label>: value, ..., "scale" (default 100), "digits" (default 1)}``."""
    labels = tuple(labels)
    lines = [f"| metric | {' | '.join(labels)} | Δ |", "|---|" + "---|" * (len(labels) + 1)]
    for row in rows:
        scale, digits = row.get("scale", 100.0), row.get("digits", 1)
        a, b = row.get(labels[0]), row.get(labels[-1])
        delta = None if a is None or b is None else b - a
        sign = "" if delta is None else ("+" if delta >= 0 else "")
        cells = " | ".join(_fmt(row.get(label), scale, digits) for label in labels)
        lines.append(f"| {row['metric']} | {cells} | {sign}{_fmt(delta, scale, digits)} |")
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    from trl_refine.eval.evaluator import _jsonable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, ensure_ascii=False) + "\n")
    return path


def answer_nll_config(output_dir: str, use_cpu: bool, max_prompt_tokens: int | None, add_special_tokens: bool):
    """The `PostTrainConfig` that measures a gold answer's NLL after a prompt (post-training's tokenization of the
    answer: separator, EOS) outside post-training. Make it before any trainer: building training arguments resets
    accelerate's shared state, which a live trainer's accelerator reads."""
    from trl_refine.posttrain import PostTrainConfig

    return PostTrainConfig(
        output_dir=output_dir,
        use_cpu=use_cpu,
        bf16=False,
        report_to="none",
        max_length=None if max_prompt_tokens is None else max_prompt_tokens + 32,
        long_examples="truncate",
        prompt_add_special_tokens=add_special_tokens,
    )


def answer_nll_sharded(model, tokenizer, dataset: datasets.Dataset, args, *, lockstep: bool | None = None) -> float:
    """`trl_refine.posttrain.answer_nll` over the examples split across processes, combined (token-weighted);
    ``lockstep`` as in `evaluate_sharded`."""
    from accelerate.utils import gather_object

    from trl_refine.posttrain import answer_nll

    rank, world = _process_info()
    if lockstep is None:
        lockstep = parameters_sharded()
    indices, real = shard_indices(len(dataset), equal=lockstep)
    local = answer_nll(model, tokenizer, dataset.select(indices[:real]), args) if real else {"nll": 0.0, "tokens": 0.0}
    if len(indices) > real:  # padding under FSDP / ZeRO-3: the same number of forwards on every process
        answer_nll(model, tokenizer, dataset.select(indices[real:]), args)
    parts = [(local["nll"] * local["tokens"], local["tokens"])]
    if world > 1:
        parts = gather_object(parts)
    tokens = sum(t for _, t in parts)
    return sum(n for n, _ in parts) / tokens if tokens else float("nan")


def combine_across_processes(total: float, count: float) -> float | None:
    """Token-weighted mean of per-process (sum, count) pairs; None when there is nothing."""
    from accelerate.utils import gather_object

    _, world = _process_info()
    parts = [(total, count)] if world == 1 else gather_object([(total, count)])
    count = sum(c for _, c in parts)
    return sum(t for t, _ in parts) / count if count else None


def compare_arms(
    metric: str,
    before: float | None,
    baseline: tuple[str, float | None] | None,
    main: tuple[str, float | None],
    num_examples: int,
    scale: float = 100.0,
    before_name: str = "before",
) -> str:
    """The half of the reports' one-line explanation that compares the arms on ``metric``, from the numbers
    themselves (one seed and few prompts: the line says so)."""
    (main_name, main_score) = main
    parts = [f"{metric} on {num_examples} held-out prompts: {_fmt(before, scale)} {before_name}"]
    if baseline is not None:
        parts.append(f"{_fmt(baseline[1], scale)} after {baseline[0]}")
    parts.append(f"{_fmt(main_score, scale)} after {main_name}")
    line = ", ".join(parts)
    if baseline is not None and baseline[1] is not None and main_score is not None:
        gap = scale * (main_score - baseline[1])
        verdict = "beat" if gap > 0 else ("tied with" if gap == 0 else "did not beat")
        line += f". Here {main_name} {verdict} {baseline[0]} ({'+' if gap >= 0 else ''}{gap:.1f})"
    return line + f"; one seed and {num_examples} prompts, so a difference of one or two prompts is noise."
