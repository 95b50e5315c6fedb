"""soxs_mdark: combine raw dark frames into a master dark and find hot pixels."""

from __future__ import annotations

from soxs_core.combine.masters import make_master_dark, verify_frames

from .compat import ui
from .framework import InputSpec, OutputSpec, QcSpec, RecipeContext, RecipeSpec
from .mbias import master_settings
from .params import MASTER_PARAMS
from .recipe_base import pyrecipe

SPEC = RecipeSpec(
    name="soxs_mdark",
    synopsis="Create a master dark frame and a hot-pixel mask from raw dark frames",
    description="""
        Raw dark frames of one exposure time are prepared (rotated, trimmed, in electrons)
        and stacked pixel by pixel with sigma clipping.  Each raw pixel's error is the read
        noise plus the Poisson noise of the signal above the bias (above the master bias when
        one is given, else above the frame's own level).  UVB/VIS darks have the master bias
        subtracted when a MASTER_BIAS frame is in the set; NIR darks subtract nothing (NIR
        arms take no bias frames).  Hot pixels -- master pixels further than
        frame-clipping-sigma single-frame sigmas above the local dark level -- get the HOT
        bit (2) in QUAL.
    """,
    inputs=(
        InputSpec("DARK", "RAW", "Raw dark frames of one arm, binning, readout mode and "
                  "exposure time.", min_count=3),
        InputSpec("MASTER_BIAS", "CALIB", "Master bias from soxs_mbias (UVB/VIS only).",
                  min_count=0, max_count=1, required=False, arms=("UVB", "VIS"),
                  match=("binning", "readout")),
    ),
    params=MASTER_PARAMS,
    outputs=(
        OutputSpec("MDARK", "MASTER_DARK", "Master dark frame (FLUX/QUAL/ERRS, electrons "
                   "accumulated over the dark exposure time; bias-subtracted when a master "
                   "bias was given)."),
    ),
    group_by=("binning", "readout", "exptime"),
    qc=(
        QcSpec("HOTPIX NUM", "number of hot pixels", description="number of pixels flagged HOT"),
        QcSpec("HOTPIX FRAC", "fraction of hot pixels",
               description="fraction of the pixels flagged HOT"),
        QcSpec("MDARK MEDIAN", "median dark level", unit="e-",
               description="median of the master dark's good pixels"),
        QcSpec("RAW RON", "raw dark read noise", unit="e-",
               description="noise of a single raw dark, from frame-pair differences"),
        QcSpec("MASTER RON", "master dark noise", unit="e-",
               description="noise of the master about its smooth level"),
        QcSpec("DETECTOR TEMP", "detector temp.", unit="K",
               description="detector temperature from the first frame's header, when present"),
    ),
)


def verify(context: RecipeContext) -> None:
    """Raise InputError unless the dark frames can be combined."""
    verify_frames(context.raw_frames("DARK"), "DARK", SPEC.inputs[0].min_count,
                  same_exptime=True)


def reduce(context: RecipeContext) -> None:
    """Combine the darks (minus the master bias if given) and write the master dark."""
    verify(context)
    frames = context.raw_frames("DARK")
    master_bias = context.calib_image("MASTER_BIAS")
    result = make_master_dark(frames, master_settings(context), master_bias)
    context.save_image(SPEC.outputs[0], result.image, result.qc)


@pyrecipe(SPEC, reduce)
class SoxsMdark(ui.PyRecipe):
    """PyCPL recipe ``soxs_mdark``."""


RECIPE_CLASS = SoxsMdark
