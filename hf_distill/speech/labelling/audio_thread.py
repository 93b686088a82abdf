"""Audio for the teacher, read in a background thread while the teacher works.

:class:`AudioThread` runs a ``build`` function on a list of jobs, in order, a few jobs ahead of the caller, in
one background thread; the caller can also have a job built *now* (:meth:`AudioThread.build_now`: the clips of a
rejected packed window), which the thread does before its next job ahead. The two threads share no state: jobs
go in and built jobs come out through queues, and everything the building touches (open readers, decoded clips,
the items found unreadable) belongs to the audio thread alone (:class:`ShardAudio`).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hf_distill.speech.audio import AudioError, AudioFailure, AudioItem
from hf_distill.speech.audio_stream import WindowReader

__all__ = ["AudioThread", "ShardAudio", "failure_of"]

_END = object()


class AudioThread:
    """``build(job)`` for each of ``jobs`` in a background thread, ``depth`` jobs ahead of :meth:`next`.

    :meth:`next` returns ``(job, built)`` in the order of ``jobs`` (None at the end); :meth:`build_now` has one
    more job built by the same thread before the jobs ahead and returns its result. An exception ``build`` raises
    comes out of the call that asked for that job. Use it as a context manager: leaving it stops the thread.
    """

    def __init__(self, jobs: Sequence[Any], build: Callable[[Any], Any], depth: int = 2):
        self._build = build
        self._ahead: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._asked: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(list(jobs),), daemon=True, name="pseudo-label-audio")
        self._thread.start()

    def _attempt(self, job) -> tuple[bool, Any]:
        try:
            return True, self._build(job)
        except BaseException as exc:  # handed to the caller
            return False, exc

    def _serve_asked(self, timeout: float) -> None:
        try:
            job = self._asked.get(timeout=timeout)
        except queue.Empty:
            return
        self._answers.put(self._attempt(job))

    def _hand_over(self, msg) -> None:
        while not self._stop.is_set():
            try:
                self._ahead.put(msg, timeout=0.05)
                return
            except queue.Full:  # the caller is busy: answer what it asks for meanwhile
                self._serve_asked(0)

    def _run(self, jobs: list) -> None:
        for job in jobs:
            while not self._asked.empty():
                self._serve_asked(0)
            if self._stop.is_set():
                return
            self._hand_over((job, self._attempt(job)))
        self._hand_over(_END)
        while not self._stop.is_set():
            self._serve_asked(0.05)

    def next(self):
        """The next job and what ``build`` made of it, or None when every job has been handed out."""
        msg = self._ahead.get()
        if msg is _END:
            self._ahead.put(_END)  # asking again is answered again
            return None
        job, (ok, value) = msg
        if not ok:
            raise value
        return job, value

    def build_now(self, job):
        """``build(job)``, done by the audio thread before the jobs ahead."""
        self._asked.put(job)
        ok, value = self._answers.get()
        if not ok:
            raise value
        return value

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._ahead.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def failure_of(item: AudioItem, exc: BaseException) -> AudioFailure:
    """The failure record of ``item`` that ``exc`` ended (an unexpected decoder error says its type)."""
    reason = exc.reason if isinstance(exc, AudioError) else f"decode error: {type(exc).__name__}: {exc}"
    return AudioFailure(item.id, item.path, reason)


class ShardAudio:
    """The samples of a shard's windows, for the audio thread only.

    A recording of several parts (``parts[pos] > 1``: overlapping chunks or pieces cut at pauses) is read once,
    from start to end, in blocks (:class:`~hf_distill.speech.audio_stream.WindowReader`; its parts must be asked
    for in order); any other is decoded whole and kept (least recently used dropped past ``cache_samples``) for
    a clip asked for again. An item that fails is remembered and returns None from then on; :meth:`take_failures`
    hands the new failures over.
    """

    def __init__(self, items: list[AudioItem], lengths: dict[int, int], parts: dict[int, int], sampling_rate: int,
                 cache_samples: int = 0):
        self.items, self.lengths, self.parts, self.rate = items, lengths, parts, sampling_rate
        self.cache_samples = cache_samples
        self.readers: dict[int, WindowReader] = {}
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cached = 0
        self.failed: set[int] = set()
        self.new_failures: dict[int, AudioFailure] = {}

    def read(self, pos: int, part: int, start: int, end: int) -> np.ndarray | None:
        """Samples ``[start, end)`` of part ``part`` of item ``pos``, or None when the item failed."""
        if pos in self.failed:
            return None
        try:
            if self.parts[pos] == 1:
                return self._whole(pos)[start:end]
            reader = self.readers.get(pos)
            if reader is None:
                reader = self.readers[pos] = WindowReader(self.items[pos], self.rate, self.lengths[pos])
            audio = reader.read(start, end)
            if part == self.parts[pos] - 1:
                self.readers.pop(pos).close()
            return audio
        except Exception as exc:  # AudioError, or an unexpected decoder/resampler error
            self.failed.add(pos)
            self.new_failures[pos] = failure_of(self.items[pos], exc)
            reader = self.readers.pop(pos, None)
            if reader is not None:
                reader.close()
            return None

    def _whole(self, pos: int) -> np.ndarray:
        audio = self.cache.get(pos)
        if audio is not None:
            self.cache.move_to_end(pos)
            return audio
        reader = WindowReader(self.items[pos], self.rate, self.lengths[pos])
        try:  # the file in one window: what decode_with_rate gives, fitted to the length planned from the header
            audio = reader.read(0, self.lengths[pos])
        finally:
            reader.close()
        if self.cache_samples > 0:
            self.cache[pos] = audio
            self.cached += len(audio)
            while self.cached > self.cache_samples and len(self.cache) > 1:
                self.cached -= len(self.cache.popitem(last=False)[1])
        return audio

    def take_failures(self) -> dict[int, AudioFailure]:
        found, self.new_failures = self.new_failures, {}
        return found

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
        self.cache.clear()
