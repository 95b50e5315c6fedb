"""``soxs-trace`` on real lab-echelle flats (shared/real_data/echelle_lab) and its refusals.

No truth is known for these frames: the orders are counted here from cuts through the frame by
a method of this test's own, and the traced edges are checked against the light itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage, signal

from shared_data import require_shared
from soxs_core.echelle.ordertable import read_order_table

DATA = require_shared("real_data/echelle_lab", module_level=True)
FLATS = [DATA / f"sphere_CMOS_{i}.fits.gz" for i in range(3)]
BKGS = [DATA / f"sphere_CMOS_bkg_{i}.fits.gz" for i in range(3)]
#: cuts across the orders (columns; the dispersion runs along x)
CUTS = (500, 1280, 2000)


def run_trace(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soxs_core.echelle.trace_cli",
                           *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray]:
    """The lamp-on and lamp-off frames, stacked (float32)."""
    on = np.array([fits.getdata(p) for p in FLATS], np.float32)
    off = np.array([fits.getdata(p) for p in BKGS], np.float32)
    return on, off


@pytest.fixture(scope="module")
def flat(frames) -> np.ndarray:
    on, off = frames
    return on.mean(axis=0, dtype=np.float64) - off.mean(axis=0, dtype=np.float64)


def cut_noise(frames, x: int) -> np.ndarray:
    """Noise sigma of ``cut(flat, x)`` per row, from the scatter between the three lamp-on
    and the three lamp-off frames (so no structure of the light enters it): the variance of
    a mean of 3 each, times the 1.2533 / sqrt(11) of an 11-column median, smoothed over 15
    rows."""
    on, off = frames
    cols = slice(x - 5, x + 6)
    var = (on[:, :, cols].var(axis=0, ddof=1).mean(axis=1)
           + off[:, :, cols].var(axis=0, ddof=1).mean(axis=1)) / 3.0
    return ndimage.median_filter(np.sqrt(var), 15) * 1.2533 / np.sqrt(11)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    table, plot = out / "TRACE_TAB.fits", out / "TRACE.pdf"
    res = run_trace(*FLATS, "--background", *BKGS, "--output", table, "--plot", plot)
    assert res.returncode == 0, res.stderr
    return read_order_table(table), fits.getheader(table), plot, out


def cut(flat: np.ndarray, x: int) -> np.ndarray:
    return np.median(flat[:, x - 5:x + 6], axis=1)


def eye_count(profile: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Orders a person sees in a cut: bumps of the 7-px smoothed cut at least 20 px apart that
    stand 10 noise sigmas above their surroundings (positions of the maxima)."""
    smooth = ndimage.uniform_filter1d(profile, 7)
    peaks, props = signal.find_peaks(smooth, prominence=0.0, distance=20)
    return peaks[props["prominences"] >= 10 * noise[peaks] / np.sqrt(7)]


def test_every_visible_order_is_found(flat, frames, traced):
    """Each bump seen by eye in three cuts lies between the edges of exactly one traced order,
    each traced order crossing a cut holds exactly one bump (none is a false order), and every
    traced order is seen in some cut.  An order's edges are evaluated at the cut even where it
    lies a little beyond the order's range: the faintest orders' ends are seen by eye (a
    10-sigma bump of an 11-column cut smoothed over 7 px) where 5-column slices cannot
    measure an edge."""
    table, _, _, _ = traced
    seen: set[int] = set()
    for x in CUTS:
        peaks = eye_count(cut(flat, x), cut_noise(frames, x))
        lows = np.array([table.edge_low(float(n), x) for n in table.orders])
        ups = np.array([table.edge_up(float(n), x) for n in table.orders])
        inside = [np.flatnonzero((lows <= p) & (p <= ups)) for p in peaks]
        assert all(k.size == 1 for k in inside), (x, peaks, [k.tolist() for k in inside])
        seen |= {int(table.orders[k[0]]) for k in inside}
        crossing = np.array([table.b_min[table.index(n)] <= x <= table.b_max[table.index(n)]
                             for n in table.orders])
        whole = crossing & (lows > 0) & (ups < flat.shape[0] - 1)
        held = np.array([np.count_nonzero((lo <= peaks) & (peaks <= up))
                         for lo, up in zip(lows, ups)])
        assert np.all(held[whole] == 1), (x, table.orders[whole][held[whole] != 1])
    assert seen == set(table.orders.tolist()), sorted(set(table.orders.tolist()) - seen)
    assert table.orders.size >= 28  # "about 30 orders"
    # numbered 1, 2, ... from the bottom
    assert table.orders.tolist() == list(range(1, table.orders.size + 1))
    cen = [float(table.centre(float(n), 1280)) for n in table.orders
           if table.b_min[table.index(n)] <= 1280 <= table.b_max[table.index(n)]]
    assert np.all(np.diff(cen) > 0)


def half_crossings(profile: np.ndarray, centre: float) -> tuple[float, float]:
    """This test's own edges: where the cut falls half-way from the order's top to the lowest
    point between it and the next order on each side."""
    c = int(round(centre))
    top = np.max(profile[c - 5:c + 6])
    out = []
    for d in (-1, 1):
        k = c
        while 0 < k < profile.size - 1 and profile[k] > 0.5 * top:
            k += d
        lo_i = max(0, min(k, k + 15 * d))
        hi_i = min(profile.size, max(k, k + 15 * d) + 1)
        valley = np.min(profile[lo_i:hi_i]) if hi_i > lo_i else profile[k]
        level = 0.5 * (top + valley)
        k = c
        while 0 < k < profile.size - 1 and profile[k + d] > level:
            k += d
        # linear interpolation between k and k + d
        out.append(k + d * (profile[k] - level) / (profile[k] - profile[k + d]))
    return out[0], out[1]


def test_edges_follow_the_light(flat, frames, traced):
    """The fitted edges lie on the half-level crossings of the light (this test's own, on
    11-column cuts), within their measurement noise: that of the crossing (the cut's noise
    from the frames' scatter over the profile's slope there) and a 0.3 px floor for what a
    global polynomial over 30 orders cannot follow."""
    table, header, _, _ = traced
    contrast, offsets, sigmas = [], [], []
    for n in table.orders:
        b0, b1 = table.along_range(int(n))
        for x in np.linspace(b0 + 30, b1 - 30, 12).astype(int):
            lo, up = float(table.edge_low(float(n), x)), float(table.edge_up(float(n), x))
            if lo < 8 or up > flat.shape[0] - 9:
                continue  # cut by the frame's border
            prof = ndimage.uniform_filter1d(cut(flat, x), 3)
            noise = cut_noise(frames, x) / np.sqrt(3)  # of the 3-px smoothed cut
            centre = prof[int(round(0.5 * (lo + up)))]
            for edge, d in ((lo, -1), (up, 1)):
                inner = prof[int(round(edge - 3 * d))]
                outer = prof[int(round(edge + 3 * d))]
                contrast.append((inner - outer) / max(centre - outer, 1e-9))
            mine = half_crossings(prof, 0.5 * (lo + up))
            for edge, m in zip((lo, up), mine):
                k = int(np.floor(m))
                slope = abs(prof[k + 1] - prof[k])
                offsets.append(edge - m)
                sigmas.append(noise[k] / max(slope, 1e-9))
    contrast, offsets, sigmas = np.array(contrast), np.abs(offsets), np.array(sigmas)
    # 3 px inside an edge holds much more light than 3 px outside it
    assert np.mean(contrast > 0.25) > 0.95, np.percentile(contrast, [1, 5, 50])
    # no offset between the two definitions of the edge: on the bright orders the crossings
    # are measured to a few hundredths of a pixel (the kernel's slit-end edges sat ~1.5 px
    # outside them on these rounded orders, a median of 0.9 px)
    assert np.median(offsets) < 0.2, np.percentile(offsets, [50, 90, 99])
    # and the scatter is the noise: within 0.3 px + 3 sigma (98.5 % measured; the few beyond
    # are the faintest orders' ends, where the fit leans on the brighter samples)
    within = offsets <= 0.3 + 3.0 * sigmas
    assert np.mean(within) > 0.97, np.percentile(offsets / np.hypot(sigmas, 0.1), [50, 90, 99])
    assert header["HIERARCH ESO QC X RES SD"] < 0.2  # the seed page's QC range


def test_plot_written_whole(traced):
    _, _, plot, out = traced
    data = plot.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["not_fits", "no_orders", "missing"])
def test_bad_input_is_one_line(tmp_path, case):
    out = tmp_path / "TAB.fits"
    if case == "not_fits":
        bad = tmp_path / "notes.fits"
        bad.write_text("this is not a FITS file\n")
        expect = ("not a FITS file",)
    elif case == "no_orders":
        bad = BKGS[0]  # a lamp-off (dark) frame given as the flat
        expect = ("no echelle order found", "cannot fit the order edges")
    else:
        bad = tmp_path / "absent.fits.gz"
        expect = ("file not found",)
    res = run_trace(bad, "--output", out, "--plot", tmp_path / "P.pdf")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and str(bad) in lines[0], lines
    assert any(text in lines[0] for text in expect), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == (["notes.fits"]
                                                         if case == "not_fits" else [])


def test_bad_command_line_is_one_line(tmp_path):
    res = run_trace(FLATS[0], "--output", tmp_path / "T.fits", "--min-percent", "120")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--min-percent" in res.stderr
    res = run_trace(FLATS[0], "--output", FLATS[0])
    assert res.returncode == 2 and "is an input" in res.stderr
