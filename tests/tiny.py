"""Tiny local models and tokenizers for tests: built in milliseconds, nothing from the Hub."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green house tree river stone light dark "
    "music market price rises falls team wins loses game player minister vote election film "
    "star actor phone computer software chip network bank share profit loss city road car"
).split()


def sample_texts(n: int = 200, seed: int = 0, min_len: int = 5, max_len: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))) + " ." for _ in range(n)]


def make_wordpiece_tokenizer(texts: list[str] | None = None, vocab_size: int = 120) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer trained on ``texts`` (or on :func:`sample_texts`)."""
    texts = texts or sample_texts()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
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
