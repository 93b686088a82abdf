"""Cross-modal distillation: a text classifier teaches a speech classifier through the transcripts of its clips.

The teacher reads text only: it labels the transcripts (:func:`teacher_outputs`: logits and a mean-pooled
sentence embedding). The student reads audio only: a ``WhisperForAudioClassification`` whose frozen encoder
turns each clip into states (:func:`~hf_distill.speech.audio_classification.pooled_whisper_states`, once per
clip), trained on rows that pair those states with the teacher's logits (:func:`audio_rows`); a row never
holds text. :class:`CrossModalTrainer` adds an optional alignment of the student's pooled audio embedding
(the classifier's projector output, averaged over frames) with the teacher's sentence embedding:
``embedding_weight * mean(1 - cos(e_audio, e_text))``.

Helpers for the BBC recipe: :func:`spoken_text` (the title and first sentence of an article),
:func:`predict_pooled`; the clips are spoken with :mod:`hf_distill.speech.corpus`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hf_distill.speech.audio_classification import check_audio_example
from hf_distill.speech.corpus import split_sentences
from hf_distill.trainer import DistillationTrainer

__all__ = [
    "CrossModalTrainer",
    "audio_rows",
    "predict_pooled",
    "spoken_text",
    "standardize_projector",
    "teacher_outputs",
]



def spoken_text(article: str, max_words: int = 40) -> str:
    """What is spoken of an article: its title (first line) and the first sentence of its body, cut to
    ``max_words`` words."""
    lines = [line.strip() for line in article.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty article")
    title = lines[0].rstrip(".") + "."
    body = " ".join(lines[1:])
    first = split_sentences(body)[0] if body else ""
    words = f"{title} {first}".split()
    return " ".join(words[:max_words])


@torch.inference_mode()
def teacher_outputs(teacher, tokenizer, texts: Sequence[str], *, max_length: int = 128,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (n, labels), sentence embeddings (n, hidden))`` of a text classifier on ``texts``: the embedding
    is its last hidden state mean-pooled over real tokens (sentence-transformers' pooling)."""
    logits, embeddings = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        out = teacher(**enc, output_hidden_states=True)
        mask = enc["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
        logits.append(out.logits.float().numpy())
        embeddings.append(pooled.float().numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def audio_rows(pooled_states: np.ndarray, *, teacher_logits: np.ndarray | None = None,
               labels: Sequence[int] | None = None, teacher_embedding: np.ndarray | None = None) -> list[dict]:
    """Training rows of a speech student: its encoder states per clip plus the teacher's logits (and sentence
    embedding) or the hard labels; never text."""
    if teacher_logits is None and labels is None:
        raise ValueError("audio_rows needs teacher_logits (distillation) or labels (hard-label training)")
    n = len(pooled_states)
    for name, value in (("teacher_logits", teacher_logits), ("labels", labels),
                        ("teacher_embedding", teacher_embedding)):
        if value is not None and len(value) != n:
            raise ValueError(f"{name} has {len(value)} rows but there are {n} clips")
    rows = []
    for i in range(n):
        row = {"pooled_states": np.asarray(pooled_states[i], np.float32)}
        if teacher_logits is not None:
            row["teacher_logits"] = np.asarray(teacher_logits[i], np.float32)
        if labels is not None:
            row["label"] = int(labels[i])
        if teacher_embedding is not None:
            row["teacher_embedding"] = np.asarray(teacher_embedding[i], np.float32)
        check_audio_example(row)
        rows.append(row)
    return rows


class CrossModalTrainer(DistillationTrainer):
    """:class:`DistillationTrainer` plus ``embedding_weight * mean(1 - cos(e_audio, e_text))``: ``e_audio`` is the
    Whisper classifier's projector output averaged over frames, ``e_text`` the batch's ``teacher_embedding``
    (the classifier's ``classifier_proj_size`` must equal the teacher's width)."""

    def __init__(self, *args, embedding_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding_weight = float(embedding_weight)
        self._pooled: torch.Tensor | None = None
        if self.embedding_weight:
            projector = getattr(self.model, "projector", None)
            if projector is None:
                raise ValueError(f"embedding alignment reads a classifier's projector; {type(self.model).__name__} "
                                 "has none")
            projector.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._pooled = output.mean(dim=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        target = inputs.pop("teacher_embedding", None)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self.embedding_weight:
            return result
        if target is None:
            raise ValueError("embedding_weight > 0 needs a teacher_embedding column (the teacher's sentence embedding)")
        if self._pooled.shape[-1] != target.shape[-1]:
            raise ValueError(f"the student's pooled embedding has width {self._pooled.shape[-1]} but the teacher's "
                             f"{target.shape[-1]}; build the student with classifier_proj_size={target.shape[-1]}")
        align = (1 - F.cosine_similarity(self._pooled, target.to(self._pooled), dim=-1)).mean()
        if model.training:
            self._train_terms["embedding_cos"] = self._train_terms["embedding_cos"] + align.detach()
        loss = result[0] if return_outputs else result
        loss = loss + self.embedding_weight * align
        return (loss, {**result[1], "loss": loss}) if return_outputs else loss


@torch.no_grad()
def standardize_projector(model, pooled_states: np.ndarray, eps: float = 1e-6) -> None:
    """Start a frozen-encoder Whisper classifier's projector as the z-scoring of the training clips' pooled states
    (``W = diag(1 / std)``, ``b = -mean / std``): every feature at unit scale before the first step (a data-dependent
    initialisation; the model stays a plain classifier). Needs ``classifier_proj_size == d_model``."""
    projector = model.projector
    x = torch.as_tensor(np.asarray(pooled_states, np.float32))
    if projector.weight.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"standardize_projector needs a square projector (classifier_proj_size = d_model = "
                         f"{x.shape[1]}); it is {tuple(projector.weight.shape)}")
    mean, std = x.mean(0), x.std(0).clamp_min(eps)
    projector.weight.copy_(torch.diag(1.0 / std))
    projector.bias.copy_(-mean / std)


@torch.inference_mode()
def predict_pooled(model, pooled_states: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Logits of a frozen-encoder Whisper classifier from its pooled encoder states (one row per clip)."""
    model.eval()
    out = []
    for start in range(0, len(pooled_states), batch_size):
        states = torch.as_tensor(np.asarray(pooled_states[start : start + batch_size], np.float32))
        out.append(model(encoder_outputs=(states[:, None, :],)).logits.float().numpy())
    return np.concatenate(out)
