"""Simulator support of the stare truth tests: truth calibrations, telluric standards, SOFs.

The truth calibrations (``NIGHT/truth/calibs``) stand in for the recipes' master bias, dark and
flat in ``stare_truth.sof`` / ``std_truth.sof`` / ``telluric_truth.sof``.  They are checked here
against what they must be, from the simulator's truth and from raw frames:

* the master flat is the true pixel response, bit for bit, with the documented QUAL bits;
* a raw bias minus the truth bias is the frame's bias drift plus pure read noise (its mean
  within 5 sigma/sqrt(N) of the drift, its scatter that of read noise and quantisation); a raw
  dark minus bias and truth dark (VIS) or minus the truth dark alone (NIR, whose dark holds the
  pedestal) likewise, with the dark's shot noise;
* their headers carry what a soxs_mbias product of the same night carries (the set-up keywords
  our input checks compare, inherited from the same first raw frame);
* telluric-standard frames are classified as such, tagged STD_TELLURIC_<ARM>, show a smooth
  hot black body, and adding them changes no other frame of the night.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame, frame_type_from_dpr
from soxs_core.io.image import read_image_product
from soxs_core.simulate import InstrumentSimulator, simulate_night
from soxs_core.simulate.spectra import black_body_star
from soxs_core.simulate.truthcalib import TRUTH_LOW_SENS

ORDERS = {"xsh_vis": [20, 21], "xsh_nir": [16]}
SCIENCE_EXPTIME = 300.0


def _sof(path):
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def vis(tmp_path_factory):
    out = tmp_path_factory.mktemp("stare_truth") / "xsh_vis"
    res = simulate_night(out, "xsh_vis", "2x2", seed=11, n_bias=3, n_dark=1, n_flat=0,
                         n_science=1, n_std=1, n_telluric=1, orders=ORDERS["xsh_vis"],
                         science_exptime=SCIENCE_EXPTIME, cosmic_rate=0.0)
    sim = InstrumentSimulator("xsh_vis", "2x2", seed=11, orders=ORDERS["xsh_vis"],
                              cosmic_rate=0.0)
    return res, sim


@pytest.fixture(scope="module")
def nir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stare_truth") / "xsh_nir"
    res = simulate_night(out, "xsh_nir", "1x1", seed=12, n_dark=1, n_flat=0, n_science=1,
                         n_std=0, n_telluric=1, orders=ORDERS["xsh_nir"],
                         science_exptime=SCIENCE_EXPTIME, cosmic_rate=0.0)
    sim = InstrumentSimulator("xsh_nir", "1x1", seed=12, orders=ORDERS["xsh_nir"],
                              cosmic_rate=0.0)
    return res, sim


def _frame_info(res, path):
    frames = fits.getdata(res.truth["frames"], 1)
    row = frames[np.char.strip(frames["file"]) == f"raw/{path.name}"][0]
    return int(row["index"]), float(row["bias_offset"])


def _prepared(path) -> np.ndarray:
    frame = RawFrame.open(path)
    try:
        electrons, _ = frame.read_band()
    finally:
        frame.close()
    return electrons.astype(np.float64)


def _check_residual(resid, good, sigma, what):
    """Mean within 5 sigma/sqrt(N) of zero and scatter within 3 % of ``sigma``."""
    r = resid[good]
    sig = sigma[good] if np.ndim(sigma) else np.full(r.size, sigma)
    pull = r / sig
    assert abs(pull.mean()) < 5 / np.sqrt(r.size), f"{what}: mean pull {pull.mean():.4f}"
    assert abs(pull.std() - 1) < 0.03, f"{what}: pull std {pull.std():.4f}"


# ---------------------------------------------------------------------- master flat
def test_truth_master_flat_is_the_pixel_response(vis):
    res, sim = vis
    flat = read_image_product(res.truth["master_flat"])
    truth = sim.truth
    np.testing.assert_array_equal(flat.data, truth.sensitivity)
    expected = np.where(truth.static_bad_mask, Qual.STATIC_BAD, 0) | np.where(
        truth.sensitivity < TRUTH_LOW_SENS, Qual.LOW_SENS, 0)
    np.testing.assert_array_equal(flat.qual, expected.astype(np.uint8))
    assert np.all(flat.error > 0) and np.all(flat.error < 1e-5 * np.abs(flat.data) + 1e-30)
    # the low-sensitivity pixels a perfect mflat would find are flagged
    assert np.all(flat.qual[truth.low_sensitivity_mask] & Qual.LOW_SENS)
    h = flat.header
    assert h["ESO PRO CATG"] == "MASTER_FLAT_VIS" and h["ESO SEQ ARM"].strip() == "VIS"
    assert (h["CDELT1"], h["CDELT2"]) == (2.0, 2.0)
    # soxspipe's stare refuses a mix of slit widths: the flat's is the science frame's
    science = fits.getheader(res.raw["OBJECT"][0])
    assert h["ESO INS OPTI4 NAME"] == science["ESO INS OPTI4 NAME"] == "0.9x11"


# ---------------------------------------------------------------------- bias and dark
def test_raw_bias_minus_truth_bias_is_noise(vis):
    res, sim = vis
    t = sim.truth
    bias = read_image_product(res.truth["master_bias"])
    np.testing.assert_array_equal(bias.data, t.bias)
    assert bias.header["ESO PRO CATG"] == "MASTER_BIAS_VIS" and bias.header["EXPTIME"] == 0
    assert np.array_equal(bias.qual != 0, t.static_bad_mask)
    # hot pixels' read-out charge has shot noise the bias cannot hold
    good = ~(t.hot_mask | t.cold_mask | t.static_bad_mask)
    sigma = np.sqrt(t.read_noise ** 2 + t.gain ** 2 / 12)
    for path in res.raw["BIAS"]:
        index, offset = _frame_info(res, path)
        resid = _prepared(path) - bias.data
        # the frame's drift and periodic pattern are the only offsets left
        assert abs(resid[good].mean() - offset) < 5 * sigma / np.sqrt(good.sum())
        _check_residual(resid - offset - t.pattern(index), good, sigma, path.name)


def test_raw_dark_minus_truth_dark_is_noise_vis(vis):
    res, sim = vis
    t = sim.truth
    dark = read_image_product(res.truth["master_dark"])
    assert dark.header["ESO PRO CATG"] == "MASTER_DARK_VIS"
    assert dark.header["EXPTIME"] == SCIENCE_EXPTIME
    np.testing.assert_allclose(dark.data, t.dark_rate * np.float32(SCIENCE_EXPTIME), rtol=1e-6)
    assert np.all(dark.qual[t.hot_mask] & Qual.HOT)
    (path,) = res.raw["DARK"]
    index, offset = _frame_info(res, path)
    good = ~(t.hot_mask | t.cold_mask | t.static_bad_mask)
    resid = _prepared(path) - t.bias - dark.data - offset - t.pattern(index)
    sigma = np.sqrt(t.read_noise ** 2 + t.gain ** 2 / 12 + dark.data)
    _check_residual(resid, good, sigma, path.name)
    # the CCD's dark is ~0.1 e- but for its hot pixels, where the truth must hold too (an
    # upper bound of their read-out charge's shot noise: the whole read-out time)
    hot = t.hot_mask & ~t.cold_mask
    sigma_hot = np.sqrt(sigma ** 2 + t.dark_rate * sim.detector.mode.readout_time)[hot]
    pull = resid[hot] / sigma_hot
    assert hot.sum() > 100 and abs(pull.mean()) < 5 / np.sqrt(hot.sum()), pull.mean()


def test_raw_dark_minus_truth_dark_is_noise_nir(nir):
    """NIR: the truth dark holds the pedestal, so raw - dark has no offset."""
    res, sim = nir
    t = sim.truth
    dark = read_image_product(res.truth["master_dark"])
    assert dark.header["ESO PRO CATG"] == "MASTER_DARK_NIR"
    (path,) = res.raw["DARK"]
    index, offset = _frame_info(res, path)
    good = ~(t.hot_mask | t.cold_mask | t.static_bad_mask)
    resid = _prepared(path) - dark.data
    expected = dark.data - t.bias
    sigma = np.sqrt(t.read_noise ** 2 + t.gain ** 2 / 12 + expected)
    assert abs(resid[good].mean() - offset) < 5 * np.sqrt(np.mean(sigma[good] ** 2)
                                                           / good.sum())
    _check_residual(resid - offset - t.pattern(index), good, sigma, path.name)
    assert "master_bias" not in res.truth


def test_truth_headers_match_a_recipe_product(vis, tmp_path):
    """The truth master bias carries every keyword soxs_mbias's product of the same night
    carries (inherited from the same first bias frame), with the same values, but for the
    processing record and QC."""
    from soxs_recipes.cli import run as esorex

    res, _ = vis
    out = tmp_path / "mbias"
    assert esorex(["--output-dir", str(out), "--msg-level", "error", "soxs_mbias",
                   str(res.sofs["bias"])]) == 0
    ours = fits.getheader(out / "master_bias_vis.fits")
    truth = fits.getheader(res.truth["master_bias"])
    skip = ("ESO PRO REC", "ESO QC ", "ESO PRO DATANCOM", "DATE", "DATAMD5", "CHECKSUM",
            "DATASUM", "COMMENT", "HISTORY")
    compared = 0
    for key in ours:
        if key.startswith(skip) or key in ("", "PIPEFILE"):
            continue
        assert key in truth, key
        assert truth[key] == ours[key], key
        compared += 1
    assert compared > 40


# ---------------------------------------------------------------------- SOFs
def test_truth_sofs(vis, nir):
    res, _ = vis
    out = res.outdir
    assert {"stare_truth", "std_truth", "telluric", "telluric_truth"} <= set(res.sofs)
    tags = {name: [t for _, t in _sof(res.sofs[name])] for name in res.sofs}
    calibs = ["MASTER_BIAS_VIS", "MASTER_FLAT_VIS", "ORDER_TAB_VIS", "DISP_TAB_VIS",
              "DISP_IMAGE_VIS"]
    assert tags["stare_truth"] == ["OBJECT_VIS"] + calibs
    assert tags["std_truth"] == ["STD_FLUX_VIS"] + calibs
    assert tags["telluric_truth"] == ["STD_TELLURIC_VIS"] + calibs
    # the telluric standard has the science's calibrations but not the flux standard's
    # response
    assert tags["telluric"] == ["STD_TELLURIC_VIS"] + [t for t in tags["stare"][1:]
                                                       if t != "RESP_TAB_VIS"]
    paths = dict((t, p) for p, t in _sof(res.sofs["stare_truth"]))
    assert paths["MASTER_FLAT_VIS"] == str(res.truth["master_flat"].resolve())
    assert paths["ORDER_TAB_VIS"] == str(res.truth["order_tab"].resolve())
    assert paths["DISP_IMAGE_VIS"] == str((out / "calib/DISP_IMAGE_VIS.fits").resolve())
    # the truth order table has the edges and the PRO CATG of the tag
    hdr = fits.getheader(paths["ORDER_TAB_VIS"])
    assert hdr["ESO PRO CATG"] == "ORDER_TAB_VIS"
    assert "edgelow_c00" in fits.getdata(paths["ORDER_TAB_VIS"], 1).columns.names
    # NIR: each standard gets the dark of its own exposure time
    nres, _ = nir
    tell = dict((t, p) for p, t in _sof(nres.sofs["telluric_truth"]))
    texp = fits.getheader(nres.raw["STD_TELLURIC"][0])["EXPTIME"]
    assert texp != SCIENCE_EXPTIME
    assert fits.getheader(tell["MASTER_DARK_NIR"])["EXPTIME"] == texp
    sci = dict((t, p) for p, t in _sof(nres.sofs["stare_truth"]))
    assert fits.getheader(sci["MASTER_DARK_NIR"])["EXPTIME"] == SCIENCE_EXPTIME


# ---------------------------------------------------------------------- telluric standards
def test_frame_type_of_telluric_standards():
    assert frame_type_from_dpr("STD,TELLURIC", "ECHELLE,SLIT,STARE") == "STD_TELLURIC"
    assert frame_type_from_dpr("STD,SKY", "ECHELLE,SLIT,STARE") == "STD_TELLURIC"
    assert frame_type_from_dpr("STD", "ECHELLE,SLIT,STARE") == "STD_FLUX"
    assert frame_type_from_dpr("STD,FLUX", "ECHELLE,SLIT,STARE") == "STD_FLUX"


def test_telluric_frames(vis):
    res, sim = vis
    (path,) = res.raw["STD_TELLURIC"]
    hdr = fits.getheader(path)
    assert (hdr["ESO DPR CATG"], hdr["ESO DPR TYPE"], hdr["ESO DPR TECH"]) == (
        "CALIB", "STD,TELLURIC", "ECHELLE,SLIT,STARE")
    frame = RawFrame.open(path)
    assert frame.frame_type == "STD_TELLURIC" and frame.tag == "STD_TELLURIC_VIS"
    electrons, qual = frame.read_band()
    frame.close()
    assert not (qual & Qual.SATURATED).any()
    table = fits.open(res.truth["STD_TELLURIC"])[1]
    data = table.data
    assert table.header["TARGET"] == hdr["OBJECT"]
    # a smooth hot black body of the scene's magnitude: no absorption lines
    sc = sim.scene
    np.testing.assert_allclose(data["flux"], black_body_star(data["wavelength"],
                                                             sc.telluric_mag,
                                                             sc.telluric_teff), rtol=1e-12)
    assert np.all(np.diff(data["flux"][np.argsort(data["wavelength"])]) < 0)  # hot: bluer
    # bright: its counts dwarf the science target's (17 mag) per second
    obj = fits.getdata(res.truth["OBJECT"], 1)
    t_tel = hdr["EXPTIME"]
    assert np.median(data["counts"]) / t_tel > 100 * np.median(obj["counts"]) / SCIENCE_EXPTIME


def test_telluric_frames_change_no_other_frame(vis, tmp_path):
    res, _ = vis
    again = simulate_night(tmp_path / "again", "xsh_vis", "2x2", seed=11, n_bias=3, n_dark=1,
                           n_flat=0, n_science=1, n_std=1, n_telluric=0,
                           orders=ORDERS["xsh_vis"], science_exptime=SCIENCE_EXPTIME,
                           cosmic_rate=0.0)
    assert "STD_TELLURIC" not in again.raw and "telluric" not in again.sofs
    for kind in ("BIAS", "DARK", "STD_FLUX", "OBJECT"):
        for a, b in zip(res.raw[kind], again.raw[kind], strict=True):
            assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name
    for key in ("master_bias", "master_dark", "master_flat"):
        with fits.open(res.truth[key]) as x, fits.open(again.truth[key]) as y:
            for hx, hy in zip(x, y, strict=True):
                assert np.array_equal(hx.data, hy.data)
                cx = {k: v for k, v in hx.header.items() if k not in ("CHECKSUM", "DATASUM")}
                cy = {k: v for k, v in hy.header.items() if k not in ("CHECKSUM", "DATASUM")}
                assert cx == cy


def test_object_truth_table_documents_its_columns(vis):
    res, _ = vis
    table = fits.open(res.truth["OBJECT"])[1]
    names = table.columns.names
    for i, name in enumerate(names, start=1):
        assert table.header.get(f"TCOMM{i}"), name
    units = {c.name: c.unit for c in table.columns}
    assert units["counts"] == "electron" and units["dispersion"] == "nm/pix"
    assert "before pixel response" in table.header["TCOMM4"]
