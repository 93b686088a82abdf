"""Online distillation: peers trained in the same run as the student.

* ``mode="mutual"`` (deep mutual learning, Zhang et al. 2018): every model learns from the task
  labels and from the others' detached outputs. The student's objective distils from the peers
  (their probabilities averaged, or one term per peer with ``multi_teacher: separate``); each
  peer's objective is ``kd_weight * KL(p_others || p_peer) at T + task_weight * task loss``.
* ``mode="trainable"`` (a trainable teacher): the peers, typically one larger teacher, are
  fine-tuned on the task loss only while they teach the student.

Each peer has its own optimiser (AdamW with the run's learning rate, betas, epsilon and weight
decay) and learning-rate schedule (the run's), its gradients clipped to ``max_grad_norm`` and
averaged over processes; peers, optimisers and schedules are saved with every checkpoint and
resume exactly. Peer losses are normalised by the same global item counts as the student's.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from ..modeling import forward_parameters, unwrap
from ..objectives import ModelTensors, StepTensors, build_objective
from .base import TeacherSource

PEER_MODES = ("mutual", "trainable")


class PeerTeacher(TeacherSource):
    """Peers trained alongside the student, each with its own optimiser and schedule."""

    kind = "peer"
    provides = frozenset({"logits", "hidden_states"})

    def __init__(self, peers: list[torch.nn.Module], mode: str = "mutual"):
        if not peers:
            raise ValueError("the peer teacher source needs at least one peer model (teacher=...)")
        if mode not in PEER_MODES:
            raise ValueError(f"peer_mode must be one of {PEER_MODES}, got {mode!r}")
        self.peers = list(peers)
        self.mode = mode
        self.objectives: list = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list = []
        self.accepted: list = []
        self._live: list[ModelTensors] = []
        self._pending_state: dict | None = None

    @property
    def models(self) -> list[torch.nn.Module]:
        return self.peers

    def bind(self, trainer) -> None:
        args, device = trainer.args, trainer.accelerator.device
        self.peers = [p.to(device).train().requires_grad_(True) for p in self.peers]
        self.accepted = [forward_parameters(p) for p in self.peers]
        peer_args = copy.copy(args)
        peer_args.distillation = None
        peer_args.cos_weight = peer_args.mse_weight = peer_args.hidden_mse_weight = 0.0
        if self.mode == "trainable":
            peer_args.kd_weight = 0.0
        student = trainer.model
        self.objectives = []
        for i, peer in enumerate(self.peers):
            others = [student] + [p for j, p in enumerate(self.peers) if j != i] if self.mode == "mutual" else []
            objective = build_objective(peer_args, peer, others or [student], multi_teacher="average")
            self.objectives.append(objective.to(device))
        self.optimizers = [torch.optim.AdamW(p.parameters(), lr=args.learning_rate, betas=(args.adam_beta1,
                                             args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay)
                           for p in self.peers]
        self.schedulers = []

    def _schedulers(self, trainer) -> list:
        if not self.schedulers:
            from transformers import get_scheduler

            total = max(int(trainer.state.max_steps or 0), 1)
            warmup = trainer.args.get_warmup_steps(total)
            self.schedulers = [get_scheduler(trainer.args.lr_scheduler_type, o, num_warmup_steps=warmup,
                                             num_training_steps=total) for o in self.optimizers]
            if self._pending_state is not None:
                for opt, sched, state in zip(self.optimizers, self.schedulers, self._pending_state["schedulers"]):
                    sched.load_state_dict(state)
                    # A new scheduler sets the initial learning rate; the resumed one's current rate applies.
                    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                        group["lr"] = lr
                self._pending_state = None
        return self.schedulers

    def teacher_tensors(self, trainer, model_inputs, batch, student=None):
        training = trainer.model.training
        flags = trainer.output_flags()
        self._live = []
        out = []
        for peer, accepted in zip(self.peers, self.accepted):
            peer.train(training)
            inputs = {k: v for k, v in model_inputs.items() if accepted is None or k in accepted}
            with torch.set_grad_enabled(training), trainer.accelerator.autocast():
                tensors = ModelTensors.from_output(peer(**inputs, **flags))
            if training:
                self._live.append(tensors)
            out.append(tensors.detached())
        return out

    def after_student(self, trainer, step, scale: float = 1.0) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        if not self._live:
            return logs
        outputs, self._live = self._live, []
        student = step.student.detached()
        frozen = [o.detached() for o in outputs]
        for i, (peer_out, objective) in enumerate(zip(outputs, self.objectives)):
            others = [student] + [f for j, f in enumerate(frozen) if j != i] if self.mode == "mutual" else [student]
            peer_step = StepTensors(student=peer_out, teachers=others, teacher_weights=[1.0 / len(others)] * len(others),
                                    labels=step.labels, masks=step.masks, counts=step.counts, task=step.task,
                                    batch=step.batch)
            loss, terms = objective(peer_step)
            if not math.isfinite(float(loss.detach())):
                raise ValueError(f"peer {i}: its loss is non-finite ({ {k: float(v) for k, v in terms.items()} })")
            (loss * scale).backward()
            for name, value in terms.items():
                logs[f"peer{i}_{name}"] = value.detach()
        return logs

    def on_optimizer_step(self, trainer) -> None:
        processes = trainer.accelerator.num_processes
        for peer, optimizer, scheduler in zip(self.peers, self.optimizers, self._schedulers(trainer)):
            params = [p for p in peer.parameters() if p.grad is not None]
            if processes > 1:
                for p in params:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= processes
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder) -> None:
        from safetensors.torch import save_model

        folder = Path(folder)
        for i, peer in enumerate(self.peers):
            save_model(unwrap(peer), str(folder / f"peer-{i}.safetensors"))
        state = {"optimizers": [o.state_dict() for o in self.optimizers],
                 "schedulers": [s.state_dict() for s in self.schedulers], "mode": self.mode}
        torch.save(state, folder / "peers_optimizer.pt")

    def load_checkpoint(self, folder) -> None:
        from safetensors.torch import load_model

        folder = Path(folder)
        for i, peer in enumerate(self.peers):
            path = folder / f"peer-{i}.safetensors"
            if not path.is_file():
                raise ValueError(f"{folder} has no {path.name}: it was not written by a run with {len(self.peers)} "
                                 "peers; resume with the same peers or --start_fresh")
            load_model(unwrap(peer), str(path))
        # Optimiser states hold only tensors and numbers: loaded without unpickling code.
        state = torch.load(folder / "peers_optimizer.pt", map_location=self.peers[0].device, weights_only=True)
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self.schedulers = []
        self._pending_state = {"schedulers": state["schedulers"]}

    def save_models(self, output_dir: str | os.PathLike) -> list[Path]:
        """Save every peer as a transformers folder (``output_dir/peer-0``, ...)."""
        paths = []
        for i, peer in enumerate(self.peers):
            path = Path(output_dir) / f"peer-{i}"
            unwrap(peer).save_pretrained(path)
            paths.append(path)
        return paths

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, "peers": len(self.peers)}
