"""The plan against what the simulators know: steps, calibration associations and the reasons
for frames and steps left out (archive truth manifest), SOFs equivalent to a night's hand
SOFs and run unchanged."""

from __future__ import annotations

import dataclasses
import re
from datetime import date, timedelta
from pathlib import Path

import pytest

from archive_data import hand_night, small_archive
from soxs_archive.catalogue import Catalogue
from soxs_archive.plan import format_plan, make_plan, read_plan, validity_windows, write_sofs
from soxs_recipes import runner
from soxs_recipes.registry import RECIPES

HAND_SOFS = ("bias.sof", "dark.sof", "flat.sof", "std.sof", "stare.sof")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return small_archive(tmp_path_factory)


@pytest.fixture(scope="module")
def records(archive, tmp_path_factory):
    with Catalogue(tmp_path_factory.mktemp("catalogue")) as catalogue:
        return catalogue.scan([archive.outdir])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def plan(records, workspace):
    plan = make_plan(records, workspace)
    write_sofs(plan)
    return plan


def _abs(archive, relative: str) -> str:
    return str((archive.outdir / relative).resolve())


def _raw_paths(step) -> frozenset[str]:
    return frozenset(i.path for i in step.inputs if not i.upstream and "/raw/" in i.path)


def _key(recipe, night, arm, raw) -> tuple:
    return recipe, night, arm, frozenset(raw)


def _truth_keys(archive, steps) -> dict[tuple, dict]:
    return {_key(s["recipe"], s["night"], s["arm"], (_abs(archive, r["path"]) for r in s["raw"])):
            s for s in steps}


@pytest.fixture(scope="module")
def matched(archive, plan):
    """truth step key -> planned step, matched by recipe, night, arm and raw files."""
    truth = _truth_keys(archive, archive.steps)
    planned = {_key(s.recipe, s.night, s.arm, _raw_paths(s)): s for s in plan.steps}
    assert set(planned) == set(truth)
    return {truth[k]["key"]: planned[k] for k in truth}


def test_the_steps_are_the_truths_with_their_tags(archive, matched):
    for step in archive.steps:
        planned = matched[step["key"]]
        raw = sorted((i.path, i.tag) for i in planned.inputs if i.path in _raw_paths(planned))
        assert raw == sorted((_abs(archive, r["path"]), r["tag"]) for r in step["raw"])
        for key, value in step["setup"].items():
            assert planned.setup[key] == value, (step["key"], key)


def test_every_calibration_is_the_truths_with_its_reason(archive, matched):
    for step in archive.steps:
        planned = matched[step["key"]]
        calibs = [i for i in planned.inputs if i.path not in _raw_paths(planned)]
        assert sorted(i.tag for i in calibs) == sorted(c["tag"] for c in step["calibrations"])
        for truth in step["calibrations"]:
            chosen = next(i for i in calibs if i.tag == truth["tag"])
            if "step" in truth:
                upstream = matched[truth["step"]]
                assert chosen.upstream == upstream.step_id
                assert (chosen.path, chosen.tag) in upstream.products
                assert upstream.step_id in planned.upstream
                expected = ("same night" if truth["same_night"] else
                            f"nearest night {truth['night']}")
                assert f"from step {upstream.step_id} ({expected}" in chosen.reason
            else:
                assert chosen.path == _abs(archive, truth["path"]) and not chosen.upstream
                assert f"PRO CATG {truth['tag']} among the inputs" in chosen.reason


def test_unused_files_and_impossible_steps_have_the_truths_reasons(archive, plan):
    unused = {u.what: u.reason for u in plan.unused_frames}
    problems = {_abs(archive, f["path"]): f for f in archive.files if f["problem_kind"]}
    assert set(unused) == set(problems)
    for path, reason in unused.items():
        assert reason.startswith(f"{path}: ")
        kind = problems[path]["problem_kind"]
        if kind == "no calibration":
            assert " cannot run: no MASTER_BIAS_VIS (binning 2x2" in reason
        else:
            assert {"other instrument": "FORS2", "truncated": "truncated",
                    "duplicate": "duplicate of"}[kind] in reason
    assert len(plan.impossible_steps) == len(archive.impossible_steps)
    for truth, impossible in zip(archive.impossible_steps, plan.impossible_steps):
        assert f"_{truth['setup']['binning']}_" in impossible.what
        named = set(re.findall(r"no ([A-Z_]+_VIS) \(", impossible.reason))
        required = {f"{i.stem}_VIS" for i in RECIPES[truth["recipe"]].SPEC.inputs
                    if i.group == "CALIB" and i.required and "VIS" in i.arms}
        assert named == set(truth["missing"]) & required and "MASTER_BIAS_VIS" in named


def test_steps_come_after_their_upstream_steps_and_have_file_name_ids(plan):
    seen = set()
    for step in plan.steps:
        assert set(step.upstream) <= seen
        assert re.fullmatch(r"[A-Za-z0-9._+-]+", step.step_id)
        code = {"XSHOOTER": "XSH", "SOXS": "SOXS"}[step.instrument]
        assert step.step_id.startswith(f"{step.night}_{code}_{step.arm}_")
        assert step.step_id.endswith(step.recipe) and step.step_id not in seen
        seen.add(step.step_id)


def test_sofs_and_plan_json_are_written(plan, workspace):
    for step in plan.steps:
        lines = Path(step.sof).read_text().splitlines()
        assert lines == [f"{i.path} {i.tag}" for i in step.inputs]
        raw = [Path(i.path).is_absolute() and i.path in _raw_paths(step) for i in step.inputs]
        assert raw == sorted(raw, reverse=True)  # raw frames first
        assert Path(step.sof).parent == workspace / "sof"
        assert Path(step.output_dir) == workspace / "reduced" / step.step_id
    assert sorted(p.name for p in (workspace / "sof").iterdir()) == sorted(
        f"{s.step_id}.sof" for s in plan.steps)
    assert read_plan(workspace / "plan.json") == plan


def test_format_plan_shows_each_choice_and_reason(plan):
    text = format_plan(plan)
    for step in plan.steps:
        assert step.step_id in text
        for i in step.inputs:
            assert i.reason in text and i.path in text
    for unplanned in plan.unused_frames + plan.impossible_steps:
        assert unplanned.reason in text


def _night_of_truth(archive, step_key: str) -> str:
    return next(s["night"] for s in archive.steps if s["key"] == step_key)


def test_a_shorter_validity_makes_borrowing_steps_impossible(archive, records, matched,
                                                             tmp_path):
    narrow = make_plan(records, tmp_path, validity={"MASTER_FLAT": 0, "ORDER_TAB": 0})
    borrowing = {matched[s["key"]].step_id for s in archive.steps
                 if any(c["tag"] == "ORDER_TAB_VIS" and not c["same_night"]
                        for c in s["calibrations"])}
    assert borrowing
    impossible = {u.what: u.reason for u in narrow.impossible_steps}
    assert borrowing <= set(impossible)
    for step_id in borrowing:
        assert "no ORDER_TAB_VIS (binning 1x1, readout 1pt/100k/hg; validity 0 nights)" \
            in impossible[step_id]
    assert {s.step_id for s in narrow.steps} == {s.step_id for s in matched.values()} - borrowing
    assert validity_windows({"ORDER_TAB": 0})["ORDER_TAB"] == 0


def _moved(record, days: int):
    night = (date.fromisoformat(record.night) + timedelta(days=days)).isoformat()
    return dataclasses.replace(record, night=night, mjd=record.mjd + days)


def test_a_step_that_cannot_run_blocks_the_steps_needing_its_products(records, tmp_path):
    flats_moved = [_moved(r, 3) if r.frame_type == "FLAT" else r for r in records]
    plan = make_plan(flats_moved, tmp_path, validity={"MASTER_BIAS": 1})
    impossible = {u.what: u.reason for u in plan.impossible_steps}
    mflat = [i for i in impossible if i.endswith("soxs_mflat")]
    assert len(mflat) == 1 and impossible[mflat[0]].startswith("no MASTER_BIAS_VIS")
    stares = [i for i in impossible if i.endswith("soxs_stare") and "_1x1_" in i]
    assert len(stares) == 4
    for step_id in stares:
        assert impossible[step_id] == (f"needs ORDER_TAB_VIS of step {mflat[0]}, which cannot "
                                       f"run ({impossible[mflat[0]]})")
    assert {s.recipe for s in plan.steps} == {"soxs_mbias", "soxs_mdark"}


def test_too_few_frames_make_no_step_and_the_night_borrows(records, tmp_path):
    bias_spec = RECIPES["soxs_mbias"].SPEC.inputs[0]
    night2 = sorted(r.night for r in records if r.night)[-1]
    biases = [r for r in records if r.frame_type == "BIAS" and r.night == night2]
    plan = make_plan([r for r in records if r is not biases[0]], tmp_path)
    unused = {u.what: u.reason for u in plan.unused_frames}
    for record in biases[1:]:
        assert (f"{len(biases) - 1} BIAS_VIS frame(s) of {night2} XSHOOTER VIS (binning 1x1, "
                f"readout 1pt/100k/hg): soxs_mbias needs at least {bias_spec.min_count}") \
            in unused[record.path]
    assert not [s for s in plan.steps if s.recipe == "soxs_mbias" and s.night == night2]
    for step in plan.steps:
        if step.night == night2 and step.recipe != "soxs_mbias":
            bias = next(i for i in step.inputs if i.tag == "MASTER_BIAS_VIS")
            assert "nearest night" in bias.reason and night2 not in bias.upstream


def test_frames_no_recipe_takes_say_why(records, tmp_path):
    bias = next(r for r in records if r.frame_type == "BIAS" and not r.problem)
    odd = [dataclasses.replace(bias, path="/x/wave.fits", frame_type="WAVE"),
           dataclasses.replace(bias, path="/x/sky.fits", frame_type="", dpr_type="SKY"),
           dataclasses.replace(bias, path="/x/nir_bias.fits", arm="NIR")]
    unused = {u.what: u.reason for u in make_plan(odd, tmp_path).unused_frames}
    assert unused["/x/wave.fits"] == "/x/wave.fits: no recipe takes WAVE frames"
    assert "DPR TYPE 'SKY'" in unused["/x/sky.fits"] and "no frame type" in unused[
        "/x/sky.fits"]
    assert unused["/x/nir_bias.fits"] == ("/x/nir_bias.fits: soxs_mbias takes no BIAS frames "
                                          "of the NIR arm")


# ---------------------------------------------------------------------- the hand SOFs
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return hand_night(tmp_path_factory)


@pytest.fixture(scope="module")
def night_plan(night, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("night_workspace")
    with Catalogue(workspace) as catalogue:
        records = catalogue.scan([night / "raw", night / "calib"])
    plan = make_plan(records, workspace)
    write_sofs(plan)
    return plan


def _sof(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]


def test_the_sofs_are_the_nights_hand_sofs(night, night_plan):
    assert not night_plan.unused_frames and not night_plan.impossible_steps
    assert len(night_plan.steps) == len(HAND_SOFS)
    for name in HAND_SOFS:
        hand = _sof(night / name)
        raw = {p for p, _ in hand if Path(p).parent == night / "raw"}
        step, = [s for s in night_plan.steps if _raw_paths(s) == raw]
        ours = _sof(Path(step.sof))
        assert sorted(t for _, t in ours) == sorted(t for _, t in hand), name
        assert [p for p, _ in ours[:len(raw)]] == [p for p, _ in hand[:len(raw)]]
        calib_dir = night / "calib"
        assert {p for p, _ in ours if Path(p).parent == calib_dir} == {
            p for p, _ in hand if Path(p).parent == calib_dir}


def test_the_planned_sofs_run_unchanged(night_plan):
    for recipe in ("soxs_mbias", "soxs_mdark"):  # mdark reads mbias's planned product
        step, = [s for s in night_plan.steps if s.recipe == recipe]
        assert runner.run(["--output-dir", step.output_dir, recipe, step.sof]) == 0
        for path, _ in step.products:
            assert Path(path).is_file()


def _usable(records, frame_type: str):
    return [r for r in records if r.frame_type == frame_type and not r.problem
            and r.binning == "1x1"]


def test_templates_make_separate_steps_named_by_their_first_frame(records, tmp_path):
    science = _usable(records, "OBJECT")[0]
    later = dataclasses.replace(science, path=science.path + ".later.fits",
                                mjd=science.mjd + 1 / 24, template="2026-11-22T02:00:00")
    plan = make_plan([r for r in records if r.path != science.path] + [science, later],
                     tmp_path)
    steps = [s for s in plan.steps if _raw_paths(s) & {science.path, later.path}]
    assert [_raw_paths(s) for s in steps] == [{science.path}, {later.path}]
    first, second = (s.step_id for s in steps)
    assert first.rsplit("_", 1)[0] == second.rsplit("_", 1)[0]
    assert re.fullmatch(r"T\d{6}", first.rsplit("_", 1)[1]) and first != second


def test_raw_inputs_of_a_stare_step_are_never_mixed(records, tmp_path):
    science, standard = _usable(records, "OBJECT")[0], _usable(records, "STD_FLUX")[0]
    alike = dataclasses.replace(standard, night=science.night, exptime=science.exptime,
                                template=science.template)
    plan = make_plan([science, alike], tmp_path)
    impossible = [u.what for u in plan.impossible_steps]  # no calibrations were given
    assert len(impossible) == 2 and any("_OBJECT_" in w for w in impossible) and any(
        "_STD_FLUX_" in w for w in impossible)


def _with_exptime(records, exptime: float, suffix: str):
    return [dataclasses.replace(r, path=r.path + suffix, exptime=exptime) for r in records]


def test_flats_of_two_exposure_times_make_one_step_each(records, tmp_path):
    flats = _usable(records, "FLAT")
    night = flats[0].night
    flats = [r for r in flats if r.night == night]
    longer = _with_exptime(flats, flats[0].exptime * 2, ".long.fits")
    plan = make_plan([*records, *longer], tmp_path)
    steps = [s for s in plan.steps if s.recipe == "soxs_mflat" and _raw_paths(s) & {
        r.path for r in flats + longer}]
    assert sorted(_raw_paths(s) for s in steps) == sorted(
        [frozenset(r.path for r in flats), frozenset(r.path for r in longer)], key=sorted)
    assert len({s.step_id for s in steps}) == 2
    assert {s.step_id.removesuffix("_soxs_mflat").rsplit("_", 1)[-1] for s in steps} == {
        f"{flats[0].exptime:g}s", f"{longer[0].exptime:g}s"}
    # each set calibrated, each stare step of the night still finds one master flat
    assert not [u for u in plan.impossible_steps if "soxs_mflat" in u.what]
    # a set too small for a step is left out with its reason; the full set still runs
    few = longer[:2]
    plan = make_plan([*records, *few], tmp_path / "few")
    unused = {u.what: u.reason for u in plan.unused_frames}
    assert all("soxs_mflat needs at least 5" in unused[r.path] for r in few)
    assert all(r.path not in unused for r in flats)


def test_nir_lamp_off_frames_join_the_lamp_on_set_of_their_exposure_time(tmp_path):
    from soxs_archive.model import FrameRecord

    def frame(name, frame_type, exptime):
        return FrameRecord(path=f"/x/{name}.fits", instrument="XSHOOTER", arm="NIR",
                           night="2026-11-22", mjd=61000.0 + len(name) / 1e4,
                           frame_type=frame_type, dpr_type="FLAT,LAMP", exptime=exptime,
                           binning="1x1", readout="", slit="0.9")

    on = [frame(f"on{t}_{k}", "FLAT", t) for t in (5.0, 10.0) for k in range(5)]
    off = [frame(f"off{t}_{k}", "FLAT_OFF", t) for t in (5.0, 10.0, 20.0) for k in range(5)]
    plan = make_plan([*on, *off], tmp_path)
    planned = [s for s in plan.steps if s.recipe == "soxs_mflat"]
    assert sorted(sorted(i.path for i in s.inputs) for s in planned) == sorted(
        sorted(r.path for r in (*on, *off) if r.exptime == t) for t in (5.0, 10.0))
    unused = {u.what: u.reason for u in plan.unused_frames}
    for record in off[10:]:
        assert unused[record.path] == (f"{record.path}: no LAMP_FLAT frames of its exposure "
                                       f"time (20 s) in 2026-11-22 XSHOOTER NIR (binning 1x1, "
                                       f"readout (none), slit 0.9)")
