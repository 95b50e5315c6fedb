"""DFS product headers and atomic product writing.

The keywords are those ``cpl.dfs.save_image`` writes (``cpl_dfs_setup_product_header``), with
the same names and meaning, so EsoReflex, EDPS and the archive treat our products like any
other ESO pipeline's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core import __version__
from soxs_core.errors import ProductError
from soxs_core.io.fits import Card, Header, card_images, write_fits

__all__ = [
    "FrameRef",
    "ProductInfo",
    "QcValue",
    "QcMeasurements",
    "QC_SUMMARY",
    "qc_comment_room",
    "dfs_header",
    "write_product_atomic",
    "data_md5",
    "PIPE_ID",
]

log = logging.getLogger(__name__)

PIPE_ID = f"soxs/{__version__}"
PRO_DID = "PRO-1.16"  # what cpl_dfs writes with CPL 7.2

#: Raw keywords that must not be inherited by a product.
_NOT_INHERITED_PREFIXES = ("ESO DPR ", "ESO PRO ", "ESO QC ")
_NOT_INHERITED = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE",
    "CHECKSUM", "DATASUM", "ARCFILE", "ORIGFILE", "PIPEFILE", "DATAMD5", "EXTNAME", "BUNIT",
    "XTENSION", "PCOUNT", "GCOUNT", "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2",
    "ZTILE1", "ZTILE2", "ZCMPTYPE", "ZQUANTIZ", "ZDITHER0", "ZSIMPLE", "ZEXTEND", "BLANK",
}


@dataclass(frozen=True)
class FrameRef:
    """A frame as the product header names it."""

    path: Path
    tag: str
    md5: str | None = None  # DATAMD5 of a calibration product, when it has one


@dataclass(frozen=True)
class QcValue:
    """One QC parameter as the header gets it: value, comment and its acceptable range.

    A value that is None or not finite could not be computed: the header leaves it out and
    the log says why (``missing_reason``).
    """

    value: float | int | None
    comment: str
    valid_range: tuple[float, float] | None = None
    missing_reason: str = ""

    @property
    def computed(self) -> bool:
        """Whether there is a finite value to write."""
        return self.value is not None and bool(np.isfinite(self.value))

    @property
    def out_of_range(self) -> bool:
        """A computed value outside its acceptable range (the ends are outside too)."""
        if self.valid_range is None or not self.computed:
            return False
        low, high = self.valid_range
        return not low < self.value < high


@dataclass
class QcMeasurements:
    """The QC values of one product, keyed by their declared names, and why any is missing.

    Science code fills it; the recipe framework pairs every entry with its declaration (header
    comment, unit, acceptable range), so names are the only thing the two share.

    Attributes
    ----------
    values : dict
        ``{QC NAME: finite value}``.
    missing : dict
        ``{QC NAME: reason}`` for the QC values that could not be computed.
    """

    values: dict[str, float | int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: float | int | None, reason_if_missing: str = "") -> None:
        """Record a value; one that is None or not finite is recorded as missing instead.

        ``reason_if_missing`` says why the value could not be computed in that case
        (e.g. "no finite difference in a frame pair").
        """
        if value is None or not np.isfinite(value):
            self.omit(name, reason_if_missing or f"its value is {value}")
        else:
            self.values[name] = value

    def omit(self, name: str, reason: str) -> None:
        """Record that a QC value could not be computed, and why."""
        self.values.pop(name, None)
        self.missing[name] = reason

    def names(self) -> set[str]:
        """Every QC name recorded, with a value or a reason."""
        return set(self.values) | set(self.missing)


#: The keywords summing up the range checks, written whenever a product has QC values, with
#: their meanings (header comment of NFAIL, man pages, README).
QC_SUMMARY = (
    ("NFAIL", "QC values outside their acceptable range"),
    ("FAILi", "the i-th of them, as 'NAME = value not in (min, max)'"),
)

#: The QC value whose card text is the widest (sign, 17 digits, three-digit exponent): a
#: comment that fits beside it fits beside any value.
WIDEST_QC_VALUE = -2.2250738585072014e-308


def qc_comment_room(name: str, value: float | int = WIDEST_QC_VALUE) -> int:
    """Characters left for the comment of ``ESO QC <name>`` beside ``value`` on its card."""
    body = card_images(Card(f"ESO QC {name}", value, ""))[0]
    return 80 - len(body) - len(" / ")


@dataclass
class ProductInfo:
    """What a product is, in DFS terms."""

    catg: str
    type: str = "REDUCED"
    tech: str = "IMAGE"
    science: bool = False
    qc: dict[str, QcValue] = field(default_factory=dict)


def _inherited_cards(header: Any) -> Iterable[Any]:
    """Cards of a raw header (ours or astropy's) that a product inherits."""
    for card in header.cards:
        key = card.keyword
        if not key or key in _NOT_INHERITED or key in ("COMMENT", "HISTORY", ""):
            continue
        if key.startswith(_NOT_INHERITED_PREFIXES):
            continue
        if key.startswith(("NAXIS", "ZNAXIS", "ZTILE", "ZNAME", "ZVAL", "TTYPE", "TFORM")):
            continue
        if key == "RADECSYS":
            yield Card("RADESYS", card.value, card.comment)
            continue
        yield card


def dfs_header(
    *,
    recipe: str,
    product: ProductInfo,
    filename: str,
    raw_frames: Sequence[FrameRef],
    calib_frames: Sequence[FrameRef] = (),
    parameters: Sequence[tuple[str, object]] = (),
    inherit_from: Any = None,
    drs_id: str = "cpl-7.2",
) -> Header:
    """Build the primary header of a product.

    Parameters
    ----------
    recipe : str
        Recipe name, e.g. ``soxs_mbias`` (``ESO PRO REC1 ID``).
    product : ProductInfo
        PRO CATG/TYPE/TECH, science flag and QC values.
    filename : str
        Base name of the product file (``PIPEFILE``).
    raw_frames, calib_frames : sequences of FrameRef
        Inputs, listed as ``ESO PRO REC1 RAWi`` / ``CALi`` in input order.
    parameters : sequence of (name, value)
        Recipe parameters with the values actually used (``ESO PRO REC1 PARAMi``).
    inherit_from : Header, optional
        Header of the first raw frame (ours or an ``astropy.io.fits.Header``); its keys are
        copied except DPR, ARCFILE, ORIGFILE and structural keywords.

    Returns
    -------
    soxs_core.io.fits.Header
        With ``DATAMD5`` set to a placeholder, filled in by :func:`write_product_atomic`.
        Inherited comments too long for their card are shortened when it is written.

    Raises
    ------
    ValueError
        When a QC comment does not fit on its card: QC comments are never cut.

    Notes
    -----
    A QC value that is None or not finite is left out, with a warning giving its
    ``missing_reason``; ``ESO QC NFAIL`` counts the written values outside their range.
    """
    header = Header()
    if inherit_from is not None:
        for card in _inherited_cards(inherit_from):
            try:
                header[card.keyword] = (card.value, card.comment)
            except ValueError:
                log.debug("not inheriting unwritable card %r", card.keyword)
        if inherit_from.get("ARCFILE"):
            # cpl_dfs keeps the raw ARCFILE as ANCESTOR of the product
            header["ANCESTOR"] = (str(inherit_from["ARCFILE"]), "Inherited archive file name")
    header["PIPEFILE"] = (filename, "Filename of data product")
    header["DATAMD5"] = ("Not computed", "MD5 checksum")
    header["HIERARCH ESO PRO DID"] = (PRO_DID, "Data dictionary for PRO")
    header["HIERARCH ESO PRO CATG"] = (product.catg, "Category of pipeline product frame")
    header["HIERARCH ESO PRO TYPE"] = (product.type, "Product type")
    header["HIERARCH ESO PRO TECH"] = (product.tech, "Observation technique")
    header["HIERARCH ESO PRO SCIENCE"] = (bool(product.science), "Scientific product if T")
    header["HIERARCH ESO PRO REC1 ID"] = (recipe, "Pipeline recipe (unique) identifier")
    header["HIERARCH ESO PRO REC1 DRS ID"] = (drs_id, "Data Reduction System identifier")
    header["HIERARCH ESO PRO REC1 PIPE ID"] = (PIPE_ID, "Pipeline (unique) identifier")
    for i, frame in enumerate(raw_frames, start=1):
        header[f"HIERARCH ESO PRO REC1 RAW{i} NAME"] = (frame.path.name, "File name")
        header[f"HIERARCH ESO PRO REC1 RAW{i} CATG"] = (frame.tag, "Frame category")
    for i, frame in enumerate(calib_frames, start=1):
        header[f"HIERARCH ESO PRO REC1 CAL{i} NAME"] = (frame.path.name, "File name")
        header[f"HIERARCH ESO PRO REC1 CAL{i} CATG"] = (frame.tag, "Frame category")
        if frame.md5:
            header[f"HIERARCH ESO PRO REC1 CAL{i} DATAMD5"] = (frame.md5, "MD5 signature")
    header["HIERARCH ESO PRO DATANCOM"] = (len(raw_frames), "Number of combined frames")
    for i, (name, value) in enumerate(parameters, start=1):
        header[f"HIERARCH ESO PRO REC1 PARAM{i} NAME"] = (name, "")
        header[f"HIERARCH ESO PRO REC1 PARAM{i} VALUE"] = (_param_string(value), "")
    failed = []
    for name, qc in product.qc.items():
        if not qc.computed:
            # a QC is a number or absent: never a 'NaN' string that archive queries trip on
            log.warning("QC %s not written: could not be computed (%s)", name,
                        qc.missing_reason or f"its value is {qc.value}")
            continue
        value = qc.value
        if isinstance(value, (np.floating, float)):
            value = float(value)
        elif isinstance(value, (np.integer, int)) and not isinstance(value, bool):
            value = int(value)
        if len(qc.comment) > qc_comment_room(name, value):
            raise ValueError(f"ESO QC {name}: comment {qc.comment!r} does not fit on the card "
                             f"beside {value!r} ({qc_comment_room(name, value)} characters)")
        header[f"HIERARCH ESO QC {name}"] = (value, qc.comment)
        if qc.out_of_range:
            failed.append((name, qc))
    if product.qc:
        header["HIERARCH ESO QC NFAIL"] = (len(failed), QC_SUMMARY[0][1])
        for i, (name, qc) in enumerate(failed, start=1):
            low, high = qc.valid_range
            header[f"HIERARCH ESO QC FAIL{i}"] = (f"{name} = {qc.value:.4g} not in "
                                                  f"({low:g}, {high:g})", "")
    return header


def _param_string(value: object) -> str:
    """A parameter value formatted as cpl_dfs does (booleans lower case, floats as %g)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def data_md5(hdus: Iterable[Any]) -> str:
    """MD5 of the data units (with FITS padding) of every HDU, as written to disk.

    ``hdus`` holds ``(header, data)`` pairs or objects with a ``data`` attribute (an astropy
    ``HDUList``); values are taken as stored (no BSCALE/BZERO).
    """
    digest = hashlib.md5()
    for hdu in hdus:
        data = hdu[1] if isinstance(hdu, tuple) else hdu.data
        if data is None:
            continue
        flat = np.ascontiguousarray(data).reshape(-1)
        big = flat.dtype.newbyteorder(">")
        step = 1 << 20  # in pieces, so that no big-endian copy of the whole image is made
        for i in range(0, flat.size, step):
            digest.update(flat[i:i + step].astype(big, copy=False).view(np.uint8))
        pad = (-flat.size * flat.dtype.itemsize) % 2880
        if pad:
            digest.update(bytes(pad))
    return digest.hexdigest()


def write_product_atomic(hdus: Sequence[tuple[Header, np.ndarray]], path: str | os.PathLike,
                         overwrite: bool = False, protected: Iterable[Path] = ()) -> Path:
    """Write a product atomically: to a temporary file beside the target, then rename.

    ``hdus`` are ``(header, data)`` pairs (primary first, see
    :func:`soxs_core.io.fits.write_fits`).  ``DATAMD5`` is computed when the primary header
    has it, and CHECKSUM/DATASUM are written on every HDU.  An existing file is replaced only
    with ``overwrite``; an input frame (``protected``) never is.

    Raises
    ------
    ProductError
        When the file exists, is an input, or cannot be written.
    """
    path = Path(path)
    resolved = path.resolve()
    for other in protected:
        if Path(other).resolve() == resolved:
            raise ProductError(f"{path}: refusing to overwrite an input frame")
    if path.exists() and not overwrite:
        raise ProductError(f"{path}: product exists already (use --overwrite to replace it)")
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProductError(f"{directory}: cannot create output directory ({exc.strerror})") \
            from None
    if not os.access(directory, os.W_OK):
        raise ProductError(f"{directory}: output directory is not writable")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ProductError(f"{path}: cannot write product ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write_fits(fh, hdus)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise ProductError(f"{path}: cannot write product ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ProductError(f"{path}: cannot write product ({exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
