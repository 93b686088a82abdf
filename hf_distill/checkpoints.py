"""Checkpoints of a distillation run: what is saved next to the Trainer's own files, and how a run resumes.

:class:`DistillationCheckpointMixin` is mixed into :class:`hf_distill.trainer.DistillationTrainer`.
It saves the objective's own state (learned projections) with each checkpoint and loads it back
on resume.
"""

from __future__ import annotations

from pathlib import Path

import torch

OBJECTIVE_STATE = "distillation_objective.pt"


class DistillationCheckpointMixin:
    """Checkpoint saving and loading for a Trainer that owns ``self.objective``."""

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if any(True for _ in self.objective.parameters()) and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            torch.save(self.objective.state_dict(), folder / OBJECTIVE_STATE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = Path(resume_from_checkpoint) / OBJECTIVE_STATE
        if path.exists():
            self.objective.load_state_dict(torch.load(path, map_location=self.args.device))
