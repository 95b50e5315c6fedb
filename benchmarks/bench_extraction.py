"""Benchmark the Horne optimal extraction (soxs_core.extraction.horne).

    python benchmarks/bench_extraction.py [--repeat 3] [--arm xsh_vis] [--binning 1x1]
                                          [--threads 1] [--mag 17]

* the per-row kernel alone (``_horne.extract_rows``) against its numpy twin on one order's
  window (the same inputs; results checked equal);
* ``extract_order`` (profile fit + kernel) on every order of a simulated stare frame of the
  arm (the simulator's object and sky, Poisson and read noise, perfect sky subtraction),
  best of ``--repeat``, wall clock and process CPU time, with the split between profile fit
  and per-row extraction;
* the accuracy against the truth: median optimal / true flux in the aperture and the pull
  standard deviation, over all orders.

The machine is shared: CPU time is the steadier figure when others are busy.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402


def best(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall and CPU seconds of ``repeat`` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--arm", default="xsh_vis")
    parser.add_argument("--binning", default="1x1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mag", type=float, default=17.0)
    args = parser.parse_args(argv)

    from soxs_core.extraction import horne
    from soxs_core.simulate.instrument import InstrumentSimulator, SceneParameters

    t0 = time.perf_counter()
    sim = InstrumentSimulator(args.arm, args.binning, seed=31,
                              scene=SceneParameters(object_mag=args.mag))
    res = sim.science_model("OBJECT", 600.0)
    obj = res.images["object"].astype(np.float64)
    sky = res.images["sky"].astype(np.float64)
    rng = np.random.default_rng(32)
    ron = 3.5
    data = (rng.poisson(obj + sky) + rng.normal(0, ron, obj.shape) - sky).astype(np.float32)
    base = (ron ** 2 + sky).astype(np.float32)
    axis = sim.format.dispersion_axis
    view = (lambda x: x) if axis == "y" else (lambda x: x.T)
    ba = sim.detector.binx if axis == "y" else sim.detector.biny
    slit = (20.0 if args.arm.startswith("xsh") else 15.0) / ba
    orders = res.rows["object"]
    n_rows = sum(r["pixel"].size for r in orders.values())
    print(f"{args.arm} {args.binning}: frame {data.shape}, {len(orders)} orders, "
          f"{n_rows} rows, aperture {slit:g} px (simulated in {time.perf_counter() - t0:.1f} s)")

    # ---- the per-row kernel alone, on the longest order's window
    order = max(orders, key=lambda o: orders[o]["pixel"].size)
    row = orders[order]
    centre = (row["centre"] - 0.5 * (ba - 1)) / ba
    ex = horne.extract_order(view(data), view(base), 1.0, None, None, centre, row["pixel"],
                             slit)
    first, _, a = ex.profile.window()
    d, inside = horne._gather(view(data), row["pixel"], first, a.shape[1])
    vb, _ = horne._gather(view(base), row["pixel"], first, a.shape[1])
    state = np.where(inside & (a > 0), 2, 0).astype(np.uint8)
    win = (d, vb, np.ones_like(d), ex.profile.evaluate(), a, state, 5.0, 0.03,
           a.shape[1] + 20, 1e-6)
    wk, ck, outk = best(lambda: horne.extract_rows(*win, use_kernel=True,
                                                   threads=args.threads), args.repeat)
    wn, cn, outn = best(lambda: horne.extract_rows(*win, use_kernel=False), args.repeat)
    same = np.allclose(outk["flux_opt"], outn["flux_opt"], rtol=1e-12, equal_nan=True)
    print(f"kernel, order {order} ({d.shape[0]} rows x {d.shape[1]} px): Cython "
          f"{wk * 1e3:.2f} ms (cpu {ck * 1e3:.2f}), numpy twin {wn * 1e3:.2f} ms "
          f"(cpu {cn * 1e3:.2f}): {wn / max(wk, 1e-9):.0f}x; equal: {same}")

    # ---- every order, profile fit + extraction
    def run_all():
        out = {}
        for o, r in orders.items():
            c = (r["centre"] - 0.5 * (ba - 1)) / ba
            out[o] = horne.extract_order(view(data), view(base), 1.0, None, view(sky), c,
                                         r["pixel"], slit, threads=args.threads)
        return out

    wall, cpu, exs = best(run_all, args.repeat)
    prof = best(lambda: [horne.fit_spatial_profile(
        view(data), view(base), None, (r["centre"] - 0.5 * (ba - 1)) / ba, slit, 7, 3.0, 10,
        rows=r["pixel"], poisson_scale_t=1.0) for r in orders.values()], 1)
    print(f"extract_order, all orders: {wall:.2f} s wall, {cpu:.2f} s cpu "
          f"(profile fits {prof[1]:.2f} s cpu)")

    ratios, pulls = [], []
    for o, r in orders.items():
        e = exs[o]
        f0, _, aa = e.profile.window()
        oo, _ = horne._gather(view(obj), r["pixel"], f0, aa.shape[1])
        truth = (aa * oo).sum(axis=1)
        g = (e.qual == 0) & (truth > 0)
        if g.sum() < 10:
            continue
        ratios.append(np.median(e.flux_optimal[g] / truth[g]))
        pulls.append(np.std(((e.flux_optimal - truth) / np.sqrt(e.var_optimal))[g]))
        total = e.flux_optimal[g].sum() / truth[g].sum()
        stat = np.sqrt(e.var_optimal[g].sum()) / truth[g].sum()
        print(f"  order {o:3d}: median optimal/true {ratios[-1]:.4f}, total "
              f"{total:.4f} +- {stat:.4f}, pull sd "
              f"{pulls[-1]:.3f}, median S/N {np.median(e.snr[g]):6.1f}, "
              f"profile weight {e.profile.weight:.2f}, degree {e.profile.degree}")
    print(f"accuracy: median optimal/true {np.min(ratios):.4f}-{np.max(ratios):.4f} "
          f"(median {np.median(ratios):.4f}), pull sd {np.min(pulls):.3f}-"
          f"{np.max(pulls):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
