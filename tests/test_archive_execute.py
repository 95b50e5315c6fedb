"""soxs_archive.execute: the plan's graph on Dask, resumable, failures contained.

One small simulated X-shooter VIS night (2x2, two orders) is shared by every test.  Its
steps are planned here from the night's own SOFs, as the organiser plans them (product paths
moved into the steps' directories of a workspace), so that these tests measure the executor
alone.  The truth is the night reduced by hand with the soxs-esorex commands the simulator
prints: the executor must give the same pixels and QC values.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
from astropy.io import fits
from distributed import Client, LocalCluster

from soxs_archive.cli import main as reduce_main
from soxs_archive.execute import PRODUCTS_SOF, run_plan
from soxs_archive.model import Plan, Step, StepInput
from soxs_archive.plan import read_plan
from soxs_archive.summary import format_summary, run_failed, summarise, write_summary
from soxs_core.detector.instruments import get_arm
from soxs_core.simulate.night import REDUCTION_STEPS, reduction_commands, simulate_night, step_dir
from soxs_recipes.framework import file_md5, frames_from_sof
from soxs_recipes.registry import RECIPES, recipe_module

ARM = get_arm("XSHOOTER", "VIS")
NIGHT = "2026-11-22"
#: the quick steps (a few seconds together); the two soxs_stare steps take longer
CALIBRATION_SOFS = ("bias", "dark", "flat")
CALIBRATION_RECIPES = ("soxs_mbias", "soxs_mdark", "soxs_mflat")


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("execute") / "night"
    simulate_night(out, "xsh_vis", "2x2", seed=5, n_bias=3, n_dark=3, n_flat=5,
                   orders=[20, 21], write_truth=False)
    return out


def night_plan(night: Path, workspace: Path, sofs=None, raw_dir: Path | None = None,
               arm=ARM) -> Plan:
    """The night's steps as a Plan of ``workspace``: each SOF rewritten into ``W/sof`` with
    the products of earlier steps read from their step directories (``raw_dir`` replaces
    the night's raw directory)."""
    plan = Plan(workspace=str(workspace))
    producer_of: dict[Path, str] = {}  # the night's product directory -> step id
    for sof_name, recipe in REDUCTION_STEPS:
        if sofs is not None and sof_name not in sofs:
            continue
        if not (night / f"{sof_name}.sof").is_file():
            continue  # no bias on NIR
        step_id = f"{NIGHT}_{arm.name}_2x2_slow_{sof_name}_{recipe}"
        out = workspace / "reduced" / step_id
        inputs = []
        for path_text, tag in frames_from_sof(night / f"{sof_name}.sof"):
            path = Path(path_text)
            upstream = producer_of.get(path.parent, "")
            if upstream:
                path = workspace / "reduced" / upstream / path.name
            elif raw_dir is not None and path.parent == night / "raw":
                path = raw_dir / path.name
            inputs.append(StepInput(path=str(path), tag=tag, upstream=upstream))
        sof = workspace / "sof" / f"{step_id}.sof"
        sof.parent.mkdir(parents=True, exist_ok=True)
        sof.write_text("".join(f"{i.path} {i.tag}\n" for i in inputs))
        products = [(str(out / o.filename_for(arm)), o.catg_for(arm))
                    for o in recipe_module(recipe).SPEC.outputs
                    if o.kind in ("image", "table") and o.written_for(arm)
                    and (not o.raw_inputs or sof_name == "std")]
        plan.steps.append(Step(
            step_id=step_id, recipe=recipe, night=NIGHT, instrument=arm.instrument,
            arm=arm.name,
            inputs=inputs, upstream=sorted({i.upstream for i in inputs if i.upstream}),
            sof=str(sof), output_dir=str(out), products=products))
        producer_of[step_dir(night, sof_name, recipe)] = step_id
    return plan


def by_hand_dir(night: Path, step: Step) -> Path:
    sof_name = step.step_id.split("_")[-3]
    return step_dir(night, sof_name, step.recipe)


def fits_products(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(directory.glob("*.fits"))}


def qc_cards(path: Path) -> dict:
    header = fits.getheader(path)
    return {k: header[k] for k in header if k.startswith("ESO QC ")}


def assert_same_product(ours: Path, truth: Path) -> None:
    """Same data in every HDU and the same QC values."""
    with fits.open(ours) as a, fits.open(truth) as b:
        assert [h.name for h in a] == [h.name for h in b]
        for ha, hb in zip(a, b):
            if ha.data is None:
                assert hb.data is None
            elif isinstance(ha, fits.BinTableHDU):
                assert ha.columns.names == hb.columns.names, ours
                for name in ha.columns.names:
                    assert np.array_equal(ha.data[name], hb.data[name], equal_nan=True), \
                        f"{ours} {ha.name} {name}"
            else:
                assert np.array_equal(ha.data, hb.data, equal_nan=True), f"{ours} {ha.name}"
    assert qc_cards(ours) == qc_cards(truth) != {}


def mtimes(plan: Plan) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for s in plan.steps
            for p in Path(s.output_dir).glob("*") if p.suffix in (".fits", ".pdf")}


def temporaries(workspace: Path) -> list[Path]:
    return [p for p in workspace.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def full_run(night, tmp_path_factory):
    """The whole night run by the executor (its own LocalCluster), while the same night is
    reduced by hand with the simulator's soxs-esorex commands."""
    sofs = {name: night / f"{name}.sof" for name, _ in REDUCTION_STEPS}
    by_hand = subprocess.Popen(
        ["bash", "-c", " && ".join(reduction_commands(night, sofs, RECIPES))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workspace = tmp_path_factory.mktemp("full") / "W"
    plan = night_plan(night, workspace)
    try:
        results = run_plan(plan, n_workers=2, memory_limit="2GiB", progress=None)
    finally:
        _, errors = by_hand.communicate(timeout=600)
    assert by_hand.returncode == 0, errors
    return plan, results


def test_full_run_gives_the_products_and_qc_of_the_steps_run_by_hand(full_run, night):
    plan, results = full_run
    assert [(r.step_id, r.status, r.reason) for r in results] == \
        [(s.step_id, "done", "") for s in plan.steps]
    for step, result in zip(plan.steps, results):
        ours, truth = fits_products(Path(step.output_dir)), fits_products(
            by_hand_dir(night, step))
        assert ours.keys() == truth.keys() and ours
        assert sorted(result.products) == sorted(str(p) for p in ours.values())
        for name in ours:
            assert_same_product(ours[name], truth[name])
        truth_qc = [qc_cards(truth[name]) for name in sorted(truth)]
        assert set(result.qc) == {k[len("ESO QC "):] for cards in truth_qc for k in cards
                                  if not k.startswith(("ESO QC NFAIL", "ESO QC FAIL"))}
        for name, value in result.qc.items():
            assert value == next(c[f"ESO QC {name}"] for c in truth_qc
                                 if f"ESO QC {name}" in c), (step.step_id, name)
        assert [Path(p).name for p in result.plots] == sorted(
            p.name for p in by_hand_dir(night, step).glob("*.pdf"))
        assert result.seconds > 0 and result.peak_rss_mib > 50 and result.worker
        assert (Path(step.output_dir) / f"{step.step_id}.log").stat().st_size > 0


def test_products_record_the_md5_of_each_input_file(full_run):
    plan, results = full_run
    for step, result in zip(plan.steps, results):
        wanted = {file_md5(i.path) for i in step.inputs}
        for product in result.products:
            with fits.open(product) as hdul:
                hdul.verify("exception")  # the new cards are valid FITS
                header = hdul[0].header
            names = {k[:-len(" NAME")] for k in header
                     if k.startswith("ESO PRO REC1 ") and k.endswith(" NAME")
                     and ("RAW" in k or "CAL" in k)}
            assert names and {header[f"{n} MD5"] for n in names} == wanted, product


def test_rerun_skips_every_step_and_touches_nothing(full_run):
    plan, results = full_run
    before = mtimes(plan)
    again = run_plan(plan, n_workers=2, progress=None)
    assert [(r.status, r.reason) for r in again] == [("skipped", "up to date")] * len(plan.steps)
    assert [r.products for r in again] == [r.products for r in results]
    assert [r.qc for r in again] == [r.qc for r in results]
    assert mtimes(plan) == before


def test_a_nir_flat_made_with_lamp_off_frames_is_up_to_date_on_a_rerun(tmp_path):
    """The lamp-off frames are inputs of the NIR master flat: its processing record names
    them, so a rerun finds the product current (it used to redo the flat and all below)."""
    night = tmp_path / "nir"
    simulate_night(night, "xsh_nir", seed=3, n_dark=3, n_flat=5, orders=[15, 16],
                   write_truth=False)
    plan = night_plan(night, tmp_path / "W", sofs=("dark", "flat"),
                      arm=get_arm("XSHOOTER", "NIR"))
    flat = plan.steps[-1]
    lamp = [fits.getheader(i.path).get("HIERARCH ESO INS LAMP1 ST") for i in flat.inputs
            if i.tag == "LAMP_FLAT_NIR"]
    assert flat.recipe == "soxs_mflat" and len(lamp) == 10  # 5 lamp-on, 5 lamp-off
    first = run_plan(plan, n_workers=1, progress=None)
    assert [r.status for r in first] == ["done"] * len(plan.steps), [r.reason for r in first]
    header = fits.getheader(flat.products[0][0])
    recorded = {header[k] for k in header if k.startswith("ESO PRO REC1 ") and
                k.endswith(" MD5")}
    assert recorded == {file_md5(i.path) for i in flat.inputs}
    again = run_plan(plan, n_workers=1, progress=None)
    assert [(r.status, r.reason) for r in again] == [("skipped", "up to date")] * len(plan.steps)


def test_summary_table_json_and_html(full_run, capsys):
    plan, results = full_run
    summary = summarise(plan, results)
    text = format_summary(summary)
    row = next(line.split() for line in text.splitlines() if line.startswith(NIGHT))
    products = sum(len(r.products) for r in results)
    assert row == [NIGHT, "VIS", str(len(plan.steps)), "0", "0", "0", str(products), "0"]
    json_path, html_path = write_summary(summary, plan.workspace)
    data = json.loads(json_path.read_text())
    assert data["totals"] == {"done": len(plan.steps), "skipped": 0, "failed": 0,
                              "blocked": 0}
    page = html_path.read_text()
    plots = [p for r in results for p in r.plots]
    assert plots
    for plot in plots:
        relative = os.path.relpath(plot, plan.workspace)
        assert f'href="{relative}"' in page and not relative.startswith((".", "/"))
    assert not run_failed(results)


# ------------------------------------------------------------------------- soxs-reduce
@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two one-thread workers, reached by its tcp:// address; a task whose
    worker dies is given to another worker once."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=50,
                          memory_limit="2GiB") as local:
            with Client(local) as client:
                yield local.scheduler_address, client


def linked_night(night: Path, directory: Path, kinds=None) -> list[str]:
    """Directories of hard links to the night's raw frames (those whose name has one of
    ``kinds``) and calibration tables: the RAWDIR arguments of soxs-reduce."""
    for sub in ("raw", "calib"):
        (directory / sub).mkdir(parents=True)
        for path in sorted((night / sub).glob("*.fits")):
            if sub == "calib" or kinds is None or any(k in path.name for k in kinds):
                os.link(path, directory / sub / path.name)
    return [str(directory / "raw"), str(directory / "calib")]


def reduce_command(rawdirs: list[str], workspace: Path, *options: str) -> tuple[int, str]:
    """``soxs-reduce`` in this process: exit status and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = reduce_main([*rawdirs, "--workspace", str(workspace), *options])
    return status, out.getvalue()


def kill_worker_running(client: Client, step_id: str, killed: list[str]) -> None:
    """SIGKILL the worker process running ``step_id``, once, soon after it started it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for worker, keys in client.processing().items():
            if any(str(key).startswith(step_id) for key in keys):
                time.sleep(0.5)  # into the recipe
                psutil.Process(client.run(os.getpid, workers=[worker])[worker]).kill()
                killed.append(worker)
                return
        time.sleep(0.05)


def statuses(workspace: Path) -> dict[str, tuple[str, str]]:
    summary = json.loads((workspace / "summary.json").read_text())
    return {s["step_id"]: (s["recipe"], s["status"]) for g in summary["groups"]
            for s in g["steps"]}


@pytest.fixture(scope="module")
def resumed(night, cluster, tmp_path_factory):
    """soxs-reduce on the night's calibration frames, killed (with its LocalCluster) as soon
    as the first step's products are there, then run again on the test's cluster, whose
    worker running the flat step is killed meanwhile."""
    base = tmp_path_factory.mktemp("resume")
    rawdirs, workspace = linked_night(night, base, ("BIAS", "DARK", "FLAT")), base / "W"
    command = [str(Path(sys.executable).parent / "soxs-reduce"), *rawdirs, "--workspace",
               str(workspace), "--workers", "2", "--memory-limit", "2GiB"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while (not list(workspace.glob(f"reduced/*/{PRODUCTS_SOF}")) and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.02)
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for member in family:
        member.kill()
    psutil.wait_procs(family, timeout=30)
    errors = proc.communicate()[1]
    finished = {p.parent.name for p in workspace.glob(f"reduced/*/{PRODUCTS_SOF}")}
    assert len(finished) == 1, errors
    killed_state = {"finished": finished, "mtimes": mtimes(read_plan(workspace / "plan.json"))}

    address, client = cluster
    flat = next(s for s in read_plan(workspace / "plan.json").steps if s.recipe == "soxs_mflat")
    killed: list[str] = []
    killer = threading.Thread(target=kill_worker_running, args=(client, flat.step_id, killed))
    killer.start()
    status, printed = reduce_command(rawdirs, workspace, "--scheduler", address)
    killer.join()
    return dict(rawdirs=rawdirs, workspace=workspace, status=status, printed=printed,
                killed=killed, flat=flat.step_id, **killed_state)


def test_a_killed_command_resumes_with_nothing_redone_and_nothing_lost(resumed, full_run):
    workspace = resumed["workspace"]
    assert resumed["status"] == 0
    done = statuses(workspace)
    assert {s for s, (_, v) in done.items() if v == "skipped"} == resumed["finished"]
    assert {v for s, (_, v) in done.items() if s not in resumed["finished"]} == {"done"}
    plan = read_plan(workspace / "plan.json")
    after = mtimes(plan)
    kept = {p: t for p, t in resumed["mtimes"].items()
            if Path(p).parent.name in resumed["finished"]}
    assert kept and all(after[p] == t for p, t in kept.items())
    reference = {s.recipe: s for s in full_run[0].steps}
    assert sorted(s.recipe for s in plan.steps) == sorted(CALIBRATION_RECIPES)
    for step in plan.steps:  # nothing lost: every product, as the uninterrupted run made it
        ours = fits_products(Path(step.output_dir))
        truth = fits_products(Path(reference[step.recipe].output_dir))
        assert ours.keys() == truth.keys() and ours
        for name in ours:
            assert_same_product(ours[name], truth[name])
    assert temporaries(workspace) == []
    assert f"{plan.steps[0].night}  VIS    2        1" in resumed["printed"]  # the table


def test_a_dead_worker_costs_its_step_a_retry_on_another_worker(resumed):
    assert len(resumed["killed"]) == 1
    summary = json.loads((resumed["workspace"] / "summary.json").read_text())
    flat = next(s for g in summary["groups"] for s in g["steps"]
                if s["step_id"] == resumed["flat"])
    assert flat["status"] == "done" and flat["worker"] != resumed["killed"][0]


def test_a_changed_parameter_or_input_reruns_the_step(resumed, cluster):
    workspace, address = resumed["workspace"], cluster[0]
    plan = read_plan(workspace / "plan.json")
    by_recipe = {s.recipe: s for s in plan.steps}
    dark = by_recipe["soxs_mdark"]
    dark.params = {"frame-clipping-sigma": 4.0}
    before = mtimes(plan)
    results = {r.step_id: r for r in run_plan(plan, scheduler=address, progress=None)}
    assert {s.recipe: results[s.step_id].status for s in plan.steps} == {
        "soxs_mbias": "skipped", "soxs_mdark": "done", "soxs_mflat": "skipped"}
    header = fits.getheader(results[dark.step_id].products[0])
    recorded = {header[k]: header[k.replace("NAME", "VALUE")] for k in header
                if k.startswith("ESO PRO REC1 PARAM") and k.endswith("NAME")}
    assert float(recorded["frame-clipping-sigma"]) == 4.0
    again = run_plan(plan, scheduler=address, progress=None)
    assert {r.status for r in again} == {"skipped"}

    # a flat's bytes change (a header card): soxs-reduce runs that step again, and only it
    flat = Path(resumed["rawdirs"][0]) / sorted(
        p.name for p in Path(resumed["rawdirs"][0]).glob("*FLAT*"))[0]
    copy = flat.read_bytes()
    flat.unlink()  # a hard link to the shared night: replaced by a file of its own
    flat.write_bytes(copy)
    with fits.open(flat, mode="update") as hdul:
        hdul[0].header["OBSERVER"] = "someone else"
    before = mtimes(plan)
    status, _ = reduce_command(resumed["rawdirs"], workspace, "--scheduler", address)
    assert status == 0
    assert {recipe: v for recipe, v in statuses(workspace).values()} == {
        "soxs_mbias": "skipped", "soxs_mdark": "done", "soxs_mflat": "done"}
    after = mtimes(plan)
    flat_dir = by_recipe["soxs_mflat"].step_id
    assert all(after[p] > t for p, t in before.items() if flat_dir in p)
    assert all(after[p] == t for p, t in before.items()
               if by_recipe["soxs_mbias"].step_id in p)


def test_a_failing_step_blocks_its_descendants_only(night, cluster, tmp_path):
    rawdirs = linked_night(night, tmp_path)
    order_table = Path(rawdirs[1]) / "ORDER_TAB_VIS.fits"
    order_table.unlink()  # corrupted: an order-centre table that lacks a coefficient
    with fits.open(night / "calib" / order_table.name) as hdul:
        columns = [c for c in hdul[1].columns if c.name != "cent_00"]
        fits.HDUList([hdul[0].copy(), fits.BinTableHDU.from_columns(
            columns, header=hdul[1].header), hdul[2].copy()]).writeto(order_table)
    workspace = tmp_path / "W"
    status, printed = reduce_command(rawdirs, workspace, "--scheduler", cluster[0])
    assert status == 1
    summary = json.loads((workspace / "summary.json").read_text())
    steps = {s["recipe"] + ("_std" if "STD" in s["step_id"] else ""): s
             for g in summary["groups"] for s in g["steps"]}
    flat = steps["soxs_mflat"]
    assert flat["status"] == "failed" and "\n" not in flat["reason"]
    assert str(order_table) in flat["reason"] and "cent_00" in flat["reason"]
    assert f"{flat['step_id']}: {flat['reason']}" in printed
    for name in ("soxs_mbias", "soxs_mdark"):  # its siblings' products, complete
        assert steps[name]["status"] == "done" and steps[name]["products"]
        for product in steps[name]["products"]:
            fits.open(workspace / product).verify("exception")
    for name in ("soxs_stare_std", "soxs_stare"):
        assert steps[name]["status"] == "blocked"
        assert steps[name]["reason"] == f"upstream {flat['step_id']} failed: {flat['reason']}"
    assert not (workspace / "reduced" / flat["step_id"] / PRODUCTS_SOF).exists()
    assert temporaries(workspace) == []


def test_dry_run_prints_the_plan_and_runs_nothing(night, tmp_path):
    rawdirs = linked_night(night, tmp_path, ("BIAS",))
    status, printed = reduce_command(rawdirs, tmp_path / "W", "--dry-run")
    step = read_plan(tmp_path / "W" / "plan.json").steps[0]
    assert status == 0 and step.step_id in printed
    assert not Path(step.output_dir).exists() and Path(step.sof).is_file()


@pytest.mark.parametrize("options, status, message", [
    (["--workers", "0"], 2, "--workers 0: at least 1"),
    (["--scheduler", "localhost:8786"], 2, "expected tcp://HOST:PORT"),
    (["--scheduler", "tcp://h:1", "--workers", "2"], 2, "an existing cluster"),
    (["--memory-limit", "lots"], 2, "expected a size"),
    (["--validity", "MASTER_FLAT"], 2, "expected CATG=NIGHTS"),
])
def test_a_bad_command_line_is_refused_in_one_line(tmp_path, capsys, options, status, message):
    with pytest.raises(SystemExit) as stop:
        reduce_main([str(tmp_path), "--workspace", str(tmp_path / "W"), *options])
    assert stop.value.code == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_directory_is_refused_in_one_line(tmp_path, capsys):
    assert reduce_main([str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "W")]) == 1
    assert capsys.readouterr().err == \
        f"soxs-reduce: ERROR: {tmp_path / 'nowhere'}: directory not found\n"
