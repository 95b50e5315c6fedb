"""DFS product headers and atomic product writing.

The keywords are those ``cpl.dfs.save_image`` writes (``cpl_dfs_setup_product_header``), with
the same names and meaning, so EsoReflex, EDPS and the archive treat our products like any
other ESO pipeline's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core import __version__
from soxs_core.errors import ProductError
from soxs_core.io.fits import Card, Header, card_images, write_fits
from soxs_core.io.safety import find_same_file, remove_stale_temporaries, sibling_temporary

__all__ = [
    "FrameRef",
    "ProductInfo",
    "ParamRecord",
    "param_text",
    "dicb_sorted",
    "QcValue",
    "QcMeasurements",
    "QC_SUMMARY",
    "qc_comment_room",
    "dfs_header",
    "write_product_atomic",
    "write_table_product_atomic",
    "astropy_table_hdu",
    "data_md5",
    "PIPE_ID",
    "NO_CPL_DRS_ID",
]

log = logging.getLogger(__name__)

PIPE_ID = f"soxs/{__version__}"
PRO_DID = "PRO-1.16"  # what cpl_dfs writes with CPL 7.2
#: ``ESO PRO RECi DRS ID`` when no CPL runs: soxs with its stand-in for PyCPL's ``cpl.ui``
#: (:mod:`soxs_recipes.compat`) is then the data reduction system.
NO_CPL_DRS_ID = f"soxs-standin-{__version__}"

# What a product takes from the primary header of its first input frame (the first raw frame,
# or the first calibration when there is none), as cpl_dfs_setup_product_header does: these
# primary keywords, and the HIERARCH ESO ones except DPR, DRS, QC and PRO (but PRO's
# processing history, PRO RECi, is kept).  Everything else (EXPTIME, DATE, ORIGFILE,
# structural and compression keys, COMMENT/HISTORY) is left behind.  CPL 7.2 and 7.3 also
# copy ARCFILE, although their documentation says it is removed; we do as the code does.
INHERITED_PRIMARY = ("ORIGIN", "TELESCOP", "INSTRUME", "OBJECT", "RA", "DEC", "EPOCH",
                     "EQUINOX", "RADESYS", "DATE-OBS", "MJD-OBS", "UTC", "LST", "PI-COI",
                     "OBSERVER", "ARCFILE")
#: The deprecated spelling of RADESYS, inherited under the new one.
_OLD_RADESYS = "RADECSYS"
NOT_INHERITED_ESO = ("ESO DPR ", "ESO DRS ", "ESO PRO ", "ESO QC ")
PRO_HISTORY = "ESO PRO REC"
PRO_ANCESTOR = "ESO PRO ANCESTOR"

# Order of the written cards, as CPL sorts a header before writing it (the DICB order):
# descriptive keywords, WCS, other primary keywords, then the HIERARCH ESO ones by their
# first word (DPR, OBS, TPL, GEN, TEL, INS, DET, LOG, PRO, then all others such as QC), other
# HIERARCH keywords, HISTORY, COMMENT.  The sort is stable: within a class, cards keep the
# order in which they were set.
_DESCRIPTIVE = frozenset((
    "RA", "DEC", "LST", "UTC", "DATE", "BLANK", "ORIGIN", "OBJECT", "PI-COI", "EXPTIME",
    "MJD-OBS", "MJD-END", "EQUINOX", "TIMESYS", "RADESYS", "RADECSYS", "TELESCOP", "INSTRUME",
    "DATE-OBS", "DATE-END", "OBSERVER"))
_WCS = re.compile(r"(CRVAL|CRPIX|CDELT|CTYPE|CUNIT|CRDER|CSYER)[1-9][0-9]{0,2}\Z"
                  r"|(PC|PV|PS|CD)[1-9][0-9]{0,2}_[1-9][0-9]{0,2}\Z|WCSAXES\Z|WCSNAME\Z")
_ESO_CLASSES = ("DPR", "OBS", "TPL", "GEN", "TEL", "INS", "DET", "LOG", "PRO")


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
    #: log the omission (False: the run has said it already, for an earlier product)
    report_missing: bool = True

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

    def update(self, other: QcMeasurements) -> None:
        """Take every value and reason of ``other`` (they replace what was recorded)."""
        for name, value in other.values.items():
            self.missing.pop(name, None)
            self.values[name] = value
        for name, reason in other.missing.items():
            self.omit(name, reason)


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
    """What a product is, in DFS terms, as a recipe states it (CPL's ``applist``).

    ``type``, ``tech`` or ``science`` left None get CPL's value: ``REDUCED``; the first input
    frame's ``ESO DPR TECH`` (else ``UNDEFINED``); whether its ``ESO DPR CATG`` is
    ``SCIENCE``.
    """

    catg: str
    type: str | None = "REDUCED"
    tech: str | None = "IMAGE"
    science: bool | None = None
    qc: dict[str, QcValue] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamRecord:
    """A recipe parameter as ``ESO PRO RECi PARAMj NAME/VALUE`` record it.

    Attributes
    ----------
    name : str
        The command-line alias (``stacked-clipping-sigma``), as CPL writes it.
    value, default : bool, int, float or str
        The value used and the value that applies when none is given.
    help : str
        The parameter's help text, the comment of the NAME card (cut to fit it, as CFITSIO
        does); when empty, CPL's generic text for the type.
    """

    name: str
    value: bool | int | float | str
    default: bool | int | float | str
    help: str = ""


def param_text(value: bool | int | float | str) -> str:
    """A parameter value as cpl_dfs writes it: ``true``/``false``, ``%d``, ``%g`` or the
    string itself."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"  # Python's g is C's %g
    return str(value)


def _param_comments(param: ParamRecord) -> tuple[str, str]:
    """Comments of the NAME and VALUE cards: the help (or CPL's text for the type) and
    ``Default: <default>``, a string default in quotes."""
    value = param.value
    if isinstance(value, (bool, np.bool_)):
        generic = "Boolean recipe parameter"
    elif isinstance(value, (int, np.integer)):
        generic = "Integer recipe parameter"
    elif isinstance(value, (float, np.floating)):
        generic = "Floating point recipe parameter"
    else:
        generic = "String recipe parameter"
    default = param_text(param.default)
    if isinstance(value, str):
        default = f"'{default}'"
    return (param.help or generic), f"Default: {default}"


def dicb_class(keyword: str) -> int:
    """Rank of a keyword in the order CPL writes a header (see the module's notes)."""
    key = keyword.upper()
    if key.startswith("ESO "):
        if len(key) > 8 and key[4:7] in _ESO_CLASSES:
            return 10 + _ESO_CLASSES.index(key[4:7])
        return 20
    if len(key) > 8:
        return 21  # a HIERARCH keyword of another organisation
    if key == "HISTORY":
        return 30
    if key == "COMMENT":
        return 31
    if key in _DESCRIPTIVE:
        return 1
    if _WCS.match(key):
        return 2
    return 3


def dicb_sorted(header: Header) -> Header:
    """The header's cards in the order CPL writes them (stable within each class)."""
    return Header(sorted(header.cards, key=lambda card: dicb_class(card.keyword)))


def _first_frame_cards(header: Any) -> list[Card]:
    """The cards cpl_dfs reads from the first input frame: the HIERARCH ESO ones and
    :data:`INHERITED_PRIMARY`, in the file's order, RADECSYS renamed RADESYS (at the end,
    where CPL appends it) unless RADESYS is there too."""
    wanted = set(INHERITED_PRIMARY) | {_OLD_RADESYS}
    cards = [Card(card.keyword, card.value, card.comment or "") for card in header.cards
             if card.keyword.startswith("ESO ") or card.keyword in wanted]
    old = [card for card in cards if card.keyword == _OLD_RADESYS]
    cards = [card for card in cards if card.keyword != _OLD_RADESYS]
    if old and not any(card.keyword == "RADESYS" for card in cards):
        cards.append(Card("RADESYS", old[0].value, old[0].comment))
    return cards


def _set_inherited(header: Header, card: Card) -> None:
    """Set an inherited card (replacing one of the same keyword in place)."""
    try:
        header[card.keyword] = (card.value, card.comment)
    except ValueError:
        log.debug("not inheriting unwritable card %r", card.keyword)


def _inherit(header: Header, first: Any) -> int:
    """Copy into ``header`` what a product inherits from its first input frame's header,
    ``first``, and its ancestor; return the product's processing level ``i`` of
    ``ESO PRO RECi`` (1 for a product of raw frames, one more than the history it inherits).
    """
    cards = _first_frame_cards(first) if first is not None else []
    names = {card.keyword for card in cards}
    level = 1
    while f"{PRO_HISTORY}{level} ID" in names:
        level += 1
    for card in cards:
        if not card.keyword.startswith(NOT_INHERITED_ESO):
            _set_inherited(header, card)
    for card in cards:
        if card.keyword.startswith(PRO_HISTORY):
            _set_inherited(header, card)
    if PRO_ANCESTOR not in header:
        # the raw frame a product descends from: its own ancestor for an input product
        ancestor = next((c for c in cards if c.keyword == PRO_ANCESTOR), None)
        if ancestor is not None:
            _set_inherited(header, ancestor)
        else:
            arcfile = next((c for c in cards if c.keyword == "ARCFILE"), None)
            if arcfile is not None:
                _set_inherited(header, Card(PRO_ANCESTOR, str(arcfile.value), ""))
    return level


def dfs_header(
    *,
    recipe: str,
    product: ProductInfo,
    filename: str,
    raw_frames: Sequence[FrameRef],
    calib_frames: Sequence[FrameRef] = (),
    parameters: Sequence[ParamRecord] = (),
    inherit_from: Any = None,
    drs_id: str = NO_CPL_DRS_ID,
    date: str | None = None,
) -> Header:
    """Build the primary header of a product, as ``cpl.dfs.save_image`` writes it.

    Parameters
    ----------
    recipe : str
        Recipe name, e.g. ``soxs_mbias`` (``ESO PRO RECi ID``).
    product : ProductInfo
        PRO CATG/TYPE/TECH, science flag and QC values.
    filename : str
        Base name of the product file (``PIPEFILE``).
    raw_frames, calib_frames : sequences of FrameRef
        Inputs, listed as ``ESO PRO RECi RAWj`` / ``CALj`` in input order.
    parameters : sequence of ParamRecord
        Recipe parameters with the values actually used (``ESO PRO RECi PARAMj``).
    inherit_from : Header, optional
        Primary header of the first raw frame, or of the first calibration when there is no
        raw frame (ours or an ``astropy.io.fits.Header``).  A product inherits its
        descriptive keywords, its HIERARCH ESO keywords but DPR, DRS, QC and PRO, its
        processing history ``ESO PRO RECi`` (the new record then gets the next ``i``), and
        its ``ESO PRO ANCESTOR`` or else its ``ARCFILE`` as ancestor.
    drs_id : str
        ``ESO PRO RECi DRS ID``: the data reduction system that runs, ``cpl-7.2.3`` under
        PyCPL, :data:`NO_CPL_DRS_ID` (the default) without it.
    date : str, optional
        ``DATE``, the file's creation time (``YYYY-MM-DDThh:mm:ss`` UT); now when not given.

    Returns
    -------
    soxs_core.io.fits.Header
        In CPL's (DICB) order, with ``DATAMD5`` set to a placeholder, filled in by
        :func:`write_product_atomic`.  Comments too long for their card (inherited ones,
        parameter help) are cut when it is written, as CFITSIO does.

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
    # written by CFITSIO when CPL creates the file, ahead of the sorted cards
    header["DATE"] = (date or time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                      "file creation date (YYYY-MM-DDThh:mm:ss UT)")
    # the recipe's own cards first (CPL's applist), then what cpl_dfs adds
    header["HIERARCH ESO PRO CATG"] = (product.catg, "Category of pipeline product frame")
    if product.type is not None:
        header["HIERARCH ESO PRO TYPE"] = (product.type, "Product type")
    if product.tech is not None:
        header["HIERARCH ESO PRO TECH"] = (product.tech, "Observation technique")
    if product.science is not None:
        header["HIERARCH ESO PRO SCIENCE"] = (bool(product.science), "Scientific product if T")
    failed = []
    for name, qc in product.qc.items():
        if not qc.computed:
            # a QC is a number or absent: never a 'NaN' string that archive queries trip on
            (log.warning if qc.report_missing else log.debug)(
                "QC %s not written: could not be computed (%s)", name,
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
    level = _inherit(header, inherit_from)
    _add_provenance(header, level, recipe=recipe, filename=filename, raw_frames=raw_frames,
                    calib_frames=calib_frames, parameters=parameters, first=inherit_from,
                    drs_id=drs_id)
    return dicb_sorted(header)


def _add_provenance(header: Header, level: int, *, recipe: str, filename: str,
                    raw_frames: Sequence[FrameRef], calib_frames: Sequence[FrameRef],
                    parameters: Sequence[ParamRecord], first: Any, drs_id: str) -> None:
    """The cards cpl_dfs adds after the inherited ones, in its order: DATAMD5, PIPEFILE,
    PRO DID/CATG, PRO TYPE/TECH/SCIENCE unless the recipe set them, then the processing
    record ``ESO PRO REC<level>`` (recipe, DRS, pipeline, raw frames, PRO DATANCOM,
    calibrations with their DATAMD5, parameters)."""
    first = first if first is not None else Header()
    header["DATAMD5"] = ("Not computed", "MD5 checksum")
    header["PIPEFILE"] = (filename, "Filename of data product")
    header["HIERARCH ESO PRO DID"] = (PRO_DID, "Data dictionary for PRO")
    header["HIERARCH ESO PRO CATG"] = (header["ESO PRO CATG"],
                                       "Category of pipeline product frame")
    if "ESO PRO TYPE" not in header:
        header["HIERARCH ESO PRO TYPE"] = ("REDUCED", "Product type")
    if "ESO PRO TECH" not in header:
        tech = first.get("ESO DPR TECH")
        header["HIERARCH ESO PRO TECH"] = (str(tech) if tech is not None else "UNDEFINED",
                                           "Observation technique")
    if "ESO PRO SCIENCE" not in header:
        header["HIERARCH ESO PRO SCIENCE"] = (first.get("ESO DPR CATG") == "SCIENCE",
                                              "Scientific product if T")
    rec = f"HIERARCH {PRO_HISTORY}{level}"
    header[f"{rec} ID"] = (recipe, "Pipeline recipe (unique) identifier")
    header[f"{rec} DRS ID"] = (drs_id, "Data Reduction System identifier")
    header[f"{rec} PIPE ID"] = (PIPE_ID, "Pipeline (unique) identifier")
    for i, frame in enumerate(raw_frames, start=1):
        header[f"{rec} RAW{i} NAME"] = (frame.path.name, "File name of raw frame")
        header[f"{rec} RAW{i} CATG"] = (frame.tag, "Category of raw frame")
    if "ESO PRO DATANCOM" not in header:
        header["HIERARCH ESO PRO DATANCOM"] = (len(raw_frames), "Number of combined frames")
    for i, frame in enumerate(calib_frames, start=1):
        header[f"{rec} CAL{i} NAME"] = (frame.path.name, "File name of calibration frame")
        header[f"{rec} CAL{i} CATG"] = (frame.tag, "Category of calibration frame")
        if frame.md5:
            header[f"{rec} CAL{i} DATAMD5"] = (frame.md5, "MD5 signature of calib frame")
    for i, param in enumerate(parameters, start=1):
        name_comment, value_comment = _param_comments(param)
        header[f"{rec} PARAM{i} NAME"] = (param.name, name_comment)
        header[f"{rec} PARAM{i} VALUE"] = (param_text(param.value), value_comment)


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
    with ``overwrite``; an input frame (``protected``, compared as files on disk, links
    included) never is.  The temporary file is removed on any failure and, when the program
    installed :func:`soxs_core.io.safety.install_signal_handlers`, on SIGTERM/SIGINT too.

    Raises
    ------
    ProductError
        When the file exists, is an input, or cannot be written.
    """
    path = _checked_target(Path(path), overwrite, protected)
    return _write_via_temporary(path, lambda fh: write_fits(fh, hdus))


def _checked_target(path: Path, overwrite: bool, protected: Iterable[Path]) -> Path:
    if find_same_file(path, protected) is not None:
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
    remove_stale_temporaries(directory)
    return path


def _write_via_temporary(path: Path, write: Any) -> Path:
    try:
        with sibling_temporary(path) as tmp:
            with open(tmp, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
    except OSError as exc:
        raise ProductError(f"{path}: cannot write product ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ProductError(f"{path}: cannot write product ({exc})") from None
    return path


def write_table_product_atomic(hdul: Any, path: str | os.PathLike, overwrite: bool = False,
                               protected: Iterable[Path] = ()) -> Path:
    """Write a table product as :func:`write_product_atomic` writes images: atomically,
    never over an input, with ``DATAMD5`` (the MD5 of the data units as on disk) and
    CHECKSUM/DATASUM on every HDU.

    ``hdul`` is a sequence of ``(header, data)`` pairs (:class:`soxs_core.io.fits.BinTable`
    data for the tables, see :func:`soxs_core.io.fits.write_fits`), or an
    ``astropy.io.fits.HDUList``."""
    if all(isinstance(hdu, tuple) for hdu in hdul):  # an HDUList is a list of HDUs
        return write_product_atomic(hdul, path, overwrite=overwrite, protected=protected)
    import io
    import warnings

    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    path = _checked_target(Path(path), overwrite, protected)
    with warnings.catch_warnings():
        # comments too long for their card are cut, as CFITSIO does
        warnings.simplefilter("ignore", VerifyWarning)
        if "DATAMD5" in hdul[0].header:
            buffer = io.BytesIO()
            hdul.writeto(buffer)
            raw = buffer.getvalue()
            digest = hashlib.md5()
            with fits.open(io.BytesIO(raw)) as back:
                for hdu in back:
                    info = hdu.fileinfo()
                    digest.update(raw[info["datLoc"]:info["datLoc"] + info["datSpan"]])
            hdul[0].header["DATAMD5"] = digest.hexdigest()
        return _write_via_temporary(path, lambda fh: hdul.writeto(fh, checksum=True))


def astropy_table_hdu(table: Any):
    """``astropy.io.fits.table_to_hdu(table)`` with every column's unit in its TUNITn card.

    astropy leaves out the units that are not FITS-standard (``electron``, ``electron2``,
    ``electron / nm``: the units of an extracted spectrum, as soxspipe's tables carry them)
    with a warning; they are written here as astropy spells them, so that they are not lost.
    """
    import warnings

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        hdu = fits.table_to_hdu(table)
    for i, column in enumerate(table.itercols(), start=1):
        if column.unit is not None and f"TUNIT{i}" not in hdu.header:
            hdu.header.insert(f"TFORM{i}", (f"TUNIT{i}", column.unit.to_string()), after=True)
    return hdu


def astropy_primary_hdu(header: Any):
    """An ``astropy.io.fits.PrimaryHDU`` carrying the cards of a product header (ours or
    astropy's), for table products built with astropy."""
    from astropy.io import fits

    hdu = fits.PrimaryHDU()
    for card in (header.cards if hasattr(header, "cards") else header):
        key, value, comment = card[0], card[1], card[2]
        if key in ("SIMPLE", "BITPIX", "EXTEND", "END") or key.startswith("NAXIS"):
            continue
        if key in ("COMMENT", "HISTORY", ""):
            hdu.header.append(fits.Card(key, value))
            continue
        if isinstance(value, float):
            # our card text, not astropy's: its 16 digits do not always read back to the same
            # double, and the QC values of the image and table products must agree
            from soxs_core.io.fits import card_images

            hdu.header.append(fits.Card.fromstring(card_images((key, value, comment))[0]))
            continue
        hdu.header.append(fits.Card(key if len(key) <= 8 and " " not in key
                                    else f"HIERARCH {key}", value, comment))
    return hdu
