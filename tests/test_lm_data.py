"""Causal-LM data: packing, completion-only labels (plain, conversational, multi-turn chat), the collator."""

from __future__ import annotations

import datasets
import pytest
import torch
from lm_tiny import CHAT_TEMPLATE, tiny_chat_tokenizer, tiny_llama

from hf_distill.lm.collators import CompletionCollator, prompt_length_from_labels
from hf_distill.lm.data import (
    IGNORE_INDEX,
    PromptTooLongError,
    detect_lm_format,
    pack_text_blocks,
    prepare_lm_dataset,
    tokenize_completion,
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "hello tiny llama"},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def counted_text(tok, row) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])


def test_plain_prompt_completion_counts_completion_and_eos_only(tok):
    row = tokenize_completion({"prompt": "the capital of france is", "completion": " paris"}, tok, max_length=64)
    prompt_ids = tok("the capital of france is")["input_ids"]
    completion_ids = tok(" paris", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + completion_ids + [tok.eos_token_id]
    assert row["prompt_length"] == len(prompt_ids)
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_multi_turn_chat_counts_every_assistant_turn_and_nothing_else(tok):
    row = tokenize_completion({"messages": CHAT}, tok, max_length=256)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(row["input_ids"]) == full
    assert row["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]  # the template's own tokens
    # counted: exactly the two assistant turns (their text and the end of turn), in order
    assert counted_text(tok, row) == "hello tiny llama<|im_end|>\nfour<|im_end|>\n"
    spans = [(i, lab != IGNORE_INDEX) for i, lab in enumerate(row["labels"])]
    runs = sum(1 for (i, c) in spans if c and (i == 0 or not spans[i - 1][1]))
    assert runs == 2
    # the prompt is everything before the last assistant turn, ending with the generation prompt
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["input_ids"][: row["prompt_length"]]) == prompt
    first_prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    n_first = len(tok(first_prompt, add_special_tokens=False)["input_ids"])
    assert set(row["labels"][:n_first]) == {IGNORE_INDEX} and row["labels"][n_first] != IGNORE_INDEX
    user_ids = set(tok("what is two plus two?", add_special_tokens=False)["input_ids"]) - \
        set(tok("hello tiny llama four", add_special_tokens=False)["input_ids"])
    assert not user_ids & {lab for lab in row["labels"] if lab != IGNORE_INDEX}


def test_conversational_prompt_completion(tok):
    example = {"prompt": CHAT[:4], "completion": [CHAT[4]]}
    row = tokenize_completion(example, tok, max_length=256)
    assert counted_text(tok, row) == "four<|im_end|>\n"  # earlier assistant turns are prompt here
    prompt = tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["input_ids"][: row["prompt_length"]]) == prompt
    assert all(lab == IGNORE_INDEX for lab in row["labels"][: row["prompt_length"]])


def test_template_that_rewrites_history_uses_generation_marks(tok):
    # drops earlier assistant turns' content (as reasoning templates do): not prefix-stable
    rewriting = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}"
        "{% if loop.last %}{{ m['content'] }}{% else %}ok{% endif %}<|im_end|>\n{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    marked = tiny_chat_tokenizer(chat_template=rewriting)
    row = tokenize_completion({"messages": CHAT}, marked, max_length=256)
    assert counted_text(marked, row) == "ok<|im_end|>\nfour<|im_end|>\n"
    unmarked = tiny_chat_tokenizer(chat_template=rewriting.replace("{% generation %}", "")
                                   .replace("{% endgeneration %}", ""))
    with pytest.raises(ValueError, match="generation"):
        tokenize_completion({"messages": CHAT}, unmarked, max_length=256)


def test_row_errors(tok):
    plain = tiny_chat_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        tokenize_completion({"messages": CHAT}, plain, max_length=64)
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_completion({"messages": CHAT[:2]}, tok, max_length=64)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tokenize_completion({"messages": [{"role": "user"}]}, tok, max_length=64)
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        tokenize_completion({"prompt": "hi", "completion": [CHAT[2]]}, tok, max_length=64)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_completion({"prompt": "hi", "completion": "there"}, tok, max_length=1)


def test_truncation_from_the_right_and_long_prompts(tok):
    example = {"prompt": "hello world", "completion": " the quick brown fox jumps over the lazy dog"}
    whole = tokenize_completion(example, tok, max_length=512)
    cut = tokenize_completion(example, tok, max_length=whole["prompt_length"] + 3)
    assert cut["input_ids"] == whole["input_ids"][: whole["prompt_length"] + 3]
    assert cut["labels"] == whole["labels"][: whole["prompt_length"] + 3]
    assert cut["prompt_length"] == whole["prompt_length"]
    with pytest.raises(PromptTooLongError, match=r"prompt has \d+ tokens, max_length is \d+.*drop_long_prompts"):
        tokenize_completion(example, tok, max_length=whole["prompt_length"])
    ds = datasets.Dataset.from_dict({"prompt": ["hi", "hello world " * 20], "completion": [" four", " paris"]})
    with pytest.raises(PromptTooLongError):
        prepare_lm_dataset(ds, tok, max_length=16)
    kept = prepare_lm_dataset(ds, tok, max_length=16, drop_long_prompts=True)
    assert len(kept) == 1 and kept[0]["input_ids"] == tokenize_completion(ds[0], tok, max_length=16)["input_ids"]


def test_pack_text_blocks(tok):
    texts = ["the quick brown fox jumps over the lazy dog", "hello world", "a small model learns from a big one"]
    packed = pack_text_blocks(texts, tok, 8)
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(packed) == len(stream) // 8
    assert [t for row in packed for t in row["input_ids"]] == stream[: 8 * len(packed)]
    for row in packed:
        assert len(row["input_ids"]) == 8 and row["labels"] == row["input_ids"] and set(row["attention_mask"]) == {1}
    no_eos = pack_text_blocks(datasets.Dataset.from_dict({"body": texts}), tok, 4, add_eos=False, text_column="body")
    assert all(tok.eos_token_id not in row for row in no_eos["input_ids"])
    with pytest.raises(ValueError, match="not one string"):
        pack_text_blocks("just one text", tok, 8)


def test_format_detection_and_prepare(tok):
    assert detect_lm_format(["messages", "id"]) == "messages"
    assert detect_lm_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_lm_format(["text", "label"]) == "text"
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\]; accepted: 'messages'.*'prompt' \+ "
                                         r"'completion'.*'text'"):
        detect_lm_format(["question", "answer"])
    with pytest.raises(ValueError, match="needed together"):
        prepare_lm_dataset(datasets.Dataset.from_dict({"prompt": ["a"], "answer": ["b"]}), tok, max_length=8)

    chats = prepare_lm_dataset(datasets.Dataset.from_dict({"messages": [CHAT, CHAT[:3]], "id": [1, 2]}), tok,
                               max_length=256)
    assert chats.column_names == ["input_ids", "attention_mask", "labels", "prompt_length"]
    assert chats[1]["input_ids"] == tokenize_completion({"messages": CHAT[:3]}, tok, max_length=256)["input_ids"]
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hello world " * 10]})})
    text = prepare_lm_dataset(split, tok, max_length=4)
    assert set(text) == {"train"} and all(len(r) == 4 for r in text["train"]["input_ids"])


def rows(tok):
    return [
        tokenize_completion({"messages": CHAT}, tok, max_length=256),
        tokenize_completion({"prompt": "hi", "completion": " four"}, tok, max_length=256),
        tokenize_completion({"prompt": [CHAT[1]], "completion": [CHAT[2]]}, tok, max_length=256),
    ]


def test_collator_right_pads_and_left_pads_prompts(tok):
    features = rows(tok)
    batch = CompletionCollator(tok, pad_to_multiple_of=8)(features)
    longest = max(len(f["input_ids"]) for f in features)
    width = -(-longest // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    assert "prompt_length" not in batch
    for i, f in enumerate(features):
        n, p = len(f["input_ids"]), f["prompt_length"]
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert set(batch["input_ids"][i, n:].tolist()) <= {tok.pad_token_id}
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert set(batch["labels"][i, n:].tolist()) <= {IGNORE_INDEX}
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        prompt_width = batch["prompt_input_ids"].shape[1]
        assert prompt_width % 8 == 0
        assert batch["prompt_input_ids"][i, prompt_width - p:].tolist() == f["input_ids"][:p]
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (prompt_width - p) + [1] * p
    # without prompt_length (Trainer's remove_unused_columns drops it) the prompt is read from the labels
    stripped = [{k: v for k, v in f.items() if k != "prompt_length"} for f in features]
    again = CompletionCollator(tok, pad_to_multiple_of=8)(stripped)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert [prompt_length_from_labels(f["labels"]) for f in features] == [f["prompt_length"] for f in features]


def test_collator_packed_rows_have_no_prompts_and_errors(tok):
    packed = pack_text_blocks(["hello world " * 10], tok, 6)
    batch = CompletionCollator(tok)([packed[0], packed[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["labels"], batch["input_ids"])
    forced = CompletionCollator(tok, prompts=True)([packed[0]])
    assert forced["prompt_attention_mask"].sum() == 0
    with pytest.raises(ValueError, match="differ in length"):
        CompletionCollator(tok)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="prepare_lm_dataset"):
        CompletionCollator(tok)([{"text": "raw"}])


def test_prompt_and_padding_never_count_in_the_loss(tok):
    """The model's loss on a collated batch is the mean cross-entropy over completion tokens alone."""
    model = tiny_llama(len(tok), layers=2)
    batch = CompletionCollator(tok)(rows(tok))
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for i, f in enumerate(rows(tok)):
        log_probs = torch.log_softmax(logits[i], dim=-1)
        for pos in range(1, len(f["input_ids"])):
            if f["labels"][pos] != IGNORE_INDEX:
                terms.append(-log_probs[pos - 1, f["input_ids"][pos]])
    assert len(terms) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    # gradient reaches no prompt or padding position of the logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                      ignore_index=IGNORE_INDEX).backward()
    counted = torch.zeros_like(batch["labels"], dtype=torch.bool)
    counted[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert logits.grad[~counted].abs().max() == 0 and logits.grad[counted].abs().sum() > 0
    assert CHAT_TEMPLATE == tok.chat_template


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_collator_as_trainer_data_collator(tok, tmp_path, remove_unused_columns):
    """Works with transformers' Trainer whether or not it drops ``prompt_length`` (then read from the labels)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(len(tok), layers=2)
    before = model.lm_head.weight.detach().clone()
    data = prepare_lm_dataset(datasets.Dataset.from_dict({"messages": [CHAT, CHAT[:3]] * 2}), tok, max_length=256)
    seen = []
    collator = CompletionCollator(tok)

    def collate(features):
        batch = collator(features)
        seen.append(batch["prompt_input_ids"])
        return batch

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             remove_unused_columns=remove_unused_columns, use_cpu=True, save_strategy="no")
    result = Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.lm_head.weight, before)
    expected = collator([data[i] for i in range(4)])["prompt_input_ids"]
    assert sorted(map(tuple, seen[0].tolist())) == sorted(map(tuple, expected.tolist()))  # rows may be shuffled
