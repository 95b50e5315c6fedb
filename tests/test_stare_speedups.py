"""The vectorised aperture-correction level and sky object mask of the stare against copies of
the per-row code they replaced (kept here as ``_reference_...``): identical results on random
inputs built to hit the edge cases (rows with fewer than 3 far pixels, NaNs and flags, even
and odd counts, ties, bands and edges at the frame's borders, both dispersion axes)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from soxs_core.echelle.ordertable import OrderTable, to_binned
from soxs_core.echelle.polynomial import OrderPolynomial
from soxs_core.extraction import horne
from soxs_core.extraction.horne import _masked_row_medians, aperture_correction
from soxs_core.extraction.stare import SKY_SLIT_FRACTION, _along, _object_mask


# ------------------------------------------------------------------ references (the old code)
def _reference_aperture_correction(data_t, variance_t, qual_t, centre, rows, slit_length,
                                   lower, upper, margin=1.0, wing_extent=3.0):
    rows = np.asarray(rows, np.int64)
    centre = np.asarray(centre, float)
    lo = np.ceil(np.asarray(lower, float) + margin).astype(np.int64)
    hi = np.floor(np.asarray(upper, float) - margin).astype(np.int64)
    n_across = data_t.shape[1]
    ok = np.isfinite(centre) & (lo >= 0) & (hi < n_across) & (hi > lo)
    if not ok.any():
        return 1.0, 0.0
    rows, centre, lo, hi = rows[ok], centre[ok], lo[ok], hi[ok]
    width = int(np.max(hi - lo)) + 1
    cols = lo[:, None] + np.arange(width)[None, :]
    inside = cols <= hi[:, None]
    cols = np.minimum(cols, n_across - 1)
    d = data_t[rows[:, None], cols].astype(float)
    v = variance_t[rows[:, None], cols].astype(float)
    good = inside & np.isfinite(d) & np.isfinite(v)
    if qual_t is not None:
        good &= qual_t[rows[:, None], cols] == 0
    complete = np.all(good | ~inside, axis=1)
    if not complete.any():
        return 1.0, 0.0
    half = 0.5 * float(slit_length)
    a = np.clip(np.minimum(cols + 0.5, centre[:, None] + half)
                - np.maximum(cols - 0.5, centre[:, None] - half), 0.0, 1.0)
    use = inside & complete[:, None]
    near = np.abs(cols - centre[:, None]) <= wing_extent * half
    far = use & ~near
    level = 0.0
    if np.count_nonzero(far) >= 20:
        per_row = [np.median(d[i][far[i]]) for i in np.flatnonzero(far.sum(axis=1) >= 3)]
        level = float(np.mean(per_row)) if per_row else 0.0
    use &= near
    d = d - level
    in_ap = float(np.sum(np.where(use, a * d, 0.0)))
    wings = float(np.sum(np.where(use, (1 - a) * d, 0.0)))
    wings_var = float(np.sum(np.where(use, (1 - a) ** 2 * v, 0.0)))
    if not in_ap > 0:
        return 1.0, 0.0
    return (in_ap + wings) / in_ap, float(np.sqrt(wings_var)) / in_ap


def _reference_object_mask(shape, trace_table, binx, biny, half_width, axis, order_table):
    from soxs_core.extraction.objecttrace import trace_centre_binned

    mask = np.zeros(shape, bool)
    view = _along(mask, axis)
    n_along, n_across = view.shape
    cols = np.arange(n_across)
    bin_along, bin_across = (biny, binx) if axis == "y" else (binx, biny)
    for n in trace_table.orders:
        b0, b1 = trace_table.along_range(int(n))
        r0 = max(int(np.ceil(to_binned(b0, bin_along))), 0)
        r1 = min(int(np.floor(to_binned(b1, bin_along))), n_along - 1)
        if r1 < r0:
            continue
        rows = np.arange(r0, r1 + 1)
        c = trace_centre_binned(trace_table, int(n), rows, binx, biny)
        hw = half_width
        if int(n) in order_table.orders:
            b = rows * bin_along + 0.5 * (bin_along - 1)
            width = np.median(order_table.edge_up(float(n), b)
                              - order_table.edge_low(float(n), b)) / bin_across
            hw = min(half_width, 0.5 * (1 - SKY_SLIT_FRACTION) * width)
        view[rows] |= np.abs(cols[None, :] - c[:, None]) <= hw
    return mask


# ------------------------------------------------------------------ per-row medians
def _loop_medians(values, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.array([np.median(v[m]) if m.any() else np.nan
                         for v, m in zip(values, mask)], float)


@pytest.mark.parametrize("width", [0, 1, 2, 3, 7, 60])
def test_masked_row_medians_are_np_median(width):
    rng = np.random.default_rng(width)
    n = 3000
    values = rng.standard_t(2, (n, width))
    values[::3] = np.round(values[::3])                 # ties
    values[rng.random(values.shape) < 0.02] = np.nan    # masked in or out
    values[rng.random(values.shape) < 0.01] = np.inf
    values[rng.random(values.shape) < 0.01] = -np.inf
    values[rng.random(values.shape) < 0.01] = -0.0
    # every count 0..width in each row block, the masked entries anywhere in the row
    keep = rng.random((n, width)) < rng.random((n, 1))
    keep[:5] = False
    keep[5:10] = True
    got = _masked_row_medians(values, keep)
    want = _loop_medians(values, keep)
    np.testing.assert_array_equal(got, want)
    counts = keep.sum(axis=1)
    if width >= 3:
        assert np.any(counts % 2 == 0) and np.any(counts % 2 == 1)
    # float32 input: the median of the float64 values, as np.median of the cast rows
    got32 = _masked_row_medians(values.astype(np.float32), keep)
    np.testing.assert_array_equal(got32, _loop_medians(values.astype(np.float32)
                                                       .astype(float), keep))


def test_masked_row_medians_finite_only_rows():
    """The rows the aperture correction passes: finite values, 3 or more of them."""
    rng = np.random.default_rng(5)
    values = rng.normal(0.1, 3.0, (4000, 58))
    keep = np.ones(values.shape, bool)
    keep[:, 12:47] = False
    keep[::3, :2] = False                               # even and odd counts
    keep[1::5, -3:] = False
    got = _masked_row_medians(values, keep)
    np.testing.assert_array_equal(got, _loop_medians(values, keep))
    assert np.mean(got) == np.mean(_loop_medians(values, keep).tolist())


# ------------------------------------------------------------------ aperture correction
def _far_row_counts(data_t, variance_t, qual_t, centre, rows, slit_length, lower, upper,
                    margin, wing_extent):
    """Far pixels per complete row, as the reference counts them (coverage only)."""
    rows = np.asarray(rows, np.int64)
    centre = np.asarray(centre, float)
    lo = np.ceil(np.asarray(lower, float) + margin).astype(np.int64)
    hi = np.floor(np.asarray(upper, float) - margin).astype(np.int64)
    n_across = data_t.shape[1]
    ok = np.isfinite(centre) & (lo >= 0) & (hi < n_across) & (hi > lo)
    if not ok.any():
        return np.zeros(0, int)
    rows, centre, lo, hi = rows[ok], centre[ok], lo[ok], hi[ok]
    cols = lo[:, None] + np.arange(int(np.max(hi - lo)) + 1)[None, :]
    inside = cols <= hi[:, None]
    cols = np.minimum(cols, n_across - 1)
    d = data_t[rows[:, None], cols].astype(float)
    good = inside & np.isfinite(d) & np.isfinite(variance_t[rows[:, None], cols])
    if qual_t is not None:
        good &= qual_t[rows[:, None], cols] == 0
    complete = np.all(good | ~inside, axis=1)
    near = np.abs(cols - centre[:, None]) <= wing_extent * 0.5 * slit_length
    return (inside & ~near)[complete].sum(axis=1)


def _apcor_case(rng):
    n_along = int(rng.integers(20, 300))
    n_across = int(rng.integers(6, 120))
    dtype = rng.choice([np.float32, np.float64])
    level = rng.uniform(-2, 2)
    data = level + rng.standard_t(3, (n_along, n_across)) * rng.uniform(0.3, 5)
    if rng.random() < 0.3:
        data = np.round(data)                           # ties in the medians
    var = rng.uniform(1, 10, data.shape)
    n_rows = int(rng.integers(1, n_along + 1))
    rows = np.sort(rng.choice(n_along, n_rows, replace=rng.random() < 0.2))
    lower = rng.uniform(-3, 0.4 * n_across) + rng.normal(0, rng.uniform(0, 3), n_rows)
    upper = lower + rng.uniform(-2, 1.2 * n_across) + rng.normal(0, rng.uniform(0, 3), n_rows)
    centre = lower + (upper - lower) * rng.uniform(-0.2, 1.2) + rng.normal(0, 1, n_rows)
    centre[rng.random(n_rows) < 0.05] = np.nan
    slit_length = rng.uniform(0.3, 0.6 * n_across)
    cols = np.arange(n_across)
    data[rows] += rng.uniform(0, 500) * np.exp(
        -0.5 * ((cols[None, :] - np.nan_to_num(centre)[:, None]) / rng.uniform(0.5, 6)) ** 2)
    data[rng.random(data.shape) < rng.choice([0, 1e-3, 3e-2])] = np.nan
    var[rng.random(var.shape) < rng.choice([0, 1e-3])] = np.inf
    qual = None
    if rng.random() < 0.5:
        qual = (rng.random(data.shape) < rng.choice([0, 1e-3, 1e-2])).astype(np.uint8) * 4
    return dict(data_t=data.astype(dtype), variance_t=var.astype(dtype), qual_t=qual,
                centre=centre, rows=rows, slit_length=slit_length, lower=lower, upper=upper,
                margin=float(rng.choice([0.0, 0.5, 1.0, 2.0])),
                wing_extent=float(rng.uniform(0.3, 5.0)))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf variances, unused
def test_aperture_correction_is_the_per_row_median_code(monkeypatch):
    rng = np.random.default_rng(20240611)
    seen = {"calls": 0, "even": 0, "odd": 0}
    real = horne._masked_row_medians

    def spy(values, mask):
        counts = mask.sum(axis=1)
        seen["calls"] += 1
        seen["even"] += int(np.sum(counts % 2 == 0))
        seen["odd"] += int(np.sum(counts % 2 == 1))
        return real(values, mask)

    monkeypatch.setattr(horne, "_masked_row_medians", spy)
    few, guarded, corrected = 0, 0, 0
    for _ in range(400):
        case = _apcor_case(rng)
        want = _reference_aperture_correction(**case)
        got = aperture_correction(**case)
        assert np.array_equal(got, want), (got, want)
        counts = _far_row_counts(**case)
        few += int(np.sum((counts > 0) & (counts < 3)) > 0 and counts.sum() >= 20)
        guarded += int(0 < counts.sum() < 20)
        corrected += int(got[0] != 1.0)
    # the random cases reach every branch of the level
    assert seen["calls"] > 100 and seen["even"] > 1000 and seen["odd"] > 1000, seen
    assert few > 20 and guarded > 5 and corrected > 100, (few, guarded, corrected)


def test_aperture_correction_realistic_order():
    """An order of 4000 rows 60 px wide on a full along view, a residual level, flags."""
    rng = np.random.default_rng(1)
    n_along, n_across = 4096, 300
    data = rng.normal(0.3, 3.0, (n_along, n_across)).astype(np.float32)
    var = np.full(data.shape, 9.0, np.float32)
    qual = (rng.random(data.shape) < 2e-4).astype(np.uint8) * 4
    rows = np.arange(40, 4040)
    lower = 100 + 30 * np.sin(rows / 700.0)
    upper = lower + 60
    centre = lower + 31.3
    cols = np.arange(n_across)
    data[rows] += (200 * np.exp(-0.5 * ((cols[None, :] - centre[:, None]) / 3.0) ** 2)
                   ).astype(np.float32)
    args = (data, var, qual, centre, rows, 12.0, lower, upper)
    got = aperture_correction(*args)
    assert got[0] > 1.001
    assert got == _reference_aperture_correction(*args)


# ------------------------------------------------------------------ object mask
class _Holes:
    """An order polynomial with NaN (and inf) centres in stretches of the along axis."""

    def __init__(self, poly: OrderPolynomial, period: float):
        self.poly, self.period = poly, period

    def __call__(self, order, b):
        out = np.array(self.poly(order, b), float)
        phase = np.mod(np.asarray(b, float) + 3 * np.asarray(order, float), self.period)
        out[phase < 0.1 * self.period] = np.nan
        out[(phase > 0.5 * self.period) & (phase < 0.53 * self.period)] = np.inf
        return out


def _mask_case(rng, axis):
    shape = (int(rng.integers(30, 260)), int(rng.integers(30, 260)))
    binx, biny = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    n_along, n_across = shape if axis == "y" else shape[::-1]
    bin_along, bin_across = (biny, binx) if axis == "y" else (binx, biny)
    ub_along, ub_across = n_along * bin_along, n_across * bin_across
    k = int(rng.integers(1, 9))
    orders = np.arange(20, 20 + k)
    step = ub_across / k * rng.uniform(0.5, 1.3)
    coeffs = np.zeros((2, 3))
    coeffs[0, 0] = rng.uniform(-0.2, 0.3) * ub_across - 20 * step
    if rng.random() < 0.4:  # centres on exact (half) pixels: the band's ends tie the test
        coeffs[0, 0] = np.round(coeffs[0, 0]) + rng.choice([0.0, 0.5, 0.1])
        step = float(np.round(step))
    coeffs[1, 0] = step
    if rng.random() < 0.6:
        coeffs[0, 1] = rng.uniform(-0.3, 0.3)
        coeffs[0, 2] = rng.uniform(-1, 1) * 50 / ub_along**2
    centre = OrderPolynomial(coeffs)
    b_min = rng.uniform(-0.3, 0.6, k) * ub_along
    b_max = b_min + rng.uniform(-0.1, 1.5, k) * ub_along
    trace = OrderTable(dispersion_axis=axis, orders=orders, b_min=b_min, b_max=b_max,
                       centre=_Holes(centre, ub_along / 3) if rng.random() < 0.3 else centre)
    half = rng.uniform(-0.05, 0.6) * step * np.ones(k)  # some orders with negative width
    up, low = coeffs.copy(), coeffs.copy()
    up[0, 0] += half[0]
    low[0, 0] -= half[0]
    up[1, 1] = rng.normal(0, 1e-3)
    in_table = orders[rng.random(k) < 0.7]
    if in_table.size == 0:
        in_table = orders[:1]
    table = OrderTable(dispersion_axis=axis, orders=in_table, b_min=np.zeros(in_table.size),
                       b_max=np.full(in_table.size, ub_along - 1.0), centre=centre,
                       edge_up=OrderPolynomial(up), edge_low=OrderPolynomial(low))
    half_width = float(rng.choice([rng.uniform(0, 30), 2.5, 3.1, 0.0, 0.5, 1e4, -1.0,
                                   np.inf, np.nan]))
    return shape, trace, binx, biny, half_width, axis, table


@pytest.mark.parametrize("axis", ["y", "x"])
def test_object_mask_is_the_full_row_test(axis):
    rng = np.random.default_rng(7 if axis == "y" else 8)
    at_first = at_last = non_empty = 0
    for _ in range(300):
        case = _mask_case(rng, axis)
        got = _object_mask(*case)
        want = _reference_object_mask(*case)
        assert got.dtype == bool and got.shape == case[0]
        assert np.array_equal(got, want)
        view = _along(got, axis)
        non_empty += int(view.any())
        at_first += int(view[:, 0].any())
        at_last += int(view[:, -1].any())
    assert non_empty > 150 and at_first > 20 and at_last > 20, (non_empty, at_first, at_last)


@pytest.mark.parametrize("axis", ["y", "x"])
def test_object_mask_realistic_frame(axis):
    """15 curved orders on a 2048 x 1024 frame (SOXS-like, half size to keep it quick)."""
    shape = (2048, 1024) if axis == "y" else (1024, 2048)
    n_across = 1024
    orders = np.arange(10, 25)
    step = n_across / 16
    coeffs = np.array([[-9 * step + 3.3, 0.021, -3e-5], [step, 0.0, 0.0]])
    trace = OrderTable(dispersion_axis=axis, orders=orders, b_min=np.full(15, 20.0),
                       b_max=np.full(15, 2100.0), centre=OrderPolynomial(coeffs))
    up, low = coeffs.copy(), coeffs.copy()
    up[0, 0] += 0.3 * step
    low[0, 0] -= 0.3 * step
    table = OrderTable(dispersion_axis=axis, orders=orders[1:], b_min=np.full(14, 50.0),
                       b_max=np.full(14, 1990.0), centre=OrderPolynomial(coeffs),
                       edge_up=OrderPolynomial(up), edge_low=OrderPolynomial(low))
    for half_width in (9.0, 12.75, 40.0):
        got = _object_mask(shape, trace, 1, 1, half_width, axis, table)
        assert got.any()
        assert np.array_equal(got, _reference_object_mask(shape, trace, 1, 1, half_width,
                                                          axis, table))


@pytest.mark.parametrize("axis", ["y", "x"])
def test_object_mask_at_rounding_ties(axis):
    """Band ends a rounding error from a pixel centre (``centre - half_width`` or
    ``centre + half_width`` an integer in decimal, not in binary): ``|j - c| <= hw`` then
    differs from ``ceil(c - hw) <= j <= floor(c + hw)`` in about 1 % of such pairs."""
    rng = np.random.default_rng(11)
    shape = (60, 300) if axis == "y" else (300, 60)
    table = OrderTable(dispersion_axis=axis, orders=np.array([6]), b_min=np.zeros(1),
                       b_max=np.full(1, 59.0), centre=OrderPolynomial(np.zeros((1, 1))),
                       edge_up=OrderPolynomial(np.ones((1, 1))),
                       edge_low=OrderPolynomial(np.zeros((1, 1))))
    ties = 0
    for _ in range(1500):
        frac = int(rng.integers(1, 100)) / 100
        c = int(rng.integers(0, 300)) + frac
        hw = int(rng.integers(0, 30)) + float(rng.choice([frac, 1 - frac]))
        trace = OrderTable(dispersion_axis=axis, orders=np.array([5]), b_min=np.zeros(1),
                           b_max=np.full(1, 59.0), centre=OrderPolynomial(np.array([[c]])))
        got = _object_mask(shape, trace, 1, 1, hw, axis, table)
        assert np.array_equal(got, _reference_object_mask(shape, trace, 1, 1, hw, axis, table))
        j = np.arange(300)
        ties += int(not np.array_equal(_along(got, axis)[0],
                                       (j >= np.ceil(c - hw)) & (j <= np.floor(c + hw))))
    assert ties > 5, ties


def test_sky_quicklook_panels_in_row_bands_equal_the_whole_frame() -> None:
    """The quicklook's panels, made in bands of whole blocks, are the block means of the
    whole-frame planes (and its residual rms the whole frame's)."""
    from types import SimpleNamespace

    from soxs_core.extraction import skyplots
    from soxs_core.io.image import DetectorImage

    rng = np.random.default_rng(4)
    shape = (1301, 217)                  # not a whole number of bands nor of blocks
    order = np.zeros(shape, np.int16)
    order[:, 20:90], order[:, 120:200] = 7, 8
    data = rng.normal(50.0, 5.0, shape).astype(np.float32)
    data[rng.random(shape) < 0.01] = np.nan
    error = np.full(shape, 5.0, np.float32)
    sky = rng.normal(40.0, 1.0, shape).astype(np.float32)
    model = SimpleNamespace(orders=[7, 8], sky=sky, error=np.full(shape, 0.5, np.float32),
                            used=(order > 0) & (rng.random(shape) < 0.7))
    image = DetectorImage(data=data, error=error, qual=np.zeros(shape, np.uint8))
    factor = 3
    panels, sum_r2, n_r = skyplots._quicklook_panels(image, model, order, factor)
    in_order = np.isin(order, model.orders)
    d = np.where(in_order, data, np.nan)
    s = np.where(in_order, sky, np.nan)
    err = np.sqrt(error**2 + model.error**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(model.used, (d - s) / err, np.nan)
        r = (data[model.used] - sky[model.used]) / err[model.used]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = [skyplots._blocks(a, factor) for a in (d, s, d - s, norm)]
    for got, exp in zip(panels, want):
        np.testing.assert_array_equal(got, exp)
    assert n_r == r.size
    np.testing.assert_allclose(sum_r2, np.sum(r.astype(float) ** 2), rtol=1e-9)


@pytest.mark.parametrize("arm, binning", [("xsh_vis", "1x1"), ("soxs_nir", "1x1"),
                                          ("xsh_uvb", "2x2")])
def test_slice_pixels_are_the_trace_slices_rows(tmp_path, arm: str, binning: str) -> None:
    """The first sky pass is fitted to the pixels :func:`slice_pixels` selects: exactly the
    pixels of each order within ``margin`` rows of one of detect_continuum's slices of that
    order (whatever the dispersion axis and binning)."""
    from soxs_core.echelle.ordertable import read_order_table
    from soxs_core.extraction import objecttrace as T
    from soxs_core.simulate.instrument import InstrumentSimulator
    from soxs_core.simulate.tables import disp_image_arrays

    sim = InstrumentSimulator(arm, binning, seed=3, orders=None)
    orders = sim.orders[:3]
    sim = InstrumentSimulator(arm, binning, seed=3, orders=orders)
    path = tmp_path / "order_tab.fits"
    sim.order_table(edges=True).writeto(path)
    table = read_order_table(path)
    _, _, order_img = disp_image_arrays(sim.format, sim.orders)
    order_img = np.where(np.isfinite(order_img), order_img, 0).astype(np.int16)
    binx, biny = (int(v) for v in binning.split("x"))
    if (binx, biny) != (1, 1):
        rows, cols = order_img.shape[0] // biny, order_img.shape[1] // binx
        order_img = order_img[:rows * biny:biny, :cols * binx:binx]
    params = T.TraceParameters.from_mapping({"order_sample_count": 40, "slice_width": 5})
    margin = 3
    got = T.slice_pixels(order_img, table, binx, biny, params, margin)
    view_o = order_img if table.dispersion_axis == "y" else order_img.T
    view_g = got if table.dispersion_axis == "y" else got.T
    n_along, _, bin_along, _ = table.image_axes(order_img.shape, binx, biny)
    want = np.zeros(view_o.shape, bool)
    for n in table.orders:
        rows = T._sample_rows(table, int(n), params.order_sample_count, n_along, bin_along,
                              params.slice_width)
        near = np.zeros(n_along, bool)
        for r in rows:        # the slice covers r - width // 2 ... r + width - 1 - width // 2
            near[max(0, r - 2 - margin):r + 3 + margin] = True
        want |= (view_o == int(n)) & near[:, None]
    assert want.any()
    np.testing.assert_array_equal(view_g, want)
    assert 0.1 < got.sum() / max((order_img > 0).sum(), 1) < 0.9


def test_orders_extracted_in_threads_equal_one_thread(tmp_path, monkeypatch) -> None:
    """soxs_stare extracts its orders in threads: the tables equal a one-thread run's, bit for
    bit, in the same order."""
    from astropy.table import Table

    from soxs_core.simulate import simulate_night
    from soxs_recipes.cli import run

    night = simulate_night(tmp_path / "night", "xsh_uvb", "2x2", n_bias=0, n_dark=0, n_flat=0,
                           n_science=1, n_std=0, orders=(16, 17, 18, 19), seed=4)
    tables = []
    for threads in ("1", "3"):
        monkeypatch.setenv("SOXS_NUM_THREADS", threads)
        out = tmp_path / f"out{threads}"
        assert run(["--output-dir", str(out), "soxs_stare",
                    str(night.sofs["stare_truth"])]) == 0
        tables.append(Table.read(out / "sci_slit_flux_uvb_extracted_orders.fits"))
    one, many = tables
    assert len(set(one["order"])) == 4
    assert one.colnames == many.colnames
    for name in one.colnames:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)
