"""A simulated raw-data archive: several nights and arms, with the mess of real archives.

:func:`simulate_archive` runs the night simulator (:func:`~soxs_core.simulate.night.
simulate_night`) once per night and arm, each night moved to its own dates, and keeps only
what an archive holds::

    raw/<night>/<ARCFILE>            raw frames under their archive names
                                     (``XSHOO.2026-11-22T07:00:00.000.fits``), some gzipped
                                     (``.fits.gz``)
    calib/<arm code>_<CATG>_<ARM>.fits
                                     the upstream calibrations no recipe of ours makes, once
                                     per arm (as soxspipe-made ones would be): DISP_TAB,
                                     DISP_IMAGE and the order-centre ORDER_TAB, with PRO CATG
    archive_truth.json               the truth manifest below (written last, atomically: an
                                     archive without it is incomplete)
    truth/<night>/<arm>_<binning>/   only with ``keep_truth``: the night simulator's truth
                                     (not listed in the manifest)

Nights and times
----------------
Night ``k`` of ``nights`` (day offsets from the simulator's default night) is the night
``2026-11-21 + k``.  Every frame of it has ``night_of(MJD-OBS)`` (the UTC date of
``MJD-OBS - 12 h``, :func:`~soxs_core.simulate.headers.night_of`) equal to that night:
the simulator's night is moved by ``k`` days and 3 h earlier (standards from 22:00 UT,
science until the early morning, day-time calibrations before 12:00 UT), so that the
calibrations of the next morning fall before noon UT; ESO's own convention (noon local
time, ``MJD-OBS - 15 h``, that of :mod:`soxs_archive.catalogue`) gives the same nights.
``MJD-OBS``, ``DATE-OBS``, ``UTC``, ``ARCFILE`` and ``ESO TPL START`` move with the night,
so do the upstream tables' dates.  The arms of
one instrument are 2 s apart so that no two frames share an ``ARCFILE``.  Each night of a
detector has its own noise; the detector itself (bias structure, hot pixels) is the same.

Calibration plan per night and arm: biases (UVB/VIS), darks (of the science exposure time,
which is the flux standard's for NIR), lamp flats (UVB: D2 and QTH; NIR: lamp-on/off
pairs), a flux standard, science frames.

The mess (``mess=True``)
------------------------
* the last night (of two or more) has no flats: its stare steps borrow the master flat and
  order table of the nearest night that has them (the earlier one on a tie);
* a frame of another instrument (``INSTRUME='FORS2'``, no ``ESO SEQ ARM``): a copy of a
  first-night frame with the header of another instrument, ``FORS2.<DATE-OBS>.fits``;
* a truncated file: one extra bias (NIR-only archives: dark) of the first night and arm,
  cut in the middle of its data;
* a setup nobody calibrated: a science frame of the first CCD arm binned 2x2 on the first
  night (no 2x2 biases or flats anywhere); without a CCD arm, a NIR science frame of an
  exposure time no dark has;
* a duplicate: the first night's first science frame again, same bytes, name
  ``<ARCFILE stem>_1.fits`` (it sorts after the original);
* gzip: the darks and flux standards of the second night (of the only one if there is one)
  are ``.fits.gz``.

The truth manifest ``archive_truth.json``
-----------------------------------------
All paths are relative to the archive directory, ``/``-separated.  Top level::

    format        "soxs-archive-truth/1"
    parameters    the arguments (seed, arms, day offsets, orders per arm, frame counts)
    nights        the night names, in order ("2026-11-21", ...)
    night_convention
                  "night = UTC date of MJD-OBS - 12 h (or - 15 h: the same nights)"
    files         one entry per file of the archive (below)
    steps         the reduction steps an organiser must find (below), upstream first
    impossible_steps
                  steps that cannot be made (the setup nobody calibrated): as ``steps``,
                  plus ``missing``, the tags of the required calibrations no night has
    seconds       simulation time (differs between runs; everything else is reproducible)

``files[i]``::

    path          "raw/2026-11-21/XSHOO.2026-11-22T07:00:00.000.fits"
    sha256        hex digest of the file's bytes (duplicates share it)
    size          bytes
    compressed    true for .fits.gz
    night         night of the frame ("" for calib/ tables)
    instrument    "XSHOOTER", "SOXS" (or the foreign one, "FORS2")
    arm           "UVB", "VIS", "NIR" ("" for the foreign frame)
    arm_code      the simulator's arm ("xsh_vis"; "" for the foreign frame)
    frame_type    the SOF-tag stem (BIAS, DARK, FLAT, DFLAT, QFLAT, FLAT_OFF, STD_FLUX,
                  OBJECT; soxs_core.detector.rawframe.FRAME_TYPES); "" for calib/ tables
    pro_catg      "DISP_TAB_VIS"... for calib/ tables, else ""
    setup         {"binning": "1x1", "readout": <ESO DET READ SPEED / CURNAME value, "" for
                  NIR>, "exptime": 600.0, "slit": <the arm's slit keyword value>}
                  as in the header (the FrameRecord fields of the same names)
    mjd           MJD-OBS
    template      ESO TPL START
    step          key of the step that uses the frame as a raw input, "" if none
    problem_kind  "" (usable), "other instrument", "truncated", "duplicate",
                  "no calibration"
    problem       one line for the report: "other instrument: INSTRUME='FORS2'",
                  "truncated: 8640000 of 16787520 bytes", "duplicate of raw/...fits",
                  "no calibration for setup VIS 2x2 1pt/100k/hg: MASTER_BIAS_VIS, ..."

``steps[i]``::

    key           the manifest's own name of the step, unique:
                  "<night>_<arm code>_<recipe>[_<frame type>]"
                  ("2026-11-21_xsh_vis_soxs_stare_STD_FLUX"); organisers name steps their
                  own way: match a step by recipe, night, arm and its set of raw files
    recipe        "soxs_mbias", "soxs_mdark", "soxs_mflat", "soxs_stare"
    night, instrument, arm, arm_code
    setup         the values its raw frames share: mbias binning, readout; mdark + exptime;
                  mflat binning, readout, slit; stare binning, readout, slit,
                  exptime, template
    raw           [{"path", "tag"}]: the raw frames (SOF tags as the night simulator's SOFs
                  give them: BIAS_VIS, LAMP_FLAT_NIR, OBJECT_VIS...)
    calibrations  [{"tag", "night", "same_night", "step" | "path"}]: each calibration the
                  step must use, from the step of key ``step`` (a master, an order table or
                  a response made in the run) or from the file ``path`` (calib/); ``night``
                  is the night of that step ("" for calib/ files); ``same_night`` false
                  where it is borrowed (the flat-less night's MASTER_FLAT and ORDER_TAB)

The calibration inputs follow the night simulator's SOFs: mdark (UVB/VIS) takes the night's
MASTER_BIAS; mflat the MASTER_BIAS (UVB/VIS) and calib/ ORDER_TAB; stare the MASTER_BIAS
(UVB/VIS) or the MASTER_DARK of its exposure time (NIR), MASTER_FLAT and ORDER_TAB from
mflat, calib/ DISP_TAB and DISP_IMAGE, and (science only) RESP_TAB of the night's flux
standard.  Without MASTER_BIAS (mdark), ORDER_TAB (mflat), MASTER_FLAT, DISP_TAB or
RESP_TAB (stare) a step runs without it (the recipes' declarations); without another it is
impossible.  Each comes from the same night when it has one, else from the nearest night
(the earlier on a tie), for the same arm and setup (binning and readout; NIR darks: the
exposure time).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from astropy.io import fits

from soxs_core.detector.instruments import Arm
from soxs_core.detector.rawframe import frame_type_from_dpr
from soxs_core.errors import InputError
from soxs_core.io.safety import write_atomically
from soxs_core.simulate._common import resolve_arm
from soxs_core.simulate.echelle import load_format
from soxs_core.simulate.headers import NIGHT_ORIGIN, night_of, slit_keyword, sof_tag
from soxs_core.simulate.night import simulate_night

__all__ = ["simulate_archive", "ArchiveTruth", "load_truth", "TRUTH_FILE", "TRUTH_FORMAT",
           "SMALL_COUNTS", "FULL_COUNTS", "central_orders"]

TRUTH_FILE = "archive_truth.json"
TRUTH_FORMAT = "soxs-archive-truth/1"

#: frames per night and arm of the small (test) archive and of a realistic one
SMALL_COUNTS = dict(n_bias=3, n_dark=3, n_flat=5, n_std=1, n_science=1)
FULL_COUNTS = dict(n_bias=5, n_dark=3, n_flat=5, n_std=1, n_science=3)

#: the simulator's night starts at NIGHT_ORIGIN with the flats after 12:00 UT; 3 h earlier
#: every frame's MJD-OBS - 12 h falls on the night's date
_NIGHT_SHIFT_DAYS = -3.0 / 24.0
_ARM_STAGGER_DAYS = 2.0 / 86400.0
_FIRST_NIGHT = date.fromisoformat(NIGHT_ORIGIN[:10]) - timedelta(days=1)
_UNCALIBRATED_BINNING = "2x2"
_UNCALIBRATED_NIR_EXPTIME = 1234.0


@dataclass
class ArchiveTruth:
    """What :func:`simulate_archive` wrote; the content of ``archive_truth.json``."""

    outdir: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    nights: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    impossible_steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(format=TRUTH_FORMAT, parameters=self.parameters, nights=self.nights,
                    night_convention="night = UTC date of MJD-OBS - 12 h (or - 15 h: the same "
                    "nights)", files=self.files,
                    steps=self.steps, impossible_steps=self.impossible_steps,
                    seconds=round(self.seconds, 1))

    def file(self, path: str) -> dict[str, Any]:
        """The entry of a file, by its path relative to the archive."""
        for f in self.files:
            if f["path"] == path:
                return f
        raise KeyError(path)

    def step(self, key: str) -> dict[str, Any]:
        """An expected step, by its key."""
        for s in self.steps:
            if s["key"] == key:
                return s
        raise KeyError(key)

    def problems(self) -> dict[str, str]:
        """``path -> problem`` of every file an organiser must report."""
        return {f["path"]: f["problem"] for f in self.files if f["problem"]}


def load_truth(outdir: str | os.PathLike) -> ArchiveTruth:
    """Read ``archive_truth.json`` of a simulated archive.

    Raises
    ------
    InputError
        The manifest is missing, unreadable or of another format.
    """
    path = Path(outdir) / TRUTH_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the archive truth ({exc})") from None
    if data.get("format") != TRUTH_FORMAT:
        raise InputError(f"{path}: not a {TRUTH_FORMAT} manifest")
    return ArchiveTruth(outdir=Path(outdir), parameters=data["parameters"],
                        nights=data["nights"], files=data["files"], steps=data["steps"],
                        impossible_steps=data["impossible_steps"], seconds=data["seconds"])


def central_orders(arm: str | Arm, n: int) -> list[int]:
    """The ``n`` orders in the middle of an arm's format (all of them when ``n`` is larger)."""
    orders = load_format(resolve_arm(arm).code).orders.tolist()
    start = max(0, (len(orders) - n) // 2)
    return orders[start:start + n]


@dataclass
class _Run:
    """One call of the night simulator: a night of one arm, or an extra setup of it."""

    night_index: int
    day: int
    arm: Arm
    counts: dict[str, int]
    binning: str = "1x1"
    science_exptime: float = 600.0
    stagger: int = 0
    #: frame type -> how many of its last frames are extras that no step uses
    extras: dict[str, int] = field(default_factory=dict)
    uncalibrated: bool = False


def _night_name(day: int) -> str:
    return (_FIRST_NIGHT + timedelta(days=day)).isoformat()


def _check_arguments(days: list[int], arms: list[Arm], counts: Mapping[str, int]) -> None:
    if not days or any(d < 0 for d in days) or len(set(days)) != len(days):
        raise InputError(f"nights: need distinct day offsets >= 0, got {days}")
    if not arms or len({a.code for a in arms}) != len(arms):
        raise InputError("arms: need one or more distinct arms")
    bad = [f"{k}={v}" for k, v in counts.items() if v < 0]
    if bad:
        raise InputError(f"frame counts must be >= 0, got {', '.join(bad)}")


def _plan_runs(days: list[int], arms: list[Arm], counts: Mapping[str, int], mess: bool,
               science_exptime: float) -> list[_Run]:
    runs = []
    flatless = len(days) - 1 if mess and len(days) > 1 else None
    for k, day in enumerate(days):
        for a_index, arm in enumerate(arms):
            c = dict(counts)
            if not arm.is_ccd:
                c["n_bias"] = 0
            if k == flatless:
                c["n_flat"] = 0
            run = _Run(k, day, arm, c, science_exptime=science_exptime, stagger=a_index)
            if mess and k == 0 and a_index == 0:
                extra = "n_bias" if arm.is_ccd else "n_dark"
                c[extra] += 1
                run.extras = {extra[2:].upper(): 1}
            runs.append(run)
    if mess:
        ccd = [a for a in arms if a.is_ccd and _UNCALIBRATED_BINNING in a.binnings]
        arm = ccd[0] if ccd else arms[0]
        none = dict(n_bias=0, n_dark=0, n_flat=0, n_std=0, n_science=1)
        runs.append(_Run(0, days[0], arm, none, binning=_UNCALIBRATED_BINNING if ccd else
                         "1x1", science_exptime=(science_exptime if ccd else
                                                 _UNCALIBRATED_NIR_EXPTIME),
                         stagger=len(arms), uncalibrated=True))
    return runs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rel(outdir: Path, path: Path) -> str:
    return path.relative_to(outdir).as_posix()


def _header_entry(outdir: Path, path: Path, header: fits.Header) -> dict[str, Any]:
    """The manifest entry of a raw frame from its header (values as an organiser reads
    them)."""
    instrument = str(header.get("INSTRUME", ""))
    entry: dict[str, Any] = dict(path=_rel(outdir, path), night=night_of(header["MJD-OBS"]),
                                 instrument=instrument, arm="", arm_code="",
                                 frame_type=frame_type_from_dpr(
                                     str(header.get("ESO DPR TYPE", "")),
                                     str(header.get("ESO DPR TECH", ""))) or "",
                                 pro_catg="", setup={}, mjd=float(header["MJD-OBS"]),
                                 template=str(header.get("ESO TPL START", "")))
    try:
        arm = resolve_arm(("xsh_" if instrument == "XSHOOTER" else "soxs_")
                          + str(header["ESO SEQ ARM"]).lower())
    except (InputError, KeyError):
        return entry
    keys = arm.keywords
    binning = (f"{header[keys['binx']]}x{header[keys['biny']]}" if arm.is_ccd else "1x1")
    entry.update(arm=arm.name, arm_code=arm.code,
                 setup=dict(binning=binning,
                            readout=str(header[keys["readout"]]) if arm.is_ccd else "",
                            exptime=float(header["EXPTIME"]),
                            slit=str(header.get(slit_keyword(arm), ""))))
    return entry


def _place_run(outdir: Path, run: _Run, orders: list[int] | None, seed: int,
               scratch: Path, keep_truth: bool, calib_done: set[str]) -> list[dict[str, Any]]:
    """Simulate one run and move its raw frames (and the arm's calib/ tables, once) into
    the archive; returns their manifest entries."""
    night = _night_name(run.day)
    offset = run.day + _NIGHT_SHIFT_DAYS + run.stagger * _ARM_STAGGER_DAYS
    work = scratch / f"{night}_{run.arm.code}_{run.binning}"
    res = simulate_night(work, run.arm.code, run.binning, "slow", seed, orders=orders,
                         science_exptime=run.science_exptime, night_offset=offset,
                         write_truth=keep_truth, **run.counts)
    raw_dir = outdir / "raw" / night
    raw_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for ftype, paths in res.raw.items():
        for i, src in enumerate(paths):
            header = fits.getheader(src)
            dest = raw_dir / header["ARCFILE"]
            if dest.exists():
                raise RuntimeError(f"{dest}: two simulated frames share an ARCFILE")
            os.replace(src, dest)
            entry = _header_entry(outdir, dest, header)
            if entry["night"] != night:
                raise InputError(f"{run.arm.code} night {night}: too many frames, "
                                 f"{header['ARCFILE']} falls on night {entry['night']}")
            entry["extra"] = i >= len(paths) - run.extras.get(ftype, 0)
            entry["uncalibrated"] = run.uncalibrated
            entries.append(entry)
    if not run.uncalibrated and run.arm.code not in calib_done:
        calib_done.add(run.arm.code)
        for src in res.calib.values():
            dest = outdir / "calib" / f"{run.arm.code}_{src.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            header = fits.getheader(dest)
            entries.append(dict(path=_rel(outdir, dest), night="", extra=False,
                                uncalibrated=False,
                                instrument=run.arm.instrument, arm=run.arm.name,
                                arm_code=run.arm.code, frame_type="",
                                pro_catg=str(header.get("ESO PRO CATG", "")), setup={},
                                mjd=float(header["MJD-OBS"]), template=""))
    if keep_truth:
        dest = outdir / "truth" / night / f"{run.arm.code}_{run.binning}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / "truth", dest)
    shutil.rmtree(work)
    return entries


# ----------------------------------------------------------------------- the mess
def _truncate(outdir: Path, entry: dict[str, Any]) -> None:
    path = outdir / entry["path"]
    data = path.read_bytes()
    keep = len(data) // 2 + 1000  # inside the data unit, not on a FITS block boundary
    write_atomically(path, lambda tmp: tmp.write_bytes(data[:keep]))
    entry.update(problem_kind="truncated", problem=f"truncated: {keep} of {len(data)} bytes")


def _foreign_copy(outdir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """A copy of a frame as another instrument would have written it."""
    src = outdir / entry["path"]
    with fits.open(src) as hdul:
        data = hdul[0].data.copy()
        header = hdul[0].header.copy()
    header["INSTRUME"] = "FORS2"
    header["TELESCOP"] = "ESO-VLT-U1"
    for key in [k for k in header if k.startswith(("ESO SEQ", "ESO INS"))]:
        del header[key]
    header["ARCFILE"] = f"FORS2.{header['DATE-OBS']}.fits"
    header["ORIGFILE"] = f"FORS2_{entry['frame_type']}.fits"
    dest = src.parent / header["ARCFILE"]
    hdu = fits.PrimaryHDU(data=data, header=header)
    write_atomically(dest, lambda tmp: hdu.writeto(tmp, overwrite=True))
    new = _header_entry(outdir, dest, header)
    new.update(problem_kind="other instrument", problem="other instrument: INSTRUME='FORS2'",
               extra=True, uncalibrated=False, compressed=False, step="")
    return new


def _duplicate(outdir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    src = outdir / entry["path"]
    dest = src.with_name(src.name.removesuffix(".fits") + "_1.fits")
    write_atomically(dest, lambda tmp: shutil.copyfile(src, tmp))
    new = dict(entry, path=_rel(outdir, dest), problem_kind="duplicate",
               problem=f"duplicate of {entry['path']}", extra=True)
    return new


def _gzip(outdir: Path, entry: dict[str, Any]) -> None:
    src = outdir / entry["path"]
    dest = src.with_name(src.name + ".gz")
    # mtime 0 and no file name in the gzip header: the same seed gives the same bytes
    packed = gzip.compress(src.read_bytes(), compresslevel=1, mtime=0)
    write_atomically(dest, lambda tmp: tmp.write_bytes(packed))
    src.unlink()
    entry.update(path=_rel(outdir, dest), compressed=True)


def _add_mess(outdir: Path, entries: list[dict[str, Any]], nights: list[str]) -> None:
    raw = [e for e in entries if e["path"].startswith("raw/")]
    first = [e for e in raw if e["night"] == nights[0] and not e["uncalibrated"]]
    for e in raw:
        if e["extra"]:
            _truncate(outdir, e)
    # an archive with too few frames for a kind of mess goes without it
    source = next((e for e in first if e["frame_type"] in ("BIAS", "DARK")
                   and not e["problem"]), None)
    if source is not None:
        entries.append(_foreign_copy(outdir, source))
    source = next((e for e in first if e["frame_type"] == "OBJECT"), None)
    if source is not None:
        entries.append(_duplicate(outdir, source))
    gz_night = nights[1] if len(nights) > 1 else nights[0]
    for e in raw:
        if (e["night"] == gz_night and e["frame_type"] in ("DARK", "STD_FLUX")
                and not e["problem"]):
            _gzip(outdir, e)


# ----------------------------------------------------------------------- expected steps
#: recipe -> setup keys its raw frames share
_GROUP_BY = {"soxs_mbias": ("binning", "readout"),
             "soxs_mdark": ("binning", "readout", "exptime"),
             "soxs_mflat": ("binning", "readout", "slit"),
             "soxs_stare": ("binning", "readout", "slit", "exptime", "template")}
_REDUCTION_ORDER = ("soxs_mbias", "soxs_mdark", "soxs_mflat", "soxs_stare")
_RECIPE_OF = {"BIAS": "soxs_mbias", "DARK": "soxs_mdark", "FLAT": "soxs_mflat",
              "DFLAT": "soxs_mflat", "QFLAT": "soxs_mflat", "FLAT_OFF": "soxs_mflat",
              "STD_FLUX": "soxs_stare", "OBJECT": "soxs_stare"}


def _calibration_needs(arm: Arm, recipe: str, frame_type: str
                       ) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """``(catg, source, match, required)`` of each calibration a step takes, as the night
    simulator's SOFs give them: ``source`` is the recipe that makes it (``"calib"``: the
    upstream tables); without a ``required`` one the step cannot run (the recipes'
    declarations), without another it runs without it."""
    ccd = arm.is_ccd
    binned = ("binning", "readout")
    bias = [("MASTER_BIAS", "soxs_mbias", binned, recipe != "soxs_mdark")] if ccd else []
    if recipe == "soxs_mdark":
        return bias
    if recipe == "soxs_mflat":
        return bias + [("ORDER_TAB", "calib", (), False)]
    if recipe != "soxs_stare":
        return []
    dark = [] if ccd else [("MASTER_DARK", "soxs_mdark", ("exptime",), True)]
    needs = bias + dark + [
        ("MASTER_FLAT", "soxs_mflat", binned, False), ("ORDER_TAB", "soxs_mflat", binned, True),
        ("DISP_TAB", "calib", (), False), ("DISP_IMAGE", "calib", (), True)]
    if frame_type == "OBJECT":
        needs.append(("RESP_TAB", "soxs_stare", binned, False))
    return needs


def _night_distance(a: str, b: str) -> int:
    return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)


def _find_calibration(step: dict[str, Any], frame_setup: Mapping[str, Any], catg: str,
                      source: str, match: tuple[str, ...], steps: list[dict[str, Any]],
                      calib: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The calibration ``catg`` of a step: a calib/ file of the arm, or the product of the
    nearest night's step of recipe ``source`` whose setup matches the frames' in ``match``."""
    tag = f"{catg}_{step['arm']}"
    if source == "calib":
        for f in calib:
            if f["arm_code"] == step["arm_code"] and f["pro_catg"] == tag:
                return dict(tag=tag, night="", same_night=True, path=f["path"])
        return None
    candidates = [s for s in steps
                  if s["recipe"] == source and s["arm_code"] == step["arm_code"]
                  and (source != "soxs_stare" or s["frame_type"] == "STD_FLUX")
                  and all(s["setup"].get(k) == frame_setup[k] for k in match)]
    if not candidates:
        return None
    best = min(candidates, key=lambda s: (_night_distance(s["night"], step["night"]),
                                          s["night"]))
    return dict(tag=tag, night=best["night"], same_night=best["night"] == step["night"],
                step=best["key"])


def _group_key(e: dict[str, Any]) -> tuple:
    """Sort and group key of a usable raw frame: recipes in reduction order (flux
    standards before the science, whose RESP_TAB they make), then night, arm and setup."""
    recipe = _RECIPE_OF[e["frame_type"]]
    stare_kind = e["frame_type"] if recipe == "soxs_stare" else ""
    setup = {k: e["setup"][k] for k in _GROUP_BY[recipe] if k != "template"}
    if recipe == "soxs_stare":
        setup["template"] = e["template"]
    return (_REDUCTION_ORDER.index(recipe), stare_kind != "STD_FLUX", e["night"],
            e["arm_code"], recipe, stare_kind, json.dumps(setup, sort_keys=True))


def _expected_steps(entries: list[dict[str, Any]]
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The steps of the usable raw frames, upstream first, and those that cannot be made
    (their frames get the problem ``no calibration``)."""
    usable = [e for e in entries if e["path"].startswith("raw/") and not e["problem"]]
    calib = [e for e in entries if e["pro_catg"]]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in usable:
        groups.setdefault(_group_key(e), []).append(e)
    steps: list[dict[str, Any]] = []
    impossible: list[dict[str, Any]] = []
    for key in sorted(groups):
        frames = sorted(groups[key], key=lambda e: e["mjd"])
        _, _, night, code, recipe, stare_kind, setup_text = key
        arm = resolve_arm(code)
        name = f"{night}_{code}_{recipe}" + (f"_{stare_kind}" if stare_kind else "")
        if any(s["key"] == name for s in steps + impossible):
            name += f"_{frames[0]['setup']['binning']}"
        step = dict(key=name, recipe=recipe, night=night, instrument=arm.instrument,
                    arm=arm.name, arm_code=code,
                    frame_type=stare_kind or frames[0]["frame_type"],
                    setup=json.loads(setup_text),
                    raw=[dict(path=e["path"], tag=sof_tag(arm, e["frame_type"]))
                         for e in frames],
                    calibrations=[])
        missing = []
        for catg, source, match, required in _calibration_needs(arm, recipe, stare_kind):
            found = _find_calibration(step, frames[0]["setup"], catg, source, match, steps,
                                      calib)
            if found is not None:
                step["calibrations"].append(found)
            elif required:
                missing.append(f"{catg}_{arm.name}")
        if missing:
            s = frames[0]["setup"]
            what = " ".join(v for v in (arm.name, s["binning"], s["readout"]) if v)
            if not arm.is_ccd:
                what += f" {s['exptime']:g} s"
            step["missing"] = missing
            impossible.append(step)
            for e in frames:
                e.update(problem_kind="no calibration",
                         problem=f"no calibration for setup {what}: {', '.join(missing)}")
            continue
        steps.append(step)
        for e in frames:
            e["step"] = name
    return steps, impossible


#: fewest orders of a simulated UVB arm (the flats' stitching needs two)
UVB_MIN_ORDERS = 2


def _normalised_orders(arms: list[Arm], orders: int | Mapping[str, Sequence[int]] | None
                       ) -> dict[str, list[int] | None]:
    if orders is None:
        return {a.code: None for a in arms}
    if isinstance(orders, int):
        if orders < 1:
            raise InputError(f"orders: need at least 1 order per arm, got {orders}")
        # the UVB's D2 and QTH master flats are stitched on the orders both show: one order
        # is too few for soxs_mflat to reduce
        return {a.code: central_orders(a, max(orders, UVB_MIN_ORDERS) if a.name == "UVB"
                                       else orders) for a in arms}
    out: dict[str, list[int] | None] = {}
    for a in arms:
        chosen = orders.get(a.code)
        out[a.code] = None if chosen is None else load_format(a.code).checked_orders(chosen)
    return out


def _prepare(outdir: Path) -> Path:
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a directory")
    if (outdir / TRUTH_FILE).exists():
        raise InputError(f"{outdir}: already holds an archive ({TRUTH_FILE}); choose a new "
                         "directory")
    if (outdir / "raw").exists():
        raise InputError(f"{outdir}: already holds raw/ without {TRUTH_FILE} (an interrupted "
                         "simulation?); remove it or choose a new directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{outdir}: cannot create the directory ({exc.strerror})") from None
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise InputError(f"{outdir}: directory is not writable")
    return outdir


def simulate_archive(outdir: str | os.PathLike, nights: int | Iterable[int] = 2,
                     arms: Iterable[str | Arm] = ("xsh_vis", "soxs_nir"), seed: int = 1,
                     orders: int | Mapping[str, Sequence[int]] | None = None,
                     small: bool = True, counts: Mapping[str, int] | None = None,
                     mess: bool = True, science_exptime: float = 600.0,
                     keep_truth: bool = False) -> ArchiveTruth:
    """Write a simulated archive of several nights and arms and its truth manifest.

    Parameters
    ----------
    outdir : path
        Archive directory (created; must not hold an archive already).
    nights : int or iterable of int
        Number of consecutive nights, or their day offsets from the first night 2026-11-21
        (``(0, 1, 3)``: a gap before the last).
    arms : iterable of str
        Arm codes (``xsh_uvb``, ``xsh_vis``, ``xsh_nir``, ``soxs_vis``, ``soxs_nir``).
    seed : int
        Master seed: the same seed and arguments give the same files, byte for byte.
    orders : int, mapping or None
        Illuminated orders: the ``n`` central orders of every arm, or ``arm code -> orders``
        (arms left out: all), or None: one central order when ``small``, else all.
    small : bool
        Frame counts of :data:`SMALL_COUNTS` (a test archive), else :data:`FULL_COUNTS`.
    counts : mapping, optional
        Overrides of the counts (``n_bias``, ``n_dark``, ``n_flat``, ``n_std``,
        ``n_science``).
    mess : bool
        Add the mess of real archives (module docstring).
    science_exptime : float
        Science (and NIR dark and standard) exposure time [s].
    keep_truth : bool
        Keep the night simulator's truth directories in ``truth/<night>/<arm>_<binning>/``.

    Returns
    -------
    ArchiveTruth

    Raises
    ------
    InputError
        Bad arguments or output directory, before anything is simulated.
    """
    t0 = time.perf_counter()
    outdir = Path(outdir)
    days = list(range(nights)) if isinstance(nights, int) else [int(d) for d in nights]
    arm_list = [resolve_arm(a) for a in arms]
    n = dict(SMALL_COUNTS if small else FULL_COUNTS, **(counts or {}))
    unknown = set(n) - set(SMALL_COUNTS)
    if unknown:
        raise InputError(f"counts: unknown {', '.join(sorted(unknown))}; use "
                         f"{', '.join(SMALL_COUNTS)}")
    _check_arguments(days, arm_list, n)
    per_arm = _normalised_orders(arm_list, 1 if orders is None and small else orders)
    if not math.isfinite(science_exptime) or science_exptime <= 0:
        raise InputError(f"science_exptime: must be > 0, got {science_exptime}")
    _prepare(outdir)
    runs = _plan_runs(days, arm_list, n, mess, science_exptime)
    night_names = [_night_name(d) for d in days]
    entries: list[dict[str, Any]] = []
    calib_done: set[str] = set()
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".simulating-") as scratch:
        for run in runs:
            entries += _place_run(outdir, run, per_arm[run.arm.code], seed, Path(scratch),
                                  keep_truth, calib_done)
    for e in entries:
        e.update(compressed=False, problem_kind="", problem="", step="")
    if mess:
        _add_mess(outdir, entries, night_names)
    steps, impossible = _expected_steps(entries)
    for e in entries:
        path = outdir / e["path"]
        e["sha256"], e["size"] = _sha256(path), path.stat().st_size
        del e["extra"], e["uncalibrated"]
    entries.sort(key=lambda e: e["path"])
    truth = ArchiveTruth(
        outdir=outdir,
        parameters=dict(seed=seed, arms=[a.code for a in arm_list], days=days,
                        orders=per_arm, counts=n, mess=mess, science_exptime=science_exptime),
        nights=night_names, files=entries, steps=steps, impossible_steps=impossible)
    truth.seconds = time.perf_counter() - t0
    text = json.dumps(truth.to_dict(), indent=1) + "\n"
    write_atomically(outdir / TRUTH_FILE, lambda tmp: tmp.write_text(text))
    return truth
