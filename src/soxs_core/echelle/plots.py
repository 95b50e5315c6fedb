"""QC plots of the order tracing: ORDER LOC RES (edge detections, fitted edges, residuals).

Drawn with matplotlib's Agg backend (no display needed) and written atomically: the PDF is
rendered into a temporary file beside its target and renamed onto it, so an interrupted run
leaves either no plot or the complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.echelle.ordertable import OrderTable
from soxs_core.echelle.tracing import EdgeFitReport
from soxs_core.io.safety import save_figure

__all__ = ["plot_order_edges", "render_order_edges"]

#: Longest side (display pixels) the frame is block-averaged to before it is drawn: the PDF
#: stays small and the orders stay visible.
MAX_DISPLAY = 800
#: Most detections drawn per kind (an even subsample beyond): vector markers are slow.
MAX_POINTS = 5000
UP_COLOUR, LOW_COLOUR, CLIP_COLOUR = "tab:red", "tab:blue", "black"
FILL_COLOURS = ("tab:orange", "tab:green")


def _display_image(flux: np.ndarray) -> tuple[np.ndarray, int]:
    """Block-averaged, asinh-stretched copy of the frame and its block size."""
    from soxs_core.echelle.background import _block_reduce

    flux = np.asarray(flux)
    block = max(1, int(np.ceil(max(flux.shape) / MAX_DISPLAY)))
    # float32 block means in strips: no float64 full-frame copy
    img = _block_reduce(flux, None, block) if block > 1 else np.asarray(flux, np.float32)
    finite = img[np.isfinite(img)]
    if finite.size:
        lo, hi = np.percentile(finite, [1.0, 99.5])
        scale = max((hi - lo) / 50.0, 1e-12)
        img = np.arcsinh((np.clip(img, lo, hi) - lo) / scale)
    return np.nan_to_num(img), block


def render_order_edges(flux: np.ndarray, table: OrderTable, report: EdgeFitReport,
                       binning: tuple[int, int] = (1, 1), title: str = "",
                       samples: Any = None):
    """The ORDER LOC RES figure (a matplotlib ``Figure``, not saved).

    Panels: the frame with the per-slice edge detections (upper and lower in two colours,
    clipped ones as black crosses, and the slice centres as grey dots when ``samples`` with a
    ``centre`` array are given); the fitted edges with each order's area filled (alternate
    colours) and numbered; the residuals against the along-order position with each edge's rms
    and the X RES SD in the legend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    binx, biny = (int(v) for v in binning)
    rows, cols = np.asarray(flux).shape
    shown, block = _display_image(flux)
    # unbinned extent: binned pixel i spans [i*bin - 1/2, (i+1)*bin - 1/2]
    extent = (-0.5, cols * binx - 0.5, -0.5, rows * biny - 0.5)
    along_y = table.dispersion_axis == "y"
    tall = rows * biny > cols * binx
    # fixed margins: a constrained layout measured every artist in an extra drawing pass
    # (a third of the plot's time)
    # (titles at a fixed y=1.0 for the same reason: placing them measures every tick label)
    fig = Figure(figsize=(13, 15) if tall else (13, 16), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.04, top=0.94)
    if tall:
        grid = fig.add_gridspec(2, 2, height_ratios=[3, 1], hspace=0.12, wspace=0.18)
        ax_det, ax_fit = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        ax_res = fig.add_subplot(grid[1, :])
    else:
        grid = fig.add_gridspec(3, 1, height_ratios=[2, 2, 1.2], hspace=0.2)
        ax_det, ax_fit, ax_res = (fig.add_subplot(grid[k]) for k in range(3))

    def xy(a, b):
        return (a, b) if along_y else (b, a)

    for ax in (ax_det, ax_fit):
        ax.imshow(shown, origin="lower", cmap="gray", extent=extent, aspect="auto",
                  interpolation="nearest",
                  alpha=1.0 if ax is ax_det else 0.6)
        ax.set_xlabel("x [unbinned px]")
        ax.set_ylabel("y [unbinned px]")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    r = report
    ms = 2.5 if r.b.size < 4000 else 1.5
    # at most MAX_POINTS detections of each kind are drawn (every k-th), all are counted
    thin = np.zeros(r.b.size, bool)
    thin[::max(1, int(np.ceil(r.b.size / MAX_POINTS)))] = True
    centres = getattr(samples, "centre", None)
    if centres is not None and np.size(centres) == r.b.size:
        ok = np.isfinite(centres)
        ok &= thin
        ax_det.plot(*xy(np.asarray(centres)[ok], r.b[ok]), ".", ms=1.0, color="0.6",
                    label="slice centres", rasterized=True)
    for values, used, colour, name in ((r.up, r.used_up, UP_COLOUR, "upper"),
                                       (r.low, r.used_low, LOW_COLOUR, "lower")):
        ok = np.isfinite(values)
        good = ok & used & thin
        ax_det.plot(*xy(values[good], r.b[good]), ".", ms=ms, color=colour,
                    label=f"{name} edge ({int(np.count_nonzero(ok & used))})", rasterized=True)
        bad = ok & ~used
        if bad.any():
            ax_det.plot(*xy(values[bad], r.b[bad]), "x", ms=4, color=CLIP_COLOUR, mew=0.8,
                        label=f"{name} edge clipped ({int(np.count_nonzero(bad))})")
    ax_det.legend(loc="upper right", fontsize=8, framealpha=0.85, markerscale=2)
    ax_det.set_title("edge detections per slice", y=1.0)
    for k, n in enumerate(table.orders):
        b0, b1 = table.along_range(int(n))
        b = np.linspace(b0, b1, 200)
        lo, up = table.edge_low(float(n), b), table.edge_up(float(n), b)
        colour = FILL_COLOURS[k % 2]
        if along_y:
            ax_fit.fill_betweenx(b, lo, up, color=colour, alpha=0.55, lw=0)
        else:
            ax_fit.fill_between(b, lo, up, color=colour, alpha=0.55, lw=0)
        for edge in (lo, up):
            ax_fit.plot(*xy(edge, b), "-", color="k", lw=0.4)
        mid = 0.5 * (b0 + b1)
        ax_fit.text(*xy(float(table.centre(float(n), mid)), mid), str(int(n)), fontsize=7,
                    ha="center", va="center", color="k",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7))
    ax_fit.set_title(f"fitted edges of {table.orders.size} orders "
                     f"(degrees order/along: upper {r.degrees_up[0]}/{r.degrees_up[1]}, "
                     f"lower {r.degrees_low[0]}/{r.degrees_low[1]})", y=1.0)
    for res, used, colour, name in ((r.residual_up, r.used_up, UP_COLOUR, "upper"),
                                    (r.residual_low, r.used_low, LOW_COLOUR, "lower")):
        ok = np.isfinite(res)
        rms = float(np.sqrt(np.mean(res[ok & used] ** 2))) if (ok & used).any() else np.nan
        good = ok & used & thin
        ax_res.plot(r.b[good], res[good], ".", ms=2, color=colour,
                    label=f"{name} edge: rms {rms:.3f} px", rasterized=True)
        if (ok & ~used).any():
            ax_res.plot(r.b[ok & ~used], res[ok & ~used], "x", ms=3, color=CLIP_COLOUR,
                        mew=0.6, label=f"{name} edge clipped")
    used_res = np.concatenate([r.residual_up[r.used_up], r.residual_low[r.used_low]])
    if used_res.size:
        lim = max(0.5, 1.2 * float(np.max(np.abs(used_res))))
        ax_res.set_ylim(-lim, lim)
    sd = r.qc.values.get("X RES SD", float("nan"))
    ax_res.axhline(0.0, color="0.5", lw=0.6)
    ax_res.legend(title=f"X RES SD = {sd:.3f} px", fontsize=8, title_fontsize=9,
                  loc="upper right", ncols=2, markerscale=3, framealpha=0.85)
    ax_res.set_xlabel(f"along-order position {table.along} [unbinned px]")
    ax_res.set_ylabel("measured - fitted edge [px]")
    ax_res.set_title("residuals of the global edge fits", y=1.0)
    head = "ORDER LOC RES"
    fig.suptitle(f"{head}: {title}" if title else head, fontsize=12)
    return fig


def plot_order_edges(path: str | os.PathLike, flux: np.ndarray, table: OrderTable,
                     report: EdgeFitReport, binning: tuple[int, int] = (1, 1),
                     title: str = "", samples: Any = None, release: bool = True) -> Path:
    """Write the ORDER LOC RES plot (PDF) atomically; see :func:`render_order_edges`
    (``release``: see :func:`soxs_core.io.safety.save_figure`).

    Raises
    ------
    OSError
        When the file cannot be written.
    """
    return save_figure(render_order_edges(flux, table, report, binning, title, samples), path,
                       release=release, format="pdf", dpi=100)
