# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""B-spline loops of the sky model (soxs_core.extraction.sky).

The sky of one order is a B-spline in wavelength fitted to a few hundred thousand pixels,
refitted a dozen times while its knots are refined: the basis values at every pixel, the
banded normal equations, the model at every pixel and its variance from the band of the
inverse normal matrix.  The numpy twins are in :mod:`soxs_core.extraction.sky`
(``design_reference``, ``banded_normal_reference``, ``evaluate_reference``,
``band_variance_reference``, ``banded_inverse_band_reference``); the tests hold each pair
equal.  Keep them in step: the same recursion and the same order of the arithmetic in double
precision, so that ``design``, ``evaluate``, ``band_variance`` and ``banded_inverse_band``
equal their twins bit for bit; ``banded_normal`` sums each element over the points in
another order than numpy's ``bincount`` and equals it to rounding.

Every loop runs without the GIL, so the sky fit's orders, fitted in threads, run at once.
"""

from cython.parallel cimport prange
from libc.stdlib cimport malloc, free

#: highest B-spline degree the kernels take (the sky uses 1 to 5)
DEF MAX_K1 = 16


cdef inline Py_ssize_t _span(const double[::1] t, double x, Py_ssize_t lo, Py_ssize_t hi
                             ) noexcept nogil:
    """Index of the knot interval holding ``x``: numpy's ``searchsorted(t, x, 'right') - 1``
    clipped to [lo, hi]."""
    cdef Py_ssize_t a = 0, b = t.shape[0], m
    while a < b:          # first index with t[index] > x
        m = (a + b) >> 1
        if t[m] <= x:
            a = m + 1
        else:
            b = m
    a -= 1
    if a < lo:
        return lo
    if a > hi:
        return hi
    return a


cdef inline void _basis(const double[::1] t, int degree, double x, Py_ssize_t span,
                        double* out) noexcept nogil:
    """Cox-de Boor: the ``degree + 1`` non-zero basis values at ``x`` in ``span``."""
    cdef double left[MAX_K1]
    cdef double right[MAX_K1]
    cdef double saved, temp, den
    cdef int j, r
    out[0] = 1.0
    for j in range(1, degree + 1):
        left[j] = x - t[span + 1 - j]
        right[j] = t[span + j] - x
        saved = 0.0
        for r in range(j):
            den = right[r + 1] + left[j - r]
            if den == 0.0:      # repeated knots: that term is 0 (the twin divides by inf)
                temp = 0.0
            else:
                temp = out[r] / den
            out[r] = saved + right[r + 1] * temp
            saved = left[j - r] * temp
        out[j] = saved


def design(const double[::1] t, int degree, const double[::1] x, double[:, ::1] values,
           Py_ssize_t[::1] first, int threads=1):
    """Basis values ``values[i, :]`` and first coefficient index ``first[i]`` at each
    ``x[i]`` (twin: ``design_reference``)."""
    cdef Py_ssize_t n = x.shape[0], i, span
    cdef Py_ssize_t nc = t.shape[0] - degree - 1
    if degree + 1 > MAX_K1:
        raise ValueError(f"B-spline degree {degree} above {MAX_K1 - 1}")
    if values.shape[0] != n or values.shape[1] != degree + 1 or first.shape[0] != n:
        raise ValueError("design: output shapes do not match the points")
    if n == 0:
        return
    for i in prange(n, nogil=True, num_threads=max(1, threads), schedule="static"):
        span = _span(t, x[i], degree, nc - 1)
        _basis(t, degree, x[i], span, &values[i, 0])
        first[i] = span - degree


def banded_normal(const double[:, ::1] values, const Py_ssize_t[::1] first,
                  const double[::1] weight, const double[::1] target,
                  const double[::1] scale, bint scaled, double[:, ::1] ab, double[::1] rhs):
    """Add the normal equations of the weighted fit ``target ~ sum_j c_j (scale B_j)`` to
    ``ab`` (lower banded, ``ab[d, i] = N[i + d, i]``) and ``rhs``; ``scale`` is used only
    when ``scaled`` (twin: ``banded_normal_reference``)."""
    cdef Py_ssize_t n = values.shape[0], k1 = values.shape[1], p, a, d, i
    cdef double s, w, va, wva
    cdef double v[MAX_K1]
    if k1 > MAX_K1:
        raise ValueError(f"{k1} basis values per point, above {MAX_K1}")
    with nogil:
        for p in range(n):
            s = scale[p] if scaled else 1.0
            w = weight[p]
            i = first[p]
            for a in range(k1):
                v[a] = values[p, a] * s if scaled else values[p, a]
            for a in range(k1):
                wva = v[a] * w
                rhs[i + a] += wva * target[p]
                for d in range(k1 - a):
                    ab[d, i + a] += wva * v[a + d]


def evaluate(const double[:, ::1] values, const Py_ssize_t[::1] first,
             const double[::1] coef, double[::1] out, int threads=1):
    """``out[i] = sum_j values[i, j] coef[first[i] + j]`` (twin: ``evaluate_reference``)."""
    cdef Py_ssize_t n = values.shape[0], k1 = values.shape[1], i, j
    cdef double acc
    if n == 0:
        return
    for i in prange(n, nogil=True, num_threads=max(1, threads), schedule="static"):
        acc = values[i, 0] * coef[first[i]]
        for j in range(1, k1):
            acc = acc + values[i, j] * coef[first[i] + j]
        out[i] = acc


def band_variance(const double[:, ::1] values, const Py_ssize_t[::1] first,
                  const double[:, ::1] sinv, double[::1] out, int threads=1):
    """Variance of the fitted spline at each point, ``b^T S b`` with ``S`` the inverse
    normal matrix of which ``sinv`` holds the band (``sinv[d, i] = S[i + d, i]``)
    (twin: ``band_variance_reference``)."""
    cdef Py_ssize_t n = values.shape[0], k1 = values.shape[1], i, a, b
    cdef double acc, term
    if n == 0:
        return
    for i in prange(n, nogil=True, num_threads=max(1, threads), schedule="static"):
        acc = 0.0
        for a in range(k1):
            for b in range(a, k1):
                term = values[i, a] * values[i, b] * sinv[b - a, first[i] + a]
                if a == b:
                    acc = acc + term
                else:
                    acc = acc + 2.0 * term
        out[i] = acc


def banded_inverse_band(const double[:, ::1] chol, double[:, ::1] out):
    """Band of ``N^-1`` (``out[d, i] = N^-1[i + d, i]``) from the lower banded Cholesky
    factor of ``N``, by Takahashi et al.'s (1973) recursion from the last row up
    (twin: ``banded_inverse_band_reference``)."""
    cdef Py_ssize_t p = chol.shape[0] - 1, n = chol.shape[1], i, d, k, m, a, b
    cdef double acc
    cdef double* unit = <double*>malloc((p + 1) * n * sizeof(double))
    cdef double* dinv = <double*>malloc(n * sizeof(double))
    if unit == NULL or dinv == NULL:
        free(unit)
        free(dinv)
        raise MemoryError()
    try:
        with nogil:
            for i in range(n):
                for d in range(p + 1):
                    unit[d * n + i] = chol[d, i] / chol[0, i]
                dinv[i] = 1.0 / (chol[0, i] * chol[0, i])
                for d in range(p + 1):
                    out[d, i] = 0.0
            for i in range(n - 1, -1, -1):
                m = p if p < n - 1 - i else n - 1 - i
                for d in range(m, 0, -1):
                    acc = 0.0
                    for k in range(1, m + 1):
                        if d >= k:
                            a = i + d
                            b = i + k
                        else:
                            a = i + k
                            b = i + d
                        acc = acc + unit[k * n + i] * out[a - b, b]
                    out[d, i] = -acc
                acc = dinv[i]
                for k in range(1, m + 1):
                    acc = acc - unit[k * n + i] * out[k, i]
                out[0, i] = acc
    finally:
        free(unit)
        free(dinv)
