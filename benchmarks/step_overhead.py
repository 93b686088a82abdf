"""Overhead of a distillation training step over the work it cannot avoid.

In one run, on the same batch, times
  (a) a DistillationTrainer training step (teacher no-grad forward, student forward, every loss
      term, backward, optimizer step), and
  (b) a teacher no-grad forward plus a plain student MLM training step (the model's own loss,
      backward, the same optimizer step),
alternating a and b, and prints ``overhead_ratio = median(a) / median(b)``.

Default sizes: a BERT-base-shaped teacher (12 layers, hidden 768, vocab 30522, random weights),
the 6-layer DistilBERT student built from it, batch 8 x 128 tokens, one thread.

    python benchmarks/step_overhead.py [--threads 1] [--steps 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.students import build_student


def make_batch(vocab: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    attention = torch.ones_like(ids)
    attention[batch // 2:, seq * 3 // 4:] = 0  # some padding, as in real batches
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(batch, seq, generator=g) < 0.15) & attention.bool()
    labels[pick] = ids[pick]
    ids[pick] = 4
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": attention, "labels": labels}.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    torch.manual_seed(0)

    config = BertConfig(num_hidden_layers=opts.teacher_layers, hidden_size=opts.hidden,
                        num_attention_heads=opts.hidden // 64, intermediate_size=4 * opts.hidden)
    teacher = BertForMaskedLM(config).to(device).eval().requires_grad_(False)
    layers = [0, 2, 4, 7, 9, 11] if opts.teacher_layers == 12 else None
    student = build_student(teacher, layers=layers, num_layers=None if layers else opts.teacher_layers // 2,
                            architecture="distilbert").to(device)
    batch = make_batch(config.vocab_size, opts.batch, opts.seq, device)

    with tempfile.TemporaryDirectory() as tmp:
        args = DistillationArguments(output_dir=tmp, report_to=[], use_cpu=device.type == "cpu",
                                     per_device_train_batch_size=opts.batch, disable_tqdm=True)
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by train() in the Trainer's own loop
        optimizer = trainer.optimizer
        student.train()

        def distillation_step():
            trainer.training_step(student, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def baseline_step():
            with torch.no_grad():
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out = student(**batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = {"distillation": [], "baseline": []}
        for i in range(opts.warmup + opts.steps):
            for name, fn in (("distillation", distillation_step), ("baseline", baseline_step)):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= opts.warmup:
                    times[name].append(time.perf_counter() - start)

    a, b = statistics.median(times["distillation"]), statistics.median(times["baseline"])
    print(f"device={device} threads={opts.threads} batch={opts.batch}x{opts.seq} teacher_layers={opts.teacher_layers} "
          f"hidden={opts.hidden} vocab={config.vocab_size} steps={opts.steps}")
    print(f"distillation_step_median_s={a:.4f} baseline_step_median_s={b:.4f}")
    print(f"overhead_ratio={a / b:.3f}")


if __name__ == "__main__":
    main()
