"""Options that keep a big teacher next to the student: half precision, its own device, sharded across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.losses import kl_div_loss
from hf_distill.objectives import ModelTensors
from hf_distill.objectives.fused import with_head
from hf_distill.sources.frozen import check_device, moved
from test_fused_trainer import rows, tiny

HERE = Path(__file__).parent


def kl_trainer(tmp_path, fused="false", **kw):
    args = DistillationArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], task_weight=0.0,
                                 distillation=[{"loss": "kl", "temperature": 2.0, "fused": fused}], **kw)
    return DistillationTrainer(model=tiny("llama", 2, seed=2), teacher=tiny("llama", 3, seed=1), args=args)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_teacher_loss_in_float32(tmp_path, dtype):
    batch = default_data_collator(rows())
    expected_dtype = getattr(torch, dtype)
    by_path = {}
    for fused in ("false", "true"):
        trainer = kl_trainer(tmp_path / fused, fused=fused, teacher_dtype=dtype)
        assert {p.dtype for p in trainer.teacher.parameters()} == {expected_dtype}
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        assert loss.dtype == torch.float32
        by_path[fused] = float(loss.detach())
        # Reference: the half-precision teacher's logits, upcast, against the student's, in float32.
        with torch.no_grad():
            t_logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert t_logits.dtype == expected_dtype
        mask = batch["labels"][:, 1:] != -100
        reference = kl_div_loss(s_logits[:, :-1].float(), t_logits[:, :-1].float(), temperature=2.0, mask=mask)
        assert by_path[fused] == pytest.approx(float(reference), rel=2e-3 if fused == "true" else 1e-4)
    assert by_path["true"] == pytest.approx(by_path["false"], rel=2e-3)


def test_teacher_device(tmp_path):
    """teacher_device='cpu:0' is a device other than the student's torch.device('cpu') by equality, so the inputs go
    through the move to the teacher's device and its outputs come back (the same numbers, as it is the same memory)."""
    batch = default_data_collator(rows())
    for fused in ("false", "true"):
        default = kl_trainer(tmp_path / f"a{fused}", fused=fused)
        placed = kl_trainer(tmp_path / f"b{fused}", fused=fused, teacher_device="cpu:0")
        assert placed.teacher_source.device == torch.device("cpu", 0) != placed.accelerator.device
        assert placed.teacher_source.describe()["device"] == "cpu:0"
        assert {p.device.type for p in placed.teacher.parameters()} == {"cpu"}
        losses = []
        for trainer in (default, placed):
            trainer.model.train()
            losses.append(float(trainer.compute_loss(trainer.model, dict(batch)).detach()))
        assert losses[1] == losses[0], fused
    nested = moved({"a": torch.ones(2), "b": (torch.zeros(1), [torch.ones(1)]), "c": 3}, torch.device("cpu"))
    assert nested["c"] == 3 and isinstance(nested["b"], tuple) and isinstance(nested["b"][1], list)


def test_bad_teacher_device_and_sharding_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_device='gpu0' is not a device; give one such as cpu, cuda"):
        DistillationArguments(output_dir=str(tmp_path), teacher_device="gpu0")
    with pytest.raises(ValueError, match="a meta device holds no weights"):
        DistillationArguments(output_dir=str(tmp_path), teacher_device="meta")
    with pytest.raises(ValueError, match=r"teacher_device='cuda:99': this machine has (no cuda device|\d+ cuda)"):
        check_device("cuda:99", "teacher_device")
    with pytest.raises(ValueError, match="teacher_sharding must be auto, fsdp or none, got 'zero3'"):
        DistillationArguments(output_dir=str(tmp_path), teacher_sharding="zero3")
    for name, value in (("teacher_device", "cpu"), ("teacher_sharding", "fsdp")):
        args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], teacher_source="ema",
                                     **{name: value})
        with pytest.raises(ValueError, match=f"{name} applies to a frozen teacher, but the teacher source is 'ema'"):
            DistillationTrainer(model=tiny("llama", 2, seed=2), args=args)
    # One process: nothing to shard across, the teacher stays whole.
    single = kl_trainer(tmp_path / "single", teacher_sharding="fsdp")
    assert single.teacher_source.sharded is False


def test_two_processes_shard_the_teacher_and_run_fused_terms(tmp_path):
    """2 CPU processes (gloo): the FSDP2-sharded teacher holds half the parameters per process and gives the same
    step as a full copy per process; fused terms under DDP give the same step as dense ones."""
    out = tmp_path / "logs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "fsdp_teacher_step.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = json.loads(out.read_text())
    full, sharded, fused = logs["full_copy"], logs["sharded"], logs["fused"]
    assert full["world_size"] == sharded["world_size"] == 2
    assert (full["sharded"], sharded["sharded"]) == (False, True)
    assert full["teacher_local"] == full["teacher_full"]
    assert sharded["teacher_local"] == pytest.approx(sharded["teacher_full"] / 2, rel=0.02)
    assert fused["fused"] == [True, True] and full["fused"] == [False, False]
    for other in (sharded, fused):
        for key in ("loss", "grad_norm", "loss_jsd", "loss_clm", "param_sum"):
            assert other[key] == pytest.approx(full[key], rel=1e-5), key


def test_teacher_projection_is_copied_to_the_student_device_once_per_change():
    """with_head on another device (meta here: no data, only placement) copies the teacher's output projection once
    and reuses the copy until the weights change in place."""
    teacher = tiny("llama", 3, seed=1).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=[-1], logits_to_keep=1)
    meta = torch.device("meta")
    first = with_head(ModelTensors.from_output(out), teacher, device=meta)
    assert first.last_hidden_state.device == meta and first.head[0].device == meta
    assert first.head[0].shape == teacher.get_output_embeddings().weight.shape
    again = with_head(ModelTensors.from_output(out), teacher, device=meta)
    assert again.head[0] is first.head[0]
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(1.0)  # an in-place update (an EMA step, a reload)
    changed = with_head(ModelTensors.from_output(out), teacher, device=meta)
    assert changed.head[0] is not first.head[0]
    same_device = with_head(ModelTensors.from_output(out), teacher)
    assert same_device.head[0] is teacher.get_output_embeddings().weight
