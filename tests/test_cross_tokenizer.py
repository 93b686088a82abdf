"""Cross-tokenizer distillation: ULD and span KL against hand computations, the alignment of two tokenizations
by character offsets, the check at construction, and training through the trainer on two tiny tokenizers."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.lm.cross_tokenizer import (
    CrossTokenizerCollator,
    align_tokens,
    build_cross_tokenizer_dataset,
    encode_pair,
    output_layer_restricted_to,
    shared_vocabulary,
    token_texts,
)
from hf_distill.losses.cross_tokenizer import (
    shared_vocabulary_kl_loss,
    sorted_l1_distance,
    uld_loss,
)

TEXT = "the cat sat sunset catnap"


# ---------------------------------------------------------------------------------------------- tiny tokenizers
def _merges(targets):
    """BPE merges that build each target token left to right (in this order of priority), and the pieces."""
    merges, pieces = [], []
    for token in targets:
        current = token[0]
        for ch in token[1:]:
            if (current, ch) not in merges:
                merges.append((current, ch))
            current += ch
            pieces.append(current)
    return merges, pieces


def byte_level_tokenizer(targets):
    """GPT-2 / SmolLM2-style: byte-level BPE, a space is the prefix ``Ġ`` of the next word, offsets trimmed."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges, pieces = _merges(targets)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<|endoftext|>"] + alphabet + pieces))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def metaspace_tokenizer(targets, chars):
    """Gemma / SentencePiece-style: ``▁`` marks a space (its offsets include it), a BOS token is added."""
    merges, pieces = _merges(targets)
    alphabet = sorted(set(chars) | {"\u2581"})
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>"] + alphabet + pieces))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def pair():
    student = byte_level_tokenizer(["the", "Ġcat", "Ġsat", "Ġsun", "set", "nap", "Ġthe", "Ġmat", "Ġon"])
    teacher = metaspace_tokenizer(["▁the", "▁cat", "▁sat", "▁su", "nset", "▁catnap", "▁on", "▁mat"],
                                  set("the cat sat sunset catnap on mat".replace(" ", "")))
    return student, teacher


def tiny_llama(vocab, seed, layers=1):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------- pure losses
def test_uld_matches_hand_computation():
    # row 1: sorted student [.5 .3 .2 0], sorted teacher [.6 .25 .1 .05]: |.1|+|.05|+|.1|+|.05| = 0.3
    # row 2: student [.9 .1] x exp(log .5) = [.45 .05], teacher [.7 .2 .1 0]: .25 + .15 + .1 + 0 = 0.5
    s = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.9, 1e-30]], dtype=torch.float64))
    t = torch.log(torch.tensor([[0.1, 0.6, 0.25, 0.05], [0.2, 0.7, 0.1, 1e-30]], dtype=torch.float64))
    value = uld_loss(s, t, student_log_scale=torch.tensor([0.0, math.log(0.5)], dtype=torch.float64))
    assert value.item() == pytest.approx((0.3 + 0.5) / 2, abs=1e-12)
    assert uld_loss(s, t, num_items=8, student_log_scale=torch.tensor([0.0, math.log(0.5)], dtype=torch.float64)
                    ).item() == pytest.approx(0.8 / 8, abs=1e-12)
    # temperature 2: softmax(log p / 2) = sqrt(p) / sum sqrt(p), sorted and compared by hand
    sq_s = [math.sqrt(x) for x in (0.5, 0.3, 0.2)]
    sq_t = [math.sqrt(x) for x in (0.6, 0.25, 0.1, 0.05)]
    ps = [x / sum(sq_s) for x in sq_s] + [0.0]
    pt = [x / sum(sq_t) for x in sq_t]
    expected = sum(abs(a - b) for a, b in zip(ps, pt))
    assert uld_loss(s[:1], t[:1], temperature=2.0).item() == pytest.approx(expected, abs=1e-12)


def test_uld_is_zero_for_the_same_sorted_probabilities_and_has_the_right_gradient():
    # the same probabilities on other tokens (and a longer vocabulary with zero mass) give exactly 0
    s = torch.log(torch.tensor([[0.2, 0.7, 0.1]], dtype=torch.float64)).requires_grad_()
    t = torch.log(torch.tensor([[0.7, 0.1, 0.0, 0.2]], dtype=torch.float64))
    value = uld_loss(s, t)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-15)
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.float64)
    scale = torch.randn(5, dtype=torch.float64) * 0.1
    assert torch.autograd.gradcheck(lambda x, c: uld_loss(x, t, temperature=1.5, student_log_scale=c),
                                    (s, scale.requires_grad_()))
    # the longer row's ranks past the shorter vocabulary are its remaining mass: same value as padding by hand
    p, q = torch.softmax(s.detach(), -1), torch.softmax(t, -1)
    padded = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, 4))
    assert torch.allclose(sorted_l1_distance(p, q), (padded - q.sort(-1, descending=True).values).abs().sum(-1))


def test_shared_vocabulary_kl_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.5, 3.0, 1.0]], dtype=torch.float64)
    s_ids, t_ids = torch.tensor([1, 2]), torch.tensor([0, 2])  # shared: student 1 = teacher 0, 2 = 2
    qs = [math.exp(2.0) / (math.exp(2.0) + 1.0), 1.0 / (math.exp(2.0) + 1.0)]
    qt = [math.exp(0.5) / (math.exp(0.5) + math.exp(1.0)), math.exp(1.0) / (math.exp(0.5) + math.exp(1.0))]
    expected = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    value = shared_vocabulary_kl_loss(s, t, s_ids, t_ids, num_items=2)
    assert value.item() == pytest.approx(expected / 2, abs=1e-12)
    value.backward()  # d/ds of KL(q_t || q_s) over the shared entries: (q_s - q_t) / num_items, 0 elsewhere
    assert torch.allclose(s.grad, torch.tensor([[0.0, (qs[0] - qt[0]) / 2, (qs[1] - qt[1]) / 2, 0.0]],
                                               dtype=torch.float64))
    # T = 2: x T^2 on the softened distributions; zero when they agree on the shared tokens
    same = shared_vocabulary_kl_loss(torch.tensor([[9.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0]]),
                                     torch.tensor([1, 2]), torch.tensor([0, 1]), temperature=2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("call, message", [
    (lambda: uld_loss(torch.zeros(2, 3), torch.zeros(3, 4)), "2 aligned rows but the teacher 3"),
    (lambda: uld_loss(torch.zeros(2, 3), torch.zeros(2, 4), temperature=0), "temperature must be a positive"),
    (lambda: shared_vocabulary_kl_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]),
                                       torch.tensor([0, 1])), "same length"),
])
def test_bad_loss_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_groups_tokens_covering_the_same_text():
    # student "the|cat|sat|sun|set|cat|nap" (offsets without the space), teacher <bos>|"▁the"|"▁cat"... (with it)
    student = [(0, 3), (4, 7), (8, 11), (12, 15), (15, 18), (19, 22), (22, 25)]
    teacher = [(0, 0), (0, 3), (3, 7), (7, 11), (11, 14), (14, 18), (18, 25)]
    assert align_tokens(TEXT, student, teacher) == [(0, 1, 1, 2), (1, 2, 2, 3), (2, 3, 3, 4), (3, 5, 4, 6),
                                                   (5, 7, 6, 7)]
    # a space at the end of a token ("the ") or in no token at all puts the boundary at the same place
    trailing = [(0, 4), (4, 8), (8, 12), (12, 14), (14, 19), (19, 25)]  # "the "|"cat "|"sat "|"su"|"nset "|"catnap"
    assert align_tokens(TEXT, trailing, student) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 5, 3, 5),
                                                    (5, 6, 5, 7)]
    # a newline that one tokenizer makes a token of its own joins the following word's group
    text = "a.\nThe"
    assert align_tokens(text, [(0, 1), (1, 2), (2, 3), (3, 6)], [(0, 1), (1, 2), (2, 6)]) == [
        (0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3)]


def test_alignment_of_two_real_tokenizations(pair):
    student, teacher = pair
    row = encode_pair(TEXT, student, teacher)
    s_tokens = student.convert_ids_to_tokens(row["input_ids"])
    t_tokens = teacher.convert_ids_to_tokens(row["teacher_input_ids"])
    assert s_tokens == ["<|endoftext|>", "the", "Ġcat", "Ġsat", "Ġsun", "set", "Ġcat", "nap"]  # start token added
    assert t_tokens == ["<bos>", "▁the", "▁cat", "▁sat", "▁su", "nset", "▁catnap"]
    # "sunset" is split sun|set and su|nset: one group of 2 + 2 tokens; "catnap" 2 tokens vs 1
    assert row["teacher_alignment"] == [[1, 2, 1, 2], [2, 3, 2, 3], [3, 4, 3, 4], [4, 6, 4, 6], [6, 8, 6, 7]]
    for s0, s1, t0, t1 in row["teacher_alignment"]:
        assert student.decode(row["input_ids"][s0:s1]).strip() == teacher.decode(row["teacher_input_ids"][t0:t1]).strip()


def test_shared_vocabulary_compares_token_texts(pair):
    student, teacher = pair
    s_ids, t_ids = shared_vocabulary(student, teacher)
    s_text, t_text = token_texts(student), token_texts(teacher)
    pairs = {s_text[int(a)] for a in s_ids}
    assert {" cat", " sat", " su", " the", " on", " mat", "t", "a"} <= pairs
    assert "the" not in pairs and " catnap" not in pairs and "nset" not in pairs  # only in one vocabulary
    assert all(s_text[int(a)] == t_text[int(b)] for a, b in zip(s_ids, t_ids))


def test_dataset_cuts_texts_at_a_student_token_boundary_and_collates(pair):
    student, teacher = pair
    texts = [TEXT, "the cat sat on the mat"]
    first = build_cross_tokenizer_dataset(texts, student, teacher, max_length=5, max_pieces_per_text=1)
    assert first["text"] == ["the cat sat", "the cat sat"]  # 5 tokens would end inside "sunset": cut before
    data = build_cross_tokenizer_dataset(texts, student, teacher, max_length=5)
    assert data["text"][:2] == ["the cat sat", " sunset catnap"]  # the rest of a text makes the next pieces
    assert "".join(data["text"]) == "".join(texts)
    assert all(len(ids) <= 5 for ids in data["input_ids"])
    assert data["teacher_alignment"][1] == [[1, 3, 1, 3], [3, 5, 3, 4]]  # sun|set ~ su|nset, cat|nap ~ catnap
    batch = CrossTokenizerCollator(student, teacher)([first[0], encode_pair("the cat", student, teacher)])
    assert batch["input_ids"].shape == (2, 4) and batch["teacher_input_ids"].shape == (2, 4)
    assert batch["labels"][1].tolist() == batch["input_ids"][1, :3].tolist() + [-100]
    assert batch["teacher_alignment"][1, 2].tolist() == [-1, -1, -1, -1]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


# ---------------------------------------------------------------------------------------------- trainer and terms
def make_args(tmp_path, terms, **kw):
    base = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 3e-3,
            "max_steps": 1, "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
            "dataloader_num_workers": 0, "disable_tqdm": True, "remove_unused_columns": False, "distillation": terms}
    base.update(kw)
    return DistillationArguments(**base)


def make_trainer(pair, tmp_path, terms, texts=(TEXT,), **kw):
    student_tok, teacher_tok = pair
    data = build_cross_tokenizer_dataset(list(texts), student_tok, teacher_tok, max_length=16)
    return DistillationTrainer(model=tiny_llama(len(student_tok), 0), teacher=tiny_llama(len(teacher_tok), 1, 2).eval(),
                               args=make_args(tmp_path, terms, **kw), train_dataset=data,
                               data_collator=CrossTokenizerCollator(student_tok, teacher_tok),
                               processing_class=student_tok, teacher_processing_class=teacher_tok)


@pytest.mark.parametrize("terms, named", [
    (None, "['hidden_cos', 'kl']"),  # the default objective: DistilBERT's KL + cosine + task
    ([{"loss": "jsd"}], "['jsd']"),
    ([{"loss": "uld"}, {"loss": "kl", "weight": 2.0}, {"loss": "hidden_mse", "layers": {1: 2}}], "['hidden_mse', 'kl']"),
])
def test_token_level_terms_are_refused_for_another_tokenizer(pair, tmp_path, terms, named):
    with pytest.raises(ValueError) as info:
        make_trainer(pair, tmp_path, terms)
    message = str(info.value)
    student_tok, teacher_tok = pair
    assert f"logits range over {len(student_tok)} vocabulary entries but the teacher's over {len(teacher_tok)}" in message
    assert named in message and "uld and span_kl" in message and "CrossTokenizerCollator" in message


@pytest.mark.parametrize("terms", [[{"loss": "uld"}], [{"loss": "span_kl", "temperature": 2.0}],
                                   [{"loss": "uld"}, {"loss": "span_kl"}, {"loss": "kl", "weight": 0.0}]])
def test_cross_tokenizer_terms_are_accepted(pair, tmp_path, terms):
    trainer = make_trainer(pair, tmp_path, terms)
    assert {t.loss_name for t in trainer.objective.active_terms} == {t["loss"] for t in terms if t.get("weight", 1)} | {
        "task"}


def test_span_kl_needs_both_tokenizers(pair, tmp_path):
    student_tok, teacher_tok = pair
    with pytest.raises(ValueError, match="needs both tokenizers"):
        DistillationTrainer(model=tiny_llama(len(student_tok), 0), teacher=tiny_llama(len(teacher_tok), 1),
                            args=make_args(tmp_path, [{"loss": "span_kl"}]))


def _hand_terms(trainer, batch, pair):
    """ULD and span KL of one batch computed group by group with plain Python, as a reference."""
    student_tok, teacher_tok = pair
    with torch.no_grad():
        s_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = trainer.teacher(input_ids=batch["teacher_input_ids"],
                                   attention_mask=batch["teacher_attention_mask"]).logits
    s_ids, t_ids = shared_vocabulary(student_tok, teacher_tok)
    uld = kl = 0.0
    for b in range(batch["input_ids"].shape[0]):
        for s0, s1, t0, t1 in batch["teacher_alignment"][b].tolist():
            if s0 < 1 or any(batch["labels"][b, m] == -100 for m in range(s0, s1)):
                continue  # padding, or a group with a token that is no target (a prompt)
            ps = torch.softmax(s_logits[b, s0 - 1].double(), -1)
            pt = torch.softmax(t_logits[b, t0 - 1].double(), -1)
            for m in range(s0 + 1, s1):  # the group's later tokens scale its first distribution
                ps = ps * torch.softmax(s_logits[b, m - 1].double(), -1)[batch["input_ids"][b, m]]
            for m in range(t0 + 1, t1):
                pt = pt * torch.softmax(t_logits[b, m - 1].double(), -1)[batch["teacher_input_ids"][b, m]]
            a, c = sorted(ps.tolist(), reverse=True), sorted(pt.tolist(), reverse=True)
            n = max(len(a), len(c))  # the shorter one padded with zeros
            a, c = a + [0.0] * (n - len(a)), c + [0.0] * (n - len(c))
            uld += sum(abs(x - y) for x, y in zip(a, c))
            qs = torch.softmax(s_logits[b, s0 - 1][s_ids].double(), -1)
            qt = torch.softmax(t_logits[b, t0 - 1][t_ids].double(), -1)
            kl += float((qt * (qt.log() - qs.log())).sum())
    targets = int((batch["labels"][:, 1:] != -100).sum())
    return uld / targets, kl / targets


def test_terms_through_the_trainer_match_the_hand_computation(pair, tmp_path):
    texts = [TEXT, "the cat sat on the mat", "the sunset"]
    trainer = make_trainer(pair, tmp_path, [{"loss": "uld"}, {"loss": "span_kl"}], texts=texts)
    batch = CrossTokenizerCollator(*pair)([trainer.train_dataset[i] for i in range(3)])
    trainer.model.eval()
    trainer.compute_loss(trainer.model, batch)
    terms = dict(trainer._eval_terms)
    uld, kl = _hand_terms(trainer, batch, pair)
    assert terms["loss_uld"] / 3 == pytest.approx(uld, rel=1e-5)
    assert terms["loss_span_kl"] / 3 == pytest.approx(kl, rel=1e-5)
    assert uld > 0.01 and kl > 0.01
    # a prompt: targets start inside "sunset" (student token 5 of row 0), so that group and those before it drop out
    batch["labels"][0, :5] = -100
    trainer._eval_terms.clear()
    trainer.compute_loss(trainer.model, batch)
    masked_uld, masked_kl = _hand_terms(trainer, batch, pair)
    assert trainer._eval_terms["loss_uld"] / 3 == pytest.approx(masked_uld, rel=1e-5)
    assert trainer._eval_terms["loss_span_kl"] / 3 == pytest.approx(masked_kl, rel=1e-5)
    unmasked_targets = int(batch["attention_mask"].sum()) - 3  # every real token but each row's start token
    assert masked_uld * int((batch["labels"][:, 1:] != -100).sum()) < uld * unmasked_targets  # fewer groups summed


def test_uld_training_moves_the_student_towards_the_teacher(pair, tmp_path):
    texts = [TEXT, "the cat sat on the mat", "the sunset", "sunset on the mat", "the catnap"] * 2
    trainer = make_trainer(pair, tmp_path, [{"loss": "uld"}, {"loss": "span_kl"}, {"loss": "task", "weight": 0.0}],
                           texts=texts, max_steps=30, learning_rate=1e-2, per_device_train_batch_size=10)
    batch = CrossTokenizerCollator(*pair)([trainer.train_dataset[i] for i in range(len(texts))])
    before = _hand_terms(trainer, batch, pair)
    trainer.train()
    after = _hand_terms(trainer, batch, pair)
    assert after[0] < 0.6 * before[0] and after[1] < 0.6 * before[1], (before, after)  # measured: 0.55 -> 0.22, 1.51 -> 0.24


def test_span_kl_on_a_teacher_restricted_to_the_shared_tokens_is_the_same(pair, tmp_path):
    student_tok, teacher_tok = pair
    texts = [TEXT, "the cat sat on the mat"]
    full = make_trainer(pair, tmp_path, [{"loss": "span_kl"}], texts=texts)
    shared = make_trainer(pair, tmp_path, [{"loss": "span_kl", "teacher_logits": "shared"}], texts=texts)
    batch = CrossTokenizerCollator(*pair)([full.train_dataset[i] for i in range(2)])
    full.model.eval()
    shared.model.eval()
    full.compute_loss(full.model, batch)
    with pytest.raises(ValueError, match=r"must cover the \d+ shared tokens, but they have \d+"):
        shared.compute_loss(shared.model, batch)  # the teacher's head was not restricted
    with output_layer_restricted_to(shared.teacher, shared_vocabulary(student_tok, teacher_tok)[1]) as teacher:
        assert teacher.get_output_embeddings().out_features == len(shared_vocabulary(student_tok, teacher_tok)[1])
        shared._eval_terms.clear()
        shared.compute_loss(shared.model, batch)
    assert shared._eval_terms["loss_span_kl"] == pytest.approx(full._eval_terms["loss_span_kl"], rel=1e-5)
    assert shared.teacher.get_output_embeddings().out_features == len(teacher_tok)  # restored


def test_recipe_end_to_end_on_tiny_models(pair, tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import cross_tokenizer as recipe

    student_tok, teacher_tok = pair
    folders = {}
    for name, tok, seed in (("teacher", teacher_tok, 1), ("student", student_tok, 0)):
        tiny_llama(len(tok), seed, layers=2).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    out = tmp_path / "run"
    recipe.main(["--teacher", folders["teacher"], "--student", folders["student"], "--student_layers", "1",
                 "--eval_documents", "2", "--eval_chars", "150", "--train_documents", "3", "--max_length", "24",
                 "--max_train_rows", "8", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--distillation", '[{"loss": "span_kl", "teacher_logits": "shared"}, {"loss": "uld", "weight": 0}]',
                 "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
                 "--remove_unused_columns", "false", "--bootstrap_resamples", "50", "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["teacher", "distilled student", "baseline student"]
    assert all(m["bits_per_byte"] > 0 and m["bits_per_byte_ci"][0] <= m["bits_per_byte"] for m in results["models"])
    assert len({m["n_bytes"] for m in results["models"]}) == 1  # every model predicts the same bytes
    logged = results["log_history"]
    assert "loss_span_kl" in logged["distilled"][0] and "loss_span_kl" not in logged["baseline"][0]
    assert logged["distilled"][-1]["step"] == logged["baseline"][-1]["step"] == 2
    assert "gap to the teacher closed" in (out / "results.md").read_text()


def test_accumulation_equals_one_large_batch(pair, tmp_path):
    """Batch 4 == batch 2 x accumulation 2 for both terms (the cross-tokenizer pair has its own case here: the
    same-tokenizer cases of tests/term_cases.py cannot feed a teacher its own tokens)."""
    texts = [TEXT, "the cat sat on the mat", "the sunset", "sunset on the mat"]
    terms = [{"loss": "uld"}, {"loss": "span_kl", "temperature": 2.0}]
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        trainer = make_trainer(pair, tmp_path / f"b{batch}", terms, texts=texts, max_steps=1, logging_steps=1,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               max_grad_norm=1e9)
        trainer.train()
        logged = next(e for e in trainer.state.log_history if "loss_uld" in e)
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append((logged, weights))
    (big, w_big), (acc, w_acc) = results
    for key in ("loss", "loss_uld", "loss_span_kl", "grad_norm"):
        assert acc[key] == pytest.approx(big[key], rel=1e-4, abs=1e-7), key
    assert torch.allclose(w_big, w_acc, rtol=1e-5, atol=1e-7)
