"""Benchmark the sky model alone (soxs_core.extraction.sky.fit_sky) on full simulated frames.

    python benchmarks/bench_sky.py [--arms xsh_vis soxs_nir] [--repeat 2] [--threads 1]

For each arm: every order of the spectral format, the simulator's expected object + sky
(``science_model``, 600 s) with Poisson and read noise drawn here, the truth's dispersion
map and the arm's default parameters; ``fit_sky`` without an object mask (the recipe's first
pass) is timed (best of ``--repeat``), then the accuracy against the true sky is printed:
RMS of (data - model) / photon noise in the sky-only pixels, and on the bright lines, and
the std of the pull (model - true) / model error.  BLAS threads are limited to
``--threads`` (the fit's small dense solves gain nothing from more).
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["xsh_vis", "soxs_nir"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np

    from soxs_core.calib import arm_defaults
    from soxs_core.extraction import sky as S
    from soxs_core.simulate.instrument import InstrumentSimulator
    from soxs_core.simulate.tables import disp_image_arrays

    for arm in args.arms:
        sim = InstrumentSimulator(arm, "1x1", seed=5)
        res = sim.science_model("OBJECT", 600.0)
        tsky = res.images["sky"].astype(float)
        obj = res.images["object"].astype(float)
        ron = sim.truth.read_noise
        rng = np.random.default_rng(1)
        truth = tsky + obj
        data = (rng.poisson(np.maximum(truth, 0)) + rng.normal(0, ron, truth.shape)
                ).astype(np.float32)
        err = np.sqrt(np.maximum(data, 0) + ron**2).astype(np.float32)
        qual = np.zeros(data.shape, np.uint8)
        wave, slit, order = disp_image_arrays(sim.format, sim.orders)
        order = np.where(np.isfinite(order), order, 0).astype(np.int16)
        params = S.SkyParameters.from_mapping(arm_defaults("soxs_stare", sim.arm))
        best = np.inf
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            model = S.fit_sky(data, err, qual, wave, slit, order, sim.orders, params=params)
            best = min(best, time.perf_counter() - t0)
        noise = np.sqrt(truth + ron**2)
        free = obj < 0.01 * noise
        sel = model.used & free
        r = (data - model.sky)[sel] / noise[sel]
        lines = sel & (tsky > 5 * np.percentile(tsky[order > 0], 20)) & (tsky > 5 * ron)
        rl = (data - model.sky)[lines] / noise[lines]
        inner = np.zeros(data.shape, bool)
        for n, fit in model.fits.items():
            inner |= (order == n) & (slit >= fit.slit_range[0]) & (slit <= fit.slit_range[1])
        inner &= free
        pull = (model.sky - tsky)[inner] / model.error[inner]
        print(f"{arm}: {len(model.fits)} orders, {int((order > 0).sum())} px in orders, "
              f"fit_sky {best:.2f} s (best of {args.repeat}); sky-only RMS/noise "
              f"{np.sqrt(np.mean(r**2)):.3f}, on lines {np.sqrt(np.mean(rl**2)):.3f}, "
              f"pull std {np.std(pull):.3f}, {sum(model.knot_counts.values())} breakpoints")


if __name__ == "__main__":
    main()
