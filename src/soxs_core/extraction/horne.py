"""Optimal (Horne 1986) and boxcar extraction of one echelle order.

Every array ending in ``_t`` is the *along view* of a frame: axis 0 runs along the order
(binned along index), axis 1 across it (binned across pixel); ``centre`` is the trace centre
(binned across px, fractional) at each extracted row.

Aperture
    Full width ``slit_length`` (binned px) centred on the trace.  A pixel's aperture weight is
    the fraction of its width inside ``[centre - L/2, centre + L/2]``; the *window* of a row is
    the ``ceil(L) + 1`` pixels starting at the one holding the aperture's lower end.

Spatial profile (:func:`fit_spatial_profile`)
    The fraction of a row's light that falls in each pixel is a smooth function of the pixel
    centre's offset ``u = x - centre(y)`` from the trace (the pixel-integrated profile), slowly
    changing along the order.  It is modelled as ``g(u, y) = sum_km c_km B_k(u) L_m(y)``: cubic
    B-splines in ``u`` with knots every ``knot_spacing`` px (a curved trace samples the profile
    at many sub-pixel phases, which these knots resolve; an unsampled phase is bridged by a
    tiny second-difference penalty) times Legendre polynomials of degree ``poly_order`` in the
    along coordinate.  It is fitted to all pixels of the order at once, ``D_ij ~ F_i g(u_ij,
    y_i)``, where ``F_i`` is the median of the boxcar fluxes of the neighbouring rows *without
    row i itself*: its noise is then independent of row i's pixels and cannot bias the profile
    shape, however faint the source (a noisy ``F`` only rescales ``g``, and each row's profile
    is normalised anyway).  Outliers (beyond ``clip_sigma`` robust standard deviations of the
    normalised residuals) are rejected and the fit repeated until no more are found or
    ``clip_iterations`` fits were made; with ``poisson_scale_t`` the weights are re-estimated
    from the model at each fit.  The profile of a row is ``P = max(g, 0)`` normalised to
    ``sum_j a_ij P_ij = 1`` (``a`` the aperture weights): ``P`` is the fraction of the
    aperture's light per pixel.

Optimal extraction (per row; Cython kernel ``_horne`` and its numpy twin
:func:`extract_rows_reference`)
    ``f = sum(P D / V) / sum(P^2 / V)``, ``var = 1 / sum(P^2 / V)`` over the usable pixels of
    the window, with ``V = base_variance + poisson_scale * max(f P, 0)`` re-estimated from the
    model (not from the data, whose noise would bias it) and iterated.  At each iteration the
    single worst pixel with ``(D - f P)^2 > reject_sigma^2 (V + (e f P)^2)`` is rejected
    (``e`` = ``profile_error``: a profile accurate to a few per cent must not reject the good
    peak pixels of a bright star), until none is left and ``f`` has converged.  The estimate is
    the object's light inside the aperture.
Boxcar
    Plain: ``sum a D`` over every measured pixel of the aperture (masked ones included);
    robust: the same over the usable, unrejected pixels divided by the profile fraction they
    cover.  Their variances use the same model ``V`` (with the final optimal ``f``).
Row quality
    A row whose usable pixels cover less than ``min_profile_fraction`` of its profile, or
    where nothing can be measured (no finite trace centre), gets ``qual = Qual.NO_DATA``.

Measured (tests/test_horne*.py, benchmarks/bench_extraction.py, simulator truth)
    Median optimal / true aperture flux within 0.3 % per order at per-row S/N >~ 5 on every
    arm, pulls 0.96-1.05 (optimal and boxcar).  Two things to know: the aperture misses the
    seeing wings (20 px on X-shooter UVB, 0.8" seeing: 0.5-1.1 %; VIS 0.3-0.8 %; NIR and SOXS
    < 0.2 %), which a response measured with the same aperture cancels and
    :func:`profile_aperture_correction` estimates from a fitted seeing profile; and for a
    very faint source (per-row S/N ~0.5-2) the profile's own noise (its width) moves the
    whole order's optimal flux coherently by about the order total's statistical error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from soxs_core.combine.stacking import default_threads
from soxs_core.detector.quality import Qual

__all__ = [
    "SpatialProfile",
    "OrderExtraction",
    "ROW_UNUSABLE",
    "aperture_window",
    "fit_spatial_profile",
    "extract_order",
    "extract_rows",
    "extract_rows_reference",
]

#: QUAL value of a row that is not usable (too little of the profile measured).
ROW_UNUSABLE = int(Qual.NO_DATA)

#: Smallest variance a pixel is given (e-^2); the kernel's VAR_FLOOR.
VAR_FLOOR = 1e-12

#: Rows on either side whose boxcar fluxes (median, the row itself left out) scale the
#: profile model of a row.
FLUX_HALF_WINDOW = 8

#: Signal-to-noise ratio aimed at for that scale (the window grows for faint sources).
FLUX_SCALE_SNR = 10.0

#: Second-difference penalty of the profile's B-spline coefficients relative to the mean
#: diagonal of the normal matrix: bridges sub-pixel phases no pixel samples, far below the
#: data's weight where they do.
PENALTY = 1e-4

MAD_TO_SIGMA = 1.482602218505602


# ----------------------------------------------------------------------------- window
def aperture_window(centre: np.ndarray, slit_length: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window pixels of each row and their aperture weights.

    Parameters
    ----------
    centre : ndarray
        Trace centre (binned across px) per row.
    slit_length : float
        Aperture full width (binned px).

    Returns
    -------
    first : ndarray of int
        Across index of each row's first window pixel.
    offset : ndarray
        ``u``: window pixel centre minus trace centre, (rows, ncol).
    weight : ndarray
        Fraction of each window pixel inside the aperture, (rows, ncol).
    """
    centre = np.asarray(centre, np.float64)
    half = 0.5 * float(slit_length)
    ncol = int(np.ceil(2 * half)) + 1
    first = np.floor(centre - half + 0.5).astype(np.int64)
    cols = first[:, None] + np.arange(ncol)[None, :]
    lo = np.maximum(cols - 0.5, (centre - half)[:, None])
    hi = np.minimum(cols + 0.5, (centre + half)[:, None])
    weight = np.clip(hi - lo, 0.0, 1.0)
    return first, cols - centre[:, None], weight


def _gather(image: np.ndarray | float | None, rows: np.ndarray, first: np.ndarray, ncol: int,
            fill: float = 0.0, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Window values of an along-view image (``fill`` off the frame) and the on-frame mask."""
    cols = first[:, None] + np.arange(ncol)[None, :]
    if image is None or np.ndim(image) == 0:
        value = fill if image is None else float(image)
        n_across = None
        out = np.full(cols.shape, value, dtype)
        return out, np.ones(cols.shape, bool)
    n_across = image.shape[1]
    inside = (cols >= 0) & (cols < n_across)
    out = np.asarray(image[rows[:, None], np.clip(cols, 0, n_across - 1)], dtype)
    out[~inside] = fill
    return out, inside


# ----------------------------------------------------------------------------- profile
def _bspline_local(u: np.ndarray, u0: float, spacing: float, n_int: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Interval index and the 4 non-zero uniform cubic B-spline values at ``u``."""
    s = (u - u0) / spacing
    t = np.clip(np.floor(s).astype(np.int64), 0, n_int - 1)
    x = np.clip(s - t, 0.0, 1.0)
    x2, x3 = x * x, x * x * x
    b = np.stack([(1 - x) ** 3, 3 * x3 - 6 * x2 + 4, -3 * x3 + 3 * x2 + 3 * x + 1, x3],
                 axis=-1) / 6.0
    return t, b


def _legendre(yn: np.ndarray, degree: int) -> np.ndarray:
    """Legendre polynomials 0..degree at ``yn`` in [-1, 1], (n, degree + 1)."""
    out = np.empty(yn.shape + (degree + 1,))
    out[..., 0] = 1.0
    if degree >= 1:
        out[..., 1] = yn
    for m in range(2, degree + 1):
        out[..., m] = ((2 * m - 1) * yn * out[..., m - 1] - (m - 1) * out[..., m - 2]) / m
    return out


def _neighbour_median(values: np.ndarray, half: int) -> np.ndarray:
    """Median of the finite values within ``half`` rows of each row, the row itself left
    out (its own noise must not enter the scale of its profile model)."""
    n = values.size
    pad = np.concatenate([np.full(half, np.nan), values, np.full(half, np.nan)])
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * half + 1)
    win = np.delete(win, half, axis=1)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = np.nanmedian(win, axis=1)
    return np.where(np.isfinite(out), out, 0.0)[:n]


@dataclass
class SpatialProfile:
    """A smooth spatial profile of one order (see the module docstring).

    The fitted rows are split into two interleaved halves (even and odd positions in
    ``rows``); ``coefficients[s]`` is fitted on half ``s`` alone and gives the profile of the
    *other* half's rows, so that no row's profile depends on that row's own noise (with many
    free coefficients and a faint source, a profile fitted on a row's own pixels follows their
    noise and biases the optimal flux high).

    Attributes
    ----------
    rows : ndarray of int
        Along indices it was fitted on.
    centre : ndarray
        Trace centre (binned across px) at those rows.
    slit_length : float
        Aperture full width (binned px).
    u0, spacing : float
        First knot and knot spacing (px) of the B-splines in the offset from the trace.
    n_intervals : int
        Number of knot intervals.
    y_range : tuple of float
        Along coordinates mapped to -1 and +1 for the Legendre polynomials.
    coefficients : ndarray
        (2, n_intervals + 3, degree + 1) coefficients of the two halves.
    penalty : float
        Chosen relative smoothness penalty (cross-validated between the halves).
    template : ndarray
        (2, n_intervals + 3) B-spline coefficients of the Moffat template fitted on each
        half (no variation along the order).
    weight : float
        Weight of the free (spline) profile against the template, in [0, 1].
    clipped : ndarray of bool
        Window pixels (rows, ncol) rejected from the fit as outliers.
    n_fits : int
        Fits made (clipping iterations).
    flux_scale : ndarray
        The neighbour-median boxcar flux per row used to scale the model.
    """

    rows: np.ndarray
    centre: np.ndarray
    slit_length: float
    u0: float
    spacing: float
    n_intervals: int
    y_range: tuple[float, float]
    coefficients: np.ndarray
    penalty: float
    template: np.ndarray
    weight: float
    clipped: np.ndarray
    n_fits: int
    flux_scale: np.ndarray

    @property
    def degree(self) -> int:
        return self.coefficients.shape[2] - 1

    @property
    def half(self) -> np.ndarray:
        """Half (0 or 1) each fitted row belongs to."""
        return np.arange(self.rows.size) % 2

    def window(self, centre: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`aperture_window` of ``centre`` (default: the fitted rows')."""
        return aperture_window(self.centre if centre is None else centre, self.slit_length)

    def _coefficients(self, rows: np.ndarray | None, which: str
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and per-row coefficients (rows, K, M) of the spline or the template: for the
        fitted rows (``rows`` None) each from the other half's fit, else the mean of both."""
        coef = self.coefficients if which == "spline" else self.template[:, :, None]
        if rows is None:
            return self.rows, coef[1 - self.half]
        rows = np.asarray(rows)
        return rows, np.broadcast_to(coef.mean(axis=0), (rows.size,) + coef.shape[1:])

    def shape_model(self, rows: np.ndarray | None = None, centre: np.ndarray | None = None,
                    which: str = "spline") -> np.ndarray:
        """``g(u, y)`` of the spline (or, ``which="template"``, of the template) on the
        window: not clipped at zero, not normalised.

        For the fitted rows (the default) each row's value comes from the other half's fit;
        for other ``rows`` (with their ``centre``) from the mean of both.
        """
        rows, coef = self._coefficients(rows, which)
        return _shape_with(self, coef, rows, centre)

    def _normalised(self, g: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
        g = np.maximum(g, 0.0)
        _, _, a = self.window(centre)
        norm = (a * g).sum(axis=1)
        with np.errstate(all="ignore"):
            return np.where(norm[:, None] > 0, g / norm[:, None], 0.0)

    def evaluate(self, rows: np.ndarray | None = None, centre: np.ndarray | None = None
                 ) -> np.ndarray:
        """Normalised profile ``P`` (>= 0, ``sum_j a_ij P_ij = 1`` per row) on the window
        (rows, ncol): ``weight`` times the spline's plus ``1 - weight`` times the template's
        (each clipped at zero and normalised); a row without positive profile is all zero."""
        p = self._normalised(self.shape_model(rows, centre), centre)
        if self.weight < 1.0:
            p = self.weight * p + (1.0 - self.weight) * self._normalised(
                self.shape_model(rows, centre, "template"), centre)
        return p


def _solve_banded_spd(mat: np.ndarray, rhs: np.ndarray, bandwidth: int) -> np.ndarray:
    """Solve a symmetric positive-definite system whose non-zeros lie within ``bandwidth``
    of the diagonal (banded Cholesky; a general solve if it is not positive definite)."""
    from scipy.linalg import LinAlgError, solveh_banded

    n = mat.shape[0]
    bw = min(bandwidth, n - 1)
    ab = np.zeros((bw + 1, n))
    for offset in range(bw + 1):  # upper form: ab[bw - offset, j] = mat[j - offset, j]
        ab[bw - offset, offset:] = np.diagonal(mat, offset)
    try:
        return solveh_banded(ab, rhs, lower=False, check_finite=False)
    except (LinAlgError, ValueError):
        return np.linalg.lstsq(mat, rhs, rcond=None)[0]


#: Relative second-difference penalties tried (cross-validated between the two halves).
PENALTIES = (1e-4, 1e-2, 1.0)

def _moffat_pixels(x: np.ndarray, amp: float, mu: float, alpha: float, beta: float
                   ) -> np.ndarray:
    """``amp`` times the fraction of a 1-D Moffat ``(1 + ((x - mu) / alpha)^2)^-beta`` in
    the pixel ``[x - 0.5, x + 0.5]`` (exact, through the incomplete beta function)."""
    from scipy.special import betainc

    def cdf(v):
        v = v - mu
        return 0.5 + 0.5 * np.sign(v) * betainc(0.5, beta - 0.5, v * v / (alpha ** 2 + v * v))
    return amp * (cdf(x + 0.5) - cdf(x - 0.5))


def _fit_template(u: np.ndarray, w2: np.ndarray, wd: np.ndarray, half: float, u0: float,
                  spacing: float, n_int: int) -> np.ndarray:
    """B-spline coefficients (K,) of a pixel-integrated Moffat (free beta; a Gaussian in the
    limit) fitted to pixels at offsets ``u`` whose model is ``F g(u)``, given their
    ``w F^2`` (``w2``) and ``w F D`` (``wd``); zeros if the fit fails.

    The pixels are binned in 0.05 px of ``u``: the weighted least squares of ``F g(u)`` to
    the data is then the weighted fit of ``sum(wd) / sum(w2)`` per bin with weights
    ``sum(w2)`` (exact for ``g`` constant within a bin).
    """
    from scipy.optimize import curve_fit

    kn = n_int + 3
    edges = np.arange(u0, u0 + n_int * spacing + 0.05, 0.05)
    idx = np.clip(np.searchsorted(edges, u) - 1, 0, edges.size - 2)
    sw = np.bincount(idx, w2, edges.size - 1)
    sd = np.bincount(idx, wd, edges.size - 1)
    su = np.bincount(idx, w2 * u, edges.size - 1)
    ok = sw > 0
    out = np.zeros(kn)
    if ok.sum() < 8:
        return out
    x, y, sig = su[ok] / sw[ok], sd[ok] / sw[ok], 1.0 / np.sqrt(sw[ok])
    inner = np.abs(x) <= 0.5 * half
    if not inner.any():
        return out
    peak = int(np.argmax(np.where(inner, y, -np.inf)))
    try:
        pars, _ = curve_fit(_moffat_pixels, x, y, sigma=sig,
                            p0=(max(y[peak], 1e-3) * 3.0, x[peak], 2.0, 3.0),
                            bounds=([0.0, -half, 0.2, 1.1], [np.inf, half, 4 * half, 50.0]),
                            maxfev=4000)
    except (RuntimeError, ValueError):
        return out
    if not np.all(np.isfinite(pars)):
        return out
    grid = np.linspace(u0, u0 + n_int * spacing, 8 * n_int + 1)
    t, b = _bspline_local(grid, u0, spacing, n_int)
    basis = np.zeros((grid.size, kn))
    for a in range(4):
        basis[np.arange(grid.size), t + a] = b[:, a]
    return np.linalg.lstsq(basis, _moffat_pixels(grid, *pars), rcond=None)[0]


def _degrees(max_degree: int) -> list[int]:
    """Degrees along the order tried by the cross-validation."""
    return sorted({d for d in (0, 1, 2, 3, 5, max_degree) if d <= max_degree})


def fit_spatial_profile(data_t: np.ndarray, variance_t: np.ndarray, qual_t: np.ndarray | None,
                        centre: np.ndarray, slit_length: float, poly_order: int,
                        clip_sigma: float, clip_iterations: int, *,
                        rows: np.ndarray | None = None,
                        poisson_scale_t: np.ndarray | float | None = None,
                        knot_spacing: float = 0.5) -> SpatialProfile:
    """Fit the smooth spatial profile of one order (see the module docstring).

    The degree along the order (at most ``poly_order``) and the smoothness penalty across it
    are chosen by cross-validation between the two interleaved halves of the rows (each half's
    fit predicting the other half's pixels): a faint source gets a simpler profile than the
    data of a bright one support.

    Parameters
    ----------
    data_t : ndarray
        Along view of the sky-subtracted frame (e-).
    variance_t : ndarray
        Its variance (e-^2); with ``poisson_scale_t``, the base variance (everything but the
        object's own photon noise) to which ``poisson_scale_t * model`` is added.
    qual_t : ndarray or None
        QUAL (along view); non-zero pixels are left out.
    centre : ndarray
        Trace centre (binned across px) at each row of ``rows``.
    slit_length : float
        Aperture full width (binned px).
    poly_order : int
        Highest degree of the Legendre polynomials along the order (lowered for short
        orders: at least 20 rows per coefficient).
    clip_sigma : float
        Rejection limit, in robust standard deviations of the normalised residuals.
    clip_iterations : int
        Maximum number of fits.
    rows : ndarray of int, optional
        Along indices of ``centre`` (default ``0 .. len(centre) - 1``).
    poisson_scale_t : ndarray or float, optional
        Object photon-variance factor per pixel (1 without a flat, 1/flat with one).
    knot_spacing : float
        B-spline knot spacing in the offset from the trace (binned px).

    Returns
    -------
    SpatialProfile
    """
    centre = np.asarray(centre, np.float64)
    rows = np.arange(centre.size) if rows is None else np.asarray(rows, np.int64)
    if rows.shape != centre.shape or rows.ndim != 1:
        raise ValueError("rows and centre must be 1-D arrays of the same length")
    if rows.size < 4:
        raise ValueError("at least 4 rows are needed to fit a profile")
    first, u, a = aperture_window(centre, slit_length)
    ncol = u.shape[1]
    d, inside = _gather(data_t, rows, first, ncol)
    var, _ = _gather(variance_t, rows, first, ncol)
    q, _ = _gather(qual_t, rows, first, ncol, dtype=np.int64)
    k, _ = (_gather(poisson_scale_t, rows, first, ncol) if poisson_scale_t is not None
            else (None, None))
    usable = inside & (q == 0) & np.isfinite(d) & np.isfinite(var) & (var >= 0) & (a > 0)
    if k is not None:
        usable &= np.isfinite(k)
    d = np.where(usable, d, 0.0)
    var = np.where(usable, var, 1.0)

    nrow = rows.size
    half_of = np.arange(nrow) % 2
    box = np.where(usable, a * d, 0.0).sum(axis=1)
    box_err = np.sqrt(np.where(usable, a * a * (var if k is None
                                                else var + k * np.maximum(d, 0.0)), 0.0
                               ).sum(axis=1))
    # the scale's own noise attenuates the fitted profile by F^2 / (F^2 + var(scale)), which
    # changes along the order with the signal: the window is widened until the scale has
    # a signal-to-noise ratio of about FLUX_SCALE_SNR (faint sources), so that the
    # polynomials along the order describe the profile rather than this attenuation
    with np.errstate(all="ignore"):
        snr_row = float(np.median(box) / np.median(box_err[box_err > 0])) \
            if np.any(box_err > 0) else np.inf
    need = (1.25 * FLUX_SCALE_SNR / snr_row) ** 2 if snr_row > 0 else np.inf
    half_window = int(np.clip(np.ceil(need / 4.0), FLUX_HALF_WINDOW // 2,
                              max(FLUX_HALF_WINDOW // 2, nrow // 16)))
    scale = np.zeros(nrow)
    for s in (0, 1):  # each half scaled by its own rows only: the halves stay independent
        scale[half_of == s] = _neighbour_median(box[half_of == s], half_window)
    max_degree = int(max(0, min(int(poly_order), nrow // 20 - 1)))
    m = max_degree + 1
    half = 0.5 * float(slit_length)
    u0 = -half - 0.5 - 1e-9
    n_int = max(1, int(np.ceil((2 * half + 1.0 + 2e-9) / knot_spacing)))
    kn = n_int + 3
    y0, y1 = float(rows.min()), float(rows.max())
    yn = 2.0 * (rows - y0) / max(y1 - y0, 1.0) - 1.0
    leg = _legendre(yn, max_degree)

    # usable pixels, sorted by half then knot interval
    pr, pc = np.nonzero(usable & (scale[:, None] != 0))
    ps = half_of[pr]
    t, b = _bspline_local(u[pr, pc], u0, knot_spacing, n_int)
    order = np.lexsort((t, ps))
    pr, pc, ps, t, b = pr[order], pc[order], ps[order], t[order], b[order]
    bounds = [np.searchsorted(t[ps == s], np.arange(n_int + 1)) + np.searchsorted(ps, s)
              for s in (0, 1)]
    z = (scale[pr, None, None] * b[:, :, None] * leg[pr, None, :]).reshape(pr.size, 4 * m)
    dp = d[pr, pc]
    base = var[pr, pc]
    kp = None if k is None else k[pr, pc]
    cidx = ((t[:, None] + np.arange(4)[None, :]) * m)[:, :, None] + np.arange(m)[None, None, :]
    cidx = cidx.reshape(pr.size, 4 * m)                 # coefficient index of each z column

    d2 = np.diff(np.eye(kn), 2, axis=0)
    pen_u = d2.T @ d2
    pens: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def normal(s: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Normal matrix, right-hand side and weighted data square sum of half ``s``."""
        mat = np.zeros((kn * m, kn * m))
        rhs = np.zeros(kn * m)
        bnd = bounds[s]
        for ti in range(n_int):
            s0, s1 = bnd[ti], bnd[ti + 1]
            if s1 <= s0:
                continue
            g = z[s0:s1]
            wg = g * w[s0:s1, None]
            sl = slice(ti * m, (ti + 4) * m)
            mat[sl, sl] += g.T @ wg
            rhs[sl] += wg.T @ dp[s0:s1]
        o = seg[s]
        return mat, rhs, float((w[o] * dp[o] ** 2).sum())

    def solve(mat: np.ndarray, rhs: np.ndarray, degree: int, lam_rel: float) -> np.ndarray:
        """Coefficients (K * (max_degree + 1),) of degree ``degree`` (higher terms zero) with
        the second-difference penalty ``lam_rel`` (relative to the mean diagonal)."""
        if degree not in pens:
            pens[degree] = (np.flatnonzero((np.arange(kn * m) % m) <= degree),
                            np.kron(pen_u, np.eye(degree + 1)))
        sel, pen = pens[degree]
        sub = mat[np.ix_(sel, sel)] if degree < max_degree else mat.copy()
        diag = np.diag(sub)
        scale_d = diag[diag > 0].mean() if np.any(diag > 0) else 1.0
        lhs = sub + (lam_rel * scale_d) * pen
        lhs[np.diag_indices_from(lhs)] += 1e-12 * scale_d
        out = np.zeros(kn * m)
        out[sel] = _solve_banded_spd(lhs, rhs[sel], 4 * (degree + 1) - 1)
        return out

    def predict(coef: np.ndarray, where: slice) -> np.ndarray:
        return np.einsum("pj,pj->p", z[where], coef[cidx[where]])

    seg = [slice(int(np.searchsorted(ps, 0)), int(np.searchsorted(ps, 1))),
           slice(int(np.searchsorted(ps, 1)), pr.size)]
    keep = np.ones(pr.size, bool)
    model = None
    coef = np.zeros((2, kn * m))
    choice = (0, PENALTIES[0])
    n_fits = 0
    w = np.zeros(pr.size)
    for n_fits in range(1, max(1, int(clip_iterations)) + 1):
        level = dp if model is None else model
        v = base if kp is None else base + kp * np.maximum(level, 0.0)
        w = np.where(keep, 1.0 / np.maximum(v, VAR_FLOOR), 0.0)
        systems = [normal(s, w) for s in (0, 1)]
        # cross-validation (on the first fit: clipping hardly changes the choice): each
        # half's fit predicts the other half; its weighted squared error is a quadratic form
        # of the other half's normal equations (no pixel loop).  Candidates from the
        # simplest (lowest degree, most smoothed) up; the simplest one whose score is within
        # one standard error of the best is taken (the minimum of noisy scores among many
        # candidates would follow a faint source's noise).
        cands = []
        for degree in (_degrees(max_degree) if n_fits == 1 else ()):
            for lam_rel in PENALTIES[::-1]:
                cs = [solve(*systems[s][:2], degree, lam_rel) for s in (0, 1)]
                score = 0.0
                for s in (0, 1):
                    mat_o, rhs_o, dd_o = systems[1 - s]
                    score += dd_o - 2.0 * cs[s] @ rhs_o + cs[s] @ (mat_o @ cs[s])
                cands.append((score, (degree, lam_rel), cs))
        best = min(range(len(cands)), key=lambda i: cands[i][0]) if cands else 0
        for score, params, cs in cands:
            # the score difference's noise: twice the rms difference of the predictions
            spread = sum(float(dc @ (systems[1 - s][0] @ dc)) for s, dc in
                         enumerate((cs[0] - cands[best][2][0], cs[1] - cands[best][2][1])))
            if score - cands[best][0] <= 2.0 * np.sqrt(max(spread, 0.0)):
                choice = params
                break
        for s in (0, 1):
            coef[s] = solve(*systems[s][:2], *choice)
        model = np.empty(pr.size)
        for s in (0, 1):  # each pixel's model from the other half's fit
            model[seg[s]] = predict(coef[1 - s], seg[s])
        if kp is not None:
            v = base + kp * np.maximum(model, 0.0)
        resid = (dp - model) / np.sqrt(np.maximum(v, VAR_FLOOR))
        kept = resid[keep]
        if kept.size < 2:
            break
        mid = np.median(kept)
        sigma = MAD_TO_SIGMA * np.median(np.abs(kept - mid))
        new_keep = keep & (np.abs(resid - mid) <= clip_sigma * max(sigma, 1e-12))
        if np.array_equal(new_keep, keep) and (kp is None or n_fits >= 2):
            break
        keep = new_keep

    clipped = np.zeros(u.shape, bool)
    clipped[pr[~keep], pc[~keep]] = True
    degree, lam_rel = choice
    coef = coef.reshape(2, kn, m)
    # the Moffat template from the same weighted pixels of the whole order: its four
    # parameters hardly depend on any one row, and a width error shifts every row's optimal
    # flux the same way (by about half the relative error), so it is fitted on all the data
    up, sp = u[pr, pc], scale[pr]
    template = np.repeat(_fit_template(up, w * sp ** 2, w * sp * dp, half, u0, knot_spacing,
                                       n_int)[None, :], 2, axis=0)
    profile = SpatialProfile(rows=rows, centre=centre, slit_length=float(slit_length), u0=u0,
                             spacing=float(knot_spacing), n_intervals=n_int, y_range=(y0, y1),
                             coefficients=coef[:, :, :degree + 1].copy(),
                             penalty=float(lam_rel), template=template, weight=1.0,
                             clipped=clipped, n_fits=n_fits, flux_scale=scale)
    profile.weight = _spline_weight(profile)
    return profile


def _spline_weight(profile: SpatialProfile) -> float:
    """Weight of the spline profile against the template (James-Stein shrinkage).

    The noise of a profile biases the optimal flux low by about ``sum(dP^2) / sum(P^2)``.
    The two halves' independent spline fits measure that noise (their difference has twice
    its variance); their distance from the template is the template's misfit plus that
    noise.  The weight ``1 - noise / distance`` (within [0, 1]) keeps a bright source's
    profile as measured and gives a faint one the template's shape.
    """
    if not np.any(profile.template):
        return 1.0
    _, _, a = profile.window()
    rows, coef = profile.rows, profile.coefficients
    p = [profile._normalised(_shape_with(profile, np.broadcast_to(coef[s], (rows.size,)
                                                                  + coef.shape[1:])), None)
         for s in (0, 1)]
    tpl = profile._normalised(profile.shape_model(which="template"), None)
    own = np.where(profile.half[:, None] == 1, p[0], p[1])      # the profile each row gets
    inside = a > 0
    noise = 0.5 * float(np.mean(np.where(inside, (p[0] - p[1]) ** 2, 0.0).sum(axis=1)))
    distance = float(np.mean(np.where(inside, (own - tpl) ** 2, 0.0).sum(axis=1)))
    if not distance > 0:
        return 1.0
    return float(np.clip(1.0 - noise / distance, 0.0, 1.0))


def _shape_with(profile: SpatialProfile, coef: np.ndarray, rows: np.ndarray | None = None,
                centre: np.ndarray | None = None) -> np.ndarray:
    """``g`` on the window of ``rows`` / ``centre`` (default: the fitted rows') with per-row
    coefficients ``coef`` (rows, K, M)."""
    rows = profile.rows if rows is None else rows
    _, u, _ = profile.window(centre)
    t, b = _bspline_local(u, profile.u0, profile.spacing, profile.n_intervals)
    y0, y1 = profile.y_range
    yn = np.clip(2.0 * (rows - y0) / max(y1 - y0, 1.0) - 1.0, -1.0, 1.0)
    leg = _legendre(yn.astype(np.float64), coef.shape[2] - 1)    # (rows, M)
    along = np.einsum("rkm,rm->rk", coef, leg)                   # (rows, K)
    ridx = np.arange(rows.size)[:, None]
    g = np.zeros(u.shape)
    for a in range(4):
        g += b[..., a] * along[ridx, t + a]
    return g


# ----------------------------------------------------------------------------- rows
def extract_rows_reference(data: np.ndarray, base_var: np.ndarray, pscale: np.ndarray,
                           profile: np.ndarray, aperture: np.ndarray, state: np.ndarray,
                           reject_sigma: float, profile_error: float, max_iter: int,
                           tol: float) -> dict[str, np.ndarray]:
    """Per-row optimal and boxcar extraction (pure-numpy twin of the ``_horne`` kernel).

    Parameters
    ----------
    data, base_var, pscale, profile, aperture : ndarray
        (rows, ncol) window values: data (e-), base variance (e-^2), photon-variance factor,
        normalised profile and aperture weights.
    state : ndarray of uint8
        0 not measured, 1 measured but masked (plain boxcar only), 2 usable.
    reject_sigma, profile_error : float
        Rejection limit and fractional profile error (module docstring).
    max_iter : int
        Iteration limit (rejections plus convergence steps).
    tol : float
        Convergence: change of ``f`` below ``tol`` times its standard deviation.

    Returns
    -------
    dict
        ``flux_opt, var_opt, flux_box, var_box, flux_rob, var_rob, fraction`` (float64 per
        row), ``n_rej`` (int32 per row) and ``rejected`` (uint8, (rows, ncol)).
    """
    data = np.asarray(data, np.float64)
    nrow, ncol = data.shape
    thr2 = float(reject_sigma) ** 2
    usable = state == 2
    rej = np.zeros((nrow, ncol), bool)
    sa = np.where(usable, aperture * profile, 0.0).sum(axis=1)
    sd = np.where(usable, aperture * data, 0.0).sum(axis=1)
    with np.errstate(all="ignore"):
        f = np.where(sa > 0, sd / np.where(sa > 0, sa, 1.0), 0.0)
    active = np.ones(nrow, bool)
    ok = np.ones(nrow, bool)
    n_rej = np.zeros(nrow, np.int32)
    rows_idx = np.arange(nrow)

    def var(level):
        v = base_var + pscale * np.maximum(level, 0.0)
        return np.where(v > VAR_FLOOR, v, VAR_FLOOR)

    def sums(fv, where):
        v = var(fv[:, None] * profile)
        use = where & ~rej & (profile > 0)
        s1 = np.where(use, profile * data / v, 0.0).sum(axis=1)
        s2 = np.where(use, profile * profile / v, 0.0).sum(axis=1)
        return s1, s2

    for _ in range(int(max_iter)):
        if not active.any():
            break
        s1, s2 = sums(f, usable & active[:, None])
        bad = active & ~(s2 > 0)
        ok[bad] = False
        active &= ~bad
        with np.errstate(all="ignore"):
            fn = np.where(active, s1 / np.where(s2 > 0, s2, 1.0), f)
        p = profile
        v = var(fn[:, None] * p)
        e = profile_error * fn[:, None] * p
        r = data - fn[:, None] * p
        qv = r * r / (v + e * e)
        cand = usable & ~rej & active[:, None]
        qv = np.where(cand, qv, -np.inf)
        worst = np.argmax(qv, axis=1)          # first maximum, as the kernel's strict '>'
        hit = active & (qv[rows_idx, worst] > thr2)
        rej[rows_idx[hit], worst[hit]] = True
        n_rej[hit] += 1
        with np.errstate(all="ignore"):
            conv = active & ~hit & (np.abs(fn - f) <= tol / np.sqrt(np.where(s2 > 0, s2, 1)))
        f = np.where(active, fn, f)
        active &= ~conv

    s1, s2 = sums(f, usable & ok[:, None])
    good = s2 > 0
    with np.errstate(all="ignore"):
        flux_opt = np.where(good, s1 / np.where(good, s2, 1.0), np.nan)
        var_opt = np.where(good, 1.0 / np.where(good, s2, 1.0), np.nan)
    fpos = np.where(good & (flux_opt > 0), flux_opt, 0.0)
    v = var(fpos[:, None] * profile)
    meas = state > 0
    use = usable & ~rej
    flux_box = np.where(meas, aperture * data, 0.0).sum(axis=1)
    var_box = np.where(meas, aperture * aperture * v, 0.0).sum(axis=1)
    r1 = np.where(use, aperture * data, 0.0).sum(axis=1)
    r2 = np.where(use, aperture * aperture * v, 0.0).sum(axis=1)
    fraction = np.where(use, aperture * profile, 0.0).sum(axis=1)
    with np.errstate(all="ignore"):
        flux_rob = np.where(fraction > 0, r1 / fraction, np.nan)
        var_rob = np.where(fraction > 0, r2 / (fraction * fraction), np.nan)
    return dict(flux_opt=flux_opt, var_opt=var_opt, flux_box=flux_box, var_box=var_box,
                flux_rob=flux_rob, var_rob=var_rob, fraction=fraction, n_rej=n_rej,
                rejected=rej.astype(np.uint8))


def extract_rows(data: np.ndarray, base_var: np.ndarray, pscale: np.ndarray,
                 profile: np.ndarray, aperture: np.ndarray, state: np.ndarray,
                 reject_sigma: float, profile_error: float, max_iter: int, tol: float,
                 use_kernel: bool = True, threads: int | None = None) -> dict[str, np.ndarray]:
    """:func:`extract_rows_reference` by the Cython kernel (``use_kernel``, when built) or by
    the numpy twin; same arguments and result."""
    args = [np.ascontiguousarray(x, np.float64) for x in (data, base_var, pscale, profile,
                                                          aperture)]
    state = np.ascontiguousarray(state, np.uint8)
    if use_kernel:
        try:
            from soxs_core import _horne
        except ImportError:  # pragma: no cover - the kernel is part of the build
            use_kernel = False
    if not use_kernel:
        return extract_rows_reference(*args, state, reject_sigma, profile_error, max_iter,
                                      tol)
    nrow, ncol = args[0].shape
    out = {name: np.empty(nrow) for name in ("flux_opt", "var_opt", "flux_box", "var_box",
                                             "flux_rob", "var_rob", "fraction")}
    out["n_rej"] = np.empty(nrow, np.int32)
    out["rejected"] = np.empty((nrow, ncol), np.uint8)
    _horne.extract_rows(*args, state, float(reject_sigma), float(profile_error),
                        int(max_iter), float(tol), out["flux_opt"], out["var_opt"],
                        out["flux_box"], out["var_box"], out["flux_rob"], out["var_rob"],
                        out["fraction"], out["n_rej"], out["rejected"],
                        num_threads=default_threads(threads))
    return out


# ----------------------------------------------------------------------------- order
@dataclass
class OrderExtraction:
    """Extraction of one order: per-row arrays (one value per extracted along row).

    Attributes
    ----------
    rows : ndarray of int
        Along indices (binned).
    centre : ndarray
        Trace centre (binned across px).
    flux_optimal, var_optimal : ndarray
        Optimal flux (e-, the object's light in the aperture) and its variance (e-^2).
    flux_boxcar, var_boxcar : ndarray
        Plain boxcar sum over the aperture and its variance.
    flux_boxcar_robust, var_boxcar_robust : ndarray
        Boxcar over the usable, unrejected pixels scaled by the profile fraction they cover.
    sky : ndarray
        Mean sky model (e- per pixel) over the aperture.
    n_rejected : ndarray of int
        Pixels rejected by the optimal extraction.
    qual : ndarray of uint8
        0 = usable row, :data:`ROW_UNUSABLE` otherwise.
    profile_fraction : ndarray
        Fraction of the row's profile on usable, unrejected pixels.
    first : ndarray of int
        Across index of each row's first window pixel.
    rejected : ndarray of bool
        Window pixels (rows, ncol) rejected by the optimal extraction (cosmic rays, bad
        pixels the QUAL plane missed).
    profile : SpatialProfile
        The fitted profile (on the rows with a finite trace centre: its ``rows`` may be a
        subset of these).
    """

    rows: np.ndarray
    centre: np.ndarray
    flux_optimal: np.ndarray
    var_optimal: np.ndarray
    flux_boxcar: np.ndarray
    var_boxcar: np.ndarray
    flux_boxcar_robust: np.ndarray
    var_boxcar_robust: np.ndarray
    sky: np.ndarray
    n_rejected: np.ndarray
    qual: np.ndarray
    profile_fraction: np.ndarray
    first: np.ndarray
    rejected: np.ndarray
    profile: SpatialProfile = field(repr=False)

    @property
    def snr(self) -> np.ndarray:
        """Optimal flux over its standard deviation."""
        with np.errstate(all="ignore"):
            return self.flux_optimal / np.sqrt(self.var_optimal)

    def rejected_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(along, across) indices of the rejected pixels in the along view."""
        r, c = np.nonzero(self.rejected)
        return self.rows[r], self.first[r] + c

    def mark_rejected(self, mask_t: np.ndarray) -> None:
        """Set ``mask_t`` (an along-view boolean image) True at the rejected pixels."""
        r, c = self.rejected_pixels()
        ok = (c >= 0) & (c < mask_t.shape[1])
        mask_t[r[ok], c[ok]] = True


def extract_order(data_t: np.ndarray, base_variance_t: np.ndarray,
                  poisson_scale_t: np.ndarray | float | None, qual_t: np.ndarray | None,
                  sky_t: np.ndarray | None, centre: np.ndarray, rows: np.ndarray,
                  slit_length: float, profile_poly_order: int = 7,
                  profile_clipping_sigma: float = 3.0,
                  profile_clipping_iteration_count: int = 10, reject_sigma: float = 5.0,
                  use_kernel: bool = True, *, profile_error: float = 0.03,
                  min_profile_fraction: float = 0.5, knot_spacing: float = 0.5,
                  threads: int | None = None, sky_error_t: np.ndarray | None = None
                  ) -> OrderExtraction:
    """Optimal and boxcar extraction of one order (see the module docstring).

    Parameters
    ----------
    data_t : ndarray
        Along view of the sky- (and background-) subtracted frame (e-).
    base_variance_t : ndarray
        Variance of everything but the object's own photon noise (e-^2): read noise,
        sky/background photon noise from their models, model and calibration errors.
    poisson_scale_t : ndarray, float or None
        Factor ``k`` of the object's photon variance ``k * model`` (1 without a flat,
        1/flat with one); None means 1.
    qual_t : ndarray or None
        QUAL; pixels with any bit set are left out of the optimal extraction.
    sky_t : ndarray or None
        Sky model (e- per pixel), for the reported ``sky``.
    centre : ndarray
        Trace centre (binned across px) at each of ``rows``.
    rows : ndarray of int
        Along indices to extract.
    slit_length : float
        Aperture full width (binned px).
    profile_poly_order, profile_clipping_sigma, profile_clipping_iteration_count
        Profile fit (:func:`fit_spatial_profile`).
    reject_sigma : float
        Pixel rejection limit of the optimal extraction.
    use_kernel : bool
        Cython kernel (True) or its numpy twin.
    profile_error : float
        Fractional profile error allowed for in the rejection test only.
    min_profile_fraction : float
        A row whose usable pixels cover less of its profile is flagged.
    knot_spacing : float
        Profile knot spacing (binned px).
    threads : int, optional
        Kernel threads (default :func:`~soxs_core.combine.stacking.default_threads`).
    sky_error_t : ndarray, optional
        Along view of the sky model's error (e-), which ``base_variance_t`` holds pixel by
        pixel.  The model's error is shared by the pixels of a row (one spline value at
        one wavelength), so it adds to a row's sum coherently: the variances get the
        difference (:func:`coherent_excess`).

    Returns
    -------
    OrderExtraction
    """
    rows = np.asarray(rows, np.int64)
    centre = np.asarray(centre, np.float64)
    if rows.ndim != 1 or rows.shape != centre.shape:
        raise ValueError("rows and centre must be 1-D arrays of the same length")
    finite = np.isfinite(centre)
    if not finite.all():
        # rows without a trace position are returned unusable (NaN fluxes); the others are
        # extracted as usual (the profile is fitted on them alone)
        if finite.sum() < 4:
            raise ValueError("the trace centre is finite at fewer than 4 extracted rows")
        sub = extract_order(data_t, base_variance_t, poisson_scale_t, qual_t, sky_t,
                            centre[finite], rows[finite], slit_length, profile_poly_order,
                            profile_clipping_sigma, profile_clipping_iteration_count,
                            reject_sigma, use_kernel, profile_error=profile_error,
                            min_profile_fraction=min_profile_fraction,
                            knot_spacing=knot_spacing, threads=threads,
                            sky_error_t=sky_error_t)
        return _expanded(sub, rows, centre, finite)
    if rows.size and (rows.min() < 0 or rows.max() >= data_t.shape[0]):
        raise ValueError("rows outside the frame")
    if not slit_length > 0:
        raise ValueError("slit_length must be positive")
    scale = 1.0 if poisson_scale_t is None else poisson_scale_t
    profile = fit_spatial_profile(
        data_t, base_variance_t, qual_t, centre, slit_length, profile_poly_order,
        profile_clipping_sigma, profile_clipping_iteration_count, rows=rows,
        poisson_scale_t=scale, knot_spacing=knot_spacing)
    first, _, a = profile.window()
    ncol = a.shape[1]
    p = profile.evaluate()
    d, inside = _gather(data_t, rows, first, ncol)
    vb, _ = _gather(base_variance_t, rows, first, ncol)
    k, _ = _gather(scale, rows, first, ncol, fill=1.0)
    q, _ = _gather(qual_t, rows, first, ncol, dtype=np.int64)
    measured = inside & np.isfinite(d) & np.isfinite(vb) & (vb >= 0) & np.isfinite(k)
    state = np.where(measured, np.where(q == 0, 2, 1), 0).astype(np.uint8)
    state[a <= 0] = 0
    d = np.where(measured, d, 0.0)
    vb = np.where(measured, vb, 0.0)
    k = np.where(measured, k, 0.0)
    res = extract_rows(d, vb, k, p, a, state, reject_sigma, profile_error,
                       max_iter=ncol + 20, tol=1e-6, use_kernel=use_kernel, threads=threads)
    if sky_error_t is not None:
        se, _ = _gather(sky_error_t, rows, first, ncol)
        se = np.where(measured & np.isfinite(se), se, 0.0)
        kept = (state == 2) & ~res["rejected"].astype(bool) & (p > 0)
        v = np.maximum(vb + k * np.maximum(res["flux_opt"][:, None] * p, 0.0), VAR_FLOOR)
        w_opt = np.where(kept, p / v, 0.0)
        norm = np.sum(w_opt * p, axis=1)
        with np.errstate(all="ignore"):
            w_opt = w_opt / np.where(norm > 0, norm, 1.0)[:, None]
            w_rob = np.where(kept, a, 0.0) / np.where(res["fraction"] > 0, res["fraction"],
                                                      1.0)[:, None]
        res["var_opt"] = res["var_opt"] + coherent_excess(w_opt, se)
        res["var_box"] = res["var_box"] + coherent_excess(np.where(state > 0, a, 0.0), se)
        res["var_rob"] = res["var_rob"] + coherent_excess(w_rob, se)
    if sky_t is None:
        sky = np.zeros(rows.size)
    else:
        s, _ = _gather(sky_t, rows, first, ncol)
        wa = np.where(measured & np.isfinite(s), a, 0.0)
        with np.errstate(all="ignore"):
            sky = (wa * np.where(wa > 0, s, 0.0)).sum(axis=1) / wa.sum(axis=1)
    qual = np.where((res["fraction"] >= min_profile_fraction)
                    & np.isfinite(res["flux_opt"]), 0, ROW_UNUSABLE).astype(np.uint8)
    return OrderExtraction(
        rows=rows, centre=centre, flux_optimal=res["flux_opt"], var_optimal=res["var_opt"],
        flux_boxcar=res["flux_box"], var_boxcar=res["var_box"],
        flux_boxcar_robust=res["flux_rob"], var_boxcar_robust=res["var_rob"], sky=sky,
        n_rejected=res["n_rej"], qual=qual, profile_fraction=res["fraction"], first=first,
        rejected=res["rejected"].astype(bool), profile=profile)


def coherent_excess(weights: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Variance a row's weighted sum ``sum w e`` gets from an error shared by its pixels
    beyond what it gets from independent ones: ``(sum w e)^2 - sum (w e)^2`` per row."""
    we = weights * error
    return np.sum(we, axis=1) ** 2 - np.sum(we * we, axis=1)


def moffat_fraction(lo: np.ndarray | float, hi: np.ndarray | float, centre: float,
                    alpha: float, beta: float) -> np.ndarray:
    """Fraction of a 1-D Moffat profile ``(1 + ((u - centre) / alpha)^2)^-beta`` (``beta``
    > 0.5) between ``lo`` and ``hi``, from its exact CDF."""
    from scipy.special import betainc

    def cdf(x):
        x = np.asarray(x, float) - centre
        return 0.5 + 0.5 * np.sign(x) * betainc(0.5, beta - 0.5, x * x / (alpha**2 + x * x))
    return cdf(hi) - cdf(lo)


#: Moffat index range accepted by :func:`profile_aperture_correction` (outside it the fit
#: describes something other than a seeing profile)
MOFFAT_BETA_RANGE = (1.05, 30.0)


@dataclass
class _SlitPixels:
    """The usable slit pixels of an order's rows (:func:`_slit_pixels`)."""

    centre: np.ndarray        # trace centre of each kept row
    cols: np.ndarray          # (rows, width) across index, clipped to the frame
    inside: np.ndarray        # within the row's edges
    data: np.ndarray
    var: np.ndarray
    good: np.ndarray          # inside, finite and unflagged
    complete: np.ndarray      # per row: every pixel inside is good


def _slit_pixels(data_t: np.ndarray, variance_t: np.ndarray, qual_t: np.ndarray | None,
                 centre: np.ndarray, rows: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                 margin: float) -> _SlitPixels | None:
    """Each row's pixels between ``lower + margin`` and ``upper - margin`` (the order's
    edges, binned across px), for the rows whose edges lie on the frame and whose trace
    centre is finite; None when there is none."""
    rows = np.asarray(rows, np.int64)
    centre = np.asarray(centre, float)
    lo = np.ceil(np.asarray(lower, float) + margin).astype(np.int64)
    hi = np.floor(np.asarray(upper, float) - margin).astype(np.int64)
    n_across = data_t.shape[1]
    ok = np.isfinite(centre) & (lo >= 0) & (hi < n_across) & (hi > lo)
    if not ok.any():
        return None
    rows, centre, lo, hi = rows[ok], centre[ok], lo[ok], hi[ok]
    width = int(np.max(hi - lo)) + 1
    cols = lo[:, None] + np.arange(width)[None, :]
    inside = cols <= hi[:, None]
    cols = np.minimum(cols, n_across - 1)
    d = data_t[rows[:, None], cols].astype(float)
    v = variance_t[rows[:, None], cols].astype(float)
    good = inside & np.isfinite(d) & np.isfinite(v)
    if qual_t is not None:
        good &= qual_t[rows[:, None], cols] == 0
    complete = np.all(good | ~inside, axis=1)
    return _SlitPixels(centre, cols, inside, d, v, good, complete)


def profile_aperture_correction(data_t: np.ndarray, variance_t: np.ndarray,
                                qual_t: np.ndarray | None, centre: np.ndarray,
                                rows: np.ndarray, slit_length: float, lower: np.ndarray,
                                upper: np.ndarray, margin: float = 1.0,
                                wing_extent: float = 3.0, bin_width: float = 0.25
                                ) -> tuple[float, float]:
    """Ratio of the object's light on the whole slit to the light in the aperture, from a
    model of the seeing profile.

    The order's mean spatial profile (offsets from the trace in bins of ``bin_width``
    binned px, over the rows whose slit pixels are all usable, within ``wing_extent``
    half-apertures: a ratio of sums over the rows, so faint rows add no bias) is fitted
    with a pixel-integrated 1-D Moffat profile plus a constant (what the sky subtraction
    left).  The correction is the inverse of the model's fraction inside the aperture.
    Summing the wings' pixels directly (:func:`aperture_correction`) adds every sky
    residual beside the trace: on a bright sky, a 0.3 % sky error over 30 px is as much
    light as the wings.  The core of the profile, which the fit rests on, is where the
    object outshines such residuals.

    Parameters
    ----------
    data_t, variance_t, qual_t, centre, rows, slit_length, lower, upper, margin, wing_extent
        As :func:`aperture_correction`.
    bin_width : float
        Offset bins (binned px) of the mean profile.

    Returns
    -------
    correction, error : float
        1 and 0 when the profile cannot be measured or the fit is not a seeing profile.
    """
    from scipy.optimize import least_squares

    half = 0.5 * float(slit_length)
    slit = _slit_pixels(data_t, variance_t, qual_t, centre, rows, lower, upper, margin)
    if slit is None or slit.centre.size < 10:
        return 1.0, 0.0
    centre, cols, inside, d, v = slit.centre, slit.cols, slit.inside, slit.data, slit.var
    good, complete = slit.good, slit.complete
    offset = cols - centre[:, None]
    a = np.clip(np.minimum(offset + 0.5, half) - np.maximum(offset - 0.5, -half), 0.0, 1.0)
    row_flux = np.sum(np.where(inside, a * np.where(good, d, 0.0), 0.0), axis=1)
    complete &= row_flux > 0
    if complete.sum() < 10:
        return 1.0, 0.0
    near = inside & complete[:, None] & (np.abs(offset) <= wing_extent * half)
    edges = np.arange(-wing_extent * half, wing_extent * half + bin_width, bin_width)
    b = np.clip(np.searchsorted(edges, offset[near], side="right") - 1, 0, edges.size - 2)
    nb = edges.size - 1
    norm = np.bincount(b, np.broadcast_to(row_flux[:, None], d.shape)[near], nb)
    sum_d = np.bincount(b, d[near], nb)
    sum_v = np.bincount(b, v[near], nb)
    filled = norm > 0
    if filled.sum() < 12:
        return 1.0, 0.0
    x = 0.5 * (edges[:-1] + edges[1:])[filled]
    y = sum_d[filled] / norm[filled]
    sy = np.sqrt(np.maximum(sum_v[filled], 1e-30)) / norm[filled]

    def model(q):
        total, c, alpha, beta, level = q
        return total * moffat_fraction(x - 0.5, x + 0.5, c, alpha, beta) + level

    core = np.abs(x) <= half
    fwhm0 = max(float(np.sum(y[core] > 0.5 * y.max())) * bin_width, 1.0)
    start = [1.0, 0.0, fwhm0 / 1.02, 3.0, 0.0]
    bounds = ([0.0, -half, 0.05, MOFFAT_BETA_RANGE[0], -np.inf],
              [np.inf, half, 10 * half, MOFFAT_BETA_RANGE[1], np.inf])
    try:
        fit = least_squares(lambda q: (model(q) - y) / sy, start, bounds=bounds,
                            x_scale="jac")
    except (ValueError, np.linalg.LinAlgError):
        return 1.0, 0.0
    total, c, alpha, beta, _ = fit.x
    if not (fit.success and MOFFAT_BETA_RANGE[0] < beta < MOFFAT_BETA_RANGE[1]):
        return 1.0, 0.0

    def correction(q):
        return 1.0 / float(moffat_fraction(-half, half, q[1], q[2], q[3]))

    value = correction(fit.x)
    # error: the fit's covariance through the correction's gradient (scaled by the fit's
    # reduced chi-squared when the bins scatter more than their errors say)
    try:
        jac = fit.jac
        cov = np.linalg.pinv(jac.T @ jac)
        dof = max(y.size - fit.x.size, 1)
        cov *= max(1.0, 2.0 * fit.cost / dof)
        grad = np.zeros(fit.x.size)
        for i in (1, 2, 3):
            step = 1e-4 * max(abs(fit.x[i]), 1e-3)
            q = fit.x.copy()
            q[i] += step
            grad[i] = (correction(q) - value) / step
        error = float(np.sqrt(max(grad @ cov @ grad, 0.0)))
    except np.linalg.LinAlgError:
        error = 0.0
    return value, error


def _expanded(sub: OrderExtraction, rows: np.ndarray, centre: np.ndarray,
              where: np.ndarray) -> OrderExtraction:
    """``sub`` (extracted at ``rows[where]``) spread onto all ``rows``: NaN fluxes and
    :data:`ROW_UNUSABLE` elsewhere."""
    def spread(values, fill, dtype=None):
        out = np.full(rows.size, fill, dtype or np.asarray(values).dtype)
        out[where] = values
        return out

    rejected = np.zeros((rows.size,) + sub.rejected.shape[1:], bool)
    rejected[where] = sub.rejected
    return OrderExtraction(
        rows=rows, centre=centre, flux_optimal=spread(sub.flux_optimal, np.nan),
        var_optimal=spread(sub.var_optimal, np.nan),
        flux_boxcar=spread(sub.flux_boxcar, np.nan), var_boxcar=spread(sub.var_boxcar, np.nan),
        flux_boxcar_robust=spread(sub.flux_boxcar_robust, np.nan),
        var_boxcar_robust=spread(sub.var_boxcar_robust, np.nan),
        sky=spread(sub.sky, np.nan), n_rejected=spread(sub.n_rejected, 0),
        qual=spread(sub.qual, ROW_UNUSABLE), profile_fraction=spread(sub.profile_fraction, 0.0),
        first=spread(sub.first, 0), rejected=rejected, profile=sub.profile)


def _masked_row_medians(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``np.median(values[i][mask[i]])`` for every row ``i``, with one sort of the whole array.

    A median per row called from Python cost more than the rest of the aperture correction
    (some 4000 rows per order).

    Parameters
    ----------
    values : ndarray, shape (n, m)
        Float values.
    mask : ndarray of bool, shape (n, m)
        The entries of each row to take the median of.

    Returns
    -------
    ndarray, shape (n,)
        The medians; NaN for a row without a masked entry, or with a NaN among its masked
        entries (as ``np.median``).
    """
    values = np.asarray(values, float)
    mask = np.asarray(mask, bool)
    count = np.count_nonzero(mask, axis=1)
    # NaN sorts last: the masked entries of a row come first, in order
    s = np.sort(np.where(mask, values, np.nan), axis=1)
    if s.shape[1] == 0:
        return np.full(s.shape[0], np.nan)
    lower = np.take_along_axis(s, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    upper = np.take_along_axis(s, np.minimum(count // 2, s.shape[1] - 1)[:, None],
                               axis=1)[:, 0]
    # as np.median: the middle value itself for an odd count, (a + b) / 2 for an even one
    out = np.where(count % 2 == 1, lower, (lower + upper) / 2)
    out[(count == 0) | np.any(mask & np.isnan(values), axis=1)] = np.nan
    return out


def aperture_correction(data_t: np.ndarray, variance_t: np.ndarray, qual_t: np.ndarray | None,
                        centre: np.ndarray, rows: np.ndarray, slit_length: float,
                        lower: np.ndarray, upper: np.ndarray, margin: float = 1.0,
                        wing_extent: float = 3.0) -> tuple[float, float]:
    """Ratio of the object's light on the whole slit to the light in the aperture.

    The aperture (full width ``slit_length`` binned px, fractional pixel weights as in
    :func:`extract_order`) misses the seeing wings; the sky-subtracted frame still holds
    them.  Over the rows whose slit pixels are all usable (between ``lower + margin`` and
    ``upper - margin``, the order's edges in binned across px): the wings are the pixels
    within ``wing_extent`` half-apertures of the trace; the pixels beyond, the rest of the
    slit, give the level ``b`` that the sky and background subtraction left (a median per
    row, averaged), taken off every pixel, as in aperture photometry with a background
    annulus, so that a residual of a tenth of an electron over the slit does not pass for
    the wings of a faint source.  ``A = sum a (D - b)``, ``W = sum (1 - a) (D - b)`` over
    the wing pixels; the correction is ``(A + W) / A``, with the error of ``W`` (the wings'
    own noise) propagated.

    Parameters
    ----------
    data_t, variance_t : ndarray
        Along views of the sky-subtracted frame and of its variance.
    qual_t : ndarray or None
        Along view of QUAL; rows with a flagged slit pixel are left out.
    centre, rows : ndarray
        Trace centre (binned across px) of each along row in ``rows``.
    slit_length : float
        Aperture full width (binned px).
    lower, upper : ndarray
        Order edges (binned across px) at ``rows``.
    margin : float
        Pixels left out inside each edge (the slit's soft ends).

    Returns
    -------
    correction, error : float
        1 and 0 when no row can be measured or the light in the aperture is not positive.
    """
    slit = _slit_pixels(data_t, variance_t, qual_t, centre, rows, lower, upper, margin)
    if slit is None:
        return 1.0, 0.0
    centre, cols, inside, d, v = slit.centre, slit.cols, slit.inside, slit.data, slit.var
    complete = slit.complete
    if not complete.any():
        return 1.0, 0.0
    half = 0.5 * float(slit_length)
    a = np.clip(np.minimum(cols + 0.5, centre[:, None] + half)
                - np.maximum(cols - 0.5, centre[:, None] - half), 0.0, 1.0)
    use = inside & complete[:, None]
    near = np.abs(cols - centre[:, None]) <= wing_extent * half
    far = use & ~near
    level = 0.0
    if np.count_nonzero(far) >= 20:
        measured = far.sum(axis=1) >= 3
        per_row = _masked_row_medians(d[measured], far[measured])
        level = float(np.mean(per_row)) if per_row.size else 0.0
    use &= near
    d = d - level
    in_ap = float(np.sum(np.where(use, a * d, 0.0)))
    wings = float(np.sum(np.where(use, (1 - a) * d, 0.0)))
    wings_var = float(np.sum(np.where(use, (1 - a) ** 2 * v, 0.0)))
    if not in_ap > 0:
        return 1.0, 0.0
    return (in_ap + wings) / in_ap, float(np.sqrt(wings_var)) / in_ap
