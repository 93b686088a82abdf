"""DistilBERT-style dynamic masking for masked-language-model distillation.

Masking follows the recipe used to train DistilBERT:

* every vocabulary id gets a sampling weight ``max(count, 1) ** -smoothing`` from its corpus
  frequency (rare tokens are masked more often than in plain uniform masking); special tokens
  (everything in ``tokenizer.all_special_ids``, padding included) get weight 0;
* per batch, exactly ``ceil(mlm_probability * number_of_real_tokens)`` positions are drawn
  *without replacement*, each with probability proportional to the weight of the token at that
  position. "Real" tokens are the non-padding positions (``attention_mask == 1``), [CLS]/[SEP]
  included, as in the original recipe; special tokens and padding are never selected;
* each selected position independently becomes [MASK] (``mask_ratio``), a random non-special
  token (``random_ratio``) or stays unchanged (the rest);
* ``labels`` hold the original id at selected positions and -100 everywhere else.

Without ``token_counts`` every non-special token has the same weight (uniform masking, but
still an exact number of masked positions per batch).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = ["DistilMLMCollator", "count_tokens", "token_sampling_weights"]

IGNORE_INDEX = -100
_KNOWN_KEYS = {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"}


def count_tokens(
    data: Any,
    vocab_size: int,
    *,
    column: str = "input_ids",
    batch_size: int = 1000,
    progress: bool = True,
) -> torch.Tensor:
    """Count how often each vocabulary id occurs; returns an int64 tensor of length ``vocab_size``.

    ``data`` is a ``datasets.Dataset`` / ``IterableDataset`` with an ``input_ids`` column (name set
    by ``column``), or any iterable of id sequences (lists, tuples, numpy arrays, tensors) or of
    mappings holding ``column``. The result is meant for ``DistilMLMCollator(token_counts=...)``.
    Ids outside ``[0, vocab_size)`` raise a ``ValueError``.
    """
    from tqdm.auto import tqdm

    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    counts = np.zeros(vocab_size, dtype=np.int64)

    def add(chunk: list) -> None:
        if not chunk:
            return
        arrays = []
        for ids in chunk:
            if isinstance(ids, Mapping):
                ids = ids[column]
            if torch.is_tensor(ids):
                ids = ids.detach().cpu().numpy()
            arr = np.asarray(ids, dtype=np.int64).reshape(-1)
            arrays.append(arr)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if flat.size == 0:
            return
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size}); pass vocab_size=len(tokenizer) "
                "for the tokenizer that produced these ids"
            )
        np.add(counts, np.bincount(flat, minlength=vocab_size), out=counts)

    is_hf_dataset = hasattr(data, "iter") and hasattr(data, "column_names")
    if is_hf_dataset:
        names = data.column_names
        if names is not None and column not in names:
            raise ValueError(f"column {column!r} not found; available columns: {sorted(names)}")
        try:
            total = math.ceil(len(data) / batch_size)
        except TypeError:  # streaming datasets have no length
            total = None
        for batch in tqdm(data.iter(batch_size=batch_size), total=total, desc="Counting tokens", unit="batch", disable=not progress):
            add(list(batch[column]))
    else:
        try:
            total = len(data)
        except TypeError:
            total = None
        chunk: list = []
        for item in tqdm(data, total=total, desc="Counting tokens", unit="seq", disable=not progress):
            chunk.append(item)
            if len(chunk) >= batch_size:
                add(chunk)
                chunk = []
        add(chunk)
    return torch.from_numpy(counts)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    for attr in ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return ids


def token_sampling_weights(
    tokenizer: PreTrainedTokenizerBase,
    token_counts: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    smoothing: float = 0.7,
) -> torch.Tensor:
    """Per-id masking weights (float64): ``max(count, 1) ** -smoothing``, 0 for special tokens.

    With ``token_counts=None`` every non-special id gets weight 1. The tensor has
    ``max(len(tokenizer), len(token_counts))`` entries.
    """
    vocab = len(tokenizer)
    if token_counts is None:
        weights = torch.ones(vocab, dtype=torch.float64)
    else:
        counts = torch.as_tensor(np.asarray(token_counts), dtype=torch.float64).reshape(-1)
        if counts.numel() < vocab:
            raise ValueError(
                f"token_counts has {counts.numel()} entries but the tokenizer has {vocab} tokens; "
                "count with count_tokens(dataset, vocab_size=len(tokenizer))"
            )
        if torch.any(counts < 0) or not torch.all(torch.isfinite(counts)):
            raise ValueError("token_counts must be finite and non-negative")
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing}")
        weights = counts.clamp(min=1.0).pow(-float(smoothing))
    for i in _special_ids(tokenizer):
        if 0 <= i < weights.numel():
            weights[i] = 0.0
    if not torch.any(weights > 0):
        raise ValueError("every token has masking weight 0: the vocabulary holds only special tokens")
    return weights


@dataclass
class DistilMLMCollator:
    """Pad a list of tokenised examples and mask them the way DistilBERT was trained.

    Usable as ``Trainer(data_collator=...)`` or ``DataLoader(collate_fn=...)``. Each feature is a
    mapping with ``input_ids`` (list or tensor) and optionally ``attention_mask``,
    ``token_type_ids`` and ``special_tokens_mask`` (positions marked 1 are never masked; the key
    is not returned). Features that already hold ``labels`` are rejected: the labels are made here.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (and ``token_type_ids`` when the
    features have them), all int64 tensors of shape ``(batch, padded_length)``.

    ``seed`` makes the masking reproducible through a private ``torch.Generator`` (the global
    RNG is not touched). Inside ``DataLoader`` workers the generator is re-seeded from ``seed``
    and the worker's own seed, so workers do not repeat each other's masks. With ``seed=None``
    the draws come from torch's global RNG.
    """

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    token_counts: Sequence[int] | torch.Tensor | None = None
    smoothing: float = 0.7
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    # Derive each batch's randomness from (seed, the batch's token ids) instead of a running
    # stream: a run resumed from a checkpoint then masks every later batch exactly as an
    # uninterrupted run would, whatever the data loader prefetched before the interruption.
    content_seeded: bool = False
    token_weights: torch.Tensor = field(init=False, repr=False, compare=False)
    random_token_ids: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        # written so that NaN fails every comparison and is refused
        if not (self.mask_ratio >= 0 and self.random_ratio >= 0 and self.mask_ratio + self.random_ratio <= 1.0 + 1e-12):
            raise ValueError(
                f"mask_ratio ({self.mask_ratio}) and random_ratio ({self.random_ratio}) must be >= 0 and sum to at most 1"
            )
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; masked-LM distillation needs one (e.g. [MASK])")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building the collator")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")
        self.token_weights = token_sampling_weights(self.tokenizer, self.token_counts, self.smoothing)
        specials = _special_ids(self.tokenizer)
        self.random_token_ids = torch.tensor(
            [i for i in range(len(self.tokenizer)) if i not in specials], dtype=torch.long
        )
        if self.random_token_ids.numel() == 0:
            raise ValueError("the tokenizer has no non-special tokens to use as random replacements")
        self._generator: torch.Generator | None = None
        self._worker_key: tuple | None = None

    # ------------------------------------------------------------------ randomness
    def _get_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        key = None if worker is None else (worker.id, worker.seed)
        if self._generator is None or key != self._worker_key:
            seed = int(self.seed) if worker is None else (int(self.seed) * 1_000_003 + int(worker.seed)) % (2**63)
            self._generator = torch.Generator().manual_seed(seed)
            self._worker_key = key
        return self._generator

    def _content_generator(self, input_ids: torch.Tensor) -> torch.Generator:
        digest = hashlib.blake2b(input_ids.to(torch.int64).numpy().tobytes(), digest_size=8,
                                 key=str(int(self.seed)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2**63))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        generator = state.pop("_generator", None)
        state["_generator_state"] = None if generator is None else generator.get_state()
        return state

    def __setstate__(self, state: dict) -> None:
        generator_state = state.pop("_generator_state", None)
        self.__dict__.update(state)
        self._generator = None
        if generator_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(generator_state)

    # ------------------------------------------------------------------ padding
    def _pad(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("DistilMLMCollator got an empty batch")
        keys = set()
        for i, feature in enumerate(features):
            if not isinstance(feature, Mapping):
                raise TypeError(f"each feature must be a dict with 'input_ids'; feature {i} is a {type(feature).__name__}")
            keys |= set(feature)
        if "labels" in keys:
            raise ValueError(
                "features already contain 'labels'; DistilMLMCollator creates the masked-LM labels itself. "
                "Remove the labels column from the dataset (dataset.remove_columns('labels'))."
            )
        if "input_ids" not in keys:
            raise ValueError(f"features have no 'input_ids' (keys: {sorted(keys)}); tokenise the dataset first")
        unknown = keys - _KNOWN_KEYS
        if unknown:
            raise ValueError(
                f"features contain columns DistilMLMCollator does not handle: {sorted(unknown)}; "
                "remove them (e.g. dataset.remove_columns(...)) so that only input_ids, attention_mask "
                "and token_type_ids reach the collator"
            )

        def as_list(value: Any, name: str, i: int) -> list[int]:
            if torch.is_tensor(value):
                value = value.tolist()
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            value = list(value)
            if value and isinstance(value[0], (list, tuple)):
                raise ValueError(f"feature {i} '{name}' is nested; each feature must hold one sequence")
            return [int(v) for v in value]

        ids = [as_list(f["input_ids"], "input_ids", i) for i, f in enumerate(features)]
        lengths = [len(x) for x in ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        batch = len(ids)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"

        def fill(rows: list[list[int]], pad_value: int) -> torch.Tensor:
            out = torch.full((batch, width), pad_value, dtype=torch.long)
            for r, row in enumerate(rows):
                if not row:
                    continue
                values = torch.tensor(row, dtype=torch.long)
                if left:
                    out[r, width - len(row) :] = values
                else:
                    out[r, : len(row)] = values
            return out

        def optional(name: str, default: int) -> list[list[int]] | None:
            if name not in keys:
                return None
            rows = []
            for i, f in enumerate(features):
                if name in f and f[name] is not None:
                    row = as_list(f[name], name, i)
                    if len(row) != lengths[i]:
                        raise ValueError(
                            f"feature {i}: '{name}' has length {len(row)} but 'input_ids' has length {lengths[i]}"
                        )
                else:
                    row = [default] * lengths[i]
                rows.append(row)
            return rows

        out = {"input_ids": fill(ids, int(self.tokenizer.pad_token_id))}
        attention = optional("attention_mask", 1)
        out["attention_mask"] = fill(attention if attention is not None else [[1] * n for n in lengths], 0)
        token_types = optional("token_type_ids", 0)
        if token_types is not None:
            out["token_type_ids"] = fill(token_types, int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0))
        special = optional("special_tokens_mask", 0)
        if special is not None:
            out["special_tokens_mask"] = fill(special, 1)
        return out

    # ------------------------------------------------------------------ masking
    def num_to_mask(self, num_real_tokens: int) -> int:
        """``ceil(mlm_probability * num_real_tokens)``, immune to float noise (0.15 * 100 -> 15)."""
        return int(math.ceil(round(self.mlm_probability * num_real_tokens, 9)))

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pad(features)
        input_ids = batch["input_ids"]
        attention = batch["attention_mask"].bool()
        special_mask = batch.pop("special_tokens_mask", None)
        generator = self._content_generator(input_ids) if self.content_seeded and self.seed is not None \
            else self._get_generator()

        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.token_weights.numel()):
            raise ValueError(
                f"input_ids hold ids outside [0, {self.token_weights.numel()}); the data was tokenised with a "
                "different tokenizer (or token_counts is too short)"
            )

        flat_ids = input_ids.reshape(-1)
        weights = self.token_weights[flat_ids] * attention.reshape(-1)
        if special_mask is not None:
            weights = weights * (special_mask.reshape(-1) == 0)
        eligible = int((weights > 0).sum())
        n_select = min(self.num_to_mask(int(attention.sum())), eligible)

        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if n_select > 0:
            selected = torch.multinomial(weights, n_select, replacement=False, generator=generator)
            flat_labels = labels.view(-1)
            flat_labels[selected] = flat_ids[selected]
            masked_ids = flat_ids.clone()
            u = torch.rand(n_select, generator=generator, dtype=torch.float64)
            to_mask = u < self.mask_ratio
            to_random = (~to_mask) & (u < self.mask_ratio + self.random_ratio)
            masked_ids[selected[to_mask]] = int(self.tokenizer.mask_token_id)
            n_random = int(to_random.sum())
            if n_random:
                pick = torch.randint(self.random_token_ids.numel(), (n_random,), generator=generator)
                masked_ids[selected[to_random]] = self.random_token_ids[pick]
            input_ids = masked_ids.view_as(input_ids)

        batch["input_ids"] = input_ids
        batch["labels"] = labels
        return batch
