"""Upstream calibration tables computed from the simulator's truth (soxspipe 0.17.4 layout).

* ``ORDER_TAB_<ARM>`` — order-centre table (product of ``soxs_order_centres``; input of
  ``soxs_mflat``): HDU1 one row of global polynomial coefficients, HDU2 one row per order.
  With ``edges=True`` the ``soxs_mflat`` variant with upper/lower edge polynomials is written
  (used for the truth).
* ``DISP_TAB_<ARM>`` — 2-D dispersion solution (product of ``soxs_spat_solution``): two rows
  (``axis`` = x, y) of ``c{i}{j}{k}`` coefficients of ``n^i λ^j s^k``.
* ``DISP_IMAGE_<ARM>`` — wavelength, slit-position and order of every pixel (3 image HDUs).

All coordinates are unbinned prepared pixels (0-based pixel centres); the binning keywords of the
headers say 1x1.  See ``INSTRUMENTS.md`` §5.2–5.4.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from soxs_core.io.safety import write_atomically
from soxs_core.simulate.echelle import EchelleFormat
from soxs_core.simulate.headers import _set, default_mjd, frame_kind

__all__ = ["order_table_hdul", "disp_table_hdul", "disp_image_hdul", "fit_disp_solution",
           "DISP_DEGREES", "sample_format", "set_time_keywords"]

#: ``(order_deg, wavelength_deg, slit_deg)`` for the x and y rows of the DISP_TAB, per arm
#: (soxspipe 0.17.4 ``soxs-spat-solution`` defaults).
DISP_DEGREES = {
    "xsh_uvb": ((5, 4, 2), (4, 4, 2)),
    "xsh_vis": ((4, 5, 3), (4, 4, 2)),
    "xsh_nir": ((4, 4, 2), (4, 4, 2)),
    "soxs_vis": ((3, 5, 1), (3, 5, 1)),
    "soxs_nir": ((4, 5, 1), (4, 4, 2)),
}


def _product_header(fmt: EchelleFormat, catg: str, tech: str | None,
                    mjd: float | None = None, exptime: float | None = None) -> fits.Header:
    arm = fmt.arm
    hdr = fits.Header()
    cards = [("INSTRUME", arm.instrument, "Instrument used"),
             ("ESO SEQ ARM", arm.name, "Instrument arm"),
             ("ESO PRO TYPE", "REDUCED", "Product type"),
             ("ESO PRO CATG", f"{catg}_{arm.name}", "Product category"),
             ("ESO PRO REC1 ID", "soxs-simulate", "Written from the simulator truth"),
             ("ESO PRO REC1 PIPE ID", "soxs/simulator", "Pipeline identifier")]
    if tech:
        cards.append(("ESO PRO TECH", tech, "Product technique"))
    if arm.is_ccd:
        cards += [(arm.keywords["binx"], 1, "Binning of the table coordinates"),
                  (arm.keywords["biny"], 1, "Binning of the table coordinates")]
    cards += [("CDELT1", 1.0, "Binning of the table coordinates"),
              ("CDELT2", 1.0, "Binning of the table coordinates"),
              ("SOXSSIM", True, "computed from the simulator truth"),
              ("SIMFMT", fmt.source[:60], "format model source")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for key, value, comment in cards:
            _set(hdr, key, value, comment)
    set_time_keywords(hdr, mjd, exptime)
    return hdr


def set_time_keywords(hdr: fits.Header, mjd: float | None = None,
                      exptime: float | None = None) -> fits.Header:
    """Set ``MJD-OBS``, ``DATE-OBS`` and ``EXPTIME`` of a table's primary header.

    Real upstream products inherit them from their raw frames (soxspipe sorts its inputs on
    MJD-OBS); the default is the first lamp flat of the simulated night, exposure time 0.
    """
    if mjd is None:
        mjd = default_mjd(frame_kind("FLAT"), 0, 0.0)
    date_obs = Time(float(mjd), format="mjd", scale="utc").isot[:23]
    hdr["MJD-OBS"] = (round(float(mjd), 8), f"Obs start {date_obs}")
    hdr["DATE-OBS"] = (date_obs, "Observing date")
    hdr["EXPTIME"] = (float(exptime or 0.0), "Integration time [s]")
    return hdr


def order_table_hdul(fmt: EchelleFormat, edges: bool = False, trace_sigma: float = 1.2,
                     orders=None, mjd: float | None = None, exptime: float | None = None
                     ) -> fits.HDUList:
    """ORDER_TAB HDU list of the true order centres (and edges when ``edges``).

    Parameters
    ----------
    fmt : EchelleFormat
        The format truth.
    edges : bool
        Also write the ``edgeup``/``edgelow`` polynomials and ``min/maxThreshold`` (the
        ``soxs_mflat`` layout).
    trace_sigma : float
        Constant Gaussian σ (px) of the trace, written as the ``std_ij`` set.
    orders : sequence of int, optional
        Orders listed in HDU2 (default all of the format that fall on the detector).
    mjd, exptime : float, optional
        ``MJD-OBS`` (and ``DATE-OBS``) and ``EXPTIME`` of the frames the table stands for.
    """
    along = "y" if fmt.dispersion_axis == "y" else "x"
    across = "x" if along == "y" else "y"
    cen = fmt.centre_raw_coefficients()
    dn, db = cen.shape[0] - 1, cen.shape[1] - 1
    cols = [fits.Column(name="degorder_cent", format="K", array=[dn]),
            fits.Column(name=f"deg{along}_cent", format="K", array=[db])]
    cols += [fits.Column(name=f"cent_{i}{j}", format="D", array=[cen[i, j]])
             for i in range(dn + 1) for j in range(db + 1)]
    # soxspipe evaluates the std_ij set with the centre's degrees, so it is written with them:
    # a constant sigma in std_00, zeros elsewhere
    cols += [fits.Column(name="degorder_std", format="K", array=[dn]),
             fits.Column(name=f"deg{along}_std", format="K", array=[db])]
    cols += [fits.Column(name=f"std_{i}{j}", format="D",
                         array=[trace_sigma if i == j == 0 else 0.0])
             for i in range(dn + 1) for j in range(db + 1)]
    extra_hdr = {}
    if edges:
        low, up, rms = fmt.fit_edges()
        for name, coef in (("edgeup", up), ("edgelow", low)):
            cols += [fits.Column(name=f"degorder_{name}", format="K", array=[coef.shape[0] - 1]),
                     fits.Column(name=f"deg{along}_{name}", format="K",
                                 array=[coef.shape[1] - 1])]
            cols += [fits.Column(name=f"{name}_c{i}{j}", format="D", array=[coef[i, j]])
                     for i in range(coef.shape[0]) for j in range(coef.shape[1])]
        extra_hdr["SIMEDRMS"] = (rms, "rms (px) of edge polynomials vs exact edges")
    coeff_hdu = fits.BinTableHDU.from_columns(cols)
    use = [int(o) for o in (fmt.orders if orders is None else orders)]
    rows = {k: [] for k in ("order", f"{along}min", f"{along}max", f"{across}min",
                            f"{across}max")}
    for n in use:
        g = fmt.geometry(n)
        if not np.isfinite(g.b_min):
            continue
        b = np.arange(g.b_min, g.b_max + 1)
        a = fmt.centre(n, b)
        rows["order"].append(n)
        rows[f"{along}min"].append(int(g.b_min))
        rows[f"{along}max"].append(int(g.b_max))
        # stored mirrored (frame width - value), as soxspipe 0.17.4 does
        rows[f"{across}min"].append(int(round(fmt.n_across - a.min())))
        rows[f"{across}max"].append(int(round(fmt.n_across - a.max())))
    ocols = [fits.Column(name=k, format="K", array=np.array(v, dtype=np.int64))
             for k, v in rows.items()]
    if edges:
        nrow = len(rows["order"])
        ocols += [fits.Column(name="minThreshold", format="D", array=np.full(nrow, np.nan)),
                  fits.Column(name="maxThreshold", format="D", array=np.full(nrow, np.nan))]
    order_hdu = fits.BinTableHDU.from_columns(ocols)
    hdr = _product_header(fmt, "ORDER_TAB", "ECHELLE,SLIT", mjd, exptime)
    for key, val in extra_hdr.items():
        hdr[key] = val
    return fits.HDUList([fits.PrimaryHDU(header=hdr), coeff_hdu, order_hdu])


def sample_format(fmt: EchelleFormat, step: float = 48.0, n_slit: int = 5, orders=None
                  ) -> dict[str, np.ndarray]:
    """Exact samples of the truth: order, wavelength (nm), slit (arcsec), x, y (unbinned px)."""
    use = [int(o) for o in (fmt.orders if orders is None else orders)]
    out = {k: [] for k in ("order", "wavelength", "slit", "x", "y")}
    half = 0.5 * fmt.slit_length
    s = np.linspace(-half, half, n_slit)
    for n in use:
        g = fmt.geometry(n)
        if not np.isfinite(g.b_min):
            continue
        b = np.arange(g.b_min, g.b_max + 0.5, step)
        bb, ss = np.meshgrid(b, s, indexing="ij")
        a = fmt.centre(n, bb) + fmt.scale(n, bb) * ss
        wl = fmt.wavelength(n, bb - fmt.tilt(n, bb) * ss)
        x, y = (a, bb) if fmt.dispersion_axis == "y" else (bb, a)
        for key, val in (("order", np.full(bb.size, float(n))), ("wavelength", wl),
                         ("slit", ss), ("x", x), ("y", y)):
            out[key].append(np.ravel(val))
    return {k: np.concatenate(v) for k, v in out.items()}


def fit_disp_solution(fmt: EchelleFormat, degrees=None, orders=None, tolerance: float = 0.03
                      ) -> tuple[list[dict[str, float]], list[tuple[int, int, int]], dict]:
    """Fit ``x(n, λ, s)`` and ``y(n, λ, s)`` plain-monomial polynomials to the truth.

    Starts from soxspipe's default degrees (:data:`DISP_DEGREES`) and raises the wavelength and
    order degrees (up to 7 and ``n_orders - 1``) until the rms against the truth is below
    ``tolerance`` px.

    Returns
    -------
    coeffs : list of dict
        ``{"c{i}{j}{k}": value}`` for the x and the y row.
    degrees : list of tuple
        ``(order_deg, wavelength_deg, slit_deg)`` of each row.
    rms : dict
        rms residual (px) of each row against the exact truth samples.
    """
    degrees = list(degrees or DISP_DEGREES[fmt.arm.code])
    smp = sample_format(fmt, orders=orders)
    n, wl, s = smp["order"], smp["wavelength"], smp["slit"]
    n_ref, wl_ref, s_ref = float(n.max()), float(np.median(wl)), 0.5 * fmt.slit_length
    max_dn = len(np.unique(n)) - 1
    out, rms = [], {}
    for row, axis in enumerate(("x", "y")):
        target = smp[axis]
        dn, dw, ds = degrees[row]
        dn = min(dn, max_dn)
        while True:
            terms = [(i, j, k) for i in range(dn + 1) for j in range(dw + 1)
                     for k in range(ds + 1)]
            design = np.stack([(n / n_ref) ** i * (wl / wl_ref - 1.0) ** j * (s / s_ref) ** k
                               for i, j, k in terms], axis=1)
            coef = np.linalg.lstsq(design, target, rcond=None)[0]
            rms[axis] = float(np.std(design @ coef - target))
            if rms[axis] <= tolerance or (dw >= 7 and dn >= min(7, max_dn)):
                break
            if dw <= dn or dn >= min(7, max_dn):
                dw = min(dw + 1, 7)
            else:
                dn += 1
        degrees[row] = (dn, dw, ds)
        # expand (wl/wl_ref - 1)^j into plain powers of wl
        from math import comb

        raw: dict[str, float] = {}
        for (i, j, k), c in zip(terms, coef):
            for p in range(j + 1):
                factor = comb(j, p) * (-1.0) ** (j - p) / wl_ref**p
                key = f"c{i}{p}{k}"
                raw[key] = raw.get(key, 0.0) + c * factor / (n_ref**i * s_ref**k)
        out.append(raw)
    return out, list(degrees), rms


def evaluate_disp_row(row: dict[str, float], order, wavelength, slit) -> np.ndarray:
    """Evaluate one DISP_TAB row (``c{i}{j}{k}`` dict) at (order, λ nm, slit arcsec)."""
    order, wavelength, slit = np.broadcast_arrays(np.asarray(order, float),
                                                  np.asarray(wavelength, float),
                                                  np.asarray(slit, float))
    total = np.zeros(order.shape)
    for key, c in row.items():
        if not np.isfinite(c):
            continue
        i, j, k = int(key[1]), int(key[2]), int(key[3])
        total += c * order**i * wavelength**j * slit**k
    return total


def disp_table_hdul(fmt: EchelleFormat, orders=None, mjd: float | None = None,
                    exptime: float | None = None) -> fits.HDUList:
    """DISP_TAB HDU list (two rows, x and y) fitted to the truth (time keywords as for
    :func:`order_table_hdul`)."""
    coeffs, degrees, rms = fit_disp_solution(fmt, orders=orders)
    names = sorted(set(coeffs[0]) | set(coeffs[1]))
    cols = [fits.Column(name="axis", format="1A", array=np.array(["x", "y"])),
            fits.Column(name="order_deg", format="K", array=[d[0] for d in degrees]),
            fits.Column(name="wavelength_deg", format="K", array=[d[1] for d in degrees]),
            fits.Column(name="slit_deg", format="K", array=[d[2] for d in degrees])]
    cols += [fits.Column(name=name, format="D",
                         array=[coeffs[0].get(name, np.nan), coeffs[1].get(name, np.nan)])
             for name in names]
    hdr = _product_header(fmt, "DISP_TAB", "ECHELLE,MULTI-PINHOLE", mjd, exptime)
    hdr["SIMXRMS"] = (rms["x"], "rms (px) of the x fit against the truth")
    hdr["SIMYRMS"] = (rms["y"], "rms (px) of the y fit against the truth")
    return fits.HDUList([fits.PrimaryHDU(header=hdr), fits.BinTableHDU.from_columns(cols)])


def disp_image_arrays(fmt: EchelleFormat, orders=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel wavelength (nm), slit position (arcsec) and order of the unbinned frame."""
    shape = fmt.shape
    wave = np.full(shape, np.nan, dtype=np.float32)
    slit = np.full(shape, np.nan, dtype=np.float32)
    order_img = np.full(shape, np.nan, dtype=np.float32)
    half = 0.5 * fmt.slit_length
    use = [int(o) for o in (fmt.orders if orders is None else orders)]
    for n in use:
        g = fmt.geometry(n)
        if not np.isfinite(g.b_min):
            continue
        b = np.arange(int(g.b_min), int(g.b_max) + 1, dtype=float)
        lo, up = fmt.edges(n, b)
        first = np.floor(lo).astype(int) - 1
        width = int(np.ceil(np.max(up - lo))) + 3
        a = first[:, None] + np.arange(width)[None, :]
        bb = np.broadcast_to(b[:, None], a.shape)
        s, wl = fmt.pixel_to_world(n, a, bb)
        ok = (np.abs(s) <= half) & (a >= 0) & (a < fmt.n_across)
        bi = bb.astype(int)[ok]
        ai = a[ok]
        r, c = (bi, ai) if fmt.dispersion_axis == "y" else (ai, bi)
        wave[r, c] = wl[ok]
        slit[r, c] = s[ok]
        order_img[r, c] = n
    return wave, slit, order_img


def disp_image_hdul(fmt: EchelleFormat, orders=None, mjd: float | None = None,
                    exptime: float | None = None) -> fits.HDUList:
    """DISP_IMAGE HDU list: WAVELENGTH, SLIT, ORDER (unbinned, NaN outside the orders).

    The primary header carries ``SXSPRE``, the keyword by which soxspipe 0.17.4 knows a
    prepared (not raw) frame; time keywords as for :func:`order_table_hdul`.
    """
    wave, slit, order_img = disp_image_arrays(fmt, orders)
    hdr = _product_header(fmt, "DISP_IMAGE", "ECHELLE,MULTI-PINHOLE", mjd, exptime)
    # soxspipe only tests for the keyword's presence; its own value is a UTC time stamp, here
    # the frame time so that a night stays byte-reproducible
    hdr["SXSPRE"] = (hdr["DATE-OBS"], "UTC timestamp")
    hdr["EXTNAME"] = "WAVELENGTH"
    hdr["BUNIT"] = "nm"
    h1 = fits.ImageHDU(slit, name="SLIT")
    h1.header["BUNIT"] = "arcsec"
    h2 = fits.ImageHDU(order_img, name="ORDER")
    return fits.HDUList([fits.PrimaryHDU(wave, header=hdr), h1, h2])


def write(hdul: fits.HDUList, path: str | os.PathLike) -> Path:
    """Write an HDU list with checksums; returns the path.

    The checksum cards say the primary header's ``DATE-OBS`` instead of the writing time,
    so that the same seed writes the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = str(hdul[0].header.get("DATE-OBS", ""))[:19]
    for hdu in hdul:
        hdu.add_checksum(when=f"HDU checksum updated {stamp}".rstrip())
    write_atomically(path, lambda tmp: hdul.writeto(tmp, overwrite=True))
    return path
