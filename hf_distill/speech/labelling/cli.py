"""``hf-distill pseudo-label``: label audio with a Whisper or CTC teacher into resumable Parquet shards.

``hf-distill pseudo-label-packed`` is a deprecated alias of ``hf-distill pseudo-label --pack`` (for one release).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from hf_distill.speech.audio import read_failures
from hf_distill.speech.labelling.config import PACK_FIELDS, ConfigMismatchError, PseudoLabelConfig

__all__ = ["cli_main", "labelling_parser", "packed_cli_main"]

logger = logging.getLogger(__name__)


def labelling_parser() -> argparse.ArgumentParser:
    """The flags of ``hf-distill pseudo-label``."""
    p = argparse.ArgumentParser(
        prog="hf-distill pseudo-label",
        description="Label audio with a Whisper or CTC teacher into resumable Parquet shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input", nargs="?", help="audio folder, manifest (.csv/.tsv/.jsonl), saved dataset folder or Hub dataset name"
    )
    p.add_argument("--model", help="teacher: a local folder (or Hub name) with the model and its processor")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    p.add_argument(
        "--teacher-type", "--teacher_type", dest="teacher_type", default="auto", choices=["auto", "whisper", "ctc"]
    )
    g = p.add_argument_group("input columns")
    g.add_argument("--path-column", "--path_column", dest="path_column", default="path")
    g.add_argument(
        "--text-column",
        "--text_column",
        dest="text_column",
        default=None,
        help="reference text column (default: text/sentence/transcript/... if present; '' for none)",
    )
    g.add_argument("--id-column", "--id_column", dest="id_column", default=None)
    g.add_argument("--audio-column", "--audio_column", dest="audio_column", default="audio")
    g.add_argument("--split", default=None)
    g.add_argument("--dataset-config", "--dataset_config", dest="dataset_config", default=None)
    g = p.add_argument_group("decoding")
    g.add_argument("--language", default=None)
    g.add_argument("--task", default=None, choices=["transcribe", "translate"])
    g.add_argument("--timestamps", "--return_timestamps", dest="return_timestamps", action="store_true")
    g.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=1)
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None)
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    g.add_argument("--chunk-length-s", "--chunk_length_s", dest="chunk_length_s", type=float, default=None)
    g.add_argument("--chunk-overlap-s", "--chunk_overlap_s", dest="chunk_overlap_s", type=float, default=6.0)
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None, help="store top-k soft labels")
    g.add_argument(
        "--soft-label-temperature", "--soft_label_temperature", dest="soft_label_temperature", type=float, default=1.0
    )
    g.add_argument("--draft-model", "--draft_model", dest="draft_model", default=None,
                   help="Whisper, greedy: a smaller Whisper with the teacher's tokenizer (e.g. a distilled student) "
                        "proposes tokens the teacher verifies several at a time; the output is the teacher's own")
    g.add_argument("--draft-tokens", "--draft_tokens", dest="draft_tokens", type=int, default=4,
                   help="tokens the draft proposes per verification step")
    g = p.add_argument_group("packing (several short clips per 30-s Whisper window; see hf_distill.speech.labelling)")
    g.add_argument("--pack", dest="pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack clips (default: where packing is exact: a Whisper teacher, greedy decoding, no --top_k; "
                        "an existing store keeps its mode)")
    defaults = {f.name: f.default for f in dataclasses.fields(PseudoLabelConfig)}
    for name in PACK_FIELDS:
        g.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, type=float, default=defaults[name])
    g = p.add_argument_group("filters (recorded in the store, not applied)")
    g.add_argument("--wer-threshold", "--wer_threshold", dest="wer_threshold", type=float, default=0.1)
    g.add_argument("--logprob-threshold", "--logprob_threshold", dest="logprob_threshold", type=float, default=-1.0)
    g.add_argument(
        "--no-speech-threshold", "--no_speech_threshold", dest="no_speech_threshold", type=float, default=0.6
    )
    g.add_argument(
        "--compression-ratio-threshold",
        "--compression_ratio_threshold",
        dest="compression_ratio_threshold",
        type=float,
        default=2.4,
    )
    g.add_argument(
        "--min-mean-max-posterior", "--min_mean_max_posterior", dest="min_mean_max_posterior", type=float, default=0.5
    )
    g.add_argument("--normalizer", default="english", choices=["english", "basic", "none"])
    g = p.add_argument_group("execution")
    g.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=256)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--encoder-dtype", "--encoder_dtype", dest="encoder_dtype", default=None,
                   choices=["float32", "float16", "bfloat16"],
                   help="Whisper: run the encoder in this dtype (default: --dtype); bfloat16 speeds up CPUs with "
                        "bf16 arithmetic (AVX512-BF16, AMX)")
    g.add_argument("--rank", type=int, default=None, help="default: $RANK")
    g.add_argument(
        "--world-size", "--world_size", dest="world_size", type=int, default=None, help="default: $WORLD_SIZE"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument(
        "--finalize", action="store_true", help="only (re)write summary.json and failures.jsonl from finished shards"
    )
    return p


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_cli_job(args: argparse.Namespace) -> dict | None:
    """The job of parsed flags: logging, ``--finalize``, the required arguments, the config and the job. Returns
    the job's result (None after ``--finalize``). Bad input raises ``ValueError`` / ``FileNotFoundError`` /
    :class:`~hf_distill.cli.CommandError` (``hf-distill`` prints one line, exit code 2), and so does a finished
    store that holds no row because every input file failed."""
    from hf_distill.cli import CommandError
    from hf_distill.speech.labelling.job import pseudo_label
    from hf_distill.speech.labelling.store import finalize

    _configure_logging()
    if args.finalize:
        try:
            summary = finalize(args.output_dir)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        print(json.dumps(summary, indent=2, sort_keys=True))
        return None
    if not args.input or not args.model:
        raise CommandError("INPUT and --model are required (unless --finalize)")
    if not args.progress:  # --no-progress: no weight-loading bar either
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    fields = {f.name for f in dataclasses.fields(PseudoLabelConfig)}
    try:
        result = pseudo_label(PseudoLabelConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    except ConfigMismatchError as exc:
        raise CommandError(str(exc)) from None
    summary = result.get("summary")
    if summary is not None and summary["failures"] and not summary["rows"]:
        failures = Path(result["output_dir"]) / "failures.jsonl"
        first = read_failures(failures)[0]
        raise CommandError(
            f"every input file failed ({summary['failures']} of {summary['items']}); nothing was labelled. First: "
            f"{first.path}: {first.reason}; all reasons are in {failures}")
    return result


def cli_main(argv: list[str] | None = None, prog: str = "hf-distill pseudo-label") -> int:
    parser = labelling_parser()
    parser.prog = prog
    result = run_cli_job(parser.parse_args(argv))
    if result is None:
        return 0
    msg = (f"{result['shards_computed']} shards labelled, {result['shards_skipped']} already done; "
           f"{result['rows']} rows, {result['failures']} failures in this run{' (packed)' if result['packed'] else ''}")
    if result["summary"] is not None:
        s = result["summary"]
        msg += (f"; store complete: {s['rows']} rows, {s['kept']} kept, {s['failures']} failures, "
                f"{s['audio_hours']:.3f} h of audio -> {Path(result['output_dir']) / 'summary.json'}")
    print(msg)
    return 0


def packed_cli_main(argv: list[str] | None = None) -> int:
    """``hf-distill pseudo-label-packed``: deprecated, runs ``hf-distill pseudo-label --pack``."""
    _configure_logging()
    logger.warning("hf-distill pseudo-label-packed is deprecated and goes in the next release: it runs hf-distill "
                   "pseudo-label --pack (packing is the default where it is exact)")
    return cli_main([*(sys.argv[1:] if argv is None else argv), "--pack"], prog="hf-distill pseudo-label-packed")
