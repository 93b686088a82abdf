"""``hf-distill cache-teacher``: run a teacher once over a tokenized dataset and store its outputs.

Example (a masked-LM teacher, top-64 at the distillation temperature 2, resumable)::

    hf-distill cache-teacher --teacher bert-teacher/ --dataset tokenized/train --output_dir store/ --k 64 \\
        --temperature 2.0

Several processes split the shards (``torchrun --nproc_per_node 4 -m hf_distill.cli cache-teacher ...``, or
``--shard_index i --num_shards n`` in separate jobs). Run the same command again to resume; other settings
into the same folder are refused with the differences.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-distill cache-teacher",
                                description="Run a teacher once over a tokenized dataset and store, per position, its "
                                            "top-k probabilities, indices and tail mass (and chosen hidden states) as "
                                            "resumable Parquet shards.")
    p.add_argument("--teacher", required=True, help="teacher directory or Hub id (sequence classifier, masked LM, "
                                                    "token classifier or causal LM)")
    p.add_argument("--dataset", required=True, help="tokenized dataset saved with save_to_disk (input_ids, ...)")
    p.add_argument("--split", default=None, help="the split to cache when --dataset holds a DatasetDict")
    p.add_argument("--output_dir", required=True, help="the store's folder (created; resumed when it exists)")
    p.add_argument("--k", type=int, default=64, help="probabilities kept per position (default 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the distillation temperature: the store holds softmax(logits / T)")
    p.add_argument("--hidden_layers", default="", help="comma-separated hidden-state indices to store as well "
                                                       "(0: embeddings output), e.g. 6,12")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--shard_size", type=int, default=1024, help="rows per shard (the unit of resuming)")
    p.add_argument("--shard_index", type=int, default=None,
                   help="this process's index among --num_shards processes (default: RANK or 0)")
    p.add_argument("--num_shards", type=int, default=None,
                   help="how many processes split the work (default: WORLD_SIZE or 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="teacher precision")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cuda when available, else cpu)")
    p.add_argument("--revision", default=None, help="the teacher's revision on the Hub")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the teacher's own modelling code")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _hidden_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--hidden_layers must be comma-separated integers such as 6,12, got {text!r}") from None


def _load_dataset(path: str, split: str | None):
    from datasets import load_from_disk

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--dataset {path!r} is not a folder; give a dataset saved with Dataset.save_to_disk")
    try:
        dataset = load_from_disk(str(folder))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--dataset {path!r} is not a saved dataset ({exc}); write it with "
                                "Dataset.save_to_disk") from None
    if isinstance(dataset, dict):  # a DatasetDict
        if split is None:
            raise ValueError(f"--dataset {path!r} is a DatasetDict with splits {list(dataset.keys())}; choose one "
                             "with --split")
        if split not in dataset:
            raise ValueError(f"--split {split!r} is not in {path!r} (splits: {list(dataset.keys())})")
        dataset = dataset[split]
    elif split is not None:
        raise ValueError(f"--dataset {path!r} holds one split; drop --split")
    return dataset


def cli_main(argv: list[str] | None = None) -> int:
    """``hf-distill cache-teacher``."""
    import torch

    from ..teachers import check_model_path, find_teacher_tokenizer, load_teacher
    from .caching import cache_teacher

    args = _parser().parse_args(argv)
    for name in ("k", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    layers = _hidden_layers(args.hidden_layers)
    if (args.shard_index is None) != (args.num_shards is None):
        raise ValueError("give --shard_index and --num_shards together (this job's index among that many jobs)")
    check_model_path(args.teacher)
    dataset = _load_dataset(args.dataset, args.split)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output_dir {args.output_dir!r} is a file; give a folder for the store")
    if output.resolve() == Path(args.dataset).resolve():
        raise ValueError("--output_dir must differ from --dataset")
    kwargs = {"revision": args.revision} if args.revision else {}
    teacher = load_teacher(args.teacher, task="auto", dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                           **kwargs)
    tokenizer = find_teacher_tokenizer(args.teacher)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = cache_teacher(teacher, dataset, output, tokenizer=tokenizer, k=args.k, temperature=args.temperature,
                           hidden_layers=layers, batch_size=args.batch_size, shard_size=args.shard_size,
                           rank=args.shard_index, world_size=args.num_shards, teacher_name=args.teacher,
                           device=device, progress=not args.no_progress)
    summary = result["summary"]
    done = f"{result['shards_computed']} shard(s) written, {result['shards_skipped']} already done"
    if summary:
        print(f"teacher store complete in {output}: {summary['rows']} rows, {summary['positions']} positions, "
              f"{summary['stored_bytes_per_position']:.1f} bytes per position (top-{summary['k']}); {done}")
    else:
        print(f"{done} in {output}; other processes' shards are still missing")
    return 0
