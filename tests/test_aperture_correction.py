"""The aperture correction against a known profile: a Moffat object on a flat residual level."""

import numpy as np
import pytest

from soxs_core.extraction.horne import aperture_correction


def _moffat_fraction(x0, x1, alpha, beta, n=4001):
    x = np.linspace(x0, x1, n)
    return x, (1 + (x / alpha) ** 2) ** (-beta)


def _moffat_interval(alpha, beta, half_range, n):
    """``frac(lo, hi)``: a Moffat's share between ``lo`` and ``hi``, normalised over
    +-``half_range`` (a numerical CDF on ``n`` points)."""
    fine, prof = _moffat_fraction(-half_range, half_range, alpha, beta, n)
    cdf = np.cumsum(prof)
    cdf /= cdf[-1]

    def frac(lo, hi):
        return np.interp(hi, fine, cdf) - np.interp(lo, fine, cdf)
    return frac


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_correction_is_the_true_wing_fraction(level):
    rng = np.random.default_rng(3)
    n_rows, n_cols, centre0 = 3000, 80, 40.3
    alpha, beta, total = 3.0, 2.5, 2000.0
    cols = np.arange(n_cols)
    # pixel-integrated Moffat, normalised over a very wide range
    frac = _moffat_interval(alpha, beta, 400, 400001)

    pix = frac(cols - 0.5 - centre0, cols + 0.5 - centre0)
    truth = total * pix[None, :] * np.ones((n_rows, 1))
    var = truth + 9.0
    data = truth + level + rng.normal(0, 1, truth.shape) * np.sqrt(var)
    slit_length = 12.0
    half = slit_length / 2
    rows = np.arange(n_rows)
    centre = np.full(n_rows, centre0)
    corr, err = aperture_correction(data, var, None, centre, rows, slit_length,
                                    np.full(n_rows, 2.0), np.full(n_rows, 77.0))
    # the truth: light within 3 half-apertures over the light in the aperture
    want = frac(-3 * half, 3 * half) / frac(-half, half)
    assert want > 1.01  # the wings matter
    assert abs(corr - want) < 3 * err + 1e-3, (corr, want, err)


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_profile_correction_is_the_whole_slit_over_the_aperture(level):
    """The seeing-profile model (Moffat beta 2.5, not the fit's starting 3) on the same
    rows: the correction is all the profile's light over its light in the aperture."""
    from soxs_core.extraction.horne import profile_aperture_correction

    rng = np.random.default_rng(4)
    n_rows, n_cols, centre0 = 3000, 80, 40.3
    alpha, beta, total = 3.0, 2.5, 2000.0
    cols = np.arange(n_cols)
    frac = _moffat_interval(alpha, beta, 4000, 4000001)

    truth = total * frac(cols - 0.5 - centre0, cols + 0.5 - centre0)[None, :] \
        * np.ones((n_rows, 1))
    var = truth + 9.0
    data = truth + level + rng.normal(0, 1, truth.shape) * np.sqrt(var)
    slit_length = 12.0
    rows = np.arange(n_rows)
    corr, err = profile_aperture_correction(data, var, None, np.full(n_rows, centre0), rows,
                                            slit_length, np.full(n_rows, 2.0),
                                            np.full(n_rows, 77.0))
    want = 1.0 / frac(-slit_length / 2, slit_length / 2)
    assert want > 1.01
    assert abs(corr - want) < 3 * err + 1e-3, (corr, want, err)
