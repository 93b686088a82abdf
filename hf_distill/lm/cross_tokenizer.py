"""Data for cross-tokenizer distillation: the same text in both tokenizations, and how their tokens align.

A student and a teacher with different tokenizers cut the same text into different tokens. Each text
is tokenized by both, with character offsets, and the two token sequences are aligned into *groups*:
consecutive student tokens and consecutive teacher tokens that cover the same span of text. A group
ends at every character position where both tokenizations have a token boundary.

Whitespace: tokenizers disagree on whether a space belongs to the token before or after it (and on
whether offsets include it). A token's end is therefore moved past the whitespace that follows it
before the boundaries are compared, so ``"Hello"|" world"``, ``"Hello"|"world"`` (offsets without the
space) and ``"Hello "|"world"`` all put a boundary between the two words. Special tokens (empty
offsets: BOS, EOS, padding) belong to no group.

Each model predicts a group's first token from the position before it, where both have read exactly
the same text; a group at position 0 of either sequence has no such position and is dropped (the
builder therefore starts both sequences with a special token by default).

Batch columns built here (the trainer keeps and routes every ``teacher_*`` column):

* ``input_ids``, ``attention_mask``, ``labels``: the student's tokens (labels = ids, padding -100);
* ``teacher_input_ids``, ``teacher_attention_mask``: the teacher's tokens of the same text;
* ``teacher_alignment``: (batch, groups, 4) long, one row ``[s_start, s_stop, t_start, t_stop)`` of
  token indices per group, padded with -1 rows.

Public API::

    align_tokens(text, student_offsets, teacher_offsets) -> list[tuple[int, int, int, int]]
    encode_pair(text, student_tokenizer, teacher_tokenizer) -> dict
    build_cross_tokenizer_dataset(texts, student_tokenizer, teacher_tokenizer, *, max_length=128) -> datasets.Dataset
    CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)
    output_layer_restricted_to(model, token_ids)  # context manager: logits over token_ids only
    shared_vocabulary(student_tokenizer, teacher_tokenizer) -> (student_ids, teacher_ids)
    token_texts(tokenizer) -> dict[int, str]
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import IGNORE_INDEX

__all__ = [
    "CrossTokenizerCollator",
    "align_tokens",
    "build_cross_tokenizer_dataset",
    "encode_pair",
    "output_layer_restricted_to",
    "shared_vocabulary",
    "token_texts",
]


def _boundary(text: str, end: int) -> int:
    """``end`` moved past the whitespace that follows it."""
    while end < len(text) and text[end].isspace():
        end += 1
    return end


def align_tokens(text: str, student_offsets: Sequence[tuple[int, int]],
                 teacher_offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Groups ``(s_start, s_stop, t_start, t_stop)`` of token indices covering the same text.

    ``*_offsets`` are each token's ``(start, end)`` character offsets into ``text`` (a fast tokenizer's
    ``offset_mapping``); tokens with ``start == end`` are special and join no group. A group is kept only
    when its tokens are consecutive on both sides.
    """
    def ends(offsets):
        return [(i, _boundary(text, int(e))) for i, (s, e) in enumerate(offsets) if int(e) > int(s)]

    s_ends, t_ends = ends(student_offsets), ends(teacher_offsets)
    common = sorted({e for _, e in s_ends} & {e for _, e in t_ends})
    groups = []
    si = ti = 0
    for boundary in common:
        s_group, t_group = [], []
        while si < len(s_ends) and s_ends[si][1] <= boundary:
            s_group.append(s_ends[si][0])
            si += 1
        while ti < len(t_ends) and t_ends[ti][1] <= boundary:
            t_group.append(t_ends[ti][0])
            ti += 1
        if not s_group or not t_group:
            continue
        if s_group[-1] - s_group[0] + 1 == len(s_group) and t_group[-1] - t_group[0] + 1 == len(t_group):
            groups.append((s_group[0], s_group[-1] + 1, t_group[0], t_group[-1] + 1))
    return groups


def _encode(tokenizer, text: str, prefix: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``; with ``prefix``, a start token is put in front when the
    tokenizer adds none (its BOS token, else its EOS token)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if prefix and (not offsets or offsets[0][1] > offsets[0][0]):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a BOS nor an EOS token to start the sequence "
                             "with; pass prefix=False (the first token of each text is then never predicted)")
        ids, offsets = [start] + ids, [(0, 0)] + offsets
    return ids, offsets


def encode_pair(text: str, student_tokenizer, teacher_tokenizer, *, prefix: bool = True) -> dict[str, list]:
    """One text in both tokenizations with the alignment of their tokens (the columns of the module docstring)."""
    s_ids, s_off = _encode(student_tokenizer, text, prefix)
    t_ids, t_off = _encode(teacher_tokenizer, text, prefix)
    return {"input_ids": s_ids, "teacher_input_ids": t_ids,
            "teacher_alignment": [list(g) for g in align_tokens(text, s_off, t_off)]}


def _cut(text: str, tokenizer, max_length: int, prefix: bool) -> str:
    """The longest prefix of ``text`` that ends at a token boundary and takes at most ``max_length`` tokens."""
    while True:
        ids, offsets = _encode(tokenizer, text, prefix)
        if len(ids) <= max_length:
            return text
        ends = [e for s, e in offsets[:max_length] if e > s]
        text = text[:ends[-2] if len(ends) > 1 else 0]


def _pieces(text: str, tokenizer, max_length: int, prefix: bool, max_pieces: int | None):
    """Consecutive pieces of ``text`` of at most ``max_length`` tokens each, cut at token boundaries."""
    n = 0
    while text.strip() and (max_pieces is None or n < max_pieces):
        cut = _cut(text, tokenizer, max_length, prefix)
        if not cut.strip():  # a single token longer than the budget: nothing more to cut
            return
        yield cut
        n += 1
        text = text[len(cut):]


def build_cross_tokenizer_dataset(texts: Sequence[str], student_tokenizer, teacher_tokenizer, *,
                                  max_length: int = 128, prefix: bool = True, max_pieces_per_text: int | None = None):
    """A ``datasets.Dataset`` of :func:`encode_pair` rows (plus the ``text`` each row encodes).

    Each text is cut into consecutive pieces of at most ``max_length`` student tokens (at a student token
    boundary, one token early so that a token merged across the cut cannot differ; the first
    ``max_pieces_per_text`` pieces, default all); both tokenizers then encode the same piece, so the two
    sequences cover exactly the same characters. The teacher's sequence is as long as its tokenizer makes
    that piece.
    """
    import datasets

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a start token and one token of text), got {max_length}")
    rows: dict[str, list[Any]] = {"text": [], "input_ids": [], "teacher_input_ids": [], "teacher_alignment": []}
    for text in texts:
        if not isinstance(text, str):
            continue
        for cut in _pieces(text, student_tokenizer, max_length, prefix, max_pieces_per_text):
            row = encode_pair(cut, student_tokenizer, teacher_tokenizer, prefix=prefix)
            rows["text"].append(cut)
            for key, value in row.items():
                rows[key].append(value)
    if not rows["text"]:
        raise ValueError("no non-empty text to build the cross-tokenizer dataset from")
    return datasets.Dataset.from_dict(rows)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


@dataclass
class CrossTokenizerCollator:
    """Pads rows of :func:`build_cross_tokenizer_dataset` into the batch columns of the module docstring.

    Labels are the student's ids (padding -100; the start token is never a target, since the causal-LM
    loss predicts position ``i`` from ``i - 1``). Extra columns (``text``) are dropped.
    """

    student_tokenizer: Any
    teacher_tokenizer: Any

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        s_pad, t_pad = _pad_id(self.student_tokenizer), _pad_id(self.teacher_tokenizer)
        s_len = max(len(r["input_ids"]) for r in rows)
        t_len = max(len(r["teacher_input_ids"]) for r in rows)
        g_len = max(1, max(len(r["teacher_alignment"]) for r in rows))
        n = len(rows)
        ids = torch.full((n, s_len), s_pad, dtype=torch.long)
        mask = torch.zeros((n, s_len), dtype=torch.long)
        labels = torch.full((n, s_len), IGNORE_INDEX, dtype=torch.long)
        t_ids = torch.full((n, t_len), t_pad, dtype=torch.long)
        t_mask = torch.zeros((n, t_len), dtype=torch.long)
        alignment = torch.full((n, g_len, 4), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            s, t, g = r["input_ids"], r["teacher_input_ids"], r["teacher_alignment"]
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
            labels[i, :len(s)] = torch.as_tensor(s)
            t_ids[i, :len(t)] = torch.as_tensor(t)
            t_mask[i, :len(t)] = 1
            if len(g):
                alignment[i, :len(g)] = torch.as_tensor(g, dtype=torch.long).reshape(-1, 4)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "teacher_input_ids": t_ids,
                "teacher_attention_mask": t_mask, "teacher_alignment": alignment}


@contextmanager
def output_layer_restricted_to(model, token_ids: torch.Tensor):
    """Within the block, ``model``'s logits cover only ``token_ids`` (in that order): its output projection is
    replaced by those rows. For a teacher read by ``span_kl`` with ``teacher_logits: shared`` (the shared
    tokens are all it reads): Gemma 3's 262,144-entry head then computes 46,025 rows. Restored on exit."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"the model's output projection is a {type(head).__name__}, not a torch.nn.Linear; "
                         "it cannot be restricted to the shared tokens (use teacher_logits: full)")
    ids = token_ids.to(head.weight.device)
    small = torch.nn.Linear(head.in_features, len(ids), bias=head.bias is not None,
                            device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        small.weight.copy_(head.weight[ids])
        if head.bias is not None:
            small.bias.copy_(head.bias[ids])
    small.requires_grad_(False)
    model.set_output_embeddings(small)
    try:
        yield model
    finally:
        model.set_output_embeddings(head)


# ---------------------------------------------------------------------------------------------- vocabularies
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's table), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in backend.to_str()


def token_texts(tokenizer) -> dict[int, str]:
    """Each ordinary token's text (id -> string), as it appears in the decoded text.

    Byte-level BPE tokens (GPT-2, SmolLM2, Llama 3) are mapped back through the byte table;
    SentencePiece-style tokens (Gemma, Llama 2) have ``\u2581`` turned into a space and byte tokens
    ``<0xNN>`` into their (ASCII) character. Special and added tokens, and tokens that are not whole
    UTF-8 text (a fragment of a multi-byte character), are left out.
    """
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    specials |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    byte_level = _is_byte_level(tokenizer)
    table = _byte_decoder() if byte_level else None
    out: dict[int, str] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in specials:
            continue
        if byte_level:
            try:
                text = bytes(table[c] for c in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            value = int(token[3:5], 16)
            if value >= 128:
                continue
            text = chr(value)
        else:
            text = token.replace("\u2581", " ")
        if text:
            out[i] = text
    return out


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the tokens whose text is the same in both vocabularies: ``(student_ids, teacher_ids)``,
    aligned entry by entry, in increasing student id (one teacher id per text: the smallest)."""
    teacher_by_text: dict[str, int] = {}
    for i, text in token_texts(teacher_tokenizer).items():
        if text not in teacher_by_text or i < teacher_by_text[text]:
            teacher_by_text[text] = i
    pairs, seen = [], set()
    for i, text in sorted(token_texts(student_tokenizer).items()):
        if text in teacher_by_text and text not in seen:
            seen.add(text)
            pairs.append((i, teacher_by_text[text]))
    if not pairs:
        raise ValueError("the student and teacher vocabularies share no token text; span_kl needs shared tokens "
                         "(use uld, which needs none)")
    s, t = zip(*pairs)
    return torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long)
