"""The master flat's science (soxs_core.echelle.flat) against the simulator's truth.

Every set is simulated with a few orders (fast) and reduced with the TRUE order table
(``sim.order_table(edges=True)`` written and read back), so nothing here depends on the edge
tracer.  The truth: a raw flat k receives ``lamp_factor_k x lamp_model x sensitivity`` e-
(``lamp_model`` includes the scattered light); its master flat must therefore be
``c x lamp_model x sensitivity`` for one constant c, which is estimated robustly from the
product (the only unknown).  Tolerances come from counting statistics of the truth.

Sets: X-shooter VIS 1x1 (master bias), X-shooter NIR 1x1 (lamp-off frames) and X-shooter UVB
2x2 (binned; D2 and QTH lamps, for the stitching).  The master bias is drawn from its own
distribution (truth bias + Gaussian noise of its stated ERRS), which is what a master bias is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle import flat as F
from soxs_core.echelle.ordertable import read_order_table, to_binned, to_unbinned
from soxs_core.io.image import DetectorImage
from soxs_core.simulate.instrument import InstrumentSimulator

NFLAT = 5
CLIP = F.flat_clip_settings(5.0, 5)
WINDOW = 20.0
SIGMA_LOW = 2.0  # the arms' default low_sensitivity_clipping_sigma

SETS = {
    # name: (arm, binning, orders, lamps)
    "vis": ("xsh_vis", "1x1", [20, 21, 22], ("QTH",)),
    "nir": ("xsh_nir", "1x1", [14, 15, 16], ("QTH",)),
    "uvb": ("xsh_uvb", "2x2", [18, 19, 20, 21, 22, 23], ("D2", "QTH")),
}
FRAME_TYPE = {"D2": "DFLAT", "QTH": "FLAT"}


def _prepared_to_raw(sim: InstrumentSimulator, image: np.ndarray) -> np.ndarray:
    det = sim.detector
    full = np.zeros(det.rot_shape, image.dtype)
    full[det.rows, det.cols] = image
    return np.rot90(full, -det.arm.rotation)


def _master_bias(sim: InstrumentSimulator, sigma: float, seed: int) -> DetectorImage:
    """A master bias as its ERRS says it is: the truth plus noise of that sigma."""
    rng = np.random.default_rng(seed)
    bias = sim.truth.bias
    data = (bias + rng.normal(0.0, sigma, bias.shape)).astype(np.float32)
    return DetectorImage(data=data, error=np.full(bias.shape, sigma, np.float32),
                         qual=np.zeros(bias.shape, np.uint8))


def _order_table(sim: InstrumentSimulator, path: Path):
    sim.order_table(edges=True).writeto(path, overwrite=True)
    return read_order_table(path)


class Reduced:
    """One simulated set, reduced: per lamp the frames' truth, normalisation and masters."""

    def __init__(self, name: str, root: Path) -> None:
        arm, binning, orders, lamps = SETS[name]
        self.name = name
        self.sim = sim = InstrumentSimulator(arm, binning, seed=11, orders=orders)
        self.binx, self.biny = sim.detector.binx, sim.detector.biny
        root.mkdir(parents=True, exist_ok=True)
        self.table = _order_table(sim, root / "order_tab.fits")
        self.in_order = self.table.in_order_mask(sim.truth.shape, self.binx, self.biny)
        self.factors, self.offsets, self.norm, self.master, self.finished = {}, {}, {}, {}, {}
        self.saturated_block = None
        lamp_off = None
        master_bias = None
        if sim.arm.is_ccd:
            self.bias_sigma = sim.truth.read_noise / np.sqrt(7)
            master_bias = _master_bias(sim, self.bias_sigma, 1)
        else:
            lamp_off = []
            for k in range(3):
                hdul, _ = sim.make_lamp_off(20 + k)
                path = root / f"off_{k}.fits"
                hdul.writeto(path)
                lamp_off.append(RawFrame.open(path))
        for lamp in lamps:
            frames, factors, offsets = [], [], []
            for k in range(NFLAT):
                hdul, info = sim.make_flat(FRAME_TYPE[lamp], k)
                if name == "vis" and k == 2:
                    # a saturated block over the brightest part of one order's centre band:
                    # frame 2 loses its brightest band pixels, which biases a level measured
                    # on the raw frame but not one measured on frame / first-pass master
                    self.saturated_block = self._bright_block()
                    raw = _prepared_to_raw(sim, self.saturated_block)
                    hdul[0].data[raw] = 65535
                path = root / f"{lamp}_{k}.fits"
                hdul.writeto(path)
                frames.append(RawFrame.open(path))
                factors.append(info["lamp_factor"])
                offsets.append(info["bias_offset"])
            self.factors[lamp] = np.array(factors)
            self.offsets[lamp] = np.array(offsets)
            cal = F.calibrate_frame_set(frames, master_bias=master_bias, lamp_off=lamp_off,
                                        clip=CLIP)
            self.norm[lamp] = F.normalise_flats(cal, self.table, WINDOW, CLIP)
            self.master[lamp] = F.stack_master_flat(cal, self.norm[lamp], CLIP)
            self.finished[lamp] = F.finish_master_flat(self.master[lamp], self.table,
                                                       self.binx, self.biny, SIGMA_LOW)

    def _bright_block(self) -> np.ndarray:
        band = self.table.centre_band_mask(self.sim.truth.shape, self.binx, self.biny,
                                           WINDOW / 2, orders=[int(self.table.orders[1])])
        light = self.sim.lamp_model("QTH")
        rows = np.nonzero(band.any(axis=1))[0]
        mid = rows[np.argmax([light[r][band[r]].mean() for r in rows])]
        block = np.zeros(band.shape, bool)
        block[max(0, mid - 600):mid + 600] = band[max(0, mid - 600):mid + 600]
        return block

    def expected(self, lamp: str) -> np.ndarray:
        """Truth of the master flat up to one constant."""
        return self.sim.lamp_model(lamp) * self.sim.truth.sensitivity

    def well_lit(self, lamp: str, level: float = 0.2) -> np.ndarray:
        light = self.sim.lamp_model(lamp)
        return self.in_order & (light > level * np.percentile(light[self.in_order], 99))

    def defects(self) -> np.ndarray:
        t = self.sim.truth
        return t.low_sensitivity_mask | t.cold_mask | t.hot_mask | t.static_bad_mask


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat_truth")
    cache: dict[str, Reduced] = {}

    def get(name: str) -> Reduced:
        if name not in cache:
            cache[name] = Reduced(name, root / name)
        return cache[name]
    return get


def _scale_constant(image: DetectorImage, expected: np.ndarray, sel: np.ndarray) -> float:
    return float(np.median(image.data[sel] / expected[sel]))


# ----------------------------------------------------------------------------- (a) pulls
@pytest.mark.parametrize("name,lamp", [("vis", "QTH"), ("nir", "QTH"), ("uvb", "D2"),
                                       ("uvb", "QTH")])
def test_master_matches_truth_within_its_errors(reduced, name, lamp):
    """Inside the orders the finished master is c x lamp x sensitivity, its residuals
    consistent with its ERRS (pull std 0.9-1.1), with no bias beyond noise."""
    r = reduced(name)
    image = r.finished[lamp].image
    exp = r.expected(lamp)
    sel = r.well_lit(lamp) & (image.qual == 0) & ~r.defects()
    assert sel.sum() > 50_000
    c = _scale_constant(image, exp, sel)
    pull = (image.data[sel] - c * exp[sel]) / image.error[sel]
    assert 0.9 < np.std(pull) < 1.1, np.std(pull)
    assert abs(np.mean(pull)) < 0.05
    # no order, nor the order ends, is off by more than its noise allows
    labels = r.table.order_label_image(image.shape, r.binx, r.biny)
    for n in r.table.orders:
        p = pull[labels[sel] == n]
        if p.size < 1000:  # an order the lamp hardly lights (UVB QTH in the blue)
            continue
        assert abs(np.mean(p)) < 5 * np.std(p) / np.sqrt(p.size) + 0.05, n


def test_inter_order_is_one_and_mean_level_is_one(reduced):
    r = reduced("vis")
    fin = r.finished["QTH"]
    img = fin.image
    out = ~r.in_order
    assert np.all(img.data[out] == 1.0) and np.all(img.error[out] == 0.0)
    good = r.in_order & (img.qual == 0)
    assert abs(np.mean(img.data[good], dtype=np.float64) - 1.0) < 1e-5
    qc = F.flat_qc(r.norm["QTH"], fin)
    assert qc.values["N LOW SENS"] == int(np.count_nonzero(img.qual & Qual.LOW_SENS))
    assert qc.values["COLDPIX NUM"] == int(np.count_nonzero(img.qual))


def test_common_calibration_error_is_not_averaged_down(tmp_path):
    """Faint flats and a noisy master bias: the bias error, common to all flats, must be added
    once after the stack.  Averaged down with the flats' own noise, ERRS would be ~1.5x small."""
    sim = InstrumentSimulator("xsh_vis", "2x2", seed=4, orders=[21])
    sim.flat_level = 1500.0
    table = _order_table(sim, tmp_path / "ot.fits")
    sigma_b = 25.0
    bias = _master_bias(sim, sigma_b, 3)
    frames = []
    for k in range(NFLAT):
        hdul, _ = sim.make_flat("FLAT", k)
        hdul.writeto(tmp_path / f"f{k}.fits")
        frames.append(RawFrame.open(tmp_path / f"f{k}.fits"))
    cal = F.calibrate_frame_set(frames, master_bias=bias)
    norm = F.normalise_flats(cal, table, WINDOW, CLIP)
    master = F.stack_master_flat(cal, norm, CLIP)
    exp = sim.lamp_model("QTH") * sim.truth.sensitivity
    in_order = table.in_order_mask(exp.shape, 2, 2)
    t = sim.truth
    sel = in_order & (exp > 0.3 * exp[in_order].max()) & (master.qual == 0) & ~(
        t.low_sensitivity_mask | t.cold_mask | t.hot_mask | t.static_bad_mask)
    # the master is mean_k((raw_k - bias_master) / L_k): its bias error is -noise/L
    c = _scale_constant(master, exp, sel)
    pull = (master.data[sel] - c * exp[sel]) / master.error[sel]
    assert 0.93 < np.std(pull) < 1.07, np.std(pull)


# ----------------------------------------------------------------------------- (b) low sens
@pytest.mark.parametrize("name,lamp", [("vis", "QTH"), ("nir", "QTH"), ("uvb", "QTH")])
def test_low_sensitivity_pixels_recovered(reduced, name, lamp):
    """Every injected low-sensitivity pixel (response 0.05-0.4, single or in dust clumps) is
    flagged (recall >= 99 %); normal in-order pixels almost never are (<= 1e-4)."""
    r = reduced(name)
    t = r.sim.truth
    img = r.finished[lamp].image
    low = (img.qual & np.uint8(Qual.LOW_SENS)) != 0
    injected = t.low_sensitivity_mask & r.in_order
    assert injected.sum() > 100
    recall = np.count_nonzero(low & injected) / injected.sum()
    assert recall >= 0.99, recall
    normal = r.in_order & ~r.defects()
    false_rate = np.count_nonzero(low & normal) / normal.sum()
    assert false_rate <= 1e-4, (false_rate, np.count_nonzero(low & normal))
    assert r.finished[lamp].n_low_sens == np.count_nonzero(low)
    # nothing outside the orders is flagged
    assert not np.any(low & ~r.in_order)


# ----------------------------------------------------------------------------- (c) jitter
def test_two_stage_levels_follow_lamp_jitter(reduced):
    """The final levels are the lamp factors up to one constant, to the precision their noise
    allows, also for frame 2 whose brightest band pixels are saturated; the first-stage
    levels do so for the untouched frames but are biased for frame 2.

    Each raw frame also carries its own bias drift d_k (e-, not in the master bias), which
    shifts a mean of frame / M1 by d_k x mean(1 / E) and a mean of raw values by
    d_k / mean(E), E being the expected e- of the band pixels: both are part of the truth.
    """
    r = reduced("vis")
    norm, factors, drift = r.norm["QTH"], r.factors["QTH"], r.offsets["QTH"]
    assert np.std(factors) > 0.005  # the jitter is there to be removed
    band = r.table.centre_band_mask(r.sim.truth.shape, r.binx, r.biny, WINDOW / 2)
    band &= ~r.defects() & ~r.saturated_block
    flux = (r.expected("QTH") * np.mean(factors))[band]
    flux = flux[flux > 0]
    # noise of a level: a mean over the band of (frame / M1), per pixel relative noise
    # sqrt(F + ron^2) / F with F the expected e- of the frame's pixel
    rel = np.sqrt(flux + r.sim.truth.read_noise ** 2) / flux
    sigma = np.sqrt(np.sum(rel ** 2)) / flux.size
    want2 = factors + drift * np.mean(1.0 / flux) * np.mean(factors)
    ratio = norm.levels / want2
    dev = ratio / np.median(ratio) - 1
    assert np.max(np.abs(dev)) < 6 * sigma + 2e-5, (dev, sigma)
    want1 = factors + drift / np.mean(flux) * np.mean(factors)
    first = norm.first_levels / want1
    untouched = np.arange(NFLAT) != 2
    dev1 = first[untouched] / np.median(first[untouched]) - 1
    assert np.max(np.abs(dev1)) < 6 * sigma + 2e-5, dev1
    # the saturated block took frame 2's brightest pixels out of its first level
    assert first[2] / np.median(first[untouched]) < 1 - 0.01
    # and the master is unharmed where frame 2 was saturated
    block = r.saturated_block & (r.finished["QTH"].image.qual == 0) & ~r.defects()
    img, exp = r.finished["QTH"].image, r.expected("QTH")
    sel = r.well_lit("QTH") & (img.qual == 0) & ~r.defects()
    c = _scale_constant(img, exp, sel)
    pull = (img.data[block] - c * exp[block]) / img.error[block]
    assert abs(np.mean(pull)) < 0.1 and 0.85 < np.std(pull) < 1.15


def test_ordexp_from_truth(reduced):
    """ORDEXP10/50/90 are the percentiles of the calibrated e- in the centre band."""
    r = reduced("vis")
    norm, factors = r.norm["QTH"], r.factors["QTH"]
    band = r.table.centre_band_mask(r.sim.truth.shape, r.binx, r.biny, WINDOW / 2)
    ok = band & (r.sim.truth.static_bad_mask == 0)
    exp = r.expected("QTH")[ok] * np.median(factors)
    for got, q in zip(norm.ordexp, (10, 50, 90)):
        want = np.percentile(exp, q)
        assert abs(got / want - 1) < 0.01, (q, got, want)


# ----------------------------------------------------------------------------- (d) UVB
def test_uvb_stitching(reduced):
    """Crossover from the lamps' order fluxes, D2 scale from the truth ratio, seam 5 px above
    the crossover order's upper edge, bluer orders from D2 and redder ones from QTH."""
    r = reduced("uvb")
    d, q = r.finished["D2"].image, r.finished["QTH"].image
    dflux, qflux = r.norm["D2"].order_flux, r.norm["QTH"].order_flux
    order, scale = F.find_uvb_overlap_order_and_scale(d, q, r.table, r.binx, r.biny,
                                                      dflux, qflux, window=WINDOW)
    # truth: the bluest orders in which the D2 lamp gives more light than the QTH lamp
    band = r.table.centre_band_mask(d.shape, r.binx, r.biny, WINDOW / 2)
    labels = r.table.order_label_image(d.shape, r.binx, r.biny)
    dl, ql = r.sim.order_light_model("D2"), r.sim.order_light_model("QTH")
    brighter_d = {int(n): np.median(dl[band & (labels == n)]) > np.median(
        ql[band & (labels == n)]) for n in r.table.orders}
    true_order = min(n for n in brighter_d if all(brighter_d[m] for m in brighter_d if m >= n))
    assert order == true_order
    assert any(not v for v in brighter_d.values()) and any(brighter_d.values())

    # scale: the ratio of the two masters' truths in the window
    sel_d = r.well_lit("D2") & (d.qual == 0) & ~r.defects()
    sel_q = r.well_lit("QTH") & (q.qual == 0) & ~r.defects()
    c_d = _scale_constant(d, r.expected("D2"), sel_d)
    c_q = _scale_constant(q, r.expected("QTH"), sel_q)
    win = _window_mask(r, order, d.shape)
    want = np.median(c_q * r.expected("QTH")[win]) / np.median(c_d * r.expected("D2")[win])
    rel = np.sqrt(np.median((d.error / d.data)[win]) ** 2
                  + np.median((q.error / q.data)[win]) ** 2) * 1.25 / np.sqrt(win.sum())
    assert abs(scale / want - 1) < 5 * rel + 1e-3, (scale, want, rel)

    stitched = F.stitch_uv_mflats(d, q, r.table, order, scale, r.binx, r.biny)
    # the seam: last D2 pixel / first QTH pixel of each row at the true edge + 5 px
    b = to_unbinned(np.arange(d.shape[0]), r.biny)
    line = r.table.edge_up(float(order), b) + F.STITCH_OFFSET
    a = to_unbinned(np.arange(d.shape[1]), r.binx)
    from_d = a[None, :] < line[:, None]
    dscaled = d.data * np.float32(scale)
    assert np.array_equal(stitched.data[from_d], dscaled[from_d])
    assert np.array_equal(stitched.data[~from_d], q.data[~from_d])
    assert np.array_equal(stitched.error[from_d], (d.error * np.float32(scale))[from_d])
    assert np.array_equal(stitched.qual[~from_d], q.qual[~from_d])
    # the seam lies in the gap between the crossover order and the next redder one
    assert np.all(line > r.table.edge_up(float(order), b))
    assert np.all(line < r.table.edge_low(float(order - 1), b))
    # every in-order pixel of the bluer orders comes from D2, of the redder ones from QTH
    for n in r.table.orders:
        pix = labels == n
        src = dscaled if n >= order else q.data
        assert np.array_equal(stitched.data[pix], src[pix]), n
    # and the finished stitched master is truth x one constant in every order's lamp
    fin = F.finish_master_flat(stitched, r.table, r.binx, r.biny, SIGMA_LOW)
    img = fin.image
    ratio_d = img.data / r.expected("D2")
    ratio_q = img.data / r.expected("QTH")
    hi = sel_d & (labels >= order) & (img.qual == 0)
    lo = sel_q & (labels < order) & (labels > 0) & (img.qual == 0)
    cd, cq = np.median(ratio_d[hi]), np.median(ratio_q[lo])
    assert abs(cd * c_q / (cq * c_d) / scale - 1) < 5e-3


def _window_mask(r: Reduced, order: int, shape) -> np.ndarray:
    b0, b1 = r.table.along_range(order)
    b = 0.5 * (b0 + b1)
    a = float(r.table.centre(float(order), b))
    ib, ia = to_binned(b, r.biny), to_binned(a, r.binx)
    hb, ha = WINDOW / 2 / r.biny, WINDOW / 2 / r.binx
    m = np.zeros(shape, bool)
    m[int(np.ceil(ib - hb)):int(np.floor(ib + hb)) + 1,
      int(np.ceil(ia - ha)):int(np.floor(ia + ha)) + 1] = True
    t = r.sim.truth
    return m & ~(t.low_sensitivity_mask | t.cold_mask | t.hot_mask | t.static_bad_mask)
