"""``soxs-esorex``: run soxs recipes the way esorex/pyesorex does.

    soxs-esorex [options] RECIPE [--param=value ...] SOF

Exit status is 0 only when every product was written; otherwise one line on stderr names
the file and the problem.

This module is the console script's entry point and stays tiny: :func:`main` installs the
SIGTERM/SIGINT handlers before numpy and the recipes are imported (by
:mod:`soxs_recipes.runner`), so an interruption at any moment, start-up included, ends with
one line, the exit status of the signal and no temporary file left behind.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from soxs_core.io.safety import install_signal_handlers, remove_tracked

__all__ = ["main", "run", "plugin_dir"]

PROGRAM = "soxs-esorex"


def plugin_dir() -> Path:
    """Directory to put in ``PYESOREX_PLUGIN_DIR``."""
    return Path(__file__).resolve().parent / "plugins"


def run(argv: Sequence[str] | None = None, *, tune_memory: bool = False) -> int:
    """Run the runner with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    See :func:`soxs_recipes.runner.run`.
    """
    from .runner import run as run_recipe

    return run_recipe(argv, tune_memory=tune_memory)


def _single_threaded_blas() -> None:
    """One BLAS thread unless the user chose otherwise: the recipes' linear algebra is small
    (polynomial fits, spline systems), where OpenBLAS's threads cost more in start-up and, on
    a busy machine, in waiting than they save; the pixel kernels have their own threads."""
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers(PROGRAM)
    _single_threaded_blas()
    status = run(tune_memory=True)
    remove_tracked()
    # The interpreter's teardown (a garbage collection of every module) would add a tenth of
    # a second to each run; everything the run opened is closed by now, so flush and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
