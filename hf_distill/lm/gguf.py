"""Convert a GGUF file (llama.cpp's format) into a plain transformers model folder, once, cached.

transformers loads a GGUF file (``from_pretrained(folder, gguf_file=name)``) by dequantising every
tensor, which takes tens of seconds, and the model it returns refuses ``save_pretrained``. This
module does the load once and writes an ordinary folder -- ``model.safetensors`` (float32 unless
``dtype`` says otherwise), ``config.json`` (no ``quantization_config``), ``generation_config.json``
and the tokenizer (with its chat template) -- that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read in under a second, without ``gguf`` installed.

The route: load model and tokenizer from the GGUF file, deep-copy the config and drop its
``quantization_config``, build a fresh model from that config, copy the state dict in with every key
required to match, and save model, tokenizer and generation config.

Without ``output_dir`` the folder lives in the cache (:func:`default_cache_dir` ``/gguf/``), named
after the file, its size, modification time and the dtype, so a changed file gives a new folder and
an unchanged one is found again without reading it. Folders are written to a temporary sibling and
renamed into place, so an interrupted conversion never leaves a half-written folder behind.

Command line: ``hf-distill convert-gguf GGUF_FILE [--output_dir DIR] [--dtype float32|float16|bfloat16]
[--overwrite]``.

Public API::

    convert_gguf(path, output_dir=None, *, dtype="float32", overwrite=False) -> Path
    gguf_architecture(path) -> str
    default_cache_dir() -> Path
    cli_main(argv) -> int
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_DTYPES", "cli_main", "convert_gguf", "default_cache_dir", "gguf_architecture"]

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
#: written last into a converted folder; its presence marks the folder complete
MARKER = "hf_distill_gguf.json"
_MAGIC = b"GGUF"


def default_cache_dir() -> Path:
    """``$HF_DISTILL_CACHE``, else ``hf_distill`` under the Hugging Face cache (``$HF_HOME``,
    by default ``~/.cache/huggingface``)."""
    if os.environ.get("HF_DISTILL_CACHE"):
        return Path(os.environ["HF_DISTILL_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "hf_distill"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}" if ggufs else ""
        raise IsADirectoryError(f"{str(path)!r} is a folder; pass the .gguf file itself{hint}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, a GGUF file with {_MAGIC!r})"
        )


def gguf_architecture(path: str | os.PathLike) -> str:
    """The ``general.architecture`` a GGUF file states (``"llama"``, ``"gemma3"``, ...)."""
    path = Path(path).expanduser()
    _check_file(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a truncated or corrupt file: the reader's own errors are not ValueErrors
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"GGUF file {str(path)!r} states no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _check_architecture(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(path)!r} holds architecture {architecture!r}, which this transformers version "
            f"cannot load from GGUF; supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return architecture


def _source_key(path: Path, dtype: str) -> dict:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype}


def _cache_folder(path: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = path.name.removesuffix(".gguf")
    return default_cache_dir() / "gguf" / f"{stem}-{key['dtype']}-{digest}"


def _is_complete(folder: Path, key: dict) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("source") == key
    except (OSError, ValueError):
        return False


def convert_gguf(
    path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """A transformers folder holding the model and tokenizer of GGUF file ``path``; returns its path.

    ``output_dir`` defaults to a folder in the cache named after the file (see the module docstring).
    A folder already converted from the same file (same name, size, modification time and dtype) is
    returned at once; a different existing folder at ``output_dir`` is refused unless
    ``overwrite=True``. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file
    that is not GGUF or holds an architecture transformers cannot load.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {', '.join(OUTPUT_DTYPES)}")
    path = Path(path).expanduser().resolve()
    _check_file(path)
    key = _source_key(path, dtype)
    target = Path(output_dir).expanduser() if output_dir is not None else _cache_folder(path, key)
    if _is_complete(target, key) and not overwrite:
        return target
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise FileExistsError(
            f"{str(target)!r} exists and is not a conversion of {path.name}; choose another output_dir "
            "or pass overwrite=True (--overwrite) to replace it"
        )
    architecture = _check_architecture(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        seconds = _convert_into(path, staging, dtype=dtype)
        (staging / MARKER).write_text(json.dumps(
            {"source": key, "architecture": architecture, "path": str(path), "seconds": round(seconds, 1)},
            indent=2,
        ))
        _move_into_place(staging, target, key, overwrite=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s -> %s in %.1f s", path.name, target, seconds)
    return target


def _move_into_place(staging: Path, target: Path, key: dict, *, overwrite: bool) -> None:
    if target.exists():
        if _is_complete(target, key) and not overwrite:
            return  # another process finished the same conversion first
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        staging.rename(target)
    except OSError:
        if not _is_complete(target, key):
            raise


def _convert_into(path: Path, folder: Path, *, dtype: str) -> float:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    steps = tqdm(total=4, desc=f"convert-gguf {path.name}", unit="step")
    try:
        steps.set_postfix_str("tokenizer")
        logger.info("reading the tokenizer of %s", path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        steps.update()
        steps.set_postfix_str("dequantising weights")
        logger.info("dequantising the weights of %s (the slow step)", path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("copying")
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"the model rebuilt from {path.name}'s config does not match its weights: missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        model.generation_config = copy.deepcopy(loaded.generation_config)
        del loaded
        model.to(getattr(torch, dtype))
        steps.update()
        steps.set_postfix_str("saving")
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        steps.update()
    finally:
        steps.close()
    return time.perf_counter() - start


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-distill convert-gguf",
        description="Convert a GGUF file into a transformers folder (safetensors, tokenizer, generation "
        "config); cached, so a second call returns at once.",
    )
    parser.add_argument("gguf_file", help="the .gguf file")
    parser.add_argument("--output_dir", default=None,
                        help="where to write the folder (default: a folder in the cache, printed at the end)")
    parser.add_argument("--dtype", default="float32", choices=OUTPUT_DTYPES, help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = convert_gguf(args.gguf_file, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(folder)
    return 0
