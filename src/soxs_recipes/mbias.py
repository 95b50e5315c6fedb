"""soxs_mbias: combine raw bias frames into a master bias."""

from __future__ import annotations

from soxs_core.combine.masters import MasterSettings, make_master_bias, verify_frames

from .compat import ui
from .framework import InputSpec, OutputSpec, QcSpec, RecipeContext, RecipeSpec
from .params import MASTER_PARAMS
from .recipe_base import pyrecipe

SPEC = RecipeSpec(
    name="soxs_mbias",
    synopsis="Create a master bias frame from raw bias frames",
    description="""
        Raw bias frames (zero-second exposures of the UV-VIS arms) are rotated to the common
        orientation, trimmed of prescan and overscan, converted to electrons and stacked pixel
        by pixel with sigma clipping (median centre, MAD scale), which rejects cosmic rays
        and other rogue values and reduces the read noise by the square root of the number
        of frames.  Pixels of the static bad-pixel map, and pixels whose master level lies
        further than frame-clipping-sigma single-frame sigmas from the local bias level, are
        flagged in QUAL.  The ERRS plane is the propagated read noise of the surviving
        frames.  NIR arms take no bias frames: use soxs_mdark.
    """,
    inputs=(
        InputSpec("BIAS", "RAW", "Raw bias frames (DPR TYPE BIAS, EXPTIME 0) of one arm, "
                  "binning and readout mode.", min_count=3, arms=("UVB", "VIS")),
    ),
    params=MASTER_PARAMS,
    outputs=(
        OutputSpec("MBIAS", "MASTER_BIAS", "Master bias frame (FLUX/QUAL/ERRS, electrons)."),
    ),
    group_by=("binning", "readout"),
    qc=(
        QcSpec("RAW RON", "raw bias read noise", unit="e-",
               description="read noise of a single raw bias, from frame-pair differences"),
        QcSpec("MASTER RON", "master bias noise", unit="e-",
               description="noise of the master about its smooth level"),
        QcSpec("MBIAS MEDIAN", "raw bias level", unit="e-",
               description="median of the raw frames' clipped mean levels"),
        QcSpec("STRUCTX", "bias slope along x", unit="e-/px",
               description="slope of a line fitted to the mean column profile"),
        QcSpec("STRUCTY", "bias slope along y", unit="e-/px",
               description="slope of a line fitted to the mean row profile"),
        QcSpec("FPN FRACMAX", "FFT peak, white noise=1",
               description="periodic pattern noise: max over raw frames of the highest 2-D "
               "FFT amplitude of the 5x5-binned frame minus the master, over the median "
               "amplitude, in units of the white-noise expectation (white noise ~1)"),
        QcSpec("BADPIX NUM", "pixels flagged in QUAL", description="pixels flagged in QUAL"),
        QcSpec("BADPIX FRAC", "flagged pixel fraction",
               description="fraction of pixels flagged in QUAL"),
        QcSpec("DETECTOR TEMP", "detector temp.", unit="K",
               description="detector temperature from the first frame's header, when present"),
    ),
)


def master_settings(context: RecipeContext) -> MasterSettings:
    """MasterSettings from the resolved recipe parameters."""
    p = context.params
    return MasterSettings(
        frame_clipping_sigma=p["frame-clipping-sigma"],
        frame_clipping_iterations=p["frame-clipping-iterations"],
        stacked_clipping_sigma=p["stacked-clipping-sigma"],
        stacked_clipping_iterations=p["stacked-clipping-iterations"],
        stacking_method=p["stacking-method"],
    )


def verify(context: RecipeContext) -> None:
    """Raise InputError unless the bias frames can be combined."""
    verify_frames(context.raw_frames("BIAS"), "BIAS", SPEC.inputs[0].min_count)


def reduce(context: RecipeContext) -> None:
    """Combine the bias frames and write the master bias."""
    verify(context)
    frames = context.raw_frames("BIAS")
    result = make_master_bias(frames, master_settings(context))
    context.save_image(SPEC.outputs[0], result.image, result.qc)


@pyrecipe(SPEC, reduce)
class SoxsMbias(ui.PyRecipe):
    """PyCPL recipe ``soxs_mbias``."""


RECIPE_CLASS = SoxsMbias
