"""soxs_stare: the sky-subtracted, optimally extracted and merged spectrum of a stare frame."""

from __future__ import annotations

import logging

from soxs_core.echelle.dispersion import read_dispersion_map
from soxs_core.extraction.stare import (
    StareInputs,
    StareParameters,
    reduce_stare,
    verify_stare_inputs,
)
from soxs_core.io.products import astropy_primary_hdu, astropy_table_hdu

from .compat import ui
from .framework import InputSpec, OutputSpec, Param, QcSpec, RecipeContext, RecipeSpec
from .recipe_base import pyrecipe

log = logging.getLogger("soxs")

#: the raw inputs, one of which a run reduces
RAW_STEMS = ("OBJECT", "STD_FLUX", "STD_TELLURIC")

PARAMS = (
    Param("use-flat", bool, "Divide the frame by the master flat (when one is given).",
          synonyms=("use_flat",)),
    Param("subtract-background", bool, "Fit the scattered light between the orders and "
          "subtract it.", synonyms=("subtract_background",)),
    Param("use-lacosmic", bool, "Find the cosmic rays of a single frame with L.A.Cosmic "
          "(astroscrappy) and keep them out of the sky fit and the extraction (several "
          "frames: they are clipped when stacking).", synonyms=("use_lacosmic",)),
    Param("lacosmic-sigma", float, "L.A.Cosmic detection limit (sigclip), in sigma.",
          minimum=1.0),
    Param("stacked-clipping-sigma", float, "Number of sigma (MAD scale, never below the "
          "values' own errors) from the median beyond which a pixel is excluded when several "
          "frames are stacked.", minimum=0.1),
    Param("stacked-clipping-iterations", int, "Maximum sigma-clipping iterations when "
          "stacking frames.", minimum=0),
    Param("horne-extraction-slit-length", int, "Full width (unbinned pixels across the "
          "order) of the aperture centred on the object trace: the optimal extraction's "
          "window and the boxcar's aperture.", minimum=3),
    Param("horne-extraction-aperture-correction", bool, "Scale each order's extracted "
          "fluxes and errors by the ratio of the object's whole light to its light in the "
          "aperture, from a Moffat profile (plus a constant) fitted to the order's mean "
          "spatial profile within 3 half-apertures of the trace on the sky-subtracted frame "
          "(the aperture misses the seeing wings: about 0.5 % with the default aperture "
          "and 0.8\" seeing on X-shooter VIS); smoothed across the orders.  QC APCOR "
          "MEDIAN and APCOR O<N>."),
    Param("horne-extraction-profile-poly-order", int, "Degree along the dispersion of the "
          "smooth fit of the object's spatial profile.", minimum=0, maximum=15),
    Param("horne-extraction-profile-global-clipping-sigma", float, "Pixels further than this "
          "many sigma from the order's global profile model are left out of the profile fit "
          "(before the per-position clipping).", minimum=1.0),
    Param("horne-extraction-profile-clipping-sigma", float, "Sigma-clipping limit of the "
          "profile fit along the dispersion.", minimum=1.0),
    Param("horne-extraction-profile-clipping-iteration-count", int, "Maximum clipping "
          "iterations of the profile fit.", minimum=0),
    Param("order-sample-count", int, "Number of cross-order cuts per order in which the "
          "object's continuum is located.", minimum=5),
    Param("slice-length", int, "Length (pixels across the order) of each cut.", minimum=5),
    Param("slice-width", int, "Width (pixels along the dispersion) of each cut, "
          "median-collapsed.", minimum=1),
    Param("peak-sigma-limit", float, "Height (in robust sigma of the cut) the continuum's "
          "peak must reach above the cut's baseline to count as detected.", minimum=0.1),
    Param("order-deg", int, "Degree in order number of the global polynomial of the object "
          "trace.", minimum=0, maximum=9),
    Param("disp-axis-deg", int, "Degree along the dispersion of the global polynomial of the "
          "object trace.", minimum=0, maximum=9),
    Param("poly-fitting-residual-clipping-sigma", float, "Clipping limit (robust sigma) of "
          "the trace fit's residuals.", minimum=0.5),
    Param("poly-clipping-iteration-limit", int, "Maximum fit-and-clip cycles of the trace "
          "fit.", minimum=0),
    Param("subtract-sky", bool, "Model the sky (B-spline in wavelength, Kelson 2003) and "
          "subtract it.", synonyms=("subtract_sky",)),
    Param("percentile-clipping-sigma", float, "Sigma of the rolling-percentile clip that "
          "keeps object and cosmic-ray pixels out of the sky sample.", minimum=0.5,
          synonyms=("percentile_clipping_sigma",)),
    Param("percentile-clipping-iterations", int, "Maximum iterations of that clip.",
          minimum=0, synonyms=("percentile_clipping_iterations",)),
    Param("percentile-rolling-window-size", int, "Length (pixels sorted by wavelength) of "
          "the rolling window of that clip.", minimum=3,
          synonyms=("percentile_rolling_window_size",)),
    Param("clip-slit-edge-fraction", float, "Fraction of the slit length left out of the sky "
          "fit at each end of the slit.", minimum=0.0, maximum=0.4),
    Param("aggressive-object-masking", bool, "Mask whole slit-position ranges where object "
          "pixels cluster, not only the pixels flagged.",
          synonyms=("aggressive_object_masking",)),
    Param("bspline-order", int, "Degree of the sky B-spline in wavelength.", minimum=1,
          maximum=5, synonyms=("bspline_order",)),
    Param("slit-illumination-order", int, "Degree of the polynomial in slit position that "
          "multiplies the sky spectrum (the slit's illumination).", minimum=0, maximum=5,
          synonyms=("slit_illumination_order",)),
    Param("starting-points-per-knot", int, "Initial spacing of the sky spline's breakpoints, "
          "in pixels (sorted by wavelength) per interval.", minimum=2,
          synonyms=("starting_points_per_knot",)),
    Param("min-points-per-knot", int, "Fewest pixels an interval of the sky spline may hold "
          "when breakpoints are added at the sky lines.", minimum=2,
          synonyms=("min_points_per_knot",)),
    Param("bspline-fitting-residual-clipping-sigma", float, "Pixels further than this many "
          "sigma from the sky fit are rejected between iterations.", minimum=1.0,
          synonyms=("bspline_fitting_residual_clipping_sigma",)),
    Param("bspline-iteration-limit", int, "Maximum refit (and breakpoint-insertion) "
          "iterations of the sky fit.", minimum=1, synonyms=("bspline_iteration_limit",)),
    Param("residual-floor-percentile", float, "Percentile of the residuals taken as their "
          "floor when deciding where breakpoints are added.", minimum=1.0, maximum=99.9,
          synonyms=("residual_floor_percentile",)),
    Param("bspline-deg", int, "Degree of the smoothing spline fitted across the orders to "
          "the inter-order (scattered) light.", minimum=1, maximum=5),
    Param("gaussian-blur-sigma", int, "Sigma (unbinned pixels) of the smoothing of the "
          "scattered-light model along the dispersion.", minimum=0),
    Param("response-max-iteration", int, "Maximum clipping iterations of the response fit "
          "(flux standards).", minimum=1, synonyms=("max_iteration",)),
    Param("response-poly-order", int, "Degree in wavelength of the response polynomial of "
          "each order (flux standards).", minimum=0, maximum=12, synonyms=("poly_order",)),
)

_RAW_DOC = ("Raw {} frames in stare mode (DPR TYPE {}, TECH ECHELLE,SLIT), one or more of one "
            "exposure time and slit.")

SPEC = RecipeSpec(
    # its frame-sized planes live long: the heap's kept free space would only add to the peak
    reuse_freed_memory=False,
    name="soxs_stare",
    synopsis="Reduce stare-mode frames to a sky-subtracted, optimally extracted spectrum",
    description="""
        The raw frames are prepared and detrended (minus the master bias, UVB/VIS; minus the
        master dark of the same exposure time, NIR); several frames are stacked with sigma
        clipping, a single frame has its cosmic rays found by L.A.Cosmic.  The frame is
        divided by the master flat, the scattered light between the orders is modelled and
        subtracted, and the sky is modelled in every order as a B-spline in wavelength times
        a slit-illumination polynomial, fitted through the dispersion map to all sky pixels
        (object masked, outliers rejected), and subtracted.  The object's continuum is
        located in cuts across every order and fitted with a global polynomial in order
        number and position along the dispersion (OBJECT_TAB).  The object is extracted with
        Horne's optimal extraction (a spatial profile fitted smoothly along each order, the
        variance from the model, cosmic rays and bad pixels rejected) and with a boxcar of
        the same aperture.  The orders are merged onto one wavelength grid, weighted by
        their errors, with flux-conserving resampling.  For a flux standard the response
        (catalogue flux over extinction-corrected counts, a smooth fit per order) and the
        efficiency are derived and the standard is flux-calibrated; a science frame given a
        RESP_TAB is flux-calibrated with it (exposure time, airmass and La Silla extinction
        applied).
    """,
    inputs=(
        InputSpec("OBJECT", "RAW", _RAW_DOC.format("science", "OBJECT"), min_count=0,
                  required=False),
        InputSpec("STD_FLUX", "RAW", _RAW_DOC.format("flux-standard", "STD,FLUX"),
                  min_count=0, required=False),
        InputSpec("STD_TELLURIC", "RAW", _RAW_DOC.format("telluric-standard",
                                                         "STD,TELLURIC"),
                  min_count=0, required=False),
        InputSpec("MASTER_BIAS", "CALIB", "Master bias from soxs_mbias (UVB/VIS).",
                  min_count=1, max_count=1, required=True, arms=("UVB", "VIS"),
                  match=("binning", "readout")),
        InputSpec("MASTER_DARK", "CALIB", "Master dark of the frames' exposure time from "
                  "soxs_mdark (NIR; UVB/VIS optional).", min_count=1, max_count=1,
                  required=True, arms=("NIR",), match=("exptime",)),
        InputSpec("MASTER_DARK", "CALIB", "Master dark of the frames' exposure time "
                  "(optional for UVB/VIS).", min_count=0, max_count=1, required=False,
                  arms=("UVB", "VIS"), match=("binning", "readout", "exptime"),
                  associate=False),
        InputSpec("MASTER_FLAT", "CALIB", "Master flat from soxs_mflat (or soxspipe's).",
                  min_count=0, max_count=1, required=False, match=("binning", "readout")),
        InputSpec("ORDER_TAB", "CALIB", "Order table with edges from soxs_mflat (or "
                  "soxspipe's).", min_count=1, max_count=1, required=True,
                  match=("binning", "readout")),
        InputSpec("DISP_TAB", "CALIB", "Dispersion solution table (soxspipe's "
                  "spat_solution layout).", min_count=0, max_count=1, required=False),
        InputSpec("DISP_IMAGE", "CALIB", "Dispersion map image: WAVELENGTH, SLIT and ORDER "
                  "of every unbinned pixel.", min_count=1, max_count=1, required=True),
        InputSpec("RESP_TAB", "CALIB", "Response function from a flux standard's "
                  "soxs_stare, to flux-calibrate a science frame.", min_count=0,
                  max_count=1, required=False),
    ),
    params=PARAMS,
    # verify_stare_inputs: the frames of one run share exposure time, slit and setup
    group_by=("binning", "readout", "slit", "exptime", "template"),
    raw_inputs_separately=True,
    outputs=(
        OutputSpec("EXTRACTED ORDERS TABLE", "SCI_SLIT_FLUX", "Per order and along-order "
                   "pixel: optimal and boxcar counts with variances, wavelength, sky.",
                   tech="ECHELLE,SLIT", kind="table", suffix="extracted_orders"),
        OutputSpec("EXTRACTED MERGED TABLE", "SCI_SLIT_FLUX", "The orders merged onto one "
                   "wavelength grid (flux-conserving, error-weighted).", tech="ECHELLE,SLIT",
                   kind="table", suffix="extracted_merged"),
        OutputSpec("EXTRACTED FLUXCAL SPECTRUM", "SCI_SLIT_FLUX", "The flux-calibrated "
                   "merged spectrum (erg/s/cm2/A), when a response is given or derived.",
                   tech="ECHELLE,SLIT", kind="table", suffix="fluxcal"),
        OutputSpec("SKY SUBTRACTED OBJECT", "SKYSUB", "The frame minus background and sky "
                   "(FLUX/QUAL/ERRS).", tech="ECHELLE,SLIT"),
        OutputSpec("SKY MODEL", "SKYMODEL", "The sky model (FLUX/QUAL/ERRS).",
                   tech="ECHELLE,SLIT"),
        OutputSpec("SKY SUB RESIDUALS", "SKYSUB_RESIDUALS", "Sky-only pixels minus the sky "
                   "model; 0 elsewhere.", tech="ECHELLE,SLIT"),
        OutputSpec("OBJECT TRACE", "OBJECT_TAB", "The object trace (centre and width "
                   "polynomials), in the ORDER_TAB layout.", tech="ECHELLE,SLIT",
                   kind="table"),
        OutputSpec("RESPONSE_FUNC", "RESP_TAB", "Response function (flux standards).",
                   tech="ECHELLE,SLIT", kind="table", raw_inputs=("STD_FLUX",)),
        OutputSpec("EFFICIENCY", "EFFICIENCY_TAB", "Efficiency (flux standards).",
                   tech="ECHELLE,SLIT", kind="table", raw_inputs=("STD_FLUX",)),
        OutputSpec("EXTRACTED MERGED ASCII", "SCI_SLIT_FLUX", "Text version of the merged "
                   "spectrum.", kind="text", suffix="extracted_merged"),
        OutputSpec("BKGROUND", "BKGROUND", "The fitted scattered light.", kind="plot"),
        OutputSpec("SKY MODEL QC PLOTS", "SKY_MODEL_QC", "Sky data and model against "
                   "wavelength, with residuals.", kind="plot"),
        OutputSpec("SKY SUBTRACTION QUICKLOOK", "SKY_SUB_QUICKLOOK", "Frame, sky model and "
                   "residuals.", kind="plot"),
        OutputSpec("OBJECT TRACE RES", "OBJECT_TRACE_RES", "Object-trace samples, fit and "
                   "residuals.", kind="plot"),
        OutputSpec("EXTRACTED ORDERS QC PLOT", "EXTRACTED_ORDERS", "The extracted orders.",
                   kind="plot"),
        OutputSpec("EXTRACTED MERGED QC PLOT", "EXTRACTED_MERGED", "The merged spectrum.",
                   kind="plot"),
        OutputSpec("EXTRACTED MERGED FLUXCALIBRATED QC PLOT", "EXTRACTED_FLUXCAL",
                   "The flux-calibrated spectrum.", kind="plot"),
        OutputSpec("RESPONSE QC PLOT", "RESPONSE", "The response curve (flux standards).",
                   kind="plot", raw_inputs=("STD_FLUX",)),
    ),
    qc=(
        QcSpec("BADPIX FRAC", "bad-pixel fraction", description="fraction of the pixels "
               "between the order edges flagged in QUAL"),
        QcSpec("BADPIX NUM", "bad pixels", description="pixels between the order edges "
               "flagged in QUAL"),
        QcSpec("INNER ORDER PIX MEAN", "mean", unit="e-", description="mean of the "
               "good in-order pixels of the sky-subtracted frame"),
        QcSpec("INNER ORDER PIX SUM", "sum", unit="e-", description="sum of the good "
               "in-order pixels of the sky-subtracted frame"),
        QcSpec("N ORDERS", "orders traced", description="orders containing an object trace"),
        QcSpec("SAMPLES DET NUM", "detected cuts", description="cuts in which the "
               "continuum was detected"),
        QcSpec("SAMPLES DET FRAC", "detected fraction", description="fraction of the cuts in "
               "which the continuum was detected"),
        QcSpec("SAMPLES TOT NUM", "continuum cuts", description="cuts placed along the "
               "orders"),
        QcSpec("SAMPLES CLIP NUM", "clipped detections", description="detections clipped by "
               "the trace fit"),
        QcSpec("SAMPLES CLIP FRAC", "clipped fraction", description="fraction of the "
               "detections clipped by the trace fit"),
        QcSpec("X RES MAX", "max trace residual", unit="px", description="largest residual "
               "of the trace fit across the order (orders along y)"),
        QcSpec("X RES MIN", "min trace residual", unit="px", description="smallest residual "
               "of the trace fit (orders along y)"),
        QcSpec("X RES SD", "sd trace residual", unit="px", description="standard deviation "
               "of the trace-fit residuals (orders along y)"),
        QcSpec("Y RES MAX", "max trace residual", unit="px", description="largest residual "
               "of the trace fit across the order (SOXS NIR, orders along x)"),
        QcSpec("Y RES MIN", "min trace residual", unit="px", description="smallest residual "
               "of the trace fit (SOXS NIR)"),
        QcSpec("Y RES SD", "sd trace residual", unit="px", description="standard deviation "
               "of the trace-fit residuals (SOXS NIR)"),
        QcSpec("EFF MEDIAN", "median efficiency", description="median efficiency over the "
               "arm (flux standards)"),
        QcSpec("SNR MEDIAN", "median S/N", description="median signal-to-noise ratio of the "
               "optimally extracted rows of all orders"),
        QcSpec("APCOR MEDIAN", "aperture correction", description="median over the orders "
               "of the aperture correction applied (whole-slit / aperture light; 1 when "
               "horne-extraction-aperture-correction is off)"),
        QcSpec("APCOR O<N>", "aperture correction", description="aperture correction "
               "applied to order <N>"),
        QcSpec("EFF MEDIAN O<N>", "median efficiency", description="median efficiency of "
               "order N (flux standards)"),
        QcSpec("SNR MEDIAN O<N>", "median S/N", description="median signal-to-noise ratio "
               "of order N"),
    ),
)


def _output(label: str) -> OutputSpec:
    return next(o for o in SPEC.outputs if o.label == label)


def stare_parameters(context: RecipeContext) -> StareParameters:
    """The science's parameters from the resolved recipe parameters."""
    return StareParameters.from_mapping(context.params)


def stare_inputs(context: RecipeContext) -> StareInputs:
    """The frames and calibrations of the run, read and checked against each other."""
    from soxs_core.spectrum.fluxcal import read_response

    kinds = [stem for stem in RAW_STEMS if context.raw_frames(stem)]
    if len(kinds) > 1:
        raise ValueError  # refused by verify() first
    kind = kinds[0]
    frames = context.raw_frames(kind)
    first = frames[0]
    paths = {stem: entries[0][0] for stem, entries in context.calib.items() if entries}
    disp_path = paths["DISP_IMAGE"]
    disp_map = read_dispersion_map(disp_path, first.binx, first.biny, first.prepared_shape)
    context.note_calib("DISP_IMAGE")
    if "DISP_TAB" in paths:
        context.note_calib("DISP_TAB")
    response = None
    if "RESP_TAB" in paths:
        response = read_response(paths["RESP_TAB"])
        context.note_calib("RESP_TAB")
    return StareInputs(
        arm=context.arm, kind=kind, frames=frames,
        order_table=context.calib_order_table("ORDER_TAB"), disp_map=disp_map,
        master_bias=context.calib_image("MASTER_BIAS"),
        master_dark=context.calib_image("MASTER_DARK"),
        master_flat=context.calib_image("MASTER_FLAT"),
        response=response, paths=paths)


def _check_one_kind(context: RecipeContext) -> None:
    from soxs_core.errors import InputError

    kinds = [stem for stem in RAW_STEMS if context.raw_frames(stem)]
    if len(kinds) > 1:
        other = context.raw_frames(kinds[1])[0]
        raise InputError(f"{other.path}: {kinds[1]} frame mixed with {kinds[0]} frames "
                         "(reduce each target on its own)")


def verify(context: RecipeContext) -> None:
    """Raise InputError unless the frames and calibrations can be combined."""
    _check_one_kind(context)
    verify_stare_inputs(stare_inputs(context))


def reduce(context: RecipeContext) -> None:
    """Reduce the frames and write the spectra, images, tables and QC plots."""
    from soxs_core.spectrum.merge import write_merged_ascii

    _check_one_kind(context)
    inputs = stare_inputs(context)
    verify_stare_inputs(inputs)
    # acceptable QC ranges are a standard star's (seed table 80)
    context.apply_qc_ranges = inputs.is_standard
    plots = {o.label: context.plot_path(o) for o in SPEC.outputs
             if o.kind == "plot" and o.written_for(context.arm)}
    result = reduce_stare(inputs, stare_parameters(context), plots)
    qc = result.qc
    context.save_table(_output("EXTRACTED ORDERS TABLE"), _table_hdus(result.orders), qc)
    context.save_table(_output("EXTRACTED MERGED TABLE"), _table_hdus(result.merged), qc)
    if result.fluxcal is not None:
        context.save_table(_output("EXTRACTED FLUXCAL SPECTRUM"),
                           _table_hdus(result.fluxcal), qc)
    context.save_image(_output("SKY SUBTRACTED OBJECT"), result.skysub, qc)
    context.save_image(_output("SKY MODEL"), result.sky_model, qc)
    context.save_image(_output("SKY SUB RESIDUALS"), result.sky_residuals, qc)
    context.save_table(_output("OBJECT TRACE"), result.object_trace.table.to_hdus, qc)
    if result.response is not None:
        context.save_table(_output("RESPONSE_FUNC"), _response_hdus(result.response), qc)
    if result.efficiency is not None:
        context.save_table(_output("EFFICIENCY"), _table_hdus(result.efficiency), qc)
    context.save_text(_output("EXTRACTED MERGED ASCII"),
                      lambda path: write_merged_ascii(path, result.merged))
    for label, path in result.plots.items():
        context.record_plot(_output(label), path)


def _table_hdus(table):
    """``hdul_for(primary_header)`` writing one astropy table as HDU1."""
    def build(header):
        from astropy.io import fits

        return fits.HDUList([astropy_primary_hdu(header), astropy_table_hdu(table)])
    return build


def _response_hdus(response):
    def build(header):
        from astropy.io import fits

        return fits.HDUList([astropy_primary_hdu(header), *response.to_hdus()])
    return build


@pyrecipe(SPEC, reduce)
class SoxsStare(ui.PyRecipe):
    """PyCPL recipe ``soxs_stare``."""


RECIPE_CLASS = SoxsStare
