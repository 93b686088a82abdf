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
from hf_distill.speech.labelling.config import (
    PACK_FIELDS,
    ConfigMismatchError,
    PseudoLabelConfig,
)

__all__ = ["cli_main", "labelling_parser", "packed_cli_main"]

logger = logging.getLogger(__name__)


DTYPES = ["float32", "float16", "bfloat16"]
#: the options of each group: (config field, argparse keywords); each is ``--field-name`` and ``--field_name``
GROUPS = {
    "input columns": [
        ("path_column", {}),
        ("text_column", {"help": "reference text column (default: text/sentence/transcript/... if present; '' for "
                                 "none)"}),
        ("id_column", {}), ("audio_column", {}), ("split", {}), ("dataset_config", {})],
    "decoding": [
        ("language", {}), ("task", {"choices": ["transcribe", "translate"]}), ("num_beams", {"type": int}),
        ("max_new_tokens", {"type": int}), ("batch_size", {"type": int}), ("chunk_length_s", {"type": float}),
        ("chunk_overlap_s", {"type": float}), ("top_k", {"type": int, "help": "store top-k soft labels"}),
        ("soft_label_temperature", {"type": float}),
        ("draft_model", {"help": "Whisper, greedy: a smaller Whisper with the teacher's tokenizer (e.g. a distilled "
                                 "student) proposes tokens that the teacher verifies several at a time; the output "
                                 "stays the teacher's own"}),
        ("draft_tokens", {"type": int, "help": "tokens the draft proposes per verification step"})],
    "packing (several short clips per 30-s Whisper window; see hf_distill.speech.labelling.config)": [
        ("pack", {"action": argparse.BooleanOptionalAction,
                  "help": "pack clips (default: where packing is exact: a Whisper teacher, greedy decoding, no "
                          "--top_k; an existing store keeps its mode)"}),
        *[(name, {"type": float}) for name in PACK_FIELDS]],
    "filters (recorded in the store, not applied)": [
        *[(name, {"type": float}) for name in ("wer_threshold", "logprob_threshold", "no_speech_threshold",
                                               "compression_ratio_threshold", "min_mean_max_posterior")],
        ("normalizer", {"choices": ["english", "basic", "none"]})],
    "execution": [
        ("shard_size", {"type": int}), ("device", {}), ("dtype", {"choices": DTYPES}),
        ("encoder_dtype", {"choices": ["auto", *DTYPES],
                           "help": "Whisper: run the encoder in this dtype (default: --dtype); bfloat16 speeds up "
                                   "GPUs and CPUs with bf16 arithmetic (AVX512-BF16, AMX) and slows others; auto "
                                   "picks bfloat16 only there"}),
        ("rank", {"type": int, "help": "default: $RANK"}), ("world_size", {"type": int, "help": "default: $WORLD_SIZE"})],
}


def labelling_parser() -> argparse.ArgumentParser:
    """The flags of ``hf-distill pseudo-label``: every :class:`PseudoLabelConfig` field (defaults from it)."""
    p = argparse.ArgumentParser(prog="hf-distill pseudo-label", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Label audio with a Whisper or CTC teacher into resumable Parquet shards.")
    p.add_argument("input", nargs="?",
                   help="audio folder, manifest (.csv/.tsv/.jsonl), saved dataset folder or Hub dataset name")
    p.add_argument("--model", help="teacher: a local folder (or Hub name) with the model and its processor")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    p.add_argument("--teacher-type", "--teacher_type", dest="teacher_type", default="auto",
                   choices=["auto", "whisper", "ctc"])
    defaults = {f.name: f.default for f in dataclasses.fields(PseudoLabelConfig)}
    for title, options in GROUPS.items():
        g = p.add_argument_group(title)
        for name, kwargs in options:
            flags = dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"])  # one flag where they are the same
            g.add_argument(*flags, dest=name, default=defaults[name], **kwargs)
        if title == "decoding":
            g.add_argument("--timestamps", "--return_timestamps", dest="return_timestamps", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--finalize", action="store_true",
                   help="only (re)write summary.json and failures.jsonl from finished shards")
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
    if result.get("speculative"):
        msg += f"; draft acceptance {result['speculative']['acceptance_rate'] or 0:.1%}"
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
