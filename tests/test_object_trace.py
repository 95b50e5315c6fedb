"""The object trace (soxs_core.extraction.objecttrace) against the simulator's truth.

Each set is a realistic stare frame: ``make_frame`` of the science model (object, sky,
scattered light, pixel response, Poisson and read noise, cosmic rays, hot and bad pixels),
read back as a raw frame and detrended with the detector truth; the sky and scattered light
are then removed with their true models, as a perfect sky subtraction would (so that this
file measures the trace alone).  The faint frame is the same scene with the object scaled to
``FAINT_MAG`` (19-19.5).  The truth is
``science_model("OBJECT").rows["object"][order]["centre"]``, the true trace per along-order
pixel (unbinned).

Where the trace must be accurate is derived from the truth too: the expected (matched
filter) signal-to-noise of a median-collapsed cut, from the noise-free object and the
expected noise of the median of ``slice_width`` pixels (:meth:`Frame.truth`).  Where it is
below ``SNR_SIGNAL`` the object is not measurably there, and an order with signal has at
least ``MIN_SIGNAL_FRACTION`` of its length above it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle.ordertable import read_order_table, to_binned
from soxs_core.errors import InputError
from soxs_core.extraction import objecttrace as OT
from soxs_core.io.image import DetectorImage
from soxs_core.simulate.instrument import InstrumentSimulator

BRIGHT_MAG = 17.0
#: faint object per set: SOXS NIR's sky leaves a mag-19.5 object at a cut SNR of ~3
FAINT_MAG = {"soxs_nir": 19.0}
FAINT_DEFAULT = 19.5
EXPTIME = 600.0
SNR_SIGNAL = 5.0
MIN_SIGNAL_FRACTION = 0.3
TOL = {"bright": 0.1, "faint": 0.3}  # binned px, rms over the signal region of each order

SETS = {
    # name: (arm, binning, orders)
    "xsh_vis": ("xsh_vis", "1x1", [20, 21, 22]),
    "xsh_nir": ("xsh_nir", "1x1", [14, 15, 16]),
    "soxs_vis": ("soxs_vis", "1x1", None),
    "soxs_nir": ("soxs_nir", "1x1", [12, 13, 14]),
    "xsh_vis_2x2": ("xsh_vis", "2x2", [20, 21, 22]),
}


class Frame:
    """One reduced set: the frame, its truth and the trace measured on it."""

    def __init__(self, sim: InstrumentSimulator, table, root: Path, mag: float, index: int):
        self.sim, self.table = sim, table
        det = sim.detector
        self.binx, self.biny = det.binx, det.biny
        self.axis = table.dispersion_axis
        self.bin_along, self.bin_across = ((self.biny, self.binx) if self.axis == "y"
                                           else (self.binx, self.biny))
        res = sim.science_model("OBJECT", EXPTIME)
        self.truth_rows = res.rows["object"]
        self.scale = 10 ** (-0.4 * (mag - sim.scene.object_mag))
        obj = res.images["object"] * np.float32(self.scale)
        rest = res.images["sky"] + res.images["scattered"]
        hdul, info = det.make_frame("OBJECT", EXPTIME, index, signal=obj + rest,
                                    header=sim._scene_header("OBJECT"))
        path = root / f"{sim.arm.code}_{det.binx}x{det.biny}_{mag}.fits"
        hdul.writeto(path, overwrite=True)
        raw = RawFrame.open(path)
        electrons, qual = raw.read_band()
        raw.close()
        t = sim.truth
        level = t.bias + np.float32(info["bias_offset"]) + t.dark_rate * np.float32(EXPTIME)
        data = electrons - level - t.sensitivity * rest
        expected = t.sensitivity * (obj + rest) + t.dark_rate * np.float32(EXPTIME)
        var = np.maximum(expected, 0) + np.float32(t.read_noise ** 2)
        qual |= (t.static_bad_mask * np.uint8(Qual.STATIC_BAD)).astype(np.uint8)
        qual |= (t.hot_mask * np.uint8(Qual.HOT)).astype(np.uint8)
        self.image = DetectorImage(data=data.astype(np.float32),
                                   error=np.sqrt(var).astype(np.float32), qual=qual)
        self.object_model = obj * t.sensitivity
        self.noise_px = np.sqrt(var)
        self.params = OT.TraceParameters.for_arm(sim.arm.code)
        start = time.perf_counter()
        self.trace = OT.detect_continuum(self.image, table, self.binx, self.biny, self.params,
                                         name=path.name)
        self.seconds = time.perf_counter() - start

    def view(self, img: np.ndarray) -> np.ndarray:
        return img if self.axis == "y" else img.T

    def truth(self, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Binned along index, true binned across centre and expected cut SNR per pixel.

        The SNR is that of the best (matched-filter) measurement of the object's amplitude
        in a median-collapsed cut: the quadrature sum over the cut of the noise-free object
        over the noise of the median of ``slice_width`` pixels (~1.25 / sqrt(w) of one
        pixel's), averaged over a cut spacing (detection is per cut, not per pixel).
        """
        row = self.truth_rows[order]
        ib = np.asarray(row["pixel"], int)
        centre_b = to_binned(row["centre"], self.bin_across)
        obj, noise = self.view(self.object_model), self.view(self.noise_px)
        half = self.params.slice_length // 2
        cols = np.rint(centre_b).astype(int)[:, None] + np.arange(-half, half + 1)[None, :]
        inside = (cols >= 0) & (cols < obj.shape[1])
        cols = np.clip(cols, 0, obj.shape[1] - 1)
        cut_noise = 1.2533 * noise[ib[:, None], cols] / np.sqrt(self.params.slice_width)
        snr = np.sqrt(np.sum(np.where(inside, obj[ib[:, None], cols] / cut_noise, 0) ** 2,
                             axis=1))
        k = max(1, ib.size // self.params.order_sample_count)
        snr = np.convolve(snr, np.ones(k) / k, mode="same")
        return ib, centre_b, snr

    def signal_orders(self) -> list[int]:
        return [n for n in self.truth_rows
                if np.mean(self.truth(n)[2] >= SNR_SIGNAL) >= MIN_SIGNAL_FRACTION]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("object_trace")
    cache: dict[tuple[str, str], Frame] = {}

    def get(name: str, level: str) -> Frame:
        key = (name, level)
        if key not in cache:
            arm, binning, orders = SETS[name]
            sim_key = (name, "sim")
            if sim_key not in cache:
                sim = InstrumentSimulator(arm, binning, seed=5, orders=orders)
                path = root / f"order_tab_{name}.fits"
                sim.order_table(edges=True).writeto(path, overwrite=True)
                cache[sim_key] = (sim, read_order_table(path))  # type: ignore[assignment]
            sim, table = cache[sim_key]  # type: ignore[misc]
            mag = BRIGHT_MAG if level == "bright" else FAINT_MAG.get(name, FAINT_DEFAULT)
            cache[key] = Frame(sim, table, root, mag, 0 if level == "bright" else 1)
        return cache[key]

    return get


# ---------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("level", ["bright", "faint"])
@pytest.mark.parametrize("name", list(SETS))
def test_trace_matches_truth(frames, name, level):
    f = frames(name, level)
    signal = f.signal_orders()
    assert signal, "the scene must have orders with signal"
    if level == "bright":
        assert signal == sorted(f.truth_rows), "a bright object has signal in every order"
    traced = set(int(n) for n in f.trace.table.orders)
    assert set(signal) <= traced, f"orders with signal not traced: {set(signal) - traced}"
    for n in signal:
        ib, centre_b, snr = f.truth(n)
        use = snr >= SNR_SIGNAL
        fit = OT.trace_centre_binned(f.trace.table, n, ib[use], f.binx, f.biny)
        rms = float(np.sqrt(np.mean((fit - centre_b[use]) ** 2)))
        assert rms <= TOL[level], (f"{name} {level} order {n}: trace {rms:.3f} px rms from "
                                   f"the truth over {use.sum()} px (limit {TOL[level]})")


@pytest.mark.parametrize("name", list(SETS))
def test_bright_cuts_detected(frames, name):
    """Every cut where the bright object stands well above the noise is detected and used."""
    f = frames(name, "bright")
    s = f.trace.samples
    assert f.trace.qc.values["SAMPLES DET FRAC"] >= 0.9
    for n in f.truth_rows:
        ib, _, snr = f.truth(n)
        mine = s.order == n
        along_b = to_binned(s.along[mine], f.bin_along)
        strong = np.interp(along_b, ib, snr) >= 3 * SNR_SIGNAL
        assert strong.sum() >= 10
        assert np.mean(s.used[mine][strong]) >= 0.95, f"order {n}"


@pytest.mark.parametrize("name", ["xsh_vis", "soxs_nir", "xsh_vis_2x2"])
def test_qc_consistent_with_samples(frames, name):
    f = frames(name, "faint")
    t, s, qc = f.trace, f.trace.samples, f.trace.qc.values
    assert qc["N ORDERS"] == t.table.orders.size
    assert qc["SAMPLES TOT NUM"] == len(s) == s.order.size
    assert qc["SAMPLES DET NUM"] == int(s.detected.sum())
    assert qc["SAMPLES DET FRAC"] == pytest.approx(s.detected.sum() / len(s))
    assert qc["SAMPLES CLIP NUM"] == int((s.detected & ~s.used).sum())
    assert qc["SAMPLES CLIP FRAC"] == pytest.approx(s.clipped.sum() / s.detected.sum())
    axis = "X" if f.axis == "y" else "Y"
    other = "Y" if axis == "X" else "X"
    assert not any(k.startswith(f"{other} RES") for k in qc)
    # residuals recomputed from the table and the samples, in binned px
    used = s.used
    res = (s.across[used] - t.table.centre(s.order[used].astype(float), s.along[used]))
    res_b = res / f.bin_across
    assert qc[f"{axis} RES SD"] == pytest.approx(np.std(res_b), rel=1e-6, abs=1e-9)
    assert qc[f"{axis} RES MIN"] == pytest.approx(res_b.min(), abs=1e-9)
    assert qc[f"{axis} RES MAX"] == pytest.approx(res_b.max(), abs=1e-9)
    assert qc[f"{axis} RES MIN"] < 0 < qc[f"{axis} RES MAX"]  # signed
    # the samples agree with the truth as their errors say (a faint frame: errors matter)
    pulls = []
    for n in t.table.orders:
        row = f.truth_rows[int(n)]
        mine = used & (s.order == n)
        truth = np.interp(s.along[mine], row["along"], row["centre"])
        pulls.append((s.across[mine] - truth) / s.centre_error[mine])
    pulls = np.concatenate(pulls)
    mad = 1.4826 * np.median(np.abs(pulls - np.median(pulls)))
    assert 0.7 < mad < 1.4, f"centre-error pulls: robust sigma {mad:.2f}"


def test_trace_width_follows_the_samples(frames):
    f = frames("xsh_nir", "bright")
    s, table = f.trace.samples, f.trace.table
    used = s.used
    fit = table.std(s.order[used].astype(float), s.along[used])
    assert np.median(np.abs(fit - s.sigma[used]) / s.sigma[used]) < 0.1
    # seeing 0.8" FWHM over 0.25"/px (X-shooter NIR, unbinned) and the slit: 1.2-3 px sigma
    assert 1.0 < np.median(fit) < 3.5


# ---------------------------------------------------------------------------- products
def test_object_tab_round_trip(frames, tmp_path):
    for name in ("soxs_nir", "xsh_vis_2x2"):
        f = frames(name, "bright")
        path = f.trace.table.write(tmp_path / f"object_tab_{name}.fits")
        back = read_order_table(path)
        from astropy.io import fits

        with fits.open(path) as hdul:
            cols = hdul[1].columns.names
            assert (f"deg{f.axis}_cent" in cols) and ("std_00" in cols)
            assert "edgeup_c00" not in cols
        np.testing.assert_array_equal(back.orders, f.trace.table.orders)
        for n in back.orders:
            b0, b1 = back.along_range(int(n))
            assert (b0, b1) == pytest.approx(f.table.along_range(int(n)), abs=1.0)
            b = np.linspace(b0, b1, 50)
            np.testing.assert_allclose(back.centre(float(n), b),
                                       f.trace.table.centre(float(n), b), atol=1e-6)
            np.testing.assert_allclose(back.std(float(n), b), f.trace.table.std(float(n), b),
                                       atol=1e-6)


def test_trace_centre_binned_matches_truth_2x2(frames):
    f = frames("xsh_vis_2x2", "bright")
    for n in f.trace.table.orders:
        ib, centre_b, snr = f.truth(int(n))
        fit = OT.trace_centre_binned(f.trace.table, int(n), ib, f.binx, f.biny)
        assert np.median(np.abs(fit - centre_b)) < 0.05


def test_plot(frames, tmp_path):
    f = frames("xsh_vis", "faint")
    start = time.perf_counter()
    path = OT.plot_object_trace(tmp_path / "object_trace_res.pdf", f.image, f.trace,
                                title="test frame")
    seconds = time.perf_counter() - start
    assert path.read_bytes()[:5] == b"%PDF-"
    assert seconds < 6.0  # < 2 s on an idle machine
    assert not list(tmp_path.glob("*.tmp*"))


# ---------------------------------------------------------------------------- robustness
def test_masked_block_on_the_trace(frames):
    """A masked stretch of the trace (QUAL or object_mask) is ignored, not measured."""
    f = frames("xsh_nir", "bright")
    n = int(f.trace.table.orders[1])
    ib, centre_b, _ = f.truth(n)
    mid = ib.size // 2
    rows = ib[mid - 150:mid + 150]
    mask_v = np.zeros(f.view(f.image.data).shape, bool)
    for r, c in zip(rows, np.rint(centre_b[mid - 150:mid + 150]).astype(int)):
        mask_v[r, c - 1:c + 2] = True
    mask = mask_v if f.axis == "y" else mask_v.T
    data = f.image.data.copy()
    data[mask] = 1e5  # garbage where masked: must not be seen
    qual = f.image.qual.copy()
    qual[mask] |= np.uint8(Qual.SATURATED)
    for image, extra in ((DetectorImage(data, f.image.error, qual), None),
                         (DetectorImage(data, f.image.error, f.image.qual), mask)):
        trace = OT.detect_continuum(image, f.table, f.binx, f.biny, f.params,
                                    object_mask=extra)
        fit = OT.trace_centre_binned(trace.table, n, ib, f.binx, f.biny)
        assert np.sqrt(np.mean((fit - centre_b) ** 2)) < TOL["bright"]


def test_order_without_object_left_out(frames, caplog):
    f = frames("xsh_vis", "bright")
    n = int(f.trace.table.orders[0])
    # remove the object from one order: what is left there is noise
    band = f.table.in_order_mask(f.image.shape, f.binx, f.biny, orders=[n])
    data = f.image.data.copy()
    data[band] -= f.object_model[band]
    with caplog.at_level(logging.WARNING):
        trace = OT.detect_continuum(DetectorImage(data, f.image.error, f.image.qual),
                                    f.table, f.binx, f.biny, f.params, name="blank.fits")
    assert n not in trace.table.orders and n in trace.dropped_orders
    assert any(f"order {n}" in r.getMessage() for r in caplog.records)
    assert trace.qc.values["N ORDERS"] == f.trace.table.orders.size - 1
    for m in trace.table.orders:
        ib, centre_b, _ = f.truth(int(m))
        fit = OT.trace_centre_binned(trace.table, int(m), ib, f.binx, f.biny)
        assert np.sqrt(np.mean((fit - centre_b) ** 2)) < TOL["bright"]


def test_no_object_raises(frames):
    f = frames("soxs_nir", "bright")
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 5.0, f.image.shape).astype(np.float32)
    image = DetectorImage(noise, np.full_like(noise, 5.0), np.zeros(noise.shape, np.uint8))
    with pytest.raises(InputError, match="empty.fits: .*no continuum detected"):
        OT.detect_continuum(image, f.table, f.binx, f.biny, f.params, name="empty.fits")


# ---------------------------------------------------------------------------- units
def test_gaussian_fit_errors_are_calibrated():
    rng = np.random.default_rng(7)
    k, length = 3000, 31
    x = np.arange(length)
    mu = rng.uniform(10, 20, k)
    sig = rng.uniform(1.2, 3.0, k)
    amp = rng.uniform(5, 60, k)
    base = rng.uniform(-2, 2, k)
    noise = 2.0
    y = base[:, None] + amp[:, None] * np.exp(-0.5 * ((x - mu[:, None]) / sig[:, None]) ** 2)
    y = y + rng.normal(0, noise, y.shape)
    valid = rng.random(y.shape) > 0.05
    good = amp / noise > 5
    # unweighted (errors from the residuals' scatter) and weighted by given errors
    for errors in (None, np.full(y.shape, noise)):
        out = OT.fit_gaussians(y, valid, errors)
        assert out["ok"].mean() > 0.99
        ok = good & out["ok"]
        pull = (out["centre"] - mu) / out["centre_error"]
        assert abs(np.median(pull[ok])) < 0.1
        assert 0.9 < 1.4826 * np.median(np.abs(pull[ok])) < 1.1
        assert np.median(np.abs(out["sigma"][ok] / sig[ok] - 1)) < 0.05
        assert np.median(out["noise"][ok]) == pytest.approx(noise, rel=0.05)


def test_parameters():
    p = OT.TraceParameters.from_mapping({"order-sample-count": 50, "slice_length": "40",
                                         "detect-continuum.peak-sigma-limit": 3,
                                         "detect_continuum": {"order_deg": 2},
                                         "use_flat": True})
    assert (p.order_sample_count, p.slice_length, p.peak_sigma_limit, p.order_deg) == (
        50, 40, 3.0, 2)
    assert p.disp_axis_deg == 4 and p.slice_width == 5  # defaults kept
    assert OT.TraceParameters() == OT.TraceParameters.from_mapping({})
    nir = OT.TraceParameters.for_arm("soxs_nir")
    assert (nir.slice_length, nir.order_deg, nir.poly_clipping_iteration_limit) == (50, 4, 10)
    for bad in ({"order_sample_count": 2.5}, {"slice-width": 0}, {"order_deg": 10},
                {"peak_sigma_limit": "x"}, {"peak_sigma_limit": float("nan")}):
        with pytest.raises(ValueError):
            OT.TraceParameters.from_mapping(bad)


#: Where the object cannot be detected (an order's faint ends, a whole faint order) the
#: trace must still stay on the object within this many binned px (half the smallest
#: extraction aperture of the seed, 15 px): it follows the order, it does not run away.
RUNAWAY_LIMIT = 7.5


@pytest.mark.parametrize("name", ["soxs_vis", "xsh_vis"])
def test_faint_trace_does_not_run_away(frames, name):
    f = frames(name, "faint")
    for n in f.trace.table.orders:
        ib, centre_b, _ = f.truth(int(n))
        fit = OT.trace_centre_binned(f.trace.table, int(n), ib, f.binx, f.biny)
        worst = float(np.max(np.abs(fit - centre_b)))
        assert worst < RUNAWAY_LIMIT, f"{name} order {n}: trace {worst:.1f} px off the object"
