"""One on-policy distillation step, run under torchrun by tests/test_on_policy.py; rank 0 writes the log and the
sampled completions as JSON."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from test_on_policy import (
    Recording,
    completion_rows,
    make_args,
    pair,
    split,
    word_tokenizer,
)

from hf_distill.lm import CompletionCollator


def main(out_path: str, batch_size: int) -> None:
    tokenizer = word_tokenizer()
    teacher, student = pair(tokenizer)
    args = make_args(Path(out_path).parent, per_device_train_batch_size=batch_size)
    trainer = Recording(model=student, teacher=teacher, args=args, train_dataset=completion_rows(tokenizer, 8),
                        data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)
    trainer.train()
    (batch,) = trainer.seen
    rows = [[t.tolist() for t in split(batch, r)] for r in range(batch["input_ids"].shape[0])]
    gathered = [None] * trainer.accelerator.num_processes
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if trainer.is_world_process_zero():
        log = dict(trainer.state.log_history[0])
        log["world_size"] = trainer.accelerator.num_processes
        log["param_sum"] = float(sum(p.detach().double().sum() for p in student.parameters()))
        log["rows"] = [row for part in gathered for row in part]
        Path(out_path).write_text(json.dumps(log))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter teardown after the work is written
