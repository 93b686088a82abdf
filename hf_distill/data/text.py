"""Load raw text corpora and pack them into fixed-length token blocks for masked-LM distillation.

* :func:`load_text_dataset` reads a Hub dataset, local ``.txt`` / ``.json`` / ``.jsonl`` /
  ``.csv`` / ``.tsv`` / ``.parquet`` files (optionally compressed), a folder of such files, or
  a folder written by ``Dataset.save_to_disk``; it checks the text column and drops empty
  documents.
* :func:`tokenize_and_pack` tokenises every document, concatenates the token stream of the
  whole dataset and cuts it into blocks of exactly ``block_size`` tokens. For tokenizers with
  [CLS]/[SEP] each block is ``[CLS] + block_size-2 content tokens + [SEP]``. Only the final
  incomplete block is dropped (packing is global, not per ``map`` batch). Both steps are
  ``datasets.map`` calls, so results are cached and reused on the next run.
* :func:`split_train_eval` holds out an evaluation set.

Wrong inputs end before any model is loaded, with the file or name and what to change: a missing
local path (never sent to the Hub, see :func:`hf_distill.data.paths.check_local_path`), a 0-byte or
unreadable file, a folder without data files, a missing or non-text column, a corpus with no
non-empty document, too little text for one block, too few rows for the evaluation split.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_distill.data.paths import TEXT_FORMATS, check_folder_has_data, check_local_path, format_of

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["load_text_dataset", "tokenize_and_pack", "split_train_eval", "TEXT_FORMATS", "check_local_path"]

logger = logging.getLogger(__name__)

def _check_local_split(split: str, source: Any) -> None:
    base = str(split).split("[", 1)[0].strip()
    if base != "train":
        raise ValueError(
            f"local files {source!r} form a single 'train' split, got split={split!r}; use split='train' "
            "(slices such as 'train[:90%]' work) and hold out evaluation data with split_train_eval"
        )


def _load_files(files: Sequence[str], *, split: str, streaming: bool, cache_dir: str | None, source: Any):
    import datasets

    builders = {}
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"{f!r} is empty (0 bytes); give a file with text, or leave it out of the list")
        builder, suffix = format_of(f)
        if builder is None:
            raise ValueError(
                f"cannot tell the format of {f!r} (suffix {suffix!r}); supported: {sorted(TEXT_FORMATS)} "
                "(optionally compressed), or a folder written by save_to_disk"
            )
        builders.setdefault(builder, []).append(f)
    if len(builders) > 1:
        raise ValueError(f"all files must have the same format, got {sorted(builders)} in {list(files)}")
    (builder, paths), = builders.items()
    _check_local_split(split, source)
    kwargs: dict[str, Any] = {}
    if builder == "csv" and all(format_of(p)[1] == ".tsv" for p in paths):
        kwargs["sep"] = "\t"
    try:
        return datasets.load_dataset(
            builder, data_files={"train": list(paths)}, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs
        )
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' wording for a file without rows
            raise ValueError(f"{source!r} is empty: it has no rows") from err
        raise
    except Exception as err:  # datasets wraps a parser's error (bad JSON, ragged CSV) in its own types
        cause = err.__cause__ or err.__context__ or err
        raise ValueError(f"cannot read {source!r} as {builder}: {type(cause).__name__}: {cause}; fix the file "
                         "or convert it to one of the supported formats") from err


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def _load_saved(path: str, *, split: str, streaming: bool):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        base = str(split).split("[", 1)[0]
        if base not in loaded:
            raise ValueError(f"split {split!r} not found in {path!r}; available splits: {sorted(loaded)}")
        loaded = loaded[base]
        if base != split:
            loaded = _slice(loaded, split, base)
    elif "[" in str(split):
        loaded = _slice(loaded, split, str(split).split("[", 1)[0])
    return loaded.to_iterable_dataset() if streaming else loaded


def _slice(dataset, split: str, base: str):
    """Apply a 'train[:10%]' style slice to an in-memory dataset via datasets' ReadInstruction."""
    import datasets

    instruction = datasets.ReadInstruction.from_spec(split)
    absolute = instruction.to_absolute({base: len(dataset)})[0]
    start = absolute.from_ or 0
    stop = absolute.to if absolute.to is not None else len(dataset)
    return dataset.select(range(start, stop))


def _drop_empty(dataset, text_column: str):
    def keep(batch: dict) -> list[bool]:
        return [isinstance(t, str) and bool(t.strip()) for t in batch[text_column]]

    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(keep, batched=True)
    kept = dataset.filter(keep, batched=True, desc="Dropping empty documents")
    return dataset if len(kept) == len(dataset) else kept


def load_text_dataset(
    source: str | list[str],
    *,
    split: str = "train",
    text_column: str = "text",
    config_name: str | None = None,
    streaming: bool = False,
    data_files: str | Sequence[str] | dict | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load a text corpus and check that ``text_column`` exists and holds strings.

    ``source`` is, in this order:

    * a list of local files (one format), or a single local file: ``.txt`` (one document per
      line), ``.json``/``.jsonl``, ``.csv``/``.tsv``, ``.parquet``, optionally ``.gz``/``.bz2``/...;
    * a folder written by ``save_to_disk`` (a ``DatasetDict`` folder: ``split`` picks the split);
    * any other local folder: read by ``datasets.load_dataset(folder)`` (data files inside,
      no loading script);
    * a glob such as ``"data/*.jsonl"``;
    * otherwise a Hub dataset name (or a packaged builder such as ``"json"`` with
      ``data_files``): ``datasets.load_dataset(source, config_name, split=split, ...)``.

    Documents that are empty, whitespace-only or missing are dropped (blank lines of a
    ``.txt`` file included), after any split slice such as ``"train[:1000]"`` is applied. Returns a ``Dataset`` (an ``IterableDataset`` with
    ``streaming=True``). Raises ``ValueError`` for a missing text column (listing the available
    columns), a non-string text column, or a corpus without any document.
    """
    import datasets

    if isinstance(source, (list, tuple)):
        files = [str(s) for s in source]
        if not files:
            raise ValueError("source is an empty list of files")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"these files do not exist: {missing}")
        ds = _load_files(files, split=split, streaming=streaming, cache_dir=cache_dir, source=source)
    else:
        source = os.fspath(source)
        if os.path.isfile(source):
            ds = _load_files([source], split=split, streaming=streaming, cache_dir=cache_dir, source=source)
        elif os.path.isdir(source) and _is_saved_dataset(source):
            ds = _load_saved(source, split=split, streaming=streaming)
        elif os.path.isdir(source):
            if data_files is None:
                check_folder_has_data(source)
            ds = datasets.load_dataset(
                source, config_name, split=split, streaming=streaming, data_files=data_files, cache_dir=cache_dir
            )
        elif any(ch in source for ch in "*?[") and format_of(source)[0] is not None:
            import glob

            files = sorted(glob.glob(source, recursive=True))
            if not files:
                raise FileNotFoundError(f"no file matches {source!r}")
            ds = _load_files(files, split=split, streaming=streaming, cache_dir=cache_dir, source=source)
        else:
            check_local_path(source, what="text data", flag="--train_files / --dataset_name")
            try:
                ds = datasets.load_dataset(
                    source, config_name, split=split, streaming=streaming, data_files=data_files, cache_dir=cache_dir
                )
            except Exception as err:  # network, auth, unknown name: say how the name was understood
                raise ValueError(
                    f"could not load {source!r} as a Hub dataset (no local file or folder has that name): {err}"
                ) from err

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"{source!r} gave several splits {sorted(ds)}; choose one with split=...")

    _check_text_column(ds, text_column, source)
    rows = None if isinstance(ds, datasets.IterableDataset) else len(ds)
    ds = _drop_empty(ds, text_column)
    if isinstance(ds, datasets.IterableDataset):
        if next(iter(ds.take(1)), None) is None:
            raise ValueError(f"{source!r} has no non-empty document in column {text_column!r}; give text, or "
                             "choose the column that holds it with --text_column (text_column=...)")
    elif len(ds) == 0:
        raise ValueError(f"{source!r} has no non-empty document in column {text_column!r}: all {rows} rows are "
                         "empty or whitespace; give text, or choose the column that holds it with --text_column "
                         "(text_column=...)")
    return ds


def _check_text_column(ds, text_column: str, source: Any) -> None:
    import datasets

    names = ds.column_names
    first = None
    if names is None:  # streaming without known features: look at the first row
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"{source!r} is empty: it has no rows")
        names = list(first)
    if text_column not in names:
        raise ValueError(
            f"text column {text_column!r} not found in {source!r}; available columns: {list(names)}. "
            "Choose the column with --text_column (text_column=...)."
        )
    features = ds.features
    if features is not None and text_column in features:
        feature = features[text_column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(
                f"column {text_column!r} of {source!r} must hold strings but has type {feature}; available "
                f"columns: {list(names)}. Choose another column with --text_column (text_column=...)."
            )
    elif first is not None and first[text_column] is not None and not isinstance(first[text_column], str):
        raise ValueError(f"column {text_column!r} of {source!r} must hold strings, found {type(first[text_column]).__name__}")
    if not isinstance(ds, datasets.IterableDataset) and len(ds) == 0:
        raise ValueError(f"{source!r} is empty: it has no rows")


# --------------------------------------------------------------------------- packing
def _layout(tokenizer: PreTrainedTokenizerBase, block_size: int, add_special_tokens: bool):
    """(content length per block, prefix ids, suffix ids, separator appended after each document)."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if add_special_tokens and cls_id is not None and sep_id is not None:
        if block_size < 3:
            raise ValueError(f"block_size must be at least 3 to hold [CLS], content and [SEP], got {block_size}")
        return block_size - 2, (int(cls_id),), (int(sep_id),), ()
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos_id = tokenizer.eos_token_id
    separator = (int(eos_id),) if add_special_tokens and eos_id is not None else ()
    return block_size, (), (), separator


def _tokenize_fn(tokenizer, text_column: str, separator: tuple[int, ...]):
    def tokenize(batch: dict) -> dict:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        ids = tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )["input_ids"]
        if separator:
            ids = [list(x) + list(separator) for x in ids]
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    return tokenize


def _blocks(content: np.ndarray, content_len: int, prefix: tuple, suffix: tuple) -> dict:
    rows = content.reshape(-1, content_len)
    n = rows.shape[0]
    parts = []
    if prefix:
        parts.append(np.broadcast_to(np.asarray(prefix, dtype=np.int64), (n, len(prefix))))
    parts.append(rows)
    if suffix:
        parts.append(np.broadcast_to(np.asarray(suffix, dtype=np.int64), (n, len(suffix))))
    blocks = np.concatenate(parts, axis=1) if len(parts) > 1 else rows
    return {"input_ids": blocks.tolist(), "attention_mask": np.ones_like(blocks, dtype=np.int8).tolist()}


def _flatten(lists) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64)


class _Packer:
    """Batched-map function: emits the blocks whose first content token lies in this batch.

    ``ends[i]`` is the exclusive end offset of document i in the dataset-wide token stream.
    A block that runs past the batch reads the following documents from ``tokenized``.
    """

    def __init__(self, tokenized, ends: np.ndarray, content_len: int, n_blocks: int, prefix, suffix):
        self.tokenized, self.ends, self.content_len = tokenized, ends, content_len
        self.n_blocks, self.prefix, self.suffix = n_blocks, prefix, suffix

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        empty = {"input_ids": [], "attention_mask": []}
        if not indices:
            return empty
        first_doc, last_doc = indices[0], indices[-1]
        start = int(self.ends[first_doc - 1]) if first_doc > 0 else 0
        end = int(self.ends[last_doc])
        c = self.content_len
        first_block = -(-start // c)  # ceil
        stop_block = min(-(-end // c), self.n_blocks)
        if stop_block <= first_block:
            return empty
        tokens = _flatten(batch["input_ids"])
        need_end = stop_block * c
        if need_end > end:  # last block continues into later documents
            next_doc = last_doc + 1
            upto = int(np.searchsorted(self.ends, need_end, side="left"))
            more = self.tokenized[next_doc : upto + 1]["input_ids"]
            tokens = np.concatenate([tokens, _flatten(more)])
        content = tokens[first_block * c - start : need_end - start]
        return _blocks(content, c, self.prefix, self.suffix)


def _pack_stream(dataset, tokenizer, text_column: str, content_len: int, prefix, suffix, separator, batch_size: int):
    tokenize = _tokenize_fn(tokenizer, text_column, separator)
    buffer = np.zeros(0, dtype=np.int64)
    for batch in dataset.iter(batch_size=batch_size):
        buffer = np.concatenate([buffer, _flatten(tokenize(batch)["input_ids"])])
        n = len(buffer) // content_len
        if n:
            out = _blocks(buffer[: n * content_len], content_len, prefix, suffix)
            for ids, mask in zip(out["input_ids"], out["attention_mask"]):
                yield {"input_ids": ids, "attention_mask": mask}
            buffer = buffer[n * content_len :]


def _packed_features():
    import datasets

    return datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "attention_mask": datasets.List(datasets.Value("int8"))}
    )


def tokenize_and_pack(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int = 128,
    text_column: str = "text",
    num_proc: int | None = None,
    add_special_tokens: bool = True,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenise ``dataset[text_column]`` and pack the whole token stream into equal blocks.

    Every row of the result has ``input_ids`` and ``attention_mask`` (all ones) of exactly
    ``block_size`` tokens; all other columns (the text included) are removed.

    * Tokenizers with [CLS] and [SEP] (``add_special_tokens=True``): each block is
      ``[CLS] + block_size-2 content tokens + [SEP]``; documents follow each other directly.
    * Other tokenizers: blocks of ``block_size`` content tokens; with ``add_special_tokens``
      and an EOS token, EOS is appended after every document as a separator.

    Packing runs over the dataset-wide token stream: only the incomplete last block is lost.
    Both passes are cached by ``datasets``. A ``DatasetDict`` is packed split by split; an
    ``IterableDataset`` (streaming) is packed lazily with the same layout.
    """
    import datasets
    from datasets.fingerprint import Hasher

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)(
            {
                name: tokenize_and_pack(
                    split, tokenizer, block_size=block_size, text_column=text_column, num_proc=num_proc,
                    add_special_tokens=add_special_tokens, batch_size=batch_size,
                )
                for name, split in dataset.items()
            }
        )

    content_len, prefix, suffix, separator = _layout(tokenizer, block_size, add_special_tokens)
    max_len = getattr(tokenizer, "model_max_length", None)
    if max_len is not None and max_len < 1_000_000 and block_size > max_len:
        logger.warning("block_size %d exceeds the tokenizer's model_max_length %d", block_size, max_len)

    if isinstance(dataset, datasets.IterableDataset):
        if dataset.column_names is not None and text_column not in dataset.column_names:
            raise ValueError(f"text column {text_column!r} not found; available columns: {dataset.column_names}")

        def generate():
            yield from _pack_stream(dataset, tokenizer, text_column, content_len, prefix, suffix, separator, batch_size)

        return datasets.IterableDataset.from_generator(generate, features=_packed_features())

    if text_column not in dataset.column_names:
        raise ValueError(
            f"text column {text_column!r} not found; available columns: {dataset.column_names}. "
            "Choose the column with --text_column (text_column=...)."
        )
    tokenized = dataset.map(
        _tokenize_fn(tokenizer, text_column, separator),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc="Tokenising",
    )
    ends = np.cumsum(np.asarray(tokenized.with_format("numpy")["length"], dtype=np.int64))
    total = int(ends[-1]) if len(ends) else 0
    n_blocks = total // content_len
    if n_blocks == 0:
        raise ValueError(
            f"the dataset has {total} tokens, fewer than one block of {content_len} content tokens; "
            "lower --block_size or provide more text"
        )
    tokenized = tokenized.remove_columns("length")
    packer = _Packer(tokenized, ends, content_len, n_blocks, prefix, suffix)
    fingerprint = Hasher.hash(["tokenize_and_pack/v1", tokenized._fingerprint, content_len, prefix, suffix])
    packed = tokenized.map(
        packer,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=tokenized.column_names,
        features=_packed_features(),
        new_fingerprint=fingerprint,
        desc=f"Packing into blocks of {block_size}",
    )
    logger.info(
        "packed %d tokens into %d blocks of %d; dropped the last %d tokens", total, n_blocks, block_size,
        total - n_blocks * content_len,
    )
    return packed


def split_train_eval(dataset: datasets.Dataset, eval_size: int | float, seed: int = 42):
    """Shuffle and split off an evaluation set; returns ``(train, eval)``.

    ``eval_size`` is a number of rows (int >= 1) or a fraction in (0, 1).
    """
    n = len(dataset)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise TypeError(f"eval_size must be an int (rows) or a float fraction, got {eval_size!r}")
    if isinstance(eval_size, float) and not 0.0 < eval_size < 1.0:
        raise ValueError(f"a fractional eval_size must be in (0, 1), got {eval_size}")
    more = "lower --eval_size, or give more data (for packed text: more text or a smaller --block_size)"
    if n < 2:
        raise ValueError(f"the dataset has {n} row{'s' if n != 1 else ''}: too few to hold out an evaluation set "
                         f"and keep a training set; give more data (for packed text: more text or a smaller "
                         "--block_size)")
    if isinstance(eval_size, int) and not 0 < eval_size < n:
        raise ValueError(f"eval_size={eval_size} rows must be between 1 and {n - 1} for a dataset of {n} rows; {more}")
    rows = eval_size if isinstance(eval_size, int) else int(np.ceil(eval_size * n))
    if rows >= n:
        raise ValueError(f"eval_size={eval_size} leaves no training rows in a dataset of {n} rows; {more}")
    parts = dataset.train_test_split(test_size=rows, shuffle=True, seed=seed)
    return parts["train"], parts["test"]
