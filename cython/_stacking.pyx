# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Per-pixel sigma-clipped stacking of a band of detector rows.

The pure-numpy twin of this kernel is :func:`soxs_core.stacking.clip_and_stack_reference`;
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
   the survivors' squared errors) / n, times sqrt(pi/2) for a median of more than 2 values;
4. QUAL = the bits set in every input, plus NO_DATA (32) when nothing survived, in which case
   value and error are NaN.

Because clipping keeps a contiguous range of the sorted values, each pixel is sorted once
and every iteration only moves the two ends of that range.
"""

import numpy as np
from cython.parallel cimport prange, threadid
from libc.math cimport isfinite, sqrt, NAN, INFINITY
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef unsigned char NO_DATA = 32
# Pixels are copied TILE at a time from every frame into a small per-thread tile first: frames
# lie a power-of-two number of bytes apart, so reading them pixel by pixel straight from the
# cube makes every frame fight for the same cache set.
DEF TILE = 64
cdef double MAD_TO_STD = 1.482602218505602
cdef double SQRT_HALF_PI = 1.2533141373155001


cdef extern from *:
    """
    /* Compare-exchange without a branch: the compiler turns a ternary into a jump, and a
       mispredicted jump per comparator costs more than the whole network. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline void soxs_cswap(double *a, double *b) {
        __m128d x = _mm_load_sd(a), y = _mm_load_sd(b);
        _mm_store_sd(a, _mm_min_sd(x, y));
        _mm_store_sd(b, _mm_max_sd(x, y));
    }
    #else
    static inline void soxs_cswap(double *a, double *b) {
        double x = *a, y = *b;
        *a = x < y ? x : y;
        *b = x < y ? y : x;
    }
    #endif
    """
    void soxs_cswap(double* a, double* b) noexcept nogil


cdef inline void _network_sort(double* a, const int* network, int npairs) noexcept nogil:
    """Sort with a fixed comparator network (no data-dependent branches)."""
    cdef int c
    for c in range(npairs):
        soxs_cswap(a + network[2 * c], a + network[2 * c + 1])


def sorting_network(int n):
    """Comparator pairs of Batcher's odd-even merge sort for ``n`` inputs (flat int array)."""
    import numpy as np
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


cdef inline double _mad(const double* a, int lo, int hi, int nframes, double centre,
                        double* work, const int* network, int npairs) noexcept nogil:
    """Median of |a[k] - centre| over the sorted survivors a[lo:hi].

    The deviations are sorted with the same branch-free network, non-survivors padded with
    +inf, which is faster than any merge with data-dependent branches.
    """
    cdef int k
    cdef double d
    for k in range(nframes):
        d = a[k] - centre
        work[k] = d if d >= 0 else -d
        if k < lo or k >= hi:
            work[k] = INFINITY
    _network_sort(work, network, npairs)
    return _sorted_median(work, 0, hi - lo)


cdef inline void _stack_pixel(
    const float* data, const float* errs, const unsigned char* qual, Py_ssize_t fstride,
    int nframes,
    unsigned char reject_bits, double sigma_lower, double sigma_upper, int max_iters,
    int scale_method, int combine_method, int error_floor, const int* network, int npairs,
    double* vals, double* errv, double* sorted_vals,
    float* value, float* error, short* count, unsigned char* qout,
) noexcept nogil:
    cdef int k, n = 0, lo, hi, new_lo, new_hi, it, nsurv
    cdef unsigned char q, qand = 255
    cdef double v, e, centre, scale, lower, upper, total, sumsq, mean, dev, keep_lo, keep_hi
    cdef double floor
    for k in range(nframes):
        q = qual[k * fstride]
        qand = qand & q
        v = data[k * fstride]
        e = errs[k * fstride]
        if (q & reject_bits) == 0 and isfinite(v) and isfinite(e):
            vals[k] = v
            errv[k] = e
            sorted_vals[k] = v
            n += 1
        else:
            vals[k] = NAN
            errv[k] = NAN
            sorted_vals[k] = INFINITY    # sorts after every good value
    if n == 0:
        value[0] = NAN
        error[0] = NAN
        count[0] = 0
        qout[0] = qand | NO_DATA
        return
    _network_sort(sorted_vals, network, npairs)
    lo = 0
    hi = n
    it = 0
    while it < max_iters:
        centre = _sorted_median(sorted_vals, lo, hi)
        if scale_method == 0:
            scale = MAD_TO_STD * _mad(sorted_vals, lo, hi, nframes, centre, errv + nframes,
                                      network, npairs)
        else:
            # population std of the survivors, summed in frame order like numpy
            total = 0.0
            nsurv = 0
            for k in range(nframes):
                v = vals[k]
                if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                    total = total + v
                    nsurv += 1
            mean = total / nsurv
            sumsq = 0.0
            for k in range(nframes):
                v = vals[k]
                if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                    dev = v - mean
                    sumsq = sumsq + dev * dev
            scale = sqrt(sumsq / nsurv)
        if error_floor:
            # never reject a value that lies within sigma of the centre in units of the
            # survivors' own errors: with few frames the MAD is often tiny by chance
            sumsq = 0.0
            nsurv = 0
            for k in range(nframes):
                v = vals[k]
                if v >= sorted_vals[lo] and v <= sorted_vals[hi - 1]:
                    sumsq = sumsq + errv[k] * errv[k]
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
    keep_lo = sorted_vals[lo]
    keep_hi = sorted_vals[hi - 1]
    total = 0.0
    sumsq = 0.0
    for k in range(nframes):
        v = vals[k]
        if v >= keep_lo and v <= keep_hi:
            total = total + v
            sumsq = sumsq + errv[k] * errv[k]
    if combine_method == 0:
        value[0] = <float>(total / nsurv)
        error[0] = <float>(sqrt(sumsq) / nsurv)
    else:
        value[0] = <float>_sorted_median(sorted_vals, lo, hi)
        if nsurv > 2:
            error[0] = <float>(SQRT_HALF_PI * sqrt(sumsq) / nsurv)
        else:
            error[0] = <float>(sqrt(sumsq) / nsurv)
    count[0] = <short>nsurv
    qout[0] = qand


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
    int num_threads=0,
    int error_floor=0,
):
    """Stack ``data[k, row, col]`` over ``k`` into the ``out_*`` arrays (see module doc).

    All arrays must be C-contiguous; ``data``, ``errs`` and ``qual`` share one shape
    ``(nframes, rows, cols)`` and the outputs have shape ``(rows, cols)``.
    """
    cdef Py_ssize_t nframes = data.shape[0], rows = data.shape[1], cols = data.shape[2]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t fstride = rows * cols
    cdef double* scratch
    cdef const float* dptr
    cdef const float* eptr
    cdef const unsigned char* qptr
    cdef float* vout
    cdef float* eout
    cdef short* cout
    cdef unsigned char* qout
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
    if num_threads <= 0:
        num_threads = _default_threads()
    cdef int[::1] network = sorting_network(<int>nframes)
    cdef int npairs = <int>(network.shape[0] // 2)
    if npairs == 0:
        network = np.zeros(2, dtype=np.intc)
    cdef Py_ssize_t stride = 4 * nframes + (2 * TILE * nframes) + (TILE * nframes) // 8 + 1
    cdef double* buffers = <double*>malloc(num_threads * stride * sizeof(double))
    cdef float* tile_v
    cdef float* tile_e
    cdef unsigned char* tile_q
    cdef Py_ssize_t j0, width, k, jj
    if buffers == NULL:
        raise MemoryError("no memory for the stacking scratch buffers")
    try:
        with nogil:
            for i in prange(rows, num_threads=num_threads, schedule="static"):
                scratch = buffers + threadid() * stride
                dptr = &data[0, i, 0]
                eptr = &errs[0, i, 0]
                qptr = &qual[0, i, 0]
                vout = &out_value[i, 0]
                eout = &out_error[i, 0]
                cout = &out_count[i, 0]
                qout = &out_qual[i, 0]
                tile_v = <float*>(scratch + 4 * nframes)
                tile_e = tile_v + TILE * nframes
                tile_q = <unsigned char*>(tile_e + TILE * nframes)
                for j0 in range(0, cols, TILE):
                    width = cols - j0
                    if width > TILE:
                        width = TILE
                    for k in range(nframes):
                        memcpy(tile_v + k * TILE, dptr + k * fstride + j0, width * sizeof(float))
                        memcpy(tile_e + k * TILE, eptr + k * fstride + j0, width * sizeof(float))
                        memcpy(tile_q + k * TILE, qptr + k * fstride + j0, width)
                    for jj in range(width):
                        j = j0 + jj
                        _stack_pixel(tile_v + jj, tile_e + jj, tile_q + jj, TILE,
                                     <int>nframes, reject_bits, sigma_lower, sigma_upper,
                                     max_iters, scale_method, combine_method, error_floor,
                                     &network[0], npairs, scratch,
                                     scratch + nframes, scratch + 3 * nframes, vout + j,
                                     eout + j, cout + j, qout + j)
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
