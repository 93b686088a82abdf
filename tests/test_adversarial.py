"""Adversarial distillation: the GAN losses, the discriminator's own optimiser, accumulation, resume, refusals."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification, default_data_collator

from hf_distill import DistillationTrainer
from hf_distill.losses import adversarial as adv
from hf_distill.objectives import AdversarialTerm, build_objective
from test_peers import task
from test_text_classification import assets  # noqa: F401 - the tiny encoder and topic CSVs (a fixture)
from test_trainer import NO_DROPOUT, make_args
from tiny import make_wordpiece_tokenizer, tiny_bert_config

TERM = {"loss": "adversarial", "on": "logits", "weight": 1.0, "hidden_size": 16, "discriminator_lr": 1e-2}


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def classifier(tokenizer, seed, hidden=32, layers=2, **kw):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=layers, hidden=hidden, num_labels=2,
                                                          **NO_DROPOUT, **kw))


def build(tokenizer, tmp_path, terms, student_hidden=32, n=32, **kw):
    # A large init range gives the teacher peaked outputs, which a discriminator can tell from the student's.
    teacher = classifier(tokenizer, 1, initializer_range=1.0)
    student = classifier(tokenizer, 2, hidden=student_hidden)
    args = make_args(tmp_path, distillation=terms, task_weight=0.0, **{"learning_rate": 1e-3, **kw})
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=task(tokenizer, n=n),
                                  data_collator=default_data_collator)
    return trainer, student, trainer.objective.terms[0]


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- losses
def test_losses_equal_hand_computed_values():
    t = torch.tensor([2.0, -1.0, 0.5, 3.0])
    s = torch.tensor([-1.0, 0.5, 1.0, 7.0])
    mask = torch.tensor([True, True, True, False])
    sig = torch.sigmoid
    ns_d = sum(-math.log(sig(t[i])) - math.log(1 - sig(s[i])) for i in range(3)) / 5.0
    ns_g = sum(-math.log(sig(s[i])) for i in range(3)) / 5.0
    assert float(adv.discriminator_loss(t, s, mask=mask, num_items=5)) == pytest.approx(float(ns_d), rel=1e-6)
    assert float(adv.generator_loss(s, mask=mask, num_items=5)) == pytest.approx(float(ns_g), rel=1e-6)
    ls_d = sum(0.5 * ((t[i] - 1) ** 2 + s[i] ** 2) for i in range(3)) / 3
    ls_g = sum(0.5 * (s[i] - 1) ** 2 for i in range(3)) / 3
    assert float(adv.discriminator_loss(t, s, kind="least_squares", mask=mask)) == pytest.approx(float(ls_d))
    assert float(adv.generator_loss(s, kind="least_squares", mask=mask)) == pytest.approx(float(ls_g))
    # Correct calls: teacher > 0 at 0 and 2, student < 0 at 0 -> 3 of 6; least squares (threshold 1/2, strict):
    # teacher > 1/2 at 0 only, student < 1/2 at 0 only -> 2 of 6.
    assert float(adv.discriminator_accuracy(t, s, mask=mask)) == pytest.approx(0.5)
    assert float(adv.discriminator_accuracy(t, s, kind="least_squares", mask=mask)) == pytest.approx(1 / 3)
    # A discriminator that scores everything 0 is at chance: 2 log 2 per item.
    zeros = torch.zeros(4)
    assert float(adv.discriminator_loss(zeros, zeros)) == pytest.approx(2 * math.log(2))
    with pytest.raises(ValueError, match="gan_loss must be one of nonsaturating, least_squares"):
        adv.generator_loss(s, kind="wasserstein")
    with pytest.raises(ValueError, match="differ in shape"):
        adv.discriminator_loss(t, s[:2])


# ---------------------------------------------------------------------------------------------- ownership
@pytest.mark.parametrize("terms,student_hidden", [
    ([TERM], 32),
    ([{**TERM, "on": "hidden", "layer": -1, "pooling": "mean", "projection": "linear"}], 16),
])
def test_each_optimiser_updates_only_its_own_parameters(tokenizer, tmp_path, terms, student_hidden):
    trainer, student, term = build(tokenizer, tmp_path, terms, student_hidden=student_hidden)
    disc = list(term.adversary.module.parameters())
    optimizer = trainer.create_optimizer()
    in_student_optimiser = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_student_optimiser for p in disc)
    assert not any(id(p) in {id(q) for q in trainer.objective.parameters()} for p in disc)
    if term.projection is not None:  # the student's side of the term trains with the student
        assert all(id(p) in in_student_optimiser for p in term.projection.parameters())

    batch = default_data_collator([trainer.train_dataset[i] for i in range(8)])
    student.train()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    assert all(p.grad is None for p in disc), "the student's loss must not reach the discriminator"
    student_params = list(student.parameters()) + list(trainer.objective.parameters())
    d_before, s_before = snapshot(disc), snapshot(student_params)
    optimizer.step()  # the student's step
    assert same(d_before, disc)
    assert not same(s_before, student_params)

    s_before = snapshot(student_params)
    optimizer.zero_grad(set_to_none=True)
    term.on_optimizer_step(trainer)  # the discriminator's step
    assert not same(d_before, disc)
    assert same(s_before, student_params)
    assert all(p.grad is None for p in student_params) and all(p.grad is None for p in disc)
    assert term.adversary.updates == 1 and term.adversary.kept == []


def test_training_logs_both_losses_and_the_discriminator_learns(tokenizer, tmp_path):
    terms = [{**TERM, "steps_per_student_step": 2, "discriminator_lr": 3e-2}]
    trainer, _, term = build(tokenizer, tmp_path, terms, max_steps=8, gradient_accumulation_steps=2,
                             per_device_train_batch_size=4)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss_adversarial" in h]
    assert {"loss_adversarial", "loss_adversarial_discriminator", "loss_adversarial_discriminator_accuracy"} <= \
        set(history[0])
    assert term.adversary.updates == 8 * 2  # once per optimiser step (not per micro-batch), times steps_per_student
    assert history[-1]["loss_adversarial_discriminator"] < history[0]["loss_adversarial_discriminator"] - 0.3
    assert history[-1]["loss_adversarial_discriminator_accuracy"] > 0.6


@pytest.mark.parametrize("extra", [{}, {"on": "hidden", "pooling": "token"}])
def test_accumulation_equals_one_large_batch_over_several_steps(tokenizer, tmp_path, extra):
    """Batch 16 == batch 8 x accumulation 2 after 3 steps: the student and the discriminator end up equal."""
    runs = []
    for name, batch, accumulation in (("big", 16, 1), ("acc", 8, 2)):
        trainer, student, term = build(tokenizer, tmp_path / name, [{**TERM, **extra}, {"loss": "kl"}], n=16,
                                       max_steps=3, per_device_train_batch_size=batch,
                                       gradient_accumulation_steps=accumulation)
        trainer.train()
        runs.append((snapshot(student.parameters()), snapshot(term.adversary.module.parameters()),
                     [h["loss_adversarial_discriminator"] for h in trainer.state.log_history if "loss" in h]))
    (s1, d1, l1), (s2, d2, l2) = runs
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(s1, s2))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(d1, d2))


def test_resume_restores_student_and_discriminator_exactly(tokenizer, tmp_path):
    kw = {"max_steps": 6, "lr_scheduler_type": "linear", "logging_steps": 1}
    full, s_full, t_full = build(tokenizer, tmp_path / "full", [TERM, {"loss": "kl"}], **kw)
    full.train()
    first, _, _ = build(tokenizer, tmp_path / "cut", [TERM, {"loss": "kl"}], save_strategy="steps", save_steps=3, **kw)
    first.train()
    folder = tmp_path / "cut" / "out"
    assert (folder / "checkpoint-3" / "loss_adversarial_discriminator.safetensors").is_file()
    assert (folder / "checkpoint-3" / "loss_adversarial_discriminator_optimizer.pt").is_file()
    shutil.rmtree(folder / "checkpoint-6")
    resumed, s_res, t_res = build(tokenizer, tmp_path / "cut", [TERM, {"loss": "kl"}], save_strategy="steps",
                                  save_steps=3, **kw)
    resumed.train(resume_from_checkpoint=True)
    assert t_res.adversary.updates == 6
    for a, b in zip(s_full.parameters(), s_res.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(t_full.adversary.module.parameters(), t_res.adversary.module.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    lr_full = t_full.adversary.optimizer.param_groups[0]["lr"]
    assert t_res.adversary.optimizer.param_groups[0]["lr"] == pytest.approx(lr_full)
    keys = ("loss", "loss_adversarial", "loss_adversarial_discriminator", "loss_kd")
    def logged(trainer):
        return {h["step"]: [h[k] for k in keys] for h in trainer.state.log_history
                if "loss_adversarial" in h and h["step"] > 3}

    full_logs, resumed_logs = logged(full), logged(resumed)
    assert sorted(full_logs) == sorted(resumed_logs) == [4, 5, 6]
    for step in full_logs:
        assert resumed_logs[step] == pytest.approx(full_logs[step], rel=1e-5)


def test_the_discriminator_schedule_is_its_own(tokenizer, tmp_path):
    """A linear schedule over the discriminator's updates, from discriminator_lr (not the student's rate)."""
    trainer, _, term = build(tokenizer, tmp_path, [{**TERM, "discriminator_lr": 0.05, "steps_per_student_step": 2}],
                             max_steps=4, lr_scheduler_type="linear", learning_rate=1e-3)
    trainer.train()
    assert term.adversary.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 8 of 8 updates done
    assert term.adversary.scheduler.last_epoch == 8 and trainer.lr_scheduler.last_epoch == 4
    assert term.adversary.optimizer.defaults["lr"] == 0.05


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options,student_hidden,message", [
    ({"on": "probs"}, 32, "on must be 'logits' or 'hidden', got 'probs'"),
    ({"layer": -1}, 32, "layer apply to on: hidden; drop them or set on: hidden"),
    ({"on": "hidden", "pooling": "max"}, 32, "pooling must be one of token, cls, mean"),
    ({"on": "hidden", "layer": 7}, 32, "layer 7 is out of range for the student"),
    ({"on": "hidden"}, 16, "add `projection: linear`"),
    ({"on": "hidden", "projection": "mlp"}, 32, "projection must be 'linear' or omitted"),
    ({"hidden_size": 0}, 32, "hidden_size must be >= 1, got 0"),
    ({"steps_per_student_step": 0}, 32, "steps_per_student_step must be >= 1, got 0"),
    ({"discriminator_lr": 0}, 32, "discriminator_lr must be > 0"),
    ({"discriminator_lr": "fast"}, 32, "discriminator_lr must be a number"),
    ({"gan_loss": "hinge"}, 32, "gan_loss must be one of nonsaturating, least_squares"),
    ({"temperature": 2.0}, 32, "has no option"),
])
def test_bad_options_are_refused(tokenizer, tmp_path, options, student_hidden, message):
    teacher, student = classifier(tokenizer, 1), classifier(tokenizer, 2, hidden=student_hidden)
    args = make_args(tmp_path, distillation=[{**TERM, **options}])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", ".")):
        build_objective(args, student, [teacher])


def test_hidden_states_need_a_live_teacher(tokenizer, tmp_path):
    student = classifier(tokenizer, 2)
    args = make_args(tmp_path, distillation=[{**TERM, "on": "hidden"}])
    with pytest.raises(ValueError, match="needs a live teacher's hidden states"):
        build_objective(args, student, [])


def test_generator_term_pulls_student_towards_the_teacher_side(tokenizer, tmp_path):
    """The generator gradient raises the student's score: one small step on its logits increases D(student)."""
    trainer, student, term = build(tokenizer, tmp_path, [TERM])
    assert isinstance(term, AdversarialTerm)
    batch = default_data_collator([trainer.train_dataset[i] for i in range(8)])
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    logits.requires_grad_(True)
    scores = term.adversary.detached_scores(torch.log_softmax(logits, -1))
    adv.generator_loss(scores).backward()
    moved = logits.detach() - 0.5 * logits.grad / logits.grad.norm()
    with torch.no_grad():
        after = term.adversary.module(torch.log_softmax(moved, -1))
    assert float(after.mean()) > float(scores.detach().mean())
    assert F.softplus(-after).mean() < F.softplus(-scores.detach()).mean()


# ---------------------------------------------------------------------------------------------- the recipe
def _recipe():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "recipes"))  # the recipe imports its sibling efficient_student
    spec = importlib.util.spec_from_file_location("adversarial_bbc_recipe", root / "recipes" / "adversarial_bbc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_recipe_trains_every_arm_the_same_steps_and_compares_them(assets, tmp_path):  # noqa: F811
    recipe = _recipe()
    out = tmp_path / "run"
    results = recipe.main([
        "--teacher", str(assets / "classifier"), "--student_init", str(assets / "encoder"), "--student_layers", "0,3",
        "--train_file", str(assets / "train.csv"), "--test_file", str(assets / "test.csv"), "--label_column", "topic",
        "--labelled_samples", "60", "--output_dir", str(out), "--max_length", "24",
        "--distillation", '[{"loss": "kl", "weight": 0.5, "temperature": 2.0}, {"loss": "task", "weight": 0.5}]',
        "--discriminator_hidden_size", "16", "--graph_k", "3", "--num_train_epochs", "2", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "8", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--disable_tqdm", "true", "--eval_batch_size", "16", "--latency_batch_size", "8",
        "--latency_warmup", "1", "--latency_repeats", "1", "--bootstrap_resamples", "100"])
    names = [r["name"] for r in results["models"]]
    assert names == ["teacher", *recipe.ARMS]
    steps = results["training"]["steps"]
    assert steps == 2 * 8  # 2 epochs of 60 rows in batches of 8
    assert all(h[-1]["step"] == steps for h in results["log_history"].values())
    assert results["discriminator"]["updates"] == steps
    assert "loss_adversarial_discriminator" in results["discriminator"]["last_log"]
    assert any("loss_knn_graph" in h for h in results["log_history"]["KD + CE + knn_graph"])
    assert set(results["comparisons"]) == {"KD + CE minus CE only", "KD + CE + adversarial minus KD + CE",
                                           "KD + CE + adversarial minus CE only", "KD + CE + knn_graph minus KD + CE",
                                           "KD + CE + knn_graph minus CE only"}
    assert (out / "results.md").is_file() and results["data"]["n_train"] == 60
    with pytest.raises(ValueError, match="drop them from it"):
        recipe.main(["--teacher", "x", "--student_init", "y", "--output_dir", str(out),
                     "--distillation", '[{"loss": "adversarial"}]'])
