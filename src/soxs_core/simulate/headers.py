"""FITS headers of simulated raw frames, in the keyword dialect of each real instrument.

Only facts from ``INSTRUMENTS.md`` (and the ESO headers embedded in the X-shooter bad-pixel maps)
are used: arm keywords, DPR classification, binning, gain/read-noise/readout-mode keywords,
detector temperature and the bookkeeping keywords an organiser groups on.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from astropy.io import fits
from astropy.time import Time

from soxs_core.detector.instruments import Arm
from soxs_core.simulate._common import PIXEL_SIZE_UM, ReadoutMode

__all__ = ["FrameKind", "FRAME_KINDS", "frame_kind", "build_header", "default_mjd",
           "NIGHT_ORIGIN", "night_of", "template_start", "raw_file_name", "slit_keyword",
           "sof_tag", "SOXS_LAMP_NAMES"]

#: UTC origin of the default simulated night (2026-11-21 at La Silla / Paranal): science is
#: taken a few hours after this instant, day-time calibrations the following morning, so that
#: ``MJD-OBS - 15 h`` falls on 2026-11-21 for every frame.
NIGHT_ORIGIN = "2026-11-22T00:00:00"
_NIGHT_ORIGIN_MJD = float(Time(NIGHT_ORIGIN, format="isot", scale="utc").mjd)


@dataclass(frozen=True)
class FrameKind:
    """DPR classification and bookkeeping of one simulated frame type.

    Attributes
    ----------
    name : str
        Simulator name (``BIAS``, ``DARK``, ``FLAT``, ``DFLAT``, ``QFLAT``, ``FLAT_OFF``,
        ``OBJECT``, ``STD_FLUX``, ``STD_TELLURIC``).
    catg, dpr_type, tech : str
        ``ESO DPR CATG/TYPE/TECH`` values.
    hours : float
        Start of this frame type's block, hours after :data:`NIGHT_ORIGIN`.
    template : str
        Template-name stem used for ``ESO TPL ID``.
    """

    name: str
    catg: str
    dpr_type: str
    tech: str
    hours: float
    template: str


FRAME_KINDS: dict[str, FrameKind] = {
    "OBJECT": FrameKind("OBJECT", "SCIENCE", "OBJECT", "ECHELLE,SLIT,STARE", 2.0, "obs_Stare"),
    "STD_FLUX": FrameKind("STD_FLUX", "CALIB", "STD,FLUX", "ECHELLE,SLIT,STARE", 1.0,
                          "cal_FluxStdStare"),
    "STD_TELLURIC": FrameKind("STD_TELLURIC", "CALIB", "STD,TELLURIC", "ECHELLE,SLIT,STARE",
                              1.5, "cal_TelluricStdStare"),
    "BIAS": FrameKind("BIAS", "CALIB", "BIAS", "IMAGE", 10.0, "cal_Bias"),
    "DARK": FrameKind("DARK", "CALIB", "DARK", "IMAGE", 11.0, "cal_Dark"),
    "FLAT": FrameKind("FLAT", "CALIB", "LAMP,FLAT", "ECHELLE,SLIT", 13.0, "cal_FlatSlit"),
    "DFLAT": FrameKind("DFLAT", "CALIB", "LAMP,DFLAT", "ECHELLE,SLIT", 13.0, "cal_FlatSlit"),
    "QFLAT": FrameKind("QFLAT", "CALIB", "LAMP,QFLAT", "ECHELLE,SLIT", 13.5, "cal_FlatSlit"),
    "FLAT_OFF": FrameKind("FLAT_OFF", "CALIB", "LAMP,FLAT", "IMAGE", 13.0, "cal_FlatSlit"),
}


#: Values of SOXS's lamp keywords (``ESO INS QTH NAME`` / ``ESO INS DEUT NAME``) as
#: soxspipe 0.17.4's mflat selects the SOXS lamp flats by them.
SOXS_LAMP_NAMES = {"QTH": "Qth_Lamp", "D2": "Deut_Lamp"}


def frame_kind(name: str, arm: Arm | None = None) -> FrameKind:
    """Look up a :class:`FrameKind` by simulator name (case-insensitive).

    With ``arm``, the DPR values are those that instrument writes: SOXS's lamp-off frames are
    ``FLAT,LAMP`` / ``IMAGE`` (the pair soxspipe 0.17.4 looks for on SOXS), X-shooter's repeat
    the lamp-on type ``LAMP,FLAT`` with TECH ``IMAGE``.
    """
    key = name.strip().upper()
    if key not in FRAME_KINDS:
        raise ValueError(f"unknown frame type {name!r}; choose from {', '.join(FRAME_KINDS)}")
    kind = FRAME_KINDS[key]
    if arm is not None and arm.instrument == "SOXS" and kind.name == "FLAT_OFF":
        kind = FrameKind(kind.name, kind.catg, "FLAT,LAMP", kind.tech, kind.hours,
                         kind.template)
    return kind


def sof_tag(arm: Arm, name: str) -> str:
    """SOF tag of a raw frame type, soxspipe's convention ``<DPR TYPE, commas as
    underscores>_<ARM>`` (``LAMP_FLAT_VIS``, ``LAMP_DFLAT_UVB``, ``OBJECT_NIR``...).

    The tag derives from DPR TYPE alone: lamp-off frames share their type's tag and are told
    apart by DPR TECH ``IMAGE``.
    """
    return f"{frame_kind(name, arm).dpr_type.replace(',', '_')}_{arm.name}"


def default_mjd(kind: FrameKind, index: int, exptime: float, overhead: float = 60.0,
                night_offset: float = 0.0) -> float:
    """MJD-OBS of frame ``index`` of a type: its block start plus ``index`` exposure cycles.

    ``night_offset`` (days) moves the whole night: whole days to another night, a fraction
    of a day within it.
    """
    return (_NIGHT_ORIGIN_MJD + night_offset + kind.hours / 24.0
            + index * (exptime + overhead) / 86400.0)


def template_start(kind: FrameKind, night_offset: float = 0.0) -> str:
    """``ESO TPL START`` of a frame type's template: the start of its block of the night
    (every frame of the block shares it)."""
    mjd = _NIGHT_ORIGIN_MJD + night_offset + kind.hours / 24.0
    return Time(mjd, format="mjd", scale="utc").isot[:19]


def night_of(mjd: float) -> str:
    """Observing night ``YYYY-MM-DD`` of an ``MJD-OBS``: the UTC date 12 h earlier (the
    convention of :class:`soxs_archive.model.FrameRecord`)."""
    return Time(float(mjd) - 0.5, format="mjd", scale="utc").isot[:10]


def slit_keyword(arm: Arm) -> str:
    """Header keyword that carries the slit / mask name of an arm."""
    if arm.instrument == "XSHOOTER":
        return {"UVB": "ESO INS OPTI3 NAME", "VIS": "ESO INS OPTI4 NAME",
                "NIR": "ESO INS OPTI5 NAME"}[arm.name]
    return "ESO INS VISE NAME" if arm.name == "VIS" else "ESO INS NISE NAME"


def raw_file_name(arm: Arm, kind: FrameKind, index: int) -> str:
    """File name used for a simulated raw frame, e.g. ``XSH_VIS_BIAS_0003.fits``."""
    inst = "XSH" if arm.instrument == "XSHOOTER" else "SOXS"
    return f"{inst}_{arm.name}_{kind.name}_{index:04d}.fits"


def _lamp_cards(arm: Arm, kind: FrameKind) -> list[tuple[str, Any, str]]:
    if kind.name not in ("FLAT", "DFLAT", "QFLAT"):
        return []
    if arm.instrument == "XSHOOTER":
        if kind.name == "DFLAT":
            name = "UVB_Low_D2_Lamp"
        elif arm.name == "UVB":
            name = "UVB_High"
        else:
            name = f"{arm.name}_QTH_Lamp"
        return [("ESO INS LAMP1 NAME", name, "Lamp name"), ("ESO INS LAMP1 ST", True, "Lamp on")]
    if kind.name == "DFLAT":
        return [("ESO INS DEUT NAME", SOXS_LAMP_NAMES["D2"], "Deuterium lamp")]
    return [("ESO INS QTH NAME", SOXS_LAMP_NAMES["QTH"], "Quartz-halogen lamp")]


def _detector_cards(arm: Arm, mode: ReadoutMode, binx: int, biny: int, exptime: float,
                    gain: float, read_noise: float, raw_shape: tuple[int, int],
                    prescan: int, overscan: int) -> list[tuple[str, Any, str]]:
    keys = arm.keywords
    ny, nx = raw_shape
    cards: list[tuple[str, Any, str]] = []
    pix = PIXEL_SIZE_UM[arm.code]
    cards += [(keys["gain"], round(gain, 4), "Conversion from ADUs to electrons"),
              ("ESO DET OUT1 GAIN", round(1.0 / gain, 4), "Conversion from electrons to ADU"),
              (keys["ron"], round(read_noise, 3), "Readout noise (e-)")]
    if arm.is_ccd:
        cards += [(keys["binx"], binx, "Binning factor along X"),
                  (keys["biny"], biny, "Binning factor along Y")]
    cards += [("CDELT1", float(binx), "Binning factor along X"),
              ("CDELT2", float(biny), "Binning factor along Y")]
    cards.append((keys["readout"], mode.label, "Readout mode"))
    if arm.instrument == "XSHOOTER" and arm.is_ccd:
        clock = mode.clock + (f"/{binx}x{biny}" if (binx, biny) != (1, 1) else "")
        cards += [
            ("ESO DET READ CLOCK", clock, "Readout clock pattern used"),
            ("ESO DET READ MODE", "normal", "Readout method"),
            ("ESO DET CHIP1 NAME", arm.detector if arm.name == "VIS" else "e2v CC44-82",
             "Detector chip name"),
            ("ESO DET CHIP1 ID", "Catherine" if arm.name == "VIS" else "Pisces Austr II",
             "Detector chip identification"),
            ("ESO DET CHIP1 NX", 2048, "# of pixels along X"),
            ("ESO DET CHIP1 NY", 4102, "# of pixels along Y"),
            ("ESO DET CHIP1 PSZX", pix, "Size of pixel in X"),
            ("ESO DET CHIP1 PSZY", pix, "Size of pixel in Y"),
            ("ESO DET OUT1 NAME", "A", "Description of output"),
            ("ESO DET OUT1 NX", nx - prescan - overscan, "valid pixels along X"),
            ("ESO DET OUT1 NY", ny, "valid pixels along Y"),
            ("ESO DET OUT1 PRSCX", prescan, "Prescan region in X"),
            ("ESO DET OUT1 OVSCX", overscan, "Overscan region in X"),
            ("ESO DET OUT1 PRSCY", 0, "Prescan region in Y"),
            ("ESO DET OUT1 OVSCY", 0, "Overscan region in Y"),
            ("ESO DET WIN1 NX", nx, "# of pixels along X"),
            ("ESO DET WIN1 NY", ny, "# of pixels along Y"),
            ("ESO DET WIN1 STRX", 1, "Lower left pixel in X"),
            ("ESO DET WIN1 STRY", 1, "Lower left pixel in Y"),
            ("ESO DET WIN1 DIT1", float(exptime), "actual subintegration time"),
            ("ESO DET EXP RDTTIME", mode.readout_time, "image readout time"),
        ]
        temp = 153.0 if arm.name == "UVB" else 135.0
        cards += [("ESO DET TLM1 START", temp, "CCD T1 at read start [K]"),
                  ("ESO DET TLM1 END", temp, "CCD T1 at read completion [K]"),
                  ("ESO DET TLM2 START", temp + 7.9, "CCD T2 at read start [K]"),
                  ("ESO DET TLM2 END", temp + 7.9, "CCD T2 at read completion [K]")]
    elif arm.instrument == "XSHOOTER":
        cards += [
            ("ESO DET NCORRS", 4, "Read-Out Mode"),
            ("ESO DET CHIP NAME", "Hawaii2RG", "Detector name"),
            ("ESO DET CHIP ID", "ESO-Hawaii2RG", "Detector ID"),
            ("ESO DET CHIP NX", nx, "Pixels in X"),
            ("ESO DET CHIP NY", ny, "Pixels in Y"),
            ("ESO DET CHIP PXSPACE", pix * 1e-6, "Pixel-Pixel Spacing"),
            ("ESO DET WIN NX", nx, "# of Pixels in X"),
            ("ESO DET WIN NY", ny, "# of Pixels in Y"),
            ("ESO DET WIN STARTX", 1, "Lower left X ref"),
            ("ESO DET WIN STARTY", 1, "Lower left Y ref"),
            ("ESO DET DIT", float(exptime), "Integration Time"),
            ("ESO DET NDIT", 1, "# of Sub-Integrations"),
            ("ESO DET SATLEVEL", int(arm.saturation_adu), "Saturation Level"),
            (keys["temperature"], 81.0, "NIR detector copper bar [K]"),
            ("ESO INS TEMP90 VAL", 80.5, "NIR head [K]"),
        ]
    else:
        cards += [
            ("ESO DET CHIP NAME", arm.detector, "Detector chip name"),
            ("ESO DET CHIP NX", nx, "# of pixels along X"),
            ("ESO DET CHIP NY", ny, "# of pixels along Y"),
            ("ESO DET CHIP PSZX", pix, "Size of pixel in X [um]"),
            ("ESO DET CHIP PSZY", pix, "Size of pixel in Y [um]"),
            ("ESO DET WIN1 NX", nx, "# of pixels along X"),
            ("ESO DET WIN1 NY", ny, "# of pixels along Y"),
            (keys["temperature"], 153.0 if arm.is_ccd else 40.0, "Detector temperature [K]"),
            ("ESO INS TEMP301 VAL", 10.0, "Common path temperature [C]"),
        ]
        if arm.is_ccd:
            cards.append(("ESO DET READ CURID", mode.curid, "Readout mode id"))
        else:
            cards += [("ESO DET DIT", float(exptime), "Integration Time"),
                      ("ESO DET NDIT", 1, "# of Sub-Integrations")]
        simkey = "ESO INS VISE SWSIM" if arm.name == "VIS" else "ESO INS NISE SWSIM"
        cards.append((simkey, False, "Instrument software simulation"))
    return cards


def build_header(arm: Arm, mode: ReadoutMode, kind: FrameKind, *, binx: int, biny: int,
                 exptime: float, mjd: float, index: int, gain: float, read_noise: float,
                 raw_shape: tuple[int, int], prescan: int, overscan: int,
                 extra: Mapping[str, Any] | None = None,
                 night_offset: float = 0.0) -> fits.Header:
    """Primary header of a simulated raw frame.

    Parameters
    ----------
    arm, mode, kind
        Arm, readout mode and frame type.
    binx, biny : int
        Binning.
    exptime : float
        Exposure time (s).
    mjd : float
        ``MJD-OBS``.
    index : int
        Frame number (used in file names and ``ESO TPL EXPNO``).
    gain, read_noise : float
        e-/ADU and e- written to the arm's keywords.
    raw_shape : tuple of int
        ``(NAXIS2, NAXIS1)`` of the raw image.
    prescan, overscan : int
        Widths (raw columns) of the prescan/overscan strips.
    extra : mapping, optional
        Extra or overriding keywords (``key -> value`` or ``key -> (value, comment)``).
    night_offset : float
        Days by which the night is moved (:func:`default_mjd`); sets ``ESO TPL START``.

    Returns
    -------
    astropy.io.fits.Header
    """
    t = Time(mjd, format="mjd", scale="utc")
    date_obs = t.isot[:23]
    xsh = arm.instrument == "XSHOOTER"
    inst_prefix = "XSHOO" if xsh else "SOXS"
    tpl_prefix = "XSHOOTER_slt_" if xsh else "SOXS_gen_"
    arm_tpl = kind.template.replace("cal_", f"cal_{arm.name}")
    cards: list[tuple[str, Any, str]] = [
        ("ORIGIN", "ESO-PARANAL" if xsh else "ESO-LASILLA", "European Southern Observatory"),
        ("TELESCOP", "ESO-VLT-U3" if xsh else "ESO-NTT", "ESO Telescope Name"),
        ("INSTRUME", arm.instrument, "Instrument used"),
        ("OBJECT", kind.dpr_type if kind.catg == "CALIB" and not kind.name.startswith("STD_")
         else "TARGET", "Original target"),
        ("EXPTIME", float(exptime), "Integration time [s]"),
        ("MJD-OBS", round(mjd, 8), f"Obs start {date_obs}"),
        ("DATE-OBS", date_obs, "Observing date"),
        ("UTC", round((mjd % 1.0) * 86400.0, 3), "UTC at start [s]"),
        ("EQUINOX", 2000.0, "Standard FK5 (years)"),
        ("RADESYS", "FK5", "Coordinate reference frame"),
        ("ARCFILE", f"{inst_prefix}.{date_obs}.fits", "Archive File Name"),
        ("ORIGFILE", raw_file_name(arm, kind, index), "Original File Name"),
        ("ESO SEQ ARM", arm.name, "Instrument arm"),
        ("ESO DPR CATG", kind.catg, "Observation category"),
        ("ESO DPR TYPE", kind.dpr_type, "Observation type"),
        ("ESO DPR TECH", kind.tech, "Observation technique"),
        ("ESO OBS NAME", f"{arm.name}_{kind.name}_simulated", "OB name"),
        ("ESO OBS ID", 200000000 + zlib.crc32(kind.name.encode()) % 1000, "Observation block ID"),
        ("ESO TPL ID", tpl_prefix + arm_tpl, "Template signature ID"),
        ("ESO TPL NAME", arm_tpl, "Template name"),
        ("ESO TPL EXPNO", index + 1, "Exposure number within template"),
        ("ESO TPL START", template_start(kind, night_offset), "TPL start time"),
        (slit_keyword(arm), "Blind" if kind.name in ("BIAS", "DARK") and xsh else
         ("BLANK" if kind.name in ("BIAS", "DARK") else ("1.0x11" if xsh else "SLIT1.0")),
         "Slit / mask"),
        ("SOXSSIM", True, "written by the soxs instrument simulator"),
    ]
    cards += _detector_cards(arm, mode, binx, biny, exptime, gain, read_noise, raw_shape,
                             prescan, overscan)
    cards += _lamp_cards(arm, kind)
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for key, value, comment in cards:
            _set(header, key, value, comment)
        for key, value in (extra or {}).items():
            if isinstance(value, tuple):
                _set(header, key, value[0], value[1])
            else:
                _set(header, key, value, "")
    return header


def _set(header: fits.Header, key: str, value: Any, comment: str) -> None:
    """Set a card, using HIERARCH for long/ESO keywords and trimming overlong comments."""
    name = f"HIERARCH {key}" if (len(key) > 8 or " " in key) else key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        bare = str(fits.Card(name, value)).rstrip()
    room = 80 - len(bare) - 3
    comment = comment[:room] if room > 0 else ""
    header[name] = (value, comment)
