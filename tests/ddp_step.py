"""One distillation step, run under torchrun by tests/test_distributed.py; rank 0 writes the log as JSON."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from transformers import default_data_collator  # noqa: E402

from hf_distill import DistillationArguments, DistillationTrainer  # noqa: E402
from test_trainer import masked_dataset, teacher_student  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def main(out_path: str, batch_size: int, tokenizer_dir: str) -> None:
    # One tokenizer from disk for every rank: training one per process could order ties differently.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    args = DistillationArguments(output_dir=str(Path(out_path).parent / "ddp_out"), per_device_train_batch_size=batch_size,
                                 learning_rate=1e-3, max_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, disable_tqdm=True, max_grad_norm=1e9)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                                  data_collator=default_data_collator)
    trainer.train()
    if trainer.is_world_process_zero():
        log = dict(trainer.state.log_history[0])
        log["world_size"] = trainer.accelerator.num_processes
        log["param_sum"] = float(sum(p.detach().double().sum() for p in student.parameters()))
        Path(out_path).write_text(json.dumps(log))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    # Skip interpreter teardown: gloo's background threads can abort the process while it unwinds
    # ("terminate called without an active exception"), after all the work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
