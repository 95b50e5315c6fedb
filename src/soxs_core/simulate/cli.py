"""``soxs-simulate``: write a simulated night of SOXS or X-shooter raw frames with truth."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from soxs_core.detector.instruments import ARMS
from soxs_core.errors import InputError
from soxs_core.simulate.instrument import SceneParameters
from soxs_core.simulate.night import simulate_night

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soxs-simulate",
        description="Simulate a night of raw SOXS / X-shooter frames with known truth, the "
                    "upstream calibration tables and one SOF per reduction step.")
    p.add_argument("outdir", type=Path, help="night directory to write")
    p.add_argument("--arm", default="xsh_vis",
                   help="arm code(s), comma separated: " + ", ".join(ARMS)
                   + " (several arms go to <outdir>/<arm>/)")
    p.add_argument("--binning", default="1x1", help="<binx>x<biny> (NIR: 1x1)")
    p.add_argument("--readout", default="slow", choices=("slow", "fast"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-bias", type=int, default=5)
    p.add_argument("--n-dark", type=int, default=3)
    p.add_argument("--dark-exptime", type=float, default=None,
                   help="dark exposure time [s] (default: the science exposure time)")
    p.add_argument("--n-flat", type=int, default=5)
    p.add_argument("--flat-exptime", type=float, default=None)
    p.add_argument("--n-science", type=int, default=1)
    p.add_argument("--science-exptime", type=float, default=600.0)
    p.add_argument("--n-std", type=int, default=1)
    p.add_argument("--std-exptime", type=float, default=None)
    p.add_argument("--standard", default="GD71", help="flux standard of the STD frames")
    p.add_argument("--object-mag", type=float, default=17.0, help="AB mag at 550 nm")
    p.add_argument("--object-position", type=float, default=0.5,
                   help="object slit position [arcsec]")
    p.add_argument("--seeing", type=float, default=0.8, help="FWHM at 500 nm [arcsec]")
    p.add_argument("--airmass", type=float, default=1.2)
    p.add_argument("--slit-width", type=float, default=None, help="[arcsec]")
    p.add_argument("--sky-level", type=float, default=1.0, help="dark-sky multiplier")
    p.add_argument("--flat-level", type=float, default=None,
                   help="lamp-flat peak level [e- per binned pixel]")
    p.add_argument("--cosmic-rate", type=float, default=None,
                   help="cosmic rays per cm^2 per s (default 0.025)")
    p.add_argument("--orders", default=None, help="only these orders, e.g. 20,21,22")
    p.add_argument("--models", action="store_true",
                   help="also write the noiseless model images (large)")
    p.add_argument("--relative-sof", action="store_true",
                   help="write SOF paths relative to the night directory")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``soxs-simulate``; returns the process exit code."""
    if argv is None:  # run as the program: SIGTERM/SIGINT end it in one line, no traceback
        from soxs_core.io.safety import install_signal_handlers

        install_signal_handlers("soxs-simulate")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    arms = [a.strip().lower() for a in args.arm.split(",") if a.strip()]
    orders = [int(o) for o in args.orders.split(",")] if args.orders else None
    scene = SceneParameters(seeing=args.seeing, airmass=args.airmass,
                            slit_width=args.slit_width, object_mag=args.object_mag,
                            object_position=args.object_position, sky_level=args.sky_level,
                            standard=args.standard, flat_level=args.flat_level)
    try:
        for code in arms:
            outdir = args.outdir if len(arms) == 1 else args.outdir / code
            binning = args.binning if ARMS.get(code) is None or ARMS[code].is_ccd else "1x1"
            res = simulate_night(
                outdir, code, binning, args.readout, args.seed, n_bias=args.n_bias,
                n_dark=args.n_dark, dark_exptime=args.dark_exptime, n_flat=args.n_flat,
                flat_exptime=args.flat_exptime, n_science=args.n_science,
                science_exptime=args.science_exptime, n_std=args.n_std,
                std_exptime=args.std_exptime, orders=orders, scene=scene,
                write_models=args.models, relative_sof=args.relative_sof,
                cosmic_rate=args.cosmic_rate)
            if not args.quiet:
                n = sum(len(v) for v in res.raw.values())
                print(f"{code}: {n} raw frames, SOFs {', '.join(sorted(res.sofs))} "
                      f"-> {outdir} ({res.seconds:.1f} s)")
    except (InputError, ValueError, KeyError) as exc:
        print(f"soxs-simulate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
