"""Run soxspipe 0.17.4's soxs_stare on one simulated science frame and score it against truth.

Two halves in one file:

* ``run(night_dir, workdir)`` (any Python with numpy and astropy, e.g. soxs's venv): writes the
  SOF soxspipe needs into WORKDIR, runs the other half in a child process of soxspipe's
  interpreter (default ``/tmp/spvenv/bin/python``, ``SOXSPIPE_PYTHON`` or ``--python``),
  measures its wall time and peak RSS (``os.wait4``: the child's own resource usage, its
  largest resident set), reads the ``..._EXTRACTED_ORDERS.fits`` it writes and compares
  ``extractedFluxOptimal`` with the night's ``truth/object_truth.fits`` counts, order by
  order: median ratio extracted / truth and pull (extracted - truth) / sqrt(varianceSpectrum)
  as its MAD-sigma;
* ``--child SOF WORKDIR`` (soxspipe's interpreter, never imported by soxs): the recipe through
  its Python API.

Command line (prints one line of JSON)::

    python benchmarks/soxspipe_stare_runner.py NIGHT WORKDIR [--sof stare_truth.sof]
        [--python /tmp/spvenv/bin/python]

NIGHT is a night written by ``soxs-simulate`` / :func:`soxs_core.simulate.simulate_night`
(X-shooter VIS, one OBJECT frame); the default SOF is its ``stare_truth.sof``: the raw frame
with the simulator's truth calibrations (``truth/calibs/master_bias_vis.fits``,
``truth/calibs/master_flat_vis.fits`` = the true pixel response, the true order table with
edges ``truth/order_tab_truth_vis.fits``) and the night's ``calib/DISP_TAB_VIS.fits`` and
``calib/DISP_IMAGE_VIS.fits``.  The truth counts are before the pixel response, which is what
dividing by that flat gives back.

How soxspipe 0.17.4 is driven, and what it needs (found by running it):

* its stock command line cannot run it: without ``-s`` and outside a workspace made by
  ``soxspipe prep`` it looks for a ``default_settings.yaml`` that the package does not ship,
  and ``soxspipe prep`` needs Python >= 3.12 and writes only bias SOFs for X-shooter (every
  other step of 0.17.4's ``xsh_sof_map.yaml`` is commented out).  The recipe is therefore run
  as ``soxs_stare(log=..., settings=..., inputFrames=sof, overwrite=True).produce_product()``;
* settings: the package's ``advanced_settings.yaml`` merged with ``xsh_default_settings.yaml``
  (what ``soxspipe prep`` would write), ``workspace-root-dir`` = WORKDIR, plus the keys the
  X-shooter file lacks but the code reads unconditionally (INSTRUMENTS.md section 8, item 19),
  taken from the SOXS defaults of the same arm kind (VIS for UVB/VIS, NIR for NIR):
  ``soxs-stare.<arm>.sky-subtraction.noise_rolling_window_size`` / ``noise_sigma`` (used by
  the sky-residual floor test) and per-arm ``soxs-response.<arm>`` blocks (``poly_order``,
  ``max_iteration``, copied from the flat X-shooter block); also a ``soxs-stare-std`` block
  (a copy of ``soxs-stare``), which the recipe reads instead when the SOF name has ``_STD_``;
* an SOF named ``<YYYYMMDDTHHMMSS>_<ARM>_STARE.sof`` (soxspipe takes the night from the name
  and names its products after it): the night's SOF lines are copied into one in WORKDIR;
* CDELT1/CDELT2 on every image product (its input check reads the binning from them); ours
  carry them, an image without them is copied into WORKDIR with the two cards added;
* a logger with a PRINT level (``fundamentals.logs.addLoggingLevel``) and WORKDIR as the
  current directory for its ``reduced/``, ``qc/`` and ``tmp/`` trees;
* one work-around: on X-shooter VIS the recipe crashes after the extraction, in the merged
  spectrum's SNR/efficiency QCs (``toolkit.add_snr_efficiency_qcs``, called by
  ``horne_extraction.extract`` before it writes EXTRACTED_ORDERS): the order-join keys are the
  two order numbers written one after the other, and after the VIS renumbering (16-30 ->
  6-20) the joins of orders 6..9 are two-character keys, which the function takes for SOXS
  VIS's four quasi-orders (``["i", "r", "g", "u"][int(key[0])]``: ``IndexError: list index
  out of range``).  The child wraps that function (no soxspipe code is changed or copied) so
  that on this error it returns the QC table unchanged: only those QCs are lost, the
  products are written as the recipe makes them;
* and a second one, after every product is written: the merged-spectrum QC plot
  (``toolkit.plot_merged_spectrum_qc``) marks the sky lines of the arm's static sky-line
  table by its ``ISOLATED`` column, which the X-shooter tables of 0.17.4 lack (``KeyError:
  'ISOLATED'``); wrapped the same way, that PDF is not made.

Measured (2026-12-02, full-frame X-shooter VIS 1x1, 600 s, 17 mag target, seed 7,
``stare_truth.sof``; the 2 cores shared with other jobs at load 5-11, so the wall time is an
upper bound): 658 s wall, 3607 MiB peak RSS; all 15 orders extracted; extractedFluxOptimal /
truth median 0.971 (per order 0.957-0.976), boxcar 0.974; pull MAD-sigma 0.54 (its variance
is too large: cf. INSTRUMENTS.md section 8 item 29, the Poisson term includes the bias
pedestal), pull median -0.31.

soxspipe renumbers the X-shooter VIS orders (16-30 -> 6-20) before it writes the
EXTRACTED_ORDERS table (INSTRUMENTS.md section 8, item 25): each of its orders is matched to
the true order whose wavelengths its ``wavelengthMean`` values fall in, and each row to the
truth row of the same along-order pixel (``ycoord``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: soxspipe 0.17.4's interpreter (override with ``SOXSPIPE_PYTHON`` or ``--python``)
DEFAULT_PYTHON = os.environ.get("SOXSPIPE_PYTHON", "/tmp/spvenv/bin/python")

#: MAD to Gaussian sigma
MAD_SIGMA = 1.482602218505602


# ----------------------------------------------------------------------------- child half
def _settings(package: str, instrument: str) -> dict:
    """soxspipe's own settings for the instrument, with the keys its code reads but the
    X-shooter file lacks (module docstring)."""
    import yaml

    settings: dict = {}
    for name in ("advanced_settings.yaml", f"{instrument}_default_settings.yaml"):
        with open(os.path.join(package, name)) as fh:
            settings.update(yaml.safe_load(fh))
    with open(os.path.join(package, "soxs_default_settings.yaml")) as fh:
        soxs = yaml.safe_load(fh)
    stare = settings["soxs-stare"]
    for arm in ("uvb", "vis", "nir"):
        if arm not in stare:
            continue
        sky = stare[arm].setdefault("sky-subtraction", {})
        donor = soxs["soxs-stare"]["nir" if arm == "nir" else "vis"]["sky-subtraction"]
        for key in ("noise_rolling_window_size", "noise_sigma"):
            sky.setdefault(key, donor[key])
    response = settings.setdefault("soxs-response", {})
    flat = {k: v for k, v in response.items() if not isinstance(v, dict)}
    for arm in ("uvb", "vis", "nir"):
        block = response.setdefault(arm, {})
        for key, value in flat.items():
            block.setdefault(key, value)
    settings.setdefault("soxs-stare-std", json.loads(json.dumps(stare)))
    return settings


def _get_past_xsh_qc_crashes() -> None:
    """Let X-shooter get past two QC-only crashes (module docstring): wrappers of
    ``toolkit.add_snr_efficiency_qcs`` (on IndexError: the QC table unchanged) and
    ``toolkit.plot_merged_spectrum_qc`` (on KeyError 'ISOLATED': no plot).  Both are looked
    up in ``toolkit`` when called (function-level imports), so replacing the module
    attributes reaches them."""
    import logging

    from soxspipe.commonutils import toolkit

    snr_qcs, merged_plot = toolkit.add_snr_efficiency_qcs, toolkit.plot_merged_spectrum_qc
    log = logging.getLogger("soxspipe")

    def snr_wrapper(*args, **kwargs):
        try:
            return snr_qcs(*args, **kwargs)
        except IndexError as exc:
            log.warning(f"soxspipe_stare_runner: SNR/efficiency QCs skipped ({exc!r})")
            return kwargs["qcTable"] if "qcTable" in kwargs else args[2]

    def plot_wrapper(*args, **kwargs):
        try:
            return merged_plot(*args, **kwargs)
        except KeyError as exc:
            if exc.args != ("ISOLATED",):
                raise
            log.warning(f"soxspipe_stare_runner: merged-spectrum QC plot skipped ({exc!r})")
            return kwargs["products"], None

    toolkit.add_snr_efficiency_qcs = snr_wrapper
    toolkit.plot_merged_spectrum_qc = plot_wrapper


def child(sof: str, workdir: str) -> None:
    """Inside soxspipe's interpreter: run its stare recipe on ``sof`` in ``workdir``."""
    import logging

    import soxspipe
    from astropy.io import fits
    from fundamentals.logs import addLoggingLevel

    os.chdir(workdir)
    addLoggingLevel("PRINT", logging.INFO + 5)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    first = next(line.split()[0] for line in open(sof) if line.strip())
    instrument = "soxs" if "SOXS" in str(fits.getheader(first).get("INSTRUME", "")).upper() \
        else "xsh"
    settings = _settings(os.path.dirname(soxspipe.__file__), instrument)
    settings["workspace-root-dir"] = workdir
    from soxspipe.recipes import soxs_stare

    _get_past_xsh_qc_crashes()
    recipe = soxs_stare(log=logging.getLogger("soxspipe"), settings=settings,
                        inputFrames=sof, overwrite=True)
    recipe.produce_product()
    paths = sorted(glob.glob(os.path.join(workdir, "reduced", "*", "soxs-stare", "*")))
    print(json.dumps({"products": paths}))


# ----------------------------------------------------------------------------- parent half
def _with_binning_cards(path: Path, workdir: Path) -> Path:
    """A copy of an image product with CDELT1/CDELT2 from its binning keywords."""
    from astropy.io import fits

    target = workdir / ("binning_cards_" + path.name)
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        for axis, card in (("X", "CDELT1"), ("Y", "CDELT2")):
            hdr[card] = float(hdr.get(f"ESO DET WIN1 BIN{axis}",
                                      hdr.get(f"ESO DET BIN{axis}", 1)))
        hdul.writeto(target, overwrite=True)
    return target


def write_sof(night_sof: Path, workdir: Path) -> Path:
    """The night's SOF as soxspipe needs it: absolute paths, named after the science frame's
    DATE-OBS and arm (``<YYYYMMDDTHHMMSS>_<ARM>_STARE.sof``)."""
    from astropy.io import fits

    lines, first = [], None
    for line in night_sof.read_text().splitlines():
        parts = line.split()
        if len(parts) < 2 or line.lstrip().startswith("#"):
            continue
        path = Path(parts[0])
        if not path.is_absolute():
            path = night_sof.parent / path
        hdr = fits.getheader(path)
        if "ESO DPR CATG" in hdr and first is None:
            first = (str(hdr["DATE-OBS"]), str(hdr["ESO SEQ ARM"]).strip())
        if "ESO PRO CATG" in hdr and hdr.get("NAXIS", 0) and "CDELT1" not in hdr:
            path = _with_binning_cards(path, workdir)
        lines.append(f"{path.resolve()} {parts[1]}\n")
    if first is None:
        raise RuntimeError(f"{night_sof}: no raw frame in the SOF")
    stamp = first[0][:19].replace("-", "").replace(":", "")
    sof = workdir / f"{stamp}_{first[1]}_STARE.sof"
    sof.write_text("".join(lines))
    return sof


def run_child(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float, float, str]:
    """Wall time (s), CPU time (user + system, s; it and its children), peak RSS (MiB) and
    stdout of a child process; raises if it fails."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"soxspipe stare failed ({code}):\n" + "\n".join(tail))
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, out


def compare(extracted: Path, truth: Path) -> dict:
    """extractedFluxOptimal against the truth counts, per order and over all orders.

    Returns
    -------
    dict
        ``orders``: per true order ``{"n", "median_ratio", "pull_mad_sigma",
        "pull_median", "boxcar_median_ratio"}``; ``median_ratio``, ``pull_mad_sigma``,
        ``pull_median`` and ``boxcar_median_ratio`` (extractedFluxBoxcarRobust / truth) over
        every matched row;
        ``orders_extracted``, ``orders_true``; ``order_offset`` (true - soxspipe number).
    """
    import numpy as np
    from astropy.io import fits

    with fits.open(extracted) as hdul:
        ext = hdul[1].data
        names = ext.columns.names
        along = "ycoord" if "ycoord" in names else "xcoord"
        e_order = np.asarray(ext["order"], int)
        e_pix = np.rint(np.asarray(ext[along], float)).astype(int)
        e_wl = np.asarray(ext["wavelengthMean"], float)
        e_flux = np.asarray(ext["extractedFluxOptimal"], float)
        e_var = np.asarray(ext["varianceSpectrum"], float)
        e_box = np.asarray(ext["extractedFluxBoxcarRobust"], float) \
            if "extractedFluxBoxcarRobust" in names else np.full(e_flux.size, np.nan)
    with fits.open(truth) as hdul:
        tru = hdul[1].data
        t_order = np.asarray(tru["order"], int)
        t_pix = np.asarray(tru["pixel"], int)
        t_wl = np.asarray(tru["wavelength"], float)
        t_counts = np.asarray(tru["counts"], float)
    ranges = {n: (t_wl[t_order == n].min(), t_wl[t_order == n].max())
              for n in np.unique(t_order)}
    orders: dict[str, dict] = {}
    ratios, pulls, boxes, offsets = [], [], [], set()
    for n_sp in np.unique(e_order):
        sel = (e_order == n_sp) & np.isfinite(e_wl)
        if not sel.any():
            continue
        wl = float(np.median(e_wl[sel]))
        match = [n for n, (lo, hi) in ranges.items() if lo <= wl <= hi]
        if not match:
            continue
        # the order whose centre wavelength is closest when two overlap at the ends
        n_true = min(match, key=lambda n: abs(0.5 * sum(ranges[n]) - wl))
        offsets.add(int(n_true - n_sp))
        truth_by_pixel = dict(zip(t_pix[t_order == n_true], t_counts[t_order == n_true]))
        rows = np.flatnonzero(sel)
        tc = np.array([truth_by_pixel.get(int(p), np.nan) for p in e_pix[rows]])
        f, v, box = e_flux[rows], e_var[rows], e_box[rows]
        ok = np.isfinite(tc) & np.isfinite(f) & np.isfinite(v) & (v > 0) & (tc > 0)
        if ok.sum() < 10:
            continue
        ratio = f[ok] / tc[ok]
        box_ratio = box[ok] / tc[ok]
        pull = (f[ok] - tc[ok]) / np.sqrt(v[ok])
        med = float(np.median(pull))
        orders[str(int(n_true))] = {
            "n": int(ok.sum()), "median_ratio": float(np.median(ratio)),
            "pull_median": med,
            "pull_mad_sigma": float(MAD_SIGMA * np.median(np.abs(pull - med))),
            "boxcar_median_ratio": float(np.nanmedian(box_ratio))
            if np.isfinite(box_ratio).any() else None}
        ratios.append(ratio)
        boxes.append(box_ratio)
        pulls.append(pull)
    if not ratios:
        raise RuntimeError(f"{extracted}: no order matched the truth in {truth}")
    ratio = np.concatenate(ratios)
    pull = np.concatenate(pulls)
    med = float(np.median(pull))
    box = np.concatenate(boxes)
    return {"median_ratio": float(np.median(ratio)),
            "boxcar_median_ratio": float(np.nanmedian(box)) if np.isfinite(box).any()
            else None,
            "pull_mad_sigma": float(MAD_SIGMA * np.median(np.abs(pull - med))),
            "pull_median": med,
            "orders_extracted": len(orders), "orders_true": len(ranges),
            "order_offset": sorted(offsets), "orders": orders}


def run(night_dir: str | os.PathLike, workdir: str | os.PathLike,
        sof_name: str = "stare_truth.sof", python: str = DEFAULT_PYTHON,
        truth_name: str = "object_truth.fits") -> dict:
    """soxspipe 0.17.4's stare on a night's SOF: time, memory and accuracy against truth.

    Parameters
    ----------
    night_dir : path
        A simulated night (``stare_truth.sof``, ``truth/object_truth.fits``).
    workdir : path
        soxspipe's workspace (created; products under ``reduced/<night>/soxs-stare/``, its
        log in ``soxspipe_stderr.log``).
    sof_name : str
        The night's SOF to reduce (``stare_truth.sof``: truth calibrations; ``stare.sof``:
        the recipes' products, which must exist).
    python : str
        soxspipe's interpreter.
    truth_name : str
        The truth table in ``night_dir/truth`` (``standard_truth.fits`` for ``std*.sof``).

    Returns
    -------
    dict
        ``wall_s``, ``cpu_s`` (user + system: the figure to quote on a shared machine),
        ``peak_rss_mib``, ``extracted`` (path), ``sof`` and the keys of :func:`compare`.
    """
    night = Path(night_dir).resolve()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sof = write_sof(night / sof_name, work)
    log = work / "soxspipe_stderr.log"
    wall, cpu, rss, out = run_child([python, str(Path(__file__).resolve()), "--child", str(sof),
                                str(work)], work, log)
    found = sorted(work.glob("reduced/*/soxs-stare/*_EXTRACTED_ORDERS.fits"))
    if not found:
        raise RuntimeError(f"soxspipe wrote no EXTRACTED_ORDERS table under {work}")
    result = {"pipeline": "soxspipe 0.17.4", "sof": str(night / sof_name),
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
              "peak_rss_mib": round(rss, 1),
              "extracted": str(found[-1])}
    result.update(compare(found[-1], night / "truth" / truth_name))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("night", help="simulated night directory")
    p.add_argument("workdir", help="soxspipe workspace (created)")
    p.add_argument("--sof", default="stare_truth.sof", help="SOF of the night to reduce")
    p.add_argument("--truth", default="object_truth.fits", help="truth table in NIGHT/truth")
    p.add_argument("--python", default=DEFAULT_PYTHON, help="soxspipe 0.17.4's interpreter")
    args = p.parse_args(argv)
    result = run(args.night, args.workdir, args.sof, args.python, args.truth)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
