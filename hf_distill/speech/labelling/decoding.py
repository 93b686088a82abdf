"""Labelling one shard: probe the items, plan the windows, read them in the audio thread, decode, build the rows.

Whisper with greedy decoding runs on :class:`~hf_distill.speech.greedy_decoding.GreedyWhisperDecoder`: every
window of the shard, packed ones (with timestamps) and recordings alone in their window, goes through one pool of
``batch_size`` decoder rows; a finished row is replaced at once by the next window (continuous batching), and the
clips of a rejected packed window join the same pool as soon as the rejection is known. CTC teachers and beam
search label batches of ``batch_size`` windows. A shard's rows are a pure function of the configuration, the
teacher and the shard's items.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from hf_distill.speech.audio import (
    AudioError,
    AudioFailure,
    AudioItem,
    probe,
    resampled_length,
)
from hf_distill.speech.greedy_decoding import DecodeRequest
from hf_distill.speech.labelling.audio_thread import AudioThread, ShardAudio
from hf_distill.speech.labelling.packing import (
    Unit,
    assemble_window,
    assign_segments,
    parse_timestamped,
)
from hf_distill.speech.labelling.planning import Packer, ShardPlan, plan_unpacked
from hf_distill.speech.labelling.rows import PiecePart, RowBuilder
from hf_distill.speech.labelling.teachers import WhisperTeacher

logger = logging.getLogger(__name__)

__all__ = ["PACKING_STATS", "ShardLabeller", "probe_items"]

#: the folder of the packing counters of each shard, and their key in the summary
PACKING_STATS = "packing"
#: decoded clips kept for the clips of rejected windows (seconds of audio)
CACHE_SECONDS = 1800.0


def probe_items(items: list[AudioItem], teacher) -> tuple[dict[int, AudioFailure], dict[int, float], dict[int, int]]:
    """Read every item's header: ``(failures, durations, lengths at the teacher's rate)`` by position. Unreadable,
    empty and too-short items are failures."""
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
            failures[pos] = AudioFailure(item.id, item.path,
                                         f"too short for the teacher ({n} samples at {teacher.sampling_rate} Hz)")
            continue
        durations[pos], lengths[pos] = info.duration, n
    return failures, durations, lengths


class _Progress:
    """Items done (all their parts labelled, or failed), reported once each to ``on_batch(items, seconds)``."""

    def __init__(self, on_batch, durations: dict[int, float], parts: dict[int, int]):
        self.on_batch, self.durations, self.left = on_batch, durations, dict(parts)
        self.reported: set[int] = set()

    def report(self, positions, failed: bool = False) -> None:
        new = [p for p in positions if p not in self.reported]
        self.reported.update(new)
        if new and self.on_batch is not None:
            self.on_batch(len(new), 0.0 if failed else sum(self.durations[p] for p in new))

    def part_done(self, unit: Unit) -> None:
        self.left[unit.item] -= 1
        if self.left[unit.item] == 0:
            self.report([unit.item])


class ShardLabeller:
    """Labels the items of one shard, packed (``packed=True``, Whisper with greedy decoding) or not."""

    def __init__(self, config, teacher, normalizer, packed: bool = False, on_batch=None):
        self.config, self.teacher, self.on_batch = config, teacher, on_batch
        self.rows = RowBuilder(config, teacher, normalizer)
        self.packer = None
        self.stats: dict[str, int] = {}
        self.stats_name = None
        if packed:
            if not isinstance(teacher, WhisperTeacher) or teacher.greedy is None:
                raise ValueError("packed labelling is for Whisper teachers decoding greedily; drop --pack")
            if teacher.timestamp_begin is None:
                raise ValueError("the teacher's generation config has no no_timestamps_token_id: it cannot give "
                                 "timestamps, so it cannot label packed windows; drop --pack")
            self.packer = Packer(config, teacher)
            self.stats_name = PACKING_STATS
            self.stats = {"windows": 0, "packed_windows": 0, "rejected_windows": 0, "units": 0, "packed_units": 0,
                          "relabelled_units": 0, "direct_units": 0}

    def run(self, items: list[AudioItem]) -> tuple[list[dict], list[AudioFailure], float]:
        teacher = self.teacher
        failures, durations, lengths = probe_items(items, teacher)
        plan = self.packer.plan(items, lengths) if self.packer else plan_unpacked(teacher, lengths)
        failures.update(plan.failures)
        for key, n in plan.stats.items():
            self.stats[key] += n
        progress = _Progress(self.on_batch, durations, {pos: len(parts) for pos, parts in plan.parts.items()})
        progress.report(list(failures), failed=True)
        cache = int(CACHE_SECONDS * teacher.sampling_rate) if self.packer else 0
        audio = ShardAudio(items, lengths, {pos: len(p) for pos, p in plan.parts.items()}, teacher.sampling_rate,
                           cache)

        def absorb(found: dict[int, AudioFailure]) -> None:
            failures.update(found)
            progress.report(list(found), failed=True)

        results: dict[tuple[int, int], Any] = {}
        try:
            if isinstance(teacher, WhisperTeacher) and teacher.greedy is not None:
                self._decode_pool(plan, audio, results, absorb, progress)
            else:
                self._decode_batches(plan, audio, results, absorb, progress)
        finally:
            audio.close()
        rows = []
        for pos, item in enumerate(items):
            if pos in failures:
                continue
            parts = [results[(pos, k)] for k in range(len(plan.parts[pos]))]
            if self.packer:
                offsets = [c.start for c in plan.parts[pos]]
                rows.append(self.rows.packed_row(item, durations[pos], lengths[pos], parts, offsets))
            else:
                rows.append(self.rows.row(item, durations[pos], lengths[pos], parts))
        audio_done = sum(durations[p] for p in lengths if p not in failures)
        return rows, [failures[p] for p in sorted(failures)], audio_done

    # ------------------------------------------------------------------------------------------------ audio

    def _build(self, audio: ShardAudio, windows: list[list[Unit]]):
        """In the audio thread: ``(entries, model inputs, new failures)`` for ``windows``; an entry is
        ``(window, packed window or None)`` for each window with audio left (its failed items dropped)."""
        entries, clips = [], []
        for window in windows:
            got = [(u, a) for u in window if (a := audio.read(u.item, u.piece, u.start, u.end)) is not None]
            if not got:
                continue
            if len(window) > 1:
                packed = assemble_window([a for _, a in got], self.teacher.sampling_rate, self.packer.gap)
                clips.append(packed.audio)
                packed.audio = None  # its features are what the teacher reads
                entries.append(([u for u, _ in got], packed))
            else:
                entries.append((window, None))
                clips.append(got[0][1])
        return entries, (self.teacher.prepare(clips) if clips else None), audio.take_failures()

    # ------------------------------------------------------------------------------------------------ decoding

    def _decode_batches(self, plan: ShardPlan, audio, results, absorb, progress) -> None:
        teacher, bs = self.teacher, self.config.batch_size
        batches = [plan.windows[i: i + bs] for i in range(0, len(plan.windows), bs)]
        with AudioThread(batches, lambda job: self._build(audio, job)) as thread:
            while (got := thread.next()) is not None:
                entries, prepared, found = got[1]
                absorb(found)
                if not entries:
                    continue
                units = [window[0] for window, _ in entries]
                chunks = [plan.parts[u.item][u.piece] for u in units]
                for unit, result in zip(units, teacher.run(prepared, chunks)):
                    results[(unit.item, unit.piece)] = result
                    progress.part_done(unit)

    def _decode_pool(self, plan: ShardPlan, audio, results, absorb, progress) -> None:
        import torch

        teacher, cfg = self.teacher, self.config
        rejected: deque[Unit] = deque()
        soft_labels = (int(cfg.top_k), float(cfg.soft_label_temperature)) if cfg.top_k else None
        thread = AudioThread([[w] for w in plan.windows], lambda job: self._build(audio, job), depth=cfg.batch_size)

        def take(k: int) -> list[DecodeRequest]:
            ready = []  # (units, packed window or None, features [1, ...])
            while len(ready) < k:
                if rejected:
                    built = thread.build_now([[rejected.popleft()]])
                else:
                    got = thread.next()
                    if got is None:
                        break
                    built = got[1]
                entries, features, found = built
                absorb(found)
                ready += [(units, packed, features[i: i + 1]) for i, (units, packed) in enumerate(entries)]
            if not ready:
                return []
            features = torch.cat([f for _, _, f in ready])
            hidden = teacher.encode_audio(features).last_hidden_state
            draft_hidden = teacher.draft_hidden(features)
            requests = []
            for packed_group in (True, False):
                rows = [i for i, r in enumerate(ready) if (r[1] is not None) == packed_group]
                if not rows:
                    continue
                timestamps = packed_group or bool(cfg.return_timestamps)
                for i, prompt in zip(rows, teacher.prompts(hidden[rows], timestamps)):
                    units, packed, _ = ready[i]
                    requests.append(DecodeRequest((units, packed, list(prompt)), hidden[i], prompt, timestamps,
                                                  None if draft_hidden is None else draft_hidden[i]))
            return requests

        try:
            with torch.inference_mode():
                for res in teacher.greedy.stream(take, capacity=cfg.batch_size, soft_labels=soft_labels):
                    units, packed, prompt = res.key
                    if packed is None:
                        unit = units[0]
                        part = PiecePart.alone(teacher, res, prompt) if self.packer else teacher.segment_result(
                            res.tokens, prompt, res.logprobs, res.first_logits, res.soft)
                        results[(unit.item, unit.piece)] = part
                        progress.part_done(unit)
                        continue
                    split = self._split(res, packed)
                    if split is None:
                        self.stats["rejected_windows"] += 1
                        self.stats["relabelled_units"] += len(units)
                        self.stats["direct_units"] += len(units)
                        rejected.extend(units)
                        continue
                    for unit, offset, segs in zip(units, packed.offsets, split):
                        results[(unit.item, unit.piece)] = PiecePart.from_window(
                            teacher, segs, offset / teacher.sampling_rate, prompt)
                        self.stats["packed_units"] += 1
                        progress.part_done(unit)
        finally:
            thread.close()

    def _split(self, res, packed):
        """Each clip's segments of a decoded packed window, or None when the window is rejected."""
        t, cfg = self.teacher, self.config
        segs = parse_timestamped(res.tokens, res.logprobs, timestamp_begin=t.timestamp_begin, eos_id=t.eos_id,
                                 special_begin=t.special_begin, time_precision=t.time_precision)
        split, reason = assign_segments(segs, packed.spans, cfg.pack_tolerance_s, packed.content_end, packed.voiced,
                                        cfg.pack_max_uncovered_s, cfg.pack_tolerance_s)
        if split is None:
            logger.debug("packed window of %d clips rejected: %s", len(packed.offsets), reason)
        return split
