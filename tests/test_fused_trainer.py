"""The fused option of the response terms and the causal-LM task loss, inside DistillationTrainer.

``fused: true`` computes forward KL, reverse KL, generalized JSD and the CE on the data from both
models' last hidden states and output projections, chunk by chunk. It must give the dense path's
loss, terms and student gradients (tiny Llama, GPT-2 with its tied head, Gemma 3), with padding and
prompt positions masked, the same under gradient accumulation as with one large batch, and never
run an output projection over more than one position.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from datasets import Dataset
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.objectives.fused import fused_model_refusal

VOCAB, LENGTH = 96, 12


def tiny(arch: str, layers: int, seed: int, **kw):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, **kw)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    else:
        cfg = T.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=2, **kw)
    return T.AutoModelForCausalLM.from_config(cfg)


def rows(n: int = 4, seed: int = 0) -> list[dict]:
    """Sequences of different lengths, right-padded to LENGTH; the first 3 tokens are a prompt (no label)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        real = LENGTH - (i * 3) % 7
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
        mask = (torch.arange(LENGTH) < real).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:3] = -100
        out.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    return out


def make_trainer(arch, terms, fused, tmp_path, *, task_weight=1.0, **kw):
    distillation = [{**t, "fused": fused} for t in terms] + [{"loss": "task", "fused": fused, "weight": task_weight}]
    args = DistillationArguments(output_dir=str(tmp_path / f"out-{fused}"), use_cpu=True, report_to=[], seed=0,
                                 disable_tqdm=True, save_strategy="no", distillation=distillation, **kw)
    return DistillationTrainer(model=tiny(arch, 2, seed=2), teacher=tiny(arch, 3, seed=1), args=args)


def loss_and_grads(trainer, batch, training=True):
    student = trainer.model
    student.train(training)
    student.zero_grad()
    loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
    terms = {k: float(v) for k, v in trainer._train_terms.items()} if training else {}
    trainer._train_terms.clear()
    if training:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(loss.detach()), terms, grads, outputs


TERMS = {
    "forward_kl": [{"loss": "kl", "temperature": 2.0}],
    "reverse_kl": [{"loss": "reverse_kl", "temperature": 1.5}],
    "jsd": [{"loss": "jsd", "beta": 0.5}],
}


def assert_same(dense, fused):
    loss_d, terms_d, grads_d, _ = dense
    loss_f, terms_f, grads_f, _ = fused
    assert loss_f == pytest.approx(loss_d, rel=1e-5)
    assert terms_f.keys() == terms_d.keys()
    for name in terms_d:
        assert terms_f[name] == pytest.approx(terms_d[name], rel=1e-5, abs=1e-7), name
    assert grads_f.keys() == grads_d.keys() and len(grads_d) > 5
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("term", sorted(TERMS))
@pytest.mark.parametrize("with_ce", [True, False], ids=["ce", "no_ce"])
def test_fused_equals_dense(arch, term, with_ce, tmp_path):
    batch = default_data_collator(rows())
    task_weight = 0.7 if with_ce else 0.0
    dense = make_trainer(arch, TERMS[term], "false", tmp_path, task_weight=task_weight)
    fused = make_trainer(arch, TERMS[term], "true", tmp_path, task_weight=task_weight)
    assert [getattr(t, "fused", False) for t in fused.objective.active_terms] == [True] * (2 if with_ce else 1)
    assert not any(getattr(t, "fused", False) for t in dense.objective.active_terms)
    assert_same(loss_and_grads(dense, batch), loss_and_grads(fused, batch))


def test_gemma3_and_evaluation(tmp_path):
    batch = default_data_collator(rows())
    dense = make_trainer("gemma3", TERMS["jsd"], "false", tmp_path)
    fused = make_trainer("gemma3", TERMS["jsd"], "true", tmp_path)
    assert_same(loss_and_grads(dense, batch), loss_and_grads(fused, batch))
    # Evaluation: local counts, no gradient buffers, and no predictions (only one position of logits exists).
    loss_d, _, _, out_d = loss_and_grads(dense, batch, training=False)
    loss_f, _, _, out_f = loss_and_grads(fused, batch, training=False)
    assert loss_f == pytest.approx(loss_d, rel=1e-5)
    assert out_d["logits"].shape == (4, LENGTH, VOCAB) and out_f["logits"] is None


def one_step(arch, terms, fused, tmp_path, batch, accumulation):
    args = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                logging_steps=1, learning_rate=1e-3, max_grad_norm=1e9)
    trainer = make_trainer(arch, terms, fused, tmp_path / f"{batch}x{accumulation}", task_weight=0.5, **args)
    trainer.train_dataset = Dataset.from_list(rows(8, seed=3))
    trainer.data_collator = default_data_collator
    trainer.train()
    return {k: v for k, v in trainer.state.log_history[0].items() if k.startswith("loss") or k == "grad_norm"}


@pytest.mark.parametrize("arch, term", [("llama", "jsd"), ("gpt2", "forward_kl")])
def test_accumulation_equals_large_batch_fused(arch, term, tmp_path):
    big_dense = one_step(arch, TERMS[term], "false", tmp_path / "dense", batch=8, accumulation=1)
    big = one_step(arch, TERMS[term], "true", tmp_path / "fused", batch=8, accumulation=1)
    accumulated = one_step(arch, TERMS[term], "true", tmp_path / "fused", batch=4, accumulation=2)
    assert len(big) >= 4  # loss, grad_norm, the divergence and loss_clm
    for key, value in big_dense.items():
        assert big[key] == pytest.approx(value, rel=1e-5), key
        assert accumulated[key] == pytest.approx(value, rel=1e-5), key


def test_no_full_logits_exist_in_fused_mode(tmp_path):
    """Every call of either model's output projection covers one position, never (batch, seq, vocab)."""
    batch = default_data_collator(rows())
    for fused, expected in (("true", {1}), ("false", {LENGTH})):
        trainer = make_trainer("llama", TERMS["jsd"], fused, tmp_path)
        seen = []
        hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, i, out: seen.append(out.shape[1]))
                 for m in (trainer.model, trainer.teacher)]
        loss_and_grads(trainer, batch)
        for h in hooks:
            h.remove()
        assert len(seen) == 2 and set(seen) == expected, (fused, seen)


def test_auto_uses_fused_from_the_vocabulary_threshold(tmp_path):
    kl = [{"loss": "kl", "temperature": 2.0}]
    on = make_trainer("gpt2", kl, "auto", tmp_path, fused_vocab_threshold=VOCAB)
    assert all(t.fused for t in on.objective.active_terms) and on.objective.needs == {"last_hidden"}
    off = make_trainer("gpt2", kl, "auto", tmp_path, fused_vocab_threshold=VOCAB + 1)
    assert not any(getattr(t, "fused", False) for t in off.objective.active_terms) and off.objective.needs == {"logits"}


def mixed_trainer(tmp_path, kl_fused):
    """kl + logit_mse (which reads the full logits) + the task loss left at `auto`."""
    terms = [{"loss": "kl", "temperature": 2.0, "fused": kl_fused}, {"loss": "logit_mse", "weight": 0.1},
             {"loss": "task", "weight": 0.5}]
    args = DistillationArguments(output_dir=str(tmp_path / f"mixed-{kl_fused}"), use_cpu=True, report_to=[],
                                 fused_vocab_threshold=0, distillation=terms)
    return DistillationTrainer(model=tiny("llama", 2, 2), teacher=tiny("llama", 3, 1), args=args)


def test_terms_that_need_the_logits_keep_auto_dense(tmp_path):
    auto = mixed_trainer(tmp_path, "auto")
    assert not any(getattr(t, "fused", False) for t in auto.objective.active_terms) and auto.objective.needs == {"logits"}
    forced = mixed_trainer(tmp_path, True)  # an explicit `true` still fuses its own term, the others stay dense
    assert [getattr(t, "fused", False) for t in forced.objective.active_terms] == [True, False, False]
    assert forced.objective.needs == {"logits", "last_hidden"}
    batch = default_data_collator(rows())
    assert_same(loss_and_grads(auto, batch), loss_and_grads(forced, batch))


def test_refusals_say_what_to_change(tmp_path):
    def build(**kw):
        student, teacher = kw.pop("student", tiny("llama", 2, 2)), kw.pop("teacher", tiny("llama", 3, 1))
        distillation = kw.pop("distillation", [{"loss": "kl", "fused": True}])
        args = DistillationArguments(output_dir=str(tmp_path / "r"), use_cpu=True, report_to=[],
                                     distillation=distillation, **kw)
        return DistillationTrainer(model=student, teacher=teacher, args=args)

    with pytest.raises(ValueError, match="fused must be auto, true or false, got 'yes'"):
        build(distillation=[{"loss": "jsd", "fused": "yes"}])
    with pytest.raises(ValueError, match="fused_vocab_threshold must be an integer >= 0"):
        DistillationArguments(output_dir=str(tmp_path), fused_vocab_threshold=-1)
    with pytest.raises(ValueError, match=r"has fused: true, but the teacher cannot: its logits are transformed after "
                                         r"the projection \(final_logit_softcapping=30.0\); set fused: auto or false"):
        build(student=tiny("gemma3", 2, 2), teacher=tiny("gemma3", 3, 1, final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="several teachers are averaged into one target"):
        build(teacher=[tiny("llama", 3, 1), tiny("llama", 3, 3)])
    with pytest.raises(ValueError, match="teacher source gives no live hidden states"):
        build(teacher=None, teacher_source="stored")
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64))
    assert fused_model_refusal(bert) == "it is a masked_lm model, not a causal LM"
    with pytest.raises(ValueError, match="the student cannot: it is a masked_lm model"):
        build(student=bert, teacher=bert, distillation=[{"loss": "task", "fused": "true"}], task_weight=1.0)
    # Several teachers, each with its own term (multi_teacher: separate): fused per teacher.
    trainer = build(teacher=[tiny("llama", 3, 1), tiny("llama", 3, 3)], multi_teacher="separate")
    assert [getattr(t, "fused", False) for t in trainer.objective.active_terms] == [True, True, False]


class ScaledLogitsForCausalLM(T.LlamaForCausalLM):
    """Scales its logits after the projection without a config attribute saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_first_step_checks_the_projection_reproduces_the_logits(tmp_path):
    student = tiny("llama", 2, 2)
    teacher = ScaledLogitsForCausalLM(tiny("llama", 3, 1).config)
    args = DistillationArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                 distillation=[{"loss": "kl", "fused": True}])
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args)
    with pytest.raises(ValueError, match="ScaledLogitsForCausalLM: its logits are not the output projection of its last hidden "
                                         "states .* set fused: false"):
        trainer.compute_loss(student, default_data_collator(rows()))
