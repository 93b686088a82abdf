"""Stored teacher outputs: the teacher ran once ahead of time; training reads its outputs from the batch.

Batch columns: ``teacher_logits`` (full logits, e.g. a classifier's), or ``teacher_topk_logprobs``
+ ``teacher_topk_indices`` (+ ``teacher_tail_mass``): the teacher's top-k log-probabilities at the
distillation temperature. No teacher is in memory.
"""

from __future__ import annotations

from ..objectives import ModelTensors
from .base import TeacherSource

STORED_COLUMNS = ("teacher_logits", "teacher_topk_logprobs", "teacher_topk_indices", "teacher_tail_mass")


def stored_tensors(batch: dict) -> ModelTensors | None:
    """The teacher tensors a batch carries, or None when it carries none."""
    return ModelTensors.from_stored(batch)


class StoredTeacher(TeacherSource):
    """Teacher outputs stored in the dataset (``hf-distill cache-teacher``, speech soft labels)."""

    kind = "stored"
    provides = frozenset({"logits"})

    def teacher_tensors(self, trainer, model_inputs, batch, student=None):
        if not trainer.objective.teacher_needs:
            return []
        stored = stored_tensors(batch)
        if stored is None:
            raise ValueError("no teacher was given and the batch carries no stored teacher outputs (teacher_logits or "
                             "teacher_topk_logprobs / teacher_topk_indices columns); pass teacher=... or cache the "
                             "teacher's outputs with hf-distill cache-teacher")
        return [stored]
