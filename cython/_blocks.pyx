# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Block means over the good pixels of an image, in one pass.

The pure-numpy twin is :func:`soxs_core.combine.qc.good_block_mean_reference`; the tests hold the
two equal bit for bit.  Keep them in step.

For each ``block`` x ``block`` cell (edges that do not fill a cell are dropped), in double
precision: each column of the cell is summed from top to bottom, a pixel contributing its
value when its QUAL is 0 and it is finite and +0.0 otherwise; those column sums are added from
left to right; the mean is that total over the number of contributing pixels, rounded to
float32, or NaN when there is none.  (Column sums first: the inner loops then run along rows
and vectorise.)
"""

from cython.parallel cimport prange
from libc.math cimport NAN
from libc.stdlib cimport malloc, free


cdef extern from *:
    """
    /* One row of a cell row into the column sums: restrict pointers and a select that the
       compiler turns into vector blends. */
    static void soxs_add_good(const float *restrict values, const unsigned char *restrict qual,
                              double *restrict colsum, int *restrict colcount, long n) {
        for (long x = 0; x < n; x++) {
            float v = values[x];
            /* v - v == 0 is false exactly for NaN and infinities */
            int ok = (qual[x] == 0) & (v - v == 0.0f);
            colsum[x] = colsum[x] + (ok ? (double)v : 0.0);
            colcount[x] += ok;
        }
    }
    """
    void soxs_add_good(const float* values, const unsigned char* qual, double* colsum,
                       int* colcount, long n) noexcept nogil


cdef void _block_row(const float* data, const unsigned char* qual, Py_ssize_t stride,
                     Py_ssize_t nbx, int block, double* colsum, int* colcount,
                     float* out) noexcept nogil:
    """One row of cells; ``data``/``qual`` point at the cell row's first pixel."""
    cdef Py_ssize_t width = nbx * block, bx, i, x
    cdef double total
    cdef long count
    for x in range(width):
        colsum[x] = 0.0
        colcount[x] = 0
    for i in range(block):
        soxs_add_good(data + i * stride, qual + i * stride, colsum, colcount, width)
    for bx in range(nbx):
        total = 0.0
        count = 0
        for x in range(bx * block, bx * block + block):
            total = total + colsum[x]
            count += colcount[x]
        out[bx] = <float>(total / count) if count else NAN


def good_block_mean(const float[:, ::1] data, const unsigned char[:, ::1] qual, int block,
                    float[:, ::1] out, int num_threads=1):
    """Fill ``out`` (rows // block, cols // block) with the cell means (see module doc)."""
    cdef Py_ssize_t rows = data.shape[0], cols = data.shape[1], by
    cdef int failed = 0
    cdef Py_ssize_t nby = rows // block, nbx = cols // block
    if block < 1:
        raise ValueError("block must be positive")
    if qual.shape[0] != rows or qual.shape[1] != cols:
        raise ValueError("qual must have the shape of data")
    if out.shape[0] != nby or out.shape[1] != nbx:
        raise ValueError("out must have shape (rows // block, cols // block)")
    if nby == 0 or nbx == 0:
        return None
    cdef double* colsum
    cdef int* colcount
    with nogil:
        for by in prange(nby, num_threads=num_threads, schedule="static"):
            colsum = <double*>malloc(nbx * block * sizeof(double))
            colcount = <int*>malloc(nbx * block * sizeof(int))
            if colsum != NULL and colcount != NULL:
                _block_row(&data[by * block, 0], &qual[by * block, 0], cols, nbx, block,
                           colsum, colcount, &out[by, 0])
            else:
                out[by, 0] = NAN  # no memory: marked, and reported below
                failed += 1
            free(colsum)
            free(colcount)
    if failed:
        raise MemoryError("no memory for the block sums")
    return None
