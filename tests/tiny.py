"""Tiny local models and tokenizers for tests: built in milliseconds, nothing from the Hub."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green house tree river stone light dark "
    "music market price rises falls team wins loses game player minister vote election film "
    "star actor phone computer software chip network bank share profit loss city road car"
).split()


def sample_texts(n: int = 200, seed: int = 0, min_len: int = 5, max_len: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))) + " ." for _ in range(n)]


def wordpiece_vocab(texts: list[str], vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary that is the same in every process: the special tokens, every character (and
    its ``##`` continuation form), the words by decreasing count (ties alphabetical), then ``##`` suffix
    pieces by decreasing count, up to ``vocab_size``. (The library's WordPiece trainer breaks ties in
    hash-map order, which differs between processes, so tests built on it would vary from run to run.)"""
    from collections import Counter

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            words[word] += 1
    chars = sorted({c for w in words for c in w})
    vocab = list(specials) + chars + ["##" + c for c in sorted({c for w in words for c in w[1:]})]
    by_count = lambda counter: sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))  # noqa: E731
    pieces: Counter = Counter()
    for w, n in words.items():
        for i in range(1, len(w) - 1):
            pieces["##" + w[i:]] += n
    seen = set(vocab)
    for token, _ in by_count(words) + by_count(pieces):
        if len(vocab) >= vocab_size:
            break
        if token not in seen:
            vocab.append(token)
            seen.add(token)
    return {token: i for i, token in enumerate(vocab)}


def make_wordpiece_tokenizer(texts: list[str] | None = None, vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer over ``texts`` (or :func:`sample_texts`), identical in every process."""
    texts = texts or sample_texts()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(vocab=wordpiece_vocab(texts, vocab_size, specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def tiny_bert_config(vocab_size: int, layers: int = 4, hidden: int = 32, heads: int = 2, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        **kw,
    )


def tiny_bert_mlm(vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0, **kw) -> BertForMaskedLM:
    """A random BertForMaskedLM; ``heads=`` and other BertConfig fields pass through ``kw``."""
    import torch

    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert_config(vocab_size, layers=layers, hidden=hidden, **kw))
