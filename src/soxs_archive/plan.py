"""The plan: catalogued frames grouped into recipe runs, calibrations associated, SOFs written.

Everything here follows the recipes' declarations (:mod:`soxs_recipes.framework`), looping over
:data:`soxs_recipes.registry.RECIPES`; no recipe is named in this module.

- Recipes are planned in the order their products are needed: a recipe making a catg that
  another one takes as a CALIB input (``OutputSpec.catg == InputSpec.stem``) comes first.
- A recipe's raw frames (the RAW inputs accepting their frame type) are grouped by night,
  instrument, arm and ``RecipeSpec.group_by``; with ``raw_inputs_separately`` every RAW
  input makes its own steps.  A group with fewer frames of an input than its ``min_count``, or
  without a required RAW input, is no step: its frames are unused, with the reason.
- Every CALIB input of the step's arm (``associate`` true) is looked for, among calibrations
  of the same instrument and arm sharing the input's ``match`` keys (a value a calibration does
  not state matches anything): first the products of the steps planned before it (same
  night, else the nearest night within the validity window of the catg), then the files
  found among the inputs by PRO CATG (same rule).  A step never takes a catg it makes itself
  from another step (a flux standard derives its own response, a master flat traces its own
  edges) but may take it from the inputs.  A required calibration that cannot be found makes
  the step impossible, and so every step that would take its products.
- The validity windows (nights either side) are ``calib/static/association.yaml``'s,
  overridden by ``validity``.

Usage (engineer B's ``soxs-reduce``)::

    from soxs_archive.catalogue import Catalogue
    from soxs_archive.plan import format_plan, make_plan, write_sofs

    catalogue = Catalogue(workspace)                    # W/catalogue.sqlite
    records = catalogue.scan(raw_dirs)                  # list[FrameRecord]; catalogue.counts
    plan = make_plan(records, workspace, validity={"MASTER_FLAT": 3})   # -> Plan
    write_sofs(plan)                                    # W/sof/<step_id>.sof, W/plan.json
    print(format_plan(plan))                            # the --dry-run text
    for step in plan.steps:                             # upstream steps come first
        ...  # soxs-esorex --output-dir step.output_dir step.recipe step.sof

Signatures::

    Catalogue(workspace: str | PathLike); Catalogue.scan(dirs: Iterable[str | PathLike])
        -> list[FrameRecord]
    make_plan(records: Iterable[FrameRecord], workspace: str | PathLike,
              validity: Mapping[str, int] | None = None) -> Plan
    write_sofs(plan: Plan) -> list[Path]
    format_plan(plan: Plan) -> str
    read_plan(path: str | PathLike) -> Plan
"""

from __future__ import annotations

import graphlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from soxs_core.calib import static_dir
from soxs_core.detector.instruments import INSTRUMENT_NAMES, get_arm
from soxs_core.errors import InputError
from soxs_core.io.safety import write_atomically
from soxs_recipes.framework import InputSpec, RecipeSpec
from soxs_recipes.registry import RECIPES

from .model import FrameRecord, Plan, Step, StepInput, Unplanned

__all__ = ["make_plan", "write_sofs", "format_plan", "read_plan", "validity_windows",
           "recipe_order"]

#: Exposure times closer than this [s] are the same (as the recipes' checks).
EXPTIME_TOLERANCE = 0.01


# ---------------------------------------------------------------------- declarations
def _spec(name: str) -> RecipeSpec:
    return RECIPES[name].SPEC


def _makers(spec: RecipeSpec) -> set[str]:
    """Catgs of the recipe's products that other steps may take (the unsuffixed ones)."""
    return {o.catg for o in spec.outputs if not o.suffix and o.kind in ("image", "table")}


def recipe_order() -> list[str]:
    """Recipe names, each after the recipes whose products it takes as CALIB inputs."""
    sorter = graphlib.TopologicalSorter()
    for name in RECIPES:
        wanted = {i.stem for i in _spec(name).inputs if i.group == "CALIB"}
        sorter.add(name, *(other for other in RECIPES
                           if other != name and wanted & _makers(_spec(other))))
    ready: list[str] = []
    sorter.prepare()
    while sorter.is_active():
        available = set(sorter.get_ready())
        batch = [n for n in RECIPES if n in available]  # registry order among equals
        ready += batch
        sorter.done(*batch)
    return ready


def validity_windows(validity: Mapping[str, int] | None = None) -> dict[str, int]:
    """Validity window (nights either side) by catg stem, with a ``default`` entry."""
    path = static_dir() / "association.yaml"
    try:
        with open(path) as fh:
            table = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the association defaults ({exc})") from None
    windows = {"default": int(table.get("default", 0)), **{
        str(k).upper(): int(v) for k, v in (table.get("validity") or {}).items()}}
    for key, value in (validity or {}).items():
        try:
            nights = int(value)
        except (TypeError, ValueError):
            raise InputError(f"validity of {key}: {value!r} is not a number of nights") \
                from None
        if nights < 0:
            raise InputError(f"validity of {key}: {nights} nights is negative")
        windows[str(key).upper() if key != "default" else key] = nights
    return windows


def _window(windows: Mapping[str, int], stem: str) -> int:
    return windows.get(stem, windows["default"])


# ---------------------------------------------------------------------- setup values
def _value(record: FrameRecord, key: str) -> Any:
    value = getattr(record, key)
    return round(float(value), 2) if key == "exptime" else value


def _matches(key: str, wanted: Any, offered: Any) -> bool:
    """Whether a calibration's setup value ``offered`` serves frames of ``wanted``; a value
    the calibration does not state (empty) serves any."""
    if key == "exptime":
        return abs(float(wanted) - float(offered)) <= EXPTIME_TOLERANCE
    return offered in ("", None) or offered == wanted


def _readout_label(readout: str) -> str:
    """Short readout name for step ids: X-shooter's ``1pt/100k/hg`` is ``slow``, ``.../400k/...``
    ``fast`` (INSTRUMENTS.md 3.1); other names in lower case."""
    parts = readout.lower().split("/")
    if "100k" in parts:
        return "slow"
    if "400k" in parts:
        return "fast"
    return readout.lower()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "none"


def _setup_label(spec: RecipeSpec, setup: Mapping[str, Any], kind: str) -> str:
    parts = []
    for key in spec.group_by:
        value = setup[key]
        if key == "template":
            continue  # long; the first frame's time tells steps apart where needed
        if key == "exptime":
            parts.append(f"{value:g}s")
        elif key == "readout":
            if value:
                parts.append(_slug(_readout_label(value)))
        else:
            parts.append(_slug(str(value)))
    if kind:
        parts.append(kind)
    return "_".join(parts)


def _describe_setup(setup: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g} s" if k == "exptime" else f"{k} {v or '(none)'}"
                     for k, v in setup.items())


def _nights_apart(a: str, b: str) -> int:
    return (date.fromisoformat(a) - date.fromisoformat(b)).days


def _distance_text(night: str, other: str, window: int) -> str:
    apart = _nights_apart(other, night)
    if apart == 0:
        return "same night"
    side = "earlier" if apart < 0 else "later"
    return (f"nearest night {other} ({abs(apart)} night{'s' if abs(apart) > 1 else ''} "
            f"{side}, validity {window})")


# ---------------------------------------------------------------------- drafts
@dataclass
class _Draft:
    """A step being planned."""

    step: Step
    spec: RecipeSpec
    frames: list[tuple[FrameRecord, InputSpec]]
    kinds: set[str]
    makes: dict[str, str] = field(default_factory=dict)  # catg stem -> product path
    impossible: str = ""

    @property
    def first(self) -> FrameRecord:
        return self.frames[0][0]

    def value(self, key: str) -> Any:
        return self.step.setup[key] if key in self.step.setup else _value(self.first, key)


def _raw_input(spec: RecipeSpec, record: FrameRecord) -> InputSpec | None:
    for inp in spec.inputs:
        if inp.group == "RAW" and record.arm in inp.arms and inp.accepts_frame_type(
                record.frame_type):
            return inp
    return None


def _raw_tag(record: FrameRecord, inp: InputSpec) -> str:
    """The frame's own tag (``<DPR TYPE, commas as underscores>_<ARM>``, as the simulator's
    and soxspipe's SOFs have it) when the input accepts it, else the input's first tag."""
    own = f"{record.dpr_type.upper().replace(',', '_')}_{record.arm}"
    return own if own in inp.tags() else f"{inp.stem}_{record.arm}"


def _group(spec: RecipeSpec, raws: list[FrameRecord], unused: dict[str, str],
           workspace: Path) -> list[_Draft]:
    """The recipe's steps from the raw frames its RAW inputs take; groups too small for a
    step leave their frames in ``unused`` with the reason."""
    groups: dict[tuple, list[tuple[FrameRecord, InputSpec]]] = {}
    for record in raws:
        inp = _raw_input(spec, record)
        if inp is None:
            continue
        key = (record.night, record.instrument, record.arm,
               tuple(_value(record, k) for k in spec.group_by),
               inp.stem if spec.raw_inputs_separately else "")
        groups.setdefault(key, []).append((record, inp))
    raw_specs = [i for i in spec.inputs if i.group == "RAW"]
    drafts = []
    for (night, instrument, arm, values, kind), group in sorted(groups.items()):
        setup = dict(zip(spec.group_by, values))
        where = f"{night} {instrument} {arm} ({_describe_setup(setup)})"
        for exposures, members in _exposure_sets(group, where, unused):
            members.sort(key=lambda m: (raw_specs.index(m[1]), m[0].mjd, m[0].path))
            draft = _draft(spec, members, night, instrument, arm, setup, kind, exposures,
                           where, unused)
            if draft is not None:
                drafts.append(draft)
    # a set too small for a step may share frames with one that makes a step
    for draft in drafts:
        for record, _ in draft.frames:
            unused.pop(record.path, None)
    _unique_ids(drafts)
    for draft in drafts:
        step, arm_obj = draft.step, get_arm(draft.step.instrument, draft.step.arm)
        step.output_dir = str(workspace / "reduced" / step.step_id)
        step.sof = str(workspace / "sof" / f"{step.step_id}.sof")
        for out in spec.outputs:
            if out.kind not in ("image", "table") or not out.written_for(arm_obj):
                continue
            if out.raw_inputs and not draft.kinds & set(out.raw_inputs):
                continue
            path = str(Path(step.output_dir) / out.filename_for(arm_obj))
            step.products.append((path, out.catg_for(arm_obj)))
            if not out.suffix:
                draft.makes.setdefault(out.catg, path)
    return drafts


Member = tuple[FrameRecord, InputSpec]


def _exposure_sets(members: list[Member], where: str,
                   unused: dict[str, str]) -> list[tuple[str, list[Member]]]:
    """The group split into the sets one run can take, with a label naming their exposure
    times when the group holds several (``""`` when it holds one).

    Inputs declared ``same_exptime`` give one set per exposure time; several such inputs
    (the UVB's D2 and QTH flats) give every combination of theirs; an input with
    ``exptime_of`` joins each set with the frames of its partner's exposure time.  A set
    of one input's frames that fits none of those is left unused, with the reason.
    """
    by_input: dict[InputSpec, dict[float, list[Member]]] = {}
    for member in members:
        inp = member[1]
        exptime = round(member[0].exptime, 3) if inp.same_exptime else 0.0
        by_input.setdefault(inp, {}).setdefault(exptime, []).append(member)
    free = [i for i in by_input if not i.exptime_of]
    if all(len(by_input[i]) == 1 for i in by_input):
        return [("", list(members))]
    several = [i for i in free if len(by_input[i]) > 1]
    sets, used = [], set()
    for times in itertools.product(*(sorted(by_input[i]) for i in free)):
        chosen = dict(zip((i.stem for i in free), times))
        picked = [m for i, t in zip(free, times) for m in by_input[i][t]]
        for inp in by_input:
            if inp.exptime_of:
                picked += by_input[inp].get(chosen.get(inp.exptime_of), [])
        label = "-".join(f"{chosen[i.stem]:g}s" for i in several)
        sets.append((label, picked))
        used.update(id(m) for m in picked)
    for inp, per_time in by_input.items():
        for exptime, frames in per_time.items():
            if id(frames[0]) in used:
                continue
            for record, _ in frames:
                unused[record.path] = (f"{record.path}: no {inp.exptime_of} frames of its "
                                       f"exposure time ({exptime:g} s) in {where}")
    return sets


def _draft(spec: RecipeSpec, members: list[Member], night: str, instrument: str, arm: str,
           setup: Mapping[str, Any], kind: str, exposures: str, where: str,
           unused: dict[str, str]) -> _Draft | None:
    """The step of one set of raw frames, or None (reasons in ``unused``) when the set is
    too small or lacks a required input."""
    raw_specs = [i for i in spec.inputs if i.group == "RAW"]
    if exposures:
        where = where[:-1] + f", exposure {exposures})"
    counts = {i.stem: sum(1 for _, m in members if m is i) for i in raw_specs}
    short = [f"{counts[i.stem]} {i.stem}_{arm} frame(s) of {where}: {spec.name} needs "
             f"at least {i.min_count}" for i in raw_specs
             if arm in i.arms and 0 < counts[i.stem] < i.min_count]
    missing = [f"{spec.name} on {where} also needs {i.stem}_{arm} frames, none found"
               for i in raw_specs if arm in i.arms and i.required and not counts[i.stem]
               and not spec.raw_inputs_separately]
    if short or missing:
        for record, _ in members:
            unused[record.path] = f"{record.path}: {(short + missing)[0]}"
        return None
    label = "_".join(p for p in (_setup_label(spec, setup, kind), exposures) if p)
    # the instrument too: X-shooter's and SOXS's VIS arms may share a night and a setup
    where_id = f"{night}_{INSTRUMENT_NAMES[instrument].upper()}_{arm}"
    step = Step(step_id=f"{where_id}_{label}_{spec.name}" if label else
                f"{where_id}_{spec.name}", recipe=spec.name, night=night,
                instrument=instrument, arm=arm, setup=setup)
    step.inputs = [StepInput(path=r.path, tag=_raw_tag(r, i),
                             reason=f"raw {r.frame_type} frame of night {night}")
                   for r, i in members]
    return _Draft(step=step, spec=spec, frames=members, kinds={i.stem for _, i in members})


def _unique_ids(drafts: list[_Draft]) -> None:
    """Steps of one night sharing an id get the time of their first frame, then a counter."""
    by_id: dict[str, list[_Draft]] = {}
    for draft in drafts:
        by_id.setdefault(draft.step.step_id, []).append(draft)
    for step_id, same in by_id.items():
        if len(same) == 1:
            continue
        seen: dict[str, int] = {}
        for draft in sorted(same, key=lambda d: d.first.mjd):
            seconds = round((draft.first.mjd % 1.0) * 86400.0) % 86400
            stamp = f"T{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
            seen[stamp] = seen.get(stamp, 0) + 1
            suffix = stamp if seen[stamp] == 1 else f"{stamp}-{seen[stamp]}"
            draft.step.step_id = f"{step_id}_{suffix}"


# ---------------------------------------------------------------------- association
@dataclass
class _Candidate:
    path: str
    night: str
    mjd: float
    reason: str
    upstream: str = ""
    blocked: str = ""  # why the producing step cannot run


def _best(candidates: list[_Candidate], night: str, mjd: float) -> _Candidate | None:
    """Nearest night first, then nearest in time, then the earlier one."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (abs(_nights_apart(c.night, night)),
                                          abs(c.mjd - mjd), c.mjd, c.path))


def _associate(draft: _Draft, done: list[_Draft], calibs: list[FrameRecord],
               windows: Mapping[str, int]) -> None:
    """Add the step's calibrations; a required one missing, or made by a step that cannot
    run, makes the step impossible (``draft.impossible``, naming every missing one)."""
    step = draft.step
    first = draft.first
    taken: set[str] = set()
    missing: list[str] = []
    blocked = ""
    for inp in draft.spec.inputs:
        if (inp.group != "CALIB" or step.arm not in inp.arms or not inp.associate
                or inp.stem in taken):
            continue
        taken.add(inp.stem)
        tag = f"{inp.stem}_{step.arm}"
        window = _window(windows, inp.stem)
        wanted = {k: draft.value(k) for k in inp.match}
        candidates = []
        if inp.stem not in draft.makes:
            for other in done:
                path = other.makes.get(inp.stem)
                if (path and other.step.instrument == step.instrument
                        and other.step.arm == step.arm
                        and abs(_nights_apart(other.step.night, step.night)) <= window
                        and all(_matches(k, v, other.value(k)) for k, v in wanted.items())):
                    reason = (f"from step {other.step.step_id} "
                              f"({_distance_text(step.night, other.step.night, window)})")
                    if inp.required or not other.impossible:  # optional: only if it runs
                        candidates.append(_Candidate(path, other.step.night, other.first.mjd,
                                                     reason, other.step.step_id,
                                                     other.impossible))
        chosen = _best(candidates, step.night, first.mjd)
        if chosen is None:
            found = [_Candidate(r.path, r.night, r.mjd, f"PRO CATG {tag} among the inputs ("
                                f"{_distance_text(step.night, r.night, window)})")
                     for r in calibs
                     if r.pro_catg == tag and r.instrument == step.instrument
                     and abs(_nights_apart(r.night, step.night)) <= window
                     and all(_matches(k, v, _value(r, k)) for k, v in wanted.items())]
            chosen = _best(found, step.night, first.mjd)
        if chosen is None:
            if inp.required:
                setup = f"{_describe_setup(wanted)}; " if wanted else ""
                missing.append(f"{tag} ({setup}validity {window} nights)")
            continue
        if matching_text := _describe_setup(wanted):
            chosen.reason += f", matching {matching_text}"
        step.inputs.append(StepInput(path=chosen.path, tag=tag, reason=chosen.reason,
                                     upstream=chosen.upstream))
        if chosen.upstream and chosen.upstream not in step.upstream:
            step.upstream.append(chosen.upstream)
        if chosen.blocked and not blocked:
            blocked = f"needs {tag} of step {chosen.upstream}, which cannot run " \
                      f"({chosen.blocked})"
    if missing:
        draft.impossible = (f"no {', no '.join(missing)} for {step.night}: no step makes "
                            "one and no file among the inputs has that PRO CATG")
    elif blocked:
        draft.impossible = blocked


def make_plan(records: Iterable[FrameRecord], workspace: str | os.PathLike,
              validity: Mapping[str, int] | None = None) -> Plan:
    """Group catalogued frames into steps and associate their calibrations.

    Parameters
    ----------
    records : iterable of FrameRecord
        The catalogue (:meth:`soxs_archive.catalogue.Catalogue.scan`); records with a
        ``problem`` are listed as unused with it.
    workspace : path-like
        Where the SOFs (``sof/``) and products (``reduced/<step_id>/``) go.
    validity : mapping, optional
        Validity windows (nights either side) by catg stem (``MASTER_FLAT``) or ``default``,
        overriding ``calib/static/association.yaml``.

    Returns
    -------
    Plan
        Steps with upstream steps first; unused frames and impossible steps with reasons.
    """
    workspace = Path(workspace).resolve()
    windows = validity_windows(validity)
    plan = Plan(workspace=str(workspace))
    records = sorted(records, key=lambda r: r.path)
    unused: dict[str, str] = {}
    for record in records:
        if record.problem:
            unused[record.path] = record.problem
    usable = [r for r in records if not r.problem]
    calibs = [r for r in usable if r.pro_catg]
    raws = [r for r in usable if not r.pro_catg]
    done: list[_Draft] = []
    for name in recipe_order():
        spec = _spec(name)
        drafts = _group(spec, raws, unused, workspace)
        consumed = {i.stem for i in spec.inputs if i.group == "CALIB"}
        # steps making what steps of their own recipe take come first (flux standards)
        drafts.sort(key=lambda d: not (set(d.makes) & consumed))
        for draft in drafts:
            _associate(draft, done, calibs, windows)
            done.append(draft)
    for draft in done:
        if draft.impossible:
            plan.impossible_steps.append(Unplanned(draft.step.step_id, draft.impossible))
            for record, _ in draft.frames:
                unused.setdefault(record.path, f"{record.path}: its step "
                                  f"{draft.step.step_id} cannot run: {draft.impossible}")
        else:
            plan.steps.append(draft.step)
    in_steps = {i.path for s in plan.steps for i in s.inputs}
    for record in raws:
        if record.path not in in_steps and record.path not in unused:
            unused[record.path] = _why_unused(record)
    for record in calibs:
        if record.path not in in_steps and record.path not in unused:
            unused[record.path] = (f"{record.path}: calibration {record.pro_catg} of "
                                   f"{record.night} is not needed by any step")
    plan.unused_frames = [Unplanned(path, reason) for path, reason in sorted(unused.items())]
    return plan


def _why_unused(record: FrameRecord) -> str:
    """Why no recipe takes a raw frame: its type is unknown, or no recipe takes that type
    (or not of that arm)."""
    if not record.frame_type:
        return (f"{record.path}: DPR TYPE {record.dpr_type!r}, TECH {record.dpr_tech!r} is no "
                "frame type the pipeline knows")
    by_type = [(n, i) for n in RECIPES for i in _spec(n).inputs
               if i.group == "RAW" and i.accepts_frame_type(record.frame_type)]
    if not by_type:
        return f"{record.path}: no recipe takes {record.frame_type} frames"
    names = ", ".join(dict.fromkeys(n for n, _ in by_type))
    return f"{record.path}: {names} takes no {record.frame_type} frames of the {record.arm} arm"


# ---------------------------------------------------------------------- output
def _sof_text(step: Step) -> str:
    return "".join(f"{i.path} {i.tag}\n" for i in step.inputs)


def write_sofs(plan: Plan) -> list[Path]:
    """Write every step's SOF (``W/sof/<step_id>.sof``) and the plan (``W/plan.json``),
    atomically; SOFs of steps no longer planned are removed.

    Returns
    -------
    list of Path
        The SOFs written, in the plan's order.
    """
    workspace = Path(plan.workspace)
    sof_dir = workspace / "sof"
    try:
        sof_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for step in plan.steps:
            text = _sof_text(step)
            written.append(write_atomically(step.sof, lambda p, t=text: p.write_text(t)))
        wanted = {Path(p).name for p in written}
        for old in sof_dir.glob("*.sof"):
            if old.name not in wanted:
                old.unlink()
        payload = json.dumps(plan.to_dict(), indent=1) + "\n"
        write_atomically(workspace / "plan.json", lambda p: p.write_text(payload))
    except OSError as exc:
        raise InputError(f"{exc.filename or workspace}: cannot write the plan "
                         f"({exc.strerror or exc})") from None
    return written


def read_plan(path: str | os.PathLike) -> Plan:
    """A plan written by :func:`write_sofs` (``W/plan.json``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        steps = [Step(**{**s, "inputs": [StepInput(**i) for i in s["inputs"]],
                         "products": [tuple(p) for p in s["products"]]})
                 for s in data["steps"]]
        return Plan(workspace=data["workspace"], steps=steps,
                    unused_frames=[Unplanned(**u) for u in data["unused_frames"]],
                    impossible_steps=[Unplanned(**u) for u in data["impossible_steps"]])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable plan ({exc})") from None


def format_plan(plan: Plan) -> str:
    """The plan as text (``--dry-run``): the steps in order, each input with the reason it was
    chosen, then the unused frames and the impossible steps with their reasons."""
    lines = [f"Plan for {plan.workspace}: {len(plan.steps)} step(s), "
             f"{len(plan.impossible_steps)} impossible, {len(plan.unused_frames)} unused "
             "file(s)", ""]
    for number, step in enumerate(plan.steps, start=1):
        after = f"  after {', '.join(step.upstream)}" if step.upstream else ""
        lines.append(f"{number:3d}. {step.step_id}  ({step.recipe}, {step.instrument} "
                     f"{step.arm}, {_describe_setup(step.setup)}){after}")
        lines.append(f"     sof {step.sof}")
        for inp in step.inputs:
            lines.append(f"     {inp.tag:<18} {inp.path}")
            lines.append(f"     {'':<18}   {inp.reason}")
    if plan.unused_frames:
        lines += ["", "Unused files:"]
        lines += [f"  {u.reason}" if u.reason.startswith(u.what) else f"  {u.what}: {u.reason}"
                  for u in plan.unused_frames]
    if plan.impossible_steps:
        lines += ["", "Steps that cannot run:"]
        lines += [f"  {u.what}: {u.reason}" for u in plan.impossible_steps]
    return "\n".join(lines) + "\n"
