"""The frame catalogue: every FITS file under the input directories, classified from its header.

The catalogue lives in ``<workspace>/catalogue.sqlite``.  A scan walks the directories
recursively (``.fits``, ``.fit``, ``.fts``, each also ``.gz``, ``.Z`` or ``.fz``), and reads a
file only when it is new or its size or modification time changed; files that vanished are
dropped.  Reading a file means: its headers (a truncated or corrupt file is told by the data
size its headers announce, after expanding a ``.gz``/``.Z`` stream, which also proves the stream
complete), its classification (:class:`~soxs_archive.model.FrameRecord`) and a checksum of its
FITS bytes (of the expanded bytes for ``.gz``/``.Z``, so that a compressed copy of a frame is
recognised as a duplicate).  Of several files with one checksum the first path in sorted
order is used, the others are marked ``duplicate of <path>``.

Usage::

    catalogue = Catalogue(workspace)
    records = catalogue.scan(["/data/raw"])
    print(catalogue.counts)          # ScanCounts(new=12, reread=0, unchanged=0, dropped=0)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

from soxs_core.detector.instruments import arm_from_header, slit_keyword
from soxs_core.detector.rawframe import RawFrame, _binning, frame_type_from_dpr
from soxs_core.errors import InputError, one_line
from soxs_core.io.compressed import OpenFits, ScratchDir, image_hdu_index, open_fits

from .model import FrameRecord

__all__ = ["Catalogue", "ScanCounts", "night_of", "FITS_SUFFIXES", "is_fits_name"]

#: File names the scan takes (case-insensitive).
FITS_SUFFIXES = tuple(f"{base}{packed}" for base in (".fits", ".fit", ".fts")
                      for packed in ("", ".gz", ".z", ".fz"))

#: Hours subtracted from MJD-OBS to get the night's date: the night runs from noon to noon
#: in Chile (UT-3/-4), so that the morning's calibrations belong to the night before (the
#: simulator's nights follow the same rule).
NIGHT_OFFSET_HOURS = 15.0

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)
_SCHEMA = "soxs-catalogue-1:" + ",".join(f.name for f in fields(FrameRecord))
_CHUNK = 1 << 22


@functools.cache
def _distinguishing_keywords() -> tuple[str, ...]:
    """The header cards that recipe declarations add to tell products of one PRO CATG apart
    (:attr:`soxs_recipes.framework.OutputSpec.keywords`)."""
    from soxs_recipes.registry import RECIPES

    return tuple(dict.fromkeys(k for module in RECIPES.values() for o in module.SPEC.outputs
                               for k, _, _ in o.keywords))


def night_of(mjd: float) -> str:
    """Observing night ``YYYY-MM-DD`` of an ``MJD-OBS``."""
    instant = _MJD_EPOCH + timedelta(days=mjd, hours=-NIGHT_OFFSET_HOURS)
    return instant.strftime("%Y-%m-%d")


def is_fits_name(name: str) -> bool:
    """Whether a file name has one of the :data:`FITS_SUFFIXES`."""
    return name.lower().endswith(FITS_SUFFIXES)


@dataclass
class ScanCounts:
    """What the last scan did: files read for the first time, read again because they
    changed, left as catalogued, and dropped because they vanished."""

    new: int = 0
    reread: int = 0
    unchanged: int = 0
    dropped: int = 0

    @property
    def read(self) -> int:
        return self.new + self.reread

    def __str__(self) -> str:
        return (f"{self.new} new, {self.reread} changed and read again, {self.unchanged} "
                f"unchanged (not read), {self.dropped} vanished")


class Catalogue:
    """The frame catalogue of a workspace.

    Parameters
    ----------
    workspace : path-like
        The workspace directory (created when missing); the database is
        ``<workspace>/catalogue.sqlite``.
    """

    def __init__(self, workspace: str | os.PathLike) -> None:
        self.workspace = Path(workspace).resolve()
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.workspace}: cannot create the workspace "
                             f"({exc.strerror})") from None
        self.path = self.workspace / "catalogue.sqlite"
        self.counts = ScanCounts()
        try:
            self._db = sqlite3.connect(self.path)
            self._prepare()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: unusable catalogue database ({exc})") from None

    def _prepare(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE IF NOT EXISTS frames (path TEXT PRIMARY KEY, size INTEGER, "
                   "mtime REAL, record TEXT)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None or row[0] != _SCHEMA:
            # records of another layout would be read wrongly: read every file again
            db.execute("DELETE FROM frames")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (_SCHEMA,))
        db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ scanning
    def scan(self, dirs: Iterable[str | os.PathLike]) -> list[FrameRecord]:
        """Bring the catalogue up to date with the FITS files under ``dirs``.

        Parameters
        ----------
        dirs : iterable of path-like
            Directories searched recursively (a file may be given too).  The workspace
            itself is never searched.

        Returns
        -------
        list of FrameRecord
            Every file found, sorted by path; unusable ones and duplicates have
            ``problem`` set.  :attr:`counts` says how many files were read.

        Raises
        ------
        InputError
            When a directory does not exist.
        """
        roots = []
        for d in dirs:
            root = Path(d).expanduser().resolve()
            if not root.exists():
                raise InputError(f"{root}: no such directory")
            roots.append(root)
        found = {str(p): p for root in roots for p in self._walk(root)}
        known = {path: (size, mtime) for path, size, mtime in
                 self._db.execute("SELECT path, size, mtime FROM frames")}
        counts = ScanCounts()
        for number, (text, path) in enumerate(sorted(found.items()), start=1):
            try:
                stat = path.stat()
            except OSError:
                continue
            if known.get(text) == (stat.st_size, stat.st_mtime):
                counts.unchanged += 1
                continue
            if text in known:
                counts.reread += 1
            else:
                counts.new += 1
            record = read_record(path, stat.st_size, stat.st_mtime)
            self._db.execute("INSERT OR REPLACE INTO frames VALUES (?, ?, ?, ?)",
                             (text, stat.st_size, stat.st_mtime, json.dumps(record.to_dict())))
            if number % 50 == 0:
                self._db.commit()  # an interrupted scan keeps what it read
        for text in known:
            if text not in found and any(_under(text, root) for root in roots):
                self._db.execute("DELETE FROM frames WHERE path = ?", (text,))
                counts.dropped += 1
        self._db.commit()
        self.counts = counts
        return mark_duplicates([r for r in self.records() if r.path in found])

    def _walk(self, root: Path) -> Iterator[Path]:
        if root.is_file():
            if is_fits_name(root.name):
                yield root
            return
        for top, subdirs, files in os.walk(root):
            here = Path(top)
            subdirs[:] = sorted(d for d in subdirs
                                if not _same_or_under(here / d, self.workspace))
            for name in files:
                if is_fits_name(name):
                    yield here / name

    def records(self) -> list[FrameRecord]:
        """Every catalogued file as last read (duplicates not marked), sorted by path."""
        rows = self._db.execute("SELECT record FROM frames ORDER BY path")
        return [FrameRecord(**json.loads(text)) for (text,) in rows]


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def _same_or_under(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other)
        return True
    except ValueError:
        return False


def mark_duplicates(records: list[FrameRecord]) -> list[FrameRecord]:
    """``records`` sorted by path, every file whose checksum an earlier one has marked
    ``duplicate of <that path>`` (unless it has a problem already)."""
    first: dict[str, str] = {}
    out = sorted(records, key=lambda r: r.path)
    for record in out:
        if record.problem or not record.checksum:
            continue
        if record.checksum in first:
            record.problem = f"{record.path}: duplicate of {first[record.checksum]}"
        else:
            first[record.checksum] = record.path
    return out


# ---------------------------------------------------------------------- reading one file
def read_record(path: Path, size: int, mtime: float) -> FrameRecord:
    """The catalogue record of one file; a file that cannot be used gets ``problem``."""
    record = FrameRecord(path=str(path), size=size, mtime=mtime)
    scratch = ScratchDir()
    try:
        with open_fits(path, scratch) as hdul:
            record.checksum = _checksum(hdul.path)
            _classify(record, path, hdul)
    except InputError as exc:
        record.problem = one_line(exc)
    except (OSError, ValueError, KeyError) as exc:
        record.problem = one_line(f"{path}: unreadable ({exc})")
    finally:
        scratch.cleanup()
    return record


def _checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _merged_header(hdul: OpenFits):
    """The primary header, with the cards of the image extension of a tile-compressed file
    (``fpack`` moves an image's keywords there) that the primary lacks."""
    header = hdul[0].header.copy()
    try:
        index = image_hdu_index(hdul)
    except InputError:
        return header
    if index:
        for card in hdul[index].header.cards:
            if card.keyword not in header and card.keyword not in ("XTENSION", "PCOUNT",
                                                                   "GCOUNT"):
                header.append(card)
    return header


def _text(header, key: str) -> str:
    value = header.get(key)
    return "" if value is None else str(value).strip()


def _classify(record: FrameRecord, path: Path, hdul: OpenFits) -> None:
    header = _merged_header(hdul)
    arm = arm_from_header(header, str(path))
    record.instrument, record.arm = arm.instrument, arm.name
    try:
        record.mjd = float(header["MJD-OBS"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: no usable MJD-OBS "
                         f"({header.get('MJD-OBS', 'missing')!r})") from None
    record.night = night_of(record.mjd)
    record.template = _text(header, "ESO TPL START")
    record.slit = _text(header, slit_keyword(arm))
    record.lamp = _lamp(header)
    record.pro_catg = _text(header, "ESO PRO CATG")
    for keyword in _distinguishing_keywords():
        if value := _text(header, keyword):
            # not the product steps ask for by this PRO CATG (a UVB per-lamp master flat)
            record.pro_catg += f" ({keyword.removeprefix('ESO ')} {value})"
    if record.pro_catg:
        # a calibration product: what association compares, where the header states it
        binx, biny = _binning(header, arm)
        record.binning = f"{binx}x{biny}"
        readout_key = arm.keywords.get("readout")
        record.readout = _text(header, readout_key) if readout_key else ""
        record.exptime = _number(header, "EXPTIME")
        return
    # a raw frame: read as the recipes read it, so that what they would refuse is refused
    frame = RawFrame._from_opened(path, hdul)
    record.dpr_catg, record.dpr_type, record.dpr_tech = (frame.dpr_catg, frame.dpr_type,
                                                         frame.dpr_tech)
    record.frame_type = frame_type_from_dpr(frame.dpr_type, frame.dpr_tech) or ""
    record.binning = frame.binning
    record.readout = frame.readout
    record.exptime = frame.exptime


def _number(header, key: str) -> float:
    try:
        return float(header.get(key, 0.0))
    except (TypeError, ValueError):
        return 0.0


#: SOXS names a lamp by the presence of its keyword (INSTRUMENTS.md 3.1).
_SOXS_LAMP_KEYWORDS = (("ESO INS QTH NAME", "QTH"), ("ESO INS DEUT NAME", "D"),
                       ("ESO INS ARGO NAME", "Ar"), ("ESO INS NEON NAME", "Ne"),
                       ("ESO INS MERC NAME", "Hg"), ("ESO INS XENO NAME", "Xe"),
                       ("ESO INS THAR NAME", "ThAr"))


def _xsh_lamp_name(name: str) -> str:
    """An X-shooter lamp name normalised as INSTRUMENTS.md 3.1 says (``VIS_QTH_Lamp`` ->
    ``QTH``, ``UVB_High`` -> ``QTH``)."""
    for prefix in ("UVB_Low_", "UVB_", "VIS_", "NIR_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for suffix in ("_lamp", "_Lamp"):
        name = name.removesuffix(suffix)
    return "QTH" if name == "High" else name


def _lamp(header) -> str:
    """The lamps that were on (``QTH``, ``D``...), comma separated; empty without a lamp."""
    names = []
    for i in range(1, 9):
        name = _text(header, f"ESO INS LAMP{i} NAME")
        if name and header.get(f"ESO INS LAMP{i} ST", True) in (True, 1, "T"):
            names.append(_xsh_lamp_name(name))
    names += [lamp for key, lamp in _SOXS_LAMP_KEYWORDS if key in header]
    return ",".join(dict.fromkeys(names))
