"""Early checks of the paths a speech command is given: a wrong one is one error that says what to change,
raised before a teacher is loaded or a file is written (``hf-distill`` prints it as one line, exit code 2).

- :func:`check_output_dir`: a folder to write into (created if missing): not a file, not under a file, writable.
- :func:`check_speech_teacher`: a local teacher folder holds a model (``config.json``, weights) and its
  processor (feature extractor and tokenizer); a missing local path is not taken for a Hub id.
- :func:`check_listing`: an input that lists no audio at all (an empty folder or manifest) is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_listing", "check_output_dir", "check_speech_teacher", "looks_like_local_path"]

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def looks_like_local_path(name: str) -> bool:
    """A Hub id is ``name`` or ``namespace/name``; anything else (absolute, ./, ~, deeper, a trailing /) is a
    local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith("/"))


def check_output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """``path`` as a folder this process can write into: it need not exist yet (the job creates it)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{flag} {os.fspath(path)} is a file; give a folder (it is created if missing)")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{flag} {os.fspath(path)} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {os.fspath(path)}: no permission to write in {ancestor}; choose another folder")
    return out


def check_speech_teacher(model: str | os.PathLike, flag: str = "--model") -> str:
    """A teacher folder holds ``config.json``, weights, the feature extractor's ``preprocessor_config.json``
    and a tokenizer (what ``model.save_pretrained`` and ``processor.save_pretrained`` write); a path that
    does not exist is an error unless it can be a Hub id (``name`` or ``org/name``). Returns the name."""
    name = os.fspath(model)
    if not name.strip():
        raise ValueError(f"{flag} is empty; give the teacher's folder or a Hub model id (org/name)")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{flag} {name} is a file; give the teacher's folder (config.json, weights and "
                                     "processor files, as save_pretrained writes them) or a Hub model id")
        files = {f.name for f in path.iterdir() if f.is_file()}
        missing = []
        if "config.json" not in files:
            missing.append("config.json")
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            missing.append("weights (*.safetensors)")
        if not files & set(PROCESSOR_FILES):
            missing.append("feature extractor (preprocessor_config.json)")
        if not files & set(TOKENIZER_FILES):
            missing.append("tokenizer (tokenizer.json or vocab.json)")
        if missing:
            raise FileNotFoundError(
                f"{flag} {name} is not a saved speech teacher: no {', no '.join(missing)}; save the model and its "
                "processor there with model.save_pretrained(dir) and processor.save_pretrained(dir)")
        return str(path)
    if looks_like_local_path(name):
        raise FileNotFoundError(f"{flag} {name} does not exist; give the teacher's folder or a Hub model id "
                                "(org/name)")
    return name


def check_listing(items: Sequence, source, extensions: Sequence[str] = ()) -> None:
    """An input that lists nothing to label is an error (a job over it would finish, label nothing, exit 0)."""
    if items:
        return
    from hf_distill.speech.audio import is_saved_dataset

    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.is_dir() and not is_saved_dataset(path):
        looked = f" (looked, in every subfolder, for {', '.join(extensions)})" if extensions else ""
        raise ValueError(f"no audio files in {os.fspath(source)}{looked}; give a folder of audio files, a manifest "
                         "or a dataset")
    if path is not None and path.is_file():
        raise ValueError(f"the manifest {os.fspath(source)} has no rows; write one row per audio file (a path "
                         "column, optionally a text column)")
    raise ValueError(f"the dataset {source if path is not None else type(source).__name__} has no rows")
