"""Deprecated names: kept for one release, each use warns with the new name.

``deprecated_function`` wraps a function under its old name;
``moved_names`` gives a module a PEP 562 ``__getattr__`` for names that
moved elsewhere (imported lazily, so the old module does not import the
new one's layer until someone asks).
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable

__all__ = ["deprecated_function", "moved_names", "warn_deprecated"]

#: The release that drops the aliases.
REMOVED_IN = "0.3"


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warns that ``old`` is deprecated in favour of ``new``."""
    warnings.warn(f"{old} is deprecated; use {new} (the old name goes in torchmem {REMOVED_IN})",
                  DeprecationWarning, stacklevel=stacklevel)


def deprecated_function(fn: Callable, old: str, new: str) -> Callable:
    """``fn`` under its old name ``old``: the same call, with a DeprecationWarning."""

    @functools.wraps(fn)
    def alias(*args: Any, **kwargs: Any) -> Any:
        warn_deprecated(old, new)
        return fn(*args, **kwargs)

    alias.__doc__ = f"Deprecated alias of ``{new}``.\n\n{fn.__doc__ or ''}"
    return alias


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names of ``module`` that now live elsewhere.

    ``moved`` maps an old name to ``"package.module:name"``; reading the old
    name warns and returns the new object.
    """

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, attr = target.partition(":")
        warn_deprecated(f"{module}.{name}", f"{where}.{attr}")
        return getattr(importlib.import_module(where), attr)

    return __getattr__
