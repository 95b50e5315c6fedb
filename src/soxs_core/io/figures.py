"""Lean matplotlib figures for the QC plots.

A recipe's QC PDFs were a third of a full-frame soxs_stare run.  Most of matplotlib's time
there goes into objects a QC page does not need: pyplot's figure manager, a dozen ticks per
axis (each tick is a line, a label and their layout), and the measuring of every tick label
that places an axes title where matplotlib is left to choose.  The helpers here make a bare
``Figure`` on the Agg canvas and give axes a few ticks; titles are placed at ``y=1.0`` by
their callers for the same reason.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_figure", "few_ticks"]


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A bare ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches (no pyplot).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def few_ticks(*axes: Any, x: int = 4, y: int = 4, labelsize: float = 7) -> None:
    """At most ``x`` and ``y`` major ticks (``MaxNLocator``) on each of ``axes``, labels of
    ``labelsize`` points."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(x))
        ax.yaxis.set_major_locator(MaxNLocator(y))
        ax.tick_params(labelsize=labelsize)
