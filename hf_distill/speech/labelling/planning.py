"""Which windows the teacher reads for one shard, and in which order.

Unpacked (:func:`plan_unpacked`): every recording in windows of the teacher's length (long ones in overlapping
chunks whose transcripts are stitched), one recording per window, longest first; a long recording's windows
stay together and in order (it is read once, start to end). Packed (:class:`Packer`): recordings longer than
``max_piece_s`` are cut at pauses into pieces, each alone in a window, in order; clips up to
``pack_max_unit_s`` share windows (first-fit decreasing); longer clips get a window of their own.

Each shard's plan is a pure function of the configuration and the shard's items: a resumed run plans the same
windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_distill.speech.audio import AudioFailure, AudioItem
from hf_distill.speech.audio_stream import frame_energies
from hf_distill.speech.labelling.audio_thread import failure_of
from hf_distill.speech.labelling.packing import Unit, pack_units, pause_cuts
from hf_distill.speech.windows import Chunk

__all__ = ["Packer", "ShardPlan", "plan_unpacked"]


@dataclass
class ShardPlan:
    """``windows`` in decoding order (a window of several units is packed); ``parts``: each planned item's parts
    in order (the samples a part reads and the samples it owns); ``failures``: items that failed while planned;
    ``stats``: the packing counters of this shard (packed plans)."""

    windows: list[list[Unit]]
    parts: dict[int, list[Chunk]]
    failures: dict[int, AudioFailure] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)


def plan_unpacked(teacher, lengths: dict[int, int]) -> ShardPlan:
    parts = {pos: teacher.plan(n) for pos, n in lengths.items()}
    units = [Unit(pos, c, w.start, w.end) for pos, chunks in parts.items() for c, w in enumerate(chunks)]
    units.sort(key=lambda u: (-min(lengths[u.item], teacher.window), u.item, u.piece))
    return ShardPlan([[u] for u in units], parts)


class Packer:
    """The packed plan of a shard, for a Whisper teacher and the ``pack_*`` settings of ``config``."""

    def __init__(self, config, teacher):
        self.sr = sr = teacher.sampling_rate
        self.gap = int(round(config.pack_gap_s * sr))
        self.capacity = teacher.window - int(round(config.pack_tail_s * sr))
        if self.capacity <= self.gap:
            raise ValueError("pack_tail_s leaves no room in the window")
        self.max_unit = min(self.capacity, int(round(config.pack_max_unit_s * sr)))
        max_piece_s = config.max_piece_s if config.max_piece_s is not None else teacher.window / sr - 1.0
        self.max_piece = min(teacher.window, int(round(max_piece_s * sr)))
        self.search = int(round(config.pause_search_s * sr))

    def plan(self, items: list[AudioItem], lengths: dict[int, int]) -> ShardPlan:
        """Long recordings are cut at pauses from the energy of their frames, read in blocks (never in memory
        whole); the pieces of a recording get a window each, in order, so that it is read once from start to end.
        Clips longer than ``pack_max_unit_s`` get a window of their own too: they would leave little room, and
        long multi-sentence clips are where timestamps drift across clip boundaries."""
        frame = max(1, self.sr // 50)
        units: list[Unit] = []
        failures: dict[int, AudioFailure] = {}
        long_items: set[int] = set()
        for pos in sorted(lengths):
            n = lengths[pos]
            if n <= self.max_piece:
                units.append(Unit(pos, 0, 0, n))
                continue
            try:
                energy = frame_energies(items[pos], self.sr, n, frame)
            except Exception as exc:
                failures[pos] = failure_of(items[pos], exc)
                continue
            long_items.add(pos)
            pieces = pause_cuts(energy, n, self.sr, self.max_piece, self.search)
            units.extend(Unit(pos, k, a, b) for k, (a, b) in enumerate(pieces))
        clips = [u for u in units if u.item not in long_items]
        small = [u for u in clips if u.length <= self.max_unit]
        windows = [[small[i] for i in w] for w in pack_units([u.length for u in small], self.capacity, self.gap)]
        windows += [[u] for u in clips if u.length > self.max_unit]
        packed = [w for w in windows if len(w) > 1]
        singles = sorted((w[0] for w in windows if len(w) == 1), key=lambda u: (-u.length, u.item, u.piece))
        pieces_alone = [[u] for u in units if u.item in long_items]
        parts: dict[int, list[Chunk]] = {}
        for u in units:
            parts.setdefault(u.item, []).append(Chunk(u.start, u.end, u.start, u.end))
        stats = {"windows": len(windows) + len(pieces_alone), "packed_windows": len(packed), "units": len(units),
                 "direct_units": len(singles) + len(pieces_alone)}
        return ShardPlan(packed + [[u] for u in singles] + pieces_alone, parts, failures, stats)
