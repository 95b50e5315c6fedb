"""What the simulator gives soxs_mflat's truth tests: a slit width that varies along each order,
low-sensitivity pixels with a known list, scattered light with a known model, NIR lamp-off
frames, the header dialects soxspipe expects, binned flats and the night's truth files."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.rawframe import RawFrame
from soxs_core.simulate import DetectorSimulator, InstrumentSimulator, simulate_night
from soxs_core.simulate.echelle import EchelleFormat
from soxs_core.simulate.headers import sof_tag

ARMS = ["xsh_uvb", "xsh_vis", "xsh_nir", "soxs_vis", "soxs_nir"]


def _sof(path):
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _read(path):
    frame = RawFrame.open(path)
    try:
        return frame.read_band()[0]
    finally:
        frame.close()


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("code", ARMS)
def test_slit_width_varies_along_every_order(code):
    """Every arm's slit image changes width along each order by a few pixels, smoothly, and
    the edges, the pixel-to-slit mapping and the renderer all use that width."""
    fmt = EchelleFormat(code)
    for n in fmt.orders:
        g = fmt.geometry(n)
        if not np.isfinite(g.b_min):
            continue
        b = np.linspace(g.b_min, g.b_max, 400)
        lo, up = fmt.edges(n, b)
        width = up - lo
        span = g.b_max - g.b_min
        if span > 0.5 * fmt.n_along:      # a short stub at a corner may vary less
            assert width.max() - width.min() > 1.0, (n, width.min(), width.max())
        assert width.max() - width.min() < 8.0
        assert np.max(np.abs(np.diff(width, 2))) < 0.01     # smooth
        # the slit ends map to s = -L/2 and +L/2 at every b
        s_lo, _ = fmt.pixel_to_world(n, lo, b)
        s_up, _ = fmt.pixel_to_world(n, up, b)
        assert np.allclose(np.sort([s_lo[0], s_up[0]]), [-0.5 * fmt.slit_length,
                                                          0.5 * fmt.slit_length])


def test_rendered_flat_follows_the_varying_width():
    """SOXS VIS (whose variation the simulator adds): the lamp image's half-light points across
    the order follow EchelleFormat.edges at both ends of the order."""
    sim = InstrumentSimulator("soxs_vis", seed=3, orders=[3])
    img = sim.order_light_model("QTH")
    fmt = sim.format
    g = fmt.geometry(3)
    widths_model, widths_img = [], []
    for b in (int(g.b_min) + 300, int(0.5 * (g.b_min + g.b_max)), int(g.b_max) - 300):
        prof = img[b].astype(float)
        cen = float(fmt.centre(3, b))
        half = 0.5 * np.median(prof[int(cen) - 5:int(cen) + 6])
        a = np.arange(prof.size)
        left = a < cen
        # linear interpolation of the half-level crossing on each side
        il = np.flatnonzero(left & (prof >= half))[0]
        ir = np.flatnonzero(~left & (prof >= half))[-1]
        x_lo = il - 1 + (half - prof[il - 1]) / (prof[il] - prof[il - 1])
        x_up = ir + (prof[ir] - half) / (prof[ir] - prof[ir + 1])
        lo, up = fmt.edges(3, b)
        assert x_lo == pytest.approx(float(lo), abs=0.3)
        assert x_up == pytest.approx(float(up), abs=0.3)
        widths_model.append(float(up - lo))
        widths_img.append(x_up - x_lo)
    assert np.ptp(widths_model) > 1.5
    assert np.allclose(widths_img, widths_model, atol=0.4)


# ----------------------------------------------------------------------------- low sensitivity
@pytest.fixture(scope="module")
def vis22():
    return InstrumentSimulator("xsh_vis", "2x2", "fast", seed=9, orders=[20, 21, 22, 23])


def test_low_sensitivity_pixels_known_and_apart(vis22):
    t = vis22.truth
    rows, cols, resp, clump = t.low_sensitivity_pixels()
    mask = t.low_sensitivity_mask
    assert mask.sum() == rows.size and 300 <= rows.size <= 700
    assert np.all((resp >= 0.05) & (resp <= 0.4))
    assert np.array_equal(resp, t.sensitivity[rows, cols])
    assert (clump == -1).sum() == 300 and len(t.low_sensitivity_clumps) == 6
    for k in range(6):
        assert (clump == k).sum() >= 5          # small dust-like discs, not single pixels
    # distinct from every other defect (which stay as the detector alone makes them)
    assert not np.any(mask & (t.cold_mask | t.hot_mask | t.static_bad_mask))
    alone = DetectorSimulator("xsh_vis", "2x2", "fast", seed=9).truth
    assert not alone.low_sensitivity_mask.any()
    for name in ("bias", "dark_rate", "hot_mask", "cold_mask", "static_bad_mask"):
        assert np.array_equal(getattr(alone, name), getattr(t, name)), name
    assert np.array_equal(alone.sensitivity[~mask], t.sensitivity[~mask])
    # inside the well-lit orders
    assert np.all(vis22.well_lit_mask()[rows, cols])
    assert np.all(vis22.order_light_model("QTH")[rows, cols] >= 0.2 * vis22.flat_level)
    # deterministic from the seed
    again = InstrumentSimulator("xsh_vis", "2x2", "fast", seed=9, orders=[20, 21, 22, 23])
    assert np.array_equal(again.truth.low_sensitivity_mask, mask)
    other = InstrumentSimulator("xsh_vis", "2x2", "fast", seed=10, orders=[20, 21, 22, 23])
    assert not np.array_equal(other.truth.low_sensitivity_mask, mask)


def test_low_sensitivity_pixels_avoid_dense_defects():
    """With 5 % hot and 5 % cold pixels chance alone would put dozens of low-sensitivity
    pixels on them: none may land there."""
    sim = InstrumentSimulator("xsh_vis", "2x2", "fast", seed=9, orders=[21, 22],
                              hot_pixel_fraction=0.05, cold_pixel_fraction=0.05)
    t = sim.truth
    assert t.low_sensitivity_mask.sum() >= 300
    assert not np.any(t.low_sensitivity_mask & (t.cold_mask | t.hot_mask | t.static_bad_mask))


def test_low_sensitivity_pixels_seen_in_a_flat(vis22, tmp_path):
    """A raw flat's electrons at the listed pixels are their response times the light."""
    hdul, info = vis22.make_flat("FLAT", 3)
    path = tmp_path / "flat.fits"
    hdul.writeto(path)
    e = _read(path) - vis22.truth.bias - vis22.truth.frame_offsets[3]
    rows, cols, resp, _ = vis22.truth.low_sensitivity_pixels()
    light = vis22.lamp_model("QTH")[rows, cols] * info["lamp_factor"]
    ratio = e[rows, cols] / light
    good = ~info["cosmic_mask"][rows, cols]
    noise = np.sqrt(resp * light + vis22.truth.read_noise**2) / light
    pull = (ratio - resp)[good] / noise[good]
    assert abs(np.mean(pull)) < 0.25 and 0.8 < np.std(pull) < 1.2


# ----------------------------------------------------------------------------- scattered light
@pytest.mark.parametrize("code,orders", [("xsh_vis", [20, 21, 22, 23]),
                                         ("soxs_nir", [14, 15, 16, 17])])
def test_scattered_light_model(code, orders):
    sim = InstrumentSimulator(code, seed=4, orders=orders)
    orders_only = sim.order_light_model("QTH")
    scat = sim.scattered_model("QTH")
    assert np.array_equal(sim.lamp_model("QTH"), orders_only + scat)
    assert scat.sum() == pytest.approx(sim.scattered_fraction * orders_only.sum(), rel=1e-4)
    # a few % of the neighbouring orders' peak in the gaps between them
    fmt = sim.format
    ratios = []
    for n in orders[:-1]:
        g = fmt.geometry(n)
        b = np.linspace(g.b_min + 200, g.b_max - 200, 30)
        lo_next = fmt.edges(n + 1, b)
        lo_n = fmt.edges(n, b)
        # the gap is between the two orders, whichever lies lower on the detector
        gap = np.where(fmt.centre(n + 1, b) > fmt.centre(n, b),
                       0.5 * (lo_n[1] + lo_next[0]), 0.5 * (lo_n[0] + lo_next[1]))
        ai, bi = np.rint(gap).astype(int), np.rint(b).astype(int)
        ci = np.rint(fmt.centre(n, b)).astype(int)
        def pick(img, a, bi=bi):
            return img[bi, a] if fmt.dispersion_axis == "y" else img[a, bi]

        assert np.all(pick(orders_only, ai) < 1e-3 * sim.flat_level)   # truly between
        ratios.append(np.median(pick(scat, ai) / pick(orders_only, ci)))
    assert 0.015 < np.median(ratios) < 0.06
    # smooth: no structure on the scale of a few pixels
    assert np.max(np.abs(np.diff(scat, 2, axis=0))) < 1e-3 * scat.max()


def test_scattered_light_keeps_its_size_when_binned():
    a = InstrumentSimulator("xsh_vis", "1x1", seed=4, orders=[21, 22])
    b = InstrumentSimulator("xsh_vis", "2x2", seed=4, orders=[21, 22])
    sa, sb = a.scattered_model("QTH"), b.scattered_model("QTH")
    oa, ob = a.order_light_model("QTH"), b.order_light_model("QTH")
    # same fraction of the order light, same shape across the orders on the detector
    ny, nx = sb.shape
    blocked = sa[:2 * ny, :2 * nx].reshape(ny, 2, nx, 2).sum(axis=(1, 3))
    prof_a = blocked.mean(axis=0) / oa.sum()
    prof_b = sb.mean(axis=0) / ob.sum()
    assert np.max(np.abs(prof_a - prof_b)) < 0.03 * prof_a.max()


# ----------------------------------------------------------------------------- binned flats
def test_binned_flat_is_the_block_sum_of_the_unbinned_one():
    """The 2x2 lamp image is the 1x1 one summed over 2x2 blocks (up to the common level
    normalisation): the renderer integrates light over the binned pixels' true area."""
    a = InstrumentSimulator("xsh_vis", "1x1", seed=2, orders=[24, 25])
    b = InstrumentSimulator("xsh_vis", "2x2", seed=2, orders=[24, 25])
    ia, ib = a.order_light_model("QTH"), b.order_light_model("QTH")
    ny, nx = ib.shape
    block = ia[:2 * ny, :2 * nx].reshape(ny, 2, nx, 2).sum(axis=(1, 3))
    lit = block > 0.3 * block.max()
    k = np.median(ib[lit] / block[lit])
    assert np.percentile(np.abs(ib[lit] / (k * block[lit]) - 1), 99) < 0.01
    # the true edges in binned pixels: binned pixel i is centred on unbinned 2 i + 0.5
    fmt = b.format
    row = 1000
    prof = ib[row].astype(float)
    lo, up = fmt.edges(24, 2 * row + 0.5)
    cols = (np.arange(nx) * 2 + 0.5)
    inside = (cols > lo + 3) & (cols < up - 3)
    outside = (cols < lo - 3) | (cols > up + 3)
    assert prof[inside].min() > 20 * max(prof[outside & (np.abs(cols - lo) < 20)].max(), 1)


# ----------------------------------------------------------------------------- headers
@pytest.mark.parametrize("code,dpr_off,lamp_key,lamp_value", [
    ("xsh_nir", "LAMP,FLAT", "ESO INS LAMP1 NAME", "NIR_QTH_Lamp"),
    ("soxs_nir", "FLAT,LAMP", "ESO INS QTH NAME", "Qth_Lamp"),
    ("soxs_vis", None, "ESO INS QTH NAME", "Qth_Lamp"),
])
def test_flat_and_lamp_off_dialects(code, dpr_off, lamp_key, lamp_value):
    sim = InstrumentSimulator(code, seed=1, orders=[sim_order(code)])
    on, _ = sim.make_flat("FLAT", 0)
    hdr = on[0].header
    assert (hdr["ESO DPR TYPE"], hdr["ESO DPR TECH"]) == ("LAMP,FLAT", "ECHELLE,SLIT")
    assert hdr[lamp_key] == lamp_value
    assert sof_tag(sim.arm, "FLAT") == f"LAMP_FLAT_{sim.arm.name}"
    if dpr_off:
        off, _ = sim.make_lamp_off(1)
        ho = off[0].header
        assert (ho["ESO DPR TYPE"], ho["ESO DPR TECH"]) == (dpr_off, "IMAGE")
        assert lamp_key not in ho or "QTH" not in str(ho.get(lamp_key, ""))
        assert sof_tag(sim.arm, "FLAT_OFF") == dpr_off.replace(",", "_") + "_NIR"


def sim_order(code: str) -> int:
    return {"xsh_nir": 16, "soxs_nir": 15, "soxs_vis": 2}[code]


# ----------------------------------------------------------------------------- the night
@pytest.fixture(scope="module")
def nir_night(tmp_path_factory):
    out = tmp_path_factory.mktemp("mflat") / "soxs_nir"
    return simulate_night(out, "soxs_nir", seed=6, n_dark=0, n_flat=2, n_science=0, n_std=0,
                          orders=[14, 15, 16])


def test_night_defaults_take_five_flats_per_lamp():
    assert inspect.signature(simulate_night).parameters["n_flat"].default >= 5


def test_night_flats_lamp_off_and_tags(nir_night):
    flat = _sof(nir_night.sofs["flat"])
    on = [(p, t) for p, t in flat if fits.getheader(p).get("ESO DPR TECH") == "ECHELLE,SLIT"]
    off = [(p, t) for p, t in flat if fits.getheader(p).get("ESO DPR TECH") == "IMAGE"]
    assert len(on) == 2 and len(off) == len(on)          # one lamp-off per lamp-on flat
    assert {t for _, t in on} == {"LAMP_FLAT_NIR"} and {t for _, t in off} == {"FLAT_LAMP_NIR"}
    exps = {fits.getheader(p)["EXPTIME"] for p, _ in on + off}
    assert len(exps) == 1
    assert flat[-1][1] == "ORDER_TAB_NIR"


def test_uvb_night_takes_n_flat_per_lamp(tmp_path):
    res = simulate_night(tmp_path / "uvb", "xsh_uvb", "2x2", "fast", seed=6, n_bias=1,
                         n_dark=0, n_flat=2, n_science=0, n_std=0, orders=[19, 20, 21, 22])
    tags = [t for _, t in _sof(res.sofs["flat"])]
    assert tags.count("LAMP_DFLAT_UVB") == 2 and tags.count("LAMP_QFLAT_UVB") == 2
    assert tags[-2:] == ["MASTER_BIAS_UVB", "ORDER_TAB_UVB"]
    for lamp in ("d2", "qth"):
        assert res.truth[f"scattered_{lamp}"].name == f"scattered_light_{lamp}.fits"


def test_night_truth_files_for_mflat(nir_night):
    truth = nir_night.truth
    sim = InstrumentSimulator("soxs_nir", seed=6, orders=[14, 15, 16])
    with fits.open(truth["detector"]) as hdul:
        low = hdul["LOW_SENS"].data.astype(bool)
        assert np.array_equal(low, sim.truth.low_sensitivity_mask)
        tab = hdul["LOW_SENS_PIXELS"].data
        assert np.array_equal(low[tab["row"], tab["col"]], np.ones(len(tab), bool))
        assert len(tab) == low.sum()
        assert np.allclose(tab["response"], sim.truth.sensitivity[tab["row"], tab["col"]])
        assert len(hdul["DUST_CLUMPS"].data) == 6
    scat = fits.getdata(truth["scattered_qth"])
    assert np.array_equal(scat, sim.scattered_model("QTH"))
    edges = fits.getdata(truth["order_edges"], 1)
    assert set(edges["order"]) == {14, 15, 16}
    fmt = sim.format
    for n in (14, 15, 16):
        m = edges["order"] == n
        g = fmt.geometry(n)
        assert edges["b"][m][0] == g.b_min and edges["b"][m][-1] == g.b_max
        assert np.all(np.diff(edges["b"][m]) == 1)
        lo, up = fmt.edges(n, edges["b"][m])
        assert np.allclose(edges["a_low"][m], lo) and np.allclose(edges["a_up"][m], up)
    # the calibration tables carry the first flat's time
    frames = fits.getdata(truth["frames"], 1)
    first = frames[np.char.strip(frames["frame_type"]) == "FLAT"][0]
    for key in ("ORDER_TAB", "DISP_TAB", "DISP_IMAGE"):
        hdr = fits.getheader(nir_night.calib[key])
        assert hdr["MJD-OBS"] == pytest.approx(first["mjd"], abs=1e-7)
        assert hdr["EXPTIME"] == first["exptime"]
