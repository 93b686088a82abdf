"""Adversarial distillation: a discriminator learns to tell the teacher's outputs from the student's, and the
student learns to fool it.

Configuration::

    distillation:
      - {loss: kl, weight: 0.5, temperature: 2.0}
      - {loss: adversarial, on: logits, weight: 0.1, discriminator_lr: 1.0e-4, hidden_size: 256,
         steps_per_student_step: 1, gan_loss: nonsaturating}
      - {loss: adversarial, name: adv_hidden, on: hidden, layer: -1, pooling: mean, projection: linear}

What the discriminator sees (``on``):

* ``logits``: each position's log-probabilities (``log_softmax`` of the logits, so a shift of the
  logits, which changes no prediction, changes nothing); the positions of the soft-target family
  (``kd``: every real token, the labelled ones of a causal LM; one row per sample for a classifier).
* ``hidden``: the hidden states of ``layer`` (``hidden_states`` index, default ``-1``), per real token
  (``pooling: token``, the default) or one vector per sample (``cls`` or ``mean``). A student of
  another width needs ``projection: linear``: a map to the teacher's width, trained with the student.

The discriminator is an MLP (``width -> hidden_size -> hidden_size -> 1``, LeakyReLU 0.2), initialised
from ``seed`` (default: the run's), so every process and every resumed run builds the same one. The
losses are :mod:`hf_distill.losses.adversarial` (``gan_loss``: ``nonsaturating``, the default, or
``least_squares``).

**Alternating updates.** Within an optimiser step the discriminator is fixed: each micro-batch's
generator term (``loss_adversarial``) reads it through detached parameters, so no student gradient
reaches it, and the micro-batch's detached teacher and student outputs are kept. After the student's
optimiser step, the discriminator takes ``steps_per_student_step`` updates of its own optimiser
(AdamW at ``discriminator_lr``, the run's betas and epsilon, no weight decay; the run's learning-rate
schedule type and warm-up, counted in discriminator updates) on every output kept in that optimiser
step: one update per optimiser step whatever the gradient accumulation. Its loss is normalised by
the step's global item count and its gradients are summed over processes, so batch 16, 8 x 2
accumulation and 2 processes x 8 give the same update. Its gradients are clipped to
``max_grad_norm``.

**Ownership.** The discriminator is deliberately not a submodule of the term (it is held by a plain
attribute): the objective's parameters are what the student's optimiser, its gradient clipping and
the DDP gradient averaging see, and the discriminator is none of them. Its weights, optimiser and
schedule are saved with each checkpoint (``<log name>_discriminator.safetensors`` and
``<log name>_discriminator_optimizer.pt``) and restored on resume.

Logged: ``loss_adversarial`` (the student's term), ``loss_adversarial_discriminator`` (the
discriminator's loss on the step's outputs, before its update) and
``loss_adversarial_discriminator_accuracy`` (its correct calls, out of each item's two outputs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..losses import adversarial as adversarial_losses
from ..modeling import hidden_size, num_layers, output_size
from ..numerics import NonFiniteError, all_finite
from .base import StepTensors, Term, finite_number, integer, register_term, shifted

logger = logging.getLogger(__name__)

TARGETS = ("logits", "hidden")
POOLINGS = ("token", "cls", "mean")


class Discriminator(nn.Module):
    """``width -> hidden -> hidden -> 1`` MLP with LeakyReLU(0.2): one raw score (a logit) per row."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class DiscriminatorTrainer:
    """The discriminator, its optimiser and schedule, and the outputs kept for its next update."""

    def __init__(self, width: int, hidden: int, *, lr: float, betas: tuple[float, float], eps: float, seed: int,
                 steps: int, kind: str):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = Discriminator(width, hidden)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self.scheduler = None
        self._pending_scheduler: dict | None = None
        self.steps, self.kind = steps, kind
        self.updates = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.count: torch.Tensor | None = None

    def place(self, device: torch.device) -> None:
        """Move the discriminator and its optimiser's state to ``device`` (the outputs' device)."""
        if next(self.module.parameters()).device == device:
            return
        self.module.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)

    def detached_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores through detached parameters: gradients reach ``x`` (the student) but never the discriminator."""
        params = {k: v.detach() for k, v in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, (x,))

    def _schedule(self, trainer):
        if self.scheduler is None:
            from transformers import get_scheduler

            total = max(int(trainer.state.max_steps or 0), 1)
            self.scheduler = get_scheduler(trainer.args.lr_scheduler_type, self.optimizer,
                                           num_warmup_steps=trainer.args.get_warmup_steps(total) * self.steps,
                                           num_training_steps=total * self.steps)
            if self._pending_scheduler is not None:
                self.scheduler.load_state_dict(self._pending_scheduler)
                for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = lr  # a new scheduler sets the initial rate; the resumed one's applies
                self._pending_scheduler = None
        return self.scheduler

    def update(self, trainer, name: str) -> None:
        """``steps`` updates on the outputs kept during the optimiser step that just ended."""
        kept, count, self.kept, self.count = self.kept, self.count, [], None
        if not kept:
            return
        scheduler = self._schedule(trainer)
        params = list(self.module.parameters())
        processes = trainer.accelerator.num_processes
        for _ in range(self.steps):
            for student, teacher in kept:
                loss = adversarial_losses.discriminator_loss(self.module(teacher), self.module(student),
                                                             kind=self.kind, num_items=count)
                loss.backward()
            if processes > 1:  # each process holds its share of a loss normalised by the global count: sum them
                for p in params:
                    torch.distributed.all_reduce(p.grad)
            if not all_finite([p.grad for p in params]):
                self.optimizer.zero_grad(set_to_none=True)
                if trainer.args.on_nonfinite == "skip":
                    logger.warning("%s: the discriminator's gradient is not finite; skipping its update", name)
                    continue
                raise NonFiniteError(f"{name}: the discriminator's gradient is not finite at step "
                                     f"{trainer.state.global_step}; lower discriminator_lr, or set on_nonfinite='skip'")
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, trainer.args.max_grad_norm)
            self.optimizer.step()
            scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else self._pending_scheduler,
                "updates": self.updates}

    def load(self, weights: dict, state: dict) -> None:
        self.module.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler, self._pending_scheduler = None, state["scheduler"]
        self.updates = int(state["updates"])
        self.kept, self.count = [], None


@register_term("adversarial")
class AdversarialTerm(Term):
    """Generator-style term against a discriminator trained alternately with the student (see the module doc)."""

    options = ("on", "layer", "pooling", "projection", "hidden_size", "discriminator_lr", "steps_per_student_step",
               "gan_loss", "seed")

    def setup(self, student, teachers, args):
        what = "term 'adversarial'"
        on = self.config.get("on", "logits")
        if on not in TARGETS:
            raise ValueError(f"{what}: on must be 'logits' or 'hidden', got {on!r}")
        self.on = on
        self.needs = frozenset({"logits"} if on == "logits" else {"hidden_states"})
        if on == "logits":
            extra = sorted({"layer", "pooling", "projection"} & set(self.config))
            if extra:
                raise ValueError(f"{what}: {', '.join(extra)} apply to on: hidden; drop them or set on: hidden")
        super().setup(student, teachers, args)
        self.kind = self.config.get("gan_loss", "nonsaturating")
        if self.kind not in adversarial_losses.GAN_LOSSES:
            raise ValueError(f"{what}: gan_loss must be one of {', '.join(adversarial_losses.GAN_LOSSES)}, got "
                             f"{self.kind!r}")
        hidden = integer(self.config.get("hidden_size", 256), f"{what}: hidden_size")
        steps = integer(self.config.get("steps_per_student_step", 1), f"{what}: steps_per_student_step")
        for key, value in (("hidden_size", hidden), ("steps_per_student_step", steps)):
            if value < 1:
                raise ValueError(f"{what}: {key} must be >= 1, got {value}")
        lr = finite_number(self.config.get("discriminator_lr", getattr(args, "learning_rate", 1e-4)),
                           f"{what}: discriminator_lr", minimum=0.0, strict=True)
        seed = integer(self.config.get("seed", getattr(args, "seed", 42)), f"{what}: seed")
        self.projection = None
        if on == "logits":
            self.count_key = "kd"
            width = output_size(student)
            if width is None:
                raise ValueError(f"{what}: the student has no output layer to read logits from; use on: hidden")
        else:
            width = self._setup_hidden(student, teachers, what)
        self.layer = getattr(self, "layer", None)
        self.adversary = DiscriminatorTrainer(
            width, hidden, lr=lr, betas=(getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)),
            eps=getattr(args, "adam_epsilon", 1e-8), seed=seed, steps=steps, kind=self.kind)

    def _setup_hidden(self, student, teachers, what) -> int:
        if not teachers:
            raise ValueError(f"{what} on: hidden needs a live teacher's hidden states (stored outputs have none)")
        teacher = teachers[self.teacher_index or 0]
        self.pooling = self.config.get("pooling", "token")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{what}: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        self.count_key = "hidden" if self.pooling == "token" else "samples"
        layer = integer(self.config.get("layer", -1), f"{what}: layer")
        for who, model in (("student", student), ("teacher", teacher)):
            size = num_layers(model) + 1
            if not -size <= layer < size:
                raise ValueError(f"{what}: layer {layer} is out of range for the {who}, whose hidden_states go from 0 "
                                 f"(embeddings) to {size - 1} (or -{size}..-1 from the end)")
        self.layer = layer
        d_s, d_t = hidden_size(student), hidden_size(teacher)
        projection = self.config.get("projection")
        if projection not in (None, "linear", "none"):
            raise ValueError(f"{what}: projection must be 'linear' or omitted, got {projection!r}")
        if d_s != d_t and projection != "linear":
            raise ValueError(f"{what} compares hidden states of width {d_s} (student) and {d_t} (teacher); add "
                             "`projection: linear` to learn a map from the student's width to the teacher's")
        if projection == "linear":
            self.projection = nn.Linear(d_s, d_t)  # the student's side: trained by the student's optimiser
        return d_t

    # ------------------------------------------------------------------ the outputs the discriminator sees
    def _hidden(self, states, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        if states is None:
            raise ValueError("term 'adversarial' on: hidden: the model returned no hidden states")
        h = states[self.layer].float()
        if self.pooling == "token":
            return h, mask
        if self.pooling == "cls" or mask is None:
            return h[:, 0], None
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0), None

    def features(self, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's selected items as ``(n, width)`` rows (the teacher's detached)."""
        teacher = step.teacher(self.teacher_index)
        if self.on == "logits":
            if teacher.logits is None:
                raise ValueError("term 'adversarial' on: logits needs the teacher's full logits (a live teacher or "
                                 "stored teacher_logits); stored top-k soft labels cannot be scored")
            s = torch.log_softmax(shifted(step, step.student.logits).float(), dim=-1)
            t = torch.log_softmax(shifted(step, teacher.logits).float(), dim=-1)
            mask = step.masks.get("kd")
        else:
            s, mask = self._hidden(step.student.hidden_states, step.masks.get("hidden"))
            t, _ = self._hidden(teacher.hidden_states, step.masks.get("hidden"))
            if self.projection is not None:
                s = self.projection(s)
        t = t.detach().to(s)
        if mask is not None:
            s, t = s[mask.bool()], t[mask.bool()]
        return s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])

    def forward(self, step: StepTensors) -> torch.Tensor:
        s, t = self.features(step)
        adversary = self.adversary
        adversary.place(s.device)
        count = step.counts[self.count_key]
        student_scores = adversary.detached_scores(s)
        with torch.no_grad():
            teacher_scores = adversary.module(t)
            self.parts = {
                "discriminator": adversarial_losses.discriminator_loss(teacher_scores, student_scores.detach(),
                                                                       kind=self.kind, num_items=count),
                "discriminator_accuracy": adversarial_losses.discriminator_accuracy(
                    teacher_scores, student_scores.detach(), kind=self.kind, num_items=count)}
        if torch.is_grad_enabled() and s.requires_grad:  # training: keep the outputs for the discriminator's update
            adversary.kept.append((s.detach(), t))
            adversary.count = count.detach()
        return adversarial_losses.generator_loss(student_scores, kind=self.kind, num_items=count)

    # ------------------------------------------------------------------ the trainer's hooks
    def on_optimizer_step(self, trainer) -> None:
        """After the student's optimiser step: the discriminator's own updates."""
        self.adversary.update(trainer, self.log_name)

    def _files(self, folder) -> tuple[Path, Path]:
        folder = Path(folder)
        return (folder / f"{self.log_name}_discriminator.safetensors",
                folder / f"{self.log_name}_discriminator_optimizer.pt")

    def save_checkpoint(self, folder) -> None:
        from safetensors.torch import save_file

        weights, state = self._files(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.adversary.module.state_dict().items()},
                  str(weights))
        torch.save(self.adversary.state(), state)

    def load_checkpoint(self, folder) -> None:
        from safetensors.torch import load_file

        weights, state = self._files(folder)
        if not weights.is_file() or not state.is_file():
            raise ValueError(f"{folder} has no {weights.name} / {state.name}: it was not written with this "
                             "adversarial term; resume with the checkpoint's settings or --start_fresh")
        device = next(self.adversary.module.parameters()).device
        # Optimiser and schedule states hold only tensors and numbers: read without unpickling code.
        self.adversary.load(load_file(str(weights), device=str(device)),
                            torch.load(state, map_location=device, weights_only=True))
