"""Configured objectives: every knowledge family composes, trains and logs; errors come at construction."""

import math

import pytest
import torch
import yaml
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer, losses
from hf_distill.objectives import TERM_REGISTRY, Term, register_term
from test_trainer import NO_DROPOUT, masked_dataset
from tiny import make_wordpiece_tokenizer, tiny_bert_mlm

TERMS_YAML = """
distillation:
  - {loss: kl, weight: 5.0, temperature: 2.0}
  - {loss: hidden_mse, layers: {1: 2, 2: 4}, projection: linear, weight: 1.0}
  - {loss: attention_relation, relation_heads: 4, weight: 1.0}
  - {loss: rkd_distance, weight: 0.5}
  - {loss: rkd_angle, weight: 0.5, pooling: mean}
  - {loss: similarity_preserving, weight: 0.5}
  - {loss: jsd, beta: 0.5, weight: 0.5, name: jsd}
"""


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=1,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    base.update(kw)
    return DistillationArguments(**base)


def models(tokenizer, s_hidden=16, t_layers=4, s_heads=2):
    teacher = tiny_bert_mlm(len(tokenizer), layers=t_layers, seed=1, heads=4, initializer_range=0.3, **NO_DROPOUT)
    student = tiny_bert_mlm(len(tokenizer), layers=2, hidden=s_hidden, seed=2, heads=s_heads,
                            **NO_DROPOUT)
    return teacher, student


def test_configured_objective_trains_and_logs_every_term(tokenizer, tmp_path):
    teacher, student = models(tokenizer)
    spec = yaml.safe_load(TERMS_YAML)["distillation"]
    ds = masked_dataset(tokenizer, n=32)
    args = args_for(tmp_path, distillation=spec, max_steps=30, save_strategy="steps", save_steps=30,
                    per_device_eval_batch_size=32)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=ds, eval_dataset=ds,
                                  data_collator=default_data_collator)
    proj_before = [p.detach().clone() for p in trainer.objective.parameters()]
    assert len(proj_before) == 4  # weight + bias for each of the two mapped layers
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    names = {"loss_kd", "loss_hidden_mse", "loss_attention_relation", "loss_rkd_distance", "loss_rkd_angle",
             "loss_similarity_preserving", "loss_jsd", "loss_mlm"}
    assert names <= set(trainer.state.log_history[0])
    assert {f"eval_{n}" for n in names} <= set(end)
    assert end["eval_loss"] < 0.8 * start["eval_loss"]
    for n in ("loss_kd", "loss_hidden_mse", "loss_attention_relation"):
        assert end[f"eval_{n}"] < start[f"eval_{n}"], n
    # Projections were optimised with the student ...
    assert any(not torch.equal(a, b) for a, b in zip(proj_before, trainer.objective.parameters()))
    # ... are kept in the checkpoint for resuming, and never in the student's weights.
    ckpt = tmp_path / "out" / "checkpoint-30"
    from hf_distill.checkpoints import OBJECTIVE_STATE
    assert (ckpt / OBJECTIVE_STATE).exists()
    from safetensors.torch import load_file
    assert set(load_file(str(ckpt / "model.safetensors"))) <= set(student.state_dict())


def test_only_needed_tensors_are_collected(tokenizer, tmp_path):
    teacher, student = models(tokenizer, s_hidden=32)
    plain = DistillationTrainer(model=student, teacher=teacher,
                                args=args_for(tmp_path, distillation=[{"loss": "kl"}]))
    assert plain.output_flags() == {} and plain._student_qkv is None
    student4 = tiny_bert_mlm(len(tokenizer), layers=2, seed=2, heads=4)
    full = DistillationTrainer(model=student4, teacher=teacher, args=args_for(
        tmp_path, distillation=[{"loss": "attention_kl"}, {"loss": "hidden_cos"}]))
    assert full.output_flags() == {"output_hidden_states": True, "output_attentions": True}


def test_attention_terms_follow_the_reference(tokenizer, tmp_path):
    teacher, student = models(tokenizer, s_hidden=32, t_layers=4, s_heads=4)
    ds = masked_dataset(tokenizer, n=8)
    args = args_for(tmp_path, distillation=[{"loss": "attention_mse", "layers": {0: 1, 1: 3}, "weight": 1.0}],
                    task_weight=0.0)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, data_collator=default_data_collator)
    batch = default_data_collator([ds[i] for i in range(8)])
    student.eval()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    attn = batch["attention_mask"]
    ref = (losses.attention_mse_loss(s.attentions[0], t.attentions[1], attention_mask=attn)
           + losses.attention_mse_loss(s.attentions[1], t.attentions[3], attention_mask=attn)) / 2
    assert torch.allclose(loss, ref, rtol=1e-5)


def test_construction_errors_say_what_to_change(tokenizer, tmp_path):
    teacher, student = models(tokenizer)
    cases = [
        ([{"loss": "kl_divergence"}], "unknown distillation loss 'kl_divergence'"),
        ([{"loss": "hidden_mse", "layers": {1: 2}}], "projection: linear"),
        ([{"loss": "hidden_mse", "layers": {5: 2}, "projection": "linear"}], "out of range"),
        ([{"loss": "attention_mse"}], "attention_relation"),
        ([{"loss": "attention_relation", "relation_heads": 5}], "relation_heads=5"),
        ([{"loss": "kl", "temprature": 2}], "no option"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            DistillationTrainer(model=student, teacher=teacher, args=args_for(tmp_path, distillation=spec))
    with pytest.raises(ValueError, match="'loss' key"):
        args_for(tmp_path, distillation=[{"weight": 1.0}])


def test_json_on_the_command_line(tmp_path):
    from hf_distill.config import parse_config_and_args
    (args,) = parse_config_and_args((DistillationArguments,), [
        "--output_dir", str(tmp_path), "--distillation", '[{"loss": "reverse_kl", "temperature": 1.5}]'])
    from hf_distill.objectives import parse_distillation_spec
    assert parse_distillation_spec(args.distillation) == [{"loss": "reverse_kl", "temperature": 1.5}]


def test_user_registered_term(tokenizer, tmp_path):
    @register_term("logit_l1")
    class LogitL1(Term):
        def forward(self, step):
            diff = (step.student.logits - step.teacher().logits).abs().sum(-1)
            return losses._common.normalise(*losses._common.masked_sum_and_count(diff, step.masks["kd"]),
                                            step.counts["kd"])

    try:
        teacher, student = models(tokenizer, s_hidden=32)
        ds = masked_dataset(tokenizer, n=16)
        trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=ds,
                                      data_collator=default_data_collator,
                                      args=args_for(tmp_path, distillation=[{"loss": "logit_l1", "weight": 0.1}],
                                                    max_steps=2))
        trainer.train()
        assert "loss_logit_l1" in trainer.state.log_history[0]
    finally:
        TERM_REGISTRY.pop("logit_l1")


def test_two_teachers_of_different_depth(tokenizer, tmp_path):
    t_shallow = tiny_bert_mlm(len(tokenizer), layers=2, seed=3, initializer_range=0.3, **NO_DROPOUT)
    t_deep = tiny_bert_mlm(len(tokenizer), layers=6, seed=4, initializer_range=0.3, **NO_DROPOUT)
    student = tiny_bert_mlm(len(tokenizer), layers=2, seed=5, **NO_DROPOUT)
    ds = masked_dataset(tokenizer, n=32)
    args = args_for(tmp_path, teacher_weights="1,3", distillation=[{"loss": "kl", "temperature": 2.0}],
                    task_weight=0.0, max_steps=25, per_device_eval_batch_size=32)
    trainer = DistillationTrainer(model=student, teacher=[t_shallow, t_deep], args=args, train_dataset=ds,
                                  eval_dataset=ds, data_collator=default_data_collator)
    assert trainer.teacher_weights == [0.25, 0.75]
    # The target is the weighted average of the teachers' probabilities at T.
    batch = default_data_collator([ds[i] for i in range(8)])
    student.eval()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s, a, b = student(**kw).logits, t_shallow(**kw).logits, t_deep(**kw).logits
    p_mix = 0.25 * torch.softmax(a / 2, -1) + 0.75 * torch.softmax(b / 2, -1)
    log_ps = torch.log_softmax(s / 2, -1)
    per_pos = (p_mix * (p_mix.log() - log_ps)).sum(-1) * 4
    mask = batch["attention_mask"].bool()
    assert torch.allclose(loss, per_pos[mask].mean(), rtol=1e-5)
    start = trainer.evaluate()["eval_loss_kd"]
    trainer.train()
    assert trainer.evaluate()["eval_loss_kd"] < 0.7 * start
    for t in (t_shallow, t_deep):
        assert not any(p.requires_grad for p in t.parameters())


def test_separate_teacher_terms(tokenizer, tmp_path):
    t1 = tiny_bert_mlm(len(tokenizer), layers=2, seed=3, **NO_DROPOUT)
    t2 = tiny_bert_mlm(len(tokenizer), layers=4, seed=4, **NO_DROPOUT)
    student = tiny_bert_mlm(len(tokenizer), layers=1, seed=5, **NO_DROPOUT)
    ds = masked_dataset(tokenizer, n=16)
    args = args_for(tmp_path, multi_teacher="separate", cos_weight=0.0, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher=[t1, t2], args=args, train_dataset=ds,
                                  data_collator=default_data_collator)
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"loss_kd_t0", "loss_kd_t1", "loss_mlm"} <= set(log)
    assert log["loss"] == pytest.approx(2.5 * log["loss_kd_t0"] + 2.5 * log["loss_kd_t1"] + 2 * log["loss_mlm"],
                                        rel=1e-4)
    assert math.isfinite(log["loss"])
