"""Training speech students on pseudo-label stores: datasets, collators, a Whisper trainer, evaluation.

Whisper (Distil-Whisper style):

- :class:`WhisperPseudoLabelDataset` turns store rows into training examples: log-mel
  ``input_features`` of the row's audio, ``decoder_input_ids`` = the teacher's decoder prompt followed
  by its tokens (teacher forcing) and ``labels`` = the tokens, with ``-100`` under the prompt (the
  prompt is forced at generation time, never predicted). With ``soft_labels=True`` the stored top-k
  soft labels come along as ``teacher_topk_logprobs`` / ``teacher_topk_indices`` /
  ``teacher_tail_mass``, one row per label position.
- :class:`WhisperDistillationCollator` stacks and pads them (decoder inputs with the pad token,
  labels with -100, top-k rows with finite placeholders that the loss masks out).
- :class:`WhisperDistillationTrainer`: a ``DistillationTrainer`` whose live teacher reuses the
  student's encoder output when the student's encoder is a frozen, exact copy of the teacher's
  (Distil-Whisper's shared encoder): the teacher then runs its decoder only.

CTC students (frame-level soft targets) are in :mod:`hf_distill.speech.ctc_training`; they share the
store readers here (:class:`StoreRowsDataset`, :func:`select_rows`, :func:`held_out_ids`).

Evaluation (transcripts, WER, loops): :mod:`hf_distill.speech.evaluation`.

Rows longer than one Whisper window (stitched long-form transcripts) are not training examples here:
:func:`select_rows` leaves them out and says how many.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.speech.audio import AudioItem, decode, list_audio
from hf_distill.trainer import DistillationTrainer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

__all__ = [
    "WhisperDistillationCollator",
    "WhisperDistillationTrainer",
    "WhisperPseudoLabelDataset",
    "can_share_encoder",
    "held_out_ids",
    "select_rows",
    "store_items",
    "store_soft_label_temperature",
]


# ==================================================================================================
# stores and rows


def store_manifest(store_dir: str | Path) -> dict:
    return json.loads((Path(store_dir) / "manifest.json").read_text(encoding="utf-8"))


def store_items(store_dir: str | Path) -> dict[str, AudioItem]:
    """The audio items a store was labelled from (listed again from its recorded input), by id."""
    cfg = store_manifest(store_dir)["config"]
    items = list_audio(
        cfg["input"],
        path_column=cfg.get("path_column", "path"),
        text_column=cfg.get("text_column"),
        id_column=cfg.get("id_column"),
        audio_column=cfg.get("audio_column", "audio"),
        split=cfg.get("split"),
        config_name=cfg.get("dataset_config"),
    )
    return {it.id: it for it in items}


def store_soft_label_temperature(store_dir: str | Path) -> float | None:
    """The temperature the store's top-k soft labels were taken at (None: the store has none)."""
    sl = store_manifest(store_dir).get("soft_labels")
    return float(sl["temperature"]) if sl else None


def held_out_ids(items: Sequence[AudioItem], size: float, seed: int = 0, require_reference: bool = True) -> set[str]:
    """A deterministic held-out subset of the items (those with a reference, unless ``require_reference``
    is false): ``size`` < 1 is a fraction, otherwise a count; at least one item stays for training.
    Chosen by a hash of (seed, id), so it does not depend on the listing order."""
    with_ref = [it.id for it in items
                if not require_reference or (it.reference is not None and it.reference.strip())]
    if not with_ref or size <= 0:
        return set()
    n = int(round(size * len(with_ref))) if size < 1 else int(size)
    n = max(1, min(n, len(with_ref) - 1)) if len(with_ref) > 1 else 0
    ranked = sorted(with_ref, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    return set(ranked[:n])


def select_rows(ds, *, keep_only: bool = True, exclude_ids: set[str] | None = None, max_chunks: int | None = 1,
                need_soft_labels: bool = False) -> tuple[Any, dict[str, int]]:
    """Training rows of a store (``datasets.Dataset``) and how many each rule removed."""
    exclude_ids = exclude_ids or set()
    counts = {"rows": len(ds)}
    cols = ["id", "keep", "n_chunks"] + (["topk_tail"] if need_soft_labels else [])
    view = ds.select_columns([c for c in cols if c in ds.column_names])
    keep_idx = []
    removed = {"held_out": 0, "filtered_out": 0, "longer_than_one_window": 0, "no_soft_labels": 0}
    for i, row in enumerate(view):
        if row["id"] in exclude_ids:
            removed["held_out"] += 1
        elif keep_only and not row["keep"]:
            removed["filtered_out"] += 1
        elif max_chunks is not None and (row.get("n_chunks") or 1) > max_chunks:
            removed["longer_than_one_window"] += 1
        elif need_soft_labels and row.get("topk_tail") is None:
            removed["no_soft_labels"] += 1
        else:
            keep_idx.append(i)
    counts.update(removed)
    counts["training_rows"] = len(keep_idx)
    return ds.select(keep_idx), counts


def item_for(row: Mapping, items: Mapping[str, AudioItem] | None) -> AudioItem:
    if items is not None and row["id"] in items:
        return items[row["id"]]
    return AudioItem(id=row["id"], path=row["path"])


def soft_arrays(row: Mapping) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.asarray(row["topk_indices"], dtype=np.int64)
    probs = np.asarray(row["topk_probs"], dtype=np.float32)
    tail = np.asarray(row["topk_tail"], dtype=np.float32)
    if idx.ndim == 1:  # no positions
        k = 1
        idx, probs = idx.reshape(0, k), probs.reshape(0, k)
    return idx, probs, tail


def logprobs_from_probs(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.clip(probs, 0.0, None)).astype(np.float32)  # 0 -> -inf: the loss treats 0 log 0 as 0


# ==================================================================================================
# Whisper


class StoreRowsDataset(torch.utils.data.Dataset):
    """Rows of a pseudo-label store whose audio is read (at the feature extractor's rate) when an example is
    built: ``rows`` a ``datasets.Dataset`` of store rows (or a list of row dicts), ``items`` ``id -> AudioItem``
    to read audio from (default: the row's ``path`` as a file), ``soft_labels`` to attach the stored top-k."""

    def __init__(self, rows, feature_extractor, *, items: Mapping[str, AudioItem] | None, soft_labels: bool):
        self.rows = rows
        self.feature_extractor = feature_extractor
        self.items = items
        self.soft_labels = soft_labels
        self.sampling_rate = int(feature_extractor.sampling_rate)

    def __len__(self) -> int:
        return len(self.rows)

    def audio(self, row: Mapping) -> np.ndarray:
        return decode(item_for(row, self.items), self.sampling_rate)


class WhisperPseudoLabelDataset(StoreRowsDataset):
    """Store rows -> Whisper training examples (see the module docstring).

    Args:
        rows: a ``datasets.Dataset`` of store rows (or a list of row dicts).
        feature_extractor: the Whisper feature extractor (audio is resampled to its rate).
        items: ``id -> AudioItem`` to read audio from (default: the row's ``path`` as a file).
        soft_labels: attach the stored top-k soft labels.
        max_label_length: longer label sequences are cut (the decoder has ``max_target_positions``).
        vocabulary: a :class:`~hf_distill.speech.vocab_trim.VocabularyMap` of a student with a trimmed
            vocabulary: the stored (teacher) token ids are renumbered into the student's.
    """

    def __init__(self, rows, feature_extractor, *, items: Mapping[str, AudioItem] | None = None,
                 soft_labels: bool = False, max_label_length: int = 448, vocabulary=None):
        super().__init__(rows, feature_extractor, items=items, soft_labels=soft_labels)
        if vocabulary is not None and soft_labels:
            raise ValueError("stored soft labels index the teacher's whole vocabulary; train a student with a "
                             "trimmed vocabulary on a live teacher (--soft_labels live)")
        self.max_label_length = max_label_length
        self.vocabulary = vocabulary

    def features(self, row: Mapping) -> np.ndarray:
        return self.feature_extractor(self.audio(row), sampling_rate=self.sampling_rate,
                                      return_tensors="np").input_features[0]

    def example(self, row: Mapping) -> dict[str, Any]:
        """Everything but the audio features: decoder inputs, labels and soft labels of one row."""
        prompt = [int(x) for x in (row.get("prompt_ids") or [])]
        tokens = [int(x) for x in row["token_ids"]]
        if not prompt:
            raise ValueError(f"row {row['id']!r} has no decoder prompt (prompt_ids)")
        if self.vocabulary is not None:
            what = f"row {row['id']!r}"
            prompt = self.vocabulary.to_student(prompt, what=what)
            tokens = self.vocabulary.to_student(tokens, what=what)
        n_prompt = len(prompt) - 1  # label positions under the prompt (the first prompt token is not predicted)
        budget = max(1, self.max_label_length - n_prompt)
        tokens = tokens[:budget]
        decoder_input_ids = prompt + tokens[:-1]
        labels = [IGNORE_INDEX] * n_prompt + tokens
        out: dict[str, Any] = {"decoder_input_ids": decoder_input_ids, "labels": labels}
        if self.soft_labels:
            idx, probs, tail = soft_arrays(row)
            if len(tail) < len(tokens):
                raise ValueError(f"row {row['id']!r}: {len(tail)} soft-label positions for {len(tokens)} tokens")
            idx, probs, tail = idx[: len(tokens)], probs[: len(tokens)], tail[: len(tokens)]
            k = idx.shape[1]
            pad_idx = np.tile(np.arange(k, dtype=np.int64), (n_prompt, 1))
            out["teacher_topk_indices"] = np.concatenate([pad_idx, idx])
            out["teacher_topk_logprobs"] = np.concatenate([np.zeros((n_prompt, k), np.float32), logprobs_from_probs(probs)])
            out["teacher_tail_mass"] = np.concatenate([np.zeros(n_prompt, np.float32), tail])
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[int(i)]
        return {"input_features": self.features(row), **self.example(row)}


class WhisperDistillationCollator:
    """Pads a list of :class:`WhisperPseudoLabelDataset` examples into a batch of tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["labels"]) for e in examples)
        if "encoder_outputs" in examples[0]:  # cached encoder states (hf_distill.speech.encoder_cache)
            audio = {"encoder_outputs": (torch.as_tensor(np.stack([e["encoder_outputs"] for e in examples])),)}
        else:
            audio = {"input_features": torch.as_tensor(np.stack([e["input_features"] for e in examples]))}
        batch: dict[str, Any] = {
            **audio,
            "decoder_input_ids": torch.tensor(
                [e["decoder_input_ids"] + [self.pad_token_id] * (n - len(e["decoder_input_ids"])) for e in examples]),
            "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * (n - len(e["labels"])) for e in examples]),
        }
        if "teacher_topk_indices" in examples[0]:
            k = examples[0]["teacher_topk_indices"].shape[1]
            idx = np.tile(np.arange(k, dtype=np.int64), (len(examples), n, 1))
            logp = np.zeros((len(examples), n, k), np.float32)
            tail = np.zeros((len(examples), n), np.float32)
            for b, e in enumerate(examples):
                m = len(e["teacher_tail_mass"])
                idx[b, :m] = e["teacher_topk_indices"]
                logp[b, :m] = e["teacher_topk_logprobs"]
                tail[b, :m] = e["teacher_tail_mass"]
            batch.update(teacher_topk_indices=torch.as_tensor(idx), teacher_topk_logprobs=torch.as_tensor(logp),
                         teacher_tail_mass=torch.as_tensor(tail))
        return batch


def can_share_encoder(student, teacher) -> tuple[bool, str]:
    """Whether the teacher may reuse the student's encoder output: the student's encoder is frozen
    (no trainable parameter), has no dropout, and holds exactly the teacher's encoder weights."""
    from hf_distill.teachers import unwrap

    s, t = unwrap(student), unwrap(teacher)
    if getattr(s.config, "model_type", None) != "whisper" or getattr(t.config, "model_type", None) != "whisper":
        return False, "both models must be Whisper models"
    s_enc, t_enc = s.get_encoder(), t.get_encoder()
    if any(p.requires_grad for p in s_enc.parameters()):
        return False, "the student's encoder is trained (freeze it to share it)"
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if float(getattr(s.config, name, 0.0) or 0.0) > 0:
            return False, f"the student's encoder has {name} > 0 (its training-mode output differs)"
    s_state, t_state = s_enc.state_dict(), t_enc.state_dict()
    if s_state.keys() != t_state.keys():
        return False, "the encoders have different layers"
    for key, value in s_state.items():
        other = t_state[key]
        if value.shape != other.shape or not torch.equal(value.detach().cpu(), other.detach().to("cpu", value.dtype)):
            return False, f"the encoders differ ({key})"
    return True, ""


class WhisperDistillationTrainer(DistillationTrainer):
    """``DistillationTrainer`` for Whisper students with a live teacher that may share the encoder.

    ``share_encoder``: ``None`` (default) shares when :func:`can_share_encoder` allows it, ``True``
    requires it (ValueError otherwise), ``False`` never shares. When shared, the student's encoder
    output of the current batch is captured by a forward hook and given to the teacher as
    ``encoder_outputs``: the teacher's decoder reads exactly what its own encoder would have produced,
    and its encoder does not run. ``self.encoder_shared`` records the decision.

    ``vocabulary``: the :class:`~hf_distill.speech.vocab_trim.VocabularyMap` of a student whose vocabulary
    was trimmed. The teacher then reads the student's token ids renumbered into its own, and its output
    layer scores only the kept rows (a softmax over the student's tokens; the rows it drops are never
    computed).
    """

    def __init__(self, *args, share_encoder: bool | None = None, vocabulary=None, **kwargs):
        self.vocabulary = vocabulary  # read by the pair check that the parent runs
        super().__init__(*args, **kwargs)
        self._kept = None
        if vocabulary is not None:
            if len(self.teachers) > 1:
                raise ValueError("a trimmed vocabulary supports one live teacher")
            self._kept = torch.as_tensor(vocabulary.kept)
        self._kept_head = None  # the frozen teacher's output rows of the kept tokens, gathered once
        data_map = getattr(self.train_dataset, "vocabulary", False)
        if data_map is not False and data_map is not vocabulary:
            raise ValueError("the training dataset's token ids are not renumbered with this trainer's vocabulary map; "
                             "give the dataset the same map (vocabulary=...)")
        self.encoder_shared = False
        self.share_reason = "no live teacher"
        self._captured = None
        if self.teachers and share_encoder is not False:
            ok, reason = can_share_encoder(self.model, self.teachers[0])
            if share_encoder and not ok:
                raise ValueError(f"cannot share the encoder with the teacher: {reason}")
            self.encoder_shared, self.share_reason = ok, reason
        if self.encoder_shared:
            from hf_distill.teachers import unwrap

            unwrap(self.model).get_encoder().register_forward_hook(self._capture)

    def _check_same_outputs(self, student, teacher, student_tok, teacher_tok, s_kind) -> None:
        if self.vocabulary is None:
            return super()._check_same_outputs(student, teacher, student_tok, teacher_tok, s_kind)
        s_size, t_size = int(student.config.vocab_size), int(teacher.config.vocab_size)
        if (s_size, t_size) != (self.vocabulary.size, self.vocabulary.teacher_size):
            raise ValueError(f"the student has {s_size} tokens and the teacher {t_size}, but the vocabulary map "
                             f"keeps {self.vocabulary.size} of {self.vocabulary.teacher_size}; give the map made "
                             "when this student was trimmed from this teacher")

    def _capture(self, module, inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        self._captured = hidden.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._captured = None
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self._captured = None

    def teacher_forward(self, index, inputs):
        cached = inputs.get("encoder_outputs")
        if cached is not None and not (self.encoder_shared and index == 0):
            raise ValueError("the batch carries cached encoder outputs, which teacher "
                             f"{index} may read only when it shares the student's encoder, and it does not: "
                             f"{self.share_reason or 'only the first teacher shares it'}; train on audio "
                             "features instead, or freeze the student's copy of the teacher's encoder")
        if cached is not None:
            hidden = cached[0] if isinstance(cached, (tuple, list)) else cached.last_hidden_state
        elif self.encoder_shared and index == 0 and self._captured is not None:
            hidden = self._captured
        elif self.vocabulary is None:
            return super().teacher_forward(index, inputs)
        else:
            hidden = None
        from transformers.modeling_outputs import BaseModelOutput

        from hf_distill.objectives import ModelTensors
        from hf_distill.teachers import unwrap

        teacher = self.teachers[index]
        dtype = next(teacher.parameters()).dtype
        decoder_ids = inputs["decoder_input_ids"]
        with torch.no_grad(), self.accelerator.autocast():
            if hidden is None:
                hidden = unwrap(teacher).get_encoder()(
                    input_features=inputs["input_features"].to(dtype)).last_hidden_state
            encoder_outputs = BaseModelOutput(last_hidden_state=hidden.to(dtype))
            flags = {k: v for k, v in self.output_flags().items() if k in ("output_attentions", "output_hidden_states")}
            if self._kept is None:
                out = teacher(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids,
                              decoder_attention_mask=inputs.get("decoder_attention_mask"), **flags)
                return ModelTensors.from_output(out)
            if self._kept.device != decoder_ids.device:
                self._kept = self._kept.to(decoder_ids.device)
            head = unwrap(teacher).get_output_embeddings().weight
            if self._kept_head is None or self._kept_head.device != head.device:
                self._kept_head = head.detach().index_select(0, self._kept.to(head.device))
            out = unwrap(teacher).model(encoder_outputs=encoder_outputs, decoder_input_ids=self._kept[decoder_ids],
                                        decoder_attention_mask=inputs.get("decoder_attention_mask"), use_cache=False,
                                        **flags)
            logits = torch.nn.functional.linear(out.last_hidden_state, self._kept_head)
        return dataclasses.replace(ModelTensors.from_output(out), logits=logits)


def batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
