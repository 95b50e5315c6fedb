"""Opening FITS files defensively.

Raw frames arrive as plain FITS, gzip (``.fits.gz``), Unix ``compress`` (``.fits.Z``) or
tile-compressed (``.fits.fz``).  ``.gz`` and ``.Z`` files are expanded once into a private
temporary file so that pixels can always be read in row bands: memory then stays flat however
many frames are stacked.  Plain FITS is read by :mod:`soxs_core.io.fits`; astropy is imported
only for tile-compressed images.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np

from soxs_core.errors import InputError
from soxs_core.io.fits import FitsFile, HduSequence, Header
from soxs_core.io.safety import scratch_directory, untrack

__all__ = ["open_fits", "OpenFits", "image_hdu_index", "ScratchDir", "scaling",
           "scaled_float32", "read_scaled"]

_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_COMPRESS_MAGIC = b"\x1f\x9d"


class ScratchDir:
    """A private temporary directory, made when first used and removed on :meth:`cleanup`.

    Most inputs are plain FITS and need none, so nothing is created until :attr:`path` is
    asked for.  It is removed on SIGTERM/SIGINT too (which skip finalisers), and one that a
    SIGKILL left is removed by a later run (:func:`soxs_core.io.safety.remove_stale_scratch`).
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = scratch_directory()
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._path, True)
        return self._path

    def cleanup(self) -> None:
        if self._path is not None:
            self._finalizer()
            untrack(self._path)
            self._path = None


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


class OpenFits(HduSequence):
    """An opened FITS file: HDU layout from :mod:`soxs_core.io.fits`, tile-compressed images
    through astropy (imported only for them).

    Items are :class:`~soxs_core.io.fits.HDUInfo`; for a tile-compressed image the item's
    header is the image header astropy reconstructs (NAXISn, BITPIX, BSCALE... of the image)
    and ``compressed`` is true.
    """

    def __init__(self, source: Path, path: Path, scratch: ScratchDir | None = None) -> None:
        self.source = source  #: the file as given
        self.name = str(source)
        self.path = path  #: the plain FITS file that is read (``source`` or its expansion)
        self._scratch = scratch  # an expansion lives as long as this object
        self._file = FitsFile(path, name=str(source))
        self.hdus = list(self._file.hdus)
        self._astropy = None
        if any(hdu.compressed for hdu in self.hdus):
            self._open_compressed()

    def _open_compressed(self) -> None:
        import warnings

        from astropy.io import fits

        for hdu in self.hdus:
            if hdu.compressed:
                # astropy silently drops a tile-compressed HDU whose BSCALE/BZERO is not a
                # number; say which keyword is wrong instead of "unreadable"
                scaling(hdu.header, str(self.source))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hdul = fits.open(self.path, mode="readonly", memmap=True,
                                 do_not_scale_image_data=True, lazy_load_hdus=False)
        except Exception as exc:  # astropy raises OSError, ValueError, VerifyError...
            raise InputError(f"{self.source}: unreadable FITS file ({exc})") from None
        if len(hdul) < len(self.hdus):
            hdul.close()
            raise InputError(f"{self.source}: unreadable FITS file (astropy finds "
                             f"{len(hdul)} HDUs, not {len(self.hdus)})")
        self._astropy = hdul
        for i, hdu in enumerate(self.hdus):
            if hdu.compressed:
                self.hdus[i] = dataclasses.replace(
                    hdu, header=Header.from_cards(hdul[i].header.cards))

    def filename(self) -> str:
        return str(self.source)

    def astropy_hdu(self, index: int):
        """The astropy ``CompImageHDU`` of a tile-compressed image."""
        if not self.hdus[index].compressed or self._astropy is None:
            raise ValueError(f"{self.source}: HDU {index} is not tile-compressed")
        return self._astropy[index]

    def read(self, index: int) -> np.ndarray:
        """Stored values of an image HDU, BZERO/BSCALE not applied (a tile-compressed integer
        image is decompressed by astropy, also without scaling)."""
        hdu = self.hdus[index]
        if hdu.compressed:
            data = self.astropy_hdu(index).data
            if data is None:
                raise InputError(f"{self.source}: HDU {index} has no data")
            return np.asarray(data)
        return self._file.read(hdu)

    def close(self) -> None:
        if self._astropy is not None:
            self._astropy.close()
            self._astropy = None

    def __enter__(self) -> OpenFits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def image_hdu_index(hdul: OpenFits) -> int:
    """Index of the first HDU that holds a 2-D image (primary or, for ``.fz``, an extension)."""
    for index, hdu in enumerate(hdul):
        if (hdu.is_image or hdu.compressed) and len(hdu.shape) == 2:
            return index
    raise InputError(f"{hdul.filename()}: no 2-D image in the file")


def open_fits(path: str | os.PathLike, scratch: ScratchDir | None = None) -> OpenFits:
    """Open a FITS file for reading, whatever its compression.

    Parameters
    ----------
    path : path-like
        The file.  It is never modified.
    scratch : ScratchDir, optional
        Where ``.gz`` and ``.Z`` files are expanded (a private one when not given).

    Returns
    -------
    OpenFits
        Headers and data layout of every HDU; pixels are read on demand without scaling.

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
    return OpenFits(path, target, scratch if target is not path else None)


def scaling(header, source: str = "image") -> tuple[float, float]:
    """``(BSCALE, BZERO)`` of an image header, checked.

    Parameters
    ----------
    header : mapping
        The image HDU's header (defaults 1 and 0 when the keywords are absent).
    source : str
        The file, named in the error.

    Raises
    ------
    InputError
        When either value is not a finite number, or BSCALE is 0 (which would erase the data).
    """
    values = []
    for key, default in (("BSCALE", 1.0), ("BZERO", 0.0)):
        text = header.get(key, default)
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value) or (key == "BSCALE" and value == 0):
            what = "a finite non-zero number" if key == "BSCALE" else "a finite number"
            raise InputError(f"{source}: {key} = {text!r} in the image header is not {what}")
        values.append(value)
    return values[0], values[1]


def scaled_float32(stored: np.ndarray, header, source: str = "image",
                   consume: bool = False) -> np.ndarray:
    """Stored FITS values as float32 physical values: ``stored * BSCALE + BZERO``, in float32
    and in that order (the ``_prepare`` kernel rounds the same way).

    With ``consume``, a float32 ``stored`` of the caller's own (freshly read) is converted
    in place and returned: no second full-frame plane, and none of the page faults of
    filling one (a tenth of a second per VIS plane on this kind of machine).

    Raises
    ------
    InputError
        Naming ``source`` and the keyword, when BSCALE or BZERO is unusable (see
        :func:`scaling`).
    """
    bscale, bzero = scaling(header, source)
    stored = np.asarray(stored)
    if (consume and stored.dtype.kind == "f" and stored.dtype.itemsize == 4
            and stored.flags.writeable and stored.flags.c_contiguous):
        out = stored if stored.dtype.isnative else stored.byteswap(inplace=True).view(
            stored.dtype.newbyteorder("="))
    else:
        out = stored.astype(np.float32)
    if bscale != 1.0:
        out *= np.float32(bscale)
    if bzero != 0.0:
        out += np.float32(bzero)
    return out


def read_scaled(hdu, rows: slice | None = None, cols: slice | None = None,
                source: str = "image") -> np.ndarray:
    """Read (part of) an astropy image HDU as float32 with BSCALE/BZERO applied.

    ``source`` names the file in errors (an unusable BSCALE/BZERO, no data).
    """
    key = (rows or slice(None), cols or slice(None))
    fits = sys.modules.get("astropy.io.fits")  # an astropy HDU implies astropy is loaded
    if fits is not None and isinstance(hdu, fits.CompImageHDU):
        data = np.asarray(hdu.section[key])
        # integers come back unscaled (the file is opened without scaling), floats scaled
        return scaled_float32(data, hdu.header, source) if data.dtype.kind in "iu" else \
            data.astype(np.float32)
    if hdu.data is None:
        raise InputError(f"{source}: image HDU has no data")
    return scaled_float32(hdu.data[key], hdu.header, source)
