"""Lazy package exports: a package says which names each of its modules offers; a module is imported
the first time one of its names is used (``import hf_distill`` stays cheap)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]], submodules: Collection[str] = ()
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` of ``package``.

    ``exports`` maps each module to the public names it defines; ``submodules`` are names of
    ``package``'s own submodules, reachable as attributes without importing them first (they are not
    added to ``__all__``). A name is imported on first use and then kept in the package's namespace,
    so later look-ups are plain attribute reads. Use it as::

        __all__, __getattr__, __dir__ = lazy_exports(__name__, {"pkg.mod": ("name", ...)})
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where) | set(submodules))

    return sorted(where), __getattr__, __dir__
