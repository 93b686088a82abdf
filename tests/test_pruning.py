"""Width pruning: kept units are the teacher's, the unpruned case is the identity, wrong shapes are refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertForSequenceClassification, LlamaConfig, \
    LlamaForCausalLM

from hf_distill.cli import main as cli
from hf_distill.students.pruning import calibration_batches, importance, prune_width
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config, tiny_bert_mlm


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def batches(tokenizer, n=24):
    return list(calibration_batches(tokenizer, sample_texts(n, seed=5), batch_size=8, max_length=24))


def tiny_llama(vocab, heads=4, kv=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                                        max_position_embeddings=64, pad_token_id=0))


@pytest.mark.parametrize("make", ["bert", "llama"])
def test_keeping_every_unit_is_the_identity(tokenizer, make):
    teacher = (tiny_bert_mlm(len(tokenizer), layers=2, heads=4) if make == "bert" else tiny_llama(len(tokenizer))).eval()
    student, info = prune_width(teacher, batches(tokenizer))
    batch = batches(tokenizer, 8)[0]
    with torch.no_grad():
        assert torch.allclose(student.eval()(**batch).logits, teacher(**batch).logits, atol=1e-5)
    assert info["width_pruning"]["kept_hidden"] == list(range(32))


def test_bert_kept_units_are_the_teachers(tokenizer):
    teacher = tiny_bert_mlm(len(tokenizer), layers=2, heads=4, hidden=32).eval()  # head size 8
    scores = importance(teacher, batches(tokenizer))
    student, info = prune_width(teacher, batches(tokenizer), heads=2, hidden=16, intermediate=40)
    w = info["width_pruning"]
    assert (student.config.num_attention_heads, student.config.hidden_size, student.config.intermediate_size) == \
        (2, 16, 40)
    hidden = torch.tensor(w["kept_hidden"])
    assert hidden.tolist() == sorted(torch.topk(scores["hidden"][0], 16).indices.tolist())
    for layer in (0, 1):
        neurons = torch.tensor(w["kept_neurons"][layer])
        assert neurons.tolist() == sorted(torch.topk(scores["ffn"][layer], 40).indices.tolist())
        t_ffn = teacher.bert.encoder.layer[layer].intermediate.dense
        s_ffn = student.bert.encoder.layer[layer].intermediate.dense
        assert torch.equal(s_ffn.weight, t_ffn.weight[neurons][:, hidden]) and torch.equal(s_ffn.bias, t_ffn.bias[neurons])
        heads = w["kept_heads"][layer]
        rows = torch.tensor([h * 8 + i for h in heads for i in range(8)])
        t_q, s_q = teacher.bert.encoder.layer[layer].attention.self.query, student.bert.encoder.layer[layer].attention.self.query
        assert torch.equal(s_q.weight, t_q.weight[rows][:, hidden])
    # The output head is tied to the (pruned) embeddings, as in the teacher.
    assert student.cls.predictions.decoder.weight.data_ptr() == student.bert.embeddings.word_embeddings.weight.data_ptr()


def test_a_silent_neuron_is_pruned_first(tokenizer):
    teacher = tiny_bert_mlm(len(tokenizer), layers=2, heads=4).eval()
    with torch.no_grad():
        teacher.bert.encoder.layer[1].intermediate.dense.weight[7] = 0
        teacher.bert.encoder.layer[1].intermediate.dense.bias[7] = -10.0  # GELU(-10) is ~0: neuron 7 never fires
    scores = importance(teacher, batches(tokenizer))
    assert int(scores["ffn"][1].argmin()) == 7
    _, info = prune_width(teacher, batches(tokenizer), intermediate=63)
    assert 7 not in info["width_pruning"]["kept_neurons"][1]


def test_pruned_llama_generates_and_reloads(tokenizer, tmp_path):
    teacher = tiny_llama(len(tokenizer), heads=4, kv=2).eval()
    student, info = prune_width(teacher, batches(tokenizer), heads=2, intermediate=32, hidden=24)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads, student.config.hidden_size) == \
        (2, 1, 24)
    prompt = batches(tokenizer, 2)[0]["input_ids"][:1, :5]
    out = student.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(prompt).logits, student.eval()(prompt).logits, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 2, "hidden": 32}, "BERT ties the hidden size to heads x head size"),
    ({"intermediate": 0}, "intermediate must be an integer from 1"),
    ({"hidden": 99, "heads": 4}, "hidden must be an integer from 1 to the teacher's 32"),
    ({"heads": 2.5}, "heads must be an integer"),
])
def test_shapes_bert_cannot_take_are_refused(tokenizer, kwargs, message):
    teacher = tiny_bert_mlm(len(tokenizer), layers=2, heads=4)
    with pytest.raises(ValueError, match=message):
        prune_width(teacher, batches(tokenizer), **kwargs)


def test_bert_hidden_follows_the_heads(tokenizer):
    student, _ = prune_width(tiny_bert_mlm(len(tokenizer), layers=2, heads=4), batches(tokenizer), heads=2)
    assert (student.config.num_attention_heads, student.config.hidden_size) == (2, 16)


def test_grouped_query_attention_is_pruned_by_whole_groups(tokenizer):
    with pytest.raises(ValueError, match="multiple of 2"):
        prune_width(tiny_llama(len(tokenizer), heads=4, kv=2), batches(tokenizer), heads=3)


def test_other_families_are_refused(tokenizer):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2,
                                                   hidden_dim=64))
    with pytest.raises(ValueError, match="BERT-style encoders and Llama-style decoders"):
        prune_width(model, batches(tokenizer))


def test_init_student_prunes_depth_and_width(tokenizer, tmp_path, capsys):
    teacher = tiny_bert_mlm(len(tokenizer), layers=4, heads=4)
    teacher.save_pretrained(tmp_path / "t")
    tokenizer.save_pretrained(tmp_path / "t")
    (tmp_path / "calib.txt").write_text("\n".join(sample_texts(40, seed=2)))
    argv = ["init-student", "--teacher", str(tmp_path / "t"), "--output_dir", str(tmp_path / "s"), "--layers", "0,3",
            "--heads", "2", "--hidden", "16", "--intermediate", "48", "--calibration_file", str(tmp_path / "calib.txt")]
    assert cli(argv) == 0
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "s")
    c = student.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.intermediate_size) == (2, 2, 16, 48)
    record = json.loads((tmp_path / "s" / "distillation_init.json").read_text())
    assert record["teacher_layers"] == [0, 3] and record["width_pruning"]["heads"] == 2
    assert "width: 2 heads" in capsys.readouterr().out
    # Without calibration text: one line, exit 2.
    assert cli(argv[:-2]) == 2
    assert "--calibration_file" in capsys.readouterr().err


def test_pruned_classifier_keeps_its_label_space(tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=2, heads=4, num_labels=3)).eval()
    student, _ = prune_width(teacher, batches(tokenizer), heads=2, hidden=16)
    assert student.classifier.weight.shape == (3, 16)
    assert student(**batches(tokenizer, 4)[0]).logits.shape[-1] == 3
