"""Master bias and master dark frames from raw exposures.

Both masters are one streaming pass over the raw frames in row bands: each band is prepared
(rotated, trimmed, converted to electrons, given errors and QUAL), stacked with the
``clip_and_stack`` kernel, and sampled for the per-frame statistics (level, read noise,
periodic-pattern noise).  Memory therefore stays flat however many frames are combined.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from soxs_core.calib import load_bad_pixel_map
from soxs_core.combine.qc import (
    clipped_stats,
    good_block_mean,
    periodic_pattern_metric,
    read_noise_from_pair,
    robust_std,
    smooth_background,
    structure_slopes,
)
from soxs_core.combine.screening import screen_frames
from soxs_core.combine.stacking import ClipSettings, band_rows_for, clip_and_stack, default_threads
from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.io.products import QcMeasurements

__all__ = [
    "MasterSettings",
    "MasterResult",
    "verify_frames",
    "make_master_bias",
    "make_master_dark",
]

log = logging.getLogger(__name__)

#: Every SAMPLE_STEP-th prepared row is kept for the per-frame statistics.
SAMPLE_STEP = 32
#: Block size of the periodic-pattern-noise FFT.
FPN_BLOCK = 5


@dataclass(frozen=True)
class MasterSettings:
    """Parameters of mbias/mdark (names as on the seed pages).

    Attributes
    ----------
    frame_clipping_sigma : float
        A pixel of the master is added to the bad-pixel mask when it lies more than this many
        single-frame sigmas from the local median frame level; the same sigma clips the
        per-frame level and noise statistics.
    frame_clipping_iterations : int
        Iterations of those clips.
    stacked_clipping_sigma : float
        Per-pixel rejection threshold across the stack (median centre, MAD scale).
    stacked_clipping_iterations : int
        Iterations of the per-pixel clip.
    stacking_method : {"mean", "median"}
        How the surviving values are combined.
    """

    frame_clipping_sigma: float = 3.0
    frame_clipping_iterations: int = 3
    stacked_clipping_sigma: float = 3.0
    stacked_clipping_iterations: int = 3
    stacking_method: str = "mean"

    @property
    def clip(self) -> ClipSettings:
        return ClipSettings(
            sigma_lower=self.stacked_clipping_sigma, sigma_upper=self.stacked_clipping_sigma,
            max_iters=self.stacked_clipping_iterations, scale="mad_std",
            combine=self.stacking_method,
        )


@dataclass
class MasterResult:
    """A master frame with its QC values and the statistics behind them.

    ``qc`` holds values keyed by the names the recipe declares (``RAW RON``, ...); comments,
    units and acceptable ranges come from the declaration when the product is written.
    """

    image: DetectorImage
    qc: QcMeasurements = field(default_factory=QcMeasurements)
    raw_read_noise: float = float("nan")


def verify_frames(frames: Sequence[RawFrame], frame_type: str, min_frames: int,
                  same_exptime: bool = True) -> None:
    """Check that raw frames can be combined into one master.

    Raises
    ------
    InputError
        Naming the first offending file: wrong frame type, one file listed twice (under any
        spelling of its path, or through a link), mixed instrument/arm/binning/readout/gain/
        read noise/exposure time, or too few frames.  A setup value is compared with the one
        most frames share, so the odd frame is named even when it is listed first, with the
        keyword and the value found in each file.
    """
    if not frames:
        raise InputError(f"no {frame_type} frames given")
    for frame in frames:
        if frame.frame_type != frame_type:
            raise InputError(f"{frame.path}: is a {frame.dpr_type} frame "
                             f"(DPR TECH {frame.dpr_tech}), expected {frame_type}")
    _refuse_repeated_files(frames)
    first = frames[0]
    for key in first.setup:
        values = [frame.setup[key] for frame in frames]
        common = max(values, key=values.count)  # ties: the earliest listed value
        reference = frames[values.index(common)]
        for frame, value in zip(frames, values):
            if value != common:
                raise InputError(f"{frame.path}: {key} differs from the other frames': "
                                 f"{frame.setup_origin(key)} here, "
                                 f"{reference.setup_origin(key)} in {reference.path.name}")
    for frame in frames[1:]:
        if same_exptime and abs(frame.exptime - first.exptime) > 0.01:
            raise InputError(f"{frame.path}: EXPTIME {frame.exptime:g} s differs from "
                             f"{first.exptime:g} s of {first.path.name}")
    if len(frames) < min_frames:
        raise InputError(f"{len(frames)} {frame_type} frame(s) given, at least {min_frames} "
                         f"are needed ({first.path.name} ...)")


def _refuse_repeated_files(frames: Sequence[RawFrame]) -> None:
    """One file given twice would be stacked as two independent exposures (ERRS too small by
    sqrt(2)); the device and inode identify it whatever the path's spelling or links."""
    seen: dict[tuple[int, int], RawFrame] = {}
    for frame in frames:
        try:
            stat = os.stat(frame.path)
        except OSError:  # gone since it was opened: the pixel reads will say so
            continue
        earlier = seen.setdefault((stat.st_dev, stat.st_ino), frame)
        if earlier is not frame:
            raise InputError(f"{frame.path}: is the same file as {earlier.path}, listed "
                             "twice; each exposure may be stacked only once")


@dataclass
class _PassStatistics:
    """Per-frame samples gathered while stacking."""

    nframes: int
    samples: list[list[np.ndarray]] = field(default_factory=list)
    binned: list[list[np.ndarray]] = field(default_factory=list)
    finite: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.samples = [[] for _ in range(self.nframes)]
        self.binned = [[] for _ in range(self.nframes)]
        self.finite = np.zeros(self.nframes, dtype=np.int64)

    def __call__(self, k: int, start: int, stop: int, data, errors, qual) -> None:
        """Sample frame k's band (rows start:stop); one frame's calls never overlap."""
        first = (-start) % SAMPLE_STEP
        rows = slice(first, stop - start, SAMPLE_STEP)
        usable = qual[rows] == 0
        self.samples[k].append(np.where(usable, data[rows], np.nan))
        self.finite[k] += int(np.isfinite(data[::SAMPLE_STEP]).sum())
        # flagged inputs (static bad pixels, saturation) would swamp the Fourier spectrum
        # with their spikes: cells average the good pixels only
        self.binned[k].append(good_block_mean(data, qual, FPN_BLOCK))

    def frame_sample(self, k: int) -> np.ndarray:
        """Frame k's sampled rows (after the pass; joined once, then kept joined)."""
        return self._joined(self.samples, k)

    def frame_binned(self, k: int) -> np.ndarray:
        """Frame k's pattern-noise cells (after the pass)."""
        return self._joined(self.binned, k)

    @staticmethod
    def _joined(parts: list[list[np.ndarray]], k: int) -> np.ndarray:
        # the read noise uses each frame in two pairs (and mbias's levels once more)
        if len(parts[k]) != 1:
            parts[k] = [np.concatenate(parts[k], axis=0)]
        return parts[k][0]


#: Bytes of the band cube (values, errors, QUAL of every frame) held at once.
BAND_BUDGET = 96 << 20


def _band_rows(nframes: int, ncols: int) -> int:
    """Rows per band: within the budget, and whole cells of the pattern-noise blocks."""
    return max(FPN_BLOCK, band_rows_for(nframes, ncols, BAND_BUDGET) // FPN_BLOCK * FPN_BLOCK)


def _stack(frames: Sequence[RawFrame], settings: MasterSettings,
           bias_level: Sequence[np.ndarray | float] | None, threads: int | None):
    """Stream the frames through the stacking kernel, gathering statistics on the way."""
    first = frames[0]
    shape = first.prepared_shape
    bpm = load_bad_pixel_map(first.arm, first.binning)
    bpm_bits = (bpm * np.uint8(Qual.STATIC_BAD)).astype(np.uint8)

    def make_reader(k: int, frame: RawFrame):
        level = None if bias_level is None else bias_level[k]

        def fill(start: int, stop: int, electrons, error, qual) -> None:
            base = level[start:stop] if isinstance(level, np.ndarray) else level
            frame.prepare_into(start, stop, electrons, error, qual, bpm_bits[start:stop],
                               frame.read_noise, base, threads=1)
        return fill

    readers = [make_reader(k, f) for k, f in enumerate(frames)]
    stats = _PassStatistics(len(frames))
    result = clip_and_stack(readers, shape, settings.clip,
                            band_rows=_band_rows(len(frames), shape[1]), threads=threads,
                            on_frame=stats)
    for k, frame in enumerate(frames):
        if stats.finite[k] == 0:
            raise InputError(f"{frame.path}: no finite pixel value (all NaN)")
    return result, stats


def parallel_map(func, items, threads: int | None = None) -> list:
    """``[func(x) for x in items]`` on a thread pool: the per-frame statistics are numpy calls
    (FFTs, partitions) that release the GIL, so both cores work on them."""
    items = list(items)
    nthreads = min(default_threads(threads), max(1, len(items)))
    if nthreads == 1:
        return [func(x) for x in items]
    with ThreadPoolExecutor(nthreads) as pool:
        return list(pool.map(func, items))


def _raw_read_noise(stats: _PassStatistics, threads: int | None = None) -> float:
    """Raw read noise: the mean over consecutive frame pairs of their difference's noise."""
    noises = parallel_map(lambda k: read_noise_from_pair(stats.frame_sample(k),
                                                         stats.frame_sample(k + 1)),
                          range(stats.nframes - 1), threads)
    return float(np.mean(noises)) if noises else float("nan")


def _frame_levels(stats: _PassStatistics, settings: MasterSettings,
                  threads: int | None = None) -> list[float]:
    """Clipped level of every frame; every other sampled value is plenty for that."""
    return parallel_map(lambda k: clipped_stats(stats.frame_sample(k)[::2],
                                                settings.frame_clipping_sigma,
                                                settings.frame_clipping_iterations)[0],
                        range(stats.nframes), threads)


def _finish_master(result, raw_noise: float, settings: MasterSettings,
                   flag_cold: bool) -> tuple[DetectorImage, float]:
    """Flag outliers against the smooth level, fill pixels without data, measure master noise.

    A pixel is flagged when it lies more than ``frame_clipping_sigma`` single-frame sigmas
    (the raw read noise) from the local level: a defect that large matters in every single
    exposure, while pure noise in a master of N frames reaches it with probability of order
    erfc(sigma * sqrt(N / 2)), below 1e-6 for the defaults.
    """
    value, error, qual = result.value, result.error, result.qual
    good = qual == 0
    threshold = settings.frame_clipping_sigma * raw_noise
    # one pass is enough for the model: outliers are few and its medians robust to them.  Its
    # row and column terms follow the column offsets and amplifier channels of the structure,
    # but not a line half a threshold off its neighbours: that is a bad column (or row), and
    # as the column's median it would hide itself and flag the column's unaffected rows
    model = smooth_background(value, good, iterations=1, step=4, line_limit=threshold / 2)
    # pixels without data take the model (they are not good, so nothing below sees them)
    nodata = (qual & np.uint8(Qual.NO_DATA)) != 0
    value[nodata] = model[nodata]
    error[nodata] = np.float32(raw_noise)
    resid = np.subtract(value, model, out=model)  # the model's memory is not needed again
    hot = good & (resid > threshold)
    qual |= hot.view(np.uint8) * np.uint8(Qual.HOT)
    if flag_cold:
        cold = good & (resid < -threshold)
        qual |= cold.view(np.uint8) * np.uint8(Qual.COLD)
    # one pixel in 32 is plenty for a noise figure and keeps this cheap; rows 4 mod 8 and
    # columns 2 mod 4 are on none of the model's sampling grids (cells every 4th, line terms
    # every 8th row/column), so their residuals are not shrunk by their own influence on the
    # medians (the grid pixels read about 2 % low)
    sample = (slice(4, None, 8), slice(2, None, 4))
    master_noise = robust_std(resid[sample][qual[sample] == 0])
    return DetectorImage(data=value, error=error, qual=qual), master_noise


def _noise_or_header(raw_noise: float, frames: Sequence[RawFrame]) -> float:
    """The measured single-frame noise, or the header's when no frame pair shared a usable
    sampled pixel: the flagging threshold and the error of filled pixels need a number."""
    if np.isfinite(raw_noise) and raw_noise > 0:
        return raw_noise
    log.warning("%s ...: no read noise could be measured from frame pairs; flags and filled "
                "pixels use the header's %.3g e-", frames[0].path.name, frames[0].read_noise)
    return frames[0].read_noise


def _errors_from_measured_noise(result, frame: RawFrame, raw_noise: float) -> None:
    """Rescale a bias stack's errors from the header read noise to the measured one.

    A bias frame's error is its read noise alone, so the stacked ERRS scale with it.  The
    noise measured from frame-pair differences is what the frames really have (header values
    are nominal, and pick-up noise adds to them); a large disagreement is worth a warning.
    """
    if not (np.isfinite(raw_noise) and raw_noise > 0):
        return
    ratio = raw_noise / frame.read_noise
    if abs(ratio - 1) > 0.2:
        log.warning("%s: measured read noise %.2f e- differs from the header's %.2f e- "
                    "(%s); ERRS use the measured value", frame.path.name, raw_noise,
                    frame.read_noise, frame.read_noise_source)
    result.error *= np.float32(ratio)


#: Why a QC value measured on the master's good pixels may be missing.
_NO_GOOD_PIXEL = "no good pixel in the master"


def temperature_qc(frame: RawFrame, qc: QcMeasurements) -> None:
    """``DETECTOR TEMP`` from the first frame's header, or why there is none."""
    key = frame.arm.keywords.get("temperature")
    if not key:
        qc.omit("DETECTOR TEMP", f"{frame.arm.instrument} {frame.arm.name} frames have no "
                "detector temperature keyword")
    elif key not in frame.header:
        qc.omit("DETECTOR TEMP", f"{frame.path.name} has no {key}")
    else:
        text = frame.header[key]
        try:
            value = float(text)
        except (TypeError, ValueError):
            qc.omit("DETECTOR TEMP", f"{frame.path.name}: {key} = {text!r} is not a number")
        else:
            qc.add("DETECTOR TEMP", value, f"{frame.path.name}: {key} = {text!r}")


def make_master_bias(frames: Sequence[RawFrame], settings: MasterSettings,
                     threads: int | None = None) -> MasterResult:
    """Combine raw bias frames into a master bias.

    Parameters
    ----------
    frames : sequence of RawFrame
        Verified raw bias frames of one arm and setup.
    settings : MasterSettings
    threads : int, optional
        Threads of the stacking kernel.

    Returns
    -------
    MasterResult
        FLUX/ERRS in electrons, QUAL with STATIC_BAD, HOT, COLD and NO_DATA bits, and the QC
        values RAW RON, MASTER RON, MBIAS MEDIAN, STRUCTX, STRUCTY, FPN FRACMAX, BADPIX NUM,
        BADPIX FRAC and DETECTOR TEMP.

    Raises
    ------
    InputError
        When a frame cannot belong to the set (see :func:`screen_frames`).
    """
    screen_frames(frames)
    result, stats = _stack(frames, settings, None, threads)
    raw_noise = _raw_read_noise(stats, threads)
    _errors_from_measured_noise(result, frames[0], raw_noise)
    # The frame levels and the pattern-noise metric run beside the finishing step: they need
    # only the samples and the input flags, which finishing leaves alone (it adds HOT/COLD
    # and fills NO_DATA pixels, both excluded here).
    input_flags = np.uint8(Qual.STATIC_BAD | Qual.SATURATED | Qual.NON_FINITE | Qual.NO_DATA)
    binned_master = good_block_mean(result.value, result.qual & input_flags, FPN_BLOCK,
                                    default_threads(threads))
    with ThreadPoolExecutor(1) as beside:
        frame_levels = beside.submit(_frame_levels, stats, settings, 1)
        pattern = beside.submit(lambda: max(
            periodic_pattern_metric(stats.frame_binned(k), binned_master)
            for k in range(len(frames))))
        image, master_noise = _finish_master(result, _noise_or_header(raw_noise, frames),
                                             settings, flag_cold=True)
        good = image.qual == 0
        structx, structy = structure_slopes(image.data, good)
        levels, fpn = frame_levels.result(), pattern.result()
    nbad = int(np.count_nonzero(image.qual))
    qc = QcMeasurements()
    qc.add("RAW RON", raw_noise, "no finite difference in a frame pair")
    qc.add("MASTER RON", master_noise, _NO_GOOD_PIXEL)
    qc.add("MBIAS MEDIAN", float(np.median(levels)), "a frame has no unflagged sampled pixel")
    qc.add("STRUCTX", structx, _NO_GOOD_PIXEL)
    qc.add("STRUCTY", structy, _NO_GOOD_PIXEL)
    qc.add("FPN FRACMAX", fpn, "a frame has no unflagged pattern-noise cell")
    qc.add("BADPIX NUM", nbad)
    qc.add("BADPIX FRAC", nbad / image.data.size)
    temperature_qc(frames[0], qc)
    return MasterResult(image=image, qc=qc, raw_read_noise=raw_noise)


def make_master_dark(frames: Sequence[RawFrame], settings: MasterSettings,
                     master_bias: DetectorImage | None = None, threads: int | None = None
                     ) -> MasterResult:
    """Combine raw dark frames into a master dark.

    The Poisson term of each raw pixel's error counts only the signal above the bias: above
    the master bias when one is given, otherwise above the frame's own clipped level (NIR
    arrays have no bias frames).  With a master bias the result is bias-subtracted, its error
    the quadrature sum of the stack's and the master bias's.

    Returns
    -------
    MasterResult
        QUAL carries the HOT bit on hot pixels; QC HOTPIX NUM/FRAC, MDARK MEDIAN, RAW RON,
        MASTER RON and DETECTOR TEMP.

    Raises
    ------
    InputError
        When a frame cannot belong to the set (see :func:`screen_frames`) or the master bias
        does not fit the darks.
    """
    first = frames[0]
    if master_bias is not None and master_bias.shape != first.prepared_shape:
        raise InputError(f"master bias is {master_bias.shape[1]}x{master_bias.shape[0]} px, "
                         f"the darks are {first.prepared_shape[1]}x{first.prepared_shape[0]}")
    if master_bias is not None:
        screen_frames(frames)
        bias_level: list = [master_bias.data] * len(frames)
    else:
        # the frame's own clipped level, from the rows the screening samples anyway
        samples = screen_frames(frames, (settings.frame_clipping_sigma,
                                         settings.frame_clipping_iterations))
        bias_level = [sample.clipped_level for sample in samples]
    result, stats = _stack(frames, settings, bias_level, threads)
    raw_noise = _raw_read_noise(stats, threads)
    if master_bias is not None:
        result.value -= master_bias.data
        np.sqrt(result.error ** 2 + master_bias.error ** 2, out=result.error)
        result.qual |= master_bias.qual & np.uint8(Qual.STATIC_BAD | Qual.NO_DATA)
    image, master_noise = _finish_master(result, _noise_or_header(raw_noise, frames), settings,
                                         flag_cold=False)
    hot = (image.qual & np.uint8(Qual.HOT)) != 0
    nhot = int(np.count_nonzero(hot))
    good = image.qual == 0
    qc = QcMeasurements()
    qc.add("HOTPIX NUM", nhot)
    qc.add("HOTPIX FRAC", nhot / image.data.size)
    qc.add("MDARK MEDIAN", float(np.median(image.data[good])) if good.any() else None,
           _NO_GOOD_PIXEL)
    qc.add("RAW RON", raw_noise, "no finite difference in a frame pair")
    qc.add("MASTER RON", master_noise, _NO_GOOD_PIXEL)
    temperature_qc(first, qc)
    return MasterResult(image=image, qc=qc, raw_read_noise=raw_noise)
