"""Capture the query/key/value projections of chosen transformer layers during a forward pass.

MiniLM-style relation distillation needs Q, K and V of a layer, which models do not return.
:class:`QKVRecorder` hooks the three projection ``nn.Linear`` modules of each chosen layer's
self-attention and hands back their outputs, ``(batch, seq, width)`` each.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .modeling import layer_list

QUERY_NAMES = ("query", "q_lin", "q_proj", "q")
KEY_NAMES = ("key", "k_lin", "k_proj", "k")
VALUE_NAMES = ("value", "v_lin", "v_proj", "v")


def find_qkv(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The first (self-attention) query, key and value projections inside ``layer``."""
    found: dict[str, nn.Module] = {}
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        for role, names in (("q", QUERY_NAMES), ("k", KEY_NAMES), ("v", VALUE_NAMES)):
            if leaf in names and role not in found:
                found[role] = module
    if len(found) != 3:
        raise ValueError(
            f"could not find separate query/key/value projections in {type(layer).__name__} (found {sorted(found)}); "
            "attention_relation supports attention modules with separate q/k/v linear layers"
        )
    return found["q"], found["k"], found["v"]


class QKVRecorder:
    """Context manager: while active, records Q/K/V outputs of ``layers`` (indices into the layer list)."""

    def __init__(self, model: nn.Module, layers):
        self.model = model
        layers_module = layer_list(model)
        n = len(layers_module)
        self.layers = sorted({i % n for i in layers})
        self.modules = {i: find_qkv(layers_module[i]) for i in self.layers}
        self._handles: list = []
        self._store: dict[int, list[torch.Tensor | None]] = {}

    def __enter__(self):
        self._store = {i: [None, None, None] for i in self.layers}
        for i, mods in self.modules.items():
            for j, module in enumerate(mods):
                self._handles.append(module.register_forward_hook(self._hook(i, j)))
        return self

    def _hook(self, layer: int, slot: int):
        def hook(module, args, output):
            self._store[layer][slot] = output

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        store, self._store = self._store, {}
        out = {}
        n = len(layer_list(self.model))
        for i, (q, k, v) in store.items():
            if q is None or k is None or v is None:
                raise RuntimeError(f"layer {i}: query/key/value projections did not run in the forward pass")
            out[i] = (q, k, v)
            out[i - n] = out[i]  # negative indices too
        return out
