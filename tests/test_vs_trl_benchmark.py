"""benchmarks/vs_trl.py: the hf_distill side on tiny models (TRL is not needed), its measurements and summary."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_trl  # noqa: E402
import vs_trl_workers as workers  # noqa: E402

TINY = dict(layers=2, hidden=32, vocab=97, batch=2, seq=12, max_new_tokens=4)


def gkd_reference(student_logits, teacher_logits, labels, beta):
    """TRL's GKD generalized JSD written out: mixture log m = logsumexp(log p_S + log(1-b), log p_T + log b)."""
    s = F.log_softmax(student_logits[:, :-1].double(), -1)
    t = F.log_softmax(teacher_logits[:, :-1].double(), -1)
    m = torch.logsumexp(torch.stack([s + torch.log1p(torch.tensor(-beta)), t + torch.log(torch.tensor(beta))]), 0)
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    jsd = beta * kl_t + (1 - beta) * kl_s
    mask = labels[:, 1:] != -100
    return float(jsd[mask].sum() / mask.sum())


def move_away(student):
    """Move the student away from its teacher copy, so that the divergence is not ~0 (fp32 cancellation)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_off_policy_step_computes_gkd_loss_and_updates_student():
    cfg = workers.BenchConfig(**TINY, beta=0.3)
    side = workers.Side("hf_distill", "off_policy", cfg)
    try:
        batch = workers.make_batch(cfg, "off_policy", 0, side.device)
        teacher = side.trainer.teacher
        move_away(side.model)
        with torch.no_grad():
            expected = gkd_reference(side.model(input_ids=batch["input_ids"]).logits,
                                     teacher(input_ids=batch["input_ids"]).logits, batch["labels"], cfg.beta)
        before = [p.detach().clone() for p in side.model.parameters()]
        record = side.step(0)
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert expected > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, side.model.parameters()))  # an optimizer step ran
        assert record["cpu_s"] > 0 and record["wall_s"] > 0 and record["sampled"] is None
        assert record["mem_peak"] >= record["mem_start"] > 0
        # the same index gives the same batch on both sides; the next one differs
        again = workers.make_batch(cfg, "off_policy", 0, side.device)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert not torch.equal(workers.make_batch(cfg, "off_policy", 1, side.device)["input_ids"], batch["input_ids"])
    finally:
        side.close()


def test_on_policy_step_trains_on_the_students_samples_with_the_gkd_loss():
    cfg = workers.BenchConfig(**TINY)
    side = workers.Side("hf_distill", "on_policy", cfg)
    try:
        move_away(side.model)
        before = copy.deepcopy(side.model).eval()
        record = side.step(0)
        sampled = torch.tensor(record["batch"]["input_ids"])
        prompts = workers.make_batch(cfg, "on_policy", 0, side.device)["prompts"]
        assert sampled.shape == (cfg.batch, cfg.seq)
        assert torch.equal(sampled[:, :cfg.prompt_len], prompts)
        assert torch.tensor(record["sampled"]).shape == (cfg.batch, cfg.max_new_tokens)
        labels = torch.tensor(record["batch"]["labels"])
        assert (labels[:, :cfg.prompt_len] == -100).all() and torch.equal(labels[:, cfg.prompt_len:],
                                                                          sampled[:, cfg.prompt_len:])
        # the loss is the GKD JSD over the sampled completion tokens, with the weights before the step
        with torch.no_grad():
            expected = gkd_reference(before(input_ids=sampled).logits, side.trainer.teacher(input_ids=sampled).logits,
                                     labels, cfg.beta)
        assert record["loss"] == pytest.approx(expected, rel=1e-5)
        assert 0 < record["generate_s"] < record["wall_s"]
        # the same step index samples the same completions (the benchmark's rounds are reproducible)
        assert side.step(0)["sampled"] == record["sampled"]
    finally:
        side.close()


def test_floor_does_the_model_work_and_takes_only_off_policy():
    cfg = workers.BenchConfig(**TINY)
    with pytest.raises(ValueError, match="floor"):
        workers.Side(workers.FLOOR, "on_policy", cfg)
    side = workers.Side(workers.FLOOR, "off_policy", cfg)
    batch = workers.make_batch(cfg, "off_policy", 0, side.device)
    with torch.no_grad():
        s, t = side.model(input_ids=batch["input_ids"]).logits, side.trainer.teacher(input_ids=batch["input_ids"]).logits
    record = side.step(0)
    assert record["loss"] == pytest.approx(float((s * t).sum() / cfg.batch), rel=1e-5)
    assert side.model.transformer.h[0].mlp.c_fc.weight.grad is None  # zeroed after the update


def test_models_are_the_same_in_every_process():
    cfg = workers.BenchConfig(**TINY)
    (t1, s1), (t2, s2) = workers.build_models(cfg), workers.build_models(cfg)
    for a, b in zip([*t1.parameters(), *s1.parameters()], [*t2.parameters(), *s2.parameters()]):
        assert torch.equal(a, b)
    assert s1.config.n_layer == 1 and t1.config.n_layer == 2
    assert t1.config.resid_pdrop == t1.config.embd_pdrop == t1.config.attn_pdrop == 0.0


PEAK_MEMORY_CHECK = """
import torch
import vs_trl_workers as workers
memory = workers.PeakMemory(torch.device("cpu"))
held = torch.ones(16 << 20)  # 64 MiB, resident before the step: counted in the start, not the step
memory.reset()
temporary = torch.ones(32 << 20)  # 128 MiB, freed before the read
del temporary
start, peak = memory.read()
assert peak - start >= 120 << 20, (start, peak)
assert start >= 60 << 20, start
"""


def test_peak_memory_sees_an_allocation_inside_the_step():
    # A fresh process: in a long-lived one (this test session) memory freed by earlier tests can stay resident in
    # the allocator, and a new allocation reuses it without raising the resident set; the benchmark's workers are
    # fresh processes too.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHECK], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root / "benchmarks")})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_summary_ratios_and_loss_agreement():
    def rec(cpu, start, peak, loss, sampled=None, timed=True):
        return {"cpu_s": cpu, "wall_s": cpu, "generate_s": 0.0, "mem_start": start, "mem_peak": peak, "loss": loss,
                "sampled": sampled, "timed": timed}

    records = {"hf_distill": [rec(99, 0, 9, 1.0, timed=False), rec(2, 10, 14, 1.0), rec(4, 10, 16, 2.0),
                              rec(3, 10, 15, 3.0)],
               "trl": [rec(99, 0, 9, 1.0, timed=False), rec(4, 10, 20, 1.0), rec(8, 10, 30, 2.0 * (1 + 4e-6)),
                       rec(6, 10, 40, 3.0)]}
    out = vs_trl.summarize("off_policy", records, "cpu")
    assert out["time_ratio"] == pytest.approx(3 / 6)
    assert out["mem_ratio"] == pytest.approx((15 - 10) / (30 - 10))
    assert out["peak_rss_ratio"] == pytest.approx(15 / 30)
    assert out["loss_rel_diff"] == pytest.approx(4e-6 / (1 + 4e-6), rel=1e-6)
    assert out["loss_steps"] == "every step (4)"
    # on-policy with different samples: step 0 is compared on hf_distill's batch, as TRL scored it
    records["hf_distill"] = [dict(r, sampled=[[1, 2]]) for r in records["hf_distill"]]
    records["trl"] = [dict(r, sampled=[[1, 3]]) for r in records["trl"]]
    records["hf_distill"][0]["trl_loss_same_batch"] = 1.0 + 2e-6
    out = vs_trl.summarize("on_policy", records, "cpu")
    assert out["loss_rel_diff"] == pytest.approx(2e-6 / (1 + 2e-6), rel=1e-6)
    assert out["losses"][0] == (1.0, 1.0 + 2e-6)
    del records["hf_distill"][0]["trl_loss_same_batch"]  # no common batch: not applicable, with the reason
    out = vs_trl.summarize("on_policy", records, "cpu")
    assert out["loss_rel_diff"] is None and "not applicable" in out["loss_note"]
    records["floor"] = [rec(1, 0, 1, 0.0, timed=False)] + [rec(c, 0, 1, 0.0) for c in (1, 3, 2)]
    assert vs_trl.summarize("off_policy", records, "cpu")["floor_ratio"] == pytest.approx(2 / 6)


def test_worker_process_protocol_runs_the_hf_distill_side():
    cfg = workers.BenchConfig(**TINY)
    records = vs_trl.run_mode("off_policy", cfg, steps=1, warmup=1, systems=("hf_distill",))
    steps = records["hf_distill"]
    assert [r["timed"] for r in steps] == [False, True]
    assert steps[0]["loss"] > 0 and steps[1]["loss"] > 0 and steps[0]["loss"] != steps[1]["loss"]


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--modes", "sideways"])
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--seq", "8", "--max_new_tokens", "8"])
    opts = vs_trl.parse_args(["--modes", "on_policy", "--steps", "2", "--vocab", "300"])
    assert opts.modes == ["on_policy"] and opts.steps == 2 and opts.vocab == 300
