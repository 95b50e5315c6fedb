"""The readout pattern (soxs_core.echelle.background.fit_readout_pattern) against a known one.

A frame of curved orders (bright, masked as in-order) on a faint residual (a slow trend: what
a scattered-light model leaves), with an offset per column that is the same down the whole
column (the simulator's readout pattern: a sinusoid of 9.3 px period and 2 e- rms) and read
noise.  The offsets found must equal the true ones within their quoted errors, and a frame
without a pattern must be left alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from soxs_core.echelle.background import fit_readout_pattern

NY, NX, RON = 900, 700, 7.0


def _frame(amplitude: float, seed: int = 3, along: str = "x"):
    """Orders along x (one offset per column: ``along="x"``), or the same frame transposed
    (orders along y, one offset per row)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:NY, 0:NX]
    in_order = np.zeros((NY, NX), bool)
    light = np.zeros((NY, NX))
    for c in 60 + 110 * np.arange(8):
        trace = c + 20 * ((x - NX / 2) / NX) ** 2
        in_order |= np.abs(y - trace) < 30
        light += 5000 * np.exp(-0.5 * ((y - trace) / 6) ** 2)
    pattern = amplitude * np.sin(2 * np.pi * np.arange(NX) / 9.3 + 0.7)
    # what the scattered-light model left: a slow trend, not the pattern
    trend = 4.0 * (x / NX - 0.5) + 2.0 * np.cos(np.pi * y / NY)
    data = (light + pattern[None, :] + trend
            + rng.normal(0, 1, (NY, NX)) * np.sqrt(RON**2 + light))
    qual = np.zeros((NY, NX), np.uint8)
    qual[rng.random((NY, NX)) < 0.01] = 1
    data[qual == 1] += 1e4                       # flagged pixels must not count
    if along == "y":
        return data.T, qual.T, ~in_order.T, pattern
    return data, qual, ~in_order, pattern


@pytest.mark.parametrize("along", ["x", "y"])
def test_pattern_recovered_within_its_errors(along):
    data, qual, off, truth = _frame(2.0 * np.sqrt(2), along=along)
    found = fit_readout_pattern(data, qual, off, along)
    assert found is not None
    offset, error = found
    pull = (offset - truth) / error
    assert 0.8 < np.std(pull) < 1.25, np.std(pull)
    assert np.sqrt(np.mean((offset - truth) ** 2)) < 0.3 * np.std(truth)


def test_no_pattern_no_correction():
    data, qual, off, _ = _frame(0.0)
    assert fit_readout_pattern(data, qual, off, "x") is None
