# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Raw 16-bit FITS rows to prepared electrons, 1-sigma errors and QUAL in one pass.

The pure-numpy twin is :func:`soxs_core.rawframe.prepare_band_reference`; the tests hold the
two equal bit for bit.  Keep them in step.

For each pixel, in float32 arithmetic and this order:

    adu  = raw * bscale + bzero             (raw: big-endian 16-bit, signed or unsigned;
                                             the multiply is skipped when bscale == 1 and
                                             the add when bzero == 0, as numpy does)
    qual = static_bits | SATURATED (8) if adu >= saturation
    e    = adu * gain
    var  = max(e - bias, 0) + ron2          (without a bias: var = ron2)
    err  = sqrt(var)

FITS stores integers big-endian; the rows arrive as a (possibly rotated, strided) view of
the memory-mapped file reinterpreted as native uint16, and the bytes are swapped here.
"""

from cython.parallel cimport prange
from libc.math cimport sqrtf

cdef unsigned char SATURATED = 8


cdef inline float _adu(unsigned short stored, bint is_signed, bint scale, bint shift,
                       float bscale, float bzero) noexcept nogil:
    cdef unsigned short swapped = <unsigned short>((stored >> 8) | (stored << 8))
    cdef float value
    if is_signed:
        value = <float>(<short>swapped)
    else:
        value = <float>swapped
    if scale:
        value = value * bscale
    if shift:
        value = value + bzero
    return value


def prepare_rows_be16(
    const unsigned short[:, :] raw,
    bint is_signed,
    float bscale,
    float bzero,
    float gain,
    float ron2,
    float saturation,
    const unsigned char[:, :] static_bits,
    float[:, :] out_electrons,
    float[:, :] out_error,
    unsigned char[:, :] out_qual,
    const float[:, :] bias=None,
    bint has_bias_level=False,
    float bias_level=0.0,
    int num_threads=1,
):
    """Prepare a block of rows (see module doc).

    ``bias`` (an image block) or ``bias_level`` (a constant, with ``has_bias_level``) is the
    level above which the Poisson term counts; without either the error is the read noise.
    """
    cdef Py_ssize_t rows = raw.shape[0], cols = raw.shape[1], i, j
    cdef bint scale = bscale != 1.0
    cdef bint shift = bzero != 0.0
    cdef bint has_bias = bias is not None
    cdef float adu, e, var
    cdef unsigned char q
    if (out_electrons.shape[0] != rows or out_electrons.shape[1] != cols
            or out_error.shape[0] != rows or out_error.shape[1] != cols
            or out_qual.shape[0] != rows or out_qual.shape[1] != cols
            or static_bits.shape[0] != rows or static_bits.shape[1] != cols):
        raise ValueError("all blocks must have the shape of raw")
    if has_bias and (bias.shape[0] != rows or bias.shape[1] != cols):
        raise ValueError("bias must have the shape of raw")
    with nogil:
        for i in prange(rows, num_threads=num_threads, schedule="static"):
            for j in range(cols):
                adu = _adu(raw[i, j], is_signed, scale, shift, bscale, bzero)
                q = static_bits[i, j]
                if adu >= saturation:
                    q = q | SATURATED
                e = adu * gain
                if has_bias:
                    var = e - bias[i, j]
                    if not (var > 0):
                        var = 0
                    var = var + ron2
                elif has_bias_level:
                    var = e - bias_level
                    if not (var > 0):
                        var = 0
                    var = var + ron2
                else:
                    var = ron2
                out_electrons[i, j] = e
                out_error[i, j] = sqrtf(var)
                out_qual[i, j] = q
    return None
