"""Quantized students: QAT with the distillation loss (fake quantization while training, none after export),
the int8 export (outputs within a stated tolerance of the fake-quantized model, Linear weights 4x smaller),
post-training dynamic int8, and the safetensors int8 format."""

import copy

import pytest
import torch
from datasets import Dataset
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config
from torch import nn
from transformers import (
    BertForSequenceClassification,
    TrainerCallback,
    default_data_collator,
)

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.quantization import (
    QUANTIZATION_FILE,
    export_int8,
    fake_quant_modules,
    freeze_qat_observers,
    int8_linear_weight_bytes,
    load_int8,
    prepare_qat_student,
    quantize_dynamic_int8,
    quantized_modules,
    save_int8,
)
from hf_distill.tasks.classification import size_on_disk

# The stated tolerance of the int8 export against its fake-quantized model: logits differ by at most this
# fraction of the fake-quantized logits' range (an activation step or so, after rounding ties differ between
# the float simulation and the int8 kernels), and every prediction agrees.
EXPORT_TOLERANCE = 0.15  # measured: 0.087 on the tiny student below, 0.051 (0.31 of 6.16) on the BBC News student
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def classifier(tokenizer, layers=2, hidden=64, seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=layers, hidden=hidden, heads=4,
                                                          num_labels=3, initializer_range=0.1, **NO_DROPOUT))


def dataset(tokenizer, n=48, seed=0):
    texts = sample_texts(n, seed=seed, min_len=4, max_len=14)
    enc = tokenizer(texts, truncation=True, max_length=20, padding="max_length")
    return Dataset.from_dict({**enc, "labels": [len(t.split()) % 3 for t in texts]})


def batch(tokenizer, n=16, seed=5):
    ds = dataset(tokenizer, n=n, seed=seed)
    return {k: v for k, v in default_data_collator([ds[i] for i in range(n)]).items() if k != "labels"}


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "qat"), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=12,
                logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True, cos_weight=0.0, kd_weight=0.5, task_weight=0.5, temperature=2.0)
    base.update(kw)
    return DistillationArguments(**base)


class CountFakeQuant(TrainerCallback):
    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts.append(len(fake_quant_modules(model)))


@pytest.fixture(scope="module")
def trained_qat(tokenizer, tmp_path_factory):
    """A 4-layer teacher distilled into a fake-quantized 2-layer student by DistillationTrainer (unchanged)."""
    teacher, student = classifier(tokenizer, layers=4, seed=1), classifier(tokenizer, seed=2)
    prepare_qat_student(student)
    counter = CountFakeQuant()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path_factory.mktemp("qat")),
                                  train_dataset=dataset(tokenizer), data_collator=default_data_collator,
                                  callbacks=[counter])
    trainer.train()
    student.eval()
    freeze_qat_observers(student)
    return student, counter, before, trainer


def test_prepare_qat_fake_quantizes_encoder_linears_and_word_embedding_only(tokenizer):
    model = prepare_qat_student(classifier(tokenizer))
    layer = model.bert.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.attention.self.value, layer.intermediate.dense,
                   layer.output.dense, model.bert.pooler.dense):
        inner = linear.module  # QuantWrapper: quantize the input, int8 Linear, dequantize the output
        assert type(inner).__module__.startswith("torch.ao.nn.qat") and hasattr(inner, "weight_fake_quant")
        assert hasattr(linear.quant, "activation_post_process") and hasattr(inner, "activation_post_process")
    assert type(model.bert.embeddings.word_embeddings).__module__.startswith("torch.ao.nn.qat")
    assert type(model.classifier) is nn.Linear  # the output head stays fp32
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    assert type(layer.output.LayerNorm) is nn.LayerNorm
    # 13 Linears x (input, weight, output fake quant) + the word embedding's weight fake quant
    assert len(fake_quant_modules(model)) == 13 * 3 + 1
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat_student(model)


def test_qat_trains_with_the_distillation_loss_fake_quant_present_throughout(trained_qat):
    student, counter, before, trainer = trained_qat
    assert counter.counts == [40] * 12  # fake quantization at every step of the run
    changed = [n for n, p in student.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any("query.module.weight" in n for n in changed) and any("classifier" in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all("loss_kd" in h for h in trainer.state.log_history if "loss" in h)
    # the observers learnt ranges: the first query input's scale is no longer the initial 1.0
    assert float(student.bert.encoder.layer[0].attention.self.query.quant.activation_post_process.scale) != 1.0


def test_qat_checkpoints_save_and_resume(tokenizer, tmp_path):
    teacher, student = classifier(tokenizer, layers=4, seed=1), prepare_qat_student(classifier(tokenizer, seed=2))
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=dataset(tokenizer),
                        data_collator=default_data_collator).train()
    saved_scale = float(student.bert.encoder.layer[1].output.dense.quant.activation_post_process.scale)
    fresh = prepare_qat_student(classifier(tokenizer, seed=3))
    resumed = DistillationTrainer(model=fresh, teacher=teacher, args=make_args(tmp_path, max_steps=4),
                                  train_dataset=dataset(tokenizer), data_collator=default_data_collator)
    resumed.train(resume_from_checkpoint=True)  # a finished run: loads checkpoint-4, trains nothing
    assert resumed.state.global_step == 4
    assert float(fresh.bert.encoder.layer[1].output.dense.quant.activation_post_process.scale) == saved_scale
    for (n, a), b in zip(student.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n


def test_export_int8_has_no_fake_quant_and_stays_within_tolerance(trained_qat, tokenizer):
    student, *_ = trained_qat
    inputs = batch(tokenizer)
    with torch.no_grad():
        fake = student(**inputs).logits
    int8 = export_int8(student)
    assert fake_quant_modules(int8) == [] and len(fake_quant_modules(student)) == 40  # the QAT model is kept
    kinds = quantized_modules(int8)
    assert kinds["bert.encoder.layer.0.attention.self.query.module"] == "Linear"
    assert kinds["bert.embeddings.word_embeddings"] == "Embedding"
    assert type(int8.classifier) is nn.Linear
    assert int8.bert.encoder.layer[0].attention.self.query.module.weight().dtype == torch.qint8
    with torch.no_grad():
        real = int8(**inputs).logits
    scale = float(fake.max() - fake.min())
    assert scale > 0.2  # a trained head, not near-zero logits
    print(f"int8 vs fake-quant: max |diff| {float((real - fake).abs().max()):.4f}, logit range {scale:.3f}")
    assert float((real - fake).abs().max()) <= EXPORT_TOLERANCE * scale
    assert torch.equal(real.argmax(-1), fake.argmax(-1))


def test_int8_linear_weights_are_4x_smaller_and_files_smaller(tokenizer, tmp_path):
    fp32 = classifier(tokenizer, hidden=128)
    qat = prepare_qat_student(copy.deepcopy(fp32)).train()
    with torch.no_grad():
        qat(**batch(tokenizer))  # the observers see one batch
    int8 = export_int8(qat)
    fp32_bytes, int8_bytes = int8_linear_weight_bytes(fp32), int8_linear_weight_bytes(int8)
    head = fp32.classifier.weight.numel() * 4  # the fp32 head, in both
    assert int8_bytes["fp32"] == head
    assert fp32_bytes["fp32"] - head == 4 * int8_bytes["int8"]  # one byte per weight instead of four
    fp32.save_pretrained(tmp_path / "fp32")
    save_int8(int8, tmp_path / "int8")
    # < 0.4x on disk: the fp32 position embeddings, LayerNorms, biases, scales and the file header remain
    assert size_on_disk(tmp_path / "int8") < 0.4 * size_on_disk(tmp_path / "fp32")


@pytest.mark.parametrize("kind", ["qat", "ptq"])
def test_int8_saves_as_safetensors_and_loads_back_exactly(trained_qat, tokenizer, tmp_path, kind):
    student, *_ = trained_qat
    int8 = export_int8(student) if kind == "qat" else quantize_dynamic_int8(classifier(tokenizer))
    save_int8(int8, tmp_path / kind, tokenizer)
    files = sorted(p.name for p in (tmp_path / kind).iterdir())
    assert "model.safetensors" in files and QUANTIZATION_FILE in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    loaded = load_int8(tmp_path / kind)
    assert quantized_modules(loaded) == quantized_modules(int8) and fake_quant_modules(loaded) == []
    inputs = batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, int8(**inputs).logits)


def test_quantize_dynamic_int8_leaves_the_fp32_student_and_stays_close(tokenizer):
    fp32 = classifier(tokenizer)
    head_weight = fp32.classifier.weight.detach().clone()
    ptq = quantize_dynamic_int8(fp32)
    assert type(fp32.bert.encoder.layer[0].attention.self.query) is nn.Linear  # not changed in place
    assert quantized_modules(ptq)["bert.encoder.layer.0.attention.self.query"] == "Linear"
    assert type(ptq.classifier) is nn.Linear and torch.equal(ptq.classifier.weight, head_weight)
    inputs = batch(tokenizer)
    with torch.no_grad():
        a, b = fp32(**inputs).logits, ptq(**inputs).logits
    assert float((a - b).abs().max()) <= EXPORT_TOLERANCE * float(a.max() - a.min())


def test_wrong_inputs_are_clear_errors(tokenizer, tmp_path):
    fp32 = classifier(tokenizer)
    with pytest.raises(ValueError, match="prepare_qat_student"):
        export_int8(fp32)
    with pytest.raises(ValueError, match="needs an int8 model"):
        save_int8(fp32, tmp_path / "x")
    with pytest.raises(ValueError, match="needs an int8 model"):
        save_int8(prepare_qat_student(copy.deepcopy(fp32)), tmp_path / "x")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_dynamic_int8(quantize_dynamic_int8(fp32))
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        prepare_qat_student(copy.deepcopy(fp32), backend="nope")
    with pytest.raises(ValueError, match="no base model"):
        prepare_qat_student(nn.Sequential(nn.Linear(4, 4)))
    fp32.save_pretrained(tmp_path / "fp32")
    with pytest.raises(FileNotFoundError, match="no int8 model saved by save_int8"):
        load_int8(tmp_path / "fp32")
