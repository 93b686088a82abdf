"""The configurations of a Whisper converted from CTranslate2: its special token ids, language tokens,
``GenerationConfig`` (from the CTranslate2 ``config.json``: suppressed tokens, alignment heads) and
``WhisperFeatureExtractor`` (from ``preprocessor_config.json`` where the folder has one)."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["language_tokens", "read_ct2_config", "special_ids", "whisper_feature_extractor",
           "whisper_generation_config"]



def special_ids(tokenizer) -> dict[str, int | None]:
    def tid(token):
        i = tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == tokenizer.unk_token_id and token != tokenizer.unk_token else i

    ids = {
        "eot": tid("<|endoftext|>"),
        "sot": tid("<|startoftranscript|>"),
        "translate": tid("<|translate|>"),
        "transcribe": tid("<|transcribe|>"),
        "prev": tid("<|startofprev|>"),
        "lm": tid("<|startoflm|>"),
        "no_timestamps": tid("<|notimestamps|>"),
        "no_speech": tid("<|nospeech|>") or tid("<|nocaptions|>"),
    }
    return ids


def language_tokens(tokenizer, ids) -> dict[str, int]:
    """Language tokens sit between <|startoftranscript|> and <|translate|>."""
    if ids["translate"] is None:
        return {}
    out = {}
    for i in range(ids["sot"] + 1, ids["translate"]):
        token = tokenizer.convert_ids_to_tokens(i)
        if re.fullmatch(r"<\|[a-z]{2,3}\|>", token or ""):
            out[token] = i
    return out


def read_ct2_config(src_dir: Path) -> dict:
    path = src_dir / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def whisper_generation_config(tokenizer, ct2_config: dict, max_target_positions: int, multilingual: bool):
    from transformers import GenerationConfig

    ids = special_ids(tokenizer)
    suppress = [int(t) for t in ct2_config.get("suppress_ids", [])]
    begin_suppress = [int(t) for t in ct2_config.get("suppress_ids_begin", [220, ids["eot"]])]
    kwargs = dict(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["sot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        max_length=max_target_positions,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    alignment = ct2_config.get("alignment_heads")
    if alignment:
        kwargs["alignment_heads"] = [[int(layer), int(head)] for layer, head in alignment]
    if multilingual:
        lang_to_id = language_tokens(tokenizer, ids)
        if not lang_to_id or ids["transcribe"] is None:
            raise ValueError("multilingual model, but the tokenizer has no language or task tokens")
        kwargs["lang_to_id"] = lang_to_id
        kwargs["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
        # Prompt: <|startoftranscript|> <|language|> <|transcribe|> <|notimestamps|>; the language is
        # detected unless `generate(language=...)` names one.
        kwargs["task"] = "transcribe"
    # English-only: generate prompts <|startoftranscript|> <|notimestamps|> by itself.
    return GenerationConfig(**kwargs)


def whisper_feature_extractor(src_dir: Path, n_mels: int):
    from transformers import WhisperFeatureExtractor

    path = src_dir / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        data = {k: v for k, v in data.items() if k not in ("feature_extractor_type", "processor_class", "mel_filters")}
        fe = WhisperFeatureExtractor(**data)
        if fe.feature_size != n_mels:
            raise ValueError(f"{path}: feature_size {fe.feature_size} but the model takes {n_mels} mel bins")
        return fe
    return WhisperFeatureExtractor(feature_size=n_mels)
