"""soxs_mflat: a normalised master flat and the order-edge table from raw lamp flats."""

from __future__ import annotations

from soxs_core.echelle.masterflat import (
    FlatInputs,
    FlatParameters,
    make_master_flat,
    verify_flat_inputs,
)
from soxs_core.io.preload import preload

from .compat import ui
from .framework import InputSpec, OutputSpec, Param, QcSpec, RecipeContext, RecipeSpec
from .recipe_base import pyrecipe

_ALL = ("UVB", "VIS", "NIR")

PARAMS = (
    Param("subtract-background", bool,
          "Fit the scattered light between the orders and subtract it from the master flat.",
          synonyms=("subtract_background",)),
    Param("stacked-clipping-sigma", float,
          "Number of sigma deviations from the median pixel flux beyond which a pixel is "
          "excluded from the stack (per-pixel clip across the normalised flats; sigma is the "
          "MAD scale, never below the values' own propagated errors).", minimum=0.1),
    Param("stacked-clipping-iterations", int,
          "Maximum sigma-clipping iterations when stacking the flats.", minimum=0),
    Param("centre-order-window", int,
          "Width (unbinned pixels) of the curved band around each order centre whose flux "
          "measures a flat's exposure level (half on each side).", minimum=2),
    Param("slice-length-for-edge-detection", int,
          "Length (pixels across the orders) of the cuts in which order edges are found.",
          minimum=10),
    Param("slice-width-for-edge-detection", int,
          "Width (pixels along the dispersion) of those cuts, median-collapsed.", minimum=1),
    Param("min-percentage-threshold-for-edge-detection", int,
          "Lowest flux, in percent of the order's level above the inter-order floor, that "
          "still counts as inside the order: a cut whose flux never falls below it has no "
          "edge.", minimum=1, maximum=99),
    Param("max-percentage-threshold-for-edge-detection", int,
          "Flux level, in percent of the order's level above the floor, at which the edge is "
          "placed (50: the half-light point of the slit's end).", minimum=1, maximum=99),
    Param("order-deg", int,
          "Degree in echelle order number of the global polynomial fitted to each order edge.",
          minimum=0, maximum=9),
    Param("disp-axis-deg", int,
          "Degree along the dispersion axis of the global polynomial fitted to each order "
          "edge.", minimum=0, maximum=9),
    Param("poly-fitting-residual-clipping-sigma", float,
          "Clipping limit (robust sigma of the residuals) of the global edge fits.",
          minimum=0.5),
    Param("poly-clipping-iteration-limit", int,
          "Maximum fit-and-clip cycles of the global edge fits.", minimum=0),
    Param("low-sensitivity-clipping-sigma", float,
          "A pixel between the order edges is flagged LOW_SENS when its flux is below its "
          "local level L (the median of its in-order neighbours up to 8 px away along the "
          "dispersion) by more than this many times 0.25 L, and by more than 5 sigma of the "
          "noise expected at L; 0.25 L stands for the seed's 'sigma' (an order's own flux "
          "spread follows its blaze, and the pixel-to-pixel spread would flag 2 % of normal "
          "pixels), so the default 2 flags pixels with less than half their neighbours' "
          "response.", minimum=0.1),
    Param("scale-d2-to-qth", bool,
          "UVB: scale the D2-lamp master flat to the QTH one before stitching them."),
    Param("bspline-deg", int,
          "Degree of the smoothing spline fitted across the orders to the inter-order "
          "(scattered) light.", minimum=1, maximum=5),
    Param("gaussian-blur-sigma", int,
          "Sigma (unbinned pixels: the halo's scale on the detector does not change with "
          "the binning) of the Gaussian smoothing of the scattered-light model along the "
          "dispersion.", minimum=0),
)

_FLAT_DOC = ("Raw lamp flats (at least 5) of one exposure time, slit and readout; identified "
             "from DPR TYPE/TECH ({}, ECHELLE,SLIT).")

#: the card that tells a UVB per-lamp product from the stitched one of the same PRO CATG
_DLAMP = (("ESO PRO FLAT LAMP", "D2", "flats of this lamp only, not stitched"),)
_QLAMP = (("ESO PRO FLAT LAMP", "QTH", "flats of this lamp only, not stitched"),)
#: the stitched UVB master flat and its order table (the label of the VIS/NIR products too)
_STITCHED = ("MFLAT", "ORDER LOC")


SPEC = RecipeSpec(
    name="soxs_mflat",
    synopsis="Create a normalised master flat and the order-edge table from lamp flats",
    description="""
        Raw lamp flats are prepared (rotated, trimmed, in electrons) and detrended: minus the
        master bias (UVB/VIS), minus the master dark or the stack of lamp-off frames of the
        same exposure time (NIR).  Each flat's exposure level is measured as the clipped mean
        of its good pixels in a curved band of centre-order-window pixels around every order
        centre; the flats divided by their levels are stacked with sigma clipping into a
        first-pass master; each flat divided by that master is measured again, which removes
        the illumination pattern from the level; the flats divided by these levels are
        stacked into the master flat.  The order edges are found in cross-dispersion cuts
        along every order and fitted, upper and lower edge each, with a global polynomial in
        order number and position along the dispersion, clipping outliers.  Without an
        ORDER_TAB the orders are found and numbered from the flat itself (self-tracing, with
        the arm's predicted order positions).  The scattered light between the orders is
        modelled and, with subtract-background, subtracted.  The master is normalised to a
        mean inner-order level of 1, pixels between the orders are set to 1, and pixels whose
        response falls far below their neighbours' are flagged LOW_SENS.  UVB: the D2 and
        QTH master flats are made separately, the D2 one scaled to the QTH one at the order
        where both lamps give light, and the two stitched along a line 5 pixels above that
        order's upper edge; the edges are found again on the stitched flat.
    """,
    inputs=(
        InputSpec("LAMP_FLAT", "RAW", _FLAT_DOC.format("LAMP,FLAT or FLAT,LAMP"),
                  min_count=5, required=True, arms=("VIS", "NIR"),
                  tag_stems=("FLAT_LAMP", "FLAT"), frame_types=("FLAT",),
                  same_exptime=True),
        InputSpec("LAMP_DFLAT", "RAW",
                  _FLAT_DOC.format("LAMP,DFLAT: deuterium (D2) lamp"),
                  min_count=5, required=True, arms=("UVB",), tag_stems=("DFLAT",),
                  frame_types=("DFLAT",), same_exptime=True),
        InputSpec("LAMP_QFLAT", "RAW",
                  _FLAT_DOC.format("LAMP,QFLAT: quartz-halogen (QTH) lamp"),
                  min_count=5, required=True, arms=("UVB",), tag_stems=("QFLAT",),
                  frame_types=("QFLAT",), same_exptime=True),
        InputSpec("LAMP_OFF", "RAW", "NIR lamp-off flats (DPR TECH IMAGE), as many as the "
                  "lamp-on flats and of the same exposure time; tagged like the lamp-on ones "
                  "(their header tells them apart).", min_count=0, required=False,
                  arms=("NIR",), tag_stems=("LAMP_FLAT", "FLAT_LAMP", "FLAT_OFF"),
                  frame_types=("FLAT_OFF",), same_exptime=True, exptime_of="LAMP_FLAT"),
        InputSpec("MASTER_BIAS", "CALIB", "Master bias from soxs_mbias (UVB/VIS).",
                  min_count=1, max_count=1, required=True, arms=("UVB", "VIS"),
                  match=("binning", "readout")),
        InputSpec("MASTER_DARK", "CALIB", "Master dark of the flats' exposure time from "
                  "soxs_mdark (NIR, when no lamp-off frames are given).", min_count=0,
                  max_count=1, required=False, arms=("NIR",), match=("exptime",)),
        InputSpec("ORDER_TAB", "CALIB", "Order-centre table (soxspipe's order_centres or "
                  "ours); without it the orders are traced on the flat itself.", min_count=0,
                  max_count=1, required=False),
    ),
    params=PARAMS,
    group_by=("binning", "readout", "slit"),
    outputs=(
        OutputSpec("MFLAT", "MASTER_FLAT", "Normalised master flat (FLUX/QUAL/ERRS; mean 1 "
                   "inside the orders, 1 between them, blaze and slit illumination kept)."),
        OutputSpec("ORDER LOC", "ORDER_TAB", "Order table: centre, upper and lower edge "
                   "polynomials (unbinned pixels) and per-order ranges.", tech="ECHELLE,SLIT",
                   kind="table"),
        OutputSpec("ORDER LOC RES", "ORDER_LOC_RES", "Edge detections per cut, the fitted "
                   "edges and their residuals.", kind="plot"),
        OutputSpec("BKGROUND", "BKGROUND", "The fitted scattered light (with "
                   "subtract-background).", kind="plot", arms=("VIS", "NIR")),
        OutputSpec("MFLAT DLAMP", "MASTER_FLAT", "UVB D2-lamp master flat.", suffix="dlamp",
                   arms=("UVB",),
                   keywords=_DLAMP),
        OutputSpec("ORDER LOC DLAMP", "ORDER_TAB", "UVB D2-lamp order table.",
                   tech="ECHELLE,SLIT", kind="table", suffix="dlamp", arms=("UVB",),
                   keywords=_DLAMP),
        OutputSpec("ORDER LOC RES DLAMP", "ORDER_LOC_RES", "D2-lamp edge fit.", kind="plot",
                   suffix="dlamp", arms=("UVB",)),
        OutputSpec("BKGROUND DLAMP", "BKGROUND", "D2-lamp scattered light.", kind="plot",
                   suffix="dlamp", arms=("UVB",)),
        OutputSpec("MFLAT QLAMP", "MASTER_FLAT", "UVB QTH-lamp master flat.", suffix="qlamp",
                   arms=("UVB",),
                   keywords=_QLAMP),
        OutputSpec("ORDER LOC QLAMP", "ORDER_TAB", "UVB QTH-lamp order table.",
                   tech="ECHELLE,SLIT", kind="table", suffix="qlamp", arms=("UVB",),
                   keywords=_QLAMP),
        OutputSpec("ORDER LOC RES QLAMP", "ORDER_LOC_RES", "QTH-lamp edge fit.", kind="plot",
                   suffix="qlamp", arms=("UVB",)),
        OutputSpec("BKGROUND QLAMP", "BKGROUND", "QTH-lamp scattered light.", kind="plot",
                   suffix="qlamp", arms=("UVB",)),
    ),
    qc=(
        QcSpec("ORDEXP10", "p10 order-centre flux", unit="e-",
               description="median over the raw flats of the 10th percentile of the flux in "
               "the centre-order band"),
        QcSpec("ORDEXP50", "p50 order-centre flux", unit="e-",
               description="median over the raw flats of the median flux in the "
               "centre-order band"),
        QcSpec("ORDEXP90", "p90 order-centre flux", unit="e-",
               description="median over the raw flats of the 90th percentile of the flux in "
               "the centre-order band"),
        QcSpec("COLDPIX NUM", "flagged pixels",
               description="pixels of the master flat flagged in QUAL (static bad, from the "
               "calibrations, saturated or without data in every flat, low-sensitivity)"),
        QcSpec("COLDPIX FRAC", "flagged pixel fraction",
               description="fraction of the master flat's pixels flagged in QUAL"),
        QcSpec("INNER ORDER PIX MEAN", "in-order mean",
               description="mean of the unflagged master-flat pixels between the edges"),
        QcSpec("INNER ORDER PIX SUM", "in-order sum",
               description="sum of the unflagged master-flat pixels between the edges"),
        QcSpec("N LOW SENS", "low-sensitivity pixels",
               description="pixels flagged LOW_SENS"),
        QcSpec("X RES MIN", "min |edge residual|", unit="px",
               description="smallest absolute residual of the upper and lower edge fits"),
        QcSpec("X RES MAX", "max |edge residual|", unit="px",
               description="largest absolute residual of the edge fits (clipped samples "
               "excluded)"),
        QcSpec("X RES SD", "sd |edge residual|", unit="px",
               description="standard deviation of the absolute residuals of the edge fits"),
        QcSpec("N ORDERS", "orders with fitted edges",
               description="orders whose edges were found and fitted"),
        QcSpec("DETECTOR TEMP", "detector temp.", unit="K",
               description="detector temperature from the first frame's header, when present"),
        QcSpec("STITCH ORDER", "D2/QTH crossover order", products=_STITCHED, arms=("UVB",),
               description="order where the D2 and QTH masters are joined: it and the bluer "
               "orders come from the D2 master"),
        QcSpec("STITCH SCALE", "QTH/D2 flux ratio", products=_STITCHED, arms=("UVB",),
               description="median QTH over median D2 flux in the centre-order-window square "
               "at the centre of the crossover order; the D2 part is multiplied by it when "
               "scale-d2-to-qth is true"),
        QcSpec("STITCH WIN X", "scale window x", unit="px", products=_STITCHED,
               arms=("UVB",), description="x of that square's centre (unbinned, 0-based, "
               "the order table's coordinates): the middle of the crossover order's range"),
        QcSpec("STITCH WIN Y", "scale window y", unit="px", products=_STITCHED,
               arms=("UVB",), description="y of that square's centre"),
    ),
)


#: imported beside the frame reading: the QC plots' and the background fit's modules
PRELOAD = ("scipy.ndimage", "matplotlib.figure", "matplotlib.backends.backend_pdf")


def _output(label: str) -> OutputSpec:
    return next(o for o in SPEC.outputs if o.label == label)


def flat_parameters(context: RecipeContext) -> FlatParameters:
    """The science's parameters from the resolved recipe parameters."""
    return FlatParameters.from_mapping(context.params)


def flat_inputs(context: RecipeContext) -> FlatInputs:
    """The frames and calibrations of the run, read and checked against each other."""
    return FlatInputs(
        arm=context.arm,
        flats={stem: context.raw_frames(stem) for stem in ("LAMP_FLAT", "LAMP_DFLAT",
                                                           "LAMP_QFLAT")
               if context.raw_frames(stem)},
        lamp_off=context.raw_frames("LAMP_OFF"),
        master_bias=context.calib_image("MASTER_BIAS"),
        master_dark=context.calib_image("MASTER_DARK"),
        order_table=context.calib_order_table("ORDER_TAB"),
        master_dark_path=next((p for p, _ in context.calib.get("MASTER_DARK", [])), None),
    )


def verify(context: RecipeContext) -> None:
    """Raise InputError unless the flats and calibrations can be combined."""
    verify_flat_inputs(flat_inputs(context), SPEC.inputs[0].min_count)


def reduce(context: RecipeContext) -> None:
    """Make the master flat(s) and order table(s) and write them with their QC plots."""
    preload(PRELOAD)
    inputs = flat_inputs(context)
    verify_flat_inputs(inputs, SPEC.inputs[0].min_count)
    plots = {o.label: context.plot_path(o) for o in SPEC.outputs
             if o.kind == "plot" and o.written_for(context.arm)}
    for result in make_master_flat(inputs, flat_parameters(context), plots):
        suffix = f" {result.lamp}" if result.lamp else ""
        context.save_image(_output("MFLAT" + suffix), result.image, result.qc,
                           frames=result.frames)
        context.save_table(_output("ORDER LOC" + suffix), result.table.to_hdus, result.qc,
                           frames=result.frames)
        for label, path in result.plots.items():
            context.record_plot(_output(label), path)


@pyrecipe(SPEC, reduce)
class SoxsMflat(ui.PyRecipe):
    """PyCPL recipe ``soxs_mflat``."""


RECIPE_CLASS = SoxsMflat
