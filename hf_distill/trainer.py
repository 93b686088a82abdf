"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a weighted sum of distillation terms.

Per step it gathers the teacher's tensors (a live frozen teacher, or teacher logits cached in the
batch), runs the student, and combines the terms of :mod:`hf_distill.losses`:

* ``loss_kd``: soft-target KL at temperature T (x T^2), DistilBERT's ``alpha_ce`` term;
* the task loss on hard labels, logged as ``loss_mlm`` / ``loss_clm`` / ``loss_ce``;
* ``loss_cos``: 1 - cosine between aligned hidden states;
* ``loss_mse`` (logits) and ``loss_hidden_mse`` (hidden states) when their weights are > 0;
* or any list of terms from :mod:`hf_distill.objectives` (``args.distillation``).

Hidden states, attention maps and Q/K/V projections are collected only when a term needs them.

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

from transformers import TrainerCallback

from . import losses
from .arguments import DistillationArguments
from .checkpoints import DistillationCheckpointMixin
from .objectives import ModelTensors, StepTensors, build_objective
from .qkv import QKVRecorder
from .teachers import (
    check_same_vocabulary,
    forward_parameters,
    load_teacher,
    output_size,
    place_teacher,
    task_kind,
    unwrap,
)

# Columns that carry teacher outputs computed ahead of time; the Trainer must not drop them.
CACHED_TEACHER_COLUMNS = ("teacher_logits",)


class _SyncObjectiveGradients(TrainerCallback):
    """Average the objective's own gradients (projections) over processes, as DDP does for the student."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.accelerator.num_processes > 1:
            for p in trainer.objective.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= trainer.accelerator.num_processes


class DistillationTrainer(DistillationCheckpointMixin, Trainer):
    """Distil ``teacher`` into ``model`` (the student). All other arguments are ``Trainer``'s.

    Args:
        model: the student.
        teacher: a model or a path / Hub id, or a list of them (multi-teacher); defaults to
            ``args.teacher_name_or_path`` (comma-separated for several). May be None when every
            batch carries cached ``teacher_logits`` (response terms only).
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
        teachers = self._resolve_teachers(teacher, args)
        for t in teachers:
            self._validate_pair(model, t, args, kwargs.get("processing_class"), teacher_processing_class)
        weights = args.teacher_weight_list or [1.0 / max(len(teachers), 1)] * max(len(teachers), 1)
        if teachers and len(weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(weights)} entries but there are {len(teachers)} teachers")
        self.teacher_weights = weights
        # The objective validates layer maps, widths and head counts now, before any step.
        self.objective = build_objective(args, model, teachers, multi_teacher=args.multi_teacher)
        needs = self.objective.needs
        if not teachers and needs - {"logits"}:
            raise ValueError(f"the configured terms need a live teacher's {sorted(needs - {'logits'})}, but no "
                             "teacher was given; pass teacher=... or drop those terms to train on cached logits")
        if "attentions" in needs:
            for m in [model, *teachers]:
                unwrap(m).set_attn_implementation("eager")  # fused kernels return no attention maps
        super().__init__(model=model, args=args, **kwargs)
        # transformers releases without `loss_is_scaled_for_ga` divide every training loss by the number
        # of accumulation steps themselves; we normalise by the global item count already, so undo it.
        self._undo_ga_division = not hasattr(Trainer, "loss_is_scaled_for_ga")
        if self._undo_ga_division:
            self.model_accepts_loss_kwargs = False  # makes that division unconditional, hence exactly undone
        device = self.accelerator.device
        self.teachers = [place_teacher(t, device, args.teacher_dtype) for t in teachers]
        self.objective.to(device)
        s_layers, t_layers = self.objective.qkv_layers()
        self._student_qkv = QKVRecorder(model, s_layers) if s_layers else None
        self._teacher_qkv = [QKVRecorder(t, t_layers) for t in self.teachers] if t_layers else None
        self._student_inputs = forward_parameters(model)
        self._teacher_inputs = [forward_parameters(t) for t in self.teachers]
        self._step_counts: dict[str, torch.Tensor] | None = None
        self._train_terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._optimizer_steps_since_log = 0  # one get_batch_samples call per optimiser step
        self._eval_terms: dict[str, float] = defaultdict(float)
        self._eval_weight = 0
        if any(True for _ in self.objective.parameters()):
            self.add_callback(_SyncObjectiveGradients(self))

    @property
    def teacher(self):
        """The (first) teacher."""
        return self.teachers[0] if self.teachers else None

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _resolve_teachers(teacher, args) -> list:
        if teacher is None and args.teacher_name_or_path:
            teacher = [t.strip() for t in str(args.teacher_name_or_path).split(",") if t.strip()]
        if teacher is None:
            return []
        items = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        return items

    def _validate_pair(self, student, teacher, args, student_tok, teacher_tok) -> None:
        s_kind, t_kind = task_kind(student), task_kind(teacher)
        if s_kind != t_kind and "base" not in (s_kind, t_kind):
            raise ValueError(
                f"student is a {s_kind} model but the teacher is a {t_kind} model; their logits do not align. "
                f"Load the teacher with the same kind of head (e.g. AutoModelFor{s_kind.title().replace('_', '')})"
            )
        s_out, t_out = output_size(student), output_size(teacher)
        if s_out != t_out:
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

    def _resolve_teachers_loaded(self):  # pragma: no cover - kept for subclass compatibility
        return self.teachers

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            cached = list(CACHED_TEACHER_COLUMNS)
            for ds in (self.train_dataset, self.eval_dataset):  # stored soft labels: teacher_topk_*, ...
                for name in getattr(ds, "column_names", None) or []:
                    if isinstance(name, str) and name.startswith("teacher_"):
                        cached.append(name)
            self._signature_columns += [c for c in dict.fromkeys(cached) if c not in self._signature_columns]

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        if params and not any(p is q for g in optimizer.param_groups for q in g["params"] for p in params[:1]):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def _masks(self, inputs: dict, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Boolean masks over positions for each family of terms (None: every row counts)."""
        attention = inputs.get("attention_mask")
        if attention is None and "input_ids" in inputs:
            attention = torch.ones_like(inputs["input_ids"])
        if self.task in ("sequence_classification",):
            return {"kd": None, "hidden": attention.bool() if attention is not None else None}
        if self.task == "ctc":
            frames = self._frame_mask(inputs)
            return {"kd": frames, "hidden": frames}
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

    def _frame_mask(self, inputs: dict) -> torch.Tensor:
        """CTC models: which output frames come from real (unpadded) audio, shape (batch, frames)."""
        model = unwrap(self.model)
        values = inputs.get("input_values", inputs.get("input_features"))
        total = int(model._get_feat_extract_output_lengths(torch.tensor(values.shape[-1])))
        attention = inputs.get("attention_mask")
        lengths = (model._get_feat_extract_output_lengths(attention.sum(-1)) if attention is not None
                   else torch.full((values.shape[0],), total, device=values.device))
        return torch.arange(total, device=values.device)[None, :] < lengths.to(values.device)[:, None]

    def _item_counts(self, inputs: dict) -> dict[str, torch.Tensor]:
        labels = inputs.get("labels")
        masks = self._masks(inputs, labels)
        batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
        counts = {"samples": torch.tensor(batch)}
        for key, mask in masks.items():
            counts[key] = mask.sum() if mask is not None else torch.tensor(batch)
        if labels is not None and self.task == "ctc":
            counts["task"] = torch.tensor(batch)  # CTC: one sequence loss per sample
        elif labels is not None:
            task_labels = labels[..., 1:] if self.task == "causal_lm" else labels
            counts["task"] = (task_labels != losses.IGNORE_INDEX).sum()
        else:
            counts["task"] = torch.tensor(0)
        return {k: v.to(self.args.device, torch.float32) for k, v in counts.items()}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._optimizer_steps_since_log += 1
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
    def _flags(self) -> dict:
        needs = self.objective.needs
        flags = {}
        if "hidden_states" in needs:
            flags["output_hidden_states"] = True
        if "attentions" in needs:
            flags["output_attentions"] = True
        return flags

    @staticmethod
    def _tensors(out, qkv=None) -> ModelTensors:
        return ModelTensors(logits=getattr(out, "logits", None), hidden_states=getattr(out, "hidden_states", None),
                            attentions=getattr(out, "attentions", None), qkv=qkv or {})

    def _teacher_forward(self, index: int, inputs: dict) -> ModelTensors:
        accepted = self._teacher_inputs[index]
        teacher_inputs = {k: v for k, v in inputs.items() if accepted is None or k in accepted}
        recorder = self._teacher_qkv[index] if self._teacher_qkv else None
        with torch.no_grad(), self.accelerator.autocast():
            if recorder is not None:
                with recorder:
                    out = self.teachers[index](**teacher_inputs, **self._flags())
                return self._tensors(out, recorder.take())
            return self._tensors(self.teachers[index](**teacher_inputs, **self._flags()))

    def _decoder_inputs_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing for encoder-decoders: labels shifted right behind the decoder start token."""
        config = unwrap(self.model).config
        start = config.decoder_start_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        shifted = labels.new_full(labels.shape, pad)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == losses.IGNORE_INDEX, pad)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        cached_logits = inputs.pop("teacher_logits", None)
        extra = {k: inputs.pop(k) for k in list(inputs) if k.startswith("teacher_")}
        model_inputs = {k: v for k, v in inputs.items() if self._student_inputs is None or k in self._student_inputs}
        if self.task == "seq2seq_lm" and labels is not None and "decoder_input_ids" not in model_inputs:
            model_inputs["decoder_input_ids"] = self._decoder_inputs_from_labels(labels)
        if self._student_qkv is not None:
            with self._student_qkv:
                student_out = model(**model_inputs, **self._flags())
            student = self._tensors(student_out, self._student_qkv.take())
        else:
            student_out = model(**model_inputs, **self._flags())
            student = self._tensors(student_out)

        if cached_logits is not None and not (self.teachers and self.objective.needs - {"logits"}):
            teachers = [ModelTensors(logits=cached_logits)]
        elif self.teachers:  # a live teacher (also when terms need its hidden states next to cached logits)
            teachers = [self._teacher_forward(i, model_inputs) for i in range(len(self.teachers))]
        else:
            teachers = []
            if any(t.loss_name != "task" and t.loss_name != "topk_kl" and t.weight > 0 for t in self.objective.terms):
                raise ValueError("no teacher was given and the batch carries no 'teacher_logits' column")

        # Global counts in training (exact under accumulation / several processes), local in evaluation.
        use_global = model.training and self._step_counts is not None
        counts = self._step_counts if use_global else self._item_counts({**inputs, "labels": labels}
                                                                         if labels is not None else inputs)
        scale = self.accelerator.num_processes if use_global else 1  # DDP averages gradients over processes
        masks = self._masks(inputs, labels)
        if self.task == "ctc":
            extra["frame_lengths"] = masks["kd"].sum(-1)
        step = StepTensors(student=student, teachers=teachers, teacher_weights=self.teacher_weights, labels=labels,
                           masks=masks, counts=counts, task=self.task, batch=extra)
        loss, terms = self.objective(step)
        loss = loss * scale
        self._record_terms(terms, scale, model.training, inputs)
        if model.training and self._undo_ga_division:
            loss = loss * getattr(self, "current_gradient_accumulation_steps", 1)
        if return_outputs:
            return loss, {"loss": loss, "logits": student_out.logits}
        return loss

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
            steps = max(self._optimizer_steps_since_log, 1)
            for name in sorted(self._train_terms):
                value = self._train_terms[name]
                if self.accelerator.num_processes > 1:
                    value = self.accelerator.gather(value.reshape(1)).mean()
                logs[name] = round(float(value) / steps, 6)
            self._train_terms.clear()
            self._optimizer_steps_since_log = 0
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
