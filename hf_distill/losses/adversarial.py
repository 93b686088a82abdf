"""Adversarial distillation: a discriminator's scores of teacher ("real") and student ("fake") outputs.

The discriminator ``D`` gives one raw score (a logit) per item: a position's logits or hidden
state, or a sample's pooled hidden state. Two GAN objectives are offered (``gan_loss``):

* ``nonsaturating`` (Goodfellow et al. 2014, the generator's "-log D" form), with ``s = D(x)``:

      discriminator:  softplus(-s_teacher) + softplus(s_student)   (= -log sigma(s_t) - log(1 - sigma(s_s)))
      student:        softplus(-s_student)                          (= -log sigma(s_s))

* ``least_squares`` (LSGAN, Mao et al. 2017, targets 1 for the teacher and 0 for the student):

      discriminator:  ((s_teacher - 1)^2 + s_student^2) / 2
      student:        (s_student - 1)^2 / 2

Every loss is a sum over the selected items divided by ``num_items`` (the convention of
:mod:`hf_distill.losses`): the discriminator's loss counts each item once for its teacher score
and once for its student score, so a perfect guess of ``0`` (``sigma = 1/2``) gives ``2 log 2``
(non-saturating) or ``1/4`` (least squares) per item. :func:`discriminator_accuracy` counts the
correct calls (teacher score above the threshold, student score below: ``0`` for the
non-saturating loss, ``1/2`` for least squares), out of ``2 * num_items``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_mask, normalise, upcast

GAN_LOSSES = ("nonsaturating", "least_squares")

__all__ = ["GAN_LOSSES", "discriminator_accuracy", "discriminator_loss", "generator_loss"]


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"gan_loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def _select(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = upcast(scores)
    if scores.dim() and scores.shape[-1] == 1:
        scores = scores.squeeze(-1)
    mask = check_mask(mask, scores.shape, "the discriminator's scores")
    return scores if mask is None else scores[mask]


def generator_loss(student_scores: torch.Tensor, *, kind: str = "nonsaturating", mask: torch.Tensor | None = None,
                   num_items=None) -> torch.Tensor:
    """The student's loss: its outputs should be scored as the teacher's (see the module doc)."""
    _check(kind)
    s = _select(student_scores, mask)
    per_item = F.softplus(-s) if kind == "nonsaturating" else 0.5 * (s - 1.0).square()
    return normalise(per_item.sum(), torch.tensor(s.numel(), device=s.device), num_items)


def discriminator_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor, *, kind: str = "nonsaturating",
                       mask: torch.Tensor | None = None, num_items=None) -> torch.Tensor:
    """The discriminator's loss: teacher items scored as real, student items as fake (see the module doc)."""
    _check(kind)
    t, s = _select(teacher_scores, mask), _select(student_scores, mask)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student scores differ in shape: {tuple(t.shape)} vs {tuple(s.shape)}")
    if kind == "nonsaturating":
        per_item = F.softplus(-t) + F.softplus(s)
    else:
        per_item = 0.5 * ((t - 1.0).square() + s.square())
    return normalise(per_item.sum(), torch.tensor(t.numel(), device=t.device), num_items)


def discriminator_accuracy(teacher_scores: torch.Tensor, student_scores: torch.Tensor, *,
                           kind: str = "nonsaturating", mask: torch.Tensor | None = None,
                           num_items=None) -> torch.Tensor:
    """Fraction of correct calls out of ``2 * num_items`` (each item's teacher and student output)."""
    _check(kind)
    t, s = _select(teacher_scores, mask), _select(student_scores, mask)
    threshold = 0.0 if kind == "nonsaturating" else 0.5
    correct = (t > threshold).sum() + (s < threshold).sum()
    count = torch.tensor(t.numel(), device=t.device)
    return normalise(correct.to(t.dtype), count, num_items) / 2
