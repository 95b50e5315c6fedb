"""``soxs-simulate``: write a simulated night of SOXS or X-shooter raw frames with truth.

``soxs-simulate [options] NIGHTDIR`` writes one night; ``soxs-simulate archive [options]
OUTDIR`` (``archive`` as the first argument) a raw-data archive of several nights and arms
with its truth manifest (:mod:`soxs_core.simulate.archive`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from soxs_core.detector.instruments import ARMS
from soxs_core.errors import InputError
from soxs_core.simulate import options as opt
from soxs_core.simulate.detector import DETECTOR_DEFAULTS
from soxs_core.simulate.instrument import FLAT_EXPTIME, TELLURIC_EXPTIME, SceneParameters
from soxs_core.simulate.night import reduction_commands, simulate_night
from soxs_core.simulate.spectra import DEFAULT_SLIT_WIDTH, STANDARD_STARS

__all__ = ["main", "build_parser", "build_archive_parser", "archive_main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``soxs-simulate`` parser: every option's range is checked while parsing."""
    p = opt.OneLineParser(
        prog="soxs-simulate",
        description="Simulate a night of raw SOXS / X-shooter frames with known truth, the "
                    "upstream calibration tables and one SOF per reduction step, and print "
                    "the soxs-esorex commands that reduce it. 'soxs-simulate archive --help' "
                    "describes the archive mode (several nights and arms).")
    def per_arm(values: dict[str, float], unit: str = "") -> str:
        return ", ".join(f"{code} {value:g}{unit}" for code, value in values.items())

    cosmic_rates = {DETECTOR_DEFAULTS[code]["cosmic_rate"] for code in ARMS}
    p.add_argument("outdir", type=Path, help="night directory to write (created)")
    p.add_argument("--arm", type=opt.arm_list, default="xsh_vis",
                   help="arm code(s), comma separated: " + ", ".join(ARMS)
                   + "; several arms go to <outdir>/<arm>/")
    p.add_argument("--binning", type=opt.binning, default="1x1",
                   help="<binx>x<biny>, one the arm supports (NIR arms: 1x1 only)")
    p.add_argument("--readout", default="slow", choices=("slow", "fast"),
                   help="CCD readout mode (NIR arms have one mode: leave it out)")
    p.add_argument("--seed", type=opt.SEED, default=1,
                   help=f"master seed, 0 to {opt.SEED_LIMIT - 1}: the same seed gives the "
                        "same night")
    for kind, default, what in (("bias", 5, "bias frames (CCD arms only)"),
                                ("dark", 3, "dark frames"),
                                ("flat", 5, "lamp flats (UVB: that many D2 and QTH each; NIR: "
                                            "that many lamp-on/off pairs)"),
                                ("science", 1, "science (OBJECT) frames"),
                                ("std", 1, "flux-standard (STD_FLUX) frames"),
                                ("telluric", 0, "telluric-standard (STD_TELLURIC) frames of a "
                                                "hot star, taken after the science")):
        p.add_argument(f"--n-{kind}", type=opt.COUNT, default=default,
                       help=f"number of {what}, >= 0")
    p.add_argument("--dark-exptime", type=opt.POSITIVE, default=None,
                   help="dark exposure time [s], > 0 (default: the science exposure time)")
    p.add_argument("--flat-exptime", type=opt.POSITIVE, default=None,
                   help="lamp-flat exposure time [s], > 0 (default per arm: "
                        f"{per_arm(FLAT_EXPTIME, ' s')})")
    p.add_argument("--science-exptime", type=opt.POSITIVE, default=600.0,
                   help="science exposure time [s], > 0")
    p.add_argument("--std-exptime", type=opt.POSITIVE, default=None,
                   help="standard-star exposure time [s], > 0 (default: 120 s for X-shooter, "
                        "300 s for SOXS, the science exposure time for NIR arms)")
    p.add_argument("--telluric-exptime", type=opt.POSITIVE, default=None,
                   help="telluric-standard exposure time [s], > 0 (default per arm: "
                        f"{per_arm(TELLURIC_EXPTIME, ' s')})")
    p.add_argument("--telluric-mag", type=opt.FINITE, default=10.5,
                   help="AB magnitude at 550 nm of the telluric standard (a 15000 K black "
                        "body)")
    p.add_argument("--standard", type=opt.standard_name, default="GD71",
                   help="flux standard of the STD frames: " + ", ".join(STANDARD_STARS))
    p.add_argument("--object-mag", type=opt.FINITE, default=17.0,
                   help="AB magnitude of the science target at 550 nm")
    p.add_argument("--object-position", type=opt.FINITE, default=0.5,
                   help="target position along the slit [arcsec from its centre], within "
                        "half the slit length")
    p.add_argument("--seeing", type=opt.POSITIVE, default=0.8,
                   help="seeing FWHM at 500 nm [arcsec], > 0")
    p.add_argument("--airmass", type=opt.AIRMASS, default=1.2,
                   help="airmass of the science and standard frames, >= 1")
    p.add_argument("--slit-width", type=opt.POSITIVE, default=None,
                   help="slit width [arcsec], > 0 (default per arm: "
                        f"{per_arm(DEFAULT_SLIT_WIDTH)})")
    p.add_argument("--sky-level", type=opt.NON_NEGATIVE, default=1.0,
                   help="multiplier of the dark-sky continuum and lines, >= 0")
    p.add_argument("--flat-level", type=opt.POSITIVE, default=None,
                   help="lamp-flat peak level [e- per binned pixel], > 0 (default: 45 %% of "
                        "the saturation level, at most 45000 e-)")
    p.add_argument("--cosmic-rate", type=opt.NON_NEGATIVE, default=None,
                   help="cosmic rays per cm^2 per s, >= 0 (default: "
                        f"{', '.join(f'{r:g}' for r in sorted(cosmic_rates))})")
    p.add_argument("--orders", type=opt.order_list, default=None,
                   help="illuminate only these orders of the arm, e.g. 20,21,22 "
                        "(default: all)")
    p.add_argument("--night-offset", type=opt.number(int), default=0,
                   help="move the night by this many days from the night of 2026-11-21 "
                        "(MJD-OBS, DATE-OBS, ARCFILE, TPL START, the tables' dates); other "
                        "noise, the same detector")
    p.add_argument("--models", action="store_true",
                   help="also write the noiseless model images (large)")
    p.add_argument("--relative-sof", action="store_true",
                   help="write SOF paths relative to the night directory")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but errors")
    return p


def _nights(text: str) -> int | list[int]:
    """``argparse`` type of ``--nights``: a count, or comma-separated day offsets."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] >= 1:
        return values[0]
    if len(values) > 1 and min(values) >= 0 and len(set(values)) == len(values):
        return values
    raise argparse.ArgumentTypeError(
        f"invalid value {text!r}: must be a number of nights >= 1 or distinct day offsets "
        ">= 0 separated by commas, e.g. 0,1,3")


def _order_count(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    return opt.number(int, minimum=1)(text)


def build_archive_parser() -> argparse.ArgumentParser:
    """The ``soxs-simulate archive`` parser."""
    from soxs_core.simulate.archive import FULL_COUNTS, SMALL_COUNTS

    def counts(c: dict[str, int]) -> str:
        return ", ".join(f"{v} {k[2:]}" for k, v in c.items())

    p = opt.OneLineParser(
        prog="soxs-simulate archive",
        description="Simulate a raw-data archive: several nights and arms in OUTDIR/raw/"
                    "<night>/ under archive names, the arms' upstream calibration tables in "
                    "OUTDIR/calib/, the mess of real archives (a night without flats, a frame "
                    "of another instrument, a truncated file, an uncalibrated setup, a "
                    "duplicate, gzipped frames) and the truth manifest "
                    "OUTDIR/archive_truth.json (format: pydoc soxs_core.simulate.archive).")
    p.add_argument("outdir", type=Path, help="archive directory to write (created; must not "
                                            "hold an archive)")
    p.add_argument("--nights", type=_nights, default=2,
                   help="number of consecutive nights from 2026-11-21, or day offsets from it "
                        "(0,1,3)")
    p.add_argument("--arms", type=opt.arm_list, default="xsh_vis,soxs_nir",
                   help="arm codes, comma separated: " + ", ".join(ARMS))
    p.add_argument("--seed", type=opt.SEED, default=1,
                   help="master seed: the same seed gives the same archive")
    p.add_argument("--orders", type=_order_count, default=None,
                   help="number of central orders illuminated per arm (at least 2 on "
                        "UVB, whose D2 and QTH flats are stitched on common orders), or 'all' "
                        "(default: 1, with --full all)")
    p.add_argument("--full", action="store_true",
                   help=f"realistic frame counts per night and arm ({counts(FULL_COUNTS)}) "
                        f"instead of the small test archive's ({counts(SMALL_COUNTS)})")
    for kind in SMALL_COUNTS:
        p.add_argument(f"--{kind.replace('_', '-')}", type=opt.COUNT, default=None,
                       help=f"number of {kind[2:]} frames per night and arm (default: as "
                            "above)")
    p.add_argument("--science-exptime", type=opt.POSITIVE, default=600.0,
                   help="science exposure time [s] (NIR darks and standards: the same)")
    p.add_argument("--no-mess", action="store_true", help="a clean archive")
    p.add_argument("--keep-truth", action="store_true",
                   help="keep the night simulator's truth in OUTDIR/truth/")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def archive_main(argv: list[str]) -> int:
    """``soxs-simulate archive``; returns the process exit code."""
    from soxs_core.simulate.archive import SMALL_COUNTS, TRUTH_FILE, simulate_archive

    try:
        args = build_archive_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING)
    counts = {k: getattr(args, k) for k in SMALL_COUNTS if getattr(args, k) is not None}
    orders = args.orders if args.orders is not None or args.full else 1
    try:
        truth = simulate_archive(args.outdir, nights=args.nights, arms=args.arms,
                                 seed=args.seed, orders=orders, small=not args.full,
                                 counts=counts, mess=not args.no_mess,
                                 science_exptime=args.science_exptime,
                                 keep_truth=args.keep_truth)
    except InputError as exc:
        print(opt.refusal("soxs-simulate archive", str(exc)), file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename if exc.filename is not None else args.outdir
        print(opt.refusal("soxs-simulate archive", f"{where}: {exc.strerror or exc}"),
              file=sys.stderr)
        return 3
    if not args.quiet:
        n_raw = sum(f["path"].startswith("raw/") for f in truth.files)
        print(f"{n_raw} raw frames of {len(truth.nights)} nights ({', '.join(truth.nights)}), "
              f"{len(truth.files) - n_raw} calibration tables, {len(truth.problems())} "
              f"problem files, {len(truth.steps)} steps ({len(truth.impossible_steps)} "
              f"impossible) -> {args.outdir} ({truth.seconds:.1f} s); truth: "
              f"{args.outdir / TRUTH_FILE}")
    return 0


def _available_recipes() -> set[str]:
    # the recipes build on this package, so they are asked only here, to list the next steps
    from soxs_recipes.registry import RECIPES

    return set(RECIPES)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``soxs-simulate``; returns the process exit code."""
    if argv is None:  # run as the program: SIGTERM/SIGINT end it in one line, no traceback
        from soxs_core.io.safety import install_signal_handlers

        install_signal_handlers("soxs-simulate")
        argv = sys.argv[1:]
    if argv and argv[0] == "archive":
        return archive_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a refusal the parser printed in one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING)
    # every argument is checked before the first directory is made
    try:
        for arm in args.arm:
            opt.check_arm_options(arm, args.binning, args.readout, args.orders,
                                  args.object_position)
        opt.prepare_output_dir(args.outdir)
    except InputError as exc:
        print(opt.refusal("soxs-simulate", str(exc)), file=sys.stderr)
        return 2
    scene = SceneParameters(seeing=args.seeing, airmass=args.airmass,
                            slit_width=args.slit_width, object_mag=args.object_mag,
                            object_position=args.object_position, sky_level=args.sky_level,
                            standard=args.standard, flat_level=args.flat_level,
                            telluric_mag=args.telluric_mag)
    try:
        for arm in args.arm:
            outdir = args.outdir if len(args.arm) == 1 else args.outdir / arm.code
            res = simulate_night(
                outdir, arm.code, args.binning, args.readout, args.seed, n_bias=args.n_bias,
                n_dark=args.n_dark, dark_exptime=args.dark_exptime, n_flat=args.n_flat,
                flat_exptime=args.flat_exptime, n_science=args.n_science,
                science_exptime=args.science_exptime, n_std=args.n_std,
                std_exptime=args.std_exptime, n_telluric=args.n_telluric,
                telluric_exptime=args.telluric_exptime, orders=args.orders, scene=scene,
                write_models=args.models, relative_sof=args.relative_sof,
                cosmic_rate=args.cosmic_rate, night_offset=args.night_offset)
            if not args.quiet:
                n = sum(len(v) for v in res.raw.values())
                print(f"{arm.code}: {n} raw frames, SOFs {', '.join(sorted(res.sofs))} "
                      f"-> {outdir} ({res.seconds:.1f} s)")
                commands = reduction_commands(outdir, res.sofs, _available_recipes())
                if commands:
                    print("  reduce it by hand (products go where the later SOFs expect "
                          "them):")
                    for line in commands:
                        print(f"    {line}")
    except InputError as exc:
        print(opt.refusal("soxs-simulate", str(exc)), file=sys.stderr)
        return 2
    except OSError as exc:
        where = exc.filename if exc.filename is not None else args.outdir
        print(opt.refusal("soxs-simulate", f"{where}: {exc.strerror or exc}"), file=sys.stderr)
        return 3
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
