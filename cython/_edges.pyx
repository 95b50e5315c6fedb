# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Order edges in cross-dispersion slices, one sample per slice.

The pure-numpy twin of this kernel is
:func:`soxs_core.echelle.edges.detect_slice_edges_reference`, and the method (slice, collapse,
peak and floor, threshold stepping, local plateau, half level, equal-area position, checks) is
described in :mod:`soxs_core.echelle.edges`; the tests hold kernel and twin equal.  Keep them
in step: same steps in the same order and the same arithmetic, in double precision.

The image has the dispersion along its rows; any strides are accepted (a transposed view of a
frame dispersed along x is read in place).  Samples are independent: ``prange`` over them, each
with its own scratch buffers.
"""

from cython.parallel cimport prange
from libc.math cimport NAN, fabs, floor, isfinite, sqrt
from libc.stdlib cimport malloc, free


cdef double MAD_TO_SIGMA = 1.482602218505602


cdef inline void _sort(double* v, int n) noexcept nogil:
    """Insertion sort: the arrays are a slice width or a running window long."""
    cdef int i, j
    cdef double x
    for i in range(1, n):
        x = v[i]
        j = i - 1
        while j >= 0 and v[j] > x:
            v[j + 1] = v[j]
            j -= 1
        v[j + 1] = x


cdef inline double _median(double* v, int n) noexcept nogil:
    _sort(v, n)
    if n % 2:
        return v[n // 2]
    return (v[n // 2 - 1] + v[n // 2]) / 2.0


cdef struct Params:
    double min_fraction
    double max_fraction
    int peak_half
    int plateau_gap
    int plateau_length
    int near_length
    double tolerance
    double noise_tolerance
    double despike
    int inner_max
    int iterations
    int floor_length
    double min_contrast
    int run_half
    double min_width


cdef inline void _line(const double* p, const double* s, int kc, int d, int k0, int k1,
                       double limit, double* xm_out, double* ym_out,
                       double* slope_out) noexcept nogil:
    """Straight line through the profile at distances k0..k1 from kc on side d; a pixel
    more than ``limit`` off the running median enters with the running median's value."""
    cdef int k, m = k1 - k0 + 1
    cdef double xm = 0.0, ym = 0.0, sxx = 0.0, sxy = 0.0, y
    for k in range(k0, k1 + 1):
        y = p[kc + d * k]
        if not fabs(y - s[kc + d * k]) <= limit:
            y = s[kc + d * k]
        xm = xm + <double>k
        ym = ym + y
    xm = xm / m
    ym = ym / m
    for k in range(k0, k1 + 1):
        y = p[kc + d * k]
        if not fabs(y - s[kc + d * k]) <= limit:
            y = s[kc + d * k]
        sxx = sxx + (k - xm) * (k - xm)
        sxy = sxy + (k - xm) * (y - ym)
    xm_out[0] = xm
    ym_out[0] = ym
    slope_out[0] = sxy / sxx


cdef inline int _half_crossing(const double* p, int kc, int d, int k_start, int kv, double fl,
                               double xm, double ym, double slope,
                               double* level_out) noexcept nogil:
    """First distance in [k_start, kv] below half the local plateau, or -1."""
    cdef int k
    cdef double half
    for k in range(k_start, kv + 1):
        half = fl + 0.5 * ((ym + slope * (k - xm)) - fl)
        if p[kc + d * k] < half:
            level_out[0] = half
            return k
    level_out[0] = NAN
    return -1


cdef void _side(const double* p, const double* s, const double* filled, int n, int kc, int d,
                double fl, double peak, double noise, Params* par, double* pos_out, double* t_out,
                double* level_out) noexcept nogil:
    """One side: ``pos_out`` = signed offset (profile px) of the edge from ``kc``."""
    cdef int kmax = (n - 1 - kc) if d > 0 else kc
    cdef int step, k, kd = -1, kp0, kp1, kv, kout, knew, kin, klo, khi, a, it
    cdef double t = NAN, level, xm, ym, slope, floor_loc, total, height, pos, tol
    pos_out[0] = NAN
    t_out[0] = NAN
    level_out[0] = NAN
    if kmax < 1:
        return
    # detection: threshold stepped from min to max in tenths of the range
    for step in range(11):
        t = par.min_fraction + step * (par.max_fraction - par.min_fraction) / 10.0
        level = fl + t * (peak - fl)
        for k in range(1, kmax + 1):
            if s[kc + d * k] < level:
                kd = k
                break
        if kd >= 0 or par.max_fraction == par.min_fraction:
            break
    if kd < 0:
        return
    t_out[0] = t
    # crude plateau clear of the soft end, then the half-level bracket
    kp1 = kd - par.plateau_gap
    kp0 = kp1 - par.plateau_length + 1
    if kp0 < 0:
        kp0 = 0
    if kp1 - kp0 + 1 < 3:
        return
    _line(p, s, kc, d, kp0, kp1, par.despike * noise, &xm, &ym, &slope)
    # local floor: bottom of the valley beyond the detection pixel
    kv = kd
    floor_loc = s[kc + d * kd]
    for k in range(kd + 1, kmax + 1):
        if s[kc + d * k] < floor_loc:
            floor_loc = s[kc + d * k]
            kv = k
    kout = _half_crossing(p, kc, d, kp1 + 1, kv, floor_loc, xm, ym, slope, &level)
    if kout < 0:
        return
    # refine: plateau window next to the edge, floor just outside its soft end
    a = 1
    for it in range(par.iterations):
        floor_loc = _near_floor(p, s, kc, d, kout + a, kv, par.floor_length)
        kin = kout - 1
        a = 1
        while a < par.inner_max and kin - a >= 0:
            height = (ym + slope * ((kin - a) - xm)) - floor_loc
            if not height > 0:
                break
            tol = par.tolerance
            if par.noise_tolerance * noise / height > tol:
                tol = par.noise_tolerance * noise / height
            if (p[kc + d * (kin - a)] - floor_loc) / height >= 1.0 - tol:
                break
            a += 1
        kp1 = kin - a
        kp0 = kp1 - par.near_length + 1
        if kp0 < 0:
            kp0 = 0
        if kp1 - kp0 + 1 < 3:
            return
        _line(p, s, kc, d, kp0, kp1, par.despike * noise, &xm, &ym, &slope)
        knew = _half_crossing(p, kc, d, kp1 + 1, kv, floor_loc, xm, ym, slope, &level)
        if knew < 0:
            return
        if knew == kout:
            break
        kout = knew
    floor_loc = _near_floor(p, s, kc, d, kout + a, kv, par.floor_length)
    level_out[0] = level
    kin = kout - 1
    klo = kin - a + 1
    if klo <= kp1:
        klo = kp1 + 1
    khi = kout + a
    if khi > kv:
        khi = kv
    if khi - kin < 2:
        return
    # equal-area position of the step
    total = 0.0
    for k in range(klo, khi + 1):
        if filled[kc + d * k] != 0.0:
            return
        height = (ym + slope * (k - xm)) - floor_loc
        if not height > 0:
            return
        total = total + (p[kc + d * k] - floor_loc) / height
    pos = (klo - 0.5) + total
    if not (kp1 < pos and pos <= khi + 0.5):
        return
    pos_out[0] = d * pos


cdef inline double _near_floor(const double* p, const double* s, int kc, int d, int k_end,
                               int kv, int length) noexcept nogil:
    """Mean profile on the ``length`` pixels after ``k_end``, not past the valley bottom."""
    cdef int k, k0 = k_end + 1, k1 = k_end + length
    cdef double total = 0.0
    if k1 > kv:
        k1 = kv
    if k1 < k0:
        return s[kc + d * kv]
    for k in range(k0, k1 + 1):
        total = total + p[kc + d * k]
    return total / (k1 - k0 + 1)


cdef void _sample(const float[:, :] flux, const unsigned char[:, :] qual, Py_ssize_t row,
                  double centre, int slice_length, int slice_width, unsigned char reject,
                  Params* par, double* vals, double* p, double* s, double* win,
                  double* diff, double* filled, double* res) noexcept nogil:
    """Measure one slice; ``res`` = low, up, t_low, t_up, level_low, level_up, floor, peak."""
    cdef Py_ssize_t nrow = flux.shape[0], ncol = flux.shape[1]
    cdef int hw = slice_width // 2, hl = slice_length // 2
    cdef Py_ssize_t rc, c0, lo, hi, r, c, j, a, b
    cdef int n, kc, count, nvalid, i, k, first_valid, prev
    cdef double v, w, fl, peak, base, pos, t, level, noise
    for i in range(8):
        res[i] = NAN
    if row - hw < 0 or row + hw >= nrow:
        return
    if not isfinite(centre):
        return
    rc = <Py_ssize_t>floor(centre + 0.5)
    if rc < 0 or rc >= ncol:
        return
    c0 = rc - hl
    lo = c0 if c0 > 0 else 0
    hi = c0 + 2 * hl
    if hi > ncol - 1:
        hi = ncol - 1
    n = <int>(hi - lo + 1)
    kc = <int>(rc - lo)
    # median-collapse each column over its good pixels
    nvalid = 0
    for j in range(n):
        c = lo + j
        count = 0
        for r in range(row - hw, row + hw + 1):
            v = flux[r, c]
            if (qual[r, c] & reject) == 0 and isfinite(v):
                vals[count] = v
                count += 1
        if count:
            p[j] = _median(vals, count)
            filled[j] = 0.0
            nvalid += 1
        else:
            p[j] = NAN
            filled[j] = 1.0
    if nvalid == 0:
        return
    # fill columns without good pixels
    if nvalid < n:
        prev = -1
        for j in range(n):
            if isfinite(p[j]):
                if prev < 0 and j > 0:
                    for a in range(j):
                        p[a] = p[j]
                elif prev >= 0 and j - prev > 1:
                    for a in range(prev + 1, j):
                        w = (a - prev) / <double>(j - prev)
                        p[a] = p[prev] + w * (p[j] - p[prev])
                prev = <int>j
        for a in range(prev + 1, n):
            p[a] = p[prev]
    # running median, peak and floor
    for j in range(n):
        a = j - par.run_half
        if a < 0:
            a = 0
        b = j + par.run_half
        if b > n - 1:
            b = n - 1
        for k in range(<int>(b - a + 1)):
            win[k] = p[a + k]
        s[j] = _median(win, <int>(b - a + 1))
    fl = s[0]
    for j in range(1, n):
        if s[j] < fl:
            fl = s[j]
    a = kc - par.peak_half
    if a < 0:
        a = 0
    b = kc + par.peak_half
    if b > n - 1:
        b = n - 1
    peak = s[a]
    for j in range(a + 1, b + 1):
        if s[j] > peak:
            peak = s[j]
    res[6] = fl
    res[7] = peak
    if n < 2:
        return
    for j in range(n - 1):
        diff[j] = fabs(p[j + 1] - p[j])
    noise = MAD_TO_SIGMA * _median(diff, n - 1) / sqrt(2.0)
    if not (peak > fl and peak - fl > par.min_contrast * noise):
        return
    base = <double>(lo + kc)
    for i in range(2):
        _side(p, s, filled, n, kc, -1 if i == 0 else 1, fl, peak, noise, par, &pos, &t,
              &level)
        res[i] = base + pos
        res[2 + i] = t
        res[4 + i] = level
    if isfinite(res[0]) and isfinite(res[1]):
        if res[1] - res[0] < par.min_width:
            res[0] = NAN
            res[1] = NAN


def detect_slice_edges(const float[:, :] flux, const unsigned char[:, :] qual,
                       const long[::1] along, const double[::1] centre, int slice_length,
                       int slice_width, double min_fraction, double max_fraction,
                       int reject_bits, int peak_half, int plateau_gap, int plateau_length,
                       int near_length, double tolerance, double noise_tolerance,
                       double despike, int inner_max, int iterations,
                       int floor_length, double min_contrast, int run_half, double min_width,
                       double[:, ::1] out,
                       int num_threads=1):
    """Fill ``out`` (8, n): low, up, threshold_low, threshold_up, level_low, level_up, floor,
    peak of each sample (see the module doc of :mod:`soxs_core.echelle.edges`)."""
    cdef Py_ssize_t n = along.shape[0], i
    cdef int length = 2 * (slice_length // 2) + 1, width = 2 * (slice_width // 2) + 1
    cdef int wlen = 2 * run_half + 1, failed = 0, k
    cdef unsigned char reject = <unsigned char>(reject_bits & 0xFF)
    cdef Params par
    cdef double* buf
    if flux.shape[0] != qual.shape[0] or flux.shape[1] != qual.shape[1]:
        raise ValueError("qual must have the shape of flux")
    if centre.shape[0] != n or out.shape[0] != 8 or out.shape[1] != n:
        raise ValueError("centre must match along, out must be (8, len(along))")
    if (run_half < 0 or plateau_length < 3 or near_length < 3 or inner_max < 1
            or iterations < 0 or floor_length < 1 or slice_width < 1):
        raise ValueError("bad kernel constants")
    par.min_fraction = min_fraction
    par.max_fraction = max_fraction
    par.peak_half = peak_half
    par.plateau_gap = plateau_gap
    par.plateau_length = plateau_length
    par.near_length = near_length
    par.tolerance = tolerance
    par.noise_tolerance = noise_tolerance
    par.despike = despike
    par.inner_max = inner_max
    par.iterations = iterations
    par.floor_length = floor_length
    par.min_contrast = min_contrast
    par.run_half = run_half
    par.min_width = min_width
    with nogil:
        for i in prange(n, num_threads=num_threads, schedule="dynamic", chunksize=16):
            buf = <double*>malloc((width + 4 * length + wlen + 8) * sizeof(double))
            if buf == NULL:
                failed += 1
            else:
                _sample(flux, qual, along[i], centre[i], slice_length, slice_width, reject,
                        &par, buf, buf + width, buf + width + length,
                        buf + width + 2 * length, buf + width + 2 * length + wlen,
                        buf + width + 3 * length + wlen, buf + width + 4 * length + wlen)
                for k in range(8):
                    out[k, i] = buf[width + 4 * length + wlen + k]
                free(buf)
    if failed:
        raise MemoryError("no memory for the edge slices")
    return None
