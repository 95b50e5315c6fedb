"""QC plots of the sky model: SKY MODEL QC PLOTS and SKY SUBTRACTION QUICKLOOK.

* :func:`plot_sky_model` — for a few orders (the first, last and evenly spaced between): the
  sky pixels against wavelength with the fitted sky (``G(lambda)``, at the slit's mean
  illumination) and its breakpoints, the normalised residuals of the fit with the rejected
  pixels marked, a zoom on the order's brightest sky line, and the slit illumination
  ``J(s)`` with the data binned along the slit.
* :func:`plot_sky_quicklook` — the frame, the sky model and the sky-subtracted frame side by
  side (block means, one stretch for the first two), plus the residual in units of the
  error.

Pixel clouds are drawn as density images (2-D histograms) and the few marker panels are
thinned, so that a full frame's plot stays small and fast: rasterized artists would cost a
figure-sized buffer each, held by the PDF writer until the file is complete (about 8 MB
apiece, 150 MB for this plot).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.io.figures import few_ticks, new_figure
from soxs_core.io.image import DetectorImage
from soxs_core.io.safety import save_figure

__all__ = ["binned_illumination", "plot_sky_model", "plot_sky_quicklook"]

#: most markers drawn as vectors (rejected pixels, the zoom on a line)
MAX_MARKERS = 3000


def _pick_orders(orders: list[int], count: int) -> list[int]:
    if len(orders) <= count:
        return orders
    idx = np.unique(np.round(np.linspace(0, len(orders) - 1, count)).astype(int))
    return [orders[i] for i in idx]


def _thin(n: int, rng: np.random.Generator, limit: int = MAX_MARKERS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, limit, replace=False))


def binned_illumination(slit: np.ndarray, data: np.ndarray, spectrum: np.ndarray,
                        slit_range: tuple[float, float], n_bins: int = 60,
                        min_pixels: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The slit illumination measured from the data: ``sum(data) / sum(G)`` in slit bins.

    A ratio of sums, not an inverse-variance mean of ``data / G``: the frame's errors come
    from its own counts, so weighting by them favours the pixels that fluctuated low and
    biases a faint sky's illumination by several per cent.  Only pixels where ``G`` is above
    its median are used, so that the ratio is not dominated by the noise of the dark
    continuum between the lines.

    Parameters
    ----------
    slit, data, spectrum : ndarray
        Slit position, data and the fitted sky spectrum ``G(lambda)`` of each sky pixel.
    slit_range : (float, float)
        Slit interval the bins span.
    n_bins : int
        Number of bins.
    min_pixels : int
        Fewest bright pixels to bin at all.

    Returns
    -------
    centres, ratio : ndarray
        Bin centres and the measured illumination (NaN where a bin is empty); both empty
        when there are too few pixels.
    """
    if spectrum.size == 0:
        return np.zeros(0), np.zeros(0)
    bright = spectrum > np.median(spectrum)
    if bright.sum() <= min_pixels:
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(*slit_range, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, slit[bright]) - 1, 0, n_bins - 1)
    num = np.bincount(idx, data[bright], minlength=n_bins)
    den = np.bincount(idx, spectrum[bright], minlength=n_bins)
    ratio = np.divide(num, den, out=np.full(n_bins, np.nan), where=den > 0)
    return 0.5 * (edges[1:] + edges[:-1]), ratio


def _density(ax: Any, x: np.ndarray, y: np.ndarray, x_range: tuple[float, float],
             y_range: tuple[float, float], bins: tuple[int, int]) -> None:
    """Draw a point cloud as the square root of its 2-D histogram (a grey image)."""
    if x.size == 0:
        return
    counts, _, _ = np.histogram2d(x, y, bins=bins, range=(x_range, y_range))
    ax.imshow(np.sqrt(counts.T), origin="lower", aspect="auto", cmap="Greys",
              interpolation="nearest", extent=(*x_range, *y_range),
              vmax=max(float(np.sqrt(counts.max())), 1.0) * 0.8)


def plot_sky_model(path: str | Path, image: DetectorImage, model: Any, disp_map: Any,
                   orders: list[int] | None = None, max_orders: int = 4,
                   title: str | None = None) -> Path:
    """Write the SKY MODEL QC PLOTS PDF.

    Parameters
    ----------
    path : str or Path
        Output PDF.
    image : DetectorImage
        The frame the sky was fitted to.
    model : SkyModel
        The fit (:func:`soxs_core.extraction.sky.fit_sky`).
    disp_map : DispersionMap
        Per-pixel ``wavelength``, ``slit`` and ``order`` of the frame.
    orders : list of int, optional
        Orders to show; default up to ``max_orders`` spread over the fitted ones.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    path = Path(path)
    chosen = _pick_orders(orders or model.orders, max_orders)
    rng = np.random.default_rng(0)
    fig = new_figure(14, 3.3 * len(chosen) + 0.8)
    grid = fig.add_gridspec(len(chosen) * 2, 3, width_ratios=[3.2, 1.2, 1.2],
                            height_ratios=[2, 1] * len(chosen))
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(3)]
                     for r in range(len(chosen) * 2)])
    wave, slit = disp_map.wavelength, disp_map.slit
    order_img = np.asarray(disp_map.order)
    for row, n in enumerate(chosen):
        fit = model.fits[n]
        ax_d, ax_r = axes[2 * row, 0], axes[2 * row + 1, 0]
        ax_z, ax_zr = axes[2 * row, 1], axes[2 * row + 1, 1]
        ax_j, ax_x = axes[2 * row, 2], axes[2 * row + 1, 2]
        member = order_img == n
        used = model.used & member
        rej = model.rejected & member
        lam_u, s_u = wave[used].astype(float), slit[used].astype(float)
        d_u = image.data[used].astype(float)
        e_u = np.sqrt(image.error[used].astype(float) ** 2 + model.error[used] ** 2)
        m_u = model.sky[used].astype(float)
        illum = fit.illumination(s_u)
        flat_u = d_u / np.where(illum > 0, illum, 1.0)     # data at unit illumination
        res_u = (d_u - m_u) / e_u
        grid = np.linspace(fit.knots[0], fit.knots[-1], 20000)
        g = fit.spectrum(grid)
        lam_range = (float(grid[0]), float(grid[-1]))
        lo, hi = np.percentile(flat_u, [0.5, 99.9]) if flat_u.size else (0, 1)
        flux_range = (min(lo, 0) - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
        _density(ax_d, lam_u, flat_u, lam_range, flux_range, (800, 160))
        ax_d.plot([], [], "s", color="0.45", ms=4, label="sky pixels / J(s) (density)")
        ax_d.plot(grid, g, "-", color="C0", lw=0.7, label="sky model G(λ)")
        if rej.any():
            lam_r = wave[rej].astype(float)
            pr = _thin(lam_r.size, rng, MAX_MARKERS)
            ax_d.plot(lam_r[pr], image.data[rej][pr], ",", color="C3", alpha=0.5,
                      label="rejected / object")
        ax_d.set_ylim(*flux_range)
        ax_d.set_ylabel("e- / pixel")
        ax_d.set_title(f"order {n}: {fit.n_knots} breakpoints, {fit.n_used} pixels used, "
                       f"{fit.n_rejected} rejected, χ²/pixel {fit.chi2:.2f}", fontsize=9,
                       y=1.0)
        ax_d.legend(fontsize=7, loc="upper left", markerscale=2)
        _density(ax_r, lam_u, res_u, lam_range, (-6, 6), (800, 60))
        for v in (-3, 3):
            ax_r.axhline(v, color="C3", lw=0.6, ls="--")
        ax_r.axhline(0, color="C0", lw=0.6)
        ax_r.set_ylim(-6, 6)
        rms = float(np.sqrt(np.mean(res_u**2))) if res_u.size else np.nan
        ax_r.set_ylabel("(data - model) / σ")
        ax_r.set_xlabel("wavelength (nm)")
        ax_r.text(0.01, 0.92, f"rms {rms:.3f}", transform=ax_r.transAxes, fontsize=8,
                  va="top")
        # zoom on the brightest line: the fit's sub-pixel sampling
        if lam_u.size:
            peak = grid[np.argmax(g)]
            width = 12 * max(np.median(np.diff(np.unique(fit.knots))), 1e-4)
            zsel = np.abs(lam_u - peak) < width
            zg = np.abs(grid - peak) < width
            zsel = np.flatnonzero(zsel)[_thin(int(zsel.sum()), rng, MAX_MARKERS)]
            ax_z.plot(lam_u[zsel], flat_u[zsel], ".", ms=1.5, color="0.45")
            ax_z.plot(grid[zg], g[zg], "-", color="C0", lw=1)
            br = np.unique(fit.knots)
            br = br[np.abs(br - peak) < width]
            ax_z.plot(br, fit.spectrum(br), "|", color="C1", ms=8, label="breakpoints")
            ax_z.set_title(f"brightest line, {peak:.3f} nm", fontsize=9, y=1.0)
            ax_z.legend(fontsize=7)
            ax_zr.plot(lam_u[zsel], res_u[zsel], ".", ms=1.5, color="0.3")
            ax_zr.axhline(0, color="C0", lw=0.6)
            ax_zr.set_ylim(-6, 6)
            ax_zr.set_xlabel("wavelength (nm)")
        # slit illumination: data / G binned along the slit, and J(s)
        s_grid = np.linspace(*fit.slit_range, 400)
        centres, ratio = binned_illumination(s_u, d_u, fit.spectrum(lam_u), fit.slit_range)
        if centres.size:
            ax_j.plot(centres, ratio, ".", color="0.3", label="data / G (binned)")
        ax_j.plot(s_grid, fit.illumination(s_grid), "-", color="C0", label="J(s)")
        ax_j.set_title("slit illumination", fontsize=9, y=1.0)
        ax_j.set_xlabel("slit position (arcsec)")
        ax_j.legend(fontsize=7)
        # residual against slit position: what the illumination leaves
        _density(ax_x, s_u, res_u, fit.slit_range, (-6, 6), (120, 60))
        ax_x.axhline(0, color="C0", lw=0.6)
        ax_x.set_ylim(-6, 6)
        ax_x.set_xlabel("slit position (arcsec)")
        few_ticks(ax_d, ax_r, ax_x, ax_j, x=6, y=4)
        few_ticks(ax_z, ax_zr, x=3, y=4)
    fig.suptitle(title or "Sky model (B-spline in wavelength x slit illumination)",
                 fontsize=11, y=1 - 0.12 / fig.get_figheight())
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.75 / fig.get_figheight(),
                        bottom=0.5 / fig.get_figheight(), hspace=0.62, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, format="pdf", dpi=100)


def _blocks(img: np.ndarray, factor: int) -> np.ndarray:
    """Block means (NaN-aware) of ``factor`` x ``factor`` blocks."""
    if factor <= 1:
        return img.astype(np.float32)
    r, c = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    b = img[:r, :c].astype(np.float32).reshape(r // factor, factor, c // factor, factor)
    with np.errstate(invalid="ignore"):
        return np.nanmean(b, axis=(1, 3))


def _quicklook_panels(image: DetectorImage, model: Any, order_img: np.ndarray, factor: int
                      ) -> tuple[list[np.ndarray], float, int]:
    """Block means of the frame, the sky model, their difference (in the modelled orders)
    and the sky pixels' normalised residual; and the sum of that residual squared and its
    count.  Made in bands of whole blocks of rows: full-frame temporaries of each would
    add a few hundred MB to the recipe's peak memory for a 700-pixel picture."""
    rows = image.data.shape[0]
    band = factor * max(1, 256 // factor)
    orders = np.asarray(model.orders)
    parts: list[list[np.ndarray]] = [[], [], [], []]
    sum_r2, n_r = 0.0, 0
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        sl = slice(r0, r1)
        in_order = np.isin(order_img[sl], orders)
        data = np.where(in_order, image.data[sl], np.nan)
        sky = np.where(in_order, model.sky[sl], np.nan)
        sub = data - sky
        err = np.sqrt(image.error[sl].astype(np.float32) ** 2
                      + model.error[sl].astype(np.float32) ** 2)
        used = model.used[sl]
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.where(used, sub / err, np.nan)
            r = (image.data[sl][used] - model.sky[sl][used]) / err[used]
        sum_r2 += float(np.sum(r.astype(np.float64) ** 2))
        n_r += int(r.size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for part, a in zip(parts, (data, sky, sub, norm)):
                part.append(_blocks(a, factor))
    return [np.concatenate(p) for p in parts], sum_r2, n_r


def plot_sky_quicklook(path: str | Path, image: DetectorImage, model: Any, disp_map: Any,
                       title: str | None = None, max_pixels: int = 700) -> Path:
    """Write the SKY SUBTRACTION QUICKLOOK PDF: frame, sky model, sky-subtracted frame and
    the normalised residual of the sky pixels, side by side.

    Parameters
    ----------
    path : str or Path
        Output PDF.
    image : DetectorImage
        The frame before sky subtraction.
    model : SkyModel
        The sky fit.
    disp_map : DispersionMap
        Per-pixel map of the frame (its ``order`` image outlines the orders).
    title : str, optional
    max_pixels : int
        Longest side of the displayed (block-averaged) images.

    Returns
    -------
    Path
    """
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    factor = max(1, int(np.ceil(max(image.data.shape) / max_pixels)))
    panels, sum_r2, n_r = _quicklook_panels(image, model, np.asarray(disp_map.order), factor)
    finite = panels[0][np.isfinite(panels[0])]
    lo, hi = (np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0))
    fsub = panels[2][np.isfinite(panels[2])]
    span = float(np.percentile(np.abs(fsub), 99)) if fsub.size else 1.0
    # the residual of block means shrinks as sqrt(pixels per block): show it in those units
    scale = 3.0 / factor
    specs = [("frame (e-)", panels[0], "viridis", lo, hi),
             ("sky model (e-)", panels[1], "viridis", lo, hi),
             ("frame - sky (e-)", panels[2], "coolwarm", -span, span),
             (f"sky pixels: (frame - sky) / σ\nmean of {factor}x{factor} blocks",
              panels[3], "coolwarm", -scale, scale)]
    ratio = panels[0].shape[1] / panels[0].shape[0]
    fig = new_figure(4 * 2.9 * max(ratio, 0.6) + 2, 7.5)
    axes = [fig.add_subplot(1, 4, k + 1) for k in range(4)]
    for ax, (label, arr, cmap, vmin, vmax) in zip(axes, specs):
        im = ax.imshow(arr, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                       interpolation="nearest", aspect="auto",
                       extent=(0, image.data.shape[1], 0, image.data.shape[0]))
        ax.set_title(label, fontsize=9, y=1.0)
        ax.set_xlabel("x (px)")
        few_ticks(ax, x=3, y=6, labelsize=8)
        bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        bar.locator = MaxNLocator(6)     # the bar's long axis only: its short one has none
        bar.ax.tick_params(labelsize=8)
    axes[0].set_ylabel("y (px)")
    rms = float(np.sqrt(sum_r2 / n_r)) if n_r else float("nan")
    fig.suptitle((title or "Sky subtraction quicklook")
                 + f" — sky pixels' residual rms {rms:.3f} σ", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.95, top=0.88, bottom=0.08, wspace=0.55)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, format="pdf", dpi=100)
