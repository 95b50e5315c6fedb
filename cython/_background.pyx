# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Pixel loops of the scattered-light model (soxs_core.echelle.background).

``cell_statistics``: for every band of ``band_rows`` rows and every column, the median,
interquartile range, count and mean squared error of the usable pixels (not in an order, QUAL
free of the rejected bits, finite).  Its numpy twin is
:func:`soxs_core.echelle.background.cell_statistics_reference`; ``expand_bands`` (linear
interpolation of band values to every row) has :func:`expand_bands_reference`.  The tests hold
each pair equal bit for bit; keep them in step: quantiles as numpy's linear interpolation
``v[lo] + frac * (v[hi] - v[lo])`` at ``q * (n - 1)`` in double precision rounded to float32,
squared errors summed in double from the band's top row down.

Arrays may be transposed views (SOXS NIR is handled in its canonical orientation without a
copy): the loops then run along the axis that is contiguous in memory.
"""

from cython.parallel cimport prange
from libc.math cimport NAN, floor
from libc.stdlib cimport malloc, free


cdef inline double _quantile(const float* v, int n, double q) noexcept nogil:
    cdef double pos = q * (n - 1)
    cdef int lo = <int>floor(pos)
    cdef int hi = lo + 1
    if hi > n - 1:
        hi = n - 1
    cdef double frac = pos - lo
    cdef double vlo = v[lo], vhi = v[hi]
    return vlo + frac * (vhi - vlo)


cdef inline void _sort(float* v, int n) noexcept nogil:
    """Insertion sort: a cell holds a few tens of values."""
    cdef int i, k
    cdef float x
    for i in range(1, n):
        x = v[i]
        k = i - 1
        while k >= 0 and v[k] > x:
            v[k + 1] = v[k]
            k -= 1
        v[k + 1] = x


cdef void _band(const float[:, :] flux, const unsigned char[:, :] qual,
                const unsigned char[:, :] in_order, const float[:, :] err, bint has_err,
                Py_ssize_t r0, Py_ssize_t r1, int reject, bint rows_inner,
                float* buf, int* n, double* e2,
                float[:, ::1] med, float[:, ::1] iqr, int[:, ::1] count,
                float[:, ::1] mean_var, unsigned char[:, :] used,
                Py_ssize_t band) noexcept nogil:
    cdef Py_ssize_t cols = flux.shape[1], r, c
    cdef Py_ssize_t h = r1 - r0
    cdef float v
    cdef double e
    cdef int k
    for c in range(cols):
        n[c] = 0
        e2[c] = 0.0
    if rows_inner:
        for c in range(cols):
            for r in range(r0, r1):
                v = flux[r, c]
                if in_order[r, c] == 0 and (qual[r, c] & reject) == 0 and v - v == 0:
                    used[r, c] = 1
                    buf[c * h + n[c]] = v
                    n[c] += 1
                    if has_err:
                        e = err[r, c]
                        e2[c] = e2[c] + e * e
                else:
                    used[r, c] = 0
    else:
        for r in range(r0, r1):
            for c in range(cols):
                v = flux[r, c]
                if in_order[r, c] == 0 and (qual[r, c] & reject) == 0 and v - v == 0:
                    used[r, c] = 1
                    buf[c * h + n[c]] = v
                    n[c] += 1
                    if has_err:
                        e = err[r, c]
                        e2[c] = e2[c] + e * e
                else:
                    used[r, c] = 0
    for c in range(cols):
        k = n[c]
        count[band, c] = k
        if k == 0:
            med[band, c] = NAN
            iqr[band, c] = NAN
            mean_var[band, c] = NAN
            continue
        _sort(&buf[c * h], k)
        med[band, c] = <float>_quantile(&buf[c * h], k, 0.5)
        iqr[band, c] = <float>(_quantile(&buf[c * h], k, 0.75)
                               - _quantile(&buf[c * h], k, 0.25))
        mean_var[band, c] = <float>(e2[c] / k) if has_err else NAN


def cell_statistics(const float[:, :] flux, const unsigned char[:, :] qual,
                    const unsigned char[:, :] in_order, int band_rows, int reject,
                    const float[:, :] err, bint has_err, float[:, ::1] med,
                    float[:, ::1] iqr, int[:, ::1] count, float[:, ::1] mean_var,
                    unsigned char[:, :] used, int num_threads=1):
    """Fill med/iqr/count/mean_var (bands x columns) and ``used`` (1 where a pixel is
    usable, shape of flux); see the module docstring."""
    cdef Py_ssize_t rows = flux.shape[0], cols = flux.shape[1], b, nb, r0, r1
    cdef int failed = 0
    cdef bint rows_inner
    if band_rows < 1:
        raise ValueError("band_rows must be positive")
    if (qual.shape[0] != rows or qual.shape[1] != cols or in_order.shape[0] != rows
            or in_order.shape[1] != cols):
        raise ValueError("qual and in_order must have the shape of flux")
    if used.shape[0] != rows or used.shape[1] != cols:
        raise ValueError("used must have the shape of flux")
    if has_err and (err.shape[0] != rows or err.shape[1] != cols):
        raise ValueError("err must have the shape of flux")
    nb = (rows + band_rows - 1) // band_rows
    if (med.shape[0] != nb or med.shape[1] != cols or iqr.shape[0] != nb
            or iqr.shape[1] != cols or count.shape[0] != nb or count.shape[1] != cols
            or mean_var.shape[0] != nb or mean_var.shape[1] != cols):
        raise ValueError("outputs must have shape (bands, columns)")
    # a transposed view is contiguous down its columns: read it column by column
    rows_inner = flux.strides[0] < flux.strides[1]
    cdef float* buf
    cdef int* n
    cdef double* e2
    with nogil:
        for b in prange(nb, num_threads=num_threads, schedule="static"):
            r0 = b * band_rows
            r1 = r0 + band_rows
            if r1 > rows:
                r1 = rows
            buf = <float*>malloc(cols * (r1 - r0) * sizeof(float))
            n = <int*>malloc(cols * sizeof(int))
            e2 = <double*>malloc(cols * sizeof(double))
            if buf != NULL and n != NULL and e2 != NULL:
                _band(flux, qual, in_order, err, has_err, r0, r1, reject, rows_inner,
                      buf, n, e2, med, iqr, count, mean_var, used, b)
            else:
                failed += 1
            free(buf)
            free(n)
            free(e2)
    if failed:
        raise MemoryError("no memory for the background cells")
    return None


def expand_bands(const double[:, ::1] values, const long long[:] j, const double[:] t,
                 float[:, :] out, int num_threads=1):
    """out[r, c] = (1 - t[r]) * values[j[r], c] + t[r] * values[j[r] + 1, c] (float32).

    With a single band every row is that band's values.
    """
    cdef Py_ssize_t rows = out.shape[0], cols = out.shape[1], r, c, jr, jn
    cdef Py_ssize_t nb = values.shape[0]
    cdef double tr
    if values.shape[1] != cols or j.shape[0] != rows or t.shape[0] != rows:
        raise ValueError("shapes of values, j, t and out disagree")
    for r in range(rows):
        if j[r] < 0 or j[r] > (nb - 2 if nb > 1 else 0):
            raise ValueError("band index out of range")
    cdef bint rows_inner = out.strides[0] < out.strides[1]
    with nogil:
        if rows_inner:
            for c in prange(cols, num_threads=num_threads, schedule="static"):
                for r in range(rows):
                    jr = j[r]
                    jn = jr + 1 if nb > 1 else jr
                    tr = t[r]
                    out[r, c] = <float>((1.0 - tr) * values[jr, c] + tr * values[jn, c])
        else:
            for r in prange(rows, num_threads=num_threads, schedule="static"):
                jr = j[r]
                jn = jr + 1 if nb > 1 else jr
                _expand_row(&values[jr, 0], &values[jn, 0], t[r], &out[r, 0], cols,
                            out.strides[1] // sizeof(float))
    return None


cdef void _expand_row(const double* v0, const double* v1, double tr, float* out,
                      Py_ssize_t cols, Py_ssize_t stride) noexcept nogil:
    cdef Py_ssize_t c
    cdef double a = 1.0 - tr
    if stride == 1:
        for c in range(cols):
            out[c] = <float>(a * v0[c] + tr * v1[c])
    else:
        for c in range(cols):
            out[c * stride] = <float>(a * v0[c] + tr * v1[c])


cdef int _band_solve(const double[:, :] ab, const double[:] rhs, double[:] x,
                     double[:, :] zb, bint want_inverse, double* L, double* y,
                     Py_ssize_t n, Py_ssize_t p) noexcept nogil:
    """Cholesky solve of one symmetric positive-definite band matrix; 0 on success.

    ``ab[d, k]`` holds A[k + d, k] (A[k, k + d]), d = 0..p; ``L`` (n x (p + 1)) receives
    ``L[i, d] = L_{i, i-d}``.  With ``want_inverse`` the band of A^-1 goes to ``zb`` in the
    layout of ``ab`` (Takahashi's recursion from the last row up).
    """
    cdef Py_ssize_t i, d, k, e, j, m
    cdef double s, lii
    for i in range(n):
        for d in range(p, -1, -1):
            # L_{i, i-d}
            k = i - d
            if k < 0:
                L[i * (p + 1) + d] = 0.0
                continue
            s = ab[d, k]
            for m in range(1, p + 1 - d):
                # sum over columns c = k - m < k shared by rows i and k
                if k - m < 0:
                    break
                s = s - L[i * (p + 1) + d + m] * L[k * (p + 1) + m]
            if d == 0:
                if not s > 0.0:
                    return 1
                L[i * (p + 1)] = s ** 0.5
            else:
                L[i * (p + 1) + d] = s / L[k * (p + 1)]
    # forward: L y = rhs
    for i in range(n):
        s = rhs[i]
        for d in range(1, p + 1):
            if i - d < 0:
                break
            s = s - L[i * (p + 1) + d] * y[i - d]
        y[i] = s / L[i * (p + 1)]
    # backward: L^T x = y
    for i in range(n - 1, -1, -1):
        s = y[i]
        for d in range(1, p + 1):
            if i + d > n - 1:
                break
            s = s - L[(i + d) * (p + 1) + d] * x[i + d]
        x[i] = s / L[i * (p + 1)]
    if not want_inverse:
        return 0
    for i in range(n - 1, -1, -1):
        lii = L[i * (p + 1)]
        for e in range(p, -1, -1):
            j = i + e
            if j > n - 1:
                zb[e, i] = 0.0
                continue
            s = 1.0 / (lii * lii) if e == 0 else 0.0
            for d in range(1, p + 1):
                k = i + d
                if k > n - 1:
                    break
                # Z[k, j] from the band: k, j > i (e == 0: Z[k, i] = Z[i, k], just computed)
                if j >= k:
                    s = s - L[k * (p + 1) + d] * zb[j - k, k] / lii
                else:
                    s = s - L[k * (p + 1) + d] * zb[k - j, j] / lii
            zb[e, i] = s
    return 0


def band_solve(const double[:, :, ::1] ab, const double[:, ::1] rhs, double[:, ::1] x,
               double[:, :, ::1] zb, bint want_inverse, unsigned char[::1] failed,
               int num_threads=1):
    """Solve A_b x_b = rhs_b for every stacked band matrix A_b (``ab``: bands x (p + 1) x n,
    ``ab[b, d, k] = A_b[k + d, k]``) and, with ``want_inverse``, the band of A_b^-1 in
    ``zb`` (same layout).  ``failed[b]`` is 1 where A_b is not positive definite."""
    cdef Py_ssize_t nb = ab.shape[0], p = ab.shape[1] - 1, n = ab.shape[2], b
    if rhs.shape[0] != nb or rhs.shape[1] != n or x.shape[0] != nb or x.shape[1] != n:
        raise ValueError("rhs and x must be bands x n")
    if zb.shape[0] != nb or zb.shape[1] != p + 1 or zb.shape[2] != n or failed.shape[0] != nb:
        raise ValueError("zb must have the shape of ab and failed one entry per band")
    cdef double* L
    cdef double* y
    cdef int bad = 0
    with nogil:
        for b in prange(nb, num_threads=num_threads, schedule="static"):
            L = <double*>malloc(n * (p + 1) * sizeof(double))
            y = <double*>malloc(n * sizeof(double))
            if L != NULL and y != NULL:
                failed[b] = _band_solve(ab[b], rhs[b], x[b], zb[b], want_inverse, L, y, n, p)
            else:
                bad += 1
            free(L)
            free(y)
    if bad:
        raise MemoryError("no memory for the band solve")
    return None
