"""hf-distill cache-teacher: every head stored, killed jobs resume exactly, mismatches refused, training from it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from test_trainer import NO_DROPOUT, make_args, teacher_student
from tiny import make_wordpiece_tokenizer, sample_texts, tiny_bert_config
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_distill import DistillationTrainer
from hf_distill.cli import main as cli
from hf_distill.sources import StoredTeacher
from hf_distill.store import StoreMismatchError, cache_teacher, join_store, load_store, read_manifest, unpack_topk
from hf_distill.store.caching import FAILPOINT_ENV
from hf_distill.store.writer import shard_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return make_wordpiece_tokenizer()


def tokenized(tokenizer, n=23, seed=5, labels=False):
    """Unpadded rows of varied length (3 to ~16 tokens)."""
    texts = sample_texts(n, seed=seed, min_len=1, max_len=14)
    data = dict(tokenizer(texts, truncation=True, max_length=24))
    if labels:
        data["labels"] = [i % 3 for i in range(n)]
    return Dataset.from_dict(data)


def teachers(tokenizer):
    """One teacher per head the store supports."""
    vocab = len(tokenizer)
    torch.manual_seed(3)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3,
                                     initializer_range=0.3))
    torch.manual_seed(4)
    cls = BertForSequenceClassification(tiny_bert_config(vocab, num_labels=3, initializer_range=0.3, **NO_DROPOUT))
    return {"masked_lm": teacher_student(tokenizer)[0], "causal_lm": gpt, "sequence_classification": cls}


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm", "sequence_classification"])
def test_store_round_trip_equals_the_teacher(tokenizer, tmp_path, head):
    """Each row's stored top-k probabilities, indices, tail mass (and hidden states) are the teacher's, within
    float16, on the unmasked row alone; the store loads with datasets; the manifest records the run."""
    teacher = teachers(tokenizer)[head].eval()
    ds = tokenized(tokenizer)
    k, temperature = 8, 2.0
    result = cache_teacher(teacher, ds, tmp_path / "store", tokenizer=tokenizer, k=k, temperature=temperature,
                           hidden_layers=[0, 2], batch_size=4, shard_size=10, progress=False)
    assert result["num_shards"] == 3 and result["shards_computed"] == 3 and result["summary"]["rows"] == len(ds)
    store = load_store(tmp_path / "store")
    assert store.features["topk_indices"].feature.feature.dtype == "uint16"
    assert store["row"] == list(range(len(ds)))
    config = read_manifest(tmp_path / "store")["config"]
    k_stored = 3 if head == "sequence_classification" else k  # clipped to the number of labels
    assert (config["head"], config["k"], config["temperature"], config["index_type"]) == (head, k_stored, 2.0, "uint16")
    assert config["max_length"] == max(len(r) for r in ds["input_ids"]) and config["tokenizer_hash"]
    assert config["teacher_input"] == ("unmasked" if head == "masked_lm" else "as stored")
    for i in (0, 7, 22):
        ids = torch.tensor([ds[i]["input_ids"]])
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].double() / temperature, -1)
        if head == "sequence_classification":
            logp = logp[None]
        want_p, want_i = logp.exp().topk(min(k, logp.shape[-1]), -1)
        idx, probs, tail = unpack_topk(store[i]["topk_indices"], store[i]["topk_probs"], store[i]["topk_tail"])
        assert torch.equal(idx, want_i)
        torch.testing.assert_close(probs.double(), want_p, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(tail.double(), 1 - want_p.sum(-1), rtol=2e-3, atol=2e-4)
        for layer in (0, 2):
            hidden = torch.tensor(store[i][f"hidden_{layer}"])
            torch.testing.assert_close(hidden, out.hidden_states[layer][0].half().float(), rtol=1e-3, atol=1e-3)


def _cli_args(teacher_dir, data_dir, out, *extra):
    return ["--teacher", str(teacher_dir), "--dataset", str(data_dir), "--output_dir", str(out), "--k", "8",
            "--batch_size", "4", "--shard_size", "6", "--no_progress", *extra]


@pytest.fixture
def saved(tokenizer, tmp_path):
    teacher_dir, data_dir = tmp_path / "teacher", tmp_path / "data"
    teacher, _ = teacher_student(tokenizer)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    tokenized(tokenizer).save_to_disk(str(data_dir))
    return teacher_dir, data_dir


def test_killed_caching_job_resumes_exactly(saved, tmp_path):
    """SIGKILL between writing shard 1 and renaming it; the same command again finishes the store with the bytes of
    an uninterrupted run, keeping shard 0 and ignoring the half-written file."""
    teacher_dir, data_dir = saved
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert cli(["cache-teacher", *_cli_args(teacher_dir, data_dir, reference)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), FAILPOINT_ENV: "kill-before-rename:1"}
    proc = subprocess.run([sys.executable, "-m", "hf_distill.cli", "cache-teacher",
                           *_cli_args(teacher_dir, data_dir, killed)], env=env, cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [Path(f).name for f in shard_files(killed)] == ["shard-00000.parquet"]
    assert list(killed.glob("shard-00001.parquet.tmp-*"))  # the half-written shard, never visible under its name
    shard0 = (killed / "shard-00000.parquet").stat().st_mtime_ns
    assert cli(["cache-teacher", *_cli_args(teacher_dir, data_dir, killed)]) == 0
    assert (killed / "shard-00000.parquet").stat().st_mtime_ns == shard0  # kept, not recomputed
    assert not list(killed.glob("*.tmp-*"))
    names = [Path(f).name for f in shard_files(reference)]
    assert names == [Path(f).name for f in shard_files(killed)] and len(names) == 4
    for name in names:
        assert (reference / name).read_bytes() == (killed / name).read_bytes(), name
    assert (reference / "manifest.json").read_bytes() == (killed / "manifest.json").read_bytes()
    # A finished store: the same command again computes nothing.
    assert cli(["cache-teacher", *_cli_args(teacher_dir, data_dir, killed)]) == 0


def error_line(capsys, argv) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_with_other_settings_or_data_is_refused(saved, tokenizer, tmp_path, capsys):
    teacher_dir, data_dir = saved
    out = tmp_path / "store"
    assert cli(["cache-teacher", *_cli_args(teacher_dir, data_dir, out)]) == 0
    capsys.readouterr()
    line = error_line(capsys, ["cache-teacher", *_cli_args(teacher_dir, data_dir, out, "--k", "16",
                                                              "--temperature", "2")])
    assert "another configuration" in line and "k: 8 -> 16" in line and "temperature: 1.0 -> 2.0" in line, line
    other = tmp_path / "other_data"
    tokenized(tokenizer, seed=9).save_to_disk(str(other))
    line = error_line(capsys, ["cache-teacher", *_cli_args(teacher_dir, other, out)])
    assert "data.fingerprint" in line, line
    with pytest.raises(StoreMismatchError, match="hidden_layers: \\[\\] -> \\[1\\]"):
        cache_teacher(teacher_student(tokenizer)[0], tokenized(tokenizer), out, tokenizer=tokenizer, k=8,
                      hidden_layers=[1], batch_size=4, shard_size=6, progress=False, teacher_name=str(teacher_dir))


def test_two_processes_split_the_shards_without_overlap(tokenizer, tmp_path):
    teacher, ds = teachers(tokenizer)["causal_lm"], tokenized(tokenizer)
    kw = dict(tokenizer=tokenizer, k=4, batch_size=4, shard_size=5, progress=False)
    first = cache_teacher(teacher, ds, tmp_path / "split", rank=1, world_size=2, **kw)
    assert (first["shards_computed"], first["summary"]) == (2, None)  # shards 1, 3 of 5; the store is not finished
    assert [Path(f).name for f in shard_files(tmp_path / "split")] == ["shard-00001.parquet", "shard-00003.parquet"]
    second = cache_teacher(teacher, ds, tmp_path / "split", rank=0, world_size=2, **kw)
    assert second["shards_computed"] == 3 and second["summary"]["rows"] == len(ds)
    cache_teacher(teacher, ds, tmp_path / "one", **kw)
    for a, b in zip(shard_files(tmp_path / "split"), shard_files(tmp_path / "one")):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(ValueError, match="invalid rank 2 for world size 2"):
        cache_teacher(teacher, ds, tmp_path / "bad", rank=2, world_size=2, **kw)


def test_wrong_inputs_are_one_line_errors_before_the_teacher_runs(saved, tokenizer, tmp_path, capsys):
    teacher_dir, data_dir = saved
    out = tmp_path / "out"
    base_dir, dict_dir, noids_dir, big_dir = (tmp_path / n for n in ("base", "dict", "noids", "big"))
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(base_dir)
    DatasetDict({"train": tokenized(tokenizer), "test": tokenized(tokenizer, n=4)}).save_to_disk(str(dict_dir))
    Dataset.from_dict({"text": ["a b"]}).save_to_disk(str(noids_dir))
    Dataset.from_dict({"input_ids": [[1, 2, 500]]}).save_to_disk(str(big_dir))
    for argv, message in (
        (_cli_args(tmp_path / "nope", data_dir, out), "does not exist"),
        (_cli_args(teacher_dir, tmp_path / "nodata", out), "is not a folder"),
        (_cli_args(teacher_dir, teacher_dir, out), "not a saved dataset"),
        (_cli_args(teacher_dir, dict_dir, out), "DatasetDict with splits ['train', 'test']; choose one with --split"),
        (_cli_args(teacher_dir, noids_dir, out), "has no input_ids column"),
        (_cli_args(teacher_dir, big_dir, out), "token id 500 but the teacher embeds only"),
        (_cli_args(base_dir, data_dir, out), "got a BertModel (base)"),
        (_cli_args(teacher_dir, data_dir, out, "--hidden_layers", "9"), "hidden layer(s) [9] are out of range"),
        (_cli_args(teacher_dir, data_dir, out, "--hidden_layers", "a"), "comma-separated integers"),
        (_cli_args(teacher_dir, data_dir, out, "--k", "0"), "--k must be >= 1"),
        (_cli_args(teacher_dir, data_dir, out, "--temperature", "0"), "temperature must be a finite number > 0"),
        (_cli_args(teacher_dir, data_dir, out, "--shard_index", "1"), "give --shard_index and --num_shards together"),
    ):
        line = error_line(capsys, ["cache-teacher", *argv])
        assert line.startswith("hf-distill cache-teacher: error:") and message in line, (message, line)
    assert not out.exists()
    # A DatasetDict with --split works.
    assert cli(["cache-teacher", *_cli_args(teacher_dir, dict_dir, out, "--split", "test")]) == 0
    assert load_store(out).num_rows == 4


def _curves(tokenizer, tmp_path, ds, teacher, source, student, collator, **args) -> list[float]:
    kw = {"teacher": teacher} if source == "live" else {"teacher_source": StoredTeacher(store=tmp_path / "store")}
    trainer = DistillationTrainer(model=student, args=make_args(tmp_path / source, max_steps=5, **args),
                                  train_dataset=ds, data_collator=collator, processing_class=tokenizer, **kw)
    trainer.train()
    return [h["loss_kd"] for h in trainer.state.log_history if "loss_kd" in h]


def test_training_from_the_store_with_k_vocabulary_gives_the_live_teachers_loss_curve(tokenizer, tmp_path):
    """Masked LM, store at k = V and T = 2: the student trained from the store (no teacher in memory) follows the
    live teacher's loss curve within float16 (inputs unmasked, so the live teacher reads what the store read)."""
    teacher, ds = teachers(tokenizer)["masked_lm"], tokenized(tokenizer)
    cache_teacher(teacher, ds, tmp_path / "store", tokenizer=tokenizer, k=len(tokenizer), temperature=2.0,
                  batch_size=8, progress=False)
    curves = {source: _curves(tokenizer, tmp_path, ds, teacher, source, teacher_student(tokenizer)[1],
                              DataCollatorWithPadding(tokenizer), cos_weight=0.0, temperature=2.0, task_weight=0.0)
              for source in ("live", "stored")}
    assert len(curves["live"]) == 5
    assert curves["stored"] == pytest.approx(curves["live"], rel=2e-4)


def test_a_classifier_trains_from_its_store_as_from_the_live_teacher(tokenizer, tmp_path):
    teacher, ds = teachers(tokenizer)["sequence_classification"], tokenized(tokenizer, labels=True)
    cache_teacher(teacher, ds, tmp_path / "store", tokenizer=tokenizer, k=3, temperature=2.0, progress=False)
    curves = {}
    for source in ("live", "stored"):
        torch.manual_seed(7)
        student = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, num_labels=3, **NO_DROPOUT))
        curves[source] = _curves(tokenizer, tmp_path, ds, teacher, source, student, DataCollatorWithPadding(tokenizer),
                                 cos_weight=0.0, temperature=2.0)
    # float16 probabilities (relative rounding 2^-11) move a 3-class KL by up to ~1e-3 of its value
    assert curves["stored"] == pytest.approx(curves["live"], rel=2e-3)
    assert curves["stored"] != pytest.approx(curves["stored"][:1] * 5, rel=1e-2)  # the curve moves


def test_a_causal_lm_trains_from_its_store_as_from_the_live_teacher(tokenizer, tmp_path):
    from transformers import DataCollatorForLanguageModeling

    teacher, ds = teachers(tokenizer)["causal_lm"], tokenized(tokenizer)
    cache_teacher(teacher, ds, tmp_path / "store", tokenizer=tokenizer, k=len(tokenizer), temperature=2.0,
                  progress=False)
    curves = {}
    for source in ("live", "stored"):
        torch.manual_seed(8)
        student = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                                             n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                             bos_token_id=2, eos_token_id=3))
        curves[source] = _curves(tokenizer, tmp_path, ds, teacher, source, student,
                                 DataCollatorForLanguageModeling(tokenizer, mlm=False), cos_weight=0.0,
                                 temperature=2.0)
    assert curves["stored"] == pytest.approx(curves["live"], rel=2e-4)


def test_the_trainer_refuses_a_store_that_does_not_fit(tokenizer, tmp_path):
    """Before the first step: another temperature, another tokenizer, another kind of head, other data, a term
    that needs full logits, an evaluation set without its store."""
    teacher, ds = teachers(tokenizer)["masked_lm"], tokenized(tokenizer)
    store = tmp_path / "store"
    cache_teacher(teacher, ds, store, tokenizer=tokenizer, k=8, temperature=2.0, progress=False)

    def build(data=ds, tok=tokenizer, student=None, source=None, **args):
        student = student or teacher_student(tokenizer)[1]
        args = {"cos_weight": 0.0, "temperature": 2.0, **args}
        return DistillationTrainer(model=student, args=make_args(tmp_path / "run", **args), train_dataset=data,
                                   data_collator=DataCollatorWithPadding(tokenizer), processing_class=tok,
                                   teacher_source=source or StoredTeacher(store=store))

    trainer = build()
    assert "teacher_topk_indices" in trainer.train_dataset.column_names  # joined at construction
    # The same from the arguments (--teacher_source stored --teacher_store DIR), as recipes and YAML give it.
    by_flag = DistillationTrainer(model=classifier_free_student(tokenizer), train_dataset=ds,
                                  args=make_args(tmp_path / "flag", cos_weight=0.0, temperature=2.0,
                                                 teacher_source="stored", teacher_store=str(store)),
                                  data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    assert isinstance(by_flag.teacher_source, StoredTeacher) and by_flag.teacher_source.store == str(store)
    with pytest.raises(ValueError, match="teacher_store is read by teacher_source='stored'"):
        DistillationTrainer(model=classifier_free_student(tokenizer), teacher=teacher_student(tokenizer)[0],
                            args=make_args(tmp_path / "flag2", teacher_store=str(store)))
    with pytest.raises(StoreMismatchError, match="holds the teacher at temperature 2 but the distillation runs at 1"):
        build(temperature=1.0)
    with pytest.raises(StoreMismatchError, match="made with another tokenizer"):
        build(tok=make_wordpiece_tokenizer(sample_texts(50, seed=11), vocab_size=120))
    classifier = BertForSequenceClassification(tiny_bert_config(len(tokenizer), layers=1, num_labels=3, **NO_DROPOUT))
    with pytest.raises(StoreMismatchError, match="masked_lm teacher's outputs .* but the student is a "
                                                 "sequence_classification model"):
        build(data=tokenized(tokenizer, labels=True), student=classifier)
    with pytest.raises(StoreMismatchError, match="cached from other data"):
        build(data=ds.shuffle(seed=0))
    with pytest.raises(StoreMismatchError, match="holds 23 rows but the dataset has 20"):
        build(data=ds.select(range(20)))
    with pytest.raises(ValueError, match="term 'logit_mse' needs the teacher's full logits"):
        build(mse_weight=1.0)
    with pytest.raises(ValueError, match="the evaluation dataset carries no teacher outputs"):
        DistillationTrainer(model=teacher_student(tokenizer)[1], args=make_args(tmp_path / "e", cos_weight=0.0,
                                                                                  temperature=2.0),
                            train_dataset=ds, eval_dataset=ds, processing_class=tokenizer,
                            teacher_source=StoredTeacher(store=store))
    with pytest.raises(ValueError, match="the training dataset carries no teacher outputs"):
        build(source=StoredTeacher())
    (store / "shard-00000.parquet").unlink()
    with pytest.raises(ValueError, match="is not finished: 1 of 1 shards missing"):
        StoredTeacher(store=store)


def classifier_free_student(tokenizer):
    return teacher_student(tokenizer)[1]


def test_joined_rows_follow_shuffling_and_the_collator_pads_them(tokenizer, tmp_path):
    """A joined dataset can be shuffled and batched: each row keeps its own teacher outputs."""
    teacher, ds = teachers(tokenizer)["masked_lm"], tokenized(tokenizer)
    cache_teacher(teacher, ds, tmp_path / "store", tokenizer=tokenizer, k=4, progress=False)
    joined = join_store(ds, tmp_path / "store", tokenizer=tokenizer).shuffle(seed=1)
    from hf_distill.store import StoreCollator

    for side in ("right", "left"):
        tokenizer.padding_side = side
        try:
            batch = StoreCollator(DataCollatorWithPadding(tokenizer))([joined[i] for i in range(5)])
        finally:
            tokenizer.padding_side = "right"
        for b in range(5):
            real = batch["attention_mask"][b].bool()
            ids = batch["input_ids"][b][real][None]
            with torch.no_grad():
                want = torch.log_softmax(teacher(input_ids=ids).logits[0], -1).topk(4, -1)
            assert torch.equal(batch["teacher_topk_indices"][b][real], want.indices)
            torch.testing.assert_close(batch["teacher_topk_logprobs"][b][real], want.values, atol=2e-3, rtol=1e-3)
            assert torch.all(batch["teacher_tail_mass"][b][~real] == 0)
    truncating = DataCollatorWithPadding(tokenizer, padding="max_length", max_length=6)
    long_row = next(i for i in range(len(joined)) if len(joined[i]["input_ids"]) > 6)

    def truncate(features):
        return truncating([{**f, "input_ids": f["input_ids"][:6], "attention_mask": f["attention_mask"][:6]}
                           for f in features])

    with pytest.raises(ValueError, match="row 0 of the batch has 6 tokens but .* stored teacher positions"):
        StoreCollator(truncate)([joined[long_row]])
