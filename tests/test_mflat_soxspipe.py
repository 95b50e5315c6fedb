"""soxs_mflat's products and SOFs against soxspipe 0.17.4 (issue 8: "soxspipe's stare must be
able to read our ORDER_TAB"; "an SOF written by soxspipe's organiser for an mflat step runs
unchanged").

soxspipe runs in its own interpreter, /tmp/spvenv/bin/python, in subprocesses; without it the
module is skipped.  The nights are small (three orders) and shared by the tests:

* our ORDER_TAB, read by soxspipe's ``unpack_order_table``, gives the centres and edges that our
  own :func:`~soxs_core.echelle.ordertable.read_order_table` evaluates (< 1e-3 px), on a frame
  dispersed along x (SOXS NIR) and one along y (X-shooter VIS, 2x2 binned); our MASTER_FLAT
  read the way soxspipe opens frames (``CCDData`` with FLUX/QUAL/ERRS) holds our planes;
* soxspipe's stare input check accepts our MASTER_BIAS, MASTER_FLAT and ORDER_TAB (it reads
  the binning from CDELT1/CDELT2, which our image products carry since commit a5b0cfb);
* ``soxspipe prep`` on a copy of a simulated SOXS NIR night writes an mflat SOF (tags
  ``LAMP,FLAT_NIR`` with a comma, a MASTER_DARK and an ORDER_TAB at the paths where its own
  earlier steps would write them); with our master dark and the night's order-centre table at
  those paths, ``soxs-esorex soxs_mflat`` runs that SOF unchanged and its edges match the truth
  (the SOF lists no lamp-off frames: the organiser leaves NIR frames of DPR TECH IMAGE out of
  its groups, so the master dark detrends the flats).

What the organiser needs that the simulator does not write, added to the copies here (and only
there): ``ESO TPL START`` / ``ESO TPL NEXP`` on every raw frame (without them 0.17.4 treats
every calibration set as incomplete and writes no SOF at all), ``ESO INS ACFW ID`` on SOXS
frames (its header harvest stops with "could not convert string to float" when no frame has
it), and single-pinhole arc and flat frames (``LAMP,WAVE`` and ``LAMP,FLAT`` with DPR TECH
``ECHELLE,PINHOLE``) from which it predicts the upstream disp_solution and order_centres
products an mflat SOF lists; here they are stand-ins (a flat's copy with those keywords), only
ever read by the organiser.  ``soxspipe prep`` also needs Python >= 3.12
(``sqlite3.connect(autocommit=...)``); under 3.11 it runs with ``connect`` wrapped to the old
spelling of autocommit (``isolation_level=None``).  For X-shooter, 0.17.4's organiser writes
bias SOFs only (every other step of its ``xsh_sof_map.yaml`` is commented out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.echelle.ordertable import read_order_table
from soxs_core.simulate import simulate_night
from soxs_core.simulate.night import product_path, reduction_dir
from soxs_recipes.cli import run as esorex

SPVENV = Path("/tmp/spvenv/bin/python")
pytestmark = pytest.mark.skipif(not SPVENV.exists(),
                                reason="soxspipe 0.17.4 not installed in /tmp/spvenv")

ORDERS = {"soxs_nir": [14, 15, 16], "xsh_vis": [20, 21, 22]}
BINNING = {"soxs_nir": "1x1", "xsh_vis": "2x2"}
#: NIR darks of the flats' exposure time (the organiser's mflat SOF takes a master dark)
FLAT_EXPTIME = 10.0


def _soxspipe(script: str, *args: str, cwd: Path | None = None, home: Path | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    env = None
    if home is not None:  # soxspipe's command line writes ~/.config/soxspipe: keep it here
        env = dict(os.environ, HOME=str(home))
    return subprocess.run([str(SPVENV), "-c", textwrap.dedent(script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _last_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reduce(night: Path, arm: str) -> dict:
    kwargs = dict(n_dark=3, dark_exptime=FLAT_EXPTIME, flat_exptime=FLAT_EXPTIME) \
        if arm == "soxs_nir" else dict(n_dark=0)
    result = simulate_night(night, arm=arm, binning=BINNING[arm], n_bias=3, n_flat=5,
                            n_science=0, n_std=0, orders=ORDERS[arm], **kwargs)
    for sof, recipe in (("bias", "soxs_mbias"), ("dark", "soxs_mdark"), ("flat", "soxs_mflat")):
        if sof in result.sofs:
            assert esorex(["--output-dir", str(reduction_dir(night, recipe)), recipe,
                           str(result.sofs[sof])]) == 0, recipe
    tag = arm.split("_")[1].upper()
    return {"night": night, "result": result, "tag": tag,
            "order_tab": product_path(night, "soxs_mflat", "ORDER_TAB", tag),
            "master_flat": product_path(night, "soxs_mflat", "MASTER_FLAT", tag),
            "master_dark": product_path(night, "soxs_mdark", "MASTER_DARK", tag),
            "master_bias": product_path(night, "soxs_mbias", "MASTER_BIAS", tag)}


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("mflat_soxspipe")
    return {arm: _reduce(root / arm, arm) for arm in ORDERS}


# ---------------------------------------------------------------------- (a) reading
_READ = """
    import json, logging, sys
    import numpy as np
    from astropy import units as u
    from astropy.nddata import CCDData
    from soxspipe.commonutils.toolkit import unpack_order_table
    log = logging.getLogger("t")
    out = []
    for table, flat, rows, cols in json.loads(sys.argv[1]):
        poly, pix, meta = unpack_order_table(log=log, orderTablePath=table, pixelDelta=25)
        got = {c: np.asarray(pix[c], float).tolist() for c in pix.columns}
        got["meta_order"] = [int(o) for o in meta["order"]]
        # as soxspipe's recipes open every FLUX/QUAL/ERRS frame
        ccd = CCDData.read(flat, hdu=0, unit=u.electron, hdu_uncertainty="ERRS",
                           hdu_mask="QUAL", hdu_flags="FLAGS", key_uncertainty_type="UTYPE")
        got["flat"] = dict(shape=list(ccd.data.shape), unit=str(ccd.unit),
                           uncertainty=type(ccd.uncertainty).__name__,
                           n_masked=int(np.count_nonzero(ccd.mask)),
                           data=ccd.data[rows, cols].astype(float).tolist(),
                           mask=ccd.mask[rows, cols].astype(int).tolist(),
                           errs=ccd.uncertainty.array[rows, cols].astype(float).tolist())
        out.append(got)
    print(json.dumps(out))
"""


def test_soxspipe_reads_our_order_table_and_master_flat(nights):
    rng = np.random.default_rng(3)
    jobs, planes = [], []
    for arm in ORDERS:
        with fits.open(nights[arm]["master_flat"]) as hdul:
            flux, qual, errs = (hdul[k].data for k in ("FLUX", "QUAL", "ERRS"))
            rows = rng.integers(0, flux.shape[0], 400)
            cols = rng.integers(0, flux.shape[1], 400)
            # include flagged pixels: the mask must carry over too
            fr, fc = np.nonzero(qual)
            pick = rng.choice(fr.size, min(100, fr.size), replace=False)
            rows, cols = np.r_[rows, fr[pick]], np.r_[cols, fc[pick]]
            planes.append((flux.shape, int(np.count_nonzero(qual)), flux[rows, cols],
                           qual[rows, cols], errs[rows, cols]))
        jobs.append([str(nights[arm]["order_tab"]), str(nights[arm]["master_flat"]),
                     rows.tolist(), cols.tolist()])
    results = _last_json(_soxspipe(_READ, json.dumps(jobs)))
    for arm, got, (shape, n_flagged, flux, qual, errs) in zip(ORDERS, results, planes):
        ours = read_order_table(nights[arm]["order_tab"])
        along, across = ours.along, ours.across
        assert got["meta_order"] == sorted(ORDERS[arm]) == sorted(ours.orders.tolist())
        n = np.array(got["order"])
        b = np.array(got[f"{along}coord"])
        for order in ours.orders:  # every order sampled over its whole valid range
            b0, b1 = ours.along_range(order)
            mine = b[n == order]
            assert mine.min() <= b0 + 26 and mine.max() >= b1 - 26, (arm, order)
        for column, poly in (("centre", ours.centre), ("edgelow", ours.edge_low),
                             ("edgeup", ours.edge_up)):
            theirs = np.array(got[f"{across}coord_{column}"])
            assert np.max(np.abs(theirs - poly(n, b))) < 1e-3, (arm, column)
        flat = got["flat"]
        assert tuple(flat["shape"]) == shape and flat["unit"] == "electron"
        assert flat["uncertainty"] == "StdDevUncertainty"
        assert flat["n_masked"] == n_flagged
        np.testing.assert_array_equal(np.array(flat["data"], np.float32), flux)
        np.testing.assert_array_equal(np.array(flat["mask"], bool), qual != 0)
        np.testing.assert_array_equal(np.array(flat["errs"], np.float32), errs)


# ---------------------------------------------------------------------- stare's input check
_STARE_INPUTS = """
    import logging, os, sys, yaml
    from astropy.io import fits
    import soxspipe
    from fundamentals.logs import addLoggingLevel
    addLoggingLevel("PRINT", logging.INFO + 5)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    workdir, frames = sys.argv[1], sys.argv[2:]
    os.chdir(workdir)
    first = fits.getheader(frames[0])
    stamp = first["DATE-OBS"][:19].replace("-", "").replace(":", "")
    sof = f"{stamp}_{first['ESO SEQ ARM'].strip()}_STARE.sof"
    with open(sof, "w") as fh:
        fh.writelines(f"{p} {t}\\n" for p, t in zip(frames[::2], frames[1::2]))
    package = os.path.dirname(soxspipe.__file__)
    settings = {}
    for name in ("advanced_settings.yaml", "xsh_default_settings.yaml"):
        settings.update(yaml.safe_load(open(os.path.join(package, name))))
    settings["workspace-root-dir"] = workdir
    from soxspipe.recipes import soxs_stare
    # __init__ verifies the input frames (arms, binning, read speed, gain, slits)
    soxs_stare(log=logging.getLogger("soxspipe"), settings=settings, inputFrames=sof,
               overwrite=True)
    print("accepted")
"""


def test_soxspipe_stare_accepts_our_products(nights, tmp_path):
    """soxspipe's stare input check (arm, binning from CDELT1/CDELT2, read speed, gain, slit)
    takes our MASTER_BIAS, MASTER_FLAT and ORDER_TAB with the night's DISP_TAB/DISP_IMAGE;
    a raw flat relabelled as the science frame stands in for one (only the check reads it)."""
    vis = nights["xsh_vis"]
    science = tmp_path / "XSH_VIS_OBJECT.fits"
    with fits.open(vis["result"].raw["FLAT"][0]) as hdul:
        hdul[0].header["HIERARCH ESO DPR CATG"] = "SCIENCE"
        hdul[0].header["HIERARCH ESO DPR TYPE"] = "OBJECT"
        hdul[0].header["HIERARCH ESO DPR TECH"] = "ECHELLE,SLIT,STARE"
        hdul.writeto(science)
    calib = vis["result"].calib
    frames = [str(science), "OBJECT_VIS", str(vis["master_bias"]), "MASTER_BIAS_VIS",
              str(vis["master_flat"]), "MASTER_FLAT_VIS", str(vis["order_tab"]),
              "ORDER_TAB_VIS", str(calib["DISP_TAB"]), "DISP_TAB_VIS",
              str(calib["DISP_IMAGE"]), "DISP_IMAGE_VIS"]
    done = _soxspipe(_STARE_INPUTS, str(tmp_path), *frames)
    assert done.returncode == 0 and "accepted" in done.stdout, done.stderr[-1500:]


# ---------------------------------------------------------------------- (b) the organiser
_PREP = """
    import sqlite3, sys
    _connect = sqlite3.connect
    def connect(*args, autocommit=None, **kwargs):
        # Python 3.11 has no autocommit argument (3.12+): the old spelling of it
        if autocommit:
            kwargs.setdefault("isolation_level", None)
        return _connect(*args, **kwargs)
    sqlite3.connect = connect
    from soxspipe.cl_utils import main
    sys.argv = ["soxspipe", "prep", "."]
    main()
"""


def _organiser_workspace(night: Path, ws: Path) -> None:
    """Copies of the night's raw frames with what soxspipe's organiser needs (module doc)."""
    from astropy.time import Time

    ws.mkdir(parents=True)
    frames = sorted((night / "raw").glob("*.fits"))
    headers = {p: fits.getheader(p) for p in frames}
    # template runs: consecutive frames of one template whose exposure number rises
    runs: list[list[Path]] = []
    last = None
    for p in sorted(frames, key=lambda p: headers[p]["MJD-OBS"]):
        h = headers[p]
        if last is None or h["ESO TPL NAME"] != last[0] or h["ESO TPL EXPNO"] <= last[1]:
            runs.append([])
        runs[-1].append(p)
        last = (h["ESO TPL NAME"], h["ESO TPL EXPNO"])
    for run in runs:
        for p in run:
            with fits.open(p) as hdul:
                h = hdul[0].header
                h["HIERARCH ESO TPL START"] = headers[run[0]]["DATE-OBS"]
                h["HIERARCH ESO TPL NEXP"] = len(run)
                h["HIERARCH ESO INS ACFW ID"] = "--"
                hdul.writeto(ws / p.name)
    flat = next(p for p in frames if headers[p]["ESO DPR TECH"] == "ECHELLE,SLIT")
    for k, (dpr_type, name) in enumerate((("LAMP,WAVE", "ARC"), ("LAMP,FLAT", "ORDERDEF"))):
        with fits.open(flat) as hdul:
            h = hdul[0].header
            mjd = h["MJD-OBS"] - 0.02 + 0.001 * k  # before the flats, as at the telescope
            when = Time(mjd, format="mjd").isot
            h["MJD-OBS"], h["DATE-OBS"], h["OBJECT"] = mjd, when, dpr_type
            h["HIERARCH ESO DPR TYPE"] = dpr_type
            h["HIERARCH ESO DPR TECH"] = "ECHELLE,PINHOLE"
            h["HIERARCH ESO TPL NAME"] = f"cal_{name}"
            h["HIERARCH ESO TPL START"] = when
            h["HIERARCH ESO TPL EXPNO"] = 1
            h["HIERARCH ESO TPL NEXP"] = 1
            hdul.writeto(ws / f"STANDIN_PINHOLE_{name}.fits")


def test_soxspipe_organiser_mflat_sof_runs_unchanged(nights, tmp_path, monkeypatch):
    nir = nights["soxs_nir"]
    ws = tmp_path / "workspace"
    _organiser_workspace(nir["night"], ws)
    (tmp_path / "home").mkdir()
    done = _soxspipe(_PREP, cwd=ws, home=tmp_path / "home")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    sofs = sorted((ws / "sof").glob("*_MFLAT_*.sof"))
    assert len(sofs) == 1, sorted(p.name for p in (ws / "sof").glob("*"))
    sof = sofs[0]
    lines = [line.split() for line in sof.read_text().splitlines() if line.strip()]
    tags = [t for _, t in lines]
    assert tags.count("LAMP,FLAT_NIR") == 5
    flats = {Path(p).name for p, t in lines if t == "LAMP,FLAT_NIR"}
    assert flats == {p.name for p in nir["result"].raw["FLAT"]}
    calibs = {t: p for p, t in lines if t != "LAMP,FLAT_NIR"}
    assert set(calibs) == {"MASTER_DARK_NIR", "ORDER_TAB_NIR"}
    # our master dark and the night's order-centre table where soxspipe's steps would be
    for tag, source in (("MASTER_DARK_NIR", nir["master_dark"]),
                        ("ORDER_TAB_NIR", nir["result"].calib["ORDER_TAB"])):
        target = ws / calibs[tag]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    text = sof.read_text()
    out = tmp_path / "ours"
    # soxs-esorex's runner in this process (as the other recipe tests call it), from the
    # workspace root: the SOF's ./reduced paths are relative to it, as soxspipe runs them
    monkeypatch.chdir(ws)
    assert esorex(["--output-dir", str(out), "soxs_mflat", str(sof.relative_to(ws))]) == 0
    assert sof.read_text() == text
    table = read_order_table(out / "order_tab_nir.fits")
    with fits.open(nir["result"].truth["order_edges"]) as hdul:
        truth = hdul[1].data
    inside = truth["inside"].astype(bool)
    n, b = truth["order"][inside].astype(float), truth["b"][inside]
    assert sorted(table.orders.tolist()) == ORDERS["soxs_nir"]
    for poly, column in ((table.edge_low, "a_low"), (table.edge_up, "a_up")):
        res = poly(n, b) - truth[column][inside]
        # issue 8's accuracy: 0.1 px RMS, 0.5 px max over the usable length
        assert np.sqrt(np.mean(res ** 2)) < 0.1 and np.max(np.abs(res)) < 0.5, column


# ---------------------------------------------------------------------- (c) the other way
ORDERS_STARE = [18, 19, 20, 21, 22, 23, 24]


def test_our_stare_reads_soxspipes_order_table(tmp_path):
    """Our soxs_stare takes the ORDER_TAB that soxspipe's own mflat wrote (``..._OLOC``,
    soxspipe's layout and degrees) and still extracts the simulated object's true electrons
    to 1 % in every order (the rest of the calibrations are the simulator's truth, so only
    the order table comes from the other pipeline).  Seven orders: soxspipe fits its edges
    with degree 6 in the order number, and on fewer orders its own reader evaluates them to
    1e9 px."""
    from astropy.table import Table

    night = tmp_path / "night"
    result = simulate_night(night, arm="xsh_vis", binning="1x1", n_bias=3, n_dark=0,
                            n_flat=5, n_science=1, n_std=0, orders=ORDERS_STARE)
    assert esorex(["--output-dir", str(reduction_dir(night, "soxs_mbias")), "soxs_mbias",
                   str(result.sofs["bias"])]) == 0
    runner = Path(__file__).parents[1] / "benchmarks" / "soxspipe_mflat_runner.py"
    work = tmp_path / "soxspipe"
    done = subprocess.run([str(SPVENV), str(runner), str(result.sofs["flat"]), str(work)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = sorted(work.glob("reduced/*/soxs-mflat/*_OLOC.fits"))
    assert theirs, done.stdout[-2000:]
    lines = [ln for ln in result.sofs["stare_truth"].read_text().splitlines()
             if not ln.split()[-1].startswith("ORDER_TAB")]
    sof = tmp_path / "stare_soxspipe_order_tab.sof"
    sof.write_text("\n".join([*lines, f"{theirs[0]} ORDER_TAB_VIS"]) + "\n")
    out = tmp_path / "stare"
    assert esorex(["--output-dir", str(out), "soxs_stare", str(sof)]) == 0
    ext = Table.read(out / "sci_slit_flux_vis_extracted_orders.fits")
    truth = Table.read(night / "truth" / "object_truth.fits")
    for n in ORDERS_STARE:
        t, rows = truth[truth["order"] == n], ext[ext["order"] == n]
        counts = dict(zip(np.asarray(t["pixel"]).tolist(), np.asarray(t["counts"]).tolist()))
        c = np.array([counts.get(int(p), np.nan) for p in rows["ycoord"]])
        ok = (rows["qual"] == 0) & np.isfinite(c) & (c > 0)
        assert ok.sum() > 0.8 * len(t), (n, int(ok.sum()), len(t))
        ratio = float(np.median(rows["extractedFluxOptimal"][ok] / c[ok]))
        assert abs(ratio - 1) < 0.01, (n, ratio)
