"""Peak memory and time of the KL distillation loss at large vocabularies: dense vs chunked vs fused.

For each vocabulary size the benchmark distils ``--tokens`` positions whose final hidden states
(width ``--hidden``) go through an output projection of ``vocab`` rows, for the student and the
teacher, and runs forward + backward of the KL loss three ways:

* ``dense``   — ``logits = h @ W.T`` for both models, then :func:`hf_distill.losses.kl_div_loss`
  (the straightforward implementation: autograd keeps full ``(tokens, vocab)`` float32 tensors);
* ``chunked`` — the same logits, then :func:`hf_distill.losses.chunked_kl_loss`;
* ``fused``   — :func:`hf_distill.losses.fused_linear_kl_loss` on the hidden states and projection
  weights: neither logits tensor ever exists.

Each method runs in its own fresh subprocess. Memory is what the method adds on top of its inputs
(hidden states and projection weights, identical for every method): the teacher's logits count
wherever the method needs them, and so do the gradients of the student's hidden states and
projection. On CPU it is the process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``,
a high-water mark) minus the same measurement taken after the inputs were allocated; on CUDA it is
``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` at that point. Time is
the median over ``--repeats`` forward + backward passes. Ratios are against ``dense`` at the same
vocabulary. Every method's loss value and gradient norm are checked against dense.

    python benchmarks/kd_loss_memory.py                      # CPU, one thread, 32k and 128k
    python benchmarks/kd_loss_memory.py --device cuda        # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("dense", "chunked", "fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072], help="vocabulary sizes (default 32k, 128k)")
    p.add_argument("--tokens", type=int, default=4096, help="positions per batch (default 4096)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of student and teacher (default 512)")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per chunk for chunked and fused (default 256)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=None, help="generalized JSD instead of forward KL")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--force", action="store_true",
                   help="run the dense loss even when its estimated peak exceeds 85%% of the available memory")
    p.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-vocab", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- worker


def _rss_peak_bytes() -> int:
    import resource

    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from hf_distill import losses

    device = torch.device(args.device)
    vocab, n, hidden = args.worker_vocab, args.tokens, args.hidden
    g = torch.Generator().manual_seed(0)
    # Inputs, identical for every method (and excluded from its memory).
    h_s = torch.randn(n, hidden, generator=g).to(device).requires_grad_(True)
    w_s = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device).requires_grad_(True)
    h_t = torch.randn(n, hidden, generator=g).to(device)
    w_t = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device)
    kd = {"temperature": args.temperature}
    beta = args.beta

    def step():
        if args.worker == "fused":
            loss = losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, chunk_size=args.chunk_size, beta=beta, **kd)
        else:
            s_logits = h_s @ w_s.T
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            if args.worker == "dense":
                if beta is None:
                    loss = losses.kl_div_loss(s_logits, t_logits, **kd)
                else:
                    loss = losses.generalized_jsd_loss(s_logits, t_logits, beta=beta, **kd)
            else:
                loss = losses.chunked_generalized_jsd_loss(s_logits, t_logits, beta=beta or 0.0,
                                                           chunk_size=args.chunk_size, **kd)
        loss.backward()
        value = loss.item()
        grad_norm = float(torch.linalg.vector_norm(h_s.grad)) + float(torch.linalg.vector_norm(w_s.grad))
        h_s.grad = None
        w_s.grad = None
        return value, grad_norm

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_peak_bytes()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        value, grad_norm = step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_bytes()
    return {
        "method": args.worker,
        "vocab": vocab,
        "peak_bytes": peak - baseline,
        "time_s": statistics.median(times),
        "times_s": times,
        "loss": value,
        "grad_norm": grad_norm,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------- parent


def run_method(args, method: str, vocab: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--worker-vocab", str(vocab),
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--temperature", str(args.temperature), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device]
    if args.beta is not None:
        cmd += ["--beta", str(args.beta)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} at vocab {vocab} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    if "dense" not in args.methods:
        args.methods = ["dense"] + list(args.methods)
    loss_name = "forward KL" if args.beta is None else f"generalized JSD (beta={args.beta})"
    print(f"{loss_name}, T={args.temperature}, {args.tokens} tokens, hidden {args.hidden}, float32, "
          f"chunk_size {args.chunk_size}, device {args.device}, torch threads {args.threads}, "
          f"median of {args.repeats} forward+backward passes, each method in a fresh subprocess", flush=True)
    results = []
    header = f"{'vocab':>8} {'method':>8} {'peak MiB':>10} {'time s':>8} {'mem_ratio':>10} {'time_ratio':>11} {'loss':>12}"
    print(header)
    print("-" * len(header), flush=True)
    for vocab in args.vocab:
        # The dense loss keeps about 8 float32 (tokens, vocab) tensors alive at its peak.
        estimate = 8 * args.tokens * vocab * 4
        available = _available_bytes() if args.device == "cpu" else None
        if available is not None and estimate > 0.85 * available and not args.force:
            print(f"{vocab:>8} skipped: the dense loss needs about {estimate / 2**30:.1f} GiB, only "
                  f"{available / 2**30:.1f} GiB available (use --force to run anyway)", flush=True)
            continue
        dense = None
        for method in args.methods:
            r = run_method(args, method, vocab)
            if method == "dense":
                dense = r
            r["mem_ratio"] = r["peak_bytes"] / dense["peak_bytes"]
            r["time_ratio"] = r["time_s"] / dense["time_s"]
            r["loss_rel_diff"] = abs(r["loss"] - dense["loss"]) / abs(dense["loss"])
            r["grad_norm_rel_diff"] = abs(r["grad_norm"] - dense["grad_norm"]) / abs(dense["grad_norm"])
            results.append(r)
            print(f"{vocab:>8} {method:>8} {r['peak_bytes'] / 2**20:>10.1f} {r['time_s']:>8.3f} "
                  f"{r['mem_ratio']:>10.3f} {r['time_ratio']:>11.3f} {r['loss']:>12.6f}", flush=True)
            if r["loss_rel_diff"] > 1e-4 or r["grad_norm_rel_diff"] > 1e-4:
                print(f"  WARNING: {method} differs from dense: loss by {r['loss_rel_diff']:.2e}, gradient norm by "
                      f"{r['grad_norm_rel_diff']:.2e} (relative)")
    device = results[0]["device"]
    print(f"device: {device}; torch {results[0]['torch']}; threads used by the workers: {results[0]['threads']}")
    for vocab in args.vocab:
        fused = [r for r in results if r["vocab"] == vocab and r["method"] == "fused"]
        if fused:
            f = fused[0]
            ok = f["mem_ratio"] <= 0.10 and f["time_ratio"] <= 1.0
            print(f"vocab {vocab}: fused mem_ratio {f['mem_ratio']:.3f} (goal <= 0.10), time_ratio "
                  f"{f['time_ratio']:.3f} (goal <= 1.0): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                       "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
