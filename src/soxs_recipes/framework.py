"""Declarative recipes: one declaration drives parameters, input checks, man page and products.

A recipe module states its inputs, parameters, products and QC once, as a :class:`RecipeSpec`,
and supplies a ``reduce(context)`` function that calls into :mod:`soxs_core`.  Everything else —
the PyCPL parameter list, ``--params`` and ``--man-page`` text, SOF classification and checks,
per-arm default resolution, DFS product headers, atomic writing — lives here, once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import math
import os
import re
import textwrap
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from soxs_core import __version__
from soxs_core.calib import arm_defaults, qc_ranges
from soxs_core.detector.instruments import ARMS, Arm, arm_from_header
from soxs_core.detector.quality import legend as qual_legend
from soxs_core.detector.rawframe import RawFrame
from soxs_core.echelle.ordertable import OrderTable, read_order_table
from soxs_core.errors import InputError
from soxs_core.io.compressed import ScratchDir
from soxs_core.io.fits import Card
from soxs_core.io.image import DetectorImage, image_hdus, read_image_product
from soxs_core.io.products import (
    QC_SUMMARY,
    FrameRef,
    ParamRecord,
    ProductInfo,
    QcMeasurements,
    QcValue,
    dfs_header,
    dicb_sorted,
    qc_comment_room,
    write_product_atomic,
    write_table_product_atomic,
)
from soxs_core.io.safety import (
    find_same_file,
    remove_stale_scratch,
    remove_stale_temporaries,
    thaw_collector,
)

from .compat import drs_id, ui

__all__ = [
    "Param", "InputSpec", "OutputSpec", "QcSpec", "RecipeSpec", "RecipeContext",
    "Product", "execute", "parameter_list", "man_page", "params_text", "recipe_class_attrs",
]

log = logging.getLogger("soxs")

AUTHOR = "soxs developers"
EMAIL = "soxs-pipeline@example.org"
COPYRIGHT = "GPL-3.0-or-later; (C) 2026 soxs developers"


@dataclass(frozen=True)
class Param:
    """A recipe parameter.

    ``name`` is the hyphenated command-line alias; the full name is
    ``soxs.<recipe>.<name>``.  Defaults come from ``calib/static/defaults.yaml`` per arm.
    """

    name: str
    type: type
    description: str
    synonyms: tuple[str, ...] = ()
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def full_name(self, recipe: str) -> str:
        return f"soxs.{recipe}.{self.name}"

    def spellings(self, recipe: str) -> set[str]:
        names = {self.name, *self.synonyms}
        names |= {n.replace("-", "_") for n in names}
        return names | {f"soxs.{recipe}.{n}" for n in names}

    def allowed(self) -> str:
        """The values accepted, in words: the choices, or the minimum and maximum."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.type is bool:
            return "true or false"
        if self.minimum is None and self.maximum is None:
            return f"any {self.type.__name__}"
        low = "no minimum" if self.minimum is None else f"minimum {self.minimum:g}"
        high = "no maximum" if self.maximum is None else f"maximum {self.maximum:g}"
        return f"{low}, {high}"

    def convert(self, value: Any, source: str) -> Any:
        """Convert and validate a value; raises InputError naming the parameter.

        Numbers must be finite: NaN, infinities and values that overflow to them (``1e400``)
        are refused like any other value out of range, whatever the source.
        """
        given = value
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no", "t", "f"):
                        raise ValueError(value)
                    value = low in ("true", "1", "yes", "t")
                else:
                    value = bool(value)
            elif self.type in (int, float):
                value = float(value)
                if self.type is int and math.isfinite(value):
                    if value != int(value):
                        raise ValueError(value)
                    value = int(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{source}: parameter {self.name}={given!r} is not a valid "
                             f"{self.type.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{source}: parameter {self.name}={given!r} is not a finite "
                             "number")
        if self.choices and value not in self.choices:
            raise InputError(f"{source}: parameter {self.name}={value!r} is not one of "
                             f"{', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise InputError(f"{source}: parameter {self.name}={value!r} is below the minimum "
                             f"{self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise InputError(f"{source}: parameter {self.name}={value!r} is above the maximum "
                             f"{self.maximum}")
        return value


def normalised_tag(tag: str) -> str:
    """An SOF tag as matched: commas as underscores (soxspipe 0.17.4's organiser writes
    ``LAMP,FLAT_NIR`` where ESO's convention is ``LAMP_FLAT_NIR``), upper case."""
    return tag.strip().replace(",", "_").upper()


@dataclass(frozen=True)
class InputSpec:
    """One kind of input frame, tagged ``<tag stem>_<ARM>`` in the SOF.

    Attributes
    ----------
    stem : str
        Name of the input (``LAMP_FLAT``); also the first tag stem.
    tag_stems : tuple of str
        Further tag stems accepted as synonyms (older short forms, soxspipe's spelling).
    frame_types : tuple of str
        RAW inputs: the header classifications (:data:`soxs_core.detector.rawframe.
        FRAME_TYPES` stems) a frame must have to be taken as this input.  Two inputs may
        share a tag (NIR lamp-on and lamp-off flats are both ``LAMP_FLAT_NIR``): the header
        decides.  Empty means ``(stem,)``.
    match : tuple of str
        CALIB inputs: the :class:`soxs_archive.model.FrameRecord` setup keys (``binning``,
        ``readout``, ``exptime``, ``slit``...) a calibration must share with the step's raw
        frames to be associated with them; instrument and arm always match.
    associate : bool
        CALIB inputs: whether an organiser looks for this calibration.  False for an optional
        one that is used only when listed by hand (UVB/VIS master darks in stare: the CCDs'
        dark current is negligible, ESO's association leaves them out).
    same_exptime : bool
        RAW inputs: the frames of one run must share an exposure time; an organiser makes
        one step per exposure time found.
    exptime_of : str
        RAW inputs: the stem of the input whose exposure time these frames must have (NIR
        lamp-off flats that of the lamp-on ones).
    """

    stem: str
    group: str  # "RAW" or "CALIB"
    description: str
    min_count: int = 1
    max_count: int | None = None
    required: bool = True
    arms: tuple[str, ...] = ("UVB", "VIS", "NIR")
    tag_stems: tuple[str, ...] = ()
    frame_types: tuple[str, ...] = ()
    match: tuple[str, ...] = ()
    associate: bool = True
    same_exptime: bool = False
    exptime_of: str = ""

    def tags(self) -> list[str]:
        """Every tag accepted, the preferred one of each arm first."""
        stems = dict.fromkeys((self.stem, *self.tag_stems))
        return [f"{stem}_{arm}" for stem in stems for arm in self.arms]

    def accepts_frame_type(self, frame_type: str | None) -> bool:
        return frame_type in (self.frame_types or (self.stem,))


@dataclass(frozen=True)
class OutputSpec:
    """One product: its label and DFS classification (PRO CATG = ``<catg>_<ARM>``).

    Attributes
    ----------
    kind : str
        ``image`` (FLUX/QUAL/ERRS), ``table`` (FITS tables), ``plot`` (a QC PDF) or ``text``
        (an ASCII version of a product); plots and texts are not DFS products: no PRO
        keywords, not in the products SOF.
    suffix : str
        Added to the file name when several products share a PRO CATG (UVB per-lamp ones).
    arms : tuple of str
        The arms that write it.
    raw_inputs : tuple of str
        The RAW inputs (stems) whose runs write it (a response only from a flux standard);
        empty: runs of any of them.
    keywords : tuple of (keyword, value, comment)
        Header cards that tell it apart from the products of the same PRO CATG (the UVB
        per-lamp master flats: ``ESO PRO FLAT LAMP``); organisers leave such products out
        where the PRO CATG alone is asked for.
    """

    label: str
    catg: str
    description: str
    type: str = "REDUCED"
    tech: str = "IMAGE"
    kind: str = "image"
    suffix: str = ""
    arms: tuple[str, ...] = ("UVB", "VIS", "NIR")
    raw_inputs: tuple[str, ...] = ()
    keywords: tuple[tuple[str, str, str], ...] = ()

    def catg_for(self, arm: Arm) -> str:
        return f"{self.catg}_{arm.name}"

    def filename_for(self, arm: Arm) -> str:
        """Base name of the product file for ``arm`` (``master_bias_vis.fits``)."""
        extra = f"_{self.suffix}" if self.suffix else ""
        ext = {"plot": "pdf", "text": "txt"}.get(self.kind, "fits")
        return f"{self.catg_for(arm).lower()}{extra}.{ext}"

    def written_for(self, arm: Arm) -> bool:
        return arm.name in self.arms


@dataclass(frozen=True)
class QcSpec:
    """A QC keyword written as ``ESO QC <name>``.

    The recipe's science returns a value under ``name``; the header card gets
    :attr:`header_comment`, the man page and the README get ``description`` and ``unit``.

    Attributes
    ----------
    name : str
        Keyword after ``ESO QC``, e.g. ``RAW RON``.
    comment : str
        Short header comment; with `` [unit]`` added it must fit on the card beside any value
        (checked here, so a declaration that does not fit fails at import).
    description : str
        What the value is and how it is measured.
    unit : str
        Unit of the value, empty for counts and ratios.
    products : tuple of str
        Labels of the outputs that carry it (e.g. only the stitched UVB master flat); empty:
        every product the QC measurements are written with.
    arms : tuple of str
        The arms whose products carry it.
    """

    name: str
    comment: str
    description: str
    unit: str = ""
    products: tuple[str, ...] = ()
    arms: tuple[str, ...] = ("UVB", "VIS", "NIR")

    def __post_init__(self) -> None:
        room = qc_comment_room(self.name)
        if len(self.header_comment) > room:
            raise ValueError(f"QcSpec {self.name!r}: header comment {self.header_comment!r} "
                             f"is {len(self.header_comment)} characters, the card has room "
                             f"for {room}")

    @property
    def header_comment(self) -> str:
        """The comment of the header card: the short comment and the unit."""
        return f"{self.comment} [{self.unit}]" if self.unit else self.comment

    @property
    def is_template(self) -> bool:
        """A per-order QC: ``<N>`` in the name stands for the order number (``SNR MEDIAN
        O<N>`` -> ``SNR MEDIAN O12``), one keyword per order, none required."""
        return "<N>" in self.name

    def matches(self, name: str) -> bool:
        if not self.is_template:
            return name == self.name
        head, tail = self.name.split("<N>", 1)
        middle = name[len(head):len(name) - len(tail)] if len(name) > len(head) + len(
            tail) else ""
        return name.startswith(head) and name.endswith(tail) and middle.isdigit()

    @property
    def scope(self) -> str:
        """Where it is written when not on every product (``"UVB MFLAT, ORDER LOC only"``),
        else ``""``."""
        arms = "" if set(self.arms) >= {"UVB", "VIS", "NIR"} else "/".join(self.arms) + " "
        products = ", ".join(self.products) + " " if self.products else ""
        return f"{arms}{products}only" if arms or products else ""

    def carried_by(self, arm: Arm, label: str | None) -> bool:
        """Whether the output labelled ``label`` of ``arm`` carries it (None: any output)."""
        return arm.name in self.arms and (not self.products or label is None
                                          or label in self.products)


@dataclass(frozen=True)
class RecipeSpec:
    """Everything a recipe declares.

    Attributes
    ----------
    group_by : tuple of str
        :class:`soxs_archive.model.FrameRecord` keys the raw frames of one run share beyond
        instrument, arm and night (an archive is organised into runs by them).
    raw_inputs_separately : bool
        Frames of different RAW inputs make separate runs (stare: a science target and a
        standard are reduced on their own); otherwise every RAW input of a group goes into
        one run (UVB D2 and QTH flats, NIR lamp-on and lamp-off flats).
    reuse_freed_memory : bool
        The command-line runner lets glibc keep freed large arrays in the heap for reuse
        (:func:`soxs_recipes.runner.reuse_freed_memory`): faster for recipes that make many
        short-lived frame-sized arrays (the masters), a higher memory peak for one whose
        planes live long and differ in size (soxs_stare: 0.94-0.99 GB instead of
        0.87-0.89 GB for an X-shooter VIS frame, in no less time).
    """

    name: str
    synopsis: str
    description: str
    inputs: tuple[InputSpec, ...]
    params: tuple[Param, ...]
    outputs: tuple[OutputSpec, ...]
    qc: tuple[QcSpec, ...] = ()
    group_by: tuple[str, ...] = ()
    raw_inputs_separately: bool = False
    reuse_freed_memory: bool = True

    def param(self, name: str) -> Param:
        for p in self.params:
            if name in p.spellings(self.name):
                return p
        raise KeyError(name)

    def accepted_arms(self) -> list[Arm]:
        """The arms whose raw frames the recipe takes (the arms of its RAW inputs)."""
        names = {name for i in self.inputs if i.group == "RAW" for name in i.arms}
        return [arm for arm in ARMS.values() if arm.name in names]

    def input_for_tag(self, tag: str) -> InputSpec | None:
        """The first input accepting ``tag`` (see :meth:`inputs_for_tag`)."""
        found = self.inputs_for_tag(tag)
        return found[0] if found else None

    def inputs_for_tag(self, tag: str) -> list[InputSpec]:
        """Every input accepting ``tag`` (spelled with commas or underscores)."""
        tag = normalised_tag(tag)
        return [spec for spec in self.inputs if tag in spec.tags()]


def recipe_class_attrs(spec: RecipeSpec) -> dict[str, str]:
    """The seven descriptive class attributes PyCPL requires, from the declaration."""
    return {
        "_name": spec.name, "_version": __version__, "_author": AUTHOR, "_email": EMAIL,
        "_copyright": COPYRIGHT, "_synopsis": spec.synopsis,
        "_description": man_page(spec, include_header=False),
    }


# ------------------------------------------------------------------------------ parameters
def parameter_list(spec: RecipeSpec) -> Any:
    """A ``cpl.ui.ParameterList`` (or stand-in) with generic defaults and CLI aliases."""
    defaults = arm_defaults(spec.name, None)
    params = []
    for p in spec.params:
        default = p.type(defaults[p.name])
        kwargs = dict(name=p.full_name(spec.name), context=f"soxs.{spec.name}",
                      description=_describe_param(spec, p), default=default)
        if p.choices:
            param = ui.ParameterEnum(alternatives=list(p.choices), **kwargs)
        elif p.minimum is not None or p.maximum is not None:
            big = 2**31 - 1 if p.type is int else 1e30
            lo = p.type(p.minimum if p.minimum is not None else -big)
            hi = p.type(p.maximum if p.maximum is not None else big)
            param = ui.ParameterRange(min=lo, max=hi, **kwargs)
        else:
            param = ui.ParameterValue(**kwargs)
        param.cli_alias = p.name
        try:
            param.cfg_alias = p.name
        except Exception:  # older PyCPL may not expose cfg_alias
            pass
        params.append(param)
    return ui.ParameterList(params)


def _per_arm_defaults(spec: RecipeSpec, p: Param) -> str:
    """Defaults of a parameter on the arms the recipe accepts (one value when all agree)."""
    values = {arm.code: arm_defaults(spec.name, arm)[p.name] for arm in spec.accepted_arms()}
    if len(set(map(str, values.values()))) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{code} {value}" for code, value in values.items())


def _describe_param(spec: RecipeSpec, p: Param) -> str:
    """A parameter's help: meaning, allowed values and defaults (man page, PyCPL)."""
    return (f"{p.description} Allowed: {p.allowed()}. "
            f"Default per arm: {_per_arm_defaults(spec, p)}.")


def resolve_parameters(spec: RecipeSpec, settings: Mapping[str, Any] | None,
                       arm: Arm | None) -> dict[str, Any]:
    """Parameter values: arm defaults overridden by explicitly set ones.

    ``settings`` keys may be full names, CLI aliases or the seed pages' underscore spellings.
    """
    values = {p.name: p.type(v) for p, v in zip(
        spec.params, (arm_defaults(spec.name, arm)[p.name] for p in spec.params))}
    if hasattr(settings, "for_arm"):
        settings = settings.for_arm(arm)
    for key, value in (settings or {}).items():
        try:
            p = spec.param(str(key))
        except KeyError:
            raise InputError(f"{spec.name}: unknown parameter {key!r}") from None
        values[p.name] = p.convert(value, spec.name)
    return values


def _explicit_names(spec: RecipeSpec, settings: Mapping[str, Any] | None,
                    arm: Arm | None) -> set[str]:
    """Names of the parameters that ``settings`` sets explicitly for ``arm``."""
    if hasattr(settings, "for_arm"):
        settings = settings.for_arm(arm)
    names = set()
    for key in settings or {}:
        try:
            names.add(spec.param(str(key)).name)
        except KeyError:
            continue
    return names


# ------------------------------------------------------------------------------ text
def params_text(spec: RecipeSpec, arm: Arm | None = None) -> str:
    """The ``--params`` listing: name, alias, value and meaning of every parameter."""
    values = resolve_parameters(spec, None, arm)
    lines = [f"Parameters of {spec.name}"
             + (f" for {arm.instrument} {arm.name}" if arm else " (generic defaults; "
                "the data's instrument and arm select the value used)") + ":", ""]
    for p in spec.params:
        lines.append(f"  --{p.name}  [{p.full_name(spec.name)}]")
        lines.append(f"      value: {values[p.name]}   (type {p.type.__name__}; "
                     f"{p.allowed()})")
        lines.append(f"      per arm: {_per_arm_defaults(spec, p)}")
        for chunk in textwrap.wrap(p.description, 88):
            lines.append(f"      {chunk}")
        if p.synonyms:
            lines.append(f"      synonyms: {', '.join(p.synonyms)}")
    return "\n".join(lines)


def man_page(spec: RecipeSpec, include_header: bool = True) -> str:
    """Manual page generated from the declaration."""
    out = []
    if include_header:
        out += [f"NAME\n  {spec.name} -- {spec.synopsis}", ""]
    out += ["DESCRIPTION"]
    out += ["  " + line for line in textwrap.wrap(" ".join(spec.description.split()), 88)]
    out += ["", "INPUT FRAMES (SOF tags)"]
    for inp in spec.inputs:
        count = f"{inp.min_count}+" if inp.max_count is None else (
            f"{inp.min_count}" if inp.min_count == inp.max_count else
            f"{inp.min_count}-{inp.max_count}")
        need = "required" if inp.required else "optional"
        out.append(f"  {' | '.join(inp.tags())}  ({inp.group}, {need}, {count})")
        out += ["      " + line for line in textwrap.wrap(inp.description, 84)]
    out += ["", "PARAMETERS"]
    for p in spec.params:
        out.append(f"  --{p.name}  ({p.type.__name__}) {p.full_name(spec.name)}")
        out += ["      " + line for line in textwrap.wrap(_describe_param(spec, p), 84)]
    out += ["", "PRODUCTS"]
    for o in spec.outputs:
        arms = "" if set(o.arms) >= {"UVB", "VIS", "NIR"} else f" ({'/'.join(o.arms)} only)"
        if o.kind == "plot":
            out.append(f"  {o.label}: QC plot {o.catg.lower()}_<arm>"
                       f"{'_' + o.suffix if o.suffix else ''}.pdf{arms}")
        else:
            out.append(f"  {o.label}: PRO CATG {o.catg}_<ARM>, PRO TYPE {o.type}, "
                       f"PRO TECH {o.tech}{arms}")
        out += ["      " + line for line in textwrap.wrap(o.description, 84)]
    if spec.qc:
        out += ["", "QC KEYWORDS"]
        for q in spec.qc:
            unit = f" [{q.unit}]" if q.unit else ""
            only = f" ({q.scope})" if q.scope else ""
            text = (f"ESO QC {q.name}{unit}{only}: {q.description}"
                    f"{_qc_ranges_text(spec, q)}.")
            out += textwrap.wrap(text, 88, initial_indent="  ", subsequent_indent="      ")
        out += [f"  ESO QC {name}: {meaning}." for name, meaning in QC_SUMMARY]
        out += ["  A QC value that cannot be computed is left out, and the log says why."]
    out += ["", "IMAGE PRODUCTS", "  FLUX (e-), QUAL (uint8 bits, 0 = good), ERRS (1-sigma e-).",
            "  QUAL bits:"]
    width = max(len(name) for _, name, _ in qual_legend())
    out += [f"  {value:>5}  {name:<{width}}  {meaning}" for value, name, meaning in qual_legend()]
    return "\n".join(out)


def _qc_ranges_text(spec: RecipeSpec, q: QcSpec) -> str:
    """`` Acceptable range: <arm> (min, max), ...`` on the arms that have one, else ``""``."""
    ranges = [(arm.code, qc_ranges(spec.name, arm).get(q.name)) for arm in spec.accepted_arms()]
    ranges = [f"{code} ({low:g}, {high:g})" for code, r in ranges if r for low, high in [r]]
    return f". Acceptable range: {', '.join(ranges)}" if ranges else ""


# ------------------------------------------------------------------------------ running
@dataclass
class Product:
    """A written product."""

    path: Path
    tag: str


@dataclass
class RecipeContext:
    """What a recipe's ``reduce`` function receives and uses to write products."""

    spec: RecipeSpec
    arm: Arm
    params: dict[str, Any]
    raw: dict[str, list[RawFrame]]
    calib: dict[str, list[tuple[Path, str]]]
    output_dir: Path
    overwrite: bool = False
    products: list[Product] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    _calib_refs: list[FrameRef] = field(default_factory=list)
    _raw_refs: list[FrameRef] = field(default_factory=list)
    #: every plot path handed out, for :meth:`remove_outputs` when the run fails
    _plot_paths: dict[Path, int | None] = field(default_factory=dict)
    #: whether the recipe's acceptable QC ranges are checked (soxs_stare: standards only)
    apply_qc_ranges: bool = True
    #: QC omissions already logged (name, reason): said once per run, not once per product
    _omissions_logged: set[tuple[str, str]] = field(default_factory=set)

    def raw_frames(self, stem: str) -> list[RawFrame]:
        return self.raw.get(stem, [])

    def qc_ranges(self) -> dict:
        return qc_ranges(self.spec.name, self.arm)

    def calib_image(self, stem: str) -> DetectorImage | None:
        """Read the (single) calibration image product tagged ``<stem>_<ARM>``, if given."""
        entries = self.calib.get(stem, [])
        if not entries:
            return None
        path, tag = entries[0]
        image = read_image_product(path)
        try:
            arm = arm_from_header(image.header, str(path))
        except InputError:
            arm = None
        if arm is not None and arm is not self.arm:
            raise InputError(f"{path}: calibration is for {arm.instrument} {arm.name}, the "
                             f"raw frames are {self.arm.instrument} {self.arm.name}")
        catg = str(image.header.get("ESO PRO CATG", "")).strip()
        if catg and catg != tag:
            raise InputError(f"{path}: tagged {tag} but its PRO CATG is {catg}")
        first = next(iter(self.raw.values()))[0]
        if image.shape != first.prepared_shape:
            raise InputError(f"{path}: calibration is {image.shape[1]}x{image.shape[0]} px, "
                             f"the {first.binning} raw frames are {first.prepared_shape[1]}x"
                             f"{first.prepared_shape[0]} px (different binning?)")
        self._calib_refs.append(FrameRef(path=path, tag=tag,
                                         md5=str(image.header.get("DATAMD5", "")) or None))
        return image

    def calib_order_table(self, stem: str) -> OrderTable | None:
        """Read the order table tagged ``<stem>_<ARM>``, if given, checked against the arm."""
        entries = self.calib.get(stem, [])
        if not entries:
            return None
        path, tag = entries[0]
        table = read_order_table(path)
        catg = str(table.header.get("ESO PRO CATG", ("",))[0]).strip()
        if catg and catg != tag:
            raise InputError(f"{path}: tagged {tag} but its PRO CATG is {catg}")
        arm_card = table.header.get("ESO SEQ ARM")
        inst_card = table.header.get("INSTRUME")
        arm_name = str(arm_card[0]).strip().upper() if arm_card else None
        instrument = str(inst_card[0]).strip().upper() if inst_card else None
        if instrument == "SHOOT":  # the organiser's older spelling of XSHOOTER
            instrument = "XSHOOTER"
        if (arm_name and arm_name != self.arm.name) or (
                instrument and instrument != self.arm.instrument):
            raise InputError(f"{path}: order table is for {instrument or ''} "
                             f"{arm_name or ''}".rstrip() + f", the raw frames are "
                             f"{self.arm.instrument} {self.arm.name}")
        if table.dispersion_axis != self.arm.dispersion_axis:
            raise InputError(f"{path}: order table runs along {table.dispersion_axis}, "
                             f"{self.arm.instrument} {self.arm.name} disperses along "
                             f"{self.arm.dispersion_axis} (another arm's table?)")
        self._calib_refs.append(FrameRef(path=path, tag=tag, md5=None))
        return table

    def note_calib(self, stem: str) -> None:
        """Record a calibration the science read itself (a table or map) for provenance."""
        for path, tag in self.calib.get(stem, []):
            if all(ref.path != path for ref in self._calib_refs):
                self._calib_refs.append(FrameRef(path=path, tag=tag, md5=None))

    def declared_qc(self, qc: QcMeasurements, output: str | None = None
                    ) -> dict[str, QcValue]:
        """Each declared QC with its value (or why it has none), comment and range.

        ``output`` is the label of the product being written: a QC declared for other
        products only is neither required nor allowed there.

        Raises
        ------
        RuntimeError
            When ``qc`` holds a name the recipe does not declare, or leaves a declared QC
            without a value or a reason: a bug in the recipe, which the tests catch.
        """
        own = [q for q in self.spec.qc if q.carried_by(self.arm, output)]
        declared = {q.name: q for q in own if not q.is_template}
        templates = [q for q in own if q.is_template]
        for name in sorted(qc.names() - set(declared)):
            template = next((q for q in templates if q.matches(name)), None)
            if template is not None:
                declared[name] = template
        stray = sorted(qc.names() - set(declared))
        if stray:
            raise RuntimeError(f"{self.spec.name}: QC {', '.join(stray)} not declared in its "
                               "RecipeSpec")
        silent = [name for name, q in declared.items()
                  if name not in qc.names() and not q.is_template]
        if silent:
            raise RuntimeError(f"{self.spec.name}: declared QC {', '.join(silent)} given "
                               "neither a value nor the reason it has none")
        ranges = self.qc_ranges() if self.apply_qc_ranges else {}
        values = {}
        for name, q in declared.items():
            value = QcValue(value=qc.values.get(name), comment=q.header_comment,
                            valid_range=ranges.get(name),
                            missing_reason=qc.missing.get(name, ""))
            if not value.computed:
                said = (name, value.missing_reason)
                value = replace(value, report_missing=said not in
                                            self._omissions_logged)
                self._omissions_logged.add(said)
            values[name] = value
        return values

    def param_records(self) -> list[ParamRecord]:
        """The parameters as the product records them: CLI alias, value used, this arm's
        default and the help text PyCPL's parameter list carries."""
        defaults = arm_defaults(self.spec.name, self.arm)
        return [ParamRecord(name=p.name, value=self.params[p.name],
                            default=p.type(defaults[p.name]),
                            help=_describe_param(self.spec, p))
                for p in self.spec.params]

    def _product_header(self, output: OutputSpec, qc: QcMeasurements,
                        frames: Sequence[RawFrame] | None = None):
        """The DFS header of a product, its file name and its QC cards.

        ``frames`` are the raw frames the product was made from (the UVB per-lamp products
        name their own lamp's frames only); all raw frames by default.
        """
        catg = output.catg_for(self.arm)
        header_qc = self.declared_qc(qc, output.label)
        for name, item in header_qc.items():
            if item.out_of_range:
                low, high = item.valid_range
                log.warning("%s: QC %s = %.4g is outside the acceptable range (%g, %g)",
                            catg, name, item.value, low, high)
        filename = output.filename_for(self.arm)
        used = {f.path for f in frames} if frames is not None else None
        raw_refs = [r for r in self._raw_refs if used is None or r.path in used]
        # CPL inherits from the first raw frame of the set of frames; PRO SCIENCE follows its
        # DPR CATG (science=None)
        first = raw_refs[0].path
        first_frame = next(f for group in self.raw.values() for f in group if f.path == first)
        header = dfs_header(
            recipe=self.spec.name,
            product=ProductInfo(catg=catg, type=output.type, tech=output.tech, science=None,
                                qc=header_qc),
            filename=filename,
            raw_frames=raw_refs,
            calib_frames=self._calib_refs,
            parameters=self.param_records(),
            inherit_from=first_frame.header,
            drs_id=drs_id(),
        )
        # As CPL recipes do, the product states the exposure time of what it combines: CPL
        # does not inherit EXPTIME, and calibration association matches darks by it.
        header["EXPTIME"] = (first_frame.exptime, "[s] exposure time of the combined frames")
        for keyword, value, comment in output.keywords:
            header[f"HIERARCH {keyword}"] = (value, comment)
        if output.kind == "image":
            # soxspipe reads a prepared frame's binning from CDELT1/2 (pixel size in detector
            # pixels); ours are prepared frames too
            header["CDELT1"] = (float(first_frame.binx), "binning along x")
            header["CDELT2"] = (float(first_frame.biny), "binning along y")
        header = with_input_checksums(header, raw_refs, self._calib_refs)
        return dicb_sorted(header), filename, header_qc

    def _protected(self) -> list[Path]:
        protected = [f.path for frames in self.raw.values() for f in frames]
        return protected + [p for entries in self.calib.values() for p, _ in entries]

    def _record(self, path: Path, catg: str, header_qc: Mapping[str, QcValue]) -> Product:
        product = Product(path=path, tag=catg)
        self.products.append(product)
        log.info("%s: wrote %s (%s)", self.spec.name, path, catg)
        for name, item in header_qc.items():
            if item.computed:
                status = "   <-- outside acceptable range" if item.out_of_range else ""
                log.info("  QC %-14s = %s%s", name, _fmt(item.value), status)
        return product

    def save_image(self, output: OutputSpec, image: DetectorImage,
                   qc: QcMeasurements, frames: Sequence[RawFrame] | None = None) -> Product:
        """Write an image product with its full DFS header.

        ``qc`` holds the QC values under their declared names; see :meth:`declared_qc`.
        """
        header, filename, header_qc = self._product_header(output, qc, frames)
        path = write_product_atomic(image_hdus(image, header), self.output_dir / filename,
                                    overwrite=self.overwrite, protected=self._protected())
        return self._record(path, output.catg_for(self.arm), header_qc)

    def save_table(self, output: OutputSpec, hdul_for: Callable[[Any], Any],
                   qc: QcMeasurements, frames: Sequence[RawFrame] | None = None) -> Product:
        """Write a table product: ``hdul_for(primary_header)`` returns its HDUs, ``(header,
        data)`` pairs (e.g. :meth:`OrderTable.to_hdus`) or an ``astropy.io.fits.HDUList``."""
        header, filename, header_qc = self._product_header(output, qc, frames)
        path = write_table_product_atomic(hdul_for(header), self.output_dir / filename,
                                          overwrite=self.overwrite,
                                          protected=self._protected())
        return self._record(path, output.catg_for(self.arm), header_qc)

    def save_text(self, output: OutputSpec, write: Callable[[Path], Any]) -> Path:
        """Write a text output (``write(temporary_path)`` fills it) atomically."""
        from soxs_core.io.safety import write_atomically

        path = self.output_dir / output.filename_for(self.arm)
        if find_same_file(path, self._protected()) is not None:
            raise InputError(f"{path}: the {output.label} file would overwrite an input")
        if path.exists() and not self.overwrite:
            raise InputError(f"{path}: exists already (use --overwrite to replace it)")
        write_atomically(path, write)
        self.plots.append(path)
        log.info("%s: wrote %s (%s)", self.spec.name, path, output.label)
        return path

    def plot_path(self, output: OutputSpec) -> Path:
        """Where a QC plot goes; the plotting function writes it atomically."""
        path = self.output_dir / output.filename_for(self.arm)
        if find_same_file(path, self._protected()) is not None:
            raise InputError(f"{path}: the {output.label} plot would overwrite an input")
        self._plot_paths.setdefault(path, path.stat().st_mtime_ns if path.exists() else None)
        return path

    def remove_outputs(self) -> list[Path]:
        """Delete what this run wrote (its products, and the plots it wrote at the paths it
        handed out): a failed run leaves no part of its output."""
        removed = []
        for path in [p.path for p in self.products]:
            with contextlib.suppress(OSError):
                Path(path).unlink()
                removed.append(Path(path))
        for path, before in self._plot_paths.items():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime_ns != before:
                    path.unlink()
                    removed.append(path)
        return removed

    def record_plot(self, output: OutputSpec, path: Path) -> None:
        self.plots.append(path)
        log.info("%s: wrote %s (%s)", self.spec.name, path, output.label)


def _md5_key(path: str | os.PathLike) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


#: MD5s being computed in the background (:func:`prefetch_md5`), by :func:`_md5_key`
_MD5_PENDING: dict[tuple[str, int, int], concurrent.futures.Future] = {}
_MD5_LOCK = threading.Lock()


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file's bytes (as stored: a compressed file's compressed bytes)."""
    key = _md5_key(path)
    with _MD5_LOCK:
        pending = _MD5_PENDING.pop(key, None)
    if pending is not None:
        return pending.result()  # (its value is in _file_md5's cache from now on)
    return _file_md5(*key)


def prefetch_md5(paths: Iterable[str | os.PathLike]) -> None:
    """Start hashing the files in a background thread, so that their MD5s (every product's
    processing record names its inputs' MD5s) are ready when the products are written: a
    few tenths of a second of reading and hashing that overlap the reduction, hashlib
    releasing the GIL.  Files that cannot be looked up are left to :func:`file_md5`."""
    keys = []
    for path in paths:
        try:
            keys.append(_md5_key(path))
        except OSError:
            continue
    if not keys:
        return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="soxs-md5")
    with _MD5_LOCK:
        for key in dict.fromkeys(keys):
            if key not in _MD5_PENDING:
                _MD5_PENDING[key] = pool.submit(_file_md5, *key)
    pool.shutdown(wait=False)


@functools.lru_cache(maxsize=256)
def _file_md5(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so that a file rewritten in place is read again
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def with_input_checksums(header: Any, raw_refs: Sequence[FrameRef],
                         calib_refs: Sequence[FrameRef]) -> Any:
    """``header`` with ``ESO PRO RECi RAWj MD5`` / ``CALj MD5`` after each input's CATG card.

    The MD5 of each input file's bytes, in the product's own (last) processing record: what a
    rerun compares with its inputs to know whether the product is still up to date (CPL's
    ``CALj DATAMD5`` covers a calibration's data only, and raw frames not at all).
    """
    level = max(int(m[1]) for key in header.keys()
                if (m := re.fullmatch(r"ESO PRO REC(\d+) ID", key)))
    catg = re.compile(rf"ESO PRO REC{level} (RAW|CAL)(\d+) CATG")
    refs = {"RAW": raw_refs, "CAL": calib_refs}
    cards = []
    for card in header.cards:
        cards.append(card)
        if m := catg.fullmatch(card.keyword):
            ref = refs[m[1]][int(m[2]) - 1]
            cards.append(Card(f"ESO PRO REC{level} {m[1]}{m[2]} MD5", file_md5(ref.path),
                              "file MD5"))
    return type(header)(cards)


def _fmt(value: Any) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def check_output_dir(path: Path) -> Path:
    """Create the output directory if needed, check it is writable and tidy it.

    Temporary files that killed runs of ours left there, and their scratch directories of
    decompressed inputs, are removed (see :mod:`soxs_core.io.safety`).
    """
    try:
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: output directory is not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create output directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output directory is not writable")
    for stale in [*remove_stale_temporaries(path), *remove_stale_scratch()]:
        log.info("removed %s, left by an interrupted run", stale)
    return path


def _check_products_can_be_written(spec: RecipeSpec, arm: Arm, output_dir: Path,
                                   inputs: Sequence[str], overwrite: bool) -> None:
    """Refuse, before any reduction, a product that would replace an input or, without
    ``overwrite``, an existing file (the writer checks again when it writes)."""
    for output in spec.outputs:
        if not output.written_for(arm):
            continue
        path = output_dir / output.filename_for(arm)
        if find_same_file(path, inputs) is not None:
            raise InputError(f"{path}: the {output.label} product would overwrite an input "
                             "frame (choose another --output-dir)")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, the {output.label} product cannot be "
                             "written")
        if path.exists() and not overwrite:
            raise InputError(f"{path}: product exists already (use --overwrite to replace "
                             "it)")


def execute(spec: RecipeSpec, frames: Iterable[tuple[str, str]], settings: Mapping | None,
            reduce: Callable[[RecipeContext], None], output_dir: str | os.PathLike = ".",
            overwrite: bool = False) -> list[Product]:
    """Classify and check the input frames, resolve parameters and run ``reduce``.

    Parameters
    ----------
    spec : RecipeSpec
    frames : iterable of (path, tag)
        The SOF content.
    settings : mapping
        Explicitly set parameters (any spelling).
    reduce : callable
        The recipe's science: receives a :class:`RecipeContext` and writes products with it.
    output_dir : path-like
    overwrite : bool
        Replace existing products.

    Returns
    -------
    list of Product

    Raises
    ------
    InputError, ProductError
        With a one-line message naming the file and the problem.
    """
    frames = [(str(p), str(t).strip()) for p, t in frames]
    if not frames:
        raise InputError(f"{spec.name}: the set of frames is empty")
    output_dir = check_output_dir(Path(output_dir))
    raw_specs = {i.stem: i for i in spec.inputs if i.group == "RAW"}
    scratch = ScratchDir()
    raw: dict[str, list[RawFrame]] = {}
    calib: dict[str, list[tuple[Path, str]]] = {}
    raw_refs: list[FrameRef] = []
    try:
        for path_text, tag in frames:
            path = Path(path_text)
            candidates = spec.inputs_for_tag(tag)
            if not candidates:
                known = ", ".join(dict.fromkeys(t for i in spec.inputs for t in i.tags()))
                raise InputError(f"{path}: unknown tag {tag!r} for {spec.name} "
                                 f"(expected one of {known})")
            inp = candidates[0]
            try:
                found = path.exists()
            except OSError as exc:  # e.g. a name longer than the file system allows
                raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
            if not found:
                raise InputError(f"{path}: file not found")
            if inp.group == "RAW":
                frame = RawFrame.open(path, scratch)
                fitting = [i for i in candidates if i.accepts_frame_type(frame.frame_type)]
                if not fitting or normalised_tag(tag).rsplit("_", 1)[-1] != frame.arm.name:
                    raise InputError(f"{path}: tagged {tag} but its header says "
                                     f"{frame.tag or frame.dpr_type} (DPR TYPE "
                                     f"{frame.dpr_type}, TECH {frame.dpr_tech})")
                inp = fitting[0]
                raw.setdefault(inp.stem, []).append(frame)
                raw_refs.append(FrameRef(path=path, tag=normalised_tag(tag)))
            else:
                calib.setdefault(inp.stem, []).append((path, normalised_tag(tag)))
            log.debug("%s: %s is a %s frame tagged %s", spec.name, path, inp.group, tag)
        all_raw = [f for group in raw.values() for f in group]
        if not all_raw:
            wanted = " or ".join(dict.fromkeys(t for i in raw_specs.values() if i.required
                                               for t in i.tags()[:len(i.arms)]))
            raise InputError(f"{spec.name}: no raw frame in the input (expected {wanted})")
        arm = all_raw[0].arm
        for frame in all_raw[1:]:
            if frame.arm is not arm:
                raise InputError(f"{frame.path}: {frame.arm.instrument} {frame.arm.name} "
                                 f"frame mixed with {arm.instrument} {arm.name} frames")
        for inp in spec.inputs:
            given = raw.get(inp.stem) if inp.group == "RAW" else calib.get(inp.stem)
            if inp.required and arm.name in inp.arms and not given:
                raise InputError(f"{spec.name}: no {inp.stem}_{arm.name} frame in the input "
                                 f"({inp.description})")
        for inp in spec.inputs:
            count = len(raw.get(inp.stem, [])) if inp.group == "RAW" else len(
                calib.get(inp.stem, []))
            if inp.max_count is not None and count > inp.max_count:
                raise InputError(f"{spec.name}: {count} {inp.stem}_{arm.name} frames given, "
                                 f"at most {inp.max_count} allowed")
        params = resolve_parameters(spec, settings, arm)
        explicit = _explicit_names(spec, settings, arm)
        for name, value in params.items():
            log.debug("%s: parameter %s = %r (%s)", spec.name, name, value,
                      "set explicitly" if name in explicit else
                      f"default for {arm.instrument} {arm.name}")
        _check_products_can_be_written(spec, arm, output_dir, [p for p, _ in frames],
                                       overwrite)
        context = RecipeContext(spec=spec, arm=arm, params=params, raw=raw, calib=calib,
                                output_dir=output_dir, overwrite=overwrite,
                                _raw_refs=raw_refs)
        log.info("%s %s on %d frame(s) of %s %s", spec.name, __version__, len(frames),
                 arm.instrument, arm.name)
        prefetch_md5(p for p, _ in frames)
        try:
            reduce(context)
        except BaseException:
            for path in context.remove_outputs():
                log.info("removed %s: the run that wrote it failed", path)
            raise
        return context.products
    finally:
        for group in raw.values():
            for frame in group:
                frame.close()
        scratch.cleanup()
        thaw_collector()


_FITS_MAGIC = b"SIMPLE  ="
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\x1f\x9d", b"BZh", b"\xfd7zXZ")


def _exists(path: Path) -> bool:
    """``path.exists()``, false for a name the system cannot look up (too long, say)."""
    try:
        return path.exists()
    except OSError:
        return False


def read_text_input(path: str | os.PathLike, what: str) -> str:
    """The text of an input text file (SOF, rc or settings file), or one clear refusal.

    A UTF-8 byte-order mark is dropped (editors on Windows write one).

    Raises
    ------
    InputError
        Naming the file, when it is missing, unreadable, a FITS or compressed file, or not
        UTF-8 text.
    """
    path = Path(path)
    article = "an" if what in ("SOF", "rc") or what[0] in "aeiou" else "a"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not {article} {what} file") from None
    except OSError as exc:
        raise InputError(f"{path}: {what} file cannot be read ({exc.strerror or exc})") \
            from None
    if data.startswith(_FITS_MAGIC):
        raise InputError(f"{path}: is a FITS file, not {article} {what} file")
    if data.startswith(_COMPRESSED_MAGIC):
        raise InputError(f"{path}: is a compressed file, not {article} {what} file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: is a binary file, not {article} {what} file (byte "
                         f"{exc.start} is not UTF-8 text)") from None
    if "\x00" in text:
        raise InputError(f"{path}: is a binary file, not {article} {what} file (it holds NUL "
                         "bytes)")
    return text


def frames_from_sof(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(path, tag)`` pairs of an SOF file.

    A relative path is taken relative to the SOF's directory when the file is there (as
    PyCPL's FrameSet does), otherwise relative to the current directory (as esorex does).

    Raises
    ------
    InputError
        When the SOF is missing, unreadable or has a line without a tag.
    """
    path = Path(path)
    text = read_text_input(path, "SOF")
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise InputError(f"{path}: line {number} has no tag ({line.strip()!r})")
        frame = Path(fields[0]).expanduser()
        if not frame.is_absolute() and _exists(path.parent / frame):
            frame = path.parent / frame
        out.append((str(frame), fields[1]))
    if not out:
        raise InputError(f"{path}: SOF lists no frames")
    return out


def frames_from_frameset(frameset: Any) -> list[tuple[str, str]]:
    """``(path, tag)`` pairs from a ``cpl.ui.FrameSet`` (real or stand-in)."""
    return [(str(f.file), str(f.tag)) for f in frameset]


def product_frameset(products: Sequence[Product]) -> Any:
    """A FrameSet of PRODUCT frames, as a PyRecipe's ``run`` returns."""
    out = ui.FrameSet()
    for p in products:
        out.append(ui.Frame(str(p.path), tag=p.tag, group=ui.Frame.FrameGroup.PRODUCT,
                            level=ui.Frame.FrameLevel.FINAL,
                            frameType=ui.Frame.FrameType.IMAGE))
    return out
