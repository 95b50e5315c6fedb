"""Bits of the QUAL plane.

QUAL is ``uint8``; a pixel is good when QUAL == 0.  Readers that only know "0 good, non-zero
bad" (soxspipe reads QUAL as a boolean) see the same pixels as bad.

=====  ==============  ================================================================
bit    name            meaning
=====  ==============  ================================================================
1      STATIC_BAD      in the static bad-pixel map shipped for the arm and binning
2      HOT             dark/bias level far above its neighbourhood (found by mdark/mbias)
4      COLD            level far below its neighbourhood, or low sensitivity (mflat)
8      SATURATED       raw value at or above the detector saturation level
16     COSMIC          hit by a cosmic ray (single-frame detection)
32     NO_DATA         no good value survived (every input flagged, clipped or non-finite)
64     NON_FINITE      NaN or infinite input value
128    OUTSIDE         outside the illuminated orders / slit (spectroscopic products)
=====  ==============  ================================================================
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Qual", "describe_bits", "REJECT_FOR_STACKING"]


class Qual(enum.IntFlag):
    """QUAL bit values."""

    STATIC_BAD = 1
    HOT = 2
    COLD = 4
    SATURATED = 8
    COSMIC = 16
    NO_DATA = 32
    NON_FINITE = 64
    OUTSIDE = 128


#: Bits that exclude an input pixel from a stack.
REJECT_FOR_STACKING = int(
    Qual.STATIC_BAD | Qual.SATURATED | Qual.COSMIC | Qual.NO_DATA | Qual.NON_FINITE
)


def describe_bits() -> list[tuple[int, str]]:
    """Return ``(value, name)`` pairs, e.g. for documenting QUAL in a FITS header."""
    return [(int(b.value), b.name) for b in Qual]


def count_flagged(qual: np.ndarray, bits: int = 0xFF) -> int:
    """Number of pixels with any of ``bits`` set."""
    return int(np.count_nonzero(qual & np.uint8(bits)))
