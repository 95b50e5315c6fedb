"""Instrument simulator for SOXS and X-shooter: raw frames with known truth.

* :class:`DetectorSimulator` / :class:`DetectorTruth` — bias structure, dark current, defects,
  noise, cosmic rays, saturation; raw frames in the real layout and header dialect.
* :class:`EchelleFormat` — order traces, slit geometry and wavelength solution of each arm.
* :class:`InstrumentSimulator` — lamp flats, NIR lamp-off frames, science and standard-star
  stare frames, and the upstream calibration tables computed from the truth.
* :func:`simulate_night` — a complete night directory (also the ``soxs-simulate`` command).

See ``docs/simulator.md``.
"""

from __future__ import annotations

from soxs_core.simulate.detector import DETECTOR_DEFAULTS, DetectorSimulator, DetectorTruth
from soxs_core.simulate.echelle import EchelleFormat, load_format
from soxs_core.simulate.instrument import InstrumentSimulator, SceneParameters
from soxs_core.simulate.night import NightResult, simulate_night

__all__ = ["DetectorSimulator", "DetectorTruth", "DETECTOR_DEFAULTS", "EchelleFormat",
           "load_format", "InstrumentSimulator", "SceneParameters", "simulate_night",
           "NightResult"]
