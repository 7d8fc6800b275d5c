"""TRL's conversational format, turned into the plain text our tokenization takes, through the chat template
(TRL's own `maybe_apply_chat_template` and `is_conversational`).

* Mid-training: a ``messages`` column (a list of ``{"role", "content"}``) becomes the document text
  (``apply_chat_template(messages, tokenize=False)``).
* Post-training and evaluation: a conversational ``prompt`` becomes the templated prompt with the generation prompt
  (what the model sees before answering); a conversational ``completion`` (TRL's prompt-completion format) gives
  the gold ``answer``: the assistant's text.

Preference data (``chosen`` / ``rejected``) and messages without a chat template fail with what to change.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset
from trl import is_conversational, maybe_apply_chat_template

_PREFERENCE_KEYS = ("chosen", "rejected")


def is_messages(value: Any) -> bool:
    """A list of chat messages (``{"role": ..., "content": ...}``), by TRL's ``is_conversational``."""
    return is_conversational({"messages": value})


def _first_row(dataset: Dataset | IterableDataset) -> dict | None:
    if isinstance(dataset, Dataset):
        return dataset[0] if len(dataset) else None
    return next(iter(dataset.take(1)), None)


def _check_template(tokenizer, name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{name} is conversational (lists of messages) but the tokenizer ({type(tokenizer).__name__}) has no "
            "chat template. Set tokenizer.chat_template, use a chat model's tokenizer, or give plain-text columns."
        )


def _message_text(messages: list[dict], where: str) -> str:
    parts = [m.get("content") for m in messages if m.get("role") == "assistant"] or [
        m.get("content") for m in messages
    ]
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{where}: message content must be text (multimodal content is not supported).")
    return "".join(parts)


def documents_from_messages(
    dataset: Dataset | IterableDataset, tokenizer, *, column: str, name: str = "train_dataset"
) -> Dataset | IterableDataset:
    """Mid-training: when ``column`` is missing and a conversational ``messages`` column is there (or ``column`` itself
    holds messages), render each conversation with the chat template into ``column``."""
    columns = dataset.column_names or []
    row = _first_row(dataset)
    if row is None:
        return dataset
    if any(key in columns for key in _PREFERENCE_KEYS) and column not in columns:
        raise ValueError(
            f"{name} looks like preference data ({[k for k in _PREFERENCE_KEYS if k in columns]}); ReFINE trains on "
            f"documents: give a {column!r} column of text or a 'messages' column of conversations."
        )
    source = column if column in columns else "messages" if "messages" in columns else None
    if source is None or not is_messages(row[source]):
        return dataset
    _check_template(tokenizer, name)

    def render(example):
        return {column: maybe_apply_chat_template({"messages": example[source]}, tokenizer)["text"]}

    drop = [source] if source != column else []
    return dataset.map(render, remove_columns=drop)


def prompts_from_messages(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    name: str = "dataset",
) -> Dataset | IterableDataset:
    """Post-training / evaluation: a conversational ``prompt_column`` becomes its chat-templated text (with the
    generation prompt); a conversational ``completion`` fills a missing ``answer_column`` with the assistant's text."""
    columns = dataset.column_names or []
    row = _first_row(dataset)
    if row is None:
        return dataset
    has_answer = answer_column in columns or "answers" in columns or "completion" in columns
    if any(key in columns for key in _PREFERENCE_KEYS) and not has_answer:
        raise ValueError(
            f"{name} looks like preference data (chosen / rejected); post-training and evaluation need a prompt "
            f"and a gold answer: give {prompt_column!r} and {answer_column!r} (or TRL's prompt-completion format)."
        )
    prompt_is_chat = prompt_column in columns and is_messages(row[prompt_column])
    completion_is_answer = "completion" in columns and answer_column not in columns and "answers" not in columns
    if not prompt_is_chat and not completion_is_answer:
        return dataset
    if prompt_is_chat:
        _check_template(tokenizer, name)

    def render(example):
        out = {}
        if prompt_is_chat:
            out[prompt_column] = maybe_apply_chat_template({"prompt": example[prompt_column]}, tokenizer)["prompt"]
        if completion_is_answer:
            completion = example["completion"]
            out[answer_column] = (
                _message_text(completion, f"{name}['completion']") if is_messages(completion) else completion
            )
        return out

    return dataset.map(render, remove_columns=["completion"] if completion_is_answer else [])
