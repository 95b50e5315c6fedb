"""Sigma-clipped stacking of detector frames (``clip_and_stack``).

The pixel loop is the Cython kernel :mod:`soxs_core._stacking`; this module feeds it row bands
so that memory does not grow with (frame count x frame size), and keeps the pure-numpy
reference implementation that the tests compare the kernel with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from soxs_core import _stacking
from soxs_core.detector.quality import REJECT_FOR_STACKING, Qual

__all__ = [
    "ClipSettings",
    "StackResult",
    "clip_and_stack",
    "clip_and_stack_arrays",
    "clip_and_stack_reference",
    "band_rows_for",
    "default_threads",
    "median_error_factor",
    "median_error_factors",
]

MAD_TO_STD = 1.482602218505602

#: ``sqrt(n * Var(median of n values)) / sigma`` for n = 1 .. 32 independent Gaussian values
#: of one sigma (the median of an even count averages the two middle values).  The error of
#: a median is this factor times that of the mean.  Computed once by numerical integration
#: over the densities of the order statistics with scipy: for odd n = 2m + 1,
#: ``Var = n!/(m!)^2 * integral x^2 Phi(x)^m (1 - Phi(x))^m phi(x) dx`` (``quad``); for even
#: n = 2m, ``E[((x + y)/2)^2]`` under the joint density of the m-th and (m+1)-th values,
#: ``n!/((m-1)!)^2 Phi(x)^(m-1) phi(x) phi(y) (1 - Phi(y))^(m-1)`` over x < y (800 x 800
#: Gauss-Legendre nodes in x and y - x; 400 nodes agree to 1e-12).  Monte Carlo medians agree
#: (tests/test_stacking.py).  The large-n limit is sqrt(pi/2) = 1.2533.
MEDIAN_ERROR_FACTORS = (
    1.000000000000000, 1.000000000000000, 1.160178138793618, 1.092153136579658,
    1.197567663236354, 1.135101757327934, 1.213724857925861, 1.159933981429671,
    1.222665748366443, 1.176122594954238, 1.228326816862661, 1.187515997966213,
    1.232228442707726, 1.195972288619054, 1.235078856282274, 1.202498806485238,
    1.237251746487858, 1.207689190538826, 1.238962681589773, 1.211916067267263,
    1.240344651585527, 1.215425193242468, 1.241484117507586, 1.218385240100253,
    1.242439707107615, 1.220915834603347, 1.243252572745821, 1.223104184961636,
    1.243952446987107, 1.225015370666562, 1.244561344682370, 1.226698945678271,
)
_SCALES = {"mad_std": 0, "std": 1}
_COMBINES = {"mean": 0, "median": 1}

#: A band reader fills (electrons, 1-sigma errors, QUAL) of prepared rows start:stop into the
#: three arrays it is given: ``reader(start, stop, data, errors, qual)``.
BandReader = Callable[[int, int, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class ClipSettings:
    """How to clip and combine a stack.

    Attributes
    ----------
    sigma_lower, sigma_upper : float
        Rejection thresholds in units of the scale, below/above the centre (median).
    max_iters : int
        Maximum number of clipping iterations (0 = no clipping).
    scale : {"mad_std", "std"}
        Robust scale (1.4826 x median absolute deviation) or population standard deviation.
    combine : {"mean", "median"}
        How the surviving values are combined.
    reject_bits : int
        QUAL bits that exclude an input pixel.
    error_floor : bool
        Never let the scale fall below the rms of the surviving values' own errors.  With few
        frames the MAD is often tiny by chance and would reject good values; the floor keeps
        the clip consistent with the error model.
    """

    sigma_lower: float = 5.0
    sigma_upper: float = 5.0
    max_iters: int = 3
    scale: str = "mad_std"
    combine: str = "mean"
    reject_bits: int = REJECT_FOR_STACKING
    error_floor: bool = True

    def __post_init__(self) -> None:
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {sorted(_SCALES)}, not {self.scale!r}")
        if self.combine not in _COMBINES:
            raise ValueError(f"combine must be one of {sorted(_COMBINES)}, not {self.combine!r}")
        if not (self.sigma_lower > 0 and self.sigma_upper > 0):
            raise ValueError("clipping sigmas must be positive")
        if self.max_iters < 0:
            raise ValueError("max_iters must be >= 0")


@dataclass
class StackResult:
    """Combined image, its 1-sigma error, frames used per pixel and QUAL."""

    value: np.ndarray
    error: np.ndarray
    count: np.ndarray
    qual: np.ndarray


def default_threads(threads: int | None = None) -> int:
    """Threads for the kernels: ``threads``, else SOXS_NUM_THREADS/OMP_NUM_THREADS, else all
    cores this process may use."""
    if threads:
        return int(threads)
    env = os.environ.get("SOXS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def median_error_factor(n: int) -> float:
    """Error of the median of ``n`` Gaussian values in units of the error of their mean.

    Tabulated (:data:`MEDIAN_ERROR_FACTORS`) up to 32 values; beyond, the first-order
    expansion ``sqrt(pi/2 * (1 - c/n))`` with c = 2 - pi/2 for odd n and 3 - pi/2 for even n
    (an even count's median averages two values, which lowers its noise), within 0.13 % of
    the integrals at n = 33/34 and closer as 1/n^2 beyond.

    Parameters
    ----------
    n : int
        Number of values (>= 1).

    Returns
    -------
    float
        1 for n <= 2 (the median of two values is their mean), rising towards sqrt(pi/2).
    """
    if n < 1:
        raise ValueError("a median needs at least one value")
    if n <= len(MEDIAN_ERROR_FACTORS):
        return MEDIAN_ERROR_FACTORS[n - 1]
    c = (2.0 if n % 2 else 3.0) - math.pi / 2
    return math.sqrt(math.pi / 2 * (1.0 - c / n))


def median_error_factors(nmax: int) -> np.ndarray:
    """:func:`median_error_factor` of 0 .. ``nmax`` values as float64 (entry 0 is 1, unused):
    the table the kernel and the reference index by the number of surviving values."""
    return np.array([1.0] + [median_error_factor(n) for n in range(1, nmax + 1)],
                    dtype=np.float64)


def band_rows_for(nframes: int, ncols: int, budget_bytes: int = 96 << 20) -> int:
    """Rows per band so that one band of the stack (data, error, QUAL) fits the budget."""
    per_row = max(1, nframes) * ncols * (4 + 4 + 1)
    return max(1, budget_bytes // per_row)


def clip_and_stack_arrays(
    data: np.ndarray,
    errors: np.ndarray,
    qual: np.ndarray,
    settings: ClipSettings = ClipSettings(),
    threads: int | None = None,
) -> StackResult:
    """Stack a cube ``(nframes, rows, cols)`` held in memory with the Cython kernel."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    errors = np.ascontiguousarray(errors, dtype=np.float32)
    qual = np.ascontiguousarray(qual, dtype=np.uint8)
    if data.ndim != 3 or errors.shape != data.shape or qual.shape != data.shape:
        raise ValueError("data, errors and qual must be 3-D arrays of one shape")
    rows, cols = data.shape[1:]
    out = StackResult(
        value=np.empty((rows, cols), np.float32),
        error=np.empty((rows, cols), np.float32),
        count=np.empty((rows, cols), np.int16),
        qual=np.empty((rows, cols), np.uint8),
    )
    _stack_band(data, errors, qual, settings, out, 0, rows, default_threads(threads))
    return out


def clip_and_stack(
    readers: Sequence[BandReader],
    shape: tuple[int, int],
    settings: ClipSettings = ClipSettings(),
    band_rows: int | None = None,
    threads: int | None = None,
    on_frame: Callable[[int, int, int, np.ndarray, np.ndarray, np.ndarray], None]
    | None = None,
) -> StackResult:
    """Stack frames delivered in row bands.

    Parameters
    ----------
    readers : sequence of callables
        ``reader(start, stop, data, errors, qual)`` fills rows start:stop of one frame into
        the three (rows, cols) arrays it is given.
    shape : (rows, cols)
        Shape of every prepared frame.
    settings : ClipSettings
    band_rows : int, optional
        Rows per band; by default about 96 MB of stack is held at once.
    threads : int, optional
        Threads (default: all cores this process may use): the kernel's, and as many workers
        that fill the frames of a band in parallel, one frame each (so readers should run
        single-threaded, and must be safe to call for different frames at once).
    on_frame : callable, optional
        Called as ``on_frame(k, start, stop, data, errors, qual)`` with each frame's band
        right after it is filled, in the same worker, so that per-frame statistics are
        gathered in the same single pass while the band is still in cache.  Calls for
        different frames may run at once.

    Returns
    -------
    StackResult
    """
    nframes = len(readers)
    if nframes == 0:
        raise ValueError("no frames to stack")
    rows, cols = shape
    band_rows = band_rows or band_rows_for(nframes, cols)
    band_rows = min(band_rows, rows)
    result = StackResult(
        value=np.empty((rows, cols), np.float32),
        error=np.empty((rows, cols), np.float32),
        count=np.empty((rows, cols), np.int16),
        qual=np.empty((rows, cols), np.uint8),
    )
    size = nframes * band_rows * cols
    cube, ecube = np.empty(size, np.float32), np.empty(size, np.float32)
    qcube = np.empty(size, np.uint8)
    nthreads = default_threads(threads)
    # workers fill whole frames: fewer, larger tasks than threading inside each frame's
    # preparation, and no idle spinning between them when the machine is busy
    pool = ThreadPoolExecutor(min(nthreads, nframes)) if nthreads > 1 and nframes > 1 \
        else None
    try:
        for start in range(0, rows, band_rows):
            stop = min(rows, start + band_rows)
            shape3 = (nframes, stop - start, cols)
            used = nframes * (stop - start) * cols
            # views of the leading part of the buffers: C-contiguous whatever the band height
            d, e, q = (a[:used].reshape(shape3) for a in (cube, ecube, qcube))

            tasks = [(k, start, stop, d[k], e[k], q[k]) for k in range(nframes)]
            if pool is None:
                for task in tasks:
                    _fill_frame(readers, on_frame, task)
            else:
                list(pool.map(lambda task: _fill_frame(readers, on_frame, task), tasks))
            _stack_band(d, e, q, settings, result, start, stop, nthreads)
    finally:
        if pool is not None:
            pool.shutdown()
    return result


def _fill_frame(readers: Sequence[BandReader], on_frame, task: tuple) -> None:
    """Fill one frame's band and gather its statistics (one worker task)."""
    k, start, stop, data, errors, qual = task
    readers[k](start, stop, data, errors, qual)
    if on_frame is not None:
        on_frame(k, start, stop, data, errors, qual)


def _stack_band(d: np.ndarray, e: np.ndarray, q: np.ndarray, settings: ClipSettings,
                result: StackResult, start: int, stop: int, nthreads: int) -> None:
    """Run the kernel on one band cube into rows start:stop of the result."""
    _stacking.clip_and_stack_band(
        d, e, q, settings.reject_bits & 0xFF, float(settings.sigma_lower),
        float(settings.sigma_upper), int(settings.max_iters), _SCALES[settings.scale],
        _COMBINES[settings.combine], result.value[start:stop], result.error[start:stop],
        result.count[start:stop], result.qual[start:stop],
        median_error_factors(d.shape[0]), nthreads, int(settings.error_floor),
    )


# ---------------------------------------------------------------------------------------------
# Pure-numpy reference: same algorithm, vectorised over pixels.  Slow; for tests only.
# ---------------------------------------------------------------------------------------------
def _sorted_median(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median along axis 0 of ``x`` whose valid values are not NaN (NaN sorts last)."""
    s = np.sort(x, axis=0)
    n = counts.astype(np.intp)
    upper = np.clip(n // 2, 0, x.shape[0] - 1)
    lower = np.clip(n // 2 - 1, 0, x.shape[0] - 1)
    hi = np.take_along_axis(s, upper[None], 0)[0]
    lo = np.take_along_axis(s, lower[None], 0)[0]
    return np.where(n % 2 == 1, hi, (lo + hi) / 2.0)


def clip_and_stack_reference(
    data: np.ndarray, errors: np.ndarray, qual: np.ndarray,
    settings: ClipSettings = ClipSettings(),
) -> StackResult:
    """Pure-numpy implementation of the kernel's algorithm (see ``cython/stacking.pyx``)."""
    vals64 = np.asarray(data, np.float32).astype(np.float64)
    errs64 = np.asarray(errors, np.float32).astype(np.float64)
    qual = np.asarray(qual, np.uint8)
    good = ((qual & np.uint8(settings.reject_bits & 0xFF)) == 0) & np.isfinite(vals64) \
        & np.isfinite(errs64)
    vals = np.where(good, vals64, np.nan)
    active = good.copy()
    running = good.any(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(settings.max_iters):
            if not running.any():
                break
            x = np.where(active, vals, np.nan)
            m = active.sum(axis=0)
            centre = _sorted_median(x, m)
            if settings.scale == "mad_std":
                scale = MAD_TO_STD * _sorted_median(np.abs(x - centre), m)
            else:
                total = np.sum(np.where(active, vals, 0.0), axis=0)
                mean = total / m
                dev = np.where(active, vals - mean, 0.0)
                scale = np.sqrt(np.sum(dev * dev, axis=0) / m)
            if settings.error_floor:
                floor = np.sqrt(np.sum(np.where(active, errs64 * errs64, 0.0), axis=0) / m)
                scale = np.where(floor > scale, floor, scale)
            usable = running & (scale > 0)
            lower = centre - settings.sigma_lower * scale
            upper = centre + settings.sigma_upper * scale
            keep = active & (vals >= lower) & (vals <= upper)
            kept = keep.sum(axis=0)
            update = usable & (kept != m)
            active = np.where(update, keep, active)
            running = update & (kept > 0)
        n = active.sum(axis=0)
        total = np.sum(np.where(active, vals, 0.0), axis=0)
        sumsq = np.sum(np.where(active, errs64 * errs64, 0.0), axis=0)
        if settings.combine == "mean":
            value = total / n
            error = np.sqrt(sumsq) / n
        else:
            value = _sorted_median(np.where(active, vals, np.nan), n)
            error = median_error_factors(vals.shape[0])[n] * np.sqrt(sumsq) / n
    empty = n == 0
    value = np.where(empty, np.nan, value).astype(np.float32)
    error = np.where(empty, np.nan, error).astype(np.float32)
    qout = np.bitwise_and.reduce(qual, axis=0) | np.where(empty, np.uint8(Qual.NO_DATA),
                                                           np.uint8(0))
    return StackResult(value=value, error=error, count=n.astype(np.int16),
                       qual=qout.astype(np.uint8))
