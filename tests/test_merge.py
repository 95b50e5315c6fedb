"""Order merging against the simulator's truth: counts conserved, errors calibrated, overlaps
combined without bias, masked rows left out, soxspipe's ASCII layout."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import ascii as astropy_ascii

from soxs_core.errors import InputError
from soxs_core.spectrum.merge import MERGE_STEP_NM, MergedQual, merge_orders, write_merged_ascii
from spectrum_truth import truth_orders_table

VIS_ORDERS = (18, 19, 20)
NIR_ORDERS = (16, 17)


def _edges(table, n):
    s = np.asarray(table["order"]) == n
    w = np.asarray(table["wavelengthMean"])[s]
    p = np.asarray(table["pixelScaleNm"])[s]
    return (w - p / 2).min(), (w + p / 2).max()


@pytest.fixture(scope="module")
def vis_std():
    return truth_orders_table("xsh_vis", "STD_FLUX", 300.0, seed=3, orders=VIS_ORDERS)


@pytest.fixture(scope="module")
def vis_std_exact():
    return truth_orders_table("xsh_vis", "STD_FLUX", 300.0, seed=None, orders=VIS_ORDERS)


def test_grid_step_and_columns(vis_std):
    table, _ = vis_std
    merged = merge_orders(table, "VIS")
    wave = np.asarray(merged["WAVE"])
    assert np.allclose(np.diff(wave), MERGE_STEP_NM["VIS"])
    # bin centres are whole multiples of the step
    assert np.allclose(wave / 0.02, np.round(wave / 0.02), atol=1e-6)
    for col in ("WAVE", "FLUX_COUNTS", "VARIANCE", "SKY_COUNTS", "SNR", "FLUX_DENSITY_COUNTS",
                "ERR_COUNTS", "NORDERS", "QUAL"):
        assert col in merged.colnames
    assert merged["FLUX_COUNTS"].unit == "electron"
    assert "per grid bin" in merged["FLUX_COUNTS"].description
    nir, _ = truth_orders_table("soxs_nir", "STD_FLUX", 300.0, seed=3, orders=NIR_ORDERS)
    assert "xcoord" in nir.colnames
    assert np.allclose(np.diff(merge_orders(nir, "soxs_nir")["WAVE"]), 0.06)


def test_counts_conserved_single_order(vis_std_exact):
    """One order alone: the merged counts over the whole order are its counts (exact), and
    over any range of whole bins the counts of the pixels inside (up to the two split
    pixels at the ends)."""
    table, truth = vis_std_exact
    one = table[np.asarray(table["order"]) == 19]
    merged = merge_orders(one, "VIS")
    # FLUX_COUNTS of the two end bins is the density times the whole bin; they receive the
    # density times the part the order covers
    lo, hi = _edges(one, 19)
    counts = np.asarray(merged["FLUX_COUNTS"])
    wave_m = np.asarray(merged["WAVE"])
    step = 0.02
    first = counts[0] * (wave_m[0] + step / 2 - lo) / step
    last = counts[-1] * (hi - (wave_m[-1] - step / 2)) / step
    total = np.sum(counts[1:-1]) + first + last
    assert total == pytest.approx(np.sum(one["extractedFluxOptimal"]), rel=1e-9)
    wave = np.asarray(one["wavelengthMean"])
    flux = np.asarray(one["extractedFluxOptimal"])
    for lo, hi in ((830.0, 840.0), (850.01, 851.27), (860.0, 875.0)):
        sel = (merged["WAVE"] >= lo + 0.01) & (merged["WAVE"] <= hi - 0.01)
        inside = (wave > lo) & (wave < hi)
        # the two end pixels are split between bins inside and outside the range
        edge = 2 * np.max(flux[inside])
        assert abs(np.sum(merged["FLUX_COUNTS"][sel]) - np.sum(flux[inside])) < edge


def test_density_matches_truth(vis_std_exact):
    """The noise-free merged density of one order is the true count density (counts per nm
    of each pixel) at the grid wavelengths: rebinning keeps the shape."""
    table, _ = vis_std_exact
    one = table[np.asarray(table["order"]) == 19]
    merged = merge_orders(one, "VIS")
    truth_density = np.interp(merged["WAVE"], one["wavelengthMean"],
                              one["extractedFluxOptimal"] / one["pixelScaleNm"])
    good = merged["QUAL"] == 0
    ratio = np.asarray(merged["FLUX_DENSITY_COUNTS"])[good] / truth_density[good]
    assert np.median(np.abs(ratio - 1)) < 0.002
    assert np.percentile(np.abs(ratio - 1), 99) < 0.02


def test_pulls_and_overlap_bias(vis_std, vis_std_exact):
    """Noisy minus noise-free merged counts over the error: std ~1 everywhere and in the
    order overlaps, mean ~0 (the inverse-variance combination is unbiased)."""
    table, _ = vis_std
    exact, _ = vis_std_exact
    m = merge_orders(table, "VIS")
    m0 = merge_orders(exact, "VIS")
    assert np.array_equal(m["WAVE"], m0["WAVE"])
    good = (m["QUAL"] == 0) & (m0["QUAL"] == 0)
    pull = (np.asarray(m["FLUX_COUNTS"]) - m0["FLUX_COUNTS"]) / m["ERR_COUNTS"]
    assert 0.9 < np.std(pull[good]) < 1.1
    overlap = good & (np.asarray(m["NORDERS"]) == 2)
    assert overlap.sum() > 500
    assert 0.9 < np.std(pull[overlap]) < 1.1
    # mean pull of ~1000 correlated bins: a bias of 0.1 sigma would show
    assert abs(np.mean(pull[overlap])) < 0.1


def test_overlap_combination_flat_fielded():
    """Flat-fielded orders agree where they overlap: the combined density equals each
    order's own (noise-free) density, and with noise it is unbiased and better than either
    order alone."""
    exact, _ = truth_orders_table("xsh_vis", "STD_FLUX", 300.0, seed=None, flat="blaze",
                                  orders=VIS_ORDERS)
    noisy, _ = truth_orders_table("xsh_vis", "STD_FLUX", 300.0, seed=5, flat="blaze",
                                  orders=VIS_ORDERS)
    m0 = merge_orders(exact, "VIS")
    m = merge_orders(noisy, "VIS")
    lo19, hi19 = _edges(exact, 19)
    lo18, hi18 = _edges(exact, 18)
    wave = np.asarray(m["WAVE"])
    ovl = (wave > lo18 + 1) & (wave < hi19 - 1) & (m["QUAL"] == 0)
    assert ovl.sum() > 500 and np.all(m["NORDERS"][ovl] == 2)
    singles = []
    for n in (18, 19):
        s = merge_orders(exact[np.asarray(exact["order"]) == n], "VIS")
        sn = merge_orders(noisy[np.asarray(noisy["order"]) == n], "VIS")
        idx = np.searchsorted(s["WAVE"], wave[ovl])
        singles.append((np.asarray(s["FLUX_DENSITY_COUNTS"])[idx],
                        np.asarray(sn["ERR_COUNTS"])[idx]))
    combined = np.asarray(m0["FLUX_DENSITY_COUNTS"])[ovl]
    (d18, _), (d19, _) = singles
    # the orders agree to the blaze's variation across a pixel (~0.5 %); the combination is
    # a weighted mean: between the two
    assert np.median(np.abs(d18 / d19 - 1)) < 0.01
    low, high = np.minimum(d18, d19), np.maximum(d18, d19)
    assert np.mean((combined >= low * (1 - 1e-6)) & (combined <= high * (1 + 1e-6))) > 0.99
    pull = (np.asarray(m["FLUX_COUNTS"])[ovl] - m0["FLUX_COUNTS"][ovl]) / m["ERR_COUNTS"][ovl]
    assert abs(np.mean(pull)) < 0.1 and 0.9 < np.std(pull) < 1.1
    # the combination beats the better order in most bins
    best_single = np.minimum(singles[0][1], singles[1][1])
    assert np.median(np.asarray(m["ERR_COUNTS"])[ovl] / best_single) < 0.95
    # ... and is close to the optimal (inverse-variance) combination of the two
    optimal = 1.0 / np.sqrt(1.0 / singles[0][1] ** 2 + 1.0 / singles[1][1] ** 2)
    assert 0.98 < np.median(np.asarray(m["ERR_COUNTS"])[ovl] / optimal) < 1.03


def _largest_step(merged) -> float:
    """Largest relative change between neighbouring good bins of the merged density."""
    d = np.asarray(merged["FLUX_DENSITY_COUNTS"])
    good = np.asarray(merged["QUAL"]) == 0
    both = good[1:] & good[:-1]
    return float(np.max(np.abs(np.diff(d))[both] / np.minimum(d[1:], d[:-1])[both]))


def test_orders_of_different_throughput_join_smoothly(vis_std_exact):
    """Before flux calibration each order records the star through its own blaze, so two
    orders' counts differ by up to several times where they overlap.  The merged counts
    must still pass continuously from one order to the next (no step where an order's
    faint end begins, no bin-to-bin alternation between the orders' values): the largest
    bin-to-bin change in the overlaps is that of the single orders, within 30 %."""
    table, _ = vis_std_exact
    m = merge_orders(table, "VIS")
    single = max(_largest_step(merge_orders(table[np.asarray(table["order"]) == n], "VIS"))
                 for n in VIS_ORDERS)
    two = np.asarray(m["NORDERS"]) == 2
    assert two.sum() > 500
    # the orders really differ in the overlaps (else the test shows nothing)
    lo19, hi19 = _edges(table, 19)
    lo18, hi18 = _edges(table, 18)
    s18 = merge_orders(table[np.asarray(table["order"]) == 18], "VIS")
    s19 = merge_orders(table[np.asarray(table["order"]) == 19], "VIS")
    w = 0.5 * (lo18 + hi19)
    ratio = (np.interp(w, s18["WAVE"], s18["FLUX_DENSITY_COUNTS"])
             / np.interp(w, s19["WAVE"], s19["FLUX_DENSITY_COUNTS"]))
    assert not 0.8 < ratio < 1.25
    assert _largest_step(m) < 1.3 * single


def test_masked_rows_left_out(vis_std):
    """Rows with qual != 0 (here given absurd values) do not enter the merge; bins they
    alone covered are NO_DATA or PARTIAL."""
    table, _ = vis_std
    bad = table.copy()
    order = np.asarray(bad["order"])
    idx = np.flatnonzero(order == 20)[500:540]
    bad["qual"][idx] = 1
    bad["extractedFluxOptimal"][idx] = 1e9
    m = merge_orders(bad, "VIS")
    ref = merge_orders(table, "VIS")
    assert np.nanmax(m["FLUX_COUNTS"]) < 1e6
    w = np.asarray(bad["wavelengthMean"])[idx]
    gap = (m["WAVE"] > w.min() + 0.05) & (m["WAVE"] < w.max() - 0.05)
    covered_by_19 = (m["NORDERS"][gap] > 0)
    # order 19 still covers these wavelengths: one order less than without the mask
    assert np.all(ref["NORDERS"][gap][covered_by_19] - m["NORDERS"][gap][covered_by_19] == 1)
    only20 = table[order == 20]
    m20 = merge_orders(bad[order == 20], "VIS")
    g20 = (m20["WAVE"] > w.min() + 0.05) & (m20["WAVE"] < w.max() - 0.05)
    assert np.all(m20["QUAL"][g20] & MergedQual.NO_DATA)
    assert np.all(np.isnan(m20["FLUX_COUNTS"][g20]))
    assert len(only20) > 0


def test_ascii_layout(tmp_path, vis_std):
    table, _ = vis_std
    merged = merge_orders(table, "VIS")
    path = write_merged_ascii(tmp_path / "merged.txt", merged)
    first = path.read_text().splitlines()[0].split()
    assert first[:6] == ["WAVE", "FLUX_COUNTS", "VARIANCE", "SKY_COUNTS", "SNR",
                         "FLUX_DENSITY_COUNTS"]
    back = astropy_ascii.read(path, format="basic")
    assert len(back) == len(merged)
    assert np.allclose(back["WAVE"], np.asarray(merged["WAVE"]) * 10.0, atol=0.006)
    good = np.isfinite(merged["FLUX_COUNTS"])
    assert np.allclose(back["FLUX_COUNTS"][good], merged["FLUX_COUNTS"][good], rtol=1e-5)
    assert np.array_equal(back["QUAL"], merged["QUAL"])


def test_bad_input(vis_std):
    table, _ = vis_std
    with pytest.raises(InputError, match="lacks column"):
        merge_orders(table[["order", "wavelengthMean"]], "VIS")
    with pytest.raises(InputError, match="unknown arm"):
        merge_orders(table, "XYZ")
    masked = table.copy()
    masked["qual"][:] = 1
    with pytest.raises(InputError, match="no usable"):
        merge_orders(masked, "VIS")
