"""Faster Whisper pseudo-labelling: several short clips share one 30-second window.

Whisper's encoder always reads a 30-second window (3,000 mel frames): a 2-second clip costs as much
encoder time as a 30-second one, and on a CPU the encoder dominates the cost of short clips. Here
the clips are **packed**: several clips go into one window, one after the other with
``pack_gap_s`` of silence between them and ``pack_tail_s`` of silence kept free at the end; the
window is transcribed once with timestamps; and the timestamped segments are handed back to the
clip whose audio they cover. Clips up to ``pack_max_unit_s`` are packed; longer ones get a window of
their own and are transcribed directly, without timestamps. Recordings longer than a window are cut at
pauses into pieces that fit one (no overlapping chunks, nothing to stitch), each transcribed directly,
in order: such a recording is read from start to end in blocks, never whole, so memory does not grow
with its length (:mod:`hf_distill.speech.audio_stream`).

Robustness (a packed window is only trusted when its split is unambiguous):

- every clip is peak-normalised inside the window, so a quiet clip next to a loud one is not pushed
  under Whisper's 80 dB log-mel floor;
- a segment is given to the clip whose speech (the clip's extent above -40 dB of its peak) it
  overlaps most; if it also overlaps another clip's speech by more than ``pack_tolerance_s`` (or
  half of that clip), the model merged two clips into one segment and the window is **rejected**;
- a window is rejected too when any of its clips receives no text, or when more than
  ``pack_max_uncovered_s`` of a clip's voiced frames lie outside its segments (speech skipped);
- every clip of a rejected window is labelled again alone in its own window, as
  :func:`~hf_distill.speech.pseudo_label.pseudo_label` would. The counts (windows, packed windows,
  rejected windows, clips labelled packed or alone) are in ``summary.json`` (``packing``).

Decoding is greedy, by :class:`~hf_distill.speech.greedy_decoding.GreedyWhisperDecoder`: the tokens
``model.generate`` gives (same prompt, same suppression and timestamp rules), with each token's
log-probability and the no-speech probability taken in the same pass. All windows of a shard, packed ones
(with timestamps) and units alone in their window (as asked), go through one pool of ``batch_size``
decoder rows: a row that finishes is replaced at once by the next window (continuous batching), so the
batch does not shrink to a few rows at the end of every group of windows; the units of a rejected window
join the same pool as soon as the rejection is known. ``encoder_dtype="bfloat16"`` runs the encoder in
bfloat16 (before the float32 decoder) where the hardware has bf16 arithmetic.

Output: the same resumable store as :func:`~hf_distill.speech.pseudo_label.pseudo_label` (manifest,
Parquet shards with atomic renames, ``summary.json``), loadable with
:func:`~hf_distill.speech.pseudo_label.load_pseudo_labels`, and the same row columns, except:

- a packed clip has no ``no_speech_prob`` (the first decoding step sees the whole window), so its
  ``pass_no_speech`` is null;
- ``avg_logprob`` is the mean log-probability of the row's text tokens under the decoding rules
  (suppressed tokens and timestamp rules applied, as Whisper's own ``avg_logprob``), not of a second,
  teacher-forced pass;
- ``token_ids`` of a packed clip are its text tokens and end-of-text behind the no-timestamps prompt;
  with ``return_timestamps`` they carry the clip's own timestamps (re-based to the clip's start)
  and ``segments`` holds them; a recording cut into several pieces gets text tokens only, as a
  stitched long-form row does;
- ``n_chunks`` counts the pieces a long recording was cut into;
- top-k soft labels are not available (a clip's teacher distribution alone in its window is not
  what a packed window gives): use :func:`~hf_distill.speech.pseudo_label.pseudo_label` for those.

The packing settings (``pack_*``, ``max_piece_s``, ``pause_search_s``) extend
:class:`~hf_distill.speech.pseudo_label.PseudoLabelConfig` and are part of the store's configuration
hash. Command line: :func:`cli_main` (every ``hf-distill pseudo-label`` flag plus the packing ones).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_distill.speech.greedy_decoding import DecodeRequest, GreedyWhisperDecoder
from hf_distill.speech.audio import AudioError, AudioFailure, AudioItem, decode_with_rate
from hf_distill.speech.audio_stream import WindowReader, frame_energies, frame_energy
from hf_distill.speech.pseudo_label import (
    PseudoLabelConfig,
    WhisperTeacher,
    SegmentResult,
    ShardRunner,
    prefetch,
    run_labelling_job,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PackedLabelConfig",
    "Segment",
    "Unit",
    "assign_segments",
    "pack_units",
    "packed_pseudo_label",
    "pause_cuts",
    "parse_timestamped",
    "speech_extent",
    "split_at_pauses",
    "uncovered_seconds",
    "voiced_frames",
]

PACKING_STATS_DIR = "packing"


@dataclass
class PackedLabelConfig(PseudoLabelConfig):
    """:class:`PseudoLabelConfig` plus the packing settings (all part of the configuration hash)."""

    pack_gap_s: float = 1.0  # silence between two clips of a window
    pack_tail_s: float = 2.0  # silence kept free at the end of a packed window
    pack_max_unit_s: float = 12.0  # longer clips (and pieces) get a window of their own
    pack_tolerance_s: float = 0.3  # how far a segment may reach into another clip's speech
    pack_max_uncovered_s: float = 1.0  # voiced seconds of a clip its segments may leave uncovered
    max_piece_s: float | None = None  # long recordings are cut into pieces of at most this (default: window - 1 s)
    pause_search_s: float = 10.0  # a cut goes at the quietest point of the last this-many seconds of a piece

    def __post_init__(self):
        super().__post_init__()
        if self.pack_gap_s < 0 or self.pack_tolerance_s < 0 or self.pack_tail_s < 0:
            raise ValueError("pack_gap_s, pack_tail_s and pack_tolerance_s must be >= 0")
        if self.max_piece_s is not None and self.max_piece_s <= 1.0:
            raise ValueError("max_piece_s must be > 1 second")
        if self.pause_search_s <= 0:
            raise ValueError("pause_search_s must be > 0")
        if self.top_k:
            raise ValueError(
                "packed labelling gives no per-clip soft labels (a clip's distribution alone in its window is not "
                "what the packed window gives); use pseudo_label for top_k"
            )
        if self.num_beams != 1:
            raise ValueError("packed labelling decodes greedily (num_beams=1)")
        if self.teacher_type == "ctc":
            raise ValueError(
                "packing is for Whisper teachers (a CTC teacher reads audio of any length: use pseudo_label)")


# ==================================================================================================
# pure functions: cutting, packing, parsing, assigning


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


def speech_extent(audio: np.ndarray, sampling_rate: int, floor_db: float = -40.0) -> tuple[int, int]:
    """``[first, last)`` samples of the 20 ms frames louder than ``floor_db`` relative to the loudest
    frame; the whole clip when it is silent throughout."""
    frame = max(1, sampling_rate // 50)
    energy = frame_energy(audio, frame)
    if len(energy) == 0 or energy.max() <= 0:
        return 0, len(audio)
    loud = np.nonzero(energy >= energy.max() * 10 ** (floor_db / 20))[0]
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
    frame = max(1, sampling_rate // 50)
    energy = frame_energy(audio, frame)
    if len(energy) == 0 or energy.max() <= 0:
        return np.zeros(0)
    loud = np.nonzero(energy >= energy.max() * 10 ** (floor_db / 20))[0]
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


# ==================================================================================================
# decoding


class _AudioCache:
    """Decoded short items (at the teacher's rate), least recently used dropped past ``budget`` samples.
    The audio thread and the decoding loop (units of rejected windows) both read it: one lock guards it."""

    def __init__(self, items: list[AudioItem], lengths: dict[int, int], sampling_rate: int, budget: int):
        self.items, self.lengths, self.rate, self.budget = items, lengths, sampling_rate, budget
        self.data: OrderedDict[int, np.ndarray] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, pos: int) -> np.ndarray:
        with self.lock:
            return self._get(pos)

    def _get(self, pos: int) -> np.ndarray:
        audio = self.data.get(pos)
        if audio is not None:
            self.data.move_to_end(pos)
            return audio
        audio, _ = decode_with_rate(self.items[pos], self.rate)
        want = self.lengths[pos]  # planned from the header; decoders may differ by a few samples
        audio = audio[:want] if len(audio) >= want else np.pad(audio, (0, want - len(audio)))
        self.data[pos] = audio
        self.size += len(audio)
        while self.size > self.budget and len(self.data) > 1:
            _, old = self.data.popitem(last=False)
            self.size -= len(old)
        return audio


@dataclass
class _UnitResult:
    tokens: list[int]  # text tokens (with re-based timestamp tokens when asked and available)
    logprobs: list[float]
    segments: list[dict]  # times relative to the unit's start
    no_speech_prob: float | None
    packed: bool
    ended: bool = True  # the transcript ended with end-of-text (not cut by the token limit)


class _PackedShardRunner(ShardRunner):
    """Labels one shard with packed windows; a pure function of (config, teacher, items)."""

    stats_name = PACKING_STATS_DIR

    @classmethod
    def check_teacher(cls, teacher) -> None:
        if not isinstance(teacher, WhisperTeacher):
            raise ValueError("packed labelling is for Whisper teachers; use pseudo_label for CTC teachers")

    cache_budget_s = 1800.0

    def __init__(self, config: PackedLabelConfig, teacher: WhisperTeacher, normalizer, on_batch=None):
        super().__init__(config, teacher, normalizer, on_batch=on_batch)
        if not isinstance(teacher, WhisperTeacher):
            raise ValueError("packed labelling needs a Whisper teacher")
        t = teacher
        self.sr = t.sampling_rate
        self.gap = int(round(config.pack_gap_s * self.sr))
        self.capacity = t.window - int(round(config.pack_tail_s * self.sr))
        self.max_unit = min(self.capacity, int(round(config.pack_max_unit_s * self.sr)))
        if self.capacity <= self.gap:
            raise ValueError("pack_tail_s leaves no room in the window")
        max_piece_s = config.max_piece_s if config.max_piece_s is not None else t.window / self.sr - 1.0
        self.max_piece = min(t.window, int(round(max_piece_s * self.sr)))
        self.search = int(round(config.pause_search_s * self.sr))
        self.timestamp_begin = int(t.no_timestamps_id) + 1 if t.no_timestamps_id is not None else None
        if self.timestamp_begin is None:
            raise ValueError("the teacher's generation config has no no_timestamps_token_id: it cannot give timestamps")
        # Whisper's special tokens start at start-of-transcript (end-of-text, just before it in the real
        # vocabularies, is special too); everything below is text.
        self.special_begin = int(t.sot_id)
        positions = int(getattr(t.model.config, "max_source_positions", 1500))
        window_s = float(getattr(t.feature_extractor, "n_samples", 30 * self.sr)) / self.sr
        self.time_precision = window_s / positions
        self.gen_kwargs: dict[str, Any] = {"return_timestamps": True, "force_unique_generate_call": True}
        for key in ("language", "task", "max_new_tokens"):
            if key in t.gen_kwargs:
                self.gen_kwargs[key] = t.gen_kwargs[key]
        max_new = config.max_new_tokens
        self.decoder = GreedyWhisperDecoder(t.model, max_new_tokens=max_new)  # timestamps: per request
        self.stats = {"windows": 0, "packed_windows": 0, "rejected_windows": 0, "units": 0, "packed_units": 0,
                      "relabelled_units": 0, "direct_units": 0}

    # ---------------------------------------------------------------------------------------------

    def run(self, items: list[AudioItem]):
        import torch

        teacher = self.teacher
        failures, durations, lengths = self._probe(items)
        cache = _AudioCache(items, lengths, self.sr, int(self.cache_budget_s * self.sr))

        def failure(pos: int, exc: Exception) -> AudioFailure:
            reason = exc.reason if isinstance(exc, AudioError) else f"decode error: {type(exc).__name__}: {exc}"
            return AudioFailure(items[pos].id, items[pos].path, reason)

        # ---- plan: cut long recordings at pauses (from the energy of their frames, read in blocks: a long
        # recording is never in memory whole), pack the units of short ones into windows
        frame = max(1, self.sr // 50)
        units: list[Unit] = []
        long_items: dict[int, int] = {}  # position -> number of pieces
        for pos in sorted(lengths):
            n = lengths[pos]
            if n <= self.max_piece:
                units.append(Unit(pos, 0, 0, n))
                continue
            try:
                energy = frame_energies(items[pos], self.sr, n, frame)
            except Exception as exc:
                failures[pos] = failure(pos, exc)
                continue
            pieces = pause_cuts(energy, n, self.sr, self.max_piece, self.search)
            long_items[pos] = len(pieces)
            units.extend(Unit(pos, k, a, b) for k, (a, b) in enumerate(pieces))
        # Units longer than pack_max_unit_s get a window of their own (labelled directly): they would leave
        # little room, and long multi-sentence clips are where timestamps drift across clip boundaries. The
        # pieces of a long recording get one each too, in order, so that the recording is read once from
        # start to end, a window at a time.
        clips = [u for u in units if u.item not in long_items]
        small = [u for u in clips if u.length <= self.max_unit]
        windows = [[small[i] for i in w] for w in pack_units([u.length for u in small], self.capacity, self.gap)]
        windows += [[u] for u in clips if u.length > self.max_unit]
        packed = [w for w in windows if len(w) > 1]
        singles = [w[0] for w in windows if len(w) == 1]
        pieces_alone = [u for u in units if u.item in long_items]
        windows += [[u] for u in pieces_alone]
        self.stats["windows"] += len(windows)
        self.stats["packed_windows"] += len(packed)
        self.stats["units"] += len(units)
        remaining = {pos: 0 for pos in lengths}
        for u in units:
            remaining[u.item] += 1
        planned = {u.item for u in units}
        results: dict[tuple[int, int], _UnitResult] = {}

        def done(finished_units: list[Unit]) -> None:
            finished = []
            for u in finished_units:
                remaining[u.item] -= 1
                if remaining[u.item] == 0:
                    finished.append(u.item)
            report(finished)

        def report(finished: list[int]) -> None:
            if self.on_batch is not None and finished:
                ok = [p for p in finished if p not in failures]
                self.on_batch(len(finished), sum(durations[p] for p in ok))

        report([p for p in lengths if p not in planned])  # failed while being cut at pauses

        # Long recordings' readers: only the audio thread builds their pieces (rejected windows hold clips only).
        readers: dict[int, WindowReader] = {}

        def unit_audio(u: Unit, known: dict[int, AudioFailure], found: dict[int, AudioFailure]) -> np.ndarray | None:
            """The samples of ``u``, or None when its item failed: ``known`` holds the failures the calling
            thread knows of, ``found`` gets the new ones."""
            if u.item in known or u.item in found:
                return None
            try:
                if u.item not in long_items:
                    return cache.get(u.item)[u.start : u.end]
                reader = readers.get(u.item)
                if reader is None:
                    reader = readers[u.item] = WindowReader(items[u.item], self.sr, lengths[u.item])
                audio = reader.read(u.start, u.end)
                if u.piece == long_items[u.item] - 1:
                    readers.pop(u.item).close()
                return audio
            except Exception as exc:
                found[u.item] = failure(u.item, exc)
                reader = readers.pop(u.item, None)
                if reader is not None:
                    reader.close()
                return None

        # ---- decoding: the packed windows (with timestamps), then the units alone in their windows (long
        # clips, the pieces of long recordings in order, and the units of rejected windows as rejections come
        # in), all through one pool of decoder rows that new windows join as soon as rows finish
        # (GreedyWhisperDecoder.stream)
        ts_direct = bool(self.config.return_timestamps)
        jobs = [("packed", w) for w in packed]
        jobs += [("direct", u) for u in sorted(singles, key=lambda u: (-u.length, u.item, u.piece))]
        jobs += [("direct", u) for u in pieces_alone]
        rejected: deque[Unit] = deque()

        def build(job, known: dict[int, AudioFailure], found: dict[int, AudioFailure]):
            kind, payload = job
            if kind == "direct":
                audio = unit_audio(payload, known, found)
                return None if audio is None else (payload, teacher.prepare([audio]))
            parts, spans, voiced, kept, t = [], [], [], [], 0
            for u in payload:
                audio = unit_audio(u, known, found)
                if audio is None:
                    continue
                peak = float(np.abs(audio).max()) if len(audio) else 0.0
                if peak > 1e-4:
                    audio = audio * (0.5 / peak)
                if parts:
                    parts.append(np.zeros(self.gap, dtype=np.float32))
                    t += self.gap
                a, b = speech_extent(audio, self.sr)
                spans.append(((t + a) / self.sr, (t + b) / self.sr))
                voiced.append(voiced_frames(audio, self.sr) + t / self.sr)
                parts.append(audio.astype(np.float32, copy=False))
                kept.append((u, t))
                t += len(audio)
            if not parts:
                return None
            return (kept, spans, voiced, t / self.sr), teacher.prepare([np.concatenate(parts)])

        # The audio thread keeps its own record of failed items and hands the new ones over with each job:
        # ``failures`` is this thread's alone.
        thread_failed = dict(failures)

        def build_in_thread(job):
            found: dict[int, AudioFailure] = {}
            got = build(job, thread_failed, found)
            thread_failed.update(found)
            return got, found

        bs = self.config.batch_size
        built_jobs = prefetch(jobs, build_in_thread, depth=bs)

        def take(k: int) -> list[DecodeRequest]:
            ready = []  # (kind, meta, features)
            while len(ready) < k:
                if rejected:
                    u = rejected.popleft()
                    found: dict[int, AudioFailure] = {}
                    got = build(("direct", u), failures, found)
                    failures.update(found)
                    kind = "direct"
                else:
                    nxt = next(built_jobs, None)
                    if nxt is None:
                        break
                    (kind, payload), (got, found) = nxt
                    failures.update(found)
                    if got is None:  # nothing of it decoded: its units failed (reported below)
                        done(payload if kind == "packed" else [payload])
                        continue
                if got is not None:
                    ready.append((kind, *got))
            if not ready:
                return []
            with torch.inference_mode():
                hidden = self._encode(torch.cat([f for _, _, f in ready]))
            requests = []
            for kind in ("packed", "direct"):
                rows = [i for i, r in enumerate(ready) if r[0] == kind]
                if not rows:
                    continue
                ts = True if kind == "packed" else ts_direct
                prompts = teacher.prompts(hidden[rows], ts)
                if kind == "packed":
                    self._packed_prompt = [int(x) for x in prompts[0]]
                for i, prompt in zip(rows, prompts):
                    if kind == "direct":
                        self._direct_prompt = [int(x) for x in prompt]
                    requests.append(DecodeRequest((kind, ready[i][1], list(prompt)), hidden[i], prompt, ts))
            return requests

        try:
            with torch.inference_mode():
                for res in self.decoder.stream(take, capacity=bs):
                    kind, meta, prompt = res.key
                    if kind == "direct":
                        results[(meta.item, meta.piece)] = self._direct_result(res, prompt)
                        done([meta])
                        continue
                    kept, spans, voiced, content_end = meta
                    segs = parse_timestamped(res.tokens, res.logprobs, timestamp_begin=self.timestamp_begin,
                                             eos_id=teacher.eos_id, special_begin=self.special_begin,
                                             time_precision=self.time_precision)
                    split, reason = assign_segments(segs, spans, self.config.pack_tolerance_s, content_end, voiced,
                                                    self.config.pack_max_uncovered_s, self.config.pack_tolerance_s)
                    if split is None:
                        logger.debug("packed window of %d clips rejected: %s", len(kept), reason)
                        self.stats["rejected_windows"] += 1
                        self.stats["relabelled_units"] += len(kept)
                        self.stats["direct_units"] += len(kept)
                        rejected.extend(u for u, _ in kept)
                        continue
                    for (u, offset), unit_segs in zip(kept, split):
                        results[(u.item, u.piece)] = self._unit_result(unit_segs, offset / self.sr)
                        self.stats["packed_units"] += 1
                    done([u for u, _ in kept])
        finally:
            built_jobs.close()  # stops the audio thread
            for reader in readers.values():
                reader.close()
        self.stats["direct_units"] += len(singles) + len(pieces_alone)
        report([p for p in failures if remaining.get(p, 0) > 0])
        for p in failures:
            remaining[p] = 0
        report([p for p, left in remaining.items() if left > 0])  # failed while decoding

        # ---- rows
        rows = []
        n_pieces: dict[int, int] = {}
        for u in units:
            n_pieces[u.item] = max(n_pieces.get(u.item, 0), u.piece + 1)
        for pos, item in enumerate(items):
            if pos in failures:
                continue
            parts = [results[(pos, k)] for k in range(n_pieces[pos])]
            offsets = [u.start for u in units if u.item == pos]
            rows.append(self._packed_row(item, durations[pos], lengths[pos], parts, offsets))
        audio_done = sum(durations[p] for p in lengths if p not in failures)
        return rows, [failures[p] for p in sorted(failures)], audio_done

    # ---------------------------------------------------------------------------------------------

    def _encode(self, features):
        return self.teacher.encode_audio(features).last_hidden_state

    def _direct_result(self, res, prompt: list[int]) -> _UnitResult:
        """A unit decoded alone in its window (``res``: its :class:`DecodeResult`)."""
        t = self.teacher
        tok, lp = list(res.tokens), list(res.logprobs)
        ended = bool(tok) and tok[-1] == t.eos_id
        if ended:  # end-of-text is added back once per row
            tok, lp = tok[:-1], lp[:-1]
        segments = [dict(x) for x in t._segments(tok)] if self.config.return_timestamps else []
        return _UnitResult(tok, lp, segments, t.no_speech_prob(res.first_logits, prompt), packed=False, ended=ended)

    def _unit_result(self, segs: list[Segment], offset_s: float) -> _UnitResult:
        tokens: list[int] = []
        logprobs: list[float] = []
        segments = []
        for seg in segs:
            start = max(0.0, seg.start - offset_s)
            end = max(start, (seg.end if seg.end is not None else seg.start) - offset_s)
            segments.append({"start": round(start, 3), "end": round(end, 3),
                             "text": self.teacher.text(seg.tokens), "tokens": list(seg.tokens)})
            tokens.extend(seg.tokens)
            logprobs.extend(seg.logprobs)
        return _UnitResult(tokens, logprobs, segments, None, packed=True)

    def _prompt(self) -> list[int]:
        """The decoder prompt of every row: start-of-transcript, language and task when set, and
        no-timestamps unless timestamps were asked for."""
        t = self.teacher
        base = getattr(self, "_packed_prompt", None) or getattr(self, "_direct_prompt", None) or [t.sot_id]
        core = [x for x in base if x != t.no_timestamps_id]
        return core if self.config.return_timestamps else core + [t.no_timestamps_id]

    def _is_text(self, token: int) -> bool:
        return token != self.teacher.eos_id and token < self.special_begin

    def _timestamp_token(self, seconds: float) -> int:
        return self.timestamp_begin + int(round(max(0.0, seconds) / self.time_precision))

    def _packed_row(self, item: AudioItem, duration: float, n_samples: int, parts: list[_UnitResult],
                    offsets: list[int]) -> dict[str, Any]:
        t, cfg = self.teacher, self.config
        tokens: list[int] = []
        logprobs: list[float] = []
        segments: list[dict] = []
        for part, offset in zip(parts, offsets):
            pairs = [(x, lp) for x, lp in zip(part.tokens, part.logprobs) if self._is_text(x)]
            tokens.extend(x for x, _ in pairs)
            logprobs.extend(lp for _, lp in pairs)
            for s in part.segments:
                segments.append({"start": round(s["start"] + offset / self.sr, 3),
                                 "end": round(s["end"] + offset / self.sr, 3), "text": s["text"],
                                 "tokens": s.get("tokens")})
        if cfg.return_timestamps and len(parts) == 1:
            if parts[0].packed:  # the clip's own timestamps, re-based to its start
                tokens = []
                for s in segments:
                    tokens += [self._timestamp_token(s["start"]), *s["tokens"], self._timestamp_token(s["end"])]
            else:
                tokens = [x for x in parts[0].tokens]
        ns = [p.no_speech_prob for p in parts if p.no_speech_prob is not None]
        result = SegmentResult(
            token_ids=np.asarray(tokens + ([t.eos_id] if parts[-1].ended else []), dtype=np.int32),
            prompt_ids=np.asarray(self._prompt(), dtype=np.int32),
            logprobs=np.asarray(logprobs, dtype=np.float64),
            no_speech_prob=float(min(ns)) if ns and len(ns) == len(parts) else None,
            segments=[{k: v for k, v in s.items() if k != "tokens"} for s in segments],
        )
        row = self._row(item, duration, n_samples, [result])
        row["n_chunks"] = len(parts)
        return row


# ==================================================================================================
# the job


def packed_pseudo_label(config: PackedLabelConfig) -> dict[str, Any]:
    """Run (or resume) a packed labelling job for this process's shards.

    Same contract as :func:`~hf_distill.speech.pseudo_label.pseudo_label` (resumable, exact, shards
    split over ``RANK``/``WORLD_SIZE``); the result adds ``packing`` (windows, packed windows,
    rejected windows, units labelled packed / alone) for the shards computed in this call, and the
    summary (when complete) adds the same counts over every shard.
    """
    if not isinstance(config, PackedLabelConfig):
        raise TypeError("packed_pseudo_label needs a PackedLabelConfig")
    packing = {k: getattr(config, k) for k in ("pack_gap_s", "pack_tail_s", "pack_max_unit_s", "pack_tolerance_s",
                                               "pack_max_uncovered_s", "max_piece_s", "pause_search_s")}
    return run_labelling_job(config, _PackedShardRunner, manifest_extra={"packing": packing})


def config_from(base: PseudoLabelConfig, **packing) -> PackedLabelConfig:
    """A :class:`PackedLabelConfig` with the fields of ``base`` and the given packing settings."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(PseudoLabelConfig)}
    return PackedLabelConfig(**fields, **packing)


def cli_main(argv: list[str] | None = None) -> int:
    """``pseudo-label`` with packing: every flag of ``hf-distill pseudo-label`` plus the packing settings."""

    from hf_distill.speech.pseudo_label import labelling_parser, run_cli_job

    parser = labelling_parser()
    parser.prog = "hf-distill pseudo-label-packed"
    parser.description = "Label audio with a Whisper teacher, several short clips per 30-s window."
    g = parser.add_argument_group("packing")
    defaults = PackedLabelConfig.__dataclass_fields__
    for name in ("pack_gap_s", "pack_tail_s", "pack_max_unit_s", "pack_tolerance_s", "pack_max_uncovered_s",
                 "max_piece_s", "pause_search_s"):
        g.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, type=float,
                       default=defaults[name].default)
    result = run_cli_job(parser.parse_args(argv), PackedLabelConfig, packed_pseudo_label)
    if result is None:
        return 0
    print(json.dumps({k: result[k] for k in ("shards_computed", "shards_skipped", "rows", "failures", "packing")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    from hf_distill.cli import main

    raise SystemExit(main(["pseudo-label-packed", *sys.argv[1:]]))
