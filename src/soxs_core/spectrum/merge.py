"""Order merging: extracted echelle orders onto one linear wavelength grid.

Every extracted along-order pixel is a wavelength bin ``[λ - Δλ/2, λ + Δλ/2]`` (``Δλ`` =
``pixelScaleNm``) holding its counts.  Each order is rebinned onto the grid by overlap
fraction — the counts a grid bin receives are the sum of the pixel counts times the fraction
of each pixel inside the bin, the variances are summed with the squared fractions — so the
counts are conserved exactly.  The orders are then combined bin by bin as flux *densities*
(e-/nm: counts over the covered width), weighted by their signal-to-noise ratio squared,
``level^2 / variance``, ``level`` the order's own smoothed density (object and sky).  For
orders in the same units (flux-calibrated, or flat-fielded by the blaze) ``level`` is the same
in every order and the weights are the inverse variances.  Before flux calibration an order
records the source through its own throughput (the blaze): there inverse variances would
favour the order whose blaze is lowest (fewest counts, so the smallest variance), and the
merged counts would jump where an order's faint end begins to overlap; the relative-precision
weights fall towards zero at an order's faint end, and a taper takes them to zero at its
last bins, so that the merged counts pass smoothly from one order to the next, each bin taken
mostly from the order that measures it best.

The weights come from running medians of each order's variance and level along the grid, not
from the bin itself: weights taken from the noisy values of Poisson data would favour the bins
that fluctuated low.  The variance of the combination is propagated exactly for the weights
used.  Adjacent grid bins share input pixels, so their errors are correlated; the
``VARIANCE`` column is the diagonal of that covariance.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from soxs_core.errors import InputError

__all__ = ["MERGE_STEP_NM", "MergedQual", "merge_step", "merge_orders", "merge_values",
           "write_merged_ascii", "MergedArrays", "row_usable"]

#: Grid step of the merged spectrum (nm) per ``ESO SEQ ARM``, as soxspipe's.
MERGE_STEP_NM = {"UVB": 0.02, "VIS": 0.02, "NIR": 0.06}

#: Width (grid bins) of the running median that smooths each order's variance into weights.
WEIGHT_SMOOTHING_BINS = 15

#: Width (grid bins) of the running median of each order's density (object + sky) that sets
#: the weights' level: wide, so that a bin's own noise hardly moves its weight, and narrow
#: beside the blaze's change along an order (about 1 nm at the optical steps)
LEVEL_SMOOTHING_BINS = 51

#: Bins over which an order's weight rises from zero at its ends (see :func:`_taper`).
END_TAPER_BINS = 51

#: an order's level is floored at this fraction of its median (a faint order's noisy level
#: would otherwise give some bins no weight at all)
LEVEL_FLOOR = 0.02


class MergedQual:
    """Bits of the merged spectrum's ``QUAL`` column (0 = good)."""

    #: No order covers the bin: FLUX_COUNTS, VARIANCE, SKY_COUNTS are NaN.
    NO_DATA = 1
    #: Usable pixels cover less than half the bin in every contributing order (an order's
    #: end, or beside a rejected row): the density is that of the covered part.
    PARTIAL = 2

    DESCRIPTION = {NO_DATA: "no order covers the bin",
                   PARTIAL: "usable pixels cover less than half of the bin"}


def merge_step(arm_name: str) -> float:
    """Grid step (nm) for an arm given as ``VIS``/``NIR``/``UVB`` or an arm code
    (``xsh_vis``)."""
    key = str(arm_name).strip().upper().rsplit("_", 1)[-1]
    if key not in MERGE_STEP_NM:
        raise InputError(f"unknown arm {arm_name!r}: expected one of "
                         + ", ".join(MERGE_STEP_NM))
    return MERGE_STEP_NM[key]


def row_usable(table: Table, flux_column: str, variance_column: str) -> np.ndarray:
    """Rows of an extracted-orders table that take part in merging: ``qual`` 0 (when the
    column exists), finite flux, variance > 0, wavelength and pixel scale > 0."""
    flux = np.asarray(table[flux_column], float)
    var = np.asarray(table[variance_column], float)
    wave = np.asarray(table["wavelengthMean"], float)
    scale = np.asarray(table["pixelScaleNm"], float)
    ok = (np.isfinite(flux) & np.isfinite(var) & (var > 0) & np.isfinite(wave)
          & np.isfinite(scale) & (scale > 0))
    if "qual" in table.colnames:
        ok &= np.asarray(table["qual"]) == 0
    return ok


@dataclass
class MergedArrays:
    """Result of :func:`merge_values` on a grid ``wave`` of step ``step``.

    Attributes
    ----------
    wave : ndarray
        Grid centres (nm).
    step : float
        Grid step (nm).
    density : ndarray
        Combined value density (input units per nm); NaN where no order covers the bin.
    variance_density : ndarray
        Its variance.
    sky_density : ndarray
        The ``sky`` values combined with the same weights (per nm), NaN when none given.
    pixel_scale : ndarray
        Weighted mean pixel scale (nm per detector pixel) of the contributing orders.
    norders : ndarray
        Number of orders contributing to each bin.
    coverage : ndarray
        Largest covered fraction of the bin among the contributing orders.
    """

    wave: np.ndarray
    step: float
    density: np.ndarray
    variance_density: np.ndarray
    sky_density: np.ndarray
    pixel_scale: np.ndarray
    norders: np.ndarray
    coverage: np.ndarray

    @property
    def qual(self) -> np.ndarray:
        """``QUAL`` bits (:class:`MergedQual`)."""
        q = np.zeros(self.wave.size, np.uint8)
        q[self.norders == 0] |= MergedQual.NO_DATA
        q[(self.norders > 0) & (self.coverage < 0.5)] |= MergedQual.PARTIAL
        return q


def _pixel_edges(wave: np.ndarray, scale: np.ndarray, index: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper wavelength edges of an order's usable pixels (sorted by wavelength).

    Neighbouring pixels (consecutive along-order indices) share their edge, placed halfway
    between their nominal ``λ ± Δλ/2`` edges, so that the bins tile the order without gaps or
    double counting; a rejected pixel leaves a gap of its width.
    """
    lo = wave - 0.5 * scale
    hi = wave + 0.5 * scale
    if wave.size > 1:
        adjacent = np.abs(np.diff(index)) == 1
        shared = 0.5 * (hi[:-1] + lo[1:])
        hi[:-1] = np.where(adjacent, shared, hi[:-1])
        lo[1:] = np.where(adjacent, shared, lo[1:])
    return lo, np.maximum(hi, lo)


def _running_median(values: np.ndarray, width: int) -> np.ndarray:
    """Running median over ``width`` samples (NaN ignored, edges shrink the window)."""
    n = values.size
    if n == 0 or width <= 1:
        return values.copy()
    half = width // 2
    padded = np.concatenate([np.full(half, np.nan), values, np.full(half, np.nan)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    with warnings.catch_warnings():  # all-NaN windows (gaps) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmedian(windows, axis=1)
    return np.where(np.isfinite(out), out, values)


def _running_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Running mean over ``width`` samples (NaN ignored, edges shrink the window)."""
    finite = np.isfinite(values)
    half = width // 2
    kernel = np.ones(2 * half + 1)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    return np.divide(total, count, out=np.full(values.size, np.nan), where=count > 0)


def _level(density: np.ndarray) -> np.ndarray:
    """An order's smoothed density (NaN: not covered), floored at :data:`LEVEL_FLOOR` of its
    median so that every covered bin keeps some weight."""
    level = _running_median(density, LEVEL_SMOOTHING_BINS)
    positive = level[np.isfinite(level) & (level > 0)]
    floor = LEVEL_FLOOR * float(np.median(positive)) if positive.size else 1.0
    return np.where(np.isfinite(level), np.maximum(level, floor), floor)


def _taper(has: np.ndarray) -> np.ndarray:
    """Weight factor rising linearly from 0 at an order's first and last covered bins to 1
    :data:`END_TAPER_BINS` bins inside: an order that begins (or ends) inside another joins
    the combination gradually, whatever the ratio of the two orders' counts there."""
    k = np.flatnonzero(has)
    if k.size == 0:
        return np.zeros(has.size)
    i = np.arange(has.size)
    inside = np.minimum(i - k[0], k[-1] - i) + 1.0
    return np.clip(inside / END_TAPER_BINS, 0.0, 1.0)


def _rebin_order(lo: np.ndarray, hi: np.ndarray, grid_lo: float, step: float, nbins: int,
                 *values: tuple[np.ndarray, int]) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """Rebin one order's pixel bins ``[lo, hi]`` onto the grid by overlap fraction.

    ``values`` are ``(array, power)`` pairs: each pixel value is multiplied by its overlap
    fraction raised to ``power`` (1 for counts, 2 for variances).  Returns the first grid
    index touched, the covered width per bin (nm) and the rebinned values, all on the
    sub-grid from that first index.
    """
    width = hi - lo
    first = np.floor((lo - grid_lo) / step).astype(np.int64)
    last = np.floor((hi - grid_lo) / step).astype(np.int64)
    first = np.clip(first, 0, nbins - 1)
    last = np.clip(last, 0, nbins - 1)
    k0 = int(first.min())
    n_sub = int(last.max()) - k0 + 1
    span = int((last - first).max()) + 1
    covered = np.zeros(n_sub)
    outs = [np.zeros(n_sub) for _ in values]
    safe_width = np.where(width > 0, width, 1.0)
    for j in range(span):
        k = first + j
        use = k <= last
        if not use.any():
            continue
        kk = k[use]
        b_lo = grid_lo + kk * step
        ov = np.minimum(hi[use], b_lo + step) - np.maximum(lo[use], b_lo)
        ov = np.clip(ov, 0.0, None)
        frac = ov / safe_width[use]
        idx = kk - k0
        covered += np.bincount(idx, weights=ov, minlength=n_sub)
        for out, (arr, power) in zip(outs, values):
            out += np.bincount(idx, weights=arr[use] * frac**power, minlength=n_sub)
    return k0, covered, outs


def merge_values(order: np.ndarray, wave: np.ndarray, pixel_scale: np.ndarray,
                 along: np.ndarray, value: np.ndarray, variance: np.ndarray,
                 step: float, sky: np.ndarray | None = None,
                 usable: np.ndarray | None = None) -> MergedArrays:
    """Merge per-pixel values of several orders onto a linear grid of ``step`` nm.

    Parameters
    ----------
    order, wave, pixel_scale, along : ndarray
        Per extracted pixel: order number, wavelength (nm), pixel width (nm, > 0) and the
        along-order pixel index (to know which pixels are neighbours).
    value, variance : ndarray
        Per-pixel quantity integrated over the pixel (e.g. e-) and its variance.
    step : float
        Grid step (nm); grid centres are integer multiples of it.
    sky : ndarray, optional
        A second per-pixel quantity combined with the same weights (sky counts).
    usable : ndarray of bool, optional
        Pixels to use (default: all).

    Returns
    -------
    MergedArrays
    """
    order = np.asarray(order)
    wave = np.asarray(wave, float)
    pixel_scale = np.asarray(pixel_scale, float)
    along = np.asarray(along)
    value = np.asarray(value, float)
    variance = np.asarray(variance, float)
    sky_arr = np.zeros_like(value) if sky is None else np.asarray(sky, float)
    ok = np.ones(value.size, bool) if usable is None else np.asarray(usable, bool).copy()
    ok &= (np.isfinite(value) & np.isfinite(variance) & (variance > 0) & np.isfinite(wave)
           & np.isfinite(pixel_scale) & (pixel_scale > 0))
    if not ok.any():
        raise InputError("no usable extracted pixel to merge (every row is masked, "
                         "non-finite or has no variance)")
    lo_all = wave[ok] - 0.5 * pixel_scale[ok]
    hi_all = wave[ok] + 0.5 * pixel_scale[ok]
    k_first = int(np.floor(lo_all.min() / step + 0.5))
    k_last = int(np.floor(hi_all.max() / step + 0.5))
    nbins = k_last - k_first + 1
    grid = np.round(np.arange(k_first, k_last + 1) * step, 10)
    grid_lo = (k_first - 0.5) * step

    sum_w = np.zeros(nbins)
    sum_wd = np.zeros(nbins)
    sum_w2v = np.zeros(nbins)
    sum_ws = np.zeros(nbins)
    sum_wp = np.zeros(nbins)
    norders = np.zeros(nbins, np.int16)
    coverage = np.zeros(nbins)
    for n in np.unique(order[ok]):
        sel = ok & (order == n)
        srt = np.argsort(wave[sel], kind="stable")
        w_n, p_n = wave[sel][srt], pixel_scale[sel][srt]
        lo, hi = _pixel_edges(w_n, p_n, along[sel][srt])
        # (p * width) rebinned by fraction = sum(overlap * p): the overlap-weighted pixel width
        k0, covered, (cnt, var, skyc, pix, width2) = _rebin_order(
            lo, hi, grid_lo, step, nbins, (value[sel][srt], 1), (variance[sel][srt], 2),
            (sky_arr[sel][srt], 1), (p_n * (hi - lo), 1), (hi - lo, 2))
        has = covered > 1e-6 * step
        cov_safe = np.where(has, covered, 1.0)
        dens = cnt / cov_safe
        var_d = var / cov_safe**2
        # a bin's variance is the pixels' variance per nm times a factor of how the pixels
        # fall into it (sum of width x fraction^2 over the covered width^2), which alternates
        # from bin to bin by up to 2x, differently in each order: a running median of the
        # product would flip between its two values, and per-bin weights would make the
        # merged counts of two orders of different throughput alternate between theirs.
        # The weights take the median of the first and the mean of the second.
        geometry = np.where(has, width2 / cov_safe**2, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = _running_median(np.where(has & (geometry > 0), var_d / geometry, np.nan),
                                   WEIGHT_SMOOTHING_BINS)
        smooth = np.where(has, rate * _running_mean(geometry, WEIGHT_SMOOTHING_BINS), 0.0)
        level = _level(np.where(has, (cnt + skyc) / cov_safe, np.nan))
        ok_w = has & np.isfinite(smooth) & (smooth > 0)
        weight = np.where(ok_w, level**2 / np.where(ok_w, smooth, 1.0), 0.0) * _taper(has)
        sl = slice(k0, k0 + covered.size)
        sum_w[sl] += weight
        sum_wd[sl] += weight * dens
        sum_w2v[sl] += weight**2 * var_d
        sum_ws[sl] += weight * skyc / cov_safe
        sum_wp[sl] += weight * pix / cov_safe
        norders[sl] += (weight > 0).astype(np.int16)
        coverage[sl] = np.maximum(coverage[sl], np.where(weight > 0, covered / step, 0.0))
    good = sum_w > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        density = np.where(good, sum_wd / np.where(good, sum_w, 1.0), np.nan)
        var_density = np.where(good, sum_w2v / np.where(good, sum_w, 1.0) ** 2, np.nan)
        sky_density = (np.where(good, sum_ws / np.where(good, sum_w, 1.0), np.nan)
                       if sky is not None else np.full(nbins, np.nan))
        pscale = np.where(good, sum_wp / np.where(good, sum_w, 1.0), np.nan)
    return MergedArrays(wave=grid, step=float(step), density=density,
                        variance_density=var_density, sky_density=sky_density,
                        pixel_scale=pscale, norders=norders, coverage=coverage)


def merge_orders(orders_table: Table, arm_name: str,
                 flux_column: str = "extractedFluxOptimal",
                 variance_column: str = "varianceSpectrum",
                 step: float | None = None, sky_column: str | None = "skyFlux") -> Table:
    """Merge the extracted orders into one spectrum on a linear wavelength grid.

    Parameters
    ----------
    orders_table : astropy.table.Table
        Extracted orders (one row per along-order pixel): ``order``, ``wavelengthMean`` (nm),
        ``pixelScaleNm`` (nm per pixel), the flux and variance columns, optionally ``qual``
        (rows with non-zero ``qual`` are left out), the along index ``ycoord`` (SOXS NIR
        ``xcoord``) and ``skyFlux``.
    arm_name : str
        ``UVB``/``VIS``/``NIR`` (or an arm code such as ``soxs_nir``): sets the default step.
    flux_column, variance_column : str
        Columns merged (e- and e-²; e.g. ``extractedFluxBoxcar`` / ``varianceBoxcar``).
    step : float, optional
        Grid step in nm (default :data:`MERGE_STEP_NM` of the arm: 0.02 UVB/VIS, 0.06 NIR).
    sky_column : str or None
        Sky column merged with the same weights into ``SKY_COUNTS`` (None: NaN).

    Returns
    -------
    astropy.table.Table
        ``WAVE`` (nm, bin centre), ``FLUX_COUNTS`` (e- per grid bin), ``VARIANCE`` (e-²),
        ``SKY_COUNTS`` (e- per grid bin), ``SNR``, ``FLUX_DENSITY_COUNTS`` (e-/nm), and ours:
        ``ERR_COUNTS`` (e-, 1σ), ``NORDERS`` (orders combined), ``QUAL`` (:class:`MergedQual`).
        The meta of the input table is copied, with ``MERGSTEP`` (nm).

    Raises
    ------
    InputError
        When a required column is missing or no row is usable.
    """
    need = ["order", "wavelengthMean", "pixelScaleNm", flux_column, variance_column]
    missing = [c for c in need if c not in orders_table.colnames]
    if missing:
        raise InputError("extracted-orders table lacks column(s) " + ", ".join(missing))
    step = merge_step(arm_name) if step is None else float(step)
    if not np.isfinite(step) or step <= 0:
        raise InputError(f"merge step must be a positive number of nm, not {step}")
    along_col = next((c for c in ("ycoord", "xcoord") if c in orders_table.colnames), None)
    along = (np.asarray(orders_table[along_col]) if along_col is not None
             else np.arange(len(orders_table)))
    sky = (np.asarray(orders_table[sky_column], float)
           if sky_column and sky_column in orders_table.colnames else None)
    m = merge_values(orders_table["order"], orders_table["wavelengthMean"],
                     orders_table["pixelScaleNm"], along, orders_table[flux_column],
                     orders_table[variance_column], step, sky=sky,
                     usable=row_usable(orders_table, flux_column, variance_column))
    return merged_table(m, orders_table.meta)


def merged_table(m: MergedArrays, meta: dict | None = None) -> Table:
    """The merged-spectrum table (layout of :func:`merge_orders`) of merged counts."""
    counts = m.density * m.step
    variance = m.variance_density * m.step**2
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = counts / np.sqrt(variance)
    out = Table(meta=dict(meta or {}))
    out.meta["MERGSTEP"] = m.step
    out["WAVE"] = m.wave
    out["WAVE"].unit = "nm"
    out["WAVE"].description = "centre of the grid bin [WAVE - step/2, WAVE + step/2]"
    out["FLUX_COUNTS"] = counts.astype(np.float64)
    out["FLUX_COUNTS"].unit = "electron"
    out["FLUX_COUNTS"].description = ("e- per grid bin (flux-conserving: the sum over bins "
                                      "is the detected e-), not per detector pixel")
    out["VARIANCE"] = variance
    out["VARIANCE"].unit = "electron2"
    out["VARIANCE"].description = "variance of FLUX_COUNTS (diagonal; neighbours correlate)"
    out["SKY_COUNTS"] = m.sky_density * m.step
    out["SKY_COUNTS"].unit = "electron"
    out["SKY_COUNTS"].description = "sky e- per grid bin under the extraction window"
    out["SNR"] = snr
    out["SNR"].description = "FLUX_COUNTS / sqrt(VARIANCE)"
    out["FLUX_DENSITY_COUNTS"] = m.density
    out["FLUX_DENSITY_COUNTS"].unit = "electron/nm"
    out["FLUX_DENSITY_COUNTS"].description = ("e- per nm (orders combined by their "
                                              "signal-to-noise ratio squared)")
    out["ERR_COUNTS"] = np.sqrt(variance)
    out["ERR_COUNTS"].unit = "electron"
    out["ERR_COUNTS"].description = "1-sigma error of FLUX_COUNTS"
    out["NORDERS"] = m.norders
    out["NORDERS"].description = "number of orders combined in the bin"
    out["QUAL"] = m.qual
    out["QUAL"].description = "; ".join(f"{bit}: {text}"
                                        for bit, text in MergedQual.DESCRIPTION.items())
    return out


#: Columns of soxspipe's merged ASCII spectrum, in its order (WAVE there in Angstrom).
ASCII_COLUMNS = ("WAVE", "FLUX_COUNTS", "VARIANCE", "SKY_COUNTS", "SNR", "FLUX_DENSITY_COUNTS")


def write_merged_ascii(path: str | os.PathLike, table: Table) -> Path:
    """Write the EXTRACTED MERGED ASCII product: a whitespace-separated text table.

    The layout is that of soxspipe's ``_EXTRACTED_MERGED.txt``: one header line naming the
    columns, then one line per grid bin with ``WAVE`` in **Angstrom** (2 decimals),
    ``FLUX_COUNTS``, ``VARIANCE``, ``SKY_COUNTS``, ``SNR``, ``FLUX_DENSITY_COUNTS``; our
    ``ERR_COUNTS``, ``NORDERS`` and ``QUAL`` follow (readers of soxspipe's file that go by
    name or by the first six positions read ours).  Empty bins are written as ``nan``.
    The file is written atomically.
    """
    from soxs_core.io.safety import write_atomically

    missing = [c for c in ASCII_COLUMNS if c not in table.colnames]
    if missing:
        raise InputError("merged table lacks column(s) " + ", ".join(missing))
    extra = [c for c in ("ERR_COUNTS", "NORDERS", "QUAL") if c in table.colnames]
    names = list(ASCII_COLUMNS) + extra
    cols = [np.asarray(table["WAVE"], float) * 10.0]
    cols += [np.asarray(table[c]) for c in names[1:]]
    fmts = ["%.2f"] + ["%.6g"] * (len(ASCII_COLUMNS) - 1) + [
        "%d" if c in ("NORDERS", "QUAL") else "%.6g" for c in extra]

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(" ".join(names) + "\n")
            rows = zip(*cols)
            fh.writelines(" ".join(f % v if np.isfinite(v) else "nan"
                                   for f, v in zip(fmts, row)) + "\n" for row in rows)

    return write_atomically(path, write)
