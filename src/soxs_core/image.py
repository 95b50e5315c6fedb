"""The detector image data model: FLUX, QUAL and ERRS planes with a header.

Image products are written as three HDUs — ``FLUX`` (primary, float32, electrons), ``QUAL``
(uint8 bitmask, see :mod:`soxs_core.quality`) and ``ERRS`` (float32, 1-sigma electrons) — the
layout soxspipe uses, so either pipeline can read the other's masters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import InputError
from .fitsio import open_fits, scaled_float32
from .quality import describe_bits

__all__ = ["DetectorImage", "read_image_product", "image_hdulist"]


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
    header : astropy.io.fits.Header
        Primary header.
    """

    data: np.ndarray
    error: np.ndarray
    qual: np.ndarray
    header: fits.Header = field(default_factory=fits.Header)

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


def image_hdulist(image: DetectorImage, header: fits.Header) -> fits.HDUList:
    """FLUX/QUAL/ERRS HDU list for an image and its (complete) primary header."""
    primary = fits.PrimaryHDU(np.asarray(image.data, np.float32), header=header)
    primary.header["EXTNAME"] = ("FLUX", "flux in electrons")
    primary.header["BUNIT"] = ("electron", "unit of the FLUX plane")
    qual_header = fits.Header()
    qual_header["EXTNAME"] = ("QUAL", "quality bitmask, 0 = good")
    for value, name in describe_bits():
        qual_header[f"QBIT{value.bit_length() - 1}"] = (value, name)
    err_header = fits.Header()
    err_header["EXTNAME"] = ("ERRS", "1-sigma uncertainty")
    err_header["BUNIT"] = ("electron", "unit of the ERRS plane")
    err_header["UTYPE"] = ("StdDevUncertainty", "ERRS holds standard deviations")
    return fits.HDUList([
        primary,
        fits.ImageHDU(np.asarray(image.qual, np.uint8), header=qual_header),
        fits.ImageHDU(np.asarray(image.error, np.float32), header=err_header),
    ])


def read_image_product(path: str | os.PathLike) -> DetectorImage:
    """Read a FLUX/QUAL/ERRS image product (ours or soxspipe's).

    Raises
    ------
    InputError
        When the file is not such a product.
    """
    path = Path(path)
    hdul = open_fits(path)
    try:
        names = [h.name for h in hdul]
        flux = hdul[0].data if hdul[0].data is not None else None
        if flux is None and "FLUX" in names:
            flux = hdul["FLUX"].data
        if flux is None or "QUAL" not in names or "ERRS" not in names:
            raise InputError(f"{path}: not an image product with FLUX, QUAL and ERRS planes")
        header = hdul[0].header.copy()
        data = _scaled(hdul[0] if hdul[0].data is not None else hdul["FLUX"])
        qual = np.asarray(hdul["QUAL"].data).astype(np.uint8)
        error = _scaled(hdul["ERRS"])
    finally:
        hdul.close()
    if not (data.shape == qual.shape == error.shape):
        raise InputError(f"{path}: FLUX, QUAL and ERRS planes differ in shape")
    return DetectorImage(data=data, error=error, qual=qual, header=header)


def _scaled(hdu) -> np.ndarray:
    return scaled_float32(hdu.data, hdu.header)
