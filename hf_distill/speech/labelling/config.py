"""What decides a labelling run's output (:class:`PseudoLabelConfig`), its hash, and when packing applies.

Packing (``pack``) puts several short clips into one 30-second Whisper window, transcribes the window once
with timestamps and hands each timestamped segment back to its clip (:mod:`~hf_distill.speech.labelling.packing`).

**When packing is exact.** A clip labelled alone in its window (every clip longer than ``pack_max_unit_s``,
every clip of a rejected packed window) gets, token for token, what the unpacked labeller gives it. A clip
accepted from a packed window is transcribed with its neighbours in the window; the window is accepted only
when the split is unambiguous (every clip gets text, no segment reaches into another clip's speech, no clip's
speech is skipped), but its text can differ from the clip's text alone. Packing is the default (``pack=None``,
"auto") where it changes nothing else the store holds: a Whisper teacher, greedy decoding (``num_beams=1``)
and no soft labels. It is off for CTC teachers (they read audio of any length: nothing to pack), for beam
search, and for ``top_k`` soft labels: a clip's top-k distributions must be the teacher's with the clip alone
in its window (what a student trained on that clip sees), and a packed window cannot give them without an
encoder pass per clip, the cost packing saves; asking for both is refused. A store keeps the mode it was
started with: ``pack=None`` on an existing store follows its manifest, so stores written before packing
became the default resume unpacked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FAILPOINT_ENV", "FORMAT", "FORMAT_VERSION", "PACK_FIELDS", "ConfigMismatchError", "PseudoLabelConfig",
           "items_hash", "packing_settings", "resolve_packing"]

FORMAT = "hf_distill.pseudo_labels"
FORMAT_VERSION = 1
# Test hook: "kill-before-rename:<shard>" makes the process SIGKILL itself after writing that shard's
# temporary file and before renaming it, the worst moment for a crash.
FAILPOINT_ENV = "HF_DISTILL_PSEUDO_LABEL_FAILPOINT"
#: the packing settings: part of the configuration hash of a packed store, absent from an unpacked one's
PACK_FIELDS = ("pack_gap_s", "pack_tail_s", "pack_max_unit_s", "pack_tolerance_s", "pack_max_uncovered_s",
               "max_piece_s", "pause_search_s")


class ConfigMismatchError(RuntimeError):
    """The output directory belongs to a run with another configuration or another input."""


@dataclass
class PseudoLabelConfig:
    """Everything that decides the output of a labelling run (see ``hf-distill pseudo-label -h``)."""

    input: str
    model: str
    output_dir: str
    teacher_type: str = "auto"  # auto | whisper | ctc
    # input columns (manifest / dataset)
    path_column: str = "path"
    text_column: str | None = None  # None: first of text/sentence/transcript/...; "": no reference
    id_column: str | None = None
    audio_column: str = "audio"
    split: str | None = None
    dataset_config: str | None = None
    # decoding
    language: str | None = None
    task: str | None = None
    return_timestamps: bool = False
    num_beams: int = 1
    max_new_tokens: int | None = None
    batch_size: int = 16
    chunk_length_s: float | None = None  # default: the teacher's window (30 s for Whisper), 30 s for CTC
    chunk_overlap_s: float = 6.0
    # soft labels
    top_k: int | None = None
    soft_label_temperature: float = 1.0
    # filters (recorded, not applied)
    wer_threshold: float = 0.1
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    compression_ratio_threshold: float = 2.4
    min_mean_max_posterior: float = 0.5
    normalizer: str = "english"  # english | basic | none
    # work division
    shard_size: int = 256
    # packing (None: auto, see the module docstring); the settings are hashed only when packing
    pack: bool | None = None
    pack_gap_s: float = 1.0  # silence between two clips of a window
    pack_tail_s: float = 2.0  # silence kept free at the end of a packed window
    pack_max_unit_s: float = 12.0  # longer clips (and pieces) get a window of their own
    pack_tolerance_s: float = 0.3  # how far a segment may reach into another clip's speech
    pack_max_uncovered_s: float = 1.0  # voiced seconds of a clip its segments may leave uncovered
    max_piece_s: float | None = None  # long recordings are cut into pieces of at most this (default: window - 1 s)
    pause_search_s: float = 10.0  # a cut goes at the quietest point of the last this-many seconds of a piece
    # runtime only: not part of the configuration hash
    device: str | None = None
    dtype: str = "float32"
    encoder_dtype: str | None = None  # Whisper teachers: the encoder's own dtype (default: dtype)
    draft_model: str | None = None  # Whisper, greedy: a smaller Whisper proposing tokens the teacher verifies
    draft_tokens: int = 4  # tokens the draft proposes per verification step
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True

    RUNTIME_FIELDS = ("output_dir", "device", "rank", "world_size", "progress", "pack", "draft_model",
                      "draft_tokens")

    def __post_init__(self):
        if self.teacher_type not in {"auto", "whisper", "ctc"}:
            raise ValueError(f"teacher_type must be auto, whisper or ctc, got {self.teacher_type!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.normalizer not in {"english", "basic", "none"}:
            raise ValueError("normalizer must be english, basic or none")
        if self.dtype not in {"float32", "float16", "bfloat16"}:
            raise ValueError("dtype must be float32, float16 or bfloat16")
        if self.encoder_dtype == "auto":  # resolved here, so that the configuration hash records the real dtype
            self.encoder_dtype = auto_encoder_dtype(self.device)
        if self.encoder_dtype not in {None, "float32", "float16", "bfloat16"}:
            raise ValueError("encoder_dtype must be auto, float32, float16 or bfloat16 (or unset: dtype)")
        if self.pack_gap_s < 0 or self.pack_tolerance_s < 0 or self.pack_tail_s < 0:
            raise ValueError("pack_gap_s, pack_tail_s and pack_tolerance_s must be >= 0")
        if self.max_piece_s is not None and self.max_piece_s <= 1.0:
            raise ValueError("max_piece_s must be > 1 second")
        if self.pause_search_s <= 0:
            raise ValueError("pause_search_s must be > 0")
        if self.draft_tokens < 1:
            raise ValueError("draft_tokens must be >= 1")
        if self.draft_model is not None and (self.num_beams != 1 or self.teacher_type == "ctc"):
            raise ValueError("--draft_model speeds up greedy Whisper decoding: drop it, or use num_beams=1 and a "
                             "Whisper teacher")
        if self.pack:
            refusal = packing_refusal(self)
            if refusal:
                raise ValueError(refusal)

    def hashed_fields(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.RUNTIME_FIELDS or (f.name == "encoder_dtype" and self.encoder_dtype is None):
                continue
            if f.name in PACK_FIELDS and not self.pack:
                continue
            value = getattr(self, f.name)
            if f.name in {"input", "model"} and isinstance(value, str) and os.path.exists(value):
                value = os.path.abspath(value)
            out[f.name] = value
        return out


def packing_refusal(config: PseudoLabelConfig, teacher_kind: str | None = None) -> str | None:
    """Why ``config`` cannot be labelled packed (what to change), or None."""
    if config.top_k:
        return ("packing gives no per-clip soft labels (a clip's top-k must be the teacher's with the clip alone in "
                "its window, which a packed window does not give): drop --pack to store --top_k soft labels, or "
                "drop --top_k")
    if config.num_beams != 1:
        return "packing decodes greedily: drop --pack for beam search, or use --num_beams 1"
    if config.teacher_type == "ctc" or teacher_kind == "ctc":
        return ("packing is for Whisper teachers (a CTC teacher reads audio of any length, there is nothing to "
                "pack): drop --pack")
    return None


def resolve_packing(config: PseudoLabelConfig, teacher_kind: str, manifest: dict[str, Any] | None) -> bool:
    """Whether this run packs: ``config.pack`` when given (refused where packing cannot apply), else the mode of
    the existing store (its ``manifest``), else packing wherever it applies (see the module docstring)."""
    refusal = packing_refusal(config, teacher_kind)
    if config.pack is not None:
        if config.pack and refusal:
            raise ValueError(refusal)
        return bool(config.pack)
    if manifest is not None:
        return "packing" in manifest
    return refusal is None


def packing_settings(config: PseudoLabelConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in PACK_FIELDS}


def items_hash(items: Sequence[Any]) -> str:
    """SHA-256 of the items' ``id``, ``path`` and ``reference`` lines (what a store was labelled from)."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.path}\t{it.reference if it.reference is not None else chr(0)}\n".encode("utf-8"))
    return h.hexdigest()


def auto_encoder_dtype(device: str | None = None) -> str:
    """bfloat16 where the hardware computes in bf16 (a CUDA GPU; a CPU with AVX512-BF16 or AMX), else float32:
    on CPUs without bf16 units a bfloat16 encoder is several times slower than a float32 one."""
    import torch

    on_gpu = str(device).startswith("cuda") if device else torch.cuda.is_available()
    if on_gpu:
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
