"""Derive the simulator's echelle-format model from predicted multi-pinhole line tables.

This is a one-off generator (run by developers, not at simulation time).  It reads the
multi-pinhole predicted line positions shipped with soxspipe (copies in
``shared/reference/static_calibs``; columns wavelength, order, slit_index, slit_position,
detector_x, detector_y in the prepared, unbinned frame) and fits, per arm:

* the order-centre trace ``A_c(n, B)`` (A = cross-order, B = along-order pixel) as a global
  polynomial in order number and along-order pixel, from the slit-centre pinholes;
* the along-order wavelength solution at the slit centre ``n * lambda = W(n, B)`` (echelle arms)
  or one polynomial per pseudo-order (SOXS VIS);
* the slit scale ``k(n, B) = dA/ds`` (px/arcsec) and the slit tilt ``t(n, B) = dB/ds``.

The result is written as ``calib/static/simulator/FORMAT_<ARM>.json`` and loaded by
:mod:`soxs_core.simulate.echelle`.  Usage::

    python -m soxs_core.simulate.formatfit /work/shared/reference/static_calibs calib/static
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from soxs_core.detector.instruments import ARMS

__all__ = ["fit_arm", "main", "MULTI_PINHOLE_TABLES"]

#: Multi-pinhole predicted-line tables used for each arm.
MULTI_PINHOLE_TABLES = {
    "xsh_uvb": "xsh/THEO_TAB_MULT_UVB_1x1.fits",
    "xsh_vis": "xsh/THEO_TAB_MULT_VIS_1x1.fits",
    "xsh_nir": "xsh/THEO_TAB_MULT_NIR.fits",
    "soxs_vis": "soxs/SOXS_MPH_TAB_VIS_ThAr_1x1.fits",
    "soxs_nir": "soxs/ArHgNeXe_clean_within_2.0pixel.fits",
}

_FORMAT_TABLES = {
    "xsh_uvb": "xsh/SPECTRAL_FORMAT_TAB_UVB.fits",
    "xsh_vis": "xsh/SPECTRAL_FORMAT_TAB_VIS.fits",
    "xsh_nir": "xsh/SPECTRAL_FORMAT_TAB_NIR.fits",
    "soxs_vis": "soxs/SOXS_SPECTRAL_FORMAT_TAB_VIS.fits",
    "soxs_nir": "soxs/SOXS_SPECTRAL_FORMAT_TAB_NIR.fits",
}


#: (order degree, along-order degree) of the centre and wavelength fits.
_DEGREES = {"xsh_uvb": (5, 5), "xsh_vis": (5, 5), "xsh_nir": (5, 5), "soxs_vis": (3, 4),
            "soxs_nir": (3, 4)}


def _design(n: np.ndarray, b: np.ndarray, dn: int, db: int) -> np.ndarray:
    return np.stack([n**i * b**j for i in range(dn + 1) for j in range(db + 1)], axis=1)


def _fit2d(n, b, v, dn, db, n_ref, b_ref, weights=None):
    """Least squares in scaled variables; returns coefficient matrix and rms residual."""
    x = _design(n / n_ref, b / b_ref, dn, db)
    w = np.ones_like(v) if weights is None else weights
    keep = np.ones(v.size, bool)
    for _ in range(3):  # light 4-sigma clipping of table outliers
        coef, *_ = np.linalg.lstsq(x[keep] * w[keep, None], v[keep] * w[keep], rcond=None)
        res = v - x @ coef
        sig = np.std(res[keep])
        keep = np.abs(res) < 4 * sig + 1e-12
    return coef.reshape(dn + 1, db + 1), float(np.std(res[keep])), keep


def fit_arm(code: str, static_calibs: Path) -> dict:
    """Fit the format model of one arm; returns a JSON-serialisable dict."""
    arm = ARMS[code]
    path = static_calibs / MULTI_PINHOLE_TABLES[code]
    table = fits.getdata(path, 1)
    cols = {c.lower(): c for c in table.columns.names}
    wl = np.asarray(table[cols["wavelength"]], float)
    order = np.asarray(table[cols["order"]], int)
    sidx = np.asarray(table[cols["slit_index"]], int)
    spos = np.asarray(table[cols["slit_position"]], float)
    xx = np.asarray(table[cols["detector_x"]], float)
    yy = np.asarray(table[cols["detector_y"]], float)
    fmt = fits.getdata(static_calibs / _FORMAT_TABLES[code], 1)
    orders = [int(o) for o in fmt["ORDER"]]
    ok = np.isin(order, orders) & (wl > 250)
    wl, order, sidx, spos, xx, yy = (a[ok] for a in (wl, order, sidx, spos, xx, yy))
    if arm.dispersion_axis == "y":
        a_coord, b_coord = xx, yy
    else:
        a_coord, b_coord = yy, xx
    rows, cols_ = arm.prepared_shape()
    nb = rows if arm.dispersion_axis == "y" else cols_
    n_ref = float(max(orders))
    b_ref = float(nb)
    centre = sidx == 4
    # smooth truth: high degrees for the (noise-free, model-made) X-shooter tables, low ones for
    # the SOXS tables, whose positions carry measurement scatter
    dn, db = _DEGREES[code]
    cen, cen_rms, _ = _fit2d(order[centre].astype(float), b_coord[centre], a_coord[centre],
                             dn, db, n_ref, b_ref)

    # slit scale and tilt per (line, order) group
    keys = np.round(wl, 5) * 1000 + order
    uniq, inv = np.unique(keys, return_inverse=True)
    ks, ts, gn, gb = [], [], [], []
    for g in range(uniq.size):
        m = inv == g
        if m.sum() < 5 or not np.any(centre & m):
            continue
        ks.append(np.polyfit(spos[m], a_coord[m], 1)[0])
        ts.append(np.polyfit(spos[m], b_coord[m], 1)[0])
        gn.append(order[m][0])
        gb.append(b_coord[m & centre][0])
    ks, ts, gn, gb = (np.asarray(v, float) for v in (ks, ts, gn, gb))
    per_order_scale = code == "soxs_vis"  # pseudo-orders flip the slit direction
    if per_order_scale:
        scale = {str(o): [float(np.median(ks[gn == o]))] for o in orders}
        tilt = {str(o): [float(np.median(ts[gn == o]))] for o in orders}
        scale_poly = tilt_poly = None
        k_rms = float(np.std(ks - np.array([scale[str(int(o))][0] for o in gn])))
        t_rms = float(np.std(ts - np.array([tilt[str(int(o))][0] for o in gn])))
    else:
        scale_poly, k_rms, _ = _fit2d(gn, gb, ks, 2, 2, n_ref, b_ref)
        tilt_poly, t_rms, _ = _fit2d(gn, gb, ts, 2, 2, n_ref, b_ref)
        scale = tilt = None

    # wavelength along the order at slit centre, as lambda(u) with u = (B - b_mid) / b_half
    b_mid = b_half = 0.5 * nb
    wave: dict[str, list[float]] = {}
    if code == "soxs_vis":
        for o in orders:
            m = centre & (order == o)
            u = (b_coord[m] - b_mid) / b_half
            wave[str(o)] = np.polynomial.polynomial.polyfit(u, wl[m], 3).tolist()
        resid = []
        for o in orders:
            m = centre & (order == o)
            u = (b_coord[m] - b_mid) / b_half
            resid.append(wl[m] - np.polynomial.polynomial.polyval(u, wave[str(o)]))
        w_rms = float(np.std(np.concatenate(resid)))
    else:
        nl, w_rms, _ = _fit2d(order[centre].astype(float), b_coord[centre],
                              order[centre] * wl[centre], dn, db, n_ref, b_half)
        # per order: n*lambda = sum_ij nl_ij (n/n_ref)^i (B/b_half)^j ; convert to u
        for o in orders:
            pb = np.zeros(db + 1)
            for i in range(dn + 1):
                pb += nl[i] * (o / n_ref) ** i
            # polynomial in t = B/b_half = u + 1  ->  expand in u
            pu = np.zeros(db + 1)
            for j, c in enumerate(pb):
                pu[: j + 1] += c * np.array([_binom(j, k) for k in range(j + 1)])
            wave[str(o)] = (pu / o).tolist()
        w_rms = w_rms / float(np.mean(orders))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return {
        "arm": code,
        "source": f"{MULTI_PINHOLE_TABLES[code]} (md5 {md5})",
        "dispersion_axis": arm.dispersion_axis,
        "orders": orders,
        "wlminful": [float(v) for v in fmt["WLMINFUL"]],
        "wlmaxful": [float(v) for v in fmt["WLMAXFUL"]],
        "n_ref": n_ref, "b_ref": b_ref, "b_mid": b_mid, "b_half": b_half,
        "centre": cen.tolist(),
        "scale": scale_poly.tolist() if scale_poly is not None else None,
        "tilt": tilt_poly.tolist() if tilt_poly is not None else None,
        "scale_per_order": scale, "tilt_per_order": tilt,
        "wavelength": wave,
        "fit_rms": {"centre_px": cen_rms, "scale_px_per_arcsec": k_rms,
                    "tilt_px_per_arcsec": t_rms, "wavelength_nm": w_rms},
    }


def _binom(n: int, k: int) -> float:
    from math import comb
    return float(comb(n, k))


def downsample_flux_standards(src: Path, dst: Path) -> Path:
    """Bin the spectrophotometric standards to 0.5 nm (< 1000 nm) and 2 nm (beyond).

    The flux density (erg s-1 cm-2 A-1) is averaged within each bin; the result (~70 kB)
    is what the simulator uses as the known flux of its standard-star frames.
    """
    table = fits.getdata(src, 1)
    wave = np.asarray(table["WAVE"], float)
    edges = np.concatenate([np.arange(300.0, 1000.0, 0.5), np.arange(1000.0, 2500.01, 2.0)])
    idx = np.digitize(wave, edges) - 1
    good = (idx >= 0) & (idx < edges.size - 1)
    counts = np.bincount(idx[good], minlength=edges.size - 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    keep = counts > 0
    cols = [fits.Column(name="WAVE", format="E", unit="nm", array=centres[keep])]
    for name in table.columns.names[1:]:
        flux = np.asarray(table[name], float)
        sums = np.bincount(idx[good], weights=flux[good], minlength=edges.size - 1)
        cols.append(fits.Column(name=name, format="E", unit="erg/s/cm2/Angstrom",
                                array=(sums[keep] / counts[keep]).astype(np.float32)))
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["ORIGIN"] = (src.name, "binned copy of a soxspipe 0.17.4 table")
    hdu.header["BINNING"] = ("0.5 nm below 1000 nm, 2 nm above", "bin widths")
    out = dst / "flux_standards_binned.fits"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(out, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``formatfit <static_calibs dir> <calib/static dir>``."""
    argv = sys.argv[1:] if argv is None else argv
    src, dst = Path(argv[0]), Path(argv[1]) / "simulator"
    dst.mkdir(parents=True, exist_ok=True)
    print(downsample_flux_standards(src / "soxs" / "flux_standards.fits", dst))
    ext = src / "soxs" / "extinction_lasilla.fits"
    (dst / ext.name).write_bytes(ext.read_bytes())
    for code in MULTI_PINHOLE_TABLES:
        model = fit_arm(code, src)
        out = dst / f"FORMAT_{code.upper()}.json"
        out.write_text(json.dumps(model, indent=1) + "\n")
        print(out, model["fit_rms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
