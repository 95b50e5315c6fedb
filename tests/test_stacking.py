"""The Cython clip_and_stack kernel against its pure-numpy reference and against truth."""

import numpy as np
import pytest

from soxs_core.combine.stacking import (
    ClipSettings,
    clip_and_stack,
    clip_and_stack_arrays,
    clip_and_stack_reference,
    median_error_factor,
)
from soxs_core.detector.quality import Qual


def _cube(rng, nframes, shape=(37, 53), clean=False):
    """A stack with cosmic rays; unless ``clean``, also NaNs, infinities and flagged values.

    A clean stack exercises the kernel's fast path for tiles whose values are all usable."""
    data = rng.normal(100.0, 5.0, (nframes, *shape)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += rng.uniform(50, 5000)  # cosmic rays
    if clean:
        data[:, 7, 8] = 42.0  # ties, zero scale
        data[:, 9, :5] = np.float32(100.5)
        data[0, 9, :5] = 1e4   # one outlier among ties
        return data, rng.uniform(4.0, 6.0, data.shape).astype(np.float32), \
            np.zeros(data.shape, np.uint8)
    data[rng.random(data.shape) < 0.02] = np.nan
    data[rng.random(data.shape) < 0.005] = np.inf
    errors = rng.uniform(4.0, 6.0, data.shape).astype(np.float32)
    errors[rng.random(data.shape) < 0.005] = np.nan
    qual = np.zeros(data.shape, np.uint8)
    qual[rng.random(data.shape) < 0.05] |= np.uint8(Qual.COSMIC)
    qual[rng.random(data.shape) < 0.05] |= np.uint8(Qual.COLD)  # not a rejecting bit
    qual[:, 3, 4] |= np.uint8(Qual.SATURATED)                  # all frames masked
    qual[:, 2, 2] = np.uint8(Qual.STATIC_BAD)                  # a label, not a rejection
    data[:, 2, 2], errors[:, 2, 2] = 100.0 + np.arange(nframes), 5.0
    data[:, 5, 6] = np.nan                                      # all frames NaN
    data[:, 7, 8] = 42.0                                        # ties, zero scale
    errors[:, 7, 8] = 5.0
    qual[:, 7, 8] = 0
    return data, errors, qual


@pytest.mark.parametrize("nframes", [1, 2, 3, 4, 7, 11])
@pytest.mark.parametrize("scale", ["mad_std", "std"])
@pytest.mark.parametrize("combine", ["mean", "median"])
@pytest.mark.parametrize("floor", [False, True])
@pytest.mark.parametrize("clean", [False, True])
def test_kernel_equals_reference(nframes, scale, combine, floor, clean):
    rng = np.random.default_rng(nframes * 7 + len(scale) + len(combine) + floor)
    data, errors, qual = _cube(rng, nframes, shape=(23, 150) if clean else (37, 53),
                               clean=clean)
    settings = ClipSettings(sigma_lower=2.5, sigma_upper=3.0, max_iters=5, scale=scale,
                            combine=combine, error_floor=floor)
    fast = clip_and_stack_arrays(data, errors, qual, settings, threads=2)
    ref = clip_and_stack_reference(data, errors, qual, settings)
    np.testing.assert_array_equal(fast.count, ref.count)
    np.testing.assert_array_equal(fast.qual, ref.qual)
    np.testing.assert_array_equal(fast.value, ref.value)  # NaN == NaN for array_equal
    np.testing.assert_array_equal(fast.error, ref.error)


def test_fully_masked_pixels_are_flagged_and_input_bits_kept():
    rng = np.random.default_rng(3)
    data, errors, qual = _cube(rng, 5)
    out = clip_and_stack_arrays(data, errors, qual, ClipSettings())
    assert out.qual[3, 4] == Qual.NO_DATA | Qual.SATURATED
    # a static bad pixel is stacked like any other and keeps its bit, without NO_DATA
    assert out.qual[2, 2] == Qual.STATIC_BAD and out.count[2, 2] == 5
    assert out.value[2, 2] == 102.0 and out.error[2, 2] == pytest.approx(5 / np.sqrt(5))
    assert out.qual[5, 6] & Qual.NO_DATA and np.isnan(out.value[5, 6])
    assert out.count[3, 4] == 0 and out.count[5, 6] == 0
    assert out.value[7, 8] == 42.0 and out.count[7, 8] == 5


def test_banded_streaming_equals_in_memory_and_is_thread_independent():
    rng = np.random.default_rng(5)
    data, errors, qual = _cube(rng, 6, shape=(101, 64))
    settings = ClipSettings(3, 3, 3)
    whole = clip_and_stack_arrays(data, errors, qual, settings, threads=1)
    def reader(k):
        def fill(start, stop, d, e, q):
            d[...], e[...], q[...] = data[k, start:stop], errors[k, start:stop], \
                qual[k, start:stop]
        return fill

    readers = [reader(k) for k in range(6)]
    banded = clip_and_stack(readers, (101, 64), settings, band_rows=17, threads=2)
    for name in ("value", "error", "count", "qual"):
        np.testing.assert_array_equal(getattr(banded, name), getattr(whole, name))


def test_clipped_mean_is_unbiased_rejects_outliers_and_errors_are_calibrated():
    rng = np.random.default_rng(11)
    nframes, shape, sigma = 9, (200, 200), 4.0
    truth = rng.uniform(500, 600, shape).astype(np.float32)
    data = truth + rng.normal(0, sigma, (nframes, *shape)).astype(np.float32)
    hits = rng.random(data.shape) < 0.01
    data[hits] += rng.uniform(200, 2000, hits.sum()).astype(np.float32)
    errors = np.full(data.shape, sigma, np.float32)
    out = clip_and_stack_arrays(data, errors, np.zeros(data.shape, np.uint8),
                                ClipSettings(5, 5, 3))
    pull = (out.value - truth) / out.error
    assert abs(np.mean(pull)) < 0.02
    assert 0.95 < np.std(pull) < 1.05
    # every cosmic ray was rejected: no pixel is off by more than 6 sigma of the master
    assert np.max(np.abs(pull)) < 6.0
    assert (out.count < nframes).sum() >= 0.95 * hits.any(axis=0).sum()


def test_settings_are_validated():
    with pytest.raises(ValueError):
        ClipSettings(scale="iqr")
    with pytest.raises(ValueError):
        ClipSettings(combine="sum")
    with pytest.raises(ValueError):
        ClipSettings(sigma_lower=0)


@pytest.mark.parametrize("nframes", [3, 4, 5, 6, 7, 8, 9, 10, 11, 33, 34])
def test_median_error_factor_is_the_noise_of_monte_carlo_medians(nframes):
    """The factor against the measured scatter of sample medians of Gaussian values."""
    rng = np.random.default_rng(nframes)
    draws = 400_000 if nframes < 20 else 100_000
    medians = np.median(rng.standard_normal((draws, nframes)), axis=1)
    measured = np.std(medians) * np.sqrt(nframes)
    # the std of `draws` nearly Gaussian values is known to 1/sqrt(2 draws); 5 sigma
    tolerance = 5 / np.sqrt(2 * draws)
    assert median_error_factor(nframes) == pytest.approx(measured, rel=tolerance)


@pytest.mark.parametrize("iterations", [0, 3])
@pytest.mark.parametrize("nframes", range(3, 12))
def test_median_combined_errors_are_calibrated(nframes, iterations):
    """Pull of a median combine against truth: std 1 for every small frame count."""
    rng = np.random.default_rng(100 + nframes)
    shape = (250, 400)
    truth = rng.uniform(100, 200, shape).astype(np.float32)
    sigma = rng.uniform(3, 6, shape).astype(np.float32)
    data = truth + sigma * rng.standard_normal((nframes, *shape), dtype=np.float32)
    errors = np.broadcast_to(sigma, data.shape)
    out = clip_and_stack_arrays(data, errors, np.zeros(data.shape, np.uint8),
                                ClipSettings(3, 3, iterations, combine="median"))
    pull = (out.value - truth) / out.error
    # the std of 100 000 pulls is known to 1/sqrt(2 * 100 000); 5 sigma (a 3-sigma clip of
    # Gaussian values, iterations=3, moves it by less than 0.6 %)
    assert np.std(pull) == pytest.approx(1.0, abs=5 / np.sqrt(2 * pull.size))
    assert abs(np.mean(pull)) < 5 / np.sqrt(pull.size)
