"""Benchmark ``soxs-reduce`` on a simulated X-shooter archive, with 1 and then 2 workers.

    python benchmarks/bench_archive.py [--workdir DIR] [--workers 1,2] [--orders all|N]
                                       [--machines 1,10,50] [--frames-per-year 150000]

* simulates once (kept and reused in ``--workdir/archive`` when its parameters match) an
  archive of 3 nights x 3 X-shooter arms (UVB, VIS, NIR) with
  :func:`soxs_core.simulate.archive.simulate_archive`: per night and arm 5 biases (UVB/VIS),
  5 darks, 5 flats (UVB: 5 D2 + 5 QTH; NIR: 5 lamp-on/off pairs), 1 flux standard and 7
  science frames, the last night without flats, plus the mess (a FORS2 frame, a truncated
  bias, a 2x2 science frame nobody calibrated, a duplicate, gzipped darks and standards):
  201 files.  ``--orders all`` (default) illuminates every order of each arm, as real
  frames are; ``--orders N`` only the N central ones (faster, lighter steps);
* runs ``soxs-reduce ARCHIVE --workspace W --workers N`` (engineer B's command; the
  archive directory holds raw/ and calib/) in a fresh workspace for each N, and once more
  on the last workspace, where every step is up to date (the cost of the engine alone:
  scan, plan, checks);
* reads ``W/summary.json`` (the :class:`soxs_archive.model.StepResult` of every step) and
  reports: wall time, raw frames reduced per minute, the sum of the steps' own times
  (``StepResult.seconds``, measured in the workers), the engine's overhead
  ``N x wall - sum`` (worker-seconds not spent in recipes) and the parallel efficiency
  ``sum / (N x wall)``, the peak memory of each worker (largest ``peak_rss_mib`` of its
  steps) and of the largest process of the run (GNU time: the command or a worker), the
  steps' status counts;
* extrapolates to a 10-year X-shooter archive: ``--frames-per-year`` raw frames a year
  (default 150 000, an assumption: about 400 raw files a day, day-time calibrations of
  three arms plus the night's science; not a figure from ESO's archive statistics) at the
  frames-per-minute rate measured with the most workers, on ``--machines`` machines like
  this one, assuming the archive's mix of steps is that of the simulated one and that
  machines do not share work (no cross-machine scheduling overhead counted).

The machine is shared and noisy: compare the figures of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from soxs_core.simulate.archive import TRUTH_FILE, load_truth, simulate_archive

ARMS = ("xsh_uvb", "xsh_vis", "xsh_nir")
NIGHTS = 3
COUNTS = dict(n_bias=5, n_dark=5, n_flat=5, n_std=1, n_science=7)
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None
YEARS = 10


def archive(workdir: Path, orders: int | None, seed: int) -> Path:
    """The benchmark archive: reused when its manifest has the same parameters."""
    outdir = workdir / f"archive_{'all' if orders is None else orders}"
    wanted = dict(arms=list(ARMS), days=list(range(NIGHTS)), counts=COUNTS, seed=seed)
    if (outdir / TRUTH_FILE).is_file():
        params = load_truth(outdir).parameters
        if all(params.get(k) == v for k, v in wanted.items()):
            print(f"reusing {outdir}")
            return outdir
        shutil.rmtree(outdir)
    elif outdir.exists():
        shutil.rmtree(outdir)  # an interrupted simulation
    t0 = time.perf_counter()
    truth = simulate_archive(outdir, nights=NIGHTS, arms=ARMS, seed=seed, orders=orders,
                             small=False, counts=COUNTS)
    print(f"simulated {len(truth.files)} files in {time.perf_counter() - t0:.0f} s -> "
          f"{outdir}")
    return outdir


def run_reduce(raw_dir: Path, workspace: Path, workers: int,
               command: list[str]) -> tuple[float, float, int]:
    """Wall time, peak RSS of the command itself (MiB, NaN without GNU time) and exit
    status of one ``soxs-reduce`` run."""
    cmd = [*command, str(raw_dir), "--workspace", str(workspace),
           "--workers", str(workers)]
    report = None
    if GNU_TIME:
        fd, report = tempfile.mkstemp(suffix=".rss")
        os.close(fd)
        cmd = [GNU_TIME, "-f", "%M", "-o", report, *cmd]
    log = workspace.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    rss = float("nan")
    if report is not None:
        text = Path(report).read_text().split()
        os.unlink(report)
        if text and text[-1].isdigit():
            rss = float(text[-1]) / 1024.0
    return wall, rss, status


def step_results(summary: Any) -> list[dict[str, Any]]:
    """Every StepResult-like dict (``step_id`` and ``status``) anywhere in summary.json."""
    found: list[dict[str, Any]] = []
    if isinstance(summary, dict):
        if "step_id" in summary and "status" in summary:
            return [summary]
        for value in summary.values():
            found += step_results(value)
    elif isinstance(summary, list):
        for value in summary:
            found += step_results(value)
    return found


def measure(workspace: Path, workers: int, wall: float, rss: float, status: int,
            n_frames: int) -> dict[str, Any]:
    path = workspace / "summary.json"
    results = step_results(json.loads(path.read_text())) if path.is_file() else []
    ran = [r for r in results if r["status"] == "done"]
    steps_s = sum(float(r.get("seconds", 0.0)) for r in ran)
    per_worker: dict[str, float] = defaultdict(float)
    for r in results:
        key = r.get("worker") or "?"
        per_worker[key] = max(per_worker[key], float(r.get("peak_rss_mib", 0.0)))
    return dict(workers=workers, wall_s=wall, exit=status, frames=n_frames,
                frames_per_min=60.0 * n_frames / wall if ran else float("nan"),
                steps_s=steps_s, overhead_s=workers * wall - steps_s,
                efficiency=steps_s / (workers * wall) if wall else float("nan"),
                worker_peak_mib=dict(per_worker), command_peak_mib=rss,
                statuses=dict(Counter(r["status"] for r in results)),
                failed=[f"{r['step_id']}: {r.get('reason', '')}" for r in results
                        if r["status"] in ("failed", "blocked")][:5])


def report(rows: list[dict[str, Any]], noop: dict[str, Any] | None, frames_per_year: float,
           machines: list[int], workers_per_machine: int) -> None:
    print(f"\n{'workers':>7} {'wall s':>8} {'frames/min':>10} {'sum steps s':>11} "
          f"{'overhead s':>10} {'efficiency':>10} {'peak MiB/worker':>16} {'exit':>4}")
    for r in rows:
        peaks = ", ".join(f"{v:.0f}" for v in r["worker_peak_mib"].values()) or "-"
        print(f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['frames_per_min']:>10.1f} "
              f"{r['steps_s']:>11.1f} {r['overhead_s']:>10.1f} {r['efficiency']:>10.2f} "
              f"{peaks:>16} {r['exit']:>4}   steps {r['statuses']}")
        for line in r["failed"]:
            print(f"        {line}")
        # GNU time's figure is the largest of the command and its worker processes
        print(f"        largest process of the run (GNU time): {r['command_peak_mib']:.0f} MiB")
    if noop is not None:
        print(f"rerun with every step up to date ({noop['workers']} workers): "
              f"{noop['wall_s']:.1f} s, steps {noop['statuses']}")
    best = max(rows, key=lambda r: r["workers"])
    rate = best["frames_per_min"]
    total = frames_per_year * YEARS
    print(f"\n10-year X-shooter archive: {total:,.0f} raw frames ({frames_per_year:,.0f}/yr, "
          "assumed) at the rate measured with "
          f"{best['workers']} workers ({rate:.1f} frames/min per machine):")
    for m in machines:
        days = total / (rate * m) / 1440.0 if rate > 0 else float("inf")
        print(f"  {m:>4} machine(s) x {workers_per_machine} workers: {days:,.1f} days")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/soxs_bench_archive"))
    p.add_argument("--workers", default="1,2", help="worker counts, comma separated")
    p.add_argument("--orders", default="all",
                   help="'all' orders of each arm, or the number of central orders")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--machines", default="1,10,50",
                   help="machine counts of the extrapolation, comma separated")
    p.add_argument("--frames-per-year", type=float, default=150000.0,
                   help="raw X-shooter frames a year (an assumption, see the docstring)")
    p.add_argument("--command", default="soxs-reduce",
                   help="the reduce command (split on spaces)")
    p.add_argument("--simulate-only", action="store_true")
    args = p.parse_args(argv)
    orders = None if args.orders == "all" else int(args.orders)
    args.workdir.mkdir(parents=True, exist_ok=True)
    outdir = archive(args.workdir, orders, args.seed)
    truth = load_truth(outdir)
    n_frames = sum(1 for f in truth.files if f["step"])
    print(f"{len(truth.files)} files, {n_frames} raw frames in {len(truth.steps)} expected "
          f"steps, {len(truth.problems())} problem files")
    if args.simulate_only:
        return 0
    command = args.command.split()
    # the interpreter's own scripts directory when no virtual environment is active
    found = shutil.which(command[0]) or shutil.which(command[0],
                                                     path=str(Path(sys.executable).parent))
    if found is None:
        print(f"{command[0]}: not found", file=sys.stderr)
        return 1
    command[0] = found
    rows = []
    workers = [int(w) for w in args.workers.split(",")]
    for n in workers:
        workspace = args.workdir / f"workspace_{args.orders}_{n}"
        shutil.rmtree(workspace, ignore_errors=True)
        wall, rss, status = run_reduce(outdir, workspace, n, command)
        rows.append(measure(workspace, n, wall, rss, status, n_frames))
        print(f"{n} worker(s): {wall:.1f} s, exit {status} (log {workspace}.log)")
    wall, rss, status = run_reduce(outdir, workspace, workers[-1], command)
    noop = measure(workspace, workers[-1], wall, rss, status, n_frames)
    report(rows, noop, args.frames_per_year, [int(m) for m in args.machines.split(",")],
           workers[-1])
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
