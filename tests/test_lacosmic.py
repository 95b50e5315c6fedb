"""L.A.Cosmic on row bands in threads (soxs_stare's single-frame cosmic-ray flagging).

The frame has known cosmic-ray hits on smooth orders, sky and read noise: the banded mask
must be exactly the mask of one call on the whole frame, and it must find the hits.
"""

from __future__ import annotations

import numpy as np
import pytest

from soxs_core.extraction.stare import LACOSMIC_BAND_PAD, lacosmic_mask

READ_NOISE = 4.0


def frame_with_hits(rows: int = 1100, cols: int = 500, seed: int = 5):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    light = 40.0 + np.zeros((rows, cols))
    for centre in (80, 190, 300, 410):  # orders: 14 px wide ridges along the rows
        light += 3000.0 * np.exp(-0.5 * ((x - centre - 0.02 * y) / 6.0) ** 2)
    data = rng.poisson(light).astype(np.float64) + rng.normal(0, READ_NOISE, light.shape)
    hits = np.zeros((rows, cols), bool)
    for _ in range(120):
        r, c = rng.integers(2, rows - 3), rng.integers(2, cols - 3)
        length = rng.integers(1, 4)
        hits[r:r + length, c] = True
    # some hits straddle the bands' boundary
    hits[rows // 2 - 1:rows // 2 + 1, 123] = True
    data[hits] += rng.uniform(800, 5000, hits.sum())
    return data.astype(np.float32), hits


@pytest.fixture(scope="module")
def frame():
    return frame_with_hits()


def test_banded_mask_is_the_whole_frames(frame):
    data, _ = frame
    assert data.shape[0] // (8 * LACOSMIC_BAND_PAD) >= 2  # the frame is split
    inmask = np.zeros(data.shape, bool)
    inmask[300:305, 40:45] = True
    whole = lacosmic_mask(data, inmask, READ_NOISE, 5.0, threads=1)
    banded = lacosmic_mask(data, inmask, READ_NOISE, 5.0, threads=2)
    assert whole.any()
    np.testing.assert_array_equal(banded, whole)


def test_hits_are_found_and_little_else(frame):
    data, hits = frame
    mask = lacosmic_mask(data, np.zeros(data.shape, bool), READ_NOISE, 5.0, threads=2)
    assert np.count_nonzero(mask & hits) >= 0.95 * np.count_nonzero(hits)
    # L.A.Cosmic grows each hit by a pixel or so: what is left beyond that is noise
    near = np.zeros_like(hits)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= np.roll(np.roll(hits, dr, axis=0), dc, axis=1)
    assert np.count_nonzero(mask & ~near) <= 1e-4 * mask.size
