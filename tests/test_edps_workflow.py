"""The shipped EDPS workflows (soxs_archive.edps) against the recipes' declarations and the
SOFs of simulated nights, imported under a test double of EDPS (tests/edps_double.py)."""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import pytest
from astropy.io import fits

import edps_double
import soxs_archive.edps
from soxs_archive.catalogue import Catalogue, read_record
from soxs_archive.edps.generate import (
    WORKFLOW_PACKAGES,
    edps_keyword,
    generated_texts,
    header_keywords,
    main,
    shipped_texts,
)
from soxs_archive.plan import make_plan, validity_windows
from soxs_core.detector.instruments import ARMS, INSTRUMENT_NAMES
from soxs_core.detector.rawframe import FRAME_TYPES, frame_type_from_dpr
from soxs_core.simulate.cli import main as simulate
from soxs_recipes.framework import frames_from_sof
from soxs_recipes.registry import RECIPES

WORKFLOW_DIR = Path(soxs_archive.edps.__file__).parent
NIGHT_ARMS = ("xsh_vis", "soxs_nir")
SPECS = [module.SPEC for module in RECIPES.values()]


def _record(directory: Path) -> edps_double.Recorded:
    """What the workflow package in ``directory`` declares, imported under the double."""
    with edps_double.installed() as recorded:
        edps_double.import_workflow(directory)
        return _copy(recorded)


def _copy(recorded: edps_double.Recorded) -> edps_double.Recorded:
    return edps_double.Recorded(rules=list(recorded.rules),
                                data_sources=list(recorded.data_sources),
                                tasks=list(recorded.tasks),
                                match_rules=list(recorded.match_rules))


@pytest.fixture(scope="module")
def workflows() -> dict[str, edps_double.Recorded]:
    """What each shipped workflow declares, by instrument."""
    return {instrument: _record(WORKFLOW_DIR / package)
            for instrument, package in WORKFLOW_PACKAGES.items()}


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """One simulated night of an X-shooter VIS and a SOXS NIR arm (NIGHT/<arm>/)."""
    out = tmp_path_factory.mktemp("edps") / "night"
    assert simulate(["--arm", ",".join(NIGHT_ARMS), "--orders", "20,21", "--n-bias", "3",
                     "--n-dark", "3", "--n-flat", "5", "--n-telluric", "1", "-q",
                     str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- helpers
def _tag(association: edps_double.Association) -> set[str]:
    """Tags an association brings: its product classes, or its data source's rules."""
    rules = association.classes or association.source.rules
    return {rule.name for rule in rules}


def _tasks_taking(recorded: edps_double.Recorded, header: dict) -> list[edps_double.Task]:
    f = edps_double.HeaderFile(header)
    return [t for t in recorded.tasks if any(rule.matches(f) for rule in t.main_input.rules)]


def _raw_headers(arm, inp):
    """Headers of every (DPR TYPE, TECH) pattern whose frame type ``inp`` accepts, under
    every INSTRUME spelling of the arm's instrument."""
    spellings = [n for n, code in INSTRUMENT_NAMES.items()
                 if code == INSTRUMENT_NAMES[arm.instrument]]
    for dpr_type, dpr_tech, _ in FRAME_TYPES:
        tech = dpr_tech or "ECHELLE,SLIT"
        if inp.accepts_frame_type(frame_type_from_dpr(dpr_type, tech)):
            for instrume in spellings:
                yield {"INSTRUME": instrume, "ESO SEQ ARM": arm.name, "ESO DPR TYPE": dpr_type,
                       "ESO DPR TECH": tech}


def _runs(spec, arm):
    """The RAW inputs of each run of a recipe on an arm (the declarations' view)."""
    raw = [i for i in spec.inputs if i.group == "RAW" and arm.name in i.arms]
    return [[i] for i in raw] if spec.raw_inputs_separately else [raw]


def _task_of(recorded, spec, arm, inputs) -> edps_double.Task:
    found = {t.name: t for inp in inputs for header in _raw_headers(arm, inp)
             for t in _tasks_taking(recorded, header) if t.recipe == spec.name}
    assert len(found) == 1, f"{spec.name} {arm.code} {[i.stem for i in inputs]}: {found}"
    return next(iter(found.values()))


def _arm_runs():
    for arm in ARMS.values():
        for spec in SPECS:
            if arm in spec.accepted_arms():
                for inputs in _runs(spec, arm):
                    yield arm, spec, inputs


def _night_files(night: Path, code: str) -> list[Path]:
    return sorted((night / code / "raw").glob("*.fits")) + sorted(
        (night / code / "calib").glob("*.fits"))


def _sofs(night: Path, code: str) -> list[Path]:
    return [p for p in sorted((night / code).glob("*.sof")) if not p.stem.endswith("_truth")]


# ----------------------------------------------------------------------------- the text
def test_shipped_workflows_are_what_the_declarations_give():
    wanted, have = generated_texts(), shipped_texts()
    stale = sorted(str(p) for p in set(wanted) | set(have) if wanted.get(p) != have.get(p))
    assert not stale, f"regenerate with python -m soxs_archive.edps.generate: {stale}"


def test_a_declaration_change_changes_the_workflow(tmp_path):
    """Another match key, group key and validity window in the declarations show in what the
    regenerated workflow declares (and the shipped text is then stale)."""
    stare = RECIPES["soxs_stare"].SPEC
    mbias = RECIPES["soxs_mbias"].SPEC
    flat_input = next(i for i in stare.inputs if i.stem == "MASTER_FLAT")
    changed = dict(RECIPES)
    changed["soxs_stare"] = dataclasses.replace(stare, inputs=tuple(
        dataclasses.replace(i, match=(*i.match, "slit")) if i is flat_input else i
        for i in stare.inputs))
    changed["soxs_mbias"] = dataclasses.replace(mbias, group_by=(*mbias.group_by, "exptime"))
    texts = generated_texts(changed, validity={"MASTER_FLAT": 2})
    assert texts != shipped_texts()
    for path, text in texts.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    arm = ARMS["xsh_vis"]
    for directory, expect_change in ((tmp_path / WORKFLOW_PACKAGES["XSHOOTER"], True),
                                     (WORKFLOW_DIR / WORKFLOW_PACKAGES["XSHOOTER"], False)):
        recorded = _record(directory)
        science = _task_of(recorded, stare, arm, [stare.inputs[0]])
        flat = next(a for a in science.associations if _tag(a) == {"MASTER_FLAT_VIS"})
        slit = edps_keyword(header_keywords("slit", arm)[0])
        assert (slit in flat.match_rules.levels[0].keywords) is expect_change
        assert (flat.match_rules.levels[1].time_range.right == 2) is expect_change
        bias = _task_of(recorded, mbias, arm, [mbias.inputs[0]])
        assert ("exptime" in bias.main_input.grouping) is expect_change


def test_generate_command_checks_and_rewrites(tmp_path, capsys):
    """``--check`` names every stale file and exits 1; without it the files are rewritten
    and a stray module removed."""
    for package in WORKFLOW_PACKAGES.values():
        shutil.copytree(WORKFLOW_DIR / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    where = ["--directory", str(tmp_path)]
    assert main(["--check", *where]) == 0
    edited = tmp_path / "soxs" / "soxs_wkf.py"
    edited.write_text(edited.read_text() + "# edited by hand\n")
    stray = tmp_path / "soxs_xshooter" / "soxs_xshooter_old.py"
    stray.write_text("")
    capsys.readouterr()
    assert main(["--check", *where]) == 1
    err = capsys.readouterr().err
    assert str(edited) in err and str(stray) in err
    assert main(where) == 0
    assert not stray.exists()
    assert main(["--check", *where]) == 0
    assert shipped_texts(tmp_path) == shipped_texts()


def test_a_declaration_without_header_keywords_is_refused_in_one_line(monkeypatch, capsys):
    mbias = RECIPES["soxs_mbias"].SPEC
    monkeypatch.setitem(RECIPES, "soxs_mbias", types.SimpleNamespace(
        SPEC=dataclasses.replace(mbias, group_by=("lamp",))))
    assert main(["--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'lamp'" in err


# ----------------------------------------------------------------------------- declarations
def test_every_recipe_run_is_a_task(workflows):
    """Every frame type a recipe's RAW input takes on an arm is the main input of exactly one
    task of that recipe, and the recipe has as many tasks on the arm as runs."""
    for arm, spec, inputs in _arm_runs():
        task = _task_of(workflows[arm.instrument], spec, arm, inputs)
        assert task.recipe == spec.name
    for instrument, recorded in workflows.items():
        arms = [a for a in ARMS.values() if a.instrument == instrument]
        expected = sum(len(_runs(s, a)) for a in arms for s in SPECS if a in s.accepted_arms())
        assert len(recorded.tasks) == expected
        assert {t.recipe for t in recorded.tasks} == {s.name for s in SPECS}


def test_tasks_take_the_frame_types_the_recipes_accept(workflows):
    """A raw frame goes to the tasks of exactly the recipes whose RAW inputs accept its frame
    type (soxs_core.detector.rawframe.frame_type_from_dpr), whatever its DPR TECH."""
    for arm in ARMS.values():
        for dpr_type, dpr_tech, _ in FRAME_TYPES:
            for tech in dict.fromkeys((dpr_tech, "IMAGE", "ECHELLE,SLIT", "ECHELLE,IFU")):
                if tech is None:
                    continue
                frame_type = frame_type_from_dpr(dpr_type, tech)
                expected = {s.name for s in SPECS for i in s.inputs if i.group == "RAW"
                            and arm.name in i.arms and i.accepts_frame_type(frame_type)}
                header = {"INSTRUME": arm.instrument, "ESO SEQ ARM": arm.name,
                          "ESO DPR TYPE": dpr_type, "ESO DPR TECH": tech}
                taken = _tasks_taking(workflows[arm.instrument], header)
                assert {t.recipe for t in taken} == expected, f"{arm.code} {dpr_type} {tech}"


def test_associations_follow_the_declarations(workflows):
    """An associated input per CALIB input the organiser associates, with min_ret, max_ret,
    match keywords and validity windows from the declarations and association.yaml."""
    windows = validity_windows()
    for arm, spec, inputs in _arm_runs():
        task = _task_of(workflows[arm.instrument], spec, arm, inputs)
        wanted = {i.stem: i for i in reversed(spec.inputs)
                  if i.group == "CALIB" and arm.name in i.arms and i.associate}
        by_tag = {}
        for association in task.associations:
            (tag,) = _tag(association)
            by_tag.setdefault(tag, []).append(association)
        assert set(by_tag) == {f"{stem}_{arm.name}" for stem in wanted}, task.name
        for stem, inp in wanted.items():
            for association in by_tag[f"{stem}_{arm.name}"]:
                where = f"{task.name} {stem}"
                assert association.min_ret == (inp.min_count if inp.required else 0), where
                assert association.max_ret == inp.max_count, where
                keywords = ["instrume", "seq.arm"] + [
                    edps_keyword(k) for key in inp.match for k in header_keywords(key, arm)]
                levels = association.match_rules.levels
                assert [lv.keywords for lv in levels] == [keywords] * len(levels), where
                nights = windows.get(stem, windows["default"])
                assert levels[-1].time_range.right == max(nights, 1), where
                if isinstance(association.source, edps_double.Task):
                    producer = RECIPES[association.source.recipe].SPEC
                    assert any(o.catg == stem and not o.suffix for o in producer.outputs)
                    assert association.source is not task


def test_tasks_pass_on_their_products(workflows):
    """A task's output filter is the DFS products its recipe writes on the arm for that run."""
    for arm, spec, inputs in _arm_runs():
        task = _task_of(workflows[arm.instrument], spec, arm, inputs)
        stems = {i.stem for i in inputs}
        wanted = {o.catg_for(arm) for o in spec.outputs if o.kind in ("image", "table")
                  and o.written_for(arm) and (not o.raw_inputs or stems & set(o.raw_inputs))}
        assert {rule.name for rule in task.output_filter} == wanted, task.name


# ----------------------------------------------------------------------------- a night
@pytest.mark.parametrize("code", NIGHT_ARMS)
def test_frames_get_the_tags_of_the_nights_sofs(night, workflows, code):
    """Every raw frame and calibration table of the night gets exactly the tag its SOFs give
    it, from its own instrument's workflow and none from the other one."""
    arm = ARMS[code]
    truth: dict[str, set[str]] = {}
    for sof in _sofs(night, code):
        for path, tag in frames_from_sof(sof):
            if Path(path).parent.name in ("raw", "calib"):
                truth.setdefault(str(Path(path).resolve()), set()).add(tag)
    files = _night_files(night, code)
    assert {str(p.resolve()) for p in files} == set(truth)
    for path in files:
        f = edps_double.HeaderFile(fits.getheader(path), str(path))
        for instrument, recorded in workflows.items():
            rules = [rule.name for rule in recorded.rules if rule.matches(f)]
            expected = truth[str(path.resolve())] if instrument == arm.instrument else set()
            assert set(rules) == expected, f"{path.name} in the {instrument} workflow"
            assert len(rules) == len(expected), f"{path.name}: several rules take it"


@pytest.mark.parametrize("code", NIGHT_ARMS)
def test_grouping_and_association_give_the_nights_sofs(night, workflows, code):
    """Each SOF's raw frames are one job of one task (grouped by the recorded grouping
    keywords; the same frames a night later are other jobs), and its calibrations are what
    that task associates: every one it lists is an associated input, every associated input
    with min_ret > 0 is listed."""
    recorded = workflows[ARMS[code].instrument]
    files = [edps_double.HeaderFile(fits.getheader(p), str(p.resolve()))
             for p in (night / code / "raw").glob("*.fits")]
    jobs = [(t, {f.path for f in group}) for t in recorded.tasks
            for group in t.main_input.groups(files)]
    next_night = [edps_double.HeaderFile({**f.header, "MJD-OBS": f.header["MJD-OBS"] + 1},
                                         f.path + " next night") for f in files]
    for task in recorded.tasks:
        assert len(task.main_input.groups(files + next_night)) == 2 * len(
            task.main_input.groups(files)), f"{task.name}: nights mixed in one job"
    for sof in _sofs(night, code):
        entries = [(str(Path(p).resolve()), tag) for p, tag in frames_from_sof(sof)]
        raw = {p for p, _ in entries if Path(p).parent.name == "raw"}
        matching = [t for t, members in jobs if members == raw]
        assert len(matching) == 1, f"{sof.name}: {[t.name for t in matching]}"
        task = matching[0]
        listed = {tag for p, tag in entries if p not in raw}
        offered = {tag for a in task.associations for tag in _tag(a)}
        needed = {tag for a in task.associations if a.min_ret > 0 for tag in _tag(a)}
        assert listed <= offered, f"{sof.name}: {listed - offered} not associated"
        assert needed <= listed, f"{sof.name}: {needed - listed} required but not listed"


def _serves(keywords, wanted: edps_double.HeaderFile, offered: edps_double.HeaderFile) -> bool:
    return all(offered.get_keyword_value(k) == wanted.get_keyword_value(k) for k in keywords)


def _jobs(recorded, files, calibs):
    """Every job of the night (task, its files) and, for each, the tags of its required
    associated inputs nothing serves: no job of the associated task whose first frame (whose
    header its products inherit) has the job's values of the match keywords, or no such
    calibration file.  A job taking a product of a job that cannot run cannot run."""
    jobs, missing = [], {}
    for t in recorded.tasks:  # upstream tasks come first
        for group in t.main_input.groups(files):
            job = (t, frozenset(f.path for f in group))
            lacking = set()
            for a in t.associations:
                keywords = a.match_rules.levels[0].keywords
                if isinstance(a.source, edps_double.Task):
                    offers = [members[0] for (other, paths), members in jobs
                              if other is a.source and not missing[(other, paths)]]
                else:
                    offers = [c for c in calibs if any(r.matches(c) for r in a.source.rules)]
                if a.min_ret > 0 and not any(_serves(keywords, group[0], o) for o in offers):
                    lacking |= _tag(a)
            jobs.append((job, group))
            missing[job] = lacking
    return missing


@pytest.mark.parametrize("code", NIGHT_ARMS)
def test_the_organisers_plan_is_what_the_workflow_does(night, workflows, code, tmp_path):
    """soxs-reduce's plan of the night (soxs_archive.plan) and the workflow agree: each step
    is one job of a task of its recipe, its calibrations are that task's associated inputs
    (the required ones all there), a calibration a step takes from another step comes from
    the task whose job that step is, and the steps that cannot run are the jobs whose required
    calibrations no job or file matches."""
    recorded = workflows[ARMS[code].instrument]
    with Catalogue(tmp_path) as catalogue:
        records = catalogue.scan([night / code / "raw", night / code / "calib"])
    plan = make_plan(records, tmp_path)
    headers = {str(p.resolve()): edps_double.HeaderFile(fits.getheader(p), str(p.resolve()))
               for p in _night_files(night, code)}
    files = [f for path, f in headers.items() if Path(path).parent.name == "raw"]
    calibs = [f for path, f in headers.items() if Path(path).parent.name == "calib"]
    missing = _jobs(recorded, files, calibs)
    raw_of = {s.step_id: frozenset(str(Path(i.path).resolve()) for i in s.inputs
                                   if Path(i.path).parent.name == "raw") for s in plan.steps}
    for unused in plan.unused_frames:
        if " cannot run: " in unused.reason:
            step_id = unused.reason.split(": its step ", 1)[1].split(" ", 1)[0]
            raw_of[step_id] = raw_of.get(step_id, frozenset()) | {unused.what}
    job_of = {paths: t for t, paths in missing}
    assert set(raw_of.values()) == set(job_of), "steps and jobs differ"
    impossible = {s.what for s in plan.impossible_steps}
    assert impossible == {step for step, paths in raw_of.items()
                          if missing[(job_of[paths], paths)]}
    for step in plan.steps:
        task = job_of[raw_of[step.step_id]]
        assert task.recipe == step.recipe, step.step_id
        taken = [i for i in step.inputs if Path(i.path).parent.name != "raw"]
        for inp in taken:
            providers = [a for a in task.associations if inp.tag in _tag(a)]
            assert providers, f"{step.step_id}: {inp.tag} is no associated input"
            if inp.upstream:
                assert job_of[raw_of[inp.upstream]] in [a.source for a in providers], (
                    f"{step.step_id}: {inp.tag} of {inp.upstream}")
        needed = {tag for a in task.associations if a.min_ret > 0 for tag in _tag(a)}
        assert needed <= {i.tag for i in taken}, step.step_id


@pytest.mark.parametrize("code", NIGHT_ARMS)
def test_header_keywords_give_the_catalogues_setup(night, code):
    """The header keywords the workflow groups and matches by give the setup values the
    catalogue reads (soxs_archive.catalogue), and the double's night is the catalogue's."""
    arm = ARMS[code]
    keys = {k for s in SPECS for k in s.group_by} | {
        k for s in SPECS for i in s.inputs for k in i.match}
    for path in _night_files(night, code):
        header = fits.getheader(path)
        record = read_record(path, path.stat().st_size, path.stat().st_mtime)
        assert not record.problem
        f = edps_double.HeaderFile(header)
        assert f.get_keyword_value("night") == record.night
        for key in sorted(keys):
            values = [f.get_keyword_value(edps_keyword(k), "") for k in
                      header_keywords(key, arm)]
            if key == "binning":
                offered = "x".join(str(v) for v in values) if values else "1x1"
            elif key == "exptime":
                offered = float(values[0])
            else:  # a value the file does not state is empty in the catalogue
                offered = str(values[0])
            assert offered == getattr(record, key), f"{path.name} {key}"


@pytest.mark.parametrize("lamp", [None, "D2", "QTH"])
def test_uvb_per_lamp_flats_are_not_taken_for_the_stitched_one(workflows, tmp_path, lamp):
    """The UVB's D2 and QTH master flats and order tables share the stitched ones' PRO CATG
    (seed table 59); their ``ESO PRO FLAT LAMP`` card keeps EDPS's rule and the organiser's
    catalogue from taking them where a task asks for that PRO CATG."""
    recorded = workflows["XSHOOTER"]
    for catg in ("MASTER_FLAT_UVB", "ORDER_TAB_UVB"):
        header = fits.Header({"INSTRUME": "XSHOOTER", "HIERARCH ESO SEQ ARM": "UVB",
                              "HIERARCH ESO PRO CATG": catg, "MJD-OBS": 61365.2,
                              "HIERARCH ESO DET WIN1 BINX": 1,
                              "HIERARCH ESO DET WIN1 BINY": 1})
        if lamp:
            header["HIERARCH ESO PRO FLAT LAMP"] = lamp
        f = edps_double.HeaderFile(header, "product.fits")
        tags = {rule.name for rule in recorded.rules if rule.matches(f)}
        assert tags == (set() if lamp else {catg})
        path = tmp_path / f"{catg}_{lamp}.fits"
        fits.PrimaryHDU(header=header).writeto(path)
        record = read_record(path, path.stat().st_size, path.stat().st_mtime)
        assert (record.pro_catg == catg) is (lamp is None), record.pro_catg
