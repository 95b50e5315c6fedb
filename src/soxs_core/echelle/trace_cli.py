"""``soxs-trace``: find every order of any echelle flat and write its ORDER_TAB-style table.

No ESO header, order table or spectral format is needed: plain 2-D FITS images (gzip, .Z and
tile-compressed accepted).  The mean of the background (lamp-off) frames is subtracted, several
flats are median-combined, the orders are self-traced (numbered 1, 2, ... from the bottom of
the cross-dispersion axis), their edges measured per slice and fitted with one global
polynomial each, and the table (and optionally the ORDER LOC RES plot) written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from soxs_core.simulate.options import number

__all__ = ["main", "build_parser", "trace_flat_files"]

PROG = "soxs-trace"
#: An order's slit ends are sharp when the edge kernel's positions lie within this many px
#: (median) of the half-level crossings of the same slices; else it is a soft order.
SOFT_EDGE = 0.5


_AT_LEAST_ONE = number(int, minimum=1)
_PERCENT = number(float, above=0, below=100)
_DEGREE = number(int, minimum=0, below=10)
_POSITIVE = number(float, above=0)


def build_parser() -> argparse.ArgumentParser:
    """The ``soxs-trace`` parser (every refusal is one line)."""
    from soxs_core.commandline import OneLineParser

    p = OneLineParser(
        prog=PROG,
        description="Find every order visible in a 2-D echelle flat (any instrument, no ESO "
                    "headers needed) and write its centres and edges as an ORDER_TAB-style "
                    "table, orders numbered 1, 2, ... from the bottom of the cross-dispersion "
                    "axis.")
    p.add_argument("flats", nargs="+", type=Path, metavar="FLAT.fits",
                   help="flat-field image(s); several are median-combined")
    p.add_argument("--background", nargs="+", type=Path, action="extend", default=[],
                   metavar="BKG.fits",
                   help="background / lamp-off / dark frame(s) whose mean is subtracted "
                        "(default: none)")
    p.add_argument("--dispersion-axis", choices=("x", "y", "auto"), default="auto",
                   help="axis the orders run along: x (orders stacked along y) or y; auto "
                        "takes the axis along which the flat varies least")
    p.add_argument("--output", type=Path, required=True, metavar="TABLE.fits",
                   help="order table to write (required)")
    p.add_argument("--plot", type=Path, default=None, metavar="TRACE.pdf",
                   help="also write the ORDER LOC RES plot (default: none)")
    p.add_argument("--slice-length", type=_AT_LEAST_ONE, default=None,
                   help="edge slices' length across the orders [px] (default: twice the median "
                        "order width found, at least 24)")
    p.add_argument("--slice-width", type=_AT_LEAST_ONE, default=5,
                   help="edge slices' width along the orders [px]")
    p.add_argument("--min-percent", type=_PERCENT, default=20.0,
                   help="lowest edge threshold, %% of the order's peak above the floor")
    p.add_argument("--max-percent", type=_PERCENT, default=50.0,
                   help="highest edge threshold, %% of the order's peak above the floor")
    p.add_argument("--order-deg", type=_DEGREE, default=6,
                   help="degree in order number of the edge fits, 0..9")
    p.add_argument("--disp-axis-deg", type=_DEGREE, default=5,
                   help="degree along the orders of the edge fits, 0..9")
    p.add_argument("--clip-sigma", type=_POSITIVE, default=5.0,
                   help="clipping of the edge fits' residuals [robust sigma]")
    p.add_argument("--clip-iterations", type=_DEGREE, default=3,
                   help="most fit-and-clip cycles of the edge fits, 0..9")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def _read_image(path: Path):
    """float32 image of the first 2-D HDU of a FITS file, with BSCALE/BZERO applied."""
    import numpy as np

    from soxs_core.errors import InputError
    from soxs_core.io.compressed import image_hdu_index, open_fits, scaled_float32

    with open_fits(path) as hdul:
        try:
            index = image_hdu_index(hdul)
        except InputError:
            raise InputError(f"{path}: no 2-D image in the file (a flat must be an image)"
                             ) from None
        header = hdul[index].header
        stored = hdul.read(index)
    image = scaled_float32(stored, header, str(path))
    if not np.isfinite(image).any():
        raise InputError(f"{path}: the image has no finite pixel")
    return image


def _dispersion_axis(flat) -> str:
    """The axis along which the flat varies least: orders are smooth along the dispersion and
    steep across it."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        across_y = np.nanmedian(np.abs(np.diff(flat, axis=0)))
        across_x = np.nanmedian(np.abs(np.diff(flat, axis=1)))
    return "x" if across_y > across_x else "y"


def trace_flat_files(flats: list[Path], backgrounds: list[Path], dispersion_axis: str = "auto",
                     slice_length: int | None = None, slice_width: int = 5,
                     min_percent: float = 20.0, max_percent: float = 50.0, order_deg: int = 6,
                     along_deg: int = 5, clip_sigma: float = 5.0, clip_iterations: int = 3,
                     log=None):
    """Trace the orders of flat files and fit their edges.

    Returns
    -------
    table : OrderTable
    report : EdgeFitReport
    flat : ndarray
        The background-subtracted, combined flat.
    axis : str
        The dispersion axis used.

    Raises
    ------
    InputError
        Naming the file and problem (unreadable, not an image, shapes differ, no order).
    """
    import numpy as np

    from soxs_core.echelle.edges import measure_order_edges
    from soxs_core.echelle.tracing import fit_order_edges, half_level_edges, trace_orders
    from soxs_core.errors import InputError

    say = log or (lambda message: None)
    images = [_read_image(p) for p in flats]
    shape = images[0].shape
    for p, img in zip(flats[1:], images[1:]):
        if img.shape != shape:
            raise InputError(f"{p}: image is {img.shape[0]}x{img.shape[1]} pixels, "
                             f"{flats[0]} is {shape[0]}x{shape[1]}")
    flat = images[0] if len(images) == 1 else np.median(np.stack(images), axis=0)
    del images
    if backgrounds:
        bkg = [_read_image(p) for p in backgrounds]
        for p, img in zip(backgrounds, bkg):
            if img.shape != shape:
                raise InputError(f"{p}: background is {img.shape[0]}x{img.shape[1]} pixels, "
                                 f"the flats are {shape[0]}x{shape[1]}")
        flat = flat - np.mean(np.stack(bkg), axis=0, dtype=np.float64).astype(np.float32)
        del bkg
    flat = np.asarray(flat, np.float32)
    qual = (~np.isfinite(flat)).astype(np.uint8)
    axis = _dispersion_axis(flat) if dispersion_axis == "auto" else dispersion_axis
    if dispersion_axis == "auto":
        say(f"dispersion along {axis} (the axis along which the flat varies least)")
    name = str(flats[0]) if len(flats) == 1 else f"{flats[0]} (+{len(flats) - 1} flats)"
    table, trace = trace_orders(flat, qual, axis, (1, 1), source=name, return_report=True)
    say(f"{table.orders.size} orders self-traced, {trace.numbering}")
    widths = np.array(list(trace.widths.values()))
    if slice_length is None:
        # the order and a margin on each side (the kernel walks out to the first valley)
        slice_length = max(24, int(round(2.0 * float(np.median(widths)))))
    samples = measure_order_edges(flat, qual, table.centre, table.orders,
                                  list(zip(table.b_min, table.b_max)), axis, (1, 1),
                                  slice_length, slice_width, min_percent, max_percent)
    # the kernel measures a sharp slit end: half the illumination just inside it.  An order
    # whose light is rounded (a defocused echelle) has no such end: the kernel finds nothing,
    # or a point on the slope ~1.5 px outside the half level of the light.  So each order is
    # measured with one definition: the kernel's where it agrees with the plain half-level
    # crossings of the same slices (sharp ends: within 0.04-0.12 px, median, on every
    # simulated arm), else the half-level crossings throughout
    low, up = half_level_edges(flat, qual, axis, samples.b, samples.centre, slice_length,
                               slice_width)
    kernel_ok = np.isfinite(samples.low) & np.isfinite(samples.up)
    samples.low = samples.low.copy()
    samples.up = samples.up.copy()
    soft_orders, filled = [], 0
    for n in table.orders:
        k = samples.order == n
        d = np.abs(np.concatenate([samples.low[k] - low[k], samples.up[k] - up[k]]))
        d = d[np.isfinite(d)]
        soft = d.size == 0 or float(np.median(d)) > SOFT_EDGE
        take = k if soft else k & ~kernel_ok
        soft_orders += [int(n)] if soft else []
        filled += int(np.count_nonzero(take & ~kernel_ok))
        samples.low[take], samples.up[take] = low[take], up[take]
    if soft_orders:
        say(f"{len(soft_orders)} of {table.orders.size} orders without a sharp slit end "
            "(rounded light): edges at their half-level crossings")
    if filled:
        say(f"{filled} slices where the kernel found no edge: half-level crossings")
    edges, report = fit_order_edges(samples, table, order_deg, along_deg, clip_sigma,
                                    clip_iterations)
    if report.dropped_orders:
        left_out = ", ".join(str(n) for n in report.dropped_orders)
        say(f"orders without enough edge detections, left out: {left_out}")
    # the table's orders are 1, 2, ... from the bottom: renumber after any order was left out
    edges = _renumbered(edges, report)
    qc = report.qc.values
    say(f"{edges.orders.size} orders with edges; slices {slice_length}x{slice_width} px; "
        f"X RES SD {qc.get('X RES SD', float('nan')):.3f} px, X RES MAX "
        f"{qc.get('X RES MAX', float('nan')):.3f} px")
    return edges, report, flat, axis


def _renumbered(table, report):
    """Orders numbered 1..N again when some were left out; the fits are re-expressed.

    Renumbering changes the polynomial's order variable, so the polynomials are refitted on
    the shifted numbers from samples of the fitted ones (exact to rounding).
    """
    import numpy as np

    from soxs_core.echelle.polynomial import fit_order_polynomial

    old = table.orders
    new = np.arange(1, old.size + 1)
    if np.array_equal(old, new):
        return table
    from dataclasses import replace

    polys = {}
    for name in ("centre", "edge_up", "edge_low"):
        poly = getattr(table, name)
        ns, bs, vs, nn = [], [], [], []
        for o, n in zip(old, new):
            b0, b1 = table.along_range(int(o))
            b = np.linspace(b0, b1, 64)
            ns.append(np.full(b.size, float(n)))
            bs.append(b)
            vs.append(poly(float(o), b))
            nn.append(n)
        fit = fit_order_polynomial(np.concatenate(ns), np.concatenate(bs), np.concatenate(vs),
                                   poly.order_deg, poly.along_deg, 0.0, 0)
        polys[name] = fit.polynomial
    report.sample_counts = {int(n): report.sample_counts.get(int(o), 0)
                            for o, n in zip(old, new)}
    mapping = dict(zip(old.tolist(), new.tolist()))
    report.order = np.array([mapping.get(int(o), 0) for o in report.order])
    return replace(table, orders=new, **polys)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``soxs-trace``; returns the exit status (0 done, 1 bad input, 2 bad
    command line, 3 an unexpected failure)."""
    if argv is None:
        from soxs_core.io.safety import install_signal_handlers

        install_signal_handlers(PROG)
        # the fits are small: BLAS threads only cost time, most on a loaded machine
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    from soxs_core.commandline import refusal
    from soxs_core.errors import InputError, one_line

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    def fail(message: str, status: int) -> int:
        print(one_line(refusal(PROG, message)), file=sys.stderr)
        return status

    from soxs_core.io.safety import find_same_file, remove_stale_temporaries

    inputs = list(args.flats) + list(args.background)
    outputs = [args.output] + ([args.plot] if args.plot is not None else [])
    if args.plot is not None and find_same_file(args.plot, [args.output]):
        return fail(f"--plot {args.plot} is the same file as --output", 2)
    for out in outputs:
        clash = find_same_file(out, inputs)
        if clash is not None:
            return fail(f"{out}: the output is an input ({clash})", 2)
        if out.exists() and not args.overwrite:
            return fail(f"{out}: exists (give --overwrite to replace it)", 2)
        if out.is_dir():
            return fail(f"{out}: is a directory", 2)
        if not out.parent.is_dir():
            return fail(f"{out}: directory {out.parent} does not exist", 2)
        if not os.access(out.parent, os.W_OK):
            return fail(f"{out}: directory {out.parent} is not writable", 2)
    if args.min_percent > args.max_percent:
        return fail(f"--min-percent {args.min_percent:g} is above --max-percent "
                    f"{args.max_percent:g}", 2)

    def say(message: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {message}")

    import logging

    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        table, report, flat, _ = trace_flat_files(
            list(args.flats), list(args.background), args.dispersion_axis, args.slice_length,
            args.slice_width, args.min_percent, args.max_percent, args.order_deg,
            args.disp_axis_deg, args.clip_sigma, args.clip_iterations, log=say)
    except InputError as exc:
        return fail(str(exc), 1)
    except MemoryError:
        return fail(f"{args.flats[0]}: not enough memory to trace the flats", 1)
    except Exception as exc:  # a bug: one line all the same, with what went wrong
        return fail(f"internal error while tracing {args.flats[0]}: "
                    f"{type(exc).__name__}: {exc}", 3)
    try:
        _write_outputs(args, table, report, flat)
    except OSError as exc:
        where = exc.filename if getattr(exc, "filename", None) else args.output
        return fail(f"{where}: cannot be written ({exc.strerror or exc})", 3)
    for out in outputs:
        remove_stale_temporaries(out.parent)
    say(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _write_outputs(args, table, report, flat) -> None:
    """Table and plot rendered into temporaries, renamed into place only when both are
    complete."""
    from contextlib import ExitStack

    from soxs_core.io.safety import sibling_temporary

    header = {"ORIGIN": ("soxs-trace", "program that wrote the table"),
              "NFLATS": (len(args.flats), "flat frames combined (median)"),
              "NBKG": (len(args.background), "background frames subtracted (mean)"),
              "ESO PRO CATG": ("ORDER_TAB", "orders numbered from the bottom")}
    for name, value in report.qc.values.items():
        header[f"ESO QC {name}"] = (float(value), "[px] edge fit |residual|")
    table.header.update(header)
    with ExitStack() as stack:
        tmp_table = stack.enter_context(sibling_temporary(args.output))
        table.write(tmp_table)
        tmp_plot = None
        if args.plot is not None:
            from soxs_core.echelle.plots import render_order_edges

            tmp_plot = stack.enter_context(sibling_temporary(args.plot))
            fig = render_order_edges(flat, table, report, (1, 1),
                                     title=", ".join(p.name for p in args.flats))
            fig.savefig(tmp_plot, format="pdf", dpi=150)
        os.replace(tmp_table, args.output)
        if tmp_plot is not None:
            os.replace(tmp_plot, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
