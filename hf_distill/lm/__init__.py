"""Causal language models: GGUF conversion, real offline teachers, LM data (packing, completion-only
masks, chat templates) and collators. Names load on first use (``import hf_distill.lm`` stays cheap).
"""

from __future__ import annotations

from hf_distill._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "hf_distill.lm.gguf": ("convert_gguf", "gguf_architecture", "default_cache_dir"),
    "hf_distill.lm.assets": ("smollm2_gguf", "smollm2_folder", "gemma3_gguf", "gemma3_folder"),
    "hf_distill.lm.data": ("pack_text_blocks", "tokenize_completion", "prepare_lm_dataset", "detect_lm_format"),
    "hf_distill.lm.collators": ("CompletionCollator",),
    "hf_distill.lm.arguments": ("CausalLMDistillationArguments",),
    "hf_distill.lm.trainer": ("CausalLMDistillationTrainer",),
    "hf_distill.lm.on_policy": ("sample_completions", "rebuild_batch", "choose_source"),
    "hf_distill.lm.cross_tokenizer": ("CrossTokenizerCollator", "build_cross_tokenizer_dataset", "align_tokens",
                                      "shared_vocabulary", "output_layer_restricted_to"),
})
