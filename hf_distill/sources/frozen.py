"""A frozen live teacher: run without gradients at every step, on the student's device, in its own dtype.

It is never trained, never wrapped for data parallelism and never saved with the student. When
a batch already carries the teacher's logits (``teacher_logits``) and the terms need nothing else
from the teacher, the stored logits are used and the teacher does not run.
"""

from __future__ import annotations

import torch

from ..modeling import forward_parameters
from ..objectives import ModelTensors
from ..qkv import QKVRecorder
from ..teachers import place_teacher
from .base import TeacherSource
from .stored import stored_tensors


class FrozenTeacher(TeacherSource):
    """One or more frozen teacher models."""

    kind = "frozen"
    provides = frozenset({"logits", "hidden_states", "attentions", "qkv"})

    def __init__(self, teachers: list[torch.nn.Module], dtype: str = "float32"):
        if not teachers:
            raise ValueError("the frozen teacher source needs at least one teacher model")
        self.teachers = list(teachers)
        self.dtype = dtype
        self.recorders: list[QKVRecorder] | None = None
        self.accepted: list[set[str] | None] = []

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.teachers

    def bind(self, trainer) -> None:
        device = trainer.accelerator.device
        self.teachers = [place_teacher(t, device, self.dtype) for t in self.teachers]
        _, layers = trainer.objective.qkv_layers()
        self.recorders = [QKVRecorder(t, layers) for t in self.teachers] if layers else None
        self.accepted = [forward_parameters(t) for t in self.teachers]

    def forward_one(self, trainer, index: int, inputs: dict) -> ModelTensors:
        accepted = self.accepted[index]
        teacher_inputs = {k: v for k, v in inputs.items() if accepted is None or k in accepted}
        recorder = self.recorders[index] if self.recorders else None
        flags = trainer.output_flags()
        with torch.no_grad(), trainer.accelerator.autocast():
            if recorder is not None:
                with recorder:
                    out = self.teachers[index](**teacher_inputs, **flags)
                return ModelTensors.from_output(out, recorder.take())
            return ModelTensors.from_output(self.teachers[index](**teacher_inputs, **flags))

    def teacher_tensors(self, trainer, model_inputs, batch, student=None):
        needs = trainer.objective.teacher_needs
        if needs <= {"logits"}:
            stored = stored_tensors(batch)
            if stored is not None and stored.logits is not None:
                return [stored]
        if not needs:
            return []
        return [trainer.teacher_forward(i, model_inputs) for i in range(len(self.teachers))]

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype,
                "teachers": [getattr(t, "name_or_path", "") or type(t).__name__ for t in self.teachers]}
