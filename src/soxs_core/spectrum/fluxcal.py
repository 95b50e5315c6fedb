"""Flux standards, La Silla extinction, response function, efficiency and flux calibration.

Units used throughout
---------------------
* wavelengths in nm (air); catalogue fluxes F in erg s⁻¹ cm⁻² Å⁻¹;
* extracted counts ``c`` in e- per along-order pixel of width ``Δλ = pixelScaleNm`` nm,
  exposure time ``t`` in s, extinction ``k(λ)`` in mag per airmass at airmass ``X``;
* the **response** R(λ) of an order converts extinction-corrected count densities into flux:
  ``F = c / t / (10 Δλ) · 10^(0.4 k X) · R``, so R is in (erg s⁻¹ cm⁻² Å⁻¹) per
  (e- s⁻¹ Å⁻¹) = erg cm⁻² e⁻¹.  It is measured on a flux standard order by order, so it holds
  the blaze and the instrument throughput whether or not the frame was flat-fielded (a
  science frame must then be reduced the same way as the standard: both with or both without
  the flat);
* the **efficiency** is detected e- over the photons arriving above the atmosphere, the
  extinction removed (telescope + instrument + detector, blaze and slit losses included).

soxspipe compatibility: the RESP_TAB written by :meth:`Response.to_hdus` has soxspipe's
one-row HDU 1 (``polyOrder``, ``c0``…``cN``, :func:`numpy.polyval` order, wavelength in nm)
holding a polynomial fitted to the *merged* response in soxspipe's convention
(``F = FLUX_COUNTS / t · 10^(0.4 k X) · polyval(c, λ) · 1e-17`` with FLUX_COUNTS in e- per
detector pixel); our per-order response follows in HDU 2 ``RESPONSE_ORDERS``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table

from soxs_core.calib import static_dir
from soxs_core.errors import InputError
from soxs_core.io.products import QcMeasurements
from soxs_core.spectrum.merge import merge_step, merge_values, row_usable

__all__ = [
    "H_PLANCK", "C_LIGHT", "TELESCOPE_AREA_CM2", "telescope_area_cm2", "TELLURIC_BANDS_NM",
    "STELLAR_LINES_NM", "normalise_standard_name", "standard_names", "find_standard",
    "extinction", "Response", "fit_response", "read_response", "calibrate_orders",
    "flux_calibrate", "efficiency", "spectrum_qc", "line_mask", "EfficiencyQual",
]

log = logging.getLogger(__name__)

H_PLANCK = 6.62607015e-27  # erg s
C_LIGHT = 2.99792458e10  # cm s-1

#: Collecting area (cm²) of each instrument's telescope, central obstruction removed:
#: VLT UT (8.2 m; 50 m² effective) for X-shooter, NTT (3.58 m primary, 1.0 m obstruction) for
#: SOXS.  The simulator uses the same numbers.
TELESCOPE_AREA_CM2 = {"XSHOOTER": 50.0e4,
                      "SOXS": 0.25 * np.pi * (3.58**2 - 1.0**2) * 1e4}

#: Atmospheric absorption bands (nm) left out of the response fit: O2 B and A, the H2O bands
#: of the far red and near-IR, and the thermal/H2O-dominated end of K band.
TELLURIC_BANDS_NM = ((686.0, 695.0), (759.0, 770.0), (930.0, 980.0), (1110.0, 1160.0),
                     (1350.0, 1480.0), (1800.0, 1960.0), (2400.0, 2600.0))

#: Cores of the strong lines of the (hot) spectrophotometric standards (nm): Balmer, Paschen,
#: Brackett, He I/II.  Each is masked over ±λ/:data:`LINE_MASK_RESOLUTION`.
STELLAR_LINES_NM = (
    # Balmer
    656.28, 486.13, 434.05, 410.17, 397.01, 388.91, 383.54, 379.79, 377.06, 375.01,
    # Paschen (to Pa 10: the higher members are weak in hot standards)
    1875.10, 1281.81, 1093.81, 1004.94, 954.60, 922.90, 901.49,
    # Brackett
    2166.12, 1736.68, 1681.17, 1641.17, 1611.37, 1588.49, 1570.34,
    # He II, He I
    468.57, 541.15, 447.15, 587.56, 667.82, 1083.0,
)
#: Half width of a masked line core: λ / LINE_MASK_RESOLUTION (1.6 nm at Hα).
LINE_MASK_RESOLUTION = 400.0

#: Names of the catalogue standards by other designations (normalised, see
#: :func:`normalise_standard_name`), as soxspipe knows them.
STANDARD_ALIASES = {"CD3017706": "LTT7987", "CD3810980": "EG274", "CD325613": "LTT3218",
                    "CPD69177": "EG21"}

#: Regular sampling of each order's response written to RESP_TAB (points per order), refined
#: until linear interpolation is within RESPONSE_TABULATION_TOL (relative) of the curve.
RESPONSE_SAMPLES = 400
RESPONSE_TABULATION_TOL = 2e-5
#: Clipping limit (sigma, of the robust scatter) of the response fits.
RESPONSE_CLIP_SIGMA = 4.0
#: Fewest rows per chunk, and significance (chunk sigmas) of the residual structure that
#: triggers the response's residual correction.
RESIDUAL_CHUNK_MIN = 25
RESIDUAL_SIGNIFICANCE = 5.0


class EfficiencyQual:
    """Bits of the ``QUAL`` column of the efficiency table (0 = used for EFF MEDIAN)."""

    BAD_ROW = 1  #: the extracted row is flagged or has no catalogue flux
    TELLURIC = 2  #: inside a telluric band
    LINE = 4  #: inside a stellar line core


# ---------------------------------------------------------------------------- static data
def telescope_area_cm2(instrument: str) -> float:
    """Collecting area (cm²) of the telescope of ``instrument`` (``XSHOOTER``/``SOXS``)."""
    key = str(instrument).strip().upper()
    key = "XSHOOTER" if key in ("SHOOT", "XSH") else key
    if key not in TELESCOPE_AREA_CM2:
        raise InputError(f"no telescope area known for instrument {instrument!r}")
    return float(TELESCOPE_AREA_CM2[key])


@functools.cache
def _catalogue() -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    path = static_dir() / "flux_standards.fits"
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            data = hdul[1].data
            wave = np.asarray(data["WAVE"], float)
            stars = {name: np.asarray(data[name], float) for name in data.columns.names
                     if name.upper() != "WAVE"}
    except (OSError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: flux-standard catalogue unreadable ({exc})") from exc
    return path, wave, stars


def standard_names() -> list[str]:
    """The standards of the shipped catalogue (its column names)."""
    return list(_catalogue()[2])


def normalise_standard_name(name: str) -> str:
    """A target name as soxspipe matches it: upper case, a ``" V…"`` suffix dropped, spaces,
    ``-`` and ``_`` removed, ``_NOD`` dropped (``"CD-32 5613"`` -> ``"CD325613"``)."""
    text = str(name).strip().upper()
    text = text.split(" V")[0]
    text = text.replace("_NOD", "")
    return re.sub(r"[\s\-_]", "", text)


def find_standard(name: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The catalogue spectrum of a spectrophotometric standard.

    The name is matched as soxspipe does: normalised (:func:`normalise_standard_name`),
    aliases resolved (CD-30 17706 = LTT7987, CD-38 10980 = EG274, CD-32 5613 = LTT3218,
    CPD-69 177 = EG21), then a catalogue name contained in it is accepted (the longest).

    Returns
    -------
    canonical_name : str
        The catalogue's name of the star.
    wave_nm : ndarray
        Wavelengths (nm).
    flux : ndarray
        F_λ (erg s⁻¹ cm⁻² Å⁻¹).

    Raises
    ------
    InputError
        When the star is not in the catalogue (the message lists those that are).
    """
    path, wave, stars = _catalogue()
    key = normalise_standard_name(name)
    key = STANDARD_ALIASES.get(key, key)
    by_norm = {normalise_standard_name(n): n for n in stars}
    match = by_norm.get(key)
    if match is None and key:
        contained = [n for n in by_norm if n in key]
        if contained:
            match = by_norm[max(contained, key=len)]
    if match is None:
        raise InputError(f"standard star {name!r} is not in the flux-standard catalogue "
                         f"{path.name} (it has {', '.join(stars)})")
    return match, wave.copy(), stars[match].copy()


@functools.cache
def _extinction_table() -> tuple[np.ndarray, np.ndarray]:
    path = static_dir() / "extinction_lasilla.fits"
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            data = hdul[1].data
            wave = np.asarray(data["WAVE"], float) / 10.0  # Å -> nm
            mag = np.asarray(data["MAG_AIRMASS"], float)
    except (OSError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: extinction curve unreadable ({exc})") from exc
    order = np.argsort(wave)
    return wave[order], mag[order]


def extinction(wave_nm: np.ndarray | float) -> np.ndarray:
    """La Silla extinction (mag per airmass) at ``wave_nm``, linearly interpolated.

    Beyond the table (310-900 nm): constant at the red end (0.01 mag, the near-IR continuum
    extinction is of that order) and linearly extrapolated at the blue end, where ozone makes
    it climb steeply.
    """
    w, k = _extinction_table()
    x = np.asarray(wave_nm, float)
    out = np.interp(x, w, k)
    slope = (k[1] - k[0]) / (w[1] - w[0])
    return np.where(x < w[0], k[0] + slope * (x - w[0]), out)


def line_mask(wave_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(telluric, line)`` boolean masks of the wavelengths inside a telluric band
    (:data:`TELLURIC_BANDS_NM`) and inside a stellar line core (:data:`STELLAR_LINES_NM`)."""
    w = np.asarray(wave_nm, float)
    tell = np.zeros(w.shape, bool)
    for lo, hi in TELLURIC_BANDS_NM:
        tell |= (w >= lo) & (w <= hi)
    line = np.zeros(w.shape, bool)
    for centre in STELLAR_LINES_NM:
        line |= np.abs(w - centre) <= centre / LINE_MASK_RESOLUTION
    return tell, line


# ---------------------------------------------------------------------------- helpers
def _meta_arm(table: Table) -> tuple[str, str | None]:
    meta = {str(k).upper(): v for k, v in table.meta.items()}
    arm = str(meta.get("ARM", meta.get("ESO SEQ ARM", ""))).strip().upper()
    inst = meta.get("INSTRUME")
    return arm, (None if inst is None else str(inst).strip().upper())


def _checked_columns(table: Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise InputError(f"{what} lacks column(s) " + ", ".join(missing))


def _standard_arrays(standard) -> tuple[str, np.ndarray, np.ndarray]:
    """``(name, wave, flux)`` from a :func:`find_standard` tuple, a ``(wave, flux)`` pair or a
    star name."""
    if isinstance(standard, str):
        return find_standard(standard)
    items = tuple(standard)
    if len(items) == 3:
        name, wave, flux = items
    elif len(items) == 2:
        name, (wave, flux) = "standard", items
    else:
        raise InputError("standard flux must be (name, wave_nm, flux) or (wave_nm, flux)")
    wave = np.asarray(wave, float)
    flux = np.asarray(flux, float)
    order = np.argsort(wave)
    return str(name), wave[order], flux[order]


def _catalogue_at(wave_cat: np.ndarray, flux_cat: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Catalogue flux at ``wave`` (linear), NaN outside the catalogue."""
    return np.interp(wave, wave_cat, flux_cat, left=np.nan, right=np.nan)


def _cheb_fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray, deg: int,
              domain: tuple[float, float]) -> np.polynomial.Chebyshev:
    """Weighted least-squares Chebyshev series over ``domain``.

    Solved through the (column-scaled) normal equations with einsum: numpy's lstsq goes
    through a threaded LAPACK that took 60 ms instead of 1 ms per fit on a busy machine, and
    the Chebyshev basis keeps the small system well conditioned.
    """
    lo, hi = domain
    t = (2.0 * x - (lo + hi)) / max(hi - lo, 1e-300)
    vand = np.polynomial.chebyshev.chebvander(t, deg) * weight[:, None]
    scale = np.sqrt(np.einsum("ij,ij->j", vand, vand))
    scale[scale == 0] = 1.0
    a = vand / scale
    coef = np.linalg.solve(np.einsum("ij,ik->jk", a, a), np.einsum("ij,i->j", a, y * weight))
    return np.polynomial.Chebyshev(coef / scale, domain=[lo, hi])


def _robust_clip_fit(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, deg: int,
                     max_iteration: int, domain: tuple[float, float]
                     ) -> tuple[np.polynomial.Chebyshev, np.ndarray]:
    """Weighted Chebyshev fit of degree ``deg`` with iterative clipping of residuals beyond
    :data:`RESPONSE_CLIP_SIGMA` times their robust scatter (in units of ``sigma``)."""
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(sigma) & (sigma > 0)
    deg = int(max(0, min(deg, keep.sum() - 1)))
    fit = _cheb_fit(x[keep], y[keep], 1.0 / sigma[keep], deg, domain)
    for _ in range(max(0, int(max_iteration))):
        resid = (y - fit(x)) / sigma
        good = resid[keep]
        scale = 1.4826 * np.median(np.abs(good - np.median(good))) if good.size else 0.0
        # never tighter than the errors say: a perfect model has a scatter of 1
        limit = RESPONSE_CLIP_SIGMA * max(scale, 1.0)
        new_keep = keep & (np.abs(resid) <= limit)
        if new_keep.sum() <= deg + 1 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
        fit = _cheb_fit(x[keep], y[keep], 1.0 / sigma[keep], deg, domain)
    return fit, keep


# ---------------------------------------------------------------------------- response
@dataclass
class OrderFit:
    """Diagnostics of one order's response fit (for plots and logs)."""

    order: int
    wave: np.ndarray  #: wavelengths of the usable rows (nm)
    sensitivity: np.ndarray  #: measured 1/R of those rows (e- s⁻¹ Å⁻¹ per erg s⁻¹ cm⁻² Å⁻¹)
    sigma: np.ndarray  #: its 1σ error
    used: np.ndarray  #: rows kept by the final fit (not masked, not clipped)
    masked: np.ndarray  #: rows in a telluric band or line core
    degree: int
    telluric_fallback: bool = False  #: too little left outside the bands: bands were used
    poly: np.polynomial.Chebyshev | None = None  #: the fitted polynomial
    model: object = None  #: the final sensitivity S(λ) (polynomial x residual correction)


@dataclass
class Response:
    """A response function: per-order curves and/or soxspipe's merged polynomial.

    Attributes
    ----------
    arm : str
        ``ESO SEQ ARM`` (``UVB``/``VIS``/``NIR``).
    instrument : str or None
        ``INSTRUME`` when known (``XSHOOTER``/``SOXS``).
    orders : dict
        ``{order: (wave_nm, R)}`` tabulated curves (R in erg cm⁻² e⁻¹), wave increasing;
        empty for a soxspipe RESP_TAB.
    merged_coeffs : ndarray or None
        soxspipe's polynomial (:func:`numpy.polyval` order, λ in nm) in units of
        1e-17 erg s⁻¹ cm⁻² Å⁻¹ per e- s⁻¹ per detector pixel.
    standard : str
        Name of the standard it was measured on.
    source : str
        Where it comes from (the file, when read), for messages.
    exptime, airmass : float
        Of the standard.
    fits : list of OrderFit
        Fit diagnostics (only for a response fitted in this run).
    merged_fit : dict
        Wavelength, measured and fitted merged response of the soxspipe polynomial.
    """

    arm: str
    instrument: str | None
    orders: dict[int, tuple[np.ndarray, np.ndarray]]
    merged_coeffs: np.ndarray | None = None
    standard: str = ""
    source: str = "response"
    exptime: float = float("nan")
    airmass: float = float("nan")
    fits: list[OrderFit] = field(default_factory=list)
    merged_fit: dict = field(default_factory=dict)

    def evaluate(self, order: int, wave: np.ndarray,
                 pixel_scale_nm: np.ndarray | float | None = None) -> np.ndarray:
        """R (erg cm⁻² e⁻¹) of ``order`` at ``wave`` nm; NaN outside the tabulated range.

        A soxspipe RESP_TAB has one polynomial for every order and is per detector pixel:
        ``pixel_scale_nm`` (nm per pixel at ``wave``) is then needed to turn it into R.

        Raises
        ------
        InputError
            When the order has no response (or a soxspipe response lacks the pixel scale).
        """
        wave = np.asarray(wave, float)
        if self.orders:
            curve = self.orders.get(int(order))
            if curve is None:
                raise InputError(f"{self.source}: the response has no order {int(order)} "
                                 f"(it has {', '.join(str(o) for o in sorted(self.orders))})")
            w, r = curve
            return np.interp(wave, w, r, left=np.nan, right=np.nan)
        if self.merged_coeffs is None:
            raise InputError(f"{self.source}: the response holds no curve")
        if pixel_scale_nm is None:
            raise InputError(f"{self.source}: a soxspipe response needs the pixel scale")
        return (np.polyval(self.merged_coeffs, wave) * 1e-17 * 10.0
                * np.asarray(pixel_scale_nm, float))

    def to_hdus(self) -> list:
        """``[HDU1, HDU2]`` astropy BinTable HDUs of RESP_TAB (no primary HDU).

        HDU 1: one row, ``polyOrder`` and ``c0``…``cN`` (soxspipe's layout); HDU 2
        ``RESPONSE_ORDERS``: ``ORDER``, ``WAVE`` (nm), ``RESPONSE`` (erg cm⁻² e⁻¹), the curve
        of each order sampled densely enough for linear interpolation (< 0.01 % of R).
        """
        from astropy.io import fits

        coeffs = self.merged_coeffs
        if coeffs is None:
            coeffs = np.array([np.nan])
        cols = [fits.Column(name="polyOrder", format="K", array=np.array([coeffs.size - 1]))]
        cols += [fits.Column(name=f"c{i}", format="D", array=np.array([c]))
                 for i, c in enumerate(coeffs)]
        hdu1 = fits.BinTableHDU.from_columns(cols, name="RESPONSE")
        h1 = hdu1.header
        h1["COMMENT"] = ("soxspipe RESP_TAB: F = FLUX_COUNTS/EXPTIME * 10**(0.4 k X) * "
                         "polyval(c, WAVE[nm]) * 1e-17 erg/s/cm2/A, FLUX_COUNTS in e- per "
                         "detector pixel; c0 is the highest power")
        orders = sorted(self.orders)
        n = [self.orders[o][0].size for o in orders]
        ocol = np.concatenate([np.full(k, o) for o, k in zip(orders, n)]) if orders else []
        wcol = np.concatenate([self.orders[o][0] for o in orders]) if orders else []
        rcol = np.concatenate([self.orders[o][1] for o in orders]) if orders else []
        hdu2 = fits.BinTableHDU.from_columns([
            fits.Column(name="ORDER", format="J", array=np.asarray(ocol, np.int32)),
            fits.Column(name="WAVE", format="D", unit="nm", array=np.asarray(wcol, float)),
            fits.Column(name="RESPONSE", format="D", unit="erg/(cm2 electron)",
                        array=np.asarray(rcol, float)),
        ], name="RESPONSE_ORDERS")
        h2 = hdu2.header
        h2["ARM"] = (self.arm, "arm the response was measured on")
        if self.instrument:
            h2["INSTRUME"] = (self.instrument, "instrument the response was measured on")
        if self.standard:
            h2["STDNAME"] = (self.standard, "spectrophotometric standard")
        if np.isfinite(self.exptime):
            h2["STDEXPT"] = (float(self.exptime), "[s] exposure time of the standard")
        if np.isfinite(self.airmass):
            h2["STDAIRM"] = (float(self.airmass), "airmass of the standard")
        h2["COMMENT"] = ("F[erg/s/cm2/A] = counts / EXPTIME / (10 * pixelScaleNm) * "
                         "10**(0.4 k(WAVE) AIRMASS) * RESPONSE(order, WAVE), "
                         "linear interpolation in WAVE within each order")
        for h in (h1, h2):
            h["ARM"] = (self.arm, "arm the response was measured on")
        return [hdu1, hdu2]


def _with_residual_correction(fit, wave: np.ndarray, sens: np.ndarray, sigma: np.ndarray,
                              keep: np.ndarray, domain: tuple[float, float]):
    """The sensitivity model: the polynomial, times a smooth correction when its residuals
    have significant structure.

    A polynomial of modest degree cannot follow steep band edges (SOXS UV-VIS without a
    flat: ±6 % at degree 5).  The kept rows' ratios to the polynomial are median-combined in
    chunks of :data:`RESIDUAL_CHUNK_MIN` rows or more (about 40 per order); when a chunk
    median departs from 1 by more than :data:`RESIDUAL_SIGNIFICANCE` times its own error,
    the model is multiplied by the chunk medians interpolated linearly (and extrapolated
    linearly over the half chunk at each end).
    """
    use = keep & np.isfinite(sens) & np.isfinite(sigma)
    base = fit(wave)
    use &= base > 0
    n = int(use.sum())
    if n < 4 * RESIDUAL_CHUNK_MIN:
        return fit
    order = np.argsort(wave[use])
    w = wave[use][order]
    q = (sens[use] / base[use])[order]
    sq = (sigma[use] / base[use])[order]
    size = max(RESIDUAL_CHUNK_MIN, n // 40)
    starts = range(0, n - size // 2, size)
    centre = np.array([np.median(w[i:i + size]) for i in starts])
    med = np.array([np.median(q[i:i + size]) for i in starts])
    err = np.array([1.2533 * np.sqrt(np.mean(sq[i:i + size] ** 2) / sq[i:i + size].size)
                    for i in starts])
    if centre.size < 3 or np.max(np.abs(med - 1) / err) < RESIDUAL_SIGNIFICANCE:
        return fit
    # nodes at the domain ends, extrapolated from the outermost two chunks
    lo = med[0] + (med[1] - med[0]) * (domain[0] - centre[0]) / (centre[1] - centre[0])
    hi = med[-1] + (med[-1] - med[-2]) * (domain[1] - centre[-1]) / (centre[-1] - centre[-2])
    nodes_x = np.concatenate([[domain[0]], centre, [domain[1]]])
    nodes_c = np.concatenate([[lo], med, [hi]])
    keep_nodes = np.concatenate([[True], np.diff(nodes_x) > 0])
    nodes_x, nodes_c = nodes_x[keep_nodes], nodes_c[keep_nodes]

    def model(x):
        return fit(x) * np.interp(x, nodes_x, nodes_c)

    model.degree = fit.degree  # type: ignore[attr-defined]
    return model


def _inverse(fit, x: np.ndarray) -> np.ndarray:
    """R = 1/S; a non-positive sensitivity (an order's very end, no light) has none (NaN)."""
    model = fit(x)
    return np.where(model > 0, 1.0 / np.where(model > 0, model, 1.0), np.nan)


def _tabulate(fit, domain: tuple[float, float]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sample R = 1/S so that linear interpolation between the samples is within
    :data:`RESPONSE_TABULATION_TOL` of it: a regular grid refined where R bends (the faint
    order ends)."""
    x = np.linspace(domain[0], domain[1], RESPONSE_SAMPLES)
    for _ in range(12):
        r = _inverse(fit, x)
        mid = 0.5 * (x[:-1] + x[1:])
        with np.errstate(invalid="ignore"):
            err = np.abs(0.5 * (r[:-1] + r[1:]) / _inverse(fit, mid) - 1)
        bad = np.isfinite(err) & (err > RESPONSE_TABULATION_TOL)
        if not bad.any():
            break
        x = np.sort(np.concatenate([x, mid[bad]]))
    return x, _inverse(fit, x)


def _order_sensitivity(table: Table, sel: np.ndarray, wave_cat: np.ndarray,
                       flux_cat: np.ndarray, exptime: float, airmass: float,
                       flux_column: str, variance_column: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured sensitivity S = 1/R of the rows ``sel`` and its error."""
    wave = np.asarray(table["wavelengthMean"], float)[sel]
    scale = np.asarray(table["pixelScaleNm"], float)[sel]
    counts = np.asarray(table[flux_column], float)[sel]
    err = np.sqrt(np.asarray(table[variance_column], float)[sel])
    cat = _catalogue_at(wave_cat, flux_cat, wave)
    factor = 10 ** (0.4 * extinction(wave) * airmass) / (exptime * 10.0 * scale * cat)
    return wave, counts * factor, err * factor


def fit_response(orders_table: Table, standard_flux, exptime: float, airmass: float,
                 poly_order: int = 7, max_iteration: int = 5,
                 flux_column: str = "extractedFluxOptimal",
                 variance_column: str = "varianceSpectrum") -> Response:
    """Measure the response function on an extracted flux standard.

    In each order the sensitivity ``S = c / t / (10 Δλ) · 10^(0.4 k X) / F_cat`` (the
    inverse of the response) of every usable row is fitted with a polynomial of degree
    ``poly_order`` in wavelength (Chebyshev basis over the order's range, weighted by the
    errors), clipped iteratively (``max_iteration`` times at 4 robust sigma); telluric bands
    and stellar line cores are left out (an order with less than half of its range outside
    them keeps the bands, and says so).  The fit is done on S, not R, because S is linear in
    the counts: the noise stays Gaussian and unbiased even where the blaze is faint.

    Parameters
    ----------
    orders_table : astropy.table.Table
        Extracted orders of the standard (meta ``ARM``, optionally ``INSTRUME``).
    standard_flux : tuple
        ``(name, wave_nm, flux)`` from :func:`find_standard` (or ``(wave_nm, flux)``, or a
        star name).
    exptime : float
        Exposure time (s).
    airmass : float
        Mean airmass of the exposure.
    poly_order, max_iteration : int
        Degree of the per-order polynomials (and of soxspipe's merged one) and clipping
        iterations (``response.poly_order`` / ``response.max_iteration``).

    Returns
    -------
    Response

    Raises
    ------
    InputError
        Bad columns, exposure time or airmass, or no order with enough usable rows.
    """
    _checked_columns(orders_table, ("order", "wavelengthMean", "pixelScaleNm", flux_column,
                                    variance_column), "extracted standard")
    if not (np.isfinite(exptime) and exptime > 0):
        raise InputError(f"exposure time of the standard must be > 0 s, not {exptime}")
    if not (np.isfinite(airmass) and airmass >= 1.0 - 1e-6):
        raise InputError(f"airmass of the standard must be >= 1, not {airmass}")
    name, wave_cat, flux_cat = _standard_arrays(standard_flux)
    arm, instrument = _meta_arm(orders_table)
    usable = row_usable(orders_table, flux_column, variance_column)
    order_col = np.asarray(orders_table["order"])
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    fits_: list[OrderFit] = []
    for n in np.unique(order_col):
        sel = usable & (order_col == n)
        if sel.sum() < 2 * (poly_order + 1):
            log.warning("response: order %s has %d usable rows, too few for a degree-%d fit; "
                        "left out", n, sel.sum(), poly_order)
            continue
        wave, sens, sigma = _order_sensitivity(orders_table, sel, wave_cat, flux_cat,
                                               exptime, airmass, flux_column, variance_column)
        finite = np.isfinite(sens) & np.isfinite(sigma) & (sigma > 0)
        if finite.sum() < 2 * (poly_order + 1):
            log.warning("response: order %s lies outside the catalogue spectrum; left out", n)
            continue
        tell, line = line_mask(wave)
        # a band at an order's end is fitted through (clipping removes deep absorption):
        # left out, the polynomial would be extrapolated there, which it does wildly
        clear = finite & ~tell
        if clear.any():
            tell &= (wave > wave[clear].min()) & (wave < wave[clear].max())
        masked = tell | line
        fitted = finite & ~masked
        # the bands may leave too little to fit: fewer than half the rows or a covered
        # range shorter than half the order
        fallback = (fitted.sum() < max(2 * (poly_order + 1), 0.5 * finite.sum())
                    or np.ptp(wave[fitted]) < 0.5 * np.ptp(wave[finite]))
        if fallback:
            log.warning("response: order %s is mostly inside telluric bands; fitted through "
                        "them", n)
            fitted = finite & ~line
        domain = (float(wave[finite].min()), float(wave[finite].max()))
        x = np.where(fitted, wave, np.nan)
        fit, keep = _robust_clip_fit(x, sens, sigma, poly_order, max_iteration, domain)
        model = _with_residual_correction(fit, wave, sens, sigma, keep, domain)
        curves[int(n)] = _tabulate(model, domain)
        fits_.append(OrderFit(int(n), wave, sens, sigma, keep, masked, fit.degree(),
                              bool(fallback), fit, model))
    if not curves:
        raise InputError("no order of the standard has enough usable rows for a response")
    response = Response(arm=arm, instrument=instrument, orders=curves, standard=name,
                        exptime=float(exptime), airmass=float(airmass), fits=fits_)
    _fit_merged_polynomial(response, orders_table, usable, wave_cat, flux_cat, exptime,
                           airmass, poly_order, max_iteration, flux_column, variance_column)
    return response


def _fit_merged_polynomial(response: Response, table: Table, usable: np.ndarray,
                           wave_cat: np.ndarray, flux_cat: np.ndarray, exptime: float,
                           airmass: float, poly_order: int, max_iteration: int,
                           flux_column: str, variance_column: str) -> None:
    """soxspipe's one-polynomial response, fitted to the merged spectrum of the standard."""
    along_col = next((c for c in ("ycoord", "xcoord") if c in table.colnames), None)
    along = np.asarray(table[along_col]) if along_col else np.arange(len(table))
    try:
        step = merge_step(response.arm)
    except InputError:
        step = 0.02
    m = merge_values(table["order"], table["wavelengthMean"], table["pixelScaleNm"], along,
                     table[flux_column], table[variance_column], step, usable=usable)
    # soxspipe's FLUX_COUNTS: e- per detector pixel = density (e-/nm) x pixel width (nm)
    per_pixel = m.density * m.pixel_scale
    err = np.sqrt(m.variance_density) * m.pixel_scale
    cat = _catalogue_at(wave_cat, flux_cat, m.wave)
    ext = 10 ** (0.4 * extinction(m.wave) * airmass)
    # fit the sensitivity (linear in the counts), report the response
    sens = per_pixel / exptime * ext / (cat * 1e17)
    sigma = err / exptime * ext / (cat * 1e17)
    tell, line = line_mask(m.wave)
    ok = np.isfinite(sens) & np.isfinite(sigma) & (sigma > 0) & ~tell & ~line & (m.qual == 0)
    if ok.sum() < 2 * (poly_order + 1):
        return
    domain = (float(m.wave[ok].min()), float(m.wave[ok].max()))
    fit, keep = _robust_clip_fit(np.where(ok, m.wave, np.nan), sens, sigma, poly_order,
                                 max_iteration, domain)
    # soxspipe evaluates R itself as a polynomial in nm: fit R on the kept points, in a
    # scaled variable for conditioning, then convert to plain monomials
    resp = 1.0 / np.where(sens > 0, sens, np.nan)
    use = keep & np.isfinite(resp)
    rel_sigma = sigma[use] / sens[use]
    lo, hi = float(m.wave[use].min()), float(m.wave[use].max())
    cheb = _cheb_fit(m.wave[use], resp[use], 1.0 / (rel_sigma * resp[use]), poly_order,
                     (lo, hi))
    coeffs = cheb.convert(kind=np.polynomial.Polynomial).coef[::-1]
    response.merged_coeffs = np.asarray(coeffs, float)
    response.merged_fit = dict(wave=m.wave[use], measured=resp[use],
                               fitted=np.polyval(response.merged_coeffs, m.wave[use]))


def read_response(path: str | os.PathLike) -> Response:
    """Read a RESP_TAB: ours (HDU 2 ``RESPONSE_ORDERS``) or soxspipe's (HDU 1 only).

    Raises
    ------
    InputError
        When the file is unreadable or holds no response in either layout.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path) as hdul:
            primary = hdul[0].header
            arm = str(primary.get("ESO SEQ ARM", "")).strip().upper()
            inst = primary.get("INSTRUME")
            orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            coeffs = None
            std, expt, airm = "", float("nan"), float("nan")
            if len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU):
                data = hdul[1].data
                names = [n.lower() for n in data.columns.names]
                if "polyorder" in names:
                    deg = int(data.field(names.index("polyorder"))[0])
                    cols = {n.lower(): n for n in data.columns.names}
                    coeffs = np.array([float(data[cols[f"c{i}"]][0])
                                       for i in range(deg + 1)])
                    if not np.all(np.isfinite(coeffs)):
                        coeffs = None
                arm = arm or str(hdul[1].header.get("ARM", "")).strip().upper()
            if "RESPONSE_ORDERS" in hdul:
                hdu = hdul["RESPONSE_ORDERS"]
                d = hdu.data
                o = np.asarray(d["ORDER"], int)
                w = np.asarray(d["WAVE"], float)
                r = np.asarray(d["RESPONSE"], float)
                for n in np.unique(o):
                    s = o == n
                    srt = np.argsort(w[s])
                    orders[int(n)] = (w[s][srt], r[s][srt])
                h = hdu.header
                arm = arm or str(h.get("ARM", "")).strip().upper()
                inst = inst or h.get("INSTRUME")
                std = str(h.get("STDNAME", ""))
                expt = float(h.get("STDEXPT", np.nan))
                airm = float(h.get("STDAIRM", np.nan))
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise InputError(f"{path}: not a readable response table ({exc})") from exc
    if not orders and coeffs is None:
        raise InputError(f"{path}: no response in it (neither soxspipe's polyOrder/c0.. row "
                         "nor a RESPONSE_ORDERS extension)")
    return Response(arm=arm, instrument=None if inst is None else str(inst).strip().upper(),
                    orders=orders, merged_coeffs=coeffs, standard=std, source=str(path),
                    exptime=expt, airmass=airm)


# ---------------------------------------------------------------------------- calibration
def _check_response_arm(response: Response, table: Table) -> None:
    arm, instrument = _meta_arm(table)
    if arm and response.arm and arm != response.arm:
        raise InputError(f"{response.source}: response of the {response.arm} arm, the "
                         f"spectrum is of the {arm} arm")
    if instrument and response.instrument and not (
            {instrument, response.instrument} <= {"XSHOOTER", "SHOOT"}
            or instrument == response.instrument):
        raise InputError(f"{response.source}: response of {response.instrument}, the "
                         f"spectrum is of {instrument}")
    if response.orders:
        have = set(np.unique(np.asarray(table["order"])).tolist())
        if not have & set(response.orders):
            raise InputError(f"{response.source}: the response has orders "
                             f"{sorted(response.orders)}, the spectrum {sorted(have)}: "
                             "not the same arm")


def calibrate_orders(orders_table: Table, response: Response, exptime: float,
                     airmass: float, flux_column: str = "extractedFluxOptimal",
                     variance_column: str = "varianceSpectrum") -> Table:
    """Flux-calibrate each extracted order: a copy of the table with ``fluxCalibrated`` and
    ``fluxCalibratedErr`` (erg s⁻¹ cm⁻² Å⁻¹) per row; NaN where the order has no response
    or the row is not usable.

    Raises
    ------
    InputError
        Response of another arm/instrument, bad exposure time or airmass.
    """
    _checked_columns(orders_table, ("order", "wavelengthMean", "pixelScaleNm", flux_column,
                                    variance_column), "extracted-orders table")
    if not (np.isfinite(exptime) and exptime > 0):
        raise InputError(f"exposure time must be > 0 s, not {exptime}")
    if not (np.isfinite(airmass) and airmass >= 1.0 - 1e-6):
        raise InputError(f"airmass must be >= 1, not {airmass}")
    _check_response_arm(response, orders_table)
    out = orders_table.copy(copy_data=True)
    wave = np.asarray(out["wavelengthMean"], float)
    scale = np.asarray(out["pixelScaleNm"], float)
    counts = np.asarray(out[flux_column], float)
    var = np.asarray(out[variance_column], float)
    order = np.asarray(out["order"])
    resp = np.full(wave.size, np.nan)
    for n in np.unique(order):
        sel = order == n
        if response.orders and int(n) not in response.orders:
            log.warning("%s: no response for order %s; it is not calibrated",
                        response.source, n)
            continue
        resp[sel] = response.evaluate(int(n), wave[sel], scale[sel])
    factor = 10 ** (0.4 * extinction(wave) * airmass) * resp / (exptime * 10.0 * scale)
    usable = row_usable(out, flux_column, variance_column)
    out["fluxCalibrated"] = np.where(usable, counts * factor, np.nan)
    out["fluxCalibrated"].unit = "erg/(s cm2 Angstrom)"
    out["fluxCalibratedErr"] = np.where(usable, np.sqrt(np.where(var > 0, var, np.nan))
                                        * factor, np.nan)
    out["fluxCalibratedErr"].unit = "erg/(s cm2 Angstrom)"
    return out


def flux_calibrate(orders_table: Table, response: Response, exptime: float,
                   airmass: float, flux_column: str = "extractedFluxOptimal",
                   variance_column: str = "varianceSpectrum",
                   step: float | None = None) -> Table:
    """Flux-calibrate the extracted orders and merge them (EXTRACTED FLUXCAL SPECTRUM).

    Each order is calibrated with its own response (:func:`calibrate_orders`); the calibrated
    orders are merged like counts (:func:`~soxs_core.spectrum.merge.merge_values`: each row's
    flux times its width is rebinned by overlap and the orders are combined by inverse
    variance).

    Returns
    -------
    astropy.table.Table
        ``WAVE`` (nm), ``FLUX_CALIBRATED`` (erg s⁻¹ cm⁻² Å⁻¹, soxspipe's column), and ours:
        ``ERR_CALIBRATED`` (1σ), ``SNR``, ``NORDERS``, ``QUAL`` (as the merged table's).
        Meta: the input's, with ``MERGSTEP``, ``RESPFILE`` and ``STDNAME``.
    """
    cal = calibrate_orders(orders_table, response, exptime, airmass, flux_column,
                           variance_column)
    along_col = next((c for c in ("ycoord", "xcoord") if c in cal.colnames), None)
    along = np.asarray(cal[along_col]) if along_col else np.arange(len(cal))
    scale = np.asarray(cal["pixelScaleNm"], float)
    value = np.asarray(cal["fluxCalibrated"], float) * 10.0 * scale  # erg/s/cm2 per pixel
    var = (np.asarray(cal["fluxCalibratedErr"], float) * 10.0 * scale) ** 2
    step = merge_step(response.arm or _meta_arm(cal)[0]) if step is None else float(step)
    usable = np.isfinite(value) & np.isfinite(var) & (var > 0)
    if not usable.any():
        raise InputError(f"{response.source}: no row could be calibrated (no order of the "
                         "spectrum is covered by the response)")
    m = merge_values(cal["order"], cal["wavelengthMean"], scale, along, value, var, step,
                     usable=usable)
    out = Table(meta=dict(orders_table.meta))
    out.meta["MERGSTEP"] = m.step
    out.meta["RESPFILE"] = Path(response.source).name
    if response.standard:
        out.meta["STDNAME"] = response.standard
    flux = m.density / 10.0  # per nm -> per Angstrom
    err = np.sqrt(m.variance_density) / 10.0
    out["WAVE"] = m.wave
    out["WAVE"].unit = "nm"
    out["FLUX_CALIBRATED"] = flux
    out["FLUX_CALIBRATED"].unit = "erg/(s cm2 Angstrom)"
    out["ERR_CALIBRATED"] = err
    out["ERR_CALIBRATED"].unit = "erg/(s cm2 Angstrom)"
    with np.errstate(invalid="ignore", divide="ignore"):
        out["SNR"] = flux / err
    out["NORDERS"] = m.norders
    out["QUAL"] = m.qual
    return out


# ---------------------------------------------------------------------------- efficiency
def efficiency(orders_table: Table, standard, exptime: float, airmass: float,
               area_cm2: float, flux_column: str = "extractedFluxOptimal",
               variance_column: str = "varianceSpectrum") -> Table:
    """Efficiency of telescope + instrument + detector measured on a flux standard.

    ``EFFICIENCY = c · 10^(0.4 k X) / N`` per extracted row, with ``N = F_cat · 10 Δλ ·
    area · t / (h c / λ)`` the photons of the standard arriving above the atmosphere in the
    row's wavelength bin: the atmosphere is removed, the blaze (unless flat-fielded) and slit
    losses are included.

    Parameters
    ----------
    orders_table : astropy.table.Table
        Extracted orders of the standard.
    standard : tuple or str
        ``(name, wave_nm, flux)`` (:func:`find_standard`) or a star name.
    exptime, airmass : float
        Of the exposure.
    area_cm2 : float
        Telescope collecting area (:func:`telescope_area_cm2`).

    Returns
    -------
    astropy.table.Table
        ``ORDER``, ``WAVE`` (nm), ``EFFICIENCY``, ``EFFICIENCY_ERR``, ``QUAL``
        (:class:`EfficiencyQual`), sorted by order and wavelength (EFFICIENCY_TAB).
    """
    _checked_columns(orders_table, ("order", "wavelengthMean", "pixelScaleNm", flux_column,
                                    variance_column), "extracted standard")
    if not (np.isfinite(area_cm2) and area_cm2 > 0):
        raise InputError(f"telescope area must be > 0 cm2, not {area_cm2}")
    if not (np.isfinite(exptime) and exptime > 0):
        raise InputError(f"exposure time must be > 0 s, not {exptime}")
    name, wave_cat, flux_cat = _standard_arrays(standard)
    wave = np.asarray(orders_table["wavelengthMean"], float)
    scale = np.asarray(orders_table["pixelScaleNm"], float)
    counts = np.asarray(orders_table[flux_column], float)
    var = np.asarray(orders_table[variance_column], float)
    cat = _catalogue_at(wave_cat, flux_cat, wave)
    photon_energy = H_PLANCK * C_LIGHT / (wave * 1e-7)
    photons = cat * 10.0 * scale * area_cm2 * exptime / photon_energy
    ext = 10 ** (0.4 * extinction(wave) * airmass)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = counts * ext / photons
        err = np.sqrt(np.where(var > 0, var, np.nan)) * ext / photons
    usable = row_usable(orders_table, flux_column, variance_column) & np.isfinite(eff)
    tell, line = line_mask(wave)
    qual = np.zeros(wave.size, np.uint8)
    qual[~usable] |= EfficiencyQual.BAD_ROW
    qual[tell] |= EfficiencyQual.TELLURIC
    qual[line] |= EfficiencyQual.LINE
    order = np.asarray(orders_table["order"])
    srt = np.lexsort((wave, order))
    out = Table(meta=dict(orders_table.meta))
    out.meta["STDNAME"] = name
    out.meta["AREA"] = float(area_cm2)
    out["ORDER"] = order[srt].astype(np.int32)
    out["WAVE"] = wave[srt]
    out["WAVE"].unit = "nm"
    out["EFFICIENCY"] = eff[srt]
    out["EFFICIENCY_ERR"] = err[srt]
    out["QUAL"] = qual[srt]
    return out


# ---------------------------------------------------------------------------- QC
def spectrum_qc(orders_table: Table | None = None, merged: Table | None = None,
                efficiency_table: Table | None = None) -> QcMeasurements:
    """QC of the extracted spectrum: ``SNR MEDIAN`` (median SNR of the merged spectrum's
    good bins; of the extracted rows without a merged table), ``SNR MEDIAN O<N>`` (median
    ``snr`` of order N's usable rows), and with an efficiency table ``EFF MEDIAN`` and
    ``EFF MEDIAN O<N>`` (median efficiency of the rows with QUAL 0)."""
    qc = QcMeasurements()
    usable = None
    if orders_table is not None and "snr" in orders_table.colnames:
        snr = np.asarray(orders_table["snr"], float)
        usable = np.isfinite(snr)
        if "qual" in orders_table.colnames:
            usable &= np.asarray(orders_table["qual"]) == 0
        order = np.asarray(orders_table["order"])
        for n in np.unique(order):
            sel = usable & (order == n)
            qc.add(f"SNR MEDIAN O{int(n)}", float(np.median(snr[sel])) if sel.any() else None,
                   f"order {int(n)} has no usable extracted row")
    if merged is not None:
        snr = np.asarray(merged["SNR"], float)
        good = np.isfinite(snr)
        if "QUAL" in merged.colnames:
            good &= np.asarray(merged["QUAL"]) == 0
        qc.add("SNR MEDIAN", float(np.median(snr[good])) if good.any() else None,
               "the merged spectrum has no good bin")
    elif usable is not None:
        snr = np.asarray(orders_table["snr"], float)
        qc.add("SNR MEDIAN", float(np.median(snr[usable])) if usable.any() else None,
               "no usable extracted row")
    if efficiency_table is not None:
        eff = np.asarray(efficiency_table["EFFICIENCY"], float)
        good = (np.asarray(efficiency_table["QUAL"]) == 0) & np.isfinite(eff)
        qc.add("EFF MEDIAN", float(np.median(eff[good])) if good.any() else None,
               "no row outside the telluric bands and line cores")
        order = np.asarray(efficiency_table["ORDER"])
        for n in np.unique(order):
            sel = good & (order == n)
            qc.add(f"EFF MEDIAN O{int(n)}", float(np.median(eff[sel])) if sel.any() else None,
                   f"order {int(n)} has no row outside the telluric bands and line cores")
    return qc
