"""The stare-mode reduction as one sequence of steps (what ``soxs_stare`` runs).

:func:`reduce_stare` combines the raw frames (clip_and_stack, or L.A.Cosmic on a single frame),
detrends them, divides by the master flat, removes the scattered light, models and subtracts
the sky (:mod:`.sky`), traces the object (:mod:`.objecttrace`), extracts it optimally and with a
boxcar (:mod:`.horne`), merges the orders and, for a flux standard, derives the response and
efficiency, and flux-calibrates (:mod:`soxs_core.spectrum`).  It returns a
:class:`StareResult`; the recipe writes it.

Noise model.  After detrending, a pixel's variance is ``read_var + k * (photon electrons)``:
``read_var`` holds the read noise and the calibrations' errors, ``k`` is 1 / (frames
averaged x flat value).  The extraction re-estimates the photon part from its models (sky,
background and object) instead of the noisy data, as Horne (1986) prescribes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.combine.masters import verify_frames
from soxs_core.combine.stacking import ClipSettings, clip_and_stack, default_threads
from soxs_core.detector.instruments import Arm, slit_keyword
from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle import background
from soxs_core.echelle.dispersion import DispersionMap
from soxs_core.echelle.flat import calibrate_frame_set
from soxs_core.echelle.masterflat import BACKGROUND_MASK_EXTEND, BACKGROUND_MASK_WIDEN
from soxs_core.echelle.ordertable import OrderTable, to_binned, to_unbinned
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.io.products import QcMeasurements

__all__ = ["StareParameters", "StareInputs", "StareResult", "verify_stare_inputs",
           "reduce_stare", "detrend_frames", "Detrended"]

log = logging.getLogger(__name__)

#: QUAL bits that keep a pixel out of the sky fit and the extraction
REJECT_BITS = int(Qual.STATIC_BAD | Qual.HOT | Qual.SATURATED | Qual.COSMIC | Qual.NO_DATA
                  | Qual.NON_FINITE | Qual.COLD)

#: L.A.Cosmic settings that are not recipe parameters (van Dokkum 2001's usual values)
LACOSMIC_SIGFRAC = 0.3
LACOSMIC_OBJLIM = 5.0
LACOSMIC_NITER = 2


@dataclass(frozen=True)
class StareParameters:
    """The recipe parameters the science uses (names as on the seed page)."""

    use_flat: bool = True
    subtract_background: bool = True
    use_lacosmic: bool = True
    lacosmic_sigma: float = 5.0
    stacked_clipping_sigma: float = 5.0
    stacked_clipping_iterations: int = 5
    horne_extraction_slit_length: int = 20
    horne_extraction_aperture_correction: bool = True
    horne_extraction_profile_poly_order: int = 7
    horne_extraction_profile_global_clipping_sigma: float = 25.0
    horne_extraction_profile_clipping_sigma: float = 3.0
    horne_extraction_profile_clipping_iteration_count: int = 10
    order_sample_count: int = 100
    slice_length: int = 30
    slice_width: int = 5
    peak_sigma_limit: float = 2.0
    order_deg: int = 6
    disp_axis_deg: int = 4
    poly_fitting_residual_clipping_sigma: float = 7.0
    poly_clipping_iteration_limit: int = 7
    subtract_sky: bool = True
    percentile_clipping_sigma: float = 3.0
    percentile_clipping_iterations: int = 5
    percentile_rolling_window_size: int = 35
    clip_slit_edge_fraction: float = 0.01
    aggressive_object_masking: bool = False
    bspline_order: int = 3
    slit_illumination_order: int = 1
    starting_points_per_knot: int = 100
    min_points_per_knot: int = 11
    bspline_fitting_residual_clipping_sigma: float = 20.0
    bspline_iteration_limit: int = 7
    residual_floor_percentile: float = 90.0
    bspline_deg: int = 2
    gaussian_blur_sigma: float = 65.0
    response_max_iteration: int = 5
    response_poly_order: int = 5

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> StareParameters:
        """From resolved recipe parameters keyed by their CLI alias (``order-deg``)."""
        names = {f.name for f in fields(cls)}
        values = {key.replace("-", "_"): value for key, value in params.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class StareInputs:
    """Frames and calibrations of one soxs_stare run.

    Attributes
    ----------
    kind : str
        Input stem of the raw frames: ``OBJECT``, ``STD_FLUX`` or ``STD_TELLURIC``.
    response : object, optional
        A :class:`soxs_core.spectrum.fluxcal.Response` (``RESP_TAB``) to flux-calibrate with.
    """

    arm: Arm
    kind: str
    frames: list[RawFrame]
    order_table: OrderTable
    disp_map: DispersionMap
    master_bias: DetectorImage | None = None
    master_dark: DetectorImage | None = None
    master_flat: DetectorImage | None = None
    response: Any = None
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def is_standard(self) -> bool:
        return self.kind == "STD_FLUX"


@dataclass
class Detrended:
    """A combined, detrended frame and what its noise is made of.

    Attributes
    ----------
    image : DetectorImage
        Electrons (flat-fielded when a flat was used), ERRS, QUAL.
    read_var : ndarray of float32
        Variance of each pixel that is not photon noise (read noise, calibration errors).
    poisson_scale : ndarray of float32
        ``k``: a pixel's photon variance is ``k`` times its (flat-fielded) signal.
    n_frames : int
    """

    image: DetectorImage
    read_var: np.ndarray
    poisson_scale: np.ndarray
    n_frames: int
    n_cosmics: int = 0


@dataclass
class StareResult:
    """What soxs_stare writes."""

    skysub: DetectorImage
    sky_model: DetectorImage
    #: the pixels the sky was fitted to (None: no sky subtracted)
    sky_used: np.ndarray | None
    object_trace: Any
    orders: Any  # astropy Table: extracted orders
    merged: Any  # astropy Table
    qc: QcMeasurements
    fluxcal: Any = None
    response: Any = None
    efficiency: Any = None
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def sky_residuals(self) -> DetectorImage:
        """SKY SUB RESIDUALS: made when it is written, not carried through the extraction."""
        from soxs_core.extraction.sky import sky_residuals

        if self.sky_used is None:
            zeros = np.zeros(self.skysub.shape, np.float32)
            return DetectorImage(zeros, zeros.copy(), self.skysub.qual.copy())
        return sky_residuals(self.skysub, self.sky_used)


def _slit(frame: RawFrame) -> str:
    return str(frame.header.get(slit_keyword(frame.arm), "")).strip()


def _header_value(header: Mapping, key: str) -> Any:
    value = header.get(key)
    return value[0] if isinstance(value, tuple) else value


def verify_stare_inputs(inputs: StareInputs) -> None:
    """Refuse, in one line naming the file, frames and calibrations that do not belong together.

    Raises
    ------
    InputError
        Frames of different exposure time, slit or setup; an NIR master dark of another
        exposure time; an order table without edges or whose orders are not on the frame; a
        dispersion map of another arm or without the table's orders; a response of another
        arm.
    """
    frames = inputs.frames
    arm = inputs.arm
    verify_frames(frames, frames[0].frame_type or inputs.kind, 1, same_exptime=True)
    slits = [_slit(f) for f in frames]
    for frame, slit in zip(frames, slits):
        if slit != slits[0]:
            raise InputError(f"{frame.path}: slit {slit or '(none)'} differs from "
                             f"{slits[0] or '(none)'} of {frames[0].path.name}")
    first = frames[0]
    if inputs.master_dark is not None and not arm.is_ccd:
        dark_exp = inputs.master_dark.header.get("EXPTIME")
        if dark_exp is not None and abs(float(dark_exp) - first.exptime) > 0.01:
            raise InputError(f"{inputs.paths.get('MASTER_DARK', 'master dark')}: master dark "
                             f"of {float(dark_exp):g} s, the frames are {first.exptime:g} s")
    table = inputs.order_table
    tpath = inputs.paths.get("ORDER_TAB", "order table")
    if not table.has_edges:
        raise InputError(f"{tpath}: order table has no order edges (use the ORDER_TAB "
                         "written by soxs_mflat)")
    n_along, n_across, bb, ba = table.image_axes(first.prepared_shape, first.binx, first.biny)
    on_frame = []
    for n in table.orders:
        b0, b1 = table.along_range(int(n))
        b = np.linspace(b0, b1, 9)
        lo = to_binned(table.edge_low(float(n), b), ba)
        up = to_binned(table.edge_up(float(n), b), ba)
        inside = (up > 0) & (lo < n_across - 1) & (to_binned(b, bb) >= 0) & (
            to_binned(b, bb) <= n_along - 1)
        if inside.any():
            on_frame.append(int(n))
            # an edge fit with more freedom in the order number than it had orders (soxspipe
            # 0.17.4's degree 6 on three orders) evaluates to nonsense: refused, not used
            width = up - lo
            usable = np.isfinite(width) & (width > 0) & (width < 0.5 * n_across)
            if not usable.all():
                k = int(np.argmin(usable))
                raise InputError(f"{tpath}: the edges of order {int(n)} are not usable "
                                 f"({lo[k]:.4g} to {up[k]:.4g} px across at {b[k]:.0f} px "
                                 "along, binned); is the edge fit sound?")
    if not on_frame:
        raise InputError(f"{tpath}: none of the order table's orders "
                         f"({table.orders.min()}-{table.orders.max()}) falls on the "
                         f"{first.prepared_shape[1]}x{first.prepared_shape[0]} px frame "
                         f"{first.path.name} (another arm or binning?)")
    dm = inputs.disp_map
    dpath = inputs.paths.get("DISP_IMAGE", "dispersion map")
    dm_arm = str(dm.header.get("ESO SEQ ARM", "")).strip().upper()
    if dm_arm and dm_arm != arm.name:
        raise InputError(f"{dpath}: dispersion map is for the {dm_arm} arm, the frames are "
                         f"{arm.instrument} {arm.name}")
    if dm.shape != first.prepared_shape:
        raise InputError(f"{dpath}: dispersion map is {dm.shape[1]}x{dm.shape[0]} px on this "
                         f"frame's grid, the frames are {first.prepared_shape[1]}x"
                         f"{first.prepared_shape[0]}")
    common = set(dm.orders.tolist()) & set(on_frame)
    if not common:
        raise InputError(f"{dpath}: the dispersion map has orders {dm.orders.min()}-"
                         f"{dm.orders.max()}, none of the order table's ({tpath})")
    if inputs.response is not None:
        r_arm = str(getattr(inputs.response, "arm", "") or "").strip().upper()
        rpath = inputs.paths.get("RESP_TAB", "response")
        if r_arm and r_arm != arm.name:
            raise InputError(f"{rpath}: response is for the {r_arm} arm, the frames are "
                             f"{arm.instrument} {arm.name}")
        r_inst = str(getattr(inputs.response, "instrument", "") or "").strip().upper()
        if r_inst and r_inst != arm.instrument:
            raise InputError(f"{rpath}: response is for {r_inst}, the frames are "
                             f"{arm.instrument}")


# ---------------------------------------------------------------------------------------------
# Detrending
# ---------------------------------------------------------------------------------------------
def detrend_frames(inputs: StareInputs, params: StareParameters,
                   threads: int | None = None) -> Detrended:
    """Combine and detrend the raw frames; flag cosmic rays; divide by the flat.

    Several frames are stacked with clip_and_stack (cosmic rays clipped); a single frame has
    its cosmic rays found by L.A.Cosmic (astroscrappy) when ``use_lacosmic`` is on.
    """
    frames = inputs.frames
    first = frames[0]
    dark = inputs.master_dark
    if dark is not None and inputs.arm.is_ccd:
        dark_exp = dark.header.get("EXPTIME")
        if dark_exp is None or abs(float(dark_exp) - first.exptime) > 0.01:
            log.info("%s: master dark of another exposure time: not subtracted",
                     first.path.name)
            dark = None
    calibrated = calibrate_frame_set(frames, inputs.master_bias, dark)
    shape = first.prepared_shape
    n = len(frames)
    if n == 1:
        data = np.empty(shape, np.float32)
        err = np.empty(shape, np.float32)
        qual = np.empty(shape, np.uint8)
        calibrated.reader(0)(0, shape[0], data, err, qual)
    else:
        clip = ClipSettings(sigma_lower=params.stacked_clipping_sigma,
                            sigma_upper=params.stacked_clipping_sigma,
                            max_iters=params.stacked_clipping_iterations, combine="mean")
        res = clip_and_stack([calibrated.reader(k) for k in range(n)], shape, clip,
                             threads=threads)
        data, err, qual = res.value, res.error, res.qual
    ron2 = float(np.mean([f.read_noise ** 2 for f in frames]))
    read_var = np.full(shape, ron2 / n, np.float32)
    cal = calibrated.calibration
    if cal.error is not None:
        read_var += cal.error.astype(np.float32) ** 2
        err = np.sqrt(err.astype(np.float32) ** 2 + cal.error.astype(np.float32) ** 2)
    if cal.qual is not None:
        qual = qual | cal.qual
    n_cosmics = 0
    if n == 1 and params.use_lacosmic:
        n_cosmics = _flag_cosmics(data, qual, float(np.sqrt(ron2)), params.lacosmic_sigma)
    k = np.full(shape, 1.0 / n, np.float32)
    image = DetectorImage(data=data.astype(np.float32, copy=False),
                          error=err.astype(np.float32, copy=False),
                          qual=qual.astype(np.uint8, copy=False), header=first.header.copy()
                          if hasattr(first.header, "copy") else first.header)
    flat = inputs.master_flat if params.use_flat else None
    if flat is not None:
        image, read_var, k = _divide_by_flat(image, read_var, k, flat)
    return Detrended(image=image, read_var=read_var, poisson_scale=k, n_frames=n,
                     n_cosmics=n_cosmics)


#: units of the extracted-orders table's columns (INSTRUMENTS.md 5.5)
EXTRACTED_UNITS = {"wavelengthMean": "nm", "pixelScaleNm": "nm / pix",
                   "varianceSpectrum": "electron2", "extractedFluxOptimal": "electron",
                   "extractedFluxBoxcar": "electron", "extractedFluxBoxcarRobust": "electron",
                   "skyFlux": "electron", "varianceBoxcar": "electron2"}


def _flag_cosmics(data: np.ndarray, qual: np.ndarray, read_noise: float, sigma: float,
                  threads: int | None = None) -> int:
    """Flag L.A.Cosmic detections in ``qual`` (in place); the data are left as measured."""
    mask = lacosmic_mask(np.asarray(data, np.float32), (qual & REJECT_BITS) != 0,
                         read_noise, sigma, threads)
    qual[mask] |= np.uint8(Qual.COSMIC)
    return int(mask.sum())


#: rows beyond each band that L.A.Cosmic sees, so that a band's own rows get the mask of the
#: whole frame: its filters reach a few pixels, and each iteration's cleaning a few more
LACOSMIC_BAND_PAD = 16 * (LACOSMIC_NITER + 1)

#: largest band (pixels) L.A.Cosmic is run on: a full X-shooter VIS frame in two bands took
#: 440 MB of working arrays at once, in four bands (two at a time) half that
LACOSMIC_BAND_PIXELS = 2_500_000


def lacosmic_mask(data: np.ndarray, inmask: np.ndarray, read_noise: float, sigma: float,
                  threads: int | None = None) -> np.ndarray:
    """L.A.Cosmic (astroscrappy) cosmic-ray mask of a frame, run on row bands.

    Bands of rows (each with :data:`LACOSMIC_BAND_PAD` rows of context) bound the working
    arrays' peak whatever the frame.  The speed is astroscrappy's own: its median filters
    run in OpenMP threads, and it holds the GIL elsewhere, so bands in threads hardly
    overlap (measured on 2026-12-06 on a full X-shooter VIS frame: 4.4-4.7 s in bands
    against 5.1 s in one call on two cores; 9.6 s against 9.2 s with one OpenMP thread).
    The bands' masks are those of one call on the whole frame (``tests/test_lacosmic.py``
    holds them equal).
    """
    import astroscrappy

    def detect(r0: int, r1: int) -> np.ndarray:
        a, b = max(0, r0 - LACOSMIC_BAND_PAD), min(rows, r1 + LACOSMIC_BAND_PAD)
        mask, _ = astroscrappy.detect_cosmics(
            np.ascontiguousarray(data[a:b]), inmask=np.ascontiguousarray(inmask[a:b]),
            sigclip=sigma, sigfrac=LACOSMIC_SIGFRAC, objlim=LACOSMIC_OBJLIM, gain=1.0,
            readnoise=read_noise, satlevel=np.inf, niter=LACOSMIC_NITER, sepmed=True,
            cleantype="meanmask")
        return mask[r0 - a:r1 - a]

    rows = data.shape[0]
    most = max(1, rows // (8 * LACOSMIC_BAND_PAD))     # bands not much thinner than context
    workers = max(1, min(default_threads(threads), most))
    # each band's working arrays (a dozen float32 planes of it) are live at once in every
    # worker: bands of at most LACOSMIC_BAND_PIXELS bound that peak whatever the frame
    per_worker = -(-data.size // (workers * LACOSMIC_BAND_PIXELS))
    n = max(1, min(workers * per_worker, most))
    edges = np.linspace(0, rows, n + 1).round().astype(int)
    if n == 1:
        return detect(0, rows)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(detect, edges[:-1], edges[1:])))


def _divide_by_flat(image: DetectorImage, read_var: np.ndarray, k: np.ndarray,
                    flat: DetectorImage) -> tuple[DetectorImage, np.ndarray, np.ndarray]:
    """Divide the detrended frame (its own arrays: they are changed in place, which keeps
    the recipe's peak memory a few full-frame planes lower) by the master flat."""
    f = np.array(flat.data, np.float32)
    # a faint flat (the blue end of a lamp) is still a measurement: its error propagates
    usable = np.isfinite(f) & (f > 0)
    f[~usable] = 1.0
    data = image.data
    data /= f
    # (data * flat error / f)^2: the flat's share of the variance, in both planes
    flat_var = np.divide(flat.error, f, dtype=np.float32)
    flat_var[~usable] = 0.0
    flat_var *= data
    flat_var **= 2
    err = image.error
    err /= f
    err **= 2
    err += flat_var
    np.sqrt(err, out=err)
    qual = image.qual
    qual |= flat.qual
    qual[~usable] |= np.uint8(Qual.NO_DATA)
    k /= f
    f **= 2
    read_var /= f
    read_var += flat_var
    return DetectorImage(data=data, error=err, qual=qual, header=image.header), read_var, k


# ---------------------------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------------------------
def _subtract_readout_pattern(image: DetectorImage, base_var: np.ndarray,
                              off_order: np.ndarray, arm, name: str) -> None:
    """Take the frame's readout pattern out, in place (:func:`background.fit_readout_pattern`):
    an offset per raw column, the same down the whole column, which after the frame's
    rotation is a prepared column (rotation by 0 or 180 degrees) or row."""
    along = "y" if arm.rotation % 2 else "x"
    pattern = background.fit_readout_pattern(image.data, image.qual, off_order, along)
    if pattern is None:
        return
    offset, error = (v.astype(np.float32) for v in pattern)
    shape = (1, -1) if along == "x" else (-1, 1)
    image.data -= offset.reshape(shape)
    base_var += (error**2).reshape(shape)
    np.hypot(image.error, error.reshape(shape), out=image.error)
    log.info("%s: readout pattern of %.3g e- rms taken out (one offset per %s)", name,
             float(np.sqrt(np.mean(offset**2))), "column" if along == "x" else "row")


def _add_model_variance(var: np.ndarray, poisson_scale: np.ndarray, light: np.ndarray,
                        error_rows: Callable[[int, int], np.ndarray],
                        band_rows: int = 256) -> None:
    """``var += poisson_scale * max(light, 0) + error^2`` in place, in row bands (no
    full-frame temporaries): the photon noise of a model's light, subtracted from the
    frame, and the model's own error (``error_rows(r0, r1)``, rows ``r0:r1``)."""
    for r0 in range(0, var.shape[0], band_rows):
        r1 = min(r0 + band_rows, var.shape[0])
        band = np.maximum(light[r0:r1], 0).astype(np.float32)
        band *= poisson_scale[r0:r1]
        band += np.square(error_rows(r0, r1), dtype=np.float32)
        var[r0:r1] += band


def _along(a: np.ndarray, axis: str) -> np.ndarray:
    return a if axis == "y" else a.T


#: iterations (at most) of the first sky model, which is subtracted only to trace the object
TRACE_SKY_ITERATIONS = 3

#: rows beside each of the trace's slices that the first sky model is fitted to as well
TRACE_SKY_MARGIN = 4

#: the object mask of the sky fit leaves at least this fraction of the slit to the sky
SKY_SLIT_FRACTION = 0.4

#: the object mask of the sky fit is this much wider than the aperture: the seeing wings
#: beyond the aperture would otherwise be fitted as sky (the slit illumination follows
#: them) and the sky under the object over-subtracted
SKY_MASK_WIDEN = 1.5


def _object_mask(shape, trace_table: OrderTable, binx: int, biny: int, half_width: float,
                 axis: str, order_table: OrderTable) -> np.ndarray:
    """Pixels within ``half_width`` binned px (across) of the object trace, at most
    (1 - :data:`SKY_SLIT_FRACTION`) / 2 of the order's width on each side (a wide aperture
    must not take the whole slit from the sky)."""
    from soxs_core.extraction.objecttrace import trace_centre_binned

    mask = np.zeros(shape, bool)
    view = _along(mask, axis)
    n_along, n_across = view.shape
    bin_along, bin_across = (biny, binx) if axis == "y" else (binx, biny)
    for n in trace_table.orders:
        b0, b1 = trace_table.along_range(int(n))
        r0 = max(int(np.ceil(to_binned(b0, bin_along))), 0)
        r1 = min(int(np.floor(to_binned(b1, bin_along))), n_along - 1)
        if r1 < r0:
            continue
        rows = np.arange(r0, r1 + 1)
        c = trace_centre_binned(trace_table, int(n), rows, binx, biny)
        hw = half_width
        if int(n) in order_table.orders:
            b = rows * bin_along + 0.5 * (bin_along - 1)
            width = np.median(order_table.edge_up(float(n), b)
                              - order_table.edge_low(float(n), b)) / bin_across
            hw = min(half_width, 0.5 * (1 - SKY_SLIT_FRACTION) * width)
        if np.isfinite(hw):
            view[_band_pixels(rows, c, hw, n_across)] = True
        else:  # NaN or inf (never seen): inf <= inf, which the candidate range would miss
            view[rows] |= np.abs(np.arange(n_across)[None, :] - c[:, None]) <= hw
    return mask


def _band_pixels(rows: np.ndarray, centre: np.ndarray, half_width: float, n_across: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The pixels ``(rows[i], j)``, ``0 <= j < n_across``, with
    ``abs(j - centre[i]) <= half_width``.

    Only a few pixels either side of each row's band are tested: testing every pixel of
    every row made the object mask a full-frame comparison per order.

    Parameters
    ----------
    rows : ndarray of int
        Along indices.
    centre : ndarray of float
        Band centre (across px) at each of ``rows``; a row with a non-finite centre has no
        pixel.
    half_width : float
        Finite.
    n_across : int
        Pixels across the frame.

    Returns
    -------
    along, across : ndarray of int
        Indices of the band's pixels in the along view.
    """
    rows = np.asarray(rows, np.int64)
    centre = np.asarray(centre, float)
    finite = np.isfinite(centre)
    rows, centre = rows[finite], centre[finite]
    # candidates 2 px beyond the band's rounded ends: the test below on each candidate,
    # exactly the full-row test, decides, so the rounding of these ends cannot lose a pixel
    first = np.clip(np.floor(centre - half_width) - 2, 0, n_across).astype(np.int64)
    last = np.clip(np.ceil(centre + half_width) + 2, -1, n_across - 1).astype(np.int64)
    count = np.maximum(last - first + 1, 0)
    along = np.repeat(rows, count)
    # a row's k-th candidate is pixel first + k: k is the flat index less the row's start
    across = np.arange(along.size) + np.repeat(first - (np.cumsum(count) - count), count)
    hit = np.abs(across - np.repeat(centre, count)) <= half_width
    return along[hit], across[hit]


def _wavelength_at(wave_t: np.ndarray, rows: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Wavelength at fractional across positions ``centre`` of ``rows`` (along view),
    linearly interpolated, from the nearest finite neighbours."""
    n_across = wave_t.shape[1]
    c = np.clip(centre, 0, n_across - 1.000001)
    j = np.floor(c).astype(int)
    t = c - j
    w0 = wave_t[rows, j].astype(float)
    w1 = wave_t[rows, np.minimum(j + 1, n_across - 1)].astype(float)
    out = w0 * (1 - t) + w1 * t
    out = np.where(np.isfinite(out), out, np.where(np.isfinite(w0), w0, w1))
    return out


def reduce_stare(inputs: StareInputs, params: StareParameters,
                 plots: Mapping[str, Path] | None = None) -> StareResult:
    """Run the stare reduction (see the module docstring).

    Parameters
    ----------
    inputs : StareInputs
        Verified with :func:`verify_stare_inputs`.
    params : StareParameters
    plots : mapping, optional
        QC plot label (as declared by the recipe) -> path to write it to.

    Returns
    -------
    StareResult
    """
    from astropy.table import Table, vstack

    from soxs_core.extraction import horne, objecttrace, sky
    from soxs_core.spectrum import fluxcal, merge
    from soxs_core.spectrum import plots as spectrum_plots

    plots = dict(plots or {})
    written: dict[str, Path] = {}
    arm = inputs.arm
    axis = arm.dispersion_axis
    first = inputs.frames[0]
    binx, biny = first.binx, first.biny
    bin_across = binx if axis == "y" else biny
    table = inputs.order_table
    dm = inputs.disp_map
    qc = QcMeasurements()
    notes: list[str] = []

    det = detrend_frames(inputs, params)
    # the master calibrations are in the frame now: their planes (about 160 MB for an
    # X-shooter VIS frame) are not kept to the end of the run
    inputs.master_bias = inputs.master_dark = inputs.master_flat = None
    image = det.image
    det.image = None
    shape = image.shape
    # the variance of every pixel but the object's own photon noise (read noise and the
    # calibrations' errors so far), to which each subtracted model adds its light's photon
    # noise and its own error: one plane, no separate model and error planes to the end
    base_var = det.read_var
    det.read_var = None
    in_order = table.in_order_mask(shape, binx, biny)

    if params.subtract_background:
        mask = table.in_order_mask(shape, binx, biny, widen=BACKGROUND_MASK_WIDEN,
                                   extend=BACKGROUND_MASK_EXTEND)
        bkg = background.fit_background(image.data, image.qual, mask, axis,
                                        params.bspline_deg, params.gaussian_blur_sigma,
                                        errors=image.error, binning=(binx, biny))
        if "BKGROUND" in plots:
            written["BKGROUND"] = background.plot_background(
                plots["BKGROUND"], image.data, bkg, mask,
                f"{arm.instrument} {arm.name}: scattered light of {first.path.name}")
        image = background.subtract_background(image, bkg, overwrite=True)
        _add_model_variance(base_var, det.poisson_scale, bkg.model, bkg.uncertainty_rows)
        del bkg
        _subtract_readout_pattern(image, base_var, ~mask, arm, first.path.name)
        del mask

    orders_on_map = [int(n) for n in table.orders if n in set(dm.orders.tolist())]
    sky_params = sky.SkyParameters.from_mapping(params.as_dict())
    trace_params = objecttrace.TraceParameters.from_mapping(params.as_dict())
    half_aperture = 0.5 * params.horne_extraction_slit_length / bin_across

    def fit_the_sky(frame, object_mask, params=sky_params, share_illumination=True):
        model = sky.fit_sky(frame.data, frame.error, frame.qual, dm.wavelength, dm.slit,
                            dm.order, orders_on_map, object_mask=object_mask,
                            params=params, dispersion_axis=axis,
                            poisson_scale=det.poisson_scale,
                            share_illumination=share_illumination)
        missing = sorted(set(orders_on_map) - set(model.fits))
        if missing:
            msg = (f"{first.path.name}: no sky model in order(s) "
                   f"{', '.join(map(str, missing))} (too few sky pixels): not sky-subtracted")
            log.warning(msg)
            notes.append(msg)
        return model

    sky_model = None
    if params.subtract_sky:
        # the first pass serves the object's trace only: a sky fitted to the pixels of the
        # trace's slices (and a few rows beside them), with fewer refinements of its knots
        # (the last ones follow faint line wings), is as good for that at a third the cost
        beside = objecttrace.slice_pixels(dm.order, table, binx, biny, trace_params,
                                          TRACE_SKY_MARGIN)
        sky_model = fit_the_sky(image, ~beside, dataclasses.replace(
            sky_params, bspline_iteration_limit=min(sky_params.bspline_iteration_limit,
                                                    TRACE_SKY_ITERATIONS)),
            share_illumination=False)
        del beside
        skysub = sky.subtract_sky(image, sky_model)
    else:
        skysub = image
    trace = objecttrace.detect_continuum(skysub, table, binx, biny, trace_params)
    qc.update(trace.qc)
    other = "Y" if axis == "y" else "X"
    for stat in ("MAX", "MIN", "SD"):
        qc.omit(f"{other} RES {stat}", f"the orders of {arm.instrument} {arm.name} run along "
                f"{axis}: the trace residuals are {'X' if other == 'Y' else 'Y'} RES")
    if params.subtract_sky:
        # again, with the object (now traced) kept out of the sky
        obj_mask = _object_mask(shape, trace.table, binx, biny, SKY_MASK_WIDEN * half_aperture,
                                axis, table)
        # the first pass served the trace only: its planes go before the second is made
        del sky_model, skysub
        sky_model = fit_the_sky(image, obj_mask)
        del obj_mask
        skysub = sky.subtract_sky(image, sky_model)
        _add_model_variance(base_var, det.poisson_scale, sky_model.sky,
                            lambda r0, r1: sky_model.error[r0:r1])
        for label, func in (("SKY MODEL QC PLOTS", sky.plot_sky_model),
                            ("SKY SUBTRACTION QUICKLOOK", sky.plot_sky_quicklook)):
            if label in plots and sky_model.fits:
                written[label] = func(plots[label], image, sky_model, dm)
        sky_image = DetectorImage(data=np.asarray(sky_model.sky, np.float32),
                                  error=np.asarray(sky_model.error, np.float32),
                                  qual=image.qual.copy())
        sky_used = sky_model.used
        del sky_model
    else:
        sky_used = None
        sky_image = DetectorImage(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                                  image.qual.copy())

    # drawn on the final sky-subtracted frame (the first pass's sky is fitted to the slices)
    if "OBJECT TRACE RES" in plots:
        written["OBJECT TRACE RES"] = objecttrace.plot_object_trace(
            plots["OBJECT TRACE RES"], skysub, trace)

    # ---- extraction: the frame before the sky and the models' planes are done with
    del image
    data_t = _along(skysub.data, axis)
    var_t = _along(base_var, axis)
    k_t = _along(det.poisson_scale, axis)
    qual_t = _along((skysub.qual & REJECT_BITS).astype(np.uint8), axis)
    sky_t = _along(sky_image.data, axis)
    sky_err_t = _along(sky_image.error, axis)
    wave_t = _along(dm.wavelength, axis)
    n_along = data_t.shape[0]
    bin_along = biny if axis == "y" else binx
    across_col, along_col = (("xcoord_centre", "ycoord") if axis == "y"
                             else ("ycoord_centre", "xcoord"))
    pieces = []
    # the aperture correction's variance (with the object's photon noise), made once
    apcor_var_t = (_along(base_var + det.poisson_scale * np.maximum(skysub.data, 0), axis)
                   if params.horne_extraction_aperture_correction and table.has_edges
                   else None)
    def extract(n: int) -> tuple[int, horne.OrderExtraction, tuple | None] | None:
        b0, b1 = trace.table.along_range(n)
        r0 = max(int(np.ceil(to_binned(b0, bin_along))), 0)
        r1 = min(int(np.floor(to_binned(b1, bin_along))), n_along - 1)
        if r1 - r0 < 10:
            return None
        rows = np.arange(r0, r1 + 1)
        centre = objecttrace.trace_centre_binned(trace.table, n, rows, binx, biny)
        ext = horne.extract_order(
            data_t, var_t, k_t, qual_t, sky_t, centre, rows,
            params.horne_extraction_slit_length / bin_across,
            profile_poly_order=params.horne_extraction_profile_poly_order,
            profile_clipping_sigma=params.horne_extraction_profile_clipping_sigma,
            profile_clipping_iteration_count=params.
            horne_extraction_profile_clipping_iteration_count, threads=1,
            sky_error_t=sky_err_t)
        correction = None
        if apcor_var_t is not None and n in table.orders:
            b = to_unbinned(ext.rows, bin_along)
            correction = horne.profile_aperture_correction(
                data_t, apcor_var_t, qual_t, ext.centre, ext.rows,
                params.horne_extraction_slit_length / bin_across,
                to_binned(table.edge_low(float(n), b), bin_across),
                to_binned(table.edge_up(float(n), b), bin_across))
        return n, ext, correction

    # orders in threads, each kernel on one: the profile fits are numpy on a few hundred
    # thousand pixels, which releases the GIL for most of their time (2.5 s -> 1.6 s for
    # X-shooter VIS on two cores); the results are those of the loop, in its order
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(default_threads()) as pool:
        done = [r for r in pool.map(extract, [int(n) for n in trace.table.orders]) if r]
    extractions = [(n, ext) for n, ext, _ in done]
    apcor = {n: c for n, _, c in done if c is not None}
    corrections = _smooth_corrections(apcor, [n for n, _ in extractions])
    for n, ext in extractions:
        c = corrections.get(n, 1.0)
        qc.add(f"APCOR O{n}", c)
        wave = _wavelength_at(wave_t, ext.rows, ext.centre)
        scale = np.abs(np.gradient(wave)) if wave.size > 1 else np.zeros_like(wave)
        row_qual = np.asarray(ext.qual, np.uint8).copy()
        row_qual[~np.isfinite(wave)] |= np.uint8(Qual.NO_DATA)
        var = np.asarray(ext.var_optimal, float) * c**2
        flux = np.asarray(ext.flux_optimal, float) * c
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.where(var > 0, flux / np.sqrt(var), 0.0)
        pieces.append(Table({
            "order": np.full(ext.rows.size, int(n), np.int16),
            across_col: np.asarray(ext.centre, float),
            along_col: np.asarray(ext.rows, np.int32),
            "wavelengthMean": wave,
            "pixelScaleNm": scale,
            "varianceSpectrum": var,
            "snr": snr,
            "extractedFluxOptimal": flux,
            "extractedFluxBoxcar": np.asarray(ext.flux_boxcar, float) * c,
            "extractedFluxBoxcarRobust": np.asarray(ext.flux_boxcar_robust, float) * c,
            "skyFlux": np.asarray(ext.sky, float),
            "varianceBoxcar": np.asarray(ext.var_boxcar, float) * c**2,
            "nRejected": np.asarray(ext.n_rejected, np.int16),
            "qual": row_qual,
        }, units=EXTRACTED_UNITS | {across_col: "pix", along_col: "pix"}))
    qc.add("APCOR MEDIAN", float(np.median([corrections.get(n, 1.0) for n, _ in extractions]))
           if extractions else None, "no order extracted")
    if not pieces:
        raise InputError(f"{first.path}: no order could be extracted")
    orders = vstack(pieces)
    exptime = float(first.exptime)
    airmass = _airmass(first.header)
    orders.meta.update(EXPTIME=exptime, AIRMASS=airmass, ARM=arm.name,
                       INSTRUME=arm.instrument,
                       OBJECT=str(_header_value(first.header, "OBJECT") or ""))
    merged = merge.merge_orders(orders, arm.name)

    # ---- QC of the frame
    good_in = in_order & ((skysub.qual & REJECT_BITS) == 0)
    qc.add("BADPIX NUM", int(np.count_nonzero(in_order & ~good_in)))
    qc.add("BADPIX FRAC", float(np.count_nonzero(in_order & ~good_in)) /
           max(int(np.count_nonzero(in_order)), 1))
    qc.add("INNER ORDER PIX MEAN", float(np.mean(skysub.data[good_in])) if good_in.any()
           else None, "no good in-order pixel")
    qc.add("INNER ORDER PIX SUM", float(np.sum(skysub.data[good_in], dtype=np.float64)))

    response = efficiency = fluxcal_table = standard = None
    target = str(_header_value(first.header, "ESO OBS TARG NAME")
                 or _header_value(first.header, "OBJECT") or "")
    if inputs.is_standard:
        try:
            standard = fluxcal.find_standard(target)
        except InputError as exc:
            msg = f"{first.path.name}: {exc}; extracted, no response"
            log.warning(msg)
            notes.append(msg)
            standard = None
        if standard is not None:
            response = fluxcal.fit_response(orders, standard, exptime, airmass,
                                            params.response_poly_order,
                                            params.response_max_iteration)
            response.arm = arm.name
            response.instrument = arm.instrument
            efficiency = fluxcal.efficiency(orders, standard, exptime, airmass,
                                            fluxcal.telescope_area_cm2(arm.instrument))
            fluxcal_table = fluxcal.flux_calibrate(orders, response, exptime, airmass)
            if "RESPONSE QC PLOT" in plots:
                written["RESPONSE QC PLOT"] = spectrum_plots.plot_response(
                    plots["RESPONSE QC PLOT"], response, efficiency)
    elif inputs.response is not None:
        fluxcal_table = fluxcal.flux_calibrate(orders, inputs.response, exptime, airmass)
    qc.update(fluxcal.spectrum_qc(orders, merged, efficiency))
    if efficiency is None:
        for name in ("EFF MEDIAN",):
            qc.omit(name, "not a flux standard with a catalogue spectrum")
    title = f"{arm.instrument} {arm.name}: {target or first.path.name}"
    for label, func, tab in (("EXTRACTED ORDERS QC PLOT", spectrum_plots.plot_extracted_orders,
                              orders),
                             ("EXTRACTED MERGED QC PLOT", spectrum_plots.plot_merged, merged)):
        if label in plots:
            written[label] = func(plots[label], tab, title)
    label = "EXTRACTED MERGED FLUXCALIBRATED QC PLOT"
    if label in plots and fluxcal_table is not None:
        written[label] = spectrum_plots.plot_fluxcal(
            plots[label], fluxcal_table, title,
            standard=standard if inputs.is_standard else None)
    return StareResult(skysub=skysub, sky_model=sky_image, sky_used=sky_used,
                       object_trace=trace, orders=orders, merged=merged, qc=qc,
                       fluxcal=fluxcal_table, response=response, efficiency=efficiency,
                       plots=written, notes=notes)


#: bounds of an aperture correction (whole-slit / aperture light): below 1 is noise, above
#: the upper bound the aperture misses the object rather than its wings
APCOR_RANGE = (1.0, 1.3)

#: floor of a correction's error in the smoothing across orders (the wings' light beyond
#: the slit-edge margin and the sky model's share of them are not in the statistical error)
APCOR_ERROR_FLOOR = 0.002


def _smooth_corrections(measured: Mapping[int, tuple[float, float]], orders: Sequence[int]
                        ) -> dict[int, float]:
    """Aperture corrections of ``orders`` from the per-order measurements (value, error):
    a weighted polynomial in order number (degree up to 2; seeing changes slowly with
    wavelength), which carries a faint target's noisy orders on its brighter ones."""
    ns = np.array([n for n in measured], float)
    if ns.size == 0:
        return {int(n): 1.0 for n in orders}
    c = np.array([measured[int(n)][0] for n in ns])
    e = np.maximum(np.array([measured[int(n)][1] for n in ns]), APCOR_ERROR_FLOOR)
    deg = min(2, ns.size - 1)
    if deg > 0:
        x = (ns - ns.mean()) / max(float(np.ptp(ns)), 1.0)
        coef = np.polyfit(x, c, deg, w=1.0 / e)
        fitted = {int(n): float(np.polyval(coef, (n - ns.mean()) / max(float(np.ptp(ns)),
                                                                         1.0)))
                  for n in orders}
    else:
        fitted = {int(n): float(c[0]) for n in orders}
    return {n: float(np.clip(v, *APCOR_RANGE)) for n, v in fitted.items()}


def _airmass(header: Mapping) -> float:
    start = _header_value(header, "ESO TEL AIRM START")
    end = _header_value(header, "ESO TEL AIRM END")
    values = [float(v) for v in (start, end) if v is not None]
    return float(np.mean(values)) if values else 1.0
