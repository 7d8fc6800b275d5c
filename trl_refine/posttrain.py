"""Post-training with ReFINE: prompt (long context + question) and answer.

Per batch, the prompt is the ReFINE "document" and the first gold answer is the supervised target:

* ``nested`` (official, "Nested ReFINE"): an inner optimizer step on ReFINE (``ntp_coef``·NTP + ``nsp_coef``·PPO-clip
  on the prompt), then an outer optimizer step on ``sft_coef``·CE(answer | prompt), computed with the updated
  weights. Two optimizer steps per batch.
* ``joint``: one optimizer step on the sum of the two losses.
* ``nested_sft`` (baseline "Nested SFT"): an inner step on NTP over the prompt only, then the outer answer step.
* ``sft`` (baseline "SFT"): the answer step only.

How the nested steps fit the HF ``Trainer`` loop (`NSPPostTrainer.training_step`): the Trainer still owns the outer
step. On every micro-step of an accumulation window we run the stock training step with the *inner* loss (the
Trainer's sync / ``no_sync`` context and loss scaling apply unchanged) and keep the micro-batch's answer tensors.
On the window's last micro-step (``accelerator.sync_gradients``) we take the inner step ourselves with the exact
calls the Trainer makes at a sync step (``_clip_grad_norm``, ``optimizer.step()``, ``model.zero_grad()``), then run
the answer forward/backward of every kept micro-batch with the updated weights (``no_sync`` on all but the last,
like the Trainer) and return the loss; the Trainer then clips, steps the optimizer, advances the LR scheduler once
and counts one global step. Every rank takes the same path, so forwards and collectives stay in step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType
from datasets import Dataset, IterableDataset

from trl_refine._compat import (
    is_fsdp_managed_module,
    set_sync_gradients,
    trainer_clip_grad_norm,
    trainer_defer_fsdp_gradient_reduction,
)
from trl_refine.config import NSPGRPOConfig
from trl_refine.conversational import prompts_from_messages
from trl_refine.data import check_tokenizer
from trl_refine.losses import masked_token_nll
from trl_refine.modeling_utils import score_tokens
from trl_refine.rewards import exact_match_reward
from trl_refine.rollout.base import DocumentBatch
from trl_refine.step import padded_ntp_terms
from trl_refine.trainer import DOC_KEYS, ROLLOUT_KEYS, NSPGRPOTrainer
from trl_refine.utils import left_pad, model_device, truncate_middle

logger = logging.getLogger("trl_refine")

POSTTRAIN_MODES = ("nested", "joint", "nested_sft", "sft")
#: modes that take two optimizer steps per batch
NESTED_MODES = ("nested", "nested_sft")
#: modes whose inner objective is ReFINE (NTP + PPO-clip on rollouts); the others never roll out
REFINE_MODES = ("nested", "joint")
LONG_EXAMPLE_POLICIES = ("error", "drop", "truncate", "truncate_end")
#: how the answer target is tokenized: on its own (the release) or as what follows the prompt in the joint text
ANSWER_TOKENIZATIONS = ("alone", "joint")
#: answer-SFT tensors of a micro-batch (one row per prompt)
SFT_KEYS = ("sft_input_ids", "sft_attention_mask", "sft_label_mask")


@dataclass
class PostTrainConfig(NSPGRPOConfig):
    r"""Configuration for [`NSPPostTrainer`]: `NSPGRPOConfig` plus the post-training fields.

    Defaults follow the official post-training release (research/paper.md §2): hybrid reward, 1.0·NTP + 0.2·NSP
    inner loss, nested updates, answers truncated to 32 tokens, prompt + answer ≤ 8192 tokens (8160 + 32).
    """

    posttrain_mode: str = field(
        default="nested",
        metadata={
            "help": "nested (inner ReFINE step, then answer-SFT step; official), joint (one step on the summed "
            "losses), nested_sft (inner NTP-only step, then answer step; the 'Nested SFT' baseline), sft (answer "
            "step only; the 'SFT' baseline)."
        },
    )
    answer_column: str = field(
        default="answer", metadata={"help": "Column with the answer: a string or a list of gold strings (first used)."}
    )
    max_answer_length: int = field(
        default=32, metadata={"help": "Answer tokens trained on (official max_response_length); longer ones are cut."}
    )
    max_length: int | None = field(
        default=8192,
        metadata={
            "help": "Most tokens of prompt + (truncated) answer. Prompts are not truncated unless "
            "long_examples='truncate' (cutting the end would drop the question): longer examples raise or are dropped "
            "(long_examples). None = no limit."
        },
    )
    long_examples: str = field(
        default="error",
        metadata={
            "help": "Examples with prompt + answer > max_length: 'error' (default), 'drop', 'truncate' (cut the "
            "middle of the prompt, keeping its start and its end with the question, as LongBench does), or "
            "'truncate_end' (the release: every prompt cut to its first max_length - max_answer_length tokens, "
            "which can cut off the question)."
        },
    )
    sft_coef: float = field(default=1.0, metadata={"help": "Weight of the answer cross-entropy (token mean)."})
    posttrain_inner_steps: int = field(
        default=1,
        metadata={
            "help": "Nested modes: inner ReFINE optimizer steps per answer-SFT step; the SFT step then covers the "
            "examples of all of them. 1 (default): one inner step, then one SFT step on the same examples. The "
            "release takes train_batch_size / ttt_ppo_mini_batch_size inner steps (rollouts made once for the train "
            "batch), then one SFT step over the whole train batch: set this to that ratio and steps_per_generation "
            "to it × gradient_accumulation_steps."
        },
    )
    answer_tokenization: str = field(
        default="alone",
        metadata={
            "help": "alone (the release): the answer tokenized on its own without special tokens, appended to the "
            "prompt's tokens; joint: the tokens that follow the prompt's in the tokenization of prompt + "
            "answer_separator + answer (what a BPE tokenizer produces after the prompt)."
        },
    )
    answer_separator: str = field(
        default=" ",
        metadata={
            "help": "answer_tokenization='joint' only: inserted between prompt and answer when neither has "
            "whitespace at the join ('Answer:' + ' Paris')."
        },
    )
    answer_append_eos: bool = field(
        default=False,
        metadata={
            "help": "Append EOS to the answer target (kept only if it fits max_answer_length), so generation stops "
            "after the answer. Default False (official: the target is the first gold answer without EOS)."
        },
    )
    prompt_add_special_tokens: bool = field(
        default=False,
        metadata={"help": "Tokenize prompts with special tokens (BOS). Default False: raw prompts, as evaluated."},
    )
    # ---- inherited fields whose meaning or default differs in post-training ---------------------------------------
    document_column: str = field(default="prompt", metadata={"help": "Column with the prompts (ReFINE documents)."})
    nsp_reward: str = field(default="hybrid", metadata={"help": "Official post-training reward: hybrid."})
    nsp_max_length: int | None = field(
        default=None, metadata={"help": "Unused in post-training (prompts are never truncated); use max_length."}
    )

    def __post_init__(self):
        if self.posttrain_mode not in POSTTRAIN_MODES:
            raise ValueError(f"posttrain_mode={self.posttrain_mode!r} is not one of {', '.join(POSTTRAIN_MODES)}.")
        if self.long_examples not in LONG_EXAMPLE_POLICIES:
            raise ValueError(f"long_examples={self.long_examples!r} is not one of {', '.join(LONG_EXAMPLE_POLICIES)}.")
        if self.answer_tokenization not in ANSWER_TOKENIZATIONS:
            raise ValueError(
                f"answer_tokenization={self.answer_tokenization!r} is not one of {', '.join(ANSWER_TOKENIZATIONS)}."
            )
        truncate_end = self.long_examples == "truncate_end" and self.max_length is not None
        if truncate_end and self.max_length <= self.max_answer_length:
            raise ValueError(
                f"long_examples='truncate_end' keeps max_length - max_answer_length prompt tokens: max_length="
                f"{self.max_length} must exceed max_answer_length={self.max_answer_length}."
            )
        if self.max_answer_length < 1:
            raise ValueError(f"max_answer_length must be >= 1, got {self.max_answer_length}.")
        if self.posttrain_inner_steps < 1:
            raise ValueError(f"posttrain_inner_steps must be >= 1, got {self.posttrain_inner_steps}.")
        if self.sft_coef <= 0:
            raise ValueError(
                f"sft_coef must be > 0 (the answer loss is the point of post-training), got {self.sft_coef}."
            )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and an answer token), got {self.max_length}.")
        if self.nsp_max_length is not None:
            raise ValueError(
                "nsp_max_length is not used in post-training: prompts are never truncated. Set max_length (prompt + "
                "answer tokens) instead."
            )
        if self.posttrain_mode == "nested_sft" and self.ntp_coef <= 0:
            raise ValueError("posttrain_mode='nested_sft' takes an inner NTP step: ntp_coef must be > 0.")
        if self.answer_column == self.document_column:
            raise ValueError(f"answer_column and document_column are both {self.answer_column!r}.")
        super().__post_init__()

    @property
    def uses_refine(self) -> bool:
        """Whether the inner objective rolls out (ReFINE) rather than NTP-only or nothing."""
        return self.posttrain_mode in REFINE_MODES

    @property
    def is_nested(self) -> bool:
        return self.posttrain_mode in NESTED_MODES

    @property
    def min_document_length(self) -> int:
        """Fewest prompt tokens: ReFINE's minimum when the mode rolls out, else 2 (one next-token label)."""
        if self.uses_refine:
            return super().min_document_length
        return 2


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def first_answer(value: Any, *, where: str = "answer") -> str:
    """The training target: the string itself, or the first gold string of a list."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where} is an empty list: every example needs at least one gold answer.")
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string or a list of strings, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"{where} is empty: every example needs a non-empty answer.")
    return value


def _strip_trailing_eos(ids: list[int], eos: int | None) -> list[int]:
    while ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def encode_prompt_answer(
    prompt: str, answer: str, tokenizer, args: PostTrainConfig, *, return_truncated: bool = False
) -> tuple[list[int], list[int]] | tuple[list[int], list[int], bool]:
    """Token ids of the prompt and of the answer target, the answer cut to ``max_answer_length`` after the optional
    EOS is appended.

    ``answer_tokenization="alone"`` (the release, `rl_dataset.py` ``TTTRLHFDataset``): the answer is tokenized on
    its own without special tokens and follows the prompt's ids directly. ``"joint"``: the answer's ids are those
    after the prompt's ids in the tokenization of prompt + ``answer_separator`` (only when neither side has
    whitespace at the join) + answer, so a BPE tokenizer gives the tokens the model would generate after the prompt;
    if the joint tokenization does not start with the prompt's ids, the answer (with the separator) is tokenized on
    its own. With ``long_examples="truncate"`` the prompt loses its middle so that prompt + answer fits
    ``max_length``; with ``"truncate_end"`` (the release) every prompt keeps its first ``max_length -
    max_answer_length`` tokens.
    """
    special = args.prompt_add_special_tokens
    eos = getattr(tokenizer, "eos_token_id", None)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    if special:  # tokenizers that append EOS (T5, ByT5) would put it between prompt and answer
        prompt_ids = _strip_trailing_eos(prompt_ids, eos)
    if args.answer_tokenization == "alone":
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    else:
        sep = args.answer_separator if (prompt[-1:] and not prompt[-1].isspace() and not answer[0].isspace()) else ""
        full = list(tokenizer(prompt + sep + answer, add_special_tokens=special)["input_ids"])
        if special:
            full = _strip_trailing_eos(full, eos)
        if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
            answer_ids = full[len(prompt_ids) :]
        else:
            answer_ids = list(tokenizer(sep + answer, add_special_tokens=False)["input_ids"])
    if args.answer_append_eos and eos is not None:
        answer_ids = answer_ids + [eos]
    answer_ids = answer_ids[: args.max_answer_length]
    truncated = False
    if args.max_length is not None and args.long_examples == "truncate_end":
        room = args.max_length - args.max_answer_length  # the release's max_prompt_length (8160 of 8192)
        truncated = len(prompt_ids) > room
        prompt_ids = prompt_ids[:room]
    elif (
        args.long_examples == "truncate"
        and args.max_length is not None
        and len(prompt_ids) + len(answer_ids) > args.max_length
    ):
        prompt_ids = truncate_middle(prompt_ids, max(args.max_length - len(answer_ids), 1))
        truncated = True
    if return_truncated:
        return prompt_ids, answer_ids, truncated
    return prompt_ids, answer_ids


def eval_prompt_truncation(args: PostTrainConfig) -> tuple[int | None, str]:
    """``(max_prompt_tokens, prompt_truncation)`` for `trl_refine.eval.evaluate`: evaluation prompts cut the way
    `encode_prompt_answer` cuts training prompts. ``long_examples="truncate"``: the middle of prompts longer than
    ``max_length - max_answer_length`` (the room left for the longest answer); ``"truncate_end"``: every prompt keeps
    its first ``max_length - max_answer_length`` tokens (the release cuts its validation prompts as its training
    ones); ``"error"`` / ``"drop"`` (no training prompt was cut) or ``max_length=None``: prompts stay whole."""
    how = {"truncate": "middle", "truncate_end": "end"}.get(args.long_examples)
    if how is None or args.max_length is None:
        return None, "middle"
    return max(args.max_length - args.max_answer_length, 1), how


def prepare_posttrain_dataset(
    dataset: Dataset | IterableDataset, tokenizer, args: PostTrainConfig, name: str = "train_dataset"
) -> Dataset | IterableDataset:
    """Check and tokenize a prompt/answer dataset for [`NSPPostTrainer`].

    Adds ``input_ids`` (the prompt) and ``answer_ids`` (the first gold answer, truncated) and removes the prompt
    text column (the trainer works on ids). Raises ``ValueError`` early, naming the fix, for: missing columns, an
    empty dataset, a non-string or empty prompt, a missing/empty answer, prompt + answer longer than ``max_length``
    (``long_examples="error"``), and prompts too short for ReFINE (``nsp_short_documents="error"``). With the
    ``"drop"`` policies such examples are dropped with a warning (the same ones on every rank); with
    ``long_examples="truncate"`` long prompts lose their middle (column ``prompt_truncated`` marks them).
    """
    prompt_col, answer_col = args.document_column, args.answer_column
    # TRL's conversational prompts (chat template) and prompt-completion format
    dataset = prompts_from_messages(dataset, tokenizer, prompt_column=prompt_col, answer_column=answer_col, name=name)
    columns = dataset.column_names
    if columns is not None:
        missing = [c for c in (prompt_col, answer_col) if c not in columns]
        if missing:
            hint = ""
            if answer_col in missing and "answers" in columns:
                hint = " (this dataset has 'answers': set answer_column='answers')"
            raise ValueError(
                f"{name} is missing column(s) {missing}; available columns: {columns}. Post-training needs a prompt "
                f"column (document_column, default 'prompt') and an answer column (answer_column, default 'answer'; "
                f"a string or a list of gold strings){hint}."
            )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"{name} is empty: post-training needs at least one prompt/answer example.")

    max_length = args.max_length
    min_length = args.min_document_length
    streaming = not isinstance(dataset, Dataset)

    def encode(batch):
        prompts, answers = batch[prompt_col], batch[answer_col]
        out_p, out_a, out_t = [], [], []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{name}[{prompt_col!r}] must hold non-empty strings (row {i} of a batch).")
            gold = first_answer(answer, where=f"{name}[{answer_col!r}]")
            p, a, cut = encode_prompt_answer(prompt, gold, tokenizer, args, return_truncated=True)
            if not a:
                raise ValueError(f"{name}: the answer {gold!r} tokenizes to nothing.")
            out_p.append(p)
            out_a.append(a)
            out_t.append(cut)
        return {"input_ids": out_p, "answer_ids": out_a, "prompt_truncated": out_t}

    kwargs = {} if streaming else {"desc": f"Tokenizing {name}"}
    dataset = dataset.map(encode, batched=True, remove_columns=[prompt_col], **kwargs)
    if streaming:  # checked row by row as the rows arrive: raise ('error') or skip ('drop')

        def fits(row) -> bool:
            lengths = ([len(row["input_ids"])], [len(row["answer_ids"])])
            return bool(_check_lengths(*lengths, args, name, max_length, min_length, quiet=True))

        return dataset.filter(fits)
    num_truncated = sum(dataset["prompt_truncated"])
    if num_truncated:
        logger.warning(
            "trl_refine: %d of %d prompts of %s were cut to fit max_length=%s (long_examples=%r)",
            num_truncated,
            len(dataset),
            name,
            max_length,
            args.long_examples,
        )
    prompt_lengths = [len(ids) for ids in dataset["input_ids"]]
    answer_lengths = [len(ids) for ids in dataset["answer_ids"]]
    keep = _check_lengths(prompt_lengths, answer_lengths, args, name, max_length, min_length)
    if len(keep) < len(dataset):
        if not keep:
            raise ValueError(f"every example of {name} was dropped (too long or too short); nothing to train on.")
        dataset = dataset.select(keep)
    return dataset


def _check_lengths(prompt_lengths, answer_lengths, args, name, max_length, min_length, quiet=False) -> list[int]:
    n = len(prompt_lengths)
    too_long = (
        [i for i in range(n) if prompt_lengths[i] + answer_lengths[i] > max_length] if max_length is not None else []
    )
    too_short = [i for i in range(n) if prompt_lengths[i] < min_length]
    if too_long and args.long_examples == "error":
        i = too_long[0]
        raise ValueError(
            f"{len(too_long)} of {n} examples in {name} do not fit max_length={max_length}: prompt + answer is "
            f"longer than the room (e.g. row {i}: {prompt_lengths[i]} prompt + {answer_lengths[i]} answer tokens, "
            f"room left for the answer: {max_length - prompt_lengths[i]}). Raise max_length, lower "
            "max_answer_length, filter the dataset, or set long_examples='drop' (skip them), 'truncate' (cut the "
            "middle of the prompt) or 'truncate_end' (cut its end, as the release)."
        )
    if too_short and args.nsp_short_documents == "error":
        i = too_short[0]
        raise ValueError(
            f"{len(too_short)} of {n} prompts in {name} have fewer than {min_length} tokens (e.g. row {i}: "
            f"{prompt_lengths[i]}); ReFINE on the prompt needs margin + n·k + max(k, margin) tokens. Filter them, set "
            "nsp_short_documents='drop', or lower nsp_num_chunks / nsp_rollout_length / nsp_margin."
        )
    bad = set(too_long) | set(too_short)
    if bad and not quiet:
        logger.warning(
            "trl_refine: dropping %d of %d examples of %s (%d longer than max_length=%s, %d prompts shorter than %d)",
            len(bad),
            n,
            name,
            len(too_long),
            max_length,
            len(too_short),
            min_length,
        )
    return [i for i in range(n) if i not in bad]


def collate_prompt_answer(
    prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + answer`` rows and the mask of positions whose next token is an answer token."""
    seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids)]
    batch = left_pad(seqs, pad_token_id)
    width = batch.input_ids.size(1)
    label = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, p, a) in enumerate(zip(seqs, prompt_ids, answer_ids)):
        start = width - len(s)
        label[i, start + len(p) - 1 : start + len(p) - 1 + len(a)] = True
    return {"sft_input_ids": batch.input_ids, "sft_attention_mask": batch.attention_mask, "sft_label_mask": label}


def split_posttrain_batch(batch: dict[str, Any], num_splits: int) -> list[dict[str, Any]]:
    """Split a generation batch into ``num_splits`` micro-batches of whole prompts (with their rollouts, if any)."""
    if num_splits == 1:
        return [batch]
    docs = batch["sft_input_ids"].size(0)
    if docs % num_splits != 0:
        raise RuntimeError(f"{docs} prompts do not split into {num_splits} micro-batches")
    d = docs // num_splits
    r = batch["completion_ids"].size(0) // num_splits if "completion_ids" in batch else 0
    out = []
    for i in range(num_splits):
        part = {}
        for key, value in batch.items():
            if key in DOC_KEYS or key in SFT_KEYS:
                part[key] = value[i * d : (i + 1) * d]
            elif key in ROLLOUT_KEYS:
                part[key] = value[i * r : (i + 1) * r]
            else:
                part[key] = value
        out.append(part)
    return out


# ----------------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------------


class NSPPostTrainer(NSPGRPOTrainer):
    """ReFINE post-training: ReFINE on the prompt plus supervised loss on the answer (see the module docstring).

    Takes `NSPGRPOTrainer`'s arguments with a [`PostTrainConfig`]; ``train_dataset`` has a prompt column and an
    answer column. After training, ``inner_optimizer_steps`` counts the inner steps taken (nested modes).
    """

    _tag_names = ["trl", "grpo", "nsp-grpo", "refine", "post-training"]
    _name = "NSP-PostTrain"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PostTrainConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        engine=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = PostTrainConfig(output_dir=f"{str(name).split('/')[-1]}-NSP-PostTrain")
        if not isinstance(args, PostTrainConfig):
            raise TypeError(f"args must be a PostTrainConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError(
                f"train_dataset is required: prompts in column {args.document_column!r} and answers in "
                f"{args.answer_column!r}."
            )
        if processing_class is None:
            from transformers import AutoTokenizer

            source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
            if not source:
                raise ValueError("processing_class is required when the model has no hub id or path to load it from.")
            processing_class = AutoTokenizer.from_pretrained(source)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        check_tokenizer(tokenizer)
        train_dataset = prepare_posttrain_dataset(train_dataset, tokenizer, args, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: prepare_posttrain_dataset(ds, tokenizer, args, f"eval_dataset[{key!r}]")
                for key, ds in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = prepare_posttrain_dataset(eval_dataset, tokenizer, args, "eval_dataset")
        if reward_funcs is None and not args.uses_refine:
            reward_funcs = [exact_match_reward]  # never called: these modes do not roll out
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            reward_processing_classes,
            callbacks,
            optimizers,
            peft_config,
            engine,
            **kwargs,
        )
        self._nested_phase: str | None = None
        self._answer_buffer: list[dict[str, torch.Tensor]] = []
        self._inner_windows = 0  # accumulation windows of inner steps since the last answer-SFT step
        self.inner_optimizer_steps = 0
        self.answer_sft_steps = 0

    # ------------------------------------------------------------------------------------------------------------------
    # batching
    def _prepare_inputs(self, generation_batch: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        spg = self.args.steps_per_generation
        generate_every = spg * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_posttrain_batch(batch, spg)
        return self._buffered_inputs[self._step % spg]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        args = self.args
        per_doc = args.nsp_num_chunks * args.nsp_num_rollouts
        if len(inputs) % per_doc != 0:
            raise RuntimeError(f"got {len(inputs)} rows, not a multiple of n·G = {per_doc}")
        doc_rows = inputs[::per_doc]
        if args.uses_refine:
            batch = super()._generate_and_score_completions(inputs)
        else:
            batch = {}
            if args.posttrain_mode == "nested_sft":
                docs = self._collate_documents(doc_rows)
                batch.update(doc_input_ids=docs.input_ids, doc_attention_mask=docs.attention_mask)
            tokens = sum(len(row["input_ids"]) + len(row["answer_ids"]) for row in doc_rows)
            total = self.accelerator.reduce(torch.tensor(float(tokens), device=self.accelerator.device), "sum")
            mode = "train" if self.model.training else "eval"
            if mode == "train":
                self.state.num_input_tokens_seen += int(total.item())
            self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        sft = collate_prompt_answer(
            [row["input_ids"] for row in doc_rows],
            [row["answer_ids"] for row in doc_rows],
            self.tokenizer_.pad_token_id,
        )
        batch.update({key: value.to(self.accelerator.device) for key, value in sft.items()})
        return batch

    # ------------------------------------------------------------------------------------------------------------------
    # losses
    def _inner_loss(self, model, inputs) -> torch.Tensor:
        """ReFINE (``ntp_coef``·NTP + ``nsp_coef``·PPO-clip) or, for ``nested_sft``, ``ntp_coef``·NTP alone."""
        if self.args.uses_refine:
            return NSPGRPOTrainer.compute_loss(self, model, inputs)
        mode = "train" if self.model.training else "eval"
        docs = DocumentBatch(inputs["doc_input_ids"], inputs["doc_attention_mask"])
        label_mask = docs.label_mask()
        with self.accelerator.autocast():
            if self.args.ntp_count_pad_targets:  # the release's fla loss: pads count
                nll, count = padded_ntp_terms(model, docs)
            else:
                logps, _, _ = score_tokens(model, docs.input_ids, docs.attention_mask, label_mask)
                nll, count = masked_token_nll(logps, label_mask)
        ntp_loss = nll / count.clamp(min=1)
        self._metrics[mode]["ntp_loss"].append(self.accelerator.gather(ntp_loss.detach()).mean().item())
        return self.args.ntp_coef * ntp_loss / self._loss_scale()

    def answer_loss(self, model, inputs) -> torch.Tensor:
        """``sft_coef`` · token-mean CE of the answer tokens given the prompt, scaled for gradient accumulation."""
        mode = "train" if self.model.training else "eval"
        label_mask = inputs["sft_label_mask"]
        with self.accelerator.autocast():
            logps, _, _ = score_tokens(model, inputs["sft_input_ids"], inputs["sft_attention_mask"], label_mask)
        nll, count = masked_token_nll(logps, label_mask)
        sft_loss = nll / count.clamp(min=1)
        self._metrics[mode]["sft_loss"].append(self.accelerator.gather(sft_loss.detach()).mean().item())
        return self.args.sft_coef * sft_loss / self._loss_scale()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("NSPPostTrainer does not return outputs")
        if self._nested_phase == "inner":
            self._answer_buffer.append({key: inputs[key] for key in SFT_KEYS})
            return self._inner_loss(model, inputs)
        # joint / sft training, and evaluation in every mode: the sum of the losses, one backward
        if self.args.posttrain_mode == "sft":
            return self.answer_loss(model, inputs)
        inner = self._inner_loss(model, inputs)
        return inner + self.answer_loss(model, inputs)

    # ------------------------------------------------------------------------------------------------------------------
    # nested: two optimizer steps per batch
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.is_nested:
            return super().training_step(model, inputs, num_items_in_batch)
        # 1. the inner loss through the stock step (input preparation, Trainer sync context, GA scaling, backward)
        self._nested_phase = "inner"
        try:
            inner = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._nested_phase = None
        if not self.accelerator.sync_gradients:  # not the last micro-step of the accumulation window yet
            return inner
        self._inner_windows += 1
        if self._inner_windows < self.args.posttrain_inner_steps:
            # posttrain_inner_steps > 1: the Trainer's own optimizer step is this window's inner step; the answer
            # micro-batches stay buffered for the SFT step after the last inner step
            self.inner_optimizer_steps += 1
            return inner
        self._inner_windows = 0
        # 2. the inner optimizer step, with the calls the Trainer makes at a sync step
        self._inner_optimizer_step(model)
        # 3. the answer loss of every buffered micro-batch, with the updated weights; the Trainer steps after
        return inner + self._answer_backward(model)

    def _inner_optimizer_step(self, model) -> None:
        grad_norm = None
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            grad_norm = trainer_clip_grad_norm(self, model)
        self.optimizer.step()
        model.zero_grad()
        self.inner_optimizer_steps += 1
        if grad_norm is not None:
            value = grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm)
            self._metrics["train"]["posttrain/inner_grad_norm"].append(value)

    def _answer_backward(self, model) -> torch.Tensor:
        batches, self._answer_buffer = self._answer_buffer, []
        self.answer_sft_steps += 1
        windows = self.args.posttrain_inner_steps  # the SFT step is the mean over the examples of every window
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        total = torch.zeros((), device=self.accelerator.device)
        for j, batch in enumerate(batches):
            with self._accumulation_context(model, final=j == len(batches) - 1):
                with self.compute_loss_context_manager():
                    loss = self.answer_loss(model, batch) / windows
                self.accelerator.backward(loss, **kwargs)
            total = total + loss.detach()
        return total

    @contextlib.contextmanager
    def _accumulation_context(self, model, final: bool):
        """What the Trainer wraps a micro-step in: gradient sync only on the last one (``no_sync`` before)."""
        state = self.accelerator.gradient_state
        previous = state.sync_gradients
        set_sync_gradients(state, final)
        try:
            if (
                final
                or self.accelerator.distributed_type == DistributedType.DEEPSPEED
                or state.plugin_kwargs.get("sync_each_batch", False)
            ):
                ctx = contextlib.nullcontext()
            elif getattr(self, "is_distributed_loading_by_transformers", False) and is_fsdp_managed_module(self.model):
                ctx = trainer_defer_fsdp_gradient_reduction(self)
            else:
                ctx = self.accelerator.no_sync(model=model)
            with ctx:
                yield
        finally:
            set_sync_gradients(state, previous)


# ----------------------------------------------------------------------------------------------------------------
# evaluation helper
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_nll(
    model, tokenizer, dataset, args: PostTrainConfig, *, max_examples: int | None = None
) -> dict[str, float]:
    """Teacher-forced loss of the training target: mean negative log-likelihood (nats per token) of each example's
    first gold answer, tokenized exactly as in training (separator, EOS, ``max_answer_length``), given its prompt.

    A smooth companion to accuracy for small runs. One example per forward; only the answer's logits are
    materialized (``logits_to_keep``). Returns ``{"nll": mean over tokens, "tokens": count, "examples": n}``.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    prompt_col, answer_col = args.document_column, args.answer_column
    if answer_col not in dataset.column_names and "answers" in dataset.column_names:
        answer_col = "answers"
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(n):
            row = dataset[i]
            prompt_ids, answer_ids = encode_prompt_answer(
                row[prompt_col], first_answer(row[answer_col], where=answer_col), tok, args
            )
            ids = torch.tensor([prompt_ids + answer_ids], device=device)
            keep = len(answer_ids) + 1
            try:
                logits = model(input_ids=ids, logits_to_keep=keep).logits[:, -keep:-1]
            except TypeError:  # a model without logits_to_keep
                logits = model(input_ids=ids).logits[:, -keep:-1]
            logps = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor([answer_ids], device=device)
            total += -logps.gather(-1, target[..., None]).sum().item()
            count += len(answer_ids)
    finally:
        model.train(was_training)
    return {"nll": total / max(count, 1), "tokens": float(count), "examples": float(n)}
