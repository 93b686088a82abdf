"""The ``hf-distill`` command line: one subcommand per long-running job.

Each subcommand lives next to the code it drives, as a ``cli_main(argv) -> int`` function, and is
imported only when called (so ``hf-distill --help`` stays fast). Bad input (``ValueError``,
``FileNotFoundError``, :class:`CommandError`, ...) ends a subcommand with exit code 2 and one line
that says what to change; set ``HF_DISTILL_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


class CommandError(Exception):
    """Bad input to a subcommand: printed as one line (``hf-distill CMD: error: ...``), exit code 2."""


COMMANDS: dict[str, tuple[str, str]] = {
    "init-student": ("hf_distill.students:cli_main", "build a smaller student from a teacher's layers"),
    "cache-teacher": ("hf_distill.store.cli:cli_main", "run a teacher once over a dataset and store its outputs"),
    "pseudo-label": ("hf_distill.speech.labelling.cli:cli_main", "label unlabeled audio with a speech teacher"),
    "pseudo-label-packed": ("hf_distill.speech.labelling.cli:packed_cli_main",
                            "deprecated: runs pseudo-label --pack"),
    "synthesize": ("hf_distill.speech.synth:cli_main", "speak sentences into WAV files + manifest.csv (festival/flite)"),
    "convert-ct2": ("hf_distill.speech.convert_ct2:cli_main", "convert a CTranslate2 Whisper model to transformers"),
    "convert-gguf": ("hf_distill.lm.gguf:cli_main", "convert a GGUF causal LM into a transformers folder (cached)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="hf-distill", description="Knowledge distillation for Transformers.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text, add_help=False)
        if argv and argv[0] not in {"-h", "--help"}:
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    target, _ = COMMANDS[argv[0]]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_with_one_line_errors(func, argv[1:], f"hf-distill {argv[0]}")


# Errors that mean bad input: printed as one line that says what to change, exit code 2.
INPUT_ERRORS = (CommandError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def run_with_one_line_errors(func, argv: list[str], prog: str) -> int:
    """Run ``func(argv)``; bad input ends with ``PROG: error: <message>`` on one line and exit code 2 (set
    ``HF_DISTILL_TRACEBACK=1`` for the traceback), an interrupt with 130. Recipes' ``__main__`` use it too."""
    try:
        return int(func(argv) or 0)
    except INPUT_ERRORS as exc:
        if os.environ.get("HF_DISTILL_TRACEBACK") and not isinstance(exc, CommandError):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
