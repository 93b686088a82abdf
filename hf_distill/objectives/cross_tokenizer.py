"""Terms valid between a student and a teacher whose tokenizers differ: ``uld`` and ``span_kl``.

Both read batches built by :mod:`hf_distill.lm.cross_tokenizer`: the teacher runs on its own
tokenization of the same text (``teacher_input_ids`` / ``teacher_attention_mask``), and
``teacher_alignment`` lists the groups of student and teacher tokens that cover the same text span.
For each group, each model's prediction of the group's first token is read at the position before
it, where both models have read exactly the same text:

* ``uld`` (Boizard et al., 2024): the L1 distance between the two sorted probability vectors (the
  closed form of the Wasserstein distance under a uniform cost; :func:`hf_distill.losses.uld_loss`).
  A group of several tokens is compared as its first token's distribution times the probability
  the model gives the group's remaining tokens (the chain rule, as in TRL's GOLD);
* ``span_kl``: ``KL(q_T || q_S) x T^2`` between the two next-token distributions restricted to the
  tokens whose text both vocabularies contain, renormalised there
  (:func:`hf_distill.losses.shared_vocabulary_kl_loss`); the shared tokens are found once, from the
  two tokenizers the trainer was given.

Temperature: ``softmax(logits / T)`` for both models, ``T`` from the term's ``temperature`` option
(default 1, the convention of the ULD paper and of TRL, not ``--temperature``). Counting: a group
counts when every student token of it is a target (its prediction positions lie in the objective's
``kd`` mask, so prompt and padding never count); the sum over counted groups is divided by the ``kd``
count (the student's target positions in the optimiser step) like every other term, i.e. the mean over
groups times the fraction of target positions that start a group.

With different tokenizers the trainer accepts exactly these terms (and the task loss) and refuses
token-level ones (:func:`check_cross_tokenizer_terms`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses.cross_tokenizer import shared_vocabulary_kl_loss, uld_loss
from ..modeling import task_kind
from .base import TERM_REGISTRY, StepTensors, Term, finite_number, register_term
from .objective import default_terms, parse_distillation_spec

#: the registered terms that compare models across tokenizers
CROSS_TOKENIZER_TERMS = ("uld", "span_kl")

BATCH_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "teacher_alignment")


def teacher_model_inputs(model_inputs: dict, batch: dict) -> dict:
    """What a live teacher is fed: its own tokenization when the batch carries one (``teacher_input_ids``,
    ``teacher_attention_mask``), else the student's inputs."""
    ids = batch.get("teacher_input_ids")
    if ids is None:
        return model_inputs
    inputs = {"input_ids": ids}
    if batch.get("teacher_attention_mask") is not None:
        inputs["attention_mask"] = batch["teacher_attention_mask"]
    return inputs


def check_cross_tokenizer_terms(args, reason: str) -> None:
    """Accept a student-teacher pair whose vocabularies differ (``reason`` says how) only when no weighted term
    compares the two models token by token; raise a ValueError naming those terms and the ones to use."""
    specs = parse_distillation_spec(getattr(args, "distillation", None)) or default_terms(args)
    token_level = []
    for spec in specs:
        cls = TERM_REGISTRY.get(spec["loss"])
        if cls is None or spec.get("weight", 1.0) == 0 or spec["loss"] in CROSS_TOKENIZER_TERMS:
            continue
        if cls.uses_teacher:
            token_level.append(spec["loss"])
    if token_level:
        raise ValueError(
            f"{reason}.\nThe configured term(s) {sorted(set(token_level))} compare the two models token by token, "
            "which needs one vocabulary. For a teacher with another tokenizer use only the cross-tokenizer terms "
            f"{' and '.join(CROSS_TOKENIZER_TERMS)} (and the task loss), e.g. distillation: "
            "[{loss: uld, weight: 1.0}, {loss: task, weight: 1.0}], with batches from "
            "hf_distill.lm.cross_tokenizer (CrossTokenizerCollator)")


def bind_tokenizers(objective, student_tokenizer, teacher_tokenizers: list) -> None:
    """Give the objective's cross-tokenizer terms the two tokenizers (``span_kl`` finds its shared tokens)."""
    for term in objective.terms:
        if isinstance(term, CrossTokenizerTerm) and term.weight > 0:
            term.bind_tokenizers(student_tokenizer, teacher_tokenizers[0] if teacher_tokenizers else None)


def _continuation_log_probs(logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, start: torch.Tensor,
                            stop: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per group, ``sum_{m = start+1}^{stop-1} log softmax(logits[row, m-1] / T)[ids[row, m]]``: the log-probability
    of the group's tokens after its first (0 for one-token groups)."""
    lengths = (stop - start - 1).clamp(min=0)
    out = torch.zeros(rows.shape[0], device=logits.device, dtype=torch.float32)
    total = int(lengths.sum())
    if total == 0:
        return out
    group = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    m = start[group] + 1 + (torch.arange(total, device=rows.device) - first[group])
    r = rows[group]
    picked = F.log_softmax(logits[r, m - 1].float() / temperature, dim=-1)
    picked = picked.gather(-1, ids[r, m].unsqueeze(-1)).squeeze(-1)
    return out.index_add(0, group.to(logits.device), picked)


class CrossTokenizerTerm(Term):
    """A term between the student's and the teacher's predictions at aligned text spans."""

    options = ("temperature",)
    cross_tokenizer = True

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.temperature = finite_number(self.config.get("temperature", 1.0), f"term {self.loss_name!r}: temperature",
                                         minimum=0.0, strict=True)
        if task_kind(student) != "causal_lm":
            raise ValueError(f"term {self.loss_name!r} aligns causal language models' next-token predictions; the "
                             f"student is a {task_kind(student)} model")
        if len(teachers) > 1:
            raise ValueError(f"term {self.loss_name!r} takes one teacher (the batch carries one teacher "
                             f"tokenization), got {len(teachers)}")

    def bind_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        """Called by the trainer with the two tokenizers (nothing to do for ULD)."""

    def groups(self, step: StepTensors):
        """The counted groups: ``(rows, s_start, s_stop, t_start, t_stop)``, one entry per group."""
        missing = [c for c in ("teacher_input_ids", "teacher_alignment") if step.batch.get(c) is None]
        if missing:
            raise ValueError(f"term {self.loss_name!r} needs the batch columns {missing}: build the data with "
                             "hf_distill.lm.cross_tokenizer.build_cross_tokenizer_dataset and CrossTokenizerCollator")
        if step.labels is None:
            raise ValueError(f"term {self.loss_name!r} needs labels (the student's target tokens)")
        if step.teacher(self.teacher_index).logits is None:
            raise ValueError(f"term {self.loss_name!r} needs the teacher's logits on its own tokens (a live teacher)")
        device = step.student.logits.device
        alignment = step.batch["teacher_alignment"].to(device)
        s0, s1, t0, t1 = alignment.unbind(-1)
        valid = (s0 >= 1) & (t0 >= 1) & (s1 > s0) & (t1 > t0)
        kd = step.masks.get("kd")
        if kd is not None:
            # outside[b, j]: how many of the student's prediction positions < j are not targets
            outside = F.pad((~kd.to(device).bool()).long().cumsum(-1), (1, 0))
            lo = (s0 - 1).clamp(0, outside.shape[-1] - 1)
            hi = (s1 - 1).clamp(0, outside.shape[-1] - 1)
            valid &= (outside.gather(1, hi) - outside.gather(1, lo)) == 0
        rows, g = valid.nonzero(as_tuple=True)
        return rows, s0[rows, g], s1[rows, g], t0[rows, g], t1[rows, g]

    def aligned_logits(self, step: StepTensors):
        rows, s0, s1, t0, t1 = self.groups(step)
        teacher = step.teacher(self.teacher_index).logits
        s_rows = step.student.logits[rows, s0 - 1]
        t_dev = teacher.device
        t_rows = teacher[rows.to(t_dev), (t0 - 1).to(t_dev)]
        return s_rows, t_rows, (rows, s0, s1, t0, t1)


@register_term("uld")
class ULDTerm(CrossTokenizerTerm):
    """Universal Logit Distillation: sorted-probability L1 distance at aligned spans (any two vocabularies)."""

    def forward(self, step):
        s_rows, t_rows, (rows, s0, s1, t0, t1) = self.aligned_logits(step)
        if rows.numel() == 0:
            return step.student.logits.sum() * 0.0
        teacher = step.teacher(self.teacher_index).logits
        s_scale = _continuation_log_probs(step.student.logits, step.labels.to(rows.device), rows, s0, s1,
                                          self.temperature)
        with torch.no_grad():
            t_dev = teacher.device
            t_scale = _continuation_log_probs(teacher, step.batch["teacher_input_ids"].to(t_dev), rows.to(t_dev),
                                              t0.to(t_dev), t1.to(t_dev), self.temperature)
        return uld_loss(s_rows, t_rows, temperature=self.temperature, student_log_scale=s_scale,
                        teacher_log_scale=t_scale.to(s_scale.device), num_items=step.counts["kd"])


@register_term("span_kl")
class SpanKLTerm(CrossTokenizerTerm):
    """Forward KL over the shared tokens between the next-token distributions at aligned span starts."""

    options = ("temperature", "teacher_logits")
    shared: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.teacher_logits = str(self.config.get("teacher_logits", "full"))
        if self.teacher_logits not in ("full", "shared"):
            raise ValueError(f"term 'span_kl': teacher_logits must be full (the teacher's whole vocabulary) or shared "
                             f"(a teacher whose output layer covers only the shared tokens), got {self.teacher_logits!r}")

    def bind_tokenizers(self, student_tokenizer, teacher_tokenizer) -> None:
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError("term 'span_kl' compares the tokens both vocabularies contain, so it needs both "
                             "tokenizers: pass processing_class= (the student's) and teacher_processing_class= "
                             "to DistillationTrainer (or use uld, which needs neither)")
        from ..lm.cross_tokenizer import shared_vocabulary

        self.shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)

    def forward(self, step):
        if self.shared is None:
            raise ValueError("term 'span_kl' has no shared vocabulary yet: the trainer gives it the two tokenizers "
                             "(processing_class= and teacher_processing_class=)")
        s_rows, t_rows, (rows, *_) = self.aligned_logits(step)
        if rows.numel() == 0:
            return step.student.logits.sum() * 0.0
        s_ids, t_ids = self.shared
        if self.teacher_logits == "shared":  # hf_distill.lm.cross_tokenizer.output_layer_restricted_to(teacher, t_ids)
            if t_rows.shape[-1] != t_ids.numel():
                raise ValueError(f"term 'span_kl' has teacher_logits: shared, so the teacher's logits must cover the "
                                 f"{t_ids.numel()} shared tokens, but they have {t_rows.shape[-1]} entries; restrict its "
                                 "output layer with output_layer_restricted_to(teacher, shared teacher ids)")
            t_ids = torch.arange(t_ids.numel(), device=t_rows.device)
        return shared_vocabulary_kl_loss(s_rows, t_rows, s_ids, t_ids, temperature=self.temperature,
                                         num_items=step.counts["kd"])
