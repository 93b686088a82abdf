"""Distil a BERT teacher into a 6-layer DistilBERT student with the DistilBERT triplet loss.

    accelerate launch recipes/distilbert.py --config recipes/configs/distilbert.yaml

Every key of the YAML file is also a flag, and flags override the file, e.g.
``--train_files my_corpus.txt --max_steps 1000``. The run resumes from the last complete checkpoint
in ``output_dir`` when restarted with the same settings; a rerun with other settings (temperature,
weights, student layers, teacher, data, learning rate, ...) is refused with the list of differences
unless ``--start_fresh true`` (the old checkpoints are then moved aside, not deleted). The student goes
to ``output_dir/final`` with a model card; ``--push_to_hub`` uploads it (``--hub_model_id``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.checkpoints import publish_folder
from hf_distill.config import parse_config_and_args
from hf_distill.data.mlm import DistilMLMCollator, count_tokens
from hf_distill.data.text import load_text_dataset, split_train_eval, tokenize_and_pack
from hf_distill.hub import count_parameters, distillation_metadata, hub_repo_id, push_student, write_model_card
from hf_distill.students import build_student
from hf_distill.students.peft_students import PeftArguments, apply_peft, save_student
from hf_distill.teachers import load_teacher

logger = logging.getLogger("distilbert")

# Recipe flags a resume must keep (with the trainer's own: temperature, weights, the teacher's weights, learning
# rate, ...; the teacher's path may change as long as its weights do not).
RESUME_FIELDS = ("student_layers", "student_architecture", "dataset_name", "dataset_config", "train_files",
                 "text_column", "block_size", "eval_size", "max_train_blocks", "mlm_probability", "mlm_smoothing")


@dataclass
class DistilBertRecipeArguments:
    teacher: str = field(default="bert-base-uncased", metadata={"help": "Teacher masked LM (Hub id or directory)."})
    student_layers: str = field(
        default="0,2,4,7,9,11", metadata={"help": "Teacher layers copied into the student (comma-separated), or a count."}
    )
    student_architecture: str = field(
        default="distilbert", metadata={"help": "distilbert (BERT -> DistilBERT) or same (fewer-layer teacher class)."}
    )
    dataset_name: str | None = field(default="wikitext", metadata={"help": "Hub dataset with a text column."})
    dataset_config: str | None = field(default="wikitext-103-raw-v1", metadata={"help": "Hub dataset configuration."})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.parquet files; replace dataset_name when given."}
    )
    text_column: str = field(default="text")
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    eval_size: float = field(default=0.01, metadata={"help": "Fraction (or count, if >= 1) of blocks held out."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Cap the number of training blocks."})
    mlm_probability: float = field(default=0.15)
    mlm_smoothing: float = field(default=0.7, metadata={"help": "Masking weight = token count ** -mlm_smoothing."})
    preprocessing_num_workers: int | None = field(default=None)
    final_dir: str | None = field(default=None, metadata={"help": "Where the final student goes (default output_dir/final)."})


def main(argv: list[str] | None = None) -> Path:
    recipe, args, peft_args = parse_config_and_args((DistilBertRecipeArguments, DistillationArguments, PeftArguments),
                                                    argv)
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    source = recipe.train_files or recipe.dataset_name
    with args.main_process_first(desc="dataset loading"):  # a missing or empty corpus fails before any model loads
        raw = load_text_dataset(source, text_column=recipe.text_column,
                                config_name=None if recipe.train_files else recipe.dataset_config)
    teacher = load_teacher(recipe.teacher, task="masked_lm", dtype="float32")  # refuses a BertModel (no MLM head)
    tokenizer = AutoTokenizer.from_pretrained(recipe.teacher)

    spec = recipe.student_layers.strip()
    layers = [int(x) for x in spec.split(",")] if "," in spec else None
    num_layers = int(spec) if layers is None else None
    student = build_student(teacher, layers=layers, num_layers=num_layers, architecture=recipe.student_architecture)
    student = apply_peft(student, peft_args)  # LoRA adapters when --use_peft
    copied = layers or getattr(student, "distillation_teacher_layers", None)
    logger.info("student: %s params (teacher %s), teacher layers %s",
                f"{count_parameters(student):,}", f"{count_parameters(teacher):,}", copied)

    with args.main_process_first(desc="dataset preprocessing"):
        blocks = tokenize_and_pack(raw, tokenizer, block_size=recipe.block_size, text_column=recipe.text_column,
                                   num_proc=recipe.preprocessing_num_workers)
        eval_size = int(recipe.eval_size) if recipe.eval_size >= 1 else recipe.eval_size
        train, evaluation = split_train_eval(blocks, eval_size, seed=args.seed)
        if recipe.max_train_blocks:
            train = train.select(range(min(recipe.max_train_blocks, len(train))))
        counts = count_tokens(train, len(tokenizer))
    collator = DistilMLMCollator(tokenizer, mlm_probability=recipe.mlm_probability, token_counts=counts,
                                 smoothing=recipe.mlm_smoothing, seed=args.seed, content_seeded=True)

    # The recipe uploads the final student (with its card) itself; the Trainer never pushes checkpoints.
    trainer = DistillationTrainer(model=student, teacher=teacher, args=dataclasses.replace(args, push_to_hub=False),
                                  train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                                  processing_class=tokenizer, teacher_processing_class=tokenizer)
    # Besides the trainer's own settings, a resume must see the same data and the same student.
    trainer.add_resume_settings(**{k: getattr(recipe, k) for k in RESUME_FIELDS}, **{
        f"peft.{k}": v for k, v in dataclasses.asdict(peft_args).items()})
    trainer.train(resume_from_checkpoint=True)  # the last complete checkpoint, if any
    metrics = trainer.evaluate() if len(evaluation) else {}

    final_dir = Path(recipe.final_dir or Path(args.output_dir) / "final")
    if trainer.is_world_process_zero():
        staging = final_dir.with_name(f"_saving-{final_dir.name}")  # the student appears complete, or not at all
        shutil.rmtree(staging, ignore_errors=True)
        if peft_args.use_peft:  # adapters in adapter/, merged into the student unless --merge_adapters false
            trainer.check_finite_student(str(staging))
            save_student(trainer.model, staging, merge=peft_args.merge_adapters)
        else:
            trainer.save_model(str(staging))
        tokenizer.save_pretrained(str(staging))
        hub_dataset = None if recipe.train_files else hub_repo_id(recipe.dataset_name, kind="dataset")
        dataset = ", ".join(recipe.train_files) if recipe.train_files else \
            "/".join(x for x in (recipe.dataset_name, recipe.dataset_config) if x)
        meta = distillation_metadata(
            teacher=recipe.teacher, dataset=dataset, student_params=count_parameters(student),
            teacher_params=count_parameters(teacher), args=args, layer_map=copied,
            extra={"architecture": type(student).__name__, "block_size": recipe.block_size,
                   "mlm_probability": recipe.mlm_probability, "steps": trainer.state.global_step})
        results = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        write_model_card(staging, meta, results=results, pipeline_tag="fill-mask",
                         datasets=[hub_dataset] if hub_dataset else [], dataset_split="held-out blocks",
                         model_name=args.hub_model_id or final_dir.name)
        publish_folder(staging, final_dir)
        pushed = push_student(final_dir, args)
        if pushed:
            logger.info("pushed to %s", pushed)
    return final_dir


if __name__ == "__main__":
    from hf_distill.cli import run_with_one_line_errors

    sys.exit(run_with_one_line_errors(lambda argv: main(argv) and 0, sys.argv[1:], Path(__file__).name))
