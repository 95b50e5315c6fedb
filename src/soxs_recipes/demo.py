"""``soxs-demo``: simulate a night and reduce it through every recipe that exists.

    soxs-demo NIGHT_DIR [--arm soxs_vis] [--seed 1]

Each reduction step whose SOF the simulator wrote (``bias.sof``, ``dark.sof``, ...) and whose
recipe is available runs with ``soxs-esorex``; products go to ``NIGHT_DIR/reduced/<recipe>/``,
where the later SOFs expect them.  The products and their QC values are printed.  Every
argument is checked before the night directory is made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soxs_core.detector.instruments import ARMS
from soxs_core.errors import InputError
from soxs_core.io.fits import read_header
from soxs_core.simulate import options as opt
from soxs_core.simulate import simulate_night
from soxs_core.simulate.night import REDUCTION_STEPS, step_dir

from .cli import run as esorex
from .framework import InputSpec
from .registry import RECIPES

#: frame-count option -> (its attribute, the recipe and input stem it feeds)
_COUNTS = {"--n-bias": ("n_bias", "soxs_mbias", "BIAS"),
           "--n-dark": ("n_dark", "soxs_mdark", "DARK")}

_DESCRIPTION = ("Simulate a night of raw frames and reduce it through every recipe that "
                "exists: each step runs soxs-esorex with its products in "
                "NIGHT/reduced/<recipe>/, where the later SOFs expect them; the products "
                "and their QC values are printed.")


def _parser() -> opt.OneLineParser:
    p = opt.OneLineParser(prog="soxs-demo", description=_DESCRIPTION)
    p.add_argument("night", type=Path, help="directory for the simulated night (created)")
    p.add_argument("--arm", type=opt.single_arm, default="soxs_vis",
                   help="arm to simulate: " + ", ".join(ARMS))
    p.add_argument("--binning", type=opt.binning, default="1x1",
                   help="<binx>x<biny>, one the arm supports (NIR arms: 1x1 only)")
    p.add_argument("--seed", type=opt.SEED, default=1,
                   help=f"master seed, 0 to {opt.SEED_LIMIT - 1}")
    for option, default in (("--n-bias", 7), ("--n-dark", 5)):
        _, recipe, stem = _COUNTS[option]
        p.add_argument(option, type=opt.COUNT, default=default,
                       help=f"number of {stem} frames: 0 (skip {recipe}) or at least the "
                            f"{_min_count(recipe, stem)} it needs")
    return p


def _input(recipe: str, stem: str) -> InputSpec:
    """The recipe's declaration of one input."""
    return next(i for i in RECIPES[recipe].SPEC.inputs if i.stem == stem)


def _min_count(recipe: str, stem: str) -> int:
    """The fewest frames of an input the recipe declares it needs."""
    return _input(recipe, stem).min_count


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse a frame count that would make a step fail after the whole night was simulated."""
    for option, (attr, recipe, stem) in _COUNTS.items():
        value, need = getattr(args, attr), _min_count(recipe, stem)
        if 0 < value < need and args.arm.name in _input(recipe, stem).arms:
            raise InputError(f"argument {option}: invalid value {value}: {recipe} needs at "
                             f"least {need} {stem} frames (or 0 to skip it)")


def main(argv: list[str] | None = None) -> int:
    """Simulate a night and reduce it; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a refusal the parser printed in one line
        return int(exc.code or 0)
    night = args.night
    try:
        opt.check_arm_options(args.arm, args.binning)
        _check_counts(args)
        opt.prepare_output_dir(night)
    except InputError as exc:
        print(opt.refusal("soxs-demo", str(exc)), file=sys.stderr)
        return 2
    print(f"simulating a {args.arm.code} night in {night} ...")
    result = simulate_night(night, arm=args.arm.code, binning=args.binning, seed=args.seed,
                            n_bias=args.n_bias, n_dark=args.n_dark, n_flat=5, n_science=1,
                            n_std=1)
    print(f"  {sum(len(v) for v in result.raw.values())} raw frames, truth in "
          f"{night / 'truth'} ({result.seconds:.1f} s)")
    status = 0
    for sof_name, recipe in REDUCTION_STEPS:
        sof = result.sofs.get(sof_name)
        if sof is None:
            continue
        if recipe not in RECIPES:
            print(f"{recipe}: not available yet, {sof} left for it")
            continue
        outdir = step_dir(night, sof_name, recipe)
        print(f"{recipe} {sof}")
        code = esorex(["--output-dir", str(outdir), "--msg-level", "warning",
                       "--log-file", str(outdir / "esorex.log"), "--overwrite", recipe,
                       str(sof)])
        if code != 0:
            status = code
            break
        shown_qc = None
        for product in sorted(outdir.glob("*.fits")):
            header = read_header(product)
            print(f"  -> {product}  ({header['ESO PRO CATG']})")
            qc = [(key[7:], header[key]) for key in header if key.startswith("ESO QC ")]
            if qc and qc == shown_qc:  # a recipe's products share their QC values
                print("       (QC as above)")
                continue
            shown_qc = qc
            for name, value in qc:
                shown = f"{value:.5g}" if isinstance(value, float) else value
                print(f"       {name:<16} {shown}")
        for plot in sorted(outdir.glob("*.pdf")):
            print(f"  -> {plot}  (QC plot)")
    if status == 0:
        _print_science_spectrum(night, args.arm)
    return status


def _print_science_spectrum(night: Path, arm) -> None:
    """The last word of the demo: where the science target's calibrated spectrum is."""
    outdir = step_dir(night, "stare", "soxs_stare")
    name = arm.name.lower()
    spectrum = outdir / f"sci_slit_flux_{name}_fluxcal.fits"
    plot = outdir / f"extracted_fluxcal_{name}.pdf"
    if spectrum.is_file():
        print(f"flux-calibrated spectrum of the science target: {spectrum}")
        if plot.is_file():
            print(f"  its plot: {plot}")


def entry() -> None:
    """Console-script entry point."""
    from soxs_core.io.safety import install_signal_handlers

    # SIGTERM/SIGINT: one line, no traceback, no temporary product left behind
    install_signal_handlers("soxs-demo")
    sys.exit(main())
