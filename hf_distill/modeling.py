"""Model introspection in one place: wrappers, heads, sizes, layers and layer lists.

Every other module asks these questions through here: the trainer (which head, which inputs),
the objective (layer counts, widths), the Q/K/V recorder (where the layers are) and the student
builders (which layers to copy).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_input_pair",
    "check_same_frames",
    "count_parameters",
    "encoder_only",
    "find_layer_list",
    "forward_parameters",
    "hidden_size",
    "is_audio_model",
    "layer_list",
    "num_attention_heads",
    "num_layers",
    "output_size",
    "parse_layer_list",
    "parse_layer_map",
    "task_kind",
    "unwrap",
]


def unwrap(model):
    """The underlying transformers model of a PEFT / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def task_kind(model) -> str:
    """Which kind of head a model has: masked_lm, causal_lm, seq2seq_lm, sequence/token_classification, ctc, base."""
    name = type(unwrap(model)).__name__
    config = unwrap(model).config
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if getattr(config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "seq2seq_lm"
    if name.endswith("ForSequenceClassification") or name.endswith("ForAudioClassification"):
        return "sequence_classification"  # one label per text or per clip
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if name.endswith("ForCTC"):
        return "ctc"
    return "base"


def is_audio_model(model) -> bool:
    """Whether a model reads audio (``input_values`` samples or ``input_features`` such as log-mel frames)."""
    return getattr(unwrap(model), "main_input_name", "input_ids") in ("input_values", "input_features")


def encoder_only(model) -> bool:
    """Whether a model runs only the encoder of an encoder-decoder config (e.g. ``WhisperForAudioClassification``):
    its hidden states, layers and heads are the encoder's."""
    base = unwrap(model)
    if not isinstance(base, nn.Module) or not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return not any(n.rsplit(".", 1)[-1] == "decoder" for n, _ in base.named_modules())


def check_input_pair(student, teacher) -> None:
    """A live teacher runs on the student's batch: an audio model and its partner must read the same input."""
    s_in = getattr(unwrap(student), "main_input_name", "input_ids")
    t_in = getattr(unwrap(teacher), "main_input_name", "input_ids")
    if s_in != t_in and (is_audio_model(student) or is_audio_model(teacher)):
        raise ValueError(
            f"the student ({type(unwrap(student)).__name__}) reads {s_in} but the teacher "
            f"({type(unwrap(teacher)).__name__}) reads {t_in}; a live teacher runs on the student's batch. For a "
            "teacher of another input kind (e.g. a text teacher for a speech student) put its outputs in a "
            "teacher_logits column and train without a live teacher (teacher_source='stored')")


def frames_per_clip(model) -> int | None:
    """Encoder frames an audio model gives for a reference input (Whisper: its full 30 s window; others: 1 s of
    16 kHz samples); None for other models."""
    base = unwrap(model)
    lengths = getattr(base, "_get_feat_extract_output_lengths", None)
    if not is_audio_model(base) or lengths is None:
        return None
    config = base.config
    probe = 2 * int(config.max_source_positions) if getattr(config, "max_source_positions", None) else 16000
    return int(lengths(torch.tensor(probe)))


def check_same_frames(student, teacher, what: str) -> None:
    """Frame-level terms on audio models need the same number of encoder frames per clip on both sides."""
    s_frames, t_frames = frames_per_clip(student), frames_per_clip(teacher)
    if s_frames != t_frames:
        raise ValueError(
            f"term {what!r} compares encoder frames, but the student gives {s_frames} and the teacher {t_frames} "
            "frames for the same input (another feature encoder or window); use logit terms only (kl) for this pair, "
            "or a student with the teacher's feature encoder")


def output_size(model) -> int | None:
    """Size of the output space (vocabulary or label set) a model's logits range over."""
    kind = task_kind(model)
    config = unwrap(model).config
    if kind in ("sequence_classification", "token_classification"):
        return config.num_labels
    base = unwrap(model)
    emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return emb.weight.shape[0]
    return getattr(config, "vocab_size", None)


def hidden_size(model) -> int | None:
    """Width of a model's hidden states."""
    config = unwrap(model).config
    for attr in ("hidden_size", "d_model", "dim", "n_embd"):
        if getattr(config, attr, None):
            return getattr(config, attr)
    return None


def num_attention_heads(model, side: str = "decoder") -> int | None:
    """Attention heads per layer (``side`` picks encoder or decoder heads of an encoder-decoder)."""
    config = unwrap(model).config
    side = "encoder" if encoder_only(model) else side
    attrs = ("num_attention_heads", "n_heads", "n_head")
    if getattr(config, "is_encoder_decoder", False):
        attrs = (f"{side}_attention_heads",) + attrs
    for attr in attrs:
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def num_layers(model_or_config, side: str | None = None) -> int:
    """Number of transformer layers (``side``: ``encoder`` or ``decoder`` of an encoder-decoder; default decoder)."""
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    side = "encoder" if side is None and encoder_only(model_or_config) else side
    if getattr(config, "is_encoder_decoder", False):
        attr = f"{side or 'decoder'}_layers"
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    for attr in ("num_hidden_layers", "n_layers", "n_layer", "num_layers", "encoder_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"cannot tell how many layers {type(config).__name__} has (no num_hidden_layers in its config)")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def batch_size_of(inputs) -> int:
    """Rows of a model-input batch: the first dimension of its first tensor, looking inside tuples, lists and
    model outputs (e.g. ``encoder_outputs``)."""
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    while values:
        value = values.pop(0)
        if torch.is_tensor(value):
            return int(value.shape[0])
        if isinstance(value, dict):
            values[:0] = list(value.values())
        elif isinstance(value, (tuple, list)):
            values[:0] = list(value)
    raise ValueError("the batch holds no tensor")


def forward_parameters(model) -> set[str] | None:
    """Named parameters of ``model.forward`` (None when it takes arbitrary keyword arguments only)."""
    params = inspect.signature(unwrap(model).forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


_LAYER_LIST_NAMES = ("encoder.layer", "encoder.layers", "transformer.layer", "transformer.h", "layers", "layer", "h")


def find_layer_list(model: nn.Module, count: int | None = None) -> str:
    """Dotted name of the ``nn.ModuleList`` holding a model's transformer layers.

    Tries the usual places first (``<base>.encoder.layer``, ``<base>.encoder.layers``,
    ``<base>.transformer.layer``, ``<base>.layers``, ``<base>.h``), then any ModuleList with one
    entry per layer whose name ends in ``layer``/``layers``/``h``/``block``.
    """
    if count is None:
        count = num_layers(model)
    base = getattr(model, "base_model_prefix", "")
    prefixes = [f"{base}." if base and hasattr(model, base) else "", ""]
    for prefix in dict.fromkeys(prefixes):
        for name in _LAYER_LIST_NAMES:
            try:
                module = model.get_submodule(prefix + name)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return prefix + name
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and name.rsplit(".", 1)[-1] in {"layer", "layers", "h", "block", "blocks"}
    ]
    if len(found) == 1:
        return found[0]
    encoder = [name for name in found if "encoder" in name]
    if len(encoder) == 1:
        return encoder[0]
    if not found:
        raise ValueError(
            f"unsupported architecture {type(model).__name__}: found no nn.ModuleList with its {count} layers "
            "(models that share one layer, such as ALBERT, cannot be shrunk by copying layers)"
        )
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: several layer lists {found}; cannot tell which to shrink"
    )


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of a (possibly wrapped) model's transformer layers."""
    base = unwrap(model)
    return base.get_submodule(find_layer_list(base))


def parse_layer_list(spec: Any, what: str = "layers") -> list[int]:
    """``"0,2,4"`` or ``[0, 2, 4]`` -> ``[0, 2, 4]``; anything else is a ValueError that shows the form."""
    if isinstance(spec, str):
        parts = [p for p in spec.replace(" ", "").split(",") if p != ""]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"cannot read {what} {spec!r}: write comma-separated integer indices such as "
                             "0,2,4,7,9,11") from None
    if isinstance(spec, (list, tuple)):
        out = []
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"{what} must be integer layer indices, got {item!r} in {list(spec)!r}")
            out.append(int(item))
        return out
    raise ValueError(f"{what} must be a list of integer layer indices such as [0, 2, 4], got {spec!r}")


def parse_layer_map(spec: str | dict | list | None, what: str = "layers") -> list[tuple[int, int]]:
    """``"s:t,s:t"``, ``{s: t}`` or ``[[s, t], ...]`` -> ``[(student_index, teacher_index), ...]``.

    Indices refer to ``output_hidden_states`` (0 = embeddings, -1 = last layer) or to layers,
    depending on the term that reads the map.
    """
    if spec is None or spec == "":
        return []
    example = "'-1:-1' or '2:4,4:8,6:12' (or a mapping {2: 4, 4: 8})"

    def index(value) -> int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)

    items: list = []
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        for item in str(spec).split(","):
            item = item.strip()
            if item:
                items.append(tuple(item.split(":")))
    pairs = []
    for item in items:
        try:
            s, t = item
            pairs.append((index(s), index(t)))
        except (ValueError, TypeError):
            raise ValueError(f"cannot read layer pair {item!r} in {what} {spec!r}; write student:teacher pairs of "
                             f"integer indices, e.g. {example}") from None
    return pairs
