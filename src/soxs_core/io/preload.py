"""Import heavy modules in a background thread while the reduction reads its frames.

The recipes import matplotlib and parts of scipy only where they are used, so that a run
that does not need them never pays for them.  A run that will need them (a flat with its QC
plots) asks for them at its start: the imports, mostly byte-code execution, then overlap the
frame reading and the kernels, which release the interpreter lock, and cost nothing when the
plot is drawn.  Python's import lock makes a module imported by both threads load once; the
thread never raises (a module that fails to import fails again, with its message, where it
is used).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable

__all__ = ["preload"]


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # reported where the module is really used
            pass


def preload(names: Iterable[str]) -> threading.Thread:
    """Start importing ``names`` (module names, in order) in a daemon thread; returns it."""
    thread = threading.Thread(target=_import_all, args=(tuple(names),), name="soxs-preload",
                              daemon=True)
    thread.start()
    return thread
