"""Full instrument simulator: detector + echelle format + lamps, sky and objects.

:class:`InstrumentSimulator` renders the noiseless expected photo-electrons of lamp flats,
science and standard-star stare frames once (cached) and hands them to
:class:`~soxs_core.simulate.detector.DetectorSimulator`, which adds pixel response, dark
current, bias, Poisson and read noise, cosmic rays and saturation for each exposure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from astropy.io import fits

from soxs_core.detector.instruments import Arm
from soxs_core.simulate._common import rng_for
from soxs_core.simulate.detector import DetectorSimulator
from soxs_core.simulate.echelle import EchelleFormat, load_format
from soxs_core.simulate.headers import default_mjd, frame_kind, slit_keyword
from soxs_core.simulate.scene import (
    PointProfile,
    Renderer,
    RenderResult,
    SlitIllumination,
    Source,
    scattered_light,
)
from soxs_core.simulate.spectra import (
    DEFAULT_SLIT_WIDTH,
    RESOLVING_POWER,
    black_body_star,
    d2_lamp,
    extinction_mag,
    flam_to_photons,
    qth_lamp,
    sky_continuum,
    sky_lines,
    standard_star,
    stellar_spectrum,
    telescope_area_cm2,
)
from soxs_core.simulate.tables import (
    disp_image_hdul,
    disp_table_hdul,
    order_table_hdul,
    set_time_keywords,
)

__all__ = ["InstrumentSimulator", "SceneParameters", "FLAT_EXPTIME", "STANDARD_COORDS",
           "SCATTERED_FRACTION", "SCATTER_SCALE_PX", "TELLURIC_TARGET", "TELLURIC_EXPTIME",
           "STARE_KINDS"]

#: Stare frame types the simulator renders (science, flux standard, telluric standard).
STARE_KINDS = ("OBJECT", "STD_FLUX", "STD_TELLURIC")

#: Default lamp-flat exposure times (s).
FLAT_EXPTIME = {"xsh_uvb": 30.0, "xsh_vis": 15.0, "xsh_nir": 10.0, "soxs_vis": 20.0,
                "soxs_nir": 10.0}

#: Default fraction of the in-order light scattered into the smooth halo, per arm: puts the
#: halo between adjacent bright orders of a lamp flat at ≈3 % of their peak (SOXS VIS ≈2 %).
SCATTERED_FRACTION = {"xsh_uvb": 0.045, "xsh_vis": 0.045, "xsh_nir": 0.042,
                      "soxs_vis": 0.10, "soxs_nir": 0.055}

#: Gaussian scale (unbinned px) of the scattered-light halo.
SCATTER_SCALE_PX = 60.0

#: Name of the simulated telluric standard (a hot star, :attr:`SceneParameters.telluric_mag`).
TELLURIC_TARGET = "SIM-HOTSTAR"

#: Default exposure times (s) of the telluric standard at the default magnitude and seeing:
#: its peak pixel at 10-25 % of the saturation level unbinned (X-shooter UVB/VIS 14 %/12 %,
#: NIR 18 %, SOXS VIS 14 %, NIR 10 %) and below 85 % when binned 2x2.
TELLURIC_EXPTIME = {"xsh_uvb": 40.0, "xsh_vis": 60.0, "xsh_nir": 100.0, "soxs_vis": 60.0,
                    "soxs_nir": 300.0}

#: RA/Dec (deg, J2000) of the standards, for the headers.
STANDARD_COORDS = {"GD71": (88.1150, 15.8870), "LTT3218": (133.1526, -32.5684),
                   "GD153": (194.2597, 22.0313), "EG274": (245.8914, -39.2297),
                   "LTT7987": (302.7375, -30.2189), "FEIGE110": (349.9933, -5.1656),
                   "EG21": (47.6331, -68.6008)}


@dataclass
class SceneParameters:
    """Observing conditions, targets and lamp settings.

    Attributes
    ----------
    seeing : float
        FWHM (arcsec) at 500 nm.
    airmass : float
        Airmass of science and standard frames (extinction: La Silla curve).
    slit_width : float or None
        Slit width (arcsec); default per arm (X-shooter 1.0/0.9/0.9, SOXS 1.0).
    object_mag : float
        AB magnitude at 550 nm of the science target.
    object_teff : float
        Black-body temperature (K) of the science target's continuum.
    object_position : float
        Slit position (arcsec from the slit centre) of the target at mid-order.
    object_drift : float
        Drift (arcsec) of the target along the slit from one end of an order to the other.
    moffat_beta : float
        Moffat β of the seeing profile.
    sky_level : float
        Multiplier of the dark-sky continuum and emission lines.
    standard : str
        Spectrophotometric standard observed in ``STD_FLUX`` frames.
    telluric_mag : float
        AB magnitude at 550 nm of the telluric standard of ``STD_TELLURIC`` frames: a hot
        star whose spectrum is a smooth black body (no absorption lines).
    telluric_teff : float
        Its black-body temperature (K).
    flat_level : float or None
        Peak (99.5th percentile) lamp-flat level in e- per binned pixel; default 45 % of the
        saturation level, at most 45 000 e-.
    lamp_jitter : float
        rms frame-to-frame lamp-brightness change.
    scattered_fraction : float or None
        Fraction of the in-order light scattered into a smooth inter-order background
        (Gaussian halo of :data:`SCATTER_SCALE_PX` unbinned px); default per arm
        (:data:`SCATTERED_FRACTION`), which puts the light between adjacent bright orders of
        a lamp flat at about 3 % of their peak (SOXS VIS, with its wide gaps, 2 %).
    resolving_power : float or None
        λ/Δλ; default per arm, scaled inversely with the slit width.
    """

    seeing: float = 0.8
    airmass: float = 1.2
    slit_width: float | None = None
    object_mag: float = 17.0
    object_teff: float = 5800.0
    object_position: float = 0.5
    object_drift: float = 0.25
    moffat_beta: float = 3.0
    sky_level: float = 1.0
    standard: str = "GD71"
    telluric_mag: float = 10.5
    telluric_teff: float = 15000.0
    flat_level: float | None = None
    lamp_jitter: float = 0.015
    scattered_fraction: float | None = None
    resolving_power: float | None = None


#: Meaning of each column of :meth:`InstrumentSimulator.object_truth_table` (at most 68
#: characters: the text of its ``TCOMMn`` card).
_TRUTH_COLUMNS = {
    "order": "echelle order number",
    "pixel": "binned along-order pixel index (row; SOXS NIR: column)",
    "wavelength": "nm (air) at the object's trace centre in that pixel",
    "counts": "object e- of the row summed over the slit, before pixel response",
    "sky_per_pixel": "sky e- of one binned pixel at the order centre, before pixel resp.",
    "scattered_per_pixel": "scattered e- of one binned pixel at the order centre (no pix. resp.)",
    "flux": "F_lambda above the atmosphere, erg/s/cm2/Angstrom",
    "extinction_mag": "La Silla extinction at the frame's airmass, mag",
    "centre": "true trace position across the order, UNBINNED pixel coordinate",
    "slit_position": "object position along the slit, arcsec from the slit centre",
    "dispersion": "nm per binned along pixel (positive)",
}
#: The longer story of ``counts``, in the truth table's COMMENT cards.
_COUNTS_COMMENT = ("counts: the object's expected e- over the exposure in that detector row "
                   "(SOXS NIR: column) of the order, summed over every pixel of the slit, "
                   "after extinction, efficiency, blaze and slit losses but before the pixel "
                   "response: what the extraction of a frame divided by the true pixel "
                   "response (truth master flat) should recover")


class InstrumentSimulator:
    """Raw echelle frames of one arm with known truth.

    Parameters
    ----------
    arm, binning, readout, seed
        As for :class:`~soxs_core.simulate.detector.DetectorSimulator`.
    orders : sequence of int, optional
        Only illuminate these orders (fast tests); default all orders of the spectral format.
    scene : SceneParameters, optional
        Observing conditions and targets.
    **detector_kwargs
        Overrides passed to the detector model (``gain``, ``cosmic_rate``...).
    """

    def __init__(self, arm: str | Arm = "xsh_vis", binning: str = "1x1", readout: str = "slow",
                 seed: int = 1, *, orders=None, scene: SceneParameters | None = None,
                 **detector_kwargs: Any) -> None:
        self.detector = DetectorSimulator(arm, binning, readout, seed, **detector_kwargs)
        self.arm = self.detector.arm
        self.seed = int(seed)
        self.format: EchelleFormat = load_format(self.arm.code)
        self.orders = (self.format.orders.tolist() if orders is None
                       else self.format.checked_orders(orders))
        self.scene = scene or SceneParameters()
        sc = self.scene
        self.slit_width = float(sc.slit_width or DEFAULT_SLIT_WIDTH[self.arm.code])
        self.scattered_fraction = float(SCATTERED_FRACTION[self.arm.code]
                                        if sc.scattered_fraction is None
                                        else sc.scattered_fraction)
        self.resolving_power = float(sc.resolving_power or RESOLVING_POWER[self.arm.code]
                                     * DEFAULT_SLIT_WIDTH[self.arm.code] / self.slit_width)
        rng = rng_for(self.seed, self.arm.code, "slit-illumination")
        self.illumination = SlitIllumination(
            self.format.slit_length, slope=float(rng.uniform(-0.06, 0.06)),
            curvature=float(rng.uniform(-0.10, -0.03)), ripple=float(rng.uniform(0.005, 0.02)),
            ripple_phase=float(rng.uniform(0, 2 * np.pi)))
        self._renderer: Renderer | None = None
        self._cache: dict[tuple, Any] = {}
        # low-sensitivity pixels go where the flats see them well (built with the truth)
        self.detector.low_sensitivity_region = self.well_lit_mask
        sat_adu = min(65535.0, self.arm.saturation_adu)
        self.flat_level = float(sc.flat_level or min(0.45 * sat_adu * self.detector.gain,
                                                     45000.0))

    # ------------------------------------------------------------------ basics
    @property
    def truth(self):
        """Detector truth (:class:`~soxs_core.simulate.detector.DetectorTruth`)."""
        return self.detector.truth

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(self.format, self.detector.binx, self.detector.biny,
                                      self.resolving_power, self.illumination, self.orders)
        return self._renderer

    def flat_kinds(self) -> list[tuple[str, str]]:
        """``(frame type, lamp)`` of the lamp flats of this arm (UVB: D2 and QTH)."""
        if self.arm.code == "xsh_uvb":
            return [("DFLAT", "D2"), ("QFLAT", "QTH")]
        return [("FLAT", "QTH")]

    def slit_name(self) -> str:
        """Slit name as written in the header (``1.0x11`` / ``SLIT1.0``)."""
        if self.arm.instrument == "XSHOOTER":
            return f"{self.slit_width:.1f}x11"
        return f"SLIT{self.slit_width:.1f}"

    # ------------------------------------------------------------------ models
    def _scatter(self, image: np.ndarray) -> np.ndarray:
        """The scattered-light halo of an image of expected electrons."""
        det = self.detector
        return scattered_light(image, self.scattered_fraction,
                               (SCATTER_SCALE_PX / det.biny, SCATTER_SCALE_PX / det.binx))

    def slit_mask(self, inner: float = 1.0) -> np.ndarray:
        """Binned pixels whose centre falls within ``inner`` times the half slit length of the
        centre of an illuminated order (``inner=1``: between the true edges)."""
        key = ("slit-mask", float(inner))
        if key not in self._cache:
            r = self.renderer
            out = np.zeros(r.shape, dtype=bool)
            half = 0.5 * self.format.slit_length * float(inner)
            for order in r.orders:
                win = r._windows[order]
                if win is None:
                    continue
                rr, cc = r._index(win)
                sel = win["valid"] & (np.abs(win["s_c"]) <= half)
                out[rr[sel], cc[sel]] = True
            self._cache[key] = out
        return self._cache[key]

    def well_lit_mask(self, inner: float = 0.8, level: float = 0.2) -> np.ndarray:
        """Where the simulator puts low-sensitivity pixels: within ``inner`` of the half slit
        of an order (:meth:`slit_mask`) and lit by at least one of the arm's lamps to
        ``level`` times the flat level."""
        lit = np.zeros(self.renderer.shape, dtype=bool)
        for _, lamp in self.flat_kinds():
            lit |= self.order_light_model(lamp) >= level * self.flat_level
        return lit & self.slit_mask(inner)

    def order_light_model(self, lamp: str = "QTH") -> np.ndarray:
        """Expected e- per binned pixel of one nominal lamp-flat exposure in the orders alone
        (before pixel response, no scattered light)."""
        lamp = lamp.upper()
        key = ("lamp-orders", lamp)
        if key not in self._cache:
            spectrum = d2_lamp if lamp == "D2" else qth_lamp
            res = self.renderer.render([Source("lamp", spectrum)], 1.0)
            img = res.images["lamp"]
            lit = img[img > 1e-3 * img.max()]
            scale = self.flat_level / float(np.percentile(lit, 99.5))
            img *= np.float32(scale)
            self._cache[key] = img
        return self._cache[key]

    def scattered_model(self, lamp: str = "QTH") -> np.ndarray:
        """Scattered light of one nominal lamp-flat exposure: e- per binned pixel, before
        pixel response.

        A flat of lamp factor ``f`` (``info["lamp_factor"]``, ``lamp_factor`` in the night's
        ``frames.fits``) receives ``f`` times this, multiplied by the pixel response like the
        rest of its light.  ``lamp_model = order_light_model + scattered_model``.
        """
        lamp = lamp.upper()
        key = ("scattered", lamp)
        if key not in self._cache:
            self._cache[key] = self._scatter(self.order_light_model(lamp))
        return self._cache[key]

    def lamp_model(self, lamp: str = "QTH") -> np.ndarray:
        """Expected e- per binned pixel of one nominal lamp-flat exposure (before pixel
        response), scattered light included."""
        lamp = lamp.upper()
        key = ("lamp", lamp)
        if key not in self._cache:
            self._cache[key] = self.order_light_model(lamp) + self.scattered_model(lamp)
        return self._cache[key]

    def _object_source(self, kind: str) -> Source:
        sc = self.scene
        area = telescope_area_cm2(self.arm)
        ext = sc.airmass

        if kind == "STD_FLUX":
            def flam(w: np.ndarray) -> np.ndarray:
                return standard_star(sc.standard, w)
        elif kind == "STD_TELLURIC":
            def flam(w: np.ndarray) -> np.ndarray:
                return black_body_star(w, sc.telluric_mag, sc.telluric_teff)
        else:
            def flam(w: np.ndarray) -> np.ndarray:
                return stellar_spectrum(w, sc.object_mag, sc.object_teff, seed=self.seed)

        def photons(w: np.ndarray) -> np.ndarray:
            return flam_to_photons(flam(w), w, area) * 10 ** (-0.4 * extinction_mag(w) * ext)

        profile = PointProfile(fwhm=sc.seeing, beta=sc.moffat_beta, slit_width=self.slit_width,
                               centre=sc.object_position if kind == "OBJECT" else 0.0,
                               drift=sc.object_drift)
        source = Source("object", photons, profile=profile)
        source.flam = flam  # type: ignore[attr-defined]
        return source

    def science_model(self, kind: str = "OBJECT", exptime: float = 600.0) -> RenderResult:
        """Expected object, sky and scattered-light electrons of a stare frame (``kind`` one
        of :data:`STARE_KINDS`)."""
        kind = self._stare_kind(kind)
        key = ("science", kind, float(exptime))
        if key not in self._cache:
            sc = self.scene
            sky = Source("sky", lambda w: sky_continuum(w, self.arm, self.slit_width,
                                                        sc.sky_level),
                         lines=sky_lines(self.arm, self.slit_width, sc.sky_level))
            obj = self._object_source(kind)
            res = self.renderer.render([obj, sky], exptime)
            res.images["scattered"] = self._scatter(res.images["object"] + res.images["sky"])
            res.flam = obj.flam  # type: ignore[attr-defined]
            self._cache[key] = res
        return self._cache[key]

    def target_name(self, kind: str) -> str:
        """The target of a stare frame type: the science star, flux or telluric standard."""
        kind = self._stare_kind(kind)
        if kind == "STD_FLUX":
            return self.scene.standard
        return TELLURIC_TARGET if kind == "STD_TELLURIC" else "SIM-STAR"

    @staticmethod
    def _stare_kind(kind: str) -> str:
        key = kind.strip().upper()
        if key not in STARE_KINDS:
            raise ValueError(f"unknown stare frame type {kind!r}; choose from "
                             f"{', '.join(STARE_KINDS)}")
        return key

    # ------------------------------------------------------------------ frames
    def _scene_header(self, kind: str) -> dict[str, Any]:
        sc = self.scene
        hdr: dict[str, Any] = {slit_keyword(self.arm): (self.slit_name(), "Slit")}
        if kind in STARE_KINDS:
            target = self.target_name(kind)
            ra, dec = STANDARD_COORDS.get(target.upper(), (30.0, -30.0))
            hdr.update({
                "OBJECT": (target, "Target"),
                "RA": (ra, "deg"), "DEC": (dec, "deg"),
                "ESO OBS TARG NAME": (target, "Target"),
                "ESO TEL AIRM START": (sc.airmass, "Airmass at start"),
                "ESO TEL AIRM END": (sc.airmass, "Airmass at end"),
                "ESO TEL AMBI FWHM START": (sc.seeing, "Seeing at start [arcsec]"),
                "ESO TEL AMBI FWHM END": (sc.seeing, "Seeing at end [arcsec]"),
            })
        return hdr

    def raw_header(self, frame_type: str, exptime: float, index: int = 0,
                   mjd: float | None = None) -> fits.Header:
        """The primary header the night's frame ``index`` of ``frame_type`` gets (lamp
        flats and stare frames with their scene keywords: slit, target), without its
        pixels."""
        extra = None if frame_type.upper() in ("BIAS", "DARK") else \
            self._scene_header(frame_type.upper())
        return self.detector.raw_header(frame_type, exptime, index, mjd=mjd, header=extra)

    def make_flat(self, frame_type: str, index: int, exptime: float | None = None
                  ) -> tuple[fits.HDUList, dict[str, Any]]:
        """One lamp flat (``FLAT``, or ``DFLAT``/``QFLAT`` for UVB) with a lamp jitter."""
        exptime = float(exptime if exptime is not None else FLAT_EXPTIME[self.arm.code])
        lamp = "D2" if frame_type.upper() == "DFLAT" else "QTH"
        factor = 1.0 + self.scene.lamp_jitter * float(
            rng_for(self.seed, self.arm.code, "lamp", frame_type.upper(), index).normal())
        signal = self.lamp_model(lamp) * np.float32(factor)
        hdul, info = self.detector.make_frame(frame_type, exptime, index, signal=signal,
                                              header=self._scene_header(frame_type))
        info.update(lamp=lamp, lamp_factor=factor)
        return hdul, info

    def make_lamp_off(self, index: int, exptime: float | None = None
                      ) -> tuple[fits.HDUList, dict[str, Any]]:
        """A NIR lamp-off flat partner (DPR TECH ``IMAGE``): dark current and pedestal only."""
        exptime = float(exptime if exptime is not None else FLAT_EXPTIME[self.arm.code])
        hdul, info = self.detector.make_frame("FLAT_OFF", exptime, index,
                                              header=self._scene_header("FLAT_OFF"))
        info.update(lamp="OFF", lamp_factor=0.0)
        return hdul, info

    def make_science(self, index: int, exptime: float = 600.0, kind: str = "OBJECT"
                     ) -> tuple[fits.HDUList, dict[str, Any]]:
        """A stare frame of the science target (``OBJECT``), the flux standard
        (``STD_FLUX``) or the telluric standard (``STD_TELLURIC``)."""
        res = self.science_model(kind, exptime)
        signal = res.images["object"] + res.images["sky"] + res.images["scattered"]
        hdul, info = self.detector.make_frame(kind, exptime, index, signal=signal,
                                              header=self._scene_header(kind))
        info["model"] = res
        return hdul, info

    # ------------------------------------------------------------------ truth tables
    def object_truth_table(self, kind: str = "OBJECT", exptime: float = 600.0
                           ) -> fits.BinTableHDU:
        """Per order and along-order pixel: the object's true counts, wavelength and sky.

        One row per binned along-order pixel of each illuminated order; the columns are
        described in :data:`_TRUTH_COLUMNS` (also the table's ``TCOMMn`` and COMMENT cards).
        ``counts`` is what an extraction of a flat-fielded frame should recover: the
        object's expected e- in that detector row (column, SOXS NIR) of the order over the
        exposure, summed over every pixel of the slit, after atmosphere, telescope,
        instrument efficiency, blaze and slit losses but **before the pixel response**
        (divide a frame by the true sensitivity, the truth master flat, to compare).
        """
        res = self.science_model(kind, exptime)
        rows = res.rows["object"]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "order", "pixel", "wavelength", "counts", "sky_per_pixel", "scattered_per_pixel",
            "flux", "extinction_mag", "centre", "slit_position", "dispersion")}
        renderer = self.renderer
        for order, row in rows.items():
            sky = renderer.sample_rows(res.images["sky"], order, np.array([0.0]))[:, 0]
            scat = renderer.sample_rows(res.images["scattered"], order, np.array([0.0]))[:, 0]
            bb = renderer.bb
            disp = np.abs(self.format.dispersion(order, row["along"])) * bb
            cols["order"].append(np.full(row["pixel"].size, order))
            cols["pixel"].append(row["pixel"])
            cols["wavelength"].append(row["wavelength"])
            cols["counts"].append(row["counts"])
            cols["sky_per_pixel"].append(sky)
            cols["scattered_per_pixel"].append(scat)
            cols["flux"].append(res.flam(row["wavelength"]))
            cols["extinction_mag"].append(extinction_mag(row["wavelength"])
                                          * self.scene.airmass)
            cols["centre"].append(row["centre"])
            cols["slit_position"].append(row["slit_position"])
            cols["dispersion"].append(disp)
        units = {"wavelength": "nm", "counts": "electron", "sky_per_pixel": "electron",
                 "scattered_per_pixel": "electron", "flux": "erg/s/cm2/Angstrom",
                 "extinction_mag": "mag", "centre": "pix", "slit_position": "arcsec",
                 "dispersion": "nm/pix"}
        fcols = []
        for name, parts in cols.items():
            arr = np.concatenate(parts) if parts else np.zeros(0)
            fmt = "K" if name in ("order", "pixel") else "D"
            fcols.append(fits.Column(name=name, format=fmt, unit=units.get(name), array=arr))
        hdu = fits.BinTableHDU.from_columns(fcols, name="OBJECT_TRUTH")
        hdu.header["EXPTIME"] = exptime
        hdu.header["TARGET"] = self.target_name(kind)
        hdu.header["AIRMASS"] = self.scene.airmass
        hdu.header["SEEING"] = self.scene.seeing
        hdu.header["SLITW"] = (self.slit_width, "slit width [arcsec]")
        hdu.header["RESPOW"] = (self.resolving_power, "resolving power")
        hdu.header["AREA"] = (telescope_area_cm2(self.arm), "telescope area [cm2]")
        for i, name in enumerate(cols, start=1):
            hdu.header[f"TCOMM{i}"] = _TRUTH_COLUMNS[name]
        hdu.header["COMMENT"] = _COUNTS_COMMENT
        return hdu

    def table_time(self) -> tuple[float, float]:
        """``(MJD-OBS, EXPTIME)`` the upstream tables inherit: those of the first lamp flat
        of the night (frame index 0 of the flat block, default exposure time)."""
        kind = frame_kind(self.flat_kinds()[0][0], self.arm)
        exptime = FLAT_EXPTIME[self.arm.code]
        return default_mjd(kind, 0, exptime, night_offset=self.detector.night_offset), exptime

    def order_table(self, edges: bool = False, mjd: float | None = None,
                    exptime: float | None = None) -> fits.HDUList:
        """ORDER_TAB from the truth (order centres; with ``edges`` the mflat layout).

        ``mjd``/``exptime`` default to :meth:`table_time`.
        """
        t_mjd, t_exp = self.table_time()
        return order_table_hdul(self.format, edges=edges, orders=self.orders,
                                mjd=t_mjd if mjd is None else mjd,
                                exptime=t_exp if exptime is None else exptime)

    def disp_table(self, mjd: float | None = None, exptime: float | None = None
                   ) -> fits.HDUList:
        """DISP_TAB fitted to the truth (time keywords as for :meth:`order_table`)."""
        t_mjd, t_exp = self.table_time()
        key = ("disp_tab",)
        if key not in self._cache:  # the fit is the slow part; the time keywords are not
            self._cache[key] = disp_table_hdul(self.format, orders=self.orders)
        out = fits.HDUList([hdu.copy() for hdu in self._cache[key]])
        set_time_keywords(out[0].header, t_mjd if mjd is None else mjd,
                          t_exp if exptime is None else exptime)
        return out

    def disp_image(self, mjd: float | None = None, exptime: float | None = None
                   ) -> fits.HDUList:
        """DISP_IMAGE from the truth (time keywords as for :meth:`order_table`)."""
        t_mjd, t_exp = self.table_time()
        return disp_image_hdul(self.format, orders=self.orders,
                               mjd=t_mjd if mjd is None else mjd,
                               exptime=t_exp if exptime is None else exptime)

    def parameters(self) -> dict[str, Any]:
        """All model parameters (for the truth summary)."""
        det = self.detector
        return dict(arm=self.arm.code, binning=det.binning, readout=det.readout,
                    seed=self.seed, gain=det.gain, read_noise=det.read_noise,
                    detector={k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in det.params.items()},
                    scene=asdict(self.scene), slit_width=self.slit_width,
                    scattered_fraction=self.scattered_fraction,
                    scatter_scale_px=SCATTER_SCALE_PX,
                    resolving_power=self.resolving_power, flat_level=self.flat_level,
                    orders=self.orders, illumination=asdict(self.illumination),
                    format_source=self.format.source)
