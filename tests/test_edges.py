"""Order-edge detection (soxs_core.echelle.edges) against the simulator's true edges, and the
Cython kernel against its numpy twin."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy.special import erfc

from soxs_core.detector.quality import Qual
from soxs_core.echelle import edges as E
from soxs_core.simulate.instrument import InstrumentSimulator

#: arm, binning, orders (a few, spread over the format), seed-page slice length
SETUPS = {
    "xsh_uvb": ("xsh_uvb", "1x1", [13, 19, 23], 90),
    "xsh_vis": ("xsh_vis", "1x1", [16, 23, 29], 90),
    "xsh_nir": ("xsh_nir", "1x1", [11, 18, 25], 90),
    "soxs_vis": ("soxs_vis", "1x1", [1, 2, 3, 4], 70),
    "soxs_nir": ("soxs_nir", "1x1", [10, 17, 23], 70),
    "xsh_vis_2x2": ("xsh_vis", "2x2", [16, 23, 29], 90),
}
#: frames in the simulated master flat (its noise is that of their mean)
NFRAMES = 5


@functools.cache
def _simulation(key: str):
    arm, binning, orders, length = SETUPS[key]
    sim = InstrumentSimulator(arm, binning, seed=7, orders=orders)
    expected = (sim.lamp_model() * sim.truth.sensitivity).astype(np.float64)
    # QUAL as the recipe has it: the static map and the bad columns / dead pixels that the
    # master bias marks; the low-sensitivity pixels and dust stay unflagged
    qual = np.where(sim.truth.static_bad_mask, np.uint8(Qual.STATIC_BAD), np.uint8(0))
    qual[sim.truth.cold_mask] |= np.uint8(Qual.COLD)
    return sim, expected, qual


def _flat(expected: np.ndarray, read_noise: float, seed: int) -> np.ndarray:
    """A master flat of NFRAMES frames: Poisson and read noise of their mean."""
    rng = np.random.default_rng(seed)
    flux = rng.poisson(np.maximum(expected, 0) * NFRAMES) / NFRAMES
    flux += rng.normal(0, read_noise / np.sqrt(NFRAMES), expected.shape)
    return flux.astype(np.float32)


def _measure(key: str, flux: np.ndarray, qual: np.ndarray, **kw) -> E.EdgeSamples:
    sim, _, _ = _simulation(key)
    fmt = sim.format
    _, binning, orders, length = SETUPS[key]
    ranges = [(fmt.geometry(n).b_min, fmt.geometry(n).b_max) for n in orders]
    return E.measure_order_edges(flux, qual, fmt.centre, orders, ranges, fmt.dispersion_axis,
                                 binning, length, 5, 20, 50, **kw)


def _cross_binning(key: str) -> int:
    sim, _, _ = _simulation(key)
    det = sim.detector
    return det.binx if sim.format.dispersion_axis == "y" else det.biny


def _clipped(values: np.ndarray, limit: float) -> np.ndarray:
    """Finite values within ``limit`` px of their median: a gross outlier (for the global
    fit's clipping) must not decide a mean or a scatter."""
    v = values[np.isfinite(values)]
    return v[np.abs(v - np.median(v)) <= limit]


def _masked_near(key: str, es: E.EdgeSamples, edge: np.ndarray, qual: np.ndarray) -> np.ndarray:
    """Samples with a column masked in every row of the slice within 3 px of the true edge:
    the kernel refuses to guess the light of such a column on the soft end."""
    sim, _, _ = _simulation(key)
    det, fmt = sim.detector, sim.format
    bin_b, bin_a = ((det.biny, det.binx) if fmt.dispersion_axis == "y" else (det.binx, det.biny))
    q = qual if fmt.dispersion_axis == "y" else qual.T
    rows = np.rint(E.unbinned_to_binned(es.b, bin_b)).astype(int)
    cols = np.rint(E.unbinned_to_binned(edge, bin_a)).astype(int)
    out = np.zeros(es.b.size, bool)
    for i, (r, c) in enumerate(zip(rows, cols)):
        cut = q[max(r - 2, 0):r + 3, max(c - 3, 0):c + 4]
        out[i] = bool((cut != 0).all(axis=0).any())
    return out


@pytest.mark.parametrize("key", list(SETUPS))
def test_edges_agree_with_the_true_slit_ends(key):
    """Per order and edge: (almost) every sample measured, at most 2 % gross outliers
    (> 0.25 px), bias below 0.05 frame px, and the scatter about the truth that of the noise
    (two noise realisations of the same flat differ by sqrt(2) times it) plus at most 0.03 px
    of systematic scatter (the slit illumination's ripple near the ends, whose effect drifts
    along an order as its scale does)."""
    sim, expected, qual = _simulation(key)
    fmt = sim.format
    bin_a = _cross_binning(key)
    first = _measure(key, _flat(expected, sim.truth.read_noise, 1), qual)
    second = _measure(key, _flat(expected, sim.truth.read_noise, 2), qual)
    true_low, true_up = fmt.edges(first.order, first.b)
    # samples whose slice runs off the detector are tested in test_slices_at_the_borders
    n_across = fmt.n_across
    half = 0.5 * SETUPS[key][3] * bin_a
    inside = (first.centre - half > 0) & (first.centre + half < n_across - 1)
    for order in first.orders:
        m = (first.order == order) & inside
        assert m.sum() >= 20, f"order {order}: too few samples inside the detector"
        for name, measured, repeat, truth in (("low", first.low, second.low, true_low),
                                              ("up", first.up, second.up, true_up)):
            usable = m & ~_masked_near(key, first, truth, qual)
            found = np.isfinite(measured[usable])
            assert found.mean() >= 0.9, f"order {order} {name}: {found.mean():.1%} found"
            resid = (measured[m] - truth[m]) / bin_a          # frame (binned) pixels
            diff = (measured[m] - repeat[m]) / bin_a
            mad = 1.4826 * np.nanmedian(np.abs(diff - np.nanmedian(diff))) / np.sqrt(2)
            limit = max(0.25, 6 * mad)
            kept = _clipped(resid, limit)
            # gross outliers among the well-exposed samples (a faint stretch of an order,
            # tens of e- per pixel, scatters by a few tenths of a pixel by its noise alone)
            bright = (first.peak[m] - first.floor[m] > 300) & np.isfinite(resid)
            gross = np.abs(resid[bright] - np.median(kept)) > limit
            assert gross.sum() <= 0.02 * bright.sum(), (
                f"order {order} {name}: {gross.sum()} outliers")
            assert abs(kept.mean()) < 0.05, f"order {order} {name}: bias {kept.mean():.3f}"
            noise = _clipped(diff, limit * np.sqrt(2)).std() / np.sqrt(2)
            assert kept.std() < 1.25 * noise + 0.03, (
                f"order {order} {name}: scatter {kept.std():.3f} px, noise {noise:.3f} px")


def test_binned_and_unbinned_coordinates():
    """Binned pixel i is centred on unbinned i*bin + (bin-1)/2; its edges map likewise."""
    assert E.binned_to_unbinned(0, 1) == 0.0
    np.testing.assert_allclose(E.binned_to_unbinned([0, 1, -0.5], 2), [0.5, 2.5, -0.5])
    np.testing.assert_allclose(E.unbinned_to_binned(E.binned_to_unbinned(3.3, 3), 3), 3.3)


def test_samples_every_25_over_binning_pixels():
    sim, expected, qual = _simulation("xsh_vis_2x2")
    es = _measure("xsh_vis_2x2", expected.astype(np.float32), qual)
    for order in es.orders:
        b = es.b[es.order == order]
        np.testing.assert_allclose(np.diff(b), 2 * 12)        # int(25 / 2) binned rows
        geo = sim.format.geometry(int(order))
        assert b.min() >= geo.b_min and b.max() <= geo.b_max
        assert b.min() - geo.b_min < 2 * 12
    assert es.order_threshold.shape == es.orders.shape


# --------------------------------------------------------------------- synthetic slices
def _pixel_step(x: np.ndarray, edge: float, w: float, rising: bool) -> np.ndarray:
    """Pixel average of an erf step of softness w (px) at ``edge`` for pixel centres x."""
    def integral(u):
        return 0.5 * (u * erfc(u / w) - w / np.sqrt(np.pi) * np.exp(-(u / w) ** 2))
    sign = -1.0 if rising else 1.0
    u = sign * (x - edge)
    return integral(u + 0.5) - integral(u - 0.5)


def _synthetic(nrow=400, ncol=300, centre0=150.0, width=60.0, level=20000.0, floor=300.0,
               w=0.6, tilt=0.05, seed=3, noise=True):
    """One order along the rows: tilted, sloped plateau, erf ends, floor, Poisson noise."""
    rows = np.arange(nrow)[:, None]
    cols = np.arange(ncol, dtype=float)[None, :]
    centre = centre0 + tilt * (rows - nrow / 2) + 3e-5 * (rows - nrow / 2) ** 2
    low, up = centre - width / 2, centre + width / 2
    plateau = level * (1 + 0.03 * (cols - centre) / width)
    img = floor + plateau * _pixel_step(cols, low, w, True) * _pixel_step(cols, up, w, False)
    if noise:
        img = np.random.default_rng(seed).poisson(img).astype(float)
    return img.astype(np.float32), centre[:, 0], low[:, 0], up[:, 0]


def _compare(a: E.SliceEdges, b: E.SliceEdges) -> None:
    for name in ("low", "up", "threshold_low", "threshold_up", "level_low", "level_up",
                 "floor", "peak"):
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(np.isfinite(x), np.isfinite(y), err_msg=name)
        np.testing.assert_allclose(x[np.isfinite(x)], y[np.isfinite(y)], rtol=1e-12,
                                   atol=1e-9, err_msg=name)


def test_kernel_equals_numpy_twin_with_masks_borders_and_strides():
    rng = np.random.default_rng(5)
    img, centre, _, _ = _synthetic(ncol=260, centre0=40.0, tilt=0.45)
    qual = np.zeros(img.shape, np.uint8)
    qual[rng.random(img.shape) < 0.05] = Qual.HOT
    qual[:, 55] = Qual.STATIC_BAD                      # a fully masked column
    qual[100:130, 20:23] = Qual.COSMIC                 # a masked patch on the lower edge
    img[rng.random(img.shape) < 0.002] = np.nan        # non-finite pixels
    img[200:204, 60:64] *= 0.2                          # an unflagged dark spot
    along = np.concatenate([np.arange(0, 400, 7), [1, 2, 397, 398, 399]])
    cen = np.interp(along, np.arange(400), centre)
    cen[::9] += rng.uniform(-200, 300, cen[::9].size)  # slices off the image and elsewhere
    for flux, q in ((img, qual), (np.ascontiguousarray(img.T).T, np.asfortranarray(qual))):
        for args in ((90, 5, 0.2, 0.5), (70, 4, 0.3, 0.3), (75, 1, 0.1, 0.6)):
            fast = E.detect_slice_edges(flux, q, along, cen, *args, threads=2)
            slow = E.detect_slice_edges_reference(flux, q, along, cen, *args)
            _compare(fast, slow)
            assert np.isfinite(fast.low).sum() > 20 and np.isfinite(fast.up).sum() > 20


def test_transposed_view_is_read_in_place_and_gives_the_same_edges():
    img, centre, _, _ = _synthetic()
    qual = np.zeros(img.shape, np.uint8)
    along = np.arange(10, 390, 12)
    cen = centre[along]
    direct = E.detect_slice_edges(img, qual, along, cen, 90, 5, 0.2, 0.5)
    frame_x = np.ascontiguousarray(img.T)               # the same order dispersed along x
    view = E.detect_slice_edges(frame_x.T, np.ascontiguousarray(qual.T).T, along, cen, 90,
                                5, 0.2, 0.5)
    _compare(direct, view)


def test_synthetic_edges_unbiased_at_every_subpixel_phase():
    """A tilted order sweeps the edge through all pixel phases: the equal-area position
    stays on the true half-plateau point (linear interpolation would be off by up to 0.06 px
    at w = 0.6; what remains is the soft end's tail inside the plateau tolerance)."""
    for w in (0.3, 0.6, 1.0):
        img, centre, low, up = _synthetic(w=w, tilt=0.37, noise=False)
        along = np.arange(5, 395, 3)
        res = E.detect_slice_edges(img, np.zeros(img.shape, np.uint8), along, centre[along],
                                   90, 5, 0.2, 0.5)
        # the edge moves 0.37 px per row across the 5 collapsed rows: median = centre row
        assert np.isfinite(res.low).all() and np.isfinite(res.up).all()
        assert np.max(np.abs(res.low - low[along])) < 0.02, w
        assert np.max(np.abs(res.up - up[along])) < 0.02, w


def test_thresholds_are_stepped_from_min_to_max_and_gate_detection():
    """The upper side never drops below ~40 % of peak-minus-floor (a blended neighbour):
    no edge there with max 30 %, found with max 50 % at the first step above the valley."""
    img, centre, low, up = _synthetic(tilt=0.0, noise=False)
    cols = np.arange(img.shape[1])[None, :]
    shoulder = cols > up[0] - 3
    level = np.float32(300 + 0.4 * 20000 * 1.015)
    img = np.where(shoulder, np.maximum(img, level), img).astype(np.float32)
    qual = np.zeros(img.shape, np.uint8)
    along = np.arange(20, 380, 25)
    strict = E.detect_slice_edges(img, qual, along, centre[along], 90, 5, 0.2, 0.3)
    assert np.isnan(strict.up).all() and np.isnan(strict.threshold_up).all()
    assert np.allclose(strict.threshold_low, 0.2)
    np.testing.assert_allclose(strict.low, low[along], atol=0.01)
    loose = E.detect_slice_edges(img, qual, along, centre[along], 90, 5, 0.2, 0.5)
    valley = (0.4 * 20000 * 1.015) / (loose.peak - loose.floor)
    steps = 0.2 + 0.03 * np.arange(11)
    expected = np.array([steps[steps > v][0] for v in valley])
    np.testing.assert_allclose(loose.threshold_up, expected)


def test_noise_and_implausible_slices_give_nan():
    rng = np.random.default_rng(1)
    noise = rng.normal(100, 10, (100, 200)).astype(np.float32)
    res = E.detect_slice_edges(noise, np.zeros(noise.shape, np.uint8), [50] * 5,
                               [100.0] * 5, 90, 5, 0.2, 0.5)
    assert np.isnan(res.low).all() and np.isnan(res.up).all()
    # a narrow strip (6 px) is no order
    img, centre, _, _ = _synthetic(width=6.0, noise=False)
    res = E.detect_slice_edges(img, np.zeros(img.shape, np.uint8), [50, 60], centre[[50, 60]],
                               90, 5, 0.2, 0.5)
    assert np.isnan(res.low).all() and np.isnan(res.up).all()


def test_slices_at_the_borders():
    """Rows leaving the image: NaN.  Columns are clipped: an edge measured inside the image
    is right, one whose measurement would need pixels beyond the border is NaN."""
    img, centre, low, up = _synthetic(centre0=33.0, tilt=0.0, noise=False)
    qual = np.zeros(img.shape, np.uint8)
    res = E.detect_slice_edges(img, qual, [1, 398, 200], centre[[1, 398, 200]], 90, 5, 0.2,
                               0.5)
    assert np.isnan(res.low[:2]).all() and np.isnan(res.up[:2]).all()
    np.testing.assert_allclose(res.low[2], low[200], atol=0.01)     # 3 px from column 0
    np.testing.assert_allclose(res.up[2], up[200], atol=0.01)
    cut = E.detect_slice_edges(img[:, 2:], qual[:, 2:], [200], centre[[200]] - 2, 90, 5,
                               0.2, 0.5)
    assert np.isnan(cut.low).all()                  # its soft end and floor are off the image
    np.testing.assert_allclose(cut.up, up[200] - 2, atol=0.01)
