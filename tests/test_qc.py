"""QC statistics on data with known answers."""

import numpy as np
import pytest

from soxs_core.combine.qc import (
    block_mean,
    clipped_stats,
    good_block_mean,
    good_block_mean_reference,
    periodic_pattern_metric,
    read_noise_from_pair,
    smooth_background,
    structure_slopes,
)
from soxs_core.detector.quality import Qual


def test_pattern_metric_is_one_for_white_noise_and_large_for_a_pattern():
    rng = np.random.default_rng(1)
    shape = (800, 400)
    white = [periodic_pattern_metric(rng.normal(0, 3, shape)) for _ in range(5)]
    assert all(0.8 < w < 1.3 for w in white)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    pattern = 0.4 * np.sin(2 * np.pi * (xx / 6.3 + yy / 17.0))
    noisy = rng.normal(0, 3, shape) + pattern
    assert periodic_pattern_metric(noisy) > 3.0
    # fixed column offsets are bias structure, not a pattern
    columns = rng.normal(0, 3, shape[1])[None, :]
    assert periodic_pattern_metric(rng.normal(0, 3, shape) + columns) < 1.5


def test_pattern_metric_ignores_what_the_reference_removes():
    rng = np.random.default_rng(2)
    structure = np.add.outer(np.linspace(0, 50, 300), rng.normal(0, 5, 200))
    frame = structure + rng.normal(0, 2, structure.shape)
    assert periodic_pattern_metric(frame, reference=structure) < 1.3


def test_read_noise_from_pair_ignores_fixed_structure_and_cosmics():
    rng = np.random.default_rng(3)
    fixed = rng.normal(0, 20, (500, 500))
    a = fixed + rng.normal(0, 4.0, fixed.shape)
    b = fixed + rng.normal(0, 4.0, fixed.shape)
    a[rng.random(a.shape) < 0.001] += 3000
    assert read_noise_from_pair(a, b) == pytest.approx(4.0, rel=0.02)


def test_structure_slopes_recover_a_gradient():
    yy, xx = np.mgrid[:400, :300]
    image = 100 + 0.01 * xx - 0.003 * yy
    sx, sy = structure_slopes(image, np.ones(image.shape, bool))
    assert sx == pytest.approx(0.01, rel=1e-6) and sy == pytest.approx(-0.003, rel=1e-6)


def test_smooth_background_follows_structure_not_defects():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:512, :384]
    truth = 500 + 0.02 * xx + 5 * np.sin(yy / 80.0) + rng.normal(0, 2, 384)[None, :]
    image = truth + rng.normal(0, 1, truth.shape)
    image[rng.random(image.shape) < 0.002] += 500  # hot pixels
    model = smooth_background(image, np.ones(image.shape, bool))
    assert np.std(model - truth) < 0.3


def test_clipped_stats_and_block_mean():
    rng = np.random.default_rng(5)
    values = rng.normal(10, 2, 100000)
    values[:100] = 1e4
    mean, median, std = clipped_stats(values, 3, 5)
    assert mean == pytest.approx(10, abs=0.03) and std == pytest.approx(2, rel=0.03)
    assert block_mean(np.arange(16.0).reshape(4, 4), 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_cell_interpolation_equals_separable_np_interp():
    from soxs_core.combine.qc import _interpolate_cells

    cells = np.random.default_rng(6).normal(0, 1, (7, 5)).astype(np.float32)
    for shape, cy, cx in [((230, 170), 32, 32), ((21, 16), 3, 3), ((7, 5), 1, 1)]:
        py = np.clip((np.arange(shape[0]) + 0.5) / cy - 0.5, 0, cells.shape[0] - 1)
        px = np.clip((np.arange(shape[1]) + 0.5) / cx - 0.5, 0, cells.shape[1] - 1)
        rows = np.array([np.interp(py, np.arange(cells.shape[0]), c) for c in cells.T]).T
        ref = np.array([np.interp(px, np.arange(cells.shape[1]), r) for r in rows])
        np.testing.assert_allclose(_interpolate_cells(cells, shape, cy, cx), ref, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_good_block_mean_kernel_equals_reference_and_truth(block, threads):
    rng = np.random.default_rng(block + 10 * threads)
    data = rng.normal(50.0, 4.0, (103, 71)).astype(np.float32)
    qual = (rng.random(data.shape) < 0.1).astype(np.uint8) * np.uint8(Qual.STATIC_BAD)
    data[rng.random(data.shape) < 0.02] = np.nan
    data[rng.random(data.shape) < 0.01] = np.inf
    qual[:block, :block] = 1  # a cell without any good pixel
    fast = good_block_mean(data, qual, block, threads=threads)
    ref = good_block_mean_reference(data, qual, block)
    np.testing.assert_array_equal(fast, ref)
    # truth: the plain mean of each cell's good pixels
    ny, nx = data.shape[0] // block, data.shape[1] // block
    for by, bx in [(0, 0), (1, 2), (ny - 1, nx - 1), (ny // 2, nx // 3)]:
        cell = (slice(by * block, (by + 1) * block), slice(bx * block, (bx + 1) * block))
        ok = (qual[cell] == 0) & np.isfinite(data[cell])
        expected = data[cell][ok].astype(np.float64).mean() if ok.any() else np.nan
        np.testing.assert_allclose(fast[by, bx], expected, rtol=1e-6)
    assert np.isnan(fast[0, 0])
