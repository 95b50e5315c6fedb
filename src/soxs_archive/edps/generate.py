"""Write the EDPS workflows of the soxs recipes from the recipes' declarations.

``python -m soxs_archive.edps.generate`` rewrites the workflow packages beside this module;
``--check`` only says whether the shipped text is what the declarations give (exit status 1
when not).  What comes from where:

- classification rules: one per (DPR TYPE, DPR TECH) pattern of
  :data:`soxs_core.detector.rawframe.FRAME_TYPES` that a recipe's RAW input takes on an arm
  (``INSTRUME``, ``ESO SEQ ARM``, ``ESO DPR TYPE``/``TECH``), and one per ``ESO PRO CATG`` a
  recipe writes or reads as a CALIB input.  A raw frame's tag is soxspipe's (DPR TYPE with
  commas as underscores and the arm, what the simulated nights' SOFs use) where the recipe
  accepts it, else the input's preferred tag.  DPR CATG is left out: the recipes do not look
  at it either.  A pattern that only applies when an earlier one with the same DPR TYPE does
  not (lamp-on NIR flats against lamp-off ones, DPR TECH ``IMAGE``) becomes a function in
  ``<name>_rules.py``;
- data sources: a task's raw frames are grouped by instrument, arm, night and the recipe's
  ``RecipeSpec.group_by`` keys, mapped to header keywords (:func:`header_keywords`); the
  smallest group is the smallest ``min_count`` of its required RAW inputs;
- tasks: one per recipe and arm (one per RAW input on the arm when the recipe declares
  ``raw_inputs_separately``), with an associated input per CALIB ``InputSpec`` the organiser
  associates (``associate``): from the task of the recipe whose ``OutputSpec`` makes it, else
  from the input files by PRO CATG; ``min_ret`` is ``min_count`` of a required input and 0 of
  an optional one, ``max_ret`` its ``max_count``; the match keywords are instrument, arm and
  the input's ``match`` keys, within the same night (level 0) or the validity window of
  ``calib/static/association.yaml`` (level 1);
- each task passes on the DFS products its recipe declares for the arm (``OutputSpec``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from soxs_core.detector.instruments import ARMS, INSTRUMENT_NAMES, Arm, slit_keyword
from soxs_core.detector.rawframe import FRAME_TYPES
from soxs_core.errors import InputError
from soxs_recipes.framework import InputSpec, OutputSpec, RecipeSpec

__all__ = ["WORKFLOW_PACKAGES", "Workflow", "build_workflow", "render_workflow",
           "header_keywords", "edps_keyword", "validity_nights", "shipped_texts",
           "generated_texts", "main"]

#: EDPS workflow package of each instrument (``edps -w <package>.<package>_wkf``)
WORKFLOW_PACKAGES = {"SOXS": "soxs", "XSHOOTER": "soxs_xshooter"}

#: EDPS's night of a file (from its MJD-OBS), a grouping keyword like the header's
NIGHT = "night"

_PRODUCT_KINDS = ("image", "table")
_HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------- keywords
def edps_keyword(fits_keyword: str) -> str:
    """EDPS's spelling of a header keyword: ``ESO DET WIN1 BINX`` -> ``det.win1.binx``."""
    key = fits_keyword.strip()
    if key.upper().startswith("ESO "):
        key = key[4:]
    return key.lower().replace(" ", ".")


def header_keywords(key: str, arm: Arm) -> tuple[str, ...]:
    """Header keywords (FITS spelling) that give a :class:`~soxs_archive.model.FrameRecord`
    setup key on an arm, as the catalogue reads them.

    Binning is two keywords on the CCD arms and none on the NIR ones (always 1x1); the night
    is not a header keyword (see :data:`NIGHT`).

    Raises
    ------
    ValueError
        For a key no header keyword is known for: a new declaration key needs its keywords
        here before the workflow can say it.
    """
    if key == "binning":
        return tuple(arm.keywords[axis] for axis in ("binx", "biny") if axis in arm.keywords)
    if key == "readout":
        return (arm.keywords["readout"],) if "readout" in arm.keywords else ()
    if key == "exptime":
        return ("EXPTIME",)
    if key == "slit":
        return (slit_keyword(arm),)
    if key == "template":
        return ("ESO TPL START",)
    raise ValueError(f"no header keyword is known for the FrameRecord key {key!r}")


def _mapped(keys: Iterable[str], arm: Arm) -> tuple[str, ...]:
    return tuple(edps_keyword(k) for key in keys for k in header_keywords(key, arm))


_INSTRUME = edps_keyword("INSTRUME")
_SEQ_ARM = edps_keyword("ESO SEQ ARM")
_DPR_TYPE = edps_keyword("ESO DPR TYPE")
_DPR_TECH = edps_keyword("ESO DPR TECH")
_PRO_CATG = edps_keyword("ESO PRO CATG")


def _identifier(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text.lower())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


# ------------------------------------------------------------------------- validity
def validity_nights(stem: str, windows: Mapping[str, int]) -> int:
    """Nights either side a calibration ``stem`` may come from when the night has none
    (0: the same night only), from :func:`soxs_archive.plan.validity_windows`."""
    return int(windows.get(stem, windows["default"]))


# ------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Rule:
    """A classification rule: files whose header has ``values`` (and none of ``excluded``)
    get ``tag``."""

    name: str
    tag: str
    values: tuple[tuple[str, tuple[str, ...]], ...]
    excluded: tuple[tuple[str, tuple[str, ...]], ...] = ()
    frame_type: str = ""  # raw frames: the FRAME_TYPES stem
    arm: str = ""

    @property
    def function(self) -> str:
        return f"is_{self.name.removesuffix('_class')}"

    @property
    def as_function(self) -> bool:
        """A dict rule states one value per keyword and excludes nothing."""
        return bool(self.excluded) or any(len(v) > 1 for _, v in self.values)


@dataclass(frozen=True)
class MatchRule:
    name: str
    keywords: tuple[str, ...]
    windows: tuple[tuple[int, int], ...]  # (nights either side, level); 0 nights: ONE_DAY


@dataclass(frozen=True)
class DataSource:
    name: str
    rules: tuple[str, ...]
    grouping: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    match: MatchRule | None = None
    min_group_size: int = 1

    @property
    def label(self) -> str:
        return self.name.upper()


@dataclass(frozen=True)
class Association:
    stem: str
    source: str  # a task's or a data source's variable
    from_task: bool
    classes: tuple[str, ...]
    min_ret: int
    max_ret: int | None
    match: MatchRule


@dataclass
class Task:
    name: str
    recipe: str
    arm: Arm
    raw_stems: tuple[str, ...]
    main_input: str
    associations: list[Association] = field(default_factory=list)
    products: tuple[str, ...] = ()
    meta_target: str = "QC1_CALIB"

    @property
    def variable(self) -> str:
        return f"{self.name}_task"


@dataclass
class Workflow:
    package: str
    instrument: str
    arms: list[Arm]
    rules: list[Rule] = field(default_factory=list)
    match_rules: list[MatchRule] = field(default_factory=list)
    data_sources: list[DataSource] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)

    def keywords(self) -> list[str]:
        found = {k for r in self.rules for k, _ in (*r.values, *r.excluded)}
        found |= {k for m in self.match_rules for k in m.keywords}
        found |= {k for d in self.data_sources for k in (*d.grouping, *d.setup)}
        return sorted(found)


# ------------------------------------------------------------------------- building
def _specs(recipes: Mapping[str, ModuleType | RecipeSpec]) -> list[RecipeSpec]:
    return [getattr(r, "SPEC", r) for r in recipes.values()]


def _raw_tag(dpr_type: str, stem: str, arm: Arm, consumers: Sequence[InputSpec]) -> str:
    convention = f"{dpr_type.replace(',', '_')}_{arm.name}"
    if all(convention in inp.tags() for inp in consumers):
        return convention
    return f"{consumers[0].stem}_{arm.name}"


def _raw_rules(specs: Sequence[RecipeSpec], arm: Arm, instrume: Sequence[str]) -> list[Rule]:
    consumers: dict[str, list[InputSpec]] = {}
    for spec in specs:
        for inp in spec.inputs:
            if inp.group == "RAW" and arm.name in inp.arms:
                for ftype in inp.frame_types or (inp.stem,):
                    consumers.setdefault(ftype, []).append(inp)
    rules = []
    seen: dict[str, list[str | None]] = {}
    for dpr_type, dpr_tech, stem in FRAME_TYPES:
        earlier = seen.setdefault(dpr_type, [])
        shadowed = None in earlier or dpr_tech in earlier
        earlier.append(dpr_tech)
        if shadowed or stem not in consumers:
            continue
        values = [(_INSTRUME, tuple(instrume)), (_SEQ_ARM, (arm.name,)), (_DPR_TYPE, (dpr_type,))]
        if dpr_tech is not None:
            values.append((_DPR_TECH, (dpr_tech,)))
        excluded = tuple((_DPR_TECH, (t,)) for t in earlier[:-1] if t is not None)
        name = _identifier(f"{dpr_type}_{dpr_tech or ''}_{arm.name}") + "_class"
        rule = Rule(name=name, tag=_raw_tag(dpr_type, stem, arm, consumers[stem]),
                    values=tuple(values), excluded=excluded, frame_type=stem, arm=arm.name)
        rules += _one_value_each(rule)
    return rules


def _one_value_each(rule: Rule) -> list[Rule]:
    """A rule with several INSTRUME spellings as one dict rule per spelling (the first keeps
    the name); rules that are functions anyway keep them together."""
    (key, spellings), *rest = rule.values
    if rule.excluded or len(spellings) == 1:
        return [rule]
    out = []
    for index, value in enumerate(spellings):
        name = rule.name if index == 0 else rule.name.replace(
            "_class", f"_{_identifier(value)}_class")
        out.append(Rule(name=name, tag=rule.tag, values=((key, (value,)), *rest),
                        frame_type=rule.frame_type, arm=rule.arm))
    return out


def _product_rules(catgs: Iterable[str], arm: Arm, instrume: Sequence[str],
                   distinct: Mapping[str, tuple] | None = None) -> list[Rule]:
    rules = []
    for catg in catgs:
        excluded: dict[str, list[str]] = {}
        for keyword, value, _ in (distinct or {}).get(catg, ()):
            excluded.setdefault(edps_keyword(keyword), []).append(value)
        rule = Rule(name=f"{catg.lower()}_class", tag=catg, arm=arm.name,
                    values=((_INSTRUME, tuple(instrume)), (_SEQ_ARM, (arm.name,)),
                            (_PRO_CATG, (catg,))),
                    excluded=tuple((k, tuple(v)) for k, v in excluded.items()))
        rules += _one_value_each(rule)
    return rules


def _dfs_outputs(spec: RecipeSpec, arm: Arm) -> list[OutputSpec]:
    return [o for o in spec.outputs if o.kind in _PRODUCT_KINDS and o.written_for(arm)]


def _calib_inputs(spec: RecipeSpec, arm: Arm) -> list[InputSpec]:
    return [i for i in spec.inputs if i.group == "CALIB" and arm.name in i.arms]


def build_workflow(instrument: str, recipes: Mapping[str, ModuleType | RecipeSpec] | None = None,
                   validity: Mapping | None = None) -> Workflow:
    """The EDPS workflow of one instrument (``SOXS`` or ``XSHOOTER``) from the declarations.

    Parameters
    ----------
    instrument : str
        A key of :data:`WORKFLOW_PACKAGES`.
    recipes : mapping, optional
        Recipe name -> module with ``SPEC`` (or the RecipeSpec itself); default
        :data:`soxs_recipes.registry.RECIPES`.
    validity : mapping, optional
        Validity windows (nights) by catg stem overriding ``calib/static/association.yaml``,
        as ``soxs-reduce`` takes them (:func:`soxs_archive.plan.validity_windows`).

    Returns
    -------
    Workflow
        Its rules, association rules, data sources and tasks (upstream tasks first), which
        :func:`render_workflow` writes out.
    """
    from soxs_archive.plan import validity_windows

    if recipes is None:
        from soxs_recipes.registry import RECIPES as recipes
    specs = _specs(recipes)
    windows = validity_windows(validity)
    code = INSTRUMENT_NAMES[instrument]
    instrume = [name for name, short in INSTRUMENT_NAMES.items() if short == code]
    instrume.sort(key=lambda name: name != instrument)
    wf = Workflow(package=WORKFLOW_PACKAGES[instrument], instrument=instrument,
                  arms=[a for a in ARMS.values() if a.instrument == instrument])
    match_rules: dict[tuple, MatchRule] = {}
    for arm in wf.arms:
        raw_rules = _raw_rules(specs, arm, instrume)
        on_arm = [s for s in specs if arm in s.accepted_arms()]
        catgs = dict.fromkeys([o.catg_for(arm) for s in on_arm for o in _dfs_outputs(s, arm)]
                              + [f"{i.stem}_{arm.name}" for s in on_arm
                                 for i in _calib_inputs(s, arm)])
        # the UVB per-lamp master flats share the stitched one's PRO CATG; their own card
        # keeps them out of the rule that tasks take
        distinct: dict[str, tuple] = {}
        for o in (o for s in on_arm for o in _dfs_outputs(s, arm) if o.keywords):
            distinct[o.catg_for(arm)] = distinct.get(o.catg_for(arm), ()) + o.keywords
        product_rules = _product_rules(catgs, arm, instrume, distinct)
        wf.rules += raw_rules + product_rules
        tasks = _arm_tasks(wf, specs, arm, raw_rules, product_rules)
        for task in tasks:
            spec = next(s for s in specs if s.name == task.recipe)
            taken = set()
            for inp in _calib_inputs(spec, arm):
                if not inp.associate or inp.stem in taken:
                    continue
                taken.add(inp.stem)
                nights = validity_nights(inp.stem, windows)
                keywords = (_INSTRUME, _SEQ_ARM, *_mapped(inp.match, arm))
                levels = ((0, 0),) + (((nights, 1),) if nights > 0 else ())
                key = (arm.name, keywords, levels)
                if key not in match_rules:
                    name = "_".join(["match", arm.name.lower(), *inp.match, "within",
                                     str(nights), "nights"])
                    match_rules[key] = MatchRule(name=name, keywords=keywords, windows=levels)
                task.associations += _associations(wf, specs, spec, task, tasks, inp,
                                                   product_rules, match_rules[key])
        wf.tasks += tasks
    wf.match_rules = list(match_rules.values())
    by_name = {s.name: s for s in specs}
    for task in wf.tasks:
        calibrations = {i.stem for s in specs for i in _calib_inputs(s, task.arm)}
        makes = _makes(by_name[task.recipe], task.arm, task.raw_stems)
        task.meta_target = "QC1_CALIB" if makes & calibrations else "SCIENCE"
    wf.tasks = _upstream_first(wf.tasks)
    return wf


def _arm_tasks(wf: Workflow, specs: Sequence[RecipeSpec], arm: Arm, raw_rules: list[Rule],
               product_rules: list[Rule]) -> list[Task]:
    tasks = []
    for spec in specs:
        raw = [i for i in spec.inputs if i.group == "RAW" and arm.name in i.arms]
        runs = [[i] for i in raw] if spec.raw_inputs_separately else [raw]
        for inputs in runs:
            rules = tuple(r.name for r in raw_rules
                          if any(i.accepts_frame_type(r.frame_type) for i in inputs))
            if not rules:
                continue
            part = f"_{inputs[0].stem.lower()}" if spec.raw_inputs_separately else ""
            name = f"{spec.name}{part}_{arm.name.lower()}"
            grouping_keys = (_INSTRUME, _SEQ_ARM, NIGHT, *_mapped(spec.group_by, arm))
            # one job per exposure time where a single input sets it (VIS/NIR flats, with
            # their lamp-off frames); the UVB's D2 and QTH flats have two, which one EDPS
            # grouping cannot pair (soxs-reduce does, see soxs_archive.plan)
            setters = [i for i in inputs if i.same_exptime and not i.exptime_of]
            if len(setters) == 1 and "exptime" not in spec.group_by:
                grouping_keys += _mapped(["exptime"], arm)
            setup_keys = (_INSTRUME, _SEQ_ARM, *_mapped(
                [k for k in spec.group_by if k != "template"], arm))
            required = [i.min_count for i in inputs if i.required] or [
                i.min_count for i in inputs if i.min_count]
            source = DataSource(name=f"raw_{name.removeprefix('soxs_')}", rules=rules,
                                grouping=grouping_keys, setup=setup_keys,
                                min_group_size=max(1, min(required, default=1)))
            wf.data_sources.append(source)
            stems = {i.stem for i in inputs}
            catgs = {o.catg_for(arm) for o in _dfs_outputs(spec, arm)
                     if not o.raw_inputs or stems & set(o.raw_inputs)}
            products = tuple(r.name for r in product_rules if r.tag in catgs)
            tasks.append(Task(name=name, recipe=spec.name, arm=arm,
                              raw_stems=tuple(i.stem for i in inputs), main_input=source.name,
                              products=products))
    return tasks


def _makes(spec: RecipeSpec, arm: Arm, raw_stems: Iterable[str]) -> set[str]:
    """Catg stems a run of ``spec`` on these raw inputs writes for other runs to take (the
    unsuffixed DFS products; ``OutputSpec.raw_inputs`` restricts which runs write one)."""
    stems = set(raw_stems)
    return {o.catg for o in _dfs_outputs(spec, arm)
            if not o.suffix and (not o.raw_inputs or stems & set(o.raw_inputs))}


def _associations(wf: Workflow, specs: Sequence[RecipeSpec], spec: RecipeSpec, task: Task,
                  tasks: Sequence[Task], inp: InputSpec, product_rules: list[Rule],
                  match: MatchRule) -> list[Association]:
    """Where a task's CALIB input comes from: the tasks that make it, unless the task makes it
    itself (a flux standard its response, a master flat its order table), else the input
    files with its PRO CATG."""
    arm = task.arm
    tag = f"{inp.stem}_{arm.name}"
    classes = tuple(r.name for r in product_rules if r.tag == tag)
    min_ret = inp.min_count if inp.required else 0
    producers = []
    if inp.stem not in _makes(spec, arm, task.raw_stems):
        by_name = {s.name: s for s in specs}
        producers = [t for t in tasks
                     if inp.stem in _makes(by_name[t.recipe], arm, t.raw_stems)]
    if producers:
        return [Association(stem=inp.stem, source=p.variable, from_task=True, classes=classes,
                            min_ret=min_ret, max_ret=inp.max_count, match=match)
                for p in producers]
    name = f"{tag.lower()}_files"
    if not any(d.name == name for d in wf.data_sources):
        wf.data_sources.append(DataSource(name=name, rules=classes, match=match))
    return [Association(stem=inp.stem, source=name, from_task=False, classes=(),
                        min_ret=min_ret, max_ret=inp.max_count, match=match)]


def _upstream_first(tasks: list[Task]) -> list[Task]:
    done: list[Task] = []
    pending = list(tasks)
    while pending:
        ready = [t for t in pending if all(not a.from_task or a.source in
                                           {d.variable for d in done} for a in t.associations)]
        if not ready:
            raise ValueError("the recipes' declarations make a cycle of tasks: "
                             + ", ".join(t.name for t in pending))
        done += ready
        pending = [t for t in pending if t not in ready]
    return done


# ------------------------------------------------------------------------- rendering
_BANNER = ("Generated by `python -m soxs_archive.edps.generate` from the soxs recipes' "
           "declarations;\ndo not edit: change the declarations and regenerate.")


def _kw(keyword: str) -> str:
    return f"kwd.{_identifier(keyword)}"


def _wrapped(items: Sequence[str], indent: int, width: int = 99) -> str:
    """``[a, b, ...]`` broken over lines that fit ``width`` (continuations at ``indent``)."""
    lines, line = [], "["
    for index, item in enumerate(items):
        text = item + (", " if index < len(items) - 1 else "]")
        used = len(line) + (0 if lines else indent)
        if used + len(text.rstrip()) > width and line.strip("["):
            lines.append(line.rstrip())
            line = " " * (indent + 1)
        line += text
    if not items:
        line += "]"
    lines.append(line)
    return "\n".join(lines)


def _time_range(nights: int) -> str:
    return "ONE_DAY" if nights == 0 else f"RelativeTimeRange({-nights}, {nights})"


def _match_lines(rule: MatchRule) -> list[str]:
    prefix = "    .with_match_keywords("
    lines = []
    for nights, level in rule.windows:
        text = _wrapped([_kw(k) for k in rule.keywords], len(prefix))
        tail = f"time_range={_time_range(nights)}, level={level})"
        last = text.rsplit("\n", 1)[-1]
        if len(prefix) * ("\n" not in text) + len(last) + len(tail) + 2 > 98:
            text += ",\n" + " " * len(prefix) + tail
        else:
            text += ", " + tail
        lines.append(prefix + text)
    return lines


def _time_range_names(nights: Iterable[int]) -> list[str]:
    nights = set(nights)
    return [name for name, wanted in (("ONE_DAY", 0 in nights),
                                      ("RelativeTimeRange", any(nights))) if wanted]


def _module_doc(title: str, wf: Workflow, more: str = "") -> str:
    more = f"{more}\n\n" if more else ""
    return (f'"""{wf.instrument} workflow of the soxs recipes: {title}.\n\n{more}{_BANNER}\n'
            '"""\n')


def _render_keywords(wf: Workflow) -> str:
    lines = [_module_doc("header keywords", wf, "The keywords used for classification, "
                         "grouping and association, in EDPS's spelling."), ""]
    for keyword in wf.keywords():
        note = ("  # EDPS's night of a file, from its MJD-OBS" if keyword == NIGHT else "")
        lines.append(f'{_identifier(keyword)} = "{keyword}"{note}')
    return "\n".join(lines) + "\n"


def _render_classification(wf: Workflow) -> str:
    uses_functions = any(r.as_function for r in wf.rules)
    lines = [_module_doc("classification rules", wf, "Each file whose header has the "
                         "values gets the rule's tag (its SOF tag)."), "",
             "from edps import classification_rule", "", f"from . import {wf.package}_keywords "
             "as kwd"]
    if uses_functions:
        lines.append(f"from . import {wf.package}_rules as rules")
    for arm in wf.arms:
        for kind, rules in (("raw frames", [r for r in wf.rules if r.frame_type]),
                            ("calibration products (PRO CATG)",
                             [r for r in wf.rules if not r.frame_type])):
            lines += ["", f"# --- {arm.instrument} {arm.name}: {kind}"]
            for rule in (r for r in rules if r.arm == arm.name):
                if rule.as_function:
                    lines.append(f'{rule.name} = classification_rule("{rule.tag}", '
                                 f"rules.{rule.function})")
                    continue
                lines.append(f'{rule.name} = classification_rule("{rule.tag}", {{')
                lines += [f'    {_kw(k)}: "{v[0]}",' for k, v in rule.values]
                lines.append("})")
    return "\n".join(lines) + "\n"


def _render_rules(wf: Workflow) -> str:
    functions = [r for r in wf.rules if r.as_function]
    imports = _time_range_names([n for m in wf.match_rules for n, _ in m.windows])
    lines = [_module_doc("classification functions and association rules", wf), "",
             "from edps import match_rules",
             f"from edps.generator.time_range import {', '.join(imports)}", "",
             f"from . import {wf.package}_keywords as kwd"]
    for rule in functions:
        values = dict(rule.values)
        unwanted = " or ".join("/".join(v) for _, v in rule.excluded)
        if _DPR_TYPE in values:
            what = f"frame of DPR TYPE {values[_DPR_TYPE][0]}, DPR TECH not {unwanted}"
        else:
            names = " or ".join(sorted({edps_keyword(k).upper().replace(".", " ")
                                        for k, _ in rule.excluded}))
            what = f"{values[_PRO_CATG][0]} without {names} {unwanted}"
        lines += ["", "", f"def {rule.function}(f) -> bool:",
                  f'    """{"/".join(values[_INSTRUME])} {rule.arm} {what}."""']
        tests = [f"f.get_keyword_value({_kw(k)}, None) in {tuple(v)!r}" for k, v in rule.values]
        tests += [f"f.get_keyword_value({_kw(k)}, None) not in {tuple(v)!r}"
                  for k, v in rule.excluded]
        lines.append("    return (" + "\n            and ".join(tests) + ")")
    lines += ["", "", "# Association: the same night (level 0) or the validity window of "
              "calib/static/association.yaml", "# (level 1), instrument, arm and the "
              "declaration's InputSpec.match keys the same."]
    for rule in wf.match_rules:
        lines += ["", f"{rule.name} = (match_rules()", *_match_lines(rule)]
        lines[-1] += ")"
    return "\n".join(lines) + "\n"


def _render_datasources(wf: Workflow) -> str:
    windows = [n for d in wf.data_sources if d.match for n, _ in d.match.windows]
    doc = ("The raw frames of each task, grouped into jobs, and the calibration files found "
           "among the\ninputs by PRO CATG.")
    lines = [_module_doc("data sources", wf, doc), "",
             "from edps import data_source"]
    if windows:
        lines.append("from edps.generator.time_range import "
                     + ", ".join(_time_range_names(windows)))
    lines += ["", f"from . import {wf.package}_classification as cls",
              f"from . import {wf.package}_keywords as kwd"]
    for source in wf.data_sources:
        lines += ["", f'{source.name} = (data_source("{source.label}")']
        lines += [f"    .with_classification_rule(cls.{r})" for r in source.rules]
        for method, keys in (("with_grouping_keywords", source.grouping),
                             ("with_setup_keywords", source.setup)):
            if keys:
                prefix = f"    .{method}("
                lines.append(prefix + _wrapped([_kw(k) for k in keys], len(prefix)) + ")")
        if source.min_group_size > 1:
            lines.append(f"    .with_min_group_size({source.min_group_size})")
        if source.match is not None:
            lines += _match_lines(source.match)
        lines.append("    .build())")
    return "\n".join(lines) + "\n"


def _render_wkf(wf: Workflow) -> str:
    lines = [_module_doc("tasks", wf, "One task per recipe and arm (per raw input where "
                         "the recipe reduces them\nseparately)."), "",
             "from edps import QC1_CALIB, SCIENCE, task", "",
             f"from . import {wf.package}_classification as cls",
             f"from . import {wf.package}_datasources as ds",
             f"from . import {wf.package}_rules as rules"]
    for t in wf.tasks:
        lines += ["", f'{t.variable} = (task("{t.name}")', f'    .with_recipe("{t.recipe}")',
                  f"    .with_main_input(ds.{t.main_input})"]
        for a in t.associations:
            source = a.source if a.from_task else f"ds.{a.source}"
            args = [source] + ([_wrapped([f"cls.{c}" for c in a.classes], 28)]
                               if a.from_task else [])
            args += [f"min_ret={a.min_ret}"] + (
                [f"max_ret={a.max_ret}"] if a.max_ret is not None else [])
            args += [f"match_rules=rules.{a.match.name}"]
            lines.append(f"    .with_associated_input({args[0]},")
            lines += [f"                           {arg}," for arg in args[1:-1]]
            lines.append(f"                           {args[-1]})")
        if t.products:
            prefix = "    .with_output_filter("
            lines.append(prefix + _wrapped([f"cls.{p}" for p in t.products],
                                           len(prefix) - 1)[1:-1]
                         + ")")
        lines += [f"    .with_meta_targets([{t.meta_target}])", "    .build())"]
    return "\n".join(lines) + "\n"


def render_workflow(wf: Workflow) -> dict[str, str]:
    """File name -> text of the workflow package."""
    p = wf.package
    init = (f'"""EDPS workflow of the soxs recipes for {wf.instrument}: '
            f'``edps -w {p}.{p}_wkf``.\n\n{_BANNER}\n"""\n')
    return {"__init__.py": init, f"{p}_keywords.py": _render_keywords(wf),
            f"{p}_classification.py": _render_classification(wf),
            f"{p}_rules.py": _render_rules(wf), f"{p}_datasources.py": _render_datasources(wf),
            f"{p}_wkf.py": _render_wkf(wf)}


def generated_texts(recipes: Mapping | None = None,
                    validity: Mapping | None = None) -> dict[Path, str]:
    """Relative path -> text of every workflow file the declarations give."""
    out = {}
    for instrument, package in WORKFLOW_PACKAGES.items():
        for name, text in render_workflow(build_workflow(instrument, recipes,
                                                         validity)).items():
            out[Path(package) / name] = text
    return out


def shipped_texts(directory: Path = _HERE) -> dict[Path, str]:
    """Relative path -> text of the workflow files in ``directory``."""
    return {path.relative_to(directory): path.read_text()
            for package in WORKFLOW_PACKAGES.values()
            for path in sorted((directory / package).glob("*.py"))}


def _write_atomically(path: Path, text: str) -> None:
    from soxs_core.io.safety import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` compare) the shipped workflow packages."""
    parser = argparse.ArgumentParser(prog="python -m soxs_archive.edps.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only report whether the shipped files are up to date")
    parser.add_argument("--directory", type=Path, default=_HERE,
                        help="workflow directory to write (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        return _update(args.directory, args.check)
    except (InputError, ValueError, OSError) as exc:
        # association.yaml unreadable, a declaration key without keywords, an unwritable file
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1


def _update(directory: Path, check: bool) -> int:
    wanted = generated_texts()
    have = shipped_texts(directory)
    stale = sorted(p for p in set(wanted) | set(have) if wanted.get(p) != have.get(p))
    if check:
        for path in stale:
            print(f"{directory / path}: differs from what the declarations give",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        target = directory / path
        if path in wanted:
            _write_atomically(target, wanted[path])
        else:
            target.unlink()
        print(f"wrote {target}" if path in wanted else f"removed {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
