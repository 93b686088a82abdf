"""On-policy distillation (GKD) and sequence-level KD: where completions come from, how the batch is rebuilt
and counted, reproducibility, and that the student gets closer to the teacher."""

import copy

import pytest
import torch
from datasets import Dataset
from tiny import WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_distill.lm import CompletionCollator
from hf_distill.lm.arguments import CausalLMDistillationArguments
from hf_distill.lm.on_policy import (
    choose_source,
    rebuild_batch,
    row_generators,
    row_seed,
    sample_completions,
)
from hf_distill.lm.trainer import CausalLMDistillationTrainer
from hf_distill.losses import generalized_jsd_loss

PAD, EOS = 0, 1
JSD = '[{"loss": "jsd", "beta": 0.5, "temperature": 1.0}]'


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tiny.WORDS: <pad> 0, <eos> 1, <unk> 2."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def tiny_llama(vocab: int, layers: int, seed: int, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                                        bos_token_id=None, initializer_range=init))


def pair(tokenizer):
    # A wide initialisation gives the teacher peaked distributions unlike the student's.
    return tiny_llama(len(tokenizer), 2, seed=1, init=0.2), tiny_llama(len(tokenizer), 1, seed=2)


def completion_rows(tokenizer, n: int, seed: int = 0, text: bool = False) -> Dataset:
    """Prompt-completion rows as prepare_lm_dataset gives them (labels -100 on the prompt, prompt_length)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, len(tokenizer), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        completion = torch.randint(3, len(tokenizer), (int(torch.randint(2, 5, (1,), generator=g)),),
                                   generator=g).tolist() + [EOS]
        if text:  # plain text: every token counts, no prompt
            ids = prompt + completion
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "prompt_length": 0})
        else:
            rows.append({"input_ids": prompt + completion, "attention_mask": [1] * (len(prompt) + len(completion)),
                         "labels": [-100] * len(prompt) + completion, "prompt_length": len(prompt)})
    return Dataset.from_list(rows)


class Recording(CausalLMDistillationTrainer):
    """Keeps every training batch the loss saw."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        name = "seen" if model.training else "evaluated"
        setattr(self, name, getattr(self, name, []) + [{k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}])
        return super().compute_loss(model, inputs, *args, **kwargs)


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=1,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True, max_grad_norm=1e9, distillation=JSD, task_weight=0.0, max_new_tokens=6,
                lmbda=1.0, generation_temperature=0.9)
    base.update(kw)
    return CausalLMDistillationArguments(**base)


def run(tokenizer, tmp_path, n=8, teacher=None, student=None, **kw):
    if teacher is None:
        teacher, student = pair(tokenizer)
    trainer = Recording(model=student, teacher=teacher, args=make_args(tmp_path, **kw),
                        train_dataset=completion_rows(tokenizer, n), data_collator=CompletionCollator(tokenizer),
                        processing_class=tokenizer)
    trainer.train()
    return trainer


def split(batch, row):
    """(prompt tokens, completion tokens) of row ``row`` of a rebuilt batch."""
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
    return prompt, ids[labels != -100]


def reference(model, prompt, seed, **kw):
    """``model.generate`` for one prompt after ``torch.manual_seed(seed)``: the completion tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.eval().generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                    max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, **kw)
    tokens = out[0, prompt.numel():]
    ends = (tokens == EOS).nonzero()
    return tokens[: int(ends[0]) + 1] if len(ends) else tokens


# ---------------------------------------------------------------------------- where completions come from
def test_lmbda_one_trains_on_the_students_samples(tokenizer, tmp_path):
    teacher, student = pair(tokenizer)
    student_before, teacher_copy = copy.deepcopy(student), copy.deepcopy(teacher)
    trainer = run(tokenizer, tmp_path, teacher=teacher, student=student, top_p=0.95)
    (batch,) = trainer.seen
    sampling = dict(do_sample=True, temperature=0.9, top_k=0, top_p=0.95)
    differs = 0
    for row in range(2):
        prompt, completion = split(batch, row)
        seed = row_seed(0, 0, row)
        # exactly the student's draws for that row's seed (transformers' own sampler), not the teacher's
        assert torch.equal(completion, reference(student_before, prompt, seed, **sampling)), row
        differs += not torch.equal(completion, reference(teacher_copy, prompt, seed, **sampling))
        # the rebuilt row: the prompt from position 0, then the completion, then padding
        length = prompt.numel() + completion.numel()
        assert torch.equal(batch["input_ids"][row][: prompt.numel()], prompt)
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert (batch["labels"][row][: prompt.numel()] == -100).all() and (batch["labels"][row][length:] == -100).all()
    assert differs >= 1
    log = trainer.state.log_history[0]
    assert log["on_policy_fraction"] == 1.0 and log["generation_seconds"] > 0
    assert log["generated_tokens"] == int((batch["labels"] != -100).sum())
    assert student.training and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())
    # evaluation scores the dataset's own completions (its batches are never regenerated)
    held_out = completion_rows(tokenizer, 4, seed=3)
    assert trainer.evaluate(held_out)["eval_loss"] > 0
    (evaluated,) = trainer.evaluated
    assert torch.equal(evaluated["input_ids"], CompletionCollator(tokenizer)(list(held_out))["input_ids"])


def test_seq_kd_trains_on_the_teachers_generations(tokenizer, tmp_path):
    teacher, student = pair(tokenizer)
    teacher_copy, student_copy = copy.deepcopy(teacher), copy.deepcopy(student)
    trainer = run(tokenizer, tmp_path, teacher=teacher, student=student, lmbda=0.0, seq_kd=True,
                  generation_temperature=0.0)
    (batch,) = trainer.seen
    differs = 0
    for row in range(2):
        prompt, completion = split(batch, row)
        assert torch.equal(completion, reference(teacher_copy, prompt, 0, do_sample=False)), row
        differs += not torch.equal(completion, reference(student_copy, prompt, 0, do_sample=False))
    assert differs >= 1
    log = trainer.state.log_history[0]
    assert log["seq_kd_fraction"] == 1.0 and log["on_policy_fraction"] == 0.0


def test_lmbda_zero_leaves_the_batch_as_collated(tokenizer, tmp_path):
    trainer = run(tokenizer, tmp_path, n=2, lmbda=0.0)
    (batch,) = trainer.seen
    rows = completion_rows(tokenizer, 2)
    order = [int(i) for i in trainer.get_train_dataloader().sampler]  # the seeded shuffle of that step
    expected = CompletionCollator(tokenizer)([rows[i] for i in order])
    for key in ("input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    assert "generation_seconds" not in trainer.state.log_history[0]


# ---------------------------------------------------------------------------- the rebuilt batch
def test_rebuilt_batch_counts_only_completion_tokens():
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    completions = torch.tensor([[11, EOS, 0], [12, 13, 14]])
    out = rebuild_batch(prompts, (prompts != 0).long(), completions, torch.tensor([2, 3]), pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 11, EOS, 0, 0, 0], [7, 8, 9, 10, 12, 13, 14]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert out["labels"].tolist() == [[-100, -100, 11, EOS, -100, -100, -100], [-100] * 4 + [12, 13, 14]]
    # right-padded prompts are moved to the left first
    right = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    again = rebuild_batch(right, (right != 0).long(), completions, torch.tensor([2, 3]), pad_token_id=0)
    assert all(torch.equal(again[k], out[k]) for k in out)


class Scripted(torch.nn.Module):
    """A 'model' whose next token per row follows a script; counts its forward passes."""

    def __init__(self, script, vocab=20):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        step = self.calls
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for row, tokens in enumerate(self.script):
            logits[row, -1, tokens[min(step, len(tokens) - 1)]] = 10.0
        return CausalLMOutputWithPast(logits=logits)


def test_sampling_stops_at_end_of_sequence_and_pads_after_it():
    model = Scripted([[4, EOS, 7, 8, 9, 9], [5, 6, EOS, 9, 9, 9]])
    tokens, lengths = sample_completions(model, torch.tensor([[3, 3], [0, 3]]), torch.tensor([[1, 1], [0, 1]]),
                                         max_new_tokens=6, temperature=0.0, eos_token_ids=[EOS], pad_token_id=0)
    assert tokens.tolist() == [[4, EOS, 0], [5, 6, EOS]] and lengths.tolist() == [2, 3]
    assert model.calls == 3  # the prompt pass and two steps: no forward after every row ended
    endless = Scripted([[4, 5, 6, 7, 8, 9]])
    tokens, lengths = sample_completions(endless, torch.tensor([[3]]), max_new_tokens=4, temperature=0.0,
                                         eos_token_ids=[EOS])
    assert tokens.tolist() == [[4, 5, 6, 7]] and lengths.tolist() == [4] and endless.calls == 4


def test_ended_rows_leave_the_batch_and_every_row_samples_as_alone(tokenizer):
    model = tiny_llama(len(tokenizer), 2, seed=1, init=0.2).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4  # rows end after different numbers of tokens
    ids = torch.randint(3, len(tokenizer), (8, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, :2] = 0  # half the prompts are shorter (left-padded)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    tokens, lengths = sample_completions(model, ids, mask, max_new_tokens=12, temperature=1.0, eos_token_ids=[EOS],
                                         generators=row_generators(0, 0, 0, 8, "cpu"))
    hook.remove()
    assert len(set(lengths.tolist())) > 2 and lengths.max() == 12
    # after the prompt pass, each step runs exactly the rows that have not ended
    assert sizes == [8] + [int((lengths > t).sum()) for t in range(1, 12)]
    for row in range(8):
        alone, length = sample_completions(model, ids[row:row + 1][:, mask[row].bool()], max_new_tokens=12,
                                           temperature=1.0, eos_token_ids=[EOS],
                                           generators=row_generators(0, 0, row, 1, "cpu"))
        assert torch.equal(alone[0, : int(length)], tokens[row, : int(lengths[row])]), row
        assert (tokens[row, int(lengths[row]):] == PAD).all()


@pytest.mark.parametrize("fused", [False, True])
def test_loss_is_the_jsd_over_completion_tokens_only(tokenizer, tmp_path, fused):
    spec = f'[{{"loss": "jsd", "beta": 0.5, "temperature": 1.0, "fused": {str(fused).lower()}}}]'
    trainer = run(tokenizer, tmp_path, learning_rate=0.0, distillation=spec)
    (batch,) = trainer.seen
    student, teacher = trainer.model.eval(), trainer.teacher
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    # by hand: the generalized JSD at each completion position, averaged over those positions only
    log_s, log_t = s[counted].log_softmax(-1), t[counted].log_softmax(-1)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log(torch.tensor(0.5)), log_t + torch.log(torch.tensor(0.5))]),
                            0)
    by_hand = (0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)).mean()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(by_hand), rel=1e-4)
    assert float(generalized_jsd_loss(s, t, beta=0.5, mask=counted)) == pytest.approx(float(by_hand), rel=1e-5)


# ---------------------------------------------------------------------------- reproducibility and counting
def test_same_seed_same_samples(tokenizer, tmp_path):
    first = run(tokenizer, tmp_path / "a", max_steps=2).seen
    again = run(tokenizer, tmp_path / "b", max_steps=2).seen
    other = run(tokenizer, tmp_path / "c", max_steps=2, seed=1).seen
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again))
    assert not all(x["input_ids"].shape == y["input_ids"].shape and torch.equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(first, other))


def test_accumulation_equals_large_batch_on_policy(tokenizer, tmp_path):
    big = run(tokenizer, tmp_path / "big", per_device_train_batch_size=4, max_steps=2)
    acc = run(tokenizer, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    for step in range(2):  # the same rows sampled the same tokens, whichever micro-batch they were in
        rows = [split(big.seen[step], r) for r in range(4)]
        rows_acc = [split(acc.seen[2 * step + r // 2], r % 2) for r in range(4)]
        for (p, c), (p2, c2) in zip(rows, rows_acc):
            assert torch.equal(p, p2) and torch.equal(c, c2)
    for a, b in zip(big.state.log_history[:2], acc.state.log_history[:2]):
        for key in ("loss", "grad_norm", "generated_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_source_drawn_per_micro_batch_from_seed_and_step(tokenizer, tmp_path):
    trainer = run(tokenizer, tmp_path, n=16, lmbda=0.5, seq_kd=True, max_steps=4, gradient_accumulation_steps=2)
    draws = [[choose_source(0.5, True, 0, step, micro) for micro in range(2)] for step in range(4)]
    assert {d for step in draws for d in step} == {"student", "teacher"}  # both occur in this seeded run
    for step, log in enumerate(trainer.state.log_history[:4]):
        assert log["on_policy_fraction"] == draws[step].count("student") / 2
        assert log["seq_kd_fraction"] == draws[step].count("teacher") / 2
        batches = trainer.seen[2 * step: 2 * step + 2]
        assert log["generated_tokens"] == sum(int((b["labels"] != -100).sum()) for b in batches)
    draws = [choose_source(0.3, False, 5, step, 0) for step in range(2000)]
    assert set(draws) == {"student", "data"} and draws.count("student") / 2000 == pytest.approx(0.3, abs=0.04)


def test_row_generators_depend_on_seed_step_and_row():
    def first_draws(*args):
        return [int(torch.randint(1000, (1,), generator=g)) for g in row_generators(*args, device="cpu")]
    assert first_draws(0, 3, 0, 4) == first_draws(0, 3, 0, 4)
    assert first_draws(0, 3, 2, 2) == first_draws(0, 3, 0, 4)[2:]  # row 2 is row 2 in any micro-batch
    assert first_draws(0, 4, 0, 4) != first_draws(0, 3, 0, 4) != first_draws(1, 3, 0, 4)


# ---------------------------------------------------------------------------- the student learns
def on_policy_divergence(student, teacher, prompts) -> float:
    """Mean per-token reverse KL(p_S || p_T) on the student's own (seeded) samples for ``prompts``."""
    student.eval()
    ids, mask = prompts
    tokens, lengths = sample_completions(student, ids, mask, max_new_tokens=6, temperature=1.0, eos_token_ids=[EOS],
                                         generators=row_generators(123, 0, 0, ids.shape[0], "cpu"))
    batch = rebuild_batch(ids, mask, tokens, lengths, PAD)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    return float(generalized_jsd_loss(s, t, beta=1.0, mask=counted))


def test_on_policy_training_brings_the_student_closer_to_the_teacher(tokenizer, tmp_path):
    teacher, student = tiny_llama(len(tokenizer), 2, seed=1, init=0.05), tiny_llama(len(tokenizer), 1, seed=2)
    held_out = CompletionCollator(tokenizer)(list(completion_rows(tokenizer, 32, seed=99)))
    prompts = (held_out["prompt_input_ids"], held_out["prompt_attention_mask"])
    before = on_policy_divergence(student, teacher, prompts)
    run(tokenizer, tmp_path, n=64, teacher=teacher, student=student, per_device_train_batch_size=8, max_steps=30,
        learning_rate=1e-2, logging_steps=10, generation_temperature=1.0)
    after = on_policy_divergence(student, teacher, prompts)
    assert after < 0.6 * before, (before, after)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("setting, message", [
    (dict(lmbda=-0.1), "lmbda"), (dict(lmbda=1.5), "lmbda"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(generation_temperature=-1.0), "generation_temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(lmbda=float("nan")), "lmbda is NaN"),
])
def test_bad_generation_arguments_rejected(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **setting)


@pytest.mark.parametrize("setting, what", [(dict(lmbda=0.5), "on-policy"), (dict(lmbda=0.0, seq_kd=True), "seq_kd")])
def test_data_without_prompts_rejected_when_generating(tokenizer, tmp_path, setting, what):
    teacher, student = pair(tokenizer)
    with pytest.raises(ValueError, match=f"{what}.*carry no prompts.*prompt-completion or chat"):
        CausalLMDistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, **setting),
                                    train_dataset=completion_rows(tokenizer, 4, text=True),
                                    data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)
    # off-policy training on the same data is fine
    CausalLMDistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, lmbda=0.0),
                                train_dataset=completion_rows(tokenizer, 4, text=True),
                                data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)


def test_generation_needs_a_live_teacher_and_the_right_arguments(tokenizer, tmp_path):
    _, student = pair(tokenizer)
    rows = completion_rows(tokenizer, 4)
    with pytest.raises(ValueError, match="only a live teacher can score"):
        CausalLMDistillationTrainer(model=student, args=make_args(tmp_path), teacher_source="stored",
                                    train_dataset=rows, data_collator=CompletionCollator(tokenizer))
    from hf_distill import DistillationArguments

    with pytest.raises(TypeError, match="CausalLMDistillationArguments"):
        CausalLMDistillationTrainer(model=student, args=DistillationArguments(output_dir=str(tmp_path), use_cpu=True))


# ---------------------------------------------------------------------------- with the library's data path
def test_chat_data_prepared_and_collated_by_the_library(tmp_path):
    from lm_tiny import tiny_chat_tokenizer
    from lm_tiny import tiny_llama as chat_llama

    from hf_distill.lm import prepare_lm_dataset

    tok = tiny_chat_tokenizer()
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("hello world", "hello tiny llama"), ("what is the capital of france?", "paris"),
                          ("two plus two", "is four"), ("the quick brown fox", "jumps over the lazy dog")]]
    rows = prepare_lm_dataset(Dataset.from_dict({"messages": chats}), tok, max_length=64)
    teacher, student = chat_llama(len(tok), layers=2, seed=1), chat_llama(len(tok), layers=1, seed=2)
    args = make_args(tmp_path, per_device_train_batch_size=4)  # remove_unused_columns stays on
    trainer = Recording(model=student, teacher=teacher, args=args, train_dataset=rows,
                        data_collator=CompletionCollator(tok), processing_class=tok)
    trainer.train()
    (batch,) = trainer.seen
    prompts = {tuple(r["input_ids"][: r["prompt_length"]]) for r in rows}
    assert {tuple(split(batch, row)[0].tolist()) for row in range(4)} == prompts
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in range(4):
        completion = split(batch, row)[1]
        assert (completion[:-1] != end).all()  # nothing after the end of the turn counts
        assert completion.numel() == 6 or completion[-1] == end


def test_resumed_run_samples_what_the_uninterrupted_run_sampled(tokenizer, tmp_path):
    whole = run(tokenizer, tmp_path / "whole", max_steps=2).seen
    first = run(tokenizer, tmp_path / "cut", max_steps=2, save_strategy="steps", save_steps=1)
    teacher, student = pair(tokenizer)
    resumed = Recording(model=student, teacher=teacher,
                        args=make_args(tmp_path / "cut", max_steps=2, save_strategy="steps", save_steps=1),
                        train_dataset=completion_rows(tokenizer, 8), data_collator=CompletionCollator(tokenizer),
                        processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-1"))
    assert len(first.seen) == 2 and len(resumed.seen) == 1
    assert torch.equal(resumed.seen[0]["input_ids"], whole[1]["input_ids"])


@pytest.mark.slow
def test_two_processes_sample_and_update_as_one_large_batch(tmp_path):
    """2 processes x batch 2 (gloo) == 1 process x batch 4: the same completions, loss, grad norm and update."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    logs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"log_{nproc}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(here / "ddp_on_policy.py"), str(out), str(batch)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[nproc] = json.loads(out.read_text())
    single, double = logs[1], logs[2]
    assert double["world_size"] == 2 and double["rows"] == single["rows"]
    for key in ("loss", "grad_norm"):
        assert double[key] == pytest.approx(single[key], rel=1e-4), key
    assert double["generated_tokens"] * 2 == pytest.approx(single["generated_tokens"])  # logged per process
    assert double["param_sum"] == pytest.approx(single["param_sum"], rel=1e-6, abs=1e-5)


def test_task_loss_on_student_samples_is_warned_about(tokenizer, tmp_path, caplog):
    teacher, student = pair(tokenizer)
    with caplog.at_level("WARNING", logger="hf_distill.lm.trainer"):
        CausalLMDistillationTrainer(model=student, teacher=teacher, args=make_args(tmp_path, task_weight=2.0),
                                    train_dataset=completion_rows(tokenizer, 4),
                                    data_collator=CompletionCollator(tokenizer), processing_class=tokenizer)
    assert "cross-entropy on the student's own samples" in caplog.text and "task_weight=0" in caplog.text
