"""Former packed labeller, kept for one release: packing is ``PseudoLabelConfig(pack=True)`` /
``hf-distill pseudo-label --pack`` (:mod:`hf_distill.speech.labelling`)."""

from __future__ import annotations

import warnings
from typing import Any

from hf_distill.speech.labelling.config import PseudoLabelConfig
from hf_distill.speech.labelling.job import pseudo_label

__all__ = ["PackedLabelConfig", "packed_pseudo_label"]


def PackedLabelConfig(**fields: Any) -> PseudoLabelConfig:  # noqa: N802 - the former class's name
    """Deprecated: ``PseudoLabelConfig(pack=True, ...)``."""
    warnings.warn("PackedLabelConfig is deprecated: use PseudoLabelConfig(pack=True)", FutureWarning, stacklevel=2)
    return PseudoLabelConfig(**{**fields, "pack": True})


def packed_pseudo_label(config: PseudoLabelConfig) -> dict[str, Any]:
    """Deprecated: ``pseudo_label`` of a config with ``pack=True``."""
    warnings.warn("packed_pseudo_label is deprecated: use pseudo_label(PseudoLabelConfig(pack=True))", FutureWarning,
                  stacklevel=2)
    if not config.pack:
        raise ValueError("packed_pseudo_label needs a config with pack=True")
    return pseudo_label(config)
