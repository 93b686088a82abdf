"""CTC students on pseudo-label stores: frame-level top-k soft targets.

- :class:`CTCPseudoLabelDataset` / :class:`CTCDistillationCollator`: ``input_values`` +
  ``attention_mask`` (padding frames masked by the trainer), ``labels`` = the teacher's collapsed
  pseudo-transcript (``-100`` padding) and the stored per-frame top-k, padded to the student's frame
  count for the padded batch.
- :func:`transcribe_ctc` (greedy CTC) and :func:`topk_kl` (mean stored-top-k KL of a model on a dataset).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hf_distill.speech.audio import AudioItem
from hf_distill.speech.training import IGNORE_INDEX, StoreRowsDataset, batches, item_for, logprobs_from_probs, soft_arrays

__all__ = ["CTCDistillationCollator", "CTCPseudoLabelDataset", "ctc_rows_matching_frames", "topk_kl", "transcribe_ctc"]


class CTCPseudoLabelDataset(StoreRowsDataset):
    """Store rows of a CTC teacher -> ``input_values``, ``labels`` (collapsed pseudo-transcript) and
    the stored per-frame top-k soft labels."""

    def __init__(self, rows, feature_extractor, *, items: Mapping[str, AudioItem] | None = None,
                 soft_labels: bool = True):
        super().__init__(rows, feature_extractor, items=items, soft_labels=soft_labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[int(i)]
        values = self.feature_extractor(self.audio(row), sampling_rate=self.sampling_rate,
                                        return_tensors="np").input_values[0]
        out: dict[str, Any] = {"input_values": values.astype(np.float32), "labels": [int(x) for x in row["token_ids"]]}
        if self.soft_labels:
            idx, probs, tail = soft_arrays(row)
            out.update(teacher_topk_indices=idx, teacher_topk_logprobs=logprobs_from_probs(probs), teacher_tail_mass=tail)
        return out


class CTCDistillationCollator:
    """Pads CTC examples: audio with zeros plus ``attention_mask``, labels with -100, the top-k rows to
    the student's frame count for the padded length (``frame_lengths``: the model's
    ``_get_feat_extract_output_lengths``)."""

    def __init__(self, feature_extractor, frame_lengths):
        self.feature_extractor = feature_extractor
        self.frame_lengths = frame_lengths

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_values"]) for e in examples)
        values = np.zeros((len(examples), n), np.float32)
        mask = np.zeros((len(examples), n), np.int64)
        for b, e in enumerate(examples):
            values[b, : len(e["input_values"])] = e["input_values"]
            mask[b, : len(e["input_values"])] = 1
        m = max(max(len(e["labels"]) for e in examples), 1)
        batch = {
            "input_values": torch.as_tensor(values),
            "attention_mask": torch.as_tensor(mask),
            "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * (m - len(e["labels"])) for e in examples]),
        }
        if "teacher_topk_indices" in examples[0]:
            frames = int(self.frame_lengths(torch.tensor(n)))
            k = examples[0]["teacher_topk_indices"].shape[1]
            idx = np.tile(np.arange(k, dtype=np.int64), (len(examples), frames, 1))
            logp = np.zeros((len(examples), frames, k), np.float32)
            tail = np.zeros((len(examples), frames), np.float32)
            for b, e in enumerate(examples):
                f = min(len(e["teacher_tail_mass"]), frames)
                idx[b, :f] = e["teacher_topk_indices"][:f]
                logp[b, :f] = e["teacher_topk_logprobs"][:f]
                tail[b, :f] = e["teacher_tail_mass"][:f]
            batch.update(teacher_topk_indices=torch.as_tensor(idx), teacher_topk_logprobs=torch.as_tensor(logp),
                         teacher_tail_mass=torch.as_tensor(tail))
        return batch


def ctc_rows_matching_frames(ds, items: Mapping[str, AudioItem] | None, frame_lengths,
                             sampling_rate: int) -> tuple[list[int], int]:
    """Indices of CTC store rows whose stored frame count equals the model's frame count for the row's
    audio length (what the frame-level KL needs); returns (indices, number left out)."""
    from hf_distill.speech.audio import probe, resampled_length

    keep, dropped = [], 0
    view = ds.select_columns(["id", "path", "topk_tail"])
    for i, row in enumerate(view):
        info = probe(item_for(row, items))
        n = resampled_length(info.frames, info.sampling_rate, sampling_rate)
        if row["topk_tail"] is not None and int(frame_lengths(torch.tensor(n))) == len(row["topk_tail"]):
            keep.append(i)
        else:
            dropped += 1
    return keep, dropped


@torch.inference_mode()
def transcribe_ctc(model, processor, audios: Sequence[np.ndarray], *, batch_size: int = 8) -> list[str]:
    """Greedy CTC transcripts of audio arrays (at the feature extractor's rate), in order."""
    fe = getattr(processor, "feature_extractor", processor)
    rate = int(fe.sampling_rate)
    device = next(model.parameters()).device
    out: list[str] = [""] * len(audios)
    order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
    for idx in batches(order, batch_size):
        inputs = fe([audios[i] for i in idx], sampling_rate=rate, padding=True, return_attention_mask=True,
                    return_tensors="pt")
        logits = model(input_values=inputs.input_values.to(device),
                       attention_mask=inputs.attention_mask.to(device)).logits
        lengths = model._get_feat_extract_output_lengths(inputs.attention_mask.sum(-1))
        pred = logits.argmax(-1).cpu()
        for b, i in enumerate(idx):
            out[i] = processor.decode(pred[b, : int(lengths[b])].tolist()).strip()
    return out


@torch.no_grad()
def topk_kl(model, dataset, collator, *, temperature: float, batch_size: int = 8) -> float:
    """Mean KL (x T^2) per labelled position between the stored top-k soft labels (+ tail) and the
    model, over ``dataset``: the distillation loss on held-out data."""
    from hf_distill.losses import topk_kl_loss
    from hf_distill.teachers import task_kind

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    ctc = task_kind(model) == "ctc"
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        if ctc:
            logits = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits
            lengths = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
            mask = torch.arange(logits.shape[1], device=device)[None] < lengths[:, None]
        else:
            logits = model(input_features=batch["input_features"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
            mask = batch["labels"] != IGNORE_INDEX
        n = float(mask.sum())
        loss = topk_kl_loss(logits, batch["teacher_topk_logprobs"], batch["teacher_topk_indices"],
                            teacher_tail_mass=batch["teacher_tail_mass"], temperature=temperature, mask=mask)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / count if count else math.nan
