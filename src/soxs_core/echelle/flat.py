"""Master-flat science: detrending, two-stage exposure normalisation, stacking, finishing,
low-sensitivity pixels, UVB D2/QTH stitching and the QC values of ``soxs_mflat``.

The raw lamp flats are never held in memory together.  Every pass prepares them in row bands
(:meth:`RawFrame.prepare_into`) and subtracts the calibration (master bias, master dark or the
stack of NIR lamp-off frames) on the way:

1. :func:`normalise_flats` reads every frame once and keeps only the pixels of the centre
   band (``centre_order_window`` unbinned px around each order centre, about a sixth of an
   X-shooter frame).  Each frame's first level is the clipped mean of its good band pixels;
   the first-pass master is the ``clip_and_stack`` of the band pixels divided by those levels
   (the first-pass master is used only inside the band, so only the band is stacked); each
   frame's final level is the clipped mean over the band of frame / first-pass master, times
   the first level.  Dividing by the first-pass master takes the blaze, the lamp spectrum and
   the slit illumination out, so the second level no longer depends on which pixels of a
   frame happen to be masked (saturated, cosmic, non-finite).
2. :func:`stack_master_flat` prepares the frames a second time and stacks frame / final
   level with the ``stacked_clipping_*`` parameters.  The calibration's own error is common
   to every frame, so it is added after the stack (scaled by the mean of 1 / level), not
   averaged down with the frames' independent noise.
3. :func:`finish_master_flat` (after the order edges are known and, optionally, the
   scattered light subtracted) renormalises to a mean inner-order level of 1, flags
   low-sensitivity pixels (:func:`mask_low_sens_pixels`) and sets the inter-order pixels to
   FLUX 1, ERRS 0.

UVB: :func:`find_uvb_overlap_order_and_scale` and :func:`stitch_uv_mflats` join the D2 and
QTH masters; :func:`flat_qc` gathers seed table 60's values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from soxs_core.calib import load_bad_pixel_map
from soxs_core.combine.stacking import (
    MAD_TO_STD,
    BandReader,
    ClipSettings,
    band_rows_for,
    clip_and_stack,
    clip_and_stack_arrays,
    default_threads,
)
from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle.ordertable import OrderTable, to_binned, to_unbinned
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.io.products import QcMeasurements

__all__ = [
    "Calibration",
    "CalibratedFlats",
    "FlatNormalisation",
    "FinishedFlat",
    "flat_clip_settings",
    "calibrate_frame_set",
    "stack_lamp_off",
    "normalise_flats",
    "stack_master_flat",
    "clipped_mean",
    "centre_band_pixels",
    "local_level",
    "low_sensitivity_mask",
    "mask_low_sens_pixels",
    "finish_master_flat",
    "find_uvb_overlap_order_and_scale",
    "crossover_order",
    "stitch_uv_mflats",
    "flat_qc",
    "LEVEL_CLIP_SIGMA",
    "LEVEL_CLIP_ITERATIONS",
    "LOW_SENS_UNIT",
    "LOW_SENS_NEIGHBOURS",
    "LOW_SENS_NOISE_GUARD",
    "STITCH_OFFSET",
]

log = logging.getLogger(__name__)

#: Clip of the exposure levels (centre median, scale 1.4826 MAD), the values soxspipe 0.17.4
#: hard-codes (DEFAULT_PARAMETERS.md §7): loose enough that the blaze's spread of raw band
#: pixels is never cut, tight enough to drop cosmic rays missed by the masks.
LEVEL_CLIP_SIGMA = 25.0
LEVEL_CLIP_ITERATIONS = 3
#: The clip bounds are found on at most this many values per frame (every k-th band pixel);
#: the mean is then taken over every band pixel inside them.  At 25 sigma, the bounds of a
#: 50 000-value sample are within a percent of those of the whole band.
LEVEL_SAMPLE = 50_000

#: Unit of ``low_sensitivity_clipping_sigma``: a fraction of the pixel's local flat level.
#: Neither spread the seed's wording suggests works as the unit.  The spread (MAD) of a
#: master flat's flux within an order is dominated by the blaze and the lamp spectrum (0.2 to
#: 1.1 of the median in the simulated X-shooter and SOXS orders), so the cut would follow
#: each order's blaze; the spread of the pixel response itself (PRNU, about 1 %) makes a
#: 2-sigma cut flag 2.3 % of normal pixels.  A fixed quarter of the local level is a chosen
#: unit, so that the default of 2 flags pixels with less than half their neighbours'
#: response (flat-fielding would more than double their noise): far outside any normal
#: pixel, while every pixel of response <= 0.4 is caught.
LOW_SENS_UNIT = 0.25
#: Neighbours on each side along the dispersion axis whose median is a pixel's local level.
LOW_SENS_NEIGHBOURS = 8
#: A pixel is flagged only if its deficit is also this many sigmas of the noise expected at
#: its local level, so noise alone never flags one (one-sided Gaussian tail 3e-7) where the
#: lamp gives too little light to tell.
LOW_SENS_NOISE_GUARD = 5.0
#: Unbinned pixels between the crossover order's edge and the stitching line (seed page).
STITCH_OFFSET = 5.0

#: QUAL bits that mean "no usable measured value".
_NO_VALUE = np.uint8(Qual.NO_DATA | Qual.NON_FINITE)
#: Rows of one frame prepared at once in the band-gathering pass (and of other row loops).
_GATHER_ROWS = 256
#: Low-sensitivity candidates tested at once.
_CANDIDATE_CHUNK = 1 << 16


def flat_clip_settings(stacked_clipping_sigma: float, stacked_clipping_iterations: int
                       ) -> ClipSettings:
    """The across-stack clip of the flats: median centre, MAD scale, mean of the survivors."""
    return ClipSettings(sigma_lower=float(stacked_clipping_sigma),
                        sigma_upper=float(stacked_clipping_sigma),
                        max_iters=int(stacked_clipping_iterations), scale="mad_std",
                        combine="mean")


# ---------------------------------------------------------------------------------------------
# Detrending
# ---------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """What is subtracted from every raw flat.

    Attributes
    ----------
    level : ndarray of float32 or None
        Electrons subtracted from every prepared frame (master bias, + master dark, or the
        lamp-off stack).
    error : ndarray of float32 or None
        1-sigma error of ``level``: common to all flats, added once after the stack.
    qual : ndarray of uint8 or None
        QUAL bits of the calibration frames, OR-ed into the master.
    poisson_base : ndarray of float32 or None
        Level above which the raw electrons are photon (Poisson) counts: the bias for a CCD,
        the lamp-off or dark level for NIR.
    description : str
        For the log, e.g. ``"master bias"``.
    """

    level: np.ndarray | None
    error: np.ndarray | None
    qual: np.ndarray | None
    poisson_base: np.ndarray | None
    description: str = ""


@dataclass
class CalibratedFlats:
    """Raw lamp flats with their calibration, delivered as band readers.

    Attributes
    ----------
    frames : list of RawFrame
    calibration : Calibration
    static_bits : ndarray of uint8
        STATIC_BAD bits of the arm's bad-pixel map (prepared orientation).
    """

    frames: list[RawFrame]
    calibration: Calibration
    static_bits: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.frames[0].prepared_shape

    @property
    def binx(self) -> int:
        return self.frames[0].binx

    @property
    def biny(self) -> int:
        return self.frames[0].biny

    def reader(self, k: int, scale: float = 1.0) -> BandReader:
        """Band reader of flat ``k``: prepared, calibrated and multiplied by ``scale``.

        Fills electrons (minus the calibration level), their 1-sigma errors (read noise and
        the Poisson noise above the calibration's Poisson base; not the calibration's own
        error) and QUAL (static bad pixels, saturation, non-finite values).
        """
        frame, cal = self.frames[k], self.calibration
        factor = np.float32(scale)

        def fill(start: int, stop: int, data, errors, qual) -> None:
            base = None if cal.poisson_base is None else cal.poisson_base[start:stop]
            frame.prepare_into(start, stop, data, errors, qual, self.static_bits[start:stop],
                               frame.read_noise, base, threads=1)
            if cal.level is not None:
                np.subtract(data, cal.level[start:stop], out=data)
            if factor != 1:
                data *= factor
                errors *= factor
        return fill


def _check_shape(image: DetectorImage, name: str, frame: RawFrame) -> None:
    if image.shape != frame.prepared_shape:
        raise InputError(f"{name} is {image.shape[1]}x{image.shape[0]} px, the flats "
                         f"({frame.path.name} ...) are {frame.prepared_shape[1]}x"
                         f"{frame.prepared_shape[0]}")


def stack_lamp_off(frames: Sequence[RawFrame], clip: ClipSettings,
                   threads: int | None = None) -> DetectorImage:
    """Stack NIR lamp-off frames into the level every lamp-on flat is corrected by.

    Their errors are the read noise plus the Poisson noise of the dark current above each
    frame's own median level (the pedestal is not photon noise), like mdark without a bias.

    Parameters
    ----------
    frames : sequence of RawFrame
        Lamp-off frames of the flats' setup and exposure time.
    clip : ClipSettings
    threads : int, optional

    Returns
    -------
    DetectorImage
        FLUX = stacked electrons, ERRS its error, QUAL as ``clip_and_stack`` gives it.
    """
    first = frames[0]
    bits = (load_bad_pixel_map(first.arm, first.binning) * np.uint8(Qual.STATIC_BAD)
            ).astype(np.uint8)
    from soxs_core.combine.screening import screen_frames

    levels = [s.level for s in screen_frames(frames)]

    def make(k: int, frame: RawFrame) -> BandReader:
        base = float(levels[k]) if np.isfinite(levels[k]) else None

        def fill(start, stop, data, errors, qual) -> None:
            frame.prepare_into(start, stop, data, errors, qual, bits[start:stop],
                               frame.read_noise, base, threads=1)
        return fill

    res = clip_and_stack([make(k, f) for k, f in enumerate(frames)], first.prepared_shape,
                         clip, band_rows=band_rows_for(len(frames), first.prepared_shape[1],
                                                       32 << 20), threads=threads)
    return DetectorImage(data=res.value, error=res.error, qual=res.qual)


def calibrate_frame_set(flats: Sequence[RawFrame], master_bias: DetectorImage | None = None,
                        master_dark: DetectorImage | None = None,
                        lamp_off: Sequence[RawFrame] | DetectorImage | None = None,
                        clip: ClipSettings | None = None, threads: int | None = None
                        ) -> CalibratedFlats:
    """Attach the detrending to a set of raw lamp flats (the seed's ``calibrate_frame_set``).

    UVB/VIS: flat - master bias (- master dark of the flats' exposure time, when given; our
    mdark with a bias is bias-subtracted).  NIR: lamp-on - stack of lamp-off frames, or
    flat - master dark of the same exposure time (an NIR master dark keeps its pedestal).
    Nothing is read here but the lamp-off frames (stacked once); the flats are prepared band
    by band by the readers of the result.

    Parameters
    ----------
    flats : sequence of RawFrame
        Verified raw lamp flats of one lamp.
    master_bias, master_dark : DetectorImage, optional
    lamp_off : sequence of RawFrame or DetectorImage, optional
        NIR lamp-off frames (stacked here with ``clip``) or their stack.  When given, a
        master dark is not used (the lamp-off frames already hold the dark current).
    clip : ClipSettings, optional
        For the lamp-off stack (default: :class:`ClipSettings`).
    threads : int, optional

    Returns
    -------
    CalibratedFlats

    Raises
    ------
    InputError
        No calibration at all, or a calibration image of another shape than the flats.
    """
    flats = list(flats)
    first = flats[0]
    bits = (load_bad_pixel_map(first.arm, first.binning) * np.uint8(Qual.STATIC_BAD)
            ).astype(np.uint8)
    if lamp_off is not None and not isinstance(lamp_off, DetectorImage):
        lamp_off = list(lamp_off) or None
        if lamp_off is not None:
            for frame in lamp_off:
                if frame.prepared_shape != first.prepared_shape:
                    raise InputError(f"{frame.path}: lamp-off frame of another shape than the "
                                     f"flats ({first.path.name} ...)")
            lamp_off = stack_lamp_off(lamp_off, clip or ClipSettings(), threads)
    if lamp_off is not None:
        _check_shape(lamp_off, "the lamp-off stack", first)
        if master_dark is not None:
            log.info("%s ...: lamp-off frames given, the master dark is not used",
                     first.path.name)
        cal = Calibration(level=lamp_off.data, error=lamp_off.error, qual=lamp_off.qual,
                          poisson_base=lamp_off.data, description="lamp-off stack")
        return CalibratedFlats(flats, cal, bits)
    parts = [(name, image) for name, image in (("master bias", master_bias),
                                               ("master dark", master_dark))
             if image is not None]
    if not parts:
        raise InputError(f"{first.path}: no master bias, master dark or lamp-off frames to "
                         "calibrate the flats with")
    for name, image in parts:
        _check_shape(image, name, first)
    if len(parts) == 1:
        image = parts[0][1]
        level, error, qual = image.data, image.error, image.qual
    else:
        level = master_bias.data + master_dark.data
        error = np.hypot(master_bias.error, master_dark.error)
        qual = master_bias.qual | master_dark.qual
    # a CCD's photons are counted above the bias (dark electrons are photon-like but few);
    # an NIR dark keeps the pedestal, above which the lamp's electrons are counted
    base = master_bias.data if master_bias is not None else master_dark.data
    cal = Calibration(level=np.asarray(level, np.float32), error=np.asarray(error, np.float32),
                      qual=np.asarray(qual, np.uint8), poisson_base=base,
                      description=" + ".join(name for name, _ in parts))
    return CalibratedFlats(flats, cal, bits)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------
def clipped_mean(values: np.ndarray, sigma: float = LEVEL_CLIP_SIGMA,
                 iterations: int = LEVEL_CLIP_ITERATIONS, sample: int = LEVEL_SAMPLE) -> float:
    """Mean of the values inside an iterated median +- ``sigma`` x MAD-std clip.

    The clip bounds come from an evenly strided subsample of at most ``sample`` values (the
    bounds need no more precision than that); the mean is over every value inside them.

    Parameters
    ----------
    values : ndarray
        Finite values.
    sigma : float
    iterations : int
    sample : int

    Returns
    -------
    float
        NaN when there are no values.
    """
    v = np.asarray(values, np.float32).ravel()
    if v.size == 0:
        return float("nan")
    keep = np.ones(v.size, bool)
    lo, hi = -np.inf, np.inf
    for _ in range(max(0, int(iterations))):
        inside = v[keep]
        step = max(1, inside.size // max(1, int(sample)))
        s = inside[::step].astype(np.float64)
        if s.size == 0:
            return float("nan")
        centre = float(np.median(s))
        scale = MAD_TO_STD * float(np.median(np.abs(s - centre)))
        if not scale > 0:
            break
        new_lo, new_hi = centre - sigma * scale, centre + sigma * scale
        if new_lo == lo and new_hi == hi:
            break
        lo, hi = new_lo, new_hi
        new_keep = (v >= lo) & (v <= hi)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    inside = v[keep]
    return float(np.mean(inside, dtype=np.float64)) if inside.size else float("nan")


def centre_band_pixels(order_table: OrderTable, shape: tuple[int, int], binx: int, biny: int,
                       centre_order_window: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (row-major, ascending) and order numbers of the centre-band pixels.

    The band is ``centre_order_window`` *unbinned* pixels wide, half on each side of every
    order centre (so it covers the same part of the slit whatever the binning), within each
    order's valid along-order range: the pixels of ``order_table.centre_band_mask``, built
    here run by run instead of as one full-frame mask per order.
    """
    n_along, n_across, bb, ba = order_table.image_axes(shape, binx, biny)
    half = 0.5 * float(centre_order_window)
    along_parts, across_parts, order_parts = [], [], []
    for n in order_table.orders:
        b0, b1 = order_table.along_range(int(n))
        ib = np.arange(max(int(np.ceil(to_binned(b0, bb))), 0),
                       min(int(np.floor(to_binned(b1, bb))), n_along - 1) + 1)
        if not ib.size:
            continue
        c = order_table.centre(float(n), to_unbinned(ib, bb))
        first = np.clip(np.ceil(to_binned(c - half, ba)).astype(np.int64), 0, n_across)
        last = np.clip(np.floor(to_binned(c + half, ba)).astype(np.int64), -1, n_across - 1)
        width = np.maximum(last - first + 1, 0)
        total = int(width.sum())
        if not total:
            continue
        start = np.repeat(np.cumsum(width) - width, width)
        across_parts.append(np.repeat(first, width) + (np.arange(total) - start))
        along_parts.append(np.repeat(ib, width))
        order_parts.append(np.full(total, int(n), np.int16))
    if not along_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    along = np.concatenate(along_parts)
    across = np.concatenate(across_parts)
    rows, cols = (along, across) if order_table.dispersion_axis == "y" else (across, along)
    # a label image sorts the pixels (and keeps a pixel once if two bands ever overlapped)
    labels = np.zeros(shape, np.int16)
    labels[rows, cols] = np.concatenate(order_parts)
    index = np.flatnonzero(labels)
    return index, labels.ravel()[index]


@dataclass
class FlatNormalisation:
    """Exposure levels of the flats and what was learnt from their centre bands.

    Attributes
    ----------
    first_levels : ndarray
        Stage 1: clipped mean (e-) of each frame's good centre-band pixels.
    levels : ndarray
        Stage 2: each frame's level (e-) measured on frame / first-pass master; the final
        stack divides frame k by ``levels[k]``.
    ordexp : tuple of float
        Median over the frames of the 10th, 50th and 90th percentile of their good
        centre-band pixels (e-): ORDEXP10/50/90.
    order_flux : dict
        Order number -> median over the frames of the median good centre-band value (e-),
        for choosing the UVB crossover order.
    band_pixels : int
        Pixels in the centre band.
    """

    first_levels: np.ndarray
    levels: np.ndarray
    ordexp: tuple[float, float, float]
    order_flux: dict[int, float] = field(default_factory=dict)
    band_pixels: int = 0


def _gather_band(calibrated: CalibratedFlats, index: np.ndarray, threads: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prepare every frame once and keep its values, errors and QUAL in the centre band."""
    nframes = len(calibrated.frames)
    rows, cols = calibrated.shape
    values = np.empty((nframes, index.size), np.float32)
    errors = np.empty((nframes, index.size), np.float32)
    qual = np.empty((nframes, index.size), np.uint8)
    bounds = np.searchsorted(index, np.arange(0, rows + _GATHER_ROWS, _GATHER_ROWS) * cols)

    def one(k: int) -> None:
        read = calibrated.reader(k)
        d = np.empty((_GATHER_ROWS, cols), np.float32)
        e = np.empty_like(d)
        q = np.empty((_GATHER_ROWS, cols), np.uint8)
        for b, start in enumerate(range(0, rows, _GATHER_ROWS)):
            stop = min(rows, start + _GATHER_ROWS)
            i0, i1 = bounds[b], bounds[b + 1]
            if i0 == i1:
                continue
            n = stop - start
            read(start, stop, d[:n], e[:n], q[:n])
            local = index[i0:i1] - start * cols
            values[k, i0:i1] = d[:n].ravel()[local]
            errors[k, i0:i1] = e[:n].ravel()[local]
            qual[k, i0:i1] = q[:n].ravel()[local]

    workers = min(threads, nframes)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(nframes)))
    else:
        for k in range(nframes):
            one(k)
    return values, errors, qual


def normalise_flats(calibrated: CalibratedFlats, order_table: OrderTable,
                    centre_order_window: float, clip: ClipSettings,
                    threads: int | None = None) -> FlatNormalisation:
    """Two-stage exposure levels of the flats (the seed's ``normalise_flats``).

    Stage 1: ``level1_k`` = clipped mean (:func:`clipped_mean`) of frame k's good pixels
    (QUAL 0, finite) in the centre band (:func:`centre_band_pixels`).  First-pass master
    ``M1`` = ``clip_and_stack`` of frame_k / level1_k with ``clip`` (evaluated in the band,
    the only place it is used).  Stage 2: ``level2_k`` = clipped mean of frame_k / M1 over
    the band pixels good in every frame (so that all frames are measured against the same
    M1; any good pixel where no pixel is good in all).  Each frame is read once here.

    Parameters
    ----------
    calibrated : CalibratedFlats
    order_table : OrderTable
        Order centres (an order-centre table or one with edges).
    centre_order_window : float
        Full width (unbinned px) of the band around each order centre.
    clip : ClipSettings
        The stacked clipping (``stacked_clipping_sigma``/``_iterations``).
    threads : int, optional

    Returns
    -------
    FlatNormalisation

    Raises
    ------
    InputError
        When a frame has no good pixel in the centre band (e.g. no order falls on it).
    """
    nthreads = default_threads(threads)
    index, labels = centre_band_pixels(order_table, calibrated.shape, calibrated.binx,
                                       calibrated.biny, centre_order_window)
    if index.size == 0:
        raise InputError(f"{order_table.source or 'order table'}: no order centre falls on "
                         f"the flats ({calibrated.frames[0].path.name} ...)")
    values, errors, qual = _gather_band(calibrated, index, nthreads)
    good = (qual == 0) & np.isfinite(values)
    nframes = values.shape[0]
    first = np.empty(nframes)
    percentiles = np.empty((nframes, 3))
    for k in range(nframes):
        v = values[k][good[k]]
        if v.size == 0:
            raise InputError(f"{calibrated.frames[k].path}: no good pixel in the centre band "
                             "of the orders")
        first[k] = clipped_mean(v)
        percentiles[k] = np.percentile(v, [10, 50, 90])
        if not first[k] > 0:
            raise InputError(f"{calibrated.frames[k].path}: mean calibrated flux "
                             f"{first[k]:.4g} e- in the order centres is not positive")
    order_flux = {}
    for n in np.unique(labels):
        sel = labels == n
        per_frame = [np.median(values[k][sel & good[k]]) for k in range(nframes)
                     if np.any(sel & good[k])]
        if per_frame:
            order_flux[int(n)] = float(np.median(per_frame))
    scale = (1.0 / first).astype(np.float32)[:, None]
    norm = values  # scaled in place: the raw band values are not needed again
    norm *= scale
    errors *= scale
    m1 = clip_and_stack_arrays(norm[:, None, :], errors[:, None, :], qual[:, None, :], clip,
                               threads=nthreads).value[0]
    del errors
    # every frame is measured on the same pixels: where one frame is masked (a saturated
    # patch, say) the first-pass master is the mean of the others only, and measuring the
    # other frames there but not that one would tilt their levels against it
    common = np.isfinite(m1) & (m1 > 0) & np.all(good, axis=0)
    if not common.any():
        common = np.isfinite(m1) & (m1 > 0)
    levels = np.empty(nframes)
    for k in range(nframes):
        sel = good[k] & common
        ratio = norm[k][sel] / m1[sel]
        levels[k] = first[k] * clipped_mean(ratio)
    return FlatNormalisation(first_levels=first, levels=levels,
                             ordexp=tuple(float(v) for v in np.median(percentiles, axis=0)),
                             order_flux=order_flux, band_pixels=int(index.size))


def stack_master_flat(calibrated: CalibratedFlats, normalisation: FlatNormalisation,
                      clip: ClipSettings, threads: int | None = None) -> DetectorImage:
    """The normalised master flat before finishing: ``clip_and_stack`` of frame_k / level_k.

    The calibration's error is common to all flats: it is added in quadrature after the
    stack, times the mean of 1 / level_k, and the calibration's QUAL bits are OR-ed in.

    Parameters
    ----------
    calibrated : CalibratedFlats
    normalisation : FlatNormalisation
    clip : ClipSettings
    threads : int, optional

    Returns
    -------
    DetectorImage
        FLUX about 1 in the order centres, ERRS, QUAL (NO_DATA where nothing survived).
    """
    levels = normalisation.levels
    readers = [calibrated.reader(k, 1.0 / levels[k]) for k in range(len(levels))]
    shape = calibrated.shape
    res = clip_and_stack(readers, shape, clip,
                         band_rows=band_rows_for(len(readers), shape[1], 32 << 20),
                         threads=threads)
    cal = calibrated.calibration
    if cal.error is not None:
        weight = np.float32(np.mean(1.0 / levels))
        for start in range(0, shape[0], _GATHER_ROWS):  # row chunks: no full-frame temporary
            err = res.error[start:start + _GATHER_ROWS]
            common = cal.error[start:start + _GATHER_ROWS] * weight
            np.sqrt(err * err + common * common, out=err)
    if cal.qual is not None:
        res.qual |= cal.qual
    return DetectorImage(data=res.value, error=res.error, qual=res.qual)


# ---------------------------------------------------------------------------------------------
# Finishing and low-sensitivity pixels
# ---------------------------------------------------------------------------------------------
def _along_view(image: np.ndarray, dispersion_axis: str) -> np.ndarray:
    """``image`` as (along-order, across-order) -- a view."""
    return image if dispersion_axis == "y" else image.T


def local_level(data: np.ndarray, usable: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                half: int = LOW_SENS_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Local level of pixels (rows, cols) of an (along, across) image: the median of their
    neighbours at +-1 .. +-``half`` along axis 0, taking a distance only where both of its
    neighbours are usable (symmetric pairs: on a linear profile the median is exact).

    Returns
    -------
    level : ndarray
        NaN where no pair is usable.
    count : ndarray of int
        Values the median is taken over.
    """
    n_along = data.shape[0]
    offsets = np.arange(1, half + 1)
    vals = np.full((rows.size, 2 * half), np.nan, np.float32)
    for sign, part in ((-1, slice(0, half)), (1, slice(half, 2 * half))):
        r = rows[:, None] + sign * offsets[None, :]
        inside = (r >= 0) & (r < n_along)
        rc = np.clip(r, 0, n_along - 1)
        c = np.broadcast_to(cols[:, None], rc.shape)
        vals[:, part] = np.where(inside & usable[rc, c], data[rc, c], np.nan)
    pair = np.isfinite(vals[:, :half]) & np.isfinite(vals[:, half:])
    vals[~np.concatenate([pair, pair], axis=1)] = np.nan
    count = 2 * np.sum(pair, axis=1)
    # median of the finite values of each row: NaN sorts last, so the middle of the first
    # `count` sorted values (an even count: the mean of the two middle ones)
    vals.sort(axis=1)
    upper = np.take_along_axis(vals, np.clip(count // 2, 0, 2 * half - 1)[:, None], 1)[:, 0]
    lower = np.take_along_axis(vals, np.clip(count // 2 - 1, 0, 2 * half - 1)[:, None],
                               1)[:, 0]
    level = np.where(count > 0, 0.5 * (lower + upper), np.nan)
    return level, count


def low_sensitivity_mask(data: np.ndarray, error: np.ndarray, qual: np.ndarray,
                         in_order: np.ndarray, dispersion_axis: str, sigma: float
                         ) -> np.ndarray:
    """Low-sensitivity pixels of a master flat.

    A pixel inside an order is low-sensitivity when its flux F is below its local level L
    by more than ``sigma`` x :data:`LOW_SENS_UNIT` x L *and* by more than
    :data:`LOW_SENS_NOISE_GUARD` times the noise expected at L (the neighbours' ERRS, with
    the error of their median; not the pixel's own ERRS, which a downward fluctuation
    shrinks).  L (:func:`local_level`) is the median of the pixel's usable in-order
    neighbours up to :data:`LOW_SENS_NEIGHBOURS` px away on both sides along the dispersion
    axis: the flat changes slowly along an order (blaze, lamp) while its cross-order
    profile (slit illumination, edges) moves by a fraction of a pixel over a few rows, so L
    follows both and only the pixel's own response is compared.  Where the flux changes
    monotonically, the median is the mean of the two nearest neighbours, so even the steep
    ends of an order leave L nearly unbiased; a dust clump up to 8 px long along the order
    leaves most of the 16 neighbours of its pixels outside it.

    Parameters
    ----------
    data, error : ndarray
        FLUX and ERRS of the master (any normalisation).
    qual : ndarray of uint8
        Pixels with NO_DATA or NON_FINITE are neither flagged nor used as neighbours.
    in_order : ndarray of bool
        Pixels between the order edges.
    dispersion_axis : {"y", "x"}
    sigma : float
        ``low_sensitivity_clipping_sigma``.

    Returns
    -------
    ndarray of bool
    """
    from scipy.ndimage import maximum_filter1d

    keep = 1.0 - float(sigma) * LOW_SENS_UNIT
    out = np.zeros(data.shape, bool)
    if not keep > 0:
        return out
    d = _along_view(np.asarray(data, np.float32), dispersion_axis)
    e = _along_view(np.asarray(error, np.float32), dispersion_axis)
    usable = _along_view(in_order & ((qual & _NO_VALUE) == 0) & np.isfinite(data),
                         dispersion_axis)
    # candidates: below `keep` x the brightest usable pixel within the neighbourhood (never
    # below the neighbours' median), from a running maximum over bands of rows (with their
    # halo); the exact test runs on the candidates only
    h, n_along = LOW_SENS_NEIGHBOURS, d.shape[0]
    found_rows, found_cols = [], []
    for start in range(0, n_along, _GATHER_ROWS):
        stop = min(n_along, start + _GATHER_ROWS)
        lo, hi = max(0, start - h), min(n_along, stop + h)
        clean = np.where(usable[lo:hi], d[lo:hi], -np.inf).astype(np.float32)
        brightest = maximum_filter1d(clean, 2 * h + 1, axis=0, mode="constant",
                                     cval=-np.inf)[start - lo:stop - lo]
        with np.errstate(invalid="ignore"):
            cand = usable[start:stop] & (d[start:stop] < np.float32(keep) * brightest)
        r, c = np.nonzero(cand)
        found_rows.append(r + start)
        found_cols.append(c)
    all_rows, all_cols = np.concatenate(found_rows), np.concatenate(found_cols)
    flagged = _along_view(out, dispersion_axis)
    for first in range(0, all_rows.size, _CANDIDATE_CHUNK):  # bounded temporaries
        rows = all_rows[first:first + _CANDIDATE_CHUNK]
        cols = all_cols[first:first + _CANDIDATE_CHUNK]
        level, count = local_level(d, usable, rows, cols)
        elevel, _ = local_level(e, usable, rows, cols)
        f = d[rows, cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            noise = elevel * np.sqrt(1.0 + (np.pi / 2) / np.maximum(count, 1))
            flag = ((count >= 4) & (f < keep * level)
                    & (level - f > LOW_SENS_NOISE_GUARD * noise))
        flagged[rows[flag], cols[flag]] = True
    return out


def mask_low_sens_pixels(image: DetectorImage, order_table: OrderTable, binx: int = 1,
                         biny: int = 1, sigma: float = 2.0,
                         in_order: np.ndarray | None = None) -> tuple[DetectorImage, int]:
    """Set the LOW_SENS QUAL bit on the low-sensitivity pixels (the seed's
    ``mask_low_sens_pixels``); see :func:`low_sensitivity_mask` for the definition.

    Any LOW_SENS bit already set is recomputed (so a stitched master can be masked again).

    Parameters
    ----------
    image : DetectorImage
    order_table : OrderTable
        With edges.
    binx, biny : int
    sigma : float
        ``low_sensitivity_clipping_sigma``.
    in_order : ndarray of bool, optional
        ``order_table.in_order_mask`` of the image, when already computed.

    Returns
    -------
    image : DetectorImage
        A copy of QUAL with the bit set; FLUX and ERRS shared with the input.
    count : int
        Low-sensitivity pixels.
    """
    if in_order is None:
        in_order = order_table.in_order_mask(image.shape, binx, biny)
    low = low_sensitivity_mask(image.data, image.error, image.qual, in_order,
                               order_table.dispersion_axis, sigma)
    qual = image.qual & np.uint8(0xFF ^ int(Qual.LOW_SENS))
    qual |= low.view(np.uint8) * np.uint8(Qual.LOW_SENS)
    return DetectorImage(data=image.data, error=image.error, qual=qual,
                         header=image.header), int(np.count_nonzero(low))


@dataclass
class FinishedFlat:
    """A finished master flat.

    Attributes
    ----------
    image : DetectorImage
        Mean inner-order level 1, inter-order FLUX 1 / ERRS 0, LOW_SENS flagged.
    n_low_sens : int
    scale : float
        The mean inner-order level the master was divided by.
    in_order : ndarray of bool
        Pixels between the order edges.
    """

    image: DetectorImage
    n_low_sens: int
    scale: float
    in_order: np.ndarray


def _fill_no_value(data: np.ndarray, error: np.ndarray, qual: np.ndarray,
                   in_order: np.ndarray, dispersion_axis: str) -> None:
    """In-order pixels without a value take their neighbours' median (1 if none), so that
    dividing by the flat stays finite; their QUAL keeps saying NO_DATA."""
    bad = in_order & (((qual & _NO_VALUE) != 0) | ~np.isfinite(data))
    if not bad.any():
        return
    d, e = _along_view(data, dispersion_axis), _along_view(error, dispersion_axis)
    usable = _along_view(in_order & ~bad, dispersion_axis)
    rows, cols = np.nonzero(_along_view(bad, dispersion_axis))
    level, count = local_level(d, usable, rows, cols)
    elevel, _ = local_level(e, usable, rows, cols)
    d[rows, cols] = np.where(count > 0, level, 1.0)
    e[rows, cols] = np.where(count > 0, elevel, 0.0)


def finish_master_flat(master: DetectorImage, order_table: OrderTable, binx: int, biny: int,
                       low_sensitivity_clipping_sigma: float = 2.0,
                       background: np.ndarray | None = None,
                       overwrite: bool = False) -> FinishedFlat:
    """Finish a stacked master flat once its order edges are known.

    Steps: subtract ``background`` (the scattered-light model, in the master's units; its
    own error is neglected, being smooth and small), fill in-order pixels without a value,
    flag low-sensitivity pixels (:func:`mask_low_sens_pixels`), divide FLUX and ERRS by the
    mean of the good (QUAL 0) pixels between the edges so that it becomes 1, and set every
    pixel outside the edges to FLUX 1, ERRS 0 (QUAL unchanged).

    Parameters
    ----------
    master : DetectorImage
        From :func:`stack_master_flat` (or :func:`stitch_uv_mflats`).
    order_table : OrderTable
        With edges.
    binx, biny : int
    low_sensitivity_clipping_sigma : float
    background : ndarray, optional
    overwrite : bool
        Finish ``master``'s own planes instead of copies (saves three full-frame planes when
        the unfinished master is not needed again).

    Returns
    -------
    FinishedFlat
    """
    if not order_table.has_edges:
        raise ValueError("finishing a master flat needs an order table with edges")
    data = np.array(master.data, np.float32, copy=not overwrite)
    error = np.array(master.error, np.float32, copy=not overwrite)
    qual = np.array(master.qual, np.uint8, copy=not overwrite)
    if background is not None:
        data -= np.asarray(background, np.float32)
    in_order = order_table.in_order_mask(data.shape, binx, biny)
    _fill_no_value(data, error, qual, in_order, order_table.dispersion_axis)
    masked, nlow = mask_low_sens_pixels(DetectorImage(data, error, qual), order_table, binx,
                                        biny, low_sensitivity_clipping_sigma, in_order)
    qual = masked.qual
    good = in_order & (qual == 0)
    if not good.any():
        raise InputError(f"{order_table.source or 'order table'}: no good pixel between the "
                         "order edges of the master flat")
    scale = float(np.mean(data[good], dtype=np.float64))
    if not scale > 0:
        raise InputError(f"master flat: mean inner-order level {scale:.4g} is not positive")
    data *= np.float32(1.0 / scale)
    error *= np.float32(1.0 / scale)
    data[~in_order] = 1.0
    error[~in_order] = 0.0
    image = DetectorImage(data=data, error=error, qual=qual, header=master.header)
    return FinishedFlat(image=image, n_low_sens=nlow, scale=scale, in_order=in_order)


# ---------------------------------------------------------------------------------------------
# UVB: D2 and QTH masters
# ---------------------------------------------------------------------------------------------
def crossover_order(d_goodness: Mapping[int, float], q_goodness: Mapping[int, float]
                    ) -> int:
    """The reddest order taken from the D2 lamp.

    D2 gives orders >= n, QTH orders < n; n maximises the summed goodness (edge-fit sample
    counts, or fluxes) of the lamp each order comes from.  Ties go to the larger n (the QTH
    lamp is the brighter, better-characterised one).  QTH keeps at least its reddest order.
    """
    orders = sorted(set(d_goodness) & set(q_goodness))
    if len(orders) < 2:
        raise InputError("UVB stitching needs at least two orders common to the D2 and QTH "
                         "flats")
    d = np.array([float(d_goodness[n]) for n in orders])
    q = np.array([float(q_goodness[n]) for n in orders])
    best, best_n = -np.inf, orders[-1]
    for i in range(1, len(orders)):
        total = q[:i].sum() + d[i:].sum()
        if total >= best:
            best, best_n = total, orders[i]
    return int(best_n)


def stitch_window_centre(order_table: OrderTable, order: int) -> tuple[float, float]:
    """``(b, a)``: unbinned along- and across-order position of the centre of ``order``,
    where the UVB lamps' fluxes are compared.

    The middle of the order's range in ``order_table``: pass the order-centre table (the
    input ORDER_TAB, or the self-traced orders' widest extent), not a lamp's fitted edge
    table, whose range ends where that lamp's light fades.  The QTH / D2 ratio changes by
    about 0.05 % per pixel along an order, so a window 10 px off would misscale the D2 orders
    by half a percent.
    """
    b0, b1 = order_table.along_range(order)
    b = 0.5 * (b0 + b1)
    return b, float(order_table.centre(float(order), b))


def _window(image: DetectorImage, order_table: OrderTable, order: int, binx: int, biny: int,
            side: float) -> np.ndarray:
    """Good FLUX values of a square of ``side`` unbinned px at the centre of ``order``."""
    b, a = stitch_window_centre(order_table, order)
    n_along, n_across, bb, ba = order_table.image_axes(image.shape, binx, biny)
    ib = to_binned(b, bb)
    ia = to_binned(a, ba)
    hb, ha = 0.5 * side / bb, 0.5 * side / ba
    rb = slice(max(0, int(np.ceil(ib - hb))), min(n_along, int(np.floor(ib + hb)) + 1))
    ra = slice(max(0, int(np.ceil(ia - ha))), min(n_across, int(np.floor(ia + ha)) + 1))
    sel = (rb, ra) if order_table.dispersion_axis == "y" else (ra, rb)
    vals, q = image.data[sel], image.qual[sel]
    return vals[(q == 0) & np.isfinite(vals)]


def find_uvb_overlap_order_and_scale(d_master: DetectorImage, q_master: DetectorImage,
                                     order_table: OrderTable, binx: int, biny: int,
                                     d_goodness: Mapping[int, float],
                                     q_goodness: Mapping[int, float],
                                     window: float = 20.0) -> tuple[int, float]:
    """Crossover order of the UVB lamps and the D2 -> QTH flux scale (the seed's
    ``find_uvb_overlap_order_and_scale``).

    Parameters
    ----------
    d_master, q_master : DetectorImage
        The D2 and QTH master flats (same geometry).
    order_table : OrderTable
        Order centres and ranges that place the window (:func:`stitch_window_centre`).
    binx, biny : int
    d_goodness, q_goodness : mapping
        Per order, the number of positions that contributed to each lamp's edge fit (or
        each lamp's median order flux, e.g. :attr:`FlatNormalisation.order_flux`); see
        :func:`crossover_order`.
    window : float
        Side (unbinned px) of the square at the centre of the crossover order where the
        median fluxes are compared (the recipe passes ``centre_order_window``).

    Returns
    -------
    order : int
        The crossover order (D2 gives it and the bluer orders).
    scale : float
        median(QTH) / median(D2) in the window: multiply the D2 master by it.
    """
    order = crossover_order(d_goodness, q_goodness)
    d = _window(d_master, order_table, order, binx, biny, window)
    q = _window(q_master, order_table, order, binx, biny, window)
    if d.size == 0 or q.size == 0:
        raise InputError(f"UVB stitching: no good pixel in the {window:g} px window at the "
                         f"centre of order {order}")
    dmed, qmed = float(np.median(d)), float(np.median(q))
    if not (dmed > 0 and qmed > 0):
        raise InputError(f"UVB stitching: median fluxes D2 {dmed:.4g}, QTH {qmed:.4g} at the "
                         f"centre of order {order} are not both positive")
    return order, qmed / dmed


def _stitch_side(order_table: OrderTable, order: int) -> tuple[str, float]:
    """Which edge of the crossover order faces the QTH orders, and the offset's sign."""
    b0, b1 = order_table.along_range(order)
    b = 0.5 * (b0 + b1)
    here = float(order_table.centre(float(order), b))
    redder = [n for n in order_table.orders if n < order]
    bluer = [n for n in order_table.orders if n > order]
    if redder:
        other = float(order_table.centre(float(max(redder)), b))
        qth_above = other > here
    elif bluer:
        other = float(order_table.centre(float(min(bluer)), b))
        qth_above = other < here
    else:
        raise InputError(f"UVB stitching: order {order} is the only order of the table")
    return ("up", 1.0) if qth_above else ("low", -1.0)


def stitch_uv_mflats(d_master: DetectorImage, q_master: DetectorImage,
                     d_order_table: OrderTable, order: int, scale: float, binx: int,
                     biny: int, scale_d2_to_qth: bool = True) -> DetectorImage:
    """Join the UVB D2 and QTH masters (the seed's ``stitch_uv_mflats``).

    The line is :data:`STITCH_OFFSET` unbinned px beyond the crossover order's edge that
    faces the QTH orders, from the D2 table's edge polynomial (extrapolated along the whole
    detector); on X-shooter UVB the bluer orders lie at smaller x, so this is the seed's
    "5 px above the upper edge".  Pixels on the crossover order's side of the line come from
    the D2 master (times ``scale`` when ``scale_d2_to_qth``), the others from the QTH master;
    FLUX, ERRS and QUAL alike.

    Parameters
    ----------
    d_master, q_master : DetectorImage
    d_order_table : OrderTable
        The D2 master's order table with edges.
    order : int
        Crossover order (:func:`find_uvb_overlap_order_and_scale`).
    scale : float
        D2 -> QTH flux scale.
    binx, biny : int
    scale_d2_to_qth : bool

    Returns
    -------
    DetectorImage
        The stitched master (re-detect its edges, then :func:`finish_master_flat`).
    """
    if not d_order_table.has_edges:
        raise ValueError("stitching needs the D2 order table with edges")
    if d_master.shape != q_master.shape:
        raise InputError("UVB stitching: the D2 and QTH masters differ in shape")
    side, sign = _stitch_side(d_order_table, order)
    edge = d_order_table.edge_up if side == "up" else d_order_table.edge_low
    n_along, n_across, bb, ba = d_order_table.image_axes(d_master.shape, binx, biny)
    b = to_unbinned(np.arange(n_along), bb)
    line = edge(float(order), b) + sign * STITCH_OFFSET
    a = to_unbinned(np.arange(n_across), ba)
    take_d = (a[None, :] < line[:, None]) if sign > 0 else (a[None, :] > line[:, None])
    if d_order_table.dispersion_axis == "x":
        take_d = take_d.T
    factor = np.float32(scale if scale_d2_to_qth else 1.0)
    data = np.where(take_d, d_master.data * factor, q_master.data).astype(np.float32)
    error = np.where(take_d, d_master.error * factor, q_master.error).astype(np.float32)
    qual = np.where(take_d, d_master.qual, q_master.qual).astype(np.uint8)
    return DetectorImage(data=data, error=error, qual=qual, header=q_master.header)


# ---------------------------------------------------------------------------------------------
# QC
# ---------------------------------------------------------------------------------------------
def flat_qc(normalisation: FlatNormalisation | None, finished: FinishedFlat) -> QcMeasurements:
    """Seed table 60's values but the edge-fit residuals.

    ORDEXP10/50/90: :attr:`FlatNormalisation.ordexp` (e-).  COLDPIX NUM / FRAC: pixels of
    the finished master with any QUAL bit set (static bad, hot/cold from the calibrations,
    saturated or without data in every flat, low-sensitivity), over the whole frame, as
    soxspipe counts its master flat's bad-pixel mask.  INNER ORDER PIX MEAN / SUM: mean and
    sum of the good (QUAL 0) pixels between the order edges of the finished master
    (normalised units; the mean is 1 by construction).  N LOW SENS: pixels flagged LOW_SENS.
    """
    qc = QcMeasurements()
    if normalisation is None:
        for name in ("ORDEXP10", "ORDEXP50", "ORDEXP90"):
            qc.omit(name, "the master was not made from raw flats (stitched)")
    else:
        for name, value in zip(("ORDEXP10", "ORDEXP50", "ORDEXP90"), normalisation.ordexp):
            qc.add(name, value, "no good pixel in the order centres")
    image = finished.image
    nbad = int(np.count_nonzero(image.qual))
    qc.add("COLDPIX NUM", nbad)
    qc.add("COLDPIX FRAC", nbad / image.qual.size)
    good = finished.in_order & (image.qual == 0)
    if good.any():
        vals = image.data[good]
        qc.add("INNER ORDER PIX MEAN", float(np.mean(vals, dtype=np.float64)))
        qc.add("INNER ORDER PIX SUM", float(np.sum(vals, dtype=np.float64)))
    else:
        qc.omit("INNER ORDER PIX MEAN", "no good pixel between the order edges")
        qc.omit("INNER ORDER PIX SUM", "no good pixel between the order edges")
    qc.add("N LOW SENS", int(finished.n_low_sens))
    return qc
