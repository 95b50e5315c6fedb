"""Small shared helpers of the simulator: deterministic random streams and per-arm facts."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from soxs_core.detector.instruments import ARMS, Arm
from soxs_core.errors import InputError

__all__ = ["rng_for", "parse_binning", "resolve_arm", "ReadoutMode", "readout_mode",
           "PIXEL_SIZE_UM"]

#: Physical pixel pitch in micrometres (CCDs 15 µm, Hawaii-2RG 18 µm).
PIXEL_SIZE_UM = {"xsh_uvb": 15.0, "xsh_vis": 15.0, "xsh_nir": 18.0, "soxs_vis": 15.0,
                 "soxs_nir": 18.0}


def _token(value: object) -> int:
    """A stable 32-bit integer for a seed component (strings hashed with CRC32)."""
    if isinstance(value, (int, np.integer)):
        return int(value) & 0xFFFFFFFF
    return zlib.crc32(str(value).encode())


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """Independent random generator for ``(seed, *keys)``.

    The same arguments always give the same stream; any change of a key gives a stream that is
    statistically independent of the others (``numpy.random.SeedSequence`` spawning rules).
    """
    entropy = [_token(seed)] + [_token(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def parse_binning(binning: str) -> tuple[int, int]:
    """``"2x1"`` -> ``(2, 1)`` (ESO order ``<binx>x<biny>``)."""
    try:
        bx, by = (int(v) for v in str(binning).lower().split("x"))
    except ValueError:
        raise InputError(f"binning {binning!r} is not of the form '<binx>x<biny>'") from None
    return bx, by


def resolve_arm(arm: str | Arm) -> Arm:
    """Accept an :class:`Arm` or a code such as ``xsh_vis``/``soxs_nir``."""
    if isinstance(arm, Arm):
        return arm
    key = str(arm).strip().lower().replace("-", "_").replace("xshooter", "xsh")
    if key not in ARMS:
        raise InputError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    return ARMS[key]


@dataclass(frozen=True)
class ReadoutMode:
    """Per-arm, per-readout-mode detector facts used as simulator defaults.

    Attributes
    ----------
    name : str
        ``slow`` or ``fast`` (NIR arrays: the single up-the-ramp mode).
    label : str
        Value of the arm's readout-mode keyword (e.g. ``1pt/100k/hg``).
    gain : float
        e-/ADU (``CONAD``).
    read_noise : float
        e-.
    bias_adu : float
        Mean bias (CCD) or pedestal (NIR) level in ADU.
    readout_time : float
        Seconds to read the detector; cosmic rays hit during half of it on average.
    clock : str
        X-shooter ``ESO DET READ CLOCK`` value (empty elsewhere).
    curid : int
        SOXS ``ESO DET READ CURID`` value.
    """

    name: str
    label: str
    gain: float
    read_noise: float
    bias_adu: float
    readout_time: float
    clock: str = ""
    curid: int = 0


_MODES: dict[str, dict[str, ReadoutMode]] = {
    "xsh_uvb": {
        "slow": ReadoutMode("slow", "1pt/100k/hg", 0.62, 2.6, 560.0, 70.0, "100k/1pt/hg"),
        "fast": ReadoutMode("fast", "1pt/400k/lg", 1.75, 4.5, 470.0, 20.0, "400k/1pt/lg"),
    },
    "xsh_vis": {
        "slow": ReadoutMode("slow", "1pt/100k/hg", 0.6, 3.2, 420.0, 90.0, "100k/1pt/hg"),
        "fast": ReadoutMode("fast", "1pt/400k/lg", 1.4, 5.3, 380.0, 25.0, "400k/1pt/lg"),
    },
    # NIR frames are reset-subtracted up-the-ramp slopes: a small pedestal, kept a few read
    # noises above zero so that 16-bit storage clips nothing (SOXS expects a master-dark median
    # within [-15, 50] e-)
    "xsh_nir": {
        "slow": ReadoutMode("slow", "NonDest", 2.12, 8.0, 20.0, 2.0),
    },
    "soxs_vis": {
        "slow": ReadoutMode("slow", "SLOW", 0.6, 3.0, 1000.0, 40.0, curid=1),
        "fast": ReadoutMode("fast", "FAST", 2.0, 7.0, 650.0, 10.0, curid=2),
    },
    "soxs_nir": {
        "slow": ReadoutMode("slow", "UpTheRamp", 2.3, 7.3, 17.0, 2.0),
    },
}


def readout_mode(arm: Arm, readout: str) -> ReadoutMode:
    """Readout-mode defaults of an arm; NIR arms accept any name (one mode only)."""
    modes = _MODES[arm.code]
    key = str(readout).strip().lower()
    if not arm.is_ccd:
        return modes["slow"]
    if key not in modes:
        raise InputError(f"readout {readout!r} unknown for {arm.code}; use 'slow' or 'fast'")
    return modes[key]
