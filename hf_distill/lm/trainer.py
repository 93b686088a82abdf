"""``CausalLMDistillationTrainer``: distil a causal LM on the dataset's completions, on the student's own
samples (on-policy distillation, GKD) or on the teacher's generations (sequence-level KD).

Per training micro-batch, :func:`~hf_distill.lm.on_policy.choose_source` picks who writes the
completions: the student with probability ``lmbda``, else the teacher when ``seq_kd``, else the
dataset (the batch is left as collated). Generated completions follow the batch's prompts
(``prompt_input_ids`` / ``prompt_attention_mask``, left-padded, as
:class:`~hf_distill.lm.CompletionCollator` gives them), are sampled with the KV cache, without
gradient and with the model in eval mode (dropout off), and the batch is rebuilt right-padded around
them with ``labels`` = -100 on the prompt, padding and anything after the end-of-sequence token.
The usual :class:`~hf_distill.DistillationTrainer` loss then runs on the rebuilt batch: student and
teacher see the same ``input_ids``, so the teacher scores exactly the sampled tokens.

Generation happens when the optimiser step's micro-batches are fetched, before the trainer counts
the items of the step, so the global normalisation covers the rebuilt batches. Draws are seeded
from ``args.seed``, the optimiser step and the row's index in the step: a rerun or a run resumed
from a checkpoint samples the same completions, and batch 4, 2 micro-batches of 2 and 2 processes
x 2 sample the same tokens and give the same update.

Logged with the loss terms (per optimiser step, averaged over the logging window):
``generation_seconds`` (wall time spent generating), ``generated_tokens`` (tokens generated, each
row up to and including its end-of-sequence token), ``on_policy_fraction`` (share of micro-batches
sampled from the student) and, with ``seq_kd``, ``seq_kd_fraction``.

Evaluation batches are never regenerated: evaluation measures the dataset's completions.
"""

from __future__ import annotations

import logging
import time

import torch

from ..modeling import unwrap
from ..trainer import DistillationTrainer
from .arguments import CausalLMDistillationArguments
from .on_policy import (
    choose_source,
    end_of_sequence_ids,
    rebuild_batch,
    row_generators,
    sample_completions,
)

__all__ = ["CausalLMDistillationTrainer"]

logger = logging.getLogger(__name__)

_LOGGED = ("generation_seconds", "generated_tokens", "student_batches", "teacher_batches", "micro_batches")


class CausalLMDistillationTrainer(DistillationTrainer):
    """A :class:`~hf_distill.DistillationTrainer` for causal LMs with on-policy and sequence-level KD.

    Takes :class:`CausalLMDistillationArguments` (``lmbda``, ``seq_kd``, ``max_new_tokens``,
    ``generation_temperature``, ``top_p``, ``top_k``); every other argument is
    ``DistillationTrainer``'s. With ``lmbda > 0`` or ``seq_kd`` the training data must carry prompts
    (prompt-completion or chat data collated by :class:`~hf_distill.lm.CompletionCollator`) and the
    teacher must be a live model (it scores, and under ``seq_kd`` writes, the new completions).
    """

    def __init__(self, model=None, args: CausalLMDistillationArguments | None = None, teacher=None, **kwargs):
        if args is None:
            args = CausalLMDistillationArguments(output_dir="distillation_output")
        if not isinstance(args, CausalLMDistillationArguments):
            raise TypeError(
                f"CausalLMDistillationTrainer needs CausalLMDistillationArguments (lmbda, seq_kd, max_new_tokens, "
                f"...), got {type(args).__name__}; build it as CausalLMDistillationArguments(**args.to_dict()) or "
                "parse it with HfArgumentParser(CausalLMDistillationArguments)"
            )
        if args.generates:
            self._check_live_teacher(args, teacher, kwargs.get("teacher_source"))
        super().__init__(model=model, args=args, teacher=teacher, **kwargs)
        if self.task != "causal_lm":
            raise ValueError(f"CausalLMDistillationTrainer distils causal language models, but the student is a "
                             f"{self.task} model; use DistillationTrainer for it")
        self._generation = dict.fromkeys(_LOGGED, 0.0)
        self._generation_steps = 0
        tokenizer = self.processing_class
        student = unwrap(self.model)
        self.pad_token_id = next((int(v) for v in (getattr(tokenizer, "pad_token_id", None),
                                                   getattr(student.config, "pad_token_id", None),
                                                   *end_of_sequence_ids(student, tokenizer)) if v is not None), 0)
        self.eos_token_ids = {"student": end_of_sequence_ids(student, tokenizer)}
        if args.generates:
            self._check_generation_setup()
            self.eos_token_ids["teacher"] = end_of_sequence_ids(unwrap(self.teachers[0]), tokenizer)

    # ------------------------------------------------------------------ checks at construction
    @staticmethod
    def _what(args) -> str:
        return "lmbda > 0 (on-policy distillation)" if args.lmbda > 0 else "seq_kd (sequence-level KD)"

    @classmethod
    def _check_live_teacher(cls, args, teacher, source) -> None:
        """Generated completions are new tokens: only a teacher model that runs can score them."""
        kind = getattr(source, "kind", source) or args.teacher_source
        has_models = bool(getattr(source, "models", None)) or teacher is not None or bool(args.teacher_name_or_path)
        if kind == "stored" or args.teacher_store or not has_models:
            raise ValueError(f"{cls._what(args)} trains on newly generated completions, which only a live teacher can "
                             "score; stored teacher outputs cover the dataset's own tokens only. Pass teacher=... "
                             "(or --teacher_name_or_path) with teacher_source 'auto' or 'frozen', or set lmbda=0 "
                             "and seq_kd=False")

    def _check_generation_setup(self) -> None:
        what = self._what(self.args)
        self._check_live_teacher(self.args, None, self.teacher_source)
        task = [t for t in self.objective.active_terms if t.loss_name == "task"]
        if self.args.lmbda > 0 and task:
            logger.warning("lmbda=%s with a task loss (weight %s): in batches sampled from the student the task loss "
                           "is cross-entropy on the student's own samples, which GKD does not use; set task_weight=0 "
                           "for TRL's GKD objective", self.args.lmbda, task[0].weight)
        dataset = self.train_dataset
        if dataset is None:
            return
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__") \
                or len(dataset) == 0:
            return  # an iterable (or empty) dataset: the first batch is checked instead
        if "prompt_input_ids" not in self.data_collator([dataset[0]]):
            raise ValueError(self._no_prompts_message(what))

    @staticmethod
    def _no_prompts_message(what: str) -> str:
        return (f"{what} generates completions for each row's prompt, but the training batches carry no prompts "
                "(no 'prompt_input_ids'). Use prompt-completion or chat 'messages' data, prepared with "
                "hf_distill.lm.prepare_lm_dataset and collated with hf_distill.lm.CompletionCollator (plain text "
                "has no prompts), or set lmbda=0 and seq_kd=False")

    # ------------------------------------------------------------------ generation
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self.args.generates:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        # The parent counts the items of the step over what this generator yields: the rebuilt batches.
        batch_samples, num_items = super().get_batch_samples(
            self._with_completions(epoch_iterator, num_batches), num_batches, device)
        if batch_samples:
            self._generation_steps += 1
        return batch_samples, num_items

    def _with_completions(self, epoch_iterator, num_batches):
        step = self.state.global_step
        first_row = 0
        for micro_batch in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                return
            source = choose_source(self.args.lmbda, self.args.seq_kd, self.args.seed, step, micro_batch)
            rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
            if source != "data":
                # Rows are numbered as one process with the whole micro-batch would see them (the sampler gives
                # process p the p-th slice of each global micro-batch), so the draws do not depend on the layout.
                batch = self.generate_completions(batch, source, step=step,
                                                  first_row=first_row + self.args.process_index * rows)
            self._generation["micro_batches"] += 1
            self._generation[f"{source}_batches"] = self._generation.get(f"{source}_batches", 0.0) + 1
            first_row += rows * self.args.world_size
            yield batch

    def generate_completions(self, batch: dict, source: str = "student", *, step: int = 0, first_row: int = 0) -> dict:
        """``batch`` rebuilt around completions sampled by the ``"student"`` or the ``"teacher"`` for its prompts;
        rows are seeded as rows ``first_row``... of optimiser step ``step``."""
        batch = self._prepare_inputs(batch)
        if "prompt_input_ids" not in batch:
            raise ValueError(self._no_prompts_message(self._what(self.args)))
        prompt_ids = batch["prompt_input_ids"]
        prompt_mask = batch.get("prompt_attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        model = unwrap(self.model) if source == "student" else unwrap(self.teachers[0])
        device = next(model.parameters()).device  # a teacher may live elsewhere (teacher_device)
        generators = row_generators(self.args.seed, step, first_row, prompt_ids.shape[0], device)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with self.accelerator.autocast():
                tokens, lengths = sample_completions(
                    model, prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=self.args.max_new_tokens,
                    temperature=self.args.generation_temperature, top_p=self.args.top_p, top_k=self.args.top_k,
                    eos_token_ids=self.eos_token_ids[source], pad_token_id=self.pad_token_id, generators=generators)
        finally:
            model.train(was_training)
        self._generation["generation_seconds"] += time.perf_counter() - start
        self._generation["generated_tokens"] += float(lengths.sum())
        return rebuild_batch(prompt_ids, prompt_mask, tokens, lengths, self.pad_token_id)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._generation_steps:
            g = self._generation
            values = torch.tensor([g["generation_seconds"] / self._generation_steps,
                                   g["generated_tokens"] / self._generation_steps,
                                   g["student_batches"] / max(g["micro_batches"], 1),
                                   g["teacher_batches"] / max(g["micro_batches"], 1)],
                                  dtype=torch.float32, device=self.args.device)
            if self.accelerator.num_processes > 1:
                values = self.accelerator.gather(values[None]).mean(0)
            logs["generation_seconds"] = round(float(values[0]), 4)
            logs["generated_tokens"] = round(float(values[1]), 2)
            logs["on_policy_fraction"] = round(float(values[2]), 4)
            if self.args.seq_kd:
                logs["seq_kd_fraction"] = round(float(values[3]), 4)
            self._generation = dict.fromkeys(_LOGGED, 0.0)
            self._generation_steps = 0
        super().log(logs, *args, **kwargs)
