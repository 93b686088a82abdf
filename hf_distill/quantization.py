"""Quantized students: quantization-aware training (QAT) with the distillation loss, export of a real int8
model, post-training dynamic int8 (PTQ), and a safetensors format for both.

Tooling: PyTorch's eager-mode ``torch.ao.quantization`` with the ``x86`` (fbgemm) backend, chosen because
it is the one path in torch 2.13 whose int8 kernels run fast on a CPU without ``torch.compile`` and
without another dependency: ``prepare_qat`` puts fake quantization into the student, ``convert`` turns the
trained fake-quantized student into ``torch.ao.nn.quantized`` modules (int8 GEMMs through fbgemm).
(``torch.ao.quantization`` warns that it is deprecated in favour of torchao; the warnings are silenced
inside this module's calls and the path still works in torch 2.13.)

Why not torchao (checked with torchao 0.18.0, the PyPI release for torch 2.13): it installs without
pulling another torch (its wheel declares no dependency; ``pip download torchao --no-deps`` with the
project's constraints) and imports on the CPU build, but (1) its eager int8 path is far slower than fp32
on a CPU: a 384 -> 1536 -> 384 MLP on 2,048 tokens, one thread (two runs on a shared machine), takes
3.9-4.7 s with ``Int8DynamicActivationInt8WeightConfig`` against 0.14-0.21 s in fp32 and 0.09-0.10 s with
this module's fbgemm dynamic int8, which would undo the latency a quantized student is for; (2) its quantized weights are tensor subclasses that safetensors refuses to
store ("Attempted to access the data pointer on an invalid python storage"), so the int8 students
could only be saved as pickles. The API here (``prepare_qat_student``, ``export_int8``,
``quantize_dynamic_int8``, ``save_int8`` / ``load_int8``) hides the toolkit, so a later port changes
this module only.

What is quantized, and why:

* every ``nn.Linear`` of the base model (attention Q/K/V/output, FFN, pooler): int8 weights (per output
  channel, symmetric) and int8 activations (per tensor, affine; input and output scales learnt by
  moving-average observers during QAT). Each Linear is wrapped in a ``QuantWrapper`` (quantize its input,
  dequantize its output), so everything between the Linears (softmax attention, GELU, residual adds,
  LayerNorm) stays fp32, as eager-mode int8 has no kernels for those on fp32 tensors;
* the word embedding: int8 weight-only, one float scale and offset per row
  (``per_channel_affine_float_qparams``): a lookup has no activation to quantize, and in a small student
  the vocabulary table is most of the bytes on disk;
* left fp32: the position and token-type embeddings (small; the int8 lookup kernel refuses BERT's
  expanded, non-contiguous token-type ids), every LayerNorm (int8 LayerNorm in eager mode needs quantized
  inputs and costs more accuracy than it saves), and the output head (``classifier`` and any module
  outside the base model: a few thousand weights that decide the logits).

The fake-quantized student is an ordinary ``nn.Module`` with extra parameters / buffers (the observers'
scales), so ``DistillationTrainer`` trains it unchanged and its checkpoints (safetensors through
``save_pretrained``) save and resume: observers and fake-quant modules load their own state.

An int8 model holds quantized tensors and packed weights, which safetensors cannot store; :func:`save_int8`
writes each as plain tensors (the int8 values, their scales and zero points) into ``model.safetensors``
plus ``quantization.json`` (what was quantized, how), and :func:`load_int8` rebuilds the same int8 modules
from the config and loads those tensors back: no pickle is read.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["QUANTIZATION_FILE", "dynamic_int8_plan", "export_int8", "fake_quant_modules", "freeze_qat_observers",
           "int8_linear_weight_bytes", "load_int8", "prepare_qat_student", "qat_plan", "quantize_dynamic_int8",
           "quantized_modules", "save_int8"]

QUANTIZATION_FILE = "quantization.json"
FORMAT = "hf_distill.int8"
WEIGHTS_FILE = "model.safetensors"


@contextlib.contextmanager
def quiet_quantization_warnings():
    """Silence torch.ao.quantization's deprecation notices (one per observer) inside our calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        yield


def set_backend(backend: str) -> None:
    engines = torch.backends.quantized.supported_engines
    if backend not in engines:
        raise ValueError(f"quantization backend {backend!r} is not available in this torch build; choose one "
                         f"of {[e for e in engines if e != 'none']}")
    torch.backends.quantized.engine = backend


def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + ".", getattr(model, prefix)
    raise ValueError(f"{type(model).__name__} has no base model (base_model_prefix {prefix!r}): int8 quantization "
                     "needs a transformers model whose output head sits outside its base model (e.g. "
                     "BertForSequenceClassification), so that the head can stay fp32")


def _plan(model: nn.Module, scheme: str, backend: str, exclude=()) -> dict:
    prefix, base = _base_model(model)
    excluded = set(exclude)
    linears = [prefix + n for n, m in base.named_modules() if type(m) is nn.Linear and prefix + n not in excluded]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer in its base model to quantize (already "
                         "quantized, or a model built from other layer types)")
    embedding = getattr(model.get_input_embeddings(), "__class__", None)
    embeddings = []
    if embedding is nn.Embedding:
        name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        if name not in excluded:
            embeddings.append(name)
    return {"format": FORMAT, "scheme": scheme, "backend": backend, "linears": linears, "embeddings": embeddings,
            "architecture": type(model).__name__}


def qat_plan(model: nn.Module, backend: str = "x86", exclude=()) -> dict:
    """Which modules :func:`prepare_qat_student` fake-quantizes (module names), without changing ``model``."""
    return _plan(model, "qat_static", backend, exclude)


def dynamic_int8_plan(model: nn.Module, backend: str = "x86", exclude=()) -> dict:
    """Which modules :func:`quantize_dynamic_int8` quantizes (module names), without changing ``model``."""
    return _plan(model, "dynamic", backend, exclude)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def qat_module_mapping() -> dict:
    """torch's default QAT module swaps, plus ``nn.Embedding`` -> its QAT version (fake-quantized weight),
    which torch leaves out of the defaults."""
    from torch.ao.nn import qat as nnqat
    from torch.ao.quantization.quantization_mappings import (
        get_default_qat_module_mappings,
    )

    return {**get_default_qat_module_mappings(), nn.Embedding: nnqat.Embedding}


def int8_module_mapping() -> dict:
    """torch's default fake-quant -> int8 module swaps, plus the QAT embedding -> int8 embedding."""
    from torch.ao.nn import qat as nnqat
    from torch.ao.nn import quantized as nnq
    from torch.ao.quantization.quantization_mappings import (
        get_default_static_quant_module_mappings,
    )

    return {**get_default_static_quant_module_mappings(), nnqat.Embedding: nnq.Embedding}


def _apply_qat_plan(model: nn.Module, plan: dict) -> nn.Module:
    from torch.ao import quantization as tq

    set_backend(plan["backend"])
    for name in plan["linears"]:
        parent, child = _parent(model, name)
        wrapper = tq.QuantWrapper(getattr(parent, child))
        wrapper.qconfig = tq.get_default_qat_qconfig(plan["backend"])
        setattr(parent, child, wrapper)
    for name in plan["embeddings"]:
        model.get_submodule(name).qconfig = tq.default_embedding_qat_qconfig
    was_training = model.training
    tq.prepare_qat(model.train(), mapping=qat_module_mapping(), inplace=True)  # prepare_qat wants training mode
    model.train(was_training)
    model.hf_distill_quantization = plan
    return model


def prepare_qat_student(model: nn.Module, *, backend: str = "x86", exclude=()) -> nn.Module:
    """Fake-quantize ``model`` in place for quantization-aware training, and return it.

    Int8 weights (per channel) and activations (per tensor) on every ``nn.Linear`` of the base model and an
    int8 word embedding; LayerNorm, the other embeddings and the output head stay fp32 (see the module's
    docstring). ``exclude``: module names to keep fp32. Train it with ``DistillationTrainer`` as any student
    (a fp32 distilled student is the usual start), then :func:`export_int8`.
    """
    if getattr(model, "hf_distill_quantization", None):
        raise ValueError("this model is already prepared for quantization (prepare_qat_student was called on it)")
    plan = qat_plan(model, backend=backend, exclude=exclude)
    with quiet_quantization_warnings():
        return _apply_qat_plan(model, plan)


def fake_quant_modules(model: nn.Module) -> list[str]:
    """Names of the fake-quantization modules in ``model`` (empty for a fp32 or an exported int8 model)."""
    from torch.ao.quantization import FakeQuantizeBase

    return [n for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase)]


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """name -> class of every int8 module (``torch.ao.nn.quantized`` / ``.dynamic``) in ``model``."""
    return {n: type(m).__name__ for n, m in model.named_modules()
            if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
            and type(m).__name__ not in ("Quantize", "DeQuantize")}


def freeze_qat_observers(model: nn.Module) -> nn.Module:
    """Stop the activation / weight observers updating their ranges (fake quantization continues): for the
    last steps of QAT, and before comparing the fake-quantized model with its int8 export."""
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)
    return model


def export_int8(model: nn.Module) -> nn.Module:
    """A real int8 copy of a model prepared with :func:`prepare_qat_student` (``model`` is not changed): int8
    ``torch.ao.nn.quantized`` Linear and Embedding modules with the scales the fake quantization learnt, no
    fake-quant module left; runs on the CPU, in eval mode."""
    plan = getattr(model, "hf_distill_quantization", None)
    if not plan or plan.get("scheme") != "qat_static":
        raise ValueError("export_int8 needs a model prepared with prepare_qat_student (and trained); for a plain "
                         "fp32 student use quantize_dynamic_int8")
    from torch.ao import quantization as tq

    set_backend(plan["backend"])
    with quiet_quantization_warnings():
        exported = copy.deepcopy(model).cpu().eval()
        tq.convert(exported, mapping=int8_module_mapping(), inplace=True)
    exported.hf_distill_quantization = dict(plan)
    return exported


def _apply_dynamic_plan(model: nn.Module, plan: dict) -> nn.Module:
    from torch.ao import quantization as tq

    set_backend(plan["backend"])
    spec = {name: tq.per_channel_dynamic_qconfig for name in plan["linears"]}
    spec.update({name: tq.float_qparams_weight_only_qconfig for name in plan["embeddings"]})
    model = tq.quantize_dynamic(model.eval(), qconfig_spec=spec, dtype=torch.qint8, inplace=True)
    model.hf_distill_quantization = plan
    return model


def quantize_dynamic_int8(model: nn.Module, *, backend: str = "x86", exclude=()) -> nn.Module:
    """Post-training dynamic int8 of a (distilled) fp32 student; ``model`` is not changed. Int8 weights per
    channel on the same Linears and word embedding as :func:`prepare_qat_student`; activations are
    quantized at run time, per batch (no calibration data needed)."""
    if getattr(model, "hf_distill_quantization", None):
        raise ValueError("quantize_dynamic_int8 needs a fp32 model; this one is already quantized or prepared")
    plan = dynamic_int8_plan(model, backend=backend, exclude=exclude)
    with quiet_quantization_warnings():
        return _apply_dynamic_plan(copy.deepcopy(model).cpu(), plan)


def int8_linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the Linear weights: ``{"fp32": ..., "int8": ...}`` summed over fp32 ``nn.Linear`` weights
    and over int8 Linear weights (one byte per value, scales not counted) of ``model``."""
    out = {"fp32": 0, "int8": 0}
    for module in model.modules():
        if type(module) is nn.Linear:
            out["fp32"] += module.weight.numel() * module.weight.element_size()
        elif type(module).__name__ == "Linear" and callable(getattr(module, "weight", None)):
            weight = module.weight()
            out["int8"] += weight.numel() * weight.element_size()
    return out


# ---------------------------------------------------------------------------------------------- safetensors
_SEP = "::"


def _flatten_state(state: dict) -> tuple[dict, dict]:
    """Quantized tensors, packed (weight, bias) tuples and dtypes -> plain tensors + JSON-able metadata."""
    tensors, meta = {}, {}

    def put(key, value):
        if value is None:
            meta[key] = {"kind": "none"}
        elif isinstance(value, torch.dtype):
            meta[key] = {"kind": "dtype", "dtype": str(value).removeprefix("torch.")}
        elif isinstance(value, (tuple, list)):
            meta[key] = {"kind": "tuple", "length": len(value)}
            for i, item in enumerate(value):
                put(f"{key}{_SEP}{i}", item)
        elif isinstance(value, torch.Tensor) and value.is_quantized:
            qscheme = value.qscheme()
            entry = {"kind": "quantized", "dtype": str(value.dtype).removeprefix("torch."),
                     "qscheme": str(qscheme).removeprefix("torch.")}
            tensors[f"{key}{_SEP}int"] = value.int_repr().contiguous()
            if qscheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                entry.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
            else:
                entry["axis"] = int(value.q_per_channel_axis())
                for part, qparams in (("scales", value.q_per_channel_scales()),
                                      ("zero_points", value.q_per_channel_zero_points())):
                    # torch keeps per-channel qparams as float64 / int64; they are float32 / int32 values
                    # (observers compute them so): stored in 4 bytes when that is exact, cast back on load.
                    small = qparams.to(torch.float32 if qparams.is_floating_point() else torch.int32)
                    exact = torch.equal(small.to(qparams.dtype), qparams)
                    tensors[f"{key}{_SEP}{part}"] = (small if exact else qparams).contiguous()
                    entry[f"{part}_dtype"] = str(qparams.dtype).removeprefix("torch.")
            meta[key] = entry
        elif isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
        else:
            raise TypeError(f"cannot store {key!r} of type {type(value).__name__} as safetensors")

    for key, value in state.items():
        put(key, value)
    return tensors, meta


def _unflatten_state(tensors: dict, meta: dict) -> dict:
    def get(key):
        entry = meta.get(key)
        if entry is None:
            return tensors[key]
        kind = entry["kind"]
        if kind == "none":
            return None
        if kind == "dtype":
            return getattr(torch, entry["dtype"])
        if kind == "tuple":
            return tuple(get(f"{key}{_SEP}{i}") for i in range(entry["length"]))
        values, dtype = tensors[f"{key}{_SEP}int"], getattr(torch, entry["dtype"])
        if "axis" in entry:
            scales, zero_points = (tensors[f"{key}{_SEP}{part}"].to(getattr(torch, entry[f"{part}_dtype"]))
                                   for part in ("scales", "zero_points"))
            return torch._make_per_channel_quantized_tensor(values, scales, zero_points, entry["axis"])
        quantized = torch._make_per_tensor_quantized_tensor(values, entry["scale"], entry["zero_point"])
        assert quantized.dtype == dtype, (quantized.dtype, dtype)
        return quantized

    top = {k.split(_SEP, 1)[0] for k in tensors} | {k for k in meta if _SEP not in k}
    return {key: get(key) for key in sorted(top)}


def save_int8(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write an int8 model (from :func:`export_int8` or :func:`quantize_dynamic_int8`) to ``folder``:
    ``config.json``, ``model.safetensors`` (int8 values, scales and zero points as plain tensors) and
    ``quantization.json``; the tokenizer too when given. :func:`load_int8` reads it back."""
    plan = getattr(model, "hf_distill_quantization", None)
    if not plan or fake_quant_modules(model) or not quantized_modules(model):
        raise ValueError("save_int8 needs an int8 model: export a QAT student with export_int8 or quantize a fp32 "
                         "one with quantize_dynamic_int8 first (a fp32 student saves with save_pretrained)")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flatten_state(model.state_dict())
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", FORMAT: json.dumps(meta)})
    model.config.save_pretrained(str(folder))
    (folder / QUANTIZATION_FILE).write_text(json.dumps({**plan, "torch": torch.__version__}, indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_int8(folder: str | Path) -> nn.Module:
    """The int8 model saved by :func:`save_int8` in ``folder``, in eval mode on the CPU (safetensors only)."""
    import transformers
    from safetensors import safe_open

    folder = Path(folder)
    plan_path, weights = folder / QUANTIZATION_FILE, folder / WEIGHTS_FILE
    if not plan_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no int8 model saved by save_int8 (needs {QUANTIZATION_FILE} and "
                                f"{WEIGHTS_FILE}); a fp32 model loads with from_pretrained")
    plan = json.loads(plan_path.read_text())
    if plan.get("format") != FORMAT or plan.get("scheme") not in ("qat_static", "dynamic"):
        raise ValueError(f"{plan_path}: not an {FORMAT} file (format {plan.get('format')!r}, scheme "
                         f"{plan.get('scheme')!r})")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    model_class = getattr(transformers, plan["architecture"], None)
    if model_class is None:
        raise ValueError(f"{plan_path}: transformers has no model class {plan['architecture']!r}")
    with safe_open(str(weights), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(FORMAT, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with quiet_quantization_warnings():
        skeleton = model_class(config).eval()  # fp32 shapes, then the same int8 modules as when it was saved
        if plan["scheme"] == "qat_static":
            _apply_qat_plan(skeleton, plan)
            skeleton = export_int8(skeleton)
        else:
            skeleton = _apply_dynamic_plan(skeleton, plan)
        state = _unflatten_state(tensors, meta)
        # The modules' serialization versions travel in ``_metadata``: without them the int8 Linears read the
        # state as their oldest (version 1) layout.
        state = collections.OrderedDict(state)
        state._metadata = getattr(skeleton.state_dict(), "_metadata", None)
        skeleton.load_state_dict(state, strict=True)
    skeleton.hf_distill_quantization = {k: v for k, v in plan.items() if k != "torch"}
    return skeleton.eval()
