"""Detector geometry and header dialects of the SOXS and X-shooter arms.

Every number here is a fact about the instruments (see ``shared/reference/INSTRUMENTS.md``);
nothing in this module touches pixels.  Coordinates follow numpy: ``rows`` is FITS axis 2,
``cols`` is FITS axis 1, slices are 0-based and end-exclusive.

The *prepared* orientation is the one every static table assumes: rotate the raw frame with
``np.rot90(raw, rotation)`` first, then cut the science region.  After preparation the orders
of every X-shooter arm and of SOXS VIS run along the rows (y); SOXS NIR orders run along x.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from soxs_core.errors import InputError

__all__ = ["Arm", "ARMS", "get_arm", "arm_from_header", "INSTRUMENT_NAMES", "slit_keyword"]

#: Values of the ``INSTRUME`` keyword and the short instrument code used in file names.
INSTRUMENT_NAMES = {"SOXS": "soxs", "XSHOOTER": "xsh", "SHOOT": "xsh"}


@dataclass(frozen=True)
class Arm:
    """Static description of one spectrograph arm.

    Attributes
    ----------
    instrument : str
        ``INSTRUME`` value (``SOXS`` or ``XSHOOTER``).
    name : str
        ``ESO SEQ ARM`` value (``UVB``, ``VIS`` or ``NIR``).
    raw_shape : tuple of int
        Unbinned raw frame shape (NAXIS2, NAXIS1).
    rotation : int
        Number of counter-clockwise quarter turns (``np.rot90``) that bring the raw frame into
        the prepared orientation.
    science_region : tuple of int
        ``(row0, row1, col0, col1)`` of the unbinned, rotated frame kept after trimming.
    gain : float
        Fallback conversion factor in e-/ADU when the header has none.
    read_noise : float
        Fallback read noise in electrons when the header has none.
    saturation_adu : float
        Level in ADU above which a raw pixel is flagged saturated (header ``ESO DET SATLEVEL``
        wins when present).
    binnings : tuple of str
        Supported ``<binx>x<biny>`` binnings.
    is_ccd : bool
        CCD arms take bias frames; the NIR arrays do not.
    """

    instrument: str
    name: str
    raw_shape: tuple[int, int]
    rotation: int
    science_region: tuple[int, int, int, int]
    gain: float
    read_noise: float
    saturation_adu: float
    binnings: tuple[str, ...]
    is_ccd: bool
    slit_length_arcsec: float
    pixel_scale_arcsec: float
    dispersion_axis: str
    detector: str
    spectral_format_file: str
    keywords: Mapping[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        """Short key such as ``xsh_vis`` used for defaults and static files."""
        return f"{INSTRUMENT_NAMES[self.instrument]}_{self.name.lower()}"

    @property
    def static_dir(self) -> str:
        """Sub-directory of ``calib/static`` holding this instrument's files."""
        return INSTRUMENT_NAMES[self.instrument]

    def raw_shape_binned(self, binx: int, biny: int) -> tuple[int, int]:
        """Raw (unrotated) frame shape for a binning."""
        ny, nx = self.raw_shape
        if self.rotation % 2:
            # rotated arms are never binned; keep the formula honest anyway
            return ny // binx, nx // biny
        return ny // biny, nx // binx

    def science_slices(self, binx: int = 1, biny: int = 1) -> tuple[slice, slice]:
        """Row and column slices of the rotated frame that hold the science pixels."""
        r0, r1, c0, c1 = self.science_region
        return slice(r0 // biny, r1 // biny), slice(c0 // binx, c1 // binx)

    def prepared_shape(self, binx: int = 1, biny: int = 1) -> tuple[int, int]:
        """Shape of the trimmed, rotated science image."""
        rows, cols = self.science_slices(binx, biny)
        return rows.stop - rows.start, cols.stop - cols.start

    def bad_pixel_map_name(self, binning: str) -> str:
        """File name of the static bad-pixel map for a binning."""
        if not self.is_ccd:
            return "BP_MAP_RP_NIR.fits.gz"
        return f"BP_MAP_RP_{self.name}_{binning}.fits.gz"


_XSH_CCD_KEYS = {
    "binx": "ESO DET WIN1 BINX",
    "biny": "ESO DET WIN1 BINY",
    "gain": "ESO DET OUT1 CONAD",
    "ron": "ESO DET OUT1 RON",
    "readout": "ESO DET READ SPEED",
    "saturation": "ESO DET SATLEVEL",
    "temperature": "ESO DET TLM1 START",
}
_XSH_NIR_KEYS = {
    "gain": "ESO DET OUT1 CONAD",
    "ron": "ESO DET OUT1 RON",
    "readout": "ESO DET NCORRS NAME",
    "saturation": "ESO DET SATLEVEL",
    "temperature": "ESO INS TEMP86 VAL",
}
_SOXS_VIS_KEYS = {
    "binx": "ESO DET BINX",
    "biny": "ESO DET BINY",
    "gain": "ESO DET OUT1 CONAD",
    "ron": "ESO DET CHIP RON",
    "readout": "ESO DET READ CURNAME",
    "saturation": "ESO DET SATLEVEL",
    "temperature": "ESO INS TEMP104 VAL",
}
_SOXS_NIR_KEYS = {
    "gain": "ESO DET OUT1 CONAD",
    "ron": "ESO DET CHIP RON",
    "readout": "ESO DET READ CURNAME",
    "saturation": "ESO DET SATLEVEL",
    "temperature": "ESO INS TEMP217 VAL",
}

ARMS: dict[str, Arm] = {
    "xsh_uvb": Arm(
        instrument="XSHOOTER", name="UVB", raw_shape=(3000, 2144), rotation=2,
        science_region=(0, 3000, 48, 2096), gain=1.61, read_noise=2.6,
        saturation_adu=65000.0, binnings=("1x1", "1x2", "2x2"), is_ccd=True,
        slit_length_arcsec=11.0, pixel_scale_arcsec=0.161, dispersion_axis="y",
        detector="e2v CCD44-82", spectral_format_file="SPECTRAL_FORMAT_TAB_UVB.fits",
        keywords=_XSH_CCD_KEYS,
    ),
    "xsh_vis": Arm(
        instrument="XSHOOTER", name="VIS", raw_shape=(4000, 2106), rotation=0,
        science_region=(0, 4000, 10, 2058), gain=1.4, read_noise=5.3,
        saturation_adu=65535.0, binnings=("1x1", "1x2", "2x2"), is_ccd=True,
        slit_length_arcsec=11.0, pixel_scale_arcsec=0.16, dispersion_axis="y",
        detector="MIT/LL CCID-20", spectral_format_file="SPECTRAL_FORMAT_TAB_VIS.fits",
        keywords=_XSH_CCD_KEYS,
    ),
    "xsh_nir": Arm(
        instrument="XSHOOTER", name="NIR", raw_shape=(1100, 2048), rotation=1,
        science_region=(4, 2044, 20, 1076), gain=2.12, read_noise=8.0,
        saturation_adu=42000.0, binnings=("1x1",), is_ccd=False,
        slit_length_arcsec=11.0, pixel_scale_arcsec=0.197, dispersion_axis="y",
        detector="Hawaii2RG", spectral_format_file="SPECTRAL_FORMAT_TAB_NIR.fits",
        keywords=_XSH_NIR_KEYS,
    ),
    "soxs_vis": Arm(
        instrument="SOXS", name="VIS", raw_shape=(4096, 2098), rotation=0,
        science_region=(0, 4096, 50, 858), gain=1.0, read_noise=3.8,
        saturation_adu=65535.0, binnings=("1x1", "2x1", "2x2"), is_ccd=True,
        slit_length_arcsec=12.0, pixel_scale_arcsec=0.28, dispersion_axis="y",
        detector="e2v CCD44-82", spectral_format_file="SOXS_SPECTRAL_FORMAT_TAB_VIS.fits",
        keywords=_SOXS_VIS_KEYS,
    ),
    "soxs_nir": Arm(
        instrument="SOXS", name="NIR", raw_shape=(2048, 2048), rotation=0,
        science_region=(4, 2044, 4, 2044), gain=2.3, read_noise=7.3,
        saturation_adu=45000.0, binnings=("1x1",), is_ccd=False,
        slit_length_arcsec=12.0, pixel_scale_arcsec=0.25, dispersion_axis="x",
        detector="Hawaii2RG", spectral_format_file="SOXS_SPECTRAL_FORMAT_TAB_NIR.fits",
        keywords=_SOXS_NIR_KEYS,
    ),
}


def get_arm(instrument: str, arm: str) -> Arm:
    """Return the :class:`Arm` for an instrument name (``SOXS``/``XSHOOTER``/``xsh``) and arm."""
    inst = instrument.strip().upper()
    short = INSTRUMENT_NAMES.get(inst, inst.lower())
    key = f"{short}_{arm.strip().lower()}"
    if key not in ARMS:
        raise InputError(f"unknown instrument/arm combination {instrument!r}/{arm!r}")
    return ARMS[key]


def arm_from_header(header: Mapping, source: str = "header") -> Arm:
    """Identify the arm of a raw frame or product from ``INSTRUME`` and ``ESO SEQ ARM``."""
    instrument = str(header.get("INSTRUME", "")).strip().upper()
    arm = str(header.get("ESO SEQ ARM", "")).strip().upper()
    if not instrument:
        raise InputError(f"{source}: no INSTRUME keyword, cannot tell the instrument")
    if instrument not in INSTRUMENT_NAMES:
        raise InputError(f"{source}: INSTRUME={instrument!r} is neither SOXS nor XSHOOTER")
    if not arm:
        raise InputError(f"{source}: no ESO SEQ ARM keyword, cannot tell the arm")
    try:
        return get_arm(instrument, arm)
    except InputError:
        raise InputError(f"{source}: {instrument} has no arm {arm!r}") from None


def slit_keyword(arm: Arm) -> str:
    """Header keyword holding the slit (or mask) name of an arm (INSTRUMENTS.md §3.1)."""
    if arm.instrument == "XSHOOTER":
        return {"UVB": "ESO INS OPTI3 NAME", "VIS": "ESO INS OPTI4 NAME",
                "NIR": "ESO INS OPTI5 NAME"}[arm.name]
    return "ESO INS VISE NAME" if arm.name == "VIS" else "ESO INS NISE NAME"
