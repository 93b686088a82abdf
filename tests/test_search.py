"""Student architecture search: successive halving keeps the best by the recorded metric, the budget holds for
every candidate on the front, candidates are built from the teacher."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import BertForSequenceClassification, default_data_collator

from hf_distill import DistillationTrainer
from hf_distill.students.pruning import calibration_batches
from hf_distill.students.search import Candidate, candidate_shapes, describe, pareto_front, prepare_candidates, \
    successive_halving, within_budget
from test_trainer import NO_DROPOUT, make_args
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config


def fake(quality: float, latency: float, name_layers: int) -> Candidate:
    c = Candidate(name_layers, 2, 8, 16, latency_ms=latency, parameters=int(latency * 100))
    c.quality = quality
    return c


def test_successive_halving_keeps_the_best_and_doubles_their_steps():
    qualities = [0.3, 0.9, 0.5, 0.7, 0.1, 0.8, 0.6, 0.2]
    cands = [fake(q, 1.0, i + 1) for i, q in enumerate(qualities)]
    trained = {c.name: 0 for c in cands}

    def train(c, steps):
        trained[c.name] += steps

    def score(c):  # a noisy but monotone learning curve: more steps help, quality decides the order
        return c.quality * (1 - 0.5 ** (1 + c.steps))

    ranked = successive_halving(cands, train, score, min_steps=1, eta=2)
    assert ranked[0].quality == 0.9 and ranked[0].rounds == 4 and ranked[0].steps == 8
    by_quality = sorted(cands, key=lambda c: -c.quality)
    assert [c.rounds for c in by_quality] == [4, 3, 2, 2, 1, 1, 1, 1]
    assert [trained[c.name] for c in by_quality] == [8, 4, 2, 2, 1, 1, 1, 1]  # each continued, never restarted
    assert sum(trained.values()) == 20
    with pytest.raises(ValueError, match="eta >= 2"):
        successive_halving(cands, train, score, min_steps=1, eta=1)


def test_pareto_front_and_budget():
    cands = [fake(0.9, 10.0, 1), fake(0.8, 5.0, 2), fake(0.85, 12.0, 3), fake(0.7, 5.0, 4), fake(0.95, 20.0, 5)]
    for c in cands:
        c.score = c.quality
    front = pareto_front(cands)
    assert [c.layers for c in front] == [2, 1, 5]  # 0.85 @ 12 ms and 0.7 @ 5 ms are dominated
    kept = within_budget(cands, max_latency_ms=10.0)
    assert all(c.latency_ms <= 10.0 for c in kept) and len(kept) == 3
    assert all(c.latency_ms <= 10.0 for c in pareto_front(kept))
    with pytest.raises(ValueError, match="no candidate is within the budget"):
        within_budget(cands, max_latency_ms=1.0)
    assert "| L2-H2-F8-D16 |" in describe(cands, front)


def test_candidates_are_built_from_the_teacher_and_measured():
    tok = make_wordpiece_tokenizer()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(len(tok), layers=4, heads=4, num_labels=2,
                                                             **NO_DROPOUT)).eval()
    cands = candidate_shapes(teacher, layers=[2, 4], heads=[2, 4], intermediate=[32])
    assert [(c.layers, c.heads, c.hidden) for c in cands] == [(2, 2, 16), (2, 4, 32), (4, 2, 16), (4, 4, 32)]
    calibration = list(calibration_batches(tok, sample_texts(16, seed=1), max_length=16))
    prepare_candidates(teacher, cands, calibration, calibration[0])
    assert all(c.latency_ms > 0 and c.parameters > 0 for c in cands)
    assert cands[0].parameters < cands[1].parameters < cands[3].parameters
    assert cands[0].model.config.num_hidden_layers == 2 and cands[0].model.config.hidden_size == 16
    with pytest.raises(ValueError, match="larger than the teacher"):
        candidate_shapes(teacher, layers=[8], heads=[2], intermediate=[32])


def test_a_tiny_search_end_to_end(tmp_path):
    """Distillation from a teacher's logits as the short runs, held-out agreement as the score."""
    tok = make_wordpiece_tokenizer()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(len(tok), layers=4, heads=4, num_labels=2,
                                                             initializer_range=0.3, **NO_DROPOUT)).eval()
    texts = sample_texts(48, seed=3)
    enc = tok(texts, truncation=True, max_length=16, padding="max_length")
    with torch.no_grad():
        t_logits = teacher(input_ids=torch.tensor(enc["input_ids"]),
                           attention_mask=torch.tensor(enc["attention_mask"])).logits
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": t_logits.argmax(-1).tolist(), "teacher_logits": t_logits.tolist()})
    calibration = list(calibration_batches(tok, texts[:16], max_length=16))
    cands = candidate_shapes(teacher, layers=[1, 2], heads=[2, 4], intermediate=[32])
    prepare_candidates(teacher, cands, calibration, calibration[0])

    def train(c, steps):
        args = make_args(tmp_path / c.name, max_steps=steps, cos_weight=0.0, learning_rate=3e-3)
        DistillationTrainer(model=c.model, args=args, train_dataset=ds, data_collator=default_data_collator).train()

    def score(c):
        batch = default_data_collator([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            pred = c.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float((pred.argmax(-1) == batch["labels"]).float().mean())

    ranked = successive_halving(within_budget(cands, max_parameters=10 ** 9), train, score, min_steps=2, eta=2)
    assert ranked[0].steps == 8 and not math.isnan(ranked[0].score)
    assert {c.name for c in pareto_front(ranked)} <= {c.name for c in ranked}
