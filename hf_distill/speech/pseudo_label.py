"""Pseudo-label unlabeled audio with a speech teacher (Whisper or a CTC model), resumably, into Parquet shards.

Pipeline, for one process::

    list inputs (sorted by id)  ->  fixed shards of ``shard_size`` items  ->  for each shard this rank owns:
        probe durations -> plan windows (long-form audio is chunked with overlap) -> sort windows by
        duration -> batches across files -> teacher -> stitch chunks -> signals, filters, soft labels
        -> ``shard-NNNNN.parquet`` written to a temporary name, then renamed

A recording is read once, from start to end, in blocks (:class:`~hf_distill.speech.audio_stream.WindowReader`):
only the windows being labelled are in memory, however long the file.

Outputs in ``output_dir``:

- ``manifest.json``: the configuration, its hash, the teacher and the number of items and shards. A run
  into a folder started with another configuration (or whose input changed) is refused.
- ``shard-00000.parquet`` ...: one row per labelled item (columns below); the shard's failures (items
  that could not be read, with the reason) are in the file's metadata. Load the store with
  :func:`load_pseudo_labels` or ``datasets.load_dataset("parquet", data_files=".../shard-*.parquet")``.
- ``stats/shard-00000.json``: audio seconds and compute seconds of each shard (for the summary).
- ``summary.json`` and ``failures.jsonl``: written when the last shard is done (by whichever process
  finishes it), or by ``finalize`` / ``hf-distill pseudo-label --finalize``.

Row columns: ``id``, ``path``, ``duration`` (seconds), ``reference`` (or null), ``text``, ``token_ids``
(Whisper: the tokens generated after the decoder prompt, end-of-text included; CTC: the collapsed label
sequence), ``prompt_ids`` (Whisper's decoder prompt, e.g. start-of-transcript, language, task,
no-timestamps), ``avg_logprob`` (Whisper: mean log-probability of ``token_ids``; with greedy decoding
under the decoding rules, suppressed tokens out of the normaliser, as Whisper's own ``avg_logprob`` that
the -1.0 threshold was made for; with beam search, of the teacher-forced distribution), ``no_speech_prob``
(Whisper: probability of the no-speech token at the first decoding step; for a chunked recording the
lowest over its chunks), ``compression_ratio``
(UTF-8 bytes / zlib-compressed bytes of ``text``), ``mean_max_posterior`` (CTC: mean over frames of the
top frame posterior), ``wer`` (against the reference, both normalised), ``n_chunks``, one boolean per
filter (``pass_wer``, ``pass_avg_logprob``, ``pass_no_speech``, ``pass_compression_ratio``,
``pass_mean_max_posterior``; null where a filter does not apply) and ``keep``: with a reference, the WER
filter decides; without one, every confidence filter that applies must pass. With ``--timestamps``:
``segments`` (start, end, text). With ``--top_k K``: ``topk_indices`` / ``topk_probs`` / ``topk_tail``
(see :mod:`hf_distill.speech.soft_labels`), one entry per token of ``token_ids`` (Whisper: the teacher's
raw distribution at the step that produced that token, no decoding rule applied) or per output frame (CTC).

Whisper decoding: greedy (``num_beams=1``, the default) runs on
:class:`~hf_distill.speech.greedy_decoding.GreedyWhisperDecoder` (the tokens ``generate`` gives; log-probabilities
and soft labels from the same pass); beam search runs ``generate`` and one teacher-forced pass for them.
Whisper rows longer than one window are stitched from chunks and carry no soft labels (a Whisper student
trains on windows).

Exactness: each shard's items and batches are a pure function of the configuration, so a run killed at
any moment (even with SIGKILL) and restarted with the same command finishes with the same rows as an
uninterrupted run; finished shards are verified and kept, unfinished ones recomputed. With several
processes (``RANK``/``WORLD_SIZE`` as set by ``accelerate launch`` or ``torchrun``), rank ``r`` takes
shards ``r, r + W, r + 2W, ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_distill.speech.audio import (
    AudioError,
    AudioFailure,
    AudioItem,
    list_audio,
    probe,
    read_failures,
    resampled_length,
    supported_extensions,
    write_failures,
)
from hf_distill.speech.windows import Chunk, plan_chunks
from hf_distill.speech.audio_stream import WindowReader
from hf_distill.speech.input_checks import check_listing, check_output_dir, check_speech_teacher
from hf_distill.store.format import arrow_columns, arrow_fields, bytes_per_position, index_type_for
from hf_distill.store.manifest import atomic_write_text, create_once, sha256_json, teacher_fingerprint
from hf_distill.store.writer import (
    SHARD_PATTERN,
    rank_and_world,
    read_shard_metadata,
    remove_partial_shard,
    shard_files,
    write_shard,
)

logger = logging.getLogger(__name__)

FORMAT = "hf_distill.pseudo_labels"
FORMAT_VERSION = 1
# Test hook: "kill-before-rename:<shard>" makes the process SIGKILL itself after writing that shard's
# temporary file and before renaming it, the worst moment for a crash.
FAILPOINT_ENV = "HF_DISTILL_PSEUDO_LABEL_FAILPOINT"


class ConfigMismatchError(RuntimeError):
    """The output directory belongs to a run with another configuration or another input."""


# ==================================================================================================
# configuration


@dataclass
class PseudoLabelConfig:
    """Everything that decides the output of a pseudo-labelling run (see ``hf-distill pseudo-label -h``)."""

    input: str
    model: str
    output_dir: str
    teacher_type: str = "auto"  # auto | whisper | ctc
    # input columns (manifest / dataset)
    path_column: str = "path"
    text_column: str | None = None  # None: first of text/sentence/transcript/...; "": no reference
    id_column: str | None = None
    audio_column: str = "audio"
    split: str | None = None
    dataset_config: str | None = None
    # decoding
    language: str | None = None
    task: str | None = None
    return_timestamps: bool = False
    num_beams: int = 1
    max_new_tokens: int | None = None
    batch_size: int = 16
    chunk_length_s: float | None = None  # default: the teacher's window (30 s for Whisper), 30 s for CTC
    chunk_overlap_s: float = 6.0
    # soft labels
    top_k: int | None = None
    soft_label_temperature: float = 1.0
    # filters (recorded, not applied)
    wer_threshold: float = 0.1
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    compression_ratio_threshold: float = 2.4
    min_mean_max_posterior: float = 0.5
    normalizer: str = "english"  # english | basic | none
    # work division
    shard_size: int = 256
    # runtime only: not part of the configuration hash
    device: str | None = None
    dtype: str = "float32"
    encoder_dtype: str | None = None  # Whisper teachers: the encoder's own dtype (default: dtype)
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True

    RUNTIME_FIELDS = ("output_dir", "device", "rank", "world_size", "progress")

    def __post_init__(self):
        if self.teacher_type not in {"auto", "whisper", "ctc"}:
            raise ValueError(f"teacher_type must be auto, whisper or ctc, got {self.teacher_type!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.normalizer not in {"english", "basic", "none"}:
            raise ValueError("normalizer must be english, basic or none")
        if self.dtype not in {"float32", "float16", "bfloat16"}:
            raise ValueError("dtype must be float32, float16 or bfloat16")
        if self.encoder_dtype not in {None, "float32", "float16", "bfloat16"}:
            raise ValueError("encoder_dtype must be float32, float16 or bfloat16 (or unset: dtype)")

    def hashed_fields(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.RUNTIME_FIELDS or (f.name == "encoder_dtype" and self.encoder_dtype is None):
                continue
            value = getattr(self, f.name)
            if f.name in {"input", "model"} and isinstance(value, str) and os.path.exists(value):
                value = os.path.abspath(value)
            out[f.name] = value
        return out


def _items_hash(items: Sequence[AudioItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.path}\t{it.reference if it.reference is not None else chr(0)}\n".encode("utf-8"))
    return h.hexdigest()


# ==================================================================================================
# text utilities: stitching, compression ratio, WER


_WORD_RE = re.compile(r"[^\w']+", re.UNICODE)


def _norm_word(word: str) -> str:
    return _WORD_RE.sub("", word.lower()).strip("'")


def merge_overlapping_texts(texts: Sequence[str], max_overlap_words: Sequence[int | None] | int | None = None) -> str:
    """Join the transcripts of consecutive overlapping chunks without losing or repeating words.

    For each pair, the end of the text so far is aligned with the start of the next chunk's text: every
    overlap length ``i`` (up to ``max_overlap_words``) is scored by how many of the last ``i`` words equal,
    position by position, the first ``i`` words of the next text (case and punctuation ignored). The best
    alignment (most matching words; among ties the shortest) is cut in the middle of its longest run of
    agreeing words, where both chunks heard the same thing and neither is near its window's edge: the
    words before the cut come from the earlier chunk and the words after it from the later one. When no
    alignment is convincing (fewer than 2 matching words, or fewer than 30% of the overlap, e.g. because
    the overlap was silent) the texts are simply joined.
    """
    if not texts:
        return ""
    n_pairs = len(texts) - 1
    if max_overlap_words is None or isinstance(max_overlap_words, int):
        limits = [max_overlap_words] * n_pairs
    else:
        limits = list(max_overlap_words)
        if len(limits) != n_pairs:
            raise ValueError(f"need {n_pairs} overlap limits, got {len(limits)}")
    words = texts[0].split()
    for nxt, limit in zip(texts[1:], limits):
        words = _merge_pair(words, nxt.split(), limit)
    return " ".join(words)


def _merge_pair(a: list[str], b: list[str], limit: int | None) -> list[str]:
    if not a or not b:
        return a + b
    na = [_norm_word(w) for w in a]
    nb = [_norm_word(w) for w in b]
    max_i = min(len(a), len(b), limit if limit is not None else len(a))
    best_matches, best_i, best_eq = 0, 0, None
    for i in range(1, max_i + 1):
        off = len(a) - i
        eq = [bool(na[off + j]) and na[off + j] == nb[j] for j in range(i)]
        m = sum(eq)
        if m > best_matches:
            best_matches, best_i, best_eq = m, i, eq
    if best_eq is None or best_matches < 2 and not (best_matches == 1 and best_i <= 2) or best_matches < 0.3 * best_i:
        return a + b
    # longest run of agreeing positions inside the chosen overlap; cut in its middle
    run_start, run_len, cur_start, cur_len = 0, 0, 0, 0
    for j, ok in enumerate(best_eq):
        if ok:
            if cur_len == 0:
                cur_start = j
            cur_len += 1
            if cur_len > run_len:
                run_start, run_len = cur_start, cur_len
        else:
            cur_len = 0
    cut = run_start + run_len // 2  # position inside the overlap; a[off+cut] == b[cut]
    off = len(a) - best_i
    return a[: off + cut] + b[cut:]


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib-compressed length, as Whisper computes it (0.0 for an empty text)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def _english_module():
    try:  # the project's Whisper English normaliser (with its spelling table when installed)
        from hf_distill.speech import text_normalizer
    except ImportError:
        return None
    return text_normalizer


def load_normalizer(kind: str):
    """The text normaliser the WER filter compares with: ``english`` (Whisper's), ``basic`` or ``none``."""
    if kind == "none":
        return lambda s: s
    if kind == "english":
        module = _english_module()
        if module is not None:
            return module.english_normalizer()
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        return EnglishTextNormalizer({})
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def word_error_rate(reference: str, hypothesis: str, normalizer=None) -> float:
    """Word-level edit distance / reference words, after ``normalizer``. An empty reference gives 0.0
    for an empty hypothesis and ``inf`` otherwise."""
    if normalizer is not None:
        reference, hypothesis = normalizer(reference), normalizer(hypothesis)
    ref, hyp = reference.split(), hypothesis.split()
    if not ref:
        return 0.0 if not hyp else float("inf")
    try:
        import jiwer

        return float(jiwer.wer(" ".join(ref), " ".join(hyp)))
    except ImportError:
        pass
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


# ==================================================================================================
# teachers


@dataclass
class _Segment:
    item: int  # position of the item in the shard
    chunk: int
    window: Chunk
    n_chunks: int


@dataclass
class SegmentResult:
    """What the teacher gives for one window of a recording."""

    token_ids: np.ndarray  # whisper: generated tokens after the prompt; ctc: argmax per kept frame
    prompt_ids: np.ndarray | None = None
    logprobs: np.ndarray | None = None  # whisper: log-prob of each token
    no_speech_prob: float | None = None
    max_posteriors: np.ndarray | None = None  # ctc: per kept frame
    soft: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    segments: list[dict] | None = None


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _pick_device(config: PseudoLabelConfig) -> str:
    import torch

    if config.device:
        return config.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def _detect_teacher_type(model: str) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    if cfg.model_type == "whisper":
        return "whisper"
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    if "CTC" in archs or hasattr(cfg, "conv_stride"):
        return "ctc"
    raise ValueError(f"cannot tell the teacher type of {model} (model_type {cfg.model_type!r}); pass --teacher-type")


class _Teacher:
    kind: str
    sampling_rate: int
    window: int  # samples per chunk
    overlap: int
    hop: int

    min_samples: int = 1  # shorter inputs give the teacher nothing to look at

    def plan(self, num_samples: int) -> list[Chunk]:
        return plan_chunks(num_samples, self.window, self.overlap, self.hop)

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "sampling_rate": self.sampling_rate,
            "chunk_samples": self.window,
            "overlap_samples": self.overlap,
            "hop": self.hop,
        }


class WhisperTeacher(_Teacher):
    kind = "whisper"

    def __init__(self, config: PseudoLabelConfig, device: str):
        import torch
        from transformers import AutoProcessor, WhisperForConditionalGeneration

        self.config = config
        self.device = device
        self.processor = AutoProcessor.from_pretrained(config.model)
        self.feature_extractor = self.processor.feature_extractor
        self.tokenizer = self.processor.tokenizer
        self.model = WhisperForConditionalGeneration.from_pretrained(config.model, dtype=_torch_dtype(config.dtype))
        self.model.to(device).eval().requires_grad_(False)
        if config.encoder_dtype is not None:  # e.g. a bfloat16 encoder (where the CPU has bf16 arithmetic) before a
            self.model.get_encoder().to(_torch_dtype(config.encoder_dtype))  # float32 decoder
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        max_window = int(getattr(self.feature_extractor, "n_samples", 30 * self.sampling_rate))
        window_s = config.chunk_length_s if config.chunk_length_s is not None else max_window / self.sampling_rate
        self.window = int(round(window_s * self.sampling_rate))
        if self.window > max_window:
            raise ValueError(
                f"chunk_length_s {window_s} exceeds Whisper's window of {max_window / self.sampling_rate:g} s"
            )
        self.overlap = int(round(config.chunk_overlap_s * self.sampling_rate))
        self.hop = 1
        gen = self.model.generation_config
        self.eos_id = int(gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0])
        self.sot_id = int(gen.decoder_start_token_id)
        self.lang_ids = {int(v) for v in (getattr(gen, "lang_to_id", None) or {}).values()}
        self.task_ids = {int(v) for v in (getattr(gen, "task_to_id", None) or {}).values()}
        nts = getattr(gen, "no_timestamps_token_id", None)
        self.no_timestamps_id = int(nts) if nts is not None else None
        self.no_speech_id = None
        vocab = self.tokenizer.get_vocab()
        for tok in ("<|nospeech|>", "<|nocaptions|>"):
            if tok in vocab:
                self.no_speech_id = int(vocab[tok])
                break
        self.gen_kwargs: dict[str, Any] = {"return_dict_in_generate": True, "num_beams": config.num_beams}
        if config.language is not None:
            self.gen_kwargs["language"] = config.language
        if config.task is not None:
            self.gen_kwargs["task"] = config.task
        if config.return_timestamps:
            self.gen_kwargs["return_timestamps"] = True
            self.gen_kwargs["force_unique_generate_call"] = True
        if config.max_new_tokens is not None:
            self.gen_kwargs["max_new_tokens"] = config.max_new_tokens
        self._torch = torch
        self._prompt_cache: dict[bool, list[int]] = {}
        # greedy decoding: the pool decoder (the tokens generate gives, Whisper's log-probabilities under the
        # decoding rules, soft labels from the same pass); beam search: generate + one teacher-forced pass
        self.greedy = None
        if config.num_beams == 1:
            from hf_distill.speech.greedy_decoding import GreedyWhisperDecoder

            self.greedy = GreedyWhisperDecoder(self.model, max_new_tokens=config.max_new_tokens)

    def describe(self):
        d = super().describe()
        d.update(
            vocab_size=int(self.model.config.vocab_size), eos_token_id=self.eos_id, no_speech_token_id=self.no_speech_id
        )
        return d

    def prepare(self, audios: list[np.ndarray]):
        feats = self.feature_extractor(audios, sampling_rate=self.sampling_rate, return_tensors="pt")
        return feats["input_features"]

    def encode_audio(self, features):
        """The encoder's output for log-mel ``features`` [B, 80, 3000], in the decoder's dtype (the encoder may
        run in its own, ``encoder_dtype``)."""
        from transformers.modeling_outputs import BaseModelOutput

        encoder = self.model.get_encoder()
        enc_dtype = next(encoder.parameters()).dtype
        hidden = encoder(features.to(self.device, dtype=enc_dtype)).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden.to(self.model.get_decoder().embed_tokens.weight.dtype))

    def _prompt_length(self, seq: list[int]) -> int:
        """sot, then at most one language, one task and one no-timestamps token, in that order."""
        p = 1 if seq and seq[0] == self.sot_id else 0
        if p < len(seq) and seq[p] in self.lang_ids:
            p += 1
        if p < len(seq) and seq[p] in self.task_ids:
            p += 1
        if not self.config.return_timestamps and p < len(seq) and seq[p] == self.no_timestamps_id:
            p += 1
        return p

    def run(self, features) -> list[SegmentResult]:
        torch = self._torch
        from hf_distill.store.format import pack_topk, topk_from_logits

        model = self.model
        with torch.inference_mode():
            encoder_outputs = self.encode_audio(features)
            gen = model.generate(encoder_outputs=encoder_outputs, **self.gen_kwargs)
            sequences = gen.sequences if hasattr(gen, "sequences") else gen
            if sequences.shape[1] < 2:
                sequences = torch.cat([sequences, torch.full_like(sequences[:, :1], self.eos_id)], dim=1)
            logits = model(encoder_outputs=encoder_outputs, decoder_input_ids=sequences[:, :-1]).logits
        results = []
        seqs = sequences.cpu().tolist()
        for b, seq in enumerate(seqs):
            p = max(1, self._prompt_length(seq))
            end = len(seq)
            for j in range(p, len(seq)):
                if seq[j] == self.eos_id:
                    end = j + 1
                    break
            tokens = seq[p:end]
            row_logits = logits[b, p - 1 : end - 1].float()
            logp = torch.log_softmax(row_logits, dim=-1)
            tok_t = torch.as_tensor(tokens, dtype=torch.long, device=logp.device)
            token_logprobs = logp.gather(-1, tok_t[:, None])[:, 0] if len(tokens) else logp.new_zeros(0)
            no_speech = self.no_speech_prob(logits[b, 0], seq)
            soft = None
            if self.config.top_k:
                idx, probs, tail = topk_from_logits(row_logits, self.config.top_k, self.config.soft_label_temperature)
                soft = pack_topk(idx, probs, tail)
            segments = self._segments(tokens) if self.config.return_timestamps else None
            results.append(
                SegmentResult(
                    token_ids=np.asarray(tokens, dtype=np.int32),
                    prompt_ids=np.asarray(seq[:p], dtype=np.int32),
                    logprobs=token_logprobs.cpu().numpy().astype(np.float64),
                    no_speech_prob=no_speech,
                    soft=soft,
                    segments=segments,
                )
            )
        return results

    def requests(self, features, keys: Sequence[Any]) -> list:
        """Encode ``features`` and return one decoding request per row (greedy decoding), keyed by ``keys``."""
        from hf_distill.speech.greedy_decoding import DecodeRequest

        ts = bool(self.config.return_timestamps)
        with self._torch.inference_mode():
            hidden = self.encode_audio(features).last_hidden_state
            prompts = self.prompts(hidden, ts)
        return [DecodeRequest((key, tuple(prompt)), hidden[b], prompt, ts)
                for b, (key, prompt) in enumerate(zip(keys, prompts))]

    def stream(self, take, capacity: int):
        """Greedy decoding of the requests ``take(n)`` hands out, ``capacity`` rows at a time; results as rows
        finish (see :meth:`GreedyWhisperDecoder.stream`), soft labels included when asked."""
        cfg = self.config
        soft_labels = (int(cfg.top_k), float(cfg.soft_label_temperature)) if cfg.top_k else None
        with self._torch.inference_mode():
            yield from self.greedy.stream(take, capacity=capacity, soft_labels=soft_labels)

    def no_speech_prob(self, first_logits, prompt: Sequence[int]) -> float | None:
        """Probability of the no-speech token at the first decoding position (raw ``first_logits`` [V]), as
        Whisper computes it; None without such a token or when the prompt does not open the transcript."""
        if self.no_speech_id is None or not len(prompt) or int(prompt[0]) != self.sot_id:
            return None
        return float(self._torch.softmax(first_logits.float(), dim=-1)[self.no_speech_id])

    def segment_result(self, res) -> tuple[Any, SegmentResult]:
        """``(key, result)`` of a finished :class:`~hf_distill.speech.greedy_decoding.DecodeResult`."""
        from hf_distill.store.format import pack_topk

        key, prompt = res.key
        no_speech = self.no_speech_prob(res.first_logits, prompt)
        return key, SegmentResult(
            token_ids=np.asarray(res.tokens, dtype=np.int32),
            prompt_ids=np.asarray(prompt, dtype=np.int32),
            logprobs=np.asarray(res.logprobs, dtype=np.float64),
            no_speech_prob=no_speech,
            soft=pack_topk(*res.soft) if res.soft is not None else None,
            segments=self._segments(res.tokens) if self.config.return_timestamps else None,
        )

    def prompts(self, hidden, timestamps: bool) -> list[list[int]]:
        """The decoder prompt ``model.generate`` uses (start of transcript, language, task, no-timestamps) for
        each row of ``hidden`` (encoder outputs): asked of it once (one decoding step on one window), or per
        window when a multilingual teacher has no language set (it detects the language of each window)."""
        from transformers.modeling_outputs import BaseModelOutput

        if timestamps in self._prompt_cache:
            return [list(self._prompt_cache[timestamps]) for _ in range(hidden.shape[0])]
        multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        per_row = multilingual and "language" not in self.gen_kwargs
        probe = hidden if per_row else hidden[:1]
        kwargs: dict[str, Any] = {"max_new_tokens": 1, "return_dict_in_generate": True}
        for key in ("language", "task"):
            if key in self.gen_kwargs:
                kwargs[key] = self.gen_kwargs[key]
        if timestamps:
            kwargs.update(return_timestamps=True, force_unique_generate_call=True)
        out = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=probe), **kwargs)
        seqs = out["sequences"] if isinstance(out, dict) else out.sequences
        prompts = [[int(x) for x in row] for row in seqs[:, :-1].tolist()]
        if per_row:
            return prompts
        self._prompt_cache[timestamps] = prompts[0]
        return [list(prompts[0]) for _ in range(hidden.shape[0])]

    def _segments(self, tokens: list[int]) -> list[dict]:
        try:
            out = self.tokenizer.decode(tokens, skip_special_tokens=False, output_offsets=True)
        except Exception:  # tokenizer without timestamp support
            return []
        segs = []
        for o in out.get("offsets", []) if isinstance(out, dict) else []:
            start, end = o["timestamp"]
            segs.append(
                {"start": float(start), "end": float(end if end is not None else start), "text": o["text"].strip()}
            )
        return segs

    def text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, token_ids)), skip_special_tokens=True).strip()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


class CTCTeacher(_Teacher):
    kind = "ctc"

    def __init__(self, config: PseudoLabelConfig, device: str):
        import torch
        from transformers import AutoModelForCTC, AutoProcessor

        self.config = config
        self.device = device
        self.processor = AutoProcessor.from_pretrained(config.model)
        self.feature_extractor = getattr(self.processor, "feature_extractor", self.processor)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForCTC.from_pretrained(config.model, dtype=_torch_dtype(config.dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        ratio = getattr(self.model.config, "inputs_to_logits_ratio", None)
        if ratio is None:
            ratio = int(np.prod(getattr(self.model.config, "conv_stride", [320])))
        self.hop = int(ratio)
        window_s = config.chunk_length_s if config.chunk_length_s is not None else 30.0
        self.window = int(round(window_s * self.sampling_rate))
        self.overlap = int(round(config.chunk_overlap_s * self.sampling_rate))
        self.blank_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.use_mask = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        self._torch = torch
        frames = self._frames(np.arange(1, 8 * self.hop + 1, dtype=np.int64))
        self.min_samples = int(np.argmax(frames >= 1)) + 1 if (frames >= 1).any() else 1

    def describe(self):
        d = super().describe()
        d.update(vocab_size=int(self.model.config.vocab_size), blank_id=int(self.blank_id))
        return d

    def prepare(self, audios: list[np.ndarray]):
        inputs = self.feature_extractor(
            audios,
            sampling_rate=self.sampling_rate,
            padding=True,
            return_attention_mask=self.use_mask,
            return_tensors="pt",
        )
        lengths = np.asarray([len(a) for a in audios], dtype=np.int64)
        return dict(inputs), lengths

    def _frames(self, lengths: np.ndarray) -> np.ndarray:
        torch = self._torch
        fn = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if fn is not None:
            return np.asarray(fn(torch.as_tensor(lengths)).cpu().numpy(), dtype=np.int64)
        return -(-lengths // self.hop)

    def run(self, prepared, windows: list[Chunk]) -> list[SegmentResult]:
        torch = self._torch
        from hf_distill.store.format import pack_topk, topk_from_logits

        inputs, lengths = prepared
        with torch.inference_mode():
            inputs = {
                k: (v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()
            }
            logits = self.model(**inputs).logits
        frames = self._frames(lengths)
        results = []
        for b, w in enumerate(windows):
            n_f = min(int(frames[b]), logits.shape[1])
            lo = (w.keep_start - w.start) // self.hop
            hi = n_f if w.keep_end >= w.end else (w.keep_end - w.start) // self.hop
            lo, hi = max(0, min(lo, n_f)), max(0, min(hi, n_f))
            row = logits[b, lo:hi].float()
            probs = torch.softmax(row, dim=-1)
            maxp, arg = probs.max(dim=-1)
            soft = None
            if self.config.top_k:
                idx, p, tail = topk_from_logits(row, self.config.top_k, self.config.soft_label_temperature)
                soft = pack_topk(idx, p, tail)
            results.append(
                SegmentResult(
                    token_ids=arg.cpu().numpy().astype(np.int32),
                    max_posteriors=maxp.cpu().numpy().astype(np.float64),
                    soft=soft,
                )
            )
        return results

    def collapse(self, frame_ids: np.ndarray) -> np.ndarray:
        if len(frame_ids) == 0:
            return frame_ids.astype(np.int32)
        keep = np.ones(len(frame_ids), dtype=bool)
        keep[1:] = frame_ids[1:] != frame_ids[:-1]
        ids = frame_ids[keep]
        return ids[ids != self.blank_id].astype(np.int32)

    def text(self, frame_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(map(int, frame_ids))).strip()


def load_teacher(config: PseudoLabelConfig, device: str | None = None) -> _Teacher:
    """The Whisper or CTC teacher of ``config`` with its processor; a model that cannot be loaded is a
    ``FileNotFoundError`` that names it (one line), not transformers' traceback."""
    try:
        kind = config.teacher_type if config.teacher_type != "auto" else _detect_teacher_type(config.model)
        device = device or _pick_device(config)
        return WhisperTeacher(config, device) if kind == "whisper" else CTCTeacher(config, device)
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "" if os.path.exists(config.model) else " (no local folder of that name; as a Hub id)"
        raise FileNotFoundError(
            f"cannot load the teacher {config.model!r}{where}: {first} (give a folder with the model and its "
            "processor, or a Hub model id that is in the local cache when offline)") from exc


# ==================================================================================================
# shard processing


def _schema(config: PseudoLabelConfig, teacher_kind: str, index_type: str = "int32"):
    """The shard schema; ``index_type`` is the store's (``uint16`` for new stores whose vocabulary fits, ``int32``
    for stores started before uint16 indices, which keep it so that every shard of a store has one schema)."""
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("duration", pa.float64()),
        pa.field("reference", pa.string()),
        pa.field("text", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("avg_logprob", pa.float64()),
        pa.field("no_speech_prob", pa.float64()),
        pa.field("compression_ratio", pa.float64()),
        pa.field("mean_max_posterior", pa.float64()),
        pa.field("wer", pa.float64()),
        pa.field("n_chunks", pa.int32()),
        pa.field("pass_wer", pa.bool_()),
        pa.field("pass_avg_logprob", pa.bool_()),
        pa.field("pass_no_speech", pa.bool_()),
        pa.field("pass_compression_ratio", pa.bool_()),
        pa.field("pass_mean_max_posterior", pa.bool_()),
        pa.field("keep", pa.bool_()),
    ]
    if config.return_timestamps and teacher_kind == "whisper":
        fields.append(
            pa.field(
                "segments", pa.list_(pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string())]))
            )
        )
    if config.top_k:
        fields.extend(arrow_fields(config.top_k, index_type))
    return pa.schema(fields)


FILTER_COLUMNS = ("pass_wer", "pass_avg_logprob", "pass_no_speech", "pass_compression_ratio", "pass_mean_max_posterior")


def prefetch(batches: list, build: Callable[[Any], Any], depth: int = 2):
    """Yield ``(batch, build(batch))`` in order, the next ``depth`` built ahead in a background thread (audio
    decoding and feature extraction overlap the teacher). ``build`` runs in that thread, one batch after
    another; an exception it raises comes out here. Closing the generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                q.put((batch, build(batch)))
            q.put(None)
        except BaseException as exc:  # surface in the main thread
            q.put(exc)

    worker = threading.Thread(target=produce, daemon=True, name="pseudo-label-audio")
    worker.start()
    try:
        while True:
            msg = q.get()
            if msg is None:
                return
            if isinstance(msg, BaseException):
                raise msg
            yield msg
    finally:
        stop.set()
        while worker.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        worker.join()


class ShardRunner:
    """Labels the items of one shard; a pure function of (config, teacher, items)."""

    stats_name: str | None = None  # subclasses that count things: the name of their counters (see run_labelling_job)

    @classmethod
    def check_teacher(cls, teacher: _Teacher) -> None:
        """Raise ValueError, before anything is written, for a teacher this runner cannot label with."""

    def __init__(self, config: PseudoLabelConfig, teacher: _Teacher, normalizer, on_batch=None):
        self.stats: dict[str, int] = {}
        self.config = config
        self.teacher = teacher
        self.normalizer = normalizer
        self.on_batch = on_batch

    def _probe(self, items: list[AudioItem]) -> tuple[dict[int, AudioFailure], dict[int, float], dict[int, int]]:
        """Read every item's header: ``(failures, durations, lengths at the teacher's rate)`` by position.
        Unreadable, empty and too-short items are failures (reported to the progress bar at once)."""
        teacher = self.teacher
        failures: dict[int, AudioFailure] = {}
        durations: dict[int, float] = {}
        lengths: dict[int, int] = {}
        for pos, item in enumerate(items):
            try:
                info = probe(item)
            except AudioError as exc:
                failures[pos] = AudioFailure(item.id, item.path, exc.reason)
                continue
            except Exception as exc:  # an unexpected reader error must not stop the job either
                failures[pos] = AudioFailure(item.id, item.path, f"unreadable: {type(exc).__name__}: {exc}")
                continue
            n = resampled_length(info.frames, info.sampling_rate, teacher.sampling_rate)
            if n < teacher.min_samples:
                failures[pos] = AudioFailure(
                    item.id, item.path, f"too short for the teacher ({n} samples at {teacher.sampling_rate} Hz)"
                )
                continue
            durations[pos] = info.duration
            lengths[pos] = n
        if failures and self.on_batch is not None:
            self.on_batch(len(failures), 0.0)
        return failures, durations, lengths

    def run(self, items: list[AudioItem]) -> tuple[list[dict], list[AudioFailure], float]:
        teacher, cfg = self.teacher, self.config
        failures, durations, lengths = self._probe(items)
        segments: list[_Segment] = []
        for pos, n in lengths.items():
            windows = teacher.plan(n)
            segments.extend(_Segment(pos, c, w, len(windows)) for c, w in enumerate(windows))
        # Longest first; a long recording's windows stay together and in order (it is read once, start to end).
        segments.sort(key=lambda s: (-min(lengths[s.item], teacher.window), s.item, s.chunk))
        bs = cfg.batch_size
        batches = [segments[i : i + bs] for i in range(0, len(segments), bs)]
        last_use: dict[int, int] = {}
        for b, batch in enumerate(batches):
            for s in batch:
                last_use[s.item] = b
        results: dict[tuple[int, int], SegmentResult] = {}
        audio_done = 0.0

        # The audio thread owns its readers and its record of failed items; it hands new failures to this
        # thread with each batch (nothing it writes is read here while it runs).
        skip = set(failures)
        readers: dict[int, WindowReader] = {}

        def build(numbered):
            """Read the windows of batch ``b`` (a recording is read once, from start to end, in blocks: only
            its current windows are in memory) and prepare the teacher's inputs:
            ``(kept segments, prepared features or None, {position: failure} found in this batch)``."""
            b, batch = numbered
            kept, audios, failed = [], [], {}
            for s in batch:
                if s.item in skip:
                    continue
                try:
                    reader = readers.get(s.item)
                    if reader is None:
                        reader = readers[s.item] = WindowReader(items[s.item], teacher.sampling_rate, lengths[s.item])
                    audio = reader.read(s.window.start, s.window.end)
                except Exception as exc:  # AudioError, or an unexpected decoder/resampler error
                    reason = (exc.reason if isinstance(exc, AudioError)
                              else f"decode error: {type(exc).__name__}: {exc}")
                    failed[s.item] = AudioFailure(items[s.item].id, items[s.item].path, reason)
                    skip.add(s.item)
                    audio = None
                if audio is None or s.chunk == s.n_chunks - 1:
                    closing = readers.pop(s.item, None)
                    if closing is not None:
                        closing.close()
                if audio is not None:
                    kept.append(s)
                    audios.append(audio)
            return kept, (teacher.prepare(audios) if kept else None), failed

        built = prefetch(list(enumerate(batches)), build)
        # Progress: an item counts once, when its last segment has a result (or when it failed).
        left = {pos: 0 for pos in lengths}
        for seg in segments:
            left[seg.item] += 1
        reported: set[int] = set()

        def report(positions) -> None:
            nonlocal audio_done
            new = [p for p in positions if p not in reported]
            reported.update(new)
            secs = sum(durations[p] for p in new if p not in failures)
            audio_done += secs
            if new and self.on_batch is not None:
                self.on_batch(len(new), secs)

        def finished_segment(seg: _Segment, result: SegmentResult) -> None:
            results[(seg.item, seg.chunk)] = result
            left[seg.item] -= 1
            if left[seg.item] == 0:
                report([seg.item])

        def incoming_batches():
            for (b, _), (kept, prepared, failed) in built:
                failures.update(failed)
                yield b, kept, prepared

        incoming = incoming_batches()
        try:
            if isinstance(teacher, WhisperTeacher) and teacher.greedy is not None:
                # one pool of decoder rows for the whole shard: a finished row is replaced at once by the
                # next window, whatever batch it came in (no batch dwindling to its last rows)
                waiting: deque = deque()

                def take(k: int):
                    while len(waiting) < k:
                        msg = next(incoming, None)
                        if msg is None:
                            break
                        b, kept, prepared = msg
                        report([p for p in failures if last_use.get(p) == b])
                        if kept:
                            waiting.extend(teacher.requests(prepared, kept))
                    return [waiting.popleft() for _ in range(min(k, len(waiting)))]

                for res in teacher.stream(take, capacity=bs):
                    seg, result = teacher.segment_result(res)
                    finished_segment(seg, result)
            else:
                for b, kept, prepared in incoming:
                    if kept:
                        if isinstance(teacher, CTCTeacher):
                            outs = teacher.run(prepared, [s.window for s in kept])
                        else:
                            outs = teacher.run(prepared)
                        for seg, r in zip(kept, outs):
                            finished_segment(seg, r)
                    report([p for p in failures if last_use.get(p) == b])
            report([p for p in lengths if p in failures])  # failed in a batch whose message came last
        finally:
            built.close()  # stops the audio thread
            for reader in readers.values():
                reader.close()

        rows = []
        for pos, item in enumerate(items):
            if pos in failures:
                continue
            n_chunks = len(teacher.plan(lengths[pos]))
            parts = [results[(pos, c)] for c in range(n_chunks)]
            rows.append(self._row(item, durations[pos], lengths[pos], parts))
        return rows, [failures[p] for p in sorted(failures)], audio_done

    # ---------------------------------------------------------------------------------------------

    def _row(self, item: AudioItem, duration: float, n_samples: int, parts: list[SegmentResult]) -> dict[str, Any]:
        teacher, cfg = self.teacher, self.config
        row: dict[str, Any] = {
            "id": item.id,
            "path": item.path,
            "duration": float(duration),
            "reference": item.reference,
            "n_chunks": len(parts),
            "avg_logprob": None,
            "no_speech_prob": None,
            "mean_max_posterior": None,
            "prompt_ids": None,
            "soft": None,
        }
        if isinstance(teacher, WhisperTeacher):
            n_tok = sum(len(p.logprobs) for p in parts)
            row["avg_logprob"] = float(sum(p.logprobs.sum() for p in parts) / n_tok) if n_tok else None
            ns = [p.no_speech_prob for p in parts if p.no_speech_prob is not None]
            row["no_speech_prob"] = float(min(ns)) if ns else None
            row["prompt_ids"] = parts[0].prompt_ids.tolist()
            if len(parts) == 1:
                row["token_ids"] = parts[0].token_ids.tolist()
                row["text"] = teacher.text(parts[0].token_ids)
                row["soft"] = parts[0].soft
                if cfg.return_timestamps:
                    row["segments"] = parts[0].segments or []
            else:
                windows = teacher.plan(n_samples)
                texts = [teacher.text(p.token_ids) for p in parts]
                limits = []
                for w0, w1 in zip(windows[:-1], windows[1:]):
                    ov_s = max(0, w0.end - w1.start) / teacher.sampling_rate
                    limits.append(int(math.ceil(ov_s * 6)) + 4)
                row["text"] = merge_overlapping_texts(texts, limits)
                row["token_ids"] = teacher.encode(row["text"]) + [teacher.eos_id]
                if cfg.return_timestamps:
                    segs = []
                    for p, w in zip(parts, windows):
                        t0, lo, hi = (
                            w.start / teacher.sampling_rate,
                            w.keep_start / teacher.sampling_rate,
                            w.keep_end / teacher.sampling_rate,
                        )
                        for s in p.segments or []:
                            if lo <= t0 + s["start"] < hi:
                                segs.append(
                                    {
                                        "start": round(t0 + s["start"], 3),
                                        "end": round(t0 + s["end"], 3),
                                        "text": s["text"],
                                    }
                                )
                    row["segments"] = segs
        else:
            frame_ids = np.concatenate([p.token_ids for p in parts]) if parts else np.zeros(0, np.int32)
            maxp = np.concatenate([p.max_posteriors for p in parts])
            row["token_ids"] = teacher.collapse(frame_ids).tolist()
            row["text"] = teacher.text(frame_ids)
            row["mean_max_posterior"] = float(maxp.mean()) if len(maxp) else None
            if cfg.top_k:
                row["soft"] = tuple(np.concatenate([p.soft[i] for p in parts]) for i in range(3))
        row["compression_ratio"] = compression_ratio(row["text"])
        self._filters(row)
        return row

    def _filters(self, row: dict[str, Any]) -> None:
        cfg = self.config
        whisper = isinstance(self.teacher, WhisperTeacher)
        row["wer"] = None
        row["pass_wer"] = None
        if row["reference"] is not None:
            row["wer"] = word_error_rate(row["reference"], row["text"], self.normalizer)
            row["pass_wer"] = bool(row["wer"] < cfg.wer_threshold)
        row["pass_avg_logprob"] = (
            bool(row["avg_logprob"] >= cfg.logprob_threshold) if whisper and row["avg_logprob"] is not None else None
        )
        row["pass_no_speech"] = (
            bool(row["no_speech_prob"] <= cfg.no_speech_threshold)
            if whisper and row["no_speech_prob"] is not None
            else None
        )
        row["pass_compression_ratio"] = (
            bool(row["compression_ratio"] <= cfg.compression_ratio_threshold) if whisper else None
        )
        row["pass_mean_max_posterior"] = (
            bool(row["mean_max_posterior"] >= cfg.min_mean_max_posterior)
            if not whisper and row["mean_max_posterior"] is not None
            else None
        )
        if row["pass_wer"] is not None:
            row["keep"] = row["pass_wer"]
        else:
            checks = [row[c] for c in FILTER_COLUMNS[1:] if row[c] is not None]
            row["keep"] = all(checks)


def _rows_to_table(rows: list[dict], schema, top_k: int | None):
    import pyarrow as pa

    cols = {}
    for f in schema:
        if f.name.startswith("topk_"):
            continue
        cols[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
    if top_k:
        stored = schema.field("topk_indices").type.value_type.value_type
        index_type = "uint16" if pa.types.is_uint16(stored) else "int32"
        cols.update(arrow_columns([r["soft"] for r in rows], top_k, index_type))
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


# ==================================================================================================
# the job


def _manifest(config: PseudoLabelConfig, items: list[AudioItem], teacher_info: dict[str, Any]) -> dict[str, Any]:
    cfg = config.hashed_fields()
    fingerprint = teacher_fingerprint(config.model)
    config_hash = sha256_json({"format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "teacher": fingerprint})
    n_shards = max(1, math.ceil(len(items) / config.shard_size)) if items else 0
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": cfg,
        "config_hash": config_hash,
        "teacher": {**teacher_info, "fingerprint": fingerprint},
        "num_items": len(items),
        "items_hash": _items_hash(items),
        "shard_size": config.shard_size,
        "num_shards": n_shards,
        "columns": [f.name for f in _schema(config, teacher_info["type"])],
    }
    if config.top_k:
        # The index type is recorded, not hashed: a store started with int32 indices resumes with them.
        index_type = index_type_for(teacher_info["vocab_size"])
        manifest["columns"] = [f.name for f in _schema(config, teacher_info["type"], index_type)]
        manifest["soft_labels"] = {
            "k": config.top_k,
            "temperature": config.soft_label_temperature,
            "positions": "tokens of token_ids" if teacher_info["type"] == "whisper" else "output frames",
            "index_type": index_type,
            "raw_bytes_per_position": bytes_per_position(config.top_k, index_type),
        }
    return manifest


def store_index_type(manifest: dict[str, Any]) -> str:
    """The soft labels' index type of a store: recorded since uint16 indices; ``int32`` in older stores."""
    return (manifest.get("soft_labels") or {}).get("index_type", "int32")


def _check_or_write_manifest(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the manifest (once: concurrent ranks agree on one) or check the existing one; returns it."""
    old = create_once(out / "manifest.json", manifest)
    if old.get("config_hash") != manifest["config_hash"]:
        diffs = []
        old_cfg = old.get("config", {})
        for key in sorted(set(old_cfg) | set(manifest["config"])):
            if old_cfg.get(key) != manifest["config"].get(key):
                diffs.append(f"{key}: {old_cfg.get(key)!r} -> {manifest['config'].get(key)!r}")
        if not diffs and old.get("teacher", {}).get("fingerprint") != manifest["teacher"]["fingerprint"]:
            diffs.append("the teacher's files changed")
        raise ConfigMismatchError(
            f"{out} holds pseudo-labels made with a different configuration "
            f"({'; '.join(diffs) or 'format version'}). Resuming into it would mix incompatible outputs: "
            "rerun with the original options, or choose a new output_dir."
        )
    if old.get("items_hash") != manifest["items_hash"]:
        raise ConfigMismatchError(
            f"{out} was started on a different input listing ({old.get('num_items')} items then, "
            f"{manifest['num_items']} now, or the same count with other ids/paths/references). "
            "Restore the input or choose a new output_dir."
        )
    return old


def _list_items(config: PseudoLabelConfig) -> list[AudioItem]:
    return list_audio(
        config.input,
        path_column=config.path_column,
        text_column=config.text_column,
        id_column=config.id_column,
        audio_column=config.audio_column,
        split=config.split,
        config_name=config.dataset_config,
    )


def _shard_done(path: Path, config_hash: str, shard: int, items_hash: str) -> bool:
    meta = read_shard_metadata(path)
    return bool(
        meta
        and meta.get("config_hash") == config_hash
        and meta.get("shard") == shard
        and meta.get("items_hash") == items_hash
    )


class _Progress:
    def __init__(self, total_items: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_items, unit="file", desc="pseudo-label", disable=not enabled, dynamic_ncols=True)
        self.audio = 0.0
        self.t0 = time.perf_counter()

    def update(self, n_items: int, audio_seconds: float) -> None:
        self.audio += audio_seconds
        elapsed = time.perf_counter() - self.t0
        rtf = elapsed / self.audio if self.audio > 0 else float("nan")
        self.bar.set_postfix_str(
            f"audio {self.audio / 3600:.3f} h, RTF {rtf:.4f} ({1 / rtf if rtf > 0 else 0:.1f}x)", refresh=False
        )
        self.bar.update(n_items)

    def close(self):
        self.bar.close()


def pseudo_label(config: PseudoLabelConfig) -> dict[str, Any]:
    """Run (or resume) a pseudo-labelling job for this process's shards; see the module docstring.

    Returns a dict with ``output_dir``, ``num_shards``, ``shards_skipped`` (already finished and
    verified), ``shards_computed``, ``rows``, ``failures`` (this call) and ``summary`` (when the store
    is complete after this call, the dict written to ``summary.json``; else None).
    """
    return run_labelling_job(config, ShardRunner)


def run_labelling_job(config: PseudoLabelConfig, runner_cls: type[ShardRunner],
                      manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resumable job around a shard runner: this process's shards (``RANK`` / ``WORLD_SIZE``), finished
    and verified shards skipped, each computed shard written atomically with its statistics, and
    ``summary.json`` once every shard is done.

    ``runner_cls`` labels one shard (:class:`ShardRunner` or a subclass); ``manifest_extra`` is recorded
    in the manifest (and so in the check that a resumed job is the same job). A runner with a
    ``stats_name`` keeps counters in ``stats``: they are saved per shard under ``<stats_name>/``, summed
    into the summary, and returned under that name.
    """
    # Wrong paths and empty inputs end the job here, before the teacher is loaded or anything is written.
    out = check_output_dir(config.output_dir)
    check_speech_teacher(config.model)
    rank, world = rank_and_world(config.rank, config.world_size)
    items = _list_items(config)
    check_listing(items, config.input, supported_extensions())
    teacher = load_teacher(config)
    out.mkdir(parents=True, exist_ok=True)
    runner_cls.check_teacher(teacher)
    manifest = _manifest(config, items, teacher.describe())
    manifest.update(manifest_extra or {})
    index_type = store_index_type(_check_or_write_manifest(out, manifest))
    config_hash = manifest["config_hash"]
    n_shards = manifest["num_shards"]
    S = config.shard_size
    pending = []
    skipped = 0
    for i in range(rank, n_shards, world):
        shard_items = items[i * S : (i + 1) * S]
        path = out / SHARD_PATTERN.format(i)
        remove_partial_shard(out, i)  # a previous run died while writing this shard
        if path.exists() and _shard_done(path, config_hash, i, _items_hash(shard_items)):
            skipped += 1
            continue
        pending.append((i, shard_items))
    logger.info("rank %d/%d: %d items in %d shards; %d of mine already done, %d to label", rank, world, len(items),
                n_shards, skipped, len(pending))
    normalizer = load_normalizer(config.normalizer)
    progress = _Progress(sum(len(s) for _, s in pending), config.progress)
    runner = runner_cls(config, teacher, normalizer, on_batch=progress.update)
    stats_name = runner.stats_name
    schema = _schema(config, teacher.kind, index_type)
    for folder in ["stats"] + ([stats_name] if stats_name else []):
        (out / folder).mkdir(exist_ok=True)
    n_rows = n_fail = 0
    try:
        for i, shard_items in pending:
            t0 = time.perf_counter()
            before = dict(runner.stats)
            rows, failures, _ = runner.run(shard_items)
            table = _rows_to_table(rows, schema, config.top_k)
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "shard": i,
                "num_shards": n_shards,
                "config_hash": config_hash,
                "items_hash": _items_hash(shard_items),
                "num_items": len(shard_items),
                "num_rows": len(rows),
                "failures": [f.to_dict() for f in failures],
            }
            elapsed = time.perf_counter() - t0
            stats = {"shard": i, "audio_seconds": sum(r["duration"] for r in rows), "compute_seconds": elapsed}
            atomic_write_text(out / "stats" / f"shard-{i:05d}.json", json.dumps(stats, sort_keys=True) + "\n")
            if stats_name:
                counts = {k: runner.stats[k] - before.get(k, 0) for k in runner.stats}
                atomic_write_text(out / stats_name / f"shard-{i:05d}.json", json.dumps(counts, sort_keys=True) + "\n")
            write_shard(out / SHARD_PATTERN.format(i), table, meta, i, failpoint_env=FAILPOINT_ENV)
            n_rows += len(rows)
            n_fail += len(failures)
    finally:
        progress.close()
    summary = None
    if all(
        _shard_done(out / SHARD_PATTERN.format(i), config_hash, i, _items_hash(items[i * S : (i + 1) * S]))
        for i in range(n_shards)
    ):
        summary = finalize(out)
        if stats_name:
            totals: dict[str, int] = {}
            for i in range(n_shards):
                try:
                    shard_stats = json.loads((out / stats_name / f"shard-{i:05d}.json").read_text())
                except (OSError, ValueError):
                    continue
                for k, v in shard_stats.items():
                    totals[k] = totals.get(k, 0) + int(v)
            summary[stats_name] = totals
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    elif world > 1:
        logger.info("rank %d done; summary.json is written by the process that finishes the last shard", rank)
    result = {
        "output_dir": str(out),
        "num_shards": n_shards,
        "shards_skipped": skipped,
        "shards_computed": len(pending),
        "rows": n_rows,
        "failures": n_fail,
        "summary": summary,
    }
    if stats_name:
        result[stats_name] = dict(runner.stats)
    return result


def finalize(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every shard is present, then write ``summary.json`` and ``failures.jsonl``; returns the summary."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(output_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out} is not a pseudo-label store (no manifest.json); give the --output-dir of a "
                                "labelling job")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    n_shards = manifest["num_shards"]
    missing = [
        i
        for i in range(n_shards)
        if (read_shard_metadata(out / SHARD_PATTERN.format(i)) or {}).get("config_hash") != manifest["config_hash"]
    ]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {n_shards} shards are not finished yet (first: {missing[:5]}); "
            "rerun the job to complete them"
        )
    failures: list[AudioFailure] = []
    reasons: dict[str, int] = {}
    rows = kept = 0
    audio = audio_kept = 0.0
    filters = {c: {"applies": 0, "passed": 0} for c in FILTER_COLUMNS}
    positions = 0
    topk_bytes = 0
    compute = 0.0
    compute_complete = True
    for i in range(n_shards):
        path = out / SHARD_PATTERN.format(i)
        meta = read_shard_metadata(path)
        for f in meta["failures"]:
            failures.append(AudioFailure(**f))
            key = f["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        cols = ["duration", "keep", *FILTER_COLUMNS]
        pf = pq.ParquetFile(path)
        has_topk = "topk_tail" in pf.schema_arrow.names
        table = pf.read(columns=cols + (["topk_tail"] if has_topk else []))
        rows += table.num_rows
        if table.num_rows:
            keep = table["keep"]
            dur = table["duration"]
            kept += int(pc.sum(pc.cast(keep, "int64")).as_py() or 0)
            audio += float(pc.sum(dur).as_py() or 0.0)
            audio_kept += float(pc.sum(pc.filter(dur, keep)).as_py() or 0.0)
            for c in FILTER_COLUMNS:
                col = table[c]
                filters[c]["applies"] += table.num_rows - col.null_count
                filters[c]["passed"] += int(pc.sum(pc.cast(col, "int64")).as_py() or 0)
            if has_topk:
                positions += int(pc.sum(pc.list_value_length(table["topk_tail"])).as_py() or 0)
        if has_topk:
            md = pf.metadata
            for rg in range(md.num_row_groups):
                for ci in range(md.num_columns):
                    col = md.row_group(rg).column(ci)
                    if col.path_in_schema.startswith("topk_"):
                        topk_bytes += col.total_compressed_size
        stats_path = out / "stats" / f"shard-{i:05d}.json"
        try:
            compute += float(json.loads(stats_path.read_text())["compute_seconds"])
        except (OSError, ValueError, KeyError):
            compute_complete = False
    cfg = manifest["config"]
    thresholds = {
        "pass_wer": {"wer_below": cfg["wer_threshold"]},
        "pass_avg_logprob": {"avg_logprob_at_least": cfg["logprob_threshold"]},
        "pass_no_speech": {"no_speech_prob_at_most": cfg["no_speech_threshold"]},
        "pass_compression_ratio": {"compression_ratio_at_most": cfg["compression_ratio_threshold"]},
        "pass_mean_max_posterior": {"mean_max_posterior_at_least": cfg["min_mean_max_posterior"]},
    }
    summary: dict[str, Any] = {
        "teacher": manifest["teacher"]["type"],
        "items": manifest["num_items"],
        "rows": rows,
        "kept": kept,
        "failures": len(failures),
        "failure_reasons": dict(sorted(reasons.items())),
        "audio_hours": audio / 3600,
        "audio_hours_kept": audio_kept / 3600,
        "filters": {c.removeprefix("pass_"): {**filters[c], **thresholds[c]} for c in FILTER_COLUMNS},
        "compute_seconds": compute,
        "real_time_factor": compute / audio if audio > 0 else None,
        "speed_x_real_time": audio / compute if compute > 0 else None,
        "timing_complete": compute_complete,
        "num_shards": n_shards,
    }
    if manifest.get("soft_labels"):
        sl = manifest["soft_labels"]
        summary["soft_labels"] = {
            "k": sl["k"],
            "temperature": sl["temperature"],
            "positions": positions,
            "raw_bytes_per_position": sl["raw_bytes_per_position"],
            "stored_bytes_per_position": topk_bytes / positions if positions else None,
        }
    write_failures(out / "failures.jsonl", failures)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def load_pseudo_labels(output_dir: str | os.PathLike, keep_only: bool = False, **load_kwargs):
    """The store as a ``datasets.Dataset`` (rows in shard order, i.e. sorted by id). ``keep_only`` drops
    rows whose ``keep`` flag is false."""
    import datasets

    files = shard_files(output_dir)
    if not files:
        raise FileNotFoundError(f"no shard-*.parquet files in {output_dir}")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", **load_kwargs)
    if keep_only:
        ds = ds.filter(lambda k: k, input_columns=["keep"])
    return ds


# ==================================================================================================
# command line


def labelling_parser() -> argparse.ArgumentParser:
    """The flags of ``hf-distill pseudo-label`` (``pseudo-label-packed`` adds its packing flags)."""
    p = argparse.ArgumentParser(
        prog="hf-distill pseudo-label",
        description="Label audio with a Whisper or CTC teacher into resumable Parquet shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input", nargs="?", help="audio folder, manifest (.csv/.tsv/.jsonl), saved dataset folder or Hub dataset name"
    )
    p.add_argument("--model", help="teacher: a local folder (or Hub name) with the model and its processor")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    p.add_argument(
        "--teacher-type", "--teacher_type", dest="teacher_type", default="auto", choices=["auto", "whisper", "ctc"]
    )
    g = p.add_argument_group("input columns")
    g.add_argument("--path-column", "--path_column", dest="path_column", default="path")
    g.add_argument(
        "--text-column",
        "--text_column",
        dest="text_column",
        default=None,
        help="reference text column (default: text/sentence/transcript/... if present; '' for none)",
    )
    g.add_argument("--id-column", "--id_column", dest="id_column", default=None)
    g.add_argument("--audio-column", "--audio_column", dest="audio_column", default="audio")
    g.add_argument("--split", default=None)
    g.add_argument("--dataset-config", "--dataset_config", dest="dataset_config", default=None)
    g = p.add_argument_group("decoding")
    g.add_argument("--language", default=None)
    g.add_argument("--task", default=None, choices=["transcribe", "translate"])
    g.add_argument("--timestamps", "--return_timestamps", dest="return_timestamps", action="store_true")
    g.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1)
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None)
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    g.add_argument("--chunk-length-s", "--chunk_length_s", dest="chunk_length_s", type=float, default=None)
    g.add_argument("--chunk-overlap-s", "--chunk_overlap_s", dest="chunk_overlap_s", type=float, default=6.0)
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="store top-k soft labels")
    g.add_argument(
        "--soft-label-temperature", "--soft_label_temperature", dest="soft_label_temperature", type=float, default=1.0
    )
    g = p.add_argument_group("filters (recorded in the store, not applied)")
    g.add_argument("--wer-threshold", "--wer_threshold", dest="wer_threshold", type=float, default=0.1)
    g.add_argument("--logprob-threshold", "--logprob_threshold", dest="logprob_threshold", type=float, default=-1.0)
    g.add_argument(
        "--no-speech-threshold", "--no_speech_threshold", dest="no_speech_threshold", type=float, default=0.6
    )
    g.add_argument(
        "--compression-ratio-threshold",
        "--compression_ratio_threshold",
        dest="compression_ratio_threshold",
        type=float,
        default=2.4,
    )
    g.add_argument(
        "--min-mean-max-posterior", "--min_mean_max_posterior", dest="min_mean_max_posterior", type=float, default=0.5
    )
    g.add_argument("--normalizer", default="english", choices=["english", "basic", "none"])
    g = p.add_argument_group("execution")
    g.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=256)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--encoder-dtype", "--encoder_dtype", dest="encoder_dtype", default=None,
                   choices=["float32", "float16", "bfloat16"],
                   help="Whisper: run the encoder in this dtype (default: --dtype); bfloat16 speeds up CPUs with "
                        "bf16 arithmetic (AVX512-BF16, AMX)")
    g.add_argument("--rank", type=int, default=None, help="default: $RANK")
    g.add_argument(
        "--world-size", "--world_size", dest="world_size", type=int, default=None, help="default: $WORLD_SIZE"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument(
        "--finalize", action="store_true", help="only (re)write summary.json and failures.jsonl from finished shards"
    )
    return p


def run_cli_job(args: argparse.Namespace, config_cls: type[PseudoLabelConfig],
                job: Callable[[Any], dict[str, Any]]) -> dict[str, Any] | None:
    """What the labelling commands share: logging, ``--finalize``, the required arguments, the config from
    the flags and the job. Returns the job's result (None after ``--finalize``). Bad input raises
    ``ValueError`` / ``FileNotFoundError`` / :class:`~hf_distill.cli.CommandError` (``hf-distill`` prints one
    line, exit code 2), and so does a finished store that holds no row because every input file failed."""
    from hf_distill.cli import CommandError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.finalize:
        try:
            summary = finalize(args.output_dir)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        print(json.dumps(summary, indent=2, sort_keys=True))
        return None
    if not args.input or not args.model:
        raise CommandError("INPUT and --model are required (unless --finalize)")
    if not args.progress:  # --no-progress: no weight-loading bar either
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    fields = {f.name for f in dataclasses.fields(config_cls)}
    try:
        result = job(config_cls(**{k: v for k, v in vars(args).items() if k in fields}))
    except ConfigMismatchError as exc:
        raise CommandError(str(exc)) from None
    summary = result.get("summary")
    if summary is not None and summary["failures"] and not summary["rows"]:
        failures = Path(result["output_dir"]) / "failures.jsonl"
        first = read_failures(failures)[0]
        raise CommandError(
            f"every input file failed ({summary['failures']} of {summary['items']}); nothing was labelled. First: "
            f"{first.path}: {first.reason}; all reasons are in {failures}")
    return result


def cli_main(argv: list[str] | None = None) -> int:
    result = run_cli_job(labelling_parser().parse_args(argv), PseudoLabelConfig, pseudo_label)
    if result is None:
        return 0
    msg = (
        f"{result['shards_computed']} shards labelled, {result['shards_skipped']} already done; "
        f"{result['rows']} rows, {result['failures']} failures in this run"
    )
    if result["summary"] is not None:
        s = result["summary"]
        msg += (
            f"; store complete: {s['rows']} rows, {s['kept']} kept, {s['failures']} failures, "
            f"{s['audio_hours']:.3f} h of audio -> {Path(result['output_dir']) / 'summary.json'}"
        )
    print(msg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from hf_distill.cli import main

    raise SystemExit(main(["pseudo-label", *sys.argv[1:]]))
