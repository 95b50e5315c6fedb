# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Per-pixel sigma-clipped stacking of a band of detector rows.

The pure-numpy twin of this kernel is :func:`soxs_core.combine.stacking.clip_and_stack_reference`;
the tests hold the two equal bit for bit.  Keep them in step.

Algorithm, for each pixel independently:

1. take the values of the frames whose QUAL has none of ``reject_bits`` and whose value and
   error are finite;
2. up to ``max_iters`` times: centre = median of the surviving values, scale = MAD * 1.4826
   (``scale_method`` 0) or the population standard deviation (1), raised to the rms of the
   survivors' errors when ``error_floor`` is set; stop if the scale is 0;
   keep values with centre - sigma_lower*scale <= v <= centre + sigma_upper*scale; stop when
   nothing new was rejected;
3. combine the survivors: mean (``combine_method`` 0) or median (1); error = sqrt(sum of
   the survivors' squared errors) / n, times ``median_factors[n]`` for a median (the
   noise of the sample median of n Gaussian values relative to their mean's: 1 for n <= 2,
   tending to sqrt(pi/2); see :func:`soxs_core.combine.stacking.median_error_factor`);
4. QUAL = the bits set in every input, plus NO_DATA (32) when nothing survived, in which case
   value and error are NaN.

Because clipping keeps a contiguous range of the sorted values, each pixel is sorted once
and every iteration only moves the two ends of that range.  The sort is a fixed comparator
network applied to TILE pixels at once (SIMD min/max, no data-dependent branches); the rest
is per pixel.
"""

import numpy as np
from cython.parallel cimport prange, threadid
from libc.math cimport fabs, isfinite, sqrt, NAN, INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef unsigned char NO_DATA = 32
cdef double MAD_TO_STD = 1.482602218505602
# Pixels are handled TILE at a time: each frame's TILE values are copied into a per-thread
# tile (frames lie a power of two apart, so reading them pixel by pixel from the cube makes
# every frame fight for the same cache set) and the whole tile is sorted at once.
DEF TILE = 64


cdef extern from *:
    """
    /* min/max and compare-exchange without branches: a ternary may compile to a jump, and
       mispredicted jumps cost more than the arithmetic. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline double soxs_min(double x, double y) {
        return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(x), _mm_set_sd(y)));
    }
    static inline double soxs_max(double x, double y) {
        return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(x), _mm_set_sd(y)));
    }
    #else
    static inline double soxs_min(double x, double y) { return x < y ? x : y; }
    static inline double soxs_max(double x, double y) { return x > y ? x : y; }
    #endif

    /* Sort the columns of a tile (rows `tile` floats apart) with a comparator network: each
       comparator is a min and a max of two rows, which the compiler turns into SIMD
       min/max (the ternaries are exactly MINPS/MAXPS).  Compiled for AVX2 too where the
       compiler can, and picked at run time. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
    __attribute__((target_clones("avx2", "default")))
    #endif
    static void soxs_sort_tile(float *ts, int tile, const int *network, int npairs, int n) {
        for (int c = 0; c < npairs; c++) {
            float *restrict a = ts + (long)network[2 * c] * tile;
            float *restrict b = ts + (long)network[2 * c + 1] * tile;
            for (int i = 0; i < n; i++) {
                float x = a[i], y = b[i];
                a[i] = x < y ? x : y;
                b[i] = x > y ? x : y;
            }
        }
    }
    """
    void soxs_sort_tile(float* ts, int tile, const int* network, int npairs, int n) noexcept nogil
    double soxs_min(double x, double y) noexcept nogil
    double soxs_max(double x, double y) noexcept nogil


def sorting_network(int n):
    """Comparator pairs of Batcher's odd-even merge sort for ``n`` inputs (flat int array)."""
    pairs = []
    cdef int p = 1, k, j, i
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return np.asarray(pairs, dtype=np.intc).reshape(-1)


cdef inline double _sorted_median(const double* a, int lo, int hi) noexcept nogil:
    cdef int m = hi - lo
    cdef int mid = lo + m // 2
    if m % 2:
        return a[mid]
    return (a[mid - 1] + a[mid]) / 2.0


cdef inline double _kth_deviation(const double* a, int lo, int hi, double centre,
                                   int k) noexcept nogil:
    """The k-th smallest (0-based) of |a[i] - centre| over the sorted a[lo:hi].

    The k+1 values nearest the centre are consecutive in sorted order, and the largest
    deviation of a window of consecutive values sits at one of its ends; so the answer is the
    smallest, over windows of k+1 consecutive values, of the larger end deviation.  No
    data-dependent branches, and the result is exactly one of the deviations.
    """
    cdef int i
    cdef double best = INFINITY, left, right, widest
    for i in range(lo, hi - k):
        left = fabs(centre - a[i])
        right = fabs(a[i + k] - centre)
        widest = soxs_max(left, right)
        best = soxs_min(best, widest)
    return best


cdef inline double _mad(const double* a, int lo, int hi, double centre) noexcept nogil:
    """Median of |a[k] - centre| over the sorted survivors a[lo:hi]."""
    cdef int m = hi - lo
    if m % 2:
        return _kth_deviation(a, lo, hi, centre, m // 2)
    return (_kth_deviation(a, lo, hi, centre, m // 2 - 1)
            + _kth_deviation(a, lo, hi, centre, m // 2)) / 2.0


cdef inline void _clip_pixel(
    const float* vals, Py_ssize_t vstride, const float* errs, Py_ssize_t estride,
    const float* sorted_tile, int n,
    double total_all, double sumsq_all, unsigned char qand, int nframes, double sigma_lower, double sigma_upper, int max_iters,
    int scale_method, int combine_method, int error_floor, const double* median_factors,
    double* sorted_vals, float* value, float* error, short* count, unsigned char* qout,
) noexcept nogil:
    """Clip and combine one pixel.

    ``vals``/``errs`` hold the frames' values in frame order (NaN where unusable), with
    strides ``vstride``/``estride``, and ``sorted_tile`` the usable values in ascending order
    (then +inf) with stride TILE.
    ``total_all``/``sumsq_all`` are the sum of the usable values and of their squared errors,
    in frame order: while nothing is rejected they are the survivors' sums.
    """
    cdef int k, lo, hi, new_lo, new_hi, it, nsurv
    cdef double v, centre, scale, lower, upper, total, sumsq, mean, dev, keep_lo, keep_hi
    cdef double floor
    if n == 0:
        value[0] = NAN
        error[0] = NAN
        count[0] = 0
        qout[0] = qand | NO_DATA
        return
    for k in range(nframes):
        sorted_vals[k] = sorted_tile[k * TILE]
    lo = 0
    hi = n
    it = 0
    while it < max_iters:
        centre = _sorted_median(sorted_vals, lo, hi)
        if scale_method == 0:
            scale = MAD_TO_STD * _mad(sorted_vals, lo, hi, centre)
        else:
            # population std of the survivors, summed in frame order like numpy
            total = 0.0
            nsurv = 0
            for k in range(nframes):
                v = vals[k * vstride]
                if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                    total = total + v
                    nsurv += 1
            mean = total / nsurv
            sumsq = 0.0
            for k in range(nframes):
                v = vals[k * vstride]
                if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                    dev = v - mean
                    sumsq = sumsq + dev * dev
            scale = sqrt(sumsq / nsurv)
        if error_floor:
            # never reject a value that lies within sigma of the centre in units of the
            # survivors' own errors: with few frames the MAD is often tiny by chance
            if lo == 0 and hi == n:
                sumsq = sumsq_all
                nsurv = n
            else:
                sumsq = 0.0
                nsurv = 0
                for k in range(nframes):
                    v = vals[k * vstride]
                    if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                        sumsq = sumsq + <double>errs[k * estride] * <double>errs[k * estride]
                        nsurv += 1
            floor = sqrt(sumsq / nsurv)
            if floor > scale:
                scale = floor
        if not (scale > 0.0):
            break
        lower = centre - sigma_lower * scale
        upper = centre + sigma_upper * scale
        new_lo = lo
        new_hi = hi
        while new_lo < new_hi and sorted_vals[new_lo] < lower:
            new_lo += 1
        while new_hi > new_lo and sorted_vals[new_hi - 1] > upper:
            new_hi -= 1
        it += 1
        if new_lo == lo and new_hi == hi:
            break
        lo = new_lo
        hi = new_hi
        if lo == hi:
            break
    nsurv = hi - lo
    if nsurv == 0:
        value[0] = NAN
        error[0] = NAN
        count[0] = 0
        qout[0] = qand | NO_DATA
        return
    if lo == 0 and hi == n:
        total = total_all
        sumsq = sumsq_all
    else:
        keep_lo = sorted_vals[lo]
        keep_hi = sorted_vals[hi - 1]
        total = 0.0
        sumsq = 0.0
        for k in range(nframes):
            v = vals[k * vstride]
            if v >= keep_lo and v <= keep_hi:
                total = total + v
                sumsq = sumsq + <double>errs[k * estride] * <double>errs[k * estride]
    if combine_method == 0:
        value[0] = <float>(total / nsurv)
        error[0] = <float>(sqrt(sumsq) / nsurv)
    else:
        value[0] = <float>_sorted_median(sorted_vals, lo, hi)
        error[0] = <float>(median_factors[nsurv] * sqrt(sumsq) / nsurv)
    count[0] = <short>nsurv
    qout[0] = qand


cdef inline void _reset_sums(int* counts, unsigned char* qand, double* total,
                             double* sumsq) noexcept nogil:
    cdef int jj
    for jj in range(TILE):
        counts[jj] = 0
        qand[jj] = 255
        total[jj] = 0.0
        sumsq[jj] = 0.0


cdef void _finish_unclipped(
    const float* sorted_tile, int nframes, int width, int combine_method,
    const double* median_factors, const double* total, const double* sumsq,
    const unsigned char* qand, const unsigned char* done,
    float* vout, float* eout, short* cout, unsigned char* qout,
) noexcept nogil:
    """Combine every pixel of the tile that ``done`` marks: all nframes values survive."""
    cdef int jj
    cdef double median
    for jj in range(width):
        if not done[jj]:
            continue
        if combine_method == 0:
            vout[jj] = <float>(total[jj] / nframes)
            eout[jj] = <float>(sqrt(sumsq[jj]) / nframes)
        else:
            median = _sorted_median_strided(sorted_tile + jj, nframes)
            vout[jj] = <float>median
            eout[jj] = <float>(median_factors[nframes] * sqrt(sumsq[jj]) / nframes)
        cout[jj] = <short>nframes
        qout[jj] = qand[jj]


cdef inline double _sorted_median_strided(const float* a, int n) noexcept nogil:
    """Median of the n sorted values a[0], a[TILE], ... (as _sorted_median, in double)."""
    cdef int mid = n // 2
    if n % 2:
        return <double>a[mid * TILE]
    return (<double>a[(mid - 1) * TILE] + <double>a[mid * TILE]) / 2.0


cdef inline void _kth_deviation_tile(const float* ts, const double* centre, int nframes,
                                     int k, double* best) noexcept nogil:
    """:func:`_kth_deviation` for every pixel of a fully usable tile at once: the smallest,
    over windows of k+1 consecutive sorted values, of the larger end deviation."""
    cdef int i, jj
    cdef double left, right, widest
    for i in range(nframes - k):
        for jj in range(TILE):
            left = fabs(centre[jj] - <double>ts[i * TILE + jj])
            right = fabs(<double>ts[(i + k) * TILE + jj] - centre[jj])
            widest = left if left > right else right
            best[jj] = widest if widest < best[jj] else best[jj]


cdef void _first_pass(
    const float* ts, int nframes, int width, double sigma_lower, double sigma_upper,
    int max_iters, int scale_method, int error_floor, const double* sumsq,
    unsigned char* done,
) noexcept nogil:
    """The first clipping iteration of every pixel of a tile at once, for the usual tile in
    which all nframes values of every pixel are usable (MAD scale only).

    Marks in ``done`` the pixels whose first iteration rejects nothing (or finds a zero
    scale): for those the clip is over and every value survives.  The arithmetic is that of
    :func:`_clip_pixel`'s first iteration, written as loops across the tile that the compiler
    vectorises; the other pixels go through :func:`_clip_pixel` from the start.
    """
    cdef int jj
    cdef double centre[TILE]
    cdef double best[TILE]
    cdef double best2[TILE]
    cdef double scale, floor, lower, upper
    cdef int mid = nframes // 2
    if max_iters < 1 or scale_method != 0:
        for jj in range(width):
            done[jj] = max_iters < 1
        return
    for jj in range(TILE):
        if nframes % 2:
            centre[jj] = <double>ts[mid * TILE + jj]
        else:
            centre[jj] = (<double>ts[(mid - 1) * TILE + jj] + <double>ts[mid * TILE + jj]) / 2.0
        best[jj] = INFINITY
        best2[jj] = INFINITY
    # MAD: the middle deviation(s), as in _mad
    _kth_deviation_tile(ts, centre, nframes, mid if nframes % 2 else mid - 1, best)
    if nframes % 2 == 0:
        _kth_deviation_tile(ts, centre, nframes, mid, best2)
    for jj in range(width):
        if nframes % 2:
            scale = MAD_TO_STD * best[jj]
        else:
            scale = MAD_TO_STD * ((best[jj] + best2[jj]) / 2.0)
        if error_floor:
            floor = sqrt(sumsq[jj] / nframes)
            if floor > scale:
                scale = floor
        lower = centre[jj] - sigma_lower * scale
        upper = centre[jj] + sigma_upper * scale
        done[jj] = (not (scale > 0.0)) | (
            (<double>ts[jj] >= lower) & (<double>ts[(nframes - 1) * TILE + jj] <= upper))


cdef void _stack_tile(
    const float* dptr, const float* eptr, const unsigned char* qptr, Py_ssize_t fstride,
    int nframes, int width, unsigned char reject_bits, double sigma_lower, double sigma_upper,
    int max_iters, int scale_method, int combine_method, int error_floor,
    const double* median_factors,
    const int* network, int npairs, float* tv, float* te, float* ts, int* counts,
    unsigned char* qand, double* sorted_vals,
    float* vout, float* eout, short* cout, unsigned char* qout,
) noexcept nogil:
    """Stack ``width`` (<= TILE) consecutive pixels of one row."""
    cdef int k, jj, padded
    cdef float v, e
    cdef unsigned char q
    cdef bint good
    cdef double total[TILE]
    cdef double sumsq[TILE]
    cdef unsigned char done[TILE]
    cdef unsigned char any_bits = 0
    cdef bint nonfinite = False, usual
    # frame-order values and errors: read in place in the usual tile, else masked copies
    cdef const float* vals = dptr
    cdef const float* errs = eptr
    cdef Py_ssize_t vstride = fstride, estride = fstride
    _reset_sums(counts, qand, total, sumsq)
    for k in range(nframes):
        for jj in range(width):
            any_bits |= qptr[k * fstride + jj]
    usual = (any_bits & reject_bits) == 0
    if usual:
        # no input flag rejects anything: copy the values to be sorted and accumulate in
        # straight loops; fall back below only if a value is not finite
        for k in range(nframes):
            memcpy(ts + k * TILE, dptr + k * fstride, width * sizeof(float))
            for jj in range(width):
                v = dptr[k * fstride + jj]
                e = eptr[k * fstride + jj]
                nonfinite |= not ((v - v == 0) & (e - e == 0))
                total[jj] += <double>v
                sumsq[jj] += <double>e * <double>e
                qand[jj] &= qptr[k * fstride + jj]
            for jj in range(width, TILE):
                ts[k * TILE + jj] = INFINITY
        for jj in range(width):
            counts[jj] = nframes
        usual = not nonfinite
    if not usual:
        _reset_sums(counts, qand, total, sumsq)
        for k in range(nframes):
            for jj in range(width):
                v = dptr[k * fstride + jj]
                e = eptr[k * fstride + jj]
                q = qptr[k * fstride + jj]
                qand[jj] &= q
                # v - v == 0 is false exactly for NaN and infinities
                good = ((q & reject_bits) == 0) & (v - v == 0) & (e - e == 0)
                tv[k * TILE + jj] = v if good else NAN
                te[k * TILE + jj] = e if good else NAN
                ts[k * TILE + jj] = v if good else INFINITY   # sorts after usable values
                counts[jj] += good
                total[jj] += <double>v if good else 0.0
                sumsq[jj] += <double>e * <double>e if good else 0.0
            for jj in range(width, TILE):
                ts[k * TILE + jj] = INFINITY
        vals = tv
        errs = te
        vstride = TILE
        estride = TILE
    padded = (width + 7) & ~7
    soxs_sort_tile(ts, TILE, network, npairs, padded)
    if usual:
        _first_pass(ts, nframes, width, sigma_lower, sigma_upper, max_iters, scale_method,
                    error_floor, sumsq, done)
        _finish_unclipped(ts, nframes, width, combine_method, median_factors, total, sumsq,
                          qand, done, vout, eout, cout, qout)
    else:
        for jj in range(width):
            done[jj] = 0
    for jj in range(width):
        if done[jj]:
            continue
        _clip_pixel(vals + jj, vstride, errs + jj, estride, ts + jj, counts[jj], total[jj],
                    sumsq[jj], qand[jj], nframes, sigma_lower,
                    sigma_upper, max_iters, scale_method, combine_method, error_floor,
                    median_factors, sorted_vals, vout + jj, eout + jj, cout + jj, qout + jj)


def clip_and_stack_band(
    const float[:, :, ::1] data,
    const float[:, :, ::1] errs,
    const unsigned char[:, :, ::1] qual,
    unsigned char reject_bits,
    double sigma_lower,
    double sigma_upper,
    int max_iters,
    int scale_method,
    int combine_method,
    float[:, ::1] out_value,
    float[:, ::1] out_error,
    short[:, ::1] out_count,
    unsigned char[:, ::1] out_qual,
    const double[::1] median_factors,
    int num_threads=0,
    int error_floor=0,
):
    """Stack ``data[k, row, col]`` over ``k`` into the ``out_*`` arrays (see module doc).

    All arrays must be C-contiguous; ``data``, ``errs`` and ``qual`` share one shape
    ``(nframes, rows, cols)`` and the outputs have shape ``(rows, cols)``.
    ``median_factors[n]`` (n = 0 .. nframes) multiplies the error of a median of n values.
    """
    cdef Py_ssize_t nframes = data.shape[0], rows = data.shape[1], cols = data.shape[2]
    cdef Py_ssize_t i, j0
    cdef Py_ssize_t fstride = rows * cols
    cdef int width
    if errs.shape[0] != nframes or errs.shape[1] != rows or errs.shape[2] != cols:
        raise ValueError("errs must have the shape of data")
    if qual.shape[0] != nframes or qual.shape[1] != rows or qual.shape[2] != cols:
        raise ValueError("qual must have the shape of data")
    if out_value.shape[0] != rows or out_value.shape[1] != cols:
        raise ValueError("out_value must have shape (rows, cols)")
    if (out_error.shape[0] != rows or out_error.shape[1] != cols or out_count.shape[0] != rows
            or out_count.shape[1] != cols or out_qual.shape[0] != rows
            or out_qual.shape[1] != cols):
        raise ValueError("outputs must have shape (rows, cols)")
    if nframes < 1:
        raise ValueError("need at least one frame")
    if nframes > 32767:
        raise ValueError("too many frames")
    if median_factors.shape[0] <= nframes:
        raise ValueError("median_factors needs an entry for every count 0 .. nframes")
    if rows == 0 or cols == 0:
        return None
    if num_threads <= 0:
        num_threads = _default_threads()
    cdef int[::1] network = sorting_network(<int>nframes)
    cdef int npairs = <int>(network.shape[0] // 2)
    if npairs == 0:
        network = np.zeros(2, dtype=np.intc)
    # per thread: three float tiles, TILE counts and qand bytes, two double work arrays
    cdef Py_ssize_t floats = 3 * TILE * nframes + TILE + TILE // 4 + 4 * nframes + 16
    cdef float* buffers = <float*>malloc(num_threads * floats * sizeof(float))
    cdef float* base
    if buffers == NULL:
        raise MemoryError("no memory for the stacking scratch buffers")
    try:
        with nogil:
            for i in prange(rows, num_threads=num_threads, schedule="dynamic", chunksize=4):
                base = buffers + threadid() * floats
                for j0 in range(0, cols, TILE):
                    width = <int>(cols - j0) if cols - j0 < TILE else TILE
                    _stack_tile(
                        &data[0, i, j0], &errs[0, i, j0], &qual[0, i, j0], fstride,
                        <int>nframes, width, reject_bits, sigma_lower, sigma_upper,
                        max_iters, scale_method, combine_method, error_floor,
                        &median_factors[0], &network[0],
                        npairs, base, base + TILE * nframes, base + 2 * TILE * nframes,
                        <int*>(base + 3 * TILE * nframes),
                        <unsigned char*>(base + 3 * TILE * nframes + TILE),
                        <double*>(base + 3 * TILE * nframes + TILE + TILE // 4 + 4),
                        &out_value[i, j0], &out_error[i, j0], &out_count[i, j0],
                        &out_qual[i, j0])
    finally:
        free(buffers)
    return None


def _default_threads():
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return _OPENMP_FLAG


cdef extern from *:
    """
    #ifdef _OPENMP
    #define SOXS_OPENMP 1
    #else
    #define SOXS_OPENMP 0
    #endif
    """
    int SOXS_OPENMP

_OPENMP_FLAG = bool(SOXS_OPENMP)
