"""Write a complete simulated night: raw frames, truth, upstream calibrations and SOFs.

Layout of the night directory::

    raw/                 raw frames (uint16 FITS, real header dialect)
    calib/               ORDER_TAB_<ARM>, DISP_TAB_<ARM>, DISP_IMAGE_<ARM> from the truth
    truth/               detector truth (with the low-sensitivity pixels), defect lists,
                         true order table (with edges), true order edges sampled per pixel
                         (order_edges_truth_<arm>.fits), scattered light of each flat lamp
                         (scattered_light_<lamp>.fits), per-frame truth, cosmic-ray pixels,
                         object/sky truth per stare frame type (object_truth.fits,
                         standard_truth.fits, telluric_truth.fits), summary.json
    truth/calibs/        truth calibrations in the recipes' product layout
                         (:mod:`~soxs_core.simulate.truthcalib`): master_bias_<arm>.fits
                         (UVB/VIS), master_dark_<arm>.fits (science exposure time),
                         master_flat_<arm>.fits (the true pixel response)
    bias.sof dark.sof flat.sof stare.sof std.sof telluric.sof
    stare_truth.sof std_truth.sof telluric_truth.sof
                         the stare SOFs with the truth calibrations instead of the recipes'
                         products: truth master bias (UVB/VIS) or dark (NIR), truth master
                         flat, truth ORDER_TAB with edges, calib/ DISP_TAB and DISP_IMAGE
    reduced/             (written later by the pipeline runner)

SOF lines are ``<path> <TAG>``; products of earlier steps are referenced where the runner
writes them when given ``--output-dir <night>/reduced/<recipe>``:
``reduced/<recipe>/<PRO.CATG lower-case>.fits`` (:func:`reduction_commands` spells the
commands out).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from soxs_core.errors import InputError
from soxs_core.io.safety import write_atomically
from soxs_core.simulate.headers import sof_tag
from soxs_core.simulate.instrument import (
    SCATTER_SCALE_PX,
    TELLURIC_EXPTIME,
    InstrumentSimulator,
    SceneParameters,
)
from soxs_core.simulate.tables import write
from soxs_core.simulate.truthcalib import write_truth_calibrations

__all__ = ["simulate_night", "NightResult", "write_detector_truth", "product_path",
           "REDUCTION_STEPS", "STEP_DIRS", "reduction_dir", "step_dir", "reduction_commands",
           "order_edges_truth", "scattered_truth"]

#: SOF of the night -> recipe that reduces it, in reduction order
REDUCTION_STEPS: tuple[tuple[str, str], ...] = (
    ("bias", "soxs_mbias"), ("dark", "soxs_mdark"), ("flat", "soxs_mflat"),
    ("std", "soxs_stare"), ("stare", "soxs_stare"))

#: steps whose products go elsewhere than ``reduced/<recipe>`` (the flux standard and the
#: science target are both soxs_stare runs, with products of the same names)
STEP_DIRS = {"std": "soxs_stare_std"}


@dataclass
class NightResult:
    """Paths written by :func:`simulate_night`."""

    outdir: Path
    raw: dict[str, list[Path]] = field(default_factory=dict)
    sofs: dict[str, Path] = field(default_factory=dict)
    calib: dict[str, Path] = field(default_factory=dict)
    truth: dict[str, Path] = field(default_factory=dict)
    frames: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def reduction_dir(outdir: Path, recipe: str) -> Path:
    """The ``--output-dir`` of a recipe's step, where the later SOFs expect its products."""
    return outdir / "reduced" / recipe


def step_dir(outdir: Path, sof: str, recipe: str) -> Path:
    """The ``--output-dir`` of the step that reduces SOF ``sof`` with ``recipe``."""
    return reduction_dir(outdir, STEP_DIRS.get(sof, recipe))


def product_path(outdir: Path, recipe: str, catg: str, arm_name: str) -> Path:
    """Where the runner writes a product: ``reduced/<recipe>/<catg>_<arm>.fits`` (lower case)."""
    return reduction_dir(outdir, recipe) / f"{catg.lower()}_{arm_name.lower()}.fits"


def reduction_commands(outdir: Path, sofs: Mapping[str, Path],
                       recipes: Collection[str]) -> list[str]:
    """The ``soxs-esorex`` command lines that reduce a night by hand, in order.

    Parameters
    ----------
    outdir : Path
        The night directory as the user named it (the commands use it as given).
    sofs : mapping
        SOF name (``bias``, ``dark``...) -> path, as in :attr:`NightResult.sofs`.
    recipes : collection of str
        The recipes that exist; steps of other recipes are left out.

    Returns
    -------
    list of str
        One shell command line per step.
    """
    return [shlex.join(["soxs-esorex", "--output-dir", str(step_dir(outdir, sof, recipe)),
                        recipe, str(outdir / sofs[sof].name)])
            for sof, recipe in REDUCTION_STEPS if sof in sofs and recipe in recipes]


def write_detector_truth(sim: InstrumentSimulator, path: Path) -> Path:
    """Noiseless bias, dark rate, sensitivity, defect masks and lists of one detector."""
    t = sim.truth
    hdr = fits.Header()
    hdr["INSTRUME"] = t.arm.instrument
    hdr["HIERARCH ESO SEQ ARM"] = t.arm.name
    hdr["BINNING"] = t.binning
    hdr["READOUT"] = t.readout
    hdr["GAIN"] = (t.gain, "e-/ADU")
    hdr["RON"] = (t.read_noise, "e-")
    hdr["BIASLEV"] = (t.bias_level, "mean bias of the defect-free structure [e-]")
    hdr["BIASGX"] = (t.bias_gradient[0], "bias slope along columns [e-/px]")
    hdr["BIASGY"] = (t.bias_gradient[1], "bias slope along rows [e-/px]")
    hdr["PATPER"] = (t.pattern_period_px, "periodic pattern period [px]")
    hdr["PATAMP"] = (t.pattern_amplitude, "periodic pattern amplitude [e-]")
    hdr["DARKBASE"] = (t.base_dark_rate, "base dark current [e-/s/pixel]")
    hdr["SATADU"] = (t.saturation_adu, "raw saturation level [ADU]")
    hdus = [fits.PrimaryHDU(header=hdr),
            fits.ImageHDU(t.bias, name="BIAS"),
            fits.ImageHDU(t.dark_rate, name="DARK_RATE"),
            fits.ImageHDU(t.sensitivity, name="SENSITIVITY"),
            fits.ImageHDU(t.hot_mask.astype(np.uint8), name="HOT"),
            fits.ImageHDU(t.cold_mask.astype(np.uint8), name="COLD"),
            fits.ImageHDU(t.static_bad_mask.astype(np.uint8), name="STATIC_BAD")]
    for name, (r, c, v), vname in (("HOT_PIXELS", t.hot_pixels(), "rate"),
                                   ("COLD_PIXELS", t.cold_pixels(), "response")):
        hdus.append(fits.BinTableHDU.from_columns([
            fits.Column(name="row", format="J", array=r),
            fits.Column(name="col", format="J", array=c),
            fits.Column(name=vname, format="E", array=v)], name=name))
    bc = np.array(t.bad_columns, dtype=np.int64).reshape(-1, 3)
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column(name="col", format="K", array=bc[:, 0]),
        fits.Column(name="row_start", format="K", array=bc[:, 1]),
        fits.Column(name="row_stop", format="K", array=bc[:, 2]),
        fits.Column(name="bias_offset", format="D", array=np.array(t.bad_column_offsets))],
        name="BAD_COLUMNS"))
    # low-sensitivity pixels (inside the orders; apart from every other defect)
    lr, lc, lv, lk = t.low_sensitivity_pixels()
    hdus.append(fits.ImageHDU(t.low_sensitivity_mask.astype(np.uint8), name="LOW_SENS"))
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column(name="row", format="J", array=lr),
        fits.Column(name="col", format="J", array=lc),
        fits.Column(name="response", format="E", array=lv),
        fits.Column(name="clump", format="J", array=lk)], name="LOW_SENS_PIXELS"))
    cl = np.array(t.low_sensitivity_clumps, dtype=float).reshape(-1, 3)
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column(name="row", format="D", array=cl[:, 0]),
        fits.Column(name="col", format="D", array=cl[:, 1]),
        fits.Column(name="radius", format="D", array=cl[:, 2])], name="DUST_CLUMPS"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, overwrite=True))
    return path


def order_edges_truth(sim: InstrumentSimulator) -> fits.HDUList:
    """The true order centres and edges of every illuminated order, at every unbinned
    along-order pixel of its usable length (``EchelleFormat.geometry``).

    Columns (unbinned prepared pixels, 0-based pixel centres, like ORDER_TAB): ``order``,
    ``b`` (along the order: y, SOXS NIR x), ``centre``, ``a_low``, ``a_up`` (across: the
    slit ends, where the soft end of the slit illumination falls to half its local level),
    ``inside`` (both edges on the detector).  A binned pixel ``i`` is centred on unbinned
    ``i * bin + (bin - 1) / 2``.  ``EchelleFormat.edges(order, b)`` gives the same at any
    ``b``.
    """
    fmt = sim.format
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("order", "b", "centre", "a_low",
                                                         "a_up", "inside")}
    for n in sim.orders:
        g = fmt.geometry(n)
        if not np.isfinite(g.b_min):
            continue
        b = np.arange(g.b_min, g.b_max + 1.0)
        lo, up = fmt.edges(n, b)
        cols["order"].append(np.full(b.size, n))
        cols["b"].append(b)
        cols["centre"].append(fmt.centre(n, b))
        cols["a_low"].append(lo)
        cols["a_up"].append(up)
        cols["inside"].append((lo >= -0.5) & (up <= fmt.n_across - 0.5))
    fcols = [fits.Column(name=k, format={"order": "J", "inside": "L"}.get(k, "D"),
                         unit=None if k in ("order", "inside") else "pix",
                         array=np.concatenate(v) if v else np.zeros(0))
             for k, v in cols.items()]
    hdu = fits.BinTableHDU.from_columns(fcols, name="ORDER_EDGES")
    hdu.header["ALONG"] = ("y" if fmt.dispersion_axis == "y" else "x", "axis of column b")
    hdu.header["NACROSS"] = (fmt.n_across, "unbinned pixels across the orders")
    hdu.header["SOFTNESS"] = (sim.illumination.softness, "slit-end softness [arcsec]")
    hdu.header["SLITLEN"] = (fmt.slit_length, "slit length [arcsec]")
    return fits.HDUList([fits.PrimaryHDU(), hdu])


def scattered_truth(sim: InstrumentSimulator, lamp: str, exptime: float) -> fits.HDUList:
    """The scattered light of one nominal flat of a lamp (e- per binned pixel, before pixel
    response; a flat of lamp factor f receives f times it)."""
    hdu = fits.PrimaryHDU(sim.scattered_model(lamp))
    hdr = hdu.header
    hdr["BUNIT"] = "electron"
    hdr["LAMP"] = (lamp.upper(), "lamp of the flats")
    hdr["EXPTIME"] = (float(exptime), "nominal flat exposure [s]")
    hdr["BINNING"] = sim.detector.binning
    hdr["FRACTION"] = (sim.scattered_fraction, "fraction of the order light scattered")
    hdr["SCALEPX"] = (SCATTER_SCALE_PX, "halo Gaussian sigma [unbinned px]")
    hdr["FLATLEV"] = (sim.flat_level, "peak order level of a nominal flat [e-]")
    hdr["COMMENT"] = "frame i receives lamp_factor_i (frames.fits) x this x sensitivity"
    return fits.HDUList([hdu])


def _sof(path: Path, entries: list[tuple[Path, str]], outdir: Path, relative: bool) -> Path:
    lines = []
    for p, tag in entries:
        p = Path(p)
        text = os.path.relpath(p, outdir) if relative else str(p.resolve())
        lines.append(f"{text} {tag}")
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def simulate_night(outdir: str | os.PathLike, arm: str = "xsh_vis", binning: str = "1x1",
                   readout: str = "slow", seed: int = 1, *, n_bias: int = 5, n_dark: int = 3,
                   dark_exptime: float | None = None, n_flat: int = 5,
                   flat_exptime: float | None = None, n_science: int = 1,
                   science_exptime: float = 600.0, n_std: int = 1,
                   std_exptime: float | None = None, n_telluric: int = 0,
                   telluric_exptime: float | None = None, orders=None,
                   scene: SceneParameters | None = None, write_models: bool = False,
                   relative_sof: bool = False, write_truth: bool = True,
                   **detector_kwargs: Any) -> NightResult:
    """Simulate one arm's night and write it to ``outdir``.

    Parameters
    ----------
    outdir : path
        Night directory (created).
    arm, binning, readout, seed
        Detector set-up and master seed.
    n_bias, n_dark, n_flat, n_science, n_std : int
        Frame counts (NIR arms take no biases; NIR flats come in lamp-on/off pairs; the UVB
        arm takes ``n_flat`` D2 and ``n_flat`` QTH flats).
    dark_exptime : float, optional
        Dark exposure time; default the science exposure time.
    flat_exptime, std_exptime : float, optional
        Lamp-flat and standard-star exposure times (defaults per arm: flats 10–30 s,
        standards 120 s on the VLT, 300 s on the NTT, NIR: the science time).
    n_telluric : int
        Telluric-standard frames (DPR ``STD,TELLURIC``, tag ``STD_TELLURIC_<ARM>``) of a hot
        star (:attr:`SceneParameters.telluric_mag`), taken after the science frames; default
        none, so that the frames of a night without them do not change.
    telluric_exptime : float, optional
        Their exposure time (default per arm, :data:`~soxs_core.simulate.instrument.
        TELLURIC_EXPTIME`).
    science_exptime : float
        Science exposure time (s).
    orders : sequence of int, optional
        Only illuminate these orders.
    scene : SceneParameters, optional
        Observing conditions and targets.
    write_models : bool
        Also write the noiseless expected images of every illuminated frame (large).
    relative_sof : bool
        Write SOF paths relative to ``outdir`` instead of absolute.
    write_truth : bool
        Write the truth (``truth/`` but ``summary.json``, the ``*_truth.sof``); without it
        only raw frames, calib/ tables and the recipes' SOFs (faster, for archives).
    **detector_kwargs
        Detector-model overrides (``cosmic_rate``, ``gain``...; ``night_offset``: days by
        which every time of the night is moved, :class:`~soxs_core.simulate.detector.
        DetectorSimulator`).

    Returns
    -------
    NightResult
    """
    t0 = time.perf_counter()
    outdir = Path(outdir)
    counts = dict(n_bias=n_bias, n_dark=n_dark, n_flat=n_flat, n_science=n_science, n_std=n_std,
                  n_telluric=n_telluric)
    negative = [f"{name}={value}" for name, value in counts.items() if value < 0]
    if negative:
        raise InputError(f"frame counts must be >= 0, got {', '.join(negative)}")
    # the set-up is checked (by building the simulator) before any directory is made
    sim = InstrumentSimulator(arm, binning, readout, seed, orders=orders, scene=scene,
                              **detector_kwargs)
    raw_dir, truth_dir, calib_dir = outdir / "raw", outdir / "truth", outdir / "calib"
    for d in (raw_dir, truth_dir, calib_dir):
        d.mkdir(parents=True, exist_ok=True)
    a = sim.arm
    res = NightResult(outdir=outdir)
    nir = not a.is_ccd
    dark_exptime = float(dark_exptime if dark_exptime is not None else science_exptime)
    if std_exptime is None:
        std_exptime = science_exptime if nir else (120.0 if a.instrument == "XSHOOTER"
                                                   else 300.0)
    if telluric_exptime is None:
        telluric_exptime = TELLURIC_EXPTIME[a.code]
    index = 0
    cosmic_hdus: list[fits.BinTableHDU] = []
    models: list[tuple[str, dict[str, np.ndarray]]] = []

    def record(kind: str, hdul: fits.HDUList, info: dict[str, Any]) -> Path:
        nonlocal index
        path = raw_dir / info["file_name"]
        write_atomically(path, lambda tmp: hdul.writeto(tmp, overwrite=True))
        res.raw.setdefault(kind, []).append(path)
        rows, cols, dep = info["cosmic_pixels"]
        cosmic_hdus.append(fits.BinTableHDU.from_columns([
            fits.Column(name="row", format="J", array=rows),
            fits.Column(name="col", format="J", array=cols),
            fits.Column(name="electrons", format="E", array=dep)], name=path.stem))
        res.frames.append(dict(
            file=f"raw/{path.name}", frame_type=info["frame_type"], index=info["index"],
            exptime=info["exptime"], mjd=info["mjd"], bias_offset=info["bias_offset"],
            n_cosmics=info["n_cosmics"], n_saturated=int(info["saturated_mask"].sum()),
            lamp=info.get("lamp", ""), lamp_factor=float(info.get("lamp_factor", 0.0))))
        index += 1
        return path

    det = sim.detector
    if a.is_ccd:
        for _ in range(n_bias):
            record("BIAS", *det.make_frame("BIAS", 0.0, index))
    for _ in range(n_dark):
        record("DARK", *det.make_frame("DARK", dark_exptime, index))
    for ftype, lamp in sim.flat_kinds():
        for _ in range(n_flat):
            hdul, info = sim.make_flat(ftype, index, flat_exptime)
            record(ftype, hdul, info)
            if nir:
                record("FLAT_OFF", *sim.make_lamp_off(index, flat_exptime))
        if write_models:
            models.append((f"lamp_{lamp.lower()}", {"LAMP": sim.lamp_model(lamp)}))
    # telluric standards after the science: the frames before them keep their indices (and
    # noise streams) whatever n_telluric is
    truth_names = {"STD_FLUX": "standard_truth.fits", "OBJECT": "object_truth.fits",
                   "STD_TELLURIC": "telluric_truth.fits"}
    for kind, count, exptime in (("STD_FLUX", n_std, std_exptime),
                                 ("OBJECT", n_science, science_exptime),
                                 ("STD_TELLURIC", n_telluric, telluric_exptime)):
        for _ in range(count):
            hdul, info = sim.make_science(index, exptime, kind)
            record(kind, hdul, info)
        if count and write_truth:
            table = sim.object_truth_table(kind, exptime)
            res.truth[kind] = write(fits.HDUList([fits.PrimaryHDU(), table]),
                                    truth_dir / truth_names[kind])
        if count:
            if write_models:
                m = sim.science_model(kind, exptime).images
                models.append((kind.lower(), {k.upper(): v for k, v in m.items()}))

    # ---- calibrations from the truth, with the time keywords of the night's first lamp flat
    # (real upstream tables inherit those of their raw frames)
    tag = a.name
    flat_types = {ftype for ftype, _ in sim.flat_kinds()}
    first_flat = next((f for f in res.frames if f["frame_type"] in flat_types), None)
    when = ((first_flat["mjd"], first_flat["exptime"]) if first_flat is not None
            else sim.table_time())
    res.calib["ORDER_TAB"] = write(sim.order_table(mjd=when[0], exptime=when[1]),
                                   calib_dir / f"ORDER_TAB_{tag}.fits")
    res.calib["DISP_TAB"] = write(sim.disp_table(*when), calib_dir / f"DISP_TAB_{tag}.fits")
    res.calib["DISP_IMAGE"] = write(sim.disp_image(*when),
                                    calib_dir / f"DISP_IMAGE_{tag}.fits")

    stare_exptimes = {"OBJECT": science_exptime, "STD_FLUX": std_exptime,
                      "STD_TELLURIC": telluric_exptime}
    # ---- truth
    if write_truth:
        res.truth["detector"] = write_detector_truth(sim, truth_dir / "detector_truth.fits")
        res.truth["order_tab"] = write(sim.order_table(edges=True, mjd=when[0], exptime=when[1]),
                                       truth_dir / f"order_tab_truth_{tag.lower()}.fits")
        res.truth["order_edges"] = write(order_edges_truth(sim),
                                         truth_dir / f"order_edges_truth_{tag.lower()}.fits")
        if n_flat:
            for _, lamp in sim.flat_kinds():
                res.truth[f"scattered_{lamp.lower()}"] = write(
                    scattered_truth(sim, lamp, when[1]),
                    truth_dir / f"scattered_light_{lamp.lower()}.fits")
        # the calibrations a perfect chain would give; they inherit the headers of the night's
        # first bias / dark / flat, as the recipes' products do
        first_frames: dict[str, tuple[int, float, float]] = {}
        for f in res.frames:
            first_frames.setdefault(f["frame_type"], (f["index"], f["mjd"], f["exptime"]))
        # NIR: a dark of each standard's exposure time too (raw - dark must have no offset)
        extra = () if a.is_ccd else tuple(float(stare_exptimes[k]) for k in stare_exptimes
                                          if res.raw.get(k))
        for catg, path in write_truth_calibrations(sim, truth_dir / "calibs", science_exptime,
                                                   first_frames, extra).items():
            res.truth[catg.lower()] = path
        res.truth["cosmics"] = write(fits.HDUList([fits.PrimaryHDU()] + cosmic_hdus),
                                     truth_dir / "cosmics.fits")
        keys = list(res.frames[0]) if res.frames else []
        ftab = fits.BinTableHDU.from_columns([
            fits.Column(name=k, format="64A" if isinstance(res.frames[0][k], str) else
                        ("K" if isinstance(res.frames[0][k], int) else "D"),
                        array=np.array([f[k] for f in res.frames])) for k in keys], name="FRAMES")
        res.truth["frames"] = write(fits.HDUList([fits.PrimaryHDU(), ftab]),
                                    truth_dir / "frames.fits")
        for name, images in models:
            hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(v, name=k) for k, v in images.items()]
            res.truth[f"model_{name}"] = write(fits.HDUList(hdus),
                                               truth_dir / f"model_{name}.fits")

    # ---- SOFs
    mbias = product_path(outdir, "soxs_mbias", "MASTER_BIAS", tag)
    mdark = product_path(outdir, "soxs_mdark", "MASTER_DARK", tag)
    mflat = product_path(outdir, "soxs_mflat", "MASTER_FLAT", tag)
    otab = product_path(outdir, "soxs_mflat", "ORDER_TAB", tag)
    if a.is_ccd and n_bias:
        res.sofs["bias"] = _sof(outdir / "bias.sof",
                                [(p, f"BIAS_{tag}") for p in res.raw["BIAS"]], outdir,
                                relative_sof)
    if n_dark:
        # UV-VIS darks are bias-subtracted with the master bias of the night
        dark_calibs = [(mbias, f"MASTER_BIAS_{tag}")] if a.is_ccd and n_bias else []
        res.sofs["dark"] = _sof(outdir / "dark.sof",
                                [(p, f"DARK_{tag}") for p in res.raw["DARK"]] + dark_calibs,
                                outdir, relative_sof)
    # soxspipe-style tags <DPR TYPE, commas as underscores>_<ARM>: lamp-off frames take the
    # tag of their DPR TYPE and are told from lamp-on ones by DPR TECH IMAGE
    flat_entries: list[tuple[Path, str]] = []
    for ftype, _ in sim.flat_kinds():
        flat_entries += [(p, sof_tag(a, ftype)) for p in res.raw.get(ftype, [])]
    flat_entries += [(p, sof_tag(a, "FLAT_OFF")) for p in res.raw.get("FLAT_OFF", [])]
    if flat_entries:
        calibs = [(mbias, f"MASTER_BIAS_{tag}")] if a.is_ccd else []
        calibs.append((res.calib["ORDER_TAB"], f"ORDER_TAB_{tag}"))
        res.sofs["flat"] = _sof(outdir / "flat.sof", flat_entries + calibs, outdir,
                                relative_sof)
    stare_calibs = [(mbias, f"MASTER_BIAS_{tag}")] if a.is_ccd else [
        (mdark, f"MASTER_DARK_{tag}")]
    stare_calibs += [(mflat, f"MASTER_FLAT_{tag}"), (otab, f"ORDER_TAB_{tag}"),
                     (res.calib["DISP_TAB"], f"DISP_TAB_{tag}"),
                     (res.calib["DISP_IMAGE"], f"DISP_IMAGE_{tag}")]
    # the same steps with the truth calibrations (the "perfect calibrations" chain)
    truth_calibs = [(res.truth["master_flat"], f"MASTER_FLAT_{tag}"),
                    (res.truth["order_tab"], f"ORDER_TAB_{tag}"),
                    (res.calib["DISP_TAB"], f"DISP_TAB_{tag}"),
                    (res.calib["DISP_IMAGE"], f"DISP_IMAGE_{tag}")] if write_truth else []
    for kind, name in (("OBJECT", "stare"), ("STD_FLUX", "std"), ("STD_TELLURIC", "telluric")):
        if res.raw.get(kind):
            entries = [(p, sof_tag(a, kind)) for p in res.raw[kind]]
            extra = []
            if kind == "OBJECT" and res.raw.get("STD_FLUX"):
                # the science target is flux-calibrated with the standard's response
                extra = [(step_dir(outdir, "std", "soxs_stare") / f"resp_tab_{tag.lower()}.fits",
                          f"RESP_TAB_{tag}")]
            res.sofs[name] = _sof(outdir / f"{name}.sof", entries + stare_calibs + extra,
                                  outdir, relative_sof)
            if not write_truth:
                continue
            if a.is_ccd:
                first = [(res.truth["master_bias"], f"MASTER_BIAS_{tag}")]
            else:
                t = float(stare_exptimes[kind])
                first = [(res.truth["master_dark" + ("" if t == science_exptime
                                                     else f"_{t:g}s")], f"MASTER_DARK_{tag}")]
            res.sofs[f"{name}_truth"] = _sof(outdir / f"{name}_truth.sof",
                                             entries + first + truth_calibs, outdir,
                                             relative_sof)
    (outdir / "reduced").mkdir(exist_ok=True)
    res.seconds = time.perf_counter() - t0
    summary = dict(parameters=sim.parameters(),
                   sofs={k: str(v) for k, v in res.sofs.items()},
                   calib={k: str(v) for k, v in res.calib.items()},
                   truth={k: str(v) for k, v in res.truth.items()},
                   frames=res.frames, seconds=res.seconds,
                   expected_products={"master_bias": str(mbias), "master_dark": str(mdark),
                                      "master_flat": str(mflat), "order_tab": str(otab)})
    res.truth["summary"] = truth_dir / "summary.json"
    res.truth["summary"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return res
