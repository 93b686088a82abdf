"""Which positions of a batch count for each family of terms, and how many items each family has.

The objective owns this: a term declares a ``count_key`` and reads ``step.masks`` /
``step.counts``; the trainer only sums the counts over the micro-batches and processes of an
optimiser step.

Families (keys of ``masks`` and ``counts``):

* ``kd``: positions whose soft targets count (every real token; labelled positions only for
  causal LMs, encoder-decoders and ``restrict_kd_to_mask``; real frames for CTC);
* ``hidden``: positions whose hidden states / attention rows count (real tokens; for
  encoder-decoders, the decoder positions that carry a label);
* ``encoder_hidden``: an encoder-decoder's encoder positions (real input tokens; every position
  when the input has no attention mask, as for Whisper's log-mel frames);
* ``task``: labelled positions (one per sample for CTC), ``samples``: sequences.

Audio classifiers (``sequence_classification`` students that read ``input_values`` or
``input_features``): ``hidden`` holds the encoder frames that come from real audio. Their
``attention_mask`` counts input samples (wav2vec2-style) or log-mel frames (Whisper, whose encoder
always sees 30 s: 3000 mel frames -> 1500 encoder frames); the model's
``_get_feat_extract_output_lengths`` turns it into encoder frames. Without an attention mask every
frame counts (Whisper classifiers pool over all 1500 frames, padding included).
"""

from __future__ import annotations

import torch

from ..losses import IGNORE_INDEX
from ..modeling import is_audio_model, unwrap


class BatchLayout:
    """Masks and item counts of a batch, for a student of kind ``task``."""

    def __init__(self, student, task: str, *, restrict_kd_to_mask: bool = False):
        self.task = task
        self.restrict_kd_to_mask = restrict_kd_to_mask
        # CTC: output frames per input length (a transformers model method); held as a function, so the
        # objective never registers the student as a submodule.
        base = unwrap(student)
        audio_classifier = task == "sequence_classification" and is_audio_model(base)
        self._frames = getattr(base, "_get_feat_extract_output_lengths", None) if task == "ctc" or audio_classifier \
            else None
        if audio_classifier and self._frames is None:
            raise ValueError(f"{type(base).__name__} reads audio but has no _get_feat_extract_output_lengths: cannot "
                             "tell which of its frames are padding")

    @staticmethod
    def _attention(inputs: dict) -> torch.Tensor | None:
        attention = inputs.get("attention_mask")
        if attention is None and torch.is_tensor(inputs.get("input_ids")):
            attention = torch.ones_like(inputs["input_ids"])
        return attention.bool() if attention is not None else None

    def frame_mask(self, inputs: dict) -> torch.Tensor:
        """Audio models: which encoder frames come from real (unpadded) audio, shape (batch, frames)."""
        values = inputs.get("input_values", inputs.get("input_features"))
        total = int(self._frames(torch.tensor(values.shape[-1])))
        attention = inputs.get("attention_mask")
        lengths = (self._frames(attention.sum(-1)) if attention is not None
                   else torch.full((values.shape[0],), total, device=values.device))
        return torch.arange(total, device=values.device)[None, :] < lengths.to(values.device)[:, None]

    def masks(self, inputs: dict, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Boolean masks over positions for each family of terms (None: every position counts)."""
        attention = self._attention(inputs)
        if self.task == "sequence_classification":
            audio = self._frames is not None and ("input_values" in inputs or "input_features" in inputs)
            return {"kd": None, "hidden": self.frame_mask(inputs) if audio else attention}
        if self.task == "ctc":
            frames = self.frame_mask(inputs)
            return {"kd": frames, "hidden": frames}
        if self.task == "causal_lm":
            kd = labels[..., 1:] != IGNORE_INDEX if labels is not None else (
                attention[..., 1:] if attention is not None else None)
            return {"kd": kd, "hidden": attention}
        if self.task == "seq2seq_lm":
            decoder = inputs.get("decoder_attention_mask")
            kd = labels != IGNORE_INDEX if labels is not None else (decoder.bool() if decoder is not None else None)
            encoder = inputs.get("attention_mask")
            return {"kd": kd, "hidden": kd, "encoder_hidden": encoder.bool() if encoder is not None else None}
        if self.restrict_kd_to_mask and labels is not None:
            return {"kd": labels != IGNORE_INDEX, "hidden": attention}
        return {"kd": attention, "hidden": attention}

    def item_counts(self, inputs: dict) -> dict[str, torch.Tensor]:
        """Item counts of one micro-batch (``inputs`` with its ``labels``), as float32 tensors on the batch's device."""
        labels = inputs.get("labels")
        masks = self.masks(inputs, labels)
        tensors = [v for v in inputs.values() if torch.is_tensor(v)]
        tensors += [x for v in inputs.values() if isinstance(v, tuple) for x in v if torch.is_tensor(x)]  # encoder_outputs
        first = tensors[0]
        batch = first.shape[0]
        counts = {"samples": torch.tensor(batch)}
        for key, mask in masks.items():
            counts[key] = mask.sum() if mask is not None else torch.tensor(batch)
        if labels is not None and self.task == "ctc":
            counts["task"] = torch.tensor(batch)  # CTC: one sequence loss per sample
        elif labels is not None:
            task_labels = labels[..., 1:] if self.task == "causal_lm" else labels
            counts["task"] = (task_labels != IGNORE_INDEX).sum()
        else:
            counts["task"] = torch.tensor(0)
        return {k: v.to(first.device, torch.float32) for k, v in counts.items()}
