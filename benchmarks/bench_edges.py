"""Benchmark the order-edge kernel (soxs_core._edges) against its numpy twin.

    python benchmarks/bench_edges.py [--arm xsh_vis] [--binning 1x1] [--repeat 5]

Simulates a lamp flat of every order of the arm (X-shooter VIS: 4000x2048, 15 orders), samples
every order every 25/binning px as soxs_mflat does (seed-page slice length/width and 20/50 %
thresholds), and prints the best-of-``--repeat`` time of the Cython kernel with all cores and
with one, and one run of the numpy twin, with the edge residuals against the simulator's truth.
The machine may be shared: compare the ratios of one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from soxs_core.combine.stacking import default_threads
from soxs_core.echelle import edges as E
from soxs_core.simulate.instrument import InstrumentSimulator

SLICE_LENGTH = {"xsh_uvb": 90, "xsh_vis": 90, "xsh_nir": 90, "soxs_vis": 70, "soxs_nir": 70}


def _best(func, repeat: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="xsh_vis", choices=sorted(SLICE_LENGTH))
    parser.add_argument("--binning", default="1x1")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    sim = InstrumentSimulator(args.arm, args.binning, seed=1)
    fmt = sim.format
    rng = np.random.default_rng(0)
    expected = sim.lamp_model() * sim.truth.sensitivity
    flux = (rng.poisson(np.maximum(expected, 0) * 5) / 5).astype(np.float32)
    qual = sim.truth.static_bad_mask.astype(np.uint8)
    orders = [int(n) for n in fmt.orders]
    ranges = [(fmt.geometry(n).b_min, fmt.geometry(n).b_max) for n in orders]
    common = (flux, qual, fmt.centre, orders, ranges, fmt.dispersion_axis, args.binning,
              SLICE_LENGTH[args.arm], 5, 20, 50)
    print(f"{args.arm} {args.binning}: frame {flux.shape[0]}x{flux.shape[1]}, "
          f"{len(orders)} orders")

    # the kernel alone, on the samples the driver builds
    det = sim.detector
    bin_b, bin_a = ((det.biny, det.binx) if fmt.dispersion_axis == "y"
                    else (det.binx, det.biny))
    es = E.measure_order_edges(*common)
    along = np.rint(E.unbinned_to_binned(es.b, bin_b)).astype(np.int64)
    centre = E.unbinned_to_binned(es.centre, bin_a)
    img, q = (flux, qual) if fmt.dispersion_axis == "y" else (flux.T, qual.T)
    nthreads = default_threads()
    kernel = (img, q, along, centre, SLICE_LENGTH[args.arm], 5, 0.2, 0.5)
    t_all, _ = _best(lambda: E.detect_slice_edges(*kernel, threads=nthreads), args.repeat)
    t_one, _ = _best(lambda: E.detect_slice_edges(*kernel, threads=1), args.repeat)
    t_np, _ = _best(lambda: E.detect_slice_edges_reference(*kernel), 1)
    t_drv, _ = _best(lambda: E.measure_order_edges(*common), args.repeat)
    print(f"samples: {along.size}")
    print(f"kernel, {nthreads} threads : {t_all * 1e3:8.1f} ms")
    print(f"kernel, 1 thread   : {t_one * 1e3:8.1f} ms")
    print(f"numpy twin         : {t_np * 1e3:8.1f} ms   ({t_np / t_one:.0f}x the 1-thread kernel)")
    print(f"measure_order_edges: {t_drv * 1e3:8.1f} ms (driver + kernel)")

    low, up = fmt.edges(es.order, es.b)
    res = np.concatenate([es.low - low, es.up - up])
    res = res[np.isfinite(res)]
    good = np.abs(res) < 0.5
    print(f"edges measured: {res.size} of {2 * es.b.size}; residual vs truth (|r| < 0.5 px, "
          f"{good.mean():.1%} of them): mean {res[good].mean():+.3f} px, "
          f"rms {np.sqrt(np.mean(res[good] ** 2)):.3f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
