"""Response-based terms (output distributions) and the task loss on hard labels."""

from __future__ import annotations

import torch

from .. import losses
from ..losses.chunked import chunked_generalized_jsd_loss, fused_linear_kl_loss
from ..losses.chunked_topk import chunked_topk_kl_loss
from ..losses.fused_ce import fused_linear_cross_entropy
from ..losses.task import ctc_loss
from ..modeling import task_kind, unwrap
from .base import TASK_LOG_NAMES, ModelTensors, StepTensors, Term, finite_number, register_term, shifted
from .fused import FusableTerm


class ResponseTerm(Term):
    """A term between the student's and the (combined) teacher's logits at a temperature."""

    options = ("temperature",)

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.temperature = finite_number(self.config.get("temperature", args.temperature),
                                         f"term {self.loss_name!r}: temperature", minimum=0.0, strict=True)

    def pair(self, step: StepTensors) -> tuple[torch.Tensor, torch.Tensor]:
        if step.teacher(self.teacher_index).logits is None:
            raise ValueError(f"term {self.loss_name!r} needs the teacher's full logits, but its outputs were stored as "
                             "top-k only; use `kl` (computed on the top-k and the tail mass) or store full logits")
        teacher = step.combined_teacher_logits(self.temperature, self.teacher_index)
        return shifted(step, step.student.logits), shifted(step, teacher.to(step.student.logits.device))


def chunk_rows(vocab_size: int, device: torch.device | None = None) -> int:
    """Rows per chunk for the chunked divergences.

    CPU: about 2^20 elements per chunk, which stays in cache. GPU: about 2^26 (256 MiB in fp32):
    few, large kernels, and still bounded memory for long sequences and large vocabularies.
    """
    budget = 1 << 26 if device is not None and device.type == "cuda" else 1 << 20
    return max(8, budget // max(vocab_size, 1))


def fused_chunk_rows(vocab_size: int, device: torch.device | None = None) -> int:
    """Rows per chunk for the fused (hidden states x projection) losses. On a CPU about 2^21 logits per chunk, twice
    :func:`chunk_rows`: each chunk's matrix products read the whole projection, so fewer, larger products are faster,
    and a few (rows, vocab) buffers of that size are all the fused losses hold."""
    if device is not None and device.type == "cuda":
        return chunk_rows(vocab_size, device)
    return max(8, (1 << 21) // max(vocab_size, 1))


def divergence(step: StepTensors, s: torch.Tensor, t: torch.Tensor, *, beta: float, temperature: float) -> torch.Tensor:
    """Forward KL (beta 0), reverse KL (beta 1) or generalized JSD, via the chunked implementation.

    Same value and gradient as the dense losses, but computed a few rows at a time with the gradient
    formed in the same pass: about 4x faster on a CPU at a 30k vocabulary, and no full-size
    temporaries beyond one gradient buffer (none in evaluation).
    """
    return chunked_generalized_jsd_loss(s, t, beta=beta, temperature=temperature, mask=step.masks["kd"],
                                        num_items=step.counts["kd"], chunk_size=chunk_rows(s.shape[-1], s.device))


def fused_divergence(step: StepTensors, term: ResponseTerm, *, beta: float) -> torch.Tensor:
    """:func:`divergence` from both models' last hidden states and output projections (``fused: true``): the same
    value and student gradients, with neither model's full logits ever formed."""
    student, teacher = step.student, step.teacher(term.teacher_index)
    hidden = shifted(step, student.last_hidden_state)
    weight, bias = student.head
    t_weight, t_bias = teacher.head
    return fused_linear_kl_loss(hidden, weight, shifted(step, teacher.last_hidden_state).to(hidden.device), t_weight,
                                student_bias=bias, teacher_bias=t_bias, beta=beta, temperature=term.temperature,
                                mask=step.masks["kd"], num_items=step.counts["kd"],
                                chunk_size=fused_chunk_rows(weight.shape[0], hidden.device))


def sparse_kl(step: StepTensors, teacher, temperature: float) -> torch.Tensor:
    """KL against a teacher stored as top-k log-probabilities (+ tail mass) at ``temperature``, chunked (no
    full positions x vocabulary temporaries); for causal LMs the stored positions are shifted like the logits."""
    logits = shifted(step, step.student.logits)
    tail = teacher.tail_mass
    if tail is not None and step.task == "causal_lm":
        tail = tail[..., :-1]
    return chunked_topk_kl_loss(logits, shifted(step, teacher.topk_logprobs), shifted(step, teacher.topk_indices),
                                teacher_tail_mass=tail, temperature=temperature, mask=step.masks["kd"],
                                num_items=step.counts["kd"], chunk_size=chunk_rows(logits.shape[-1], logits.device))


@register_term("kl")
class KLTerm(FusableTerm, ResponseTerm):
    """Soft-target KL(p_T || p_S) at temperature T, x T^2 (DistilBERT, Hinton et al.); on a teacher stored as
    top-k + tail mass, the KL over the top-k and the tail (exact when k is the vocabulary)."""

    options = ("temperature", "fused")

    def forward(self, step):
        teacher = step.teacher(self.teacher_index)
        if teacher.logits is None and teacher.topk_logprobs is not None:
            if len(step.teachers) > 1 and self.teacher_index is None:
                raise ValueError("several teachers stored as top-k cannot be averaged; use multi_teacher: separate")
            return sparse_kl(step, teacher, self.temperature)
        if self.fused:
            return fused_divergence(step, self, beta=0.0)
        s, t = self.pair(step)
        return divergence(step, s, t, beta=0.0, temperature=self.temperature)


@register_term("reverse_kl")
class ReverseKLTerm(FusableTerm, ResponseTerm):
    """KL(p_S || p_T) x T^2: mode-seeking."""

    options = ("temperature", "fused")

    def forward(self, step):
        if self.fused:
            return fused_divergence(step, self, beta=1.0)
        s, t = self.pair(step)
        return divergence(step, s, t, beta=1.0, temperature=self.temperature)


@register_term("jsd")
class JSDTerm(FusableTerm, ResponseTerm):
    """Generalized Jensen-Shannon divergence with mixture weight ``beta`` (0: forward KL, 1: reverse KL)."""

    options = ("temperature", "beta", "fused")

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.beta = finite_number(self.config.get("beta", 0.5), "term 'jsd': beta", minimum=0.0)
        if self.beta > 1:
            raise ValueError(f"term 'jsd': beta must be between 0 and 1, got {self.beta:g}")

    def forward(self, step):
        if self.fused:
            return fused_divergence(step, self, beta=self.beta)
        s, t = self.pair(step)
        return divergence(step, s, t, beta=self.beta, temperature=self.temperature)


@register_term("logit_mse")
class LogitMSETerm(ResponseTerm):
    """Squared error between raw logits, summed over classes (DistilBERT's alpha_mse term)."""

    options = ()

    def setup(self, student, teachers, args):
        Term.setup(self, student, teachers, args)
        self.temperature = 1.0

    def forward(self, step):
        s, t = self.pair(step)
        return losses.logit_mse_loss(s, t, mask=step.masks["kd"], num_items=step.counts["kd"])


@register_term("topk_kl")
class TopKKLTerm(Term):
    """KL against stored top-k teacher log-probabilities (+ tail mass): batch columns
    ``teacher_topk_logprobs``, ``teacher_topk_indices`` and optionally ``teacher_tail_mass``."""

    options = ("temperature",)
    uses_teacher = False  # reads stored teacher outputs from the batch

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.temperature = finite_number(self.config.get("temperature", 1.0), "term 'topk_kl': temperature",
                                         minimum=0.0, strict=True)

    def forward(self, step):
        teacher = ModelTensors.from_stored(step.batch)
        if teacher is None or teacher.topk_logprobs is None:
            raise ValueError("topk_kl needs batch columns teacher_topk_logprobs and teacher_topk_indices")
        return sparse_kl(step, teacher, self.temperature)


@register_term("task")
class TaskTerm(FusableTerm):
    """Cross-entropy on the hard labels (masked-LM, causal-LM or classification; CTC loss for CTC heads); fused
    (from the last hidden states and the output projection, chunk by chunk) for causal LMs with ``fused``."""

    count_key = "task"
    options = ("label_smoothing", "fused")
    uses_teacher = False

    @property
    def log_name(self) -> str:
        return "loss_" + (self.name or getattr(self, "task_name", "ce"))

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.task_name = TASK_LOG_NAMES.get(task_kind(student), "ce")
        self.label_smoothing = finite_number(self.config.get("label_smoothing", 0.0), "term 'task': label_smoothing",
                                             minimum=0.0)
        if self.label_smoothing >= 1:
            raise ValueError(f"term 'task': label_smoothing must be below 1, got {self.label_smoothing:g}")
        # CTC's blank is the pad token in transformers' CTC heads.
        self.blank = getattr(unwrap(student).config, "pad_token_id", 0) or 0

    def forward(self, step):
        if self.fused:
            hidden, (weight, bias) = shifted(step, step.student.last_hidden_state), step.student.head
            if step.labels is None:
                return hidden.sum() * 0.0
            return fused_linear_cross_entropy(hidden, weight, step.labels[..., 1:], bias=bias,
                                              num_items=step.counts["task"], label_smoothing=self.label_smoothing,
                                              chunk_size=fused_chunk_rows(weight.shape[0], hidden.device))
        if step.labels is None:
            return step.student.logits.sum() * 0.0
        if step.task == "ctc":
            return ctc_loss(step.student.logits, step.labels, step.batch["frame_lengths"], blank=self.blank,
                            num_items=step.counts["task"])
        labels = step.labels[..., 1:] if step.task == "causal_lm" else step.labels
        return losses.cross_entropy_loss(shifted(step, step.student.logits), labels, num_items=step.counts["task"],
                                         label_smoothing=self.label_smoothing)
