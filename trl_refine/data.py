"""Turning a dataset of raw documents into token ids, with early, explicit errors."""

from __future__ import annotations

import logging

from datasets import Dataset, IterableDataset

from trl_refine.conversational import documents_from_messages

logger = logging.getLogger("trl_refine")


def check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("A tokenizer is required: pass processing_class=AutoTokenizer.from_pretrained(...).")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no pad token, which batching needs. Set one before "
            "creating the trainer, e.g. `tokenizer.pad_token = tokenizer.eos_token`."
        )


def tokenize_documents(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    column: str,
    max_length: int | None,
    min_length: int,
    short_documents: str = "error",
    name: str = "train_dataset",
) -> Dataset | IterableDataset:
    """Add an ``input_ids`` column (right-truncated to ``max_length``) and enforce ``min_length`` valid tokens.

    A dataset that already has ``input_ids`` and no ``column`` is used as is (truncated). Too-short documents raise
    (``short_documents="error"``) or are dropped with a log line (``"drop"``).
    """
    dataset = documents_from_messages(dataset, tokenizer, column=column, name=name)  # TRL's `messages` format
    columns = dataset.column_names
    if columns is not None and column not in columns and "input_ids" not in columns:
        raise ValueError(
            f"{name} has no column {column!r} (columns: {columns}). Set document_column to the column holding the "
            "documents, or provide pre-tokenized `input_ids`."
        )
    if columns is not None and column in columns:

        def encode(batch):
            texts = batch[column]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{name}[{column!r}] must hold strings (raw documents).")
            enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
            return {"input_ids": enc["input_ids"]}

        kwargs = {"desc": f"Tokenizing {name}"} if isinstance(dataset, Dataset) else {}
        dataset = dataset.map(encode, batched=True, **kwargs)
    elif max_length is not None:
        dataset = dataset.map(lambda row: {"input_ids": list(row["input_ids"])[:max_length]})

    if not isinstance(dataset, Dataset):  # streaming: checked per row when it arrives
        return dataset
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    short = [i for i, n in enumerate(lengths) if n < min_length]
    if short:
        if short_documents == "drop":
            keep = sorted(set(range(len(dataset))) - set(short))
            logger.warning(
                "trl_refine: dropping %d of %d documents shorter than %d tokens", len(short), len(dataset), min_length
            )
            if not keep:
                raise ValueError(f"Every document of {name} is shorter than {min_length} tokens.")
            dataset = dataset.select(keep)
        else:
            raise ValueError(
                f"{len(short)} of {len(dataset)} documents in {name} have fewer than {min_length} tokens "
                f"(e.g. row {short[0]}: {lengths[short[0]]} tokens); ReFINE needs margin + n·k + max(k, margin) tokens. "
                "Filter them out, set nsp_short_documents='drop', or lower nsp_num_chunks / nsp_rollout_length / "
                "nsp_margin."
            )
    return dataset


def load_any_dataset(name_or_path: str, split: str = "train", config_name: str | None = None):
    """Load a local parquet / jsonl / json / csv / arrow file (or a folder of them) or a Hub dataset id.

    The one loader of the package (`trl_refine.eval.load_qa_dataset`) without column requirements."""
    from trl_refine.eval.ruler import load_qa_dataset

    return load_qa_dataset(name_or_path, split=split, name=config_name, required_columns=())
