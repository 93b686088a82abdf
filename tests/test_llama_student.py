"""Students cut from Llama-style causal LMs (Llama, Gemma 3): layers, embeddings, norm, tied/untied head,
per-layer config lists, generation config and tokenizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lm_tiny import randomize, tiny_chat_tokenizer, tiny_gemma3, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hf_distill.students import build_student
from hf_distill.students.build import cli_main

MAKERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def hand_built(teacher, layers: list[int]):
    """The teacher itself running only ``layers``: its own modules, in that order (no copying code involved)."""
    ref = copy.deepcopy(teacher)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in layers])
    ref.config.num_hidden_layers = len(layers)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.layer_types = [teacher.config.layer_types[i] for i in layers]
    for i, layer in enumerate(ref.model.layers):  # attention modules know their index (cache slots)
        layer.self_attn.layer_idx = i
    return ref.eval()


def ids_and_mask():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 320, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("tie", [True, False])
def test_all_layers_equal_teacher_and_chosen_layers_equal_reference(family, tie):
    teacher = MAKERS[family](tie=tie)
    teacher.generation_config = GenerationConfig(eos_token_id=[2, 5], pad_token_id=0, temperature=0.7,
                                                 do_sample=True, top_p=0.9)
    ids, mask = ids_and_mask()
    total = teacher.config.num_hidden_layers
    with torch.no_grad():
        full = build_student(teacher, layers=list(range(total))).eval()
        torch.testing.assert_close(full(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
        chosen = [0, 2, total - 1]
        student = build_student(teacher, layers=chosen).eval()
        expected = hand_built(teacher, chosen)(ids, attention_mask=mask).logits
        torch.testing.assert_close(student(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
        assert not torch.allclose(expected, teacher(ids, attention_mask=mask).logits, atol=1e-3)  # layers matter

    assert student.config.num_hidden_layers == 3 and student.distillation_teacher_layers == chosen
    assert student.config.tie_word_embeddings is tie
    tied = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied is tie
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    if family == "gemma3":
        assert teacher.config.layer_types[-1] == "full_attention"
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in chosen]
        assert [layer.self_attn.is_sliding for layer in student.model.layers] == [True, True, False]
    assert student.generation_config.eos_token_id == [2, 5] and student.generation_config.top_p == 0.9
    assert student.generation_config is not teacher.generation_config


def test_untied_head_is_a_copy_not_shared():
    teacher = tiny_llama(tie=False)
    student = build_student(teacher, num_layers=2)
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    assert not torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert not torch.equal(student.lm_head.weight, student.model.embed_tokens.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_init_student_cli_saves_model_tokenizer_and_generation_config(tmp_path, capsys, tie):
    tokenizer = tiny_chat_tokenizer()
    teacher = tiny_llama(len(tokenizer), layers=4, tie=tie)
    teacher.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=0,
                                                 max_new_tokens=7)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student"
    assert cli_main(["--teacher", str(tmp_path / "teacher"), "--output_dir", str(out), "--layers", "0,3"]) == 0
    printed = capsys.readouterr().out
    assert "student layer  1 <- teacher layer 3" in printed and "LlamaForCausalLM" in printed

    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.num_hidden_layers == 2
    assert student.config.tie_word_embeddings is tie
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.chat_template == tokenizer.chat_template and reloaded_tok.eos_token == "<|im_end|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.eos_token_id] and gen["max_new_tokens"] == 7
    assert json.loads((out / "distillation_init.json").read_text())["teacher_layers"] == [0, 3]
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = hand_built(teacher.eval(), [0, 3])(ids, attention_mask=mask).logits
        torch.testing.assert_close(student(ids, attention_mask=mask).logits, expected, rtol=1e-6, atol=1e-6)


def test_gemma3_student_keeps_sliding_window_behaviour_on_long_input():
    """Past the sliding window, a sliding layer and a full layer differ: the sliced layer_types must follow."""
    teacher = tiny_gemma3(layers=6)
    ids = torch.randint(1, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    chosen = [5, 1]  # the full-attention layer first
    student = build_student(teacher, layers=chosen).eval()
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, hand_built(teacher, chosen)(ids).logits, rtol=0, atol=0)
        wrong = copy.deepcopy(student)
        wrong.config.layer_types = ["sliding_attention", "sliding_attention"]
        for layer in wrong.model.layers:
            layer.attention_type, layer.self_attn.is_sliding = "sliding_attention", True
            layer.self_attn.sliding_window = teacher.config.sliding_window
        assert not torch.allclose(wrong(ids).logits, student(ids).logits, atol=1e-4)


def test_smollm3_no_rope_layers_sliced_with_the_layers():
    """SmolLM3 (Llama-style, every fourth layer without rotary embeddings): ``no_rope_layers`` follows the layers."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    cfg = SmolLM3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    teacher = randomize(SmolLM3ForCausalLM(cfg))
    assert teacher.config.no_rope_layers == [1, 1, 1, 0]
    chosen = [3, 0]
    student = build_student(teacher, layers=chosen).eval()
    assert student.config.no_rope_layers == [0, 1]
    assert [layer.self_attn.use_rope for layer in student.model.layers] == [0, 1]
    ids, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(student(ids, attention_mask=mask).logits,
                                   hand_built(teacher, chosen)(ids, attention_mask=mask).logits, rtol=0, atol=0)
