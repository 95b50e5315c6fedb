"""Scattered-light model (soxs_core.echelle.background) against the simulator's truth.

Lamp flats are rendered by the instrument simulator, which adds a known scattered-light halo;
Poisson and read noise are added here, the order mask is built from the TRUE order edges
widened by a few pixels, and the model must recover the true halo to within 10 % of its
amplitude everywhere on the frame, under the orders too (issue 8).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

from soxs_core.detector.quality import Qual
from soxs_core.echelle import background as bg
from soxs_core.io.image import DetectorImage
from soxs_core.simulate.instrument import InstrumentSimulator

READ_NOISE = 4.0
WIDEN = 3.0


@functools.lru_cache(maxsize=6)
def scene(arm: str, binning: str = "1x1") -> tuple[InstrumentSimulator, np.ndarray, np.ndarray]:
    """Simulator, light in the orders and true scattered light (e- per binned pixel)."""
    sim = InstrumentSimulator(arm, binning, seed=11)
    if hasattr(sim, "scattered_model"):
        orders, scattered = sim.order_light_model(), sim.scattered_model()
    else:  # simulators before the scattered light was exposed as truth
        from soxs_core.simulate.scene import Source, scattered_light
        from soxs_core.simulate.spectra import qth_lamp

        img = sim.renderer.render([Source("lamp", qth_lamp)], 1.0).images["lamp"]
        lit = img[img > 1e-3 * img.max()]
        img *= np.float32(sim.flat_level / float(np.percentile(lit, 99.5)))
        orders, scattered = img, scattered_light(img, sim.scene.scattered_fraction)
    # the lamp model is exactly these two: the truth is what the flats receive
    np.testing.assert_allclose(sim.lamp_model(), orders + scattered, rtol=1e-6,
                               atol=1e-3 * float(scattered.max()))
    return sim, orders, scattered


def noisy(expected: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lam = np.maximum(expected, 0.0)
    flux = (rng.poisson(lam) + rng.normal(0.0, READ_NOISE, lam.shape)).astype(np.float32)
    return flux, np.sqrt(lam + READ_NOISE ** 2).astype(np.float32)


@functools.lru_cache(maxsize=6)
def true_mask(arm: str, binning: str = "1x1", widen: float = WIDEN) -> np.ndarray:
    sim, _, _ = scene(arm, binning)
    fmt = sim.format
    ranges = {o: (fmt.geometry(o).b_min, fmt.geometry(o).b_max) for o in sim.orders}
    ranges = {o: r for o, r in ranges.items() if np.isfinite(r[0])}
    return bg.in_order_mask_from_edges(
        sim.renderer.shape, list(ranges), ranges, lambda o, b: fmt.edges(o, b)[0],
        lambda o, b: fmt.edges(o, b)[1], fmt.dispersion_axis,
        (sim.detector.binx, sim.detector.biny), widen)


def fit(arm: str, binning: str = "1x1", seed: int = 1, **kwargs):
    sim, orders, scattered = scene(arm, binning)
    flux, err = noisy(orders + scattered, seed)
    mask = true_mask(arm, binning)
    model = bg.fit_background(flux, np.zeros(flux.shape, np.uint8), mask,
                              sim.format.dispersion_axis,
                              binning=(sim.detector.binx, sim.detector.biny), **kwargs)
    return sim, orders, scattered, flux, err, mask, model


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("arm,binning", [("xsh_vis", "1x1"), ("xsh_uvb", "1x1"),
                                         ("xsh_nir", "1x1"), ("soxs_nir", "1x1"),
                                         ("soxs_vis", "1x1"), ("xsh_vis", "2x2")])
def test_recovers_true_scattered_light(arm: str, binning: str) -> None:
    sim, orders, scattered, flux, _, mask, model = fit(arm, binning)
    amplitude = float(scattered.max())
    error = model.model - scattered
    # the orders must hold no light outside the mask, or the test would not be fair
    assert float(orders[~mask].max()) < 1e-3 * amplitude
    worst = float(np.abs(error).max())
    assert worst < 0.10 * amplitude, (arm, binning, worst / amplitude)
    # under the orders (where it is interpolated) as well as between them
    assert float(np.abs(error[mask]).max()) < 0.10 * amplitude
    # the inter-order light itself is followed much closer than the limit
    assert float(np.sqrt(np.mean(error ** 2))) < 0.03 * amplitude
    assert model.model.dtype == np.float32 and model.model.shape == flux.shape
    assert model.used.shape == flux.shape and not (model.used & mask).any()
    # smooth along the dispersion as the truth is (the Gaussian blur there): band-to-band
    # noise would show in the second differences a band apart
    axis = 0 if sim.format.dispersion_axis == "y" else 1
    step = model.band_rows
    take = slice(None, None, step)
    cut_m = model.model[take] if axis == 0 else model.model[:, take]
    cut_t = scattered[take] if axis == 0 else scattered[:, take]
    wiggle = np.sqrt(np.mean(np.diff(cut_m.astype(float), 2, axis=axis) ** 2))
    curvature = np.sqrt(np.mean(np.diff(cut_t.astype(float), 2, axis=axis) ** 2))
    assert wiggle < 1.5 * curvature, (wiggle, curvature)


def test_blind_to_cosmics_and_flagged_pixels() -> None:
    """Cosmic-ray hits (not flagged) and flagged garbage (a bad block, a bad column) leave
    the model where the clean frame puts it."""
    sim, orders, scattered, flux, _, mask, clean = fit("xsh_nir")
    amplitude = float(scattered.max())
    rng = np.random.default_rng(7)
    dirty = flux.copy()
    qual = np.zeros(flux.shape, np.uint8)
    # 2 % of the pixels hit by cosmics of 50-5000 e-, unflagged
    hits = rng.random(flux.shape) < 0.02
    dirty[hits] += rng.uniform(50, 5000, int(hits.sum())).astype(np.float32)
    # a flagged block of garbage and a flagged hot column, between the orders too
    rows, cols = flux.shape
    dirty[rows // 3: rows // 3 + 120, cols // 2: cols // 2 + 150] = 1e6
    qual[rows // 3: rows // 3 + 120, cols // 2: cols // 2 + 150] = Qual.NO_DATA
    dirty[:, cols // 4] = 3e4
    qual[:, cols // 4] = Qual.STATIC_BAD
    dirty[rows // 2, :50] = np.nan
    qual[rows // 2, :50] = Qual.NON_FINITE
    model = bg.fit_background(dirty, qual, mask, "y")
    shift = np.abs(model.model - clean.model)
    assert float(shift.max()) < 0.02 * amplitude, float(shift.max()) / amplitude
    assert float(np.abs(model.model - scattered).max()) < 0.10 * amplitude
    assert not model.used[qual != 0].any()


def test_binned_rows_and_transposed_frame_agree() -> None:
    """SOXS NIR disperses along x: fitting its transpose as a y-dispersed frame gives the
    transposed model exactly (the canonical orientation is the only difference)."""
    sim, orders, scattered, flux, _, mask, model = fit("soxs_nir")
    other = bg.fit_background(np.ascontiguousarray(flux.T), None, np.ascontiguousarray(mask.T),
                              "y")
    np.testing.assert_array_equal(other.model, model.model.T)
    np.testing.assert_array_equal(other.uncertainty, model.uncertainty.T)


@pytest.mark.parametrize("arm", ["soxs_nir", "xsh_nir"])
def test_uncertainty_in_row_bands_is_the_full_plane_cut(arm) -> None:
    """The model error made for a band of rows (the in-place subtraction's way, no
    full-frame plane) is exactly those rows of the whole plane, along either dispersion
    axis, and the in-place subtraction gives the copying one's planes."""
    sim, orders, scattered, flux, err, mask, model = fit(arm)
    full = model.uncertainty
    for start, stop in ((0, 1), (0, 256), (100, 357), (full.shape[0] - 5, full.shape[0] + 9)):
        np.testing.assert_array_equal(model.uncertainty_rows(start, stop), full[start:stop])
    image = DetectorImage(data=flux.astype(np.float32), error=err.astype(np.float32),
                          qual=np.zeros(flux.shape, np.uint8))
    copied = bg.subtract_background(image, model)
    in_place = bg.subtract_background(replace(image, data=image.data.copy(),
                                              error=image.error.copy()), model, overwrite=True)
    np.testing.assert_array_equal(in_place.data, copied.data)
    np.testing.assert_allclose(in_place.error, copied.error, rtol=1e-6)


def test_subtraction_propagates_errors_and_keeps_qual(tmp_path) -> None:
    sim, orders, scattered, flux, err, mask, model = fit("xsh_nir")
    qual = np.zeros(flux.shape, np.uint8)
    qual[10:20, 30:40] = Qual.HOT
    image = DetectorImage(data=flux, error=err, qual=qual)
    out = bg.subtract_background(image, model)
    np.testing.assert_array_equal(out.qual, qual)
    np.testing.assert_allclose(out.data, flux - model.model, rtol=0, atol=1e-3)
    np.testing.assert_allclose(out.error ** 2, err ** 2 + model.uncertainty ** 2, rtol=1e-5)
    assert np.isfinite(model.uncertainty).all() and (model.uncertainty >= 0).all()
    assert float(np.median(model.uncertainty)) > 0 and (out.error > err).any()
    # against the truth: what is left is the orders' light, within the propagated errors
    pull = (out.data - orders) / out.error
    assert 0.9 < float(np.std(pull)) < 1.1
    # a bias well below the pixel noise and 1 % of the amplitude
    assert abs(float(np.mean(pull))) < 0.1
    assert abs(float(np.mean(model.model - scattered))) < 0.01 * float(scattered.max())
    with pytest.raises(ValueError, match="shape"):
        bg.subtract_background(DetectorImage(flux[:-1], err[:-1], qual[:-1]), model)


def test_model_error_matches_scatter_between_realisations() -> None:
    """The model's stated 1-sigma error against its scatter over independent noise draws
    (binned X-shooter VIS, cropped, to stay fast)."""
    sim, orders, scattered = scene("xsh_vis", "2x2")
    mask = true_mask("xsh_vis", "2x2")
    crop = (slice(300, 1300), slice(None))
    models, stated = [], []
    for seed in range(8):
        flux, _ = noisy((orders + scattered)[crop], 100 + seed)
        m = bg.fit_background(flux, None, mask[crop], "y",
                              binning=(sim.detector.binx, sim.detector.biny))
        models.append(m.model)
        stated.append(m.band_statistical_error)
    scatter = np.std(np.array(models, np.float64), axis=0, ddof=1)
    ratio = np.median(scatter) / np.median(np.array(stated))
    # eight draws give the scatter to about 25 %; the stated error is the spline's posterior
    # variance, an upper bound of the sampling variance
    assert 0.5 < ratio < 1.3, ratio


# ------------------------------------------------------------------------------ kernels
def _random_frame(rng, shape):
    flux = rng.normal(100, 10, shape).astype(np.float32)
    flux[rng.random(shape) < 0.01] = np.nan
    flux[rng.random(shape) < 0.005] = np.inf
    qual = np.where(rng.random(shape) < 0.05, rng.integers(1, 256, shape), 0).astype(np.uint8)
    in_order = rng.random(shape) < 0.6
    err = rng.uniform(1, 20, shape).astype(np.float32)
    return flux, qual, in_order, err


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("band_rows", [1, 5, 16])
def test_cell_kernel_equals_numpy_twin(transpose: bool, band_rows: int) -> None:
    from soxs_core import _background

    rng = np.random.default_rng(band_rows)
    flux, qual, in_order, err = _random_frame(rng, (83, 61))
    if transpose:  # strided views, as the SOXS NIR frames are read
        flux, qual, in_order, err = flux.T, qual.T, in_order.T, err.T
    reject = int(Qual.HOT | Qual.COSMIC | Qual.NO_DATA)
    ref = bg.cell_statistics_reference(flux, qual, in_order, band_rows, reject, err)
    rows, cols = flux.shape
    nb = -(-rows // band_rows)
    out = [np.empty((nb, cols), np.float32), np.empty((nb, cols), np.float32),
           np.empty((nb, cols), np.int32), np.empty((nb, cols), np.float32)]
    used = np.empty(flux.shape, np.uint8)
    _background.cell_statistics(flux, qual, in_order.view(np.uint8), band_rows, reject, err,
                                True, *out, used)
    for got, want in zip(out, ref):
        np.testing.assert_array_equal(got, want)
    want_used = ~in_order & ((qual & reject) == 0) & np.isfinite(flux)
    np.testing.assert_array_equal(used.astype(bool), want_used)
    # no errors given: the fourth plane is NaN
    ref2 = bg.cell_statistics_reference(flux, qual, in_order, band_rows, reject)
    assert np.isnan(ref2[3]).all()


@pytest.mark.parametrize("transpose", [False, True])
def test_expand_kernel_equals_numpy_twin(transpose: bool) -> None:
    from soxs_core import _background

    rng = np.random.default_rng(3)
    for nb, rows in ((1, 7), (5, 37), (12, 100)):
        values = rng.normal(size=(nb, 23))
        centres = np.sort(rng.uniform(0, rows - 1, nb)) if nb > 1 else np.array([3.0])
        want = bg.expand_bands_reference(values, centres, rows)
        got = np.empty((23, rows), np.float32).T if transpose else np.empty((rows, 23),
                                                                              np.float32)
        bg._expand(values, centres, got)
        np.testing.assert_array_equal(got, want)
        j, t = bg._interpolation_weights(centres, rows)
        with pytest.raises(ValueError):
            _background.expand_bands(values, j.astype(np.int64) + nb, t, got)


def test_band_solver_equals_dense_algebra() -> None:
    rng = np.random.default_rng(5)
    for p, n in ((2, 40), (3, 17), (4, 11)):
        dense = np.zeros((6, n, n))
        for b in range(6):
            m = np.zeros((n, n))
            for d in range(p + 1):
                v = rng.normal(size=n - d)
                m += np.diag(v, -d)
            dense[b] = m @ m.T + 0.1 * np.eye(n)
        ab = np.zeros((6, 2 * p + 1, n))
        for d in range(2 * p + 1):
            ab[:, d, :n - d] = np.diagonal(dense, -d, axis1=1, axis2=2)
        dense_band = bg.band_to_dense(ab)
        np.testing.assert_allclose(dense_band, dense, rtol=0, atol=1e-12)
        rhs = rng.normal(size=(6, n))
        x, zb, failed = bg._band_solve(ab, rhs, True)
        xr, zr, fr = bg.band_solve_reference(ab, rhs, True)
        assert not failed.any() and not fr.any()
        np.testing.assert_allclose(x, xr, rtol=1e-9, atol=1e-9 * np.abs(xr).max())
        np.testing.assert_allclose(zb, zr, rtol=1e-9, atol=1e-9 * np.abs(zr).max())
    # not positive definite: flagged, not a crash
    ab = np.zeros((1, 3, 5))
    ab[0, 0] = -1.0
    assert bg._band_solve(ab, np.ones((1, 5)), True)[2][0] == 1


@pytest.mark.parametrize("n, degree, spacing", [(2106, 2, 10.8), (4000, 3, 7.0), (50, 1, 3.0),
                                                (2048, 5, 20.0), (9, 2, 2.0)])
def test_spline_basis_is_scipys(n, degree, spacing) -> None:
    """Our B-spline values (no scipy.interpolate import on the recipe path) are scipy's
    design matrix, and sum to one at every pixel."""
    from scipy.interpolate import BSpline

    first, vals, starts, nbasis = bg._spline_basis(n, degree, spacing)
    segments = nbasis - degree
    inner = np.linspace(-0.5, n - 0.5, segments + 1)
    step = inner[1] - inner[0]
    knots = np.concatenate([-0.5 - step * np.arange(degree, 0, -1), inner,
                            n - 0.5 + step * np.arange(1, degree + 1)])
    design = BSpline.design_matrix(np.arange(n, dtype=float), knots, degree).toarray()
    expected = np.stack([design[np.arange(n), first + p] for p in range(degree + 1)], axis=1)
    np.testing.assert_allclose(vals, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(vals.sum(axis=1), 1.0, rtol=0, atol=1e-14)
    assert np.count_nonzero(design, axis=1).max() <= degree + 1
