# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Raw 16-bit FITS rows to prepared electrons, 1-sigma errors and QUAL in one pass.

The pure-numpy twin is :func:`soxs_core.detector.rawframe.prepare_band_reference`; the tests hold the
two equal bit for bit.  Keep them in step.

For each pixel, in float32 arithmetic and this order:

    adu  = raw * bscale + bzero             (raw: big-endian 16-bit, signed or unsigned)
    qual = static_bits | SATURATED (8) if adu >= saturation
    e    = adu * gain
    var  = max(e - bias, 0) + ron2          (without a bias: var = ron2)
    err  = sqrt(var)

FITS stores integers big-endian; the rows arrive as a (possibly rotated, strided) view of
an array that :class:`soxs_core.detector.rawframe._PlainImage` filled with ``os.preadv``
(frames are never memory-mapped), reinterpreted as native uint16, and the bytes are swapped
here.
"""

from cython.parallel cimport prange
from libc.math cimport sqrtf

cdef unsigned char SATURATED = 8


cdef void _prepare_row(const unsigned short* raw, Py_ssize_t cols, bint is_signed,
                       float bscale, float bzero, float gain, float ron2, float saturation,
                       const unsigned char* static_bits, const float* bias, int bias_mode,
                       float bias_level, float* electrons, float* error,
                       unsigned char* qual) noexcept nogil:
    """One row, as a few straight loops without branches inside, which the compiler
    vectorises.  bias_mode: 0 none, 1 level, 2 image.  Multiplying by 1 and adding 0 are
    exact, so they are always done."""
    cdef Py_ssize_t j
    cdef unsigned short swapped
    cdef float adu, var
    if is_signed:
        for j in range(cols):
            swapped = <unsigned short>((raw[j] >> 8) | (raw[j] << 8))
            adu = <float>(<short>swapped) * bscale
            electrons[j] = adu + bzero
    else:
        for j in range(cols):
            swapped = <unsigned short>((raw[j] >> 8) | (raw[j] << 8))
            adu = <float>swapped * bscale
            electrons[j] = adu + bzero
    for j in range(cols):
        qual[j] = static_bits[j] | (SATURATED if electrons[j] >= saturation else 0)
    for j in range(cols):
        electrons[j] = electrons[j] * gain
    if bias_mode == 2:
        for j in range(cols):
            var = electrons[j] - bias[j]
            var = var if var > 0 else 0
            error[j] = sqrtf(var + ron2)
    elif bias_mode == 1:
        for j in range(cols):
            var = electrons[j] - bias_level
            var = var if var > 0 else 0
            error[j] = sqrtf(var + ron2)
    else:
        for j in range(cols):
            error[j] = sqrtf(0 + ron2)


def prepare_rows_be16(
    const unsigned short[:, :] raw,
    bint is_signed,
    float bscale,
    float bzero,
    float gain,
    float ron2,
    float saturation,
    const unsigned char[:, ::1] static_bits,
    float[:, ::1] out_electrons,
    float[:, ::1] out_error,
    unsigned char[:, ::1] out_qual,
    const float[:, ::1] bias=None,
    bint has_bias_level=False,
    float bias_level=0.0,
    int num_threads=1,
):
    """Prepare a block of rows (see module doc); every row must be contiguous.

    ``bias`` (an image block) or ``bias_level`` (a constant, with ``has_bias_level``) is the
    level above which the Poisson term counts; without either the error is the read noise.
    """
    cdef Py_ssize_t rows = raw.shape[0], cols = raw.shape[1], i
    cdef int bias_mode = 2 if bias is not None else (1 if has_bias_level else 0)
    if (out_electrons.shape[0] != rows or out_electrons.shape[1] != cols
            or out_error.shape[0] != rows or out_error.shape[1] != cols
            or out_qual.shape[0] != rows or out_qual.shape[1] != cols
            or static_bits.shape[0] != rows or static_bits.shape[1] != cols):
        raise ValueError("all blocks must have the shape of raw")
    if bias_mode == 2 and (bias.shape[0] != rows or bias.shape[1] != cols):
        raise ValueError("bias must have the shape of raw")
    if raw.strides[1] != sizeof(unsigned short):
        raise ValueError("every row of raw must be contiguous")
    if rows == 0 or cols == 0:
        return None
    with nogil:
        for i in prange(rows, num_threads=num_threads, schedule="static"):
            _prepare_row(&raw[i, 0], cols, is_signed, bscale, bzero, gain, ron2, saturation,
                         &static_bits[i, 0], &bias[i, 0] if bias_mode == 2 else NULL,
                         bias_mode, bias_level, &out_electrons[i, 0], &out_error[i, 0],
                         &out_qual[i, 0])
    return None
