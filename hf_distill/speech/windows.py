"""Long recordings in overlapping windows: which samples each window reads and which part of it it owns."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chunk", "plan_chunks"]


@dataclass(frozen=True)
class Chunk:
    """A window ``[start, end)`` of a recording (in samples) and the part of it this window owns.

    Consecutive windows overlap; the cut between two of them is the middle of their overlap (rounded down
    to a multiple of ``hop``), so the ``[keep_start, keep_end)`` ranges of a recording's chunks tile it
    exactly: no sample is owned twice or not at all.
    """

    start: int
    end: int
    keep_start: int
    keep_end: int


def plan_chunks(num_samples: int, chunk_samples: int, overlap_samples: int, hop: int = 1) -> list[Chunk]:
    """Windows of ``chunk_samples`` overlapping by at least ``overlap_samples``, starts aligned to ``hop``.

    A recording that fits in one window gives one chunk. Otherwise windows start every
    ``chunk_samples - overlap_samples`` samples (rounded down to ``hop``) and the last one is moved back
    so it ends at the end of the recording (it is then full length, give or take ``hop``).
    """
    n = int(num_samples)
    if n <= chunk_samples:
        return [Chunk(0, n, 0, n)]
    hop = max(1, int(hop))
    step = ((chunk_samples - overlap_samples) // hop) * hop
    if step <= 0:
        raise ValueError(
            f"overlap ({overlap_samples}) must be smaller than the chunk ({chunk_samples}) by one hop ({hop})"
        )
    last = -(-(n - chunk_samples) // hop) * hop  # ceil to the hop grid
    starts = list(range(0, last, step)) + [last]
    ends = [min(s + chunk_samples, n) for s in starts[:-1]] + [n]
    cuts = [0]
    for i in range(len(starts) - 1):
        mid = (starts[i + 1] + ends[i]) // 2
        cuts.append(max(cuts[-1], (mid // hop) * hop))
    cuts.append(n)
    return [Chunk(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]
