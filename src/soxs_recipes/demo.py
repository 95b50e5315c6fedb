"""``soxs-demo``: simulate a night and reduce it through every recipe that exists.

    soxs-demo NIGHT_DIR [--arm soxs_vis] [--seed 1]

Each reduction step whose SOF the simulator wrote (``bias.sof``, ``dark.sof``, ...) and whose
recipe is available runs with ``soxs-esorex``; products go to ``NIGHT_DIR/reduced/<recipe>/``,
where the later SOFs expect them.  The products and their QC values are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soxs_core.io.fits import read_header
from soxs_core.simulate import simulate_night

from .cli import run as esorex
from .registry import RECIPES

#: SOF written by the simulator -> recipe that reduces it, in reduction order
STEPS = (("bias.sof", "soxs_mbias"), ("dark.sof", "soxs_mdark"), ("flat.sof", "soxs_mflat"),
         ("stare.sof", "soxs_stare"))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="soxs-demo", description=__doc__.split("\n")[0])
    parser.add_argument("night", help="directory for the simulated night")
    parser.add_argument("--arm", default="soxs_vis",
                        help="xsh_uvb, xsh_vis, xsh_nir, soxs_vis or soxs_nir")
    parser.add_argument("--binning", default="1x1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-bias", type=int, default=7)
    parser.add_argument("--n-dark", type=int, default=5)
    args = parser.parse_args(argv)
    night = Path(args.night)
    print(f"simulating a {args.arm} night in {night} ...")
    result = simulate_night(night, arm=args.arm, binning=args.binning, seed=args.seed,
                            n_bias=args.n_bias, n_dark=args.n_dark, n_flat=3, n_science=1,
                            n_std=1)
    print(f"  {sum(len(v) for v in result.raw.values())} raw frames, truth in "
          f"{night / 'truth'} ({result.seconds:.1f} s)")
    status = 0
    for sof_name, recipe in STEPS:
        sof = night / sof_name
        if not sof.exists():
            continue
        if recipe not in RECIPES:
            print(f"{recipe}: not available yet, {sof} left for it")
            continue
        outdir = night / "reduced" / recipe
        print(f"{recipe} {sof}")
        code = esorex(["--output-dir", str(outdir), "--msg-level", "warning",
                       "--log-file", str(outdir / "esorex.log"), "--overwrite", recipe,
                       str(sof)])
        if code != 0:
            status = code
            break
        for product in sorted(outdir.glob("*.fits")):
            header = read_header(product)
            print(f"  -> {product}  ({header['ESO PRO CATG']})")
            for key in header:
                if key.startswith("ESO QC "):
                    value = header[key]
                    shown = f"{value:.5g}" if isinstance(value, float) else value
                    print(f"       {key[7:]:<16} {shown}")
    return status


def entry() -> None:
    """Console-script entry point."""
    from soxs_core.io.safety import install_signal_handlers

    # SIGTERM/SIGINT: one line, no traceback, no temporary product left behind
    install_signal_handlers("soxs-demo")
    sys.exit(main())
