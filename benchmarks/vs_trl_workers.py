"""The two sides of ``benchmarks/vs_trl.py``, each run in its own worker process.

A worker builds the same models and batches as the other side (fixed seeds), then answers
``("step", index)`` messages with one full training step (teacher forward, student forward, loss,
backward, optimizer step; on-policy: student sampling first) and what it measured on it:
CPU and wall time, the peak memory of the step and the loss. ``hf_distill`` is imported here; TRL
only on the TRL side, so the hf_distill side runs (and is tested) without TRL installed.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

import torch

SYSTEMS = ("hf_distill", "trl")
FLOOR = "floor"  # the model work any exact full-vocabulary trainer does (off-policy only); see FloorTrainer
MODES = ("off_policy", "on_policy")


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (defaults: a GPT-2-small-shaped teacher and a 6-layer student)."""

    layers: int = 12
    student_layers: int | None = None  # default: half the teacher's
    hidden: int = 768
    vocab: int = 50257
    batch: int = 4
    seq: int = 128
    max_new_tokens: int = 32
    beta: float = 0.5
    learning_rate: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    fused: str = "auto"  # hf_distill's loss path: auto, on or off (dense chunked logits)

    @property
    def prompt_len(self) -> int:
        return self.seq - self.max_new_tokens


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of one step, and the memory in use when it started.

    CPU: Linux keeps a per-process high-water mark of the resident set (``VmHWM`` in
    ``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
    resident set. So ``reset()`` before the step and ``read()`` after it give the exact peak RSS
    reached during the step, with no sampling and no overhead (``ru_maxrss`` cannot be reset, and a
    sampling thread misses short peaks). CUDA: ``torch.cuda`` peak allocated bytes, reset per step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type != "cuda" and not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("measuring the peak RSS of a step needs Linux (/proc/self/clear_refs); run on Linux "
                               "or on a CUDA device")
        self.start = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status_kib("VmRSS") * 1024

    def read(self) -> tuple[int, int]:
        """(bytes in use at the start of the step, peak bytes during it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return self.start, torch.cuda.max_memory_allocated(self.device)
        return self.start, self._status_kib("VmHWM") * 1024


# ---------------------------------------------------------------------------------------------- set-up
def build_models(cfg: BenchConfig):
    """The teacher (GPT-2 shaped, random weights from ``cfg.seed``) and a student copied from its layers.

    Dropout is off in both (TRL's GKDTrainer turns it off itself; with it on the two sides could not
    agree on the loss), and there is no end-of-sequence token, so sampling always runs
    ``max_new_tokens`` steps on both sides (the same work).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_distill.students import build_student

    config = GPT2Config(vocab_size=cfg.vocab, n_positions=max(1024, cfg.seq), n_embd=cfg.hidden,
                        n_layer=cfg.layers, n_head=max(1, cfg.hidden // 64), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(cfg.seed)
    teacher = GPT2LMHeadModel(config).eval().requires_grad_(False)
    student = build_student(teacher, num_layers=cfg.student_layers or max(1, cfg.layers // 2))
    for model in (teacher, student):
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        model.generation_config.pad_token_id = 0
    return teacher, student


def make_batch(cfg: BenchConfig, mode: str, index: int, device: torch.device) -> dict:
    """Batch ``index`` (the same on both sides). Off-policy: ``batch x seq`` tokens, every position counts.
    On-policy: prompts of ``seq - max_new_tokens`` tokens (the sampled completions fill up to ``seq``)."""
    g = torch.Generator().manual_seed(10_000 + index)
    if mode == "off_policy":
        ids = torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    else:
        prompts = torch.randint(1, cfg.vocab, (cfg.batch, cfg.prompt_len), generator=g)
        labels = torch.full_like(prompts, -100)
        batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts), "labels": labels,
                 "prompts": prompts.clone(), "prompt_attention_mask": torch.ones_like(prompts)}
    return {k: v.to(device) for k, v in batch.items()}


def word_level_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up tokens (TRL needs a processing class; nothing is tokenized)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    model = WordLevel({"<pad>": 0, **{f"t{i}": i for i in range(1, vocab)}}, unk_token="<pad>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


class TimedGenerate:
    """Wraps ``model.generate`` to add up the time spent sampling inside a step."""

    def __init__(self, model):
        self.inner = model.generate
        self.seconds = 0.0
        self.sequences = None
        model.generate = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.sequences = out.sequences if hasattr(out, "sequences") else out
        return out


def common_arguments(cfg: BenchConfig, tmp: str, device: torch.device) -> dict:
    """TrainingArguments both trainers get: same optimiser, no mixed precision, no checkpointing."""
    return dict(output_dir=tmp, report_to=[], use_cpu=device.type == "cpu", per_device_train_batch_size=cfg.batch,
                learning_rate=cfg.learning_rate, weight_decay=0.0, lr_scheduler_type="constant", bf16=False,
                fp16=False, gradient_checkpointing=False, disable_tqdm=True, seed=cfg.seed, save_strategy="no")


def build_trl(cfg: BenchConfig, mode: str, teacher, student, tmp: str, device: torch.device):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(**common_arguments(cfg, tmp, device), lmbda=0.0 if mode == "off_policy" else 1.0,
                     beta=cfg.beta, temperature=1.0, max_new_tokens=cfg.max_new_tokens, max_length=None,
                     disable_dropout=True)
    dummy = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]})
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dummy,
                         processing_class=word_level_tokenizer(cfg.vocab), data_collator=lambda rows: rows)
    return trainer


def build_hf_distill(cfg: BenchConfig, mode: str, teacher, student, tmp: str, device: torch.device):
    from hf_distill import DistillationArguments, DistillationTrainer

    term = {"loss": "jsd", "weight": 1.0, "beta": cfg.beta, "temperature": 1.0}
    if cfg.fused != "auto":
        term["fused"] = cfg.fused == "on"
    common = dict(**common_arguments(cfg, tmp, device), distillation=json.dumps([term]), task_weight=0.0)
    if mode == "off_policy":
        return DistillationTrainer(model=student, teacher=teacher, args=DistillationArguments(**common))
    from hf_distill.lm.trainer import CausalLMDistillationArguments, CausalLMDistillationTrainer

    args = CausalLMDistillationArguments(**common, lmbda=1.0, max_new_tokens=cfg.max_new_tokens,
                                         generation_temperature=1.0, top_p=1.0, top_k=0)
    return CausalLMDistillationTrainer(model=student, teacher=teacher, args=args,
                                       processing_class=word_level_tokenizer(cfg.vocab))


class FloorTrainer:
    """The work no trainer of these models can skip, timed like a trainer's step: the teacher's no-grad
    forward with its full logits, the student's forward with its full logits, the backward of a loss
    that costs one elementwise product (``sum(s * t) / n``) and the same AdamW update. A full-vocabulary
    divergence adds only elementwise work to this (exp / log over ``positions x vocab``), so
    ``floor / TRL`` is the lowest ``time_ratio`` an exact trainer can reach on the same work."""

    def __init__(self, cfg: BenchConfig, teacher, student, device: torch.device):
        self.model, self.teacher, self.cfg = student.to(device), teacher.to(device), cfg
        self.optimizer = None

    def create_optimizer(self):
        fused = self.model.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.learning_rate, weight_decay=0.0,
                                           fused=fused)
        return self.optimizer

    def compute_loss(self, model, inputs):
        with torch.no_grad():
            t = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        s = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return torch.mul(s, t).sum() / s.shape[0]

    def training_step(self, model, inputs):
        loss = self.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()


# ---------------------------------------------------------------------------------------------- a side
class Side:
    """One system's trainer, stepped one batch at a time."""

    def __init__(self, system: str, mode: str, cfg: BenchConfig):
        if system not in (*SYSTEMS, FLOOR) or mode not in MODES or (system == FLOOR and mode != "off_policy"):
            raise ValueError(f"system must be one of {SYSTEMS} (or {FLOOR!r}, off-policy) and mode one of {MODES}, "
                             f"got {system!r}, {mode!r}")
        torch.set_num_threads(1)
        self.system, self.mode, self.cfg = system, mode, cfg
        self.device = torch.device(cfg.device)
        self.tmp = tempfile.TemporaryDirectory()
        teacher, student = build_models(cfg)
        if system == FLOOR:
            self.trainer = FloorTrainer(cfg, teacher, student, self.device)
        else:
            build = build_trl if system == "trl" else build_hf_distill
            self.trainer = build(cfg, mode, teacher, student, self.tmp.name, self.device)
        self.model = self.trainer.model
        self.generate = TimedGenerate(self.model)
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by train() in the Trainer's own loop
        self.model.train()
        self.memory = PeakMemory(self.device)

    def step(self, index: int) -> dict:
        """One optimiser step on batch ``index``; on-policy the student first samples the completions
        (TRL: inside ``training_step``; hf_distill: ``generate_completions``, which its trainer runs when it
        fetches the step's batches)."""
        batch = make_batch(self.cfg, self.mode, index, self.device)
        random.seed(index)  # TRL draws lmbda from `random` and samples from torch's global generator
        torch.manual_seed(index)
        self.generate.seconds, self.generate.sequences = 0.0, None
        optimizer = self.trainer.optimizer
        self.memory.reset()
        cpu, wall = time.process_time(), time.perf_counter()
        sampled_batch = None
        if self.mode == "on_policy" and self.system == "hf_distill":
            start = time.perf_counter()
            batch = self.trainer.generate_completions(
                {"prompt_input_ids": batch["prompts"], "prompt_attention_mask": batch["prompt_attention_mask"]},
                "student", step=index)
            self.generate.seconds = time.perf_counter() - start
            sampled_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        loss = self.trainer.training_step(self.model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        start, peak = self.memory.read()
        if self.mode == "on_policy" and sampled_batch is None:  # TRL replaced the batch's tensors in place
            sampled_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        record = {"cpu_s": cpu, "wall_s": wall, "generate_s": self.generate.seconds, "loss": loss,
                  "mem_start": start, "mem_peak": peak, "sampled": None, "batch": None}
        if sampled_batch is not None:
            record["sampled"] = sampled_batch["input_ids"][:, self.cfg.prompt_len:].tolist()
            record["batch"] = {k: v.tolist() for k, v in sampled_batch.items()}
        return record

    def score(self, batch: dict) -> float:
        """This side's loss on a given (already sampled) batch, without gradient and without a step."""
        inputs = {k: torch.tensor(v, device=self.device) for k, v in batch.items()}
        with torch.no_grad():
            return float(self.trainer.compute_loss(self.model, inputs))

    def close(self) -> None:
        self.tmp.cleanup()


def serve(conn, system: str, mode: str, cfg: dict) -> None:
    """Worker process body: build the side, then answer ``("step", i)`` and ``("score", batch)`` until
    ``("stop", None)``."""
    try:
        side = Side(system, mode, BenchConfig(**cfg))
        conn.send(("ready", None))
        while True:
            command, arg = conn.recv()
            if command == "stop":
                side.close()
                conn.send(("stopped", None))
                return
            if command == "score":
                conn.send(("score", side.score(arg)))
            else:
                conn.send(("step", side.step(arg)))
    except BaseException:  # noqa: BLE001 - reported to the driver, which stops the run with it
        conn.send(("error", traceback.format_exc()))


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)
