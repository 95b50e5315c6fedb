"""The ``_skyfit`` kernels against their numpy twins in soxs_core.extraction.sky.

The sky fit calls these loops a dozen times per order on a few hundred thousand pixels; the
twins are the readable definition.  ``design``, ``evaluate``, ``band_variance`` and
``banded_inverse_band`` do the twins' arithmetic in the twins' order and must be equal bit
for bit; ``banded_normal`` sums each element in another order and must be equal to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import cholesky_banded

from soxs_core import _skyfit
from soxs_core.extraction import sky as S


def _knots(rng: np.random.Generator, degree: int, n_breaks: int, repeat: bool) -> np.ndarray:
    breaks = np.sort(rng.uniform(500.0, 600.0, n_breaks))
    if repeat:           # a repeated interior breakpoint: the 0/0 terms of the recursion
        breaks[n_breaks // 2] = breaks[n_breaks // 2 + 1]
    return S._full_knots(np.concatenate([[500.0], breaks, [600.0]]), degree)


def _points(rng: np.random.Generator, knots: np.ndarray, n: int) -> np.ndarray:
    x = rng.uniform(500.0, 600.0, n)
    x[:5] = [500.0, 600.0, knots[len(knots) // 2], 500.0 + 1e-12, 600.0 - 1e-12]
    return x


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
@pytest.mark.parametrize("repeat", [False, True])
def test_design_and_evaluate_equal_their_twins_bit_for_bit(degree: int, repeat: bool) -> None:
    rng = np.random.default_rng(degree * 10 + repeat)
    knots = _knots(rng, degree, 40, repeat)
    x = _points(rng, knots, 5000)
    want_v, want_f = S.design_reference(knots, degree, x)
    got_v, got_f = S._design(knots, degree, x)
    np.testing.assert_array_equal(got_f, want_f)
    np.testing.assert_array_equal(got_v, want_v)
    coef = rng.normal(size=knots.size - degree - 1)
    np.testing.assert_array_equal(S._evaluate(got_v, got_f, coef),
                                  S.evaluate_reference(want_v, want_f, coef))


@pytest.mark.parametrize("degree", [1, 3])
@pytest.mark.parametrize("scaled", [False, True])
def test_banded_normal_equals_its_twin(degree: int, scaled: bool) -> None:
    rng = np.random.default_rng(3 + degree + 7 * scaled)
    knots = _knots(rng, degree, 60, False)
    x = _points(rng, knots, 20000)
    values, first = S.design_reference(knots, degree, x)
    weight = rng.uniform(0.1, 2.0, x.size)
    target = rng.normal(100.0, 10.0, x.size)
    scale = rng.uniform(0.9, 1.1, x.size) if scaled else None
    n_coef = knots.size - degree - 1
    want_ab, want_rhs = S.banded_normal_reference(values, first, weight, target, n_coef, scale)
    got_ab, got_rhs = S._banded_normal(values, first, weight, target, n_coef, scale)
    np.testing.assert_allclose(got_ab, want_ab, rtol=1e-12, atol=1e-12 * want_ab.max())
    np.testing.assert_allclose(got_rhs, want_rhs, rtol=1e-12, atol=1e-12 * np.abs(want_rhs).max())


@pytest.mark.parametrize("degree", [1, 3, 5])
def test_band_inverse_and_variance_equal_their_twins_bit_for_bit(degree: int) -> None:
    rng = np.random.default_rng(11 + degree)
    knots = _knots(rng, degree, 50, False)
    x = _points(rng, knots, 8000)
    values, first = S.design_reference(knots, degree, x)
    n_coef = knots.size - degree - 1
    ab, _ = S.banded_normal_reference(values, first, rng.uniform(0.5, 1.5, x.size),
                                      np.ones(x.size), n_coef)
    S._add_penalty(ab, 1e-7 * float(np.median(ab[0])))
    chol = cholesky_banded(ab, lower=True)
    want = S.banded_inverse_band_reference(chol)
    got = S._banded_inverse_band(chol)
    np.testing.assert_array_equal(got, want)
    # and the band is the band of the dense inverse (the twin's own check)
    dense = np.zeros((n_coef, n_coef))
    for d in range(degree + 1):
        idx = np.arange(n_coef - d)
        dense[idx + d, idx] = dense[idx, idx + d] = ab[d, : n_coef - d]
    inv = np.linalg.inv(dense)
    for d in range(degree + 1):
        np.testing.assert_allclose(got[d, : n_coef - d], np.diagonal(inv, -d), rtol=1e-8,
                                   atol=1e-10 * np.abs(inv).max())
    np.testing.assert_array_equal(S._band_variance(values, first, got),
                                  S.band_variance_reference(values, first, want))


def test_kernels_refuse_mismatched_shapes() -> None:
    knots = S._full_knots(np.linspace(0.0, 1.0, 5), 3)
    with pytest.raises(ValueError, match="shapes"):
        _skyfit.design(knots, 3, np.zeros(10), np.empty((9, 4)), np.empty(10, np.intp))
