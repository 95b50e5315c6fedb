"""Order tracing above the edge kernel: self-tracing of a flat and the global edge fit.

Two jobs live here.

* :func:`trace_orders` finds every order visible in a 2-D flat without any order table:
  cross-dispersion cuts at many positions along the dispersion, one peak per order in each
  cut (slit-wide plateaus as in SOXS / X-shooter flats, or the narrow ridges of fibre-fed
  echelles), peaks linked into traces along the dispersion, and one global polynomial of the
  centres in (order number, along-order pixel).  Orders are numbered 1, 2, ... from the bottom
  of the cross-dispersion axis, or, when the arm is known, with their true echelle numbers by
  matching the traces to the positions the static single-pinhole table predicts (allowing a
  global shift of the instrument).
* :func:`fit_order_edges` fits the upper and lower edges measured per slice
  (:func:`soxs_core.echelle.edges.measure_order_edges`) with a clipped global polynomial each,
  *as measured*: the slit image's width changes along every order, so no constant width about
  the centre is imposed.

Every coordinate handed out is in the unbinned pixel grid (see
:mod:`soxs_core.echelle.ordertable`); ``B`` is along the orders, ``A`` across them.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from soxs_core.echelle.ordertable import OrderTable, to_unbinned
from soxs_core.echelle.polynomial import MAX_DEGREE, OrderPolynomial, fit_order_polynomial
from soxs_core.errors import InputError
from soxs_core.io.products import QcMeasurements

__all__ = [
    "EdgeFitReport", "fit_order_edges", "trace_orders", "TraceReport", "find_cut_peaks",
    "predicted_order_centres", "assign_order_numbers", "PINHOLE_TABLES", "plot_order_edges",
    "half_level_edges",
]

log = logging.getLogger("soxs.tracing")

#: Static single-pinhole line tables (slit-centre positions predicted by the instrument
#: models) used to give self-traced orders their echelle numbers; unbinned prepared pixels.
PINHOLE_TABLES = {
    "xsh_uvb": "THEO_TAB_SING_UVB_1x1.fits",
    "xsh_vis": "THEO_TAB_SING_VIS_1x1.fits",
    "xsh_nir": "THEO_TAB_SING_NIR.fits",
    "soxs_vis": "SOXS_SPH_TAB_VIS_ThAr_1x1.fits",
    "soxs_nir": "SOXS_SPH_TAB_NIR_Xe.fits",
}

#: A peak of a cut counts as an order when it rises this many noise sigmas above the higher
#: of its two bases, ...
PEAK_SIGMA = 8.0
#: ... and the valley between it and a brighter neighbour is at least this fraction of its
#: height above the deeper valley beyond the pair (a bump of the illumination or the noise on
#: top of a plateau is not an order; a faint order beside a bright one, with a dark gap between
#: them, is), ...
PEAK_CONTRAST = 0.3
#: ... and its full width at half prominence, the smoothing removed in quadrature, is at least
#: this many binned pixels (a hot or bad column is one or two pixels wide; a cold one is
#: filled before the search, see :func:`find_cut_peaks`).
PEAK_MIN_WIDTH = 2.0
#: A trace must be detected in at least this fraction of the cuts between its ends.
MIN_DETECTED_FRACTION = 0.6
#: A cross-dispersed echelle stacks several orders across the detector: a peak of a cut wider
#: than this fraction of the frame across the orders is no order (the broad glow of a dark or
#: bias, a scattered-light dome).  An order fills at most 6 % of the frame across on every
#: simulated arm (SOXS VIS: 47 of 808 px) and 2 % on the lab echelle.
MAX_ORDER_FRACTION = 0.25


# =============================================================================================
# Global fit of the measured edges
# =============================================================================================
@dataclass
class EdgeFitReport:
    """What the global edge fits did, for QC, plots and the UVB stitching.

    Attributes
    ----------
    order, b : ndarray
        Order number and along-order position (unbinned px) of every edge sample.
    low, up : ndarray
        Measured lower / upper edge (cross-order, unbinned px; NaN where not detected).
    residual_low, residual_up : ndarray
        Measured minus fitted edge (NaN where not detected).
    used_low, used_up : ndarray of bool
        Samples kept by the clipping.
    sample_counts : dict
        ``{order: number of along-order positions whose upper and lower edges both entered
        the final fits}``: how well each order's edges are measured.
    degrees_up, degrees_low : tuple of int
        ``(order_deg, along_deg)`` actually fitted (capped to what the samples constrain).
    dropped_orders : list of int
        Orders of the centre table with too few edge samples to keep.
    qc : QcMeasurements
        ``X RES MIN``, ``X RES MAX``, ``X RES SD``: minimum, maximum and standard deviation of
        the absolute residuals of the used samples of both fits (INSTRUMENTS.md §7.1; named X
        whatever the dispersion axis).
    """

    order: np.ndarray
    b: np.ndarray
    low: np.ndarray
    up: np.ndarray
    residual_low: np.ndarray
    residual_up: np.ndarray
    used_low: np.ndarray
    used_up: np.ndarray
    sample_counts: dict[int, int]
    degrees_up: tuple[int, int]
    degrees_low: tuple[int, int]
    dropped_orders: list[int] = field(default_factory=list)
    qc: QcMeasurements = field(default_factory=QcMeasurements)

    @property
    def rms(self) -> float:
        """rms (px) of the used residuals of both edges."""
        r = np.concatenate([self.residual_up[self.used_up], self.residual_low[self.used_low]])
        return float(np.sqrt(np.mean(r * r))) if r.size else float("nan")


def _capped_degrees(order: np.ndarray, b: np.ndarray, order_deg: int, along_deg: int
                    ) -> tuple[int, int]:
    """Degrees no higher than the samples of one edge can constrain.

    The order degree needs that many + 1 distinct orders; the along-order degree that many + 1
    distinct positions in the best-sampled order, and the whole fit at least twice as many
    samples as coefficients (else the clipping has nothing to judge by).
    """
    orders = np.unique(order)
    order_deg = max(0, min(int(order_deg), orders.size - 1, MAX_DEGREE))
    per_order = max((np.unique(b[order == n]).size for n in orders), default=0)
    along_deg = max(0, min(int(along_deg), per_order - 1, MAX_DEGREE))
    while (order_deg + 1) * (along_deg + 1) * 2 > order.size and (order_deg or along_deg):
        if along_deg >= order_deg and along_deg > 0:
            along_deg -= 1
        else:
            order_deg -= 1
    return order_deg, along_deg


def _sum_polynomials(first: OrderPolynomial, second: OrderPolynomial) -> OrderPolynomial:
    """``first + second`` as one polynomial (degrees: the larger of each)."""
    shape = tuple(max(a, b) for a, b in zip(first.coeffs.shape, second.coeffs.shape))
    total = np.zeros(shape)
    for poly in (first, second):
        total[:poly.coeffs.shape[0], :poly.coeffs.shape[1]] += poly.coeffs
    return OrderPolynomial(total)


def _sample_arrays(samples: Any) -> tuple[np.ndarray, ...]:
    try:
        order = np.asarray(samples.order, float).ravel()
        b = np.asarray(samples.b, float).ravel()
        low = np.asarray(samples.low, float).ravel()
        up = np.asarray(samples.up, float).ravel()
    except AttributeError as exc:
        raise TypeError(f"edge samples need order, b, low and up arrays ({exc})") from None
    if not (order.size == b.size == low.size == up.size):
        raise ValueError("edge samples: order, b, low and up differ in length")
    return order, b, low, up


def _robust_scale(r: np.ndarray) -> float:
    """1.4826 MAD about the median (0 for fewer than two values)."""
    r = r[np.isfinite(r)]
    return float(1.4826 * np.median(np.abs(r - np.median(r)))) if r.size > 1 else 0.0


def _measured_extent(b: np.ndarray, res_up: np.ndarray, res_low: np.ndarray,
                     used: np.ndarray, scales: tuple[float, float], clip_sigma: float,
                     half_window: int = 4) -> tuple[float, float]:
    """First and last along-order position of one order where its edges are measured.

    The global clipping judges every sample by one scale, set by the bright orders; where an
    order fades (the blue end of a UVB order, the ends of the blaze) its edges are measured
    with more noise and are clipped although they agree with the fit as well as their noise
    allows.  So the extent starts from the samples used by both fits and grows outwards over
    samples with both edges detected whose residuals are within ``clip_sigma`` of the local
    scale (robust, over the ``2 half_window + 1`` nearest detected samples, never below the
    clipping's scale), stepping over single misses: a gross outlier, or a stretch where the
    edges were not detected, ends it.
    """
    srt = np.argsort(b)
    b, res_up, res_low, used = b[srt], res_up[srt], res_low[srt], used[srt]
    detected = np.flatnonzero(np.isfinite(res_up) & np.isfinite(res_low))
    agree = np.zeros(b.size, bool)
    if detected.size:
        # the windows of nearest detected samples, as rows (NaN beyond the ends)
        j = np.arange(detected.size)[:, None] + np.arange(-half_window, half_window + 1)
        inside = (j >= 0) & (j < detected.size)
        win = detected[np.clip(j, 0, detected.size - 1)]
        both = np.where(np.concatenate([inside, inside], axis=1),
                        np.concatenate([res_up[win], res_low[win]], axis=1), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = np.abs(both - np.nanmedian(both, axis=1)[:, None])
            local = 1.4826 * np.nanmedian(dev, axis=1)
        local = np.where(np.count_nonzero(np.isfinite(both), axis=1) > 1, local, 0.0)
        agree[detected] = ((np.abs(res_up[detected]) <= clip_sigma * np.maximum(local,
                                                                                 scales[0]))
                           & (np.abs(res_low[detected]) <= clip_sigma
                              * np.maximum(local, scales[1])))
    agree |= used
    u = np.flatnonzero(used)
    ends = []
    for start, step in ((int(u[0]), -1), (int(u[-1]), +1)):
        end, k, misses = start, start, 0
        while 0 <= k + step < b.size and misses <= 1:
            k += step
            if agree[k]:
                end, misses = k, 0
            else:
                misses += 1
        ends.append(float(b[end]))
    return ends[0], ends[1]


def fit_order_edges(samples: Any, centre_table: OrderTable, order_deg: int, along_deg: int,
                    clip_sigma: float, max_iterations: int,
                    min_samples: int = 5) -> tuple[OrderTable, EdgeFitReport]:
    """Fit the measured upper and lower order edges with one clipped global polynomial each.

    Each edge is fitted as measured, as its distance from the order centre: a global
    polynomial of ``order_deg`` x ``along_deg`` in (order, along-order pixel), clipped, added
    to the centre polynomial (the table then holds centre + distance as one polynomial, of
    the larger degrees).  The slit image's width may change along and across the orders.

    Parameters
    ----------
    samples : EdgeSamples
        Per-slice edge detections with arrays ``order``, ``b``, ``low``, ``up`` (unbinned px;
        NaN where an edge was not found), as :func:`soxs_core.echelle.edges.measure_order_edges`
        returns.  Optional per-order ``min_threshold``/``max_threshold`` arrays (aligned with
        ``centre_table.orders``) are copied into the table.
    centre_table : OrderTable
        The order centres (their table, or a self-traced one); its centre polynomial, axes and
        header are kept.
    order_deg, along_deg : int
        Degrees in order number and along-order pixel (``order-deg``, ``disp-axis-deg``);
        each is lowered to what the samples can constrain.
    clip_sigma : float
        ``poly-fitting-residual-clipping-sigma``.
    max_iterations : int
        ``poly-clipping-iteration-limit``.
    min_samples : int
        An order keeps its row only with at least this many positions where both edges were
        used (fewer cannot show the order's length).

    Returns
    -------
    table : OrderTable
        ``centre_table`` restricted to the orders with edges, with ``edge_up``/``edge_low`` and
        each order's along-order range where its edges were measured: the samples used by
        both fits, grown over detected samples that agree with the fits within their local
        noise (see :func:`_measured_extent`), extended by half the local sample spacing,
        within the frame's extent of the samples.
    report : EdgeFitReport

    Raises
    ------
    InputError
        When there are too few edge samples to fit (no usable order).
    """
    order, b, low, up = _sample_arrays(samples)
    known = np.isin(order, centre_table.orders)
    where = centre_table.source or "the flat"
    fits = {}
    for name, values in (("up", up), ("low", low)):
        good = known & np.isfinite(values) & np.isfinite(b)
        if np.count_nonzero(good) < 2:
            which = "upper" if name == "up" else "lower"
            raise InputError(f"{where}: no {which} order edge detected "
                             f"({np.count_nonzero(good)} samples): cannot fit the order edges")
        degrees = _capped_degrees(order[good], b[good], order_deg, along_deg)
        # the edge's distance from the order centre is what is fitted with the recipe's
        # degrees, so that the centre polynomial (its own table's degrees) carries the order's
        # curvature and the edge polynomial adds the slit image's changing width
        baseline = centre_table.centre(order[good], b[good])
        fit = fit_order_polynomial(order[good], b[good], values[good] - baseline,
                                   degrees[0], degrees[1], clip_sigma, max_iterations)
        fit.polynomial = _sum_polynomials(centre_table.centre, fit.polynomial)
        used = np.zeros(order.size, bool)
        used[good] = fit.used
        res = np.full(order.size, np.nan)
        res[good] = fit.residuals
        fits[name] = (fit, used, res)
    (fit_up, used_up, res_up), (fit_low, used_low, res_low) = fits["up"], fits["low"]
    both = used_up & used_low
    # the clipping's own scale of each edge: the floor of the local scales below
    scales = tuple(_robust_scale(r[u]) for r, u in ((res_up, used_up), (res_low, used_low)))
    keep, b_min, b_max, counts, dropped = [], [], [], {}, []
    for n in centre_table.orders:
        sel = both & (order == n)
        bs = np.unique(b[sel])
        counts[int(n)] = int(bs.size)
        if bs.size < min_samples:
            dropped.append(int(n))
            continue
        step = float(np.median(np.diff(bs))) if bs.size > 1 else 0.0
        mine = order == n
        lo_lim = float(np.nanmin(b[mine]))
        hi_lim = float(np.nanmax(b[mine]))
        first, last = _measured_extent(b[mine], res_up[mine], res_low[mine], both[mine],
                                       scales, clip_sigma)
        # half a sample step beyond the outermost detections, never beyond the positions
        # that were sampled for the order at all (the frame or the order's end)
        b_min.append(max(first - 0.5 * step, min(lo_lim, first)))
        b_max.append(min(last + 0.5 * step, max(hi_lim, last)))
        keep.append(int(n))
    if not keep:
        raise InputError(f"{where}: no order has {min_samples} positions with both edges "
                         "detected: cannot fit the order edges")
    table = centre_table.subset(keep)
    k_idx = [centre_table.index(n) for n in keep]

    def thresholds(name: str):
        values = getattr(samples, name, None)
        if values is None:
            return getattr(table, name)
        values = np.asarray(values, float)
        return values[k_idx] if values.size == centre_table.orders.size else None

    table = replace(table, b_min=np.asarray(b_min), b_max=np.asarray(b_max),
                    edge_up=fit_up.polynomial, edge_low=fit_low.polynomial,
                    min_threshold=thresholds("min_threshold"),
                    max_threshold=thresholds("max_threshold"))
    qc = QcMeasurements()
    absres = np.abs(np.concatenate([res_up[used_up], res_low[used_low]]))
    if absres.size:
        qc.add("X RES MIN", float(absres.min()))
        qc.add("X RES MAX", float(absres.max()))
        qc.add("X RES SD", float(np.std(absres)))
    else:
        for name in ("X RES MIN", "X RES MAX", "X RES SD"):
            qc.omit(name, "no edge sample survived the clipping")
    report = EdgeFitReport(order=order.astype(int), b=b, low=low, up=up,
                           residual_low=res_low, residual_up=res_up, used_low=used_low,
                           used_up=used_up, sample_counts=counts,
                           degrees_up=fit_up.degrees, degrees_low=fit_low.degrees,
                           dropped_orders=dropped, qc=qc)
    return table, report


def plot_order_edges(path, flux: np.ndarray, samples: Any, report: EdgeFitReport,
                     table: OrderTable, binning: tuple[int, int] = (1, 1), title: str = ""):
    """Write the ORDER LOC RES plot of an edge fit (PDF, atomically); the slices' centres
    come from ``samples``.  See :func:`soxs_core.echelle.plots.plot_order_edges`."""
    from soxs_core.echelle.plots import plot_order_edges as plot

    return plot(path, flux, table, report, binning, title, samples=samples)


# =============================================================================================
# Self-tracing
# =============================================================================================
@dataclass
class TraceReport:
    """Diagnostics of :func:`trace_orders` (for logs and plots).

    Attributes
    ----------
    order, b, a : ndarray
        Order number, along- and cross-order position (unbinned px) of every linked peak.
    used : ndarray of bool
        Peaks kept by the clipping of the global centre fit.
    residuals : ndarray
        Peak minus fitted centre (px).
    numbering : str
        How the orders were numbered (a sentence for the log).
    shift : float
        Cross-order shift (unbinned px) of the traces from the predicted positions (NaN when
        no format was used).
    widths : dict
        ``{order: median full width at half prominence (unbinned px)}``.
    missing : list of int
        Orders the format predicts on the detector that were not found.
    """

    order: np.ndarray
    b: np.ndarray
    a: np.ndarray
    used: np.ndarray
    residuals: np.ndarray
    numbering: str
    shift: float = float("nan")
    widths: dict[int, float] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def _oriented(flux: np.ndarray, qual: np.ndarray | None, dispersion_axis: str) -> np.ndarray:
    """float32 image indexed ``[B, A]`` (along, across) with bad pixels as NaN."""
    img = np.array(flux, dtype=np.float32, copy=True)
    if img.ndim != 2:
        raise InputError(f"a flat must be a 2-D image, this one has shape {img.shape}")
    if qual is not None:
        img[np.asarray(qual) != 0] = np.nan
    img[~np.isfinite(img)] = np.nan
    return img if dispersion_axis == "y" else img.T


def _fill_nan(profile: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(profile)
    if not bad.any():
        return profile
    if bad.all():
        return np.zeros_like(profile)
    idx = np.arange(profile.size)
    out = profile.copy()
    out[bad] = np.interp(idx[bad], idx[~bad], profile[~bad])
    return out


def _local_noise(profile: np.ndarray, window: int = 41) -> np.ndarray:
    """Per-pixel noise sigma of a profile from its first differences, in running windows.

    A running median of ``|d|`` (d the first difference) is insensitive to the few steep
    pixels at order edges; ``median |d| / (0.6745 sqrt 2)`` is sigma for white noise.
    """
    # scipy imported here, not at module load: every soxs-esorex run imports this module
    from scipy import ndimage

    d = np.abs(np.diff(profile))
    d = np.concatenate([d[:1], d])
    med = ndimage.median_filter(d, size=min(window, d.size), mode="nearest")
    floor = np.median(d) if np.median(d) > 0 else 1.0
    return np.maximum(med, 1e-3 * floor) / (0.6745 * np.sqrt(2.0))


@dataclass
class CutPeaks:
    """Orders found in one cross-dispersion cut (binned px along the cut): centre, width and
    height above the higher neighbouring valley, and the half-level crossings."""

    centre: np.ndarray
    width: np.ndarray
    height: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def empty(cls) -> CutPeaks:
        z = np.zeros(0)
        return cls(z, z, z, z, z)

    def narrower_than(self, width: float) -> CutPeaks:
        """The peaks narrower than ``width``."""
        k = self.width < width
        return CutPeaks(self.centre[k], self.width[k], self.height[k], self.left[k],
                        self.right[k])

    def merged_closer_than(self, distance: float) -> CutPeaks:
        """Peaks closer than ``distance`` joined into one (two orders cannot be closer than
        their width: two such peaks are one faint, noisy plateau)."""
        if self.centre.size < 2:
            return self
        groups = [[0]]
        for k in range(1, self.centre.size):
            if self.centre[k] - self.centre[groups[-1][-1]] < distance:
                groups[-1].append(k)
            else:
                groups.append([k])
        if len(groups) == self.centre.size:
            return self
        left = np.array([self.left[g[0]] for g in groups])
        right = np.array([self.right[g[-1]] for g in groups])
        height = np.array([self.height[g].max() for g in groups])
        return CutPeaks(0.5 * (left + right), right - left, height, left, right)


def _crossing(p: np.ndarray, start: int, level: float, step: int) -> float | None:
    """Where ``p`` first falls to ``level`` walking from ``start`` by ``step`` (+1/-1),
    interpolated; None when the walk reaches the profile's end (the order is cut by the
    frame)."""
    i, n = start, p.size
    while 0 <= i + step < n and p[i + step] > level:
        i += step
    if not 0 <= i + step < n:
        return None
    return float(i + step * (p[i] - level) / (p[i] - p[i + step]))


def _separate_orders(p: np.ndarray, peaks: np.ndarray, contrast: float) -> np.ndarray:
    """The candidate peaks that are distinct orders.

    Neighbouring candidates are joined (the lower one dropped), weakest pair first, while the
    valley between them is shallow: less than ``contrast`` of the lower peak's height above
    the deeper valley beyond the pair.  After each join the valleys beyond a pair reach
    further out, so the ripple or noise bumps along a plateau are all judged against the
    plateau's own height, not against each other, while a faint order beside a bright one
    keeps the dark gap between them.
    """
    pk = [int(v) for v in peaks]
    while len(pk) > 1:
        idx = np.asarray(pk)
        vv = np.array([np.min(p[a:b + 1]) for a, b in zip(idx[:-1], idx[1:])])
        outer = np.concatenate([[np.min(p[:idx[0] + 1])], vv, [np.min(p[idx[-1]:])]])
        lower = np.where(p[idx[:-1]] <= p[idx[1:]], np.arange(idx.size - 1),
                         np.arange(1, idx.size))
        top = p[idx[lower]]
        floor = np.minimum(outer[:-2], outer[2:])
        ratio = (top - vv) / np.maximum(top - floor, 1e-30)
        k = int(np.argmin(ratio))
        if ratio[k] >= contrast:
            break
        del pk[int(lower[k])]
    return np.asarray(pk, int)


def find_cut_peaks(profile: np.ndarray, smooth: float = 1.0, sigma: float = PEAK_SIGMA,
                   contrast: float = PEAK_CONTRAST, min_width: float = PEAK_MIN_WIDTH
                   ) -> CutPeaks:
    """Orders crossed by one cross-dispersion cut.

    Works alike for the narrow ridges of fibre-fed echelles, for slit-wide plateaus with
    ripple and noise on top (SOXS, X-shooter) and for a faint order beside a bright one:
    candidates are the maxima standing ``sigma`` noise sigmas above their bases; neighbours
    with a shallow valley between them are one order (see :func:`_separate_orders`); dips of
    one or two columns are filled; an order must have two edges and a finite width.

    Parameters
    ----------
    profile : ndarray
        The cut (median of a few rows), NaN where unknown.
    smooth : float
        Gaussian sigma (px) applied before the search.
    sigma, contrast, min_width
        See :data:`PEAK_SIGMA`, :data:`PEAK_CONTRAST`, :data:`PEAK_MIN_WIDTH`.

    Returns
    -------
    CutPeaks
        Centre of each order as the midpoint of its two half-prominence crossings (the middle
        of a plateau, the top of a ridge), its width there and its prominence.
    """
    from scipy import ndimage, signal  # not at module load (slow; every recipe imports us)

    raw = _fill_nan(np.asarray(profile, float))
    if raw.size < 5:
        return CutPeaks.empty()
    noise = _local_noise(raw)
    # a dip one or two columns wide (a cold column) is no gap between orders: filled by a
    # closing (which leaves ridges, plateaus and the gaps of >= 3 px between orders as they
    # are) so that it neither splits an order nor bounds a false one
    raw = ndimage.grey_closing(raw, size=3, mode="nearest")
    p = ndimage.gaussian_filter1d(raw, smooth, mode="nearest") if smooth > 0 else raw
    # the smoothing lowers white noise by this factor
    kernel = signal.windows.gaussian(int(8 * smooth) | 1, smooth) if smooth > 0 else np.ones(1)
    kernel /= kernel.sum()
    noise_s = noise * np.sqrt(np.sum(kernel ** 2))
    # the smoothing widens every feature: widths are judged with its FWHM removed in
    # quadrature (exact for Gaussian profiles; a one-column spike comes out ~0.8 px wide, a
    # two-column one ~1.5 px, a fibre ridge of sigma 1.3 px its true 3.1 px)
    blur2 = (2.3548 * smooth) ** 2 if smooth > 0 else 0.0
    peaks, props = signal.find_peaks(p, prominence=0.0)
    peaks = peaks[props["prominences"] >= sigma * noise_s[peaks]] if peaks.size else peaks
    peaks = _separate_orders(p, peaks, contrast)
    lefts, rights, heights = [], [], []
    for k, pk in enumerate(peaks):
        # valleys between this order and its neighbours (or the frame's ends)
        left_v = float(np.min(p[(peaks[k - 1] if k else 0):pk + 1]))
        right_v = float(np.min(p[pk:(peaks[k + 1] if k + 1 < peaks.size else p.size - 1) + 1]))
        top = p[pk]
        level = 0.5 * (top + max(left_v, right_v))
        # half-level crossings walking out from the peak; an order cut by the frame's end
        # has no edge there and is left out
        x_left = _crossing(p, int(pk), level, -1)
        x_right = _crossing(p, int(pk), level, +1)
        if x_left is None or x_right is None:
            continue
        if (x_right - x_left) ** 2 - blur2 < min_width ** 2:
            continue  # a hot column, not an order
        lefts.append(x_left)
        rights.append(x_right)
        heights.append(top - max(left_v, right_v))
    left, right = np.asarray(lefts, float), np.asarray(rights, float)
    return CutPeaks(0.5 * (left + right), right - left, np.asarray(heights, float), left, right)


def half_level_edges(flux: np.ndarray, qual: np.ndarray | None, dispersion_axis: str,
                     b: np.ndarray, centre: np.ndarray, slice_length: int, slice_width: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Order edges as the half-prominence crossings of slices (unbinned frame, px).

    The plain definition for any echelle flat: where the flux falls half-way from the order's
    top to the higher of its neighbouring valleys.  :mod:`soxs_core.echelle.edges` measures a
    sharp slit end more precisely; this serves slices where that finds no edge (orders with
    rounded, soft-edged profiles, as a defocused lab echelle has).

    Returns
    -------
    low, up : ndarray
        Per sample (NaN where the slice shows no order at its centre).
    """
    img = _oriented(flux, qual, dispersion_axis)
    n_along, n_across = img.shape
    low = np.full(np.size(b), np.nan)
    up = np.full(np.size(b), np.nan)
    hw, hl = slice_width // 2, slice_length // 2
    import warnings

    for k, (bb, cc) in enumerate(zip(np.asarray(b, float), np.asarray(centre, float))):
        i, c = int(round(bb)), int(round(cc))
        if i - hw < 0 or i + hw >= n_along or not 0 <= c < n_across:
            continue
        c0, c1 = max(0, c - hl), min(n_across, c + hl + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            prof = np.nanmedian(img[i - hw:i + hw + 1, c0:c1], axis=0)
        peaks = find_cut_peaks(prof, smooth=1.0)
        if not peaks.centre.size:
            continue
        j = int(np.argmin(np.abs(peaks.centre + c0 - cc)))
        if peaks.left[j] + c0 <= cc <= peaks.right[j] + c0:
            low[k], up[k] = peaks.left[j] + c0, peaks.right[j] + c0
    return low, up


@dataclass
class _Trace:
    b: list[float] = field(default_factory=list)
    a: list[float] = field(default_factory=list)
    w: list[float] = field(default_factory=list)
    misses: int = 0

    def predict(self, b: float) -> float:
        if len(self.b) < 2:
            return self.a[-1]
        bs, as_ = np.asarray(self.b[-4:]), np.asarray(self.a[-4:])
        deg = 1 if bs.size < 4 else 2
        return float(np.polyval(np.polyfit(bs - bs[-1], as_, deg), b - bs[-1]))


def _link(positions: np.ndarray, cuts: list[CutPeaks], start: int, max_misses: int = 3
          ) -> list[_Trace]:
    """Link the peaks of the cuts into traces, from cut ``start`` outwards both ways."""
    traces: list[_Trace] = []
    for direction in (+1, -1):
        active: list[_Trace] = []
        if direction == +1:
            for c, w in zip(cuts[start].centre, cuts[start].width):
                t = _Trace([positions[start]], [c], [w])
                traces.append(t)
                active.append(t)
            order = range(start + 1, len(cuts))
        else:
            # the traces seen at the start cut continue downwards: fresh objects (a trace
            # predicts from its latest points), joined to their upward halves at the end
            seeds = [t for t in traces if t.b[0] == positions[start]]
            active = [_Trace([t.b[0]], [t.a[0]], [t.w[0]]) for t in seeds]
            halves = list(zip(seeds, active))
            order = range(start - 1, -1, -1)
        for k in order:
            cut, bpos = cuts[k], positions[k]
            pred = np.array([t.predict(bpos) for t in active]) if active else np.zeros(0)
            taken = np.zeros(cut.centre.size, bool)
            if active and cut.centre.size:
                dist = np.abs(cut.centre[None, :] - pred[:, None])
                # a peak can join a trace only if closer than a third of the distance to
                # the trace's neighbours and than the order's width
                srt = np.sort(pred)
                gaps = np.diff(srt)
                for ti, t in enumerate(active):
                    pos = np.searchsorted(srt, pred[ti])
                    near = [g for g in (gaps[pos - 1] if pos - 1 < gaps.size and pos >= 1
                                        else None,
                                        gaps[pos] if pos < gaps.size else None) if g]
                    tol = min([max(1.5, 0.3 * g) for g in near] + [max(1.5, 0.5 * t.w[-1])])
                    j = int(np.argmin(dist[ti]))
                    mutual = int(np.argmin(dist[:, j])) == ti
                    if dist[ti, j] <= tol and mutual and not taken[j]:
                        t.b.append(bpos)
                        t.a.append(float(cut.centre[j]))
                        t.w.append(float(cut.width[j]))
                        t.misses = 0
                        taken[j] = True
                    else:
                        t.misses += 1
            else:
                for t in active:
                    t.misses += 1
            active = [t for t in active if t.misses <= max_misses]
            for j in np.flatnonzero(~taken):
                t = _Trace([bpos], [float(cut.centre[j])], [float(cut.width[j])])
                traces.append(t)
                active.append(t)
    for up, down in halves:
        up.b += down.b[1:]
        up.a += down.a[1:]
        up.w += down.w[1:]
    for t in traces:  # the downward pass appended in decreasing B
        srt = np.argsort(t.b)
        t.b = list(np.asarray(t.b)[srt])
        t.a = list(np.asarray(t.a)[srt])
        t.w = list(np.asarray(t.w)[srt])
    return traces


def _local_outliers(b: np.ndarray, a: np.ndarray, neighbours: int = 3,
                    floor: float = 1.0, sigma: float = 5.0) -> np.ndarray:
    """Points of one trace (sorted by ``b``) that stray from the line of their neighbours.

    Each point is compared with a quadratic through up to ``neighbours`` points on each side
    of it (itself left out), so that the order's curvature, however strong, is no outlier;
    a point is off when it is further than ``sigma`` robust deviations of these differences
    and than ``floor`` px.  (A cut where the trace caught part of an order at the frame's
    end is such a point: left in, the global fit bends to it and its clipping, judging every
    order by the others' hundredths of a pixel, then rejects the whole order.)

    Returns
    -------
    ndarray of bool
        True for the outliers.
    """
    m = b.size
    if m < 5:
        return np.zeros(m, bool)
    dev = np.zeros(m)
    for i in range(m):
        lo, hi = max(0, i - neighbours), min(m, i + neighbours + 1)
        k = np.r_[lo:i, i + 1:hi]
        deg = min(2, k.size - 1)
        coef = np.polyfit(b[k] - b[i], a[k], deg)
        dev[i] = a[i] - coef[-1]
    scale = 1.4826 * float(np.median(np.abs(dev - np.median(dev))))
    bad = np.abs(dev) > max(sigma * scale, floor)
    # an outlier also spoils the predictions of its neighbours: keep only the worst of a
    # run of flagged points unless they are far off on their own
    if bad.any():
        worst = np.zeros(m, bool)
        for i in np.flatnonzero(bad):
            lo, hi = max(0, i - neighbours), min(m, i + neighbours + 1)
            if np.abs(dev[i]) >= np.abs(dev[lo:hi][bad[lo:hi]]).max():
                worst[i] = True
        bad = worst
    return bad


def _trace_fit(t: _Trace):
    """Clipped polynomial ``A(B)`` of one trace (a callable, in a scaled basis)."""
    from numpy.polynomial import Polynomial

    b, a = np.asarray(t.b), np.asarray(t.a)
    deg = int(min(3, max(1, b.size // 5))) if b.size > 1 else 0
    keep = np.ones(b.size, bool)
    fit = Polynomial.fit(b, a, deg)
    for _ in range(3):
        r = a - fit(b)
        s = 1.4826 * np.median(np.abs(r[keep] - np.median(r[keep])))
        new = np.abs(r) <= max(5 * s, 0.5)
        if new.sum() <= deg + 1 or (new == keep).all():
            break
        keep = new
        fit = Polynomial.fit(b[keep], a[keep], deg)
    return fit


def _merge_fragments(traces: list[_Trace], spacing: float) -> list[_Trace]:
    """Join traces that are pieces of one order (broken where a cut missed it)."""
    merged = True
    while merged:
        merged = False
        fits = [_trace_fit(t) for t in traces]
        for i in range(len(traces)):
            for j in range(len(traces)):
                if i == j:
                    continue
                ti, tj = traces[i], traces[j]
                if ti.b[-1] >= tj.b[0]:  # i must end before j starts
                    continue
                ends = np.array([ti.b[-1], tj.b[0]])
                gap_i = fits[i](ends) if len(ti.b) >= 3 else np.full(2, ti.a[-1])
                gap_j = fits[j](ends) if len(tj.b) >= 3 else np.full(2, tj.a[0])
                if np.max(np.abs(gap_i - gap_j)) <= max(1.5, 0.2 * spacing):
                    ti.b += tj.b
                    ti.a += tj.a
                    ti.w += tj.w
                    del traces[j]
                    merged = True
                    break
            if merged:
                break
    return traces


def _merge_duplicates(traces: list[_Trace]) -> list[_Trace]:
    """Join traces that follow the same order over a common stretch (a noisy plateau seen as
    two peaks in some cuts can start a second trace beside the first)."""
    fits = [_trace_fit(t) for t in traces]
    alive = [True] * len(traces)
    for i in range(len(traces)):
        for j in range(i + 1, len(traces)):
            if not (alive[i] and alive[j]):
                continue
            ti, tj = traces[i], traces[j]
            lo, hi = max(ti.b[0], tj.b[0]), min(ti.b[-1], tj.b[-1])
            if hi < lo:
                continue
            grid = np.linspace(lo, hi, 8)
            d = np.median(np.abs(fits[i](grid) - fits[j](grid)))
            if d >= 0.5 * min(np.median(ti.w), np.median(tj.w)):
                continue
            # keep the longer trace's peak where both have one
            keep, other = (ti, tj) if len(ti.b) >= len(tj.b) else (tj, ti)
            have = set(keep.b)
            for b, a, w in zip(other.b, other.a, other.w):
                if b not in have:
                    keep.b.append(b)
                    keep.a.append(a)
                    keep.w.append(w)
            srt = np.argsort(keep.b)
            keep.b = list(np.asarray(keep.b)[srt])
            keep.a = list(np.asarray(keep.a)[srt])
            keep.w = list(np.asarray(keep.w)[srt])
            if keep is ti:
                alive[j] = False
            else:
                traces[i], alive[j] = tj, False
                fits[i] = _trace_fit(tj)
                continue
            fits[i] = _trace_fit(ti)
    return [t for t, ok in zip(traces, alive) if ok]


def _compare(t1: tuple, t2: tuple) -> int:
    (a, fa), (b, fb) = t1, t2
    lo, hi = max(a.b[0], b.b[0]), min(a.b[-1], b.b[-1])
    grid = np.linspace(lo, hi, 16) if hi > lo else np.array([0.5 * (a.b[0] + b.b[-1])
                                                             if a.b[0] > b.b[-1] else
                                                             0.5 * (a.b[-1] + b.b[0])])
    d = float(np.mean(fa(grid) - fb(grid)))
    return -1 if d < 0 else (1 if d > 0 else 0)


@functools.cache
def _pinhole_points(code: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Predicted slit-centre (B, A) points per order of an arm (unbinned px)."""
    from astropy.io import fits

    from soxs_core.calib import static_path
    from soxs_core.detector.instruments import ARMS

    arm = ARMS[code]
    path = static_path(arm, PINHOLE_TABLES[code])
    with fits.open(path, memmap=False) as hdul:
        data = hdul[1].data
        cols = {c.lower(): c for c in data.columns.names}
        order = np.asarray(data[cols["order"]], int)
        x = np.asarray(data[cols["detector_x"]], float)
        y = np.asarray(data[cols["detector_y"]], float)
        if "slit_index" in cols:
            centre = np.asarray(data[cols["slit_index"]]) == 4
            order, x, y = order[centre], x[centre], y[centre]
    b, a = (y, x) if arm.dispersion_axis == "y" else (x, y)
    return {int(n): (b[order == n], a[order == n]) for n in np.unique(order)}


@functools.cache
def _format_orders(code: str) -> tuple[int, ...]:
    from astropy.io import fits

    from soxs_core.calib import static_path
    from soxs_core.detector.instruments import ARMS

    arm = ARMS[code]
    with fits.open(static_path(arm, arm.spectral_format_file), memmap=False) as hdul:
        table = hdul[1].data
        name = [c for c in table.columns.names if c.upper() == "ORDER"][0]
        return tuple(int(v) for v in table[name])


def predicted_order_centres(code: str) -> tuple[OrderPolynomial, np.ndarray, tuple[int, ...]]:
    """Predicted order centres of an arm from its static tables.

    Returns
    -------
    centre : OrderPolynomial
        Global fit of the single-pinhole table's slit-centre positions, ``A(n, B)``.
    b_range : ndarray, shape (n_orders, 2)
        Along-order extent of each order's predicted lines.
    orders : tuple of int
        The orders of the spectral-format table (rows of ``b_range``).
    """
    points = _pinhole_points(code)
    orders = tuple(n for n in _format_orders(code) if n in points)
    n = np.concatenate([np.full(points[o][0].size, o) for o in orders])
    b = np.concatenate([points[o][0] for o in orders])
    a = np.concatenate([points[o][1] for o in orders])
    fit = fit_order_polynomial(n, b, a, min(4, len(orders) - 1), 3, 5.0, 3)
    ranges = np.array([[points[o][0].min(), points[o][0].max()] for o in orders])
    return fit.polynomial, ranges, orders


def assign_order_numbers(traces_b: list[np.ndarray], traces_a: list[np.ndarray], code: str,
                         n_along: int) -> tuple[list[int | None], float]:
    """Echelle numbers of traced orders from the positions the static tables predict.

    Each trace (unbinned px, sorted from the bottom of the cross-order axis) is compared with
    every predicted order over the trace's length; the instrument may have moved, so one global
    cross-order shift is searched: every trace-order offset is a candidate, and the shift that
    matches most traces within a third of the local order spacing, then with the smallest
    scatter, then the smallest shift, wins.

    Returns
    -------
    numbers : list
        The order number of each trace, None for a trace that matches no predicted order.
    shift : float
        Median (traced minus predicted) cross-order offset of the matched traces.
    """
    poly, _, orders = predicted_order_centres(code)
    orders_arr = np.asarray(orders, float)
    nt, no = len(traces_b), len(orders)
    diff = np.full((nt, no), np.nan)
    for i, (bb, aa) in enumerate(zip(traces_b, traces_a)):
        for j, o in enumerate(orders_arr):
            diff[i, j] = float(np.median(aa - poly(o, bb)))
    # local spacing of the predicted orders at mid-detector
    mid = 0.5 * n_along
    pos = poly(orders_arr, np.full(no, mid))
    gaps = np.abs(np.diff(pos))
    spacing = np.array([min(gaps[max(j - 1, 0)], gaps[min(j, gaps.size - 1)])
                        for j in range(no)]) if no > 1 else np.array([np.inf])
    best: tuple | None = None
    for s in np.unique(np.round(diff[np.isfinite(diff)], 3)):
        dev = np.abs(diff - s)
        tol = spacing[None, :] / 3.0
        hits: dict[int, tuple[float, int]] = {}
        for i in range(nt):
            j = int(np.nanargmin(dev[i]))
            if dev[i, j] <= tol[0, j] and (j not in hits or dev[i, j] < hits[j][0]):
                hits[j] = (float(dev[i, j]), i)
        score = (len(hits), -float(np.sum([h[0] ** 2 for h in hits.values()])), -abs(s))
        if best is None or score > best[0]:
            best = (score, s, hits)
    if best is None or not best[2]:
        return [None] * nt, float("nan")
    _, s, hits = best
    numbers: list[int | None] = [None] * nt
    for j, (_, i) in hits.items():
        numbers[i] = int(orders[j])
    matched = [diff[i, j] for j, (_, i) in hits.items()]
    return numbers, float(np.median(matched))


def trace_orders(flux: np.ndarray, qual: np.ndarray | None = None, dispersion_axis: str = "y",
                 binning: tuple[int, int] = (1, 1), *, arm: str | None = None,
                 n_cuts: int = 60, cut_width: int | None = None, order_deg: int = 5,
                 along_deg: int = 5, clip_sigma: float = 5.0, max_iterations: int = 5,
                 min_length: float = 0.1, source: str = "",
                 return_report: bool = False) -> OrderTable | tuple[OrderTable, TraceReport]:
    """Find, number and fit every order visible in a 2-D flat (no order table needed).

    Parameters
    ----------
    flux : ndarray
        The flat (any units; background need not be removed), prepared orientation.
    qual : ndarray, optional
        Non-zero for pixels to ignore.
    dispersion_axis : {"y", "x"}
        ``"y"`` when the orders run along the rows' index (each column crosses every order).
    binning : (binx, biny)
        Binning of the frame; every coordinate returned is unbinned.
    arm : str, optional
        Arm code (``xsh_vis`` ...): the orders get their echelle numbers from the static
        single-pinhole and spectral-format tables.  Without it they are numbered 1, 2, ... from
        the bottom of the cross-dispersion axis (increasing ``A``).
    n_cuts : int
        Number of cross-dispersion cuts along the dispersion.
    cut_width : int, optional
        Binned rows median-combined into each cut (default: 1/400 of the frame along, >= 5).
    order_deg, along_deg : int
        Degrees of the global centre polynomial (lowered to what the traces constrain).
    clip_sigma, max_iterations
        Clipping of the global centre fit.
    min_length : float
        A trace must be detected in at least this fraction of the cuts (and 4).
    source : str
        The file, named in errors and in the table.
    return_report : bool
        Also return a :class:`TraceReport`.

    Returns
    -------
    OrderTable
        Centres (``std`` None), along-order ranges where each order was traced, ``n_across``;
        with ``return_report`` also the :class:`TraceReport`.

    Raises
    ------
    InputError
        When no order is found (a bias or dark given as a flat), naming ``source``.
    """
    if dispersion_axis not in ("x", "y"):
        raise ValueError(f"dispersion_axis must be 'x' or 'y', not {dispersion_axis!r}")
    binx, biny = (int(v) for v in binning)
    bin_along, bin_across = (biny, binx) if dispersion_axis == "y" else (binx, biny)
    where = source or "the flat"
    img = _oriented(flux, qual, dispersion_axis)
    n_along, n_across = img.shape
    if n_along < 16 or n_across < 16:
        raise InputError(f"{where}: image of {flux.shape} pixels is too small to trace orders")
    if cut_width is None:
        cut_width = max(5, n_along // 400)
    half = max(cut_width // 2, 1)
    n_cuts = int(max(8, min(n_cuts, n_along // (2 * half + 1))))
    positions = np.linspace(half, n_along - 1 - half, n_cuts).round().astype(int)
    cuts: list[CutPeaks] = []
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
            profiles = [np.nanmedian(img[p - half:p + half + 1], axis=0) for p in positions]
    # light smoothing only: wider smoothing fills the narrow gaps between bright orders (a
    # faint order next to a bright one would lose its contrast); the ripple and noise bumps
    # on top of a plateau are joined to it by find_cut_peaks, and two peaks still closer than
    # the typical order width are one noisy plateau
    cuts = [find_cut_peaks(p, smooth=1.0).narrower_than(MAX_ORDER_FRACTION * n_across)
            for p in profiles]
    all_w = np.concatenate([c.width for c in cuts]) if cuts else np.zeros(0)
    if all_w.size:
        cuts = [c.merged_closer_than(0.75 * float(np.median(all_w))) for c in cuts]
    counts = np.array([c.centre.size for c in cuts])
    if not counts.any():
        raise InputError(f"{where}: no echelle order found in the flat (no cross-dispersion "
                         "cut shows an order above the noise); is it a bias or dark?")
    # start where most orders are seen, nearest the middle
    mid = n_cuts // 2
    start = int(max(range(n_cuts), key=lambda k: (counts[k], -abs(k - mid))))
    traces = _link(positions.astype(float), cuts, start)
    all_c = np.sort(cuts[start].centre)
    spacing = float(np.median(np.diff(all_c))) if all_c.size > 1 else float(n_across)
    traces = _merge_duplicates(_merge_fragments(traces, spacing))
    min_points = max(4, int(np.ceil(min_length * n_cuts)))
    # a real order is seen in most cuts it spans; noise peaks linked by chance are not
    span = [np.count_nonzero((positions >= t.b[0]) & (positions <= t.b[-1])) for t in traces]
    traces = [t for t, k in zip(traces, span) if len(t.b) >= min_points
              and len(t.b) >= MIN_DETECTED_FRACTION * k]
    if not traces:
        raise InputError(f"{where}: no echelle order found in the flat (no trace along the "
                         f"dispersion in at least {min_points} of {n_cuts} cuts); is it a "
                         "bias or dark?")
    # drop duplicates: two traces at the same place over a common stretch
    fits = [_trace_fit(t) for t in traces]
    items = sorted(zip(traces, fits), key=functools.cmp_to_key(_compare))
    traces = [t for t, _ in items]
    fits = [f for _, f in items]
    # to unbinned coordinates
    tb = [to_unbinned(np.asarray(t.b), bin_along) for t in traces]
    ta = [to_unbinned(np.asarray(t.a), bin_across) for t in traces]
    tw = [float(np.median(t.w)) * bin_across for t in traces]
    # where each order was seen (its table range), stray points included
    seen = [(float(b.min()), float(b.max())) for b in tb]
    for k in range(len(tb)):
        for _ in range(5):  # two neighbouring outliers: one at a time
            bad = _local_outliers(tb[k], ta[k])
            if not bad.any():
                break
            tb[k], ta[k] = tb[k][~bad], ta[k][~bad]
    shift = float("nan")
    missing: list[int] = []
    if arm is not None:
        numbers, shift = assign_order_numbers(tb, ta, arm, n_along * bin_along)
        unmatched = [k for k, v in enumerate(numbers) if v is None]
        if unmatched:
            log.warning("%s: %d traced order(s) match no order of the %s format and are "
                        "dropped (at %s px across)", where, len(unmatched), arm,
                        ", ".join(f"{np.median(ta[k]):.0f}" for k in unmatched))
        keep = [k for k, v in enumerate(numbers) if v is not None]
        if not keep:
            raise InputError(f"{where}: no traced order matches the predicted orders of "
                             f"{arm}")
        tb, ta, tw = [tb[k] for k in keep], [ta[k] for k in keep], [tw[k] for k in keep]
        seen = [seen[k] for k in keep]
        numbers_final = [int(numbers[k]) for k in keep]
        poly, _, orders_fmt = predicted_order_centres(arm)
        numbering = (f"numbered with the predicted positions of {PINHOLE_TABLES[arm]} "
                     f"(global shift {shift:+.1f} px across the orders)")
        # orders of the format whose predicted centre falls on the detector but not found
        grid = np.linspace(0, n_along * bin_along - 1, 32)
        for o in orders_fmt:
            a = poly(o, grid) + shift
            if o not in numbers_final and np.any((a > 0.5 * spacing * bin_across)
                                                 & (a < n_across * bin_across
                                                    - 0.5 * spacing * bin_across)):
                missing.append(int(o))
        if missing:
            log.warning("%s: predicted order(s) %s not found in the flat", where,
                        ", ".join(str(o) for o in missing))
    else:
        numbers_final = list(range(1, len(tb) + 1))
        numbering = (f"numbered 1 to {len(tb)} from the bottom of the cross-dispersion axis "
                     "(no spectral format given)")
    n_all = np.concatenate([np.full(b.size, float(n)) for b, n in zip(tb, numbers_final)])
    b_all, a_all = np.concatenate(tb), np.concatenate(ta)
    od, ad = _capped_degrees(n_all, b_all, order_deg, along_deg)
    fit = fit_order_polynomial(n_all, b_all, a_all, od, ad, clip_sigma, max_iterations)
    step = float(np.median(np.diff(positions))) * bin_along
    b_lo = np.array([max(0.0, lo - 0.5 * step) for lo, _ in seen])
    b_hi = np.array([min(float(n_along * bin_along - 1), hi + 0.5 * step) for _, hi in seen])
    srt = np.argsort(numbers_final)
    table = OrderTable(dispersion_axis=dispersion_axis,
                       orders=np.asarray(numbers_final)[srt], b_min=b_lo[srt], b_max=b_hi[srt],
                       centre=fit.polynomial, n_across=int(n_across * bin_across),
                       source=str(source))
    log.info("%s: %d orders self-traced from the flat (no order-centre table), %s; centre "
             "fit rms %.2f px (degrees %d, %d)", where, len(tb), numbering, fit.rms,
             *fit.degrees)
    if not return_report:
        return table
    report = TraceReport(order=n_all.astype(int), b=b_all, a=a_all, used=fit.used,
                         residuals=fit.residuals, numbering=numbering, shift=shift,
                         widths={int(n): w for n, w in zip(numbers_final, tw)},
                         missing=missing)
    return table, report
