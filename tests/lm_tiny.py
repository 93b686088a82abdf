"""Tiny causal-LM pieces for tests: a byte-level BPE chat tokenizer trained on the fly and tiny Llama / Gemma 3."""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tiny llama",
    "a small model learns from a big one",
    "what is the capital of france? paris is the capital of france.",
    "user assistant system: two plus two is four",
] * 20


@functools.cache
def _trained_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    return tok.to_str()


def byte_level_vocab(vocab_size: int = 320) -> tuple[list[str], list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings, special tokens) of the trained BPE, as a GGUF stores them."""
    import json

    model = json.loads(_trained_json(vocab_size))["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, list(SPECIALS)


def tiny_chat_tokenizer(vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (fast, with offsets), EOS ``<|im_end|>``, pad ``<|endoftext|>``, a ChatML template."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size)),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = chat_template
    return tok


def randomize(model, seed: int = 0, std: float = 0.2):
    """Every parameter drawn from N(0, std) (a fresh model's norms are all ones; this makes them matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def tiny_llama(vocab_size: int = 320, *, layers: int = 4, tie: bool = True, heads: int = 4, kv_heads: int = 2,
               seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(cfg), seed)


def tiny_gemma3(vocab_size: int = 320, *, layers: int = 6, tie: bool = True, seed: int = 0):
    """Gemma 3 text model: sliding-window layers with a full-attention layer every sixth, as the real one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                           max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(seed)
    return randomize(Gemma3ForCausalLM(cfg), seed)
