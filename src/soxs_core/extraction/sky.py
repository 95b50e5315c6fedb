"""The sky model of a stare frame: a B-spline in wavelength times a slit illumination.

Method (after Kelson 2003, PASP 115, 688).  A slit-filling sky seen through a long slit is,
at every pixel, a function of the pixel's wavelength times the relative illumination of its
place on the slit: ``sky(pixel) = G(lambda) * J(s)``.  Because the orders are tilted and
curved on the detector, the pixels of one order sample ``lambda`` far more finely than the
pixel grid does, so ``G`` can follow the sky lines at sub-pixel resolution.  Per order:

1. **Pixels.**  Every pixel of the order (``order_image == n``) with a finite wavelength and
   slit position from the dispersion map, QUAL free of ``reject_bits`` and a positive error.
   ``clip_slit_edge_fraction`` of the slit is dropped at both ends (the slit's soft ends),
   and the object, when its mask is given (:func:`object_band_mask`).
2. **Rolling-percentile clip** (before the object is traced, and against cosmic rays): the
   pixels are sorted by wavelength and cut into windows of ``percentile_rolling_window_size``
   points; a pixel more than ``percentile_clipping_sigma`` times the window's robust scatter
   (half the 16-84 % range, never below the pixel's own error) above the window median is
   dropped; repeated ``percentile_clipping_iterations`` times at most.  With
   ``aggressive_object_masking`` whole slit-position bins in which the dropped pixels cluster
   are dropped as well (an untraced object's wings).
3. **B-spline in wavelength** of degree ``bspline_order``, breakpoints at every
   ``starting_points_per_knot``-th sorted wavelength, fitted by weighted least squares
   through its banded normal equations (Cholesky of a band of width ``bspline_order + 1``;
   a tiny second-difference penalty keeps coefficients with no data defined).  The weights
   are the inverse of the pixels' variance with its photon part re-estimated from the
   model (variance from the noisy data would pull the fit low by about one electron).
4. **Slit illumination.**  ``J(s)``: a B-spline of degree ``slit_illumination_order`` in slit
   position with pieces ``slit_illumination_knot_spacing`` arcsec long (0: one polynomial,
   as in soxspipe), normalised to a mean of 1 over the slit; fitted to ``data / G`` in turn
   with ``G`` (two alternations per iteration).
5. **Iterations** (``bspline_iteration_limit`` at most): points beyond
   ``bspline_fitting_residual_clipping_sigma`` times the noise floor are rejected, and every
   knot interval whose mean squared normalised residual exceeds the floor significantly is
   split in two at its median wavelength, unless a half would hold fewer than
   ``min_points_per_knot`` points or be shorter than the order's sampling allows.  The
   floor is the ``residual_floor_percentile`` percentile of ``|residual| / error`` divided by
   that percentile of ``|N(0, 1)|`` (1 when the errors are right).
6. **Sampling limit.**  Knots are never closer than the wavelength step the order samples:
   where the slit is tilted on the detector the pixels of one row span a range of
   wavelength and the knots may be as close as a third of a row's step; where it is not
   (SOXS VIS pseudo-orders) one row's step, so that each interval holds distinct
   wavelengths and the fit stays stable.
7. **J under the object.**  The masked object's pixels hold no sky-only data, so there
   ``J`` would be bridged by its prior alone and miss the illumination's real structure
   (a 1-2 % ripple of the slit makes a few per cent of sky in the aperture).  In the final
   fit the masked pixels' *line contrast* (data and ``G`` less their running means along
   the wavelength, at one slit position) adds equations ``hp(d) = J(s) hp(G)``: the sky's
   lines come and go where the object's continuum does not (:func:`_line_contrast`), with
   the errors-in-variables correction for the noise of the fitted ``G``; slit positions
   where the object outshines the sky more than tenfold, that have few lines, or whose data
   show more line contrast than the sky's lines explain (the object's own) are left to the
   prior.  An order where no slit position under the object
   qualifies takes ``J`` there from the orders where they do (:class:`SharedIllumination`).

The model error is the posterior standard deviation of the fit at each pixel, from the band
of the inverse normal matrix (Takahashi's recursion on the Cholesky factor) for ``G`` and
the small covariance of ``J``, combined in quadrature.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.detector.quality import Qual
from soxs_core.io.image import DetectorImage

__all__ = ["SkyParameters", "SkyModel", "OrderSkyFit", "fit_sky", "subtract_sky",
           "sky_residuals", "object_band_mask", "plot_sky_model", "plot_sky_quicklook",
           "DEFAULT_REJECT_BITS"]

log = logging.getLogger(__name__)

#: QUAL bits that keep a pixel out of the sky fit: every bit but LOW_SENS (a flat-fielded
#: low-sensitivity pixel is noisier, and its ERRS says so)
DEFAULT_REJECT_BITS = int(Qual.STATIC_BAD | Qual.HOT | Qual.COLD | Qual.SATURATED
                          | Qual.COSMIC | Qual.NO_DATA | Qual.NON_FINITE)

#: knots may not come closer than this fraction of one along-order pixel's wavelength step
#: where the slit tilt oversamples the wavelength (the pixels themselves smooth below it)
MIN_KNOT_ROW_FRACTION = 0.3

#: widest initial knot interval, in along-order pixels' wavelength steps
MAX_KNOT_ROWS = 2.0

#: relative weight of the second-difference penalty on the spline coefficients (keeps the
#: coefficients of data-free intervals defined, far below any data's weight)
PENALTY = 1e-7

#: prior rms slope (per arcsec) of the slit illumination J(s): a slit's illumination
#: changes by a few per cent over arcseconds (a ripple of 1.5 % and 2.7" period: 0.035)
ILLUMINATION_SLOPE = 0.1

#: the slit ends' zone (arcsec) where J gets shorter pieces and a relaxed prior
ILLUMINATION_EDGE_ZONE = 0.5

#: an untraced object: slit-position bins whose median normalised residual (over the whole
#: order) stands this far above the bins' median, and their neighbours down to WING
OBJECT_PROFILE_LIMIT = 0.1
OBJECT_PROFILE_WING = 0.03

#: limit of the quarter-means statistic (chi-squared, 4 degrees of freedom: p = 0.2 %)
QUARTER_CHI2_LIMIT = 17.0

#: mean of min(z^2, 9) for a standard normal z
CHI2_1_WINSORISED_MEAN = 0.99501

#: significance (in standard errors of a mean of chi-squared values) an interval's misfit
#: must reach before its interval is split
SPLIT_SIGNIFICANCE = 2.5



@dataclass(frozen=True)
class SkyParameters:
    """Sky-subtraction parameters (the seed's ``sky-subtraction`` names).

    Attributes
    ----------
    percentile_clipping_sigma : float
        Rolling-percentile clip limit (robust sigmas above the local median).
    percentile_clipping_iterations : int
        Maximum iterations of that clip.
    percentile_rolling_window_size : int
        Window length (data points sorted by wavelength) of the rolling statistics.
    clip_slit_edge_fraction : float
        Fraction of the slit length left out at each end.
    aggressive_object_masking : bool
        Also leave out whole slit-position bins where clipped pixels cluster.
    bspline_order : int
        Degree of the B-spline in wavelength.
    slit_illumination_order : int
        Degree of the slit-illumination pieces (-1: no illumination correction).
    slit_illumination_knot_spacing : float
        Length (arcsec) of the illumination's pieces; 0 for a single polynomial.
    starting_points_per_knot : int
        Initial breakpoint spacing in sorted data points.
    min_points_per_knot : int
        No knot interval is split below this many points.
    bspline_fitting_residual_clipping_sigma : float
        Rejection limit of the spline fit (times the noise floor).
    bspline_iteration_limit : int
        Maximum fit / reject / refine cycles.
    residual_floor_percentile : float
        Percentile of the normalised residuals that sets the noise floor.
    """

    percentile_clipping_sigma: float = 3.0
    percentile_clipping_iterations: int = 5
    percentile_rolling_window_size: int = 35
    clip_slit_edge_fraction: float = 0.01
    aggressive_object_masking: bool = False
    bspline_order: int = 3
    slit_illumination_order: int = 1
    slit_illumination_knot_spacing: float = 0.25
    starting_points_per_knot: int = 100
    min_points_per_knot: int = 11
    bspline_fitting_residual_clipping_sigma: float = 20.0
    bspline_iteration_limit: int = 7
    residual_floor_percentile: float = 90.0

    def __post_init__(self) -> None:
        checks = [
            (self.percentile_clipping_sigma > 0, "percentile_clipping_sigma must be > 0"),
            (self.percentile_clipping_iterations >= 0,
             "percentile_clipping_iterations must be >= 0"),
            (self.percentile_rolling_window_size >= 5,
             "percentile_rolling_window_size must be >= 5"),
            (0 <= self.clip_slit_edge_fraction < 0.4,
             "clip_slit_edge_fraction must be in [0, 0.4)"),
            (1 <= self.bspline_order <= 5, "bspline_order must be 1 to 5"),
            (-1 <= self.slit_illumination_order <= 5,
             "slit_illumination_order must be -1 to 5"),
            (self.slit_illumination_knot_spacing >= 0,
             "slit_illumination_knot_spacing must be >= 0"),
            (self.min_points_per_knot >= 1, "min_points_per_knot must be >= 1"),
            (self.starting_points_per_knot >= self.min_points_per_knot,
             "starting_points_per_knot must be >= min_points_per_knot"),
            (self.bspline_fitting_residual_clipping_sigma > 0,
             "bspline_fitting_residual_clipping_sigma must be > 0"),
            (self.bspline_iteration_limit >= 1, "bspline_iteration_limit must be >= 1"),
            (0 < self.residual_floor_percentile < 100,
             "residual_floor_percentile must be in (0, 100)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SkyParameters:
        """From a mapping with hyphen or underscore keys (unknown keys are ignored); a
        ``sky-subtraction.`` / ``sky_subtraction.`` prefix is accepted too."""
        names = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            k = str(key).split(".")[-1].replace("-", "_")
            if k in names:
                kind = type(getattr(cls(), k))
                out[k] = (bool(value) if kind is bool else kind(value))
        return cls(**out)


@dataclass
class OrderSkyFit:
    """The sky fit of one order (for plots and diagnostics).

    Attributes
    ----------
    order : int
    knots : ndarray
        Full knot vector of ``G`` (nm), boundary knots repeated.
    coefficients : ndarray
        B-spline coefficients of ``G`` (e-).
    degree : int
    illumination_knots, illumination_coefficients : ndarray
        ``J(s)``'s knot vector (arcsec) and coefficients (empty: ``J = 1``).
    illumination_degree : int
    slit_range : tuple of float
        Slit positions (arcsec) of the pixels used.
    n_used, n_rejected : int
        Pixels that fitted the sky / were rejected (object, cosmic rays, outliers).
    chi2 : float
        Mean squared normalised residual of the used pixels.
    noise_floor : float
        The residual floor (1 when the errors are right).
    iterations : int
    illumination_under_object : str
        How ``J`` under the object mask was found: ``"lines"`` (the sky lines there, see
        :func:`_line_contrast`), ``"shared"`` (the other orders' ``J``, see
        :func:`shared_illumination`), ``"prior"`` (bridged by its prior alone) or ``""``
        (no object mask).
    """

    order: int
    knots: np.ndarray
    coefficients: np.ndarray
    degree: int
    illumination_knots: np.ndarray
    illumination_coefficients: np.ndarray
    illumination_degree: int
    slit_range: tuple[float, float]
    n_used: int
    n_rejected: int
    chi2: float
    noise_floor: float
    iterations: int
    illumination_under_object: str = ""

    @property
    def n_knots(self) -> int:
        """Number of distinct breakpoints (boundaries included)."""
        return int(np.unique(self.knots).size)

    def spectrum(self, wavelength: np.ndarray) -> np.ndarray:
        """``G(lambda)``: the sky at unit illumination (e- per pixel)."""
        return _spline_eval(self.knots, self.coefficients, self.degree,
                            np.asarray(wavelength, float))

    def illumination(self, slit: np.ndarray) -> np.ndarray:
        """``J(s)`` (mean 1 over the fitted slit range)."""
        s = np.asarray(slit, float)
        if self.illumination_coefficients.size == 0:
            return np.ones(s.shape)
        lo, hi = self.slit_range
        return _spline_eval(self.illumination_knots, self.illumination_coefficients,
                            self.illumination_degree, np.clip(s, lo, hi))


#: fewest orders whose sky lines measured ``J`` under the object for a shared ``J``
SHARED_ILLUMINATION_MIN_ORDERS = 3

#: floor of the shared ``J``'s error (its scatter between the orders), relative: the
#: orders' own measurements of ``J`` under the object are good to a few tenths of a per cent
SHARED_ILLUMINATION_FLOOR = 0.003


@dataclass
class SharedIllumination:
    """The slit illumination ``J(s)`` that the orders with sky lines under the object agree
    on: the median of their ``J`` (each of mean 1 over its slit) and its scatter between
    them, on a grid of slit positions (NaN where fewer than
    :data:`SHARED_ILLUMINATION_MIN_ORDERS` orders reach).

    The slit is the same for every order, so an order without sky lines under the object
    (a thermal K-band order, or one where the object outshines the sky) takes its ``J``
    there from the others instead of bridging the mask with its prior: a ripple of 1-2 %
    that the prior misses is several times a faint object's light under a bright sky.
    """

    slit: np.ndarray
    value: np.ndarray
    sigma: np.ndarray
    n_orders: int

    def equations(self, knots: np.ndarray, degree: int, coefficients: np.ndarray,
                  masked_slit: np.ndarray, slit_range: tuple[float, float]
                  ) -> Equations | None:
        """Equations ``J(x) = a J_shared(x) +- a sigma`` at the abscissae of ``J``'s
        coefficients within the slit range of ``masked_slit`` (the masked pixels' slit
        positions); None when there are none.

        Only the shape of the shared ``J`` carries over: ``a`` is the median ratio of the
        order's own ``J`` so far (``coefficients``) to the shared one at the abscissae
        outside the mask, where the order's sky measures it.  (``J``'s level is shared with
        ``G`` and so fixed only by its normalisation: the ratio of ``J`` under the mask to
        ``J`` beside it is what sets the sky under the object.)
        """
        if masked_slit.size == 0:
            return None
        x_all = _abscissae(knots, degree)
        lo, hi = masked_slit.min(), masked_slit.max()
        inside = (x_all >= lo) & (x_all <= hi)
        beside = ~inside & (x_all >= slit_range[0]) & (x_all <= slit_range[1])
        shared = np.interp(x_all, self.slit, self.value, left=np.nan, right=np.nan)
        own = _spline_eval(knots, coefficients, degree, x_all)
        ratio = own[beside] / shared[beside]
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size == 0:
            return None
        a = float(np.median(ratio))
        x = x_all[inside]
        value = a * shared[inside]
        sigma = a * np.interp(x, self.slit, self.sigma, left=np.nan, right=np.nan)
        ok = np.isfinite(value) & np.isfinite(sigma) & (sigma > 0)
        if not ok.any():
            return None
        x, value, sigma = x[ok], value[ok], sigma[ok]
        jv, jf = _design(knots, degree, x)
        return jv, jf, np.ones(x.size), value, 1.0 / sigma**2, np.zeros(x.size)


def shared_illumination(fits: Mapping[int, OrderSkyFit]) -> SharedIllumination | None:
    """:class:`SharedIllumination` of the orders whose ``J`` under the object came from
    their sky lines (None when fewer than :data:`SHARED_ILLUMINATION_MIN_ORDERS`)."""
    measured = [f for f in fits.values() if f.illumination_under_object == "lines"
                and f.illumination_coefficients.size]
    if len(measured) < SHARED_ILLUMINATION_MIN_ORDERS:
        return None
    lo = min(f.slit_range[0] for f in measured)
    hi = max(f.slit_range[1] for f in measured)
    grid = np.linspace(lo, hi, 241)
    values = np.full((len(measured), grid.size), np.nan)
    for i, f in enumerate(measured):
        inside = (grid >= f.slit_range[0]) & (grid <= f.slit_range[1])
        values[i, inside] = f.illumination(grid[inside])
    count = np.isfinite(values).sum(axis=0)
    enough = count >= SHARED_ILLUMINATION_MIN_ORDERS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = np.nanmedian(values, axis=0)
        scatter = 1.4826 * np.nanmedian(np.abs(values - value), axis=0)
    sigma = np.maximum(scatter, SHARED_ILLUMINATION_FLOOR * np.abs(value))
    return SharedIllumination(slit=grid, value=np.where(enough, value, np.nan),
                              sigma=np.where(enough, sigma, np.nan), n_orders=len(measured))


@dataclass
class SkyModel:
    """The sky of a frame, per pixel.

    Attributes
    ----------
    sky : ndarray of float32
        Model sky (e- per pixel), 0 outside the fitted orders.
    error : ndarray of float32
        1-sigma uncertainty of the model, 0 outside the fitted orders.
    used : ndarray of bool
        Pixels that fitted the sky.
    rejected : ndarray of bool
        Candidate sky pixels left out: clipped (object, cosmic rays) or rejected by the fit.
    object_mask : ndarray of bool
        Pixels left out as the object (the mask given, and aggressive masking).
    fits : dict
        :class:`OrderSkyFit` per order.
    """

    sky: np.ndarray
    error: np.ndarray
    used: np.ndarray
    rejected: np.ndarray
    object_mask: np.ndarray
    fits: dict[int, OrderSkyFit] = field(default_factory=dict)

    @property
    def knot_counts(self) -> dict[int, int]:
        """Number of breakpoints of each order's spline."""
        return {n: f.n_knots for n, f in self.fits.items()}

    @property
    def orders(self) -> list[int]:
        return sorted(self.fits)


# ---------------------------------------------------------------------------- B-splines
def design_reference(knots: np.ndarray, degree: int, x: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Basis values ``(n, degree + 1)`` and first coefficient index ``(n,)`` at ``x`` (inside
    the knots' base interval): Cox-de Boor's recursion, vectorised over ``x`` (the numpy twin
    of the ``_skyfit`` kernel's ``design``)."""
    t = np.asarray(knots, float)
    x = np.asarray(x, float)
    nc = t.size - degree - 1
    span = np.searchsorted(t, x, side="right") - 1
    span = np.clip(span, degree, nc - 1)
    out = np.empty((x.size, degree + 1))
    out[:, 0] = 1.0
    left = np.empty((degree + 1, x.size))
    right = np.empty((degree + 1, x.size))
    for j in range(1, degree + 1):
        left[j] = x - t[span + 1 - j]
        right[j] = t[span + j] - x
        saved = np.zeros(x.size)
        for r in range(j):
            den = right[r + 1] + left[j - r]
            den[den == 0] = np.inf          # repeated knots: that term is 0
            temp = out[:, r] / den
            out[:, r] = saved + right[r + 1] * temp
            saved = left[j - r] * temp
        out[:, j] = saved
    return out, (span - degree).astype(np.intp)


def _kernel():
    """The ``_skyfit`` kernels, or None where the build has none (the twins then serve)."""
    try:
        from soxs_core import _skyfit
    except ImportError:  # pragma: no cover - the kernel is part of the build
        return None
    return _skyfit


def _design(knots: np.ndarray, degree: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`design_reference` through the kernel."""
    kernel = _kernel()
    if kernel is None:
        return design_reference(knots, degree, x)
    x = np.ascontiguousarray(x, float)
    values = np.empty((x.size, degree + 1))
    first = np.empty(x.size, np.intp)
    kernel.design(np.ascontiguousarray(knots, float), int(degree), x, values, first)
    return values, first


def evaluate_reference(values: np.ndarray, first: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """The spline at the points of a design: ``sum_j values[:, j] coef[first + j]`` (numpy
    twin of the kernel's ``evaluate``)."""
    return np.sum(values * coef[first[:, None] + np.arange(values.shape[1])], axis=1)


def _evaluate(values: np.ndarray, first: np.ndarray, coef: np.ndarray) -> np.ndarray:
    kernel = _kernel()
    if kernel is None:
        return evaluate_reference(values, first, coef)
    out = np.empty(values.shape[0])
    kernel.evaluate(values, first, np.ascontiguousarray(coef, float), out)
    return out


def _spline_eval(knots: np.ndarray, coef: np.ndarray, degree: int, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float)
    out = np.zeros(x.shape)
    lo, hi = knots[degree], knots[-degree - 1]
    ok = np.isfinite(x)
    xc = np.clip(x[ok], lo, hi)
    values, first = _design(knots, degree, xc)
    out[ok] = _evaluate(values, first, np.asarray(coef, float))
    return out


def _full_knots(breaks: np.ndarray, degree: int) -> np.ndarray:
    return np.concatenate([np.full(degree, breaks[0]), breaks, np.full(degree, breaks[-1])])


def banded_normal_reference(values: np.ndarray, first: np.ndarray, weight: np.ndarray,
                            target: np.ndarray, n_coef: int,
                            scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of a B-spline fit (basis ``values`` times ``scale`` per point, when
    given) in lower banded storage ``ab[d, i] = N[i+d, i]`` and the right-hand side (numpy
    twin of the kernel's ``banded_normal``)."""
    if scale is not None:
        values = values * scale[:, None]
    k1 = values.shape[1]
    ab = np.zeros((k1, n_coef))
    rhs = np.zeros(n_coef)
    wv = values * weight[:, None]
    for a in range(k1):
        rhs += np.bincount(first + a, wv[:, a] * target, minlength=n_coef)
        for d in range(k1 - a):
            ab[d] += np.bincount(first + a, wv[:, a] * values[:, a + d], minlength=n_coef)
    return ab, rhs


def _banded_normal(values: np.ndarray, first: np.ndarray, weight: np.ndarray,
                   target: np.ndarray, n_coef: int, scale: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    kernel = _kernel()
    if kernel is None:
        return banded_normal_reference(values, first, weight, target, n_coef, scale)
    ab = np.zeros((values.shape[1], n_coef))
    rhs = np.zeros(n_coef)
    kernel.banded_normal(np.ascontiguousarray(values, float), np.ascontiguousarray(first),
                         np.ascontiguousarray(weight, float),
                         np.ascontiguousarray(target, float),
                         np.ascontiguousarray(scale if scale is not None else np.zeros(1),
                                              float), scale is not None, ab, rhs)
    return ab, rhs


def _add_penalty(ab: np.ndarray, strength: float) -> None:
    """Add ``strength * D^T D`` to lower banded storage in place, ``D`` the second
    differences of the coefficients (first differences for a degree-1 spline's band)."""
    n = ab.shape[1]
    stencil = (1.0, -2.0, 1.0) if ab.shape[0] >= 3 else (1.0, -1.0)
    m = len(stencil)
    if n < m or strength <= 0:
        ab[0] += max(strength, 0.0)
        return
    rows = np.arange(n - m + 1)
    for off, c in enumerate(stencil):
        for off2, c2 in enumerate(stencil):
            if off2 >= off:
                np.add.at(ab[off2 - off], rows + off, strength * c * c2)


def banded_inverse_band_reference(chol: np.ndarray) -> np.ndarray:
    """Band of ``N^-1`` (same storage as ``chol``, ``S[d, i] = inv[i+d, i]``) from the lower
    banded Cholesky factor of ``N`` (Takahashi et al. 1973 recursion; the numpy twin of the
    kernel's ``banded_inverse_band``)."""
    p = chol.shape[0] - 1
    n = chol.shape[1]
    diag = chol[0].copy()
    # L = D^(1/2)-scaled unit lower: l[d, i] = L[i+d, i] / L[i, i]
    unit = chol / diag[None, :]
    dinv = 1.0 / diag**2
    s = np.zeros((p + 1, n))
    u = unit.tolist()
    dv = dinv.tolist()
    sl = [[0.0] * n for _ in range(p + 1)]
    for i in range(n - 1, -1, -1):
        m = min(p, n - 1 - i)
        # off-diagonals first: S[i+d, i] = -sum_k l[k, i] S[i+d, i+k]
        for d in range(m, 0, -1):
            acc = 0.0
            for k in range(1, m + 1):
                a, b = (i + d, i + k) if d >= k else (i + k, i + d)
                acc += u[k][i] * sl[a - b][b]
            sl[d][i] = -acc
        acc = dv[i]
        for k in range(1, m + 1):
            acc -= u[k][i] * sl[k][i]
        sl[0][i] = acc
    s[:] = np.array(sl)
    return s


def _banded_inverse_band(chol: np.ndarray) -> np.ndarray:
    kernel = _kernel()
    if kernel is None:
        return banded_inverse_band_reference(chol)
    out = np.empty(chol.shape)
    kernel.banded_inverse_band(np.ascontiguousarray(chol, float), out)
    return out


def band_variance_reference(values: np.ndarray, first: np.ndarray, sinv: np.ndarray
                            ) -> np.ndarray:
    """Variance ``b^T S b`` of the fitted spline at the points of a design, ``S`` the inverse
    normal matrix whose band ``sinv`` holds (numpy twin of the kernel's ``band_variance``)."""
    k1 = values.shape[1]
    out = np.zeros(values.shape[0])
    for a in range(k1):
        for b in range(a, k1):
            term = values[:, a] * values[:, b] * sinv[b - a, first + a]
            out += term if a == b else 2.0 * term
    return out


def _band_variance(values: np.ndarray, first: np.ndarray, sinv: np.ndarray) -> np.ndarray:
    kernel = _kernel()
    if kernel is None:
        return band_variance_reference(values, first, sinv)
    out = np.empty(values.shape[0])
    kernel.band_variance(values, first, np.ascontiguousarray(sinv, float), out)
    return out


def _solve(ab: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import cho_solve_banded, cholesky_banded

    scale = float(np.median(ab[0][ab[0] > 0])) if np.any(ab[0] > 0) else 1.0
    ab = ab.copy()
    _add_penalty(ab, PENALTY * scale)
    chol = cholesky_banded(ab, lower=True)
    return cho_solve_banded((chol, True), rhs), chol


# ---------------------------------------------------------------------------- helpers
def _rolling_stats(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust scatter (half the 16-84 % range) of consecutive blocks of about
    ``window`` points, interpolated linearly back to every point (blocks, not a sliding
    window: one reshape and one percentile call per pass)."""
    n = values.size
    nb = max(1, n // window)
    size = n // nb
    head = values[: size * nb].reshape(nb, size)
    q = np.percentile(head, [16.0, 50.0, 84.0], axis=1)
    centre = (np.arange(nb) + 0.5) * size - 0.5
    idx = np.arange(n, dtype=float)
    return np.interp(idx, centre, q[1]), np.interp(idx, centre, 0.5 * (q[2] - q[0]))


def _infer_axis(wavelength: np.ndarray, order_image: np.ndarray, orders: Sequence[int]) -> str:
    """``y`` when the wavelength changes along rows' index within the orders, else ``x``."""
    w = wavelength
    inside = np.isin(order_image, np.asarray(orders))
    with np.errstate(invalid="ignore"):
        dy = np.abs(np.diff(w, axis=0))[inside[1:] & inside[:-1]]
        dx = np.abs(np.diff(w, axis=1))[inside[:, 1:] & inside[:, :-1]]
    my = float(np.nanmedian(dy)) if dy.size else 0.0
    mx = float(np.nanmedian(dx)) if dx.size else 0.0
    return "y" if my >= mx else "x"


def _sampling(wave_view: np.ndarray, member_view: np.ndarray) -> tuple[float, float]:
    """Median wavelength step per along-order pixel and median wavelength span of one
    along-order pixel's row across the order (the tilt's oversampling)."""
    with np.errstate(invalid="ignore"):
        both = member_view[1:] & member_view[:-1]
        step = np.abs(np.diff(wave_view, axis=0))[both]
        rows = np.flatnonzero(member_view.any(axis=1))
        sub = np.where(member_view[rows], wave_view[rows], np.nan)
        span = np.nanmax(sub, axis=1) - np.nanmin(sub, axis=1)
    return (float(np.median(step)) if step.size else 0.0,
            float(np.median(span)) if span.size else 0.0)


def object_band_mask(shape: tuple[int, int], dispersion_axis: str,
                     traces: Mapping[int, tuple[np.ndarray, np.ndarray]],
                     half_width: float) -> np.ndarray:
    """Pixels within ``half_width`` binned px (across the order) of an object trace.

    Parameters
    ----------
    shape : tuple of int
        Frame shape.
    dispersion_axis : str
        ``"y"`` or ``"x"``.
    traces : mapping
        ``{order: (along, centre)}``: binned along-order indices and the trace's binned
        across position there.
    half_width : float
        Half width (binned px).
    """
    mask = np.zeros(shape, bool)
    view = mask if dispersion_axis == "y" else mask.T
    n_across = view.shape[1]
    for along, centre in traces.values():
        along = np.asarray(along, int)
        centre = np.asarray(centre, float)
        ok = (along >= 0) & (along < view.shape[0]) & np.isfinite(centre)
        lo = np.clip(np.ceil(centre[ok] - half_width), 0, n_across).astype(int)
        hi = np.clip(np.floor(centre[ok] + half_width) + 1, 0, n_across).astype(int)
        for r, a, b in zip(along[ok], lo, hi):
            view[r, a:b] = True
    return mask


# ---------------------------------------------------------------------------- the fit
def _illumination_knots(lo: float, hi: float, degree: int, spacing: float) -> np.ndarray:
    """Knots of ``J(s)``: pieces of ``spacing`` arcsec, four times shorter within
    ``ILLUMINATION_EDGE_ZONE`` of the slit's ends (its soft ends fall off over a few tenths
    of an arcsecond); one polynomial when ``spacing`` is 0."""
    if spacing <= 0:
        return _full_knots(np.array([lo, hi]), degree)
    zone = min(ILLUMINATION_EDGE_ZONE, 0.25 * (hi - lo))
    fine = spacing / 4.0
    n_edge = max(1, int(round(zone / fine)))
    n_mid = max(1, int(round((hi - lo - 2 * zone) / spacing)))
    breaks = np.concatenate([np.linspace(lo, lo + zone, n_edge + 1)[:-1],
                             np.linspace(lo + zone, hi - zone, n_mid + 1),
                             np.linspace(hi - zone, hi, n_edge + 1)[1:]])
    return _full_knots(breaks, degree)


def _abscissae(knots: np.ndarray, degree: int) -> np.ndarray:
    """Greville abscissae of a B-spline basis: where each coefficient acts most."""
    nj = knots.size - degree - 1
    return np.array([np.mean(knots[j + 1:j + degree + 1]) if degree > 0
                     else 0.5 * (knots[j] + knots[j + 1]) for j in range(nj)])


def _illumination_prior(knots: np.ndarray, degree: int, lo: float, hi: float) -> np.ndarray:
    """Inverse covariance of the prior on ``J``'s coefficients: each first difference
    ``N(0, ILLUMINATION_SLOPE * h)`` (``h`` the distance of the coefficients' abscissae),
    relaxed near the slit's ends where the soft edges bend the illumination sharply.  First
    differences, not second: across a masked object the prior alone bridges, and a
    first-difference prior bridges with a straight line where a second-difference one would
    continue the slopes at the gap's ends into a bump."""
    nj = knots.size - degree - 1
    if nj < 2:
        return np.zeros((nj, nj))
    g = _abscissae(knots, degree)
    d1 = np.diff(np.eye(nj), 1, axis=0)
    h = np.maximum(np.diff(g), 1e-6)
    sigma = ILLUMINATION_SLOPE * h
    centre = 0.5 * (g[1:] + g[:-1])
    zone = min(ILLUMINATION_EDGE_ZONE, 0.25 * (hi - lo))
    sigma = np.where((centre < lo + zone) | (centre > hi - zone), 100 * sigma, sigma)
    return (d1.T / sigma**2) @ d1


def _percentile_clip(lam_sorted_vals: np.ndarray, err: np.ndarray, p: SkyParameters
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Keep-mask of the rolling-percentile clip on values sorted by wavelength, and the
    rolling median of the last pass (a first model of the sky)."""
    keep = np.ones(lam_sorted_vals.size, bool)
    med_all = np.zeros(lam_sorted_vals.size)
    window = int(p.percentile_rolling_window_size)
    for _ in range(max(1, int(p.percentile_clipping_iterations))):
        idx = np.flatnonzero(keep)
        if idx.size < 2 * window:
            break
        med, sig = _rolling_stats(lam_sorted_vals[idx], window)
        med_all = np.interp(np.arange(keep.size), idx, med)
        sig_all = np.interp(np.arange(keep.size), idx, sig)
        high = lam_sorted_vals > med_all + p.percentile_clipping_sigma * np.maximum(sig_all, err)
        new = keep & ~high
        if p.percentile_clipping_iterations == 0 or np.array_equal(new, keep):
            break
        keep = new
    return keep, med_all


def _aggressive_mask(slit: np.ndarray, flagged: np.ndarray, lo: float, hi: float
                     ) -> np.ndarray:
    """Slit-position bins where the clipped pixels cluster (an untraced object): the keep-
    mask of the pixels outside them.  A bin clusters when its count of clipped pixels
    exceeds what the order's median rate predicts by 5 sigma (binomial) and twice over."""
    nbins = 40
    edges = np.linspace(lo, hi, nbins + 1)
    b = np.clip(np.searchsorted(edges, slit, side="right") - 1, 0, nbins - 1)
    total = np.bincount(b, minlength=nbins).astype(float)
    bad = np.bincount(b, flagged.astype(float), minlength=nbins)
    frac = np.divide(bad, total, out=np.zeros(nbins), where=total > 0)
    base = float(np.median(frac[total > 0])) if np.any(total > 0) else 0.0
    expected = total * base
    hot = ((bad > expected + 5 * np.sqrt(expected * (1 - base) + 1.0))
           & (frac > 2 * base + 0.01))
    hot = hot | np.roll(hot, 1) | np.roll(hot, -1)   # the wings beside a flagged bin
    return ~hot[b]


def _object_profile(s: np.ndarray, r: np.ndarray, use: np.ndarray, lo: float, hi: float
                    ) -> np.ndarray:
    """Points in slit-position bins where the order's median normalised residual stands out
    (an object nobody masked): the median over wavelength ignores the sky lines, so an
    object's continuum shows however bright the lines are."""
    nbins = 80
    edges = np.linspace(lo, hi, nbins + 1)
    b = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nbins - 1)
    med = np.full(nbins, np.nan)
    count = np.bincount(b[use], minlength=nbins)
    order = np.argsort(b[use], kind="stable")
    rs = r[use][order]
    starts = np.concatenate([[0], np.cumsum(count)])
    for j in range(nbins):
        if count[j] >= 20:
            med[j] = np.median(rs[starts[j]:starts[j + 1]])
    ok = np.isfinite(med)
    if ok.sum() < 10:
        return np.zeros(s.size, bool)
    excess = med - np.median(med[ok])
    se = 1.25 / np.sqrt(np.maximum(count, 1))
    seed = ok & (excess > OBJECT_PROFILE_LIMIT + 5 * se)
    if not seed.any():
        return np.zeros(s.size, bool)
    wing = ok & (excess > OBJECT_PROFILE_WING + 3 * se)
    hot = seed.copy()
    for _ in range(nbins):        # grow each detection through its wings
        grown = hot | (wing & (np.roll(hot, 1) | np.roll(hot, -1)))
        grown[0] |= hot[1] & wing[0]
        grown[-1] |= hot[-2] & wing[-1]
        if np.array_equal(grown, hot):
            break
        hot = grown
    hot = hot | np.roll(hot, 1) | np.roll(hot, -1)   # one bin of margin
    return hot[b]


def _photon_scale(d: np.ndarray, var: np.ndarray) -> float:
    """Slope of the variance against the (positive) signal, robustly: a line through the
    medians of the variance in 20 signal quantiles.  A least-squares line through the
    pixels themselves is led by a few outliers (an inflated error, a missed cosmic ray)
    and can come out tens of times too steep."""
    x = np.maximum(d, 0.0)
    edges = np.unique(np.percentile(x, np.linspace(2, 98, 21)))
    if edges.size < 3:
        return 1.0
    b = np.searchsorted(edges, x, side="right") - 1
    ok = (b >= 0) & (b < edges.size - 1)
    xs, vs = [], []
    for j in range(edges.size - 1):
        sel = ok & (b == j)
        if np.count_nonzero(sel) >= 20:
            xs.append(np.median(x[sel]))
            vs.append(np.median(var[sel]))
    if len(xs) < 3 or np.ptp(xs) <= 0:
        return 1.0
    slope = float(np.polyfit(np.asarray(xs), np.asarray(vs), 1)[0])
    return min(max(slope, 0.0), 10.0)


def _fit_order(n: int, lam: np.ndarray, s: np.ndarray, d: np.ndarray, err: np.ndarray,
               cand: np.ndarray, step: float, span: float, p: SkyParameters,
               poisson_scale: np.ndarray | None = None, masked: np.ndarray | None = None,
               j_reference: SharedIllumination | None = None
               ) -> tuple[OrderSkyFit, dict[str, np.ndarray]]:
    """Fit one order.  The arrays hold the order's pixels; returns the fit and, per pixel,
    ``model``, ``error``, ``used``, ``rejected`` and ``object`` (aggressive masking).
    ``masked``: the valid pixels of the object mask, whose sky lines measure ``J`` there
    (:func:`_line_contrast`); where they cannot, ``j_reference`` (the other orders' ``J``)
    does, if given."""
    k = int(p.bspline_order)
    order = np.argsort(lam, kind="stable")
    lam_s, s_s, d_s, e_s = lam[order], s[order], d[order], err[order]
    cand_s = cand[order]
    var_data = e_s.astype(float) ** 2
    n_px = lam_s.size

    # ---- slit range (dispersion map) and the edge clip
    s_lo_all, s_hi_all = float(np.min(s)), float(np.max(s))
    length = s_hi_all - s_lo_all
    s_lo = s_lo_all + p.clip_slit_edge_fraction * length
    s_hi = s_hi_all - p.clip_slit_edge_fraction * length
    cand_s &= (s_s >= s_lo) & (s_s <= s_hi)
    ci = np.flatnonzero(cand_s)
    if ci.size < max(4 * p.starting_points_per_knot, 50):
        raise ValueError(f"order {n}: only {ci.size} sky pixels")

    # ---- rolling-percentile clip (object, cosmic rays)
    keep_c, med_c = _percentile_clip(d_s[ci], e_s[ci], p)
    aggressive = np.zeros(n_px, bool)
    if p.aggressive_object_masking:
        agg = _aggressive_mask(s_s, np.isin(np.arange(n_px), ci[~keep_c]), s_lo, s_hi)
        aggressive = ~agg
        keep_c &= agg[ci]
    sky_i = ci[keep_c]
    if sky_i.size < max(2 * p.starting_points_per_knot, 50):
        raise ValueError(f"order {n}: only {sky_i.size} sky pixels after clipping")

    # photon part of the variance re-estimated from the model: var = err^2 + beta (m - d),
    # beta the electrons' variance per unit of signal (1 for a frame in electrons, 1 / flat after
    # flat-fielding, 0 when the errors have no photon part)
    # flat-fielding, 0 when the errors have no photon part): given per pixel by the caller,
    # else measured.  A beta too large would weight the pixels above the model more than
    # those below and pull the model up, which raises it further: a runaway to a sky
    # several electrons too high.
    if poisson_scale is not None:
        beta = np.clip(np.asarray(poisson_scale, float)[order], 0.0, 10.0)
    else:
        sub = ci[:: max(1, ci.size // 50000)]
        beta = _photon_scale(d_s[sub], var_data[sub])

    def variance(sel: np.ndarray, model: np.ndarray) -> np.ndarray:
        b = beta[sel] if np.ndim(beta) else beta
        v = var_data[sel] + b * (np.maximum(model[sel], 0) - np.maximum(d_s[sel], 0))
        return np.maximum(v, 0.25 * var_data[sel])

    # ---- breakpoints: every starting_points_per_knot-th sky point, thinned to the sampling
    row_frac = max(MIN_KNOT_ROW_FRACTION, 1.0 / (1.0 + span / step)) if step > 0 else 0.0
    min_gap = row_frac * step
    log.debug("sky order %d: wavelength step %.4g nm per pixel, row span %.4g nm, "
              "knots at least %.4g nm apart", n, step, span, min_gap)
    xs = lam_s[sky_i]
    npk = int(p.starting_points_per_knot)
    pos = np.arange(npk, xs.size - npk // 2, npk)
    inner = 0.5 * (xs[pos - 1] + xs[pos])
    breaks = _thin(np.concatenate([[lam_s[0]], inner, [lam_s[-1]]]), min_gap)
    if step > 0 and MAX_KNOT_ROWS > 0:
        # never wider than MAX_KNOT_ROWS along-order pixels to start with: a faint line's
        # wings under coarse knots leave a bias the refinement cannot see in the noise
        gaps = np.diff(breaks)
        extra = np.ceil(gaps / (MAX_KNOT_ROWS * step)).astype(int)
        fill = [breaks[j] + gaps[j] * np.arange(1, extra[j]) / extra[j]
                for j in np.flatnonzero(extra > 1)]
        if fill:
            breaks = np.unique(np.concatenate([breaks, *fill]))

    # ---- slit illumination J(s) = sum cj B_j(s); the B-splines sum to 1, so cj = 1 is J = 1
    ill_deg = int(p.slit_illumination_order)
    if ill_deg >= 0:
        tj = _illumination_knots(s_lo, s_hi, ill_deg, p.slit_illumination_knot_spacing)
        nj = tj.size - ill_deg - 1
        prior_j = _illumination_prior(tj, ill_deg, s_lo, s_hi)
        jv_all, jf_all = _design(tj, ill_deg, np.clip(s_s, s_lo, s_hi))
        cj = np.ones(nj)
    else:
        tj, nj, cj = np.zeros(0), 0, np.zeros(0)
        jv_all = jf_all = None
        prior_j = np.zeros((0, 0))
    jv = np.ones(n_px)

    use = np.ones(sky_i.size, bool)        # which sky_i points the fit uses
    blocked = np.zeros(sky_i.size, bool)   # found to be an untraced object
    model_s = np.interp(np.arange(n_px), ci, med_c)
    floor = 1.0
    iterations = 0
    for it in range(int(p.bspline_iteration_limit)):
        iterations = it + 1
        used = sky_i[use]
        knots = _full_knots(breaks, k)
        # one basis evaluation at every sky point serves the fit (its used subset) and the
        # model at the sky points
        bv_s, bf_s = _design(knots, k, lam_s[sky_i])
        bv, bf = bv_s[use], bf_s[use]
        w = 1.0 / variance(used, model_s)
        found_object = False
        for alt in range(2 if nj else 1):
            ab, rhs = _banded_normal(bv, bf, w, d_s[used], knots.size - k - 1,
                                     scale=jv[used])
            coef, _ = _solve(ab, rhs)
            if it == 0 and alt == 0:
                # an untraced object, looked for before J can take it in: whole slit
                # ranges whose residual stands out over the order
                model0 = _evaluate(bv_s, bf_s, coef)
                r0 = (d_s[sky_i] - model0) / np.sqrt(var_data[sky_i])
                hit = _object_profile(s_s[sky_i], r0, use, s_lo, s_hi)
                if hit.any():
                    aggressive[sky_i[hit]] = True
                    use &= ~hit
                    blocked |= hit
                    found_object = True
                    break
            if nj and alt < 1:
                g_used = _evaluate(bv, bf, coef)
                # J from the brighter half of the sky: an object's wings beyond any mask
                # add light, which is a smaller fraction of a brighter sky
                hi_sky = g_used >= np.median(g_used)
                uj = used[hi_sky]
                cj = _fit_illumination(jv_all[uj], jf_all[uj], g_used[hi_sky], d_s[uj],
                                       w[hi_sky], np.zeros(uj.size), nj, prior_j)
                cj, coef = _normalise_illumination(tj, ill_deg, cj, coef, s_lo, s_hi)
                jv = _evaluate(jv_all, jf_all, cj)
        # during the iterations the model is needed at the sky points only
        model_s[sky_i] = _evaluate(bv_s, bf_s, coef) * jv[sky_i]
        r = (d_s[sky_i] - model_s[sky_i]) / np.sqrt(variance(sky_i, model_s))
        q = float(np.percentile(np.abs(r[use]), p.residual_floor_percentile))
        floor = max(q / _half_normal_quantile(p.residual_floor_percentile), 0.5)
        # rejection against the local misfit (robust: the mean of r^2 capped at 9 in the
        # point's knot interval), so that the points of a line the knots do not follow yet are not
        # thrown away before the knots are refined, while a cosmic ray still is
        ib_all = np.clip(np.searchsorted(breaks, lam_s[sky_i], side="right") - 1, 0,
                         breaks.size - 2)
        nseg = breaks.size - 1
        cnt_all = np.bincount(ib_all[use], minlength=nseg)
        wins = np.bincount(ib_all[use], np.minimum(r[use] ** 2, 9.0), minlength=nseg)
        local = np.maximum(np.divide(wins, cnt_all, out=np.zeros(nseg), where=cnt_all > 0)
                           / CHI2_1_WINSORISED_MEAN, floor**2)
        limit = p.bspline_fitting_residual_clipping_sigma * np.sqrt(local[ib_all])
        new_use = (np.abs(r) <= limit) & ~blocked
        # ---- refine: split the intervals whose misfit is significant
        xu = lam_s[sky_i[new_use]]
        ru = r[new_use]
        ib = np.clip(np.searchsorted(breaks, xu, side="right") - 1, 0, breaks.size - 2)
        cnt = np.bincount(ib, minlength=breaks.size - 1)
        chi = np.bincount(ib, ru**2, minlength=breaks.size - 1)
        mean_chi = np.divide(chi, cnt, out=np.zeros(chi.size), where=cnt > 0) / floor**2
        signif = 1.0 + SPLIT_SIGNIFICANCE * np.sqrt(2.0 / np.maximum(cnt, 1))
        # structure finer than the knots: the mean residuals of an interval's quarters
        # (chi-squared with 4 degrees of freedom when there is none); this sees a bias far
        # below the point noise, which the mean chi-squared alone would not
        starts = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        rank = np.arange(xu.size) - starts[ib]
        quarter = np.minimum(4 * rank // np.maximum(cnt[ib], 1), 3)
        key = ib * 4 + quarter
        qn = np.bincount(key, minlength=4 * cnt.size).reshape(-1, 4)
        qs = np.bincount(key, ru, minlength=4 * cnt.size).reshape(-1, 4)
        quarters = np.sum(np.divide(qs**2, qn, out=np.zeros(qs.shape), where=qn > 0),
                          axis=1) / floor**2
        split = (((mean_chi > signif) | (quarters > QUARTER_CHI2_LIMIT))
                 & (cnt >= 2 * p.min_points_per_knot) & (np.diff(breaks) >= 2 * min_gap))
        log.debug("sky order %d iteration %d: %d breakpoints, %d intervals split, %d "
                  "points rejected", n, it, breaks.size, int(split.sum()),
                  int(sky_i.size - new_use.sum()))
        converged = np.array_equal(new_use, use) and not split.any() and not found_object
        use = new_use
        if converged or it == p.bspline_iteration_limit - 1:
            break
        if split.any():
            mids = xu[np.minimum(starts[split] + cnt[split] // 2, xu.size - 1)]
            lo_b, hi_b = breaks[:-1][split], breaks[1:][split]
            mids = np.clip(mids, lo_b + min_gap, hi_b - min_gap)
            breaks = np.unique(np.concatenate([breaks, mids]))

    # ---- final solve with the final knots, points and illumination; the model's error
    used = sky_i[use]
    knots = _full_knots(breaks, k)
    bv, bf = _design(knots, k, lam_s[used])
    w = 1.0 / variance(used, model_s)
    nb = knots.size - k - 1
    ab, rhs = _banded_normal(bv, bf, w, d_s[used], nb, scale=jv[used])
    coef, chol = _solve(ab, rhs)
    sinv = _banded_inverse_band(chol)
    lines = None
    how = ""
    if nj and masked is not None:
        # under the object J is bridged by its prior alone, unless the sky lines there
        # measure it: J from the sky pixels and the masked pixels' line contrast together,
        # then G again with that J
        under = np.flatnonzero(masked[order] & (s_s >= s_lo) & (s_s <= s_hi))
        lines = _line_contrast(knots, k, coef, sinv, jv_all, jf_all, jv, lam_s, s_s, d_s,
                               var_data, under, p.slit_illumination_knot_spacing)
        how = "lines" if lines is not None else "prior"
        if lines is None and j_reference is not None:
            lines = j_reference.equations(tj, ill_deg, cj, s_s[under], (s_lo, s_hi))
            how = "shared" if lines is not None else how
        if lines is not None:
            g_used = _evaluate(bv, bf, coef)
            hi_sky = g_used >= np.median(g_used)
            uj = used[hi_sky]
            sky_eq = (jv_all[uj], jf_all[uj], g_used[hi_sky], d_s[uj], w[hi_sky],
                      np.zeros(uj.size))
            cj = _fit_illumination(*_stack_equations(sky_eq, lines), nj, prior_j)
            cj, coef = _normalise_illumination(tj, ill_deg, cj, coef, s_lo, s_hi)
            jv = _evaluate(jv_all, jf_all, cj)
            ab, rhs = _banded_normal(bv, bf, w, d_s[used], nb, scale=jv[used])
            coef, chol = _solve(ab, rhs)
            sinv = _banded_inverse_band(chol)
    bv_all, bf_all = _design(knots, k, np.clip(lam_s, knots[k], knots[-k - 1]))
    g_all = _evaluate(bv_all, bf_all, coef)
    var_g = _band_variance(bv_all, bf_all, sinv)
    model_s = g_all * jv
    var_model = np.maximum(var_g, 0.0) * jv**2
    if nj:
        uj = used[g_all[used] >= np.median(g_all[used])]
        sky_eq = (jv_all[uj], jf_all[uj], g_all[uj], d_s[uj], 1.0 / variance(uj, model_s),
                  np.zeros(uj.size))
        var_j = _illumination_variance(jv_all, jf_all, _stack_equations(sky_eq, lines), nj,
                                       prior_j)
        var_model += g_all**2 * var_j
    chi2 = float(np.mean((d_s[used] - model_s[used]) ** 2 / variance(used, model_s)))

    def unsort(values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        out[order] = values
        return out

    used_mask = np.zeros(n_px, bool)
    used_mask[used] = True
    rejected = np.zeros(n_px, bool)
    rejected[ci] = True
    rejected &= ~used_mask
    fit = OrderSkyFit(order=int(n), knots=knots, coefficients=coef, degree=k,
                      illumination_knots=tj, illumination_coefficients=cj,
                      illumination_degree=max(ill_deg, 0), slit_range=(s_lo, s_hi),
                      n_used=int(used.size), n_rejected=int(rejected.sum()), chi2=chi2,
                      noise_floor=float(floor), iterations=iterations,
                      illumination_under_object=how if nj and masked is not None else "")
    return fit, dict(model=unsort(model_s), error=unsort(np.sqrt(var_model)),
                     used=unsort(used_mask), rejected=unsort(rejected),
                     object=unsort(aggressive))


def _thin(breaks: np.ndarray, min_gap: float) -> np.ndarray:
    """Drop interior breakpoints closer than ``min_gap`` to the previous kept one (the
    last one is always kept)."""
    if min_gap <= 0 or breaks.size <= 2:
        return np.unique(breaks)
    keep = [breaks[0]]
    for b in breaks[1:-1]:
        if b - keep[-1] >= min_gap and breaks[-1] - b >= min_gap:
            keep.append(b)
    keep.append(breaks[-1])
    return np.asarray(keep)


def _segment_median(segment: np.ndarray, values: np.ndarray, n_segments: int) -> np.ndarray:
    """Median of ``values`` per segment label (0 where a segment has none)."""
    out = np.zeros(n_segments)
    if values.size == 0:
        return out
    order = np.lexsort((values, segment))
    seg = segment[order]
    val = values[order]
    count = np.bincount(seg, minlength=n_segments)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    lo = start[has] + (count[has] - 1) // 2
    hi = start[has] + count[has] // 2
    out[has] = 0.5 * (val[lo] + val[hi])
    return out


def _half_normal_quantile(percentile: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(0.5 + 0.5 * percentile / 100.0))


def _illumination_normal(jv: np.ndarray, jf: np.ndarray, g: np.ndarray, d: np.ndarray,
                         w: np.ndarray, g_var: np.ndarray, nj: int, prior: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of ``d ~ g * J(s)`` (small, dense), with the first-difference prior
    on ``J``'s coefficients, which bridges slit ranges without data (the masked object)
    and bounds what ``J`` can do there.  ``g_var``: the variance of each ``g`` (0 when
    exact), taken off ``g^2``'s expectation so that a noisy ``g`` does not bias ``J``
    towards 0 (the errors-in-variables correction)."""
    k1 = jv.shape[1]
    a = jv * g[:, None]
    n = np.zeros((nj, nj))
    rhs = np.zeros(nj)
    for i in range(k1):
        rhs += np.bincount(jf + i, w * a[:, i] * d, minlength=nj)
        for j in range(k1):
            flat = (jf + i) * nj + (jf + j)
            n += np.bincount(flat, w * (a[:, i] * a[:, j] - jv[:, i] * jv[:, j] * g_var),
                             minlength=nj * nj).reshape(nj, nj)
    n += prior
    n[np.diag_indices(nj)] += 1e-9 * max(float(np.max(np.diag(n))), 1e-30)
    return n, rhs


def _fit_illumination(jv: np.ndarray, jf: np.ndarray, g: np.ndarray, d: np.ndarray,
                      w: np.ndarray, g_var: np.ndarray, nj: int, prior: np.ndarray
                      ) -> np.ndarray:
    """Coefficients of ``J`` from ``d ~ g * J(s)``."""
    n, rhs = _illumination_normal(jv, jf, g, d, w, g_var, nj, prior)
    return np.linalg.solve(n, rhs)


#: equations of ``J``: its basis at each point (values, first index), ``g``, ``d``, weight
#: and the variance of ``g``
Equations = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _stack_equations(first: Equations, second: Equations | None) -> Equations:
    """Two sets of ``d ~ g * J(s)`` equations as one."""
    if second is None:
        return first
    return tuple(np.concatenate([a, b]) for a, b in zip(first, second))  # type: ignore


#: along-wavelength window (points of one slit-position bin) of the running mean that
#: :func:`_line_contrast` subtracts: wider than a sky line, far narrower than the object's
#: continuum changes
LINE_CONTRAST_WINDOW = 21

#: a point of the line contrast further than this many sigma from the model is left out
#: (a cosmic ray or hot pixel nothing flagged)
LINE_CONTRAST_CLIP = 5.0

#: a slit-position bin's line contrast is used when at least this share of it is the
#: sky's lines rather than the noise of the fitted G
LINE_CONTRAST_MIN_SIGNAL = 0.8

#: ... and when the object's light in it is at most this many times the sky's.  A smooth
#: continuum adds noise, not bias, to the line contrast (the object's own lines are caught
#: by LINE_CONTRAST_MAX_EXCESS): at 1 (as until 2026-12-06) the object's core was left to
#: the prior, and in X-shooter's J band, where a 17 mag star outshines the continuum of the
#: sky 2.5 times, J there came out 3-9 % low, the sky under the object 1-2 % low and the
#: rows of the bright OH lines 4.7 sigma high in the extraction
LINE_CONTRAST_MAX_OBJECT = 10.0

#: ... and when the data's line contrast beyond the noise is at most this many times what
#: the sky's lines explain
LINE_CONTRAST_MAX_EXCESS = 1.5


def _running_mean(values: np.ndarray, start: np.ndarray, stop: np.ndarray,
                  window: int) -> np.ndarray:
    """Mean of ``values`` over ``window`` neighbours, each point's window cut to its group
    ``[start, stop)`` (indices per point)."""
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(values.size)
    lo = np.maximum(i - window // 2, start)
    hi = np.minimum(i + window // 2 + 1, stop)
    return (c[hi] - c[lo]) / (hi - lo)


def _line_contrast(knots: np.ndarray, degree: int, coef: np.ndarray, sinv: np.ndarray,
                   jv_all: np.ndarray, jf_all: np.ndarray, j_now: np.ndarray,
                   lam: np.ndarray, s: np.ndarray, d: np.ndarray, var: np.ndarray,
                   masked: np.ndarray, bin_width: float) -> Equations | None:
    """Equations of ``J`` under the object from its pixels' sky lines.

    Under the object a pixel holds ``G(lambda) J(s) + object``.  Along the wavelength at
    one slit position the object's light changes slowly while the sky's lines come and go,
    so a running mean taken out of both the data and ``G`` (the "line contrast", ``hp``)
    leaves ``hp(d) = J(s) hp(G)`` plus noise and the object's own lines (uncorrelated with
    the sky's).  Without these equations ``J`` would be bridged across the object by its
    prior alone, which misses its real structure (a slit's ripple of 1-2 % makes a few
    per cent of sky in the aperture).  Points are grouped in slit-position bins of
    ``bin_width`` arcsec, and within each taken in wavelength order (the arrays' own).
    ``G`` is itself a fit: its variance goes with the equations (see
    :func:`_illumination_normal`), and a bin whose line contrast is mostly that noise
    (a faint sky without lines) is left out.

    Parameters
    ----------
    knots, degree, coef, sinv : ndarray, int, ndarray, ndarray
        ``G``'s spline and the band of its normal matrix's inverse.
    jv_all, jf_all : ndarray
        ``J``'s basis at every point of the order.
    j_now : ndarray
        ``J`` so far at every point (the outlier clip's model).
    lam, s, d, var : ndarray
        The order's points sorted by wavelength: wavelength, slit position, data, variance.
    masked : ndarray of int
        Indices (into those arrays, increasing) of the object mask's valid points.
    bin_width : float

    Returns
    -------
    tuple or None
        :data:`Equations` of the points kept, or None when none is left.
    """
    window = LINE_CONTRAST_WINDOW
    if masked.size < 3 * window:
        return None
    width = bin_width if bin_width > 0 else 0.25
    group = np.floor(s[masked] / width).astype(np.int64)
    sort = np.argsort(group, kind="stable")                # by bin, wavelength within
    idx, group = masked[sort], group[sort]
    cut = np.flatnonzero(np.diff(group)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [idx.size]])
    sizes = stops - starts
    start, stop = np.repeat(starts, sizes), np.repeat(stops, sizes)
    bv, bf = _design(knots, degree, np.clip(lam[idx], knots[degree], knots[-degree - 1]))
    g = _evaluate(bv, bf, coef)
    g_var = np.maximum(_band_variance(bv, bf, sinv), 0.0)
    hg = g - _running_mean(g, start, stop, window)
    hd = d[idx] - _running_mean(d[idx], start, stop, window)
    # the running mean's own noise: hp(d) has (1 - 1/window) of a point's variance
    w = 1.0 / (np.maximum(var[idx], 1e-30) * (1.0 - 1.0 / window))
    ok = np.abs(hd - hg * j_now[idx]) * np.sqrt(w) < LINE_CONTRAST_CLIP
    # per bin, the share of the line contrast that is the sky's rather than G's noise
    bin_of = np.repeat(np.arange(sizes.size), sizes)
    signal = np.bincount(bin_of, np.where(ok, w * (hg**2 - g_var), 0.0), sizes.size)
    total = np.bincount(bin_of, np.where(ok, w * hg**2, 0.0), sizes.size)
    # where the object outshines the sky, the object's own lines, a trace of which the sky
    # pixels beyond the mask hold (its seeing wings) and so G, would pass for line contrast
    sky_light = np.bincount(bin_of, g * j_now[idx], sizes.size)
    object_light = np.bincount(bin_of, d[idx] - g * j_now[idx], sizes.size)
    # ... and where the data's line contrast beyond its noise is not the sky's: the
    # object's own lines
    n_ok = np.bincount(bin_of, ok.astype(float), sizes.size)
    data_excess = np.bincount(bin_of, np.where(ok, w * hd**2, 0.0), sizes.size) - n_ok
    sky_part = np.bincount(bin_of, np.where(ok, w * (hg**2 - g_var) * j_now[idx]**2, 0.0),
                           sizes.size)
    explained = data_excess <= (LINE_CONTRAST_MAX_EXCESS * np.maximum(sky_part, 0.0)
                                + 3.0 * np.sqrt(2.0 * np.maximum(n_ok, 1.0)))
    reliable = ((sizes >= 3 * window) & (signal >= LINE_CONTRAST_MIN_SIGNAL * total)
                & (total > 0) & (object_light <= LINE_CONTRAST_MAX_OBJECT * sky_light)
                & explained)
    ok &= reliable[bin_of]
    if not ok.any():
        return None
    return jv_all[idx][ok], jf_all[idx][ok], hg[ok], hd[ok], w[ok], g_var[ok]


def _illumination_variance(jv_all: np.ndarray, jf_all: np.ndarray, equations: Equations,
                           nj: int, prior: np.ndarray) -> np.ndarray:
    """Variance of ``J`` at every pixel from the covariance of its coefficients."""
    n, _ = _illumination_normal(*equations, nj, prior)
    cov = np.linalg.inv(n)
    k1 = jv_all.shape[1]
    out = np.zeros(jv_all.shape[0])
    for i in range(k1):
        for j in range(k1):
            out += jv_all[:, i] * jv_all[:, j] * cov[jf_all + i, jf_all + j]
    return np.maximum(out, 0.0)


def _normalise_illumination(tj: np.ndarray, deg: int, cj: np.ndarray, coef: np.ndarray,
                            lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``J`` to mean 1 over the slit and ``G`` inversely (their product is what the
    data fix)."""
    grid = np.linspace(lo, hi, 401)
    mean = float(np.mean(_spline_eval(tj, cj, deg, grid)))
    if not np.isfinite(mean) or mean <= 0:
        return np.ones_like(cj), coef
    return cj / mean, coef * mean


def fit_sky(data: np.ndarray, error: np.ndarray, qual: np.ndarray, wavelength: np.ndarray,
            slit: np.ndarray, order_image: np.ndarray, orders: Sequence[int],
            object_mask: np.ndarray | None = None, params: SkyParameters | None = None, *,
            reject_bits: int = DEFAULT_REJECT_BITS, dispersion_axis: str | None = None,
            threads: int | None = None, poisson_scale: np.ndarray | float | None = None,
            share_illumination: bool = True) -> SkyModel:
    """Model the sky of a frame, order by order.

    Parameters
    ----------
    data, error : ndarray
        The frame (e-) and its 1-sigma errors, in the frame's orientation.
    qual : ndarray of uint8
        QUAL bits; pixels with any of ``reject_bits`` are left out.
    wavelength, slit : ndarray
        Per-pixel wavelength (nm) and slit position (arcsec) from the dispersion map.
    order_image : ndarray of int
        Order number of each pixel (0 / NaN outside the orders).
    orders : sequence of int
        Orders to model.
    object_mask : ndarray of bool, optional
        Pixels of the object (e.g. :func:`object_band_mask` around its trace), left out.
    params : SkyParameters, optional
        Defaults: ``SkyParameters()``.
    reject_bits : int
        QUAL bits that exclude a pixel.
    dispersion_axis : str, optional
        ``"y"`` or ``"x"``; inferred from the wavelength map when not given.
    threads : int, optional
        Orders fitted at once (default: ``default_threads()``, SOXS_NUM_THREADS or the
        cores this process may use).
    poisson_scale : ndarray or float, optional
        Variance of the data per electron of signal, per pixel (1 for a frame in
        electrons, 1 / flat after flat-fielding): the fit's weights come from the model
        through it.  Measured from ``error`` against ``data`` when not given.
    share_illumination : bool
        Refit the orders whose ``J`` under the object could only be bridged by its prior
        with the ``J`` of the orders whose sky lines measured it
        (:class:`SharedIllumination`).

    Returns
    -------
    SkyModel

    Raises
    ------
    ValueError
        When the images do not share one shape.
    """
    p = params or SkyParameters()
    shape = data.shape
    for name, arr in (("error", error), ("qual", qual), ("wavelength", wavelength),
                      ("slit", slit), ("order_image", order_image)):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, the frame {shape}")
    if object_mask is not None and object_mask.shape != shape:
        raise ValueError(f"object_mask has shape {object_mask.shape}, the frame {shape}")
    oimg = np.where(np.isfinite(order_image), order_image, 0).astype(np.int32) \
        if np.issubdtype(np.asarray(order_image).dtype, np.floating) \
        else np.asarray(order_image)
    axis = dispersion_axis or _infer_axis(wavelength, oimg, orders)
    finite = np.isfinite(wavelength) & np.isfinite(slit)
    # every order's pixels at once (a stable sort of the labels keeps each order's pixels in
    # frame order), rather than a full-frame comparison and search per order
    labels = np.where(finite, oimg, 0).ravel()
    if labels.size and 0 <= labels.min() and labels.max() < 2**15:
        labels = labels.astype(np.int16)    # numpy's stable sort of 16-bit keys is a radix sort
    by_order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[by_order], [[int(n), int(n) + 1] for n in orders])
    index_type = np.int32 if labels.size < 2**31 else np.intp
    pixels_of = {int(n): by_order[a:b].astype(index_type)
                 for n, (a, b) in zip(orders, bounds)}
    del labels, by_order

    sky = np.zeros(shape, np.float32)
    err_out = np.zeros(shape, np.float32)
    used = np.zeros(shape, bool)
    rejected = np.zeros(shape, bool)
    obj_out = np.zeros(shape, bool) if object_mask is None else object_mask.astype(bool).copy()
    fits_out: dict[int, OrderSkyFit] = {}
    obj_in = obj_out.copy()

    def one(n: int, j_reference: SharedIllumination | None = None) -> None:
        idx = pixels_of[int(n)]
        if idx.size == 0:
            return
        lam = wavelength.ravel()[idx].astype(float)
        s = slit.ravel()[idx].astype(float)
        d = data.ravel()[idx].astype(float)
        e = error.ravel()[idx].astype(float)
        good = (((qual.ravel()[idx] & reject_bits) == 0) & np.isfinite(d) & np.isfinite(e)
                & (e > 0))
        cand = good & ~obj_in.ravel()[idx]
        d = np.where(np.isfinite(d), d, 0.0)
        e = np.where(np.isfinite(e) & (e > 0), e, 1.0)
        # the order's pixels first, then double precision: not a float64 copy of the frame
        scale = (None if poisson_scale is None
                 else np.broadcast_to(np.asarray(poisson_scale), shape).ravel()[idx]
                 .astype(float))
        rows_, cols_ = np.divmod(idx, shape[1])
        box = (slice(rows_.min(), rows_.max() + 1), slice(cols_.min(), cols_.max() + 1))
        member = np.zeros((box[0].stop - box[0].start, box[1].stop - box[1].start), bool)
        member[rows_ - box[0].start, cols_ - box[1].start] = True
        mview = member if axis == "y" else member.T
        wview = wavelength[box] if axis == "y" else wavelength[box].T
        step, span = _sampling(wview, mview)
        masked = good & obj_in.ravel()[idx]
        try:
            fit, out = _fit_order(int(n), lam, s, d, e, cand, step, span, p, scale,
                                  masked if masked.any() else None, j_reference)
        except ValueError as exc:
            log.warning("sky not modelled: %s", exc)
            return
        # the orders' pixels are disjoint: the threads write to different elements
        sky.ravel()[idx] = out["model"]
        err_out.ravel()[idx] = out["error"]
        used.ravel()[idx] = out["used"]
        rejected.ravel()[idx] = out["rejected"]
        obj_out.ravel()[idx] |= out["object"]
        fits_out[int(n)] = fit

    from concurrent.futures import ThreadPoolExecutor

    from soxs_core.combine.stacking import default_threads

    workers = min(default_threads(threads), max(1, len(orders)))

    def fit_each(numbers: list[int], reference: SharedIllumination | None = None) -> None:
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda n: one(n, reference), numbers))
        else:
            for n in numbers:
                one(n, reference)

    fit_each([int(n) for n in orders])
    bridged = [n for n, f in fits_out.items() if f.illumination_under_object == "prior"]
    shared = shared_illumination(fits_out) if share_illumination and bridged else None
    if shared is not None:
        log.info("sky: J under the object of order(s) %s from the %d orders whose sky lines "
                 "measure it", ", ".join(map(str, sorted(bridged))), shared.n_orders)
        fit_each(bridged, shared)
    fits_out = dict(sorted(fits_out.items()))
    return SkyModel(sky=sky, error=err_out, used=used, rejected=rejected,
                    object_mask=obj_out, fits=fits_out)


def subtract_sky(image: DetectorImage, model: SkyModel) -> DetectorImage:
    """Subtract the sky model.

    Returns
    -------
    DetectorImage
        ``data - sky``, error ``sqrt(error^2 + model error^2)``, QUAL kept.
    """
    data = (image.data.astype(np.float32) - model.sky.astype(np.float32))
    err = np.sqrt(image.error.astype(np.float32) ** 2
                  + model.error.astype(np.float32) ** 2).astype(np.float32)
    return DetectorImage(data=data, error=err, qual=image.qual.copy(),
                         header=image.header.copy())


def sky_residuals(skysub: DetectorImage, used: np.ndarray) -> DetectorImage:
    """The SKY SUB RESIDUALS image: the sky-subtracted frame in the pixels that fitted the sky.

    Parameters
    ----------
    skysub : DetectorImage
        From :func:`subtract_sky`.
    used : ndarray of bool
        The pixels the sky was fitted to (``SkyModel.used``).

    Returns
    -------
    DetectorImage
        ``skysub`` where ``used``, NaN elsewhere (error 0 there), QUAL kept.
    """
    return DetectorImage(data=np.where(used, skysub.data, np.float32(np.nan)).astype(np.float32),
                         error=np.where(used, skysub.error, np.float32(0)).astype(np.float32),
                         qual=skysub.qual.copy(), header=skysub.header.copy())


def plot_sky_model(path: str | Path, image: DetectorImage, model: SkyModel, disp_map: Any,
                   **kwargs: Any) -> Path:
    """SKY MODEL QC PLOTS: see :func:`soxs_core.extraction.skyplots.plot_sky_model`."""
    from soxs_core.extraction import skyplots

    return skyplots.plot_sky_model(path, image, model, disp_map, **kwargs)


def plot_sky_quicklook(path: str | Path, image: DetectorImage, model: SkyModel,
                       disp_map: Any, **kwargs: Any) -> Path:
    """SKY SUBTRACTION QUICKLOOK: see :func:`soxs_core.extraction.skyplots.plot_sky_quicklook`."""
    from soxs_core.extraction import skyplots

    return skyplots.plot_sky_quicklook(path, image, model, disp_map, **kwargs)
