"""Image statistics behind the QC keywords and the bad-pixel detection of masters.

Small functions on arrays; none of them knows about files or recipes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "clipped_stats",
    "read_noise_from_pair",
    "smooth_background",
    "structure_slopes",
    "periodic_pattern_metric",
    "block_mean",
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
    if diff.size > 200_000:  # plenty for a noise figure
        diff = diff[:: diff.size // 100_000]
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


def _interpolation_weights(n: int, cell: int, ncell: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper cell index and weight of the upper one, for linear interpolation from cell
    centres to the centres of ``n`` pixels (end cells extended to the edges)."""
    pos = np.clip((np.arange(n) + 0.5) / cell - 0.5, 0, ncell - 1)
    low = np.floor(pos).astype(np.intp)
    high = np.minimum(low + 1, ncell - 1)
    return low, high, (pos - low).astype(np.float32)


def _interpolate_cells(cells: np.ndarray, shape: tuple[int, int], cy: int, cx: int
                       ) -> np.ndarray:
    """Bilinear interpolation of a grid of cell values onto the full image (``np.take``
    gathers: much faster than fancy indexing)."""
    ly, hy, fy = _interpolation_weights(shape[0], cy, cells.shape[0])
    lx, hx, fx = _interpolation_weights(shape[1], cx, cells.shape[1])
    cells = np.asarray(cells, np.float32)
    rows = np.take(cells, ly, axis=0) * (1 - fy)[:, None] \
        + np.take(cells, hy, axis=0) * fy[:, None]
    out = np.take(rows, lx, axis=1)
    out *= (1 - fx)[None, :]
    out += np.take(rows, hx, axis=1) * fx[None, :]
    return out


def smooth_background(image: np.ndarray, good: np.ndarray, cell: int = 32,
                      iterations: int = 2, sigma: float = 5.0, step: int = 2,
                      lines: bool = True) -> np.ndarray:
    """Large-scale model of an image: cell medians, interpolated, plus row and column terms.

    The cell medians follow gradients and smooth 2-D structure; the column (and row) medians
    of the residual then follow the column-to-column offsets that CCD biases have.  Pixels
    more than ``sigma`` robust standard deviations from the model are left out and the model
    is refitted, up to ``iterations`` times.  Medians are taken over every ``step``-th row and
    column, which is plenty for a smooth model and keeps this cheap on 8-Mpixel frames.
    ``lines=False`` leaves out the row and column terms (a purely smooth model).
    """
    data = np.asarray(image, np.float32)
    use = good & np.isfinite(data)
    ny, nx = data.shape
    cy, cx = max(1, min(cell, ny)), max(1, min(cell, nx))
    ncy, ncx = max(1, ny // cy), max(1, nx // cx)
    sub = (slice(None, None, step), slice(None, None, step))
    fill = float(np.median(data[use][::97])) if use.any() else 0.0
    model = np.full(data.shape, fill, np.float32)
    for iteration in range(max(1, iterations)):
        # masked pixels take the current model value, which leaves medians unbiased
        filled = np.where(use, data, model)
        cells = filled[: ncy * cy, : ncx * cx].reshape(ncy, cy, ncx, cx)
        cells = cells[:, ::step, :, ::step]
        med = np.median(cells.transpose(0, 2, 1, 3).reshape(ncy, ncx, -1), axis=2)
        smooth = _interpolate_cells(med.astype(np.float32), (ny, nx), cy, cx)
        if lines:
            col = np.median(filled[sub[0]] - smooth[sub[0]], axis=0)
            row = np.median(filled[:, sub[1]] - smooth[:, sub[1]] - col[None, sub[1]], axis=1)
            smooth += col[None, :]
            smooth += row[:, None]
            model = smooth
        else:
            model = smooth
        if iteration + 1 >= max(1, iterations):
            break
        deviation = data - model
        scale = robust_std(deviation[::4, ::4][use[::4, ::4]])
        if not np.isfinite(scale) or scale <= 0:
            break
        new_use = good & np.isfinite(data) & (np.abs(deviation) <= sigma * scale)
        if np.array_equal(new_use, use):
            break
        use = new_use
    return model.astype(np.float32, copy=False)


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
    finite = np.isfinite(data)
    data = np.where(finite, data, np.nanmedian(data))
    if reference is not None:
        data = data - np.where(np.isfinite(reference), reference, 0.0)
        data -= np.median(data)
    else:
        data = data - smooth_background(data, finite, cell=16, iterations=1, step=1,
                                        lines=False)
    amp = np.abs(np.fft.rfft2(data))
    amp[:3, :3] = np.nan
    amp[-2:, :3] = np.nan
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference_level = np.nanmedian(amp[3:-2:2, 3::2])
        lines = [amp[k, :] for k in (0, 1, 2, -1, -2)] + [amp[:, k] for k in (0, 1, 2)]
        for line in lines:
            level = np.nanmedian(line)
            if np.isfinite(level) and level > 0:
                line *= reference_level / level
    amp = amp[np.isfinite(amp)]
    if amp.size < 16:
        return float("nan")
    median = np.median(amp)
    if not median > 0:
        return float("nan")
    return float(np.max(amp) / median / np.sqrt(np.log(amp.size) / np.log(2.0)))
