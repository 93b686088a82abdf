"""Text measures of a labelling run: stitching overlapping chunk transcripts, compression ratio, WER."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

__all__ = ["compression_ratio", "load_normalizer", "merge_overlapping_texts", "word_error_rate"]

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


def load_normalizer(kind: str):
    """The text normaliser the WER filter compares with: ``english`` (Whisper's, with the project's spelling
    table), ``basic`` or ``none``."""
    if kind == "none":
        return lambda s: s
    if kind == "english":
        from hf_distill.speech.text_normalizer import english_normalizer

        return english_normalizer()
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()


def word_error_rate(reference: str, hypothesis: str, normalizer=None) -> float:
    """Word-level edit distance / reference words, after ``normalizer``. An empty reference gives 0.0
    for an empty hypothesis and ``inf`` otherwise."""
    import jiwer

    if normalizer is not None:
        reference, hypothesis = normalizer(reference), normalizer(hypothesis)
    ref, hyp = reference.split(), hypothesis.split()
    if not ref:
        return 0.0 if not hyp else float("inf")
    return float(jiwer.wer(" ".join(ref), " ".join(hyp)))
