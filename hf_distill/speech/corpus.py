"""Spoken corpora for offline speech recipes: real prose, spoken by several synthetic voices.

* :func:`split_sentences` / :func:`plain_sentences`: the sentences of news articles, filtered to those a
  speech synthesizer reads exactly as written (letters and light punctuation only: no digits, symbols or
  quotes, whose spoken form differs from the written one).
* :func:`parse_voices` (``engine:voice`` lists) and :func:`speak_clips` (text ``i`` spoken by voice
  ``i % n``, once: a rerun keeps the clips already made; the manifest is rewritten as it goes, so a crash
  loses at most the clips since the last write).
* :func:`pack_windows`: consecutive clips of one voice joined into multi-sentence recordings of at most
  ``max_seconds`` (1 to ``max_clips`` sentences, short silences between them), the way real long-form audio
  reaches a 30-s Whisper window; the reference is the sentences' texts joined.
* :func:`article_split`: articles into training and held-out groups by a seeded hash of their text, so
  that no held-out sentence comes from an article seen in training.
"""

from __future__ import annotations

import csv
import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["article_split", "bbc_spoken_corpus", "pack_windows", "parse_voices", "plain_sentences", "speak_clips", "split_sentences"]

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
PLAIN = re.compile(r"[A-Z][A-Za-z' ,;:-]*[A-Za-z][.?!]")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (lines joined; split after ``.``, ``!`` or ``?`` before a capital)."""
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return [s.strip() for s in SENTENCE_END.split(joined) if s.strip()]


def plain_sentences(articles: Iterable[str], *, min_words: int = 6, max_words: int = 24,
                    skip_title: bool = True) -> list[str]:
    """Unique sentences of ``articles`` (in order) of ``min_words`` to ``max_words`` words, written with
    letters, spaces and ``' , ; : -`` only, ending in ``.``, ``?`` or ``!``, with no all-capital word of more
    than one letter (acronyms are spelled out by some voices and read as words by others)."""
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    seen: set[str] = set()
    out = []
    for article in articles:
        body = article.strip().split("\n", 1)[1] if skip_title and "\n" in article.strip() else article
        for sentence in split_sentences(body):
            words = sentence.split()
            if not min_words <= len(words) <= max_words or not PLAIN.fullmatch(sentence):
                continue
            if any(len(w.strip(",;:.?!'-")) > 1 and w.strip(",;:.?!'-").isupper() for w in words):
                continue
            if "  " in sentence or "--" in sentence or sentence in seen:
                continue
            seen.add(sentence)
            out.append(sentence)
    return out


def article_split(articles: Sequence[str], held_out_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of training and held-out articles: an article is held out when a seeded hash of its text falls
    under ``held_out_fraction`` (stable when articles are added or reordered)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    train, held = [], []
    for i, text in enumerate(articles):
        digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction else train).append(i)
    return train, held


def parse_voices(spec: str) -> list[tuple[str, str]]:
    """``"festival:cmu_us_slt_arctic_hts,flite:awb"`` -> ``[("festival", "cmu_us_slt_arctic_hts"), ("flite", "awb")]``.
    A flite voice may carry variant options (``flite:awb+stretch=1.15+f0=95``: slower, lower; see
    :func:`hf_distill.speech.synth.split_voice`), checked here."""
    from hf_distill.speech.synth import ENGINES, split_voice

    voices = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        engine, _, voice = item.partition(":")
        if engine not in ENGINES or not voice:
            raise ValueError(f"cannot read voice {item!r} in {spec!r}: write engine:voice with engine one of "
                             f"{sorted(ENGINES)}, e.g. flite:awb")
        split_voice(engine, voice)
        voices.append((engine, voice))
    if not voices:
        raise ValueError("no voices given; e.g. 'festival:cmu_us_slt_arctic_hts,flite:awb'")
    return voices


def write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV written atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def speak_clips(texts: Sequence[str], out_dir: str | Path, voices: Sequence[tuple[str, str]], *, prefix: str = "clip",
                sampling_rate: int = 16000, progress: bool = False,
                save_every: int = 100) -> list[tuple[Path, str]]:
    """Speak text ``i`` with voice ``i % len(voices)`` into ``out_dir/{prefix}{i:05d}.wav`` (16 kHz mono), once:
    existing clips whose manifest row (``{prefix}_manifest.csv``: path, voice, text) holds the same text and
    voice are kept. Returns ``[(path, voice), ...]``."""
    from hf_distill.speech.synth import synthesize

    if not voices:
        raise ValueError("no voices given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{prefix}_manifest.csv"
    known = {name: (row["text"], row["voice"]) for name, row in read_rows(manifest).items()}
    rows: list[tuple[str, str, str]] = []
    done = dict(known)
    steps = range(len(texts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"speaking {prefix}", unit="clip")
    for i in steps:
        text = texts[i]
        engine, voice = voices[i % len(voices)]
        name = f"{prefix}{i:05d}.wav"
        path = out_dir / name
        spec = f"{engine}:{voice}"
        if not (path.is_file() and known.get(name) == (text, spec)):
            made, _ = synthesize([text], out_dir, engine=engine, voice=voice, sampling_rate=sampling_rate,
                                 prefix=f"{prefix}{i:05d}_")[0]
            made.replace(path)
            done[name] = (text, spec)
            if save_every and len(rows) % save_every == 0:
                write_rows(manifest, ("path", "voice", "text"), ((n, v, t) for n, (t, v) in done.items()))
        rows.append((name, spec, text))
    write_rows(manifest, ("path", "voice", "text"), rows)
    return [(out_dir / n, v) for n, v, _ in rows]


def pack_windows(clips: Sequence[tuple[str | Path, str, str]], out_dir: str | Path, *, max_seconds: float = 28.0,
                 max_clips: int = 5, gap_seconds: tuple[float, float] = (0.2, 0.7), seed: int = 0,
                 prefix: str = "window", sampling_rate: int = 16000) -> Path:
    """Join consecutive clips of one voice (``clips``: ``(path, voice, text)``) into recordings of 1 to
    ``max_clips`` sentences (drawn uniformly, fewer where ``max_seconds`` is reached) with a silence of
    ``gap_seconds`` (uniform) between sentences; ``out_dir/{prefix}{j:05d}.wav``, made once (a rerun with the
    same clips and settings keeps them). Returns the manifest (``path, voice, text, clips``)."""
    import soundfile as sf

    if max_clips < 1 or max_seconds <= 0:
        raise ValueError(f"need max_clips >= 1 and max_seconds > 0, got {max_clips} and {max_seconds}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{prefix}_manifest.csv"
    rng = random.Random(seed)
    by_voice: dict[str, list[tuple[Path, str]]] = {}
    for path, voice, text in clips:
        by_voice.setdefault(voice, []).append((Path(path), text))
    plans: list[tuple[str, list[tuple[Path, str]], list[float]]] = []
    for voice in sorted(by_voice):
        queue = by_voice[voice]
        i = 0
        while i < len(queue):
            want = rng.randint(1, max_clips)
            group, gaps, seconds = [], [], 0.0
            while i < len(queue) and len(group) < want:
                length = sf.info(str(queue[i][0])).duration
                gap = rng.uniform(*gap_seconds) if group else 0.0
                if group and seconds + gap + length > max_seconds:
                    break
                if not group and length > max_seconds:
                    raise ValueError(f"clip {queue[i][0]} lasts {length:.1f} s, over max_seconds {max_seconds}")
                if group:
                    gaps.append(gap)
                group.append(queue[i])
                seconds += gap + length
                i += 1
            plans.append((voice, group, gaps))
    known = read_rows(manifest)
    rows = []
    for j, (voice, group, gaps) in enumerate(plans):
        name = f"{prefix}{j:05d}.wav"
        text = " ".join(t for _, t in group)
        members = "|".join(p.name for p, _ in group)
        old = known.get(name)
        if not ((out_dir / name).is_file() and old and old["clips"] == members and old["text"] == text):
            pieces = []
            for k, (path, _) in enumerate(group):
                audio, rate = sf.read(str(path), dtype="float32")
                if rate != sampling_rate:
                    raise ValueError(f"{path} is at {rate} Hz, not {sampling_rate}")
                if k:
                    pieces.append(np.zeros(int(round(gaps[k - 1] * sampling_rate)), np.float32))
                pieces.append(audio)
            tmp = out_dir / f".{name}"
            sf.write(str(tmp), np.concatenate(pieces), sampling_rate, subtype="PCM_16", format="WAV")
            tmp.replace(out_dir / name)
        rows.append((name, voice, text, members))
    write_rows(manifest, ("path", "voice", "text", "clips"), rows)
    return manifest


def bbc_training_sentences(held_out_fraction: float = 0.15, seed: int = 0) -> list[str]:
    """Every plain sentence (:func:`plain_sentences`, any length) of the BBC News articles that
    :func:`bbc_spoken_corpus` draws training sentences from, never of the held-out articles: e.g. the text a
    trimmed student vocabulary is chosen from."""
    from hf_distill.tasks.classification_data import load_bbc_news

    articles = load_bbc_news()["text"]
    train_idx, _ = article_split(articles, held_out_fraction, seed=seed)
    return every_plain_sentence([articles[i] for i in train_idx])


def every_plain_sentence(articles: Iterable[str]) -> list[str]:
    """:func:`plain_sentences` of any length."""
    return plain_sentences(articles, min_words=1, max_words=10**6)


def bbc_spoken_corpus(out_dir: str | Path, *, train_sentences: int, voices: Sequence[tuple[str, str]],
                      eval_sentences: int, eval_voices: Sequence[tuple[str, str]], held_out_fraction: float = 0.15,
                      seed: int = 0, progress: bool = True) -> tuple[list[tuple[Path, str, str]], Path]:
    """BBC News sentences spoken offline: ``train_sentences`` from training articles spoken by ``voices`` (one
    voice each, in turn) into ``out_dir/train``, and ``eval_sentences`` from held-out articles (see
    :func:`article_split`) spoken by ``eval_voices`` into ``out_dir/eval``. Sentences are drawn in a seeded
    random order. Returns the training clips ``(path, voice, text)`` and the held-out manifest (path, voice,
    text)."""
    from hf_distill.speech.synth import split_voice
    from hf_distill.tasks.classification_data import load_bbc_news

    # a variant of a voice (another rate or pitch) is the same speaker: held out means no variant trained
    def speakers(vs):
        return {f"{e}:{split_voice(e, v)[0]}" for e, v in vs}

    overlap = speakers(voices) & speakers(eval_voices)
    if overlap:
        raise ValueError(f"held-out voices {sorted(overlap)} are also training voices (counting their rate and pitch "
                         "variants); choose voices never trained on")
    articles = load_bbc_news()["text"]
    train_idx, held_idx = article_split(articles, held_out_fraction, seed=seed)
    # the BBC set repeats some stories verbatim across articles: a held-out sentence found in any training
    # article is left out, so that no evaluated sentence was trained on (nor chose a trimmed vocabulary)
    in_training = set(every_plain_sentence([articles[i] for i in train_idx]))
    pools = {}
    for name, idx, n in (("train", train_idx, train_sentences), ("eval", held_idx, eval_sentences)):
        pool = plain_sentences([articles[i] for i in idx])
        if name == "eval":
            pool = [s for s in pool if s not in in_training]
        random.Random(seed).shuffle(pool)
        if n > len(pool):
            raise ValueError(f"{n} {name} sentences asked for, the BBC News articles give {len(pool)}")
        pools[name] = pool[:n]
    out_dir = Path(out_dir)
    train = speak_clips(pools["train"], out_dir / "train", voices, prefix="train", progress=progress)
    speak_clips(pools["eval"], out_dir / "eval", eval_voices, prefix="eval", progress=progress)
    return [(p, v, t) for (p, v), t in zip(train, pools["train"])], out_dir / "eval" / "eval_manifest.csv"
