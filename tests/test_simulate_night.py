"""Night writer and the soxs-simulate command."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.rawframe import RawFrame
from soxs_core.simulate import DetectorSimulator, simulate_night
from soxs_core.simulate.cli import main


def _sof(path):
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("night") / "soxs_vis"
    t0 = time.perf_counter()
    res = simulate_night(out, "soxs_vis", "2x2", "slow", seed=21, n_bias=3, n_dark=2,
                         n_flat=3, science_exptime=300.0)
    res.wall = time.perf_counter() - t0
    return res


def test_night_layout_and_sofs(night):
    out = night.outdir
    assert night.wall < 30.0
    assert sorted(night.sofs) == ["bias", "dark", "flat", "stare", "stare_truth", "std",
                                  "std_truth"]
    tags = {}
    for name, sof in night.sofs.items():
        assert sof == out / f"{name}.sof"
        for path, tag in _sof(sof):
            tags.setdefault(name, []).append(tag)
            if "/raw/" in path:
                # the tag is soxspipe's <DPR TYPE, commas as underscores>_<ARM>
                hdr = fits.getheader(path)
                assert tag == (hdr["ESO DPR TYPE"].replace(",", "_") + "_"
                               + hdr["ESO SEQ ARM"]), path
                frame = RawFrame.open(path)
                assert frame.binning == "2x2" and frame.readout == "SLOW"
                frame.close()
    assert tags["bias"] == ["BIAS_VIS"] * 3
    assert tags["dark"] == ["DARK_VIS"] * 2 + ["MASTER_BIAS_VIS"]
    assert tags["flat"] == ["LAMP_FLAT_VIS"] * 3 + ["MASTER_BIAS_VIS", "ORDER_TAB_VIS"]
    # the science target is flux-calibrated with the standard's response (std.sof's step)
    assert tags["stare"] == ["OBJECT_VIS", "MASTER_BIAS_VIS", "MASTER_FLAT_VIS",
                             "ORDER_TAB_VIS", "DISP_TAB_VIS", "DISP_IMAGE_VIS", "RESP_TAB_VIS"]
    assert tags["std"][0] == "STD_FLUX_VIS"
    stare = dict((t, p) for p, t in _sof(night.sofs["stare"]))
    assert stare["MASTER_BIAS_VIS"] == str(
        (out / "reduced/soxs_mbias/master_bias_vis.fits").resolve())
    assert stare["MASTER_FLAT_VIS"].endswith("reduced/soxs_mflat/master_flat_vis.fits")
    assert stare["ORDER_TAB_VIS"].endswith("reduced/soxs_mflat/order_tab_vis.fits")
    flat = dict((t, p) for p, t in _sof(night.sofs["flat"]))
    assert flat["ORDER_TAB_VIS"].endswith("calib/ORDER_TAB_VIS.fits")
    for catg, path in night.calib.items():
        assert fits.getheader(path)["ESO PRO CATG"] == f"{catg}_VIS"


def test_night_truth_files(night):
    truth = night.truth
    sim_truth = DetectorSimulator("soxs_vis", "2x2", "slow", seed=21).truth
    with fits.open(truth["detector"]) as hdul:
        assert np.array_equal(hdul["BIAS"].data, sim_truth.bias)
        assert np.array_equal(hdul["HOT"].data.astype(bool), sim_truth.hot_mask)
        assert len(hdul["HOT_PIXELS"].data) == sim_truth.hot_mask.sum()
        assert hdul[0].header["GAIN"] == pytest.approx(0.6)
    frames = fits.getdata(truth["frames"], 1)
    assert len(frames) == sum(len(v) for v in night.raw.values())
    assert np.all(np.diff(np.sort(frames["mjd"])) > 0)
    flats = frames[np.char.strip(frames["frame_type"]) == "FLAT"]
    assert np.all(np.abs(flats["lamp_factor"] - 1) < 0.1) and len(set(flats["lamp_factor"])) == 3
    obj = fits.getdata(truth["OBJECT"], 1)
    assert set(obj["order"]) == {1, 2, 3, 4} and np.all(obj["counts"] >= 0)
    assert fits.getheader(truth["OBJECT"], 1)["EXPTIME"] == 300.0
    std = fits.getdata(truth["STD_FLUX"], 1)
    assert np.median(std["counts"]) > 10 * np.median(obj["counts"])  # GD71 >> 17 mag star
    with fits.open(truth["cosmics"]) as hdul:
        assert len(hdul) - 1 == len(frames)
    summary = json.loads(truth["summary"].read_text())
    assert summary["parameters"]["arm"] == "soxs_vis" and summary["parameters"]["seed"] == 21
    edges = fits.open(truth["order_tab"])
    assert "edgelow_c00" in edges[1].columns.names


def test_night_is_reproducible(night, tmp_path):
    again = simulate_night(tmp_path / "again", "soxs_vis", "2x2", "slow", seed=21, n_bias=1,
                           n_dark=0, n_flat=0, n_science=0, n_std=0)
    a = fits.getdata(night.raw["BIAS"][0])
    b = fits.getdata(again.raw["BIAS"][0])
    assert np.array_equal(a, b)


def test_nir_night_has_no_bias_and_lamp_off_pairs(tmp_path):
    res = simulate_night(tmp_path / "nir", "xsh_nir", "1x1", seed=2, n_dark=2, n_flat=2,
                         n_science=1, n_std=0, orders=[16, 17], science_exptime=300.0)
    assert "bias" not in res.sofs and "BIAS" not in res.raw
    tags = [t for _, t in _sof(res.sofs["flat"])]
    assert tags == ["LAMP_FLAT_NIR"] * 4 + ["ORDER_TAB_NIR"]
    flat = _sof(res.sofs["flat"])
    techs = [fits.getheader(p)["ESO DPR TECH"] for p, _ in flat[:4]]
    assert techs == ["ECHELLE,SLIT"] * 2 + ["IMAGE"] * 2   # lamp-on, then lamp-off
    exps = {fits.getheader(p)["EXPTIME"] for p, _ in flat[:4]}
    assert len(exps) == 1
    stare = [t for _, t in _sof(res.sofs["stare"])]
    assert stare[:2] == ["OBJECT_NIR", "MASTER_DARK_NIR"]
    for path in res.raw["DARK"]:
        dark = RawFrame.open(path)
        assert dark.exptime == 300.0 and dark.tag == "DARK_NIR"
        dark.close()


def test_cli(tmp_path, capsys):
    rc = main([str(tmp_path / "cli"), "--arm", "soxs_vis", "--binning", "2x2", "--n-bias", "1",
               "--n-dark", "1", "--n-flat", "1", "--n-science", "1", "--n-std", "0",
               "--orders", "3", "--seed", "5", "--object-mag", "15", "--relative-sof"])
    assert rc == 0
    assert "soxs_vis" in capsys.readouterr().out
    lines = _sof(tmp_path / "cli" / "stare.sof")
    assert lines[0][0].startswith("raw/") and lines[0][1] == "OBJECT_VIS"
    assert main([str(tmp_path / "bad"), "--arm", "xsh_xyz"]) == 2
