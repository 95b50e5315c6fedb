"""The detector image data model: FLUX, QUAL and ERRS planes with a header.

Image products are written as three HDUs — ``FLUX`` (primary, float32, electrons), ``QUAL``
(uint8 bitmask, see :mod:`soxs_core.detector.quality`) and ``ERRS`` (float32, 1-sigma
electrons) — the layout soxspipe uses, so either pipeline can read the other's masters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soxs_core.detector.quality import describe_bits
from soxs_core.errors import InputError
from soxs_core.io.compressed import open_fits, scaled_float32
from soxs_core.io.fits import Header

__all__ = ["DetectorImage", "read_image_product", "image_hdus"]


@dataclass
class DetectorImage:
    """A prepared detector image with its per-pixel error and quality.

    Attributes
    ----------
    data : ndarray of float32
        Flux in electrons.
    error : ndarray of float32
        1-sigma uncertainty of ``data`` in electrons.
    qual : ndarray of uint8
        Quality bits; 0 = good.
    header : soxs_core.io.fits.Header
        Primary header.
    """

    data: np.ndarray
    error: np.ndarray
    qual: np.ndarray
    header: Header = field(default_factory=Header)

    def __post_init__(self) -> None:
        if not (self.data.shape == self.error.shape == self.qual.shape):
            raise ValueError("data, error and qual must have one shape")

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def good(self) -> np.ndarray:
        """Boolean mask of pixels with QUAL == 0."""
        return self.qual == 0


def image_hdus(image: DetectorImage, header: Header) -> list[tuple[Header, np.ndarray]]:
    """FLUX/QUAL/ERRS HDUs, as ``(header, data)`` pairs for :func:`~soxs_core.io.fits.write_fits`,
    of an image and its (complete) primary header; ``header`` itself is not modified."""
    primary = header.copy()
    primary["EXTNAME"] = ("FLUX", "flux in electrons")
    primary["BUNIT"] = ("electron", "unit of the FLUX plane")
    qual_header = Header()
    qual_header["EXTNAME"] = ("QUAL", "quality bitmask, 0 = good")
    for value, name in describe_bits():
        qual_header[f"QBIT{value.bit_length() - 1}"] = (value, name)
    err_header = Header()
    err_header["EXTNAME"] = ("ERRS", "1-sigma uncertainty")
    err_header["BUNIT"] = ("electron", "unit of the ERRS plane")
    err_header["UTYPE"] = ("StdDevUncertainty", "ERRS holds standard deviations")
    return [
        (primary, np.asarray(image.data, np.float32)),
        (qual_header, np.asarray(image.qual, np.uint8)),
        (err_header, np.asarray(image.error, np.float32)),
    ]


def read_image_product(path: str | os.PathLike) -> DetectorImage:
    """Read a FLUX/QUAL/ERRS image product (ours or soxspipe's).

    FLUX is the primary HDU or an extension named FLUX; QUAL and ERRS are found by EXTNAME.
    BSCALE/BZERO are applied.  Tile-compressed planes are read through astropy.

    Raises
    ------
    InputError
        When the file is not such a product.
    """
    path = Path(path)
    with open_fits(path) as hdul:
        primary = hdul[0]
        flux = 0 if primary.shape else hdul.index_of("FLUX")
        qual = hdul.index_of("QUAL")
        errs = hdul.index_of("ERRS")
        if flux is None or qual is None or errs is None:
            raise InputError(f"{path}: not an image product with FLUX, QUAL and ERRS planes")
        header = primary.header.copy()
        data = scaled_float32(hdul.read(flux), hdul[flux].header, f"{path} FLUX",
                              consume=True)
        quality = hdul.read(qual).astype(np.uint8, copy=False)
        error = scaled_float32(hdul.read(errs), hdul[errs].header, f"{path} ERRS",
                               consume=True)
    if not (data.shape == quality.shape == error.shape):
        raise InputError(f"{path}: FLUX, QUAL and ERRS planes differ in shape")
    return DetectorImage(data=data, error=error, qual=quality, header=header)
