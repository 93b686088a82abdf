"""Vocabulary trimming for Whisper students: keep only the output rows a student is trained to emit.

At tiny.en's size the decoder's cost per token is dominated by the 51,864-row output projection
(384 x 51,864 multiply-adds against about 2.4M per decoder layer), so a shallower decoder alone
barely decodes faster. A student trained on English pseudo-labels uses a few thousand of those
tokens; :func:`trim_whisper_vocabulary` keeps them (plus every byte token, so any text can still be
written, every special and timestamp token, in their order, and the BPE merges that build the kept
tokens), and rebuilds embedding, tied output layer, tokenizer and generation config with the new ids.
The result is a plain ``WhisperForConditionalGeneration`` folder: its tokenizer encodes every text
whose tokens were kept exactly as the teacher's tokenizer did (same pieces, new ids), and
``generate``, the transformers ASR pipeline and ``hf-distill pseudo-label`` read it like any Whisper.

:class:`VocabularyMap` carries the correspondence: ``kept`` (student id -> teacher id) lets a live
teacher read the student's token ids and score only the kept rows of its own output layer, and
:meth:`VocabularyMap.to_student` maps teacher token ids (pseudo-labels, prompts) into the student's.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

__all__ = ["VocabularyMap", "whisper_kept_token_ids", "trim_whisper_vocabulary", "remap_generation_ids"]

# Scalar token-id settings of Whisper's config and generation config.
_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "no_timestamps_token_id",
              "prev_sot_token_id", "sep_token_id", "unk_token_id")
_ID_LIST_FIELDS = ("suppress_tokens", "begin_suppress_tokens")


@dataclass(frozen=True)
class VocabularyMap:
    """``kept[i]``: the teacher id of student token ``i`` (increasing); ``teacher_size``: the teacher's vocabulary."""

    kept: np.ndarray
    teacher_size: int

    def __post_init__(self):
        kept = np.asarray(self.kept, dtype=np.int64)
        if kept.ndim != 1 or len(kept) == 0 or np.any(np.diff(kept) <= 0):
            raise ValueError("kept token ids must be a non-empty increasing sequence")
        if kept[0] < 0 or kept[-1] >= self.teacher_size:
            raise ValueError(f"kept token ids must lie in [0, {self.teacher_size})")
        object.__setattr__(self, "kept", kept)

    @property
    def size(self) -> int:
        return len(self.kept)

    @cached_property
    def lookup(self) -> np.ndarray:
        """teacher id -> student id (-1 where the token was dropped)."""
        table = np.full(self.teacher_size, -1, dtype=np.int64)
        table[self.kept] = np.arange(len(self.kept))
        return table

    def to_student(self, ids: Iterable[int], *, what: str = "token ids") -> list[int]:
        """Teacher ids -> student ids; a dropped id is an error (the vocabulary was trimmed without it)."""
        table = self.lookup
        ids = [int(i) for i in ids]
        out = [int(table[i]) if 0 <= i < self.teacher_size else -1 for i in ids]
        if any(o < 0 for o in out):
            bad = sorted({i for i, o in zip(ids, out) if o < 0})[:5]
            raise ValueError(f"{what} hold teacher tokens {bad} that the trimmed vocabulary dropped; trim with "
                             "these texts or token ids included")
        return out

    def to_dict(self) -> dict:
        return {"teacher_vocab_size": self.teacher_size, "student_vocab_size": self.size,
                "kept_teacher_ids": self.kept.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> VocabularyMap:
        return cls(np.asarray(data["kept_teacher_ids"], dtype=np.int64), int(data["teacher_vocab_size"]))


def _tokenizer_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no tokenizers backend; trimming needs a BPE tokenizer.json")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError("vocabulary trimming supports byte-level BPE tokenizers (Whisper's) only")
    return spec


def _merge_pairs(spec: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]


def whisper_kept_token_ids(tokenizer, *, token_ids: Iterable[Sequence[int]] = (), texts: Iterable[str] = ()) -> list[int]:
    """The teacher ids a trimmed student keeps: every added token (specials, timestamps), every
    single-character (byte) token, the tokens of ``token_ids`` and of ``texts`` (as written and after a
    space), and, recursively, the two pieces of every kept token's BPE merge (so the trimmed tokenizer
    encodes those texts with the same pieces)."""
    spec = _tokenizer_spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = {int(t["id"]) for t in spec["added_tokens"]}
    by_id = {i: t for t, i in vocab.items()}
    keep = set(added)
    keep.update(i for t, i in vocab.items() if len(t) == 1)
    for ids in token_ids:
        keep.update(int(i) for i in ids)
    texts = [t for t in texts if t]
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        variants = chunk + [" " + t.lstrip() for t in chunk]
        for ids in tokenizer(variants, add_special_tokens=False)["input_ids"]:
            keep.update(ids)
    size = len(tokenizer)
    bad = sorted(i for i in keep if not 0 <= i < size)
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the tokenizer's {size} tokens")
    parents = {a + b: (a, b) for a, b in _merge_pairs(spec)}
    stack = [by_id[i] for i in keep if i in by_id]
    while stack:
        pair = parents.get(stack.pop())
        for piece in pair or ():
            j = vocab[piece]
            if j not in keep:
                keep.add(j)
                stack.append(piece)
    return sorted(keep)


def _trimmed_tokenizer(tokenizer, vmap: VocabularyMap):
    """The tokenizer with only the kept tokens, renumbered 0..n-1 in the teacher's order."""
    from transformers import AutoTokenizer

    spec = _tokenizer_spec(tokenizer)
    new_id = vmap.lookup
    vocab = {t: int(new_id[i]) for t, i in spec["model"]["vocab"].items() if new_id[i] >= 0}
    spec["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    spec["model"]["merges"] = [[a, b] for a, b in _merge_pairs(spec) if a + b in vocab]
    for token in spec["added_tokens"]:
        token["id"] = int(new_id[token["id"]])
    post = spec.get("post_processor") or {}
    for special in (post.get("special_tokens") or {}).values():
        special["ids"] = [int(new_id[i]) for i in special["ids"]]
    if len(vocab) + sum(t["content"] not in vocab for t in spec["added_tokens"]) != vmap.size:
        raise ValueError("the kept ids do not match the tokenizer's tokens")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        for stale in ("vocab.json", "merges.txt", "added_tokens.json"):
            Path(tmp, stale).unlink(missing_ok=True)
        config = Path(tmp, "tokenizer_config.json")
        if config.is_file():
            data = json.loads(config.read_text())
            decoder = data.pop("added_tokens_decoder", None)
            if decoder:
                data["added_tokens_decoder"] = {str(int(new_id[int(k)])): v for k, v in decoder.items()}
            config.write_text(json.dumps(data, ensure_ascii=False, indent=2))
        trimmed = AutoTokenizer.from_pretrained(tmp)
    if len(trimmed) != vmap.size:
        raise ValueError(f"the trimmed tokenizer has {len(trimmed)} tokens, expected {vmap.size}")
    return trimmed


def remap_generation_ids(config, vmap: VocabularyMap) -> None:
    """Rewrite the token ids of a Whisper ``config`` or ``generation_config`` in place (teacher -> student);
    suppressed tokens that were dropped are left out (they cannot be emitted any more)."""
    table = vmap.lookup

    def one(i):  # ids outside the teacher's vocabulary (defaults of a config never used) map to -1 too
        return int(table[int(i)]) if 0 <= int(i) < len(table) else -1

    for name in _ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            new = one(value)
            if new < 0:
                raise ValueError(f"{name} {value} was dropped by the trimming")
            setattr(config, name, new)
        elif isinstance(value, list):
            setattr(config, name, [one(v) for v in value if one(v) >= 0])
    for name in _ID_LIST_FIELDS:
        value = getattr(config, name, None)
        if value:
            setattr(config, name, [one(v) for v in value if one(v) >= 0])
    forced = getattr(config, "forced_decoder_ids", None)
    if forced:
        config.forced_decoder_ids = [[pos, one(i)] for pos, i in forced]
    for name in ("lang_to_id", "task_to_id"):
        value = getattr(config, name, None)
        if value:
            setattr(config, name, {k: one(v) for k, v in value.items() if one(v) >= 0})


def trim_whisper_vocabulary(model, tokenizer, kept: Sequence[int]):
    """Trim ``model`` (a ``WhisperForConditionalGeneration``, changed in place) to the teacher ids ``kept``.

    Returns ``(model, tokenizer, VocabularyMap)``: the model with its embedding and tied output layer cut
    to the kept rows and its config and generation config renumbered, the trimmed tokenizer, and the map.
    """
    teacher_size = int(model.config.vocab_size)
    if len(tokenizer) != teacher_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens and the model {teacher_size}; give the "
                         "model's own tokenizer")
    vmap = VocabularyMap(np.asarray(sorted(set(int(i) for i in kept)), dtype=np.int64), teacher_size)
    new_tokenizer = _trimmed_tokenizer(tokenizer, vmap)
    index = torch.as_tensor(vmap.kept)
    old = model.get_input_embeddings()
    pad = getattr(model.config, "pad_token_id", None)
    new_pad = int(vmap.lookup[pad]) if pad is not None and vmap.lookup[pad] >= 0 else None
    embedding = torch.nn.Embedding(vmap.size, old.embedding_dim, padding_idx=new_pad,
                                   device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        embedding.weight.copy_(old.weight.index_select(0, index.to(old.weight.device)))
    embedding.weight.requires_grad_(old.weight.requires_grad)
    model.set_input_embeddings(embedding)
    head = model.get_output_embeddings()
    new_head = torch.nn.Linear(old.embedding_dim, vmap.size, bias=False, device=old.weight.device,
                               dtype=old.weight.dtype)
    tied = bool(getattr(model.config, "tie_word_embeddings", True))
    if tied:
        new_head.weight = embedding.weight
    else:
        with torch.no_grad():
            new_head.weight.copy_(head.weight.index_select(0, index.to(head.weight.device)))
    model.set_output_embeddings(new_head)
    model.config.vocab_size = vmap.size
    remap_generation_ids(model.config, vmap)
    if getattr(model, "generation_config", None) is not None:
        remap_generation_ids(model.generation_config, vmap)
    return model, new_tokenizer, vmap
