"""Detector-level simulator: raw frames read back through RawFrame must match the truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std, sigma_clipped_stats

from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.errors import InputError
from soxs_core.simulate import DetectorSimulator


def _read(path):
    frame = RawFrame.open(path)
    try:
        return frame, *frame.read_band()
    finally:
        frame.close()


@pytest.fixture(scope="module")
def uvb():
    """Small, rotated (180 deg) CCD arm: XSH UVB 2x2 fast."""
    return DetectorSimulator("xsh_uvb", "2x2", "fast", seed=11)


@pytest.mark.parametrize("arm,binning,readout", [
    ("xsh_uvb", "2x2", "fast"), ("xsh_vis", "2x2", "slow"), ("xsh_nir", "1x1", "slow"),
    ("soxs_vis", "2x2", "slow"), ("soxs_nir", "1x1", "slow"),
])
def test_dark_reads_back_as_truth(tmp_path, arm, binning, readout):
    """read_band() of a dark = bias + dark_rate * t + drift, in the prepared orientation."""
    sim = DetectorSimulator(arm, binning, readout, seed=5)
    truth = sim.truth
    path, info = sim.write_frame(tmp_path, "DARK", 900.0, 3)
    frame, electrons, qual = _read(path)
    assert frame.arm is sim.arm and frame.binning == binning
    assert electrons.shape == truth.shape == sim.arm.prepared_shape(sim.binx, sim.biny)
    assert frame.gain == pytest.approx(truth.gain) and frame.read_noise == truth.read_noise
    expected = truth.expected_electrons(900.0, 3)
    resid = electrons - expected
    good = ~(truth.hot_mask | info["cosmic_mask"] | truth.cold_mask)
    dark = float(np.median(truth.dark_rate[good])) * 900.0
    sigma = np.sqrt(truth.read_noise**2 + truth.gain**2 / 12 + dark)
    assert abs(resid[good].mean()) < 5 * sigma / np.sqrt(good.sum())
    assert mad_std(resid[good]) == pytest.approx(sigma, rel=0.05)
    # orientation: hot pixels sit where the truth puts them, with the right charge
    hot = truth.hot_mask & ~info["cosmic_mask"] & (truth.dark_rate * 900 > 50 * sigma)
    assert hot.sum() > 20
    ratio = (electrons - truth.bias - info["bias_offset"])[hot] / (truth.dark_rate[hot] * 900)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    flipped = np.rot90(hot, 2)
    assert np.median(resid[flipped & good]) < 5 * sigma  # nothing special at mirrored pixels


def test_raw_layout_and_header(uvb, tmp_path):
    hdul, info = uvb.make_frame("BIAS", index=2)
    hdr = hdul[0].header
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
    assert hdul[0].data.shape == uvb.arm.raw_shape_binned(2, 2) == (1500, 1072)
    assert hdr["INSTRUME"] == "XSHOOTER" and hdr["ESO SEQ ARM"] == "UVB"
    assert (hdr["ESO DPR CATG"], hdr["ESO DPR TYPE"], hdr["ESO DPR TECH"]) == (
        "CALIB", "BIAS", "IMAGE")
    assert hdr["ESO DET WIN1 BINX"] == 2 and hdr["ESO DET WIN1 BINY"] == 2
    assert hdr["CDELT1"] == 2 and hdr["CDELT2"] == 2
    assert hdr["ESO DET OUT1 CONAD"] == pytest.approx(1.75)
    assert hdr["ESO DET OUT1 GAIN"] == pytest.approx(1 / 1.75, rel=1e-3)
    assert hdr["ESO DET OUT1 RON"] == pytest.approx(4.5)
    assert hdr["ESO DET READ SPEED"] == "1pt/400k/lg"
    assert hdr["ESO DET OUT1 PRSCX"] == 24 and hdr["ESO DET OUT1 OVSCX"] == 24
    assert hdr["ESO DET TLM1 START"] > 100
    assert hdr["EXPTIME"] == 0.0 and hdr["ARCFILE"].startswith("XSHOO.20")
    # prescan/overscan carry bias and read noise only: level close to the truth bias
    raw = hdul[0].data.astype(float) * 1.75
    prescan = np.rot90(raw, 2)[:, :24]
    assert abs(np.median(prescan) - np.median(uvb.truth.bias)) < 20
    noise = sigma_clipped_stats(np.diff(prescan, axis=0), sigma=5)[2] / np.sqrt(2)
    assert noise == pytest.approx(4.5, rel=0.05)
    # frames are ordered in time
    mjds = [uvb.make_frame("BIAS", index=i)[1]["mjd"] for i in range(3)]
    assert mjds == sorted(mjds) and len(set(mjds)) == 3


@pytest.mark.parametrize("arm,key,value,dpr", [
    ("soxs_vis", "ESO DET READ CURNAME", "SLOW", "BIAS"),
    ("soxs_nir", "ESO DET READ CURNAME", "UpTheRamp", "DARK"),
    ("xsh_nir", "ESO DET NCORRS NAME", "NonDest", "DARK"),
])
def test_header_dialects(arm, key, value, dpr):
    binning = "2x2" if arm == "soxs_vis" else "1x1"
    sim = DetectorSimulator(arm, binning, "slow", seed=2)
    hdr = sim.make_frame(dpr, exptime=10.0)[0][0].header
    assert hdr[key] == value
    assert hdr["INSTRUME"] == ("SOXS" if arm.startswith("soxs") else "XSHOOTER")
    assert hdr[sim.arm.keywords["temperature"]] > 0
    assert hdr[sim.arm.keywords["gain"]] == pytest.approx(sim.gain)
    assert hdr[sim.arm.keywords["ron"]] == pytest.approx(sim.read_noise)
    if arm == "soxs_vis":
        assert hdr["ESO DET BINX"] == 2 and hdr["ESO DET READ CURID"] == 1


def test_read_noise_and_gain_from_bias_flat_pairs(uvb):
    """Photon-transfer: RON from a bias pair, gain from a flat pair (in ADU)."""
    truth = uvb.truth
    good = ~(truth.hot_mask | truth.cold_mask | truth.static_bad_mask)
    adu = []
    for kind, index, signal in (("BIAS", 0, None), ("BIAS", 1, None),
                                ("FLAT", 0, 20000.0), ("FLAT", 1, 20000.0)):
        sig = None if signal is None else np.full(truth.shape, signal, np.float32)
        hdul, info = uvb.make_frame(kind, 1.0 if signal else 0.0, index, signal=sig)
        raw = np.rot90(hdul[0].data.astype(np.float64), 2)[uvb.rows, uvb.cols]
        adu.append(np.where(good & ~info["cosmic_mask"], raw, np.nan))
    b1, b2, f1, f2 = adu
    ok = np.isfinite(b1 + b2 + f1 + f2)
    # clipped std, not MAD: the MAD of integer ADU differences is biased
    var_bias = sigma_clipped_stats((b1 - b2)[ok], sigma=5)[2] ** 2 / 2
    var_flat = sigma_clipped_stats((f1 - f2)[ok], sigma=5)[2] ** 2 / 2
    signal_adu = np.mean((f1 + f2)[ok] / 2 - (b1 + b2)[ok] / 2)
    gain = signal_adu / (var_flat - var_bias)
    # PRNU cancels in the difference; the flat pair gives the gain to a few per cent
    assert gain == pytest.approx(truth.gain, rel=0.04)
    # the periodic pattern changes phase between read-outs, so it adds to the pair noise
    dphi = truth.pattern_phases[1] - truth.pattern_phases[0]
    temporal = np.hypot(truth.read_noise, truth.pattern_amplitude * np.sin(dphi / 2))
    assert np.sqrt(var_bias) * gain == pytest.approx(temporal, rel=0.04)


def test_bias_structure_gradient_and_pattern(tmp_path):
    sim = DetectorSimulator("xsh_vis", "2x2", "slow", seed=4, bias_gradient=(-2e-3, 5e-4))
    truth = sim.truth
    defects = truth.hot_mask | truth.cold_mask
    gx, gy = truth.bias_profile_slopes(defects)
    assert gx == pytest.approx(-2e-3, rel=0.05) and gy == pytest.approx(5e-4, rel=0.05)
    # the bias is structured at a level a master bias can see but below the read noise
    smooth = truth.bias[~defects]
    assert 0.2 * truth.read_noise < np.std(smooth) < 3 * truth.read_noise
    paths = sim.write_bias(tmp_path, n=4)
    frames = [_read(p)[1] for p in paths]
    master = np.mean(frames, axis=0)
    mgx, mgy = (np.polyfit(np.arange(n), prof, 1)[0] for n, prof in (
        (master.shape[1], np.ma.masked_array(master, defects).mean(axis=0)),
        (master.shape[0], np.ma.masked_array(master, defects).mean(axis=1))))
    assert mgx == pytest.approx(gx, abs=2e-4) and mgy == pytest.approx(gy, abs=1e-4)
    # 2-D FFT of a single raw bias shows the periodic pattern at the true period
    one = frames[0] - np.median(frames[0])
    spec = np.abs(np.fft.rfft(np.clip(one, -20, 20).mean(axis=0)))
    k = np.argmax(spec[3:]) + 3
    assert one.shape[1] / k == pytest.approx(truth.pattern_period_px, rel=0.02)
    assert truth.pattern_period_px == pytest.approx(13.7 / 2)


def test_reproducible_and_seed_dependent():
    a = DetectorSimulator("soxs_vis", "2x2", "slow", seed=7)
    b = DetectorSimulator("soxs_vis", "2x2", "slow", seed=7)
    c = DetectorSimulator("soxs_vis", "2x2", "slow", seed=8)
    fa, _ = a.make_frame("DARK", 60.0, 1)
    b.make_frame("BIAS", 0.0, 0)  # rendering another frame first changes nothing
    fb, _ = b.make_frame("DARK", 60.0, 1)
    assert np.array_equal(a.truth.bias, b.truth.bias)
    assert np.array_equal(a.truth.hot_mask, b.truth.hot_mask)
    assert np.array_equal(fa[0].data, fb[0].data)
    assert not np.array_equal(a.truth.hot_mask, c.truth.hot_mask)
    # frames of one night share the truth but not the noise
    f2, _ = a.make_frame("DARK", 60.0, 2)
    assert not np.array_equal(fa[0].data, f2[0].data)
    # defects do not depend on the readout mode, the bias does
    fast = DetectorSimulator("soxs_vis", "2x2", "fast", seed=7)
    assert np.array_equal(fast.truth.hot_mask, a.truth.hot_mask)
    assert fast.truth.gain == 2.0 and fast.truth.bias_level != a.truth.bias_level


def test_defects_and_static_map(uvb):
    truth = uvb.truth
    bpm = truth.static_bad_mask
    assert bpm.sum() == 2368  # the shipped XSH UVB 2x2 map
    # every static-map pixel is made defective: strongly hot or (nearly) dead
    assert np.all(truth.hot_mask[bpm] | (truth.sensitivity[bpm] < 0.06))
    random_hot = truth.hot_mask & ~bpm
    frac = random_hot.sum() / truth.hot_mask.size
    assert 1e-4 < frac < 5e-4
    rates = truth.dark_rate[random_hot]
    assert rates.min() >= 0.01 and rates.max() <= 10.0 + truth.base_dark_rate
    assert np.log10(rates.max() / rates.min()) > 2.5  # a range of rates
    col, r0, r1 = truth.bad_columns[0]
    assert truth.cold_mask[r0:r1, col].all()
    assert truth.bias[r0:r1, col].mean() - truth.bias[r0:r1, col + 3].mean() > 10
    assert truth.base_dark_rate == pytest.approx(1e-4 * 4)  # 2x2 binned pixel


def test_dark_current_and_cosmics_realistic(tmp_path):
    sim = DetectorSimulator("xsh_nir", "1x1", seed=9)
    truth = sim.truth
    paths = [sim.write_frame(tmp_path, "DARK", 600.0, i)[0] for i in range(3)]
    good = ~(truth.hot_mask | truth.cold_mask)
    rates = []
    for i, p in enumerate(paths):
        _, e, _ = _read(p)
        rates.append(np.median((e - truth.bias - truth.frame_offsets[i])[good]) / 600.0)
    assert np.mean(rates) == pytest.approx(0.005, abs=0.002)  # H2RG < 0.005 e-/s + glow
    # cosmic rays: ~1.5 per cm^2 per minute on 18 um pixels
    _, info = sim.make_frame("DARK", 600.0, 7)
    area = truth.shape[0] * truth.shape[1] * (18e-4) ** 2
    expected = 0.025 * area * (600.0 + 1.0)
    assert abs(info["n_cosmics"] - expected) < 5 * np.sqrt(expected)
    rows, cols, dep = info["cosmic_pixels"]
    assert dep.min() > 0 and 100 < np.median(dep) < 5000
    assert info["cosmic_mask"].sum() == rows.size
    # tracks: a few pixels long on average, never longer than 15 px
    assert 1.5 < rows.size / info["n_cosmics"] < 12


def test_saturation_and_nir_has_no_bias():
    sim = DetectorSimulator("xsh_nir", "1x1", seed=1)
    with pytest.raises(InputError):
        sim.make_frame("BIAS")
    signal = np.zeros(sim.shape, np.float32)
    signal[100:110, 200:210] = 1e6
    hdul, info = sim.make_frame("FLAT", 10.0, 0, signal=signal)
    assert info["saturated_mask"][102:108, 202:208].all()
    assert hdul[0].data.max() == 42000
    path = None
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.fits"
        hdul.writeto(path)
        _, _, qual = _read(path)
        assert np.all(qual[102:108, 202:208] & Qual.SATURATED)
    assert fits.Header  # keep the import used


def test_eleven_vis_biases_are_fast(tmp_path):
    import time
    sim = DetectorSimulator("xsh_vis", "1x1", "slow", seed=1)
    t0 = time.perf_counter()
    paths = sim.write_bias(tmp_path, n=11)
    elapsed = time.perf_counter() - t0
    assert len(paths) == 11 and all(p.stat().st_size > 16e6 for p in paths)
    assert elapsed < 15.0
