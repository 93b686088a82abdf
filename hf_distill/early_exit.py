"""Early exits: save the exit heads trained by ``exit_kl``, load them back, run a model up to one exit.

The heads live in the distillation objective, never in the student (``trainer.save_model`` writes
the student alone). Ask for them explicitly::

    trainer.save_model(folder)
    save_exit_heads(trainer, folder)        # exit_heads.safetensors + exit_heads.json next to the student
    model = EarlyExitModel.from_pretrained(folder, exit_layer=2)
    logits = model(**batch).logits          # embeddings + the first 2 layers + the exit head

:class:`EarlyExitModel` runs only the layers below its exit (the later ones are not called: the
latency drops with them); ``exit_layer`` may also be chosen per call. :func:`exit_logits` gives
every exit's logits from one full forward (evaluation). :func:`export_exit_model` writes a plain
transformers model with only the first ``L`` layers and the exit head in place of its own head,
which ``AutoModelFor...`` loads with no hf_distill code (sequence and token classifiers).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import find_layer_list, forward_parameters, hidden_size, num_layers, output_size, task_kind, unwrap
from .modeling import layer_list as layer_list_of
from .objectives.exits import ExitHead, build_exit_head, collect_exit_heads

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

HEADS_FILE = "exit_heads.safetensors"
CONFIG_FILE = "exit_heads.json"
FORMAT_VERSION = 1

__all__ = ["CONFIG_FILE", "HEADS_FILE", "EarlyExitModel", "exit_logits", "export_exit_model", "first_layers",
           "load_exit_heads", "predict_exit_logits", "read_exit_config", "run_parameters", "save_exit_heads"]


# ---------------------------------------------------------------------------------------------- save / load
def _heads_of(source) -> dict[int, ExitHead]:
    if isinstance(source, Mapping):
        return {int(k): v for k, v in sorted(source.items(), key=lambda kv: int(kv[0]))}
    heads = collect_exit_heads(source)
    if not heads:
        raise ValueError("no exit heads to save: the objective has no exit_kl term (add {loss: exit_kl, layers: "
                         "[...]} to the distillation list)")
    return heads


def save_exit_heads(source, folder: str | os.PathLike, model=None, *, extra: dict | None = None) -> Path:
    """Write the exit heads of ``source`` (a trainer, an objective, or ``{layer: ExitHead}``) into ``folder``:
    ``exit_heads.safetensors`` (tensors ``layer_<L>.<name>``) and ``exit_heads.json`` (layers, head styles and
    the model they fit). ``model`` defaults to the trainer's student. Returns the JSON file's path."""
    from safetensors.torch import save_file

    heads = _heads_of(source)
    model = model if model is not None else getattr(source, "model", None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer_{layer}.{name}": t.detach().cpu().contiguous()
               for layer, head in heads.items() for name, t in head.state_dict().items()}
    config: dict[str, Any] = {"format": FORMAT_VERSION, "layers": list(heads),
                              "heads": {str(layer): head.describe() for layer, head in heads.items()}}
    if model is not None:
        base = unwrap(model)
        config["model"] = {"class": type(base).__name__, "model_type": getattr(base.config, "model_type", None),
                           "num_layers": num_layers(base), "hidden_size": hidden_size(base),
                           "output_size": output_size(base)}
    terms = [t for t in getattr(getattr(source, "objective", source), "terms", [])
             if getattr(t, "loss_name", None) == "exit_kl"]
    if terms:
        config["trained_with"] = [{"layers": t.layers, "temperature": t.temperature, "ce_weight": t.ce_weight,
                                   "detach": t.detach} for t in terms]
    config.update(extra or {})
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT_VERSION)})
    os.replace(tmp, folder / HEADS_FILE)
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_exit_config(folder: str | os.PathLike) -> dict:
    """The ``exit_heads.json`` of ``folder`` (FileNotFoundError naming what is missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the folder that holds {CONFIG_FILE} and {HEADS_FILE}")
    for name in (CONFIG_FILE, HEADS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no {name}: it has no exit heads (write them with "
                                    "hf_distill.early_exit.save_exit_heads after training with an exit_kl term)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE} has format {config.get('format')!r}; this version reads "
                         f"format {FORMAT_VERSION}")
    return config


def load_exit_heads(folder: str | os.PathLike, model) -> dict[int, ExitHead]:
    """The exit heads saved in ``folder`` by :func:`save_exit_heads`, rebuilt for ``model`` with their weights
    (exactly as saved). A model of another shape (layers, width, labels) is refused with a message."""
    from safetensors.torch import load_file

    config = read_exit_config(folder)
    base = unwrap(model)
    saved = config.get("model") or {}
    now = {"class": type(base).__name__, "num_layers": num_layers(base), "hidden_size": hidden_size(base),
           "output_size": output_size(base)}
    diffs = [f"{k}: {saved[k]} in {CONFIG_FILE}, {v} now" for k, v in now.items() if k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"the exit heads in {folder} were trained on another model ({'; '.join(diffs)}); load them "
                         "with the student they were saved with")
    tensors = load_file(str(Path(folder) / HEADS_FILE))
    heads: dict[int, ExitHead] = {}
    for layer in config["layers"]:
        info = config["heads"][str(layer)]
        head_kind = "linear" if info["style"] == "linear" else "copy"
        head = build_exit_head(base, head_kind, None if info.get("per_token") else info.get("pooling"))
        if head.style != info["style"]:
            raise ValueError(f"exit head {layer} in {folder} has style {info['style']!r}, but this model's head gives "
                             f"{head.style!r}; load the heads with the student they were saved with")
        head.dropout.p = float(info.get("dropout", head.dropout.p))
        prefix = f"layer_{layer}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"exit head {layer} in {folder} does not fit this model: {exc}") from None
        heads[int(layer)] = head.eval()
    return heads


# ---------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def first_layers(model, count: int) -> Iterator[nn.Module]:
    """Within the block, ``model``'s layer list holds only its first ``count`` layers (the others are not run).

    The model itself is changed for the duration: do not run it from another thread meanwhile."""
    base = unwrap(model)
    total = num_layers(base)
    if not 0 <= count <= total:
        raise ValueError(f"cannot run the first {count} layers of a {total}-layer model")
    name = find_layer_list(base, total)
    parent_name, _, attr = name.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(layers)[:count]))
    try:
        yield base
    finally:
        setattr(parent, attr, layers)


def _backbone(base) -> nn.Module:
    prefix = getattr(base, "base_model_prefix", "")
    inner = getattr(base, prefix, None) if prefix else None
    if not isinstance(inner, nn.Module):
        raise ValueError(f"{type(base).__name__} has no base model under {prefix!r}; cannot run it to an early exit")
    return inner


@contextlib.contextmanager
def _without_pooler(backbone: nn.Module) -> Iterator[None]:
    """The exit heads pool for themselves: the backbone's own pooler (BERT's) does not run within the block."""
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module):
        backbone.pooler = None
    try:
        yield
    finally:
        if isinstance(pooler, nn.Module):
            backbone.pooler = pooler


def _model_inputs(module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    allowed = forward_parameters(module)
    return {k: v for k, v in inputs.items() if v is not None and (allowed is None or k in allowed)}


def exit_logits(model, heads: Mapping[int, ExitHead], **inputs) -> dict[int, torch.Tensor]:
    """Every exit's logits, and the model's own under its number of layers, from one full forward."""
    base = unwrap(model)
    out = base(**_model_inputs(base, inputs), output_hidden_states=True)
    mask = inputs.get("attention_mask")
    logits = {layer: head(out.hidden_states[layer].to(next(head.parameters()).dtype), mask)
              for layer, head in sorted(heads.items())}
    logits[num_layers(base)] = out.logits
    return logits


def predict_exit_logits(model, heads: Mapping[int, ExitHead], dataset, data_collator, *, batch_size: int = 32,
                        desc: str = "exits") -> dict[int, np.ndarray]:
    """Every exit's logits (and the model's own, under its number of layers) for each row of a tokenized
    ``dataset``, in order, from one full forward per batch."""
    import numpy as np
    from tqdm.auto import tqdm

    model.eval()
    for head in heads.values():
        head.eval()
    device = next(model.parameters()).device
    names = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    out: dict[int, list] = {}
    with torch.inference_mode():
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in data_collator([{k: r[k] for k in names} for r in rows]).items()
                     if k in names}
            for layer, logits in exit_logits(model, heads, **batch).items():
                out.setdefault(layer, []).append(logits.float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in sorted(out.items())}


def run_parameters(model, heads: Mapping[int, ExitHead], exit_layer: int) -> int:
    """Parameters that run up to ``exit_layer``: everything but the later layers and the model's own head, plus
    the exit head (the whole model for its last layer)."""
    base = unwrap(model)
    total = num_layers(base)
    if exit_layer == total:
        return sum(p.numel() for p in base.parameters())
    layers = layer_list_of(base)
    skipped = {id(p) for layer in list(layers)[exit_layer:] for p in layer.parameters()}
    head = {int(k): v for k, v in heads.items()}[int(exit_layer)]
    own_head = {id(p) for path in head.sources.values() for p in base.get_submodule(path).parameters()}
    if not head.sources:  # a linear head replaces the model's classifier
        own_head = {id(p) for n, p in base.named_parameters() if not n.startswith(base.base_model_prefix + ".")}
    pooler = getattr(_backbone(base), "pooler", None)
    if isinstance(pooler, nn.Module):  # the backbone's pooler does not run before an exit
        own_head |= {id(p) for p in pooler.parameters()}
    keep = [p for p in base.parameters() if id(p) not in skipped and id(p) not in own_head]
    return sum(p.numel() for p in keep) + sum(p.numel() for p in head.parameters())


class EarlyExitModel(nn.Module):
    """A model that stops after layer ``exit_layer`` and answers with that layer's exit head.

    ``exit_layer=None`` or the model's number of layers runs the whole model (its own head). The
    output is the model's usual output class with ``logits`` (and ``loss`` when ``labels`` are given).
    """

    def __init__(self, model, heads: Mapping[int, ExitHead], exit_layer: int | None = None):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({str(k): v for k, v in sorted(heads.items())})
        self.kind = task_kind(model)
        self.exit_layer = self.check_layer(exit_layer)

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    @property
    def exit_layers(self) -> list[int]:
        """The layers with an exit head, and the last layer (the model's own head)."""
        return sorted({*(int(k) for k in self.heads), self.num_layers})

    def check_layer(self, layer: int | None) -> int | None:
        if layer is None or layer == self.num_layers:
            return layer
        if str(layer) not in self.heads:
            raise ValueError(f"no exit after layer {layer}; this model exits after layers {self.exit_layers}")
        return layer

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, exit_layer: int | None = None, **kwargs) -> EarlyExitModel:
        """The student saved in ``folder`` (its head class from its config) with the exit heads saved next to it."""
        import transformers
        from transformers import AutoConfig

        read_exit_config(folder)
        config = AutoConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise ValueError(f"{folder}/config.json names no model class (architectures: {architectures!r})")
        model = model_class.from_pretrained(folder, **kwargs).eval()
        return cls(model, load_exit_heads(folder, model), exit_layer=exit_layer).eval()

    def forward(self, input_ids=None, attention_mask=None, labels=None, exit_layer: int | None = None, **inputs):
        layer = self.check_layer(exit_layer) if exit_layer is not None else self.exit_layer
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        base = unwrap(self.model)
        if layer is None or layer == self.num_layers:
            return base(**_model_inputs(base, inputs), **({"labels": labels} if labels is not None else {}))
        head = self.heads[str(layer)]
        backbone = _backbone(base)
        with first_layers(base, layer), _without_pooler(backbone):
            out = backbone(**_model_inputs(backbone, inputs))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = head(hidden.to(next(head.parameters()).dtype), attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return _output_class(self.kind)(loss=loss, logits=logits)


def _output_class(kind: str):
    from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput

    return {"sequence_classification": SequenceClassifierOutput, "token_classification": TokenClassifierOutput,
            "masked_lm": MaskedLMOutput}[kind]


# ---------------------------------------------------------------------------------------------- export
def export_exit_model(model, heads: Mapping[int, ExitHead], exit_layer: int, folder: str | os.PathLike | None = None,
                      tokenizer=None):
    """A plain transformers model of the first ``exit_layer`` layers of ``model`` with that exit's head in place
    of its own (a copy; ``model`` is unchanged), saved to ``folder`` when given. Works for copied heads of
    sequence and token classifiers; a masked LM's copied head (its projection is tied to the embeddings) and
    linear heads do not fit the model's own classes: run those with :class:`EarlyExitModel`."""
    base = unwrap(model)
    if str(exit_layer) not in {str(k) for k in heads}:
        raise ValueError(f"no exit head after layer {exit_layer}; there are heads after layers {sorted(map(int, heads))}")
    head = {int(k): v for k, v in heads.items()}[int(exit_layer)]
    kind = task_kind(base)
    if head.style == "linear" or kind == "masked_lm":
        raise ValueError(f"an exit head of style {head.style!r} on a {kind} model has no place in "
                         f"{type(base).__name__}; run it with hf_distill.early_exit.EarlyExitModel instead")
    if head.pooling == "mean" and not head.per_token:
        raise ValueError(f"exit head {exit_layer} reads the mean over tokens, but {type(base).__name__}'s own head "
                         "reads the first token; run it with hf_distill.early_exit.EarlyExitModel instead")
    out = copy.deepcopy(base)
    name = find_layer_list(out)
    parent_name, _, attr = name.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:exit_layer]))
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(getattr(out.config, key, None), int):
            setattr(out.config, key, int(exit_layer))
    with torch.no_grad():
        for part, path in head.sources.items():
            out.get_submodule(path).load_state_dict(head.parts[part].state_dict())  # cast to the model's dtype
    dropout = next((m for n, m in out.named_children() if isinstance(m, nn.Dropout)), None)
    if dropout is not None and head.style in ("pooler_classifier", "token_linear", "first_token_mlp"):
        dropout.p = head.dropout.p
    out.config.early_exit = {"exit_layer": int(exit_layer), "of_layers": num_layers(base), "head": head.style}
    if folder is not None:
        out.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
    return out
