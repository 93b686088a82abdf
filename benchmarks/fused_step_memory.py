"""Peak memory and time of one DistillationTrainer step, dense vs fused response terms, GPT-2-small shaped.

Teacher: 12 layers, hidden 768, 12 heads, vocabulary 50,257 (GPT-2 small, random weights); student:
the same with 6 layers. Batch 4 x 128 tokens, float32, one thread. The loss is the generalized JSD
(``jsd``, beta 0.5, T = 1) plus the causal-LM CE on the data (``--ce-weight``, 0 drops it), once with
``fused: false`` (both models' full logits, the chunked divergence on them) and once with
``fused: true`` (last hidden states and output projections, chunk by chunk; the models compute one
position of logits).

A step is ``compute_loss`` + backward + AdamW step + ``zero_grad(set_to_none=True)``, after
``--warmup`` steps (the optimiser state exists by then). Each method runs in its own fresh
subprocess, and the parent alternates them (dense, fused, dense, fused, ... ``--rounds`` times) so
that both see the same machine load. Memory is the peak resident set size minus the resident set
size just before the step (Linux: the kernel's high-water mark, reset through
``/proc/self/clear_refs`` before every step), over forward+backward (``mem_ratio``: where the
logits live) and over the whole step (``step_mem_ratio``: AdamW's own temporaries, the same for
both, included); the largest over the steps of a worker, the median over the workers of a method. Time is the median step time. Ratios are fused / dense; the
first step's loss of both methods is compared (same weights, same batch).

    python benchmarks/fused_step_memory.py                  # 2 rounds, 3 measured steps each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("dense", "fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--teacher-layers", type=int, default=12)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ce-weight", type=float, default=0.5, help="weight of the CE on the data (0: JSD only)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps per worker")
    p.add_argument("--rounds", type=int, default=2, help="workers per method, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak resident set size (VmHWM)
        fh.write("5")


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers as T

    from hf_distill import DistillationArguments, DistillationTrainer

    def gpt2(layers: int, seed: int):
        torch.manual_seed(seed)
        cfg = T.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=layers, n_head=args.hidden // 64,
                           n_positions=max(args.seq, 128), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return T.GPT2LMHeadModel(cfg)

    teacher, student = gpt2(args.teacher_layers, 1), gpt2(args.student_layers, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    fused = args.worker == "fused"
    terms = [{"loss": "jsd", "beta": args.beta, "temperature": 1.0, "fused": fused},
             {"loss": "task", "weight": args.ce_weight, "fused": fused}]
    with tempfile.TemporaryDirectory() as out:
        targs = DistillationArguments(output_dir=out, use_cpu=True, report_to=[], learning_rate=1e-4,
                                      distillation=terms, task_weight=args.ce_weight, disable_tqdm=True)
        trainer = DistillationTrainer(model=student, teacher=teacher, args=targs)
    assert all(t.fused == fused for t in trainer.objective.active_terms), "fused setting not applied"
    optimizer = trainer.create_optimizer()
    student.train()

    def step() -> tuple[float, int, int]:
        """One step; the peaks (bytes above the resident set size before it) of forward+backward and of the
        whole step (the optimiser's own temporaries included)."""
        before = _status_kib("VmRSS")
        _reset_peak()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        loss_peak = _status_kib("VmHWM") - before
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_peak = _status_kib("VmHWM") - before
        return float(loss.detach()), loss_peak * 1024, step_peak * 1024

    first_loss = None
    for _ in range(args.warmup):
        value, _, _ = step()
        first_loss = value if first_loss is None else first_loss
    peaks, step_peaks, times = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        value, loss_peak, step_peak = step()
        times.append(time.perf_counter() - start)
        peaks.append(loss_peak)
        step_peaks.append(step_peak)
        first_loss = value if first_loss is None else first_loss
    return {"method": args.worker, "peak_bytes": max(peaks), "peaks_bytes": peaks, "step_peak_bytes": max(step_peaks),
            "time_s": statistics.median(times), "times_s": times, "first_loss": first_loss,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": T.__version__}


# ------------------------------------------------------------------------------------- parent


def run_method(args, method: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method]
    for name in ("batch", "seq", "vocab", "teacher_layers", "student_layers", "hidden", "ce_weight", "beta",
                 "warmup", "steps", "threads"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    print(f"GPT-2-small-shaped teacher ({args.teacher_layers} layers) -> student ({args.student_layers} layers), "
          f"hidden {args.hidden}, vocab {args.vocab}, batch {args.batch} x {args.seq}, float32, "
          f"{args.threads} thread(s); jsd beta {args.beta} T 1 + CE x {args.ce_weight}; "
          f"{args.rounds} alternating rounds, {args.steps} measured steps each", flush=True)
    results = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            res = run_method(args, method)
            results[method].append(res)
            print(f"round {r}: {method:>5}: peak {res['peak_bytes'] / 2**20:8.1f} MiB over forward+backward, "
                  f"{res['step_peak_bytes'] / 2**20:8.1f} MiB over the whole step, "
                  f"step {res['time_s']:.3f} s, first loss {res['first_loss']:.6f}", flush=True)
    peak = {m: statistics.median(r["peak_bytes"] for r in results[m]) for m in METHODS}
    step_peak = {m: statistics.median(r["step_peak_bytes"] for r in results[m]) for m in METHODS}
    step = {m: statistics.median(r["time_s"] for r in results[m]) for m in METHODS}
    loss_d, loss_f = results["dense"][0]["first_loss"], results["fused"][0]["first_loss"]
    summary = {"dense_peak_mib": peak["dense"] / 2**20, "fused_peak_mib": peak["fused"] / 2**20,
               "mem_ratio": peak["fused"] / peak["dense"], "dense_step_peak_mib": step_peak["dense"] / 2**20,
               "fused_step_peak_mib": step_peak["fused"] / 2**20,
               "step_mem_ratio": step_peak["fused"] / step_peak["dense"], "dense_step_s": step["dense"],
               "fused_step_s": step["fused"], "time_ratio": step["fused"] / step["dense"],
               "loss_rel_diff": abs(loss_f - loss_d) / abs(loss_d)}
    for m in METHODS:
        print(f"{m}: peak {summary[m + '_peak_mib']:.1f} MiB over forward+backward, "
              f"{summary[m + '_step_peak_mib']:.1f} MiB over the step, step {summary[m + '_step_s']:.3f} s")
    print(f"mem_ratio {summary['mem_ratio']:.3f} (forward+backward)  step_mem_ratio {summary['step_mem_ratio']:.3f}  "
          f"time_ratio {summary['time_ratio']:.3f}  "
          f"loss_rel_diff {summary['loss_rel_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "summary": summary,
                       "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
