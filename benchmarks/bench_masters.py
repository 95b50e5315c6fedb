"""Benchmark soxs_mbias / soxs_mdark end to end and the stacking kernel alone.

    python benchmarks/bench_masters.py [--workdir DIR] [--soxspipe-venv VENV] [--repeat 5]

* generates 11 (and 21) X-shooter VIS 1x1 raw bias frames (2106x4000 uint16) and 11 darks
  with the project's simulator;
* runs ``soxs-esorex soxs_mbias`` and ``soxs_mdark`` in fresh processes and reports wall time
  and peak resident memory (from the child's rusage), best of ``--repeat`` runs;
* times the Cython stacking kernel on an 11x4000x2048 cube (X-shooter defaults: 5 sigma,
  3 iterations) with all cores and with one;
* when ESO's PyCPL is importable, times CPL's ``collapse_sigclip_create`` on the same cube;
  otherwise prints the figure quoted in the README, labelled as quoted, not measured;
* with ``--soxspipe-venv``, runs soxspipe 0.17.4's soxs_mbias on the same 11 frames and prints
  the ratios.

The machine is shared and noisy: compare the ratios measured in one run, not absolute times
from different runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


#: GNU time reports a command's own peak RSS.  Our wait4 would not: Linux counts the peak of
#: the parent's memory, which the child shares until it executes, in the child's ru_maxrss,
#: and this script holds a simulated night and a 360 MB cube at times.
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None


def run_child(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of a child process; raises if it fails."""
    report = None
    if GNU_TIME:
        fd, report = tempfile.mkstemp(suffix=".rss")
        os.close(fd)
        cmd = [GNU_TIME, "-f", "%M", "-o", report, *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    if report is None:  # an upper bound: see GNU_TIME
        return wall, usage.ru_maxrss / 1024.0
    rss_kib = float(Path(report).read_text().split()[-1])
    os.unlink(report)
    return wall, rss_kib / 1024.0


def best(cmd: list[str], repeat: int, cwd: Path | None = None) -> tuple[float, float]:
    runs = [run_child(cmd, cwd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


RECIPE_ONLY = """
import sys, time
from soxs_recipes.cli import run

start = time.perf_counter()
status = run(sys.argv[1:], tune_memory=True)  # as the soxs-esorex entry point does
print(time.perf_counter() - start)
sys.exit(status)
"""


def recipe_only(args: list[str], repeat: int) -> float:
    """Seconds inside the runner, without interpreter start-up and imports (best of repeat)."""
    times = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", RECIPE_ONLY, *args], check=True,
                              capture_output=True, text=True)
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return min(times)


def make_frames(workdir: Path) -> dict[str, list[Path]]:
    from soxs_core.simulate import DetectorSimulator

    sim = DetectorSimulator(arm="xsh_vis", binning="1x1", readout="slow", seed=1)
    frames = {}
    for name, n in (("bias11", 11), ("bias21", 21)):
        target = workdir / name
        if not target.exists() or len(list(target.glob("*.fits"))) != n:
            shutil.rmtree(target, ignore_errors=True)
            sim.write_bias(target, n=n)
        frames[name] = sorted(target.glob("*.fits"))
    target = workdir / "dark11"
    if not target.exists() or len(list(target.glob("*.fits"))) != 11:
        shutil.rmtree(target, ignore_errors=True)
        sim.write_dark(target, n=11, exptime=600.0)
    frames["dark11"] = sorted(target.glob("*.fits"))
    return frames


#: CPL's time on the kernel's cube as recorded when this benchmark was first written
#: (README of 2026-11-21, commit def9250); nothing here reproduces it without PyCPL.
QUOTED_CPL_SECONDS = 1.86
QUOTED_CPL_SOURCE = "README of 2026-11-21 (commit def9250), not reproduced since"


def kernel_cube() -> np.ndarray:
    """The 11x4000x2048 bias-like cube both stacking timings use."""
    rng = np.random.default_rng(0)
    shape = (11, 4000, 2048)
    data = rng.normal(1000.0, 3.0, shape).astype(np.float32)
    data[rng.random(shape) < 1e-3] += 500.0  # a few cosmic rays to clip
    return data


def cpl_sigclip_time(data: np.ndarray, repeat: int) -> tuple[float | None, str]:
    """Seconds of CPL's ``collapse_sigclip_create`` on the cube (best of ``repeat``), or None
    and the reason when PyCPL is not importable or the call fails."""
    try:
        import cpl
    except ImportError:
        return None, "PyCPL is not importable"
    try:
        images = cpl.core.ImageList([cpl.core.Image(plane) for plane in data])
        mode = cpl.core.ImageList.Collapse.MEAN
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            # 5 sigma either side, at least half the values kept: the kernel's clip
            images.collapse_sigclip_create(5.0, 5.0, 0.5, mode)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # an API difference of another PyCPL version: say so, go on
        return None, f"PyCPL {getattr(cpl, '__version__', '?')} failed: {exc}"
    return min(times), f"measured, PyCPL {getattr(cpl, '__version__', '?')}"


def kernel_times(data: np.ndarray, repeat: int) -> dict[str, float]:
    from soxs_core.combine.stacking import ClipSettings, clip_and_stack_arrays, default_threads

    shape = data.shape
    errors = np.full(shape, 3.0, np.float32)
    qual = np.zeros(shape, np.uint8)
    settings = ClipSettings(5.0, 5.0, 3)
    out = {}
    for label, threads in (("all cores", default_threads()), ("1 thread", 1)):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            clip_and_stack_arrays(data, errors, qual, settings, threads=threads)
            times.append(time.perf_counter() - start)
        out[label] = min(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/soxs-bench")
    parser.add_argument("--soxspipe-venv", help="virtual environment with soxspipe 0.17.4")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    frames = make_frames(workdir)
    esorex = shutil.which("soxs-esorex") or str(Path(sys.executable).parent / "soxs-esorex")

    def sof(name: str, tag: str, extra: str = "") -> Path:
        path = workdir / f"{name}.sof"
        path.write_text("".join(f"{p} {tag}\n" for p in frames[name]) + extra)
        return path

    results = {}
    out = workdir / "out"
    results["soxs_mbias 11"] = best([esorex, "--overwrite", "--output-dir", str(out),
                                     "soxs_mbias", str(sof("bias11", "BIAS_VIS"))], args.repeat)
    results["soxs_mbias 21"] = best([esorex, "--overwrite", "--output-dir", str(workdir / "o21"),
                                     "soxs_mbias", str(sof("bias21", "BIAS_VIS"))], args.repeat)
    mbias = out / "master_bias_vis.fits"
    results["soxs_mdark 11"] = best(
        [esorex, "--overwrite", "--output-dir", str(out), "soxs_mdark",
         str(sof("dark11", "DARK_VIS", f"{mbias} MASTER_BIAS_VIS\n"))], args.repeat)
    inside = recipe_only(["--overwrite", "--output-dir", str(out), "--msg-level", "warning",
                          "soxs_mbias", str(workdir / "bias11.sof")], args.repeat)
    cube = kernel_cube()
    kernel = kernel_times(cube, args.repeat)
    cpl_seconds, cpl_how = cpl_sigclip_time(cube, args.repeat)
    del cube

    print(f"\nmachine: {os.cpu_count()} cores; frames: X-shooter VIS 1x1, 2106x4000 uint16")
    print(f"{'step':<34}{'wall [s]':>10}{'peak RSS [MiB]':>16}")
    for name, (wall, rss) in results.items():
        print(f"{name + ' frames':<34}{wall:>10.2f}{rss:>16.0f}")
    print(f"{'soxs_mbias 11, without start-up':<34}{inside:>10.2f}")
    for label, seconds in kernel.items():
        print(f"{'stacking kernel 11x4000x2048, ' + label:<34}{seconds:>10.3f}")
    if cpl_seconds is not None:
        print(f"{'CPL collapse_sigclip_create, same cube':<34}{cpl_seconds:>10.3f}  "
              f"({cpl_how})")
    else:
        print(f"  CPL collapse_sigclip_create: not measured ({cpl_how}); quoted figure "
              f"{QUOTED_CPL_SECONDS} s from the {QUOTED_CPL_SOURCE}")
    m11, m21 = results["soxs_mbias 11"][1], results["soxs_mbias 21"][1]
    print(f"peak memory 21 vs 11 frames: {m21 / m11:.2f}x")
    if args.soxspipe_venv:
        python = Path(args.soxspipe_venv) / "bin" / "python"
        runner = HERE / "soxspipe_mbias_runner.py"
        raw = workdir / "bias11"
        wall, rss = best([str(python), str(runner), str(raw), str(workdir / "soxspipe")],
                         1)
        ours = results["soxs_mbias 11"]
        print(f"{'soxspipe 0.17.4 mbias 11 frames':<34}{wall:>10.2f}{rss:>16.0f}")
        print(f"speed-up {wall / ours[0]:.1f}x end to end ({wall / inside:.1f}x without our "
              f"start-up), memory ratio {ours[1] / rss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
