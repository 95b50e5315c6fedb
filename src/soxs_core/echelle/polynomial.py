"""Global echelle polynomials ``A(n, B) = sum_ij c_ij n^i B^j`` and their clipped fits.

Order tables (INSTRUMENTS.md §5.2) store every trace -- order centres, edges, trace widths -- as
one polynomial in the order number ``n`` and the along-order pixel ``B``, as *plain monomials*
of the unbinned pixel coordinate.  Monomials in ``B ~ 4000`` are badly conditioned to fit, so
:func:`fit_order_polynomial` solves the least-squares problem in a scaled Legendre basis (``n``
and ``B`` mapped onto [-1, 1]) and converts the result to monomials only at the end; the
conversion is exact algebra, and evaluating degree <= 9 monomials in double precision stays far
below a thousandth of a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre as nleg
from numpy.polynomial import polynomial as npoly

__all__ = ["OrderPolynomial", "PolynomialFit", "fit_order_polynomial"]

#: column names use one decimal digit per degree (``cent_ij``)
MAX_DEGREE = 9


@dataclass(frozen=True)
class OrderPolynomial:
    """``A(n, B) = sum_ij c_ij n^i B^j`` with ``coeffs[i, j] = c_ij`` (plain monomials).

    Attributes
    ----------
    coeffs : ndarray, shape (order_deg + 1, along_deg + 1)
    """

    coeffs: np.ndarray

    @property
    def order_deg(self) -> int:
        return int(self.coeffs.shape[0] - 1)

    @property
    def along_deg(self) -> int:
        return int(self.coeffs.shape[1] - 1)

    def __call__(self, order, b) -> np.ndarray:
        """Value at order number(s) ``order`` and along-order pixel(s) ``b`` (unbinned)."""
        n, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
        return npoly.polyval2d(n, b, self.coeffs)

    def flat(self) -> list[float]:
        """Coefficients in table order: i-major, j-minor (``c00, c01, ... c10 ...``)."""
        return [float(v) for v in self.coeffs.ravel()]

    @classmethod
    def from_flat(cls, values, order_deg: int, along_deg: int) -> OrderPolynomial:
        values = np.asarray(values, float)
        size = (order_deg + 1) * (along_deg + 1)
        if values.size != size:
            raise ValueError(f"{values.size} coefficients for degrees ({order_deg}, "
                             f"{along_deg}), expected {size}")
        return cls(values.reshape(order_deg + 1, along_deg + 1))

    @classmethod
    def constant(cls, value: float, order_deg: int = 0, along_deg: int = 0
                 ) -> OrderPolynomial:
        coeffs = np.zeros((order_deg + 1, along_deg + 1))
        coeffs[0, 0] = value
        return cls(coeffs)


@dataclass
class PolynomialFit:
    """Result of :func:`fit_order_polynomial`.

    Attributes
    ----------
    polynomial : OrderPolynomial
    used : ndarray of bool
        Samples kept by the clipping.
    residuals : ndarray
        Sample minus fit, for every sample (clipped ones included).
    iterations : int
        Fit-and-clip cycles run.
    """

    polynomial: OrderPolynomial
    used: np.ndarray
    residuals: np.ndarray
    iterations: int
    degrees: tuple[int, int] = field(default=(0, 0))

    @property
    def rms(self) -> float:
        r = self.residuals[self.used]
        return float(np.sqrt(np.mean(r * r))) if r.size else float("nan")


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    mid, half = 0.5 * (low + high), 0.5 * (high - low)
    return (values - mid) / (half if half > 0 else 1.0)


def _legendre_to_monomials(coeffs: np.ndarray, n_range: tuple[float, float],
                           b_range: tuple[float, float]) -> np.ndarray:
    """Monomial coefficients in the raw (n, B) of a Legendre series in the scaled ones."""
    def axis_matrix(deg: int, low: float, high: float) -> np.ndarray:
        # column k: monomial coefficients (in the raw variable) of P_k(scaled(x))
        mid, half = 0.5 * (low + high), 0.5 * (high - low)
        half = half if half > 0 else 1.0
        lin = np.array([-mid / half, 1.0 / half])  # scaled = lin[0] + lin[1] x
        out = np.zeros((deg + 1, deg + 1))
        for k in range(deg + 1):
            mono_scaled = nleg.leg2poly(np.eye(deg + 1)[k])
            acc = np.zeros(1)
            power = np.ones(1)
            for c in mono_scaled:
                acc = npoly.polyadd(acc, c * power)
                power = npoly.polymul(power, lin)
            out[: acc.size, k] = acc
        return out

    mi = axis_matrix(coeffs.shape[0] - 1, *n_range)
    mj = axis_matrix(coeffs.shape[1] - 1, *b_range)
    return mi @ coeffs @ mj.T


def fit_order_polynomial(order, b, a, order_deg: int, along_deg: int, clip_sigma: float,
                         max_iterations: int, weights=None) -> PolynomialFit:
    """Fit ``a(n, b)`` with a global polynomial, rejecting outliers iteratively.

    Each cycle solves linear least squares in a scaled Legendre basis, then rejects samples
    whose residual is beyond ``clip_sigma`` robust standard deviations (1.4826 MAD about the
    median residual) -- a robust scale, so that a few gross outliers (an edge found on a
    neighbouring order, a cosmic ray) cannot hide behind the spread they cause.  Rejection
    stops after ``max_iterations`` cycles or when nothing more is rejected; the final fit
    uses the surviving samples.

    Parameters
    ----------
    order, b, a : array_like
        Order numbers, along-order and cross-order positions of the samples (unbinned px).
    order_deg, along_deg : int
        Degrees in ``n`` and ``B`` (each at most 9, the table's one-digit column names).
    clip_sigma : float
    max_iterations : int
    weights : array_like, optional
        Least-squares weights (1/sigma) of the samples.

    Returns
    -------
    PolynomialFit

    Raises
    ------
    ValueError
        When there are fewer usable samples than coefficients.
    """
    n = np.asarray(order, float).ravel()
    b = np.asarray(b, float).ravel()
    a = np.asarray(a, float).ravel()
    w = np.ones_like(a) if weights is None else np.asarray(weights, float).ravel()
    if max(order_deg, along_deg) > MAX_DEGREE or min(order_deg, along_deg) < 0:
        raise ValueError(f"degrees ({order_deg}, {along_deg}) outside 0..{MAX_DEGREE}")
    finite = np.isfinite(n) & np.isfinite(b) & np.isfinite(a) & np.isfinite(w) & (w > 0)
    # fewer distinct orders than the order degree asks for cannot constrain it
    distinct = np.unique(n[finite]).size
    order_deg = min(order_deg, max(distinct - 1, 0))
    ncoef = (order_deg + 1) * (along_deg + 1)
    if np.count_nonzero(finite) < ncoef:
        raise ValueError(f"{np.count_nonzero(finite)} usable samples for {ncoef} "
                         "polynomial coefficients")
    n_range = (float(n[finite].min()), float(n[finite].max()))
    b_range = (float(b[finite].min()), float(b[finite].max()))
    design = nleg.legvander2d(_scaled(n, *n_range), _scaled(b, *b_range),
                              [order_deg, along_deg])
    design[~finite] = 0.0
    a_filled = np.where(finite, a, 0.0)
    used = finite.copy()
    iterations = 0
    coef = np.zeros(ncoef)
    while True:
        iterations += 1
        sw = w[used]
        coef = np.linalg.lstsq(design[used] * sw[:, None], a_filled[used] * sw,
                               rcond=None)[0]
        residuals = np.where(finite, a_filled - design @ coef, np.nan)
        if iterations > max_iterations or clip_sigma <= 0:
            break
        r = residuals[used]
        centre = np.median(r)
        scale = 1.4826 * np.median(np.abs(r - centre))
        if not scale > 0:
            break
        keep = used & (np.abs(residuals - centre) <= clip_sigma * scale)
        if keep.sum() == used.sum() or keep.sum() < ncoef:
            break
        used = keep
    mono = _legendre_to_monomials(coef.reshape(order_deg + 1, along_deg + 1), n_range,
                                  b_range)
    return PolynomialFit(polynomial=OrderPolynomial(mono), used=used, residuals=residuals,
                         iterations=iterations, degrees=(order_deg, along_deg))
