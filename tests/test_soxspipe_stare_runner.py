"""The scoring and SOF preparation of benchmarks/soxspipe_stare_runner.py (soxspipe itself is
not run here: the benchmark does that).

An EXTRACTED_ORDERS table is made from a truth table with a known bias, known noise and
soxspipe's VIS renumbering of the orders (true order - 10); the runner's comparison must give
that bias as its median ratio, the noise's width as its pull MAD-sigma and find the orders.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "soxspipe_stare_runner.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("soxspipe_stare_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _truth(path: Path) -> fits.BinTableHDU:
    rows = []
    # order 21's median wavelength also falls in order 22's range: the closer centre wins
    for n, (w0, w1) in {20: (700.0, 720.0), 21: (690.0, 705.0), 22: (680.0, 698.0)}.items():
        pix = np.arange(40, 1040)
        rows.append((np.full(pix.size, n), pix, np.linspace(w0, w1, pix.size),
                     2000.0 + 500 * np.sin(pix / 50.0)))
    cols = [np.concatenate([r[i] for r in rows]) for i in range(4)]
    hdu = fits.BinTableHDU.from_columns([
        fits.Column(name="order", format="K", array=cols[0]),
        fits.Column(name="pixel", format="K", array=cols[1]),
        fits.Column(name="wavelength", format="D", array=cols[2]),
        fits.Column(name="counts", format="D", array=cols[3])])
    hdu.writeto(path)
    return hdu


def test_compare_recovers_bias_noise_and_orders(runner, tmp_path):
    truth = _truth(tmp_path / "truth.fits").data
    rng = np.random.default_rng(3)
    bias, scale = 0.97, 0.8          # 3 % low, errors overestimated (pulls 0.8 wide)
    err = np.sqrt(truth["counts"] + 25.0)
    flux = bias * truth["counts"] + scale * err * rng.standard_normal(len(truth))
    keep = truth["pixel"] % 7 != 0   # rows soxspipe did not extract
    fits.BinTableHDU.from_columns([
        fits.Column(name="order", format="K", array=truth["order"][keep] - 10),
        fits.Column(name="ycoord", format="D", array=truth["pixel"][keep].astype(float)),
        fits.Column(name="wavelengthMean", format="D", array=truth["wavelength"][keep]),
        fits.Column(name="extractedFluxOptimal", format="D", array=flux[keep]),
        fits.Column(name="varianceSpectrum", format="D", array=err[keep] ** 2),
        fits.Column(name="extractedFluxBoxcarRobust", format="D",
                    array=0.95 * truth["counts"][keep]),
    ]).writeto(tmp_path / "extracted.fits")
    out = runner.compare(tmp_path / "extracted.fits", tmp_path / "truth.fits")
    assert out["order_offset"] == [10]
    assert out["orders_extracted"] == out["orders_true"] == 3
    assert sorted(out["orders"]) == ["20", "21", "22"]
    assert out["median_ratio"] == pytest.approx(bias, abs=0.003)
    assert out["boxcar_median_ratio"] == pytest.approx(0.95, abs=1e-9)
    # the bias moves the pulls' centre (-0.03 * counts / err), not their MAD-sigma much
    expected = (flux[keep] - truth["counts"][keep]) / err[keep]
    assert out["pull_median"] == pytest.approx(np.median(expected), abs=1e-9)
    for stats in out["orders"].values():
        assert stats["n"] == pytest.approx(1000 * 6 / 7, abs=2)
        assert stats["median_ratio"] == pytest.approx(bias, abs=0.005)
        assert stats["pull_mad_sigma"] == pytest.approx(scale, rel=0.1)


def test_sof_for_soxspipe(runner, tmp_path):
    """The SOF soxspipe needs: absolute paths, named <DATE-OBS stamp>_<ARM>_STARE.sof, an
    image product without CDELT1/2 replaced by a copy with them."""
    night = tmp_path / "night"
    night.mkdir()
    raw = fits.PrimaryHDU(np.zeros((4, 4), np.uint16))
    raw.header["DATE-OBS"] = "2026-11-22T02:00:00.000"
    raw.header["HIERARCH ESO SEQ ARM"] = "VIS"
    raw.header["HIERARCH ESO DPR CATG"] = "SCIENCE"
    raw.writeto(night / "sci.fits")
    prod = fits.PrimaryHDU(np.ones((4, 4), np.float32))
    prod.header["HIERARCH ESO PRO CATG"] = "MASTER_BIAS_VIS"
    prod.header["HIERARCH ESO DET WIN1 BINX"] = 2
    prod.header["HIERARCH ESO DET WIN1 BINY"] = 1
    prod.writeto(night / "mbias.fits")
    (night / "s.sof").write_text("sci.fits OBJECT_VIS\nmbias.fits MASTER_BIAS_VIS\n")
    work = tmp_path / "work"
    work.mkdir()
    sof = runner.write_sof(night / "s.sof", work)
    assert sof.name == "20261122T020000_VIS_STARE.sof"
    lines = [line.split() for line in sof.read_text().splitlines()]
    assert lines[0] == [str((night / "sci.fits").resolve()), "OBJECT_VIS"]
    copy = Path(lines[1][0])
    assert copy.parent == work and lines[1][1] == "MASTER_BIAS_VIS"
    hdr = fits.getheader(copy)
    assert (hdr["CDELT1"], hdr["CDELT2"]) == (2.0, 1.0)


def test_settings_fill_what_xsh_lacks(runner):
    """soxspipe's X-shooter settings get the keys its code reads unconditionally."""
    package = Path("/tmp/spvenv/lib/python3.11/site-packages/soxspipe")
    if not (package / "xsh_default_settings.yaml").exists():
        pytest.skip("soxspipe 0.17.4 not installed in /tmp/spvenv")
    pytest.importorskip("yaml")
    settings = runner._settings(str(package), "xsh")
    for arm in ("uvb", "vis", "nir"):
        sky = settings["soxs-stare"][arm]["sky-subtraction"]
        assert {"noise_rolling_window_size", "noise_sigma"} <= set(sky)
        assert {"poly_order", "max_iteration"} <= set(settings["soxs-response"][arm])
    assert settings["soxs-stare-std"] == settings["soxs-stare"]
