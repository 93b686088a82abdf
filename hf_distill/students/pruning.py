"""Narrower students: width pruning of attention heads, FFN neurons and hidden channels.

Importance is activation-based, as in Minitron (Sreenivas et al. 2024; Muralidharan et al. 2024),
measured on a little calibration data with the teacher frozen:

* a **head**'s score is the norm of its attention output (the head's slice of the input of the
  attention output projection);
* an **FFN neuron**'s, the norm of its activation (the input of the FFN's down projection);
* a **hidden channel**'s, the norm of the LayerNorm / RMSNorm outputs in that channel, summed over
  every norm of the model.

Each norm is taken over a sample's real (unpadded) positions (L2), then averaged over the samples
(Minitron's "L2 over the sequence, mean over the batch"). Each layer keeps its own most important
heads and neurons; hidden channels are kept model-wide. Kept units keep their order and their
weights are copied exactly, so a student with every unit kept is the teacher, output for output.

Families: BERT-style encoders (``BertModel`` / ``BertFor*``; BERT ties the hidden size to
``heads x head size``, so pruning heads prunes the hidden size with them: ``hidden = heads x
head_dim``) and Llama-style decoders (``LlamaForCausalLM`` and the models sharing its layout;
grouped-query attention is pruned by whole key/value groups, so ``heads`` must be a multiple of
the group size). Other families, and shapes a family cannot take, are refused with a message.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..modeling import unwrap

CRITERION = "activation norms on calibration data (L2 over positions, mean over samples; Minitron)"

# Parameter name (without the model's prefix) -> what each dimension indexes: "hidden", "heads", "kv",
# "ffn" (per layer: the layer number comes from the name) or None (kept whole).
BERT_AXES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", (None, "hidden")),
    (r"embeddings\.LayerNorm\.(weight|bias)", ("hidden",)),
    (r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight", ("heads", "hidden")),
    (r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.bias", ("heads",)),
    (r"encoder\.layer\.\d+\.attention\.output\.dense\.weight", ("hidden", "heads")),
    (r"encoder\.layer\.\d+\.intermediate\.dense\.weight", ("ffn", "hidden")),
    (r"encoder\.layer\.\d+\.intermediate\.dense\.bias", ("ffn",)),
    (r"encoder\.layer\.\d+\.output\.dense\.weight", ("hidden", "ffn")),
    (r"encoder\.layer\.\d+\.(attention\.output|output)\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", ("hidden",)),
    (r"pooler\.dense\.weight", ("hidden", "hidden")),
    (r"pooler\.dense\.bias", ("hidden",)),
    (r"cls\.predictions\.transform\.dense\.weight", ("hidden", "hidden")),
    (r"cls\.predictions\.transform\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", ("hidden",)),
    (r"cls\.predictions\.decoder\.weight", (None, "hidden")),
    (r"cls\.predictions\.(decoder\.)?bias", (None,)),
    (r"classifier\.weight", (None, "hidden")),
    (r"classifier\.bias", (None,)),
]
LLAMA_AXES = [
    (r"(model\.)?embed_tokens\.weight", (None, "hidden")),
    (r"(model\.)?layers\.\d+\.self_attn\.q_proj\.weight", ("heads", "hidden")),
    (r"(model\.)?layers\.\d+\.self_attn\.q_proj\.bias", ("heads",)),
    (r"(model\.)?layers\.\d+\.self_attn\.(k|v)_proj\.weight", ("kv", "hidden")),
    (r"(model\.)?layers\.\d+\.self_attn\.(k|v)_proj\.bias", ("kv",)),
    (r"(model\.)?layers\.\d+\.self_attn\.o_proj\.weight", ("hidden", "heads")),
    (r"(model\.)?layers\.\d+\.self_attn\.o_proj\.bias", ("hidden",)),
    (r"(model\.)?layers\.\d+\.mlp\.(gate|up)_proj\.weight", ("ffn", "hidden")),
    (r"(model\.)?layers\.\d+\.mlp\.(gate|up)_proj\.bias", ("ffn",)),
    (r"(model\.)?layers\.\d+\.mlp\.down_proj\.weight", ("hidden", "ffn")),
    (r"(model\.)?layers\.\d+\.mlp\.down_proj\.bias", ("hidden",)),
    (r"(model\.)?(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight", ("hidden",)),
    (r"lm_head\.weight", (None, "hidden")),
    (r"(lm_head|score)\.bias", (None,)),
    (r"score\.weight", (None, "hidden")),
]


def family(model) -> str:
    model_type = getattr(unwrap(model).config, "model_type", None)
    if model_type == "bert":
        return "bert"
    if hasattr(unwrap(model).config, "num_key_value_heads") and all(
            hasattr(unwrap(model).config, a) for a in ("head_dim", "intermediate_size")):
        names = {n for n, _ in unwrap(model).named_modules()}
        if any(n.endswith("self_attn.o_proj") for n in names) and any(n.endswith("mlp.down_proj") for n in names):
            return "llama"
    raise ValueError(f"width pruning supports BERT-style encoders and Llama-style decoders; "
                     f"{type(unwrap(model)).__name__} (model_type {model_type!r}) is neither")


def _modules(model, kind: str):
    """(layer index, module) pairs whose input (or output, for norms) carries ``kind``'s units."""
    fam = family(model)
    patterns = {
        ("bert", "heads"): r"encoder\.layer\.(\d+)\.attention\.output\.dense$",
        ("bert", "ffn"): r"encoder\.layer\.(\d+)\.output\.dense$",
        ("bert", "hidden"): r"(LayerNorm)$",
        ("llama", "heads"): r"layers\.(\d+)\.self_attn\.o_proj$",
        ("llama", "ffn"): r"layers\.(\d+)\.mlp\.down_proj$",
        ("llama", "hidden"): r"(layernorm|\.norm)$",
    }
    pattern = re.compile(patterns[fam, kind])
    for name, module in unwrap(model).named_modules():
        m = pattern.search(name)
        if m:
            yield (int(m.group(1)) if kind != "hidden" else 0), name, module


@torch.no_grad()
def importance(model, batches: Iterable[dict]) -> dict[str, dict[int, torch.Tensor]]:
    """Per-unit activation scores: ``{"heads": {layer: (heads,)}, "ffn": {layer: (neurons,)}, "hidden": {0: (H,)}}``."""
    base = unwrap(model)
    config = base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sums: dict[str, dict[int, torch.Tensor]] = {"heads": defaultdict(float), "ffn": defaultdict(float),
                                                "hidden": defaultdict(float)}
    state = {"mask": None, "samples": 0}

    def score(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if state["mask"] is not None and state["mask"].shape == x.shape[:2]:
            x = x * state["mask"][..., None]
        return x.pow(2).sum(1).sqrt().sum(0)  # L2 over positions per sample, summed over samples (mean later)

    handles = []
    for kind in ("heads", "ffn"):
        for layer, _, module in _modules(model, kind):
            def pre(mod, args, kind=kind, layer=layer):
                x = args[0]
                if kind == "heads":
                    x = x.reshape(*x.shape[:2], -1, head_dim).pow(2).sum(-1).sqrt()  # per-head norm per position
                sums[kind][layer] = sums[kind][layer] + score(x)
            handles.append(module.register_forward_pre_hook(pre))
    for _, _, module in _modules(model, "hidden"):
        def post(mod, args, out):
            sums["hidden"][0] = sums["hidden"][0] + score(out)
        handles.append(module.register_forward_hook(post))
    was_training = base.training
    base.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            state["mask"] = mask.float() if mask is not None else None
            state["samples"] += int(batch["input_ids"].shape[0])
            base(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    finally:
        for h in handles:
            h.remove()
        base.train(was_training)
    if not state["samples"]:
        raise ValueError("width pruning needs calibration data: no batch was given")
    return {kind: {layer: v / state["samples"] for layer, v in values.items()} for kind, values in sums.items()}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the rows of kept heads (``size`` rows each)."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def plan(model, scores, *, heads: int | None, intermediate: int | None, hidden: int | None) -> dict:
    """Which units each layer keeps, after checking the requested counts against the family's constraints."""
    config = unwrap(model).config
    fam = family(model)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv
    heads = n_heads if heads is None else heads
    intermediate = config.intermediate_size if intermediate is None else intermediate
    if fam == "bert" and hidden is None:
        hidden = heads * head_dim
    hidden = config.hidden_size if hidden is None else hidden
    for name, value, total in (("heads", heads, n_heads), ("intermediate", intermediate, config.intermediate_size),
                               ("hidden", hidden, config.hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= total:
            raise ValueError(f"{name} must be an integer from 1 to the teacher's {total}, got {value!r}")
    if fam == "bert" and hidden != heads * head_dim:
        raise ValueError(f"BERT ties the hidden size to heads x head size ({head_dim}): with {heads} heads the hidden "
                         f"size must be {heads * head_dim}, got {hidden}; prune both together (--heads {heads} "
                         f"--hidden {heads * head_dim}) or keep the heads")
    if heads % group:
        raise ValueError(f"the teacher shares each key/value head among {group} query heads (grouped-query "
                         f"attention), so heads are pruned by whole groups: heads must be a multiple of {group}, got "
                         f"{heads}")
    keep: dict = {"hidden": _top(scores["hidden"][0], hidden), "heads": {}, "kv": {}, "ffn": {}}
    for layer, s in scores["heads"].items():
        kv_units = _top(s.reshape(n_kv, group).sum(-1), heads // group)  # whole groups
        q_units = (kv_units[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        keep["heads"][layer] = _expand(q_units, head_dim)
        keep["kv"][layer] = _expand(kv_units, head_dim)
    for layer, s in scores["ffn"].items():
        keep["ffn"][layer] = _top(s, intermediate)
    keep["counts"] = {"heads": heads, "kv_heads": heads // group, "intermediate": intermediate, "hidden": hidden,
                      "head_dim": head_dim}
    return keep


def _axes(name: str, fam: str):
    for pattern, axes in (BERT_AXES if fam == "bert" else LLAMA_AXES):
        if re.search(rf"(^|\.){pattern}$", name):
            return axes
    raise ValueError(f"width pruning does not know how to slice parameter {name!r} of this model")


def prune_width(teacher, batches: Iterable[dict], *, heads: int | None = None, intermediate: int | None = None,
                hidden: int | None = None) -> tuple[nn.Module, dict]:
    """A narrower copy of ``teacher``: its most important heads, FFN neurons and hidden channels, weights copied.

    ``batches`` are calibration batches (``input_ids``, ``attention_mask``); counts left as None keep
    the teacher's. Returns ``(student, info)``; ``info`` records the criterion, the counts and every
    kept index, as ``distillation_init.json`` stores them.
    """
    base = unwrap(teacher)
    fam = family(base)
    keep = plan(base, importance(base, batches), heads=heads, intermediate=intermediate, hidden=hidden)
    counts = keep["counts"]
    config = copy.deepcopy(base.config)
    config.hidden_size, config.intermediate_size = counts["hidden"], counts["intermediate"]
    config.num_attention_heads = counts["heads"]
    if fam == "llama":
        config.num_key_value_heads, config.head_dim = counts["kv_heads"], counts["head_dim"]
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    student = type(base)(config).to(device=device, dtype=dtype)
    source = base.state_dict()
    target = {}
    for name, value in student.state_dict().items():
        tensor = source[name]
        layer = re.search(r"layers?\.(\d+)\.", name)
        for dim, kind in enumerate(_axes(name, fam)):
            if kind is None:
                continue
            index = keep["hidden"] if kind == "hidden" else keep[kind][int(layer.group(1))]
            tensor = tensor.index_select(dim, index.to(tensor.device))
        if tensor.shape != value.shape:
            raise ValueError(f"pruned {name} has shape {tuple(tensor.shape)}, the narrower model expects "
                             f"{tuple(value.shape)}")
        target[name] = tensor.clone()
    student.load_state_dict(target, strict=True)
    info = {"width_pruning": {"criterion": CRITERION, **counts,
                              "kept_hidden": keep["hidden"].tolist(),
                              "kept_heads": {layer: (idx[::counts["head_dim"]] // counts["head_dim"]).tolist()
                                             for layer, idx in keep["heads"].items()},
                              "kept_neurons": {layer: idx.tolist() for layer, idx in keep["ffn"].items()}}}
    return student, info


def calibration_batches(tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 128):
    """Tokenised calibration batches from a list of texts."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("width pruning needs calibration text: the calibration data holds no non-empty line")
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        yield {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
