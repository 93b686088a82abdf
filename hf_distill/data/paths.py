"""Local data paths: file formats by suffix, and errors for paths that do not exist or hold no data.

:func:`check_local_path` tells a missing local path from a Hub id before anything is sent to the
Hub (whose client answers a mistyped folder with "Repo id must be in the form ..." or a network
error), and lists what the nearest existing folder holds. :func:`check_folder_has_data` refuses a
folder without a data file in a supported format.
"""

from __future__ import annotations

import difflib
import os

__all__ = ["TEXT_FORMATS", "check_folder_has_data", "check_local_path", "format_of"]

#: file suffix -> ``datasets`` packaged builder
TEXT_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def format_of(path: str) -> tuple[str | None, str]:
    """(builder, suffix) for a file name, looking through one compression suffix."""
    name = os.path.basename(path).lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    suffix = os.path.splitext(name)[1]
    return TEXT_FORMATS.get(suffix), suffix


def check_local_path(name: str, *, what: str = "dataset", flag: str | None = None) -> None:
    """Raise ``FileNotFoundError`` when ``name`` can only mean a local path and nothing exists there.

    A name is read as a local path when it starts with ``.``, ``/`` or ``~``, ends in a data-file
    suffix, has more than one ``/`` (a Hub id is ``name`` or ``namespace/name``), or starts with a
    folder that exists here (``data/trian`` next to ``data/``). The message lists what the nearest
    existing folder holds, closest names first, so a typo is easy to see.
    """
    name = os.fspath(name)
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return
    first = name.replace("\\", "/").split("/", 1)[0]
    reasons = (
        name.startswith((".", "/", "~"))
        or format_of(name)[0] is not None
        or name.count("/") > 1
        or ("/" in name and first not in ("", ".", "..") and os.path.isdir(first))
    )
    if not reasons:
        return
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    hint = ""
    if os.path.isdir(parent):
        entries = sorted(e for e in os.listdir(parent) if not e.startswith("."))
        base = os.path.basename(path.rstrip("/"))
        close = difflib.get_close_matches(base, entries, n=3, cutoff=0.5)
        shown = close + [e for e in entries if e not in close][: max(0, 5 - len(close))]
        listing = ", ".join(shown) + (", ..." if len(entries) > len(shown) else "")
        hint = f"; {parent} holds {listing or 'nothing'}"
    fix = f"; set {flag} to an existing file or folder, or to a Hub id (name or namespace/name)" if flag else ""
    raise FileNotFoundError(f"{what} {name!r} does not exist (read as a local path){hint}{fix}")


def check_folder_has_data(folder: str) -> None:
    """A plain folder must hold at least one file in a supported format (``datasets`` would guess a
    builder from stray files such as PDFs)."""
    found, data = [], False
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if n.startswith("."):
                continue
            found.append(os.path.relpath(os.path.join(root, n), folder))
            data = data or format_of(n)[0] is not None or n.endswith(".arrow")
        if data:
            return
    what = f"only {', '.join(sorted(found)[:5])}{', ...' if len(found) > 5 else ''}" if found else "no files"
    raise FileNotFoundError(
        f"folder {folder!r} holds {what}: no text data file ({', '.join(sorted(TEXT_FORMATS))}, optionally "
        "compressed) and no dataset saved with save_to_disk; point to the folder or files with the text"
    )
