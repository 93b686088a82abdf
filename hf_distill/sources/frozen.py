"""A frozen live teacher: run without gradients at every step, in its own dtype, on the student's device or its own.

It is never trained, never wrapped for data parallelism and never saved with the student. When
a batch already carries the teacher's logits (``teacher_logits``) and the terms need nothing else
from the teacher, the stored logits are used and the teacher does not run.

Big teachers: ``dtype`` (``teacher_dtype``) keeps a bfloat16 / float16 copy (the losses still
compute in float32); ``device`` (``teacher_device``) puts the teacher on another device than the
student (its inputs go there, its outputs come back to the student's device for the loss);
``sharding`` (``teacher_sharding``) shards it across the processes of a distributed run instead of
one full copy per process (:mod:`hf_distill.sources.sharding`).
"""

from __future__ import annotations

import torch

from ..modeling import forward_parameters
from ..objectives import ModelTensors
from ..objectives.cross_tokenizer import teacher_model_inputs
from ..objectives.fused import with_head
from ..qkv import QKVRecorder
from ..teachers import place_teacher
from .base import TeacherSource
from .sharding import shard_for_inference, should_shard
from .stored import stored_tensors


class FrozenTeacher(TeacherSource):
    """One or more frozen teacher models."""

    kind = "frozen"
    provides = frozenset({"logits", "hidden_states", "attentions", "qkv", "last_hidden"})

    def __init__(self, teachers: list[torch.nn.Module], dtype: str = "float32", device: str | None = None,
                 sharding: str = "none"):
        if not teachers:
            raise ValueError("the frozen teacher source needs at least one teacher model")
        self.teachers = list(teachers)
        self.dtype = dtype
        self.device = None if device is None else check_device(device, "teacher_device")
        self.sharding = sharding
        self.sharded = False
        self.recorders: list[QKVRecorder] | None = None
        self.accepted: list[set[str] | None] = []

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.teachers

    def bind(self, trainer) -> None:
        device = self.device or trainer.accelerator.device
        self.teachers = [place_teacher(t, device, self.dtype) for t in self.teachers]
        if should_shard(self.sharding, trainer):
            self.teachers = [shard_for_inference(t, torch.device(device)) for t in self.teachers]
            self.sharded = True
        _, layers = trainer.objective.qkv_layers()
        self.recorders = [QKVRecorder(t, layers) for t in self.teachers] if layers else None
        self.accepted = [forward_parameters(t) for t in self.teachers]

    def forward_one(self, trainer, index: int, inputs: dict) -> ModelTensors:
        accepted = self.accepted[index]
        teacher_inputs = {k: v for k, v in inputs.items() if accepted is None or k in accepted}
        recorder = self.recorders[index] if self.recorders else None
        flags = trainer.output_flags()
        teacher = self.teachers[index]
        student_device = trainer.accelerator.device
        if self.device is not None and self.device != student_device:
            teacher_inputs = moved(teacher_inputs, self.device)
        with torch.no_grad(), trainer.accelerator.autocast():
            if recorder is not None:
                with recorder:
                    out = teacher(**teacher_inputs, **flags)
                tensors = ModelTensors.from_output(out, recorder.take())
            else:
                tensors = ModelTensors.from_output(teacher(**teacher_inputs, **flags))
        if self.device is not None and self.device != student_device:
            tensors = ModelTensors(**moved(vars(tensors), student_device))
        if "last_hidden" in trainer.objective.teacher_needs:
            tensors = with_head(tensors, teacher, device=student_device)
        return tensors

    def teacher_tensors(self, trainer, model_inputs, batch, student=None):
        needs = trainer.objective.teacher_needs
        if needs <= {"logits"}:
            stored = stored_tensors(batch)
            if stored is not None and stored.logits is not None:
                return [stored]
        if not needs:
            return []
        model_inputs = teacher_model_inputs(model_inputs, batch)  # the teacher's own tokenization, if any
        return [trainer.teacher_forward(i, model_inputs) for i in range(len(self.teachers))]

    def describe(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "device": None if self.device is None else str(self.device),
                "sharded": self.sharded,
                "teachers": [getattr(t, "name_or_path", "") or type(t).__name__ for t in self.teachers]}


def moved(value, device: torch.device):
    """``value`` (a tensor, or a dict / tuple / list of them) with every tensor on ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    return value


def check_device(value, what: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` that exists on this machine, else a ValueError saying what to give."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}={value!r} is not a device; give one such as cpu, cuda, cuda:1 or mps") from None
    if device.type == "meta":
        raise ValueError(f"{what}={value!r}: a meta device holds no weights, so the teacher could not run; give cpu, "
                         "cuda, cuda:1, ...")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if device.type != "cpu":
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        if not available:
            raise ValueError(f"{what}={value!r}: this machine has no {device.type} device; give cpu or a device it has")
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if device.index is not None and device.index >= count:
            raise ValueError(f"{what}={value!r}: this machine has {count} {device.type} device(s) "
                             f"({device.type}:0..{device.type}:{count - 1})")
    return device
