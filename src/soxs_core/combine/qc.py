"""Image statistics behind the QC keywords and the bad-pixel detection of masters.

Small functions on arrays; none of them knows about files or recipes.
"""

from __future__ import annotations

import numpy as np

from soxs_core import _blocks

__all__ = [
    "clipped_stats",
    "read_noise_from_pair",
    "smooth_background",
    "structure_slopes",
    "periodic_pattern_metric",
    "block_mean",
    "good_block_mean",
    "good_block_mean_reference",
]

MAD_TO_STD = 1.482602218505602


def clipped_stats(values: np.ndarray, sigma: float = 3.0, iterations: int = 3,
                  centre: str = "mean") -> tuple[float, float, float]:
    """Sigma-clipped (mean, median, std) of the finite values.

    Clipping uses the mean (``centre='mean'``, as the seed recipes' frame statistics do) or
    the median as centre and the standard deviation as scale.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    for _ in range(max(0, int(iterations))):
        c = v.mean() if centre == "mean" else np.median(v)
        s = v.std()
        if not s > 0:
            break
        keep = np.abs(v - c) <= sigma * s
        if keep.all():
            break
        v = v[keep]
        if v.size == 0:
            return float("nan"), float("nan"), float("nan")
    return float(v.mean()), float(np.median(v)), float(v.std())


def robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation of the finite values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_STD * np.median(np.abs(v - np.median(v))))


def read_noise_from_pair(a: np.ndarray, b: np.ndarray, sigma: float = 5.0,
                         iterations: int = 3) -> float:
    """Read noise of one frame from the difference of two: clipped std(a - b) / sqrt(2).

    Fixed structure (bias pattern, hot pixels) cancels in the difference, so this measures
    the temporal noise only.
    """
    diff = (np.asarray(a, np.float32) - np.asarray(b, np.float32)).ravel()
    diff = diff[np.isfinite(diff)]
    if diff.size > 100_000:  # 50 000 values give the noise to 0.3 %: plenty for a QC figure
        diff = diff[:: diff.size // 50_000]
    diff = diff.astype(np.float64)
    if diff.size == 0:
        return float("nan")
    # start from a robust estimate so that cosmic rays cannot inflate the first pass
    med = np.median(diff)
    s = robust_std(diff)
    for _ in range(max(1, iterations)):
        keep = np.abs(diff - med) <= sigma * s
        if not keep.any():
            break
        med = np.mean(diff[keep])
        s = np.std(diff[keep])
    return float(s / np.sqrt(2.0))


def block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """Mean over non-overlapping ``block`` x ``block`` cells (edges that do not fill a cell
    are dropped), in float32."""
    ny, nx = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    cut = np.asarray(image[:ny, :nx], np.float32)
    rows = cut.reshape(ny // block, block, nx).sum(axis=1)
    return rows.reshape(ny // block, nx // block, block).sum(axis=2) / np.float32(block * block)


def good_block_mean(data: np.ndarray, qual: np.ndarray, block: int,
                    threads: int = 1) -> np.ndarray:
    """Mean over the good (QUAL 0, finite) pixels of non-overlapping ``block`` x ``block``
    cells, in float32; NaN for a cell without good pixels.  Edges that do not fill a cell are
    dropped.  One pass of the ``_blocks`` kernel; its numpy twin is
    :func:`good_block_mean_reference`."""
    data = np.ascontiguousarray(data, np.float32)
    qual = np.ascontiguousarray(qual, np.uint8)
    out = np.empty((data.shape[0] // block, data.shape[1] // block), np.float32)
    _blocks.good_block_mean(data, qual, int(block), out, int(threads))
    return out


def good_block_mean_reference(data: np.ndarray, qual: np.ndarray, block: int) -> np.ndarray:
    """Numpy twin of :func:`good_block_mean`: the same sums in the same order."""
    data = np.asarray(data, np.float32)
    qual = np.asarray(qual, np.uint8)
    nby, nbx = data.shape[0] // block, data.shape[1] // block
    colsum = np.zeros((nby, nbx * block), np.float64)
    colcount = np.zeros((nby, nbx * block), np.int64)
    for i in range(block):
        cut = (slice(i, nby * block, block), slice(0, nbx * block))
        values = data[cut]
        ok = (qual[cut] == 0) & np.isfinite(values)
        colsum += np.where(ok, values.astype(np.float64), 0.0)
        colcount += ok
    total = np.zeros((nby, nbx), np.float64)
    count = np.zeros((nby, nbx), np.int64)
    for j in range(block):
        total += colsum[:, j::block]
        count += colcount[:, j::block]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (total / count).astype(np.float32)
    mean[count == 0] = np.nan
    return mean


def _interpolation_weights(n: int, cell: int, ncell: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper cell index and weight of the upper one, for linear interpolation from cell
    centres to the centres of ``n`` pixels (end cells extended to the edges)."""
    pos = np.clip((np.arange(n) + 0.5) / cell - 0.5, 0, ncell - 1)
    low = np.floor(pos).astype(np.intp)
    high = np.minimum(low + 1, ncell - 1)
    return low, high, (pos - low).astype(np.float32)


def _interpolate_cells(cells: np.ndarray, shape: tuple[int, int], cy: int, cx: int,
                       rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Bilinear interpolation of a grid of cell values onto the image of ``shape``, evaluated
    at the pixels ``[rows, cols]`` (``np.take`` gathers: much faster than fancy indexing)."""
    ly, hy, fy = (w[rows] for w in _interpolation_weights(shape[0], cy, cells.shape[0]))
    lx, hx, fx = (w[cols] for w in _interpolation_weights(shape[1], cx, cells.shape[1]))
    cells = np.asarray(cells, np.float32)
    # interpolate along y on the small grid first: the full-size work is then one x pass
    along_y = np.take(cells, ly, axis=0) * (1 - fy)[:, None] \
        + np.take(cells, hy, axis=0) * fy[:, None]
    out = np.take(along_y, lx, axis=1)
    out *= (1 - fx)[None, :]
    upper = np.take(along_y, hx, axis=1)
    upper *= fx[None, :]
    out += upper
    return out


def _median_along_rows(values: np.ndarray) -> np.ndarray:
    """Median of each column: partitioning contiguous rows of the transpose is several times
    faster than partitioning along the strided axis."""
    return np.median(np.ascontiguousarray(values.T), axis=1)


def _line_outliers_replaced(term: np.ndarray, limit: float, half: int = 3) -> np.ndarray:
    """A row or column term with the values further than ``limit`` from the median of their
    2 * half + 1 neighbours replaced by that median.  A single step (an amplifier channel's
    edge) keeps every value: the neighbours' majority lies on each line's own side."""
    if term.size < 2 * half + 1:
        return term
    padded = np.pad(term, half, mode="edge")
    local = np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)
    return np.where(np.abs(term - local) > limit, local, term).astype(term.dtype)


def smooth_background(image: np.ndarray, good: np.ndarray, cell: int = 32,
                      iterations: int = 2, sigma: float = 5.0, step: int = 2,
                      lines: bool = True, line_limit: float | None = None) -> np.ndarray:
    """Large-scale model of an image: cell medians, interpolated, plus row and column terms.

    The cell medians follow gradients and smooth 2-D structure; the column (and row) medians
    of the residual then follow the column-to-column offsets that CCD biases have.  Pixels
    more than ``sigma`` robust standard deviations from the model are left out and the model
    is refitted, up to ``iterations`` times.  Cell medians are taken over every ``step``-th
    row and column, and the row and column terms (which average over a whole line) over every
    ``2 * step``-th, which is plenty for a smooth model and keeps this cheap on 8-Mpixel
    frames: only the final model is evaluated at every pixel.  ``lines=False`` leaves out the
    row and column terms (a purely smooth model).  With ``line_limit``, a row or column term
    further than that from its neighbours' is taken for a defect, not structure, and replaced
    by theirs: a bad column covering most of its column would otherwise become the column's
    level, hiding itself and making its unaffected part look low.
    """
    data = np.asarray(image, np.float32)
    good = np.asarray(good, bool)
    ny, nx = data.shape
    cy, cx = max(1, min(cell, ny)), max(1, min(cell, nx))
    ncy, ncx = max(1, ny // cy), max(1, nx // cx)
    # cells are sampled on the step grid when it tiles them, else at every pixel
    cstep = step if cy % step == 0 and cx % step == 0 else 1
    every = slice(None, None, 2 * step)
    sample = data[::97]
    sample_use = good[::97] & np.isfinite(sample)
    fill = float(np.median(sample[sample_use])) if sample_use.any() else 0.0
    use = None  # pixels that enter the medians; None: the good, finite ones
    cells = np.full((ncy, ncx), fill, np.float32)
    col = np.zeros(nx, np.float32)
    row = np.zeros(ny, np.float32)
    fitted = False

    def usable(rows: slice, cols: slice) -> np.ndarray:
        if use is not None:
            return use[rows, cols]
        return good[rows, cols] & np.isfinite(data[rows, cols])

    def current(rows: slice, cols: slice) -> np.ndarray:
        """The current model at [rows, cols] (masked pixels take it, leaving medians
        unbiased)."""
        if not fitted:
            return np.float32(fill)
        part = _interpolate_cells(cells, (ny, nx), cy, cx, rows, cols)
        part += col[cols][None, :]
        part += row[rows][:, None]
        return part

    for iteration in range(max(1, iterations)):
        grid = (slice(0, ncy * cy, cstep), slice(0, ncx * cx, cstep))
        filled = np.where(usable(*grid), data[grid], current(*grid))
        blocks = filled.reshape(ncy, cy // cstep, ncx, cx // cstep).transpose(0, 2, 1, 3)
        new_cells = np.median(blocks.reshape(ncy, ncx, -1), axis=2).astype(np.float32)
        if lines:
            rows_grid = (every, slice(None))
            filled = np.where(usable(*rows_grid), data[rows_grid], current(*rows_grid))
            filled -= _interpolate_cells(new_cells, (ny, nx), cy, cx, *rows_grid)
            new_col = _median_along_rows(filled).astype(np.float32)
            if line_limit is not None:
                new_col = _line_outliers_replaced(new_col, line_limit)
            cols_grid = (slice(None), every)
            filled = np.where(usable(*cols_grid), data[cols_grid], current(*cols_grid))
            filled -= _interpolate_cells(new_cells, (ny, nx), cy, cx, *cols_grid)
            filled -= new_col[every][None, :]
            row = np.median(filled, axis=1).astype(np.float32)
            if line_limit is not None:
                row = _line_outliers_replaced(row, line_limit)
            col = new_col
        cells = new_cells
        fitted = True
        if iteration + 1 >= max(1, iterations):
            break
        model = current(slice(None), slice(None))
        deviation = data - model
        scale = robust_std(deviation[::4, ::4][usable(slice(None, None, 4),
                                                       slice(None, None, 4))])
        if not np.isfinite(scale) or scale <= 0:
            break
        new_use = good & np.isfinite(data) & (np.abs(deviation) <= sigma * scale)
        if use is not None and np.array_equal(new_use, use):
            break
        use = new_use
    model = current(slice(None), slice(None))
    return model


def structure_slopes(image: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    """Slopes (per pixel) of straight-line fits to the mean column profile along x and the mean
    row profile along y, good pixels only."""
    data = np.where(good, np.asarray(image, np.float32), np.float32(0))
    weight = good.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        xprof = data.sum(axis=0, dtype=np.float64) / weight.sum(axis=0, dtype=np.float64)
        yprof = data.sum(axis=1, dtype=np.float64) / weight.sum(axis=1, dtype=np.float64)
    out = []
    for prof in (xprof, yprof):
        ok = np.isfinite(prof)
        if ok.sum() < 2:
            out.append(float("nan"))
            continue
        coords = np.arange(prof.size)[ok]
        out.append(float(np.polyfit(coords, prof[ok], 1)[0]))
    return out[0], out[1]


def _smooth_length(n: int) -> int:
    """The largest length <= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    for m in range(n, 0, -1):
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
    return n


def periodic_pattern_metric(binned: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Periodic-pattern-noise indicator of one block-averaged raw frame.

    The frame minus ``reference`` (the block-averaged master, so that fixed bias structure
    cancels; without one, a smooth model of the frame itself) is Fourier transformed.  The
    indicator is the highest Fourier amplitude over the median amplitude, in units of what
    white noise gives for that many cells (``sqrt(ln N / ln 2)`` for Rayleigh-distributed
    amplitudes).  White noise therefore scores about 1 and a periodic pattern, which puts its
    power into one or two cells, scores its peak's significance.  Cells within two steps of
    zero frequency are ignored, and the Fourier rows/columns next to zero frequency are each
    scaled to the median of the rest, so that residual column-to-column offsets (spread evenly
    along those lines) do not count as a pattern while a spike within them still does.
    """
    data = np.asarray(binned, np.float64)
    if reference is not None:
        data = data - np.asarray(reference, np.float64)
    # a prime length (2048 / 5 = 409) makes the FFT several times slower: drop a few edge
    # cells to reach a length with small factors
    data = data[: _smooth_length(data.shape[0]), : _smooth_length(data.shape[1])]
    finite = np.isfinite(data)
    if not finite.any():
        return float("nan")
    if not finite.all():
        # cells without data (in the frame or the reference) take the typical level: no spike
        data = np.where(finite, data, np.median(data[finite]))
    if reference is not None:
        data = data - data.mean()  # zero frequency is ignored anyway
    else:
        data = data - smooth_background(data, finite, cell=16, iterations=1, step=1,
                                        lines=False)
    amp = np.abs(np.fft.rfft2(data))
    amp[:3, :3] = np.nan
    amp[-2:, :3] = np.nan
    reference_level = np.median(amp[3:-2:2, 3::2]) if amp.shape[0] > 5 and amp.shape[1] > 3 \
        else np.nan
    # the Fourier rows and columns next to zero frequency, without their blanked cells
    lines = [amp[k, 3:] for k in (0, 1, 2, -1, -2)] + [amp[3:-2, k] for k in (0, 1, 2)]
    for line in lines:
        if line.size:
            level = np.median(line)
            if np.isfinite(level) and level > 0 and np.isfinite(reference_level):
                line *= reference_level / level
    amp = amp[np.isfinite(amp)]
    if amp.size < 16:
        return float("nan")
    median = np.median(amp)
    if not median > 0:
        return float("nan")
    return float(np.max(amp) / median / np.sqrt(np.log(amp.size) / np.log(2.0)))
