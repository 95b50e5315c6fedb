"""Raw detector frames: identification from headers and band-wise preparation.

A :class:`RawFrame` is cheap: it reads the header at once and the pixels only when asked for a
band of prepared rows.  "Prepared" means rotated to the common orientation, trimmed of
prescan/overscan and converted to electrons, exactly as every static table expects.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soxs_core import _prepare
from soxs_core.detector.instruments import Arm, arm_from_header
from soxs_core.detector.quality import Qual
from soxs_core.errors import InputError
from soxs_core.io.compressed import (
    OpenFits,
    ScratchDir,
    image_hdu_index,
    open_fits,
    read_scaled,
    scaled_float32,
    scaling,
)
from soxs_core.io.fits import Header

__all__ = ["RawFrame", "rotated_rows", "FRAME_TYPES", "frame_type_from_dpr"]

log = logging.getLogger(__name__)

#: ``(DPR TYPE, DPR TECH)`` patterns mapped to the frame-type stem of the SOF tag.  The first
#: match wins; a ``None`` TECH matches anything.
FRAME_TYPES: tuple[tuple[str, str | None, str], ...] = (
    ("BIAS", None, "BIAS"),
    ("DARK", None, "DARK"),
    ("LAMP,FLAT", "IMAGE", "FLAT_OFF"),
    ("FLAT,LAMP", "IMAGE", "FLAT_OFF"),
    ("LAMP,FLAT", None, "FLAT"),
    ("FLAT,LAMP", None, "FLAT"),
    ("LAMP,DFLAT", None, "DFLAT"),
    ("LAMP,QFLAT", None, "QFLAT"),
    ("LAMP,ORDERDEF", None, "ORDERDEF"),
    ("LAMP,DORDERDEF", None, "DORDERDEF"),
    ("LAMP,QORDERDEF", None, "QORDERDEF"),
    ("LAMP,FMTCHK", None, "FMTCHK"),
    ("LAMP,WAVE", "ECHELLE,MULTI-PINHOLE", "WAVE_MULTIPIN"),
    ("LAMP,WAVE", None, "WAVE"),
    ("STD,FLUX", None, "STD_FLUX"),
    ("STD", None, "STD_FLUX"),
    # telluric standards: the stem of their SOF tag STD_TELLURIC_<ARM>; soxspipe's organiser
    # also takes STD,SKY as one (INSTRUMENTS.md 3.2)
    ("STD,TELLURIC", None, "STD_TELLURIC"),
    ("STD,SKY", None, "STD_TELLURIC"),
    ("OBJECT", None, "OBJECT"),
    ("OBJECT,ASYNC", None, "OBJECT"),
)


def frame_type_from_dpr(dpr_type: str, dpr_tech: str) -> str | None:
    """Frame-type stem (``BIAS``, ``DARK``...) of a raw frame, or None when unknown."""
    dpr_type = dpr_type.strip().upper()
    dpr_tech = dpr_tech.strip().upper()
    for ftype, ftech, stem in FRAME_TYPES:
        if dpr_type == ftype and (ftech is None or dpr_tech == ftech):
            return stem
    return None


def rotated_rows(raw: np.ndarray, rotation: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``np.rot90(raw, rotation)`` without rotating the whole array.

    ``raw`` may be a memory map; only the needed part is touched.
    """
    rotation %= 4
    height, width = raw.shape
    if rotation == 0:
        return raw[start:stop]
    if rotation == 2:
        return raw[height - stop:height - start][::-1, ::-1]
    if rotation == 1:
        return np.rot90(raw[:, width - stop:width - start], 1)
    return np.rot90(raw[:, start:stop], 3)


@dataclass
class RawFrame:
    """One raw exposure of one arm.

    Use :meth:`open`; the constructor only stores what it is given.
    """

    path: Path
    header: Header
    arm: Arm
    binx: int
    biny: int
    exptime: float
    dpr_catg: str
    dpr_type: str
    dpr_tech: str
    readout: str
    gain: float
    gain_source: str
    read_noise: float
    read_noise_source: str
    saturation_adu: float
    #: BSCALE and BZERO of the image (checked when the frame is opened).
    bscale: float = 1.0
    bzero: float = 0.0
    #: Where each :attr:`setup` value that comes from a header keyword was found, as text
    #: naming the keyword and the value in the file (``ESO DET OUT1 CONAD = 0.6``), or saying
    #: that it is missing or unusable and which default replaced it.
    origins: dict[str, str] = field(default_factory=dict)
    _hdul: OpenFits = field(repr=False, default=None)
    _hdu_index: int = field(repr=False, default=0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | os.PathLike, scratch: ScratchDir | None = None) -> RawFrame:
        """Open a raw frame and read everything needed from its header.

        Raises
        ------
        InputError
            When the file is unreadable or its header lacks what identifies the frame.
        """
        path = Path(path)
        hdul = open_fits(path, scratch)
        try:
            return cls._from_opened(path, hdul)
        except BaseException:  # a refused frame must not keep its file (or expansion) open
            hdul.close()
            raise

    @classmethod
    def _from_opened(cls, path: Path, hdul: OpenFits) -> RawFrame:
        index = image_hdu_index(hdul)
        header = hdul[0].header.copy()
        if index:
            for card in hdul[index].header.cards:
                if card.keyword not in header and card.keyword not in ("XTENSION", "PCOUNT",
                                                                       "GCOUNT"):
                    header.append(card)
        arm = arm_from_header(header, str(path))
        missing = [k for k in ("ESO DPR TYPE", "ESO DPR TECH", "EXPTIME") if k not in header]
        if missing:
            raise InputError(f"{path}: missing header keyword(s) {', '.join(missing)}")
        if "ESO PRO CATG" in header:
            raise InputError(f"{path}: is a pipeline product "
                             f"({header['ESO PRO CATG']}), not a raw frame")
        binx, biny = _binning(header, arm)
        if f"{binx}x{biny}" not in arm.binnings:
            raise InputError(f"{path}: binning {binx}x{biny} is not supported for "
                             f"{arm.instrument} {arm.name}")
        keys = arm.keywords
        gain = _HeaderNumber.read(header, keys.get("gain"), arm.gain, arm, "gain", "e-/ADU")
        ron = _HeaderNumber.read(header, keys.get("ron"), arm.read_noise, arm, "read noise",
                                 "e-")
        saturation = _HeaderNumber.read(header, keys.get("saturation"), arm.saturation_adu,
                                        arm, "saturation level", "ADU")
        # a missing read noise or saturation level is common (NIR raws carry none) and the
        # arm's value is the right one; a missing gain, or any value that is present but
        # unusable, points at a damaged or unusual header
        for number, missing_level in ((gain, logging.WARNING), (ron, logging.INFO),
                                      (saturation, logging.DEBUG)):
            if number.source != "header":
                log.log(missing_level if number.found is None else logging.WARNING,
                        "%s", number.warning(path.name))
        readout_key = keys.get("readout")
        readout = str(header.get(readout_key, "")).strip() if readout_key else ""
        origins = {"gain": gain.origin, "read noise": ron.origin}
        if readout_key:
            origins["readout mode"] = (f"{readout_key} = {readout!r}" if readout_key in header
                                       else f"no {readout_key}")
        bscale, bzero = scaling(hdul[index].header, str(path))
        shape = _image_shape(hdul[index])
        expected = arm.raw_shape_binned(binx, biny)
        if tuple(shape) != expected:
            raise InputError(f"{path}: image is {shape[1]}x{shape[0]} pixels, expected "
                             f"{expected[1]}x{expected[0]} for {arm.instrument} {arm.name} "
                             f"{binx}x{biny}")
        try:
            exptime = float(header["EXPTIME"])
        except (TypeError, ValueError):
            raise InputError(f"{path}: EXPTIME={header['EXPTIME']!r} is not a number") from None
        return cls(
            path=path, header=header, arm=arm, binx=binx, biny=biny, exptime=exptime,
            dpr_catg=str(header.get("ESO DPR CATG", "")).strip(),
            dpr_type=str(header["ESO DPR TYPE"]).strip(),
            dpr_tech=str(header["ESO DPR TECH"]).strip(),
            readout=readout,
            gain=gain.value, gain_source=gain.source, read_noise=ron.value,
            read_noise_source=ron.source, saturation_adu=saturation.value, bscale=bscale,
            bzero=bzero, origins=origins, _hdul=hdul, _hdu_index=index,
        )

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None

    # ------------------------------------------------------------------ identity
    @property
    def binning(self) -> str:
        return f"{self.binx}x{self.biny}"

    @property
    def frame_type(self) -> str | None:
        """Frame-type stem from DPR TYPE/TECH (``BIAS``, ``DARK``, ...)."""
        return frame_type_from_dpr(self.dpr_type, self.dpr_tech)

    @property
    def tag(self) -> str | None:
        """The SOF tag this frame should carry: ``<DPR TYPE, commas as underscores>_<ARM>``
        (``BIAS_VIS``, ``LAMP_FLAT_NIR``), the convention of soxspipe's SOFs; None for a
        frame type the pipeline does not know.  NIR lamp-off flats share the lamp-on tag:
        their DPR TECH (``IMAGE``) tells them apart."""
        if self.frame_type is None:
            return None
        return f"{self.dpr_type.strip().upper().replace(',', '_')}_{self.arm.name}"

    @property
    def prepared_shape(self) -> tuple[int, int]:
        return self.arm.prepared_shape(self.binx, self.biny)

    @property
    def setup(self) -> dict:
        """Values that must agree between frames that are combined."""
        return {"instrument": self.arm.instrument, "arm": self.arm.name,
                "binning": self.binning, "readout mode": self.readout,
                "gain": round(self.gain, 4), "read noise": round(self.read_noise, 3)}

    def setup_origin(self, key: str) -> str:
        """Where the :attr:`setup` value ``key`` came from, for messages: the keyword and the
        value found in the file (or that it is missing), else the value itself."""
        return self.origins.get(key) or f"{key} {self.setup[key]!r}"

    # ------------------------------------------------------------------ pixels
    def read_adu(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Prepared rows ``start:stop`` in ADU (float32, rotated and trimmed)."""
        rows, cols = self.arm.science_slices(self.binx, self.biny)
        height = rows.stop - rows.start
        stop = height if stop is None else min(stop, height)
        hdu = self._hdul[self._hdu_index]
        raw = _LazyScaled(self._hdul.astropy_hdu(self._hdu_index), str(self.path)) \
            if self._compressed else self._pixels()
        block = rotated_rows(raw, self.arm.rotation, rows.start + start, rows.start + stop)
        block = block[:, cols]
        if self._compressed:
            return np.ascontiguousarray(block, dtype=np.float32)
        return scaled_float32(block, hdu.header, str(self.path))

    def prepare_into(self, start: int, stop: int, electrons: np.ndarray, error: np.ndarray,
                     qual: np.ndarray, static_bits: np.ndarray, read_noise: float,
                     bias: np.ndarray | float | None = None, threads: int = 1) -> None:
        """Fill prepared rows ``start:stop``: electrons, 1-sigma errors and QUAL.

        The error is the read noise plus the Poisson noise of the signal above ``bias`` (an
        image block or a level in electrons; without one, read noise only).  Plain 16-bit
        files go through the Cython kernel; anything else through the numpy reference.
        """
        ron2 = np.float32(read_noise) ** 2
        raw = None if self._compressed else self._pixels()
        if raw is not None and raw.dtype.itemsize == 2 and raw.dtype.kind in "iu" \
                and raw.dtype.byteorder == ">":
            rows, cols = self.arm.science_slices(self.binx, self.biny)
            block = rotated_rows(raw, self.arm.rotation, rows.start + start,
                                 rows.start + stop)[:, cols].view(np.uint16)
            if block.strides[1] != 2:  # rotated arms: rows must be contiguous for the kernel
                block = np.ascontiguousarray(block)
            kwargs = {}
            if isinstance(bias, np.ndarray):
                kwargs["bias"] = np.ascontiguousarray(bias, np.float32)
            elif bias is not None:
                kwargs.update(has_bias_level=True, bias_level=float(bias))
            _prepare.prepare_rows_be16(
                block, raw.dtype.kind == "i", float(self.bscale), float(self.bzero),
                float(self.gain), float(ron2), float(self.saturation_adu), static_bits,
                electrons, error, qual, num_threads=threads, **kwargs)
            return
        adu = self.read_adu(start, stop)
        e, err, q = prepare_band_reference(adu, self.gain, ron2, self.saturation_adu,
                                           static_bits, bias)
        electrons[...] = e
        error[...] = err
        qual[...] = q

    @property
    def _compressed(self) -> bool:
        """Whether the image is tile-compressed (read through astropy)."""
        return self._hdul[self._hdu_index].compressed

    def _pixels(self) -> _PlainImage:
        """Row reader of an uncompressed image (reads only the rows asked for)."""
        if getattr(self, "_plain", None) is None:
            self._plain = _PlainImage(self._hdul, self._hdu_index)
        return self._plain

    def read_band(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prepared rows in electrons and their QUAL bits (saturation, non-finite).

        Returns
        -------
        electrons : ndarray of float32
        qual : ndarray of uint8
        """
        adu = self.read_adu(start, stop)
        qual = np.zeros(adu.shape, dtype=np.uint8)
        qual[adu >= np.float32(self.saturation_adu)] |= np.uint8(Qual.SATURATED)
        bad = ~np.isfinite(adu)
        if bad.any():
            qual[bad] |= np.uint8(Qual.NON_FINITE)
        adu *= np.float32(self.gain)
        return adu, qual


def prepare_band_reference(adu: np.ndarray, gain: float, ron2: float, saturation_adu: float,
                           static_bits: np.ndarray, bias: np.ndarray | float | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy twin of the ``_prepare`` kernel: ADU rows to electrons, errors and QUAL."""
    adu = np.asarray(adu, np.float32)
    qual = np.array(static_bits, dtype=np.uint8, copy=True)
    qual[adu >= np.float32(saturation_adu)] |= np.uint8(Qual.SATURATED)
    bad = ~np.isfinite(adu)
    if bad.any():
        qual[bad] |= np.uint8(Qual.NON_FINITE)
    electrons = adu * np.float32(gain)
    if bias is None:
        var = np.full_like(electrons, np.float32(ron2))
    else:
        var = electrons - (np.asarray(bias, np.float32) if isinstance(bias, np.ndarray)
                           else np.float32(bias))
        np.maximum(var, 0, out=var)
        var += np.float32(ron2)
    return electrons, np.sqrt(var), qual


class _PlainImage:
    """Reads rows of an uncompressed FITS image with ``os.preadv`` into fresh arrays.

    Unlike a memory map, nothing stays mapped after the rows are used, so the resident memory
    of a stack does not grow with the number of frames.  Indexing supports what
    :func:`rotated_rows` needs: ``img[r0:r1]`` and ``img[:, c0:c1]`` (always a copy).
    """

    _DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"),
               64: np.dtype(">i8"), -32: np.dtype(">f4"), -64: np.dtype(">f8")}

    def __init__(self, hdul: OpenFits, index: int) -> None:
        hdu = hdul[index]
        self.dtype = self._DTYPES[hdu.bitpix]
        self.shape = hdu.shape
        self.offset = hdu.data_offset
        self.path = hdul.path  # the expanded copy of a .gz/.Z file

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(0, r0), min(self.shape[0], r1)
        out = np.empty((max(0, r1 - r0), self.shape[1]), self.dtype)
        if out.size:
            row_bytes = self.shape[1] * self.dtype.itemsize
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [out.view(np.uint8).reshape(-1)],
                                self.offset + r0 * row_bytes)
            finally:
                os.close(fd)
            if got != out.nbytes:
                raise InputError(f"{self.path}: truncated FITS data")
        return out

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("row step must be 1")
        return self._rows(start, stop)[:, cols]


class _LazyScaled:
    """Adapter that lets :func:`rotated_rows` slice a tile-compressed HDU."""

    def __init__(self, hdu, source: str) -> None:  # an astropy CompImageHDU
        self.hdu = hdu
        self.source = source
        self.shape = _image_shape(hdu)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        return read_scaled(self.hdu, rows, cols, self.source)


def _image_shape(hdu) -> tuple[int, int]:
    """(NAXIS2, NAXIS1) of an image HDU, tile-compressed or not."""
    header = hdu.header
    if "ZNAXIS2" in header:
        return int(header["ZNAXIS2"]), int(header["ZNAXIS1"])
    return int(header["NAXIS2"]), int(header["NAXIS1"])


def _binning(header: Header, arm: Arm) -> tuple[int, int]:
    if not arm.is_ccd:
        return 1, 1
    values = []
    for axis in ("binx", "biny"):
        key = arm.keywords[axis]
        value = header.get(key, header.get("CDELT1" if axis == "binx" else "CDELT2", 1))
        try:
            values.append(int(round(float(value))))
        except (TypeError, ValueError):
            raise InputError(f"{header.get('ORIGFILE', 'frame')}: {key}={value!r} is not an "
                             "integer binning") from None
    return values[0], values[1]


@dataclass(frozen=True)
class _HeaderNumber:
    """A positive number read from a header keyword, or the arm's default in its place."""

    key: str | None
    value: float
    #: ``"header"`` or ``"default"``
    source: str
    #: The header value as found (None when the keyword is absent).
    found: object
    default_text: str

    @classmethod
    def read(cls, header: Header, key: str | None, default: float, arm: Arm, what: str,
             unit: str) -> _HeaderNumber:
        default_text = f"the {arm.instrument} {arm.name} default {what} {default:g} {unit}"
        found = header[key] if key and key in header else None
        if found is not None:
            try:
                value = float(found)
            except (TypeError, ValueError):
                value = float("nan")
            if math.isfinite(value) and value > 0:
                return cls(key, value, "header", found, default_text)
        return cls(key, float(default), "default", found, default_text)

    @property
    def origin(self) -> str:
        """The keyword and its value, or why the default is used instead."""
        if self.source == "header":
            return f"{self.key} = {self.found!r}"
        if self.found is None:
            return f"no {self.key or 'keyword'} ({self.default_text} used)"
        return f"{self.key} = {self.found!r}, not a positive number ({self.default_text} used)"

    def warning(self, filename: str) -> str:
        """The log line for a default used in place of a header value."""
        if self.found is None:
            return f"{filename}: no {self.key or 'keyword'} in the header; using " \
                   f"{self.default_text}"
        return f"{self.key} = {self.found!r} in {filename} is not a positive number; " \
               f"using {self.default_text}"
