"""Whisper's English text normaliser and word error rate.

Speech transcripts are compared after Whisper's English normalisation (lower case, punctuation and
fillers removed, numbers and British spellings standardised), as in the Whisper and Distil-Whisper
papers. The normaliser is transformers' :class:`EnglishTextNormalizer`; its British-to-American
spelling table (about 1,700 words) ships with the ``whisper-normalizer`` package (or with
``openai-whisper``) and is read from there, without importing either package. When neither is
installed the normaliser works without the spelling table and a warning says so once.

Public API::

    normalize_english(text) -> str
    english_normalizer() -> Callable[[str], str]
    english_spelling_mapping(path=None) -> dict[str, str]
    english_spelling_mapping_path() -> Path | None
    word_error_counts(references, hypotheses, normalize=True) -> tuple[int, int]
    wer(references, hypotheses, normalize=True) -> float
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "english_normalizer",
    "english_spelling_mapping",
    "english_spelling_mapping_path",
    "normalize_english",
    "wer",
    "word_error_counts",
]

#: Environment variable naming a JSON file with the spelling table (overrides the installed packages).
SPELLING_ENV = "HF_DISTILL_ENGLISH_SPELLING"

# (distribution name, path of the table inside the distribution)
_SPELLING_SOURCES = (
    ("whisper-normalizer", "whisper_normalizer/normalizers/english.json"),
    ("openai-whisper", "whisper/normalizers/english.json"),
)


def english_spelling_mapping_path() -> Path | None:
    """Where the British-to-American spelling table is on this machine, or None.

    Looks at ``$HF_DISTILL_ENGLISH_SPELLING`` first, then inside the installed ``whisper-normalizer``
    and ``openai-whisper`` distributions (their files are read, their code is never imported).
    """
    env = os.environ.get(SPELLING_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{SPELLING_ENV}={env} does not name a file")
        return path
    for dist_name, rel_path in _SPELLING_SOURCES:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        path = Path(str(dist.locate_file(rel_path)))
        if path.is_file():
            return path
    return None


def english_spelling_mapping(path: str | os.PathLike | None = None) -> dict[str, str]:
    """The spelling table as a dict (``{"colour": "color", ...}``); empty if none is installed."""
    if path is None:
        path = english_spelling_mapping_path()
        if path is None:
            return {}
    with open(path, encoding="utf-8") as handle:
        mapping = json.load(handle)
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{path} is not a JSON object mapping words to words")
    return mapping


@functools.lru_cache(maxsize=1)
def english_normalizer() -> Callable[[str], str]:
    """Whisper's English normaliser (built once): ``english_normalizer()("Colour, 2 Mr. X!")``."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = english_spelling_mapping()
    if not mapping:
        logger.warning(
            "Whisper's English spelling table was not found (pip install whisper-normalizer); "
            "normalising without British-to-American spelling standardisation."
        )
    return EnglishTextNormalizer(mapping)


def normalize_english(text: str) -> str:
    """Normalise one transcript with Whisper's English normaliser."""
    return english_normalizer()(text)


def _words(texts: Sequence[str], normalize: bool) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("pass a sequence of transcripts, not a single string")
    norm = english_normalizer() if normalize else None
    out = []
    for text in texts:
        if text is None:
            text = ""
        text = norm(text) if norm is not None else text
        out.append(" ".join(text.split()))
    return out


def word_error_counts(
    references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True
) -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference word count)`` over all pairs.

    Summing these over batches and dividing gives the corpus WER. A reference that is empty
    (after normalisation) counts every hypothesis word as an insertion.
    """
    import jiwer

    refs = _words(references, normalize)
    hyps = _words(hypotheses, normalize)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = 0
    n_ref = 0
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    for r, h in zip(refs, hyps):
        if not r:
            errors += len(h.split())
    if pairs:
        out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
        errors += out.substitutions + out.deletions + out.insertions
        n_ref += out.hits + out.substitutions + out.deletions
    return errors, n_ref


def wer(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate: all word errors over all reference words (jiwer alignment).

    With ``normalize=True`` both sides go through Whisper's English normaliser first. If there are
    no reference words at all, the WER is 0.0 when the hypotheses are empty too and ``inf`` otherwise.
    """
    errors, n_ref = word_error_counts(references, hypotheses, normalize=normalize)
    if n_ref == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / n_ref


def utterance_errors(references: Sequence[str], hypotheses: Sequence[str],
                     normalize: bool = True) -> tuple[list[int], list[int]]:
    """Per utterance: word errors and reference words (their sums give :func:`word_error_counts`)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [word_error_counts([r], [h], normalize=normalize) for r, h in zip(references, hypotheses)]
    return [e for e, _ in pairs], [n for _, n in pairs]


def wer_interval(errors: Sequence[int], words: Sequence[int], *, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the corpus WER (utterances resampled; errors and words summed)."""
    import numpy as np

    e, n = np.asarray(errors, dtype=float), np.asarray(words, dtype=float)
    if e.size == 0 or e.shape != n.shape:
        raise ValueError("wer_interval needs equally long, non-empty error and word counts")
    idx = np.random.default_rng(seed).integers(0, e.size, size=(n_resamples, e.size))
    rates = e[idx].sum(1) / np.maximum(n[idx].sum(1), 1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(rates, alpha)), float(np.quantile(rates, 1 - alpha))


def paired_wer_difference(errors_a: Sequence[int], errors_b: Sequence[int], words: Sequence[int], *,
                          confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """WER of A minus WER of B on the same utterances, with a paired bootstrap interval."""
    import numpy as np

    a, b, n = (np.asarray(x, dtype=float) for x in (errors_a, errors_b, words))
    if not (a.shape == b.shape == n.shape) or a.size == 0:
        raise ValueError("paired_wer_difference needs equally long, non-empty counts")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_resamples, a.size))
    words_drawn = np.maximum(n[idx].sum(1), 1)
    diffs = (a[idx].sum(1) - b[idx].sum(1)) / words_drawn
    alpha = (1 - confidence) / 2
    return {"diff": float((a.sum() - b.sum()) / max(n.sum(), 1)), "low": float(np.quantile(diffs, alpha)),
            "high": float(np.quantile(diffs, 1 - alpha))}
