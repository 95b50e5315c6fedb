"""Unit tests of soxs_core.echelle.flat: the low-sensitivity search against a brute-force twin
of its definition, the clipped mean, the centre band, the crossover rule, the stitching
geometry on either dispersion axis, and refusals of calibrations that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle import flat as F
from soxs_core.echelle.ordertable import OrderTable
from soxs_core.echelle.polynomial import OrderPolynomial
from soxs_core.errors import InputError
from soxs_core.io.image import DetectorImage
from soxs_core.simulate import DetectorSimulator


def _table(axis: str = "y", n_along: int = 300, step: float = 30.0, base: float = 20.0,
           half: float = 10.0, orders=(1, 2, 3)) -> OrderTable:
    """Straight orders: centre = base + step x n (unbinned px), edges +- half."""
    def poly(offset):
        return OrderPolynomial(np.array([[base + offset], [step]]))
    k = len(orders)
    return OrderTable(dispersion_axis=axis, orders=np.array(orders), b_min=np.zeros(k),
                      b_max=np.full(k, n_along - 1.0), centre=poly(0.0),
                      edge_up=poly(half), edge_low=poly(-half))


def _flat_image(rng, table: OrderTable, shape, noise=0.003):
    """A flat with a blaze along the orders, a curved slit profile and steep edges."""
    n_along, n_across = shape if table.dispersion_axis == "y" else shape[::-1]
    b = np.arange(n_along)[:, None]
    a = np.arange(n_across)[None, :]
    img = np.zeros((n_along, n_across))
    for n in table.orders:
        c = table.centre(float(n), b)
        blaze = 0.05 + np.exp(-0.5 * ((b - 0.5 * n_along) / (0.22 * n_along)) ** 2)
        prof = 1.0 / (1 + np.exp(-(a - (c - 10)) / 0.6)) / (1 + np.exp((a - (c + 10)) / 0.6))
        img += blaze * prof * (1 - 0.002 * (a - c) ** 2)
    img = img * (1 + rng.normal(0, 0.01, img.shape))  # pixel response
    img = img + rng.normal(0, noise, img.shape) * np.sqrt(np.maximum(img, 1e-4))
    img = img if table.dispersion_axis == "y" else img.T
    err = noise * np.sqrt(np.maximum(img, 1e-4))
    return img.astype(np.float32), err.astype(np.float32)


def _brute_force(data, error, qual, in_order, axis, sigma):
    """The definition of low_sensitivity_mask, pixel by pixel (no candidate pre-filter)."""
    d, e = (data, error) if axis == "y" else (data.T, error.T)
    usable = in_order & ((qual & (Qual.NO_DATA | Qual.NON_FINITE)) == 0) & np.isfinite(data)
    usable = usable if axis == "y" else usable.T
    keep = 1 - sigma * F.LOW_SENS_UNIT
    out = np.zeros(d.shape, bool)
    h = F.LOW_SENS_NEIGHBOURS
    for i, j in zip(*np.nonzero(usable)):
        vals, errs = [], []
        for k in range(1, h + 1):
            if i - k >= 0 and i + k < d.shape[0] and usable[i - k, j] and usable[i + k, j]:
                vals += [d[i - k, j], d[i + k, j]]
                errs += [e[i - k, j], e[i + k, j]]
        if len(vals) < 4:
            continue
        level, elevel = np.median(vals), np.median(errs)
        noise = elevel * np.sqrt(1 + (np.pi / 2) / len(vals))
        if d[i, j] < keep * level and level - d[i, j] > F.LOW_SENS_NOISE_GUARD * noise:
            out[i, j] = True
    return out if axis == "y" else out.T


@pytest.mark.parametrize("axis", ["y", "x"])
def test_low_sensitivity_mask_equals_its_definition(axis):
    """The fast search (running maximum, then the exact test on candidates) flags exactly
    the pixels its definition does, for both dispersion axes; injected single pixels and a
    clump are found, the blaze, the slit profile and the steep edges are not."""
    rng = np.random.default_rng(3)
    table = _table(axis, n_along=160)
    shape = (160, 130) if axis == "y" else (130, 160)
    data, error = _flat_image(rng, table, shape)
    qual = np.zeros(shape, np.uint8)
    in_order = table.in_order_mask(shape)
    inner = table.centre_band_mask(shape, 1, 1, 6.0) & in_order
    along = np.nonzero(inner)
    pick = rng.choice(along[0].size, 40, replace=False)
    rows, cols = along[0][pick], along[1][pick]
    keep = (rows > 30) & (rows < 130) if axis == "y" else (cols > 30) & (cols < 130)
    rows, cols = rows[keep], cols[keep]
    data[rows, cols] *= rng.uniform(0.05, 0.4, rows.size).astype(np.float32)
    # a dust clump of radius 3 around the middle of order 2
    c = table.centre(2.0, 80.0)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    r0, c0 = (80, c) if axis == "y" else (c, 80)
    clump = np.hypot(rr - r0, cc - c0) <= 3.0
    data[clump] *= 0.2
    qual[5, 5] = Qual.NO_DATA
    got = F.low_sensitivity_mask(data, error, qual, in_order, axis, 2.0)
    want = _brute_force(data, error, qual, in_order, axis, 2.0)
    assert np.array_equal(got, want)
    assert got[rows, cols].all()
    assert got[clump].all()
    injected = np.zeros(shape, bool)
    injected[rows, cols] = True
    assert not np.any(got & ~injected & ~clump)


def test_low_sensitivity_noise_guard_and_sigma():
    """Noise alone never flags (faint flat), a larger sigma flags fewer, sigma >= 4 none."""
    rng = np.random.default_rng(5)
    table = _table()
    shape = (300, 130)
    data, error = _flat_image(rng, table, shape, noise=0.003)
    in_order = table.in_order_mask(shape)
    qual = np.zeros(shape, np.uint8)
    r, c = np.nonzero(table.centre_band_mask(shape, 1, 1, 3.0))
    sel = (r % 37 == 0) & (r > 20) & (r < 280)
    r, c = r[sel], c[sel]
    resp = np.linspace(0.05, 0.7, r.size).astype(np.float32)
    data[r, c] *= resp
    n = [int(F.low_sensitivity_mask(data, error, qual, in_order, "y", s).sum())
         for s in (1.0, 2.0, 3.0, 4.0)]
    assert n[0] >= n[1] >= n[2] > 0 and n[3] == 0
    # a pure-noise flat a thousand times fainter: nothing significant to flag
    faint = rng.normal(1e-3, 1e-3, shape).astype(np.float32)
    err = np.full(shape, 1e-3, np.float32)
    assert not F.low_sensitivity_mask(faint, err, qual, in_order, "y", 2.0).any()


def test_local_level_symmetric_pairs():
    rng = np.random.default_rng(1)
    d = rng.normal(1, 0.1, (120, 9)).astype(np.float32)
    usable = rng.random(d.shape) > 0.25
    rows, cols = np.nonzero(np.ones(d.shape, bool))
    level, count = F.local_level(d, usable, rows, cols)
    for i, j, lev, cnt in zip(rows, cols, level, count):
        vals = []
        for k in range(1, F.LOW_SENS_NEIGHBOURS + 1):
            if i - k >= 0 and i + k < d.shape[0] and usable[i - k, j] and usable[i + k, j]:
                vals += [d[i - k, j], d[i + k, j]]
        assert cnt == len(vals)
        assert (np.isnan(lev) if not vals else np.isclose(lev, np.median(vals), atol=1e-6))
    # exact on a linear ramp
    ramp = np.tile(np.arange(50, dtype=np.float32)[:, None], (1, 2))
    lev, _ = F.local_level(ramp, np.ones(ramp.shape, bool), np.array([20, 30]),
                           np.array([0, 1]))
    assert np.allclose(lev, [20, 30])


def test_clipped_mean():
    rng = np.random.default_rng(2)
    v = rng.normal(100.0, 1.0, 10_000)
    v[:20] = 1e6  # outliers far beyond 25 sigma
    want = v[20:].astype(np.float32).mean(dtype=np.float64)
    assert abs(F.clipped_mean(v) - want) < 1e-9
    assert abs(F.clipped_mean(v, sample=500) - want) < 1e-9
    assert np.isnan(F.clipped_mean(np.array([])))
    assert F.clipped_mean(np.full(7, 3.0)) == 3.0


def test_centre_band_pixels_match_the_table_mask():
    table = _table(n_along=200)
    shape = (200, 130)
    index, labels = F.centre_band_pixels(table, shape, 1, 1, 8.0)
    ref = np.zeros(shape, np.int16)
    for n in table.orders:
        ref[table.centre_band_mask(shape, 1, 1, 4.0, orders=[n])] = n
    assert np.array_equal(index, np.flatnonzero(ref))
    assert np.array_equal(labels, ref.ravel()[index])


def test_crossover_order():
    d = {20: 10, 21: 50, 22: 80, 23: 90, 19: 1}
    q = {20: 60, 21: 40, 22: 10, 23: 1, 19: 90}
    assert F.crossover_order(d, q) == 21
    # D2 never better: QTH keeps all but the bluest order
    assert F.crossover_order({1: 0, 2: 0, 3: 0}, {1: 5, 2: 5, 3: 5}) == 3
    with pytest.raises(InputError):
        F.crossover_order({1: 1}, {1: 2})


@pytest.mark.parametrize("axis,bluer_high", [("y", False), ("x", False), ("y", True)])
def test_stitch_geometry(axis, bluer_high):
    """D2 gives the crossover order and the bluer ones, up to 5 px beyond the crossover
    order's edge facing the redder orders; on either dispersion axis and whichever side the
    bluer orders lie."""
    step = -30.0 if bluer_high else 30.0
    base = 130.0 if bluer_high else 20.0
    table = _table(axis, n_along=64, step=step, base=base, orders=(1, 2, 3))
    # step < 0: the bluer orders (larger n) at smaller A, as on X-shooter UVB
    shape = (64, 130) if axis == "y" else (130, 64)
    d = DetectorImage(np.full(shape, 2.0, np.float32), np.full(shape, 0.2, np.float32),
                      np.full(shape, 1, np.uint8))
    q = DetectorImage(np.full(shape, 1.0, np.float32), np.full(shape, 0.1, np.float32),
                      np.zeros(shape, np.uint8))
    out = F.stitch_uv_mflats(d, q, table, 2, 0.25, 1, 1)
    a = np.arange(130)
    cen2 = table.centre(2.0, 0.0)
    if not bluer_high:   # redder order 1 at smaller A: the seam is below order 2
        line = table.edge_low(2.0, 0.0) - F.STITCH_OFFSET
        from_d = a > line
    else:                # redder order 1 at larger A: the seam is above order 2
        line = table.edge_up(2.0, 0.0) + F.STITCH_OFFSET
        from_d = a < line
    assert from_d[int(cen2)]
    prof = out.data if axis == "y" else out.data.T
    qual = out.qual if axis == "y" else out.qual.T
    err = out.error if axis == "y" else out.error.T
    assert np.all(prof[:, from_d] == 0.5) and np.all(prof[:, ~from_d] == 1.0)
    assert np.all(err[:, from_d] == np.float32(0.05)) and np.all(err[:, ~from_d] ==
                                                                  np.float32(0.1))
    assert np.all(qual[:, from_d] == 1) and np.all(qual[:, ~from_d] == 0)
    unscaled = F.stitch_uv_mflats(d, q, table, 2, 0.5, 1, 1, scale_d2_to_qth=False)
    prof = unscaled.data if axis == "y" else unscaled.data.T
    assert np.all(prof[:, from_d] == 2.0) and np.all(prof[:, ~from_d] == 1.0)


def test_finish_sets_inter_order_and_flags():
    rng = np.random.default_rng(7)
    table = _table()
    shape = (300, 130)
    data, error = _flat_image(rng, table, shape)
    data[150, int(table.centre(2.0, 150.0))] *= 0.1
    master = DetectorImage(data * 7.0, error * 7.0, np.zeros(shape, np.uint8))
    master.qual[10, 3] = Qual.LOW_SENS  # stale flag outside the orders: recomputed away
    fin = F.finish_master_flat(master, table, 1, 1, 2.0)
    img = fin.image
    out = ~table.in_order_mask(shape)
    assert np.all(img.data[out] == 1) and np.all(img.error[out] == 0)
    good = ~out & (img.qual == 0)
    assert abs(img.data[good].mean() - 1) < 1e-5
    assert fin.n_low_sens == np.count_nonzero(img.qual & Qual.LOW_SENS) >= 1
    assert img.qual[10, 3] == 0
    assert np.isclose(fin.scale, 7.0 * data[good].mean(), rtol=1e-4)
    qc = F.flat_qc(None, fin)
    assert "ORDEXP10" in qc.missing and qc.values["N LOW SENS"] == fin.n_low_sens


@pytest.fixture(scope="module")
def raw_flat(tmp_path_factory):
    sim = DetectorSimulator("xsh_vis", "2x2", seed=2)
    path = tmp_path_factory.mktemp("flat") / "flat.fits"
    hdul, _ = sim.make_frame("FLAT", 10.0, 0, signal=np.full(sim.shape, 1000, np.float32))
    hdul.writeto(path)
    frame = RawFrame.open(path)
    yield frame
    frame.close()


def test_calibration_refusals(raw_flat):
    shape = raw_flat.prepared_shape
    with pytest.raises(InputError, match="no master bias"):
        F.calibrate_frame_set([raw_flat])
    small = DetectorImage(np.zeros((10, 10), np.float32), np.zeros((10, 10), np.float32),
                          np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="master bias is 10x10"):
        F.calibrate_frame_set([raw_flat], master_bias=small)
    bias = DetectorImage(np.full(shape, 5.0, np.float32), np.full(shape, 2.0, np.float32),
                         np.zeros(shape, np.uint8))
    dark = DetectorImage(np.full(shape, 1.0, np.float32), np.full(shape, 1.5, np.float32),
                         np.full(shape, Qual.HOT, np.uint8))
    cal = F.calibrate_frame_set([raw_flat], master_bias=bias, master_dark=dark)
    assert np.allclose(cal.calibration.level, 6.0)
    assert np.allclose(cal.calibration.error, 2.5)
    assert np.all(cal.calibration.qual == Qual.HOT)
    # the reader subtracts the level and counts photons above the bias only
    rows, cols = 4, shape[1]
    d = np.empty((rows, cols), np.float32)
    e, q = np.empty_like(d), np.empty((rows, cols), np.uint8)
    cal.reader(0, 0.5)(0, rows, d, e, q)
    d0, e0, q0 = np.empty_like(d), np.empty_like(d), np.empty_like(q)
    raw_flat.prepare_into(0, rows, d0, e0, q0, cal.static_bits[:rows], raw_flat.read_noise,
                          bias.data[:rows])
    assert np.allclose(d, 0.5 * (d0 - 6.0)) and np.allclose(e, 0.5 * e0)
