"""Opening FITS files defensively.

Raw frames arrive as plain FITS, gzip (``.fits.gz``), Unix ``compress`` (``.fits.Z``) or
tile-compressed (``.fits.fz``).  Everything that is not a plain FITS file is expanded once into
a private temporary file so that pixels can always be memory-mapped and read in row bands:
memory then stays flat however many frames are stacked.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from .errors import InputError

__all__ = ["open_fits", "image_hdu_index", "ScratchDir"]

_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_COMPRESS_MAGIC = b"\x1f\x9d"


class ScratchDir:
    """A temporary directory that disappears with the object (or on :meth:`cleanup`)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="soxs-")
        self.path = Path(self._tmp.name)

    def cleanup(self) -> None:
        self._tmp.cleanup()


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(9)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a FITS file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None


def _expand_gzip(path: Path, out: Path) -> None:
    try:
        with gzip.open(path, "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip file ({exc})") from None


def _expand_compress(path: Path, out: Path) -> None:
    """Expand a Unix ``compress`` (LZW, ``.Z``) file."""
    try:
        import ncompress  # optional, fast C implementation

        with open(path, "rb") as src, open(out, "wb") as dst:
            ncompress.decompress(src, dst)
        return
    except ImportError:
        pass
    except Exception as exc:  # ncompress raises plain ValueError/OSError
        raise InputError(f"{path}: corrupt or truncated .Z file ({exc})") from None
    gz = shutil.which("gzip")
    if gz is None:
        raise InputError(f"{path}: .Z files need the 'gzip' program or the ncompress package")
    with open(out, "wb") as dst:
        proc = subprocess.run([gz, "-dc", str(path)], stdout=dst, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise InputError(f"{path}: corrupt or truncated .Z file ({msg[0]})")


def image_hdu_index(hdul: fits.HDUList) -> int:
    """Index of the first HDU that holds a 2-D image (primary or, for ``.fz``, an extension)."""
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            if hdu.header.get("NAXIS", 0) == 2 or (
                isinstance(hdu, fits.CompImageHDU) and hdu.header.get("ZNAXIS", 2) == 2
            ):
                return index
    raise InputError(f"{hdul.filename()}: no 2-D image in the file")


def _check_complete(path: Path, hdul: fits.HDUList) -> None:
    """Raise if the file ends before its last data unit does."""
    size = os.path.getsize(path)
    for hdu in hdul:
        offset = getattr(hdu, "_data_offset", None)
        nbytes = getattr(hdu, "_data_size", None)
        if offset is not None and nbytes is not None and offset + nbytes > size:
            raise InputError(
                f"{path}: truncated FITS file ({size} bytes, data needs {offset + nbytes})"
            )


def open_fits(path: str | os.PathLike, scratch: ScratchDir | None = None) -> fits.HDUList:
    """Open a FITS file for reading, whatever its compression.

    Parameters
    ----------
    path : path-like
        The file.  It is never modified.
    scratch : ScratchDir, optional
        Where compressed files are expanded; required for ``.gz`` and ``.Z`` input.

    Returns
    -------
    astropy.io.fits.HDUList
        Opened read-only with memory mapping and without applying BZERO/BSCALE.

    Raises
    ------
    InputError
        When the file is missing, not FITS, truncated or corrupt.
    """
    path = Path(path)
    magic = _magic(path)
    target = path
    if magic.startswith(_GZIP_MAGIC) or magic.startswith(_COMPRESS_MAGIC):
        if scratch is None:
            scratch = ScratchDir()
        target = scratch.path / (path.name + ".expanded.fits")
        n = 0
        while target.exists():
            n += 1
            target = scratch.path / f"{path.name}.{n}.expanded.fits"
        if magic.startswith(_GZIP_MAGIC):
            _expand_gzip(path, target)
        else:
            _expand_compress(path, target)
        magic = _magic(target)
    if not magic.startswith(_FITS_MAGIC):
        raise InputError(f"{path}: not a FITS file (no SIMPLE card at the start)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(
                target, mode="readonly", memmap=True, do_not_scale_image_data=True,
                lazy_load_hdus=False,
            )
    except Exception as exc:  # astropy raises OSError, ValueError, VerifyError...
        raise InputError(f"{path}: unreadable FITS file ({exc})") from None
    _check_complete(target, hdul)
    if target is not path:
        hdul._soxs_expanded = target
        hdul._soxs_scratch = scratch  # the scratch directory lives as long as the list
    hdul._soxs_source = path
    return hdul


def scaled_float32(stored: np.ndarray, header) -> np.ndarray:
    """Stored FITS values as float32 physical values: ``stored * BSCALE + BZERO``, in float32
    and in that order (the ``_prepare`` kernel rounds the same way)."""
    out = np.asarray(stored).astype(np.float32)
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    if bscale != 1.0:
        out *= np.float32(bscale)
    if bzero != 0.0:
        out += np.float32(bzero)
    return out


def read_scaled(hdu, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
    """Read (part of) an image HDU as float32 with BSCALE/BZERO applied."""
    key = (rows or slice(None), cols or slice(None))
    if isinstance(hdu, fits.CompImageHDU):
        data = np.asarray(hdu.section[key])
        # integers come back unscaled (the file is opened without scaling), floats scaled
        return scaled_float32(data, hdu.header) if data.dtype.kind in "iu" else \
            data.astype(np.float32)
    if hdu.data is None:
        raise InputError("image HDU has no data")
    return scaled_float32(hdu.data[key], hdu.header)
