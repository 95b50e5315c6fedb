"""The simulator's upstream tables obey the layout of INSTRUMENTS.md §5.2-5.4 and the truth.

ORDER_TAB (with and without edges), DISP_TAB and DISP_IMAGE are read back with the layout rules
alone (column names, i-major coefficient order, degrees <= 9, one-row HDU1, per-order HDU2,
mirrored cross-order extent, NaN for unused DISP_TAB coefficients, three DISP_IMAGE extensions,
keywords), and their polynomials are evaluated against the simulator's exact format
(:class:`EchelleFormat`).  When soxspipe 0.17.4 is installed in /tmp/spvenv its own order-table
reader reads our table too (in a subprocess).
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.simulate import InstrumentSimulator
from soxs_core.simulate.tables import evaluate_disp_row, sample_format, write

ARMS = ["xsh_uvb", "xsh_vis", "xsh_nir", "soxs_vis", "soxs_nir"]
SPVENV = Path("/tmp/spvenv/bin/python")
TIME_KEYS = ("MJD-OBS", "DATE-OBS", "EXPTIME")


@pytest.fixture(scope="module")
def sims():
    return {code: InstrumentSimulator(code, seed=5) for code in ARMS}


def _axes(fmt):
    """(along, across) axis names of the ORDER_TAB columns."""
    return ("y", "x") if fmt.dispersion_axis == "y" else ("x", "y")


def _coefficients(row, names, prefix: str, deg_i: int, deg_j: int) -> np.ndarray:
    """The ``prefix{i}{j}`` coefficients of a one-row table, checking their names and order."""
    expected = [f"{prefix}{i}{j}" for i in range(deg_i + 1) for j in range(deg_j + 1)]
    found = [n for n in names if re.fullmatch(re.escape(prefix) + r"\d\d", n)]
    assert found == expected, f"{prefix}: columns not i-major {found[:4]}..."
    return np.array([row[n] for n in expected], float).reshape(deg_i + 1, deg_j + 1)


def _poly(coef: np.ndarray, order, b) -> np.ndarray:
    """``A = sum c_ij n^i B^j`` in plain monomials, as the layout defines it."""
    order, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
    out = np.zeros(order.shape)
    for i in range(coef.shape[0]):
        for j in range(coef.shape[1]):
            out += coef[i, j] * order**i * b**j
    return out


def _check_product_header(hdr, arm, catg: str, tech: str, when: tuple[float, float]):
    for key in TIME_KEYS:
        assert key in hdr, f"{catg}: no {key}"
    assert hdr["MJD-OBS"] == pytest.approx(when[0], abs=1e-7)
    assert hdr["EXPTIME"] == pytest.approx(when[1])
    assert hdr["DATE-OBS"].startswith("20")
    assert hdr["INSTRUME"] == arm.instrument and hdr["ESO SEQ ARM"] == arm.name
    assert hdr["ESO PRO CATG"] == f"{catg}_{arm.name}"
    assert hdr["ESO PRO TYPE"] == "REDUCED" and hdr["ESO PRO TECH"] == tech


@pytest.mark.parametrize("code", ARMS)
@pytest.mark.parametrize("edges", [False, True])
def test_order_table_layout_and_truth(sims, code, edges):
    sim = sims[code]
    fmt = sim.format
    hdul = sim.order_table(edges=edges)
    along, across = _axes(fmt)
    assert len(hdul) == 3 and hdul[0].data is None
    _check_product_header(hdul[0].header, sim.arm, "ORDER_TAB", "ECHELLE,SLIT",
                          sim.table_time())
    coeffs = hdul[1].data
    names = coeffs.columns.names
    assert len(coeffs) == 1, "HDU1 is one row of global coefficients"
    row = coeffs[0]
    assert f"deg{across}_cent" not in names and f"deg{along}_cent" in names
    dn, db = int(row["degorder_cent"]), int(row[f"deg{along}_cent"])
    assert 0 < dn <= 9 and 0 < db <= 9
    cent = _coefficients(row, names, "cent_", dn, db)
    # the std set is evaluated with the centre's degrees: written with them, constant sigma
    assert (int(row["degorder_std"]), int(row[f"deg{along}_std"])) == (dn, db)
    std = _coefficients(row, names, "std_", dn, db)
    assert std[0, 0] > 0 and np.all(std.ravel()[1:] == 0)

    orders = hdul[2].data
    expected = ["order", f"{along}min", f"{along}max", f"{across}min", f"{across}max"]
    if edges:
        expected += ["minThreshold", "maxThreshold"]
    assert orders.columns.names == expected
    on_detector = [int(n) for n in fmt.orders if np.isfinite(fmt.geometry(n).b_min)]
    assert orders["order"].tolist() == on_detector, "one HDU2 row per order on the detector"

    worst = 0.0
    for n, bmin, bmax, amin, amax in zip(*(orders[c] for c in expected[:5])):
        g = fmt.geometry(n)
        assert (bmin, bmax) == (int(g.b_min), int(g.b_max))
        b = np.arange(bmin, bmax + 1, dtype=float)
        truth = fmt.centre(n, b)
        worst = max(worst, float(np.max(np.abs(_poly(cent, n, b) - truth))))
        # cross-order extent stored mirrored: frame width - value
        assert amin == round(fmt.n_across - truth.min())
        assert amax == round(fmt.n_across - truth.max())
        if edges:
            lo_t, up_t = fmt.edges(n, b)
            for name, t in (("edgelow", lo_t), ("edgeup", up_t)):
                di = int(row[f"degorder_{name}"])
                dj = int(row[f"deg{along}_{name}"])
                assert di <= 9 and dj <= 9
                c = _coefficients(row, names, f"{name}_c", di, dj)
                worst = max(worst, float(np.max(np.abs(_poly(c, n, b) - t))))
    # monomials of B^5 at B ~ 4000 lose digits: well below a thousandth of a pixel is exact
    assert worst < 1e-3, f"table polynomial {worst:.2g} px off the truth"
    if not edges:
        assert not any(n.startswith("edge") for n in names)


@pytest.mark.parametrize("code,orders", [("xsh_vis", [20, 21, 22]), ("soxs_nir", [14, 15, 16])])
def test_disp_table_layout_and_truth(code, orders):
    sim = InstrumentSimulator(code, seed=5, orders=orders)
    hdul = sim.disp_table()
    assert len(hdul) == 2
    _check_product_header(hdul[0].header, sim.arm, "DISP_TAB", "ECHELLE,MULTI-PINHOLE",
                          sim.table_time())
    tab = hdul[1].data
    names = tab.columns.names
    assert names[:4] == ["axis", "order_deg", "wavelength_deg", "slit_deg"]
    coef_names = names[4:]
    assert coef_names == sorted(coef_names) and all(re.fullmatch(r"c\d\d\d", n)
                                                     for n in coef_names)
    assert [a.strip() for a in tab["axis"]] == ["x", "y"]
    smp = sample_format(sim.format, orders=orders)
    degrees = set()
    for r, axis in enumerate(("x", "y")):
        di, dj, dk = (int(tab[r][k]) for k in ("order_deg", "wavelength_deg", "slit_deg"))
        assert max(di, dj, dk) <= 9 and dk > 0        # multi-pinhole: slit terms
        degrees.add((di, dj, dk))
        used = {f"c{i}{j}{k}" for i in range(di + 1) for j in range(dj + 1)
                for k in range(dk + 1)}
        assert used <= set(coef_names)
        for name in coef_names:   # unused coefficients NaN, used ones finite
            assert np.isfinite(tab[r][name]) == (name in used), (axis, name)
        row = {n: float(tab[r][n]) for n in coef_names}
        resid = evaluate_disp_row(row, smp["order"], smp["wavelength"], smp["slit"]) - smp[axis]
        assert np.sqrt(np.mean(resid**2)) < 0.05, f"{axis} rms {np.std(resid):.3f} px"
    assert len(degrees) == 2, "the rows' degrees differ, so one row carries NaN"


@pytest.mark.parametrize("code,orders", [("xsh_uvb", [18, 19]), ("soxs_nir", [12, 13])])
def test_disp_image_layout_and_truth(code, orders):
    sim = InstrumentSimulator(code, "1x2" if code == "xsh_uvb" else "1x1", seed=5,
                              orders=orders)
    fmt = sim.format
    hdul = sim.disp_image()
    assert [h.name for h in hdul] == ["WAVELENGTH", "SLIT", "ORDER"]
    hdr = hdul[0].header
    _check_product_header(hdr, sim.arm, "DISP_IMAGE", "ECHELLE,MULTI-PINHOLE",
                          sim.table_time())
    assert "SXSPRE" in hdr, "soxspipe knows a prepared frame by SXSPRE"
    wave, slit, order = (h.data for h in hdul)
    for img in (wave, slit, order):
        # always the unbinned trimmed science region, whatever the frames' binning
        assert img.dtype == np.float32 and img.shape == sim.arm.prepared_shape()
    inside = np.isfinite(order)
    assert np.array_equal(inside, np.isfinite(wave)) and np.array_equal(inside, np.isfinite(slit))
    assert set(np.unique(order[inside]).astype(int)) == set(orders)
    # NaN outside the orders: the finite pixels cover the slit images' area
    area = 0.0
    for n in orders:
        g = fmt.geometry(n)
        b = np.arange(g.b_min, g.b_max + 1)
        lo, up = fmt.edges(n, b)
        area += float(np.sum(np.clip(up, -0.5, fmt.n_across - 0.5)
                             - np.clip(lo, -0.5, fmt.n_across - 0.5)))
    assert inside.sum() == pytest.approx(area, rel=0.01)
    rng = np.random.default_rng(0)
    r, c = np.nonzero(inside)
    pick = rng.choice(r.size, 500, replace=False)
    r, c = r[pick], c[pick]
    for n in orders:
        m = order[r, c] == n
        a, b = (c[m], r[m]) if fmt.dispersion_axis == "y" else (r[m], c[m])
        s, wl = fmt.pixel_to_world(n, a, b)
        assert np.max(np.abs(slit[r[m], c[m]] - s)) < 1e-4
        assert np.max(np.abs(wave[r[m], c[m]] - wl) / wl) < 1e-6
        assert np.all(np.abs(s) <= 0.5 * fmt.slit_length)


_READER = textwrap.dedent("""
    import json, logging, sys
    import numpy as np
    from soxspipe.commonutils.toolkit import unpack_order_table
    log = logging.getLogger("t")
    result = []
    for path in sys.argv[1:]:
        poly, pix, meta = unpack_order_table(log=log, orderTablePath=path, pixelDelta=25)
        out = {c: np.asarray(pix[c], float).tolist() for c in pix.columns}
        out["meta_order"] = meta["order"].tolist()
        result.append(out)
    print(json.dumps(result))
""")


@pytest.mark.skipif(not SPVENV.exists(), reason="soxspipe 0.17.4 not installed in /tmp/spvenv")
def test_soxspipe_reads_our_order_table(sims, tmp_path):
    codes = ["xsh_vis", "soxs_nir"]      # both dispersion axes
    paths = [str(write(sims[c].order_table(edges=True), tmp_path / f"ORDER_TAB_{c}.fits"))
             for c in codes]
    done = subprocess.run([str(SPVENV), "-c", _READER, *paths], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for code, path, got in zip(codes, paths, results):
        _check_soxspipe_reading(sims[code].format, path, got)


def _check_soxspipe_reading(fmt, path, got):
    along, across = _axes(fmt)
    b = np.array(got[f"{along}coord"])
    n = np.array(got["order"])
    assert sorted(set(n.astype(int))) == got["meta_order"]
    assert np.max(np.abs(np.array(got[f"{across}coord_centre"]) - fmt.centre(n, b))) < 1e-3
    lo, up = fmt.edges(n, b)
    assert np.max(np.abs(np.array(got[f"{across}coord_edgelow"]) - lo)) < 1e-3
    assert np.max(np.abs(np.array(got[f"{across}coord_edgeup"]) - up)) < 1e-3
    # soxspipe evaluates std with the centre's degrees: a constant sigma everywhere
    std = np.array(got["std"])
    assert np.allclose(std, fits.getdata(path, 1)["std_00"][0])
