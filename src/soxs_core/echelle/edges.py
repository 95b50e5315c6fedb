"""Order-edge detection on cross-dispersion slices of a flat.

The pixel work is the Cython kernel :mod:`soxs_core._edges`; :func:`detect_slice_edges_reference`
is its pure-numpy twin, and the tests hold the two equal.  Keep them in step.
:func:`measure_order_edges` samples every order of a (binned) prepared flat and returns the edge
positions in unbinned prepared-pixel coordinates, ready for the global fit.

What an edge is
---------------
The simulator's truth (and the physical meaning) of an order edge is the slit end: the point
where the soft end of the slit image falls to *half the illumination just inside it*.  The slit
illumination is not flat (slope, curvature, ripple of a few per cent), so the reference level
is the plateau *near each edge*, not the order's peak.  Each edge of each slice is measured so:

1. **Slice.**  Rows ``along - w//2 .. along + w//2`` (``w`` = slice width, the dispersion
   direction; the rows must lie inside the image, else the sample is NaN), columns
   ``rc - L//2 .. rc + L//2`` with ``rc = floor(centre + 0.5)`` (``L`` = slice length),
   clipped to the image.  Each column is collapsed to the median of its good pixels (QUAL has
   none of ``reject_bits``, value finite; mean of the two middle values for an even count).
   A column without good pixels is filled by linear interpolation between its nearest good
   neighbours (nearest value at the ends).
2. **Peak, floor, noise** of the collapsed profile ``p``, from its running median ``s`` over
   ``2 RUN_HALF + 1`` pixels (shorter at the slice ends; it lets the walk pass dips of up to
   RUN_HALF pixels, e.g. an unflagged bad column): peak = max of ``s`` within ``PEAK_HALF`` px
   of ``rc`` (the order's central flux, the seed page's reference), floor = min of ``s`` over
   the slice, noise = 1.4826 median |pixel-to-pixel difference of ``p``| / sqrt 2.  A slice
   whose peak minus floor is not above ``MIN_CONTRAST`` noise has no edges.
3. **Detection (the seed-page parameters).**  Walking outwards from ``rc``, the edge is
   detected at the first pixel where ``s`` drops below ``floor + t (peak - floor)``, with the
   threshold fraction ``t`` stepped from ``min_fraction`` to ``max_fraction`` in tenths of the
   range (as soxspipe does) until a drop is found.  A side whose profile never drops below the
   highest threshold inside the slice (order blended with its neighbour, or cut by the image
   border) has no edge.  The ``t`` used is returned per sample (``threshold_low/up``).
4. **Half level, first guess.**  A straight line (the plateau) is fitted to ``p`` on the
   ``PLATEAU_LENGTH`` pixels ending ``PLATEAU_GAP`` pixels inside the detection pixel; the
   valley bottom is the minimum of ``s`` from the detection pixel outwards (nothing beyond it
   is used: it may be the neighbouring order).  Walking outwards from the plateau, the first
   pixel below half the plateau (above the floor) brackets the edge.
5. **Local plateau and floor, refined** (``REFINE_ITERATIONS``).  The plateau moves next to
   the edge: its ``NEAR_PLATEAU_LENGTH`` pixels end at the first pixel inside the bracket that
   is within ``PLATEAU_TOLERANCE`` (or ``NOISE_TOLERANCE`` noise) of the line, so the line is
   extrapolated to the edge over as few pixels as possible (the illumination's ripple curves
   it); plateau pixels more than ``DESPIKE`` noise off ``s`` enter as ``s``.  The floor is the
   mean of the ``FLOOR_LENGTH`` pixels just outside the soft end (the scattered-light halo
   slopes, so the valley's bottom further out is lower than the floor under the edge).  The
   half level ``floor + (plateau(k) - floor) / 2`` is searched again (``level_low/up``).
6. **Sub-pixel position: equal area.**  Linear interpolation between pixel centres is biased
   by up to 0.08 px depending on where the edge falls within a pixel (the slit end is sharp,
   about one pixel).  Instead, over the pixels between the plateau and the floor windows, the
   position is where a sharp step of the local plateau height would hold the same light as
   the profile: ``x = x_in - 1/2 + sum_k (p_k - floor) / (plateau(k) - floor)``, counting from
   the inner end.  Pixels tile the axis, so the sum is the exact integral of the blurred
   profile; for any symmetric blur of the slit end (optics and pixel) it is the half-level
   point of the unblurred step, i.e. the true edge, at any sub-pixel phase.  A column without
   good pixels (filled by interpolation) inside this window makes the edge NaN: its light on
   the soft end would be a guess.
7. **Plausibility.**  Each edge must lie beyond the plateau window and inside its measurement
   window; with both found, the width must be at least ``MIN_WIDTH`` px (soxspipe's
   hard-coded 10 px), else both are NaN.

Accuracy against the simulator (tests/test_edges.py): per order and edge, bias below 0.05
frame pixels and scatter that of the noise plus at most 0.03 px on every arm and binned; what
remains is the slit illumination's ripple near the slit ends, which no estimator working
within a few pixels of the edge can separate from the edge itself.

All lengths are pixels of the frame being measured, i.e. *binned* pixels for binned data: the
seed page's ``slice-length/width-for-edge-detection`` are used as given, as DEFAULT_PARAMETERS.md
states for pixel-valued parameters and as soxspipe 0.17.4 does (its cut is not scaled by the
binning).  A 90-px slice of a 2x-binned frame may reach a neighbouring order; the walk outwards
from the centre stops at the first valley, so that is harmless.

Coordinates: the kernel works on an image whose rows run along the dispersion (axis 0) and whose
columns run across the orders; for a frame dispersed along x (SOXS NIR) the caller passes the
transposed *view* (no copy).  Binned pixel ``i`` has its centre at unbinned ``i*bin + (bin-1)/2``
(the simulator's convention, :meth:`soxs_core.simulate.scene.Renderer._window`), and the same
affine map converts every sub-pixel position.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from soxs_core import _edges
from soxs_core.combine.stacking import default_threads

__all__ = ["EdgeSamples", "SliceEdges", "detect_slice_edges", "detect_slice_edges_reference",
           "measure_order_edges", "binned_to_unbinned", "unbinned_to_binned", "SAMPLE_STEP",
           "PEAK_HALF", "PLATEAU_GAP", "PLATEAU_LENGTH", "NEAR_PLATEAU_LENGTH",
           "PLATEAU_TOLERANCE", "NOISE_TOLERANCE", "DESPIKE", "AREA_INNER_MAX",
           "REFINE_ITERATIONS", "FLOOR_LENGTH", "MIN_CONTRAST", "RUN_HALF", "MIN_WIDTH"]

MAD_TO_SIGMA = 1.482602218505602
#: Edge samples are taken every SAMPLE_STEP / binning px along each order (soxspipe, hard-coded).
SAMPLE_STEP = 25
#: Half-width (px) of the window around the centre where the order's peak is taken.
PEAK_HALF = 8
#: Pixels between the detection pixel and the inner end of the first (crude) plateau window.
PLATEAU_GAP = 4
#: Pixels of the crude plateau window (straight-line fit).
PLATEAU_LENGTH = 6
#: Pixels of the refined, near-edge plateau window.
NEAR_PLATEAU_LENGTH = 3
#: A pixel belongs to the plateau once its profile is within this fraction of the plateau line.
PLATEAU_TOLERANCE = 0.005
#: ... or within this many times the slice's noise, whichever is larger.
NOISE_TOLERANCE = 2.0
#: Plateau pixels further than this many noise sigma from the running median are replaced by it.
DESPIKE = 5.0
#: Most pixels the equal-area window reaches inside the half-level bracket.
AREA_INNER_MAX = 4
#: Iterations of the near-edge plateau refinement.
REFINE_ITERATIONS = 3
#: Pixels of the local floor window just outside the soft end.
FLOOR_LENGTH = 3
#: A slice is measured only if its peak minus floor exceeds this many times its noise
#: (1.4826 median |pixel-to-pixel difference| / sqrt 2): pure noise or a dark stretch of
#: an order has no edges to find.
MIN_CONTRAST = 10.0
#: Narrowest plausible order (px), soxspipe's hard-coded limit.
MIN_WIDTH = 10.0
#: Half-width of the running median the detection walks on: dips of up to RUN_HALF pixels
#: (bad columns not flagged in QUAL) do not stop the walk.
RUN_HALF = 3


@dataclass
class SliceEdges:
    """Per-sample output of :func:`detect_slice_edges` (coordinates of the measured image:
    columns of the dispersion-along-rows orientation, binned pixels).

    Attributes
    ----------
    low, up : ndarray of float64
        Lower and upper edge (column, sub-pixel), NaN where not measured.
    threshold_low, threshold_up : ndarray of float64
        Detection threshold fraction ``t`` used on each side (NaN where none was met).
    level_low, level_up : ndarray of float64
        Half level (flux) at the edge bracket on each side.
    floor, peak : ndarray of float64
        Floor and central peak (flux) of the collapsed slice.
    """

    low: np.ndarray
    up: np.ndarray
    threshold_low: np.ndarray
    threshold_up: np.ndarray
    level_low: np.ndarray
    level_up: np.ndarray
    floor: np.ndarray
    peak: np.ndarray


def _prepare_inputs(flux, qual, along, centre):
    flux = np.asarray(flux)
    if flux.dtype != np.float32:
        flux = flux.astype(np.float32)
    qual = np.asarray(qual)
    if qual.dtype != np.uint8:
        qual = qual.astype(np.uint8)
    if flux.ndim != 2 or qual.shape != flux.shape:
        raise ValueError("flux and qual must be 2-D images of the same shape")
    along = np.ascontiguousarray(along, np.int64).ravel()
    centre = np.ascontiguousarray(centre, np.float64).ravel()
    if along.shape != centre.shape:
        raise ValueError("along and centre must have the same length")
    return flux, qual, along, centre


def _check_parameters(slice_length: int, slice_width: int, min_fraction: float,
                      max_fraction: float) -> None:
    if slice_length < 2 * (PLATEAU_GAP + PLATEAU_LENGTH) + 2:
        raise ValueError(f"slice length {slice_length} px is too short to measure edges")
    if slice_width < 1:
        raise ValueError("slice width must be at least 1 px")
    if not (0.0 < min_fraction <= max_fraction < 1.0):
        raise ValueError(f"edge thresholds must satisfy 0 < min <= max < 1, got "
                         f"{min_fraction}, {max_fraction}")


def detect_slice_edges(flux: np.ndarray, qual: np.ndarray, along, centre, slice_length: int,
                       slice_width: int, min_fraction: float, max_fraction: float, *,
                       reject_bits: int = 0xFF, threads: int | None = None) -> SliceEdges:
    """Lower and upper order edges in cross-dispersion slices (Cython kernel).

    Parameters
    ----------
    flux : ndarray (rows along the dispersion, columns across the orders)
        Image (float32; any strides, e.g. the transpose of a frame dispersed along x).
    qual : ndarray of uint8, same shape
        Quality; pixels with any of ``reject_bits`` set are ignored.
    along : array of int
        Row of each sample (slice centre along the dispersion).
    centre : array of float
        Column of the order centre at each sample (sub-pixel).
    slice_length, slice_width : int
        Slice length across the order and width along it (px of this image).
    min_fraction, max_fraction : float
        Lowest and highest detection threshold, fractions of peak minus floor (module doc).
    reject_bits : int
        QUAL bits that exclude a pixel.
    threads : int, optional
        Threads of the kernel (default :func:`~soxs_core.combine.stacking.default_threads`).

    Returns
    -------
    SliceEdges
    """
    flux, qual, along, centre = _prepare_inputs(flux, qual, along, centre)
    _check_parameters(slice_length, slice_width, min_fraction, max_fraction)
    n = along.size
    out = np.full((8, n), np.nan)
    if n:
        _edges.detect_slice_edges(flux, qual, along, centre, int(slice_length),
                                  int(slice_width), float(min_fraction), float(max_fraction),
                                  int(reject_bits) & 0xFF, PEAK_HALF, PLATEAU_GAP,
                                  PLATEAU_LENGTH, NEAR_PLATEAU_LENGTH, PLATEAU_TOLERANCE,
                                  NOISE_TOLERANCE, DESPIKE,
                                  AREA_INNER_MAX, REFINE_ITERATIONS, FLOOR_LENGTH,
                                  MIN_CONTRAST, RUN_HALF, MIN_WIDTH, out,
                                  default_threads(threads))
    return SliceEdges(*out)


# ---------------------------------------------------------------------- numpy twin
def _collapse(flux, qual, along, centre, slice_length, slice_width, reject_bits):
    """Median-collapsed slices (n, 2*(L//2)+1), NaN outside the image; column offset c0
    and centre index kc of each."""
    nrow, ncol = flux.shape
    hw, hl = slice_width // 2, slice_length // 2
    rc = np.floor(centre + 0.5).astype(np.int64)
    c0 = rc - hl
    rows = along[:, None] + np.arange(-hw, hw + 1)[None, :]
    cols = c0[:, None] + np.arange(2 * hl + 1)[None, :]
    rows_ok = (rows[:, 0] >= 0) & (rows[:, -1] < nrow)
    inside = (cols >= 0) & (cols < ncol)
    r = np.clip(rows, 0, nrow - 1)[:, :, None]
    c = np.clip(cols, 0, ncol - 1)[:, None, :]
    values = flux[r, c].astype(np.float64)
    good = ((qual[r, c] & reject_bits) == 0) & np.isfinite(values)
    values[~good] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN columns: NaN wanted
        prof = np.nanmedian(values, axis=1)
    prof[~inside] = np.nan
    prof[~rows_ok] = np.nan
    usable = rows_ok & (rc >= 0) & (rc < ncol)
    return prof, inside, c0, usable


def _fill(p: np.ndarray, inside: np.ndarray) -> np.ndarray | None:
    """Fill NaN columns inside the image by linear interpolation; None if nothing valid."""
    idx = np.flatnonzero(inside)
    q = p[idx]
    ok = np.isfinite(q)
    if not ok.any():
        return None
    k = np.arange(q.size)
    good_k = k[ok]
    out = q.copy()
    for j in np.flatnonzero(~ok):
        right = np.searchsorted(good_k, j)
        if right == 0:
            out[j] = q[good_k[0]]
        elif right == good_k.size:
            out[j] = q[good_k[-1]]
        else:
            a, b = good_k[right - 1], good_k[right]
            w = (j - a) / (b - a)
            out[j] = q[a] + w * (q[b] - q[a])
    return out


def _running_median(p: np.ndarray, half: int) -> np.ndarray:
    n = p.size
    out = np.empty(n)
    width = 2 * half + 1
    if n >= width:
        out[half:n - half] = np.median(np.lib.stride_tricks.sliding_window_view(p, width),
                                       axis=1)
    for j in list(range(min(half, n))) + list(range(max(n - half, min(half, n)), n)):
        out[j] = np.median(p[max(0, j - half):min(n, j + half + 1)])
    return out


def _line(pk: np.ndarray, sk: np.ndarray, k0: int, k1: int, noise: float
          ) -> tuple[float, float, float]:
    """Straight line through pk[k0..k1]: mean abscissa, mean value, slope (kernel's sums).
    A pixel more than DESPIKE noise off the running median (an unflagged bad column inside
    the order) enters with the running median's value."""
    m = k1 - k0 + 1
    limit = DESPIKE * noise
    y = [pk[k] if abs(pk[k] - sk[k]) <= limit else sk[k] for k in range(k0, k1 + 1)]
    xm = 0.0
    ym = 0.0
    for k in range(k0, k1 + 1):
        xm = xm + float(k)
        ym = ym + y[k - k0]
    xm = xm / m
    ym = ym / m
    sxx = 0.0
    sxy = 0.0
    for k in range(k0, k1 + 1):
        sxx = sxx + (k - xm) * (k - xm)
        sxy = sxy + (k - xm) * (y[k - k0] - ym)
    return xm, ym, sxy / sxx


def _half_crossing(pk, k_start, kv, fl, xm, ym, slope):
    """First k in [k_start, kv] below half the local plateau: (k, half level) or (-1, nan)."""
    for k in range(k_start, kv + 1):
        half = fl + 0.5 * ((ym + slope * (k - xm)) - fl)
        if pk[k] < half:
            return k, half
    return -1, np.nan


def _one_side(p, s, kc, d, floor, peak, min_fraction, max_fraction, noise, filled):
    """Edge of one side (offset from kc in profile pixels, signed), threshold, level.

    Scalar loops on purpose: this is the kernel's ``_side`` line by line."""
    n = p.size
    kmax = (n - 1 - kc) if d > 0 else kc
    nan = np.nan
    if kmax < 1:
        return nan, nan, nan
    pk = p[kc + d * np.arange(kmax + 1)]
    sk = s[kc + d * np.arange(kmax + 1)]
    gap = filled[kc + d * np.arange(kmax + 1)]
    kd = -1
    t = nan
    for step in range(11):
        t = min_fraction + step * (max_fraction - min_fraction) / 10.0
        level = floor + t * (peak - floor)
        for k in range(1, kmax + 1):
            if sk[k] < level:
                kd = k
                break
        if kd >= 0 or max_fraction == min_fraction:
            break
    if kd < 0:
        return nan, nan, nan
    # crude plateau clear of the soft end, then the half-level bracket
    kp1 = kd - PLATEAU_GAP
    kp0 = max(0, kp1 - PLATEAU_LENGTH + 1)
    if kp1 - kp0 + 1 < 3:
        return nan, t, nan
    xm, ym, slope = _line(pk, sk, kp0, kp1, noise)
    kv = kd
    fl = sk[kd]
    for k in range(kd + 1, kmax + 1):
        if sk[k] < fl:
            fl = sk[k]
            kv = k
    kout, level = _half_crossing(pk, kp1 + 1, kv, fl, xm, ym, slope)
    if kout < 0:
        return nan, t, nan
    # refine: the plateau window moves next to the edge, just inside the pixels that are
    # still below the plateau (the soft end), so that it is extrapolated as little as
    # possible; the floor is taken just outside the soft end (the halo of scattered light
    # slopes, so the valley's bottom further out is lower than the floor under the edge)
    a = 1
    for _ in range(REFINE_ITERATIONS):
        fl = _near_floor(pk, sk, kout + a, kv)
        kin = kout - 1
        a = 1
        while a < AREA_INNER_MAX and kin - a >= 0:
            height = (ym + slope * ((kin - a) - xm)) - fl
            if not height > 0:
                break
            tol = PLATEAU_TOLERANCE
            if NOISE_TOLERANCE * noise / height > tol:
                tol = NOISE_TOLERANCE * noise / height
            if (pk[kin - a] - fl) / height >= 1.0 - tol:
                break
            a += 1
        kp1 = kin - a
        kp0 = max(0, kp1 - NEAR_PLATEAU_LENGTH + 1)
        if kp1 - kp0 + 1 < 3:
            return nan, t, nan
        xm, ym, slope = _line(pk, sk, kp0, kp1, noise)
        knew, level = _half_crossing(pk, kp1 + 1, kv, fl, xm, ym, slope)
        if knew < 0:
            return nan, t, nan
        if knew == kout:
            break
        kout = knew
    fl = _near_floor(pk, sk, kout + a, kv)
    kin = kout - 1
    klo = kin - a + 1
    if klo <= kp1:
        klo = kp1 + 1
    khi = min(kout + a, kv)
    if khi - kin < 2:
        return nan, t, level
    total = 0.0
    for k in range(klo, khi + 1):
        if gap[k]:
            # an interpolated column on the soft end: its light is a guess
            return nan, t, level
        height = (ym + slope * (k - xm)) - fl
        if not height > 0:
            return nan, t, level
        total = total + (pk[k] - fl) / height
    pos = (klo - 0.5) + total
    if not (kp1 < pos <= khi + 0.5):
        return nan, t, level
    return d * pos, t, level


def _near_floor(pk, sk, k_end, kv) -> float:
    """Mean profile on the FLOOR_LENGTH pixels after ``k_end`` (not past the valley bottom
    ``kv``); the valley bottom itself when there is no room."""
    k0 = k_end + 1
    k1 = min(k_end + FLOOR_LENGTH, kv)
    if k1 < k0:
        return float(sk[kv])
    total = 0.0
    for k in range(k0, k1 + 1):
        total = total + pk[k]
    return total / (k1 - k0 + 1)


def detect_slice_edges_reference(flux: np.ndarray, qual: np.ndarray, along, centre,
                                 slice_length: int, slice_width: int, min_fraction: float,
                                 max_fraction: float, *, reject_bits: int = 0xFF
                                 ) -> SliceEdges:
    """Numpy twin of :func:`detect_slice_edges` (same steps, same arithmetic order)."""
    flux, qual, along, centre = _prepare_inputs(flux, qual, along, centre)
    _check_parameters(slice_length, slice_width, min_fraction, max_fraction)
    n = along.size
    out = np.full((8, n), np.nan)
    if not n:
        return SliceEdges(*out)
    prof, inside, c0, usable = _collapse(flux, qual, along, centre, int(slice_length),
                                         int(slice_width), int(reject_bits) & 0xFF)
    hl = int(slice_length) // 2
    for i in range(n):
        if not usable[i]:
            continue
        first = int(np.flatnonzero(inside[i])[0])
        p = _fill(prof[i], inside[i])
        if p is None:
            continue
        filled = ~np.isfinite(prof[i][inside[i]])
        kc = hl - first
        s = _running_median(p, RUN_HALF)
        lo_k, hi_k = max(0, kc - PEAK_HALF), min(p.size - 1, kc + PEAK_HALF)
        peak = s[lo_k:hi_k + 1].max()
        floor = s.min()
        out[6, i], out[7, i] = floor, peak
        noise = MAD_TO_SIGMA * float(np.median(np.abs(np.diff(p)))) / np.sqrt(2.0)
        if not (peak > floor and peak - floor > MIN_CONTRAST * noise):
            continue
        base = c0[i] + first + kc
        for row, d in ((0, -1), (1, 1)):
            off, t, level = _one_side(p, s, kc, d, floor, peak, min_fraction, max_fraction,
                                      noise, filled)
            out[row, i] = base + off
            out[2 + row, i] = t
            out[4 + row, i] = level
        if np.isfinite(out[0, i]) and np.isfinite(out[1, i]):
            if out[1, i] - out[0, i] < MIN_WIDTH:
                out[0, i] = out[1, i] = np.nan
    return SliceEdges(*out)


# ---------------------------------------------------------------------- driver
def binned_to_unbinned(x, binning: int):
    """Unbinned coordinate of binned (sub-)pixel position ``x``: ``x*bin + (bin-1)/2``."""
    return np.asarray(x, float) * binning + 0.5 * (binning - 1)


def unbinned_to_binned(u, binning: int):
    """Inverse of :func:`binned_to_unbinned`."""
    return (np.asarray(u, float) - 0.5 * (binning - 1)) / binning


@dataclass
class EdgeSamples:
    """Edge samples of every order, unbinned prepared-pixel coordinates.

    Attributes
    ----------
    order : ndarray of int
        Echelle order of each sample.
    b : ndarray of float
        Along-order (dispersion) coordinate of the sample (unbinned px; the centre of the
        binned row/column the slice is centred on).
    centre : ndarray of float
        Cross-order centre the slice was cut around (unbinned px).
    low, up : ndarray of float
        Lower and upper edges (unbinned px), NaN where not measured.
    threshold_low, threshold_up : ndarray of float
        Detection threshold fraction used on each side (NaN where none was met).
    floor, peak : ndarray of float
        Floor and central peak of each collapsed slice (flux units of the input).
    orders : ndarray of int
        The orders sampled.
    order_threshold : ndarray of float
        Per order: median detection threshold fraction over its measured edges (NaN if none).
    """

    order: np.ndarray
    b: np.ndarray
    centre: np.ndarray
    low: np.ndarray
    up: np.ndarray
    threshold_low: np.ndarray
    threshold_up: np.ndarray
    floor: np.ndarray
    peak: np.ndarray
    orders: np.ndarray
    order_threshold: np.ndarray

    def __len__(self) -> int:
        return int(self.order.size)

    def select(self, order: int) -> EdgeSamples:
        """The samples of one order."""
        m = self.order == int(order)
        k = self.orders == int(order)
        return EdgeSamples(self.order[m], self.b[m], self.centre[m], self.low[m], self.up[m],
                           self.threshold_low[m], self.threshold_up[m], self.floor[m],
                           self.peak[m], self.orders[k], self.order_threshold[k])

    def counts(self) -> dict[int, tuple[int, int]]:
        """Per order: number of measured lower and upper edges."""
        return {int(n): (int(np.isfinite(self.low[self.order == n]).sum()),
                         int(np.isfinite(self.up[self.order == n]).sum()))
                for n in self.orders}


def _binning_pair(binning) -> tuple[int, int]:
    if isinstance(binning, str):
        bx, by = binning.lower().split("x")
        return int(bx), int(by)
    if np.ndim(binning) == 0:
        return int(binning), int(binning)
    bx, by = binning
    return int(bx), int(by)


def measure_order_edges(flux: np.ndarray, qual: np.ndarray,
                        centre_fn: Callable[[int, np.ndarray], np.ndarray],
                        orders: Sequence[int], b_ranges: Sequence[tuple[float, float]],
                        dispersion_axis: str, binning, slice_length: int, slice_width: int,
                        min_percent: float, max_percent: float, step: int | None = None, *,
                        reject_bits: int = 0xFF, threads: int | None = None,
                        kernel: bool = True) -> EdgeSamples:
    """Measure the lower and upper edges of every order along its length.

    Parameters
    ----------
    flux, qual : ndarray
        Prepared (binned) flat and its QUAL plane, prepared orientation.
    centre_fn : callable
        ``centre_fn(order, b)``: cross-order centre (unbinned px) at along-order unbinned
        coordinates ``b`` (an array), e.g. the order table's centre polynomial.
    orders : sequence of int
        Orders to measure.
    b_ranges : sequence of (float, float)
        Per order, the along-order range (unbinned px) to sample.
    dispersion_axis : {'y', 'x'}
        Axis the orders run along (``x`` for SOXS NIR).
    binning : str, int or (binx, biny)
        Binning of ``flux`` (``"2x2"``, 2 or ``(binx, biny)``; x = columns).
    slice_length, slice_width : int
        Seed-page slice length across and width along the order (binned px, module doc).
    min_percent, max_percent : float
        Seed-page min/max threshold percentages.
    step : int, optional
        Sample spacing along the order in binned px; default ``int(25 / binning_along)``.
    reject_bits : int
        QUAL bits that exclude a pixel.
    threads : int, optional
        Kernel threads.
    kernel : bool
        Use the Cython kernel (default) or its numpy twin.

    Returns
    -------
    EdgeSamples
    """
    if dispersion_axis not in ("x", "y"):
        raise ValueError(f"dispersion axis must be 'x' or 'y', not {dispersion_axis!r}")
    orders = [int(o) for o in orders]
    if len(b_ranges) != len(orders):
        raise ValueError("one b range per order is needed")
    binx, biny = _binning_pair(binning)
    flux = np.asarray(flux)
    qual = np.asarray(qual)
    if dispersion_axis == "y":
        bb, ba = biny, binx
        img, q = flux, qual
    else:
        bb, ba = binx, biny
        img, q = flux.T, qual.T
    step = int(step) if step else max(1, int(SAMPLE_STEP / bb))
    n_along = img.shape[0]
    parts_order, parts_b, parts_c, parts_i = [], [], [], []
    for n, (b0, b1) in zip(orders, b_ranges):
        if not (np.isfinite(b0) and np.isfinite(b1)):
            continue
        i0 = int(np.ceil(unbinned_to_binned(min(b0, b1), bb)))
        i1 = int(np.floor(unbinned_to_binned(max(b0, b1), bb)))
        i0, i1 = max(i0, 0), min(i1, n_along - 1)
        # samples on a grid common to all orders, as soxspipe's pixel delta
        first = -(-i0 // step) * step
        idx = np.arange(first, i1 + 1, step, dtype=np.int64)
        if not idx.size:
            continue
        b = binned_to_unbinned(idx, bb)
        cen = np.asarray(centre_fn(n, b), float) * np.ones_like(b)
        parts_order.append(np.full(idx.size, n, dtype=np.int64))
        parts_b.append(b)
        parts_c.append(cen)
        parts_i.append(idx)
    if parts_order:
        order = np.concatenate(parts_order)
        b = np.concatenate(parts_b)
        cen = np.concatenate(parts_c)
        along = np.concatenate(parts_i)
    else:
        order = np.zeros(0, np.int64)
        b = cen = np.zeros(0)
        along = np.zeros(0, np.int64)
    cen_b = unbinned_to_binned(cen, ba)
    fraction = (float(min_percent) / 100.0, float(max_percent) / 100.0)
    if kernel:
        res = detect_slice_edges(img, q, along, cen_b, slice_length, slice_width, *fraction,
                                 reject_bits=reject_bits, threads=threads)
    else:
        res = detect_slice_edges_reference(img, q, along, cen_b, slice_length, slice_width,
                                           *fraction, reject_bits=reject_bits)
    uniq = np.array(orders, dtype=np.int64)
    order_thr = np.full(uniq.size, np.nan)
    for k, n in enumerate(uniq):
        m = order == n
        t = np.concatenate([res.threshold_low[m][np.isfinite(res.low[m])],
                            res.threshold_up[m][np.isfinite(res.up[m])]])
        if t.size:
            order_thr[k] = float(np.median(t))
    return EdgeSamples(order=order, b=b, centre=cen, low=binned_to_unbinned(res.low, ba),
                       up=binned_to_unbinned(res.up, ba), threshold_low=res.threshold_low,
                       threshold_up=res.threshold_up, floor=res.floor, peak=res.peak,
                       orders=uniq, order_threshold=order_thr)
