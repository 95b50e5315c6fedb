"""The master-flat reduction as one sequence of steps (what ``soxs_mflat`` runs).

:func:`make_master_flat` detrends and normalises the lamp flats (:mod:`.flat`), finds and fits
the order edges (:mod:`.edges`, :mod:`.tracing`), models the scattered light
(:mod:`.background`), finishes the master (normalisation, inter-order pixels, low-sensitivity
pixels) and, for the X-shooter UVB arm, stitches the D2 and QTH masters.  It returns one
:class:`FlatResult` per product set; the recipe writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soxs_core.combine.masters import verify_frames
from soxs_core.detector.instruments import Arm, slit_keyword
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle.ordertable import OrderTable
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.io.products import QcMeasurements

__all__ = ["FlatInputs", "FlatParameters", "FlatResult", "verify_flat_inputs",
           "make_master_flat", "LAMPS"]

log = logging.getLogger(__name__)

#: UVB lamp of each flat input, and the suffix of its products
LAMPS = {"LAMP_DFLAT": "DLAMP", "LAMP_QFLAT": "QLAMP"}


@dataclass(frozen=True)
class FlatParameters:
    """The recipe parameters the science uses (names as on the seed page)."""

    subtract_background: bool = True
    stacked_clipping_sigma: float = 5.0
    stacked_clipping_iterations: int = 5
    centre_order_window: int = 20
    slice_length_for_edge_detection: int = 90
    slice_width_for_edge_detection: int = 5
    min_percentage_threshold_for_edge_detection: int = 20
    max_percentage_threshold_for_edge_detection: int = 50
    order_deg: int = 6
    disp_axis_deg: int = 4
    poly_fitting_residual_clipping_sigma: float = 10.0
    poly_clipping_iteration_limit: int = 2
    low_sensitivity_clipping_sigma: float = 2.0
    scale_d2_to_qth: bool = True
    bspline_deg: int = 2
    gaussian_blur_sigma: float = 65.0

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> FlatParameters:
        """From resolved recipe parameters keyed by their CLI alias (``order-deg``)."""
        names = set(cls.__dataclass_fields__)
        values = {key.replace("-", "_"): value for key, value in params.items()}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class FlatInputs:
    """Frames and calibrations of one soxs_mflat run.

    Attributes
    ----------
    flats : dict
        Input stem (``LAMP_FLAT``, UVB ``LAMP_DFLAT``/``LAMP_QFLAT``) -> raw lamp flats.
    """

    arm: Arm
    flats: dict[str, list[RawFrame]]
    lamp_off: list[RawFrame] = field(default_factory=list)
    master_bias: DetectorImage | None = None
    master_dark: DetectorImage | None = None
    order_table: OrderTable | None = None
    master_dark_path: Path | None = None


@dataclass
class FlatResult:
    """One product set: master flat, order table, QC and plots (UVB: per lamp, stitched)."""

    lamp: str  # "" for the final products, "DLAMP"/"QLAMP" for the UVB per-lamp ones
    image: DetectorImage
    table: OrderTable
    qc: QcMeasurements
    frames: list[RawFrame]
    plots: dict[str, Path] = field(default_factory=dict)


def _slit(frame: RawFrame) -> str:
    return str(frame.header.get(slit_keyword(frame.arm), "")).strip()


def verify_flat_inputs(inputs: FlatInputs, min_flats: int) -> None:
    """Refuse, in one line naming the file, flats and calibrations that do not belong together.

    Raises
    ------
    InputError
        Too few flats; flats of different exposure time, slit or setup (per lamp); UVB with
        one lamp only; NIR flats with neither lamp-off frames nor a master dark; lamp-off
        frames or a master dark that do not match the flats.
    """
    arm = inputs.arm
    if arm.name == "UVB":
        missing = [f"{stem}_UVB ({lamp} lamp)" for stem, lamp in
                   (("LAMP_DFLAT", "D2"), ("LAMP_QFLAT", "QTH")) if not inputs.flats.get(stem)]
        if missing:
            raise InputError(f"soxs_mflat: UVB flats need both lamps; no {missing[0]} frames "
                             "given")
    for stem, frames in inputs.flats.items():
        verify_frames(frames, frames[0].frame_type or stem, min_flats, same_exptime=True)
        slits = [_slit(f) for f in frames]
        for frame, slit in zip(frames, slits):
            if slit != slits[0]:
                raise InputError(f"{frame.path}: slit {slit or '(none)'} differs from "
                                 f"{slits[0] or '(none)'} of {frames[0].path.name}")
    first = next(iter(inputs.flats.values()))[0]
    if inputs.lamp_off:
        verify_frames(inputs.lamp_off, "FLAT_OFF", 1, same_exptime=True)
        off = inputs.lamp_off[0]
        for key in first.setup:
            if off.setup[key] != first.setup[key]:
                raise InputError(f"{off.path}: lamp-off {key} {off.setup_origin(key)} does "
                                 f"not match the lamp-on flats' {first.setup_origin(key)}")
        if abs(off.exptime - first.exptime) > 0.01:
            raise InputError(f"{off.path}: lamp-off EXPTIME {off.exptime:g} s does not match "
                             f"the lamp-on flats' {first.exptime:g} s")
    if inputs.master_dark is not None:
        dark_t = inputs.master_dark.header.get("EXPTIME")
        if dark_t is not None and abs(float(dark_t) - first.exptime) > 0.01:
            raise InputError(f"{inputs.master_dark_path}: master dark of {float(dark_t):g} s, "
                             f"the flats are {first.exptime:g} s")
    if arm.name == "NIR" and not inputs.lamp_off and inputs.master_dark is None:
        raise InputError("soxs_mflat: NIR flats need lamp-off frames (LAMP_FLAT_NIR with DPR "
                         "TECH IMAGE) or a MASTER_DARK_NIR of their exposure time")


def make_master_flat(inputs: FlatInputs, params: FlatParameters,
                     plots: Mapping[str, Path]) -> Sequence[FlatResult]:
    """Run the reduction; see the module docstring."""
    raise NotImplementedError
