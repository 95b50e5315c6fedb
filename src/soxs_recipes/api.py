"""The soxspipe-style Python API of the seed pages.

    from soxs_recipes import soxs_mbias
    path = soxs_mbias(log=log, settings=settings, inputFrames=fileList).produce_product()

A thin layer over the same code the plugin recipes run (:func:`framework.execute` with the
recipe module's ``reduce``), not a second implementation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.combine.qc import (
    block_mean,
    periodic_pattern_metric,
    read_noise_from_pair,
    robust_std,
    smooth_background,
    structure_slopes,
)
from soxs_core.detector.rawframe import RawFrame
from soxs_core.errors import InputError
from soxs_core.io.compressed import open_fits
from soxs_core.io.image import DetectorImage, read_image_product

from . import mbias, mdark, mflat, stare
from .framework import execute, frames_from_sof
from .settings import read_soxspipe_settings

__all__ = ["soxs_mbias", "soxs_mdark", "soxs_mflat", "soxs_stare"]

_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fits.fz", ".fits.Z", ".fz")


def _tag_of(path: Path) -> str:
    """SOF tag of a file from its header: PRO CATG of products, else from DPR keywords."""
    with open_fits(path) as hdul:
        catg = str(hdul[0].header.get("ESO PRO CATG", "")).strip()
    if catg:
        return catg
    frame = RawFrame.open(path)
    try:
        if frame.tag is None:
            raise InputError(f"{path}: DPR TYPE {frame.dpr_type!r} is not a frame type soxs "
                             "knows")
        return frame.tag
    finally:
        frame.close()


def _collect_frames(input_frames: Any) -> list[tuple[str, str]]:
    """``(path, tag)`` pairs from a directory, an SOF path or a list of FITS paths."""
    if isinstance(input_frames, (str, os.PathLike)):
        path = Path(input_frames)
        if path.is_dir():
            files = sorted(p for p in path.iterdir()
                           if p.is_file() and p.name.endswith(_FITS_SUFFIXES))
            if not files:
                raise InputError(f"{path}: directory holds no FITS files")
            return [(str(p), _tag_of(p)) for p in files]
        if path.suffix.lower() == ".sof" or not path.name.endswith(_FITS_SUFFIXES):
            return frames_from_sof(path)
        return [(str(path), _tag_of(path))]
    files = [Path(p) for p in (input_frames or [])]
    if not files:
        raise InputError("inputFrames is empty")
    return [(str(p), _tag_of(p)) for p in files]


class _SoxspipeStyleRecipe:
    """Shared body of the soxspipe-style recipe classes."""

    module = None  # the recipe module (SPEC, verify, reduce)

    def __init__(self, log: logging.Logger | None = None, settings: Any = False,
                 inputFrames: Any = (), verbose: bool = False,  # noqa: N803
                 overwrite: bool = False, command: Any = False, debug: bool = False,
                 turnOffMP: bool = False) -> None:  # noqa: N803
        self.log = log or logging.getLogger("soxs")
        self.settings = settings if isinstance(settings, dict) else {}
        self.inputFrames = inputFrames
        self.verbose = verbose
        self.overwrite = overwrite
        self.command = command
        self.debug = debug
        self.turnOffMP = turnOffMP
        self.recipeName = self.module.SPEC.name
        self.qc: dict = {}
        self._frames = None

    # -------------------------------------------------------------------- helpers
    @property
    def frames(self) -> list[tuple[str, str]]:
        if self._frames is None:
            self._frames = _collect_frames(self.inputFrames)
        return self._frames

    def _settings(self):
        return read_soxspipe_settings(self.settings, self.module.SPEC)

    def _output_dir(self) -> Path:
        root = Path(self.settings.get("workspace-root-dir", ".") or ".")
        return root / "reduced" / self.recipeName

    # -------------------------------------------------------------------- API
    def verify_input_frames(self) -> None:
        """Raise InputError when the input frames do not fit the recipe; silent otherwise."""
        execute(self.module.SPEC, self.frames, self._settings(), self.module.verify,
                output_dir=self._output_dir(), overwrite=True)

    def produce_product(self) -> str:
        """Reduce the frames and return the path of the product."""
        products = execute(self.module.SPEC, self.frames, self._settings(), self.module.reduce,
                           output_dir=self._output_dir(), overwrite=self.overwrite)
        # the recipe's first declared product (the UVB per-lamp flats are written before it)
        main = self.module.SPEC.outputs[0]
        path = next((p.path for p in products if p.path.name in {
            main.filename_for(arm) for arm in self.module.SPEC.accepted_arms()}),
            products[0].path)
        from soxs_core.io.fits import read_header

        header = read_header(path)
        self.qc = {k[7:]: header[k] for k in header if k.startswith("ESO QC ")}
        return str(path)

    # -------------------------------------------------------------------- QC methods
    def _raw(self, frames: Sequence[Any] | None = None) -> list[RawFrame]:
        paths = frames if frames is not None else [p for p, t in self.frames]
        return [f if isinstance(f, RawFrame) else RawFrame.open(f) for f in paths]

    def qc_ron(self, frameType: Any = False, frameName: Any = False,  # noqa: N803
               masterFrame: Any = False, rawRon: Any = False,
               masterRon: Any = False) -> tuple[float, float | None]:
        """Raw read noise (first two input frames) and master noise (of ``masterFrame``).

        Returns
        -------
        rawRon, masterRon : float
            ``masterRon`` is None when no master frame is given.
        """
        if rawRon is False:
            raws = self._raw()[:2]
            if len(raws) < 2:
                raise InputError("qc_ron needs at least two raw frames")
            rawRon = read_noise_from_pair(raws[0].read_band()[0], raws[1].read_band()[0])
        if masterRon is False and masterFrame is not False:
            image = masterFrame if isinstance(masterFrame, DetectorImage) else \
                read_image_product(masterFrame)
            good = image.qual == 0
            masterRon = robust_std((image.data - smooth_background(image.data, good))[good])
        return float(rawRon), (None if masterRon is False else float(masterRon))

    def qc_bias_structure(self, combined_bias_mean: Any) -> tuple[float, float]:
        """Slopes of the master's mean column profile (x) and row profile (y), e-/px."""
        image = combined_bias_mean if isinstance(combined_bias_mean, DetectorImage) else \
            read_image_product(combined_bias_mean) if isinstance(
                combined_bias_mean, (str, os.PathLike)) else None
        if image is None:
            data = np.asarray(combined_bias_mean, np.float64)
            return structure_slopes(data, np.isfinite(data))
        return structure_slopes(image.data, image.qual == 0)

    def qc_periodic_pattern_noise(self, frames: Sequence[Any] | None = None) -> float:
        """Max over raw frames of the FFT peak pattern-noise indicator (5x5 binned; white
        noise scores ~1; see :func:`soxs_core.combine.qc.periodic_pattern_metric`)."""
        values = [periodic_pattern_metric(block_mean(f.read_band()[0], 5))
                  for f in self._raw(frames)]
        return float(max(values))

    def qc_median_flux_level(self, frame: Any, frameType: str = "MBIAS",  # noqa: N803
                             frameName: str = "master bias", medianFlux: Any = False
                             ) -> float:
        """Median flux of the good pixels of a frame (DetectorImage, product path or array)."""
        if medianFlux is not False:
            return float(medianFlux)
        if isinstance(frame, (str, os.PathLike)):
            frame = read_image_product(frame)
        if isinstance(frame, DetectorImage):
            return float(np.median(frame.data[frame.qual == 0]))
        data = np.asarray(frame, np.float64)
        return float(np.nanmedian(data))


class soxs_mbias(_SoxspipeStyleRecipe):  # noqa: N801 - the name soxspipe scripts use
    """Create a master bias; ``produce_product()`` returns its path."""

    module = mbias


class soxs_mdark(_SoxspipeStyleRecipe):  # noqa: N801
    """Create a master dark; ``produce_product()`` returns its path."""

    module = mdark


class soxs_mflat(_SoxspipeStyleRecipe):  # noqa: N801
    """Create a normalised master flat and the order-edge table; ``produce_product()``
    returns the master flat's path (the order table is written beside it).

    The public steps are those of the seed page, each a thin call into
    :mod:`soxs_core.echelle.flat` on the recipe's own inputs.
    """

    module = mflat

    def _context_inputs(self):
        """The run's FlatInputs and FlatParameters, read through the recipe framework."""
        captured = {}

        def grab(context):
            captured["inputs"] = mflat.flat_inputs(context)
            captured["params"] = mflat.flat_parameters(context)
            captured["arm"] = context.arm

        execute(self.module.SPEC, self.frames, self._settings(), grab,
                output_dir=self._output_dir(), overwrite=True)
        return captured["inputs"], captured["params"]

    def calibrate_frame_set(self):
        """The lamp flats with their bias/dark/lamp-off detrending attached, per lamp.

        Returns
        -------
        dict
            Input stem (``LAMP_FLAT``; UVB ``LAMP_DFLAT``, ``LAMP_QFLAT``) ->
            :class:`soxs_core.echelle.flat.CalibratedFlats`.
        """
        from soxs_core.echelle import flat

        inputs, params = self._context_inputs()
        clip = flat.flat_clip_settings(params.stacked_clipping_sigma,
                                       params.stacked_clipping_iterations)
        return {stem: flat.calibrate_frame_set(frames, inputs.master_bias,
                                               inputs.master_dark, inputs.lamp_off or None,
                                               clip)
                for stem, frames in inputs.flats.items()}

    def normalise_flats(self, inputFlats, orderTablePath,  # noqa: N803
                        firstPassMasterFlat=False, lamp=""):  # noqa: N803
        """Two-stage exposure levels of calibrated flats (see
        :func:`soxs_core.echelle.flat.normalise_flats`) with the recipe's parameters."""
        from soxs_core.echelle import flat
        from soxs_core.echelle.ordertable import read_order_table

        _, params = self._context_inputs()
        table = orderTablePath if not isinstance(orderTablePath, (str, os.PathLike)) \
            else read_order_table(orderTablePath)
        clip = flat.flat_clip_settings(params.stacked_clipping_sigma,
                                       params.stacked_clipping_iterations)
        return flat.normalise_flats(inputFlats, table, params.centre_order_window, clip)

    def mask_low_sens_pixels(self, frame, orderTablePath, returnMedianOrderFlux=False,  # noqa: N803
                             writeQC=True):  # noqa: N803
        """Flag LOW_SENS pixels of a master flat; returns ``(frame, n_low_sens)``."""
        from soxs_core.echelle import flat
        from soxs_core.echelle.ordertable import read_order_table

        image = frame if isinstance(frame, DetectorImage) else read_image_product(frame)
        table = orderTablePath if not isinstance(orderTablePath, (str, os.PathLike)) \
            else read_order_table(orderTablePath)
        binx = int(image.header.get("ESO DET WIN1 BINX", image.header.get("ESO DET BINX", 1)))
        biny = int(image.header.get("ESO DET WIN1 BINY", image.header.get("ESO DET BINY", 1)))
        _, params = self._context_inputs()
        return flat.mask_low_sens_pixels(image, table, binx, biny,
                                         params.low_sensitivity_clipping_sigma)

    def find_uvb_overlap_order_and_scale(self, dcalibratedFlats, qcalibratedFlats,  # noqa: N803
                                         orderTable=None, dGoodness=None,  # noqa: N803
                                         qGoodness=None):  # noqa: N803
        """Crossover order of the UVB D2 and QTH master flats and the D2 -> QTH scale (see
        :func:`soxs_core.echelle.flat.find_uvb_overlap_order_and_scale`)."""
        from soxs_core.echelle import flat

        _, params = self._context_inputs()
        d, q = dcalibratedFlats, qcalibratedFlats
        binx = int(d.header.get("ESO DET WIN1 BINX", 1))
        biny = int(d.header.get("ESO DET WIN1 BINY", 1))
        return flat.find_uvb_overlap_order_and_scale(d, q, orderTable, binx, biny,
                                                     dGoodness or {}, qGoodness or {},
                                                     window=params.centre_order_window)

    def stitch_uv_mflats(self, dMaster, qMaster, orderTable, order, scale):  # noqa: N803
        """The stitched UVB master flat (see :func:`soxs_core.echelle.flat.stitch_uv_mflats`)."""
        from soxs_core.echelle import flat

        _, params = self._context_inputs()
        binx = int(dMaster.header.get("ESO DET WIN1 BINX", 1))
        biny = int(dMaster.header.get("ESO DET WIN1 BINY", 1))
        return flat.stitch_uv_mflats(dMaster, qMaster, orderTable, order, scale, binx, biny,
                                     params.scale_d2_to_qth)


class soxs_stare(_SoxspipeStyleRecipe):  # noqa: N801
    """Reduce stare-mode frames; ``produce_product()`` returns the path of the extracted-orders
    table (the merged and flux-calibrated spectra, the sky products, the object trace and,
    for a flux standard, the response and efficiency are written beside it)."""

    module = stare
