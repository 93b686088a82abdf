"""One configuration per built-in distillation term, and one optimiser step with it.

Shared by tests/test_term_scaling.py (one process) and tests/ddp_terms.py (under torchrun), so
both run exactly the same models, data and settings.
"""

from __future__ import annotations

import torch
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from test_trainer import masked_dataset, teacher_student

TOP_K = 8

# Every built-in term alone (the task loss off, except for the task term's own case).
CASES: dict[str, list[dict]] = {
    "kl": [{"loss": "kl", "temperature": 2.0}],
    "reverse_kl": [{"loss": "reverse_kl", "temperature": 2.0}],
    "jsd": [{"loss": "jsd", "beta": 0.3}],
    "logit_mse": [{"loss": "logit_mse"}],
    "topk_kl": [{"loss": "topk_kl", "temperature": 1.0}],
    "task": [{"loss": "task"}],
    "hidden_mse": [{"loss": "hidden_mse", "layers": {1: 2, 2: 4}}],
    "hidden_cos": [{"loss": "hidden_cos", "layers": "-1:-1"}],
    "attention_mse": [{"loss": "attention_mse"}],
    "attention_kl": [{"loss": "attention_kl"}],
    "attention_relation": [{"loss": "attention_relation", "relation_heads": 4}],
    "rkd_distance": [{"loss": "rkd_distance"}],
    "rkd_angle": [{"loss": "rkd_angle", "pooling": "mean"}],
    "similarity_preserving": [{"loss": "similarity_preserving"}],
    "knn_graph": [{"loss": "knn_graph", "k": 3, "tau": 0.5}],
    "exit_kl": [{"loss": "exit_kl", "layers": [1], "ce_weight": 0.5}],
    "adversarial": [{"loss": "adversarial", "on": "logits", "hidden_size": 16}],
}


def with_stored_topk(dataset, teacher, k: int = TOP_K, temperature: float = 1.0):
    """The teacher's top-k log-probabilities at ``temperature`` and tail mass per position, as batch columns."""
    batch = default_data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)
    top, idx = logp.topk(k, dim=-1)
    tail = (1 - top.exp().sum(-1)).clamp(min=0)
    return (dataset.add_column("teacher_topk_logprobs", top.tolist())
            .add_column("teacher_topk_indices", idx.tolist()).add_column("teacher_tail_mass", tail.tolist()))


def one_step(tokenizer, name: str, output_dir: str, batch: int, accumulation: int = 1) -> dict:
    """Loss, every term and the gradient norm of one optimiser step over 16 examples."""
    teacher, student = teacher_student(tokenizer)
    ds = masked_dataset(tokenizer, n=16)
    if name == "topk_kl":
        ds = with_stored_topk(ds, teacher)
    args = DistillationArguments(
        output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, max_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, max_grad_norm=1e9, task_weight=0.0 if name != "task" else 2.0,
        distillation=CASES[name])
    trainer = DistillationTrainer(model=student, teacher=None if name in ("topk_kl", "task") else teacher,
                                  args=args, train_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    log = {k: v for k, v in trainer.state.log_history[0].items() if k == "grad_norm" or k.startswith("loss")}
    log["world_size"] = trainer.accelerator.num_processes
    return log
