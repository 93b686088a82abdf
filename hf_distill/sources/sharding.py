"""A frozen teacher sharded across the processes of a distributed run, for inference only.

Under data parallelism every process would hold a full copy of the teacher. With
``teacher_sharding`` the teacher is instead wrapped with PyTorch's FSDP2 (``fully_shard``): each
process keeps ``1 / world_size`` of every parameter, and each transformer layer's weights are
all-gathered just before its forward and freed after it (``reshard_after_forward``), so a
process holds its shards plus one layer at a time. No gradient, optimiser state or backward pass
is involved (the teacher runs under ``torch.no_grad`` and is frozen).

* ``auto`` (default): shard when the student itself is trained with FSDP (``--fsdp``) on
  several processes; otherwise a full copy per process.
* ``fsdp``: shard whenever several processes run (DDP included, on CPU with gloo as well).
* ``none``: a full copy per process.

Every process must run the teacher on every step (the all-gathers are collective), which the
trainer does: each process computes its own micro-batch's teacher outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import layer_list

SHARDING_CHOICES = ("auto", "fsdp", "none")


def should_shard(mode: str, trainer) -> bool:
    """Whether the teacher is sharded in this run (see the module docs)."""
    if mode not in SHARDING_CHOICES:
        raise ValueError(f"teacher_sharding must be one of {SHARDING_CHOICES}, got {mode!r}")
    if mode == "none" or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    return mode == "fsdp" or bool(getattr(trainer, "is_fsdp_enabled", False))


def shard_for_inference(teacher: nn.Module, device: torch.device) -> nn.Module:
    """``teacher`` wrapped with FSDP2 over every process: per transformer layer, then the rest (embeddings, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    try:
        layers = list(layer_list(teacher))
    except (ValueError, AttributeError):
        layers = []  # no layer list found: one unit, gathered whole for each forward
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    return teacher


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds (its shards for a sharded model)."""
    total = 0
    for p in model.parameters():
        total += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return total
