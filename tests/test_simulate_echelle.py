"""Echelle-level simulator: format, lamps, sky, objects and the truth tables."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from shared_data import require_shared
from soxs_core.calib import static_path
from soxs_core.detector.instruments import ARMS
from soxs_core.detector.rawframe import RawFrame
from soxs_core.simulate import EchelleFormat, InstrumentSimulator, SceneParameters
from soxs_core.simulate.spectra import (
    TELESCOPE_AREA_M2,
    efficiency,
    extinction_mag,
    flam_to_photons,
    sky_lines,
    standard_star,
)
from soxs_core.simulate.tables import evaluate_disp_row


@pytest.fixture(scope="module")
def reference():
    """The predicted line tables of shared/reference/static_calibs."""
    return require_shared("reference/static_calibs")


def _read(hdul, tmp_path, name="f.fits"):
    path = tmp_path / name
    hdul.writeto(path, overwrite=True)
    frame = RawFrame.open(path)
    try:
        return frame.read_band()[0]
    finally:
        frame.close()


@pytest.fixture(scope="module")
def uvb():
    return InstrumentSimulator("xsh_uvb", "2x2", "slow", seed=3, orders=[14, 15, 22, 23])


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("code", list(ARMS))
def test_orders_cover_the_spectral_format_table(code):
    fmt = EchelleFormat(code)
    table = fits.getdata(static_path(fmt.arm, fmt.arm.spectral_format_file), 1)
    assert [int(o) for o in table["ORDER"]] == fmt.orders.tolist()
    for row in table:
        geo = fmt.geometry(int(row["ORDER"]))
        lo, hi = float(row["WLMINFUL"]), float(row["WLMAXFUL"])
        assert lo - 0.01 <= geo.wl_min < geo.wl_max <= hi + 0.01
        if "WLMIN" in table.columns.names:  # the useful range lies (almost) on the detector
            useful = float(row["WLMAX"]) - float(row["WLMIN"])
            covered = min(geo.wl_max, row["WLMAX"]) - max(geo.wl_min, row["WLMIN"])
            assert covered > 0.9 * useful


# cross-order positions quoted in INSTRUMENTS.md §1.1 (prepared frame, px)
@pytest.mark.parametrize("code,order,position", [
    ("xsh_uvb", 13, 1720), ("xsh_uvb", 24, 546), ("xsh_vis", 16, 1812), ("xsh_vis", 30, 282),
    ("xsh_nir", 11, 976), ("xsh_nir", 26, 71), ("soxs_vis", 1, 171), ("soxs_vis", 2, 315),
    ("soxs_vis", 3, 472), ("soxs_vis", 4, 646), ("soxs_nir", 10, 470), ("soxs_nir", 24, 1445),
])
def test_orders_where_the_instrument_puts_them(code, order, position):
    fmt = EchelleFormat(code)
    geo = fmt.geometry(order)
    centre = fmt.centre(order, np.linspace(geo.b_min, geo.b_max, 50))
    assert centre.min() - 40 < position < centre.max() + 40


@pytest.mark.parametrize("code,table", [
    ("xsh_vis", "xsh/THEO_TAB_MULT_VIS_1x1.fits"), ("xsh_uvb", "xsh/THEO_TAB_MULT_UVB_1x1.fits"),
    ("soxs_vis", "soxs/SOXS_MPH_TAB_VIS_ThAr_1x1.fits"),
])
def test_pinhole_positions_match_predicted_line_tables(reference, code, table):
    fmt = EchelleFormat(code)
    t = fits.getdata(reference / table, 1)
    cols = {c.lower(): c for c in t.columns.names}
    dx, dy = [], []
    for order in fmt.orders:
        m = np.asarray(t[cols["order"]]) == order
        a, b = fmt.world_to_pixel(order, t[cols["wavelength"]][m], t[cols["slit_position"]][m])
        dx.append(a - t[cols["detector_x"]][m])
        dy.append(b - t[cols["detector_y"]][m])
    dx, dy = np.concatenate(dx), np.concatenate(dy)
    # SOXS tables carry ~0.1 nm measurement scatter, the X-shooter ones are model-made
    tol = 0.3 if code.startswith("xsh") else 1.5
    assert np.median(np.abs(dx)) < tol and np.median(np.abs(dy)) < tol


@pytest.mark.parametrize("code", ["xsh_uvb", "xsh_vis", "soxs_vis"])
def test_slit_length_in_pixels(code):
    """11" (X-shooter) / 12" (SOXS) slit at the real pixel scale (INSTRUMENTS.md §1.1)."""
    fmt = EchelleFormat(code)
    order = int(fmt.orders[len(fmt.orders) // 2])
    geo = fmt.geometry(order)
    b = 0.5 * (geo.b_min + geo.b_max)
    lo, up = fmt.edges(order, b)
    length_px = float(up - lo)
    assert length_px == pytest.approx(fmt.slit_length / fmt.arm.pixel_scale_arcsec, rel=0.08)
    assert fmt.slit_length == (11.0 if code.startswith("xsh") else 12.0)


@pytest.mark.parametrize("code,table", [("xsh_nir", "xsh/THEO_TAB_MULT_NIR.fits"),
                                        ("soxs_nir", "soxs/ArHgNeXe_clean_within_2.0pixel.fits")])
def test_nir_slit_length_follows_pinhole_spacing(reference, code, table):
    """NIR arms: the slit scale is the one of the predicted multi-pinhole tables."""
    fmt = EchelleFormat(code)
    t = fits.getdata(reference / table, 1)
    cols = {c.lower(): c for c in t.columns.names}
    across = cols["detector_x"] if fmt.dispersion_axis == "y" else cols["detector_y"]
    for order in fmt.orders[[2, -3]]:
        m = np.asarray(t[cols["order"]]) == order
        wl = np.round(np.asarray(t[cols["wavelength"]][m], float), 4)
        slopes, model = [], []
        for w in np.unique(wl):  # one slope per arc line (9 pinholes)
            line = wl == w
            if line.sum() >= 5:
                slopes.append(np.polyfit(t[cols["slit_position"]][m][line],
                                         t[across][m][line], 1)[0])
                a, b = fmt.world_to_pixel(order, w, 0.0)
                model.append(float(fmt.scale(order, b)))
        assert np.median(model) == pytest.approx(np.median(slopes), rel=0.02)
        geo = fmt.geometry(order)
        lo, up = fmt.edges(order, 0.5 * (geo.b_min + geo.b_max))
        assert float(up - lo) == pytest.approx(fmt.slit_length * abs(np.median(slopes)),
                                               rel=0.05)


# ----------------------------------------------------------------------------- lamps
def test_flat_reads_back_with_lamp_jitter_and_pixel_response(uvb, tmp_path):
    truth = uvb.truth
    hdul, info = uvb.make_flat("QFLAT", 4)
    assert hdul[0].header["ESO DPR TYPE"] == "LAMP,QFLAT"
    assert hdul[0].header["ESO DPR TECH"] == "ECHELLE,SLIT"
    e = _read(hdul, tmp_path)
    model = uvb.lamp_model("QTH") * np.float32(info["lamp_factor"])
    expected = truth.expected_electrons(info["exptime"], 4) + model * truth.sensitivity
    good = ~(info["cosmic_mask"] | truth.hot_mask) & (model > 1000)
    chi = (e - expected)[good] / np.sqrt(model[good] * truth.sensitivity[good]
                                         + truth.read_noise**2)
    assert abs(chi.mean()) < 0.02 and chi.std() == pytest.approx(1.0, abs=0.05)
    # pixel-to-pixel sensitivity is visible: dividing by the true response flattens the flat
    ratio = (e - truth.bias)[good] / model[good]
    assert np.corrcoef(ratio, truth.sensitivity[good])[0, 1] > 0.3
    # lamp brightness changes from frame to frame
    factors = {uvb.make_flat("QFLAT", i)[1]["lamp_factor"] for i in range(3)}
    assert len(factors) == 3 and all(0.9 < f < 1.1 for f in factors)
    assert 0.3 * uvb.flat_level < float(np.percentile(model[model > 0], 99.5)) / 1.1


def test_uvb_d2_and_qth_lamps_light_different_orders(uvb):
    d2, qth = uvb.lamp_model("D2"), uvb.lamp_model("QTH")
    r = uvb.renderer

    def order_level(img, order):
        return float(np.median(r.sample_rows(img, order, np.array([0.0]))))
    # blue orders 22-23 (D2 in the spectral-format table) vs red orders 14-15 (QTH)
    assert order_level(d2, 22) / order_level(qth, 22) > 5 * order_level(d2, 14) / order_level(
        qth, 14)
    assert order_level(qth, 14) > 3 * order_level(qth, 23)
    assert order_level(d2, 23) > order_level(d2, 14)


def test_blaze_and_slit_illumination(uvb):
    img = uvb.lamp_model("QTH")
    r = uvb.renderer
    along = r.sample_rows(img, 15, np.array([0.0]))[:, 0]
    peak = np.argmax(along)
    assert 0.2 * along.size < peak < 0.8 * along.size      # blaze peaks inside the order
    assert 0.03 < along[5] / along[peak] < 0.6               # and falls off towards the ends
    # across the slit: a plateau that is not perfectly flat, with soft edges
    fmt = uvb.format
    k = abs(float(fmt.scale(15, 1500.0)))
    offsets = np.arange(-25, 26)  # binned pixels (2x2)
    prof = r.sample_rows(img, 15, offsets)[700]
    prof = prof / prof.max()
    plateau = prof[prof > 0.9]
    assert 0.005 < plateau.std() < 0.1
    inside = np.count_nonzero(prof > 0.5) * 2  # unbinned px
    assert inside == pytest.approx(fmt.slit_length * k, abs=4)
    edge = np.count_nonzero((prof > 0.1) & (prof < 0.9))
    assert edge >= 2                                          # soft, not a step


def test_nir_lamp_off_frames(tmp_path):
    sim = InstrumentSimulator("xsh_nir", "1x1", seed=2, orders=[16])
    hdul, info = sim.make_lamp_off(3)
    hdr = hdul[0].header
    assert (hdr["ESO DPR TYPE"], hdr["ESO DPR TECH"]) == ("LAMP,FLAT", "IMAGE")
    on, _ = sim.make_flat("FLAT", 2)
    assert on[0].header["ESO DPR TECH"] == "ECHELLE,SLIT"
    e = _read(hdul, tmp_path)
    expected = sim.truth.expected_electrons(info["exptime"], 3)
    good = ~(info["cosmic_mask"] | sim.truth.hot_mask)
    assert abs(np.mean((e - expected)[good])) < 0.1


# ----------------------------------------------------------------------------- science
def test_science_frame_object_truth_and_poisson_statistics(uvb, tmp_path):
    truth = uvb.truth
    hdul, info = uvb.make_science(1, 600.0, "OBJECT")
    hdr = hdul[0].header
    assert hdr["ESO DPR CATG"] == "SCIENCE" and hdr["ESO DPR TECH"] == "ECHELLE,SLIT,STARE"
    assert hdr["ESO TEL AIRM START"] == pytest.approx(1.2)
    e = _read(hdul, tmp_path)
    res = info["model"]
    sig = res.images["object"] + res.images["sky"] + res.images["scattered"]
    clean = e - truth.expected_electrons(600.0, 1)
    good = ~(info["cosmic_mask"] | truth.hot_mask | truth.cold_mask)
    expected = sig * truth.sensitivity
    chi = (clean - expected)[good] / np.sqrt(expected[good] + truth.read_noise**2
                                             + truth.gain**2 / 12)
    assert abs(chi.mean()) < 0.01 and chi.std() == pytest.approx(1.0, abs=0.03)
    bright = good & (expected > 400)
    var_ratio = np.var((clean - expected)[bright]) / np.mean(expected[bright]
                                                            + truth.read_noise**2)
    assert var_ratio == pytest.approx(1.0, abs=0.08)  # Poisson noise on sky + object
    # row sums of the object-only signal = truth counts
    table = uvb.object_truth_table("OBJECT", 600.0).data
    r = uvb.renderer
    obj = (clean - (res.images["sky"] + res.images["scattered"]) * truth.sensitivity)
    obj = obj / truth.sensitivity
    for order in (14, 15):
        win = r._windows[order]
        rr, cc = r._index(win)
        rr = np.clip(rr, 0, obj.shape[0] - 1)
        cc = np.clip(cc, 0, obj.shape[1] - 1)
        vals = np.where(win["valid"], obj[rr, cc], 0).sum(axis=1)
        hit = np.where(win["valid"], ~good[rr, cc], False).any(axis=1)
        counts = table["counts"][table["order"] == order]
        ok = ~hit & (counts > 200)
        assert np.sum(vals[ok]) / np.sum(counts[ok]) == pytest.approx(1.0, abs=0.01)


def test_object_profile_seeing_and_drift(uvb):
    res = uvb.science_model("OBJECT", 600.0)
    rows = res.rows["object"][15]
    fmt = uvb.format
    k = abs(float(fmt.scale(15, rows["along"].mean())))
    s0 = rows["slit_position"]
    assert s0[-1] - s0[0] == pytest.approx(uvb.scene.object_drift, rel=0.02)
    assert np.allclose(rows["centre"], fmt.centre(15, rows["along"])
                       + fmt.scale(15, rows["along"]) * s0)
    # the object really is there: the brightest pixel of each row follows the trace
    img = res.images["object"]
    mid = rows["pixel"].size // 2
    col = int(np.argmax(img[rows["pixel"][mid]]))
    assert abs(col * 2 + 0.5 - rows["centre"][mid]) < 2.5
    # FWHM along the slit ~ seeing (lambda^-0.2) / pixel scale
    mid = rows["pixel"].size // 2
    prof = uvb.renderer.sample_rows(res.images["object"], 15, np.arange(-20, 21) / 1.0)[mid]
    above = np.count_nonzero(prof > 0.5 * prof.max()) * 2  # 2x2 binning, unbinned px
    seeing = uvb.scene.seeing * (rows["wavelength"][mid] / 500) ** -0.2
    assert above == pytest.approx(seeing * k, rel=0.35)


def test_sky_lines_fall_where_the_disp_image_says(tmp_path):
    sim = InstrumentSimulator("xsh_vis", "1x1", seed=4, orders=[17, 18],
                              scene=SceneParameters(object_mag=30.0))
    res = sim.science_model("OBJECT", 600.0)
    sky = res.images["sky"]
    wave = sim.disp_image()[0].data
    wl, flux = sky_lines(sim.arm, 1.0)
    fmt = sim.format
    checked = 0
    for order in (17, 18):
        geo = fmt.geometry(order)
        sel = (wl > geo.wl_min + 2) & (wl < geo.wl_max - 2)
        # bright lines with no neighbour within 0.5 nm
        for w0, f0 in zip(wl[sel], flux[sel]):
            if f0 < np.percentile(flux[sel], 80) or np.sum(np.abs(wl - w0) < 0.5) > 1:
                continue
            a, b = fmt.world_to_pixel(order, w0, 0.0)
            row, col = int(round(float(b))), int(round(float(a)))
            seg = sky[row - 12:row + 13, col].astype(float)
            seg -= np.median(seg)
            peak = row - 12 + np.sum(np.arange(25) * seg.clip(0)) / seg.clip(0).sum()
            lam_peak = np.interp(peak, np.arange(row - 12, row + 13), wave[row - 12:row + 13,
                                                                           col])
            disp = abs(float(fmt.dispersion(order, b)))
            assert abs(lam_peak - w0) < 0.15 * disp + 0.002
            checked += 1
            # tilt: the line moves along the order with slit position
            a2, b2 = fmt.world_to_pixel(order, w0, 4.0)
            assert abs(float(b2 - b)) == pytest.approx(abs(4.0 * fmt.tilt(order, b)), rel=0.05)
    assert checked >= 3


def test_standard_star_count_level_ntt(tmp_path):
    """SOXS on the NTT: a GD71 stare gives the counts of a 3.58 m telescope at ~20 %."""
    sim = InstrumentSimulator("soxs_vis", "1x1", seed=5, orders=[1, 3])
    assert TELESCOPE_AREA_M2["SOXS"] == pytest.approx(np.pi / 4 * (3.58**2 - 1.0), rel=1e-6)
    table = sim.object_truth_table("STD_FLUX", 300.0).data
    m = table["order"] == 3
    wl = table["wavelength"][m]
    sel = (wl > 480) & (wl < 500)
    per_nm_s = table["counts"][m][sel] / table["dispersion"][m][sel] / 300.0
    top = flam_to_photons(standard_star("GD71", wl[sel]), wl[sel],
                          np.pi / 4 * 358.0**2)  # 3.58 m geometric aperture, photons/s/nm
    atm = 10 ** (-0.4 * extinction_mag(wl[sel]) * 1.2)
    throughput = np.median(per_nm_s / (top * atm))
    assert 0.08 < throughput < 0.30           # typical end-to-end efficiency incl. slit loss
    assert throughput < np.median(efficiency(sim.arm, wl[sel]))
    # GD71 (V~13) in 300 s: thousands of e- per spectral pixel
    assert 2e3 < np.median(table["counts"][m][sel]) < 5e4


def test_calibration_tables_match_the_truth(uvb):
    fmt = uvb.format
    otab = uvb.order_table()
    row = otab[1].data[0]
    dn, db = int(row["degorder_cent"]), int(row["degy_cent"])
    b = np.linspace(100, 2900, 20)
    for order in (14, 22):
        poly = sum(row[f"cent_{i}{j}"] * order**i * b**j
                   for i in range(dn + 1) for j in range(db + 1))
        assert np.allclose(poly, fmt.centre(order, b), atol=1e-6)
    assert list(otab[2].data["order"]) == [14, 15, 22, 23]
    assert {"ymin", "ymax", "xmin", "xmax"} <= set(otab[2].columns.names)
    edges = uvb.order_table(edges=True)
    assert "edgeup_c00" in edges[1].columns.names and edges[0].header["SIMEDRMS"] < 0.01
    dtab = uvb.disp_table()
    assert dtab[0].header["ESO PRO CATG"] == "DISP_TAB_UVB"
    rows = {r["axis"]: {n: r[n] for n in dtab[1].columns.names if n.startswith("c")}
            for r in dtab[1].data}
    dimg = uvb.disp_image()
    assert [h.name for h in dimg] == ["WAVELENGTH", "SLIT", "ORDER"]
    assert dimg[0].data.shape == ARMS["xsh_uvb"].prepared_shape()  # unbinned
    wave, slit, order = (h.data for h in dimg)
    ok = np.isfinite(wave)
    rng = np.random.default_rng(0)
    pick = rng.choice(np.flatnonzero(ok), 500, replace=False)
    yy, xx = np.unravel_index(pick, wave.shape)
    x = evaluate_disp_row(rows["x"], order.flat[pick], wave.flat[pick], slit.flat[pick])
    y = evaluate_disp_row(rows["y"], order.flat[pick], wave.flat[pick], slit.flat[pick])
    assert np.max(np.abs(x - xx)) < 0.2 and np.max(np.abs(y - yy)) < 0.2
    assert np.nanmax(np.abs(slit)) <= fmt.slit_length / 2 + 1e-6


def test_sky_is_poisson_and_fills_the_slit(tmp_path):
    """SOXS NIR H band: OH lines fill the slit; their pixels follow Poisson statistics."""
    sim = InstrumentSimulator("soxs_nir", "1x1", seed=8, orders=[12],
                              scene=SceneParameters(object_mag=40.0))
    truth = sim.truth
    hdul, info = sim.make_science(0, 600.0)
    e = _read(hdul, tmp_path)
    res = info["model"]
    sky = res.images["sky"]
    expected = (sky + res.images["scattered"]) * truth.sensitivity
    good = ~(info["cosmic_mask"] | truth.hot_mask | truth.cold_mask) & (sky > 300)
    assert good.sum() > 2000
    resid = (e - truth.expected_electrons(600.0, 0) - expected)[good]
    assert abs(resid.mean()) < 3 * np.sqrt(np.mean(expected[good]) / good.sum()) + 0.5
    var_ratio = np.var(resid) / np.mean(expected[good] + truth.read_noise**2)
    assert var_ratio == pytest.approx(1.0, abs=0.06)
    # the sky is flat along the slit apart from the slit illumination (no object here)
    r = sim.renderer
    prof = r.sample_rows(sky, 12, np.arange(-12, 13)).sum(axis=0)
    assert prof[12] / prof[6] == pytest.approx(1.0, abs=0.1)
    assert res.images["object"].max() < 1e-3 * sky.max()
