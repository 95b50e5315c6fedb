"""Benchmark soxs_stare end to end against soxspipe 0.17.4's stare, with flux accuracy.

    python benchmarks/bench_stare.py [--workdir DIR] [--soxspipe-venv VENV] [--arms xsh_vis,...]

* simulates (once per arm; kept in ``--workdir``) a night with one 600 s science frame of the
  simulator's 17 mag target, every order of the arm, and its truth calibrations
  (``stare_truth.sof``: noiseless master bias or dark, master flat = the true pixel response,
  the true order table with edges, the simulator's DISP_TAB/DISP_IMAGE);
* runs ``soxs-esorex soxs_stare stare_truth.sof`` in a fresh process: wall time, CPU time and
  peak RSS (GNU time, as ``bench_masters.py``);
* scores the EXTRACTED_ORDERS table against ``truth/object_truth.fits`` (the object's true
  electrons of every along-order pixel before the pixel response): median ratio of the optimal
  counts to the truth and the MAD-sigma of the pulls, over all orders and per order, with the
  scorer ``soxspipe_stare_runner.compare`` that scores soxspipe's table too;
* with ``--soxspipe-venv V`` (soxspipe 0.17.4 and its dependencies installed in V), runs
  soxspipe's stare on the same SOF through its Python API,
  ``soxs_stare(log=..., settings=..., inputFrames=sof).produce_product()``, in a child of V's
  interpreter (``soxspipe_stare_runner.py``: its stock command line crashes on X-shooter; the
  runner's docstring says exactly what it supplies), and prints both side by side.

The extraction kernel alone is timed by ``bench_extraction.py``.  The machine is shared and
noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import soxspipe_stare_runner  # noqa: E402
from bench_masters import GNU_TIME  # noqa: E402


def make_night(workdir: Path, arm: str) -> Path:
    from soxs_core.simulate import simulate_night

    night = workdir / arm
    if not (night / "stare_truth.sof").exists():
        shutil.rmtree(night, ignore_errors=True)
        print(f"simulating {arm} (once; kept in {night}) ...", flush=True)
        simulate_night(night, arm=arm, binning="1x1", n_bias=0, n_dark=0, n_flat=0,
                       n_science=1, n_std=0, seed=7)
    return night


def run_ours(night: Path, outdir: Path) -> dict:
    """soxs_stare on the night's truth SOF in a fresh process: time, memory, accuracy."""
    # the runner of the interpreter that runs the benchmark (its install), else PATH's
    beside = Path(sys.executable).parent / "soxs-esorex"
    esorex = str(beside) if beside.exists() else shutil.which("soxs-esorex") or str(beside)
    cmd = [esorex, "--output-dir", str(outdir), "--overwrite", "--msg-level", "warning",
           "soxs_stare", str(night / "stare_truth.sof")]
    report = outdir.parent / f"{outdir.name}.rss"
    if GNU_TIME:
        cmd = [GNU_TIME, "-f", "%M %U %S", "-o", str(report), *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss = after.ru_maxrss / 1024.0
    if GNU_TIME and report.exists():
        fields = report.read_text().split()
        rss = float(fields[-3]) / 1024.0
        report.unlink()
    arm = next(outdir.glob("sci_slit_flux_*_extracted_orders.fits"))
    score = soxspipe_stare_runner.compare(arm, night / "truth" / "object_truth.fits")
    return dict(wall_s=wall, cpu_s=cpu, peak_rss_mib=rss, **{
        k: score[k] for k in ("median_ratio", "pull_mad_sigma", "boxcar_median_ratio",
                              "orders")})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/soxs-bench-stare"))
    p.add_argument("--soxspipe-venv", type=Path, default=None)
    p.add_argument("--arms", default="xsh_vis")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in args.arms.split(","):
        night = make_night(args.workdir, arm)
        ours = run_ours(night, args.workdir / f"{arm}_ours")
        row = {"soxs": ours}
        if args.soxspipe_venv is not None:
            row["soxspipe"] = soxspipe_stare_runner.run(
                night, args.workdir / f"{arm}_soxspipe",
                python=str(args.soxspipe_venv / "bin" / "python"))
        results[arm] = row
        print(f"\n{arm}: one 600 s science frame, every order, truth calibrations")
        print(f"{'':12}{'wall s':>9}{'cpu s':>9}{'peak MiB':>10}{'opt/truth':>11}"
              f"{'box/truth':>11}{'pull MAD-s':>12}")
        for name, r in row.items():
            print(f"{name:12}{r['wall_s']:9.1f}{r.get('cpu_s') or float('nan'):9.1f}"
                  f"{r['peak_rss_mib']:10.0f}{r['median_ratio']:11.4f}"
                  f"{r['boxcar_median_ratio']:11.4f}{r['pull_mad_sigma']:12.3f}")
        for name, r in row.items():
            # per true order: optimal / truth (median) and pull MAD-sigma
            per_order = sorted((r.get("orders") or {}).items(), key=lambda kv: int(kv[0]))
            if per_order:
                print(f"{name} per order (n: opt/truth, pull MAD-s): " + ", ".join(
                    f"{n}: {o['median_ratio']:.4f} {o['pull_mad_sigma']:.2f}"
                    for n, o in per_order))
        if "soxspipe" in row:
            sp = row["soxspipe"]
            print(f"ratio soxspipe/soxs: time {sp['wall_s'] / ours['wall_s']:.1f}x, memory "
                  f"{ours['peak_rss_mib'] / sp['peak_rss_mib']:.2f} of soxspipe's")
    (args.workdir / "bench_stare.json").write_text(json.dumps(results, indent=1,
                                                              default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
