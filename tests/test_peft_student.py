"""A LoRA (PEFT) student trains inside DistillationTrainer: only adapter weights move, the loss goes down."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from test_trainer import NO_DROPOUT, masked_dataset
from tiny import make_wordpiece_tokenizer, tiny_bert_mlm


def test_lora_student(tmp_path):
    tokenizer = make_wordpiece_tokenizer()
    teacher = tiny_bert_mlm(len(tokenizer), layers=4, seed=1, initializer_range=0.3, **NO_DROPOUT)
    base = tiny_bert_mlm(len(tokenizer), layers=2, seed=2, **NO_DROPOUT)
    student = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"]))
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    ds = masked_dataset(tokenizer, n=32)
    args = DistillationArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=2e-2,
                                 max_steps=60, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                                 per_device_eval_batch_size=32, cos_weight=0.0)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, eval_dataset=ds,
                                  data_collator=default_data_collator)
    start = trainer.evaluate()["eval_loss_kd"]
    trainer.train()
    assert trainer.evaluate()["eval_loss_kd"] < 0.98 * start
    for n, p in student.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    student.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
