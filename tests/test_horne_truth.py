"""Horne extraction of simulator orders (every arm) against the simulator's truth.

The instrument simulator renders a stare frame's expected object and sky electrons (Moffat
seeing profile clipped by the slit, drifting along the slit, curved and tilted orders,
X-shooter and SOXS formats, SOXS NIR dispersed along x).  Poisson and read noise are added
here and the sky is subtracted perfectly (its photon noise stays), so that the extraction
alone is measured.  With ``flat=True`` the frame is also divided by the true pixel response
(low-response pixels masked): the object's photon variance is then ``model / response``,
what ``poisson_scale_t`` says.  The truth of a row is the object's light inside the
aperture; the simulator's ``counts`` (the whole slit) are compared too, for the aperture's
loss.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from soxs_core.detector.quality import Qual
from soxs_core.extraction import horne
from soxs_core.simulate.instrument import InstrumentSimulator, SceneParameters

READ_NOISE = 3.5

#: (arm, binning, orders, object AB mag, flat-fielded); a few orders each, to stay fast.
CASES = [
    ("xsh_uvb", "1x2", (14, 21), 17.0, False),
    ("xsh_vis", "1x1", (17, 28), 17.5, True),
    ("xsh_nir", "1x1", (13, 24), 16.0, False),
    ("soxs_vis", "1x1", (2,), 17.0, False),
    ("soxs_nir", "1x1", (12, 22), 16.0, True),
]


@functools.lru_cache(maxsize=len(CASES))
def order_data(arm: str, binning: str, orders: tuple[int, ...], mag: float, flat: bool):
    sim = InstrumentSimulator(arm, binning, seed=21, orders=list(orders),
                              scene=SceneParameters(object_mag=mag))
    res = sim.science_model("OBJECT", 600.0)
    obj, sky = res.images["object"].astype(np.float64), res.images["sky"].astype(np.float64)
    rng = np.random.default_rng(22)
    qual = np.zeros(obj.shape, np.uint8)
    if flat:
        resp = sim.detector.truth.sensitivity.astype(np.float64)
        qual[resp < 0.5] = Qual.COLD
        resp = np.where(resp < 0.5, 1.0, resp)
    else:
        resp = np.ones(obj.shape)
    raw = rng.poisson(resp * (obj + sky)) + rng.normal(0.0, READ_NOISE, obj.shape)
    data = raw / resp - sky
    base = (READ_NOISE ** 2 + resp * sky) / resp ** 2
    view = (lambda x: x) if sim.format.dispersion_axis == "y" else (lambda x: x.T)
    ba = sim.detector.binx if sim.format.dispersion_axis == "y" else sim.detector.biny
    slit = (20.0 if arm.startswith("xsh") else 15.0) / ba
    out = {}
    for order, row in res.rows["object"].items():
        rows = row["pixel"]
        centre = (row["centre"] - 0.5 * (ba - 1)) / ba           # unbinned -> binned
        ex = horne.extract_order(view(data), view(base), view(1.0 / resp), view(qual),
                                 view(sky), centre, rows, slit)
        first, _, a = horne.aperture_window(centre, slit)
        o, _ = horne._gather(view(obj), rows, first, a.shape[1])
        out[order] = (ex, (a * o).sum(axis=1), row["counts"])
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_simulated_orders_against_truth(case):
    for order, (ex, truth, counts) in order_data(*case).items():
        good = (ex.qual == 0) & (truth > 0)
        # every row whose aperture is on the frame is extracted
        assert good.mean() > 0.99, (order, good.mean())
        g = good
        ratio = np.median(ex.flux_optimal[g] / truth[g])
        snr = float(np.median(ex.snr[g]))
        stat = np.sqrt(ex.var_optimal[g].sum()) / truth[g].sum()
        total = ex.flux_optimal[g].sum() / truth[g].sum()
        # median per-row ratio within 1 % (its own noise ~1.25 / (snr sqrt(n)) is far below)
        assert abs(ratio - 1) < 0.01, (order, ratio, snr)
        assert abs(total - 1) < 4 * stat + 0.003, (order, total, stat)
        for value, var in ((ex.flux_optimal, ex.var_optimal),
                           (ex.flux_boxcar, ex.var_boxcar)):
            pull = ((value - truth) / np.sqrt(var))[g]
            assert 0.9 < pull.std() < 1.1, (order, pull.std())
            assert abs(pull.mean()) < 0.15, (order, pull.mean())
        # the aperture holds nearly all the object's light (the simulator's whole-slit
        # counts), so the optimal flux is within ~1 % of those too
        loss = 1 - np.median(truth[g] / counts[g])
        assert 0 <= loss < 0.012, (order, loss)
        assert abs(np.median(ex.flux_optimal[g] / counts[g]) - (1 - loss)) < 0.01
        # the optimal extraction gains over the boxcar (never loses)
        gain = np.std((ex.flux_boxcar - truth)[g]) / np.std((ex.flux_optimal - truth)[g])
        assert gain > 0.97, (order, gain)
