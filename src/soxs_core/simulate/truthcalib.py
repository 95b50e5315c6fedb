"""Truth calibrations: the master bias, dark and flat a perfect calibration chain would give.

They are written in the layout of our recipes' image products (FLUX/QUAL/ERRS, DFS header
inherited from a raw frame of the calibration's type as ``soxs_mbias``/``soxs_mdark``/
``soxs_mflat`` products inherit from their first raw frame, PRO CATG ``MASTER_<KIND>_<ARM>``,
``EXPTIME``, ``CDELT1``/``CDELT2``), so that a stare reduction can be run with them in place of
the recipes' products and its errors attributed to the stare steps alone.

* master bias (UVB/VIS): :attr:`DetectorTruth.bias` — the electronic structure plus the charge
  collected during the read-out, without the frame-to-frame drift and periodic pattern
  (both zero-mean over frames).  QUAL: STATIC_BAD (the shipped static map).
* master dark of an exposure time ``t``: ``dark_rate * t`` on UVB/VIS (bias-subtracted, as
  ``soxs_mdark`` writes it when given a master bias); on the NIR arms, which take no bias,
  ``bias + dark_rate * t`` (the pedestal is in every raw frame and in ``soxs_mdark``'s NIR
  product), so that raw - dark has zero offset.  QUAL: STATIC_BAD, and HOT on the true hot
  pixels.
* master flat: :attr:`DetectorTruth.sensitivity`, the true pixel response everywhere (inside
  and between the orders); the simulator renders light before the pixel response, so a frame
  divided by it is in the simulator's "before pixel response" electrons.  QUAL: STATIC_BAD,
  and LOW_SENS where the true response is below :data:`TRUTH_LOW_SENS`.

ERRS are tiny constants (:data:`TRUTH_BIAS_ERROR`, :data:`TRUTH_FLAT_ERROR`), not zero, so that
code dividing by a calibration's error stays finite.  The files are reproducible: nothing here
draws random numbers, and the header's ``DATE`` is that of the inherited frame.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.time import Time

from soxs_core.detector.quality import Qual
from soxs_core.io.fits import Header
from soxs_core.io.image import DetectorImage, image_hdus
from soxs_core.io.products import ProductInfo, dfs_header, dicb_sorted, write_product_atomic
from soxs_core.simulate.headers import default_mjd, frame_kind

__all__ = ["TRUTH_LOW_SENS", "TRUTH_BIAS_ERROR", "TRUTH_FLAT_ERROR", "TRUTH_RECIPE",
           "truth_master_bias", "truth_master_dark", "truth_master_flat",
           "truth_calibration_header", "write_truth_calibrations"]

#: A pixel whose true response is below this fraction of nominal is flagged LOW_SENS in the
#: truth master flat (dividing by it would amplify its noise at least twofold).
TRUTH_LOW_SENS = 0.5
#: ERRS (e-) of the truth master bias and dark.
TRUTH_BIAS_ERROR = 1e-3
#: ERRS (relative) of the truth master flat.
TRUTH_FLAT_ERROR = 1e-6
#: ``ESO PRO REC1 ID`` of the truth calibrations.
TRUTH_RECIPE = "soxs_simulate_truth"


def _image(data: np.ndarray, qual: np.ndarray, error: float) -> DetectorImage:
    data = np.ascontiguousarray(data, dtype=np.float32)
    return DetectorImage(data=data, error=np.full(data.shape, error, dtype=np.float32),
                         qual=np.ascontiguousarray(qual, dtype=np.uint8))


def _static_qual(sim) -> np.ndarray:
    return np.where(sim.truth.static_bad_mask, np.uint8(Qual.STATIC_BAD), np.uint8(0))


def truth_master_bias(sim) -> DetectorImage:
    """The noiseless master bias of a CCD arm (prepared orientation, binned, e-).

    Parameters
    ----------
    sim : InstrumentSimulator
        The night's simulator (its ``truth``).

    Returns
    -------
    DetectorImage
        FLUX = true bias, QUAL = STATIC_BAD, ERRS = :data:`TRUTH_BIAS_ERROR`.
    """
    return _image(sim.truth.bias, _static_qual(sim), TRUTH_BIAS_ERROR)


def truth_master_dark(sim, exptime: float) -> DetectorImage:
    """The noiseless master dark of ``exptime`` seconds, as ``soxs_mdark`` would hold it.

    UVB/VIS: ``dark_rate * exptime`` (bias-subtracted); NIR: ``bias + dark_rate * exptime``
    (pedestal included, like the NIR raw frames).  QUAL: STATIC_BAD, and HOT on the true hot
    pixels; ERRS :data:`TRUTH_BIAS_ERROR`.
    """
    t = sim.truth
    data = t.dark_rate * np.float32(exptime)
    if not t.arm.is_ccd:
        data = data + t.bias
    qual = _static_qual(sim) | np.where(t.hot_mask, np.uint8(Qual.HOT), np.uint8(0))
    return _image(data, qual, TRUTH_BIAS_ERROR)


def truth_master_flat(sim) -> DetectorImage:
    """The true pixel response as a master flat (prepared orientation, binned).

    FLUX = :attr:`DetectorTruth.sensitivity` everywhere; QUAL = STATIC_BAD, and LOW_SENS where
    the response is below :data:`TRUTH_LOW_SENS`; ERRS = :data:`TRUTH_FLAT_ERROR` x FLUX.
    """
    sens = sim.truth.sensitivity
    qual = _static_qual(sim) | np.where(sens < TRUTH_LOW_SENS, np.uint8(Qual.LOW_SENS),
                                        np.uint8(0))
    image = _image(sens, qual, 0.0)
    image.error[...] = np.abs(image.data) * np.float32(TRUTH_FLAT_ERROR)
    return image


def truth_calibration_header(sim, catg: str, frame_type: str, exptime: float,
                             index: int = 0, mjd: float | None = None,
                             filename: str = "") -> Header:
    """DFS header of a truth calibration: inherited from the raw header of frame ``index``
    of ``frame_type`` (``BIAS``, ``DARK``, ``FLAT``...) as a recipe product inherits from its
    first raw frame, PRO CATG ``<catg>_<ARM>``, ``EXPTIME``, ``CDELT1``/``CDELT2``.

    Returns
    -------
    soxs_core.io.fits.Header
        In CPL's card order, ready for :func:`~soxs_core.io.products.write_product_atomic`.
    """
    det = sim.detector
    arm = det.arm
    kind = frame_kind(frame_type, arm)
    exptime = 0.0 if kind.name == "BIAS" else float(exptime)
    if mjd is None:
        mjd = default_mjd(kind, index, exptime, night_offset=det.night_offset)
    # the flats' slit keyword is the scene's, which the stare input checks compare
    raw = sim.raw_header(kind.name, exptime, index, mjd=mjd)
    date = Time(mjd, format="mjd", scale="utc").isot[:19]
    header = dfs_header(recipe=TRUTH_RECIPE,
                        product=ProductInfo(catg=f"{catg}_{arm.name}", science=False),
                        filename=filename, raw_frames=[], inherit_from=raw, date=date)
    header["EXPTIME"] = (exptime, "[s] exposure time of the combined frames")
    header["CDELT1"] = (float(det.binx), "binning along x")
    header["CDELT2"] = (float(det.biny), "binning along y")
    header["SOXSTRUT"] = (True, "noiseless truth of the soxs simulator")
    return dicb_sorted(header)


def write_truth_calibrations(sim, directory: str | os.PathLike, dark_exptime: float,
                             first_frames: dict[str, tuple[int, float, float]] | None = None,
                             extra_dark_exptimes: tuple[float, ...] = ()) -> dict[str, Path]:
    """Write the truth master bias (CCD arms), dark and flat of a night.

    Parameters
    ----------
    sim : InstrumentSimulator
        The night's simulator.
    directory : path
        Where to write ``master_bias_<arm>.fits``, ``master_dark_<arm>.fits`` and
        ``master_flat_<arm>.fits`` (the recipes' product names).
    dark_exptime : float
        Exposure time of the master dark (the science frames').
    extra_dark_exptimes : tuple of float
        Further exposure times (NIR standards) that get a master dark of their own,
        ``master_dark_<arm>_<t>s.fits``.
    first_frames : dict, optional
        ``frame type -> (index, mjd, exptime)`` of the night's first frame of each type,
        whose header the calibration inherits; default: frame 0 at its default time.

    Returns
    -------
    dict
        ``MASTER_BIAS`` (CCD arms only), ``MASTER_DARK``, ``MASTER_FLAT`` -> path, and
        ``MASTER_DARK_<t>S`` for each extra exposure time ``t`` (``%g`` format).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first_frames = first_frames or {}
    arm = sim.arm
    flat_type = sim.flat_kinds()[-1][0]
    jobs = [("MASTER_DARK", "", "DARK", lambda: truth_master_dark(sim, dark_exptime),
             dark_exptime),
            ("MASTER_FLAT", "", flat_type, lambda: truth_master_flat(sim), None)]
    for t in dict.fromkeys(float(t) for t in extra_dark_exptimes if t != dark_exptime):
        jobs.append(("MASTER_DARK", f"{t:g}s", "DARK",
                     lambda t=t: truth_master_dark(sim, t), t))
    if arm.is_ccd:
        jobs.insert(0, ("MASTER_BIAS", "", "BIAS", lambda: truth_master_bias(sim), 0.0))
    out: dict[str, Path] = {}
    for catg, suffix, ftype, make, exptime in jobs:
        index, mjd, frame_exptime = first_frames.get(ftype, (0, None, None))
        if exptime is None:
            exptime = frame_exptime if frame_exptime is not None else _flat_exptime(sim)
        stem = f"{catg.lower()}_{arm.name.lower()}" + (f"_{suffix}" if suffix else "")
        path = directory / f"{stem}.fits"
        header = truth_calibration_header(sim, catg, ftype, exptime, index, mjd, path.name)
        write_product_atomic(image_hdus(make(), header), path, overwrite=True)
        out[catg + (f"_{suffix.upper()}" if suffix else "")] = path
    return out


def _flat_exptime(sim) -> float:
    from soxs_core.simulate.instrument import FLAT_EXPTIME
    return FLAT_EXPTIME[sim.arm.code]
