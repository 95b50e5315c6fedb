"""Static calibration files and per-arm default settings shipped with the package.

They are installed inside ``soxs_core/static`` (from ``calib/static`` in the source tree) and
found without any path setting.  ``SOXS_STATIC_DIR`` overrides the location.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import yaml

from soxs_core.detector.instruments import Arm
from soxs_core.errors import InputError
from soxs_core.io.compressed import scaled_float32
from soxs_core.io.fits import FitsFile

__all__ = ["static_dir", "static_path", "load_bad_pixel_map", "arm_defaults", "load_defaults"]


@functools.cache
def static_dir() -> Path:
    """Directory that holds the static calibrations."""
    override = os.environ.get("SOXS_STATIC_DIR")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / "static", here.parent.parent / "calib" / "static"]
    for candidate in candidates:
        if (candidate / "defaults.yaml").is_file():
            return candidate
    raise InputError("static calibration directory not found (looked in "
                     + ", ".join(str(c) for c in candidates) + ")")


def static_path(arm: Arm, name: str) -> Path:
    """Path of a static file of an arm's instrument; raises when it is not shipped."""
    path = static_dir() / arm.static_dir / name
    if not path.is_file():
        raise InputError(f"{path}: static calibration file not shipped")
    return path


@functools.lru_cache(maxsize=8)
def _bad_pixel_map(path: Path) -> np.ndarray:
    with FitsFile(path) as fits_file:
        primary = fits_file[0]
        stored = fits_file.read(primary)
    if "BSCALE" in primary.header or "BZERO" in primary.header:
        data = scaled_float32(stored, primary.header, str(path)) != 0
    else:
        data = stored != 0
    data.setflags(write=False)
    return data


def load_bad_pixel_map(arm: Arm, binning: str) -> np.ndarray:
    """Static bad-pixel map (bool, True = bad) in the prepared orientation.

    Raises
    ------
    InputError
        When no map is shipped for the binning or its shape does not match the frames.
    """
    path = static_path(arm, arm.bad_pixel_map_name(binning))
    bpm = _bad_pixel_map(path)
    binx, biny = (int(v) for v in binning.split("x"))
    expected = arm.prepared_shape(binx, biny)
    if bpm.shape != expected:
        raise InputError(f"{path}: bad-pixel map is {bpm.shape}, frames are {expected}")
    return bpm


@functools.cache
def load_defaults() -> dict:
    """The parsed ``defaults.yaml`` (recipe -> parameter -> arm code -> value)."""
    # libyaml's loader when PyYAML has it: ten times faster than the pure-Python one
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(static_dir() / "defaults.yaml") as fh:
        return yaml.load(fh, Loader=loader)


def arm_defaults(recipe: str, arm: Arm | None) -> dict:
    """Default parameter values of ``recipe`` for an arm (``None``: the generic defaults)."""
    table = load_defaults().get(recipe, {}).get("parameters", {})
    out = {}
    for name, per_arm in table.items():
        if isinstance(per_arm, dict):
            key = arm.code if arm is not None else "default"
            out[name] = per_arm.get(key, per_arm.get("default"))
        else:
            out[name] = per_arm
    return out


def qc_ranges(recipe: str, arm: Arm) -> dict[str, tuple[float, float]]:
    """Acceptable QC ranges ``{QC NAME: (min, max)}`` of a recipe for an arm."""
    table = load_defaults().get(recipe, {}).get("qc_ranges", {})
    out = {}
    for name, per_arm in table.items():
        value = per_arm.get(arm.code) if isinstance(per_arm, dict) else per_arm
        if value is not None:
            out[name] = (float(value[0]), float(value[1]))
    return out
