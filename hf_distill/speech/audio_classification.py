"""Audio classification students: data, collation and model helpers for ``AutoModelForAudioClassification`` pairs.

A clip classifier (``WhisperForAudioClassification``, ``Wav2Vec2ForSequenceClassification``, ...) is a
``sequence_classification`` student for :class:`~hf_distill.DistillationTrainer`: response terms (``kl``)
compare its per-clip logits with the teacher's; feature terms (``hidden_mse``, ``hidden_cos``) compare
encoder frames, padding frames masked (``attention_mask`` over samples or log-mel frames, turned into
encoder frames by the model's ``_get_feat_extract_output_lengths``; see
:mod:`hf_distill.objectives.layout`).

- :func:`whisper_audio_classifier`: a ``WhisperForAudioClassification`` whose encoder is copied from a
  Whisper speech-recognition model (a folder or a model), optionally frozen.
- :class:`AudioClassificationCollator`: examples ``{"audio": samples, "label"?: int, "teacher_logits"?: ...}``
  -> ``input_features`` (Whisper) or ``input_values`` (wav2vec2-style) + ``attention_mask``, ``labels`` and
  the teacher columns. It refuses text columns: a speech student's batch carries audio only.
- :func:`pooled_whisper_states` and :class:`PooledStatesCollator`: a frozen Whisper encoder's output
  averaged over its 1500 frames, computed once per clip. ``WhisperForAudioClassification`` mean-pools
  ``projector(states)``, and the projector is linear, so feeding that average as a one-frame
  ``encoder_outputs`` gives exactly the logits of the full forward pass on the clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "TEXT_COLUMNS",
    "AudioClassificationCollator",
    "PooledStatesCollator",
    "pooled_whisper_states",
    "whisper_audio_classifier",
]

#: Columns that carry text; an audio student's examples must hold none of them.
TEXT_COLUMNS = ("text", "sentence", "transcript", "input_ids", "token_type_ids", "inputs_embeds")


def whisper_audio_classifier(source, num_labels: int, *, id2label: dict[int, str] | None = None,
                             classifier_proj_size: int = 256, freeze_encoder: bool = False, seed: int = 0,
                             max_source_positions: int | None = None):
    """A ``WhisperForAudioClassification`` with ``num_labels`` outputs whose encoder is ``source``'s.

    ``source``: a ``WhisperForConditionalGeneration`` (or its folder), or a ``WhisperConfig`` (random encoder).
    The projector and classifier are initialised from ``seed``. ``freeze_encoder`` leaves only the projector
    and classifier trainable. ``max_source_positions`` shortens the encoder's window to that many frames (50 per
    second; Whisper: 1500 = 30 s), keeping the first position embeddings: cheaper for short clips; its feature
    extractor then needs ``chunk_length = max_source_positions / 50`` seconds."""
    from transformers import WhisperConfig, WhisperForAudioClassification, WhisperForConditionalGeneration

    if isinstance(source, WhisperConfig):
        config, encoder = source, None
    else:
        if not isinstance(source, torch.nn.Module):
            source = WhisperForConditionalGeneration.from_pretrained(source)
        if not hasattr(source, "get_encoder") or type(source).__name__ != "WhisperForConditionalGeneration":
            raise ValueError(f"whisper_audio_classifier copies a Whisper encoder; got {type(source).__name__} (pass a "
                             "WhisperForConditionalGeneration, its folder or a WhisperConfig)")
        config, encoder = source.config, source.get_encoder()
    if num_labels < 2:
        raise ValueError(f"an audio classifier needs at least 2 labels, got num_labels={num_labels}")
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    window = fields["max_source_positions"]
    if max_source_positions is not None:
        if not 1 <= max_source_positions <= window:
            raise ValueError(f"max_source_positions must be between 1 and the encoder's {window}, got "
                             f"{max_source_positions}")
        window = max_source_positions
    config = WhisperConfig.from_dict({**fields, "num_labels": num_labels, "classifier_proj_size": classifier_proj_size,
                                      "max_source_positions": window})
    if id2label is not None:
        if len(id2label) != num_labels:
            raise ValueError(f"id2label has {len(id2label)} entries but num_labels={num_labels}")
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.label2id = {v: int(k) for k, v in id2label.items()}
    torch.manual_seed(seed)
    model = WhisperForAudioClassification(config)
    if encoder is not None:
        state = encoder.state_dict()
        state["embed_positions.weight"] = state["embed_positions.weight"][:window]
        model.encoder.load_state_dict(state)
    if freeze_encoder:
        model.freeze_encoder()
    return model


def check_audio_example(example: dict) -> None:
    """An audio student's example holds audio, labels and teacher outputs, never text."""
    text = [k for k in example if k in TEXT_COLUMNS]
    if text:
        raise ValueError(f"an audio student's example carries text columns {text}; the student learns from audio "
                         "alone: drop them (the teacher's outputs go in a teacher_logits column)")


def _labels_and_teacher(examples: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in ("label", "labels"):
        if key in examples[0]:
            out["labels"] = torch.tensor([int(e[key]) for e in examples], dtype=torch.long)
    for key in [k for k in examples[0] if k.startswith("teacher_")]:  # stored teacher outputs
            out[key] = torch.as_tensor(np.stack([np.asarray(e[key], np.float32) for e in examples]))
    return out


class AudioClassificationCollator:
    """Pads clips for an audio classifier: ``input_features`` + ``attention_mask`` over log-mel frames for a
    Whisper feature extractor (always its 30 s window), else ``input_values`` + ``attention_mask`` over
    samples; ``labels`` from ``label``; ``teacher_*`` columns (stored teacher outputs) passed through."""

    def __init__(self, feature_extractor):
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.whisper = "input_features" in getattr(feature_extractor, "model_input_names", ())

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for e in examples:
            check_audio_example(e)
            if "audio" not in e:
                raise ValueError(f"an audio classification example needs an 'audio' column (samples at "
                                 f"{self.sampling_rate} Hz); got columns {sorted(e)}")
        audio = [np.asarray(e["audio"], np.float32) for e in examples]
        if self.whisper:
            too_long = [len(a) for a in audio if len(a) > 30 * self.sampling_rate]
            if too_long:
                raise ValueError(f"a Whisper classifier sees 30 s at most; a clip has {max(too_long)} samples "
                                 f"({max(too_long) / self.sampling_rate:.1f} s): cut it first")
            feats = self.feature_extractor(audio, sampling_rate=self.sampling_rate, return_attention_mask=True,
                                           return_tensors="pt")
            batch = {"input_features": feats.input_features, "attention_mask": feats.attention_mask}
        else:
            n = max(len(a) for a in audio)
            values = self.feature_extractor(audio, sampling_rate=self.sampling_rate, return_tensors="np").input_values
            padded = np.zeros((len(audio), n), np.float32)
            mask = np.zeros((len(audio), n), np.int64)
            for b, v in enumerate(values):
                padded[b, : len(v)] = v
                mask[b, : len(v)] = 1
            batch = {"input_values": torch.as_tensor(padded), "attention_mask": torch.as_tensor(mask)}
        batch.update(_labels_and_teacher(examples))
        return batch


@torch.inference_mode()
def pooled_whisper_states(model, feature_extractor, audios: Sequence[np.ndarray], *, batch_size: int = 8) -> np.ndarray:
    """``(clips, d_model)``: a Whisper (classifier's or ASR model's) encoder output averaged over its frames, for
    each clip, in order."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
    rate = int(feature_extractor.sampling_rate)
    out = []
    for start in range(0, len(audios), batch_size):
        chunk = [np.asarray(a, np.float32) for a in audios[start : start + batch_size]]
        feats = feature_extractor(chunk, sampling_rate=rate, return_tensors="pt").input_features
        states = encoder(feats.to(encoder.dtype)).last_hidden_state
        out.append(states.float().mean(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.config.d_model), np.float32)


class PooledStatesCollator:
    """Examples ``{"pooled_states": (d_model,), "label"?, "teacher_logits"?}`` -> ``encoder_outputs`` (a one-frame
    encoder output per clip, for a frozen-encoder ``WhisperForAudioClassification``), ``labels``, teacher columns."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        for e in examples:
            check_audio_example(e)
            if "pooled_states" not in e:
                raise ValueError(f"PooledStatesCollator needs a 'pooled_states' column (pooled_whisper_states); got "
                                 f"columns {sorted(e)}")
        states = torch.as_tensor(np.stack([np.asarray(e["pooled_states"], np.float32) for e in examples]))
        return {"encoder_outputs": (states[:, None, :],), **_labels_and_teacher(examples)}
