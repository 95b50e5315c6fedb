"""The master-flat reduction as one sequence of steps (what ``soxs_mflat`` runs).

:func:`make_master_flat` detrends and normalises the lamp flats (:mod:`.flat`), finds and fits
the order edges (:mod:`.edges`, :mod:`.tracing`), models the scattered light
(:mod:`.background`), finishes the master (normalisation, inter-order pixels, low-sensitivity
pixels) and, for the X-shooter UVB arm, stitches the D2 and QTH masters.  It returns one
:class:`FlatResult` per product set; the recipe writes them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.combine.masters import temperature_qc, verify_frames
from soxs_core.detector.instruments import Arm, slit_keyword
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle import background, edges, flat, tracing
from soxs_core.echelle.ordertable import OrderTable
from soxs_core.echelle.plots import plot_order_edges
from soxs_core.echelle.polynomial import fit_order_polynomial
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


#: Unbinned px by which the order edges are widened to mask the orders for the background
#: fit: the slit ends are soft over about a pixel, and the scattered light is smooth.
BACKGROUND_MASK_WIDEN = 4.0
#: Unbinned px by which the orders' along-order ranges are extended for that mask.
BACKGROUND_MASK_EXTEND = 150.0


@dataclass
class _LampReduction:
    """What the reduction of one lamp's flats produced."""

    binning: tuple[int, int]
    normalisation: flat.FlatNormalisation
    master: DetectorImage  # stacked, background subtracted when asked, not finished
    table: OrderTable
    report: tracing.EdgeFitReport
    samples: edges.EdgeSamples


def _full_frame(calibrated: flat.CalibratedFlats, k: int) -> np.ndarray:
    rows, cols = calibrated.shape
    data = np.empty((rows, cols), np.float32)
    err = np.empty_like(data)
    qual = np.empty((rows, cols), np.uint8)
    calibrated.reader(k)(0, rows, data, err, qual)
    data[qual != 0] = np.nan
    return data


def self_trace(calibrated: flat.CalibratedFlats, arm: Arm) -> OrderTable:
    """Find and number the orders on the flats themselves (no ORDER_TAB given)."""
    frame = calibrated.frames[0]
    stack = np.stack([_full_frame(calibrated, k) for k in range(min(3, len(calibrated.frames)))])
    with warnings.catch_warnings():  # pixels flagged in every frame stay NaN: not traced
        warnings.simplefilter("ignore", RuntimeWarning)
        image = np.nanmedian(stack, axis=0)
    table = tracing.trace_orders(image, None, arm.dispersion_axis,
                                 (calibrated.binx, calibrated.biny), arm=arm.code,
                                 source=str(frame.path))
    log.info("no ORDER_TAB given: %d orders (%d to %d) traced on the flats themselves and "
             "numbered from the %s predicted order positions", table.orders.size,
             int(table.orders.min()), int(table.orders.max()), arm.code)
    return table


def _edges(master: DetectorImage, table: OrderTable, arm: Arm, binning: tuple[int, int],
           params: FlatParameters) -> tuple[OrderTable, tracing.EdgeFitReport,
                                            edges.EdgeSamples]:
    samples = edges.measure_order_edges(
        master.data, master.qual, table.centre, table.orders.tolist(),
        list(zip(table.b_min, table.b_max)), arm.dispersion_axis, binning,
        params.slice_length_for_edge_detection, params.slice_width_for_edge_detection,
        params.min_percentage_threshold_for_edge_detection,
        params.max_percentage_threshold_for_edge_detection)
    fitted, report = tracing.fit_order_edges(
        samples, table, params.order_deg, params.disp_axis_deg,
        params.poly_fitting_residual_clipping_sigma, params.poly_clipping_iteration_limit)
    if report.dropped_orders:
        log.warning("%s: order(s) %s left out of the order table: too few slices with both "
                    "edges found", table.source or "the flat",
                    ", ".join(str(n) for n in report.dropped_orders))
    return fitted, report, samples


def _centre_between_edges(centres: OrderTable, samples: edges.EdgeSamples,
                          params: FlatParameters) -> OrderTable:
    """A self-traced table's centres replaced by the fit of the measured edges' midpoints:
    the traced centres wobble by tenths of a pixel, the midpoints of slit edges do not."""
    mid = 0.5 * (samples.low + samples.up)
    good = np.isfinite(mid) & np.isin(samples.order, centres.orders)
    deg = centres.centre.order_deg, centres.centre.along_deg
    fit = fit_order_polynomial(samples.order[good], samples.b[good], mid[good], *deg,
                               params.poly_fitting_residual_clipping_sigma,
                               params.poly_clipping_iteration_limit)
    return replace(centres, centre=fit.polynomial)


def _reduce_lamp(frames: list[RawFrame], inputs: FlatInputs, params: FlatParameters,
                 plots: Mapping[str, Path], suffix: str, written: dict[str, Path],
                 last: bool = True) -> _LampReduction:
    """Detrend, normalise and stack one lamp's flats; find the edges; model the background.

    After the ``last`` lamp's stack the calibration images of ``inputs`` are released."""
    arm = inputs.arm
    clip = flat.flat_clip_settings(params.stacked_clipping_sigma,
                                   params.stacked_clipping_iterations)
    calibrated = flat.calibrate_frame_set(frames, inputs.master_bias, inputs.master_dark,
                                          inputs.lamp_off or None, clip)
    binning = (calibrated.binx, calibrated.biny)
    traced = inputs.order_table is None
    centres = inputs.order_table or self_trace(calibrated, arm)
    norm = flat.normalise_flats(calibrated, centres, params.centre_order_window, clip)
    master = flat.stack_master_flat(calibrated, norm, clip)
    del calibrated
    if last:  # nothing reads them again: ~70 MiB (a VIS bias) off the memory peak below
        inputs.master_bias = inputs.master_dark = None
    table, report, samples = _edges(master, centres, arm, binning, params)
    if traced:
        centres = _centre_between_edges(centres, samples, params)
        table, report, samples = _edges(master, centres, arm, binning, params)
    if params.subtract_background:
        # an order's light goes on beyond where its edges could be measured (its faint
        # ends): masked too, or it would count as scattered light
        in_order = table.in_order_mask(master.shape, *binning, widen=BACKGROUND_MASK_WIDEN,
                                       extend=BACKGROUND_MASK_EXTEND)
        model = background.fit_background(master.data, master.qual, in_order,
                                          arm.dispersion_axis, params.bspline_deg,
                                          params.gaussian_blur_sigma, errors=master.error,
                                          binning=binning)
        label = "BKGROUND" + suffix
        if label in plots:
            written[label] = background.plot_background(
                plots[label], master.data, model, in_order,
                f"{arm.instrument} {arm.name}{suffix}: scattered light of the master flat",
                unit="flat level", release=False)   # its memory peak is behind it
        # in place, and the model dropped: two full-frame planes each off the memory peak
        master = background.subtract_background(master, model, overwrite=True)
        del model, in_order
        # the edges again, on the flat without its scattered-light pedestal
        table, report, samples = _edges(master, centres, arm, binning, params)
    return _LampReduction(binning, norm, master, table, report, samples)


def _finish(master: DetectorImage, table: OrderTable, report: tracing.EdgeFitReport,
            samples: edges.EdgeSamples, normalisation: flat.FlatNormalisation | None,
            params: FlatParameters, binning: tuple[int, int], frames: list[RawFrame],
            lamp: str, plots: Mapping[str, Path], written: dict[str, Path],
            in_place: bool = False) -> FlatResult:
    label = "ORDER LOC RES" + (f" {lamp}" if lamp else "")
    if label in plots:  # drawn on the stacked flat, before its inter-order pixels become 1
        arm = frames[0].arm
        written[label] = plot_order_edges(
            plots[label], master.data, table, report, binning,
            title=f"{arm.instrument} {arm.name}{' ' + lamp if lamp else ''}: order edges",
            samples=samples, release=False)
    # in place (saving three full-frame planes) unless the UVB stitching needs it again
    finished = flat.finish_master_flat(master, table, *binning,
                                       params.low_sensitivity_clipping_sigma,
                                       overwrite=in_place)
    qc = flat.flat_qc(normalisation, finished)
    qc.update(report.qc)
    qc.add("N ORDERS", int(table.orders.size))
    temperature_qc(frames[0], qc)
    return FlatResult(lamp=lamp, image=finished.image, table=table, qc=qc, frames=frames,
                      plots=dict(written))


def _order_light(lamp: _LampReduction) -> dict[int, float]:
    """Per order: the lamp's median centre-band flux (e-), zero where its edges were not
    found along at least a few positions."""
    counts = lamp.report.sample_counts
    return {int(n): (float(f) if counts.get(int(n), 0) >= 5 else 0.0)
            for n, f in lamp.normalisation.order_flux.items()}


def _union_centres(first: OrderTable, second: OrderTable) -> OrderTable:
    """One order-centre table over the orders of two (the self-traced D2 and QTH tables)."""
    ns, bs, as_ = [], [], []
    rows: dict[int, tuple[float, float]] = {}
    for table in (first, second):
        for n, b0, b1 in zip(table.orders, table.b_min, table.b_max):
            if int(n) in rows:  # each order's widest extent; its centres from one table
                rows[int(n)] = (min(rows[int(n)][0], b0), max(rows[int(n)][1], b1))
                continue
            b = np.linspace(b0, b1, 64)
            ns.append(np.full(b.size, float(n)))
            bs.append(b)
            as_.append(table.centre(float(n), b))
            rows[int(n)] = (b0, b1)
    deg = first.centre.order_deg, first.centre.along_deg
    fit = fit_order_polynomial(np.concatenate(ns), np.concatenate(bs), np.concatenate(as_),
                               deg[0], deg[1], 0.0, 0)
    orders = sorted(rows)
    return OrderTable(dispersion_axis=first.dispersion_axis, orders=np.array(orders),
                      b_min=np.array([rows[n][0] for n in orders]),
                      b_max=np.array([rows[n][1] for n in orders]),
                      centre=fit.polynomial, n_across=first.n_across, header=dict(first.header),
                      source=first.source)


def make_master_flat(inputs: FlatInputs, params: FlatParameters,
                     plots: Mapping[str, Path]) -> list[FlatResult]:
    """Run the reduction (see the module docstring).

    Parameters
    ----------
    inputs : FlatInputs
        Verified with :func:`verify_flat_inputs`.  Its ``master_bias`` and ``master_dark``
        are set to None once the last lamp is stacked (their planes are then freed, unless
        the caller holds them too).
    params : FlatParameters
    plots : mapping
        QC plot label (``ORDER LOC RES``, ``BKGROUND DLAMP``...) -> where to write it.

    Returns
    -------
    list of FlatResult
        One (VIS/NIR) or three (UVB: D2 lamp, QTH lamp, stitched, in that order).
    """
    arm = inputs.arm
    if arm.name != "UVB":
        frames = inputs.flats["LAMP_FLAT"]
        written: dict[str, Path] = {}
        lamp = _reduce_lamp(frames, inputs, params, plots, "", written)
        binning = lamp.binning
        # the lamp-off frames are raw inputs of the product too: its processing record, and
        # so the archive's check that a product is current, must name them
        used = [*frames, *inputs.lamp_off]
        return [_finish(lamp.master, lamp.table, lamp.report, lamp.samples,
                        lamp.normalisation, params, binning, used, "", plots, written,
                        in_place=True)]
    results, reduced = [], {}
    for stem, name in LAMPS.items():
        written = {}
        frames = inputs.flats[stem]
        reduced[name] = _reduce_lamp(frames, inputs, params, plots, f" {name}", written,
                                     last=name == list(LAMPS.values())[-1])
        lamp = reduced[name]
        binning = lamp.binning
        results.append(_finish(lamp.master, lamp.table, lamp.report, lamp.samples,
                               lamp.normalisation, params, binning, frames, name, plots,
                               written))
    d, q = reduced["DLAMP"], reduced["QLAMP"]
    # each order from the lamp that gives it more light; the edge-fit sample counts the
    # seed page names tie whenever both lamps' edges are found along a whole order
    centres = inputs.order_table or _union_centres(d.table, q.table)
    order, scale = flat.find_uvb_overlap_order_and_scale(
        d.master, q.master, centres, *binning, _order_light(d), _order_light(q),
        window=params.centre_order_window)
    log.info("UVB: D2 and QTH flats stitched at order %d, D2 scaled by %.4g%s", order, scale,
             "" if params.scale_d2_to_qth else " (not applied: scale-d2-to-qth is false)")
    stitched = flat.stitch_uv_mflats(d.master, q.master, d.table, order, scale, *binning,
                                     params.scale_d2_to_qth)
    table, report, samples = _edges(stitched, centres, arm, binning, params)
    frames = [*inputs.flats["LAMP_DFLAT"], *inputs.flats["LAMP_QFLAT"]]
    result = _finish(stitched, table, report, samples, None, params, binning, frames, "",
                     plots, {}, in_place=True)
    window_b, window_a = flat.stitch_window_centre(centres, order)
    x, y = (window_a, window_b) if arm.dispersion_axis == "y" else (window_b, window_a)
    result.qc.add("STITCH ORDER", order)
    result.qc.add("STITCH SCALE", scale)
    result.qc.add("STITCH WIN X", x)
    result.qc.add("STITCH WIN Y", y)
    results.append(result)
    return results
