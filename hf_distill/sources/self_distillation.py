"""Self-distillation sources: the student teaches itself.

* :class:`EmaTeacher`: an exponential moving average of the student's weights, updated after
  every optimiser step (``ema <- decay * ema + (1 - decay) * student``), never by gradients
  (mean teacher, Tarvainen & Valpola 2017; BYOL / DINO-style targets).
* :class:`SnapshotTeacher`: the student's weights frozen at the end of the previous epoch
  (born-again networks, Furlanello et al. 2018, one generation per epoch). During the first
  epoch there is no previous generation: the teacher tensors are the student's own (detached),
  so every distillation term is zero and only the task loss trains.

Both keep their weights in float32 and save them with each checkpoint, so a resumed run continues
exactly.
"""

from __future__ import annotations

import copy

import torch

from ..modeling import unwrap
from ..objectives import ModelTensors
from .frozen import FrozenTeacher


def frozen_copy(student) -> torch.nn.Module:
    """A detached, frozen float32 copy of ``student`` (its unwrapped transformers model)."""
    model = copy.deepcopy(unwrap(student))
    model.eval()
    model.requires_grad_(False)
    return model


def _pairs(teacher, student):
    t_params = list(teacher.parameters())
    s_params = list(unwrap(student).parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("the student's parameters changed after its teacher copy was made")
    return t_params, s_params


class EmaTeacher(FrozenTeacher):
    """An exponential moving average of the student."""

    kind = "ema"

    def __init__(self, student, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}; 0.99-0.9999 are usual")
        super().__init__([frozen_copy(student)], dtype="float32")
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def on_optimizer_step(self, trainer) -> None:
        t_params, s_params = _pairs(self.teachers[0], trainer.model)
        s_values = [p.detach().to(t.dtype) for p, t in zip(s_params, t_params)]
        torch._foreach_lerp_(t_params, s_values, 1.0 - self.decay)
        for t_buf, s_buf in zip(self.teachers[0].buffers(), unwrap(trainer.model).buffers()):
            t_buf.copy_(s_buf)
        self.updates += 1

    def state_dict(self):
        state = {f"ema.{k}": v.detach().clone() for k, v in self.teachers[0].state_dict().items()}
        state["ema_updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state):
        self.updates = int(state.pop("ema_updates", torch.tensor(0)))
        self.teachers[0].load_state_dict({k[len("ema."):]: v for k, v in state.items()}, strict=True)

    def describe(self):
        return {"kind": self.kind, "decay": self.decay}


class SnapshotTeacher(FrozenTeacher):
    """The student as it was at the end of the previous epoch (born-again networks)."""

    kind = "snapshot"

    def __init__(self, student):
        super().__init__([frozen_copy(student)], dtype="float32")
        self.generation = 0  # snapshots taken so far; 0: no teacher yet (first epoch)

    @torch.no_grad()
    def on_epoch_end(self, trainer) -> None:
        t_params, s_params = _pairs(self.teachers[0], trainer.model)
        for t, s in zip(t_params, s_params):
            t.copy_(s)
        for t_buf, s_buf in zip(self.teachers[0].buffers(), unwrap(trainer.model).buffers()):
            t_buf.copy_(s_buf)
        self.generation += 1

    def teacher_tensors(self, trainer, model_inputs, batch, student: ModelTensors | None = None):
        if self.generation == 0 and student is not None:
            return [student.detached()]
        return super().teacher_tensors(trainer, model_inputs, batch)

    def state_dict(self):
        state = {f"snapshot.{k}": v.detach().clone() for k, v in self.teachers[0].state_dict().items()}
        state["snapshot_generation"] = torch.tensor(self.generation)
        return state

    def load_state_dict(self, state):
        self.generation = int(state.pop("snapshot_generation", torch.tensor(0)))
        self.teachers[0].load_state_dict({k[len("snapshot."):]: v for k, v in state.items()}, strict=True)
