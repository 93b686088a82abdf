"""Students built from a teacher's layers: exact copies, equal outputs, save/reload, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_distill.students import (
    INIT_INFO_FILE,
    build_ctc_student,
    build_student,
    build_whisper_student,
    freeze_whisper_embeddings,
    find_layer_list,
    select_layers,
)
from tiny import make_wordpiece_tokenizer, tiny_bert_config, tiny_bert_mlm

VOCAB = 120
DISTILBERT_LAYERS = [0, 2, 4, 7, 9, 11]


@pytest.fixture(scope="module")
def bert12():
    return tiny_bert_mlm(VOCAB, layers=12, hidden=32, seed=1).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer(vocab_size=VOCAB)


def _inputs(seed=0, batch=3, length=11, vocab=VOCAB, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 7:] = pad_id
    mask[1, 7:] = 0
    return ids, mask


def _truncated(teacher, layer_path, layers):
    """Reference: the teacher itself with only ``layers`` left in its layer list."""
    ref = copy.deepcopy(teacher)
    parent_name, _, attr = layer_path.rpartition(".")
    parent = ref.get_submodule(parent_name) if parent_name else ref
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([old[i] for i in layers]))
    ref.config.num_hidden_layers = len(layers)
    return ref.eval()


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def _assert_same_architecture_copy(teacher, student, layer_path, layers):
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    prefix = layer_path + "."
    for key, value in s_sd.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            src = f"{prefix}{layers[int(index)]}.{rest}"
        else:
            src = key
        assert torch.equal(value, t_sd[src]), key
    assert len(getattr(student.get_submodule(layer_path.rpartition(".")[0]), layer_path.rpartition(".")[2])) == len(layers)


# ---------------------------------------------------------------- select_layers


def test_select_layers_evenly_spaced():
    assert select_layers(12, 6) == DISTILBERT_LAYERS  # DistilBERT's own choice
    assert select_layers(12, 6)[0] == 0 and select_layers(12, 6)[-1] == 11
    assert select_layers(12, 12) == list(range(12))
    assert select_layers(12, 1) == [11]
    assert select_layers(12, 2) == [0, 11]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(32, 2) == [0, 31]
    assert select_layers(24, 3) == [0, 12, 23]
    for total in range(1, 30):
        for n in range(1, total + 1):
            chosen = select_layers(total, n)
            assert len(chosen) == n and chosen == sorted(set(chosen)) and chosen[-1] == total - 1


def test_select_layers_errors():
    with pytest.raises(ValueError, match="at most 12"):
        select_layers(12, 13)
    with pytest.raises(ValueError, match="at least one layer"):
        select_layers(12, 0)
    with pytest.raises(ValueError, match="at least one layer"):
        select_layers(0, 1)
    with pytest.raises(TypeError):
        select_layers(12, 2.0)


# ---------------------------------------------------------------- BERT / RoBERTa, same architecture


def test_bert_to_bert_copies_chosen_layers_and_head(bert12):
    student = build_student(bert12, layers=DISTILBERT_LAYERS).eval()
    assert type(student) is type(bert12)
    assert student.config.num_hidden_layers == 6
    assert bert12.config.num_hidden_layers == 12  # teacher untouched
    _assert_same_architecture_copy(bert12, student, "bert.encoder.layer", DISTILBERT_LAYERS)
    for name in ("bert.encoder.layer.3.attention.self.query.weight", "bert.encoder.layer.5.output.dense.bias"):
        i = int(name.split(".")[3])
        src = name.replace(f"layer.{i}.", f"layer.{DISTILBERT_LAYERS[i]}.")
        assert torch.equal(student.state_dict()[name], bert12.state_dict()[src])
    token_types = student.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(token_types, bert12.bert.embeddings.token_type_embeddings.weight)
    assert torch.equal(student.cls.predictions.transform.dense.weight, bert12.cls.predictions.transform.dense.weight)
    assert torch.equal(student.cls.predictions.bias, bert12.cls.predictions.bias)
    # the decoder stays tied to the word embeddings, and is not shared with the teacher
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    assert student.bert.embeddings.word_embeddings.weight is not bert12.bert.embeddings.word_embeddings.weight
    # the student computes exactly what the teacher with the other layers removed computes
    ids, mask = _inputs()
    ref = _truncated(bert12, "bert.encoder.layer", DISTILBERT_LAYERS)
    with torch.no_grad():
        assert torch.allclose(_logits(student, ids, mask), _logits(ref, ids, mask), atol=1e-6)


def test_bert_default_num_layers_is_even_choice(bert12):
    student = build_student(bert12, num_layers=3)
    _assert_same_architecture_copy(bert12, student, "bert.encoder.layer", [0, 6, 11])
    assert student.distillation_teacher_layers == [0, 6, 11]
    assert student.distillation_init_info["student_parameters"] == sum(p.numel() for p in student.parameters())
    half = build_student(bert12)
    assert half.config.num_hidden_layers == 6
    _assert_same_architecture_copy(bert12, half, "bert.encoder.layer", DISTILBERT_LAYERS)


def test_roberta_to_roberta():
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1, type_vocab_size=1,
    )
    teacher = RobertaForMaskedLM(config).eval()
    assert find_layer_list(teacher) == "roberta.encoder.layer"
    student = build_student(teacher, num_layers=2).eval()
    assert type(student) is RobertaForMaskedLM and student.config.num_hidden_layers == 2
    _assert_same_architecture_copy(teacher, student, "roberta.encoder.layer", [0, 3])
    assert torch.equal(student.lm_head.dense.weight, teacher.lm_head.dense.weight)
    assert torch.equal(student.lm_head.bias, teacher.lm_head.bias)
    assert student.lm_head.decoder.weight is student.roberta.embeddings.word_embeddings.weight
    ids, mask = _inputs(pad_id=1)
    ref = _truncated(teacher, "roberta.encoder.layer", [0, 3])
    with torch.no_grad():
        assert torch.allclose(_logits(student, ids, mask), _logits(ref, ids, mask), atol=1e-6)


def test_sequence_classification_bert_to_bert():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(VOCAB, layers=4, num_labels=3)).eval()
    student = build_student(teacher, layers=[1, 3]).eval()
    assert type(student) is BertForSequenceClassification and student.config.num_labels == 3
    _assert_same_architecture_copy(teacher, student, "bert.encoder.layer", [1, 3])
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    ids, mask = _inputs()
    ref = _truncated(teacher, "bert.encoder.layer", [1, 3])
    with torch.no_grad():
        assert torch.allclose(_logits(student, ids, mask), _logits(ref, ids, mask), atol=1e-6)


def test_distilbert_to_distilbert_same():
    torch.manual_seed(0)
    from transformers import DistilBertConfig

    teacher = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=2, hidden_dim=64))
    student = build_student(teacher, num_layers=2)
    assert student.config.n_layers == 2
    _assert_same_architecture_copy(teacher, student, "distilbert.transformer.layer", [0, 3])
    assert student.vocab_projector.weight is student.distilbert.embeddings.word_embeddings.weight


# ---------------------------------------------------------------- BERT -> DistilBERT


def test_bert_to_distilbert_exact_copy_and_equal_outputs(bert12):
    student = build_student(bert12, layers=DISTILBERT_LAYERS, architecture="distilbert").eval()
    assert type(student) is DistilBertForMaskedLM
    assert student.config.n_layers == 6 and student.config.dim == 32 and student.config.hidden_dim == 64
    t = bert12.bert
    emb = student.distilbert.embeddings
    assert torch.equal(emb.word_embeddings.weight, t.embeddings.word_embeddings.weight)
    # token type 0 folded into the positions (DistilBERT has no token types)
    assert torch.equal(
        emb.position_embeddings.weight,
        t.embeddings.position_embeddings.weight + t.embeddings.token_type_embeddings.weight[0],
    )
    assert torch.equal(emb.LayerNorm.weight, t.embeddings.LayerNorm.weight)
    assert torch.equal(emb.LayerNorm.bias, t.embeddings.LayerNorm.bias)
    names = {
        "attention.q_lin": "attention.self.query",
        "attention.k_lin": "attention.self.key",
        "attention.v_lin": "attention.self.value",
        "attention.out_lin": "attention.output.dense",
        "sa_layer_norm": "attention.output.LayerNorm",
        "ffn.lin1": "intermediate.dense",
        "ffn.lin2": "output.dense",
        "output_layer_norm": "output.LayerNorm",
    }
    for i, j in enumerate(DISTILBERT_LAYERS):
        for d_name, b_name in names.items():
            for kind in ("weight", "bias"):
                d = student.distilbert.transformer.layer[i].get_parameter(f"{d_name}.{kind}")
                b = t.encoder.layer[j].get_parameter(f"{b_name}.{kind}")
                assert torch.equal(d, b), (i, d_name, kind)
    head = bert12.cls.predictions
    assert torch.equal(student.vocab_transform.weight, head.transform.dense.weight)
    assert torch.equal(student.vocab_transform.bias, head.transform.dense.bias)
    assert torch.equal(student.vocab_layer_norm.weight, head.transform.LayerNorm.weight)
    assert torch.equal(student.vocab_layer_norm.bias, head.transform.LayerNorm.bias)
    assert torch.equal(student.vocab_projector.weight, head.decoder.weight)
    assert torch.equal(student.vocab_projector.bias, head.bias)
    assert student.vocab_projector.weight is emb.word_embeddings.weight

    # same logits as a BERT with the same layers (dropout off, no token_type_ids), padding included
    bert_student = build_student(bert12, layers=DISTILBERT_LAYERS).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        d_logits = student(input_ids=ids, attention_mask=mask).logits
        b_logits = bert_student(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (d_logits[real] - b_logits[real]).abs().max() < 1e-5
    with torch.no_grad():
        assert (student(input_ids=ids).logits - bert_student(input_ids=ids).logits).abs().max() < 1e-5


def test_bert_to_distilbert_default_layers_and_token_classification(bert12):
    student = build_student(bert12, num_layers=6, architecture="distilbert")
    assert torch.equal(
        student.distilbert.transformer.layer[3].attention.q_lin.weight,
        bert12.bert.encoder.layer[7].attention.self.query.weight,
    )


def test_sequence_classification_bert_to_distilbert():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(VOCAB, layers=4, num_labels=3)).eval()
    teacher.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    teacher.config.label2id = {"neg": 0, "neu": 1, "pos": 2}
    student = build_student(teacher, layers=[0, 3], architecture="distilbert").eval()
    assert type(student) is DistilBertForSequenceClassification
    assert student.config.num_labels == 3 and student.config.id2label[2] == "pos"
    assert torch.equal(student.pre_classifier.weight, teacher.bert.pooler.dense.weight)
    assert torch.equal(student.pre_classifier.bias, teacher.bert.pooler.dense.bias)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    lin2 = student.distilbert.transformer.layer[1].ffn.lin2.weight
    assert torch.equal(lin2, teacher.bert.encoder.layer[3].output.dense.weight)
    # the encoders compute the same hidden states
    bert_student = build_student(teacher, layers=[0, 3]).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        d_hidden = student.distilbert(input_ids=ids, attention_mask=mask).last_hidden_state
        b_hidden = bert_student.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = student(input_ids=ids, attention_mask=mask).logits
    assert (d_hidden - b_hidden)[mask.bool()].abs().max() < 1e-5
    assert logits.shape == (3, 3)


def test_distilbert_refuses_configs_it_cannot_represent():
    teacher = tiny_bert_mlm(VOCAB, layers=2, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type"):
        build_student(teacher, num_layers=1, architecture="distilbert")
    teacher = tiny_bert_mlm(VOCAB, layers=2, hidden_act="silu")
    with pytest.raises(ValueError, match="hidden_act"):
        build_student(teacher, num_layers=1, architecture="distilbert")
    roberta = RobertaForMaskedLM(
        RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="only BERT teachers"):
        build_student(roberta, num_layers=1, architecture="distilbert")


# ---------------------------------------------------------------- errors


def test_layer_errors(bert12):
    with pytest.raises(ValueError, match="at most 12"):
        build_student(bert12, num_layers=13)
    with pytest.raises(ValueError, match="out of range.*between 0 and 11"):
        build_student(bert12, layers=[0, 12])
    with pytest.raises(ValueError, match="out of range"):
        build_student(bert12, layers=[-1, 3])
    with pytest.raises(ValueError, match="repeats"):
        build_student(bert12, layers=[3, 3])
    with pytest.raises(ValueError, match="does not match"):
        build_student(bert12, num_layers=2, layers=[0, 5, 11])
    with pytest.raises(ValueError, match="unsupported architecture 'gpt'"):
        build_student(bert12, num_layers=2, architecture="gpt")
    with pytest.raises(ValueError, match="at most 4"):
        build_whisper_student(_tiny_whisper(), 5)
    with pytest.raises(ValueError, match="needs a Whisper teacher"):
        build_whisper_student(bert12, 2)
    with pytest.raises(ValueError, match="ForCTC"):
        build_ctc_student(bert12, 2)


# ---------------------------------------------------------------- saving and the CLI


def test_save_and_reload(bert12, tokenizer, tmp_path):
    out = tmp_path / "student"
    student = build_student(bert12, layers=[0, 11], output_dir=out, tokenizer=tokenizer).eval()
    assert (out / "model.safetensors").exists()
    reloaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(reloaded) is type(student)
    for key, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat sat")["input_ids"] == tokenizer("the cat sat")["input_ids"]
    info = json.loads((out / INIT_INFO_FILE).read_text())
    assert info["teacher_layers"] == [0, 11] and info["architecture"] == "same"
    assert info["student_parameters"] == sum(p.numel() for p in student.parameters())
    assert info["teacher_parameters"] == sum(p.numel() for p in bert12.parameters())
    assert info["student_parameters"] < info["teacher_parameters"]


def test_teacher_path_keeps_class_and_tokenizer(tokenizer, tmp_path):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(VOCAB, layers=4, num_labels=2)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student = build_student(str(tmp_path / "teacher"), num_layers=2, architecture="distilbert", output_dir=tmp_path / "s")
    assert type(student) is DistilBertForSequenceClassification
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert type(reloaded) is DistilBertForSequenceClassification
    assert torch.equal(reloaded.classifier.weight, teacher.classifier.weight)
    v_lin = reloaded.distilbert.transformer.layer[1].attention.v_lin.bias
    assert torch.equal(v_lin, teacher.bert.encoder.layer[3].attention.self.value.bias)
    assert AutoTokenizer.from_pretrained(tmp_path / "s").vocab == tokenizer.vocab
    info = json.loads((tmp_path / "s" / INIT_INFO_FILE).read_text())
    assert info["teacher"] == str(tmp_path / "teacher") and info["teacher_layers"] == [0, 3]


def test_cli_round_trip(bert12, tokenizer, tmp_path, capsys):
    from hf_distill.cli import main

    bert12.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student"
    rc = main(
        ["init-student", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(out), "--layers", "0,2,4,7,9,11",
         "--architecture", "distilbert"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "student layer  3 <- teacher layer 7" in printed and "parameters: teacher" in printed
    student = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(student) is DistilBertForMaskedLM and student.config.n_layers == 6
    lin1 = student.distilbert.transformer.layer[5].ffn.lin1.weight
    assert torch.equal(lin1, bert12.bert.encoder.layer[11].intermediate.dense.weight)
    assert AutoTokenizer.from_pretrained(out).vocab == tokenizer.vocab
    info = json.loads((out / INIT_INFO_FILE).read_text())
    assert info["teacher_layers"] == DISTILBERT_LAYERS and info["architecture"] == "distilbert"

    out2 = tmp_path / "student2"
    assert main(["init-student", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(out2), "--num_layers", "3",
                 "--task", "mlm"]) == 0
    same = AutoModelForMaskedLM.from_pretrained(out2)
    _assert_same_architecture_copy(bert12, same, "bert.encoder.layer", [0, 6, 11])

    base = ["init-student", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "x")]
    rc = main([*base, "--num_layers", "13"])
    assert rc == 2 and "at most 12" in capsys.readouterr().err
    rc = main([*base, "--layers", "0,12"])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init-student", "--teacher", "t", "--output_dir", "o", "--layers", "0", "--num_layers", "1"])


# ---------------------------------------------------------------- speech


def _tiny_whisper(decoder_layers=4, encoder_layers=3):
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_mel_bins=16, max_source_positions=30, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.alignment_heads = [[0, 1], [2, 0], [3, 1]]
    return model


def test_whisper_student_copies_encoder_and_chosen_decoder_layers():
    teacher = _tiny_whisper()
    student = build_whisper_student(teacher, 2, freeze_encoder=True)
    assert type(student) is WhisperForConditionalGeneration
    assert student.config.decoder_layers == 2 and student.config.encoder_layers == 3
    t_sd = teacher.state_dict()
    for key, value in student.state_dict().items():
        src = key
        if key.startswith("model.decoder.layers."):
            i = int(key.split(".")[3])
            src = key.replace(f"layers.{i}.", f"layers.{[0, 3][i]}.", 1)
        assert torch.equal(value, t_sd[src]), key
    assert student.proj_out.weight is student.model.decoder.embed_tokens.weight
    assert student.generation_config.alignment_heads == [[0, 1], [1, 1]]
    # freeze: every encoder parameter frozen, decoder trainable
    assert all(not p.requires_grad for p in student.model.encoder.parameters())
    assert all(p.requires_grad for p in student.model.decoder.parameters())
    # the encoder computes exactly what the teacher's does; the student runs end to end
    features = torch.randn(1, 16, 60)
    labels = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        encoded = student.model.encoder(features).last_hidden_state
        assert torch.equal(encoded, teacher.model.encoder(features).last_hidden_state)
    loss = student(input_features=features, labels=labels).loss
    loss.backward()
    assert student.model.encoder.conv1.weight.grad is None and student.model.decoder.layers[1].fc1.weight.grad is not None


def test_whisper_student_with_frozen_embeddings_trains_only_its_layers():
    teacher = _tiny_whisper()
    student = build_whisper_student(teacher, 2, freeze_encoder=True, freeze_embeddings=True)
    decoder = student.model.decoder
    assert not decoder.embed_tokens.weight.requires_grad and not decoder.embed_positions.weight.requires_grad
    assert not student.proj_out.weight.requires_grad  # tied to the token embeddings
    assert all(p.requires_grad for p in decoder.layers.parameters()) and decoder.layer_norm.weight.requires_grad
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in decoder.layers.parameters()) + 2 * 32  # + the final layer norm
    before = decoder.embed_tokens.weight.clone()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    loss = student(input_features=torch.randn(1, 16, 60), labels=torch.tensor([[5, 6, 7, 2]])).loss
    loss.backward()
    optimizer.step()
    assert decoder.embed_tokens.weight.grad is None and torch.equal(decoder.embed_tokens.weight, before)
    assert decoder.layers[0].fc1.weight.grad is not None
    assert freeze_whisper_embeddings(student) == 0  # already frozen: nothing more
    unfrozen = build_whisper_student(teacher, 2)
    assert freeze_whisper_embeddings(unfrozen) == 100 * 32 + 32 * 32  # vocab x d_model + positions x d_model


def test_whisper_student_fewer_encoder_layers_and_save(tmp_path):
    teacher = _tiny_whisper()
    student = build_whisper_student(teacher, decoder_layers=[1, 2], num_encoder_layers=2, output_dir=tmp_path / "w")
    assert student.config.encoder_layers == 2 and student.config.decoder_layers == 2
    assert torch.equal(student.model.encoder.layers[1].fc2.weight, teacher.model.encoder.layers[2].fc2.weight)
    q_proj = student.model.decoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj, teacher.model.decoder.layers[1].self_attn.q_proj.weight)
    assert torch.equal(student.model.encoder.conv2.weight, teacher.model.encoder.conv2.weight)
    assert torch.equal(student.model.decoder.embed_positions.weight, teacher.model.decoder.embed_positions.weight)
    assert student.generation_config.alignment_heads == [[1, 0]]
    reloaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "w")
    for key, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    info = json.loads((tmp_path / "w" / INIT_INFO_FILE).read_text())
    assert info["teacher_layers"] == {"encoder": [0, 2], "decoder": [1, 2]}
    # build_student hands Whisper teachers over (layers = decoder layers)
    via_generic = build_student(teacher, num_layers=2)
    assert via_generic.config.decoder_layers == 2 and via_generic.config.encoder_layers == 3


def test_ctc_student(tmp_path):
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=20, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, pad_token_id=0, ctc_loss_reduction="mean",
    )
    teacher = Wav2Vec2ForCTC(config).eval()
    student = build_ctc_student(teacher, 2).eval()
    assert type(student) is Wav2Vec2ForCTC and student.config.num_hidden_layers == 2
    _assert_same_architecture_copy(teacher, student, "wav2vec2.encoder.layers", [0, 3])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    s_base, t_base = student.wav2vec2, teacher.wav2vec2
    assert torch.equal(s_base.feature_projection.projection.weight, t_base.feature_projection.projection.weight)
    assert torch.equal(s_base.encoder.pos_conv_embed.conv.weight, t_base.encoder.pos_conv_embed.conv.weight)
    assert torch.equal(s_base.feature_extractor.conv_layers[1].conv.weight, t_base.feature_extractor.conv_layers[1].conv.weight)
    audio = torch.randn(2, 800)
    ref = _truncated(teacher, "wav2vec2.encoder.layers", [0, 3])
    with torch.no_grad():
        assert torch.allclose(student(audio).logits, ref(audio).logits, atol=1e-6)
    explicit = build_ctc_student(teacher, layers=[1, 2])
    _assert_same_architecture_copy(teacher, explicit, "wav2vec2.encoder.layers", [1, 2])
    loss = explicit(audio, labels=torch.tensor([[3, 4, 5], [6, 7, -100]])).loss
    assert torch.isfinite(loss)

    # from a checkpoint directory: the processor next to it is saved with the student
    from transformers import AutoProcessor, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopq")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    processor = Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=16000),
        tokenizer=Wav2Vec2CTCTokenizer(
            str(tmp_path / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
        ),
    )
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    build_ctc_student(str(tmp_path / "teacher"), 3, output_dir=tmp_path / "student")
    reloaded = Wav2Vec2ForCTC.from_pretrained(tmp_path / "student")
    _assert_same_architecture_copy(teacher, reloaded, "wav2vec2.encoder.layers", [0, 2, 3])
    loaded = AutoProcessor.from_pretrained(tmp_path / "student")
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.tokenizer.decode([4, 5, 2, 6]) == processor.tokenizer.decode([4, 5, 2, 6])
    info = json.loads((tmp_path / "student" / INIT_INFO_FILE).read_text())
    assert info["architecture"] == "ctc" and info["teacher_layers"] == [0, 2, 3]
