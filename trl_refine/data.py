"""Turning a dataset of raw documents into token ids, with early, explicit errors."""

from __future__ import annotations

import logging
import numbers
import os

import datasets
import pyarrow as pa
import pyarrow.compute as pc
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
    vocab_size: int | None = None,
    keep_min_length: int | None = None,
    add_special_tokens: bool = False,
) -> Dataset | IterableDataset:
    """Add an ``input_ids`` column (right-truncated to ``max_length``) and enforce ``min_length`` valid tokens.

    A dataset with ``input_ids`` and no ``column`` is used as is (truncated), after checking that its ids are
    integers in ``[0, vocab_size)``; with both, ``column`` is tokenized (said in a warning). Too-short documents raise
    (``short_documents="error"``) or are dropped with a log line (``"drop"``). Streams (`IterableDataset`, whose
    columns may be unknown) get the same treatment row by row as they arrive; errors name the dataset row.
    Documents are tokenized without special tokens unless ``add_special_tokens`` (the release adds none).
    ``keep_min_length`` (``nsp_min_length``): documents with fewer tokens are dropped before the ``min_length`` check
    (the paper's >= 16K-token filter).
    """
    dataset = documents_from_messages(dataset, tokenizer, column=column, name=name)  # TRL's `messages` format
    columns = dataset.column_names
    if columns is not None and column not in columns and "input_ids" not in columns:
        raise ValueError(
            f"{name} has no column {column!r} (columns: {columns}). Set document_column to the column holding the "
            "documents, or provide pre-tokenized `input_ids`."
        )
    if columns is not None and column in columns and "input_ids" in columns:
        logger.warning(
            "trl_refine: %s has both %r and 'input_ids': the %r documents are tokenized and the given input_ids are "
            "replaced. Remove one of the two columns to silence this.",
            name,
            column,
            column,
        )
    if not isinstance(dataset, Dataset):
        return _tokenize_stream(
            dataset,
            tokenizer,
            column,
            max_length,
            min_length,
            short_documents,
            name,
            vocab_size,
            keep_min_length=keep_min_length,
            add_special_tokens=add_special_tokens,
        )

    if column in dataset.column_names:

        def encode(batch, indices):
            texts = batch[column]
            for i, text in zip(indices, texts):
                if not isinstance(text, str):
                    raise ValueError(
                        f"{name} row {i}: {column!r} must hold a string (a raw document), got {_shown(text)}."
                    )
            enc = tokenizer(
                texts,
                truncation=max_length is not None,
                max_length=max_length,
                add_special_tokens=add_special_tokens,
            )
            return {"input_ids": enc["input_ids"]}

        dataset = dataset.map(encode, batched=True, with_indices=True, desc=f"Tokenizing {name}")
        source = "the tokenizer"
    else:
        check_token_ids(dataset, name, vocab_size)
        if max_length is not None:
            dataset = dataset.map(lambda row: {"input_ids": list(row["input_ids"])[:max_length]})
        source = "input_ids"
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty.")
    if keep_min_length is not None:
        before = len(dataset)
        dataset = dataset.filter(
            lambda row: len(row["input_ids"]) >= keep_min_length,
            desc=f"Keeping documents of >= {keep_min_length} tokens",
        )
        logger.warning(
            "trl_refine: kept %d of %d documents of %s with >= %d tokens (nsp_min_length)",
            len(dataset),
            before,
            name,
            keep_min_length,
        )
        if len(dataset) == 0:
            raise ValueError(
                f"no document of {name} has >= {keep_min_length} tokens (nsp_min_length); lower nsp_min_length or use "
                "longer documents."
            )
    if source == "the tokenizer":
        check_token_ids(dataset, name, vocab_size, tokenized=True)
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
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


def check_documents_per_epoch(dataset: Dataset | IterableDataset, per_batch: int, geometry: str) -> None:
    """A map-style train dataset must fill one generation batch of ``per_batch`` documents; documents that do not
    fill the last batch of an epoch are left out of it (TRL's sampler drops them), which is said once."""
    if not isinstance(dataset, Dataset):
        return
    total = len(dataset)
    if total < per_batch:
        raise ValueError(
            f"train_dataset has {total} usable document(s), fewer than one generation batch of {per_batch} "
            f"({geometry}): no step could run. Add documents, or lower documents_per_device, steps_per_generation "
            "(default: gradient_accumulation_steps) or the number of processes."
        )
    left_out = total % per_batch
    if left_out:
        logger.warning(
            "trl_refine: train_dataset has %d documents and a generation batch takes %d (%s): %d document(s) are left "
            "out of every epoch (other ones each epoch when shuffled). Use a multiple of %d documents to train on all.",
            total,
            per_batch,
            geometry,
            left_out,
            per_batch,
        )


def check_token_ids(dataset: Dataset, name: str, vocab_size: int | None, tokenized: bool = False) -> None:
    """Pre-tokenized ``input_ids`` must be lists of integers in ``[0, vocab_size)`` (checked with pyarrow, fast)."""
    ids = dataset.with_format("arrow")["input_ids"]  # honours a select()'s indices, unlike dataset.data
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    kind = ids.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise ValueError(
            f"{name}['input_ids'] must hold lists of integer token ids, got arrow type {kind}. Convert the column "
            "(e.g. dataset.cast_column) or give raw text in document_column instead."
        )
    flat = pc.list_flatten(ids)
    if len(flat) == 0:
        return
    low, high = pc.min_max(flat).values()
    low, high = low.as_py(), high.as_py()
    bad = None
    if low < 0:
        bad = f"a negative id ({low})"
    elif vocab_size is not None and high >= vocab_size:
        bad = f"id {high}, outside the model's vocabulary of {vocab_size}"
    if bad is not None:
        rows = pc.list_parent_indices(ids)
        where = pc.index(flat, pa.scalar(low if low < 0 else high, flat.type)).as_py()
        row = int(rows[where].as_py()) if where >= 0 else "?"
        fix = (
            "Use the tokenizer that belongs to the model."
            if tokenized
            else "Re-tokenize with the model's tokenizer, or give raw text in document_column."
        )
        source = ": the tokenizer produced" if tokenized else " has"
        raise ValueError(f"{name} row {row}{source} {bad}. {fix}")


def _tokenize_stream(
    dataset,
    tokenizer,
    column,
    max_length,
    min_length,
    short_documents,
    name,
    vocab_size,
    *,
    keep_min_length=None,
    add_special_tokens=False,
):
    """`tokenize_documents` for an `IterableDataset`: every row is tokenized (or checked) and length-checked as it
    arrives; rows under ``keep_min_length`` are filtered out, short rows too with ``short_documents="drop"``."""
    dropped = [0]

    def prepare(row, index):
        if isinstance(row.get(column), str):
            ids = tokenizer(
                row[column],
                truncation=max_length is not None,
                max_length=max_length,
                add_special_tokens=add_special_tokens,
            )["input_ids"]
        elif column in row and row[column] is not None:
            raise ValueError(
                f"{name} row {index}: {column!r} must hold a string (a raw document), got {_shown(row[column])}."
            )
        elif row.get("input_ids") is not None:
            ids = list(row["input_ids"])
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{name} row {index}: input_ids must be integer token ids, got {_shown(ids)}.")
            ids = ids[:max_length] if max_length is not None else ids
        else:
            raise ValueError(
                f"{name} row {index} has no {column!r} text and no input_ids (columns: {sorted(row)}). Set "
                "document_column to the column holding the documents."
            )
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(
                f"{name} row {index}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}). Use the "
                "model's tokenizer."
            )
        kept = keep_min_length is None or len(ids) >= keep_min_length  # dropped by nsp_min_length otherwise
        if len(ids) < min_length and short_documents == "error" and kept:
            raise ValueError(
                f"{name} row {index} has {len(ids)} tokens, fewer than {min_length} (margin + n·k + max(k, margin)). "
                "Filter the stream, set nsp_short_documents='drop', or lower nsp_num_chunks / nsp_rollout_length / "
                "nsp_margin."
            )
        return {"input_ids": ids}

    def long_enough(row, index):
        keep = len(row["input_ids"]) >= min_length
        if not keep:
            dropped[0] += 1
            if dropped[0] == 1:
                logger.warning(
                    "trl_refine: dropping documents of %s shorter than %d tokens as they stream in (first: row %d)",
                    name,
                    min_length,
                    index,
                )
        return keep

    dataset = dataset.map(prepare, with_indices=True)
    if keep_min_length is not None:
        dataset = dataset.filter(lambda row: len(row["input_ids"]) >= keep_min_length)
    if short_documents == "drop":
        dataset = dataset.filter(long_enough, with_indices=True)
    return dataset


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:limit]}{'...' if len(text) > limit else ''}"


def vocab_size_of(model) -> int | None:
    """Rows of the model's input embedding (token ids must be below it), or None if it cannot be told."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, NotImplementedError):
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(size) if isinstance(size, int) else None


_LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


def load_any_dataset(
    path_or_hub_id: str, split: str | None = None, config_name: str | None = None
) -> datasets.Dataset:
    """The package's one dataset loader: a local parquet / jsonl / json / csv / arrow file, a directory (saved with
    ``save_to_disk`` or loadable by ``datasets.load_dataset``) or a Hub dataset id. ``split`` may be omitted when
    there is only one (local files load as ``"train"``); ``config_name`` is the Hub configuration name."""
    name = config_name
    path = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, name=name, split=split)
    elif os.path.isfile(path):
        ext = next((e for e in _LOCAL_BUILDERS if path.lower().endswith(e)), None)
        if ext is None:
            raise ValueError(
                f"cannot load {path!r}: unknown file type (use one of {sorted(_LOCAL_BUILDERS)}, a directory, "
                "or a hub dataset id)"
            )
        loaded = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=path, split=split or "train")
    else:
        looks_local = path.startswith((".", "/", "~")) or any(path.lower().endswith(e) for e in _LOCAL_BUILDERS)
        if looks_local:
            raise FileNotFoundError(f"no such file or directory: {path!r}")
        loaded = datasets.load_dataset(path_or_hub_id, name=name, split=split)

    if isinstance(loaded, datasets.DatasetDict):
        if split is not None:
            if split not in loaded:
                raise ValueError(f"split {split!r} not in {path_or_hub_id!r}; available splits: {list(loaded)}")
            return loaded[split]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise ValueError(f"{path_or_hub_id!r} has several splits {list(loaded)}; pass split=...")
    return loaded
