"""Screening raw frames before they are stacked into a master.

A clipped stack shrugs off rogue *pixels*, but not a rogue *frame*: a saturated or empty
exposure, one whose BZERO/BSCALE was damaged, or the same exposure given twice would give a
master that is wrong (NaN QC, no HOT/COLD flags, ERRS sqrt(2) too small) while looking fine.
Each frame is therefore sampled first, on a few row blocks spread over the image (cheap next
to the stacking pass), and the set is refused, naming the file, the reason and the numbers,
when a frame

* has mostly non-finite or saturated pixels, or the same value everywhere;
* has a level or a noise wildly inconsistent with the other frames';
* has the same pixel values as another frame (the same exposure twice, e.g. a copy).

The criteria are deliberately loose: they catch frames that cannot belong to the set, not
frames that are merely a little unusual (dark levels that drift, a NIR pedestal that moves,
lamp flats a few per cent apart).  Set-wide comparisons use the median and the median
absolute deviation of the frames, so a minority of bad frames cannot hide itself.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from soxs_core.combine.qc import MAD_TO_STD, clipped_stats, robust_std
from soxs_core.detector.rawframe import RawFrame
from soxs_core.errors import InputError

__all__ = ["FrameSample", "sample_frame", "screen_frames", "SCREEN_BLOCKS",
           "SCREEN_BLOCK_ROWS", "STAT_VALUES", "MAX_SATURATED_FRACTION", "MAX_NON_FINITE_FRACTION",
           "LEVEL_SCATTER_SIGMAS", "LEVEL_READ_NOISES", "LEVEL_FRACTION", "NOISE_FACTOR"]

#: Row blocks sampled per frame, spread evenly from the first to the last row, and the rows
#: of each: 32 rows hold 30 000 to 65 000 pixels of a frame, whose sampled values cannot
#: agree bit for bit between two exposures, and read quickly (the stacking pass reads all).
SCREEN_BLOCKS = 8
SCREEN_BLOCK_ROWS = 4

#: A frame with more than half of its sampled pixels saturated (or NaN/infinite) says little
#: about the others' pixels and nothing reliable about its own level and noise.  Fewer bad
#: pixels are simply flagged and left out of the stack pixel by pixel.
MAX_SATURATED_FRACTION = 0.5
MAX_NON_FINITE_FRACTION = 0.5

#: A frame's level is inconsistent with the set when it lies further from the median level of
#: the frames than each of: LEVEL_SCATTER_SIGMAS robust sigmas of the frame-to-frame scatter
#: (so a set whose levels genuinely spread, like drifting darks or lamp flats, tolerates its
#: own spread); LEVEL_READ_NOISES read noises (so a set of nearly identical levels, whose
#: scatter is tiny by chance, does not refuse a frame a few electrons off: real bias and NIR
#: pedestal jumps stay well below 50 read noises, a damaged BZERO moves the level by
#: thousands); and LEVEL_FRACTION of the median level (lamp flats of one set agree to far
#: better than 20 %).
LEVEL_SCATTER_SIGMAS = 10.0
LEVEL_READ_NOISES = 50.0
LEVEL_FRACTION = 0.2

#: A frame's noise (from neighbouring-pixel differences) more than this factor above or below
#: the median of the set is not the same detector in the same mode: a scaled (BSCALE) or
#: dead read-out.  Real frame-to-frame noise changes (pick-up) stay within tens of per cent.
NOISE_FACTOR = 4.0


#: About this many of the sampled values enter the level, and as many neighbour pairs the
#: noise: they fix the level to a small fraction of the read noise and the noise to a few
#: per cent, far finer than the criteria below need, in well under a millisecond.
STAT_VALUES = 8192


@dataclass(frozen=True)
class FrameSample:
    """What the screening learnt about one frame from its sampled rows.

    Attributes
    ----------
    frame : RawFrame
    rows : int
        Number of sampled rows.
    level : float
        Median of the unsaturated finite sampled pixels [e-] (NaN when there are none).
    noise : float
        Robust noise of one pixel from differences of horizontal neighbours [e-]; fixed
        structure smoother than a pixel cancels in them.
    saturated : float
        Fraction of the sampled pixels at or above the saturation level.
    non_finite : float
        Fraction of the sampled pixels that are NaN or infinite.
    constant : float or None
        The value [ADU] when every finite sampled pixel has it, else None.
    fingerprint : tuple
        Checksum of the sampled values [ADU] with the level and noise: equal fingerprints
        mean equal pixel data (a checksum collision would also need equal statistics).
    clipped_level : float or None
        Sigma-clipped mean of the same pixels [e-], when asked for.
    """

    frame: RawFrame
    rows: int
    level: float
    noise: float
    saturated: float
    non_finite: float
    constant: float | None
    fingerprint: tuple
    clipped_level: float | None = None


def _sampled_adu(frame: RawFrame) -> np.ndarray:
    """The sampled rows of a frame in ADU (prepared orientation)."""
    height = frame.prepared_shape[0]
    block = min(SCREEN_BLOCK_ROWS, height)
    starts = np.unique(np.linspace(0, height - block, SCREEN_BLOCKS).astype(int))
    if frame.arm.rotation % 2:
        # a prepared row of a quarter-turned frame is a raw column: every block would read
        # the whole raw image, so read it once
        whole = frame.read_adu()
        return np.ascontiguousarray(np.concatenate([whole[r:r + block] for r in starts]))
    return np.concatenate([frame.read_adu(r, r + block) for r in starts])


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def sample_frame(frame: RawFrame, level_clip: tuple[float, int] | None = None
                 ) -> FrameSample:
    """Sample one frame for :func:`screen_frames`.

    Parameters
    ----------
    frame : RawFrame
    level_clip : (sigma, iterations), optional
        Also give the sigma-clipped mean level of the sampled pixels (as the masters' frame
        statistics clip).
    """
    adu = _sampled_adu(frame)
    size = adu.size
    finite = np.isfinite(adu)
    nfinite = int(np.count_nonzero(finite))
    saturated = adu >= np.float32(frame.saturation_adu)  # NaN compares false
    values = adu if nfinite == size else adu[finite]
    constant = float(values.flat[0]) if nfinite and values.min() == values.max() else None
    electrons = adu * np.float32(frame.gain)
    bad = saturated | ~finite
    if bad.any():
        electrons[bad] = np.nan
    flat = electrons.reshape(-1)
    usable = _finite(flat[::max(1, size // STAT_VALUES)])
    level = float(np.median(usable)) if usable.size else math.nan
    # pairs of horizontal neighbours that share no pixel, so their differences are
    # independent; rows of even length keep every pair within a row
    width = adu.shape[1] // 2 * 2
    pairs = electrons[:, :width].reshape(-1, 2)[::max(1, size // 2 // STAT_VALUES)]
    diff = _finite(pairs[:, 1] - pairs[:, 0])
    noise = robust_std(diff) / math.sqrt(2)
    if noise == 0 and diff.size:  # a noise well below one ADU: the MAD of integers is 0
        noise = float(np.std(diff)) / math.sqrt(2)
    clipped = None
    if level_clip is not None:
        clipped = clipped_stats(electrons, level_clip[0], max(1, level_clip[1]))[0]
    return FrameSample(frame=frame, rows=adu.shape[0], level=level, noise=noise,
                       saturated=np.count_nonzero(saturated) / size,
                       non_finite=1.0 - nfinite / size, constant=constant,
                       fingerprint=(zlib.crc32(adu), adu.shape, level, noise),
                       clipped_level=clipped)


def _own_defect(s: FrameSample) -> str | None:
    """Why a frame is unusable whatever the others look like, or None."""
    if s.non_finite >= 1.0:
        return f"no finite pixel value in the {s.rows} sampled rows (all NaN)"
    if s.non_finite > MAX_NON_FINITE_FRACTION:
        return f"{s.non_finite:.0%} of the sampled pixels are NaN or infinite"
    if s.saturated > MAX_SATURATED_FRACTION:
        return (f"{s.saturated:.0%} of the sampled pixels are saturated (at or above "
                f"{s.frame.saturation_adu:g} ADU)")
    if s.constant is not None:
        return (f"every sampled pixel is {s.constant:.6g} ADU: an empty or overwritten "
                "frame without detector noise")
    return None


def _scaling_hint(s: FrameSample, samples: Sequence[FrameSample]) -> str:
    """Points at BSCALE/BZERO when they differ from what most frames have."""
    scalings = [(o.frame.bscale, o.frame.bzero) for o in samples]
    common = max(scalings, key=scalings.count)
    own = (s.frame.bscale, s.frame.bzero)
    if own == common:
        return ""
    return (f"; its BSCALE = {own[0]:g}, BZERO = {own[1]:g} differ from the others' "
            f"{common[0]:g}, {common[1]:g}")


def _level_outlier(s: FrameSample, samples: Sequence[FrameSample]) -> str | None:
    levels = np.array([o.level for o in samples])
    median = float(np.median(levels))
    scatter = MAD_TO_STD * float(np.median(np.abs(levels - median)))
    tolerance = max(LEVEL_SCATTER_SIGMAS * scatter if len(samples) > 2 else 0.0,
                    LEVEL_READ_NOISES * s.frame.read_noise, LEVEL_FRACTION * abs(median))
    if abs(s.level - median) <= tolerance:
        return None
    return (f"level {s.level:.3g} e- vs median {median:.4g} e- of the {len(samples)} frames "
            f"(tolerance {tolerance:.3g} e-)")


def _noise_outlier(s: FrameSample, samples: Sequence[FrameSample]) -> str | None:
    median = float(np.median([o.noise for o in samples]))
    if median > 0 and 1 / NOISE_FACTOR <= s.noise / median <= NOISE_FACTOR:
        return None
    return (f"noise {s.noise:.3g} e- vs median {median:.3g} e- of the {len(samples)} frames "
            f"(more than a factor {NOISE_FACTOR:g} apart)")


def screen_frames(frames: Sequence[RawFrame], level_clip: tuple[float, int] | None = None
                  ) -> list[FrameSample]:
    """Sample every frame and refuse the set if one of them cannot belong to it.

    Parameters
    ----------
    frames : sequence of RawFrame
        Verified frames of one setup (see ``verify_frames``).
    level_clip : (sigma, iterations), optional
        Also measure each frame's sigma-clipped level (``FrameSample.clipped_level``).

    Returns
    -------
    list of FrameSample
        One per frame, in order.

    Raises
    ------
    InputError
        One line naming the first bad frame, the reason and the numbers: mostly NaN or
        saturated, constant, a level or noise inconsistent with the others (see the module
        constants), or pixel data equal to another frame's (naming both files).
    """
    samples = [sample_frame(frame, level_clip) for frame in frames]
    for s in samples:
        reason = _own_defect(s)
        if reason:
            raise InputError(f"{s.frame.path}: {reason}{_scaling_hint(s, samples)}")
    seen: dict[tuple, FrameSample] = {}
    for s in samples:
        earlier = seen.setdefault(s.fingerprint, s)
        if earlier is not s:
            raise InputError(f"{s.frame.path}: has the same pixel values as "
                             f"{earlier.frame.path} in all {s.rows} sampled rows: one "
                             "exposure given twice (a copy?) would be stacked as two")
    if len(samples) > 1:
        for check in (_level_outlier, _noise_outlier):
            for s in samples:
                reason = check(s, samples)
                if reason:
                    raise InputError(f"{s.frame.path}: {reason}{_scaling_hint(s, samples)}")
    return samples
