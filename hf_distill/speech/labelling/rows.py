"""One store row per recording, from the teacher's results for its parts, with its signals and filters.

A recording labelled unpacked has one :class:`~hf_distill.speech.labelling.teachers.SegmentResult` per window:
one window gives the row directly; overlapping chunks of a long Whisper recording are stitched
(:func:`~hf_distill.speech.labelling.text.merge_overlapping_texts`, then re-tokenised) and carry no soft labels;
a CTC recording's frames are concatenated. A recording labelled packed has one :class:`PiecePart` per piece
(a clip: one; a long recording: its pieces cut at pauses, whose text tokens are joined):

- a clip from a packed window has no ``no_speech_prob`` (the first decoding step sees the whole window), so its
  ``pass_no_speech`` is null;
- ``avg_logprob`` is the mean log-probability of the row's text tokens under the decoding rules;
- ``token_ids`` are the text tokens and end-of-text behind the no-timestamps prompt; with ``return_timestamps``
  a clip's carry its own timestamps (re-based to the clip's start) and ``segments`` holds them; a recording cut
  into pieces gets text tokens only, as a stitched row does; ``n_chunks`` counts the pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_distill.speech.audio import AudioItem
from hf_distill.speech.labelling.packing import Segment
from hf_distill.speech.labelling.teachers import SegmentResult, WhisperTeacher
from hf_distill.speech.labelling.text import (
    compression_ratio,
    merge_overlapping_texts,
    word_error_rate,
)

__all__ = ["FILTER_COLUMNS", "PiecePart", "RowBuilder"]

FILTER_COLUMNS = ("pass_wer", "pass_avg_logprob", "pass_no_speech", "pass_compression_ratio", "pass_mean_max_posterior")


@dataclass
class PiecePart:
    """What a packed run got for one clip or piece: text tokens (with re-based timestamp tokens when asked and
    available), their log-probabilities, segments (times from the piece's start), the prompt of its window."""

    tokens: list[int]
    logprobs: list[float]
    segments: list[dict]
    no_speech_prob: float | None
    packed: bool
    prompt: list[int]
    ended: bool = True  # the transcript ended with end-of-text (not cut by the token limit)

    @classmethod
    def alone(cls, teacher: WhisperTeacher, res, prompt: list[int]) -> PiecePart:
        """A piece decoded alone in its window (``res``: its ``DecodeResult``); end-of-text is added back once
        per row."""
        tok, lp = list(res.tokens), list(res.logprobs)
        ended = bool(tok) and tok[-1] == teacher.eos_id
        if ended:
            tok, lp = tok[:-1], lp[:-1]
        segments = teacher.timestamp_segments(tok) if teacher.config.return_timestamps else []
        return cls(tok, lp, segments, teacher.no_speech_prob(res.first_logits, prompt), False, list(prompt), ended)

    @classmethod
    def from_window(cls, teacher: WhisperTeacher, segs: list[Segment], offset_s: float, prompt: list[int]):
        """A clip's share of a packed window: its segments, times moved to the clip's start."""
        tokens: list[int] = []
        logprobs: list[float] = []
        segments = []
        for seg in segs:
            start = max(0.0, seg.start - offset_s)
            end = max(start, (seg.end if seg.end is not None else seg.start) - offset_s)
            segments.append({"start": round(start, 3), "end": round(end, 3), "text": teacher.text(seg.tokens),
                             "tokens": list(seg.tokens)})
            tokens.extend(seg.tokens)
            logprobs.extend(seg.logprobs)
        return cls(tokens, logprobs, segments, None, True, list(prompt))


class RowBuilder:
    def __init__(self, config, teacher, normalizer):
        self.config, self.teacher, self.normalizer = config, teacher, normalizer
        self.whisper = isinstance(teacher, WhisperTeacher)

    def row(self, item: AudioItem, duration: float, n_samples: int, parts: list[SegmentResult]) -> dict[str, Any]:
        teacher, cfg = self.teacher, self.config
        row: dict[str, Any] = {"id": item.id, "path": item.path, "duration": float(duration),
                               "reference": item.reference, "n_chunks": len(parts), "avg_logprob": None,
                               "no_speech_prob": None, "mean_max_posterior": None, "prompt_ids": None, "soft": None}
        if self.whisper:
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
                self._stitch(row, n_samples, parts)
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

    def _stitch(self, row: dict[str, Any], n_samples: int, parts: list[SegmentResult]) -> None:
        """The text and tokens of a long recording from its overlapping chunks (segments: each chunk's own)."""
        teacher = self.teacher
        sr = teacher.sampling_rate
        windows = teacher.plan(n_samples)
        texts = [teacher.text(p.token_ids) for p in parts]
        limits = [int(math.ceil(max(0, w0.end - w1.start) / sr * 6)) + 4 for w0, w1 in zip(windows, windows[1:])]
        row["text"] = merge_overlapping_texts(texts, limits)
        row["token_ids"] = teacher.encode(row["text"]) + [teacher.eos_id]
        if self.config.return_timestamps:
            segs = []
            for p, w in zip(parts, windows):
                t0, lo, hi = w.start / sr, w.keep_start / sr, w.keep_end / sr
                segs += [{"start": round(t0 + s["start"], 3), "end": round(t0 + s["end"], 3), "text": s["text"]}
                         for s in p.segments or [] if lo <= t0 + s["start"] < hi]
            row["segments"] = segs

    def packed_row(self, item: AudioItem, duration: float, n_samples: int, parts: list[PiecePart],
                   offsets: list[int]) -> dict[str, Any]:
        """The row of a recording labelled packed: its clip, or its pieces (cut at pauses) joined."""
        t, cfg = self.teacher, self.config
        tokens: list[int] = []
        logprobs: list[float] = []
        segments: list[dict] = []
        for part, offset in zip(parts, offsets):
            pairs = [(x, lp) for x, lp in zip(part.tokens, part.logprobs) if x != t.eos_id and x < t.special_begin]
            tokens.extend(x for x, _ in pairs)
            logprobs.extend(lp for _, lp in pairs)
            segments += [{"start": round(s["start"] + offset / t.sampling_rate, 3),
                          "end": round(s["end"] + offset / t.sampling_rate, 3), "text": s["text"],
                          "tokens": s.get("tokens")} for s in part.segments]
        if cfg.return_timestamps and len(parts) == 1:
            if parts[0].packed:  # the clip's own timestamps, re-based to its start
                tokens = []
                for s in segments:
                    tokens += [self._timestamp_token(s["start"]), *s["tokens"], self._timestamp_token(s["end"])]
            else:
                tokens = list(parts[0].tokens)
        prompt = [x for x in parts[0].prompt if x != t.no_timestamps_id]
        ns = [p.no_speech_prob for p in parts if p.no_speech_prob is not None]
        result = SegmentResult(
            token_ids=np.asarray(tokens + ([t.eos_id] if parts[-1].ended else []), dtype=np.int32),
            prompt_ids=np.asarray(prompt if cfg.return_timestamps else prompt + [t.no_timestamps_id], dtype=np.int32),
            logprobs=np.asarray(logprobs, dtype=np.float64),
            no_speech_prob=float(min(ns)) if ns and len(ns) == len(parts) else None,
            segments=[{k: v for k, v in s.items() if k != "tokens"} for s in segments],
        )
        row = self.row(item, duration, n_samples, [result])
        row["n_chunks"] = len(parts)
        return row

    def _timestamp_token(self, seconds: float) -> int:
        return self.teacher.timestamp_begin + int(round(max(0.0, seconds) / self.teacher.time_precision))

    def _filters(self, row: dict[str, Any]) -> None:
        cfg, whisper = self.config, self.whisper
        row["wer"] = row["pass_wer"] = None
        if row["reference"] is not None:
            row["wer"] = word_error_rate(row["reference"], row["text"], self.normalizer)
            row["pass_wer"] = bool(row["wer"] < cfg.wer_threshold)

        def check(applies: bool, passed) -> bool | None:
            return bool(passed()) if applies else None

        row["pass_avg_logprob"] = check(whisper and row["avg_logprob"] is not None,
                                        lambda: row["avg_logprob"] >= cfg.logprob_threshold)
        row["pass_no_speech"] = check(whisper and row["no_speech_prob"] is not None,
                                      lambda: row["no_speech_prob"] <= cfg.no_speech_threshold)
        row["pass_compression_ratio"] = check(whisper, lambda: row["compression_ratio"] <= cfg.compression_ratio_threshold)
        row["pass_mean_max_posterior"] = check(not whisper and row["mean_max_posterior"] is not None,
                                               lambda: row["mean_max_posterior"] >= cfg.min_mean_max_posterior)
        if row["pass_wer"] is not None:
            row["keep"] = row["pass_wer"]
        else:
            row["keep"] = all(row[c] for c in FILTER_COLUMNS[1:] if row[c] is not None)
