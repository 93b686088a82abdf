"""PEFT students: LoRA adapters on a student, trained by the distillation loss, saved, merged and pushed.

Every recipe takes :class:`PeftArguments` (``--use_peft true --lora_r 8 ...``). The trainer's
checks and per-term logging see through the ``PeftModel`` (``hf_distill.modeling.unwrap``). At the
end the adapters are saved in ``adapter/`` next to the student and, by default, merged into it
(``merge_and_unload``), so the final folder loads with the usual Auto classes and the adapter
can still be loaded on its own base.

QLoRA (a 4-bit base through bitsandbytes) needs a CUDA GPU; on other devices it is refused with a
message (plain LoRA works everywhere).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..modeling import task_kind, unwrap
from ..qkv import KEY_NAMES, QUERY_NAMES, VALUE_NAMES

ADAPTER_DIR = "adapter"
TASK_TYPES = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM",
              "seq2seq_lm": "SEQ_2_SEQ_LM"}
# Heads that a LoRA student trains in full (they are new or task-specific), per task.
HEAD_MODULES = {"sequence_classification": ("classifier", "score", "pre_classifier")}


@dataclass
class PeftArguments:
    """LoRA on the student (``use_peft``)."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters on the student instead of all of it."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (update scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names to adapt (default: the attention's query, key "
                                        "and value projections found in the student)."})
    merge_adapters: bool = field(default=True, metadata={"help": "Merge the adapters into the saved student (the "
                                                                 "adapters are saved in adapter/ either way)."})
    use_qlora: bool = field(default=False, metadata={"help": "QLoRA: a 4-bit base (bitsandbytes, CUDA GPUs only)."})

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


def default_lora_targets(model: nn.Module) -> list[str]:
    """The leaf names of the student's attention query / key / value projections."""
    names = {name.rsplit(".", 1)[-1] for name, m in unwrap(model).named_modules() if isinstance(m, nn.Linear)}
    targets = sorted(n for n in names if n in (*QUERY_NAMES, *KEY_NAMES, *VALUE_NAMES))
    if not targets:
        raise ValueError(f"found no query/key/value projections in {type(unwrap(model)).__name__} to adapt; give "
                         "--lora_target_modules")
    return targets


def apply_peft(model: nn.Module, peft_args: PeftArguments | None, *, train_heads: bool = True):
    """``model`` with LoRA adapters when ``peft_args.use_peft`` (else ``model`` unchanged). ``train_heads``: the
    task head (e.g. ``classifier``) trains in full next to the adapters; False keeps it frozen and unwrapped."""
    if peft_args is None or not peft_args.use_peft:
        return model
    refusal = getattr(unwrap(model), "peft_refusal", None)
    if refusal:
        raise ValueError(f"--use_peft on a {type(unwrap(model)).__name__}: {refusal}")
    if peft_args.use_qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("QLoRA needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; use plain LoRA "
                             "(--use_qlora false) here") from None
        if not torch.cuda.is_available():
            raise ValueError("QLoRA's 4-bit base runs on CUDA GPUs only; on this device use plain LoRA "
                             "(--use_qlora false)")
        if not getattr(unwrap(model), "is_loaded_in_4bit", False):
            raise ValueError("QLoRA adapts a student loaded in 4 bits: load it with "
                             "quantization_config=BitsAndBytesConfig(load_in_4bit=True), or use plain LoRA")
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    from peft import LoraConfig, get_peft_model

    targets = ([t.strip() for t in peft_args.lora_target_modules.split(",") if t.strip()]
               if peft_args.lora_target_modules else default_lora_targets(model))
    present = {name.rsplit(".", 1)[-1] for name, _ in unwrap(model).named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora_target_modules {missing} are not modules of {type(unwrap(model)).__name__}; its "
                         f"linear layers include {sorted(default_lora_targets(model))}")
    kind = task_kind(model)
    heads = [h for h in HEAD_MODULES.get(kind, ()) if h in present] if train_heads else []
    config = LoraConfig(r=peft_args.lora_r, lora_alpha=peft_args.lora_alpha, lora_dropout=peft_args.lora_dropout,
                        target_modules=targets, modules_to_save=heads or None,
                        # peft's task types add the task head to the trained modules: without heads, none
                        task_type=TASK_TYPES.get(kind) if train_heads else None)
    return get_peft_model(model, config)


def save_student(model: nn.Module, output_dir: str | os.PathLike, *, merge: bool = True) -> nn.Module:
    """Save a student: a plain model as it is; a ``PeftModel`` as its adapters in ``adapter/`` and, with
    ``merge``, the merged model in ``output_dir``. Returns the model that ``output_dir`` holds."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "merge_and_unload"):
        unwrap(model).save_pretrained(output_dir)
        return model
    model.save_pretrained(output_dir / ADAPTER_DIR)
    if not merge:
        return model
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(output_dir)
    return merged
