"""Convert a CTranslate2 (faster-whisper) Whisper checkpoint to a transformers model directory.

A CTranslate2 Whisper directory holds ``model.bin`` (the weights, format version 6), ``config.json``
(alignment heads, suppressed tokens), ``tokenizer.json`` and ``vocabulary.txt`` (or
``vocabulary.json``), and sometimes ``preprocessor_config.json``. :func:`convert_ct2_whisper` turns it
into a directory that ``WhisperForConditionalGeneration.from_pretrained`` and
``WhisperProcessor.from_pretrained`` load offline, with a generation config that makes ``generate``
prompt and suppress tokens the way Whisper does.

Weights come across exactly (float16 or bfloat16 weights are widened to float32 by default;
int8/int16 quantized weights are dequantized). Layout differences handled here:

* the fused query/key/value projection of self-attention is split in three, the fused key/value
  projection of cross-attention in two;
* the key projection's bias is dropped: Whisper has none, and a bias on the keys adds the same
  amount to every attention logit of a query, which the softmax cancels, so dropping it is exact;
* the output projection is tied to the token embeddings.

``model.bin`` may come split in parts (``model.bin.part1``, ``model.bin.part2``, ... as some
packages ship it); the parts are read as one stream without joining them on disk.

Command line: ``hf-distill convert-ct2 SRC OUT [--dtype float32|float16|bfloat16]``.

Public API::

    convert_ct2_whisper(src_dir, out_dir, *, dtype="float32", model_bin=None, multilingual=None) -> Path
    read_ct2_model(paths) -> CT2Model
    ct2_model_bin_paths(src_dir) -> list[Path]
    cli_main(argv) -> int
    CT2FormatError
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .ct2_format import (
    CT2_DTYPES,  # noqa: F401  (re-exported)
    SUPPORTED_FORMAT_VERSION,
    CT2FormatError,
    CT2Model,
    ct2_model_bin_paths,
    read_ct2_model,
)
from .ct2_configs import read_ct2_config, special_ids, whisper_feature_extractor, whisper_generation_config
from .ct2_tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "CT2FormatError",
    "CT2Model",
    "SUPPORTED_FORMAT_VERSION",
    "cli_main",
    "convert_ct2_whisper",
    "ct2_model_bin_paths",
    "read_ct2_model",
]


OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# activation ids of the format -> transformers activation names
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}


# --------------------------------------------------------------------------------------------
# weights


def _float_weight(model: CT2Model, name: str) -> torch.Tensor:
    """A weight as float32, dequantizing int8 (per-row scale) and int16 (one scale) weights."""
    value = model.get(name)
    if value.is_floating_point():
        return value.float()
    scale_name = f"{name}_scale"
    if scale_name not in model:
        raise CT2FormatError(f"{name!r} is stored as {value.dtype} without a {scale_name!r} to dequantize it")
    scale = model.get(scale_name).float()
    if scale.numel() == 1:
        return value.float() / scale.reshape(())
    if scale.numel() != value.shape[0]:
        raise CT2FormatError(f"{scale_name!r} has {scale.numel()} values for {value.shape[0]} rows")
    return value.float() / scale.reshape(-1, *([1] * (value.dim() - 1)))


def _count_layers(model: CT2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for n in model.names() if (m := pattern.match(n))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


@dataclass
class _Dims:
    n_mels: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    vocab_size: int
    max_source_positions: int
    max_target_positions: int
    activation: str


def _check_whisper(model: CT2Model) -> None:
    if model.name != "WhisperSpec":
        raise CT2FormatError(
            f"model.bin holds a CTranslate2 {model.name!r} model, not Whisper (expected spec 'WhisperSpec')"
        )
    required = (
        "encoder/conv1/weight",
        "encoder/conv2/weight",
        "encoder/position_encodings/encodings",
        "decoder/embeddings/weight",
        "decoder/position_encodings/encodings",
    )
    missing = [n for n in required if n not in model]
    if missing:
        raise CT2FormatError(f"model.bin is missing Whisper variables: {', '.join(missing)}")


def _infer_dims(model: CT2Model) -> _Dims:
    conv1 = model.get("encoder/conv1/weight")
    if conv1.dim() != 3:
        raise CT2FormatError(f"encoder/conv1/weight should be 3-D, has shape {tuple(conv1.shape)}")
    d_model, n_mels, _ = conv1.shape
    enc_layers = _count_layers(model, "encoder")
    dec_layers = _count_layers(model, "decoder")
    if enc_layers == 0 or dec_layers == 0:
        raise CT2FormatError(f"model.bin has {enc_layers} encoder and {dec_layers} decoder layers")
    # Whisper's attention heads are 64 wide; the file normally says how many there are.
    enc_heads = int(model.scalar("encoder/num_heads", d_model // 64))
    dec_heads = int(model.scalar("decoder/num_heads", enc_heads))
    for heads, where in ((enc_heads, "encoder"), (dec_heads, "decoder")):
        if heads <= 0 or d_model % heads:
            raise CT2FormatError(f"{where}/num_heads = {heads} does not divide d_model = {d_model}")
    act_id = model.scalar("decoder/activation", 3)
    if act_id not in _ACTIVATIONS:
        raise CT2FormatError(f"decoder/activation = {act_id} is not a known activation")
    if model.scalar("decoder/pre_norm", 1) != 1:
        raise CT2FormatError("decoder/pre_norm is off: not a Whisper decoder")
    if model.scalar("decoder/scale_embeddings", 0) not in (0, False):
        raise CT2FormatError("decoder/scale_embeddings is on: not a Whisper decoder")
    if model.scalar("decoder/alibi", 0) not in (0, False):
        raise CT2FormatError("decoder/alibi is on: not a Whisper decoder")
    embed = model.get("decoder/embeddings/weight")
    if embed.dim() != 2 or embed.shape[1] != d_model:
        raise CT2FormatError(f"decoder/embeddings/weight has shape {tuple(embed.shape)}, d_model is {d_model}")
    return _Dims(
        n_mels=int(n_mels),
        d_model=int(d_model),
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_heads=enc_heads,
        decoder_heads=dec_heads,
        encoder_ffn=int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn=int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        vocab_size=int(embed.shape[0]),
        max_source_positions=int(model.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.get("decoder/position_encodings/encodings").shape[0]),
        activation=_ACTIVATIONS[act_id],
    )


def _hf_state_dict(model: CT2Model, dims: _Dims) -> dict[str, torch.Tensor]:
    """transformers ``WhisperForConditionalGeneration`` state dict (float32) from CT2 variables."""
    d = dims.d_model
    sd: dict[str, torch.Tensor] = {}

    def put(hf: str, ct2: str):
        sd[hf] = _float_weight(model, ct2)

    def linear(hf: str, ct2: str):
        put(f"{hf}.weight", f"{ct2}/weight")
        put(f"{hf}.bias", f"{ct2}/bias")

    def norm(hf: str, ct2: str):
        put(f"{hf}.weight", f"{ct2}/gamma")
        put(f"{hf}.bias", f"{ct2}/beta")

    def split_rows(ct2: str, parts: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        w = _float_weight(model, f"{ct2}/weight")
        b = _float_weight(model, f"{ct2}/bias")
        if w.shape != (parts * d, d) or b.shape != (parts * d,):
            raise CT2FormatError(
                f"{ct2} should be fused {parts} x ({d}, {d}), has weight {tuple(w.shape)} and bias {tuple(b.shape)}"
            )
        return list(w.split(d, dim=0)), list(b.split(d, dim=0))

    def attention(hf: str, ct2: str, cross: bool):
        if cross:
            linear(f"{hf}.q_proj", f"{ct2}/linear_0")
            (wk, wv), (_bk, bv) = split_rows(f"{ct2}/linear_1", 2)
            out = f"{ct2}/linear_2"
        else:
            (wq, wk, wv), (bq, _bk, bv) = split_rows(f"{ct2}/linear_0", 3)
            sd[f"{hf}.q_proj.weight"] = wq
            sd[f"{hf}.q_proj.bias"] = bq
            out = f"{ct2}/linear_1"
        # The key bias is dropped: it shifts every logit of a query by the same amount (softmax-invariant).
        sd[f"{hf}.k_proj.weight"] = wk
        sd[f"{hf}.v_proj.weight"] = wv
        sd[f"{hf}.v_proj.bias"] = bv
        linear(f"{hf}.out_proj", out)

    enc = "model.encoder"
    for i in (1, 2):
        put(f"{enc}.conv{i}.weight", f"encoder/conv{i}/weight")
        put(f"{enc}.conv{i}.bias", f"encoder/conv{i}/bias")
    put(f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings")
    for i in range(dims.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        attention(f"{dst}.self_attn", f"{src}/self_attention", cross=False)
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")

    dec = "model.decoder"
    put(f"{dec}.embed_tokens.weight", "decoder/embeddings/weight")
    put(f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings")
    for i in range(dims.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        attention(f"{dst}.self_attn", f"{src}/self_attention", cross=False)
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        attention(f"{dst}.encoder_attn", f"{src}/attention", cross=True)
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")

    if "decoder/projection/weight" in model:
        proj = _float_weight(model, "decoder/projection/weight")
        if not torch.equal(proj, sd[f"{dec}.embed_tokens.weight"]):
            raise CT2FormatError("decoder/projection/weight differs from the embeddings: Whisper ties them")
    sd["proj_out.weight"] = sd[f"{dec}.embed_tokens.weight"]
    return sd


# --------------------------------------------------------------------------------------------
# conversion


def convert_ct2_whisper(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    model_bin: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    multilingual: bool | None = None,
) -> Path:
    """Convert the CTranslate2 Whisper checkpoint in ``src_dir`` into a transformers directory.

    Args:
        src_dir: directory with ``model.bin`` (or ``model.bin.part1``, ``.part2``, ...), ``config.json``,
            ``tokenizer.json`` and/or ``vocabulary.txt``/``vocabulary.json``, optionally
            ``preprocessor_config.json``.
        out_dir: where to write ``config.json``, ``generation_config.json``, ``model.safetensors``,
            the tokenizer files and ``preprocessor_config.json``; created if missing.
        dtype: ``"float32"`` (default, exact), ``"float16"`` or ``"bfloat16"``.
        model_bin: the weights file, or its parts in order, when they are not in ``src_dir``
            (e.g. parts shipped in different packages).
        multilingual: override the English-only/multilingual decision (default: multilingual when
            the vocabulary has at least 51,865 tokens, Whisper's own rule).

    Returns:
        ``Path(out_dir)``.

    Raises:
        CT2FormatError: ``model.bin`` is not a complete format-6 CTranslate2 Whisper model.
        FileNotFoundError / ValueError: missing or inconsistent tokenizer files.
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from .text_normalizer import english_spelling_mapping_path

    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir} is not a directory")
    if model_bin is None:
        paths = ct2_model_bin_paths(src_dir)
    elif isinstance(model_bin, (str, os.PathLike)):
        paths = [Path(model_bin)]
    else:
        paths = [Path(p) for p in model_bin]

    t0 = time.perf_counter()
    ct2 = read_ct2_model(paths)
    _check_whisper(ct2)
    dims = _infer_dims(ct2)
    ct2_config = read_ct2_config(src_dir)
    if multilingual is None:
        multilingual = dims.vocab_size >= 51865

    spelling = english_spelling_mapping_path()
    tokenizer = build_tokenizer(src_dir, dims.vocab_size, str(spelling) if spelling else None)
    ids = special_ids(tokenizer)
    generation_config = whisper_generation_config(tokenizer, ct2_config, dims.max_target_positions, multilingual)
    feature_extractor = whisper_feature_extractor(src_dir, dims.n_mels)

    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn,
        decoder_ffn_dim=dims.decoder_ffn,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        activation_function=dims.activation,
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["sot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        suppress_tokens=list(generation_config.suppress_tokens or []),
        begin_suppress_tokens=list(generation_config.begin_suppress_tokens or []),
    )
    state_dict = _hf_state_dict(ct2, dims)
    del ct2
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict())
    if expected != set(state_dict):
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise CT2FormatError(f"weights do not fit the Whisper layout: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in model.state_dict().items():
        if tuple(value.shape) != tuple(state_dict[name].shape):
            raise CT2FormatError(
                f"{name}: model.bin gives shape {tuple(state_dict[name].shape)}, expected {tuple(value.shape)}"
            )
    out_dtype = OUTPUT_DTYPES[dtype]
    state_dict = {k: v.to(out_dtype).contiguous() for k, v in state_dict.items()}
    state_dict["proj_out.weight"] = state_dict["model.decoder.embed_tokens.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    if model.proj_out.weight is not model.model.decoder.embed_tokens.weight:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise RuntimeError(f"conversion left tensors uninitialised: {leftover[:5]}")
    model.config.dtype = out_dtype
    model.generation_config = generation_config
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    if spelling is not None:
        # The tokenizer's `normalize=True` decoding reads Whisper's spelling table from here.
        shutil.copyfile(spelling, out_dir / "normalizer.json")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "converted %s -> %s: %.1fM parameters, d_model %d, %d+%d layers, %d heads, vocab %d, %s, %s, %.1f s",
        src_dir, out_dir, n_params / 1e6, dims.d_model, dims.encoder_layers, dims.decoder_layers,
        dims.encoder_heads, dims.vocab_size, "multilingual" if multilingual else "English-only", dtype,
        time.perf_counter() - t0,
    )
    return out_dir


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``hf-distill convert-ct2 SRC OUT [--dtype D] [--model-bin PART ...] [--multilingual|--english-only]``."""
    parser = argparse.ArgumentParser(
        prog="hf-distill convert-ct2",
        description="Convert a CTranslate2 (faster-whisper) Whisper model directory into a transformers "
        "WhisperForConditionalGeneration directory with its processor and generation config.",
    )
    parser.add_argument("src", help="CTranslate2 model directory (model.bin, config.json, tokenizer.json, vocabulary.*)")
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument(
        "--model-bin", nargs="+", metavar="PATH",
        help="the model.bin file, or its parts in order, when they are not in SRC",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--multilingual", dest="multilingual", action="store_const", const=True, default=None)
    group.add_argument("--english-only", dest="multilingual", action="store_const", const=False)
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert_ct2_whisper(
            args.src, args.out, dtype=args.dtype, model_bin=args.model_bin, multilingual=args.multilingual
        )
    except (CT2FormatError, FileNotFoundError, ValueError) as err:
        print(f"hf-distill convert-ct2: error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli_main())
