"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a weighted sum of distillation terms.

Per step it gathers the teacher's tensors (a live frozen teacher, or teacher logits cached in the
batch), runs the student, and combines the terms of :mod:`hf_distill.losses`:

* ``loss_kd``: soft-target KL at temperature T (x T^2), DistilBERT's ``alpha_ce`` term;
* the task loss on hard labels, logged as ``loss_mlm`` / ``loss_clm`` / ``loss_ce``;
* ``loss_cos``: 1 - cosine between aligned hidden states;
* ``loss_mse`` (logits) and ``loss_hidden_mse`` (hidden states) when their weights are > 0;
* or any list of terms from :mod:`hf_distill.objectives` (``args.distillation``).

Hidden states, attention maps and Q/K/V projections are collected only when a term needs them.

Normalisation is not left to the model: the objective says which positions count for each term
and how many items a micro-batch has; the trainer sums those counts over the whole optimiser step
(every gradient-accumulation micro-batch on every process) and every term divides by them. Batch
16, batch 8 x accumulation 2 and 2 processes x batch 8 therefore give the same loss and the same
gradients (batch-relation terms: see :class:`hf_distill.objectives.SampleRelationTerm`).

Non-finite numbers never reach the weights: a NaN / inf loss term or gradient norm stops the run
with a message naming the step, the terms and the tensors (``on_nonfinite="skip"`` skips such
batches instead, counted as ``nonfinite_skipped``), and a student with a non-finite weight is
never saved (:mod:`hf_distill.numerics`).
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback

from .arguments import DistillationArguments
from .checkpoints import DistillationCheckpointMixin
from .modeling import batch_size_of, check_input_pair, forward_parameters, output_size, task_kind, unwrap
from .numerics import NonFiniteError, all_finite, describe_nonfinite, nonfinite_parameters
from .objectives import ModelTensors, StepTensors, build_objective
from .objectives.cross_tokenizer import bind_tokenizers, check_cross_tokenizer_terms
from .objectives.fused import fused_output_flags, settle_fused, with_head
from .qkv import QKVRecorder
from .sources import EmaTeacher, FrozenTeacher, PeerTeacher, SnapshotTeacher, StoredTeacher, TeacherSource
from .teachers import check_same_vocabulary, find_teacher_tokenizer, load_teacher, teacher_mixture_weights

logger = logging.getLogger(__name__)

# Columns that carry teacher outputs computed ahead of time; the Trainer must not drop them.
CACHED_TEACHER_COLUMNS = ("teacher_logits",)


class _DistillationSteps(TrainerCallback):
    """After each optimiser step: clear the objective's own gradients (projections are not the model's, so
    the Trainer does not) and let the teacher source update (an EMA); at each epoch end, let it refresh
    (a snapshot)."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        for term in self.trainer.objective.terms:  # terms with an optimiser of their own (a discriminator) step here
            if hasattr(term, "on_optimizer_step"):
                term.on_optimizer_step(self.trainer)
        for p in self.trainer.objective.parameters():
            p.grad = None
        self.trainer.teacher_source.on_optimizer_step(self.trainer)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.teacher_source.on_epoch_end(self.trainer)


class DistillationTrainer(DistillationCheckpointMixin, Trainer):
    """Distil ``teacher`` into ``model`` (the student). All other arguments are ``Trainer``'s.

    Args:
        model: the student.
        teacher: a model or a path / Hub id (loaded with the student's kind of head, in
            ``args.teacher_dtype``), or a list of them (multi-teacher); defaults to
            ``args.teacher_name_or_path`` (comma-separated for several). May be None when every
            batch carries cached ``teacher_logits`` or stored top-k soft labels.
        args: :class:`DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer. When omitted it is loaded from the
            teacher's folder (or Hub cache) if it has one; with ``processing_class`` the two
            vocabularies must then be identical, token for token.
        teacher_source: where the teacher tensors come from (:mod:`hf_distill.sources`): a
            :class:`~hf_distill.sources.TeacherSource`, or a kind (``frozen``, ``stored``, ``ema``,
            ``snapshot``); defaults to ``args.teacher_source``.
    """

    # compute_loss normalises by the global item count of the optimiser step itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: DistillationArguments | None = None, teacher=None,
                 teacher_processing_class=None, teacher_source: TeacherSource | str | None = None, **kwargs):
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
        sources = self._teacher_sources(teacher, args)
        teachers = [self._load_teacher(t, args) for t in sources]
        student_tok = kwargs.get("processing_class")
        teacher_toks = []
        for source, t in zip(sources, teachers):
            teacher_tok = teacher_processing_class
            if teacher_tok is None and student_tok is not None:
                teacher_tok = find_teacher_tokenizer(source)
            self._validate_pair(model, t, student_tok, teacher_tok, args=args)
            teacher_toks.append(teacher_tok)
        self.teacher_weights = teacher_mixture_weights(args.teacher_weight_list, len(teachers))
        source = self._build_source(teacher_source, teachers, model, args)
        # The objective validates layer maps, widths and head counts now, before any step.
        self.objective = build_objective(args, model, source.models, multi_teacher=args.multi_teacher,
                                         teacher_weights=self.teacher_weights)
        bind_tokenizers(self.objective, student_tok, teacher_toks)
        settle_fused(self.objective, model, source.models, source.provides, args)  # fused: auto -> on or off
        source.check(self.objective)
        if "attentions" in self.objective.needs:
            for m in [model, *source.models]:
                unwrap(m).set_attn_implementation("eager")  # fused kernels return no attention maps
        super().__init__(model=model, args=args, **kwargs)
        # transformers releases without `loss_is_scaled_for_ga` divide every training loss by the number
        # of accumulation steps themselves; we normalise by the global item count already, so undo it.
        self._undo_ga_division = not hasattr(Trainer, "loss_is_scaled_for_ga")
        if self._undo_ga_division:
            self.model_accepts_loss_kwargs = False  # makes that division unconditional, hence exactly undone
        self.objective.to(self.accelerator.device)
        self.teacher_source = source
        source.bind(self)
        s_layers, _ = self.objective.qkv_layers()
        self._student_qkv = QKVRecorder(model, s_layers) if s_layers else None
        self._student_inputs = forward_parameters(model)
        self._step_counts: dict[str, torch.Tensor] | None = None
        self._train_terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._optimizer_steps_since_log = 0  # one get_batch_samples call per optimiser step
        self._micro_batch = 0  # index of the micro-batch within the optimiser step, for messages
        self.nonfinite_skipped = 0
        self._eval_terms: dict[str, float] = defaultdict(float)
        self._eval_weight = 0
        self.add_callback(_DistillationSteps(self))

    @property
    def teachers(self) -> list:
        """The teacher models the source runs (empty for stored outputs)."""
        return self.teacher_source.models

    @property
    def teacher(self):
        """The (first) teacher."""
        return self.teachers[0] if self.teachers else None

    @staticmethod
    def _build_source(teacher_source, teachers: list, student, args) -> TeacherSource:
        if isinstance(teacher_source, TeacherSource):
            if teachers:
                raise ValueError("give either teacher= or a teacher_source instance, not both")
            return teacher_source
        kind = teacher_source or args.teacher_source
        if kind == "auto":
            kind = "frozen" if teachers else "stored"
        if args.teacher_store and kind != "stored":
            raise ValueError(f"teacher_store is read by teacher_source='stored', not {kind!r}; drop one of them")
        for name, value, default in (("teacher_device", args.teacher_device, None),
                                     ("teacher_sharding", args.teacher_sharding, "auto")):
            if value != default and kind != "frozen":
                raise ValueError(f"{name} applies to a frozen teacher, but the teacher source is {kind!r}; drop "
                                 f"{name} or use teacher_source='frozen'")
        if kind in ("stored", "ema", "snapshot") and teachers:
            raise ValueError(f"teacher_source={kind!r} takes no teacher model, but one was given; drop teacher= / "
                             "--teacher_name_or_path, or use teacher_source='frozen'")
        if kind == "frozen":
            if not teachers:
                raise ValueError("teacher_source='frozen' needs a teacher: pass teacher=... or --teacher_name_or_path")
            return FrozenTeacher(teachers, dtype=args.teacher_dtype, device=args.teacher_device,
                                 sharding=args.teacher_sharding)
        if kind == "stored":
            if args.teacher_store or args.eval_teacher_store:
                return StoredTeacher(store=args.teacher_store, eval_store=args.eval_teacher_store)
            return StoredTeacher()
        if kind == "peer":
            if not teachers:
                raise ValueError("teacher_source='peer' trains the given teacher models alongside the student: pass "
                                 "teacher=... (one or more peers)")
            return PeerTeacher(teachers, mode=args.peer_mode)
        if kind == "ema":
            return EmaTeacher(student, decay=args.ema_decay)
        if kind == "snapshot":
            return SnapshotTeacher(student)
        raise ValueError(f"unknown teacher_source {kind!r}; choose auto, frozen, stored, peer, ema or snapshot")

    # ------------------------------------------------------------------ teachers and validation
    @staticmethod
    def _teacher_sources(teacher, args) -> list:
        if teacher is None and args.teacher_name_or_path:
            teacher = [t.strip() for t in str(args.teacher_name_or_path).split(",") if t.strip()]
        if teacher is None:
            return []
        return list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]

    def _load_teacher(self, teacher, args):
        """A teacher given as a path or Hub id is loaded with the student's kind of head."""
        if isinstance(teacher, torch.nn.Module):
            return teacher
        if isinstance(teacher, (str, bytes)) or hasattr(teacher, "__fspath__"):
            task = self.task if self.task != "base" else "auto"
            return load_teacher(teacher, task=task, dtype=args.teacher_dtype, trust_remote_code=args.trust_remote_code)
        raise TypeError(f"teacher must be a model, a path or a Hub id (or a list of them), got {type(teacher).__name__}")

    def _validate_pair(self, student, teacher, student_tok, teacher_tok, args=None) -> None:
        s_kind, t_kind = task_kind(student), task_kind(teacher)
        check_input_pair(student, teacher)
        if s_kind != t_kind and "base" not in (s_kind, t_kind):
            raise ValueError(
                f"student is a {s_kind} model but the teacher is a {t_kind} model; their logits do not align. "
                f"Load the teacher with the same kind of head (e.g. AutoModelFor{s_kind.title().replace('_', '')})"
            )
        try:
            self._check_same_outputs(student, teacher, student_tok, teacher_tok, s_kind)
        except ValueError as exc:  # another vocabulary: only cross-tokenizer terms may compare the two
            if s_kind != "causal_lm" or args is None:
                raise
            check_cross_tokenizer_terms(args, str(exc))

    @staticmethod
    def _check_same_outputs(student, teacher, student_tok, teacher_tok, s_kind) -> None:
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

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            cached = list(CACHED_TEACHER_COLUMNS)
            for ds in (self.train_dataset, self.eval_dataset):  # stored soft labels: teacher_topk_*, ...
                for name in getattr(ds, "column_names", None) or []:
                    if isinstance(name, str) and name.startswith("teacher_"):
                        cached.append(name)
            self._signature_columns += [c for c in dict.fromkeys(cached) if c not in self._signature_columns]

    # ------------------------------------------------------------------ optimiser, gradients, saving
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        if params and not any(p is q for g in optimizer.param_groups for q in g["params"] for p in params[:1]):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def _sync_objective_gradients(self) -> None:
        """Average the objective's own gradients (projections) over processes, as DDP does for the student's."""
        if self.accelerator.num_processes > 1:
            for p in self.objective.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes

    def _clip_grad_norm(self, model):
        """Clip the student's and the objective's (projections') gradients together to ``max_grad_norm``."""
        self._sync_objective_gradients()
        self._objective_synced = True
        if not any(True for _ in self.objective.parameters()):
            return super()._clip_grad_norm(model)
        params = itertools.chain(model.parameters(), self.objective.parameters())
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, checked: a non-finite one stops the run (or skips the update)."""
        if not getattr(self, "_objective_synced", False):
            self._sync_objective_gradients()
        self._objective_synced = False
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not all_finite([torch.as_tensor(grad_norm, dtype=torch.float32)]):
            step = self.state.global_step + 1
            if self.args.on_nonfinite == "skip":
                logger.warning("step %d: gradient norm is %s; skipping this update", step, float(grad_norm))
                self.nonfinite_skipped += 1
                for p in itertools.chain(model.parameters(), self.objective.parameters()):
                    p.grad = None  # optimisers leave parameters without a gradient untouched
                return torch.zeros(())
            raise NonFiniteError(
                f"step {step}: the gradient norm is {float(grad_norm)} although every loss term was finite: the "
                "backward pass overflowed. The run stops before the update reaches the weights; lower the "
                "learning rate, set max_grad_norm, or use bfloat16 instead of float16 (on_nonfinite='skip' skips "
                "such updates instead)")
        return grad_norm

    def check_finite_student(self, output_dir=None) -> None:
        """Raise :class:`NonFiniteError` when the student holds a NaN or inf weight (it is then never saved)."""
        bad = nonfinite_parameters(unwrap(self.model))
        if bad:
            raise NonFiniteError(f"refusing to save the student to {output_dir or self.args.output_dir}: its weights "
                                 f"hold NaN or inf (e.g. {bad}); the run diverged")

    def _save(self, output_dir=None, state_dict=None):
        """Save the student, never with a NaN or inf weight in it."""
        self.check_finite_student(output_dir)
        return super()._save(output_dir, state_dict=state_dict)

    # ------------------------------------------------------------------ counts
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self._optimizer_steps_since_log += 1
        self._micro_batch = 0
        totals: dict[str, torch.Tensor] = {}
        for batch in batch_samples:
            for key, value in self.objective.item_counts(batch).items():
                totals[key] = totals.get(key, 0) + value.to(device)
        if totals and self.accelerator.num_processes > 1:
            keys = sorted(totals)
            stacked = self.accelerator.reduce(torch.stack([totals[k] for k in keys]).to(device), reduction="sum")
            totals = dict(zip(keys, stacked))
        self._step_counts = totals or None
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def output_flags(self) -> dict:
        """What the models must return for the configured terms (``output_hidden_states``, ...; for fused terms
        the last hidden states and one position of logits, :func:`~hf_distill.objectives.fused.fused_output_flags`)."""
        needs = self.objective.needs
        flags = {}
        if "hidden_states" in needs:
            flags["output_hidden_states"] = True
        if "attentions" in needs:
            flags["output_attentions"] = True
        flags.update(fused_output_flags(needs))
        return flags

    def teacher_forward(self, index: int, inputs: dict) -> ModelTensors:
        """Run live teacher ``index`` on the student's inputs (subclasses may feed it otherwise)."""
        return self.teacher_source.forward_one(self, index, inputs)

    def _decoder_inputs_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing for encoder-decoders: labels shifted right behind the decoder start token."""
        config = unwrap(self.model).config
        start = config.decoder_start_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        shifted = labels.new_full(labels.shape, pad)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == -100, pad)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        extra = {k: inputs.pop(k) for k in list(inputs) if k.startswith("teacher_")}  # stored teacher outputs
        model_inputs = {k: v for k, v in inputs.items() if self._student_inputs is None or k in self._student_inputs}
        if self.task == "seq2seq_lm" and labels is not None and "decoder_input_ids" not in model_inputs:
            model_inputs["decoder_input_ids"] = self._decoder_inputs_from_labels(labels)
        if self._student_qkv is not None:
            with self._student_qkv:
                student_out = model(**model_inputs, **self.output_flags())
            student = ModelTensors.from_output(student_out, self._student_qkv.take())
        else:
            student_out = model(**model_inputs, **self.output_flags())
            student = ModelTensors.from_output(student_out)
        if "last_hidden" in self.objective.needs:  # fused terms: last hidden states + projection, no full logits
            student = with_head(student, model)

        teachers = self.teacher_source.teacher_tensors(self, model_inputs, extra, student=student)

        # Global counts in training (exact under accumulation / several processes), local in evaluation.
        use_global = model.training and self._step_counts is not None
        counts = self._step_counts if use_global else self.objective.item_counts(
            {**inputs, "labels": labels} if labels is not None else inputs)
        scale = self.accelerator.num_processes if use_global else 1  # DDP averages gradients over processes
        masks = self.objective.masks(inputs, labels)
        if self.task == "ctc":
            extra["frame_lengths"] = masks["kd"].sum(-1)
        step = StepTensors(student=student, teachers=teachers, teacher_weights=self.teacher_weights, labels=labels,
                           masks=masks, counts=counts, task=self.task, batch=extra)
        loss, terms = self.objective(step)
        if model.training:
            terms = {**terms, **self.teacher_source.after_student(self, step, scale=scale)}  # peers learn here
        if model.training and self.accelerator.num_processes > 1 and torch.is_tensor(student_out.logits) \
                and student_out.logits.requires_grad:
            # DDP reduces gradients bucket by bucket, when every parameter of a bucket has its gradient. Terms that
            # read Q/K/V or hidden states leave the layers above them without one, and the bucket they share with
            # used parameters would never be averaged; a zero-weighted path through the outputs gives each a zero.
            loss = loss + student_out.logits.sum() * 0.0
        if model.training:
            self._micro_batch += 1
            if not all_finite([loss]):
                loss = self._nonfinite_loss(model, terms, step, inputs)
        loss = loss * scale
        self._record_terms(terms, scale, model.training, inputs)
        if model.training and self._undo_ga_division:
            loss = loss * getattr(self, "current_gradient_accumulation_steps", 1)
        if return_outputs:  # fused terms alone leave one position of logits: no predictions to return
            logits = None if "logits" not in self.objective.needs and "last_hidden" in self.objective.needs \
                else student_out.logits
            return loss, {"loss": loss, "logits": logits}
        return loss

    def _nonfinite_loss(self, model, terms, step, inputs) -> torch.Tensor:
        """Stop the run with a message naming the step, the terms and the batch (or skip the batch)."""
        where = (f"step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}), micro-batch "
                 f"{self._micro_batch}")
        detail = describe_nonfinite(terms, step.student, step.teachers, {**inputs, **step.batch})
        student_weights = nonfinite_parameters(unwrap(model))
        if self.args.on_nonfinite == "skip" and not student_weights:
            self.nonfinite_skipped += 1
            logger.warning("%s: non-finite loss, batch skipped (%d so far); %s", where, self.nonfinite_skipped, detail)
            for name in terms:
                terms[name] = torch.zeros((), device=self.args.device)
            # Zero gradients for every parameter, so DDP's reducer still sees each one once.
            return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
        if student_weights:
            detail += f"; the student's weights are already non-finite (e.g. {student_weights[:3]})"
        raise NonFiniteError(f"non-finite loss at {where}: {detail}. The run stops here so that nothing is trained "
                             "on it and no NaN student is saved; set on_nonfinite='skip' to skip such batches instead")

    # ------------------------------------------------------------------ logging
    def _record_terms(self, terms, scale, training, inputs):
        if training:
            for name, value in terms.items():
                self._train_terms[name] = self._train_terms[name] + value.detach().float() * scale
        else:
            batch = batch_size_of(inputs)
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
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
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
