"""Packed Whisper windows: several short clips in one 30-second window, and long recordings cut at pauses.

Whisper's encoder always reads a 30-second window (3,000 mel frames): a 2-second clip costs as much encoder
time as a 30-second one, and on a CPU the encoder dominates the cost of short clips. Packed, several clips go
into one window, one after the other with ``pack_gap_s`` of silence between them and ``pack_tail_s`` kept free
at the end (:func:`pack_units`, first-fit decreasing); every clip is peak-normalised inside the window, so a
quiet clip next to a loud one is not pushed under Whisper's 80 dB log-mel floor (:func:`assemble_window`). The
window is transcribed once with timestamps (:func:`parse_timestamped`) and each segment goes to the clip whose
speech it overlaps most (:func:`assign_segments`). The window is **rejected**, and each of its clips labelled
again alone in its own window, when the split is doubtful: a segment reaching more than ``pack_tolerance_s``
into another clip's speech (two clips merged), a clip with no text, or more than ``pack_max_uncovered_s`` of a
clip's voiced frames outside its segments (speech skipped). Recordings longer than a window are cut at pauses
into pieces that fit one (:func:`pause_cuts`; no overlapping chunks, nothing to stitch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hf_distill.speech.audio_stream import frame_energy

__all__ = ["PackedWindow", "Segment", "Unit", "assemble_window", "assign_segments", "pack_units", "parse_timestamped", "pause_cuts",
           "speech_extent", "split_at_pauses", "uncovered_seconds", "voiced_frames"]


@dataclass(frozen=True)
class Unit:
    """A clip, or a piece of a long recording: samples ``[start, end)`` of shard item ``item``."""

    item: int
    piece: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class Segment:
    """A timestamped segment of a window's transcript: times in seconds from the window's start
    (``end`` None when the transcript stopped before the closing timestamp)."""

    start: float
    end: float | None
    tokens: list[int]
    logprobs: list[float]


def split_at_pauses(
    audio: np.ndarray, sampling_rate: int, max_samples: int, search_samples: int, smooth_s: float = 0.3
) -> list[tuple[int, int]]:
    """Cut a recording into consecutive pieces of at most ``max_samples``, each cut at a pause.

    For each piece, the cut goes at the quietest stretch of ``smooth_s`` (mean RMS of 20 ms frames)
    within the last ``search_samples`` before the limit; the pieces tile the recording exactly.
    """
    frame = max(1, sampling_rate // 50)
    return pause_cuts(frame_energy(audio, frame), len(audio), sampling_rate, max_samples, search_samples, smooth_s)


def pause_cuts(energy: np.ndarray, n: int, sampling_rate: int, max_samples: int, search_samples: int,
               smooth_s: float = 0.3) -> list[tuple[int, int]]:
    """:func:`split_at_pauses` of an ``n``-sample recording from the RMS of its 20 ms frames (``energy``, as
    :func:`~hf_distill.speech.audio_stream.frame_energies` reads it from a file block by block)."""
    if max_samples < 1:
        raise ValueError("max_samples must be >= 1")
    if n <= max_samples:
        return [(0, n)]
    frame = max(1, sampling_rate // 50)
    width = max(1, int(round(smooth_s * sampling_rate / frame)))
    if len(energy) >= width:
        smooth = np.convolve(energy, np.ones(width) / width, mode="valid")  # smooth[i]: frames i .. i+width-1
    else:
        smooth = energy
    pieces, start = [], 0
    while n - start > max_samples:
        limit = start + max_samples
        lo = max(start + max(1, max_samples - search_samples), start + 1)
        # candidate cut points are centres of smoothing windows whose span lies inside [lo, limit]
        first = -(-lo // frame)
        last = limit // frame - width
        cut = None
        if last >= first and len(smooth):
            idx = np.arange(first, min(last, len(smooth) - 1) + 1)
            if len(idx):
                vals = smooth[idx]
                best = int(idx[len(idx) - 1 - int(np.argmin(vals[::-1]))])  # the latest of equals: longer pieces
                cut = best * frame + (width * frame) // 2
        if cut is None or not start < cut <= limit:
            cut = limit
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


def _loud_frames(audio: np.ndarray, sampling_rate: int, floor_db: float) -> tuple[int, np.ndarray]:
    """The 20 ms frame length and the indices of the frames louder than ``floor_db`` relative to the loudest
    (none when the audio is silent throughout)."""
    frame = max(1, sampling_rate // 50)
    energy = frame_energy(audio, frame)
    if len(energy) == 0 or energy.max() <= 0:
        return frame, np.zeros(0, dtype=np.int64)
    return frame, np.nonzero(energy >= energy.max() * 10 ** (floor_db / 20))[0]


def speech_extent(audio: np.ndarray, sampling_rate: int, floor_db: float = -40.0) -> tuple[int, int]:
    """``[first, last)`` samples of the 20 ms frames louder than ``floor_db`` relative to the loudest
    frame; the whole clip when it is silent throughout."""
    frame, loud = _loud_frames(audio, sampling_rate, floor_db)
    if not len(loud):
        return 0, len(audio)
    return int(loud[0] * frame), int(min(len(audio), (loud[-1] + 1) * frame))


def pack_units(lengths: Sequence[int], capacity: int, gap: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into windows of ``capacity`` samples, a
    ``gap`` between consecutive units (none after the last). Deterministic (ties by index); inside a
    window, units keep the order they were placed in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"unit {i} ({n} samples) is longer than the window ({capacity})")
        for b in range(len(bins)):
            if used[b] + gap + n <= capacity:
                bins[b].append(i)
                used[b] += gap + n
                break
        else:
            bins.append([i])
            used.append(n)
    return bins


def parse_timestamped(
    tokens: Sequence[int],
    logprobs: Sequence[float],
    *,
    timestamp_begin: int,
    eos_id: int,
    special_begin: int | None = None,
    time_precision: float = 0.02,
) -> list[Segment]:
    """Segments of a Whisper transcript decoded with timestamps (``tokens`` after the prompt).

    ``<|t0|> text <|t1|>`` is a segment; two timestamps in a row close one segment and open the next;
    text before any timestamp starts where the previous segment ended (or at 0). Special tokens other
    than timestamps (ids from ``special_begin``, default ``eos_id``) are skipped; decoding stops at
    end-of-text.
    """
    text_limit = special_begin if special_begin is not None else eos_id
    segments: list[Segment] = []
    start: float | None = None
    toks: list[int] = []
    lps: list[float] = []
    last_end = 0.0
    for tok, lp in zip(tokens, logprobs):
        tok = int(tok)
        if tok == eos_id:
            break
        if tok >= timestamp_begin:
            t = (tok - timestamp_begin) * time_precision
            if toks:
                segments.append(Segment(start if start is not None else last_end, t, toks, lps))
                last_end, start, toks, lps = t, None, [], []
            else:
                start = t
        elif tok < text_limit:
            toks.append(tok)
            lps.append(float(lp))
    if toks:
        segments.append(Segment(start if start is not None else last_end, None, toks, lps))
    return segments


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def voiced_frames(audio: np.ndarray, sampling_rate: int, floor_db: float = -35.0) -> np.ndarray:
    """Centre times (seconds) of the 20 ms frames louder than ``floor_db`` relative to the loudest."""
    frame, loud = _loud_frames(audio, sampling_rate, floor_db)
    return (loud + 0.5) * frame / sampling_rate


def uncovered_seconds(voiced: np.ndarray, segments: Sequence[Segment], content_end: float, margin: float,
                      frame_s: float = 0.02) -> float:
    """Seconds of voiced frames (centre times) that no segment, widened by ``margin``, covers."""
    if len(voiced) == 0:
        return 0.0
    covered = np.zeros(len(voiced), dtype=bool)
    for seg in segments:
        e = seg.end if seg.end is not None else max(content_end, seg.start)
        covered |= (voiced >= seg.start - margin) & (voiced <= e + margin)
    return float((~covered).sum() * frame_s)


def assign_segments(
    segments: Sequence[Segment],
    spans: Sequence[tuple[float, float]],
    tolerance: float,
    content_end: float,
    voiced: Sequence[np.ndarray] | None = None,
    max_uncovered: float = 1.0,
    margin: float = 0.5,
) -> tuple[list[list[Segment]] | None, str]:
    """Hand each segment to the clip whose speech span (seconds in the window) it overlaps most.

    Returns ``(one list of segments per span, "")``, or ``(None, reason)`` when the split is not
    trustworthy: a segment overlapping a second span by more than ``min(tolerance, half that span)``
    (two clips merged into one segment), a span that gets no text, or (with ``voiced``, the voiced
    frame times of each clip) more than ``max_uncovered`` seconds of a clip's voiced frames outside its
    segments widened by ``margin`` (speech the transcript skipped). A segment over silence only goes to
    the nearest span. An unterminated segment ends at ``content_end``.
    """
    out: list[list[Segment]] = [[] for _ in spans]
    if not spans:
        return (out, "") if not segments else (None, "segments but no clips")
    for seg in segments:
        s = seg.start
        e = seg.end if seg.end is not None else max(content_end, s)
        if e < s:
            return None, f"segment ends before it starts ({s:.2f} > {e:.2f})"
        overlaps = [_overlap(s, e, a, b) for a, b in spans]
        best = max(range(len(spans)), key=lambda j: (overlaps[j], -j))
        if overlaps[best] <= 0:
            mid = (s + e) / 2
            best = min(range(len(spans)), key=lambda j: (max(spans[j][0] - mid, mid - spans[j][1], 0.0), j))
        for j, o in enumerate(overlaps):
            if j != best and o > min(tolerance, 0.5 * (spans[j][1] - spans[j][0])):
                return None, f"segment {s:.2f}-{e:.2f} s spans clips {best} and {j}"
        out[best].append(seg)
    for j, segs in enumerate(out):
        if not any(seg.tokens for seg in segs):
            return None, f"clip {j} got no text"
        if voiced is not None:
            missed = uncovered_seconds(voiced[j], segs, content_end, margin)
            if missed > max_uncovered:
                return None, f"clip {j}: {missed:.2f} s of its speech is outside its segments"
    return out, ""


@dataclass
class PackedWindow:
    """A window's audio (``audio``) assembled from clips: each clip's ``offset`` (samples), speech span and voiced
    frame times (seconds in the window), and where the content ends (``content_end``, seconds)."""

    audio: np.ndarray | None
    offsets: list[int]
    spans: list[tuple[float, float]]
    voiced: list[np.ndarray]
    content_end: float


def assemble_window(clips: Sequence[np.ndarray], sampling_rate: int, gap: int) -> PackedWindow:
    """The clips one after the other, ``gap`` samples of silence between two, each peak-normalised to 0.5."""
    parts: list[np.ndarray] = []
    offsets, spans, voiced = [], [], []
    t = 0
    for audio in clips:
        peak = float(np.abs(audio).max()) if len(audio) else 0.0
        if peak > 1e-4:
            audio = audio * (0.5 / peak)
        if parts:
            parts.append(np.zeros(gap, dtype=np.float32))
            t += gap
        a, b = speech_extent(audio, sampling_rate)
        spans.append(((t + a) / sampling_rate, (t + b) / sampling_rate))
        voiced.append(voiced_frames(audio, sampling_rate) + t / sampling_rate)
        parts.append(audio.astype(np.float32, copy=False))
        offsets.append(t)
        t += len(audio)
    return PackedWindow(np.concatenate(parts), offsets, spans, voiced, t / sampling_rate)
