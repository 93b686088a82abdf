"""Lifelong distillation: Learning without Forgetting (LwF; Li & Hoiem, 2016).

A classifier learns tasks one after another, each with its own label set (its *head*), over a shared
backbone. When a new task comes, the old tasks' data is gone; only the new task's data is there. LwF keeps
the old tasks by distilling the model's previous self on the new task's inputs:

1. :func:`grow_classifier` adds the new task's rows to the output layer (a copy of the previous model; the
   old rows are kept as they are). The heads are recorded in the config (``task_heads``: one label list
   per task, in output order), so the grown model is a plain ``...ForSequenceClassification``
   that saves, loads and predicts as any other.
2. :func:`record_previous_outputs` runs the previous model once over the **new task's** training inputs and
   stores its logits (over the old heads) as the ``teacher_logits`` column: LwF's recorded responses
   ``Y_o``. The previous model is frozen, so its outputs on a fixed input never change during training;
   computing them once costs one forward pass per example instead of one per step and example, and the
   previous model need not stay in memory. The trainer reads them as a stored teacher
   (``teacher_source='stored'``).
3. :func:`learn_task` trains the grown model with :class:`~hf_distill.trainer.DistillationTrainer` on the
   objective ``head_ce`` (cross-entropy of each row within its own head: the new head here) +
   ``kd_weight`` x ``lwf_kd`` (soft-target KL at temperature T, x T^2, between the student's old-head
   logits and the recorded ones, one softmax per old head). With ``kd_weight=0`` it is plain fine-tuning
   of the shared backbone and the new head.

:func:`warm_up_new_head` is the paper's optional warm-up: the new head alone trains first, over the frozen
backbone, so that a random head does not send large gradients into the shared layers.

Evaluation is task-aware, as in the paper: a row of task k is predicted by the argmax over head k
(:func:`head_predictions`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import torch
from torch import nn

from .losses.response import kl_div_loss
from .losses.task import cross_entropy_loss
from .modeling import task_kind, unwrap
from .objectives import Term, register_term
from .objectives.base import finite_number

__all__ = [
    "LifelongError",
    "grow_classifier",
    "head_predictions",
    "head_slices",
    "learn_task",
    "lifelong_arguments",
    "record_previous_outputs",
    "task_heads",
    "warm_up_new_head",
    "with_heads",
]

HEADS_KEY = "task_heads"


class LifelongError(ValueError):
    """A lifelong-learning input that cannot work (overlapping label sets, no previous model, mixed data)."""


# ---------------------------------------------------------------------------------------------- heads
def task_heads(model) -> list[list[str]]:
    """The model's heads: one label list per task, in output order (one head of all labels when none are
    recorded)."""
    config = unwrap(model).config
    heads = getattr(config, HEADS_KEY, None)
    if heads:
        return [list(map(str, h)) for h in heads]
    return [[str(config.id2label[i]) for i in range(config.num_labels)]]


def head_slices(heads: list[list[str]]) -> list[slice]:
    """The output columns of each head."""
    out, start = [], 0
    for head in heads:
        out.append(slice(start, start + len(head)))
        start += len(head)
    return out


def with_heads(model, heads: list[list[str]]):
    """Record ``heads`` (one label list per task, in output order) in ``model``'s config; returns the model."""
    config = unwrap(model).config
    labels = [label for head in heads for label in head]
    if len(labels) != config.num_labels:
        raise LifelongError(f"the heads hold {len(labels)} labels but the model has {config.num_labels} outputs")
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    setattr(config, HEADS_KEY, [list(h) for h in heads])
    return model


def output_layer(model) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, Linear) of the classifier's output layer (the last Linear with one
    output per label)."""
    found = None
    for name, module in unwrap(model).named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.out_features == unwrap(model).config.num_labels:
                found = (module, child_name, child)
    if found is None:
        raise LifelongError(f"{type(unwrap(model)).__name__} has no Linear output layer with one output per label "
                            "to grow; use a ...ForSequenceClassification model")
    return found


def grow_classifier(previous_model, new_labels, *, seed: int = 0):
    """A copy of ``previous_model`` with a new head for ``new_labels``: the output layer grows by one row per
    new label (initialised like the model's own head, seeded); the old rows and the backbone are copied."""
    if previous_model is None:
        raise LifelongError("no previous model: LwF distils the model trained on the earlier tasks; pass it (the "
                            "first task is learnt by plain training)")
    if task_kind(previous_model) != "sequence_classification":
        raise LifelongError(f"the previous model must be a ...ForSequenceClassification model, got "
                            f"{type(unwrap(previous_model)).__name__}")
    new_labels = [str(label) for label in new_labels]
    if not new_labels:
        raise LifelongError("the new task has no labels")
    if len(set(new_labels)) != len(new_labels):
        raise LifelongError(f"the new task's labels repeat: {new_labels}")
    heads = task_heads(previous_model)
    overlap = sorted(set(new_labels) & {label for head in heads for label in head})
    if overlap:
        raise LifelongError(f"the new task's labels {overlap} are already in the previous model's heads {heads}; "
                            "each task needs its own label set (rename them, or train on the old task again)")
    model = copy.deepcopy(unwrap(previous_model))
    parent, name, old = output_layer(model)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    grown = nn.Linear(old.in_features, old.out_features + len(new_labels), bias=old.bias is not None,
                      dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        fresh = torch.randn(len(new_labels), old.in_features, generator=generator) * std
        grown.weight.copy_(torch.cat([old.weight, fresh.to(old.weight)]))
        if old.bias is not None:
            grown.bias.copy_(torch.cat([old.bias, old.bias.new_zeros(len(new_labels))]))
    setattr(parent, name, grown)
    model.config.num_labels = grown.out_features
    model.config.problem_type = "single_label_classification"
    return with_heads(model, heads + [new_labels])


def head_predictions(logits, labels, heads: list[list[str]]) -> np.ndarray:
    """Task-aware predictions: each row's argmax within the head its label belongs to (output ids)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    predictions = np.full(labels.shape, -1)
    for sl in head_slices(heads):
        rows = (labels >= sl.start) & (labels < sl.stop)
        predictions[rows] = logits[rows, sl].argmax(-1) + sl.start
    return predictions


# ---------------------------------------------------------------------------------------------- terms
@register_term("head_ce")
class HeadCrossEntropyTerm(Term):
    """Cross-entropy of each row within its own head (task-aware multi-head training): a row labelled in head k
    sees only head k's softmax. On the new task's data that is the cross-entropy on the new head."""

    count_key = "task"
    uses_teacher = False
    options = ()

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        self.slices = head_slices(task_heads(student))

    def forward(self, step):
        logits = step.student.logits
        if step.labels is None:
            return logits.sum() * 0.0
        total = logits.new_zeros((), dtype=torch.float32)
        for sl in self.slices:
            inside = (step.labels >= sl.start) & (step.labels < sl.stop)
            local = torch.where(inside, step.labels - sl.start, torch.full_like(step.labels, -100))
            total = total + cross_entropy_loss(logits[..., sl], local, num_items=step.counts["task"])
        return total


@register_term("lwf_kd")
class LwFDistillationTerm(Term):
    """LwF's old-task term: soft-target KL(p_prev || p_student) at temperature T, x T^2, on each old head (its own
    softmax), against the previous model's recorded logits over the old heads."""

    options = ("temperature",)

    def setup(self, student, teachers, args):
        super().setup(student, teachers, args)
        heads = task_heads(student)
        if len(heads) < 2 and self.weight > 0:
            raise LifelongError("lwf_kd distils the old heads, but the student has a single head; grow it with "
                                "grow_classifier for the new task first")
        self.slices = head_slices(heads[:-1])
        self.old_outputs = sum(len(h) for h in heads[:-1])
        self.temperature = finite_number(self.config.get("temperature", args.temperature),
                                         "term 'lwf_kd': temperature", minimum=0.0, strict=True)

    def forward(self, step):
        student, previous = step.student.logits, step.teacher(self.teacher_index).logits
        if previous is None or previous.shape[-1] != self.old_outputs:
            got = None if previous is None else previous.shape[-1]
            raise LifelongError(f"lwf_kd: the previous model's recorded logits have {got} columns but the old heads "
                                f"have {self.old_outputs} outputs; record them with record_previous_outputs(previous "
                                "model, new-task data)")
        previous = previous.to(student.device)
        return sum(kl_div_loss(student[..., sl], previous[..., sl], temperature=self.temperature,
                               mask=step.masks["kd"], num_items=step.counts["kd"]) for sl in self.slices)


# ---------------------------------------------------------------------------------------------- training
def record_previous_outputs(previous_model, new_task_dataset, data_collator, *, batch_size: int = 32):
    """``new_task_dataset`` with a ``teacher_logits`` column: the previous model's logits (its heads: the old
    ones) on each of its rows, computed once (LwF's recorded responses)."""
    from .teachers import cache_teacher_logits

    if previous_model is None:
        raise LifelongError("no previous model to record: pass the model trained on the earlier tasks")
    return cache_teacher_logits(previous_model, new_task_dataset, data_collator, batch_size=batch_size,
                                desc="previous model on the new task")


def lifelong_arguments(args, *, kd_weight: float, temperature: float | None = None):
    """``args`` (DistillationArguments) with the LwF objective: ``head_ce`` + ``kd_weight`` x ``lwf_kd``."""
    terms = [{"loss": "head_ce", "weight": 1.0}]
    if kd_weight > 0:
        terms.append({"loss": "lwf_kd", "weight": float(kd_weight),
                      "temperature": float(temperature if temperature is not None else args.temperature)})
    return dataclasses.replace(args, distillation=json.dumps(terms), task_weight=0.0, teacher_source="stored")


def check_new_task_rows(dataset, model) -> None:
    """Every row's label is in the model's newest head (LwF trains on the new task's data only)."""
    heads = task_heads(model)
    new = head_slices(heads)[-1]
    labels = np.asarray(dataset["labels"])
    old = labels[(labels < new.start) | (labels >= new.stop)]
    if old.size:
        names = sorted({unwrap(model).config.id2label.get(int(i), str(int(i))) for i in old})
        raise LifelongError(f"{old.size} rows of the new task's data carry labels {names} outside its head "
                            f"{heads[-1]}; LwF learns a new task from its own data only (old-task rows would be "
                            "rehearsal): drop them")


def warm_up_new_head(model, new_task_dataset, args, data_collator, *, steps: int, tokenizer=None):
    """LwF's warm-up: ``steps`` optimiser steps of cross-entropy on the new head with the backbone and the old heads
    frozen (only the output layer trains; its old rows get no gradient and no weight decay, so they stay as they
    are). A new head that starts random then sends no large gradients into the shared backbone. Returns ``model``."""
    from .trainer import DistillationTrainer

    if len(task_heads(model)) < 2:
        raise LifelongError("warm_up_new_head trains the newest head of a grown model; grow it first (grow_classifier)")
    check_new_task_rows(new_task_dataset, model)
    _, _, layer = output_layer(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in layer.parameters():
            p.requires_grad_(True)
        warm = dataclasses.replace(args, max_steps=int(steps), weight_decay=0.0,
                                   output_dir=os.path.join(args.output_dir, "new_head_warmup"))
        DistillationTrainer(model=model, args=lifelong_arguments(warm, kd_weight=0.0), train_dataset=new_task_dataset,
                            data_collator=data_collator, processing_class=tokenizer).train()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return model


def learn_task(previous_model, new_task_dataset, args, data_collator, *, new_labels=None, model=None,
               kd_weight: float = 1.0, temperature: float | None = None, tokenizer=None, seed: int = 0):
    """Learn a new task from ``new_task_dataset`` alone (its ``labels`` are output ids of the grown model).

    ``model``: the grown student (default: ``grow_classifier(previous_model, new_labels)``). ``kd_weight`` > 0:
    LwF (the previous model's outputs on these rows are recorded first); 0: plain fine-tuning. Returns
    ``(model, trainer)``."""
    from .trainer import DistillationTrainer

    if previous_model is None:
        raise LifelongError("no previous model: LwF distils the model trained on the earlier tasks; pass it")
    if model is None:
        if new_labels is None:
            raise LifelongError("give new_labels (the new task's label names) or a grown model")
        model = grow_classifier(previous_model, new_labels, seed=seed)
    elif len(task_heads(model)) != len(task_heads(previous_model)) + 1:
        raise LifelongError(f"the model has heads {task_heads(model)}: it must be the previous model "
                            f"({task_heads(previous_model)}) grown by one head (grow_classifier)")
    check_new_task_rows(new_task_dataset, model)
    train = new_task_dataset
    if kd_weight > 0:
        train = record_previous_outputs(previous_model, new_task_dataset, data_collator,
                                        batch_size=args.per_device_eval_batch_size)
    trainer = DistillationTrainer(model=model, args=lifelong_arguments(args, kd_weight=kd_weight,
                                                                       temperature=temperature),
                                  train_dataset=train, data_collator=data_collator, processing_class=tokenizer)
    trainer.train()
    return model, trainer
