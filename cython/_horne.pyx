# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Per-row optimal (Horne 1986) and boxcar extraction of one order's window.

The pure-numpy twin is :func:`soxs_core.extraction.horne.extract_rows_reference`; the method
is described in :mod:`soxs_core.extraction.horne`.  The tests hold kernel and twin equal: keep
them in step (same steps in the same order, the same arithmetic in double precision, sums
over the window from its first column to its last).

Every array is (rows, window columns), C-contiguous.  ``state`` is 0 for a pixel that is not
measured (off the frame, non-finite), 1 for a measured but masked pixel (QUAL != 0: in the
plain boxcar only) and 2 for a usable one.  Rows are independent: ``prange`` over them.
"""

from cython.parallel cimport prange
from libc.math cimport NAN, fabs, sqrt

#: Smallest variance a pixel is given (e-^2): keeps a noiseless model pixel finite.
cdef double VAR_FLOOR = 1e-12


cdef inline double _var(double base, double scale, double model) noexcept nogil:
    cdef double v = base + scale * (model if model > 0.0 else 0.0)
    return v if v > VAR_FLOOR else VAR_FLOOR


cdef void _row(const double[:, ::1] data, const double[:, ::1] base_var,
               const double[:, ::1] pscale, const double[:, ::1] profile,
               const double[:, ::1] aperture, const unsigned char[:, ::1] state,
               Py_ssize_t i, double thr2, double perr, int max_iter, double tol,
               double[::1] flux_opt, double[::1] var_opt, double[::1] flux_box,
               double[::1] var_box, double[::1] flux_rob, double[::1] var_rob,
               double[::1] fraction, int[::1] n_rej, unsigned char[:, ::1] rejected
               ) noexcept nogil:
    cdef Py_ssize_t ncol = data.shape[1], j, worst
    cdef double sa = 0.0, sd = 0.0, f, fn, s1, s2, v, p, r, q, qmax, e, fpos
    cdef double b1, b2, r1, r2, fr
    cdef int it, nr = 0
    cdef bint ok = True
    for j in range(ncol):
        rejected[i, j] = 0
        if state[i, j] == 2:
            sa = sa + aperture[i, j] * profile[i, j]
            sd = sd + aperture[i, j] * data[i, j]
    f = sd / sa if sa > 0.0 else 0.0
    for it in range(max_iter):
        s1 = 0.0
        s2 = 0.0
        for j in range(ncol):
            p = profile[i, j]
            if state[i, j] == 2 and rejected[i, j] == 0 and p > 0.0:
                v = _var(base_var[i, j], pscale[i, j], f * p)
                s1 = s1 + p * data[i, j] / v
                s2 = s2 + p * p / v
        if s2 <= 0.0:
            ok = False
            break
        fn = s1 / s2
        worst = -1
        qmax = thr2
        for j in range(ncol):
            if state[i, j] == 2 and rejected[i, j] == 0:
                p = profile[i, j]
                v = _var(base_var[i, j], pscale[i, j], fn * p)
                e = perr * fn * p
                r = data[i, j] - fn * p
                q = r * r / (v + e * e)
                if q > qmax:
                    qmax = q
                    worst = j
        if worst >= 0:
            rejected[i, worst] = 1
            nr = nr + 1
            f = fn
            continue
        if fabs(fn - f) <= tol / sqrt(s2):
            f = fn
            break
        f = fn
    n_rej[i] = nr
    s1 = 0.0
    s2 = 0.0
    if ok:
        for j in range(ncol):
            p = profile[i, j]
            if state[i, j] == 2 and rejected[i, j] == 0 and p > 0.0:
                v = _var(base_var[i, j], pscale[i, j], f * p)
                s1 = s1 + p * data[i, j] / v
                s2 = s2 + p * p / v
    if s2 > 0.0:
        f = s1 / s2
        flux_opt[i] = f
        var_opt[i] = 1.0 / s2
        fpos = f if f > 0.0 else 0.0
    else:
        flux_opt[i] = NAN
        var_opt[i] = NAN
        fpos = 0.0
    b1 = 0.0
    b2 = 0.0
    r1 = 0.0
    r2 = 0.0
    fr = 0.0
    for j in range(ncol):
        if state[i, j] == 0:
            continue
        p = profile[i, j]
        v = _var(base_var[i, j], pscale[i, j], fpos * p)
        e = aperture[i, j]
        b1 = b1 + e * data[i, j]
        b2 = b2 + e * e * v
        if state[i, j] == 2 and rejected[i, j] == 0:
            r1 = r1 + e * data[i, j]
            r2 = r2 + e * e * v
            fr = fr + e * p
    flux_box[i] = b1
    var_box[i] = b2
    fraction[i] = fr
    if fr > 0.0:
        flux_rob[i] = r1 / fr
        var_rob[i] = r2 / (fr * fr)
    else:
        flux_rob[i] = NAN
        var_rob[i] = NAN


def extract_rows(const double[:, ::1] data, const double[:, ::1] base_var,
                 const double[:, ::1] pscale, const double[:, ::1] profile,
                 const double[:, ::1] aperture, const unsigned char[:, ::1] state,
                 double reject_sigma, double profile_error, int max_iter, double tol,
                 double[::1] flux_opt, double[::1] var_opt, double[::1] flux_box,
                 double[::1] var_box, double[::1] flux_rob, double[::1] var_rob,
                 double[::1] fraction, int[::1] n_rej, unsigned char[:, ::1] rejected,
                 int num_threads=1):
    """Fill the per-row outputs and ``rejected`` (1 where a pixel was rejected); see the
    module docstring and :func:`soxs_core.extraction.horne.extract_rows_reference`."""
    cdef Py_ssize_t nrow = data.shape[0], ncol = data.shape[1], i
    cdef double thr2 = reject_sigma * reject_sigma
    if (base_var.shape[0] != nrow or base_var.shape[1] != ncol or pscale.shape[0] != nrow
            or pscale.shape[1] != ncol or profile.shape[0] != nrow
            or profile.shape[1] != ncol or aperture.shape[0] != nrow
            or aperture.shape[1] != ncol):
        raise ValueError("every input must have the shape of data")
    if (state.shape[0] != nrow or state.shape[1] != ncol or rejected.shape[0] != nrow
            or rejected.shape[1] != ncol):
        raise ValueError("state and rejected must have the shape of data")
    if (flux_opt.shape[0] != nrow or var_opt.shape[0] != nrow or flux_box.shape[0] != nrow
            or var_box.shape[0] != nrow or flux_rob.shape[0] != nrow
            or var_rob.shape[0] != nrow or fraction.shape[0] != nrow
            or n_rej.shape[0] != nrow):
        raise ValueError("per-row outputs must have one value per row")
    if max_iter < 1:
        raise ValueError("max_iter must be positive")
    with nogil:
        for i in prange(nrow, num_threads=num_threads, schedule="dynamic", chunksize=64):
            _row(data, base_var, pscale, profile, aperture, state, i, thr2, profile_error,
                 max_iter, tol, flux_opt, var_opt, flux_box, var_box, flux_rob, var_rob,
                 fraction, n_rej, rejected)
