"""Benchmark the scattered-light model (soxs_core.echelle.background).

    python benchmarks/bench_background.py [--repeat 5] [--arm xsh_vis] [--binning 1x1]

* simulates a lamp flat of the arm (orders plus the simulator's known scattered light,
  Poisson and read noise) and its order mask from the true edges widened by 3 px;
* times ``fit_background`` (default parameters, one thread, OpenBLAS limited to one thread)
  best of ``--repeat``, wall clock and process CPU time, and its two pixel kernels alone;
* prints the model's accuracy against the truth (max and rms error in % of the amplitude).

Target (issue 8): at most about 0.3 s for a 4000 x 2048 X-shooter VIS frame on one core.  The
machine is shared: CPU time is the steadier figure when others are busy.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402


def best(fn, repeat: int) -> tuple[float, float]:
    """Best wall and CPU seconds of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--arm", default="xsh_vis")
    parser.add_argument("--binning", default="1x1")
    args = parser.parse_args(argv)

    from soxs_core import _background
    from soxs_core.echelle import background as bg
    from soxs_core.simulate.instrument import InstrumentSimulator

    sim = InstrumentSimulator(args.arm, args.binning, seed=11)
    orders, truth = sim.order_light_model(), sim.scattered_model()
    rng = np.random.default_rng(1)
    expected = np.maximum(orders + truth, 0)
    flux = (rng.poisson(expected) + rng.normal(0, 4.0, expected.shape)).astype(np.float32)
    qual = np.zeros(flux.shape, np.uint8)
    fmt = sim.format
    ranges = {o: (fmt.geometry(o).b_min, fmt.geometry(o).b_max) for o in sim.orders}
    ranges = {o: r for o, r in ranges.items() if np.isfinite(r[0])}
    binning = (sim.detector.binx, sim.detector.biny)

    def mask():
        return bg.in_order_mask_from_edges(
            flux.shape, list(ranges), ranges, lambda o, b: fmt.edges(o, b)[0],
            lambda o, b: fmt.edges(o, b)[1], fmt.dispersion_axis, binning, 3.0)

    in_order = mask()
    axis = fmt.dispersion_axis
    model = bg.fit_background(flux, qual, in_order, axis)
    err = model.model - truth
    amp = float(truth.max())
    print(f"{args.arm} {args.binning} frame {flux.shape[0]}x{flux.shape[1]}, "
          f"scattered-light amplitude {amp:.1f} e-")
    print(f"  accuracy: max |model - truth| {100 * np.abs(err).max() / amp:.2f} % of the "
          f"amplitude, rms {100 * np.sqrt(np.mean(err ** 2)) / amp:.2f} % (limit 10 %)")

    wall, cpu = best(lambda: bg.fit_background(flux, qual, in_order, axis), args.repeat)
    print(f"  fit_background:          {wall:6.3f} s wall  {cpu:6.3f} s CPU  (target 0.3 s)")
    wall, cpu = best(mask, args.repeat)
    print(f"  in_order_mask_from_edges: {wall:6.3f} s wall  {cpu:6.3f} s CPU")

    cflux, cqual, cmask = (a if axis == "y" else a.T for a in (flux, qual, in_order))
    h = model.band_rows
    nb = -(-cflux.shape[0] // h)
    outs = [np.empty((nb, cflux.shape[1]), t) for t in (np.float32, np.float32, np.int32,
                                                        np.float32)]
    used = np.empty(cflux.shape, np.uint8)
    dummy = np.zeros((1, 1), np.float32)
    wall, cpu = best(lambda: _background.cell_statistics(
        cflux, cqual, cmask.view(np.uint8), h, 0xFF, dummy, False, *outs, used), args.repeat)
    print(f"  cell kernel alone:       {wall:6.3f} s wall  {cpu:6.3f} s CPU")
    out = np.empty(cflux.shape, np.float32)
    wall, cpu = best(lambda: bg._expand(model.band_model, model.band_centres, out),
                     args.repeat)
    print(f"  expand kernel alone:     {wall:6.3f} s wall  {cpu:6.3f} s CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
