"""Build a transformers ``WhisperTokenizer`` from a CTranslate2 Whisper directory.

Uses ``tokenizer.json`` when present (restoring a merge it may have lost), otherwise recovers the
byte-level BPE merges from the ranked vocabulary in ``vocabulary.txt`` / ``vocabulary.json``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["build_tokenizer"]

_TIMESTAMP_RE = re.compile(r"^<\|\d+\.\d+\|>$")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to code points >= 256."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_ranked_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Recover BPE merges from a vocabulary whose ids are the merge ranks (GPT-2/Whisper style).

    A token of rank r was made by the last merge that BPE applies when it encodes the token's
    characters using only tokens ranked below r; that merge joins exactly two pieces.
    """
    alphabet = set(_bytes_to_unicode().values())
    merges = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if not token:  # the multilingual vocabulary has one unused empty token
            continue
        if len(token) == 1:
            if token not in alphabet:
                raise ValueError(f"single-character token {token!r} is not in the byte-level alphabet")
            continue
        pieces = list(token)
        while len(pieces) > 2:
            best = None
            for j in range(len(pieces) - 1):
                r = vocab.get(pieces[j] + pieces[j + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, j)
            if best is None:
                break
            j = best[1]
            pieces[j : j + 2] = [pieces[j] + pieces[j + 1]]
        if len(pieces) != 2 or any(p not in vocab or vocab[p] >= rank for p in pieces):
            raise ValueError(f"cannot recover the merge that made token {token!r} (id {rank})")
        merges.append((pieces[0], pieces[1]))
    return merges


def _read_vocabulary(src_dir: Path) -> list[str] | None:
    txt, js = src_dir / "vocabulary.txt", src_dir / "vocabulary.json"
    if js.is_file():
        tokens = json.loads(js.read_text(encoding="utf-8"))
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{js} is not a JSON list of tokens")
        return tokens
    if txt.is_file():
        with open(txt, encoding="utf-8", newline="") as handle:
            tokens = handle.read().split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return [t.removesuffix("\r") for t in tokens]
    return None


def _timestamp_tokens(count: int) -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(count)]


def build_tokenizer(src_dir: Path, vocab_size: int, normalizer_file: str | None):
    """A ``WhisperTokenizer`` whose ids match the checkpoint's vocabulary exactly."""
    from transformers import AddedToken, WhisperTokenizer

    tokens = _read_vocabulary(src_dir)
    tok_json = src_dir / "tokenizer.json"
    eot = "<|endoftext|>"
    if tok_json.is_file():
        data = json.loads(tok_json.read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{tok_json}: expected a BPE tokenizer, got {model.get('type')!r}")
        bpe_vocab = {t: i for t, i in model["vocab"].items() if t != eot}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = sorted(data.get("added_tokens", []), key=lambda t: t["id"])
        if tokens is None:
            id_to_token = {i: t for t, i in model["vocab"].items()}
            id_to_token.update({t["id"]: t["content"] for t in added})
            if sorted(id_to_token) != list(range(len(id_to_token))):
                raise ValueError(f"{tok_json}: token ids are not contiguous")
            tokens = [id_to_token[i] for i in range(len(id_to_token))]
            tokens += _timestamp_tokens(vocab_size - len(tokens))
        # Whisper's vocabularies are ranked: a token's id is the rank of the merge that makes it, so the
        # merges follow from the vocabulary. The multilingual tokenizer.json in circulation lacks the
        # very first merge ("Ġ t"), which splits " the", " to", ... unlike the tokenizer Whisper was
        # trained with; when the ranks give a superset of the file's merges, the ranks win.
        try:
            ranked = _merges_from_ranked_vocab(bpe_vocab)
        except ValueError:
            ranked = None
        if ranked is not None and ranked != merges and set(merges) <= set(ranked):
            missing = [" ".join(m) for m in ranked if m not in set(merges)]
            logger.warning(
                "%s lacks %d BPE merge(s) implied by the vocabulary ranks (%s); restoring them",
                tok_json, len(missing), ", ".join(repr(m) for m in missing[:3]),
            )
            merges = ranked
    elif tokens is not None:
        if eot not in tokens:
            raise ValueError(f"{src_dir}: the vocabulary has no {eot} token")
        bpe_vocab = {t: i for i, t in enumerate(tokens[: tokens.index(eot)])}
        try:
            merges = _merges_from_ranked_vocab(bpe_vocab)
        except ValueError as err:
            raise ValueError(f"{src_dir}: no tokenizer.json, and the BPE merges cannot be recovered from the vocabulary: {err}") from err
        logger.info("no tokenizer.json: recovered %d BPE merges from the vocabulary", len(merges))
    else:
        raise FileNotFoundError(f"{src_dir} has neither tokenizer.json nor vocabulary.txt/json")

    if len(tokens) != vocab_size:
        raise ValueError(
            f"{src_dir}: the vocabulary has {len(tokens)} tokens but the model's embeddings have {vocab_size} rows"
        )
    if eot not in tokens:
        raise ValueError(f"{src_dir}: the vocabulary has no {eot} token")
    eot_id = tokens.index(eot)
    for t, i in bpe_vocab.items():
        if i >= len(tokens) or tokens[i] != t:
            raise ValueError(f"{src_dir}: tokenizer.json and the vocabulary disagree on token {t!r} (id {i})")
    rest = tokens[eot_id + 1 :]
    n_special = next((k for k, t in enumerate(rest) if _TIMESTAMP_RE.match(t)), len(rest))
    specials = rest[:n_special]
    timestamps = rest[n_special:]
    if not all(_TIMESTAMP_RE.match(t) for t in timestamps):
        raise ValueError(f"{src_dir}: unexpected tokens after the timestamp tokens")
    for required in ("<|startoftranscript|>", "<|notimestamps|>"):
        if required not in specials:
            raise ValueError(f"{src_dir}: the vocabulary has no {required} token: not a Whisper tokenizer")
    if specials[-1] != "<|notimestamps|>":
        raise ValueError(f"{src_dir}: <|notimestamps|> must be the last special token, is {specials[-1]!r}")

    kwargs = {}
    if normalizer_file is not None:
        kwargs["normalizer_file"] = normalizer_file
    tokenizer = WhisperTokenizer(
        vocab={**bpe_vocab, eot: eot_id},
        merges=merges,
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        extra_special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        **kwargs,
    )
    if timestamps:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    tokenizer.set_prefix_tokens()
    ids = tokenizer.convert_tokens_to_ids(tokens[eot_id:])
    if ids != list(range(eot_id, len(tokens))) or len(tokenizer) != vocab_size:
        raise RuntimeError("the rebuilt tokenizer's ids do not match the checkpoint's vocabulary")
    return tokenizer
