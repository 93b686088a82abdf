"""Batch causal-LM rows: right-padded training tensors plus left-padded prompts for generation.

:class:`CompletionCollator` takes rows from :func:`hf_distill.lm.data.prepare_lm_dataset` (packed
text, prompt-completion or chat) and returns

* ``input_ids`` / ``attention_mask`` / ``labels``, right-padded to the longest row (or a multiple of
  ``pad_to_multiple_of``); ``labels`` is ``-100`` on padding, so padding never counts;
* for rows that have a prompt, ``prompt_input_ids`` / ``prompt_attention_mask``: each row's prompt
  (``input_ids[:prompt_length]``) left-padded, so ``model.generate(prompt_input_ids, ...)``
  continues every row right where its prompt ends.

The prompt length comes from the row's ``prompt_length`` (consumed: it is not in the batch) or, when
the ``Trainer`` has removed that column (``remove_unused_columns=True`` drops columns the model's
``forward`` does not take), from ``labels``: the prompt ends where the last run of counted labels
starts. Both give the same answer for rows from :func:`~hf_distill.lm.data.tokenize_completion`,
so the collator works as ``data_collator`` with either setting. Packed text (every label counts)
has no prompt and gets no prompt tensors.

Public API::

    CompletionCollator(tokenizer, pad_to_multiple_of=None, *, prompts="auto")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hf_distill.lm.data import IGNORE_INDEX

__all__ = ["CompletionCollator", "prompt_length_from_labels"]


def prompt_length_from_labels(labels: Sequence[int]) -> int:
    """Where the last run of counted (not ``-100``) labels starts; 0 if every label counts or none does."""
    labels = list(labels)
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start if end else 0


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class CompletionCollator:
    """``data_collator`` for causal-LM rows (see the module docstring).

    ``prompts``: ``"auto"`` adds prompt tensors when any row of the batch has a prompt
    (``prompt_length > 0``, or labels that mask a prefix); ``True`` always adds them (an empty prompt
    is all padding); ``False`` never.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None, *, prompts: bool | str = "auto"):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")
        if prompts not in ("auto", True, False):
            raise ValueError(f"prompts must be 'auto', True or False, got {prompts!r}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.prompts = prompts

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CompletionCollator got an empty batch")
        missing = [i for i, f in enumerate(features) if "input_ids" not in f]
        if missing:
            raise ValueError(f"rows {missing[:5]} have no 'input_ids'; prepare the data with prepare_lm_dataset "
                             f"(columns seen: {sorted(features[missing[0]])})")
        ids = [list(map(int, f["input_ids"])) for f in features]
        labels = [list(map(int, f["labels"])) if f.get("labels") is not None else list(row)
                  for f, row in zip(features, ids)]
        masks = [list(map(int, f["attention_mask"])) if f.get("attention_mask") is not None else [1] * len(row)
                 for f, row in zip(features, ids)]
        for i, (row, lab, mask) in enumerate(zip(ids, labels, masks)):
            if not (len(row) == len(lab) == len(mask)):
                raise ValueError(f"row {i}: input_ids ({len(row)}), labels ({len(lab)}) and attention_mask "
                                 f"({len(mask)}) differ in length")
        width = _round_up(max(len(row) for row in ids), self.pad_to_multiple_of)
        batch = {
            "input_ids": self._pad(ids, width, self.pad_token_id, left=False),
            "attention_mask": self._pad(masks, width, 0, left=False),
            "labels": self._pad(labels, width, IGNORE_INDEX, left=False),
        }
        lengths = [int(f["prompt_length"]) if f.get("prompt_length") is not None else prompt_length_from_labels(lab)
                   for f, lab in zip(features, labels)]
        if self.prompts is True or (self.prompts == "auto" and any(n > 0 for n in lengths)):
            prompts = [row[:n] for row, n in zip(ids, lengths)]
            prompt_width = _round_up(max(max(lengths), 1), self.pad_to_multiple_of)
            batch["prompt_input_ids"] = self._pad(prompts, prompt_width, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = self._pad([[1] * n for n in lengths], prompt_width, 0, left=True)
        return batch

    @staticmethod
    def _pad(rows: list[list[int]], width: int, value: int, *, left: bool) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                if left:
                    out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                else:
                    out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out
