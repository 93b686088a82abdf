"""hf_distill against TRL's GKDTrainer on the same work, in one run.

Work: a GPT-2-small-shaped teacher (12 layers, hidden 768, vocabulary 50,257, random weights from a
fixed seed) and a 6-layer student copied from its layers, batch 4 x 128 tokens, fp32, one thread.

* ``off_policy``: TRL ``GKDTrainer`` (``lmbda=0``, ``beta=0.5``; its loss is always at T = 1) vs
  hf_distill's ``DistillationTrainer`` with the generalized JSD term (``beta=0.5``, T = 1).
* ``on_policy``: both with ``lmbda=1``: every step first samples ``max_new_tokens`` completion
  tokens from the student for prompts of ``seq - max_new_tokens`` tokens (temperature 1, no top-k /
  top-p, KV cache), then trains on the sampled sequences (hf_distill:
  ``CausalLMDistillationTrainer``).

A step is the whole optimiser step: sampling (on-policy), teacher forward, student forward, loss,
backward, AdamW update. Both sides use the same learning rate, no mixed precision, no gradient
checkpointing (TRL's default is on; off here on both sides) and dropout off.

Method. Each system runs in its own persistent worker process (peak RSS is a per-process quantity),
built from the same seeds, so both start from the same weights and see the same batches. The
driver steps them alternately, one step at a time (the order swaps every round, so slow drifts of
a shared machine hit both alike), and while one steps the other waits. Per step a worker reports:

* CPU time of the process (``time.process_time``; with one thread it is the compute time, and it
  is not inflated when other processes share the CPU) and wall time;
* the peak resident set reached during the step: Linux's high-water mark ``VmHWM`` is reset with
  ``/proc/self/clear_refs`` right before the step and read right after it (exact, no sampling;
  ``ru_maxrss`` cannot be reset). On CUDA: the peak of ``torch.cuda`` allocated memory;
* the loss. With the same weights and the same batch both sides must compute the same loss; the
  AdamW updates keep the weights equal to rounding, so every step is compared.

Printed per mode (medians over the timed steps, the first ``--warmup`` steps dropped):

* ``time_ratio``: hf_distill / TRL CPU time per step (GPU: wall time);
* ``mem_ratio``: hf_distill / TRL step memory = peak RSS during the step minus the RSS at its
  start. The weights, gradients' home and AdamW state resident between steps are the same for any
  trainer of these models; the step's own memory (logits, loss temporaries, activations,
  gradients) is what a trainer decides. ``peak_rss_ratio`` gives the ratio of the absolute peaks;
* ``loss_rel_diff``: the largest ``|loss_hf - loss_trl| / |loss_trl|`` over all steps. On-policy
  the two samplers draw differently (hf_distill seeds one generator per row, for reproducible and
  resumable runs; TRL draws from the global generator), so the sequences, and from step 1 on the
  weights, differ; instead TRL scores the batch hf_distill sampled at step 0 (round 0 steps
  hf_distill first, so both still hold the initial weights) and the two losses on that same
  batch are compared.

* ``floor_ratio`` (off-policy): a third worker, stepped in the same rotation, does only the model
  work every exact full-vocabulary trainer must do (both forwards with the full logits, the
  student's backward through them, AdamW) plus one elementwise product as its loss; its time over
  TRL's is the lowest ``time_ratio`` reachable on this work without changing the models.

Absolute times are printed only on a GPU (a shared CPU's are not comparable between runs).

    python benchmarks/vs_trl.py [--steps 5] [--warmup 1] [--modes off_policy,on_policy]
        [--layers 12] [--hidden 768] [--vocab 50257] [--batch 4] [--seq 128] [--max_new_tokens 32]
        [--fused auto|on|off] [--no_floor] [--device cpu|cuda]

Needs TRL: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vs_trl_workers import FLOOR, MODES, SYSTEMS, BenchConfig, config_dict, serve  # noqa: E402

GIB = 1024 ** 3


class Worker:
    """A persistent worker process running one system's side."""

    def __init__(self, context, system: str, mode: str, cfg: BenchConfig):
        self.system = system
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, system, mode, config_dict(cfg)), daemon=True)
        self.process.start()

    def receive(self, expected: str):
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"the {self.system} worker failed:\n{payload}")
        if kind != expected:
            raise RuntimeError(f"the {self.system} worker answered {kind!r}, expected {expected!r}")
        return payload

    def step(self, index: int) -> dict:
        self.conn.send(("step", index))
        return self.receive("step")

    def score(self, batch: dict) -> float:
        self.conn.send(("score", batch))
        return self.receive("score")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop", None))
                self.receive("stopped")
            except (EOFError, OSError, RuntimeError):
                pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run_mode(mode: str, cfg: BenchConfig, steps: int, warmup: int, systems=SYSTEMS) -> dict[str, list[dict]]:
    """Step each system's worker ``warmup + steps`` times, alternately; per-step records per system."""
    context = multiprocessing.get_context("spawn")
    workers = [Worker(context, system, mode, cfg) for system in systems]
    try:
        for worker in workers:
            worker.receive("ready")
        records: dict[str, list[dict]] = {w.system: [] for w in workers}
        by_name = {w.system: w for w in workers}
        for i in range(warmup + steps):
            for worker in workers if i % 2 == 0 else workers[::-1]:
                record = worker.step(i)
                record["timed"] = i >= warmup
                records[worker.system].append(record)
                if i == 0 and worker.system == "hf_distill" and record["batch"] is not None and "trl" in by_name:
                    # Round 0 steps hf_distill first, so TRL still holds the same initial weights: it scores
                    # the very batch hf_distill sampled and trained on, before its own first step.
                    record["trl_loss_same_batch"] = by_name["trl"].score(record["batch"])
                record.pop("batch")
        return records
    finally:
        for worker in workers:
            worker.close()


def summarize(mode: str, records: dict[str, list[dict]], device: str) -> dict:
    """Ratios hf_distill / TRL of the medians over the timed steps, and the loss agreement."""
    clock = "wall_s" if device.startswith("cuda") else "cpu_s"
    med = {s: {key: statistics.median(r[key] for r in rs if r["timed"])
               for key in ("cpu_s", "wall_s", "generate_s", "mem_start", "mem_peak")} for s, rs in records.items()}
    for m in med.values():
        m["mem_step"] = max(m["mem_peak"] - m["mem_start"], 1)
    h, t = med["hf_distill"], med["trl"]
    out = {"mode": mode, "time_ratio": h[clock] / t[clock], "mem_ratio": h["mem_step"] / t["mem_step"],
           "peak_rss_ratio": h["mem_peak"] / t["mem_peak"], "medians": med, "clock": clock}
    if FLOOR in med:
        out["floor_ratio"] = med[FLOOR][clock] / t[clock]
    pairs = list(zip(records["hf_distill"], records["trl"]))  # the floor's loss is not a divergence
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)  # noqa: E731
    same = [(a, b) for a, b in pairs if a["sampled"] == b["sampled"]]
    out["losses"] = [(a["loss"], b["loss"]) for a, b in pairs]
    if len(same) == len(pairs):
        out["loss_rel_diff"] = max(rel(a["loss"], b["loss"]) for a, b in pairs)
        out["loss_steps"] = f"every step ({len(pairs)})"
    elif "trl_loss_same_batch" in pairs[0][0]:
        # The samplers differ (hf_distill seeds a generator per row, TRL draws from the global one), so after
        # step 0 the two sides train on different sequences; step 0 is compared on hf_distill's sample.
        first = pairs[0][0]
        out["loss_rel_diff"] = rel(first["loss"], first["trl_loss_same_batch"])
        out["loss_steps"] = "step 0, on the batch hf_distill sampled, scored by both"
        out["losses"][0] = (first["loss"], first["trl_loss_same_batch"])
    else:
        out["loss_rel_diff"] = None
        out["loss_note"] = ("not applicable: the two sides sampled different completions, so their losses are over "
                            "different sequences")
    return out


def report(summary: dict, device: str) -> None:
    med, mode = summary["medians"], summary["mode"]
    h, t = med["hf_distill"], med["trl"]
    diff = summary["loss_rel_diff"]
    diff_text = f"{diff:.2e} ({summary['loss_steps']})" if diff is not None else "n/a"
    print(f"[{mode}] time_ratio={summary['time_ratio']:.3f} mem_ratio={summary['mem_ratio']:.3f} "
          f"peak_rss_ratio={summary['peak_rss_ratio']:.3f} loss_rel_diff={diff_text}")
    print(f"[{mode}] step memory GiB: hf_distill {h['mem_step'] / GIB:.3f} vs trl {t['mem_step'] / GIB:.3f}; "
          f"peak GiB: hf_distill {h['mem_peak'] / GIB:.3f} vs trl {t['mem_peak'] / GIB:.3f}")
    if "floor_ratio" in summary:
        print(f"[{mode}] floor_ratio={summary['floor_ratio']:.3f} (model forwards, backward and AdamW alone, with the "
              "full logits, over TRL's step: the lowest time_ratio an exact trainer can reach)")
    if mode == "on_policy":
        print(f"[{mode}] share of the step spent sampling: hf_distill {h['generate_s'] / h['wall_s']:.3f}, "
              f"trl {t['generate_s'] / t['wall_s']:.3f}")
    if device.startswith("cuda"):
        print(f"[{mode}] step seconds: hf_distill {h['wall_s']:.4f} vs trl {t['wall_s']:.4f}")
    if diff is None:
        print(f"[{mode}] loss_rel_diff: {summary['loss_note']}")
    first_h, first_t = summary["losses"][0]
    print(f"[{mode}] step-0 loss: hf_distill {first_h:.8f} trl {first_t:.8f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each system per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (optimizer state, allocator)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--layers", type=int, default=12, help="teacher layers (the student gets half)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (on-policy: prompt + sampled)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                        help="hf_distill's loss path: auto (the trainer's default), on (fused hidden states x head), "
                             "off (dense logits)")
    parser.add_argument("--no_floor", dest="floor", action="store_false",
                        help="skip the off-policy floor worker (the model work alone; see floor_ratio)")
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args(argv)
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes takes {', '.join(MODES)}, got {opts.modes!r}")
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if not 0 < opts.max_new_tokens < opts.seq:
        parser.error(f"--max_new_tokens must be between 1 and --seq - 1 ({opts.seq - 1}), got {opts.max_new_tokens}")
    opts.modes = modes
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers, which also call torch.set_num_threads(1)
    cfg = BenchConfig(layers=opts.layers, hidden=opts.hidden, vocab=opts.vocab, batch=opts.batch, seq=opts.seq,
                      max_new_tokens=opts.max_new_tokens, beta=opts.beta, device=opts.device, fused=opts.fused)
    print(f"device={opts.device} threads=1 teacher_layers={cfg.layers} student_layers={cfg.layers // 2} "
          f"hidden={cfg.hidden} vocab={cfg.vocab} batch={cfg.batch}x{cfg.seq} max_new_tokens={cfg.max_new_tokens} "
          f"beta={cfg.beta} fused={cfg.fused} steps={opts.steps} warmup={opts.warmup}", flush=True)
    for mode in opts.modes:
        systems = (*SYSTEMS, FLOOR) if mode == "off_policy" and opts.floor else SYSTEMS
        report(summarize(mode, run_mode(mode, cfg, opts.steps, opts.warmup, systems), opts.device), opts.device)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
