"""Real detector frames nobody here made: five Keck/HIRES biases (shared/real_data).

They are not ESO frames, so the test maps each chip onto the pipeline's frame model itself
(data section, ADU, read-noise errors) and exercises the stacking kernel and QC statistics on
real noise, real cosmic rays and real structure.  The instrument code knows nothing of Keck.
"""

import numpy as np
import pytest
from astropy.io import fits

from shared_data import require_shared
from soxs_core.combine.qc import (
    block_mean,
    periodic_pattern_metric,
    read_noise_from_pair,
    robust_std,
)
from soxs_core.combine.stacking import ClipSettings, clip_and_stack_arrays

DATA = require_shared("real_data/keck_hires_bias", module_level=True)
FILES = sorted(DATA.glob("hires*.fits.gz"))
if len(FILES) != 5:  # present but incomplete is an error anywhere
    pytest.fail(f"{DATA}: {len(FILES)} hires*.fits.gz files, expected 5", pytrace=False)


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["chip1", "chip2", "chip3"])
def chip(request):
    """(frames in ADU over the data section, overscan blocks) of one mosaic chip."""
    frames, overscans = [], []
    for path in FILES:
        with fits.open(path) as hdul:
            data = hdul[request.param].data.astype(np.float32)
        frames.append(data[:, 6:1030])         # DATASEC [7:1030,1:2048]
        overscans.append(data[50:2000, 1036:1066])
    return np.array(frames), np.array(overscans)


def test_read_noise_from_frame_pairs_agrees_with_the_overscan(chip):
    frames, overscans = chip
    pair = np.mean([read_noise_from_pair(frames[k], frames[k + 1]) for k in range(4)])
    # the overscan holds read noise only; subtract each row's level (row-correlated offsets)
    over = overscans - np.median(overscans, axis=2, keepdims=True)
    assert pair == pytest.approx(robust_std(over), rel=0.1)
    assert 1.0 < pair < 2.0  # HIRES: about 1.4 ADU


def test_master_errors_are_calibrated_on_real_noise(chip):
    frames, _ = chip
    ron = np.mean([read_noise_from_pair(frames[k], frames[k + 1]) for k in range(4)])
    errors = np.full(frames.shape, ron, np.float32)
    qual = np.zeros(frames.shape, np.uint8)
    settings = ClipSettings(5.0, 5.0, 3)
    # two independent masters of the same bias: their difference is pure noise
    a = clip_and_stack_arrays(frames[:3], errors[:3], qual[:3], settings)
    b = clip_and_stack_arrays(frames[3:], errors[3:], qual[3:], settings)
    pull = (a.value - b.value) / np.hypot(a.error, b.error)
    core = np.abs(pull) < 10  # leave the rare unclipped defect out of the width
    assert abs(np.median(pull)) < 0.15  # the bias level barely drifts between frames
    assert robust_std(pull[core]) == pytest.approx(1.0, abs=0.1)


def test_cosmic_rays_are_rejected_and_real_structure_kept(chip):
    frames, _ = chip
    ron = np.mean([read_noise_from_pair(frames[k], frames[k + 1]) for k in range(4)])
    errors = np.full(frames.shape, ron, np.float32)
    master = clip_and_stack_arrays(frames, errors, np.zeros(frames.shape, np.uint8),
                                   ClipSettings(5.0, 5.0, 3))
    median = np.median(frames, axis=0)
    hits = (frames - median > 20 * ron).any(axis=0)   # cosmic-ray pixels in one frame
    assert hits.sum() > 20
    assert np.all(master.count[hits] < 5)                # the hit was left out ...
    assert np.all(np.abs(master.value - median)[hits] < 3 * ron)  # ... and no trace is left
    # the faint column structure of the real bias is there in independent frames, and the
    # clipping keeps it: the master's column profile is that of the plain mean (column
    # medians, so that the plain mean's cosmic rays do not count)
    def profile(image):
        return np.median(image, axis=0)

    assert np.corrcoef(profile(frames[:2].mean(axis=0)),
                       profile(frames[2:].mean(axis=0)))[0, 1] > 0.3
    assert np.corrcoef(profile(master.value), profile(frames.mean(axis=0)))[0, 1] > 0.99



def test_pattern_noise_metric_on_real_noise(chip):
    frames, _ = chip
    reference = block_mean(np.median(frames, axis=0), 5)
    # the real frames have structure and cosmic rays but no periodic pattern: white-noise level
    values = [periodic_pattern_metric(block_mean(f, 5), reference) for f in frames]
    assert max(values) < 2.0
    # a pick-up sinusoid as strong as the read noise, injected into one real frame, stands out
    ron = read_noise_from_pair(frames[0], frames[1])
    x = np.arange(frames.shape[2])
    injected = frames[0] + ron * np.sin(2 * np.pi * x / 13.7)[None, :]
    assert periodic_pattern_metric(block_mean(injected, 5), reference) > 3.0
