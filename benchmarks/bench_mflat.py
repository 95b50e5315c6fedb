"""Benchmark soxs_mflat end to end and the edge-detection kernel alone, against soxspipe.

    python benchmarks/bench_mflat.py [--workdir DIR] [--soxspipe-venv VENV] [--repeat 3]

* simulates (once; kept in ``--workdir``) an X-shooter VIS night (1x1 slow, full frame, every
  order: 5 lamp flats, 5 biases) and a SOXS NIR night (5 lamp-on and 5 lamp-off flats), with
  the simulator's order-centre table (``calib/ORDER_TAB_<ARM>``) and true order edges;
* makes the VIS master bias with ``soxs_mbias`` (not timed);
* runs ``soxs-esorex soxs_mflat`` on each night's ``flat.sof`` (flats, master bias or lamp-off
  frames, order-centre table) in fresh processes: wall time and peak RSS (GNU time's, as
  bench_masters.py), best of ``--repeat``; the VIS run also inside the runner, without
  interpreter start-up and imports;
* times the edge kernel, ``soxs_core.echelle.edges.detect_slice_edges``, on one prepared VIS
  flat at every 25th row of every order (the recipe's sampling, X-shooter's slice of 90x5 px,
  thresholds 20-50 %) with all cores and one thread, and its numpy twin
  ``detect_slice_edges_reference`` on the same samples (checked equal);
* compares each ORDER_TAB's edges with the simulator's truth
  (``truth/order_edges_truth_<arm>.fits``: ``order``, ``b``, ``a_low``, ``a_up`` at every
  unbinned pixel along each order's usable length, rows with both edges on the detector):
  RMS and maximum of edge polynomial minus true edge, both edges, per arm;
* with ``--soxspipe-venv``, runs soxspipe 0.17.4's mflat on the same SOFs (same flats, our
  master bias, the same order-centre table, lamp-off frames for NIR) through its Python API,
  ``soxs_mflat(log=..., settings=..., inputFrames=sof).produce_product()`` with its default
  X-shooter (or SOXS) settings, by ``soxspipe_mflat_runner.py``.  Its stock command line
  cannot run X-shooter flats: ``calibrate_frame_set`` defines the dome-flat set only for SOXS
  but uses it for every instrument (``UnboundLocalError: domeflatCollection``); the runner
  gives that local an empty set while the method runs (a line tracer, no soxspipe code
  changed), adds CDELT1/CDELT2 to a copy of a master bias written without them (before commit
  a5b0cfb; soxspipe reads the binning from them) and names the SOF as soxspipe needs (see its
  docstring).  Both pipelines' times,
  memory and edge residuals are printed side by side, with the ratios.

The machine is shared and noisy: compare the ratios measured in one run, not absolute times
from different runs.  soxspipe is run once per arm (about 30 s each).  Run it with the Python
of a regular (not editable) install, ``V/bin/python benchmarks/bench_mflat.py``: each process
of an editable install first checks, and rebuilds, the Cython kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_masters import RECIPE_ONLY, run_child  # noqa: E402

ARMS = {"xsh_vis": "X-shooter VIS 1x1, 5 flats + master bias",
        "soxs_nir": "SOXS NIR, 5 lamp-on + 5 lamp-off flats"}
#: X-shooter VIS edge-detection defaults (DEFAULT_PARAMETERS.md §4)
SLICE_LENGTH, SLICE_WIDTH, MIN_FRACTION, MAX_FRACTION = 90, 5, 0.20, 0.50
SAMPLE_STEP = 25


def make_nights(workdir: Path, esorex: str) -> dict[str, Path]:
    """Simulated nights (made once), with the VIS master bias."""
    from soxs_core.simulate import simulate_night
    from soxs_core.simulate.night import reduction_dir

    nights = {}
    for arm in ARMS:
        night = workdir / arm
        done = night / "flat.sof"
        if not done.exists():
            shutil.rmtree(night, ignore_errors=True)
            print(f"simulating {arm} (once; kept in {night}) ...", flush=True)
            simulate_night(night, arm=arm, binning="1x1", n_bias=5, n_dark=0, n_flat=5,
                           n_science=0, n_std=0)
        bias_sof = night / "bias.sof"
        out = reduction_dir(night, "soxs_mbias")
        if bias_sof.exists() and not any(out.glob("master_bias_*.fits")):
            subprocess.run([esorex, "--output-dir", str(out), "soxs_mbias", str(bias_sof)],
                           check=True, capture_output=True)
        nights[arm] = night
    return nights


def best(cmd: list[str], repeat: int) -> tuple[float, float]:
    runs = [run_child(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def recipe_only(args: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", RECIPE_ONLY, *args], check=True,
                              capture_output=True, text=True)
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return min(times)


def edge_residuals(table_path: Path, truth_path: Path) -> dict[str, float]:
    """RMS and max (px) of both edge polynomials minus the true edges, over the orders the
    table and the truth share."""
    from astropy.io import fits

    from soxs_core.echelle.ordertable import read_order_table

    table = read_order_table(table_path)
    with fits.open(truth_path) as hdul:
        truth = hdul[1].data
    keep = truth["inside"].astype(bool) & np.isin(truth["order"], table.orders)
    n = truth["order"][keep].astype(float)
    b = truth["b"][keep]
    res = np.concatenate([table.edge_low(n, b) - truth["a_low"][keep],
                          table.edge_up(n, b) - truth["a_up"][keep]])
    n_truth = np.unique(truth["order"][truth["inside"].astype(bool)]).size
    return {"rms": float(np.sqrt(np.mean(res ** 2))), "max": float(np.max(np.abs(res))),
            "orders": int(np.unique(n).size), "orders_true": int(n_truth)}


def kernel_times(night: Path, repeat: int) -> dict[str, float]:
    """The edge kernel (all cores, one thread) and its numpy twin on one prepared VIS flat."""
    from soxs_core.combine.stacking import default_threads
    from soxs_core.detector.rawframe import RawFrame
    from soxs_core.echelle.edges import detect_slice_edges, detect_slice_edges_reference
    from soxs_core.echelle.ordertable import read_order_table

    flat = sorted((night / "raw").glob("*FLAT*.fits"))[0]
    frame = RawFrame.open(flat)
    try:
        image, qual = frame.read_band()
    finally:
        frame.close()
    table = read_order_table(night / "calib" / "ORDER_TAB_VIS.fits")
    along, centre = [], []
    for n in table.orders:
        b0, b1 = table.along_range(int(n))
        rows = np.arange(int(np.ceil(b0 / SAMPLE_STEP)) * SAMPLE_STEP,
                         min(int(b1), image.shape[0] - 1) + 1, SAMPLE_STEP)
        along.append(rows)
        centre.append(table.centre(float(n), rows.astype(float)))
    along = np.concatenate(along)
    centre = np.concatenate(centre)
    args = (image, qual, along, centre, SLICE_LENGTH, SLICE_WIDTH, MIN_FRACTION, MAX_FRACTION)
    out = {"samples": float(along.size)}
    for label, threads in (("all cores", default_threads()), ("1 thread", 1)):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fast = detect_slice_edges(*args, threads=threads)
            times.append(time.perf_counter() - start)
        out[label] = min(times)
    start = time.perf_counter()
    slow = detect_slice_edges_reference(*args)
    out["numpy twin"] = time.perf_counter() - start
    diff = [np.nanmax(np.abs(np.nan_to_num(getattr(fast, k), nan=-1.0)
                             - np.nan_to_num(getattr(slow, k), nan=-1.0)))
            for k in ("low", "up")]
    out["twin max difference"] = float(max(diff))
    out["found"] = float(np.isfinite(fast.low).sum() + np.isfinite(fast.up).sum())
    return out


def run_soxspipe(python: Path, sof: Path, workdir: Path) -> tuple[float, float, Path]:
    """soxspipe's mflat on an SOF: wall, peak RSS and its order table (``..._OLOC.fits``)."""
    shutil.rmtree(workdir, ignore_errors=True)
    runner = HERE / "soxspipe_mflat_runner.py"
    wall, rss = run_child([str(python), str(runner), str(sof), str(workdir)])
    tables = sorted(workdir.glob("reduced/*/soxs-mflat/*_OLOC.fits"))
    if not tables:
        raise RuntimeError(f"soxspipe wrote no order table under {workdir}")
    return wall, rss, tables[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/soxs-bench-mflat")
    parser.add_argument("--soxspipe-venv", help="virtual environment with soxspipe 0.17.4")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # the runner beside this interpreter: a benchmark run from a regular install's venv times
    # that install (an editable one rebuilds any changed kernel when a process imports it)
    beside = Path(sys.executable).parent / "soxs-esorex"
    esorex = str(beside) if beside.exists() else shutil.which("soxs-esorex") or str(beside)
    nights = make_nights(workdir, esorex)

    ours: dict[str, tuple[float, float]] = {}
    residuals: dict[tuple[str, str], dict[str, float]] = {}
    for arm, night in nights.items():
        out = workdir / "ours" / arm
        # an untimed run first: an editable install rebuilds a changed kernel on import
        run_child([esorex, "--overwrite", "--output-dir", str(out), "soxs_mflat",
                   str(night / "flat.sof")])
        ours[arm] = best([esorex, "--overwrite", "--output-dir", str(out), "soxs_mflat",
                          str(night / "flat.sof")], args.repeat)
        table = next(out.glob("order_tab_*.fits"))
        truth = next((night / "truth").glob("order_edges_truth_*.fits"))
        residuals[("soxs", arm)] = edge_residuals(table, truth)
    inside = recipe_only(["--overwrite", "--output-dir", str(workdir / "ours" / "xsh_vis"),
                          "--msg-level", "warning", "soxs_mflat",
                          str(nights["xsh_vis"] / "flat.sof")], args.repeat)
    kernel = kernel_times(nights["xsh_vis"], max(args.repeat, 3))

    theirs: dict[str, tuple[float, float]] = {}
    if args.soxspipe_venv:
        python = Path(args.soxspipe_venv) / "bin" / "python"
        for arm, night in nights.items():
            wall, rss, table = run_soxspipe(python, night / "flat.sof",
                                            workdir / "soxspipe" / arm)
            theirs[arm] = (wall, rss)
            truth = next((night / "truth").glob("order_edges_truth_*.fits"))
            residuals[("soxspipe", arm)] = edge_residuals(table, truth)

    print(f"\nmachine: {os.cpu_count()} cores; simulated full-frame nights, every order, "
          f"with the simulator's order-centre table")
    print(f"{'step':<48}{'wall [s]':>10}{'peak RSS [MiB]':>16}")
    for arm, (wall, rss) in ours.items():
        print(f"{'soxs_mflat ' + ARMS[arm]:<48}{wall:>10.2f}{rss:>16.0f}")
    print(f"{'soxs_mflat XSH VIS, without start-up':<48}{inside:>10.2f}")
    n = int(kernel["samples"])
    for label in ("all cores", "1 thread", "numpy twin"):
        print(f"{f'edge kernel, {n} VIS slices, {label}':<48}{kernel[label]:>10.3f}")
    print(f"  kernel vs twin: max edge difference {kernel['twin max difference']:.2g} px, "
          f"{int(kernel['found'])} edges found; twin/kernel "
          f"{kernel['numpy twin'] / kernel['all cores']:.0f}x")
    for arm, (wall, rss) in theirs.items():
        print(f"{'soxspipe 0.17.4 mflat ' + arm.replace('_', ' ').upper():<48}{wall:>10.2f}"
              f"{rss:>16.0f}")

    print("\nedges against the truth (both edges, every shared order, usable length):")
    print(f"{'arm':<10}{'pipeline':<18}{'orders':>8}{'RMS [px]':>10}{'max [px]':>10}"
          f"{'wall [s]':>10}{'RSS [MiB]':>11}")
    for arm in nights:
        for who, timing in (("soxs", ours), ("soxspipe 0.17.4", theirs)):
            key = ("soxs" if who == "soxs" else "soxspipe", arm)
            if key not in residuals:
                continue
            r = residuals[key]
            wall, rss = timing[arm]
            print(f"{arm:<10}{who:<18}{r['orders']:>4}/{r['orders_true']:<3}{r['rms']:>10.3f}"
                  f"{r['max']:>10.3f}{wall:>10.2f}{rss:>11.0f}")
    for arm in theirs:
        (w0, m0), (w1, m1) = ours[arm], theirs[arm]
        extra = f" ({w1 / inside:.1f}x without our start-up)" if arm == "xsh_vis" else ""
        print(f"{arm}: soxs_mflat {w1 / w0:.1f}x faster than soxspipe end to end{extra}, "
              f"peak memory ratio {m0 / m1:.2f}")
    print(json.dumps({"ours": ours, "soxspipe": theirs, "inside": inside, "kernel": kernel,
                      "residuals": {f"{k[0]} {k[1]}": v for k, v in residuals.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
