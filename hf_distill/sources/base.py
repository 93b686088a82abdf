"""The teacher-source interface: where the teacher tensors of a batch come from.

The objective never sees where its teacher tensors came from: a frozen model run at every step,
outputs stored ahead of time, or a copy of the student itself. A source may hold models, state
and parameters of its own; it is told about every optimiser step and epoch end, and its state
is saved with each checkpoint.
"""

from __future__ import annotations

import abc

import torch

from ..objectives import ModelTensors


class TeacherSource(abc.ABC):
    """Yields the teacher tensors of each batch for :class:`hf_distill.trainer.DistillationTrainer`."""

    #: the name of the source in ``--teacher_source`` and in checkpoints
    kind = "base"
    #: what it can feed: subset of {"logits", "hidden_states", "attentions", "qkv"}
    provides: frozenset[str] = frozenset()

    @property
    def models(self) -> list[torch.nn.Module]:
        """The teacher models it runs (used to validate the terms against); empty for stored outputs."""
        return []

    def check(self, objective) -> None:
        """Raise ValueError, before any step, when this source cannot feed a configured term."""
        missing = objective.teacher_needs - set(self.provides)
        if missing:
            terms = [t.log_name for t in objective.active_terms if t.uses_teacher and set(t.needs) & missing]
            raise ValueError(f"the {self.kind} teacher source cannot provide the teacher's {sorted(missing)}, which "
                             f"{terms} read; use a live teacher (frozen, ema or snapshot) or drop those terms")

    def bind(self, trainer) -> None:
        """Called once the Trainer is built: place models on its device, set up recorders."""

    @abc.abstractmethod
    def teacher_tensors(self, trainer, model_inputs: dict, batch: dict,
                        student: ModelTensors | None = None) -> list[ModelTensors]:
        """The teacher tensors for one micro-batch (one entry per teacher).

        ``model_inputs`` are the student's inputs; ``batch`` holds the batch's ``teacher_*``
        columns (stored teacher outputs); ``student`` the student's tensors of the same batch.
        """

    def on_optimizer_step(self, trainer) -> None:
        """After each optimiser step (an EMA teacher updates here)."""

    def on_epoch_end(self, trainer) -> None:
        """At the end of each epoch (a snapshot teacher refreshes here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save with a checkpoint so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the {self.kind} teacher source keeps no state, but the checkpoint holds "
                             f"{sorted(state)[:3]}")

    def describe(self) -> dict:
        """The source's settings, for checkpoints and model cards."""
        return {"kind": self.kind}
