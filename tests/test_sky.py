"""Unit tests of the sky model's pieces (soxs_core.extraction.sky); the accuracy on
simulated frames is in test_sky_truth.py."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import BSpline

from soxs_core.extraction import sky as S
from soxs_core.io.image import DetectorImage


def test_parameters_from_mapping_hyphen_underscore_prefix():
    p = S.SkyParameters.from_mapping({
        "percentile-clipping-sigma": "4", "bspline_order": 2.0,
        "sky-subtraction.starting-points-per-knot": 300, "aggressive-object-masking": True,
        "use-flat": False, "unrelated": 1})
    assert p.percentile_clipping_sigma == 4.0
    assert p.bspline_order == 2 and isinstance(p.bspline_order, int)
    assert p.starting_points_per_knot == 300
    assert p.aggressive_object_masking is True
    assert p.min_points_per_knot == 11     # untouched default
    with pytest.raises(ValueError, match="min_points_per_knot"):
        S.SkyParameters(starting_points_per_knot=5, min_points_per_knot=11)
    with pytest.raises(ValueError, match="bspline_order"):
        S.SkyParameters(bspline_order=0)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_basis_matches_scipy(degree):
    rng = np.random.default_rng(1)
    breaks = np.r_[0.0, np.sort(rng.uniform(0, 1, 30)), 1.0]
    knots = S._full_knots(breaks, degree)
    x = np.r_[0.0, rng.uniform(0, 1, 2000), 1.0]
    values, first = S._design(knots, degree, x)
    dense = BSpline.design_matrix(x, knots, degree).toarray()
    ours = np.zeros_like(dense)
    for a in range(degree + 1):
        ours[np.arange(x.size), first + a] = values[:, a]
    np.testing.assert_allclose(ours, dense, atol=1e-12)


def test_banded_fit_and_inverse_match_dense_algebra():
    """The banded normal equations, their solution and the band of the inverse (the
    model's error) equal the dense computations."""
    rng = np.random.default_rng(2)
    k = 3
    knots = S._full_knots(np.linspace(0, 10, 41), k)
    x = rng.uniform(0, 10, 5000)
    y = np.sin(x) + rng.normal(0, 0.1, x.size)
    w = rng.uniform(0.5, 2, x.size)
    values, first = S._design(knots, k, x)
    nc = knots.size - k - 1
    ab, rhs = S._banded_normal(values, first, w, y, nc)
    coef, chol = S._solve(ab, rhs)
    dense_b = BSpline.design_matrix(x, knots, k).toarray()
    n = dense_b.T @ (w[:, None] * dense_b)
    full = np.zeros((nc, nc))
    for d in range(k + 1):
        full += np.diag(ab[d, : nc - d], -d)
        if d:
            full += np.diag(ab[d, : nc - d], d)
    np.testing.assert_allclose(full, n, rtol=1e-10, atol=1e-8)
    pen = np.zeros_like(ab)
    S._add_penalty(pen, 1.0)
    d2 = np.diff(np.eye(nc), 2, axis=0)
    np.testing.assert_allclose(pen[0], np.diag(d2.T @ d2))
    scale = float(np.median(ab[0]))
    n_pen = n + S.PENALTY * scale * (d2.T @ d2)
    np.testing.assert_allclose(coef, np.linalg.solve(n_pen, dense_b.T @ (w * y)),
                               rtol=1e-8, atol=1e-10)
    inv = np.linalg.inv(n_pen)
    band = S._banded_inverse_band(chol)
    for d in range(k + 1):
        np.testing.assert_allclose(band[d, : nc - d], np.diag(inv, -d), rtol=1e-7,
                                   atol=1e-12)


def test_segment_median():
    rng = np.random.default_rng(3)
    seg = rng.integers(0, 7, 500)
    seg[seg == 4] = 5                           # a segment with no values
    val = rng.normal(size=500)
    got = S._segment_median(seg, val, 7)
    for j in range(7):
        want = np.median(val[seg == j]) if np.any(seg == j) else 0.0
        assert got[j] == pytest.approx(want)


def _synthetic(tilt: float, n_rows: int = 600, n_cols: int = 40, seed: int = 4):
    """A frame with one order: sky = G(lambda) J(s), G a continuum with narrow lines."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:n_rows, 0:n_cols].astype(float)
    slit = (c - (n_cols - 1) / 2) * 0.25
    wave = 500 + 0.01 * (r + tilt * slit)
    lines = np.zeros_like(wave)
    for centre, height in ((501.0, 400.0), (502.2, 900.0), (503.5, 150.0), (504.4, 2000.0)):
        lines += height * np.exp(-0.5 * ((wave - centre) / 0.02) ** 2)
    g = 20 + 5 * np.sin(wave) + lines
    j = 1 + 0.03 * slit / 5 - 0.02 * (slit / 5) ** 2
    truth = g * j
    ron = 3.0
    data = truth + rng.normal(0, 1, truth.shape) * np.sqrt(truth + ron**2)
    error = np.sqrt(np.maximum(data, 0) + ron**2)
    order = np.full(truth.shape, 7, np.int16)
    qual = np.zeros(truth.shape, np.uint8)
    return (data.astype(np.float32), error.astype(np.float32), qual, wave.astype(np.float32),
            slit.astype(np.float32), order, truth, np.sqrt(truth + ron**2))


@pytest.mark.parametrize("tilt", [0.0, 8.0])
def test_synthetic_order_tilted_and_untilted(tilt):
    """Without tilt each row is one wavelength (SOXS VIS-like): the spline must stay
    stable; with tilt it must use the sub-pixel sampling.  Either way the model is the
    truth within its errors."""
    data, error, qual, wave, slit, order, truth, noise = _synthetic(tilt)
    params = S.SkyParameters(starting_points_per_knot=40, min_points_per_knot=9)
    model = S.fit_sky(data, error, qual, wave, slit, order, [7], params=params)
    fit = model.fits[7]
    inner = (slit >= fit.slit_range[0]) & (slit <= fit.slit_range[1])
    r = (data - model.sky)[model.used] / noise[model.used]
    assert np.sqrt(np.mean(r**2)) < 1.05
    pull = (model.sky - truth)[inner] / model.error[inner]
    assert 0.8 < np.std(pull) < 1.25, np.std(pull)
    assert abs(np.mean((model.sky - truth)[inner] / noise[inner])) < 0.05
    assert np.all(np.isfinite(model.sky)) and np.all(model.error > 0)
    if tilt == 0:
        # knots never closer than one row's wavelength step where rows are single-valued
        assert np.min(np.diff(np.unique(fit.knots))) >= 0.01 * (1 - 1e-6)


def test_object_mask_and_subtract_sky():
    data, error, qual, wave, slit, order, truth, noise = _synthetic(8.0)
    mask = S.object_band_mask(data.shape, "y", {7: (np.arange(600), np.full(600, 19.5))},
                              2.0)
    assert mask[:, 18:22].all() and not mask[:, :17].any() and not mask[:, 23:].any()
    data[mask] += 500.0                         # an object
    qual[10, 5] = 16                           # a flagged pixel stays out
    model = S.fit_sky(data, error, qual, wave, slit, order, [7], object_mask=mask)
    assert not model.used[mask].any() and not model.used[10, 5]
    assert model.object_mask[mask].all()
    image = DetectorImage(data, error, qual)
    sub = S.subtract_sky(image, model)
    res = S.sky_residuals(sub, model.used)
    np.testing.assert_allclose(sub.data, data - model.sky, rtol=1e-6)
    np.testing.assert_allclose(sub.error ** 2, error**2 + model.error**2, rtol=1e-5)
    assert np.array_equal(sub.qual, qual)
    assert np.all(np.isnan(res.data[~model.used])) and np.all(res.error[~model.used] == 0)
    assert np.array_equal(res.data[model.used], sub.data[model.used])
    # the sky under the object is bridged, not pulled up by it
    assert abs(np.mean((model.sky - truth)[mask] / noise[mask])) < 0.1


@pytest.mark.parametrize("poisson_scale", [None, 1.0])
def test_faint_sky_with_noisy_outliers_is_not_pulled_up(poisson_scale):
    """A faint sky (2-3 e- per pixel under 3 e- read noise) with 1 % of unflagged pixels
    whose error is far above their signal's Poisson noise (a missed hot pixel, a poorly
    calibrated column): a variance model taken from a least-squares line through the pixels
    came out tens of times too steep, weighted the pixels above the model more than those
    below, and ran the sky up by several electrons (full X-shooter VIS frames: 3.5 e-)."""
    rng = np.random.default_rng(11)
    n_rows, n_cols = 1500, 40
    r, c = np.mgrid[0:n_rows, 0:n_cols].astype(float)
    slit = (c - (n_cols - 1) / 2) * 0.25
    wave = 500 + 0.01 * (r + 8.0 * slit)
    truth = 2.0 + 0.5 * np.sin(wave * 3) + 30 * np.exp(-0.5 * ((wave - 505) / 0.02) ** 2)
    ron = 3.0
    data = truth + rng.normal(0, 1, truth.shape) * np.sqrt(truth + ron**2)
    error = np.sqrt(np.maximum(data, 0) + ron**2)
    odd = rng.random(truth.shape) < 0.01
    data[odd] += rng.uniform(5, 60, odd.sum())
    error[odd] = np.sqrt(np.maximum(data[odd], 0) * 40.0 + ron**2)
    order = np.full(truth.shape, 7, np.int16)
    qual = np.zeros(truth.shape, np.uint8)
    model = S.fit_sky(data.astype(np.float32), error.astype(np.float32), qual,
                      wave.astype(np.float32), slit.astype(np.float32), order, [7],
                      params=S.SkyParameters(starting_points_per_knot=40),
                      poisson_scale=poisson_scale)
    fit = model.fits[7]
    inner = (slit >= fit.slit_range[0]) & (slit <= fit.slit_range[1]) & ~odd
    bias = np.median((model.sky - truth)[inner])
    assert abs(bias) < 0.1, bias
