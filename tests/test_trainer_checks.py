"""Wrong settings are refused at construction; projections are clipped and reset like the student's gradients;
evaluation allocates no gradient buffers."""

import pytest
import torch
from transformers import default_data_collator

from hf_distill import DistillationArguments, DistillationTrainer, losses
from test_trainer import make_args, masked_dataset, teacher_student
from tiny import make_wordpiece_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


@pytest.mark.parametrize("loss", ["rkd_distance", "rkd_angle", "similarity_preserving"])
@pytest.mark.parametrize("layer, message", [(9, "layer 9 is out of range for the student"),
                                            ("last", "must be an integer"), (1.5, "must be an integer"),
                                            (-7, "out of range")])
def test_relation_layer_is_checked_at_construction(tokenizer, tmp_path, loss, layer, message):
    teacher, student = teacher_student(tokenizer)  # student: 2 layers -> hidden_states 0..2; teacher 0..4
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher=teacher,
                            args=make_args(tmp_path, distillation=[{"loss": loss, "layer": layer}]))


def test_relation_layer_in_range_works(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=masked_dataset(tokenizer, n=8),
                                  data_collator=default_data_collator,
                                  args=make_args(tmp_path, distillation=[{"loss": "rkd_distance", "layer": 1}]))
    trainer.train()
    assert trainer.state.log_history[0]["loss_rkd_distance"] > 0


@pytest.mark.parametrize("spec, message", [("a,b", "'a' is not a number"), ("1,nan", "finite"), ("-1,2", ">= 0"),
                                           ("0,0", "positive sum")])
def test_teacher_weights_are_checked_when_parsed(spec, message):
    with pytest.raises(ValueError, match=message):
        DistillationArguments(output_dir="x", teacher_weights=spec)
    assert DistillationArguments(output_dir="x", teacher_weights="1,3").teacher_weight_list == [0.25, 0.75]


def test_teacher_weights_must_match_the_teachers(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match="3 entries but there are 2 teachers"):
        DistillationTrainer(model=student, teacher=[teacher, teacher], args=make_args(tmp_path, teacher_weights="1,2,3"))


@pytest.mark.parametrize("terms, message", [
    ([{"loss": "kl", "temperatur": 2}], "has no option"),
    ([{"loss": "klx"}], "unknown distillation loss"),
    ([{"loss": 3}], "loss must be a term name"),
    ([{"weight": 2}], "has no 'loss' key"),
    ("[{loss: kl", "cannot read the distillation list"),
    ([{"loss": "attention_relation", "relation_heads": "many"}], "must be an integer"),
    ([{"loss": "hidden_mse", "layers": "1-3"}], "cannot read layer pair"),
    ([{"loss": "hidden_mse", "layers": {1: 9}}], "out of range"),
    ([{"loss": "kl", "teacher": 2}], "reads teacher 2"),
])
def test_bad_terms_are_refused_at_construction(tokenizer, tmp_path, terms, message):
    teacher, student = teacher_student(tokenizer)
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, distillation=terms))


def test_projections_are_clipped_with_the_student(tokenizer, tmp_path):
    """max_grad_norm bounds the joint norm of the student's and the projections' gradients."""
    teacher, student = teacher_student(tokenizer, student_hidden=16)
    terms = [{"loss": "hidden_mse", "projection": "linear", "layers": {2: 4}, "weight": 100.0}]
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=masked_dataset(tokenizer, n=8),
                                  data_collator=default_data_collator,
                                  args=make_args(tmp_path, distillation=terms, max_grad_norm=1e-3, learning_rate=1.0,
                                                 optim="sgd", lr_scheduler_type="constant", task_weight=0.0))
    before = [p.detach().clone() for p in trainer.objective.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert trainer.state.log_history[0]["grad_norm"] > 1.0  # far above the limit before clipping
    moved = sum(((a - b) ** 2).sum() for a, b in zip(before, trainer.objective.parameters()))
    moved += sum(((a - b) ** 2).sum() for a, b in zip(student_before, student.parameters()))
    assert 0 < float(moved) ** 0.5 <= 1e-3 * (1 + 1e-4)  # SGD step = lr x clipped gradient


def test_projection_gradients_are_cleared_after_each_step(tokenizer, tmp_path):
    teacher, student = teacher_student(tokenizer, student_hidden=16)
    terms = [{"loss": "hidden_mse", "projection": "linear", "layers": {2: 4}}]
    seen = []

    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=masked_dataset(tokenizer, n=16),
                                  data_collator=default_data_collator,
                                  args=make_args(tmp_path, distillation=terms, max_steps=2))
    weight = next(trainer.objective.parameters())
    weight.register_hook(lambda g: seen.append(g.detach().clone()))

    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(("grad", weight.grad.detach().clone()))

    trainer.add_callback(Probe())
    trainer.train()
    grads = [g for g in seen if not isinstance(g, tuple)]
    at_step = [g for tag, g in (x for x in seen if isinstance(x, tuple))]
    assert len(grads) == 2 and len(at_step) == 2
    # At each optimiser step the gradient is that step's own, not the sum with the previous one's.
    assert torch.allclose(at_step[1], grads[1]) and not torch.allclose(at_step[1], grads[0] + grads[1])
    assert weight.grad is None


def test_evaluation_allocates_no_gradient_buffers(monkeypatch):
    """Under no_grad the chunked and fused divergences make no gradient-sized buffers (even for parameters)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, 50, generator=g, requires_grad=True)
    t = torch.randn(4, 6, 50, generator=g)
    h_s = torch.randn(4, 6, 16, generator=g, requires_grad=True)
    w_s = torch.nn.Parameter(torch.randn(50, 16, generator=g))
    h_t, w_t = torch.randn(4, 6, 8, generator=g), torch.randn(50, 8, generator=g)
    sizes = []
    real_zeros_like, real_zeros = torch.zeros_like, torch.zeros

    def zeros_like(x, *a, **k):
        sizes.append(x.numel())
        return real_zeros_like(x, *a, **k)

    def zeros(*shape, **k):
        out = real_zeros(*shape, **k)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "zeros_like", zeros_like)
    monkeypatch.setattr(torch, "zeros", zeros)
    with torch.no_grad():
        a = losses.chunked_kl_loss(s, t, temperature=2.0, chunk_size=5)
        b = losses.fused_linear_kl_loss(h_s, w_s, h_t, w_t, chunk_size=5)
    assert max(sizes, default=1) <= 5, sizes  # running totals and per-row maxima of a 5-row chunk only
    sizes.clear()
    c = losses.chunked_kl_loss(s, t, temperature=2.0, chunk_size=5)
    assert max(sizes) == s.numel()  # training: the gradient is formed in the same pass
    assert torch.allclose(a, c.detach())
    assert torch.allclose(b, losses.kl_div_loss(h_s @ w_s.T, h_t @ w_t.T).detach(), rtol=1e-5)
