"""Long recordings in bounded memory: an audio file read in blocks at the teacher's rate, never whole.

The labellers cut a long recording into windows of at most 30 s; only the windows being labelled need to be
in memory. :func:`iter_blocks` decodes an item block by block (soundfile), downmixes each block and
resamples it with soxr's streaming resampler (``soxr.ResampleStream``): the blocks joined are, sample for
sample, what :func:`~hf_distill.speech.audio.decode_with_rate` gives for the whole file, cut or zero-padded
to the length planned from the header (soxr's stream gives the samples of its one-shot resampling; tested
for WAV, FLAC and Ogg from 8 to 48 kHz). :class:`WindowReader` hands out windows ``[start, end)`` in order
of their start (consecutive windows may overlap) and holds at most one window and one block;
:func:`frame_energies` gives the RMS of every frame of a recording, block by block (what cutting a recording
at its pauses needs).

MP3 is the exception: libsndfile (1.2) decodes a wrong signal when an MP3 file is read in pieces (errors of
a third of full scale from the first block boundary on, measured), so an MP3 file is read in one block and
its memory grows with its length. Convert long MP3 recordings to FLAC to label them in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hf_distill.speech.audio import AudioError, AudioItem, soundfile_error_reason, to_mono

__all__ = ["BLOCK_FRAMES", "WHOLE_FILE_FORMATS", "WindowReader", "frame_energies", "frame_energy", "iter_blocks"]

#: Frames read from the file at a time (4 s at 16 kHz, 1.4 s at 48 kHz).
BLOCK_FRAMES = 1 << 16
#: Formats libsndfile cannot decode in pieces: read in one block.
WHOLE_FILE_FORMATS = frozenset({"MP3"})


def iter_blocks(item: AudioItem, sampling_rate: int, length: int,
                block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Mono float32 blocks of ``item`` at ``sampling_rate``, exactly ``length`` samples in all (cut, or
    zero-padded at the end, like the labellers fit a decoded file to the length its header announced).

    Raises :class:`~hf_distill.speech.audio.AudioError` for unreadable input and for NaN or infinite
    samples (in the block that holds them).
    """
    import soundfile as sf

    src = item.open()
    try:
        handle = sf.SoundFile(src)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"not a readable audio file: {soundfile_error_reason(exc)}") from None
    with handle:
        rate = int(handle.samplerate)
        whole = handle.format in WHOLE_FILE_FORMATS
        stream = None
        if rate != sampling_rate:
            import soxr

            stream = soxr.ResampleStream(rate, sampling_rate, 1, dtype="float32", quality="HQ")
        emitted = 0
        while emitted < length:
            try:
                data = handle.read(-1 if whole else block_frames, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"not a readable audio file: {soundfile_error_reason(exc)}") from None
            last = whole or len(data) < block_frames
            mono = np.ascontiguousarray(to_mono(data), dtype=np.float32)
            if not np.isfinite(mono).all():
                raise AudioError("audio contains NaN or infinite samples")
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            out = mono[: length - emitted]
            emitted += len(out)
            if len(out):
                yield np.ascontiguousarray(out, dtype=np.float32)
            if last:
                break
    if emitted < length:
        yield np.zeros(length - emitted, dtype=np.float32)


class WindowReader:
    """Windows ``[start, end)`` of one recording at ``sampling_rate``, asked for in order of their start.

    The recording is decoded once, from start to end, in blocks (:func:`iter_blocks`); samples before the
    current window's start are dropped. ``max_held`` is the most samples held at any time: at most a window
    plus one block (resampled), whatever the length of the recording.
    """

    def __init__(self, item: AudioItem, sampling_rate: int, length: int, block_frames: int = BLOCK_FRAMES):
        self.length = int(length)
        self._blocks = iter_blocks(item, sampling_rate, self.length, block_frames)
        self._buffer = np.zeros(0, dtype=np.float32)  # samples [_offset, _next) of the recording
        self._offset = 0
        self._next = 0  # the first sample the next block starts with
        self.max_held = 0

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)`` (a copy); ``start`` may not go back before the previous window's start."""
        if start < self._offset:
            raise ValueError(f"windows must come in order of their start: {start} after {self._offset}")
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"window [{start}, {end}) is outside the recording's {self.length} samples")
        if start >= self._next:  # nothing held is needed any more
            self._buffer, self._offset = self._buffer[:0], self._next
        else:
            self._buffer, self._offset = self._buffer[start - self._offset:], start
        pieces = [self._buffer] if len(self._buffer) else []
        while self._next < end:
            block = next(self._blocks, None)
            if block is None:  # iter_blocks pads to the length: only a broken decoder gets here
                raise AudioError(f"the audio ended at sample {self._next} of {self.length}")
            block_start, self._next = self._next, self._next + len(block)
            if self._next <= start:  # wholly before the window
                self._offset = self._next
                continue
            if block_start < start:
                block, self._offset = block[start - block_start:], start
            pieces.append(block)
        self._buffer = np.concatenate(pieces) if len(pieces) > 1 else (pieces[0] if pieces else self._buffer[:0])
        self.max_held = max(self.max_held, len(self._buffer))
        return self._buffer[start - self._offset : end - self._offset].copy()

    def close(self) -> None:
        self._blocks.close()
        self._buffer = self._buffer[:0]


def frame_energy(audio: np.ndarray, frame: int) -> np.ndarray:
    """RMS (float64) of each whole ``frame``-sample frame of ``audio``; a last partial frame is left out."""
    n = len(audio) // frame
    if n == 0:
        return np.zeros(0)
    x = audio[: n * frame].astype(np.float64).reshape(n, frame)
    return np.sqrt((x * x).mean(axis=1))


def frame_energies(item: AudioItem, sampling_rate: int, length: int, frame: int,
                   block_frames: int = BLOCK_FRAMES) -> np.ndarray:
    """:func:`frame_energy` of the whole recording (``length`` samples at ``sampling_rate``), read in blocks:
    the same values, in memory a block and one float64 per frame."""
    parts, carry = [], np.zeros(0, dtype=np.float32)
    for block in iter_blocks(item, sampling_rate, length, block_frames):
        data = np.concatenate([carry, block]) if len(carry) else block
        whole = (len(data) // frame) * frame
        parts.append(frame_energy(data[:whole], frame))
        carry = data[whole:]
    return np.concatenate(parts) if parts else np.zeros(0)
