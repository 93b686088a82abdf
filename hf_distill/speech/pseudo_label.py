"""Former home of the labeller, kept for one release: import from :mod:`hf_distill.speech.labelling`."""

from __future__ import annotations

from hf_distill.speech.labelling.cli import cli_main
from hf_distill.speech.labelling.config import FAILPOINT_ENV, ConfigMismatchError, PseudoLabelConfig
from hf_distill.speech.labelling.job import pseudo_label
from hf_distill.speech.labelling.store import finalize, load_pseudo_labels
from hf_distill.speech.labelling.teachers import load_teacher
from hf_distill.speech.labelling.text import compression_ratio, load_normalizer, merge_overlapping_texts, word_error_rate

__all__ = ["FAILPOINT_ENV", "ConfigMismatchError", "PseudoLabelConfig", "cli_main", "compression_ratio", "finalize",
           "load_normalizer", "load_pseudo_labels", "load_teacher", "merge_overlapping_texts", "pseudo_label",
           "word_error_rate"]

if __name__ == "__main__":  # pragma: no cover
    import sys

    from hf_distill.cli import main

    raise SystemExit(main(["pseudo-label", *sys.argv[1:]]))
