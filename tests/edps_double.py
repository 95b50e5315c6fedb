"""A test double of ESO's ``edps`` package: it records what a workflow module declares.

Only what the soxs workflows call exists: ``classification_rule``, ``data_source()``,
``task()``, ``match_rules()``, ``QC1_CALIB``/``SCIENCE`` and ``edps.generator.time_range``
(``ONE_DAY``, ``RelativeTimeRange``).  Builders return themselves and ``build()`` returns the
recorded object; every object is appended to :data:`RECORDED` as well.  Nothing is checked
against the real EDPS: a call the double lacks fails with AttributeError, which is all it can
tell.

:class:`HeaderFile` stands for an EDPS file: ``get_keyword_value`` reads a FITS header by the
EDPS spelling of its keywords (``dpr.type`` is ``ESO DPR TYPE``), and ``night`` is the night
of its ``MJD-OBS`` as the soxs catalogue dates it (:func:`soxs_archive.catalogue.night_of`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCIENCE = "SCIENCE"
QC1_CALIB = "QC1_CALIB"


@dataclass
class Recorded:
    rules: list[ClassificationRule] = field(default_factory=list)
    data_sources: list[DataSource] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    match_rules: list[MatchRules] = field(default_factory=list)

    def clear(self) -> None:
        for items in (self.rules, self.data_sources, self.tasks, self.match_rules):
            items.clear()


RECORDED = Recorded()


# ----------------------------------------------------------------------------- files
def fits_keyword(edps_keyword: str) -> str:
    """``det.win1.binx`` -> ``ESO DET WIN1 BINX``; ``mjd-obs`` -> ``MJD-OBS``."""
    if "." in edps_keyword:
        return "ESO " + edps_keyword.upper().replace(".", " ")
    return edps_keyword.upper()


class HeaderFile:
    """A file as EDPS sees it: its header's keywords by their EDPS spelling."""

    def __init__(self, header: Mapping[str, Any], path: str = "") -> None:
        self.header = header
        self.path = path

    def get_keyword_value(self, keyword: str, default: Any = None) -> Any:
        if keyword == "night":
            from soxs_archive.catalogue import night_of

            mjd = self.header.get("MJD-OBS")
            return default if mjd is None else night_of(float(mjd))
        value = self.header.get(fits_keyword(keyword), default)
        return value.strip() if isinstance(value, str) else value


# ----------------------------------------------------------------------------- rules
@dataclass(eq=False)  # compared and hashed by identity, as objects of a workflow
class ClassificationRule:
    name: str
    condition: Mapping[str, Any] | Callable[[Any], bool]

    def matches(self, f: HeaderFile) -> bool:
        if callable(self.condition):
            return bool(self.condition(f))
        return all(f.get_keyword_value(k) == v for k, v in self.condition.items())


def classification_rule(name: str, condition: Mapping[str, Any] | Callable) -> ClassificationRule:
    rule = ClassificationRule(name, condition)
    RECORDED.rules.append(rule)
    return rule


@dataclass(frozen=True)
class RelativeTimeRange:
    left: float
    right: float


@dataclass
class MatchLevel:
    keywords: list[str]
    time_range: RelativeTimeRange
    level: int


@dataclass(eq=False)  # compared and hashed by identity, as objects of a workflow
class MatchRules:
    levels: list[MatchLevel] = field(default_factory=list)

    def with_match_keywords(self, keywords: list[str], time_range: RelativeTimeRange,
                            level: int = 0) -> MatchRules:
        self.levels.append(MatchLevel(list(keywords), time_range, level))
        return self


def match_rules() -> MatchRules:
    rules = MatchRules()
    RECORDED.match_rules.append(rules)
    return rules


# ----------------------------------------------------------------------------- data sources
@dataclass(eq=False)  # compared and hashed by identity, as objects of a workflow
class DataSource:
    name: str
    rules: list[ClassificationRule] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    match: MatchRules = field(default_factory=MatchRules)
    min_group_size: int = 1

    def with_classification_rule(self, rule: ClassificationRule) -> DataSource:
        self.rules.append(rule)
        return self

    def with_grouping_keywords(self, keywords: list[str]) -> DataSource:
        self.grouping = list(keywords)
        return self

    def with_setup_keywords(self, keywords: list[str]) -> DataSource:
        self.setup = list(keywords)
        return self

    def with_match_keywords(self, keywords: list[str], time_range: RelativeTimeRange,
                            level: int = 0) -> DataSource:
        self.match.with_match_keywords(keywords, time_range, level)
        return self

    def with_min_group_size(self, size: int) -> DataSource:
        self.min_group_size = size
        return self

    def build(self) -> DataSource:
        RECORDED.data_sources.append(self)
        return self

    def groups(self, files: list[HeaderFile]) -> list[list[HeaderFile]]:
        """The files this source classifies, grouped by its grouping keywords."""
        found: dict[tuple, list[HeaderFile]] = {}
        for f in files:
            if any(rule.matches(f) for rule in self.rules):
                key = tuple(f.get_keyword_value(k) for k in self.grouping)
                found.setdefault(key, []).append(f)
        return [group for group in found.values() if len(group) >= self.min_group_size]


def data_source(name: str = "") -> DataSource:
    return DataSource(name)


# ----------------------------------------------------------------------------- tasks
@dataclass
class Association:
    source: Task | DataSource
    classes: list[ClassificationRule]
    min_ret: int
    max_ret: int | None
    match_rules: MatchRules | None


@dataclass(eq=False)  # compared and hashed by identity, as objects of a workflow
class Task:
    name: str
    recipe: str = ""
    main_input: DataSource | None = None
    associations: list[Association] = field(default_factory=list)
    output_filter: list[ClassificationRule] = field(default_factory=list)
    meta_targets: list[str] = field(default_factory=list)

    def with_recipe(self, recipe: str) -> Task:
        self.recipe = recipe
        return self

    def with_main_input(self, source: DataSource) -> Task:
        self.main_input = source
        return self

    def with_associated_input(self, source: Task | DataSource,
                              classes: list[ClassificationRule] | None = None, *,
                              min_ret: int = 1, max_ret: int | None = None,
                              match_rules: MatchRules | None = None) -> Task:
        self.associations.append(Association(source, list(classes or []), min_ret, max_ret,
                                             match_rules))
        return self

    def with_output_filter(self, *classes: ClassificationRule) -> Task:
        self.output_filter = list(classes)
        return self

    def with_meta_targets(self, targets: list[str]) -> Task:
        self.meta_targets = list(targets)
        return self

    def build(self) -> Task:
        RECORDED.tasks.append(self)
        return self


def task(name: str) -> Task:
    return Task(name)


# ----------------------------------------------------------------------------- installing
def _modules() -> dict[str, types.ModuleType]:
    edps = types.ModuleType("edps")
    generator = types.ModuleType("edps.generator")
    time_range = types.ModuleType("edps.generator.time_range")
    for name in ("classification_rule", "data_source", "task", "match_rules", "SCIENCE",
                 "QC1_CALIB", "RelativeTimeRange"):
        setattr(edps, name, globals()[name])
    time_range.RelativeTimeRange = RelativeTimeRange
    time_range.ONE_DAY = RelativeTimeRange(-1, 1)
    edps.generator = generator
    generator.time_range = time_range
    return {"edps": edps, "edps.generator": generator, "edps.generator.time_range": time_range}


@contextlib.contextmanager
def installed() -> Iterator[Recorded]:
    """The double as ``edps`` in ``sys.modules`` (a real one, if any, is put back after)."""
    saved = {name: sys.modules.get(name) for name in _modules()}
    sys.modules.update(_modules())
    RECORDED.clear()
    try:
        yield RECORDED
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_COUNTER = iter(range(10**6))


def import_workflow(directory: Path) -> types.ModuleType:
    """Import a workflow package directory's ``<name>_wkf`` module afresh, as EDPS does from
    its ``workflow_dir`` (under a unique package name, so every import records anew)."""
    package = f"_edps_workflow_{next(_COUNTER)}"
    spec = importlib.util.spec_from_file_location(
        package, directory / "__init__.py", submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{directory.name}_wkf")
