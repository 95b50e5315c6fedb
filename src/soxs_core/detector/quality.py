"""Bits of the QUAL plane.

QUAL is ``uint8``; a pixel is good when QUAL == 0.  Readers that only know "0 good, non-zero
bad" (soxspipe reads QUAL as a boolean) see the same pixels as bad.

Each bit's meaning is written once, in :data:`MEANING`; the table below, the recipes' man
pages and the README's table are generated from it.

In a combined product (master bias, master dark) a bit of the inputs (STATIC_BAD, SATURATED,
NON_FINITE, COSMIC) is set where *every* input had it.  STATIC_BAD is a label, not a
rejection: a static bad pixel's values are stacked like any other pixel's, so its FLUX and
ERRS are its own measured level and error (what a later subtraction needs), and it is only
left out of QC statistics and of the HOT/COLD search.  NO_DATA is set only where no usable
value was measured at all (every input saturated, non-finite or cosmic-flagged, or all
clipped away); there FLUX holds the local smooth level of the master and ERRS the
single-frame noise, so that arithmetic on the product stays finite.

"""

from __future__ import annotations

import enum

__all__ = ["Qual", "MEANING", "legend", "describe_bits", "REJECT_FOR_STACKING"]


class Qual(enum.IntFlag):
    """QUAL bit values (their meanings: :data:`MEANING`)."""

    STATIC_BAD = 1
    HOT = 2
    COLD = 4
    SATURATED = 8
    COSMIC = 16
    NO_DATA = 32
    NON_FINITE = 64
    LOW_SENS = 128


#: What each bit means, in one line: the single source of the QUAL legend.
MEANING: dict[Qual, str] = {
    Qual.STATIC_BAD: "in the static bad-pixel map shipped for the arm and binning (FLUX and "
                     "ERRS are still the pixel's own measured values)",
    Qual.HOT: "dark/bias level far above its neighbourhood (found by mdark/mbias)",
    Qual.COLD: "level far below its neighbourhood (found by mbias)",
    Qual.SATURATED: "raw value at or above the detector saturation level (in a master: in "
                    "every input)",
    Qual.COSMIC: "hit by a cosmic ray (single-frame detection)",
    Qual.NO_DATA: "nothing usable was measured (every input saturated, non-finite, "
                  "cosmic-flagged or clipped); a master's FLUX there is the local smooth "
                  "level and its ERRS the single-frame noise",
    Qual.NON_FINITE: "NaN or infinite input value",
    Qual.LOW_SENS: "response far below that of its neighbours in the master flat (found by "
                   "mflat): flat-fielding would amplify its noise",
}


def legend() -> list[tuple[int, str, str]]:
    """``(value, name, meaning)`` of every QUAL bit, lowest bit first."""
    return [(int(bit.value), bit.name, MEANING[bit]) for bit in Qual]


#: Bits that exclude an input pixel from a stack.  STATIC_BAD is not among them: it labels a
#: pixel, whose measured values are stacked (the bit survives the stack, as every input has
#: it).
REJECT_FOR_STACKING = int(Qual.SATURATED | Qual.COSMIC | Qual.NO_DATA | Qual.NON_FINITE)


def describe_bits() -> list[tuple[int, str]]:
    """Return ``(value, name)`` pairs, e.g. for documenting QUAL in a FITS header."""
    return [(int(b.value), b.name) for b in Qual]


def _legend_table() -> str:
    """The legend as a reStructuredText table, for this module's docstring."""
    width = max(len(name) for _, name, _ in legend())
    rule = f"=====  {'=' * width}  {'=' * max(len(m) for *_, m in legend())}"
    rows = [f"{value:<5}  {name:<{width}}  {meaning}" for value, name, meaning in legend()]
    head = f"{'bit':<5}  {'name':<{width}}  meaning"
    return "\n".join([rule, head, rule, *rows, rule, ""])


__doc__ += _legend_table()
