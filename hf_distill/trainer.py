"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a weighted sum of distillation terms.

Per step it gathers the teacher's tensors (a live frozen teacher, or teacher logits cached in the
batch), runs the student, and combines the terms of :mod:`hf_distill.losses`:

* ``loss_kd``: soft-target KL at temperature T (x T^2), DistilBERT's ``alpha_ce`` term;
* the task loss on hard labels, logged as ``loss_mlm`` / ``loss_clm`` / ``loss_ce``;
* ``loss_cos``: 1 - cosine between aligned hidden states;
* ``loss_mse`` (logits) and ``loss_hidden_mse`` (hidden states) when their weights are > 0.

Normalisation is owned here, not by the model: each term is a sum over valid positions divided by
the number of valid positions in the whole optimiser step (every gradient-accumulation micro-batch
on every process). Batch 16, batch 8 x accumulation 2 and 2 processes x batch 8 therefore give
the same loss and the same gradients.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, Trainer

from . import losses
from .arguments import DistillationArguments
from .teachers import (
    check_same_vocabulary,
    forward_parameters,
    hidden_size,
    load_teacher,
    num_hidden_states,
    output_size,
    place_teacher,
    task_kind,
    unwrap,
)

TASK_LOSS_NAMES = {"masked_lm": "loss_mlm", "causal_lm": "loss_clm"}
# Columns that carry teacher outputs computed ahead of time; the Trainer must not drop them.
CACHED_TEACHER_COLUMNS = ("teacher_logits",)


class DistillationTrainer(Trainer):
    """Distil ``teacher`` into ``model`` (the student). All other arguments are ``Trainer``'s.

    Args:
        model: the student.
        teacher: a model or a path / Hub id; defaults to ``args.teacher_name_or_path``. May be None
            when every batch carries cached ``teacher_logits`` (response terms only).
        args: :class:`DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer; when given with ``processing_class``
            the two vocabularies must be identical, token for token.
    """

    # compute_loss normalises by the global item count of the optimiser step itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationArguments | None = None, teacher=None,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            args = DistillationArguments(output_dir="distillation_output")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"DistillationTrainer needs DistillationArguments (temperature, loss weights, ...), got "
                f"{type(args).__name__}; build it as DistillationArguments(**your_training_arguments.to_dict()) "
                "or parse it with HfArgumentParser(DistillationArguments)"
            )
        if model is None:
            raise ValueError("DistillationTrainer needs a student model (model=...)")
        self.task = task_kind(model)
        teacher = teacher if teacher is not None else args.teacher_name_or_path
        if isinstance(teacher, (str, Path)):
            teacher = load_teacher(teacher, task=self.task, dtype=args.teacher_dtype)
        self._validate(model, teacher, args, kwargs.get("processing_class"), teacher_processing_class)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = place_teacher(teacher, self.accelerator.device, args.teacher_dtype) if teacher is not None else None
        self._student_inputs = forward_parameters(model)
        self._teacher_inputs = forward_parameters(teacher) if teacher is not None else None
        self._step_counts: dict[str, torch.Tensor] | None = None
        self._train_terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._terms_logged_at_step = 0
        self._eval_terms: dict[str, float] = defaultdict(float)
        self._eval_weight = 0

    # ------------------------------------------------------------------ validation
    @property
    def needs_hidden_states(self) -> bool:
        return self.args.cos_weight > 0 or self.args.hidden_mse_weight > 0

    def _validate(self, student, teacher, args, student_tok, teacher_tok) -> None:
        need_hidden = args.cos_weight > 0 or args.hidden_mse_weight > 0
        if teacher is None:
            if need_hidden:
                raise ValueError(
                    "cos_weight/hidden_mse_weight > 0 need a live teacher's hidden states, but no teacher was given; "
                    "pass teacher=... (or --teacher_name_or_path), or set --cos_weight 0 --hidden_mse_weight 0 "
                    "to train on cached teacher logits"
                )
            return
        s_kind, t_kind = task_kind(student), task_kind(teacher)
        if s_kind != t_kind and "base" not in (s_kind, t_kind):
            raise ValueError(
                f"student is a {s_kind} model but the teacher is a {t_kind} model; their logits do not align. "
                f"Load the teacher with the same kind of head (e.g. AutoModelFor{s_kind.title().replace('_', '')})"
            )
        s_out, t_out = output_size(student), output_size(teacher)
        if (args.kd_weight > 0 or args.mse_weight > 0) and s_out != t_out:
            what = "labels" if "classification" in s_kind else "vocabulary entries"
            raise ValueError(
                f"student logits range over {s_out} {what} but the teacher's over {t_out}; soft targets need the same "
                "output space. Build the student from the teacher (hf-distill init-student) or with the teacher's "
                "tokenizer / label set"
            )
        if "classification" in s_kind:
            s_labels = getattr(unwrap(student).config, "id2label", None)
            t_labels = getattr(unwrap(teacher).config, "id2label", None)
            generic = lambda m: all(str(v) == f"LABEL_{k}" for k, v in (m or {}).items())  # noqa: E731
            if s_labels and t_labels and not generic(s_labels) and not generic(t_labels) and \
                    {int(k): v for k, v in s_labels.items()} != {int(k): v for k, v in t_labels.items()}:
                raise ValueError(
                    f"student labels {dict(s_labels)} and teacher labels {dict(t_labels)} are in a different order; "
                    "set the student's id2label/label2id to the teacher's"
                )
        check_same_vocabulary(student_tok, teacher_tok)
        if need_hidden:
            hs, ht = hidden_size(student), hidden_size(teacher)
            if hs != ht:
                raise ValueError(
                    f"the cosine / hidden-MSE terms compare hidden states, but the student's width is {hs} and the "
                    f"teacher's {ht}; set --cos_weight 0 --hidden_mse_weight 0, or use a hidden-state objective with "
                    "a learned projection"
                )
            ns, nt = num_hidden_states(student), num_hidden_states(teacher)
            for s, t in args.layer_pairs:
                if ns is not None and not -ns <= s < ns:
                    raise ValueError(f"hidden_layer_map student index {s} is out of range: the student has {ns} "
                                     f"hidden states (0 = embeddings .. {ns - 1}, or -1 for the last)")
                if nt is not None and not -nt <= t < nt:
                    raise ValueError(f"hidden_layer_map teacher index {t} is out of range: the teacher has {nt} "
                                     f"hidden states (0 = embeddings .. {nt - 1}, or -1 for the last)")

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += [c for c in CACHED_TEACHER_COLUMNS if c not in self._signature_columns]

    # ------------------------------------------------------------------ counting
    def _masks(self, inputs: dict, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Boolean masks over positions for each family of terms (None: every row counts)."""
        attention = inputs.get("attention_mask")
        if attention is None and "input_ids" in inputs:
            attention = torch.ones_like(inputs["input_ids"])
        if self.task in ("sequence_classification",):
            return {"kd": None, "hidden": attention.bool() if attention is not None else None}
        if self.task == "causal_lm":
            if labels is not None:
                kd = labels[..., 1:] != losses.IGNORE_INDEX
            else:
                kd = attention[..., 1:].bool()
            return {"kd": kd, "hidden": attention.bool() if attention is not None else None}
        if self.task == "seq2seq_lm":
            kd = labels != losses.IGNORE_INDEX if labels is not None else inputs.get("decoder_attention_mask")
            return {"kd": kd, "hidden": attention.bool() if attention is not None else None}
        if self.args.restrict_kd_to_mask and labels is not None:
            kd = labels != losses.IGNORE_INDEX
        else:
            kd = attention.bool() if attention is not None else None
        return {"kd": kd, "hidden": attention.bool() if attention is not None else None}

    def _item_counts(self, inputs: dict) -> dict[str, torch.Tensor]:
        labels = inputs.get("labels")
        masks = self._masks(inputs, labels)
        batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
        counts = {}
        for key, mask in masks.items():
            counts[key] = mask.sum() if mask is not None else torch.tensor(batch)
        if labels is not None:
            task_labels = labels[..., 1:] if self.task == "causal_lm" else labels
            counts["task"] = (task_labels != losses.IGNORE_INDEX).sum()
        else:
            counts["task"] = torch.tensor(0)
        return {k: v.to(self.args.device, torch.float32) for k, v in counts.items()}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals: dict[str, torch.Tensor] = {}
        for batch in batch_samples:
            for key, value in self._item_counts(batch).items():
                totals[key] = totals.get(key, 0) + value
        if totals and self.accelerator.num_processes > 1:
            keys = sorted(totals)
            stacked = self.accelerator.reduce(torch.stack([totals[k] for k in keys]).to(device), reduction="sum")
            totals = dict(zip(keys, stacked))
        self._step_counts = totals or None
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def _teacher_forward(self, inputs: dict):
        teacher_inputs = {k: v for k, v in inputs.items() if self._teacher_inputs is None or k in self._teacher_inputs}
        with torch.no_grad(), self.accelerator.autocast():
            if self.needs_hidden_states:
                teacher_inputs["output_hidden_states"] = True
            return self.teacher(**teacher_inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        cached_logits = inputs.pop("teacher_logits", None)
        model_inputs = {k: v for k, v in inputs.items() if self._student_inputs is None or k in self._student_inputs}
        if self.needs_hidden_states:
            model_inputs["output_hidden_states"] = True
        student_out = model(**model_inputs)

        if cached_logits is not None:
            teacher_logits, teacher_hidden = cached_logits, None
        elif self.teacher is not None:
            teacher_out = self._teacher_forward(model_inputs)
            teacher_logits = teacher_out.logits
            teacher_hidden = getattr(teacher_out, "hidden_states", None)
        else:
            raise ValueError("no teacher was given and the batch carries no 'teacher_logits' column")

        # Global counts in training (exact under accumulation / several processes), local in evaluation.
        use_global = model.training and self._step_counts is not None
        counts = self._step_counts if use_global else self._item_counts({**inputs, "labels": labels}
                                                                         if labels is not None else inputs)
        scale = self.accelerator.num_processes if use_global else 1  # DDP averages gradients over processes
        masks = self._masks(inputs, labels)
        terms = self._loss_terms(student_out, teacher_logits, teacher_hidden, labels, masks, counts)

        weights = {"loss_kd": self.args.kd_weight, "loss_cos": self.args.cos_weight, "loss_mse": self.args.mse_weight,
                   "loss_hidden_mse": self.args.hidden_mse_weight}
        loss = None
        for name, value in terms.items():
            weight = weights.get(name, self.args.task_weight)
            loss = weight * value if loss is None else loss + weight * value
        loss = loss * scale
        self._record_terms(terms, scale, model.training, inputs)
        if return_outputs:
            return loss, {"loss": loss, "logits": student_out.logits}
        return loss

    def _loss_terms(self, student_out, teacher_logits, teacher_hidden, labels, masks, counts) -> dict[str, torch.Tensor]:
        args = self.args
        s_logits = student_out.logits
        t_logits = teacher_logits.to(s_logits.device)
        if self.task == "causal_lm":
            s_logits, t_logits = s_logits[..., :-1, :], t_logits[..., :-1, :]
        terms = {}
        if args.kd_weight > 0:
            terms["loss_kd"] = losses.kl_div_loss(s_logits, t_logits, temperature=args.temperature,
                                                  mask=masks["kd"], num_items=counts["kd"])
        if args.task_weight > 0 and labels is not None:
            task_labels = labels[..., 1:] if self.task == "causal_lm" else labels
            name = TASK_LOSS_NAMES.get(self.task, "loss_ce")
            terms[name] = losses.cross_entropy_loss(s_logits, task_labels, num_items=counts["task"])
        if args.mse_weight > 0:
            terms["loss_mse"] = losses.logit_mse_loss(s_logits, t_logits, mask=masks["kd"], num_items=counts["kd"])
        if self.needs_hidden_states:
            s_hidden = student_out.hidden_states
            n_pairs = len(args.layer_pairs)
            cos, mse = 0.0, 0.0
            for s_idx, t_idx in args.layer_pairs:
                hs, ht = s_hidden[s_idx], teacher_hidden[t_idx].to(s_hidden[s_idx].device)
                if args.cos_weight > 0:
                    cos = cos + losses.cosine_loss(hs, ht, mask=masks["hidden"], num_items=counts["hidden"]) / n_pairs
                if args.hidden_mse_weight > 0:
                    mse = mse + losses.hidden_mse_loss(hs, ht, mask=masks["hidden"], num_items=counts["hidden"]) / n_pairs
            if args.cos_weight > 0:
                terms["loss_cos"] = cos
            if args.hidden_mse_weight > 0:
                terms["loss_hidden_mse"] = mse
        return terms

    # ------------------------------------------------------------------ logging
    def _record_terms(self, terms, scale, training, inputs):
        if training:
            for name, value in terms.items():
                self._train_terms[name] = self._train_terms[name] + value.detach().float() * scale
        else:
            batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
            for name, value in terms.items():
                self._eval_terms[name] += float(value.detach()) * batch
            self._eval_weight += batch

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._train_terms:
            steps = max(self.state.global_step - self._terms_logged_at_step, 1)
            for name in sorted(self._train_terms):
                value = self._train_terms[name]
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.gather(value.reshape(1)).mean()
                logs[name] = round(float(value) / steps, 6)
            self._train_terms.clear()
            self._terms_logged_at_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_terms = defaultdict(float)
        self._eval_weight = 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self._eval_weight:
            names = sorted(self._eval_terms)
            sums = torch.tensor([self._eval_terms[n] for n in names] + [float(self._eval_weight)],
                                device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            for i, name in enumerate(names):
                output.metrics[f"{metric_key_prefix}_{name}"] = float(sums[i] / sums[-1])
        return output
