"""Stored teacher outputs: the teacher ran once ahead of time; training reads its outputs from the batch.

Batch columns: ``teacher_logits`` (full logits, e.g. a classifier's), or ``teacher_topk_logprobs`` (or
``teacher_topk_probs``) + ``teacher_topk_indices`` (+ ``teacher_tail_mass``): the teacher's top-k at the
distillation temperature. No teacher is in memory.

With ``store=`` (a folder written by ``hf-distill cache-teacher``) the source checks the store against the
run before the first step and refuses, with the reasons, a store made with another tokenizer, for another
kind of head or output size, at another temperature than a term distils at, or from other data; a training
(and evaluation, with ``eval_store=``) dataset without the teacher's columns is joined to the store, and the
trainer's collator is wrapped to pad them (:class:`hf_distill.store.StoreCollator`).
"""

from __future__ import annotations

import os

import torch

from ..objectives import ModelTensors
from .base import TeacherSource

STORED_COLUMNS = ("teacher_logits", "teacher_topk_logprobs", "teacher_topk_probs", "teacher_topk_indices",
                  "teacher_tail_mass")
#: terms that read a teacher stored as top-k + tail (the others need full logits)
TOPK_TERMS = ("kl", "topk_kl")


def stored_tensors(batch: dict) -> ModelTensors | None:
    """The teacher tensors a batch carries, or None when it carries none (stored probabilities are turned into
    log-probabilities, float32)."""
    if batch.get("teacher_topk_logprobs") is None and torch.is_tensor(batch.get("teacher_topk_probs")):
        batch = dict(batch)
        batch["teacher_topk_logprobs"] = torch.log(batch.pop("teacher_topk_probs").float())
    return ModelTensors.from_stored(batch)


def _has_teacher_columns(dataset) -> bool:
    names = getattr(dataset, "column_names", None) or []
    return any(isinstance(n, str) and n in STORED_COLUMNS for n in names)


class StoredTeacher(TeacherSource):
    """Teacher outputs stored in the dataset (``hf-distill cache-teacher``, speech soft labels).

    ``store`` / ``eval_store``: the stores of the training and evaluation data, checked against the run and
    joined to datasets that do not carry the teacher's columns yet.
    """

    kind = "stored"
    provides = frozenset({"logits"})

    def __init__(self, store: str | os.PathLike | None = None, eval_store: str | os.PathLike | None = None):
        self.store = os.fspath(store) if store is not None else None
        self.eval_store = os.fspath(eval_store) if eval_store is not None else None
        self.manifests: dict[str, dict] = {}
        if self.store is None and self.eval_store is not None:
            raise ValueError("eval_store needs store (the training data's teacher store) too")
        from ..store import check_complete

        for path in filter(None, (self.store, self.eval_store)):
            self.manifests[path] = check_complete(path)

    def _check_terms(self, trainer, manifest: dict, where: str) -> None:
        from ..store import check_store_fits

        for term in trainer.objective.active_terms:
            reads_teacher = term.uses_teacher and "logits" in term.needs
            if reads_teacher and term.loss_name not in TOPK_TERMS:
                raise ValueError(f"term {term.loss_name!r} needs the teacher's full logits, but {where} holds its top-"
                                 f"{manifest['config']['k']} and tail mass; use the kl term, or a live teacher")
            if reads_teacher or term.loss_name in TOPK_TERMS:
                check_store_fits(manifest, temperature=getattr(term, "temperature", None),
                                 where=f"{where} (term {term.loss_name!r})")

    def bind(self, trainer) -> None:
        if not trainer.objective.teacher_needs and not any(t.loss_name in TOPK_TERMS
                                                          for t in trainer.objective.active_terms):
            return
        if self.store is None:
            data = trainer.train_dataset
            if data is not None and getattr(data, "column_names", None) is not None and not _has_teacher_columns(data):
                raise ValueError("teacher_source='stored' without a store: the training dataset carries no teacher "
                                 f"outputs (columns {data.column_names}); cache them with hf-distill cache-teacher and "
                                 "pass the store (StoredTeacher(store=...)), or give a live teacher")
            return
        from ..modeling import output_size
        from ..store import StoreCollator, check_store_fits, join_store

        tokenizer = trainer.processing_class
        for path, manifest in self.manifests.items():
            where = f"the teacher store {path}"
            check_store_fits(manifest, tokenizer=tokenizer, task=trainer.task, vocab_size=output_size(trainer.model),
                             where=where)
            self._check_terms(trainer, manifest, where)
        if trainer.train_dataset is not None and not _has_teacher_columns(trainer.train_dataset):
            trainer.train_dataset = join_store(trainer.train_dataset, self.store, tokenizer=tokenizer)
        evaluation = trainer.eval_dataset
        if evaluation is not None and not isinstance(evaluation, dict) and not _has_teacher_columns(evaluation):
            if self.eval_store is None:
                raise ValueError("the evaluation dataset carries no teacher outputs and no eval_store was given; cache "
                                 "the evaluation split too and pass StoredTeacher(store=..., eval_store=...)")
            trainer.eval_dataset = join_store(evaluation, self.eval_store, tokenizer=tokenizer)
        if not isinstance(trainer.data_collator, StoreCollator):
            trainer.data_collator = StoreCollator(trainer.data_collator,
                                                  positions=self.manifests[self.store]["config"]["positions"])

    def teacher_tensors(self, trainer, model_inputs, batch, student=None):
        if not trainer.objective.teacher_needs:
            return []
        stored = stored_tensors(batch)
        if stored is None:
            raise ValueError("no teacher was given and the batch carries no stored teacher outputs (teacher_logits or "
                             "teacher_topk_logprobs / teacher_topk_indices columns); pass teacher=... or cache the "
                             "teacher's outputs with hf-distill cache-teacher and pass StoredTeacher(store=...)")
        return [stored]

    def describe(self) -> dict:
        out: dict = {"kind": self.kind}
        for key, path in (("store", self.store), ("eval_store", self.eval_store)):
            if path is not None:
                manifest = self.manifests[path]
                # the store's identity is its content's configuration, not where it lies
                out[key] = {"config_hash": manifest["config_hash"], "k": manifest["config"]["k"],
                            "temperature": manifest["config"]["temperature"]}
        return out
