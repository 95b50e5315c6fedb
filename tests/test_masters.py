"""soxs_mbias and soxs_mdark against the simulator's truth."""

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.stats import norm

from soxs_core.detector.quality import Qual
from soxs_core.io.image import read_image_product
from soxs_core.simulate import DetectorSimulator
from soxs_recipes.cli import run as esorex

NBIAS, NDARK, DARK_EXPTIME = 7, 5, 600.0


def _sof(path: Path, entries) -> Path:
    path.write_text("".join(f"{p} {t}\n" for p, t in entries))
    return path


def _reduce(recipe, sof, outdir, *extra):
    status = esorex(["--output-dir", str(outdir), "--msg-level", "warning", *extra, recipe,
                     str(sof)])
    assert status == 0
    return outdir


@pytest.fixture(scope="module")
def vis_night(tmp_path_factory):
    """X-shooter VIS 2x2 fast: biases, darks, master bias and master dark."""
    root = tmp_path_factory.mktemp("vis")
    sim = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=7)
    biases = sim.write_bias(root / "raw", n=NBIAS)
    darks = sim.write_dark(root / "raw", n=NDARK, exptime=DARK_EXPTIME)
    _reduce("soxs_mbias", _sof(root / "bias.sof", [(p, "BIAS_VIS") for p in biases]),
            root / "out")
    mbias = root / "out" / "master_bias_vis.fits"
    _reduce("soxs_mdark", _sof(root / "dark.sof", [(p, "DARK_VIS") for p in darks]
                               + [(mbias, "MASTER_BIAS_VIS")]), root / "out")
    return sim, biases, darks, mbias, root / "out" / "master_dark_vis.fits"


def _bias_truth(sim, n):
    return np.mean([sim.truth.expected_electrons(0.0, k) for k in range(n)], axis=0)


def test_master_bias_matches_truth_with_calibrated_errors(vis_night):
    sim, biases, _, mbias, _ = vis_night
    master = read_image_product(mbias)
    truth = _bias_truth(sim, NBIAS)
    good = master.qual == 0
    pull = (master.data - truth)[good] / master.error[good]
    assert abs(np.mean(pull)) < 0.03
    assert 0.93 < np.std(pull) < 1.07
    # cosmic rays and other rogue values never reach the master
    assert np.percentile(np.abs(pull), 99.999) < 6
    # ERRS carry the measured single-frame noise: read noise plus the pick-up pattern, whose
    # phase changes between read-outs
    t = sim.truth
    temporal = np.mean([np.hypot(t.read_noise, t.pattern_amplitude * np.sin(
        (t.pattern_phases[k + 1] - t.pattern_phases[k]) / 2)) for k in range(NBIAS - 1)])
    assert np.median(master.error[good]) == pytest.approx(temporal / np.sqrt(NBIAS), rel=0.03)


def test_master_bias_qc_values(vis_night):
    sim, _, _, mbias, _ = vis_night
    header = fits.getheader(mbias)
    t = sim.truth
    # the read-out noise of a raw frame includes the pick-up pattern, whose phase changes
    temporal = np.mean([np.hypot(t.read_noise, t.pattern_amplitude * np.sin(
        (t.pattern_phases[k + 1] - t.pattern_phases[k]) / 2)) for k in range(NBIAS - 1)])
    assert header["ESO QC RAW RON"] == pytest.approx(temporal, rel=0.03)
    assert header["ESO QC MASTER RON"] == pytest.approx(t.read_noise / np.sqrt(NBIAS), rel=0.1)
    assert header["ESO QC MBIAS MEDIAN"] == pytest.approx(
        t.bias_level + np.mean(t.frame_offsets[:NBIAS]), abs=1.0)
    # the slopes of the true bias over the pixels the master uses; a profile point averages a
    # whole column (row) of the master's noise: the fitted slope's standard error, 5 sigma
    qual = read_image_product(mbias).qual
    true_x, true_y = t.bias_profile_slopes(qual != 0)
    ny, nx = qual.shape
    noise = temporal / np.sqrt(NBIAS)
    sigma_x = noise / np.sqrt(ny) * np.sqrt(12 / nx ** 3)
    sigma_y = noise / np.sqrt(nx) * np.sqrt(12 / ny ** 3)
    assert abs(true_y) > 20 * sigma_y  # writing 0 fails
    assert header["ESO QC STRUCTX"] == pytest.approx(true_x, abs=5 * sigma_x)
    assert header["ESO QC STRUCTY"] == pytest.approx(true_y, abs=5 * sigma_y)
    # every static bad pixel counts, and the bad column segments (a bias excess of 4-12 read
    # noises) as often as the noise predicts; nothing but the truth's defects
    threshold = 3.0 * temporal  # xsh default frame-clipping-sigma
    segments = sum((~t.static_bad_mask[start:stop, col]).sum() * norm.cdf(
        (offset - threshold) / noise) for (col, start, stop), offset in zip(
        t.bad_columns, t.bad_column_offsets))
    assert segments > 500
    defects = t.static_bad_mask | t.hot_mask | t.cold_mask
    assert t.static_bad_mask.sum() + 0.95 * segments <= header["ESO QC BADPIX NUM"] \
        <= defects.sum()
    assert not (qual != 0)[~defects].any()
    # the default pick-up pattern (0.4 read noise) stands far above white noise (~1)
    assert header["ESO QC FPN FRACMAX"] > 4


def test_static_bad_pixels_are_flagged_and_measured(vis_night):
    sim, _, _, mbias, _ = vis_night
    master = read_image_product(mbias)
    static = sim.truth.static_bad_mask
    assert static.any()
    # STATIC_BAD alone: their values are measured, not NO_DATA (tests/test_truth_masters.py
    # checks the values against the truth)
    assert np.all(master.qual[static] == Qual.STATIC_BAD)
    assert np.all(np.isfinite(master.data)) and np.all(np.isfinite(master.error))


def test_pattern_noise_qc_sees_the_periodic_pattern(tmp_path):
    values = {}
    for amplitude in (0.0, 2.0):
        sim = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=3,
                                pattern_amplitude=amplitude, cosmic_rate=0.0)
        paths = sim.write_bias(tmp_path / f"a{amplitude}", n=3)
        sof = _sof(tmp_path / f"a{amplitude}.sof", [(p, "BIAS_VIS") for p in paths])
        _reduce("soxs_mbias", sof, tmp_path / f"out{amplitude}")
        values[amplitude] = fits.getheader(
            tmp_path / f"out{amplitude}" / "master_bias_vis.fits")["ESO QC FPN FRACMAX"]
    # white noise scores ~1; the pattern's peak stands far above it
    assert 0.8 < values[0.0] < 1.6
    assert values[2.0] > 4.0


def test_master_dark_matches_truth_and_finds_hot_pixels(vis_night):
    sim, _, _, mbias, mdark = vis_night
    dark = read_image_product(mdark)
    t = sim.truth
    bias_truth = _bias_truth(sim, NBIAS)
    dark_truth = np.mean([t.expected_electrons(DARK_EXPTIME, k) for k in range(NDARK)],
                         axis=0) - bias_truth
    good = dark.qual == 0
    pull = (dark.data - dark_truth)[good] / dark.error[good]
    assert abs(np.mean(pull)) < 0.05
    assert 0.93 < np.std(pull) < 1.07
    # recall: every hot pixel whose excess is well above the detection threshold is flagged
    # (tests/test_truth_masters.py follows the recall across the whole range)
    header = fits.getheader(mdark)
    # the threshold from the truth: one raw dark's temporal noise (read noise, the pick-up
    # pattern whose phase changes, quantisation, dark shot noise) x frame-clipping-sigma
    temporal = np.mean([np.hypot(t.read_noise, t.pattern_amplitude * np.sin(
        (t.pattern_phases[k + 1] - t.pattern_phases[k]) / 2)) for k in range(NDARK - 1)])
    dark_level = float(np.median(dark_truth))
    threshold = 3.0 * np.sqrt(temporal ** 2 + t.gain ** 2 / 12 + max(dark_level, 0))
    excess = (t.dark_rate - np.median(t.dark_rate)) * DARK_EXPTIME
    strong = t.hot_mask & (excess > 2 * threshold) & ~t.static_bad_mask
    assert strong.sum() > 20
    flagged = (dark.qual & Qual.HOT) != 0
    assert flagged[strong].mean() > 0.99
    # and nothing else: flags away from true defects are rare
    defects = t.hot_mask | t.cold_mask | t.static_bad_mask
    assert (flagged & ~defects).sum() <= 1e-5 * dark.data.size + 1
    # the default dark is faint (0.15 e-): half of it is a tolerance a zero cannot pass
    # (tests/test_truth_masters.py holds a bright dark's median to a derived tolerance)
    assert header["ESO QC MDARK MEDIAN"] == pytest.approx(dark_level, abs=0.5 * dark_level)


@pytest.mark.parametrize("arm", ["xsh_nir", "soxs_nir"])
def test_nir_dark_without_bias_and_pure_noise_false_flag_rate(tmp_path, arm):
    sim = DetectorSimulator(arm=arm, seed=11, hot_pixel_fraction=0.0, cold_pixel_fraction=0.0,
                            bad_columns=0, cosmic_rate=0.0)
    darks = sim.write_dark(tmp_path / "raw", n=3, exptime=300.0)
    name = sim.truth.arm.name
    _reduce("soxs_mdark", _sof(tmp_path / "d.sof", [(p, f"DARK_{name}") for p in darks]),
            tmp_path / "out")
    dark = read_image_product(tmp_path / "out" / f"master_dark_{name.lower()}.fits")
    truth = np.mean([sim.truth.expected_electrons(300.0, k) for k in range(3)], axis=0)
    good = dark.qual == 0
    pull = (dark.data - truth)[good] / dark.error[good]
    assert 0.9 < np.std(pull) < 1.1 and abs(np.mean(pull)) < 0.05
    hot = (dark.qual & Qual.HOT) != 0
    clean = ~sim.truth.static_bad_mask
    assert hot[clean].mean() <= 1e-5


@pytest.mark.parametrize("arm,binning", [("xsh_uvb", "2x2"), ("soxs_vis", "2x1")])
def test_master_bias_truth_on_other_arms(tmp_path, arm, binning):
    """Geometry (180-degree rotation for UVB, SOXS trimming and binning) end to end."""
    sim = DetectorSimulator(arm=arm, binning=binning, readout="fast", seed=21)
    paths = sim.write_bias(tmp_path / "raw", n=5)
    name = sim.truth.arm.name
    _reduce("soxs_mbias", _sof(tmp_path / "b.sof", [(p, f"BIAS_{name}") for p in paths]),
            tmp_path / "out")
    master = read_image_product(tmp_path / "out" / f"master_bias_{name.lower()}.fits")
    truth = _bias_truth(sim, 5)
    assert master.shape == truth.shape
    good = master.qual == 0
    pull = (master.data - truth)[good] / master.error[good]
    assert abs(np.mean(pull)) < 0.05 and 0.93 < np.std(pull) < 1.07
    assert np.all(master.qual[sim.truth.static_bad_mask] & Qual.STATIC_BAD)


def test_master_bias_errors_follow_the_measured_noise_not_the_header(tmp_path):
    sim = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=31)
    paths = sim.write_bias(tmp_path / "raw", n=5)
    key = "HIERARCH " + sim.truth.arm.keywords["ron"]
    for path in paths:  # a stale header value, 30 % low
        with fits.open(path, mode="update") as hdul:
            hdul[0].header[key] = 0.7 * sim.truth.read_noise
    log = tmp_path / "esorex.log"
    _reduce("soxs_mbias", _sof(tmp_path / "b.sof", [(p, "BIAS_VIS") for p in paths]),
            tmp_path / "out", "--log-file", str(log))
    assert "differs from the header" in log.read_text()
    master = read_image_product(tmp_path / "out" / "master_bias_vis.fits")
    good = master.qual == 0
    pull = (master.data - _bias_truth(sim, 5))[good] / master.error[good]
    assert 0.93 < np.std(pull) < 1.07
