"""Under torchrun (tests/test_big_teachers.py): one distillation step with the teacher as a full copy per process,
sharded across the processes (teacher_sharding=fsdp), and with fused terms; rank 0 writes the logs as JSON."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_distill import DistillationArguments, DistillationTrainer  # noqa: E402
from hf_distill.sources.sharding import local_numel  # noqa: E402
from test_fused_trainer import rows, tiny  # noqa: E402


def one_step(out_dir: str, sharding: str, fused: str) -> dict:
    args = DistillationArguments(output_dir=out_dir, per_device_train_batch_size=2, learning_rate=1e-3, max_steps=1,
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True, max_grad_norm=1e9, teacher_sharding=sharding,
                                 distillation=[{"loss": "jsd", "beta": 0.5, "fused": fused},
                                               {"loss": "task", "weight": 0.5, "fused": fused}])
    student, teacher = tiny("llama", 2, seed=2), tiny("llama", 3, seed=1)
    full = sum(p.numel() for p in teacher.parameters())
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=Dataset.from_list(rows(8)),
                                  data_collator=default_data_collator)
    trainer.train()
    log = {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("loss") or k == "grad_norm"}
    log.update(world_size=trainer.accelerator.num_processes, sharded=trainer.teacher_source.sharded,
               teacher_local=local_numel(trainer.teacher), teacher_full=full,
               fused=[bool(getattr(t, "fused", False)) for t in trainer.objective.active_terms],
               param_sum=float(sum(p.detach().double().sum() for p in student.parameters())))
    return log


def main(out_path: str) -> None:
    out = Path(out_path)
    logs = {name: one_step(str(out.parent / name), sharding, fused)
            for name, sharding, fused in (("full_copy", "none", "false"), ("sharded", "fsdp", "false"),
                                          ("fused", "none", "true"))}
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(logs))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort interpreter teardown after the work is written
