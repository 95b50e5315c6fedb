"""Master bias and master dark against an independent truth: the simulator's detector.

One simulated X-shooter VIS 2x2 night, reduced end to end by ``soxs-esorex``, with known
defects injected into every raw frame (electronic bias offsets above and below the level,
and pixels stuck at saturation).  Every expected value and every tolerance below comes from
the truth (read noise, gain, dark current, exposure time, frame counts, the defect lists) and
from counting statistics, never from the product's own QC.

Noise of one raw pixel (e-): read noise, quantisation (gain^2 / 12) and the shot noise of the
charge collected during the exposure and during the read-out (``readout_time`` of the mode,
rows read in order: on average about half of it).  Cosmic rays are switched off: the
flagging is tested against pure noise, as its false-flag rate is defined for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.stats import norm

from soxs_core.detector.quality import Qual
from soxs_core.io.image import read_image_product
from soxs_core.simulate import DetectorSimulator
from soxs_recipes.cli import run as esorex

NBIAS, NDARK, EXPTIME = 7, 5, 3600.0
#: frame-clipping-sigma given to both recipes (the flagging threshold in single-frame sigmas)
SIGMA = 3.0
#: dark current per unbinned pixel (e-/s): 900 e- per binned pixel in EXPTIME, so that the
#: shot noise (30 e-) dominates the read noise (5.3 e-)
DARK_RATE = 0.0625
#: injected bias offsets, in units of the true mbias threshold: many near it, some far above
NEAR, FAR = 1200, 400


def _single_frame_noise(sim: DetectorSimulator, dark_electrons) -> np.ndarray:
    """True noise (e-) of one raw pixel that collects ``dark_electrons`` above the bias."""
    t = sim.truth
    return np.sqrt(t.read_noise ** 2 + t.gain ** 2 / 12 + dark_electrons)


def _mean_readout_wait(sim: DetectorSimulator) -> float:
    """Mean time (s) a science row waits while the CCD is read out (rows read in order)."""
    rows = np.arange(sim.rows.start, sim.rows.stop) + 1.0
    return float(sim.mode.readout_time * rows.mean() / sim.raw_shape[0])


def _prepared_to_raw(sim: DetectorSimulator, image: np.ndarray) -> np.ndarray:
    """An image of the prepared (rotated, trimmed) geometry laid into the raw frame."""
    full = np.zeros(sim.rot_shape, image.dtype)
    full[sim.rows, sim.cols] = image
    return np.rot90(full, -sim.arm.rotation)


def _write(sim, directory: Path, kind: str, n: int, exptime: float, offset_adu: np.ndarray,
           saturate: dict[int, np.ndarray]) -> list[Path]:
    """Raw frames with fixed ADU offsets added, and pixels driven to saturation in frame k
    where ``saturate[k]`` is set (prepared geometry)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw_offset = _prepared_to_raw(sim, offset_adu.astype(np.int32))
    paths = []
    for k in range(n):
        hdul, info = sim.make_frame(kind, exptime, k)
        adu = hdul[0].data.astype(np.int32) + raw_offset
        if k in saturate:
            adu[_prepared_to_raw(sim, saturate[k])] = 65535
        hdul[0].data = np.clip(adu, 0, 65535).astype(np.uint16)
        path = directory / info["file_name"]
        hdul.writeto(path)
        paths.append(path)
    return paths


def _reduce(recipe: str, sof: Path, outdir: Path) -> None:
    status = esorex(["--output-dir", str(outdir), "--msg-level", "warning", recipe,
                     f"--frame-clipping-sigma={SIGMA}", str(sof)])
    assert status == 0


def _spread_positions(rng, allowed: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n allowed pixels, no two closer than 4 px (each defect sees a clean neighbourhood)."""
    lattice = np.zeros_like(allowed)
    lattice[4:-4:4, 4:-4:4] = True
    rows, cols = np.nonzero(lattice & allowed)
    pick = rng.choice(rows.size, n, replace=False)
    return rows[pick], cols[pick]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("truth")
    sim = DetectorSimulator("xsh_vis", "2x2", "fast", seed=17, pattern_amplitude=0.0,
                            dark_rate=DARK_RATE, hot_pixel_fraction=3e-3,
                            hot_rates=(0.02, 0.3), bad_columns=4, cosmic_rate=0.0,
                            bias_gradient=(-4e-4, 3e-4))
    t = sim.truth
    rng = np.random.default_rng(99)
    wait = _mean_readout_wait(sim)
    bias_noise = float(_single_frame_noise(sim, t.base_dark_rate * wait))
    threshold = SIGMA * bias_noise
    # ---- injected defects: fixed bias offsets (in every bias and dark), saturated pixels
    defects = t.hot_mask | t.cold_mask | t.static_bad_mask
    n_inject = 2 * (NEAR + FAR) + 40
    rows, cols = _spread_positions(rng, ~defects, n_inject)
    factor = np.concatenate([rng.uniform(0.8, 1.5, NEAR), np.exp(rng.uniform(
        np.log(1.5), np.log(10), FAR))])
    amplitude_adu = np.rint(factor * threshold / t.gain).astype(np.int32)
    offset = np.zeros(t.shape, np.int32)
    nd = NEAR + FAR
    hot = (rows[:nd], cols[:nd])
    cold = (rows[nd:2 * nd], cols[nd:2 * nd])
    offset[hot] = amplitude_adu
    offset[cold] = -amplitude_adu
    stuck = np.zeros(t.shape, bool)       # saturated in every frame
    stuck[rows[2 * nd:2 * nd + 20], cols[2 * nd:2 * nd + 20]] = True
    static_rows, static_cols = np.nonzero(t.static_bad_mask & ~t.hot_mask)
    stuck[static_rows[:5], static_cols[:5]] = True
    sometimes = np.zeros(t.shape, bool)   # saturated in two of the bias frames only
    sometimes[rows[2 * nd + 20:], cols[2 * nd + 20:]] = True
    bias_saturation = {k: stuck | sometimes if k in (1, 4) else stuck for k in range(NBIAS)}
    biases = _write(sim, root / "raw", "BIAS", NBIAS, 0.0, offset, bias_saturation)
    darks = _write(sim, root / "raw", "DARK", NDARK, EXPTIME, offset,
                   {k: stuck for k in range(NDARK)})
    out = root / "out"
    (root / "bias.sof").write_text("".join(f"{p} BIAS_VIS\n" for p in biases))
    _reduce("soxs_mbias", root / "bias.sof", out)
    mbias = out / "master_bias_vis.fits"
    (root / "dark.sof").write_text("".join(f"{p} DARK_VIS\n" for p in darks)
                                   + f"{mbias} MASTER_BIAS_VIS\n")
    _reduce("soxs_mdark", root / "dark.sof", out)
    injected = np.zeros(t.shape, bool)
    injected[rows, cols] = True
    return dict(
        sim=sim, wait=wait, bias_noise=bias_noise, bias_threshold=threshold,
        hot=hot, cold=cold, amplitude=amplitude_adu * t.gain, stuck=stuck,
        sometimes=sometimes, injected=injected | stuck,
        mbias=read_image_product(mbias), mbias_header=fits.getheader(mbias),
        mdark=read_image_product(out / "master_dark_vis.fits"),
        mdark_header=fits.getheader(out / "master_dark_vis.fits"),
        bias_truth=np.mean([t.expected_electrons(0.0, k) for k in range(NBIAS)], axis=0),
        dark_truth=np.mean([t.expected_electrons(EXPTIME, k) for k in range(NDARK)], axis=0),
    )


def _dark_signal(night) -> np.ndarray:
    """True bias-subtracted master dark: mean dark minus mean bias (drifts included)."""
    return night["dark_truth"] - night["bias_truth"]


def _assert_recall_follows_noise(flagged, excess, sigma, threshold, edges, what):
    """Per bin of excess/threshold, the flagged fraction equals the mean probability that a
    value of true excess e and Gaussian noise sigma is measured above the threshold."""
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (excess >= lo * threshold) & (excess < hi * threshold)
        n = int(sel.sum())
        assert n >= 30, f"{what}: only {n} pixels between {lo} and {hi} x threshold"
        p = norm.cdf((excess[sel] - threshold) / sigma[sel])
        predicted, observed = p.mean(), flagged[sel].mean()
        # 4 binomial sigmas, plus 2 % for the smooth model's own noise (~1.5 % of the
        # master's) which the prediction leaves out
        allowed = 4 * np.sqrt(np.sum(p * (1 - p))) / n + 0.02
        assert abs(observed - predicted) <= allowed, (
            f"{what}: {lo:.2f}-{hi:.2f} x threshold: {observed:.3f} of {n} flagged, "
            f"noise predicts {predicted:.3f} +- {allowed:.3f}")


#: Bins of true excess / true threshold: fine where the recall rises, coarse above.
RECALL_BINS = [0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.4, 2.0, 4.0, 10.0]


def test_mbias_hot_and_cold_flags_follow_the_injected_defects(night):
    sim, master = night["sim"], night["mbias"]
    threshold = night["bias_threshold"]
    noise = np.full(master.shape, night["bias_noise"] / np.sqrt(NBIAS))
    hot_flag = (master.qual & Qual.HOT) != 0
    # the injected offsets are whole ADU: one bin per ADU value near the threshold
    step = sim.truth.gain / threshold
    near = np.arange(np.rint(0.8 / step), np.rint(1.5 / step) + 1)
    bins = list((near - 0.5) * step) + [2.0, 4.0, 10.5]
    cold_flag = (master.qual & Qual.COLD) != 0
    for name, where, flags, other in (("HOT", night["hot"], hot_flag, cold_flag),
                                      ("COLD", night["cold"], cold_flag, hot_flag)):
        _assert_recall_follows_noise(flags[where], night["amplitude"], noise[where],
                                     threshold, bins, f"mbias {name}")
        assert not other[where].any(), f"mbias: an injected {name} pixel has the other flag"
    # pure noise: both tails of the master's noise beyond the threshold
    t = sim.truth
    clean = ~(t.hot_mask | t.cold_mask | t.static_bad_mask | night["injected"])
    rate = 2 * norm.sf(threshold / noise[0, 0])
    expected = rate * clean.sum()
    false = int(((hot_flag | cold_flag) & clean).sum())
    assert false <= expected + 4 * np.sqrt(expected) + 2, (false, expected)


def test_mbias_flags_bad_columns_and_not_the_rest_of_their_column(night):
    """The simulator's bad column segments (a bias excess of 4 to 12 read noises) run from a
    random row to the last, over most of the column."""
    sim, master = night["sim"], night["mbias"]
    t = sim.truth
    assert len(t.bad_columns) == 4
    noise = night["bias_noise"] / np.sqrt(NBIAS)
    threshold = night["bias_threshold"]
    hot = (master.qual & Qual.HOT) != 0
    flagged = (master.qual & (Qual.HOT | Qual.COLD)) != 0
    for (col, start, stop), offset in zip(t.bad_columns, t.bad_column_offsets):
        segment = ~t.static_bad_mask[start:stop, col] & ~t.hot_mask[start:stop, col]
        p = norm.cdf((offset - threshold) / noise)
        observed = hot[start:stop, col][segment].mean()
        n = segment.sum()
        assert observed == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / n) + 0.02), (
            col, offset / threshold)
        above = ~t.static_bad_mask[:start, col] & ~t.hot_mask[:start, col]
        assert not flagged[:start, col][above].any(), f"column {col}: rows above flagged"


def test_mdark_hot_pixel_recall_against_the_true_threshold(night):
    sim, dark = night["sim"], night["mdark"]
    t = sim.truth
    wait = night["wait"]
    base = t.base_dark_rate
    # threshold from the truth: frame-clipping-sigma x the true noise of one raw dark
    threshold = SIGMA * float(_single_frame_noise(sim, base * (EXPTIME + wait)))
    # each pixel's master noise: its dark stack and the master bias, from its own dark rate
    rate = t.dark_rate
    sigma = np.sqrt(_single_frame_noise(sim, rate * (EXPTIME + wait)) ** 2 / NDARK
                    + _single_frame_noise(sim, rate * wait) ** 2 / NBIAS)
    excess = (rate - base) * EXPTIME
    flagged = (dark.qual & Qual.HOT) != 0
    hot = t.hot_mask & ~t.static_bad_mask
    _assert_recall_follows_noise(flagged[hot], excess[hot], sigma[hot], threshold,
                                 RECALL_BINS, "mdark HOT")
    # the count in the header is what the noise predicts for all the truth's hot pixels
    p = norm.cdf((excess[hot] - threshold) / sigma[hot])
    assert night["mdark_header"]["ESO QC HOTPIX NUM"] == pytest.approx(
        p.sum(), abs=5 * np.sqrt(np.sum(p * (1 - p))) + 0.02 * hot.sum())
    # pure noise (the injected bias offsets cancel in a bias-subtracted dark)
    clean = ~(t.hot_mask | t.cold_mask | t.static_bad_mask | night["stuck"])
    expected = norm.sf(threshold / np.median(sigma[clean])) * clean.sum()
    false = int((flagged & clean).sum())
    assert false <= expected + 4 * np.sqrt(expected) + 2, (false, expected)


def test_mdark_errors_carry_the_poisson_noise(night):
    sim, dark = night["sim"], night["mdark"]
    t = sim.truth
    signal = t.base_dark_rate * EXPTIME
    assert signal > 10 * t.read_noise ** 2  # shot noise dominates: the test is about it
    good = (dark.qual == 0) & ~t.hot_mask
    pull = (dark.data - _dark_signal(night))[good] / dark.error[good]
    n = pull.size
    # 5 sigmas of the std of n Gaussian pulls, plus 1 %: ERRS leave out the shot noise of
    # the charge collected during the read-out (a third of a percent of the variance)
    assert np.std(pull) == pytest.approx(1.0, abs=5 / np.sqrt(2 * n) + 0.01)
    assert abs(np.mean(pull)) < 5 / np.sqrt(n) + 0.01


def test_mdark_qc_against_truth(night):
    sim, header = night["sim"], night["mdark_header"]
    t = sim.truth
    base, wait = t.base_dark_rate, night["wait"]
    dark_noise = float(_single_frame_noise(sim, base * (EXPTIME + wait)))
    # RAW RON: frame-pair differences of ~50 000 values each measure one frame's noise to
    # 0.3 %; four pairs averaged; 2 % leaves room for the clipped tails
    assert header["ESO QC RAW RON"] == pytest.approx(dark_noise, rel=0.02)
    master_noise = np.hypot(dark_noise / np.sqrt(NDARK), night["bias_noise"] / np.sqrt(NBIAS))
    # MASTER RON is measured about the smooth model, whose own noise adds ~1.5 %
    assert header["ESO QC MASTER RON"] == pytest.approx(master_noise, rel=0.04)
    good = (night["mdark"].qual == 0) & ~t.hot_mask
    true_median = float(np.median(_dark_signal(night)[good]))
    assert true_median > 100 * master_noise / np.sqrt(NDARK)  # a level that 0 cannot pass
    # the median of n noisy pixels scatters by 1.25 sigma / sqrt(n); 10 times that leaves
    # room for the faint hot pixels below the threshold (0.3 % of the pixels)
    tolerance = 10 * 1.2533 * master_noise / np.sqrt(good.sum())
    assert header["ESO QC MDARK MEDIAN"] == pytest.approx(true_median, abs=tolerance)


def test_mbias_qc_against_truth(night):
    sim, header, master = night["sim"], night["mbias_header"], night["mbias"]
    t = sim.truth
    assert header["ESO QC RAW RON"] == pytest.approx(night["bias_noise"], rel=0.02)
    assert header["ESO QC MASTER RON"] == pytest.approx(
        night["bias_noise"] / np.sqrt(NBIAS), rel=0.04)
    # the level of each frame (read-out dark and drift included) over the clean pixels; the
    # QC is their median over the frames, each measured on tens of thousands of pixels
    clean = ~(t.hot_mask | t.cold_mask | t.static_bad_mask | night["injected"])
    levels = [float(np.mean(t.expected_electrons(0.0, k)[clean])) for k in range(NBIAS)]
    ny, nx = t.shape
    assert header["ESO QC MBIAS MEDIAN"] == pytest.approx(
        np.median(levels), abs=5 * night["bias_noise"] / np.sqrt(ny * nx / 64))
    # the slopes of the true bias (gradient and read-out dark ramp) over the same pixels
    flagged = master.qual != 0
    true_x, true_y = t.bias_profile_slopes(flagged)
    noise = night["bias_noise"] / np.sqrt(NBIAS)
    # a profile point averages a whole row (column): the fitted slope's standard error
    sigma_y = noise / np.sqrt(nx) * np.sqrt(12 / ny ** 3)
    sigma_x = noise / np.sqrt(ny) * np.sqrt(12 / nx ** 3)
    assert abs(true_y) > 20 * sigma_y and abs(true_x) > 20 * sigma_x  # 0 cannot pass
    assert header["ESO QC STRUCTY"] == pytest.approx(true_y, abs=5 * sigma_y)
    assert header["ESO QC STRUCTX"] == pytest.approx(true_x, abs=5 * sigma_x)


def test_static_bad_pixels_keep_their_measured_values(night):
    sim, master, dark = night["sim"], night["mbias"], night["mdark"]
    t = sim.truth
    static = t.static_bad_mask & ~night["stuck"]
    assert static.sum() > 100
    assert np.all(master.qual[static] == Qual.STATIC_BAD)
    # dead static pixels have the bias of their neighbours; the pull says whether FLUX and
    # ERRS are the stacked measurement (std 1) rather than a filled level and the
    # single-frame noise
    dead = static & ~t.hot_mask
    pull = (master.data - night["bias_truth"])[dead] / master.error[dead]
    assert np.std(pull) == pytest.approx(1.0, abs=5 / np.sqrt(2 * dead.sum()))
    # hot static pixels: their own level, read-out dark included, not the neighbours'
    live = static & t.hot_mask
    readout = _single_frame_noise(sim, t.dark_rate * sim.mode.readout_time) / np.sqrt(NBIAS)
    assert np.all(np.abs(master.data - night["bias_truth"])[live] < 6 * readout[live])
    # in the dark, a static pixel is either measured or, where the truth saturates in
    # every frame, SATURATED and NO_DATA
    saturation = min(t.saturation_adu, sim.arm.saturation_adu) * t.gain
    expected = t.expected_electrons(EXPTIME)
    margin = 10 * np.sqrt(np.maximum(expected - t.bias, 1.0))
    full = static & (expected - margin > saturation)
    measured = static & (expected + margin < saturation)
    assert full.sum() > 10 and measured.sum() > 100
    assert np.all(dark.qual[full] == Qual.STATIC_BAD | Qual.SATURATED | Qual.NO_DATA)
    assert np.all(dark.qual[measured] == Qual.STATIC_BAD)
    rate, read_time = t.dark_rate, sim.mode.readout_time
    sigma = np.sqrt(_single_frame_noise(sim, rate * (EXPTIME + read_time)) ** 2 / NDARK
                    + _single_frame_noise(sim, rate * read_time) ** 2 / NBIAS)
    assert np.all(np.abs(dark.data - _dark_signal(night))[measured] < 6 * sigma[measured])


def test_saturated_pixels_are_no_data_only_when_every_input_is(night):
    sim, master, dark = night["sim"], night["mbias"], night["mdark"]
    t = sim.truth
    stuck, static = night["stuck"], t.static_bad_mask
    no_data = Qual.SATURATED | Qual.NO_DATA
    for product in (master, dark):
        assert np.all(product.qual[stuck & ~static] == no_data)
        assert np.all(product.qual[stuck & static] == no_data | Qual.STATIC_BAD)
        assert np.isfinite(product.data[stuck]).all()
    # nothing measured: FLUX is the local level, ERRS the single-frame noise
    single = night["bias_noise"]
    assert np.all(np.abs(master.data - night["bias_truth"])[stuck] < 3 * single)
    np.testing.assert_allclose(master.error[stuck], single, rtol=0.03)
    # saturated in two of seven frames: the other five make an ordinary measurement
    some = night["sometimes"]
    assert np.all(master.qual[some] == 0)
    others = np.mean([t.expected_electrons(0.0, k) for k in range(NBIAS) if k not in (1, 4)],
                     axis=0)
    noise = single / np.sqrt(NBIAS - 2)
    assert np.all(np.abs(master.data - others)[some] < 5 * noise)
    np.testing.assert_allclose(master.error[some], noise, rtol=0.05)
