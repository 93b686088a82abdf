"""Batches of rows joined to a teacher store: the teacher's columns padded to the batch, as the trainer reads them.

:class:`StoreCollator` wraps the collator you train with (dynamic padding, DistilBERT masking, ...). It takes
the ``teacher_*`` columns out of the rows, runs the wrapped collator on the rest, and adds per batch:

- ``teacher_topk_logprobs`` float32 ``[B, L, k]`` (``[B, k]`` for a sequence classifier's store): the log of
  the stored probabilities;
- ``teacher_topk_indices`` int64 ``[B, L, k]`` (``[B, k]``);
- ``teacher_tail_mass`` float32 ``[B, L]`` (``[B]``);
- ``teacher_hidden_<layer>`` float32 ``[B, L, width]`` when the store holds hidden states;

where ``L`` is the batch's sequence length; positions past a row's end (padding) hold zeros, and the
training terms mask them out. A row whose stored positions do not match its tokens in the batch (another
truncation, a collator that adds tokens) is an error naming the row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["StoreCollator"]

POSITIONS = ("token", "sequence")


def _array(value, dtype) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy().astype(dtype, copy=False)
    return np.asarray(value, dtype=dtype)


class StoreCollator:
    """Wrap ``collator`` (default: ``transformers.default_data_collator``) for rows carrying a teacher store.

    ``positions``: ``"token"`` (a store of masked-LM, causal-LM or token-classification outputs) or
    ``"sequence"`` (a sequence classifier's: one position per row); :meth:`for_store` reads it from a store.
    ``padding_side``: where the wrapped collator pads (default: its tokenizer's ``padding_side``, else right).
    """

    def __init__(self, collator: Callable[[list[dict]], dict] | None = None, *, positions: str = "token",
                 padding_side: str | None = None):
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.collator = collator
        self.positions = positions
        tokenizer = getattr(collator, "tokenizer", None)
        side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self.padding_side = side

    @classmethod
    def for_store(cls, store_dir, collator=None, **kwargs) -> "StoreCollator":
        from .manifest import read_manifest

        return cls(collator, positions=read_manifest(store_dir)["config"]["positions"], **kwargs)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [dict(f) for f in features]
        teacher = [{k: row.pop(k) for k in list(row) if k.startswith("teacher_")} for row in rows]
        batch = self.collator(rows)
        if not teacher or not teacher[0]:
            return batch
        names = set(teacher[0])
        if not {"teacher_topk_probs", "teacher_topk_indices"} <= names:
            raise ValueError(f"rows carry teacher columns {sorted(names)} but not teacher_topk_probs and "
                             "teacher_topk_indices; join the store with hf_distill.store.join_store")
        probs = [_array(t["teacher_topk_probs"], np.float32) for t in teacher]
        if any(p.ndim != 2 for p in probs):
            raise ValueError("teacher_topk_probs must hold one [k] entry per position ([positions, k] per row)")
        if self.positions == "sequence":
            return self._sequence(batch, teacher, probs)
        ids = batch.get("input_ids")
        if not torch.is_tensor(ids) or ids.dim() != 2:
            raise ValueError("a token-level teacher store needs batches with input_ids of shape [batch, length]")
        return self._tokens(batch, teacher, probs, ids.shape[1])

    @staticmethod
    def _sequence(batch, teacher, probs):
        bad = [i for i, p in enumerate(probs) if p.shape[0] != 1]
        if bad:
            raise ValueError(f"row {bad[0]} holds {probs[bad[0]].shape[0]} stored positions; a sequence classifier's "
                             "store has one per row (is this a token-level store? use positions='token')")
        with np.errstate(divide="ignore"):
            batch["teacher_topk_logprobs"] = torch.from_numpy(np.log(np.stack([p[0] for p in probs])))
        batch["teacher_topk_indices"] = torch.from_numpy(
            np.stack([_array(t["teacher_topk_indices"], np.int64)[0] for t in teacher]))
        if "teacher_tail_mass" in teacher[0]:
            batch["teacher_tail_mass"] = torch.from_numpy(
                np.stack([_array(t["teacher_tail_mass"], np.float32)[0] for t in teacher]))
        for name in teacher[0]:
            if name.startswith("teacher_hidden_"):
                batch[name] = torch.from_numpy(np.stack([_array(t[name], np.float32)[0] for t in teacher]))
        return batch

    def _tokens(self, batch, teacher, probs, length: int):
        positions = [p.shape[0] for p in probs]
        attention = batch.get("attention_mask")
        real = attention.sum(-1).tolist() if torch.is_tensor(attention) else [length] * len(positions)
        for i, (n, r) in enumerate(zip(positions, real)):
            if n != int(r):
                raise ValueError(
                    f"row {i} of the batch has {int(r)} tokens but {n} stored teacher positions: the collator changed "
                    "the sequence (truncation, added tokens) or the rows are not those the store was cached from; "
                    "cache the data exactly as you train on it")
        b, k = len(probs), probs[0].shape[1]
        logp = np.zeros((b, length, k), np.float32)
        idx = np.zeros((b, length, k), np.int64)
        tail = np.zeros((b, length), np.float32)
        hidden: dict[str, np.ndarray | None] = {n: None for n in teacher[0] if n.startswith("teacher_hidden_")}
        for i, (t, p, n) in enumerate(zip(teacher, probs, positions)):
            s = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            with np.errstate(divide="ignore"):
                logp[i, s] = np.log(p)  # a probability that rounded to 0 in float16: -inf, which counts 0
            idx[i, s] = _array(t["teacher_topk_indices"], np.int64)
            if "teacher_tail_mass" in t:
                tail[i, s] = _array(t["teacher_tail_mass"], np.float32)
            for name in hidden:
                h = _array(t[name], np.float32)
                if hidden[name] is None:
                    hidden[name] = np.zeros((b, length, h.shape[1]), np.float32)
                hidden[name][i, s] = h
        batch["teacher_topk_logprobs"] = torch.from_numpy(logp)
        batch["teacher_topk_indices"] = torch.from_numpy(idx)
        if "teacher_tail_mass" in teacher[0]:
            batch["teacher_tail_mass"] = torch.from_numpy(tail)
        for name, value in hidden.items():
            batch[name] = torch.from_numpy(value)
        return batch
