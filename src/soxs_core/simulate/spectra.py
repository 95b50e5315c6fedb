"""Spectral ingredients: telescope, efficiency, blaze, lamps, sky, stars and standards.

Every function returns photon-rate *densities* in photons s^-1 nm^-1 (point sources: through
the whole telescope aperture; slit-filling sources: per arcsec of slit length, i.e. already
multiplied by the slit width) **before** the instrument efficiency and blaze, which
:mod:`soxs_core.simulate.scene` applies.  Wavelengths are in nm (air).
"""

from __future__ import annotations

import functools

import numpy as np
from astropy.io import fits

from soxs_core.calib import static_dir, static_path
from soxs_core.detector.instruments import Arm
from soxs_core.simulate.echelle import EchelleFormat

__all__ = [
    "H_PLANCK", "C_LIGHT", "TELESCOPE_AREA_M2", "RESOLVING_POWER", "DEFAULT_SLIT_WIDTH",
    "telescope_area_cm2", "efficiency", "blaze", "flam_to_photons", "ab_mag_to_flam",
    "extinction_mag", "qth_lamp", "d2_lamp", "sky_continuum", "sky_lines", "stellar_spectrum",
    "black_body_star", "standard_star", "STANDARD_STARS", "SKYLINE_UNIT", "ABSORPTION_LINES",
]

H_PLANCK = 6.62607015e-27  # erg s
C_LIGHT = 2.99792458e10  # cm/s
K_BOLTZ = 1.380649e-16  # erg/K

#: Effective collecting areas (m²): VLT UT (8.2 m, X-shooter) and NTT (3.58 m, SOXS), both
#: with their central obstruction removed.
TELESCOPE_AREA_M2 = {"XSHOOTER": 50.0, "SOXS": 0.25 * np.pi * (3.58**2 - 1.0**2)}
TELESCOPE_DIAMETER_M = {"XSHOOTER": 8.2, "SOXS": 3.58}

#: Resolving power λ/Δλ for the default slits.
RESOLVING_POWER = {"xsh_uvb": 5400.0, "xsh_vis": 8900.0, "xsh_nir": 5600.0,
                   "soxs_vis": 4500.0, "soxs_nir": 5000.0}

#: Default science slit widths (arcsec).
DEFAULT_SLIT_WIDTH = {"xsh_uvb": 1.0, "xsh_vis": 0.9, "xsh_nir": 0.9, "soxs_vis": 1.0,
                      "soxs_nir": 1.0}

#: Total efficiency (atmosphere excluded; telescope + instrument + detector) at the blaze peak.
_EFFICIENCY = {
    "xsh_uvb": ((295, 0.04), (320, 0.12), (350, 0.18), (400, 0.22), (450, 0.22), (500, 0.18),
                (560, 0.10), (605, 0.05)),
    "xsh_vis": ((520, 0.15), (600, 0.22), (700, 0.24), (800, 0.22), (900, 0.15), (1000, 0.06),
                (1055, 0.03)),
    "xsh_nir": ((975, 0.15), (1100, 0.22), (1300, 0.25), (1600, 0.28), (2000, 0.25),
                (2300, 0.20), (2510, 0.10)),
    "soxs_vis": ((345, 0.08), (400, 0.15), (500, 0.20), (600, 0.21), (700, 0.20), (800, 0.14),
                 (855, 0.10)),
    "soxs_nir": ((790, 0.10), (900, 0.15), (1100, 0.20), (1300, 0.22), (1600, 0.22),
                 (1900, 0.18), (2040, 0.12)),
}

#: Sky emission-line flux of one unit of the ``FLUX`` column of ``skylines.fits`` in photons
#: s^-1 m^-2 arcsec^-2: puts [O I] 557.7 nm at ~250 R and the brightest H-band OH lines at
#: ~8000 R.
SKYLINE_UNIT = 0.0305

#: Strong stellar absorption lines (nm, depth, Gaussian sigma nm) of a solar-type star.
ABSORPTION_LINES = (
    (393.37, 0.8, 0.6), (396.85, 0.8, 0.6), (410.17, 0.3, 0.4), (434.05, 0.35, 0.4),
    (486.13, 0.4, 0.35), (517.27, 0.3, 0.1), (518.36, 0.3, 0.1), (588.99, 0.5, 0.08),
    (589.59, 0.45, 0.08), (656.28, 0.45, 0.3), (849.80, 0.4, 0.15), (854.21, 0.5, 0.2),
    (866.21, 0.45, 0.18), (1004.94, 0.15, 0.3), (1093.82, 0.2, 0.35), (1281.81, 0.25, 0.4),
    (1588.8, 0.1, 0.4), (1641.2, 0.12, 0.4), (1736.7, 0.15, 0.5), (2166.1, 0.2, 0.6),
)

#: Spectrophotometric standards in ``flux_standards_binned.fits``.
STANDARD_STARS = ("GD71", "LTT3218", "GD153", "EG274", "LTT7987", "Feige110", "EG21")


def telescope_area_cm2(arm: Arm) -> float:
    """Effective collecting area of the arm's telescope in cm²."""
    return TELESCOPE_AREA_M2[arm.instrument] * 1e4


def efficiency(arm: Arm, wl: np.ndarray) -> np.ndarray:
    """End-to-end efficiency at the blaze peak (no atmosphere) at wavelengths ``wl`` (nm)."""
    pts = np.array(_EFFICIENCY[arm.code], float)
    return np.interp(wl, pts[:, 0], pts[:, 1], left=pts[0, 1] * 0.5, right=pts[-1, 1] * 0.5)


def blaze(fmt: EchelleFormat, order: int, wl: np.ndarray) -> np.ndarray:
    """Relative grating efficiency of one order (1 at the blaze peak).

    Echelle orders follow ``sinc²(π n (1 - λ_b/λ) α)`` with ``λ_b`` at the order centre and
    α = 0.9; the four SOXS UV-VIS quasi-orders have a flat top with soft band edges.
    """
    wl = np.asarray(wl, float)
    lo, hi = fmt._wlmin[int(order)], fmt._wlmax[int(order)]
    centre = 0.5 * (lo + hi)
    if fmt.arm.code == "soxs_vis":
        width = 0.5 * (hi - lo) * 0.92
        return 1.0 / (1.0 + ((wl - centre) / width) ** 8)
    x = 0.9 * order * (1.0 - centre / wl)
    return np.sinc(x) ** 2


def flam_to_photons(flam: np.ndarray, wl: np.ndarray, area_cm2: float) -> np.ndarray:
    """erg s-1 cm-2 Å-1 -> photons s-1 nm-1 collected by ``area_cm2``."""
    energy = H_PLANCK * C_LIGHT / (np.asarray(wl, float) * 1e-7)
    return np.asarray(flam, float) * 10.0 * area_cm2 / energy


def ab_mag_to_flam(mag: float, wl: float) -> float:
    """F_λ (erg s-1 cm-2 Å-1) of an AB magnitude at wavelength ``wl`` nm."""
    fnu = 10 ** (-0.4 * (mag + 48.6))
    return fnu * C_LIGHT / (wl * 1e-7) ** 2 * 1e-8


@functools.cache
def _extinction_table() -> tuple[np.ndarray, np.ndarray]:
    with fits.open(static_dir() / "simulator" / "extinction_lasilla.fits") as hdul:
        data = hdul[1].data
        return np.asarray(data["WAVE"], float) / 10.0, np.asarray(data["MAG_AIRMASS"], float)


def extinction_mag(wl: np.ndarray) -> np.ndarray:
    """La Silla extinction (mag per airmass); 0.01 mag beyond the table's red end."""
    w, k = _extinction_table()
    return np.interp(wl, w, k, left=k[0] * 1.5, right=k[-1])


def _planck_photons(wl: np.ndarray, temp: float) -> np.ndarray:
    """Photon radiance shape ∝ λ^-4 / (exp(hc/λkT) - 1) (arbitrary units)."""
    lam = np.asarray(wl, float) * 1e-7
    x = H_PLANCK * C_LIGHT / (lam * K_BOLTZ * temp)
    return (lam * 1e4) ** -4 / np.expm1(np.minimum(x, 700.0))


def qth_lamp(wl: np.ndarray, temp: float = 3100.0) -> np.ndarray:
    """Relative photon spectrum of a quartz-tungsten-halogen lamp (black body)."""
    ref = _planck_photons(np.array([1000.0]), temp)[0]
    return _planck_photons(wl, temp) / ref


def d2_lamp(wl: np.ndarray) -> np.ndarray:
    """Relative photon spectrum of a deuterium lamp: strong UV continuum fading to the red."""
    wl = np.asarray(wl, float)
    return np.exp(-(wl - 300.0) / 45.0)


def sky_continuum(wl: np.ndarray, arm: Arm, slit_width: float, level: float = 1.0
                  ) -> np.ndarray:
    """Sky continuum (moonless) in photons s-1 nm-1 per arcsec of slit length.

    Optical: V ≈ 21.7 mag arcsec⁻² with a gently reddening slope; near-IR: a faint continuum
    between the OH lines plus the thermal emission of a 280 K telescope with emissivity 0.15.
    """
    wl = np.asarray(wl, float)
    flam = 7.5e-18 * (wl / 550.0) ** 0.5 * np.where(wl < 380, (wl / 380.0) ** 3, 1.0)
    flam = np.where(wl > 1000, 4e-18 * (wl / 1000.0) ** -1, flam)
    # thermal background, per arcsec²: B_λ(T) ε Ω
    lam = wl * 1e-7
    b_lam = (2 * H_PLANCK * C_LIGHT**2 / lam**5
             / np.expm1(np.minimum(H_PLANCK * C_LIGHT / (lam * K_BOLTZ * 280.0), 700.0)))
    flam = flam + 0.15 * b_lam * 1e-8 * (np.pi / 180 / 3600) ** 2
    return level * slit_width * flam_to_photons(flam, wl, telescope_area_cm2(arm))


@functools.cache
def _skyline_table(inst_dir: str) -> tuple[np.ndarray, np.ndarray]:
    with fits.open(static_dir() / inst_dir / "skylines.fits") as hdul:
        data = hdul[1].data
        return np.asarray(data["WAVELENGTH"], float), np.asarray(data["FLUX"], float)


def sky_lines(arm: Arm, slit_width: float, level: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sky emission lines: wavelengths (nm) and photons s-1 per arcsec of slit length."""
    static_path(arm, "skylines.fits")  # raises a clear error when not shipped
    wl, flux = _skyline_table(arm.static_dir)
    rate = flux * SKYLINE_UNIT * TELESCOPE_AREA_M2[arm.instrument] * slit_width * level
    return wl, rate


def stellar_spectrum(wl: np.ndarray, mag_ab: float = 17.0, teff: float = 5800.0,
                     seed: int = 0, n_weak: int = 400) -> np.ndarray:
    """F_λ (erg s-1 cm-2 Å-1) of a star: black body normalised to ``mag_ab`` at 550 nm with
    strong (Balmer, Ca, Na, Mg, Paschen, Brackett) and random weak absorption lines."""
    wl = np.asarray(wl, float)
    shape = _planck_photons(wl, teff) * (wl / 550.0) ** -1  # photons -> energy
    shape /= _planck_photons(np.array([550.0]), teff)[0]
    flam = ab_mag_to_flam(mag_ab, 550.0) * shape
    tau = np.zeros_like(wl)
    for centre, depth, sigma in ABSORPTION_LINES:
        tau += -np.log(1 - depth) * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x57A2]))
    centres = rng.uniform(300.0, 2500.0, n_weak)
    depths = rng.uniform(0.05, 0.3, n_weak)
    sigmas = centres / 30000.0 * rng.uniform(1.0, 3.0, n_weak)
    if wl.size > 1 and np.all(np.diff(wl) > 0):
        # each weak line only touches the grid points within 6 sigma (sparse, vectorised)
        lo = np.searchsorted(wl, centres - 6 * sigmas)
        hi = np.searchsorted(wl, centres + 6 * sigmas)
        count = hi - lo
        owner = np.repeat(np.arange(n_weak), count)
        idx = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
        prof = np.exp(-0.5 * ((wl[idx] - centres[owner]) / sigmas[owner]) ** 2)
        tau += np.bincount(idx, weights=prof * -np.log(1 - depths[owner]), minlength=wl.size)
    return flam * np.exp(-tau)


def black_body_star(wl: np.ndarray, mag_ab: float = 10.5, teff: float = 15000.0
                    ) -> np.ndarray:
    """F_λ (erg s-1 cm-2 Å-1) of a smooth black body normalised to ``mag_ab`` at 550 nm: a
    hot telluric standard without absorption lines."""
    wl = np.asarray(wl, float)
    shape = _planck_photons(wl, teff) * (wl / 550.0) ** -1  # photons -> energy
    shape /= _planck_photons(np.array([550.0]), teff)[0]
    return ab_mag_to_flam(mag_ab, 550.0) * shape


@functools.cache
def _standards() -> dict[str, np.ndarray]:
    with fits.open(static_dir() / "simulator" / "flux_standards_binned.fits") as hdul:
        data = hdul[1].data
        return {name: np.asarray(data[name], float) for name in data.columns.names}


def standard_star(name: str, wl: np.ndarray) -> np.ndarray:
    """Tabulated F_λ (erg s-1 cm-2 Å-1) of a spectrophotometric standard at ``wl`` nm."""
    table = _standards()
    key = {k.upper(): k for k in table}.get(name.upper())
    if key is None or key == "WAVE":
        raise KeyError(f"unknown standard {name!r}; choose from {', '.join(STANDARD_STARS)}")
    return np.interp(wl, table["WAVE"], table[key])
