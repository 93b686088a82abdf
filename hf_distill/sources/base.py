"""The teacher-source interface: where the teacher tensors of a batch come from.

The objective never sees where its teacher tensors came from: a frozen model run at every step,
outputs stored ahead of time, or a copy of the student itself. A source may hold models, state
and parameters of its own; it is told about every optimiser step and epoch end, and its state
is saved with each checkpoint.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import torch

from ..objectives import ModelTensors

STATE_FILE = "teacher_source.safetensors"


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

    def after_student(self, trainer, step, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """After the student's loss of a micro-batch: a source with trainable models (peers) computes and
        back-propagates their own losses here. Returns extra values to log."""
        return {}

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

    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Write the source's state into a checkpoint folder (safetensors)."""
        state = self.state_dict()
        if state:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(folder) / STATE_FILE),
                      metadata={"kind": self.kind})

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save_checkpoint` (a checkpoint without it: nothing to restore,
        unless this source keeps state, which is then an error)."""
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            if self.state_dict():
                raise ValueError(f"{folder} holds no {STATE_FILE}, but the {self.kind} teacher source needs its state "
                                 "to resume exactly; resume with the source it was written with, or --start_fresh")
            return
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("kind")
        if kind != self.kind:
            raise ValueError(f"{path} holds the state of a {kind!r} teacher source, not {self.kind!r}")
        self.load_state_dict(load_file(str(path)))

    def describe(self) -> dict:
        """The source's settings, for checkpoints and model cards."""
        return {"kind": self.kind}
