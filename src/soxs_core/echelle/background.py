"""Scattered light: a smooth background modelled from the inter-order pixels of a frame.

Light scattered inside the spectrograph puts a broad, smooth halo under and between the
orders.  It is measured where no order falls (the *inter-order* pixels) and interpolated
under the orders.  The frame is handled in its *canonical orientation*: rows of constant
dispersion position (image rows when the orders run along ``y``, image columns for SOXS NIR,
which disperses along ``x``).

Method (all but two steps work on a grid of bands, so a 4000 x 2048 frame costs a fraction of
a second).  The smoothing scales are given in unbinned px, as the halo's size is fixed on the
detector, and converted with the frame's binning:

1. **Cells.**  The canonical rows are grouped into bands of ``band_rows`` rows (a quarter of
   ``gaussian_blur_sigma``: the model is smoothed over far more than a band along the
   dispersion anyway).  In each band, every cross-order position (column) gives one *cell*:
   the median, interquartile range and count of its usable pixels (outside the widened orders,
   QUAL free of ``reject_bits``, finite).  The median makes a cell immune to cosmic rays and
   unflagged hot pixels; it is the one pixel loop (Cython kernel ``_background``, numpy twin
   :func:`cell_statistics_reference`).
2. **Across the orders.**  In each band a penalised least-squares B-spline of degree
   ``bspline_deg`` (a P-spline: uniform knots, second-difference penalty) is fitted to the cell
   medians, weighted by their inverse variance.  The penalty (third differences of the
   coefficients) is scaled so that the spline smooths over ``smoothing_length`` pixels where
   the data are dense; where there are none (under an order, beyond a masked patch) it
   bridges with a parabola that keeps the light's curvature, so orders that leave only narrow
   gaps and masked regions need no special case.  The design matrix is shared by all
   bands; only the weights differ, so the normal equations of every band come from a few
   matrix products and one batched solve.  Cells more than ``clip_sigma`` from the fit are
   rejected and the fit repeated (``clip_iterations`` times at most).
3. **Along the dispersion.**  The band models are smoothed with a Gaussian of
   ``gaussian_blur_sigma`` pixels, as a local-linear (Gaussian-weighted) regression on the
   band centres: in the interior that is exactly a Gaussian blur, and at the frame ends and
   next to empty bands it does not drag the model towards the mean as a truncated blur would.
4. **Back to pixels.**  Linear interpolation between band centres (second kernel, with its
   numpy twin :func:`expand_bands_reference`).

The model's 1-sigma error has two parts in quadrature: the noise of the inter-order pixels
propagated through the two linear steps (the spline's posterior variance, then the squared
local-linear weights), and the local rms misfit of the model to the inter-order cells beyond
their noise, which stands for what the smooth model cannot follow, under the orders too.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.io.image import DetectorImage

__all__ = [
    "BackgroundModel",
    "fit_background",
    "subtract_background",
    "fit_readout_pattern",
    "plot_background",
    "in_order_mask_from_edges",
    "cell_statistics_reference",
    "expand_bands_reference",
    "band_solve_reference",
]

#: Bits of QUAL that keep a pixel out of the background fit (every bit: a static bad pixel
#: or a low-sensitivity one does not measure the scattered light faithfully either).
REJECT_ALL = 0xFF

#: A cell enters the fit only with at least this many usable pixels (one or two pixels are
#: too easily a cosmic-ray hit or a leaking order edge).
MIN_CELL_PIXELS = 3

#: Order of the difference penalty of the spline across the orders: third differences bridge
#: an order with a parabola, so the light keeps its curvature under a bright order.
PENALTY_ORDER = 3

#: Variance of the median of n normal values is about (pi / 2) sigma^2 / n.
_MEDIAN_VARIANCE = math.pi / 2.0

#: IQR of a normal distribution in units of sigma.
_IQR_SIGMA = 1.3489795


# ---------------------------------------------------------------------------------- result
@dataclass
class BackgroundModel:
    """A fitted scattered-light model.

    Attributes
    ----------
    model : ndarray of float32
        The background (e-) at every pixel of the frame.
    uncertainty : ndarray of float32
        1-sigma error (e-) of ``model`` at every pixel: statistical and misfit parts in
        quadrature.
    used : ndarray of bool
        Pixels that could enter the fit (outside the widened orders, good QUAL, finite).
    dispersion_axis : str
        ``"y"`` or ``"x"``, as given to :func:`fit_background`.
    band_rows : int
        Rows of constant dispersion position per band.
    band_centres : ndarray
        Canonical row coordinate of each band's centre.
    band_model : ndarray
        The model at the band centres (bands x cross-order pixels), canonical orientation.
    band_statistical_error, band_systematic_error : ndarray
        The two parts of ``uncertainty`` at the band centres: the propagated noise of the
        inter-order pixels, and the local rms misfit of the model to the inter-order cells
        beyond their noise (how well the smooth model can follow the light; it stands for the
        error of bridging under the orders too).
    band_uncertainty : ndarray
        The two in quadrature: ``uncertainty`` at the band centres.
    stats : dict
        Fit statistics: ``n_used`` (pixels), ``used_fraction``, ``n_cells``, ``n_clipped``
        (cells rejected by the clipping), ``n_bands_fitted``, ``residual_rms`` (e-, robust rms
        of the cell medians around the fit), ``chi_rms`` (the same in units of their expected
        scatter, about 1 when the noise estimate is right), ``model_max``, ``model_median``,
        ``uncertainty_median`` (e-).
    parameters : dict
        The parameters the model was fitted with.
    """

    model: np.ndarray
    used: np.ndarray
    dispersion_axis: str
    band_rows: int
    band_centres: np.ndarray
    band_model: np.ndarray
    band_statistical_error: np.ndarray
    band_systematic_error: np.ndarray
    band_uncertainty: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def uncertainty(self) -> np.ndarray:
        """1-sigma error (e-, float32) of ``model`` at every pixel, made on each access from
        the band errors (a full-frame plane that the recipes need only in row bands: see
        :meth:`uncertainty_rows`)."""
        return self.uncertainty_rows(0, self.model.shape[0])

    def uncertainty_rows(self, start: int, stop: int) -> np.ndarray:
        """``uncertainty`` of the frame's rows ``start:stop`` (float32)."""
        rows, cols = self.model.shape
        start, stop = max(0, int(start)), min(rows, int(stop))
        err = self.band_uncertainty
        out = np.empty((max(stop - start, 0), cols), np.float32)
        if self.dispersion_axis == "y":  # canonical rows are the frame's rows
            _expand(err, self.band_centres, out, extrapolate=False, first_row=start,
                    total_rows=rows)
        else:  # the frame's rows are canonical columns
            _expand(np.ascontiguousarray(err[:, start:stop]), self.band_centres, out.T,
                    extrapolate=False)
        return out


# ---------------------------------------------------------------------------------- cells
def cell_statistics_reference(flux: np.ndarray, qual: np.ndarray, in_order: np.ndarray,
                              band_rows: int, reject_bits: int = REJECT_ALL,
                              errors: np.ndarray | None = None
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, interquartile range, count and mean squared error of the usable pixels of
    every cell (pure numpy; the twin of the ``_background`` kernel).

    Parameters
    ----------
    flux, qual, in_order : ndarray
        Canonical orientation (rows of constant dispersion position).  A pixel is usable when
        ``in_order`` is False, ``qual & reject_bits`` is 0 and its flux is finite.
    band_rows : int
        Rows per band; the last band takes the rows that are left.
    reject_bits : int
        QUAL bits that exclude a pixel.
    errors : ndarray, optional
        1-sigma errors; when given, the fourth result is the mean of their squares.

    Returns
    -------
    median, iqr, count, mean_var : ndarray
        Shape (bands, columns).  Median and quartiles (linear interpolation between order
        statistics, as :func:`numpy.percentile`) in double precision rounded to float32; NaN
        where the cell has no usable pixel.  ``count`` is int32; ``mean_var`` float32 (NaN
        without ``errors`` or usable pixels).
    """
    rows, cols = flux.shape
    nb = -(-rows // band_rows)
    pad = nb * band_rows - rows
    usable = ~np.asarray(in_order, bool) & ((np.asarray(qual).astype(np.int64)
                                              & int(reject_bits)) == 0)
    usable &= np.isfinite(flux)
    values = np.where(usable, flux, np.inf).astype(np.float32)
    values = np.pad(values, ((0, pad), (0, 0)), constant_values=np.inf)
    ok = np.pad(usable, ((0, pad), (0, 0)))
    srt = np.sort(values.reshape(nb, band_rows, cols), axis=1).astype(np.float64)
    count = ok.reshape(nb, band_rows, cols).sum(axis=1).astype(np.int32)
    safe = np.maximum(count, 1)

    def quantile(q: float) -> np.ndarray:
        pos = q * (safe - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, safe - 1)
        frac = pos - lo
        vlo = np.take_along_axis(srt, lo[:, None, :], axis=1)[:, 0]
        vhi = np.take_along_axis(srt, hi[:, None, :], axis=1)[:, 0]
        # the order of operations is the kernel's
        return vlo + frac * (vhi - vlo)

    with np.errstate(invalid="ignore"):  # empty cells: inf - inf, replaced below
        med = quantile(0.5)
        iqr = quantile(0.75) - quantile(0.25)
    empty = count == 0
    med = np.where(empty, np.nan, med).astype(np.float32)
    iqr = np.where(empty, np.nan, iqr).astype(np.float32)
    if errors is None:
        mean_var = np.full(med.shape, np.nan, np.float32)
    else:
        e2 = np.where(usable, np.asarray(errors, np.float64) ** 2, 0.0)
        e2 = np.pad(e2, ((0, pad), (0, 0))).reshape(nb, band_rows, cols)
        total = np.zeros((nb, cols))
        for i in range(band_rows):  # row by row from the top: the kernel's summation order
            total += e2[:, i]
        mean_var = np.where(empty, np.nan, total / safe).astype(np.float32)
    return med, iqr, count, mean_var


def _cell_statistics(flux, qual, in_order, band_rows, reject_bits, errors, used):
    """The kernel (it also fills ``used``, the usable pixels, canonical orientation) when it
    is built, otherwise the numpy twin."""
    try:
        from soxs_core import _background
    except ImportError:  # pragma: no cover - the kernel is part of the build
        used[...] = (~np.asarray(in_order, bool) & ((qual & reject_bits) == 0)
                     & np.isfinite(flux))
        return cell_statistics_reference(flux, qual, in_order, band_rows, reject_bits, errors)
    rows, cols = flux.shape
    nb = -(-rows // band_rows)
    med = np.empty((nb, cols), np.float32)
    iqr = np.empty((nb, cols), np.float32)
    count = np.empty((nb, cols), np.int32)
    mean_var = np.empty((nb, cols), np.float32)
    err = (np.zeros((1, 1), np.float32) if errors is None
           else np.asarray(errors, np.float32))
    _background.cell_statistics(
        np.asarray(flux, np.float32), np.asarray(qual, np.uint8),
        np.asarray(in_order, bool).view(np.uint8), int(band_rows), int(reject_bits),
        err, errors is not None, med, iqr, count, mean_var, used.view(np.uint8))
    return med, iqr, count, mean_var


# ---------------------------------------------------------------------------------- expand
def expand_bands_reference(values: np.ndarray, centres: np.ndarray, rows: int) -> np.ndarray:
    """Linear interpolation of band values to every canonical row (pure numpy twin of the
    ``_background`` kernel).

    Rows beyond the first or last band centre are extrapolated along the line through the two
    outermost centres.  ``values`` is (bands, columns) float64; the result is float32, each
    value ``(1 - t) * v0 + t * v1`` computed in double precision.
    """
    j, t = _interpolation_weights(centres, rows)
    if values.shape[0] == 1:
        return np.repeat(values.astype(np.float32), rows, axis=0)
    v0 = values[j]
    v1 = values[j + 1]
    return ((1.0 - t)[:, None] * v0 + t[:, None] * v1).astype(np.float32)


def _interpolation_weights(centres: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(rows, dtype=np.float64)
    nb = centres.size
    if nb == 1:
        return np.zeros(rows, np.intp), np.zeros(rows)
    j = np.clip(np.searchsorted(centres, y, side="right") - 1, 0, nb - 2).astype(np.intp)
    t = (y - centres[j]) / (centres[j + 1] - centres[j])
    return j, t


def _expand(values: np.ndarray, centres: np.ndarray, out: np.ndarray,
            extrapolate: bool = True, first_row: int = 0, total_rows: int | None = None
            ) -> None:
    """Fill ``out`` (canonical rows x columns, possibly a transposed view) by interpolation;
    without ``extrapolate`` rows beyond the outer band centres take those bands' values (an
    error must not be extrapolated through zero).  ``out`` may be the canonical rows
    ``first_row ..`` of a frame of ``total_rows`` rows (default: all of them)."""
    rows = out.shape[0]
    j, t = _interpolation_weights(centres, total_rows or rows)
    j, t = j[first_row:first_row + rows], t[first_row:first_row + rows]
    if not extrapolate:
        t = np.clip(t, 0.0, 1.0)
    try:
        from soxs_core import _background
    except ImportError:  # pragma: no cover
        v = np.asarray(values, np.float64)
        if v.shape[0] == 1:
            out[...] = v[0].astype(np.float32)
        else:
            out[...] = ((1.0 - t)[:, None] * v[j] + t[:, None] * v[j + 1]).astype(np.float32)
        return
    _background.expand_bands(np.ascontiguousarray(values, np.float64),
                             j.astype(np.int64), t.astype(np.float64), out)


# ---------------------------------------------------------------------------------- spline
def _nonzero_basis_values(x: np.ndarray, knots: np.ndarray, span: np.ndarray, degree: int
                          ) -> np.ndarray:
    """Values of the ``degree + 1`` B-splines that are non-zero at each ``x``: those of index
    ``span - degree .. span``, where ``knots[span] <= x < knots[span + 1]`` (Cox-de Boor's
    recursion, all points at once; scipy.interpolate's import would cost a sixth of a
    second of every run for this).

    Returns
    -------
    ndarray, shape (x.size, degree + 1)
    """
    out = np.zeros((x.size, degree + 1))
    out[:, 0] = 1.0
    left = np.zeros((x.size, degree + 1))
    right = np.zeros((x.size, degree + 1))
    for j in range(1, degree + 1):
        left[:, j] = x - knots[span + 1 - j]
        right[:, j] = knots[span + j] - x
        saved = np.zeros(x.size)
        for r in range(j):
            temp = out[:, r] / (right[:, r + 1] + left[:, j - r])
            out[:, r] = saved + right[:, r + 1] * temp
            saved = left[:, j - r] * temp
        out[:, j] = saved
    return out


def _spline_basis(n: int, degree: int, spacing: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Uniform-knot B-spline basis over pixel centres ``0 .. n-1``.

    Returns the knot interval of every pixel (non-decreasing; the first non-zero basis
    function there has the same index), the ``degree + 1`` non-zero basis values at every
    pixel, the first pixel of every interval and the number of basis functions.
    """
    segments = max(1, min(n, int(math.ceil(n / spacing))))
    lo, hi = -0.5, n - 0.5
    inner = np.linspace(lo, hi, segments + 1)
    step = inner[1] - inner[0]
    knots = np.concatenate([lo - step * np.arange(degree, 0, -1), inner,
                            hi + step * np.arange(1, degree + 1)])
    x = np.arange(n, dtype=np.float64)
    first = np.clip(np.searchsorted(inner, x, side="right") - 1, 0, segments - 1)
    vals = _nonzero_basis_values(x, knots, first + degree, degree)
    starts = np.flatnonzero(np.diff(first, prepend=-1))
    if starts.size != segments:
        raise ValueError("knot spacing below one pixel")
    return first.astype(np.intp), vals, starts, segments + degree


def _normal_equations(w: np.ndarray, wy: np.ndarray, vals: np.ndarray, starts: np.ndarray,
                      nbasis: int, bandwidth: int) -> tuple[np.ndarray, np.ndarray]:
    """``B^T diag(w_b) B`` (band storage) and ``B^T (w_b y_b)`` of every band b.

    Band storage: ``out[b, d, k]`` is the matrix entry ``(k + d, k)``, ``d = 0 ..
    bandwidth``.  The basis functions non-zero at a pixel are ``first .. first + degree``;
    pixels sharing an interval are summed with one ``reduceat`` per pair of basis functions.
    """
    nb = w.shape[0]
    deg1 = vals.shape[1]
    seg = np.arange(starts.size)
    info = np.zeros((nb, bandwidth + 1, nbasis))
    rhs = np.zeros((nb, nbasis))
    for p in range(deg1):
        rhs[:, seg + p] += np.add.reduceat(wy * vals[:, p], starts, axis=1)
        for q in range(p, deg1):
            # entry (first + q, first + p)
            info[:, q - p, seg + p] += np.add.reduceat(w * (vals[:, p] * vals[:, q]), starts,
                                                       axis=1)
    return info, rhs


def _difference_penalty_band(nbasis: int, bandwidth: int, order: int) -> np.ndarray:
    """Difference penalty ``D^T D`` (``order``-th differences) in band storage."""
    d = np.diff(np.eye(nbasis), n=order, axis=0)
    full = d.T @ d
    out = np.zeros((bandwidth + 1, nbasis))
    for k in range(min(bandwidth, order) + 1):
        out[k, :nbasis - k] = np.diagonal(full, -k)
    return out


def band_to_dense(ab: np.ndarray) -> np.ndarray:
    """Dense symmetric matrices from band storage (``ab[..., d, k]`` = entry ``(k + d, k)``)."""
    p1, n = ab.shape[-2:]
    out = np.zeros(ab.shape[:-2] + (n, n))
    k = np.arange(n)
    for d in range(p1):
        kk = k[:n - d]
        out[..., kk + d, kk] = ab[..., d, :n - d]
        out[..., kk, kk + d] = ab[..., d, :n - d]
    return out


def band_solve_reference(ab: np.ndarray, rhs: np.ndarray, want_inverse: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solutions and band of the inverse of stacked symmetric band matrices (numpy twin of
    the kernel's ``band_solve``; dense algebra, so equal to it to rounding only).

    Returns ``x`` (bands x n), ``zb`` (the inverse's band, layout of ``ab``) and ``failed``
    (uint8, 1 where a matrix is not positive definite).
    """
    nb, p1, n = ab.shape
    x = np.zeros((nb, n))
    zb = np.zeros((nb, p1, n))
    failed = np.zeros(nb, np.uint8)
    dense = band_to_dense(ab)
    for b in range(nb):
        try:
            np.linalg.cholesky(dense[b])
        except np.linalg.LinAlgError:
            failed[b] = 1
            continue
        x[b] = np.linalg.solve(dense[b], rhs[b])
        if want_inverse:
            inv = np.linalg.inv(dense[b])
            for d in range(p1):
                zb[b, d, :n - d] = np.diagonal(inv, -d)
    return x, zb, failed


def _band_solve(ab: np.ndarray, rhs: np.ndarray, want_inverse: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        from soxs_core import _background
    except ImportError:  # pragma: no cover
        return band_solve_reference(ab, rhs, want_inverse)
    ab = np.ascontiguousarray(ab, np.float64)
    x = np.zeros(rhs.shape)
    zb = np.zeros(ab.shape)
    failed = np.zeros(ab.shape[0], np.uint8)
    _background.band_solve(ab, np.ascontiguousarray(rhs, np.float64), x, zb,
                           bool(want_inverse), failed)
    return x, zb, failed


def _evaluate(coef: np.ndarray, first: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Spline values (bands x columns) from coefficients (bands x nbasis)."""
    out = np.take(coef, first, axis=1) * vals[:, 0]
    for p in range(1, vals.shape[1]):
        out += np.take(coef, first + p, axis=1) * vals[:, p]
    return out


def _quadratic_form(zb: np.ndarray, first: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """``b_c^T Z_b b_c`` for every band b and column c, from the band of Z_b."""
    out = np.zeros((zb.shape[0], first.size))
    deg1 = vals.shape[1]
    for p in range(deg1):
        for q in range(p, deg1):
            # the band is symmetric: the (q, p) term equals the (p, q) one
            factor = (1.0 if p == q else 2.0) * (vals[:, p] * vals[:, q])
            out += np.take(zb[:, q - p], first + p, axis=1) * factor
    return out


# ---------------------------------------------------------------------------------- smoothing
def _local_linear(values: np.ndarray, variance: np.ndarray, x: np.ndarray,
                  weight: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted local-linear regression of ``values`` (bands x columns) on the band
    positions ``x``, evaluated at the same positions, and the propagated variance."""
    dx = x[None, :] - x[:, None]  # (i, j): x_j - x_i
    g = np.exp(-0.5 * (dx / sigma) ** 2) * weight[None, :]
    g[np.abs(dx) > 4.0 * sigma] = 0.0
    s0 = g.sum(axis=1)
    s1 = (g * dx).sum(axis=1)
    s2 = (g * dx * dx).sum(axis=1)
    det = s0 * s2 - s1 * s1
    flat = det <= 1e-12 * np.maximum(s0 * s2, 1e-300)
    # equivalent kernel: l_ij = g_ij (s2_i - s1_i dx_ij) / det_i; a constant where the local
    # line is undetermined (a single band in reach)
    with np.errstate(divide="ignore", invalid="ignore"):
        lin = g * (s2[:, None] - s1[:, None] * dx) / det[:, None]
        const = g / s0[:, None]
    ell = np.where(flat[:, None], const, lin)
    ell = np.nan_to_num(ell, nan=0.0, posinf=0.0, neginf=0.0)
    return ell @ values, (ell * ell) @ variance


def _misfit(y: np.ndarray, model: np.ndarray, cell_var: np.ndarray, used: np.ndarray,
            band_rows: int, sigma: float, length: float) -> np.ndarray:
    """Local rms by which the model misses the inter-order cells beyond their noise.

    The excess ``(y - model)^2 - var`` of the used cells is averaged over ``8 * length``
    columns (wide enough to reach the gaps on both sides of an order) and over the blur's
    Gaussian along the dispersion; where no cell is in reach the median of the frame stands.
    """
    from scipy.ndimage import gaussian_filter1d, uniform_filter1d

    excess = np.where(used, (y - model) ** 2 - cell_var, 0.0)
    weight = used.astype(np.float64)
    width = max(3, int(round(8 * length)))
    band_sigma = sigma / band_rows
    num = gaussian_filter1d(uniform_filter1d(excess, width, axis=1, mode="nearest"),
                            band_sigma, axis=0, mode="nearest")
    den = gaussian_filter1d(uniform_filter1d(weight, width, axis=1, mode="nearest"),
                            band_sigma, axis=0, mode="nearest")
    reach = den > 1e-3 * max(float(den.max()), 1e-300)
    out = np.zeros(y.shape)
    out[reach] = num[reach] / den[reach]
    if reach.any() and not reach.all():
        out[~reach] = float(np.median(out[reach][::7]))
    return np.sqrt(np.maximum(out, 0.0))


# ---------------------------------------------------------------------------------- fit
def _canonical(array: np.ndarray, dispersion_axis: str) -> np.ndarray:
    return array if dispersion_axis == "y" else array.T


def fit_background(flux: np.ndarray, qual: np.ndarray | None, in_order: np.ndarray,
                   dispersion_axis: str, bspline_deg: int = 2,
                   gaussian_blur_sigma: float = 65.0, errors: np.ndarray | None = None, *,
                   smoothing_length: float | None = None, band_rows: int | None = None,
                   clip_sigma: float = 5.0, clip_iterations: int = 1,
                   reject_bits: int = REJECT_ALL,
                   binning: tuple[int, int] = (1, 1)) -> BackgroundModel:
    """Model the scattered light of a frame from its inter-order pixels.

    Parameters
    ----------
    flux : ndarray
        The frame (e-), detrended.
    qual : ndarray of uint8 or None
        QUAL bits; pixels with any of ``reject_bits`` set are not used.
    in_order : ndarray of bool
        True where a pixel belongs to an order (widened beyond its edges): not background.
    dispersion_axis : {"y", "x"}
        Image axis along which the orders run (``x`` for SOXS NIR).
    bspline_deg : int
        Degree of the spline fitted across the orders (along each row of constant dispersion
        position).
    gaussian_blur_sigma : float
        Sigma (unbinned px) of the Gaussian smoothing of the model along the dispersion
        direction.
    errors : ndarray, optional
        1-sigma errors of ``flux``: weights and the model's error then come from them,
        otherwise from the scatter of the inter-order pixels themselves.
    smoothing_length : float, optional
        Scale (unbinned px) over which the spline smooths across the orders where the
        inter-order pixels are dense; default ``gaussian_blur_sigma / 6`` (at least 4 px).
    band_rows : int, optional
        Rows (of the frame, binned) of constant dispersion position per band; default a
        quarter of ``gaussian_blur_sigma`` in binned rows (at least 2).
    clip_sigma : float
        Cells whose median lies further than this many expected sigma from the fit are
        rejected.
    clip_iterations : int
        Maximum number of fit-and-clip cycles.
    reject_bits : int
        QUAL bits that exclude a pixel.
    binning : (binx, biny)
        Binning of the frame.  The halo's structure is fixed on the detector, so the two
        smoothing scales are given in unbinned px and converted here, each with the binning
        of its own axis; a binned frame smoothed by the same number of binned px would be
        smoothed over twice the halo's scale (the model then falls short under the
        outermost orders, where the halo curves most, and overshoots at the orders' faint
        ends).

    Returns
    -------
    BackgroundModel

    Raises
    ------
    ValueError
        When the shapes disagree, a parameter is out of range or no pixel is usable.
    """
    flux = np.asarray(flux)
    if flux.ndim != 2:
        raise ValueError("flux must be a 2-D image")
    if dispersion_axis not in ("x", "y"):
        raise ValueError(f"dispersion_axis must be 'x' or 'y', not {dispersion_axis!r}")
    if qual is None:
        qual = np.zeros(flux.shape, np.uint8)
    in_order = np.asarray(in_order, bool)
    for name, arr in (("qual", qual), ("in_order", in_order), ("errors", errors)):
        if arr is not None and np.shape(arr) != flux.shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, flux {flux.shape}")
    deg = int(bspline_deg)
    if not 1 <= deg <= 5:
        raise ValueError(f"bspline_deg must be 1 to 5, not {bspline_deg}")
    sigma = float(gaussian_blur_sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"gaussian_blur_sigma must be positive, not {gaussian_blur_sigma}")
    length = float(smoothing_length if smoothing_length is not None else max(4.0, sigma / 6))
    if not (math.isfinite(length) and length > 0):
        raise ValueError(f"smoothing_length must be positive, not {smoothing_length}")
    binx, biny = (int(b) for b in binning)
    if binx < 1 or biny < 1:
        raise ValueError(f"binning must be positive, not {binning}")
    bin_along, bin_across = (biny, binx) if dispersion_axis == "y" else (binx, biny)
    # from here on in binned px of the frame
    sigma_unbinned, length_unbinned = sigma, length
    sigma /= bin_along
    length /= bin_across

    cflux = _canonical(flux, dispersion_axis)
    cqual = _canonical(np.asarray(qual), dispersion_axis)
    cmask = _canonical(in_order, dispersion_axis)
    cerr = None if errors is None else _canonical(np.asarray(errors), dispersion_axis)
    rows, cols = cflux.shape
    h = int(band_rows) if band_rows is not None else max(2, int(round(sigma / 4)))
    h = max(1, min(h, rows))

    used = np.empty(flux.shape, bool)
    med, iqr, count, mean_var = _cell_statistics(cflux, cqual, cmask, h, reject_bits, cerr,
                                                 _canonical(used, dispersion_axis))
    nb = med.shape[0]
    starts = np.arange(nb) * h
    centres = 0.5 * (starts + np.minimum(starts + h, rows) - 1)

    good = count >= MIN_CELL_PIXELS
    n_used_cells = int(good.sum())
    if n_used_cells == 0:
        raise ValueError("no inter-order pixel is usable for the background")

    # per-pixel variance of each cell: from the errors when given, else from the band's
    # typical scatter (one value per band, so that the weights do not follow the data's own
    # fluctuations)
    # (every fourth column is plenty for a median and four times cheaper)
    spread = np.where(good & (count >= 4), iqr, np.inf)[:, ::4]
    n_spread = np.isfinite(spread).sum(axis=1)
    srt = np.sort(spread, axis=1)
    pix_sigma_band = np.take_along_axis(
        srt, np.maximum(n_spread - 1, 0)[:, None] // 2, axis=1)[:, 0] / _IQR_SIGMA
    pix_sigma_band[n_spread == 0] = np.nan
    finite = np.isfinite(pix_sigma_band)
    fill = float(np.median(pix_sigma_band[finite])) if finite.any() else 1.0
    pix_sigma_band = np.where(np.isfinite(pix_sigma_band) & (pix_sigma_band > 0),
                              pix_sigma_band, fill if fill > 0 else 1.0)
    if errors is not None:
        pix_var = np.where(good, mean_var.astype(np.float64), np.nan)
    else:
        pix_var = np.broadcast_to((pix_sigma_band ** 2)[:, None], med.shape).copy()
    pix_var = np.where(np.isfinite(pix_var) & (pix_var > 0), pix_var,
                       (pix_sigma_band ** 2)[:, None])
    cell_var = _MEDIAN_VARIANCE * pix_var / np.maximum(count, 1)
    y = np.where(good, med.astype(np.float64), 0.0)

    spacing = max(2.0, length / 1.0)
    first, vals, starts, nbasis = _spline_basis(cols, deg, spacing)
    bandwidth = max(deg, PENALTY_ORDER)
    penalty = _difference_penalty_band(nbasis, bandwidth, PENALTY_ORDER)
    active = good.copy()
    n_clipped = 0
    iterations = max(0, int(clip_iterations))
    for it in range(iterations + 1):
        w = np.where(active, 1.0 / cell_var, 0.0)
        info, rhs = _normal_equations(w, w * y, vals, starts, nbasis, bandwidth)
        density = w.sum(axis=1) / cols  # weight per pixel
        # smoothing-spline scaling: the penalty matches the data's weight over
        # `length` pixels, so the spline smooths over about that scale where data are dense
        lam = density * length ** (2 * PENALTY_ORDER) / spacing ** (2 * PENALTY_ORDER - 1)
        system = info + lam[:, None, None] * penalty[None]
        # a whisper of ridge keeps bands with almost no data solvable
        system[:, 0, :] += 1e-9 * np.maximum(system[:, 0, :].mean(axis=1), 1e-300)[:, None]
        band_ok = active.sum(axis=1) >= max(deg + 2, 3)
        last = it == iterations
        coef, zb, failed = _band_solve(system, rhs, want_inverse=True)
        band_ok &= failed == 0
        coef[~band_ok] = 0.0
        fit = _evaluate(coef, first, vals)
        z = (y - fit) / np.sqrt(cell_var)
        if last:
            break
        reject = active & band_ok[:, None] & (np.abs(z) > clip_sigma)
        if not reject.any():
            break
        n_clipped += int(reject.sum())
        active &= ~reject

    # posterior (Bayesian) variance of the spline, b^T A^-1 b: an upper bound of its
    # sampling variance, equal to it where the data outweigh the penalty
    fit_var = np.where(band_ok[:, None], _quadratic_form(zb, first, vals), 0.0)

    sel = active & band_ok[:, None]
    # (a seventh of the cells is plenty for robust statistics)
    resid = (y - fit)[sel][::7]
    chi = z[sel][::7]
    resid_rms = float(1.4826 * np.median(np.abs(resid - np.median(resid)))) if resid.size else 0.0
    chi_rms = float(1.4826 * np.median(np.abs(chi - np.median(chi)))) if chi.size else 0.0

    weight = band_ok.astype(np.float64)
    smooth, smooth_var = _local_linear(fit, fit_var, centres, weight, sigma)
    stat_err = np.sqrt(np.maximum(smooth_var, 0.0))
    sys_err = _misfit(y, smooth, cell_var, active & band_ok[:, None], h, sigma, length)
    smooth_err = np.hypot(stat_err, sys_err)

    n_used = int(np.count_nonzero(used))
    stats = dict(n_used=n_used, used_fraction=n_used / flux.size, n_cells=n_used_cells,
                 n_clipped=n_clipped, n_bands_fitted=int(band_ok.sum()),
                 residual_rms=resid_rms, chi_rms=chi_rms,
                 model_max=float(smooth.max()),
                 model_median=float(np.median(smooth[:, ::7])),
                 uncertainty_median=float(np.median(smooth_err[:, ::7])),
                 statistical_error_median=float(np.median(stat_err[:, ::7])),
                 systematic_error_median=float(np.median(sys_err[:, ::7])))
    params = dict(bspline_deg=deg, gaussian_blur_sigma=sigma_unbinned,
                  smoothing_length=length_unbinned, band_rows=h, clip_sigma=float(clip_sigma),
                  clip_iterations=int(clip_iterations), reject_bits=int(reject_bits),
                  binning=(binx, biny))
    # the fit's band-sized work arrays (~15 of bands x columns float64, 60 MiB on a VIS
    # frame) go before the two full-frame planes are made: off the recipes' memory peak
    del (med, iqr, count, mean_var, pix_var, cell_var, y, w, info, rhs, system, fit, z, zb,
         fit_var, active, good, sel, resid, chi, weight, spread, srt)
    model = np.empty(flux.shape, np.float32)
    _expand(smooth, centres, _canonical(model, dispersion_axis))
    return BackgroundModel(model=model, used=used,
                           dispersion_axis=dispersion_axis, band_rows=h, band_centres=centres,
                           band_model=smooth, band_statistical_error=stat_err,
                           band_systematic_error=sys_err, band_uncertainty=smooth_err,
                           stats=stats, parameters=params)


# ---------------------------------------------------------------------------------- subtract
def subtract_background(image: DetectorImage, model: BackgroundModel,
                        overwrite: bool = False) -> DetectorImage:
    """The image minus the background model; the model's error is added to ERRS in
    quadrature and QUAL is kept.

    With ``overwrite``, ``image``'s float32 FLUX and ERRS planes are changed in place and
    returned (two full-frame planes less at the recipes' memory peak); else new planes.

    Raises
    ------
    ValueError
        When the model was fitted to a frame of another shape.
    """
    if model.model.shape != image.shape:
        raise ValueError(f"background model of shape {model.model.shape} for an image of "
                         f"shape {image.shape}")
    in_place = (overwrite and isinstance(image.data, np.ndarray)
                and isinstance(image.error, np.ndarray) and image.data.dtype == np.float32
                and image.error.dtype == np.float32)
    if in_place:
        data, err = image.data, image.error
        np.subtract(data, model.model, out=data)
        for r0 in range(0, err.shape[0], 256):  # in bands: no full-frame plane
            band = err[r0:r0 + 256]
            np.hypot(band, model.uncertainty_rows(r0, r0 + 256), out=band)
        return replace(image, data=data, error=err)
    data = (np.asarray(image.data, np.float32) - model.model).astype(np.float32)
    err = np.hypot(np.asarray(image.error, np.float32), model.uncertainty).astype(np.float32)
    return DetectorImage(data=data, error=err, qual=np.array(image.qual, np.uint8, copy=True),
                         header=image.header.copy())


# ---------------------------------------------------------------------------------- mask
def in_order_mask_from_edges(shape: tuple[int, int], orders: Sequence[int],
                             b_ranges: Mapping[int, tuple[float, float]]
                             | Sequence[tuple[float, float]],
                             low_fn: Callable[[int, np.ndarray], np.ndarray],
                             up_fn: Callable[[int, np.ndarray], np.ndarray],
                             dispersion_axis: str, binning: tuple[int, int] = (1, 1),
                             widen: float = 3.0) -> np.ndarray:
    """Boolean image, True on every pixel that an order (widened) touches.

    Parameters
    ----------
    shape : (rows, cols)
        Shape of the (binned) frame.
    orders : sequence of int
        Order numbers.
    b_ranges : mapping or sequence
        ``(b_min, b_max)`` along-order range (unbinned px) of each order, keyed by order
        number or in the order of ``orders``.
    low_fn, up_fn : callable
        ``f(order, b_unbinned) -> a_unbinned``: the lower and upper cross-order edges.
    dispersion_axis : {"y", "x"}
        Image axis along which the orders run.
    binning : (binx, biny)
        Binning of the frame; binned index ``i`` has its centre at unbinned
        ``i * bin + (bin - 1) / 2``.
    widen : float
        Margin (binned px) added beyond both edges and beyond both ends of each order.

    Returns
    -------
    ndarray of bool
    """
    rows, cols = (int(s) for s in shape)
    binx, biny = (int(b) for b in binning)
    if dispersion_axis == "y":
        n_b, n_a, bb, ba = rows, cols, biny, binx
    elif dispersion_axis == "x":
        n_b, n_a, bb, ba = cols, rows, binx, biny
    else:
        raise ValueError(f"dispersion_axis must be 'x' or 'y', not {dispersion_axis!r}")
    diff = np.zeros((n_b, n_a + 1), np.int32)
    for k, order in enumerate(orders):
        lo_b, hi_b = (b_ranges[order] if isinstance(b_ranges, Mapping) else b_ranges[k])
        ib_lo = (float(lo_b) - 0.5 * (bb - 1)) / bb - widen
        ib_hi = (float(hi_b) - 0.5 * (bb - 1)) / bb + widen
        ib = np.arange(max(0, int(math.floor(ib_lo - 0.5)) + 1),
                       min(n_b - 1, int(math.ceil(ib_hi + 0.5)) - 1) + 1)
        if ib.size == 0:
            continue
        # beyond its ends an order's edges are held at their end values, not extrapolated
        b = np.clip(ib * bb + 0.5 * (bb - 1), float(lo_b), float(hi_b))
        lo = np.asarray(low_fn(order, b), float)
        up = np.asarray(up_fn(order, b), float)
        a_lo = (np.minimum(lo, up) - 0.5 * (ba - 1)) / ba - widen
        a_hi = (np.maximum(lo, up) - 0.5 * (ba - 1)) / ba + widen
        ok = np.isfinite(a_lo) & np.isfinite(a_hi)
        # pixel i covers [i - 0.5, i + 0.5]: every pixel overlapping [a_lo, a_hi]
        start = np.clip(np.floor(a_lo - 0.5).astype(np.int64) + 1, 0, n_a)
        stop = np.clip(np.ceil(a_hi + 0.5).astype(np.int64), 0, n_a)
        ok &= stop > start
        np.add.at(diff, (ib[ok], start[ok]), 1)
        np.add.at(diff, (ib[ok], stop[ok]), -1)
    mask = np.cumsum(diff, axis=1)[:, :n_a] > 0
    return mask if dispersion_axis == "y" else np.ascontiguousarray(mask.T)


# ---------------------------------------------------------------------------------- plot
def _block_reduce(image: np.ndarray, weight: np.ndarray | None, factor: int,
                  subtract: np.ndarray | None = None) -> np.ndarray:
    """Block mean (float32) of ``image - subtract`` over the finite, ``weight``-True pixels of
    each ``factor`` x ``factor`` block (NaN where none), for display.

    One pass of the ``good_block_mean`` kernel per image (the mean of a difference is the
    difference of the means over the same pixels); no float64 copy of the frame.
    """
    from soxs_core.combine.qc import good_block_mean

    image = np.asarray(image)
    excluded = (np.zeros(image.shape, np.uint8) if weight is None
                else np.logical_not(weight).view(np.uint8))
    out = good_block_mean(image, excluded, factor, threads=2)
    if subtract is not None:
        out -= good_block_mean(np.asarray(subtract), excluded, factor, threads=2)
    return out


def _draw_background(target: Path, flux: np.ndarray, model: BackgroundModel,
                     in_order: np.ndarray, title: str, cuts: int, unit: str) -> None:
    # a bare Figure: pyplot's import and figure manager cost a third of a second per run
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    axis = model.dispersion_axis
    flux = np.asarray(flux)
    # at most ~700 display px on a side: block means in float32 strips, no full-frame copy
    factor = max(1, int(math.ceil(max(flux.shape) / 700)))
    used = model.used
    data_small = _block_reduce(flux, used, factor)
    model_small = _block_reduce(model.model, None, factor)
    resid_small = _block_reduce(flux, used, factor, subtract=model.model)
    frame_small = _block_reduce(flux, None, factor)
    vmax = float(np.nanmax(model_small)) if np.isfinite(model_small).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    extent = (-0.5, flux.shape[1] - 0.5, -0.5, flux.shape[0] - 0.5)
    stats = model.stats
    spread = float(np.nanpercentile(np.abs(resid_small), 95)) if np.isfinite(
        resid_small).any() else 1.0
    spread = max(spread, 1e-3)

    # titles are placed at y=1.0 below: left to itself matplotlib measures every tick label
    # of an axes to place its title, a third of the drawing time
    fig = Figure(figsize=(11.69, 8.27), dpi=100)
    grid = fig.add_gridspec(2, 4, height_ratios=[1.25, 1.0], hspace=0.32, wspace=0.45)
    fig.suptitle(title, fontsize=13)
    panels = [
        (f"frame (log10 {unit})",
         np.log10(np.clip(frame_small, max(vmax * 1e-2, 1e-3), None)), "gray", None, None),
        (f"inter-order pixels used ({unit})", data_small, "viridis", 0.0, 1.15 * vmax),
        (f"background model ({unit})", model_small, "viridis", 0.0, 1.15 * vmax),
        (f"data - model, used ({unit})", resid_small, "RdBu_r", -spread, spread),
    ]
    for k, (name, img, cmap, lo, hi) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        shown = ax.imshow(img, origin="lower", cmap=cmap, vmin=lo, vmax=hi, extent=extent,
                          aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10, y=1.0)
        ax.set_xlabel("x [px]", fontsize=8)
        if k == 0:  # the others' would run into the colour bar on their left
            ax.set_ylabel("y [px]", fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        # a few ticks each: every tick is a handful of matplotlib objects, and the ticks of
        # these 16 axes were a third of the drawing time
        ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        bar.locator = MaxNLocator(5)

    # cuts across the orders (canonical rows)
    cf = _canonical(flux, axis)
    cm = _canonical(model.model, axis)
    cu = _canonical(used, axis)
    co = _canonical(np.asarray(in_order, bool), axis)
    rows, cols = cf.shape
    half = max(1, model.band_rows // 2)
    where = np.linspace(0.2, 0.8, max(1, cuts)) if cuts > 1 else np.array([0.5])
    x = np.arange(cols)
    disp = "y" if axis == "y" else "x"
    across = "x" if axis == "y" else "y"
    for k, frac in enumerate(where[:3]):
        ax = fig.add_subplot(grid[1, k])
        r = int(round(frac * (rows - 1)))
        r0, r1 = max(0, r - half), min(rows, r + half + 1)
        band = cf[r0:r1].astype(np.float64)
        ok = cu[r0:r1]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            all_med = np.nanmedian(band, axis=0)
            used_med = np.nanmedian(np.where(ok, band, np.nan), axis=0)
        mod = cm[r].astype(np.float64)
        top = 1.6 * max(float(np.nanmax(mod)), 1e-3)
        inside = co[r]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(np.int8), [0]])))
        for s0, s1 in zip(edges[::2], edges[1::2]):
            ax.axvspan(s0 - 0.5, s1 - 0.5, color="0.88", lw=0)
        ax.plot(x, np.clip(all_med, -top, top), color="0.55", lw=0.5, label="data")
        # thousands of vector markers were most of the drawing time: rasterized instead
        ax.plot(x, used_med, ".", ms=1.5, color="tab:blue", label="inter-order (used)",
                rasterized=True)
        ax.plot(x, mod, color="tab:red", lw=1.2, label="model")
        ax.set_ylim(min(-0.1 * top, float(np.nanmin(mod)) - 0.1 * top), top)
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_title(f"cut at {disp} = {r} (median of {r1 - r0} px)", fontsize=9, y=1.0)
        ax.set_xlabel(f"{across} [px] (grey bands: orders, masked)", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="upper left", markerscale=4)
    # and one along the dispersion, through the brightest part of the model
    ax = fig.add_subplot(grid[1, 3])
    c = int(np.argmax(model.band_model.max(axis=0)))
    c0, c1 = max(0, c - 40), min(cols, c + 41)
    inter = np.flatnonzero(cu[:, c0:c1].any(axis=0)) + c0
    if inter.size:
        # the inter-order column nearest to the maximum, so that the data can be seen
        c = int(inter[np.argmin(np.abs(inter - c))])
    y = np.arange(rows)
    good = cu[:, c]
    ax.plot(y[good], cf[good, c], ".", ms=1, color="tab:blue", alpha=0.4,
            label="inter-order (used)", rasterized=True)
    ax.plot(y, cm[:, c], color="tab:red", lw=1.2, label="model")
    top = 1.6 * max(float(cm[:, c].max()), 1e-3)
    ax.set_ylim(-0.1 * top, top)
    ax.set_title(f"along the dispersion at {across} = {c}", fontsize=9, y=1.0)
    ax.set_xlabel(f"{disp} [px]", fontsize=8)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.text(0.01, 0.005,
             f"used pixels {stats.get('used_fraction', 0.0) * 100:.1f} %   "
             f"model max {stats.get('model_max', 0.0):.4g} {unit}   "
             f"median {stats.get('model_median', 0.0):.4g} {unit}   "
             f"model error (median) {stats.get('uncertainty_median', 0.0):.3g} {unit}   "
             f"cell rms {stats.get('residual_rms', 0.0):.3g} {unit} "
             f"(chi {stats.get('chi_rms', 0.0):.2f})   clipped cells {stats.get('n_clipped', 0)}   "
             f"bspline_deg {model.parameters.get('bspline_deg')}   "
             f"gaussian_blur_sigma {model.parameters.get('gaussian_blur_sigma')} px",
             fontsize=7)
    with PdfPages(target) as pdf:
        pdf.savefig(fig, dpi=100)


def plot_background(path: str | os.PathLike, flux: np.ndarray, model: BackgroundModel,
                    in_order: np.ndarray, title: str, *, cuts: int = 3,
                    unit: str = "e-", release: bool = True) -> Path:
    """Write the BKGROUND QC plot (one PDF page, written atomically).

    Top: the frame (log stretch), the inter-order pixels used (block means), the model on the
    same colour scale and the residual data - model on the used pixels.  Bottom: ``cuts``
    (at most 3) cuts across the orders at evenly spaced dispersion positions, with the
    masked orders shaded, the data, the inter-order pixels used and the model, and one cut
    along the dispersion through the model's maximum.

    Parameters
    ----------
    path : path-like
        The PDF to write.
    flux : ndarray
        The frame the model was fitted to.
    model : BackgroundModel
        The fitted model.
    in_order : ndarray of bool
        The order mask given to the fit.
    title : str
        Title of the page (arm, lamp...).
    cuts : int
        Number of cuts across the orders (1 to 3).
    unit : str
        Unit of ``flux`` on the axes (a stacked flat is in units of its exposure level).
    release : bool
        Collect the page's figure afterwards (see :func:`soxs_core.io.safety.save_figure`).

    Returns
    -------
    Path
        ``path``.
    """
    from soxs_core.io.safety import release_figures, write_atomically

    cuts = int(min(max(cuts, 1), 3))
    try:
        return write_atomically(Path(path), lambda tmp: _draw_background(
            tmp, flux, model, in_order, title, cuts, unit))
    finally:
        if release:      # the pages' figures (see soxs_core.io.safety.save_figure)
            release_figures()


#: lines (rows or columns) over which a readout pattern averages out: longer trends are the
#: scattered-light model's
READOUT_PATTERN_SCALE = 101

#: the pattern is subtracted only when its offsets are this many times their noise (mean
#: squared offset / mean squared error): a frame without one is left as it is
READOUT_PATTERN_MIN_CHI2 = 2.0


def _running_trend(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of ``values`` over ``window`` neighbours (fewer at the ends, where the window is
    cut rather than padded: a padded end would copy the pattern's own end values), lines
    more than 5 robust sigma from the median left out (a bad column)."""
    centre = np.median(values)
    scale = 1.4826 * np.median(np.abs(values - centre)) or 1.0
    w = (np.abs(values - centre) <= 5 * scale).astype(float)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cv = np.concatenate([[0.0], np.cumsum(w * values)])
    i = np.arange(values.size)
    lo = np.maximum(i - window // 2, 0)
    hi = np.minimum(i + window // 2 + 1, values.size)
    n = cw[hi] - cw[lo]
    return np.where(n > 0, (cv[hi] - cv[lo]) / np.maximum(n, 1.0), centre)


def fit_readout_pattern(residual: np.ndarray, qual: np.ndarray, off_order: np.ndarray,
                        varies_along: str, min_pixels: int = 20
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """An offset per detector line that is the same along the whole line: a readout's
    periodic (pick-up) pattern, different in every frame, which no master calibration
    removes and which adds to every pixel of a line alike.  Summed across an order it adds
    coherently, many times its per-pixel size.

    Measured on the pixels outside the orders once the scattered light is subtracted: per
    line the median of the unflagged ones, less its running mean over
    :data:`READOUT_PATTERN_SCALE` lines (what varies slowly is the scattered light's).

    Parameters
    ----------
    residual : ndarray
        The frame less its scattered-light model (e-).
    qual : ndarray of uint8
        Pixels with any bit set are not used.
    off_order : ndarray of bool
        Pixels free of the orders' light.
    varies_along : str
        ``"x"``: one offset per column (constant along it); ``"y"``: one per row.
    min_pixels : int
        A line with fewer usable pixels gets no offset.

    Returns
    -------
    (offset, error) or None
        Per line (columns for ``"x"``, rows for ``"y"``); None when the offsets are not
        significant (:data:`READOUT_PATTERN_MIN_CHI2`).
    """
    use = off_order & (qual == 0) & np.isfinite(residual)
    values = np.where(use, residual, np.nan)
    if varies_along == "y":
        values, use = values.T, use.T
    count = use.sum(axis=0)
    ok = count >= min_pixels
    if ok.sum() < 3 * READOUT_PATTERN_SCALE:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(values[:, ok], axis=0)
        mad = np.nanmedian(np.abs(values[:, ok] - med), axis=0)
    err_ok = 1.2533 * 1.4826 * mad / np.sqrt(count[ok])
    offset = np.zeros(values.shape[1])
    error = np.zeros(values.shape[1])
    offset[ok] = med - _running_trend(med, READOUT_PATTERN_SCALE)
    error[ok] = err_ok
    good = ok & (error > 0)
    if not good.any() or (np.mean(offset[good] ** 2) < READOUT_PATTERN_MIN_CHI2
                          * np.mean(error[good] ** 2)):
        return None
    return offset, error
