"""Distil a BERT teacher into a 6-layer DistilBERT student with the DistilBERT triplet loss.

    accelerate launch recipes/distilbert.py --config recipes/configs/distilbert.yaml

Every key of the YAML file is also a flag, and flags override the file, e.g.
``--train_files my_corpus.txt --max_steps 1000``. The run resumes from the last checkpoint in
``output_dir`` when restarted with the same command.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForMaskedLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.config import parse_config_and_args
from hf_distill.data.mlm import DistilMLMCollator, count_tokens
from hf_distill.data.text import load_text_dataset, split_train_eval, tokenize_and_pack
from hf_distill.hub import count_parameters, distillation_metadata, push_folder, write_model_card
from hf_distill.students import build_student

logger = logging.getLogger("distilbert")


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
    recipe, args = parse_config_and_args((DistilBertRecipeArguments, DistillationArguments), argv)
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    tokenizer = AutoTokenizer.from_pretrained(recipe.teacher)
    teacher = AutoModelForMaskedLM.from_pretrained(recipe.teacher)

    spec = recipe.student_layers.strip()
    layers = [int(x) for x in spec.split(",")] if "," in spec else None
    num_layers = int(spec) if layers is None else None
    student = build_student(teacher, layers=layers, num_layers=num_layers, architecture=recipe.student_architecture)
    copied = layers or getattr(student, "distillation_teacher_layers", None)
    logger.info("student: %s params (teacher %s), teacher layers %s",
                f"{count_parameters(student):,}", f"{count_parameters(teacher):,}", copied)

    source = recipe.train_files or recipe.dataset_name
    with args.main_process_first(desc="dataset preprocessing"):
        raw = load_text_dataset(source, text_column=recipe.text_column,
                                config_name=None if recipe.train_files else recipe.dataset_config)
        blocks = tokenize_and_pack(raw, tokenizer, block_size=recipe.block_size, text_column=recipe.text_column,
                                   num_proc=recipe.preprocessing_num_workers)
        eval_size = int(recipe.eval_size) if recipe.eval_size >= 1 else recipe.eval_size
        train, evaluation = split_train_eval(blocks, eval_size, seed=args.seed)
        if recipe.max_train_blocks:
            train = train.select(range(min(recipe.max_train_blocks, len(train))))
        counts = count_tokens(train, len(tokenizer))
    collator = DistilMLMCollator(tokenizer, mlm_probability=recipe.mlm_probability, token_counts=counts,
                                 smoothing=recipe.mlm_smoothing, seed=args.seed, content_seeded=True)

    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train,
                                  eval_dataset=evaluation, data_collator=collator, processing_class=tokenizer,
                                  teacher_processing_class=tokenizer)
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    metrics = trainer.evaluate() if len(evaluation) else {}

    final_dir = Path(recipe.final_dir or Path(args.output_dir) / "final")
    if trainer.is_world_process_zero():
        trainer.save_model(str(final_dir))
        tokenizer.save_pretrained(str(final_dir))
        meta = distillation_metadata(
            teacher=recipe.teacher, dataset=", ".join(recipe.train_files) if recipe.train_files else
            f"{recipe.dataset_name}/{recipe.dataset_config}", student_params=count_parameters(student),
            teacher_params=count_parameters(teacher), args=args, layer_map=copied,
            extra={"architecture": type(student).__name__, "block_size": recipe.block_size})
        write_model_card(final_dir, meta, results={k: round(v, 4) for k, v in metrics.items()
                                                   if isinstance(v, float)})
        if args.push_to_hub:
            repo = args.hub_model_id or final_dir.name
            logger.info("pushed to %s", push_folder(final_dir, repo, token=args.hub_token,
                                                    private=args.hub_private_repo))
    return final_dir


if __name__ == "__main__":
    main(sys.argv[1:])
