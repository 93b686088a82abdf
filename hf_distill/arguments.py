"""Training arguments for distillation: ``TrainingArguments`` plus the knobs of the loss.

Parse them like any Hugging Face arguments, from CLI flags or a YAML/JSON file::

    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_yaml_file("config.yaml")

:func:`hf_distill.config.parse_config_and_args` combines both: ``--config file.yaml`` plus flags
that override the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .modeling import parse_layer_map

__all__ = ["DistillationArguments", "TEACHER_DTYPES", "parse_layer_map"]

TEACHER_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class DistillationArguments(TrainingArguments):
    """``TrainingArguments`` plus distillation settings. Defaults are DistilBERT's (Sanh et al. 2019)."""

    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model: a Hub id or a local directory (or pass `teacher=` in code)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a teacher loaded from a path / Hub id to run its own modelling code (off: only "
                          "code shipped with transformers runs)."},
    )
    teacher_source: str = field(
        default="auto",
        metadata={"help": "Where the teacher's signal comes from: frozen (a live teacher model), stored (teacher "
                          "outputs in the dataset), ema (a moving average of the student), snapshot (the student at "
                          "the end of the previous epoch), peer (the teacher models are trained alongside the "
                          "student: online distillation); auto: frozen with a teacher, else stored.",
                  "choices": ["auto", "frozen", "stored", "peer", "ema", "snapshot"]},
    )
    teacher_store: str | None = field(
        default=None,
        metadata={"help": "teacher_source=stored: a teacher-output store written by hf-distill cache-teacher, "
                          "joined to the training dataset and checked against it before the first step."},
    )
    eval_teacher_store: str | None = field(
        default=None, metadata={"help": "The store of the evaluation dataset's teacher outputs (teacher_store)."}
    )
    peer_mode: str = field(
        default="mutual",
        metadata={"help": "teacher_source=peer: 'mutual' (deep mutual learning: every model distils from the others) "
                          "or 'trainable' (the peers learn from the task loss only while they teach).",
                  "choices": ["mutual", "trainable"]},
    )
    ema_decay: float = field(default=0.999, metadata={"help": "teacher_source=ema: ema <- decay * ema + (1 - decay) "
                                                              "* student after each optimiser step."})
    teacher_dtype: str = field(
        default="float32",
        metadata={"help": "Precision of the frozen teacher: float32, bfloat16, float16 or auto (as saved).",
                  "choices": list(TEACHER_DTYPES)},
    )
    teacher_device: str | None = field(
        default=None,
        metadata={"help": "Device of the frozen teacher (e.g. cuda:1, cpu) when it should not share the student's; "
                          "its inputs are moved there and its outputs back to the student's device for the loss. "
                          "Default: the student's device."},
    )
    teacher_sharding: str = field(
        default="auto",
        metadata={"help": "Several processes: shard the frozen teacher across them with FSDP2 for inference instead "
                          "of a full copy per process. auto: when the student is trained with --fsdp; fsdp: always "
                          "(DDP included); none: a full copy per process.",
                  "choices": ["auto", "fsdp", "none"]},
    )
    fused_vocab_threshold: int = field(
        default=32768,
        metadata={"help": "Response terms and the causal-LM task loss with `fused: auto` (the default) compute from "
                          "the models' last hidden states and output projections, chunk by chunk, when the "
                          "vocabulary has at least this many entries: neither model's full logits ever exist."},
    )
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the soft-target KL (x T^2)."})
    kd_weight: float = field(default=5.0, metadata={"help": "Weight of the soft-target KL term (DistilBERT alpha_ce)."})
    task_weight: float = field(
        default=2.0, metadata={"help": "Weight of the task loss on hard labels: masked-LM / causal-LM / classification CE."}
    )
    cos_weight: float = field(default=1.0, metadata={"help": "Weight of the hidden-state cosine term (DistilBERT alpha_cos)."})
    mse_weight: float = field(default=0.0, metadata={"help": "Weight of the logit MSE term (DistilBERT alpha_mse)."})
    hidden_mse_weight: float = field(
        default=0.0, metadata={"help": "Weight of an MSE term between the hidden states of `hidden_layer_map`."}
    )
    hidden_layer_map: str = field(
        default="-1:-1",
        metadata={"help": "student:teacher hidden-state pairs for the cosine/MSE terms, e.g. '-1:-1' or '3:6,6:12'."},
    )
    distillation: str | None = field(
        default=None,
        metadata={"help": "The loss as a list of weighted terms (YAML list, or JSON on the command line), e.g. "
                          "'[{\"loss\": \"kl\", \"weight\": 5}, {\"loss\": \"hidden_mse\", \"projection\": "
                          "\"linear\"}]'. Replaces kd/cos/mse weights; the task loss is added with task_weight."},
    )
    teacher_weights: str | None = field(
        default=None, metadata={"help": "Several teachers: their weights, comma-separated (default: equal)."}
    )
    multi_teacher: str = field(
        default="average",
        metadata={"help": "Several teachers: 'average' their probabilities into one target, or 'separate' terms.",
                  "choices": ["average", "separate"]},
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "A non-finite teacher output or loss term: 'stop' the run at that step with a message "
                          "(default), or 'skip' the batch (counted and logged as nonfinite_skipped).",
                  "choices": ["stop", "skip"]},
    )
    start_fresh: bool = field(
        default=False,
        metadata={"help": "Train from scratch whatever output_dir holds: its checkpoint-* folders are moved into "
                          "output_dir/_replaced-<time>/ (not deleted) and take no part in this run's resume or "
                          "rotation (needed when the distillation settings changed since they were written)."},
    )
    restrict_kd_to_mask: bool = field(
        default=False, metadata={"help": "Masked LM: compute the KL only at masked positions (default: every real token)."}
    )

    def __post_init__(self):
        # Refuse NaN and inf in every float setting before anything else looks at them: a NaN weight or
        # learning rate trains a NaN student that would otherwise be saved with exit code 0.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"{f.name} is NaN; give a number")
        for name in ("learning_rate", "temperature", "kd_weight", "task_weight", "cos_weight", "mse_weight",
                     "hidden_mse_weight", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon"):
            value = getattr(self, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isinf(value):
                raise ValueError(f"{name} is {value}; give a finite number")
        super().__post_init__()
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if isinstance(self.fused_vocab_threshold, bool) or not isinstance(self.fused_vocab_threshold, int) \
                or self.fused_vocab_threshold < 0:
            raise ValueError(f"fused_vocab_threshold must be an integer >= 0 (0: always fused where possible), got "
                             f"{self.fused_vocab_threshold!r}")
        if self.teacher_sharding not in ("auto", "fsdp", "none"):
            raise ValueError(f"teacher_sharding must be auto, fsdp or none, got {self.teacher_sharding!r}")
        if self.teacher_device is not None:
            from .sources.frozen import check_device

            check_device(self.teacher_device, "teacher_device")
        for name in ("kd_weight", "task_weight", "cos_weight", "mse_weight", "hidden_mse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher_source not in ("auto", "frozen", "stored", "peer", "ema", "snapshot"):
            raise ValueError("teacher_source must be auto, frozen, stored, peer, ema or snapshot, got "
                             f"{self.teacher_source!r}")
        if self.peer_mode not in ("mutual", "trainable"):
            raise ValueError(f"peer_mode must be 'mutual' or 'trainable', got {self.peer_mode!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        self.layer_pairs = parse_layer_map(self.hidden_layer_map, what="hidden_layer_map")
        if self.multi_teacher not in ("average", "separate"):
            raise ValueError(f"multi_teacher must be 'average' or 'separate', got {self.multi_teacher!r}")
        self.teacher_weight_list = self._parse_teacher_weights(self.teacher_weights)
        if self.distillation is not None:
            from .objectives import parse_distillation_spec

            parse_distillation_spec(self.distillation)  # fail on a malformed list now, not at the first step

    @staticmethod
    def _parse_teacher_weights(spec) -> list[float] | None:
        """``"1,3"`` (or ``[1, 3]``) -> normalised weights ``[0.25, 0.75]``; None when not given."""
        if spec is None or spec == "":
            return None
        items = spec if isinstance(spec, (list, tuple)) else [w for w in str(spec).split(",") if w.strip()]
        weights = []
        for item in items:
            try:
                weight = float(item)
            except (TypeError, ValueError):
                raise ValueError(f"teacher_weights must be comma-separated numbers such as '1,3', got {spec!r} "
                                 f"({item!r} is not a number)") from None
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"teacher_weights must be finite and >= 0, got {item!r} in {spec!r}")
            weights.append(weight)
        if not weights or sum(weights) <= 0:
            raise ValueError(f"teacher_weights must have a positive sum, got {spec!r}")
        from .teachers import teacher_mixture_weights

        return teacher_mixture_weights(weights, len(weights))
