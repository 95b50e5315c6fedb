"""The object trace of a stare frame (the seed's ``detect_continuum``) and its OBJECT_TAB.

On the sky-subtracted frame, each order of the order table is sampled at
``order_sample_count`` positions along its valid range.  A sample is a cut ``slice_length``
binned px across (centred on the order centre, kept between the order edges when the table
has them) and ``slice_width`` binned px along, collapsed along with a median that ignores
masked pixels (a cosmic ray in one row of the slice does not move it).  A Gaussian plus a
constant is fitted to every cut at once (a vectorised Levenberg-Marquardt, a few thousand
cuts in a few tens of milliseconds); a cut is *detected* when the fitted peak stands
``peak_sigma_limit`` robust noise sigmas (mad-std of the cut about the fit) above the fitted
baseline, its centre lies inside the cut and its sigma is sensible.

The detected centres are fitted with the global echelle polynomial
(:func:`~soxs_core.echelle.polynomial.fit_order_polynomial`) in unbinned coordinates, as the
order table is, and then the cuts are measured a second time, re-centred on that first trace
with a window of about ten trace sigmas: the faint ends of an order are found more often and
sky residuals near the slit ends no longer pull the fits.  The Gaussian sigma is fitted
globally with the same degrees.  The result is an :class:`~soxs_core.echelle.ordertable.
OrderTable` whose ``centre`` is the object trace and ``std`` its width: the ``OBJECT_TAB``
product in the ORDER_TAB layout (INSTRUMENTS.md §5.2).

Units: :class:`TraceSamples` and :attr:`ObjectTrace.residuals` are unbinned px, like the
table.  The QC residuals (``X RES ...`` / SOXS NIR ``Y RES ...``) are in px of the frame
(binned px), the pixels the measurement was made in.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.echelle.ordertable import OrderTable, to_binned, to_unbinned
from soxs_core.echelle.polynomial import OrderPolynomial, PolynomialFit, fit_order_polynomial
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.io.products import QcMeasurements

__all__ = ["TraceParameters", "TraceSamples", "ObjectTrace", "detect_continuum",
           "trace_centre_binned", "plot_object_trace", "render_object_trace",
           "fit_gaussians", "slice_pixels", "ARM_DEFAULTS"]

log = logging.getLogger(__name__)

#: The fraction of an order's samples that must be detected for the order to be traced.
MIN_DETECTED_FRACTION = 0.10
#: Smallest Gaussian sigma (binned px) of a detection: narrower peaks are noise or cosmics.
MIN_SIGMA = 0.5
#: Smallest centre error (binned px) of a cut in the fit weights.
CENTRE_ERROR_FLOOR = 0.03
#: Refined cuts span this many fitted trace sigmas each side of the first trace (at least
#: ``REFINE_MIN_HALF`` binned px, at most the seed's cut).
REFINE_SIGMAS = 5.0
REFINE_MIN_HALF = 5
#: On the second pass a cut's Gaussian sigma must lie within this factor of the first pass's
#: global width fit, and its centre within ``OFFSET_SIGMAS`` of those sigmas of the first trace.
WIDTH_FACTOR = 2.0
OFFSET_SIGMAS = 3.5
#: Neighbours on each side, and the limit in combined sigmas, of the consistency test of
#: the detections before each global fit (:func:`_consistent`).
NEIGHBOURS = 5
OUTLIER_SIGMAS = 5.0
#: Pseudo-samples of the offset from the order centre where an order has no detection
#: (:func:`_anchors`): gap (cut spacings), detections averaged and weight (a measurement
#: of this error, binned px).
ANCHOR_GAP = 3
ANCHOR_NEAREST = 10
ANCHOR_ERROR = 1.0
#: An order is traced only when the robust scatter of its fit residuals, in units of their
#: errors (combined with a floor of ``RESIDUAL_FLOOR`` binned px for the profile's and the
#: polynomial's imperfections), is below ``COHERENCE_LIMIT``: noise peaks scatter over the
#: whole cut, far beyond their formal errors.
RESIDUAL_FLOOR = 0.1
COHERENCE_LIMIT = 3.0
#: Highest along-order degree of the trace-width fit.
STD_ALONG_DEG = 2


@dataclass(frozen=True)
class TraceParameters:
    """The seed's ``detect_continuum`` parameters (pixel values in binned px of the frame).

    Attributes
    ----------
    order_sample_count : int
        Cuts placed along each order.
    slice_length : int
        Length of each cut across the order (px).
    slice_width : int
        Width of each cut along the order (px), median-collapsed.
    peak_sigma_limit : float
        Detection threshold: fitted peak above the fitted baseline, in robust noise sigmas.
    order_deg, disp_axis_deg : int
        Degrees in order number and along-order pixel of the global trace polynomial.
    poly_fitting_residual_clipping_sigma : float
        Clipping limit (robust sigmas) of the trace-fit residuals.
    poly_clipping_iteration_limit : int
        Most fit-then-clip cycles.
    """

    order_sample_count: int = 100
    slice_length: int = 30
    slice_width: int = 5
    peak_sigma_limit: float = 2.0
    order_deg: int = 6
    disp_axis_deg: int = 4
    poly_fitting_residual_clipping_sigma: float = 7.0
    poly_clipping_iteration_limit: int = 7

    def __post_init__(self) -> None:
        checks = (
            ("order_sample_count", self.order_sample_count >= 3, "at least 3"),
            ("slice_length", self.slice_length >= 5, "at least 5 px"),
            ("slice_width", self.slice_width >= 1, "at least 1 px"),
            ("peak_sigma_limit", self.peak_sigma_limit > 0, "positive"),
            ("order_deg", 0 <= self.order_deg <= 9, "within 0..9"),
            ("disp_axis_deg", 0 <= self.disp_axis_deg <= 9, "within 0..9"),
            ("poly_fitting_residual_clipping_sigma",
             self.poly_fitting_residual_clipping_sigma > 0, "positive"),
            ("poly_clipping_iteration_limit", self.poly_clipping_iteration_limit >= 0,
             "at least 0"),
        )
        for name, ok, need in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"detect_continuum {name} = {value!r}: must be {need}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TraceParameters:
        """Parameters from a mapping with the seed's names, hyphens or underscores alike.

        Keys may carry a ``detect-continuum.`` / ``detect_continuum.`` prefix, or the mapping
        may hold a ``detect-continuum`` sub-mapping (soxspipe's settings layout).  Keys that
        are not trace parameters are ignored, so a recipe's whole parameter set can be passed.
        Integer parameters must have integral values.

        Raises
        ------
        ValueError
            A value that is not a number of the right kind or out of its range.
        """
        names = {f.name: f for f in fields(cls)}
        found: dict[str, Any] = {}

        def take(mapping: Mapping[str, Any]) -> None:
            for key, value in mapping.items():
                norm = str(key).strip().lower().replace("-", "_")
                if isinstance(value, Mapping):
                    if norm == "detect_continuum":
                        take(value)
                    continue
                if norm.startswith("detect_continuum."):
                    norm = norm[len("detect_continuum."):]
                if norm in names:
                    found[norm] = value

        take(values)
        kwargs: dict[str, Any] = {}
        for name, value in found.items():
            want_int = names[name].type in ("int", int)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"detect_continuum {name} = {value!r}: not a number") from None
            if want_int:
                if not (math.isfinite(number) and number == int(number)):
                    raise ValueError(f"detect_continuum {name} = {value!r}: not an integer")
                kwargs[name] = int(number)
            else:
                kwargs[name] = number
        return cls(**kwargs)

    @classmethod
    def for_arm(cls, arm: str) -> TraceParameters:
        """soxspipe 0.17.4's stare defaults of an arm (``xsh_vis``, ``soxs_nir``...;
        DEFAULT_PARAMETERS.md §5)."""
        try:
            return cls(**ARM_DEFAULTS[arm.lower()])
        except KeyError:
            raise ValueError(f"no detect_continuum defaults for arm {arm!r}") from None


_XSH = dict(order_sample_count=100, slice_length=30, slice_width=5, peak_sigma_limit=2.0,
            order_deg=6, disp_axis_deg=4, poly_fitting_residual_clipping_sigma=7.0,
            poly_clipping_iteration_limit=7)
#: Stare ``detect-continuum`` values of soxspipe 0.17.4 per arm (DEFAULT_PARAMETERS.md §5).
ARM_DEFAULTS: dict[str, dict[str, Any]] = {
    "xsh_uvb": {**_XSH, "disp_axis_deg": 5},
    "xsh_vis": dict(_XSH),
    "xsh_nir": dict(_XSH),
    "soxs_vis": dict(order_sample_count=150, slice_length=70, slice_width=7,
                     peak_sigma_limit=1.5, order_deg=3, disp_axis_deg=5,
                     poly_fitting_residual_clipping_sigma=4.0, poly_clipping_iteration_limit=5),
    "soxs_nir": dict(order_sample_count=150, slice_length=50, slice_width=7,
                     peak_sigma_limit=1.5, order_deg=4, disp_axis_deg=4,
                     poly_fitting_residual_clipping_sigma=3.0,
                     poly_clipping_iteration_limit=10),
}


@dataclass
class TraceSamples:
    """Every cut of the trace measurement (one entry per cut, unbinned px).

    Attributes
    ----------
    order : ndarray of int
    along : ndarray
        Along-order position of the cut's centre.
    across : ndarray
        Fitted Gaussian centre (NaN where the fit failed).
    sigma : ndarray
        Fitted Gaussian sigma.
    amplitude : ndarray
        Fitted peak above the baseline (e- per pixel of the collapsed cut).
    noise : ndarray
        Robust noise (mad-std about the fit) of the collapsed cut (e-).
    centre_error : ndarray
        1-sigma statistical error of ``across`` from the fit.
    detected : ndarray of bool
        The cut passed the detection criteria.
    clipped : ndarray of bool
        Detected but rejected by the global fit (or in an order left out of the trace).
    """

    order: np.ndarray
    along: np.ndarray
    across: np.ndarray
    sigma: np.ndarray
    amplitude: np.ndarray
    noise: np.ndarray
    centre_error: np.ndarray
    detected: np.ndarray
    clipped: np.ndarray

    @property
    def used(self) -> np.ndarray:
        """Samples that entered the final trace fit."""
        return self.detected & ~self.clipped

    def __len__(self) -> int:
        return int(self.order.size)


@dataclass
class ObjectTrace:
    """Result of :func:`detect_continuum`.

    Attributes
    ----------
    table : OrderTable
        The object trace (``centre``) and its Gaussian sigma (``std``), unbinned px, with the
        traced orders and their along-order ranges (the order table's).
    samples : TraceSamples
    qc : QcMeasurements
        N ORDERS, SAMPLES TOT/DET/CLIP NUM, SAMPLES DET/CLIP FRAC and X RES MIN/MAX/SD
        (SOXS NIR: Y RES ...), residuals in binned px of the frame.
    residuals : ndarray
        Measured minus fitted centre for every sample (unbinned px; NaN where not detected
        or in an order left out).
    binx, biny : int
        Binning of the frame.
    dropped_orders : list of int
        Orders of the order table left out of the trace (too few detections).
    detected_range : dict
        ``{order: (first, last)}`` along-order positions (unbinned px) of the outermost
        samples used in the fit: beyond them the trace is the polynomial's extrapolation.
    fit : PolynomialFit
        The global centre fit.
    """

    table: OrderTable
    samples: TraceSamples
    qc: QcMeasurements
    residuals: np.ndarray
    binx: int = 1
    biny: int = 1
    dropped_orders: list[int] = field(default_factory=list)
    detected_range: dict[int, tuple[float, float]] = field(default_factory=dict)
    fit: PolynomialFit | None = None
    params: TraceParameters = field(default_factory=TraceParameters)


# ---------------------------------------------------------------------------- Gaussian fits
def _robust_std(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """mad-std of each row over its valid entries (NaN for rows with < 3)."""
    v = np.where(valid, values, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(v, axis=1)
        mad = np.nanmedian(np.abs(v - med[:, None]), axis=1)
    out = 1.4826 * mad
    out[np.count_nonzero(valid, axis=1) < 3] = np.nan
    return out


def fit_gaussians(profiles: np.ndarray, valid: np.ndarray | None = None,
                  errors: np.ndarray | None = None, iterations: int = 30
                  ) -> dict[str, np.ndarray]:
    """Least-squares fit of ``c + a exp(-(x - mu)^2 / 2 s^2)`` to every row of ``profiles``.

    A Levenberg-Marquardt iteration run on all rows at once (4x4 normal equations per row);
    the start is the row's highest point of a 3-px running mean, its 20th percentile as the
    baseline and the width of the part above half that peak.

    Parameters
    ----------
    profiles : ndarray, shape (K, L)
        One cut per row; the coordinate of column j is j.
    valid : ndarray of bool, shape (K, L), optional
        Entries to use (default: the finite ones).
    errors : ndarray, shape (K, L), optional
        1-sigma errors of the entries: the fit is weighted by them and the centre errors come
        from the covariance alone.  Without them the fit is unweighted and the covariance is
        scaled by the robust noise of the residuals.
    iterations : int
        Levenberg-Marquardt steps.

    Returns
    -------
    dict
        ``amplitude``, ``centre``, ``sigma``, ``baseline``, ``noise`` (mad-std of the residuals
        about the fit, corrected for the 4 fitted parameters), ``centre_error`` (1-sigma) and
        ``ok`` (a fit was made: at least 5 valid entries, finite result), each of shape (K,).
    """
    y = np.asarray(profiles, float)
    k, length = y.shape
    valid = np.isfinite(y) if valid is None else (np.asarray(valid, bool) & np.isfinite(y))
    if errors is not None:
        e = np.asarray(errors, float)
        valid &= np.isfinite(e) & (e > 0)
        w = np.where(valid, 1.0 / np.where(valid, e, 1.0) ** 2, 0.0)
    else:
        w = valid.astype(float)
    y = np.where(valid, y, 0.0)
    x = np.arange(length, dtype=float)[None, :]
    nvalid = valid.sum(axis=1)
    enough = nvalid >= 5
    # start: a 3-px running mean over valid entries finds the peak without chasing one pixel
    num = y.copy()
    den = valid.astype(float)
    num[:, 1:] += y[:, :-1]
    num[:, :-1] += y[:, 1:]
    den[:, 1:] += valid[:, :-1]
    den[:, :-1] += valid[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = np.where(valid & (den > 0), num / np.maximum(den, 1), -np.inf)
    peak = np.argmax(smooth, axis=1)
    # 20th percentile of the valid entries (nanpercentile loops in Python over the rows)
    ordered = np.sort(np.where(valid, y, np.inf), axis=1)
    pos = np.clip(np.rint(0.2 * (nvalid - 1)).astype(int), 0, length - 1)
    base = np.where(nvalid > 0, ordered[rows_all := np.arange(k), pos], 0.0)
    top = smooth[rows_all, peak]
    amp = np.where(np.isfinite(top), top - base, 0.0)
    above = valid & (np.where(valid, smooth, -np.inf) > (base + 0.5 * amp)[:, None])
    sig = np.clip(above.sum(axis=1) / 2.355, 0.8, length / 4.0)
    p = np.stack([np.maximum(amp, 1e-6), peak.astype(float), sig, base], axis=1)

    def model(par):
        a, mu, s, c = (par[:, i:i + 1] for i in range(4))
        g = np.exp(-0.5 * ((x - mu) / s) ** 2)
        return a * g + c, g

    def normal(par, g, ww):
        """J^T W J (K, 4, 4) and (W J)^T (K, 4, L) at ``par`` (weights ``ww``)."""
        a, mu, s = par[:, 0:1], par[:, 1:2], par[:, 2:3]
        d = (x - mu) / s
        ag = a * g
        jac = np.stack([g, ag * d / s, ag * d * d / s, np.ones_like(g)], axis=2)
        jw_t = (jac * ww[:, :, None]).transpose(0, 2, 1)
        return jw_t @ jac, jw_t

    lam = np.full(k, 1e-2)
    m, g = model(p)
    cost = np.sum(w * (y - m) ** 2, axis=1)
    eye = np.eye(4)[None]
    active = np.ones(k, bool)
    for _ in range(iterations):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        pa = p[idx]
        jtj, jw_t = normal(pa, g[idx], w[idx])
        jtr = (jw_t @ (y[idx] - m[idx])[:, :, None])[:, :, 0]
        diag = np.einsum("kii->ki", jtj)
        lhs = jtj + lam[idx, None, None] * (diag[:, :, None] * eye + 1e-12 * eye)
        try:
            step = np.linalg.solve(lhs, jtr[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(pa)
            for i in range(idx.size):
                try:
                    step[i] = np.linalg.solve(lhs[i], jtr[i])
                except np.linalg.LinAlgError:
                    pass
        trial = pa + step
        trial[:, 2] = np.clip(np.abs(trial[:, 2]), 0.2, 2.0 * length)
        trial[:, 1] = np.clip(trial[:, 1], -length, 2.0 * length)
        mt, gt = model(trial)
        new = np.sum(w[idx] * (y[idx] - mt) ** 2, axis=1)
        better = np.isfinite(new) & (new <= cost[idx])
        # a fit is done when its accepted step changes the cost by < 1e-6 relative, or
        # when no step is accepted even with a strong damping
        done = (better & (cost[idx] - new <= 1e-6 * np.maximum(cost[idx], 1e-30))) | (
            ~better & (lam[idx] >= 1e6))
        up = idx[better]
        p[up], cost[up], m[up], g[up] = trial[better], new[better], mt[better], gt[better]
        lam[idx] = np.where(better, np.maximum(lam[idx] / 5.0, 1e-7),
                            np.minimum(lam[idx] * 10.0, 1e7))
        active[idx[done]] = False
    resid = y - m
    dof = np.maximum(nvalid - 4, 1)
    noise = _robust_std(resid, valid) * np.sqrt(nvalid / dof)
    jtj, _ = normal(p, g, w)
    cerr = np.full(k, np.nan)
    det = np.linalg.det(jtj)
    inv_ok = np.isfinite(det) & (np.abs(det) > 0)
    if inv_ok.any():
        with np.errstate(all="ignore"):
            cov = np.linalg.pinv(jtj[inv_ok])
        cerr[inv_ok] = np.sqrt(np.abs(cov[:, 1, 1]))
        if errors is None:
            cerr[inv_ok] *= noise[inv_ok]
    ok = enough & np.all(np.isfinite(p), axis=1) & np.isfinite(noise)
    return {"amplitude": p[:, 0], "centre": p[:, 1], "sigma": p[:, 2], "baseline": p[:, 3],
            "noise": noise, "centre_error": cerr, "ok": ok}


# ---------------------------------------------------------------------------- cuts
@dataclass
class _Cuts:
    order: np.ndarray       # (K,)
    row: np.ndarray         # (K,) binned along centre of the slice
    start: np.ndarray       # (K,) binned across index of the cut's column 0
    profiles: np.ndarray    # (K, L) collapsed cut
    valid: np.ndarray       # (K, L)


def _sample_rows(table: OrderTable, n: int, count: int, n_along: int, bin_along: int,
                 width: int) -> np.ndarray:
    """Binned along indices of the slices of order ``n`` (evenly spread, unique)."""
    b0, b1 = table.along_range(n)
    lo = max(int(math.ceil(float(to_binned(b0, bin_along)))), 0)
    hi = min(int(math.floor(float(to_binned(b1, bin_along)))), n_along - 1)
    half = width // 2
    first, last = lo + half, hi - (width - 1 - half)
    if last < first:
        return np.zeros(0, int)
    return np.unique(np.rint(np.linspace(first, last, count)).astype(int))


def slice_pixels(order_image: np.ndarray, order_table: OrderTable, binx: int, biny: int,
                 params: TraceParameters, margin: int) -> np.ndarray:
    """Pixels that :func:`detect_continuum`'s slices of each order cover, and the ``margin``
    rows (along the dispersion) either side: what a sky model made only to trace the object
    must describe.

    Parameters
    ----------
    order_image : ndarray of int
        Order number of each pixel of the (binned) frame, 0 outside the orders.
    order_table : OrderTable
    binx, biny : int
    params : TraceParameters
        Its ``order_sample_count`` and ``slice_width`` place the slices.
    margin : int
        Rows added on each side of every slice.

    Returns
    -------
    ndarray of bool
        Frame-shaped.
    """
    order_image = np.asarray(order_image)
    n_along, _, bin_along, _ = order_table.image_axes(order_image.shape, binx, biny)
    orders = [int(n) for n in order_table.orders if n > 0]
    top = max(orders + [int(order_image.max(initial=0))]) + 1
    wanted = np.zeros((top, n_along), bool)      # [order, along index]
    width = int(params.slice_width)
    reach = np.arange(-(width // 2) - margin, width - width // 2 + margin)
    for n in orders:
        rows = _sample_rows(order_table, n, params.order_sample_count, n_along, bin_along,
                            width)
        covered = (rows[:, None] + reach[None, :]).ravel()
        wanted[n, covered[(covered >= 0) & (covered < n_along)]] = True
    wanted[0] = False
    labels = np.clip(order_image, 0, top - 1).astype(np.intp)
    if order_table.dispersion_axis == "y":
        return wanted[labels, np.arange(order_image.shape[0])[:, None]]
    return wanted[labels, np.arange(order_image.shape[1])[None, :]]


def _collapse(view: np.ndarray, err: np.ndarray, bad: np.ndarray, rows: np.ndarray,
              starts: np.ndarray, length: int, width: int, lower: np.ndarray,
              upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median over ``width`` rows of each cut, masked pixels and columns outside
    ``[lower, upper]`` (binned across indices, per cut) ignored, and its error: the median of
    n values has ~sqrt(pi / 2) / sqrt(n) of their (median) error."""
    n_along, n_across = view.shape
    half = width // 2
    dr = np.arange(width) - half
    dc = np.arange(length)
    rr = rows[:, None, None] + dr[None, :, None]
    cc = starts[:, None, None] + dc[None, None, :]
    inside = (cc >= 0) & (cc < n_across) & (rr >= 0) & (rr < n_along)
    inside &= (cc >= lower[:, None, None]) & (cc <= upper[:, None, None])
    rr_c = np.clip(rr, 0, n_along - 1)
    cc_c = np.clip(cc, 0, n_across - 1)
    vals = view[rr_c, cc_c].astype(float)
    errs = err[rr_c, cc_c].astype(float)
    ok = inside & ~bad[rr_c, cc_c] & np.isfinite(vals) & np.isfinite(errs) & (errs > 0)
    vals[~ok] = np.nan
    errs[~ok] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prof = np.nanmedian(vals, axis=1)
        perr = np.nanmedian(errs, axis=1)
    # a column needs more than half of its slice rows: a median of one pixel is a cosmic
    need = max(1, (width + 1) // 2)
    count = ok.sum(axis=1)
    valid = np.isfinite(prof) & np.isfinite(perr) & (count >= need)
    perr = 1.2533 * perr / np.sqrt(np.maximum(count, 1))
    return np.where(valid, prof, np.nan), np.where(valid, perr, np.nan), valid


def _cut_windows(table: OrderTable, order: np.ndarray, rows: np.ndarray, centre_b: np.ndarray,
                 half: np.ndarray, bin_along: int, bin_across: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First column and the allowed across range (binned) of each cut."""
    start = np.rint(centre_b - half).astype(int)
    lower = np.full(order.size, -10**9)
    upper = np.full(order.size, 10**9)
    lower = np.maximum(lower, start)
    upper = np.minimum(upper, np.rint(centre_b + half).astype(int))
    if table.has_edges:
        b = to_unbinned(rows, bin_along)
        lo = to_binned(table.edge_low(order.astype(float), b), bin_across)
        up = to_binned(table.edge_up(order.astype(float), b), bin_across)
        lower = np.maximum(lower, np.ceil(lo).astype(int))
        upper = np.minimum(upper, np.floor(up).astype(int))
    return start, lower, upper


def _measure(view, err, bad, table, order, rows, centre_b, half, length, params, bin_along,
             bin_across):
    start, lower, upper = _cut_windows(table, order, rows, centre_b, half, bin_along,
                                       bin_across)
    prof, perr, valid = _collapse(view, err, bad, rows, start, length, params.slice_width,
                                  lower, upper)
    fit = fit_gaussians(prof, valid, perr)
    cols = np.arange(length)[None, :]
    vmin = np.where(valid, cols, length).min(axis=1)
    vmax = np.where(valid, cols, -1).max(axis=1)
    mu, sig, amp, noise = fit["centre"], fit["sigma"], fit["amplitude"], fit["noise"]
    span = (vmax - vmin + 1).astype(float)
    with np.errstate(invalid="ignore"):
        detected = (fit["ok"] & (amp > params.peak_sigma_limit * noise) & (noise > 0)
                    & (mu >= vmin) & (mu <= vmax) & (sig > MIN_SIGMA) & (sig < span / 2.0))
    across_b = start + mu
    return {"across_b": across_b, "sigma_b": sig, "amplitude": amp, "noise": noise,
            "centre_error_b": fit["centre_error"], "detected": detected,
            "profiles": prof, "valid": valid, "start": start}


# ---------------------------------------------------------------------------- the fit
def _fit_trace(order, b, a, weights, params: TraceParameters) -> PolynomialFit:
    return fit_order_polynomial(order, b, a, params.order_deg, params.disp_axis_deg,
                                params.poly_fitting_residual_clipping_sigma,
                                params.poly_clipping_iteration_limit, weights=weights)


def _min_detections(count: int, params: TraceParameters) -> int:
    return max(int(math.ceil(MIN_DETECTED_FRACTION * count)), params.disp_axis_deg + 2)


def _frame_name(image: DetectorImage, name: str | None) -> str:
    if name:
        return str(name)
    for key in ("ORIGFILE", "ARCFILE", "FILENAME"):
        value = image.header.get(key)
        if value:
            return str(value)
    return "the stare frame"


def detect_continuum(image: DetectorImage, order_table: OrderTable, binx: int, biny: int,
                     params: TraceParameters | None = None,
                     object_mask: np.ndarray | None = None, *, name: str | None = None
                     ) -> ObjectTrace:
    """Trace the object's continuum on a sky-subtracted stare frame.

    Parameters
    ----------
    image : DetectorImage
        Sky-subtracted (and background-subtracted) frame, binned, in the frame's orientation.
        Pixels with QUAL != 0 or a non-finite value are ignored.
    order_table : OrderTable
        Orders to trace (unbinned coordinates); with edges, the cuts stay between them.
    binx, biny : int
        Binning of the frame.
    params : TraceParameters, optional
        Default: :class:`TraceParameters` ().
    object_mask : ndarray of bool, optional
        Frame-shaped; True marks further pixels to ignore (e.g. those the sky fit rejected).
    name : str, optional
        Name of the frame in messages (default: its ORIGFILE/ARCFILE card).

    Returns
    -------
    ObjectTrace

    Raises
    ------
    InputError
        When no order has enough detections to be traced (the message names the frame), or
        the order table has no order on the frame.
    """
    params = params or TraceParameters()
    where = _frame_name(image, name)
    axis = order_table.dispersion_axis
    n_along, n_across, bin_along, bin_across = order_table.image_axes(image.shape, binx, biny)
    data = np.asarray(image.data)
    bad = (np.asarray(image.qual) != 0) | ~np.isfinite(data)
    if object_mask is not None:
        object_mask = np.asarray(object_mask, bool)
        if object_mask.shape != data.shape:
            raise ValueError(f"object_mask of shape {object_mask.shape} for a frame of shape "
                             f"{data.shape}")
        bad |= object_mask
    error = np.asarray(image.error)
    bad |= ~np.isfinite(error) | (error <= 0)
    view = data if axis == "y" else data.T
    err_v = error if axis == "y" else error.T
    bad_v = bad if axis == "y" else bad.T

    orders, rows = [], []
    for n in order_table.orders:
        r = _sample_rows(order_table, int(n), params.order_sample_count, n_along, bin_along,
                         params.slice_width)
        orders.append(np.full(r.size, int(n)))
        rows.append(r)
    order = np.concatenate(orders) if orders else np.zeros(0, int)
    row = np.concatenate(rows) if rows else np.zeros(0, int)
    if not order.size:
        raise InputError(f"{where}: no order of the order table lies on the frame "
                         f"({n_along} x {n_across} binned px along x across)")
    # the slice's along coordinate: the mean of its rows
    along_b = row + 0.5 * ((params.slice_width - 1) - 2 * (params.slice_width // 2))
    along_u = to_unbinned(along_b, bin_along)

    # pass 1: cuts centred on the order centres
    length = int(params.slice_length)
    cen_b = to_binned(order_table.centre(order.astype(float), along_u), bin_across)
    half = np.full(order.size, 0.5 * length)
    m1 = _measure(view, err_v, bad_v, order_table, order, row, cen_b, half, length + 1, params,
                  bin_along, bin_across)
    kept, dropped = _orders_with_detections(order, m1["detected"], params, where,
                                            order_table.orders)
    if not kept:
        raise InputError(f"{where}: no continuum detected in any order "
                         f"({int(np.count_nonzero(m1['detected']))} of {order.size} cuts): "
                         "no object trace")
    first = _fit_from(order, along_u, m1, kept, params, bin_across, where, cen_b,
                      order_table)

    # pass 2: cuts re-centred on the first trace, about ten trace sigmas wide
    use1 = first["use"]
    sig_med = float(np.nanmedian(m1["sigma_b"][use1])) if use1.any() else 2.0
    half2 = float(np.clip(REFINE_SIGMAS * sig_med, REFINE_MIN_HALF, 0.5 * length))
    in_first = np.isin(order, first["kept"])
    trace_b = np.where(in_first,
                       to_binned(first["fit"].polynomial(order.astype(float), along_u),
                                 bin_across), cen_b)
    length2 = int(2 * math.ceil(half2) + 1)
    m2 = _measure(view, err_v, bad_v, order_table, order, row, trace_b,
                  np.full(order.size, half2), length2, params, bin_along, bin_across)
    # with the trace and its width known, a "detection" far from the first trace or of
    # another width is a noise peak, a cosmic-ray residual or a sky-line residual: near the
    # faint ends of an order one of them, fitted with a small formal error, bends the
    # polynomial by pixels
    width1 = _fit_std(order[use1], along_u[use1], m1["sigma_b"][use1], first["fit"].degrees,
                      params)
    expect = np.where(in_first, width1(order.astype(float), along_u), sig_med)
    expect = np.where(np.isfinite(expect) & (expect > MIN_SIGMA), expect, sig_med)
    with np.errstate(invalid="ignore"):
        ratio = m2["sigma_b"] / expect
        offset = np.abs(m2["across_b"] - trace_b)
        m2["detected"] &= ((ratio > 1.0 / WIDTH_FACTOR) & (ratio < WIDTH_FACTOR)
                           & (offset < np.maximum(OFFSET_SIGMAS * expect, 1.0)))
    kept, dropped = _orders_with_detections(order, m2["detected"], params, where,
                                            order_table.orders, warn=True)
    if not kept:
        raise InputError(f"{where}: no continuum detected in any order on the second pass "
                         f"({int(np.count_nonzero(m2['detected']))} of {order.size} cuts): "
                         "no object trace")
    final = _fit_from(order, along_u, m2, kept, params, bin_across, where, cen_b,
                      order_table)
    fit = final["fit"]
    used = final["use"]
    dropped += [n for n in kept if n not in final["kept"]]
    kept = final["kept"]

    detected = m2["detected"]
    in_fit = np.isin(order, kept) & detected
    clipped = detected & ~used
    across_u = to_unbinned(m2["across_b"], bin_across)
    sigma_u = m2["sigma_b"] * bin_across
    residuals = np.full(order.size, np.nan)
    residuals[in_fit] = across_u[in_fit] - fit.polynomial(order[in_fit].astype(float),
                                                          along_u[in_fit])
    std_poly = _fit_std(order[used], along_u[used], sigma_u[used], fit.degrees, params,
                        order[~used & np.isin(order, kept)],
                        along_u[~used & np.isin(order, kept)])
    table = replace(order_table.subset(kept), centre=fit.polynomial, std=std_poly,
                    edge_up=None, edge_low=None, min_threshold=None, max_threshold=None,
                    header=_table_header(image), source="")
    if not table.n_across:
        table = replace(table, n_across=int(n_across * bin_across))
    detected_range = {}
    for n in kept:
        mine = used & (order == n)
        detected_range[int(n)] = (float(along_u[mine].min()), float(along_u[mine].max()))
    samples = TraceSamples(order=order, along=along_u, across=across_u, sigma=sigma_u,
                           amplitude=m2["amplitude"], noise=m2["noise"],
                           centre_error=m2["centre_error_b"] * bin_across, detected=detected,
                           clipped=clipped)
    qc = trace_qc(samples, residuals / bin_across, len(kept), axis)
    return ObjectTrace(table=table, samples=samples, qc=qc, residuals=residuals, binx=binx,
                       biny=biny, dropped_orders=dropped, detected_range=detected_range,
                       fit=fit, params=params)


def _orders_with_detections(order, detected, params, where, all_orders, warn=False
                            ) -> tuple[list[int], list[int]]:
    kept, dropped = [], []
    for n in all_orders:
        mine = order == n
        count = int(np.count_nonzero(mine))
        ndet = int(np.count_nonzero(detected & mine))
        if count and ndet >= _min_detections(count, params):
            kept.append(int(n))
        else:
            dropped.append(int(n))
            if warn:
                log.warning("%s: order %d: continuum detected in %d of %d cuts (at least %d "
                            "needed); the order is left out of the trace", where, int(n),
                            ndet, count, _min_detections(count, params))
    return kept, dropped


def _consistent(order: np.ndarray, offset: np.ndarray, error: np.ndarray,
                detected: np.ndarray) -> np.ndarray:
    """Detections whose offset from the order centre agrees with their neighbours'.

    The object sits at a slowly drifting slit position, so its offset from the order centre
    changes little from one cut to the next.  Each detection is compared with the running
    median of the offsets of the ``2 * NEIGHBOURS`` nearest detections of its order (itself
    left out) and rejected beyond ``OUTLIER_SIGMAS`` times its own centre error combined
    with the robust scatter of all such differences.  This catches the noise peaks that the
    global polynomial cannot: at an order's faint end one of them has the leverage to pull
    the fit onto itself, so that its residual no longer stands out.
    """
    diff = np.full(order.size, np.nan)
    for n in np.unique(order[detected]):
        idx = np.flatnonzero(detected & (order == n))  # cuts are placed in along order
        vals = offset[idx]
        if idx.size < 3:
            continue
        pad = np.concatenate([np.full(NEIGHBOURS, np.nan), vals, np.full(NEIGHBOURS, np.nan)])
        win = np.lib.stride_tricks.sliding_window_view(pad, 2 * NEIGHBOURS + 1).copy()
        win[:, NEIGHBOURS] = np.nan  # not itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            diff[idx] = vals - np.nanmedian(win, axis=1)
    ok = np.isfinite(diff)
    if np.count_nonzero(ok) < 3:
        return detected.copy()
    scale = 1.4826 * float(np.median(np.abs(diff[ok] - np.median(diff[ok]))))
    limit = OUTLIER_SIGMAS * np.hypot(np.nan_to_num(error, nan=np.inf), scale)
    keep = detected & (~ok | (np.abs(diff) <= limit))
    return keep


def _add(p: OrderPolynomial, q: OrderPolynomial) -> OrderPolynomial:
    """The sum of two polynomials of any degrees."""
    shape = tuple(max(a, b) for a, b in zip(p.coeffs.shape, q.coeffs.shape))
    out = np.zeros(shape)
    out[:p.coeffs.shape[0], :p.coeffs.shape[1]] += p.coeffs
    out[:q.coeffs.shape[0], :q.coeffs.shape[1]] += q.coeffs
    return OrderPolynomial(out)


def _anchors(order, along_u, offset_u, sel, kept) -> tuple[np.ndarray, ...]:
    """Pseudo-samples holding the trace's offset from the order centre across the stretches
    of an order without detections.

    Where more than ``ANCHOR_GAP`` cut spacings separate a cut from the nearest detection of
    its order (an order's faint ends, a deep absorption band), a pseudo-sample is put at that
    cut with the median offset of the ``ANCHOR_NEAREST`` nearest detections, weighted as a
    measurement of ``ANCHOR_ERROR`` px: the global polynomial then continues the object's
    slit position along the order instead of running away where nothing constrains it.
    """
    out_n, out_b, out_a = [], [], []
    for n in kept:
        mine = np.flatnonzero(order == n)
        det = mine[sel[mine]]
        if det.size < 2 or mine.size < 2:
            continue
        b_all, b_det = along_u[mine], along_u[det]
        step = float(np.median(np.diff(b_all)))
        dist = np.abs(b_all[:, None] - b_det[None, :])
        far = dist.min(axis=1) > ANCHOR_GAP * step
        if not far.any():
            continue
        nearest = np.argsort(dist[far], axis=1)[:, :ANCHOR_NEAREST]
        out_n.append(np.full(int(far.sum()), n))
        out_b.append(b_all[far])
        out_a.append(np.median(offset_u[det][nearest], axis=1))
    if not out_n:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    return np.concatenate(out_n), np.concatenate(out_b), np.concatenate(out_a)


def _fit_from(order, along_u, m, kept, params, bin_across, where, centre_b, table
              ) -> dict[str, Any]:
    """Global centre fit of the detected cuts of ``kept`` orders (those consistent with their
    neighbours, :func:`_consistent`); orders whose cuts the clipping mostly rejected are
    dropped and the fit redone."""
    kept = list(kept)
    consistent = _consistent(order, m["across_b"] - centre_b, m["centre_error_b"],
                             m["detected"])
    while True:
        sel = consistent & np.isin(order, kept)
        # errors below the median are taken as the median: a tight formal error is as
        # often a noise peak's as a bright sample's, and must not let one cut bend the fit
        raw = np.nan_to_num(m["centre_error_b"], nan=np.inf)
        floor = max(CENTRE_ERROR_FLOOR, float(np.median(raw[m["detected"]]))
                    if m["detected"].any() else CENTRE_ERROR_FLOOR)
        err = np.maximum(raw, floor)
        # the fit is of the offset from the order centre: the table already holds the
        # order's curvature, so where the object is too faint to be detected (an order's
        # ends) the trace follows the order instead of a free polynomial's extrapolation
        offset_u = to_unbinned(m["across_b"], bin_across) - table.centre(
            order.astype(float), along_u)
        idx = np.flatnonzero(sel)
        an_order, an_along, an_offset = _anchors(order, along_u, offset_u, sel, kept)
        try:
            fit = _fit_trace(np.concatenate([order[idx], an_order]),
                             np.concatenate([along_u[idx], an_along]),
                             np.concatenate([offset_u[idx], an_offset]),
                             np.concatenate([1.0 / err[idx],
                                             np.full(an_order.size, 1.0 / ANCHOR_ERROR)]),
                             params)
        except ValueError as exc:
            raise InputError(f"{where}: too few detections to fit the object trace "
                             f"({exc})") from None
        nreal = idx.size
        fit = replace(fit, used=fit.used[:nreal], residuals=fit.residuals[:nreal])
        fit = replace(fit, polynomial=_add(table.centre, fit.polynomial))
        use = np.zeros(order.size, bool)
        use[idx[fit.used]] = True
        pulls = np.full(order.size, np.nan)
        pulls[idx] = fit.residuals / bin_across / np.hypot(err[idx], RESIDUAL_FLOOR)
        low, incoherent = [], []
        for n in kept:
            mine = use & (order == n)
            if np.count_nonzero(mine) < _min_detections(int(np.count_nonzero(order == n)),
                                                        params):
                low.append(n)
            elif 1.4826 * np.median(np.abs(pulls[mine] - np.median(pulls[mine]))
                                    ) > COHERENCE_LIMIT:
                incoherent.append(n)
        if not (low or incoherent):
            return {"fit": fit, "use": use, "kept": kept}
        for n in low:
            log.warning("%s: order %d: the object trace fit rejected most of its "
                        "detections; the order is left out of the trace", where, n)
        for n in incoherent:
            log.warning("%s: order %d: its detections scatter far beyond their errors (no "
                        "continuum, noise peaks); the order is left out of the trace",
                        where, n)
        kept = [n for n in kept if n not in low and n not in incoherent]
        if not kept:
            raise InputError(f"{where}: no continuum detected in any order (no order has "
                             "detections that line up): no object trace")


def _fit_std(order, along, sigma, degrees, params: TraceParameters,
             all_order=None, all_along=None) -> OrderPolynomial:
    """Global fit of the Gaussian sigma (unbinned px): the centre fit's order degree, at most
    ``STD_ALONG_DEG`` along (the seeing changes slowly with wavelength; a higher degree only
    follows the noise of the faint cuts), anchored like the centre across the stretches of
    ``all_order``/``all_along`` (every cut) without detections."""
    if order.size == 0:
        return OrderPolynomial.constant(float("nan"))
    order, along, sigma = (np.asarray(v) for v in (order, along, sigma))
    weights = np.ones(order.size)
    if all_order is not None:
        cut_order = np.concatenate([order, all_order])
        cut_along = np.concatenate([along, all_along])
        values = np.concatenate([sigma, np.full(all_order.size, np.nan)])
        sel = np.concatenate([np.ones(order.size, bool), np.zeros(all_order.size, bool)])
        sort = np.lexsort((cut_along, cut_order))
        an_n, an_b, an_s = _anchors(cut_order[sort], cut_along[sort], values[sort],
                                    sel[sort], list(np.unique(order)))
        order, along, sigma = (np.concatenate([order, an_n]), np.concatenate([along, an_b]),
                               np.concatenate([sigma, an_s]))
        weights = np.concatenate([weights, np.full(an_n.size, 0.5)])
    try:
        fit = fit_order_polynomial(order, along, sigma, degrees[0],
                                   min(degrees[1], STD_ALONG_DEG),
                                   params.poly_fitting_residual_clipping_sigma,
                                   params.poly_clipping_iteration_limit, weights=weights)
        return fit.polynomial
    except ValueError:
        return OrderPolynomial.constant(float(np.median(sigma)))


def _table_header(image: DetectorImage) -> dict[str, Any]:
    out = {}
    for key in ("MJD-OBS", "DATE-OBS", "EXPTIME", "ESO SEQ ARM", "INSTRUME", "OBJECT"):
        value = image.header.get(key)
        if value is not None:
            out[key] = (value, image.header.comment(key))
    return out


def trace_qc(samples: TraceSamples, residuals_binned: np.ndarray, n_orders: int,
             dispersion_axis: str) -> QcMeasurements:
    """Seed table 80's object-trace QC values.

    N ORDERS: orders in the trace.  SAMPLES TOT NUM: cuts placed on every order of the order
    table; SAMPLES DET NUM / FRAC: cuts detected (of the total); SAMPLES CLIP NUM / FRAC:
    detected cuts not used by the final fit, clipped or in an order left out (of the
    detected).  X RES MIN / MAX / SD (SOXS NIR, dispersion along x: Y RES ...): minimum,
    maximum and standard deviation of the signed residuals (px of the frame) of the cuts
    used by the final fit.
    """
    qc = QcMeasurements()
    qc.add("N ORDERS", int(n_orders))
    tot = len(samples)
    det = int(np.count_nonzero(samples.detected))
    clip = int(np.count_nonzero(samples.clipped))
    qc.add("SAMPLES TOT NUM", tot)
    qc.add("SAMPLES DET NUM", det)
    qc.add("SAMPLES DET FRAC", det / tot if tot else None, "no cut was placed")
    qc.add("SAMPLES CLIP NUM", clip)
    qc.add("SAMPLES CLIP FRAC", clip / det if det else None, "no cut was detected")
    res_axis = "X" if dispersion_axis == "y" else "Y"
    r = np.asarray(residuals_binned)[samples.used]
    r = r[np.isfinite(r)]
    names = [f"{res_axis} RES MIN", f"{res_axis} RES MAX", f"{res_axis} RES SD"]
    if r.size:
        for qc_name, value in zip(names, (r.min(), r.max(), np.std(r))):
            qc.add(qc_name, float(value))
    else:
        for qc_name in names:
            qc.omit(qc_name, "no cut entered the trace fit")
    return qc


# ---------------------------------------------------------------------------- evaluation
def trace_centre_binned(trace_table: OrderTable, order: int, rows_binned, binx: int,
                        biny: int) -> np.ndarray:
    """Across position (binned px of the frame) of the object trace of ``order`` at binned
    along-order indices ``rows_binned`` (rows for a dispersion along y, columns for SOXS
    NIR)."""
    if trace_table.dispersion_axis == "y":
        bin_along, bin_across = biny, binx
    else:
        bin_along, bin_across = binx, biny
    b = to_unbinned(np.asarray(rows_binned, float), bin_along)
    return to_binned(trace_table.centre(float(order), b), bin_across)


# ---------------------------------------------------------------------------- plot
#: Longest side (display pixels) of the block-averaged frame in the plot.
MAX_DISPLAY = 800
#: Orders shown straightened along their trace.
MAX_STRIPS = 6


def _stretch(img: np.ndarray) -> np.ndarray:
    finite = img[np.isfinite(img)]
    if finite.size:
        lo, hi = np.percentile(finite, [5.0, 99.7])
        scale = max((hi - lo) / 30.0, 1e-12)
        img = np.arcsinh((np.clip(img, lo, hi) - lo) / scale)
    return np.nan_to_num(img)


def render_object_trace(image: DetectorImage, trace: ObjectTrace, title: str = ""):
    """The OBJECT TRACE RES figure (a matplotlib ``Figure``, not saved).

    Panels: the frame with the fitted trace of every order and the detected cuts (clipped ones
    as crosses); a few orders straightened along the fitted trace (the object must lie on the
    dashed line); the residuals against the along-order position and against the order, with
    the QC values.
    """
    import matplotlib

    from soxs_core.combine.qc import good_block_mean
    from soxs_core.io.figures import few_ticks, new_figure

    table, s = trace.table, trace.samples
    binx, biny = trace.binx, trace.biny
    along_y = table.dispersion_axis == "y"
    data = np.asarray(image.data, np.float32)
    rows, cols = data.shape
    n_along, n_across, bin_along, bin_across = table.image_axes(data.shape, binx, biny)
    block = max(1, int(math.ceil(max(rows, cols) / MAX_DISPLAY)))
    # the good pixels' block means in one kernel pass (no masked copy of the frame)
    shown = _stretch(good_block_mean(data, image.qual, block, threads=2))
    good = np.asarray(image.qual) == 0
    extent = (-0.5, cols * binx - 0.5, -0.5, rows * biny - 0.5)

    fig = new_figure(14, 10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.06, top=0.92, wspace=0.25, hspace=0.4)
    grid = fig.add_gridspec(3, 3, width_ratios=[1.1, 1.2, 1.2])
    ax_det = fig.add_subplot(grid[:, 0])
    ax_strip = fig.add_subplot(grid[0, 1:])
    ax_res = fig.add_subplot(grid[1, 1:])
    ax_ord = fig.add_subplot(grid[2, 1])
    ax_sig = fig.add_subplot(grid[2, 2])

    def xy(a, b):
        return (a, b) if along_y else (b, a)

    ax_det.imshow(shown, origin="lower", cmap="gray", extent=extent, aspect="auto",
                  interpolation="nearest")
    ax_det.set_xlim(extent[0], extent[1])
    ax_det.set_ylim(extent[2], extent[3])
    ax_det.set_xlabel("x [unbinned px]")
    ax_det.set_ylabel("y [unbinned px]")
    used, clipped = s.used, s.clipped
    ax_det.plot(*xy(s.across[used], s.along[used]), ".", ms=2, color="tab:green",
                label=f"detected ({int(used.sum())})")
    if clipped.any():
        ax_det.plot(*xy(s.across[clipped], s.along[clipped]), "x", ms=4, color="tab:red",
                    mew=0.8, label=f"clipped ({int(clipped.sum())})")
    cmap = matplotlib.colormaps["viridis"]
    norders = max(len(table.orders), 1)
    colours = {int(n): cmap(k / max(norders - 1, 1)) for k, n in enumerate(table.orders)}
    for n in table.orders:
        b0, b1 = table.along_range(int(n))
        b = np.linspace(b0, b1, 200)
        ax_det.plot(*xy(table.centre(float(n), b), b), "-", lw=0.8, color=colours[int(n)])
        mid = 0.5 * (b0 + b1)
        ax_det.text(*xy(float(table.centre(float(n), mid)), mid), f" {int(n)}", fontsize=7,
                    color="yellow", ha="left", va="center")
    # zoom across onto the traced orders (a subset of the orders is a thin band otherwise)
    lo_hi = [table.centre(float(n), np.linspace(*table.along_range(int(n)), 50))
             for n in table.orders]
    if lo_hi:
        a0, a1 = float(np.min(lo_hi)), float(np.max(lo_hi))
        full = (extent[0], extent[1]) if along_y else (extent[2], extent[3])
        pad = max(60.0, 0.08 * (full[1] - full[0]))
        lim = (max(full[0], a0 - pad), min(full[1], a1 + pad))
        (ax_det.set_xlim if along_y else ax_det.set_ylim)(*lim)
    ax_det.plot([], [], "-", color="tab:blue", label="fitted trace")
    if trace.dropped_orders:
        ax_det.plot([], [], " ", label="not traced: "
                    + ", ".join(str(n) for n in trace.dropped_orders))
    ax_det.legend(loc="upper right", fontsize=7, framealpha=0.85, markerscale=2)
    ax_det.set_title("frame, detected cuts and the object trace", fontsize=10, y=1.0)

    # straightened strips: each order resampled along its fitted trace
    strip_orders = list(table.orders)
    if len(strip_orders) > MAX_STRIPS:
        pick = np.rint(np.linspace(0, len(strip_orders) - 1, MAX_STRIPS)).astype(int)
        strip_orders = [strip_orders[i] for i in pick]
    half = max(6, int(math.ceil(REFINE_SIGMAS * float(np.nanmedian(s.sigma[used]) if used.any()
                                                      else 2.0) / bin_across)))
    view = data if along_y else data.T
    gview = good if along_y else good.T
    strips, labels = [], []
    nbins = 400
    for n in strip_orders:
        b0, b1 = table.along_range(int(n))
        i0 = max(int(math.ceil(float(to_binned(b0, bin_along)))), 0)
        i1 = min(int(math.floor(float(to_binned(b1, bin_along)))), n_along - 1)
        ib = np.arange(i0, i1 + 1)
        centre = trace_centre_binned(table, int(n), ib, binx, biny)
        cc = np.rint(centre).astype(int)[:, None] + np.arange(-half, half + 1)[None, :]
        inside = (cc >= 0) & (cc < n_across)
        vals = np.where(inside & gview[ib[:, None], np.clip(cc, 0, n_across - 1)],
                        view[ib[:, None], np.clip(cc, 0, n_across - 1)], np.nan)
        # along-order bins so that every order gets the same display width (a median: the
        # cosmic rays of the frame would dominate a mean)
        per = max(1, ib.size // nbins)
        use_rows = min(ib.size, per * nbins)
        blocks = vals[:use_rows].reshape(-1, per, vals.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            binned = np.nanmedian(blocks, axis=1)
            finite = binned[np.isfinite(binned)]
            peak = float(np.percentile(finite, 99)) if finite.size else 1.0
        strips.append(binned.T / (peak if peak > 0 else 1.0))
        labels.append(int(n))
    if strips:
        width = min(st.shape[1] for st in strips)
        strips = [st[:, :width] for st in strips]
        gap = np.full((2, width), np.nan)
        stack = np.vstack([x for st in strips for x in (st, gap)][:-1])
        ax_strip.imshow(np.clip(np.nan_to_num(stack, nan=0.0), -0.2, 1.0), origin="lower",
                        aspect="auto", cmap="magma", interpolation="nearest",
                        extent=(0, 1, 0, stack.shape[0]))
        step = 2 * half + 1 + 2
        for k, n in enumerate(labels):
            ax_strip.axhline(k * step + half + 0.5, color="cyan", lw=0.6, ls="--")
            ax_strip.text(0.003, k * step + half + 0.5, f"order {n}", color="white",
                          fontsize=7, va="center")
        ax_strip.set_yticks([])
        ax_strip.set_xlabel("fraction of the order's length")
    ax_strip.set_title(f"orders straightened along the fitted trace (±{half} px; dashed: "
                       "the trace)", fontsize=10, y=1.0)

    res_axis = "X" if along_y else "Y"
    res_b = trace.residuals / bin_across
    qc = trace.qc.values
    for n in table.orders:
        mine = used & (s.order == n)
        ax_res.plot(s.along[mine], res_b[mine], ".", ms=2.5, color=colours[int(n)])
    if clipped.any():
        ok = clipped & np.isfinite(res_b)
        ax_res.plot(s.along[ok], res_b[ok], "x", ms=3, color="tab:red", mew=0.6,
                    label="clipped")
    r_used = res_b[used]
    lim = max(0.3, 1.3 * float(np.nanmax(np.abs(r_used)))) if r_used.size else 1.0
    ax_res.set_ylim(-lim, lim)
    ax_res.axhline(0.0, color="0.5", lw=0.6)
    ax_res.set_xlabel(f"along-order position {table.along} [unbinned px]")
    ax_res.set_ylabel(f"measured - fit [{res_axis}, frame px]")
    summary = (f"{res_axis} RES SD {qc.get(f'{res_axis} RES SD', float('nan')):.3f} px, "
               f"MIN {qc.get(f'{res_axis} RES MIN', float('nan')):.2f}, "
               f"MAX {qc.get(f'{res_axis} RES MAX', float('nan')):.2f}  |  detected "
               f"{qc.get('SAMPLES DET NUM', 0)}/{qc.get('SAMPLES TOT NUM', 0)} "
               f"({qc.get('SAMPLES DET FRAC', float('nan')):.0%}), clipped "
               f"{qc.get('SAMPLES CLIP NUM', 0)} "
               f"({qc.get('SAMPLES CLIP FRAC', float('nan')):.0%})")
    ax_res.set_title(summary, fontsize=9, y=1.0)
    if clipped.any():
        ax_res.legend(loc="upper right", fontsize=7)

    per_rms, per_n, per_sig = [], [], []
    for n in table.orders:
        mine = used & (s.order == n)
        ax_ord.plot(np.full(int(mine.sum()), float(n)), res_b[mine], "_", ms=4,
                    color=colours[int(n)], alpha=0.5)
        per_rms.append(float(np.sqrt(np.mean(res_b[mine] ** 2))) if mine.any() else np.nan)
        per_n.append(int(n))
        per_sig.append(float(np.median(s.sigma[mine])) / bin_across if mine.any() else np.nan)
    ax_ord.plot(per_n, per_rms, "o-", color="k", ms=3, lw=0.8, label="rms per order")
    ax_ord.plot(per_n, [-v for v in per_rms], "o-", color="k", ms=3, lw=0.8)
    ax_ord.set_ylim(-lim, lim)
    ax_ord.axhline(0.0, color="0.5", lw=0.6)
    ax_ord.set_xlabel("order")
    ax_ord.set_xticks(per_n)
    ax_ord.set_xlim(min(per_n) - 0.7, max(per_n) + 0.7)
    ax_ord.set_ylabel(f"residual [{res_axis}, frame px]")
    ax_ord.legend(loc="upper right", fontsize=7)
    ax_ord.set_title(f"residuals per order ({qc.get('N ORDERS', 0)} traced)", fontsize=10, y=1.0)

    for n in table.orders:
        mine = used & (s.order == n)
        ax_sig.plot(s.along[mine], s.sigma[mine] / bin_across, ".", ms=2,
                    color=colours[int(n)])
        if table.std is not None:
            b0, b1 = table.along_range(int(n))
            b = np.linspace(b0, b1, 100)
            ax_sig.plot(b, table.std(float(n), b) / bin_across, "-", lw=0.8,
                        color=colours[int(n)])
    ax_sig.set_xlabel(f"along-order position {table.along} [unbinned px]")
    ax_sig.set_ylabel("Gaussian sigma [frame px]")
    ax_sig.set_title("trace width: cuts and global fit", fontsize=10, y=1.0)
    if used.any():
        sv = s.sigma[used] / bin_across
        lo, hi = np.percentile(sv, [1, 99])
        ax_sig.set_ylim(max(0.0, lo - 0.3 * (hi - lo) - 0.1), hi + 0.3 * (hi - lo) + 0.1)

    few_ticks(ax_det, ax_res, ax_sig, x=5, y=5, labelsize=8)
    ax_strip.tick_params(labelsize=8)
    ax_ord.tick_params(labelsize=8)
    head = "OBJECT TRACE RES"
    fig.suptitle(f"{head}: {title}" if title else head, fontsize=12)
    return fig


def plot_object_trace(path: str | os.PathLike, image: DetectorImage, trace: ObjectTrace,
                      title: str = "") -> Path:
    """Write the OBJECT TRACE RES plot (PDF) atomically; see :func:`render_object_trace`.

    Raises
    ------
    OSError
        When the file cannot be written.
    """
    from soxs_core.io.safety import save_figure

    return save_figure(render_object_trace(image, trace, title), path, format="pdf", dpi=100)
