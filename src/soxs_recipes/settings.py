"""Where explicitly set parameter values come from: rc files, soxspipe YAML, the command line.

Values may depend on the arm (soxspipe settings have ``uvb``/``vis``/``nir`` blocks), which is
known only once the frames are read; :class:`ArmSettings` therefore resolves late, through
``for_arm``.
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soxs_core import __version__
from soxs_core.calib import arm_defaults
from soxs_core.detector.instruments import Arm
from soxs_core.errors import InputError

from .framework import RecipeSpec, read_text_input, resolve_parameters

__all__ = ["ArmSettings", "read_recipe_config", "read_soxspipe_settings",
           "recipe_config_text"]

log = logging.getLogger(__name__)


@dataclass
class ArmSettings:
    """Explicit parameter values, common and per arm name (``UVB``/``VIS``/``NIR``)."""

    common: dict[str, Any] = field(default_factory=dict)
    per_arm: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update_from(self, other: ArmSettings) -> None:
        self.common.update(other.common)
        for arm, values in other.per_arm.items():
            self.per_arm.setdefault(arm, {}).update(values)

    def for_arm(self, arm: Arm | None) -> dict[str, Any]:
        out = dict(self.common)
        if arm is not None:
            out.update(self.per_arm.get(arm.name, {}))
        return out

    def items(self):
        return self.common.items()


def read_recipe_config(path: str | os.PathLike, spec: RecipeSpec) -> ArmSettings:
    """Read an ESO rc file (``soxs.<recipe>.<param>=value`` lines, ``#`` comments).

    Values are checked as they are read, so that a bad one is reported with its file and line.
    """
    path = Path(path)
    text = read_text_input(path, "rc")
    values: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise InputError(f"{path}: line {number} is not name=value")
        name = name.strip()
        try:
            param = spec.param(name)
        except KeyError:
            raise InputError(f"{path}: line {number}: unknown parameter {name!r} for "
                             f"{spec.name}") from None
        values[param.name] = param.convert(value.strip().strip('"'), f"{path}: line {number}")
    return ArmSettings(common=values)


def read_soxspipe_settings(path: str | os.PathLike | dict, spec: RecipeSpec) -> ArmSettings:
    """Map a soxspipe settings file (or its parsed dict) onto the recipe's parameters.

    The block named like the recipe (``soxs-mbias``) supplies values; its ``uvb``/``vis``/
    ``nir`` sub-blocks apply to that arm only.  Keys of that block that are not parameters of
    ours (soxspipe's QC ranges, plotting switches, a misspelt name ...) are ignored with a
    warning naming the key and the file; values are checked as they are read.
    """
    if isinstance(path, dict):
        data = path
        source = "settings"
    else:
        source = str(path)
        text = read_text_input(path, "settings")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not a valid YAML settings file "
                             f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: settings must be a mapping")
    out = ArmSettings()
    names = [name for name in (spec.name.replace("_", "-"), spec.name)
             if isinstance(data.get(name), dict)]
    if not names:
        return out
    block_name = names[0]
    block = data[block_name]
    arm_blocks = ("uvb", "vis", "nir")

    def take(values: dict, target: dict, where: str) -> None:
        for key, value in values.items():
            if where == block_name and key in arm_blocks and isinstance(value, dict):
                continue
            if isinstance(value, dict):
                # a sub-block (soxs-stare's detect-continuum, sky-subtraction...): its keys
                # are parameters of the recipe under their own names
                take(value, target, f"{where}.{key}")
                continue
            try:
                param = spec.param(str(key))
            except KeyError:
                log.warning("%s: %s: %r is not a parameter of %s; ignored", source, where,
                            key, spec.name)
                continue
            target[param.name] = param.convert(value, f"{source}: {where}")

    take(block, out.common, block_name)
    for arm_name in arm_blocks:
        if isinstance(block.get(arm_name), dict):
            take(block[arm_name], out.per_arm.setdefault(arm_name.upper(), {}),
                 f"{block_name}.{arm_name}")
    return out


def recipe_config_text(spec: RecipeSpec, settings: ArmSettings | None = None,
                       arm: Arm | None = None) -> str:
    """An ESO rc file of the recipe's parameters (what ``--create-config`` writes).

    With ``arm`` (the arm of the SOF given), every value is the one a run on that arm uses.
    Without, a parameter whose default differs between the arms the recipe accepts is
    written commented out, with its per-arm values: fed back through ``--recipe-config`` the
    file then leaves each arm its own default.  Values set explicitly (``settings``) are
    always written.
    """
    settings = settings or ArmSettings()
    explicit = {spec.param(str(key)).name for key in settings.for_arm(arm)}
    values = resolve_parameters(spec, settings, arm)
    where = (f"for {arm.instrument} {arm.name}" if arm is not None else
             "for any arm: defaults that differ between arms are commented out, so that the "
             "data's arm selects them")

    def comment(text: str) -> list[str]:
        return textwrap.wrap(text, 88, initial_indent="# ", subsequent_indent="# ",
                             break_on_hyphens=False)

    lines = comment(f"{spec.name} {__version__} parameters {where}")
    for p in spec.params:
        lines += comment(f"{p.description} ({p.allowed()})")
        per_arm = {a.code: p.type(arm_defaults(spec.name, a)[p.name])
                   for a in spec.accepted_arms()}
        if arm is None and p.name not in explicit and len(set(per_arm.values())) > 1:
            lines.append("# defaults per arm: " + ", ".join(
                f"{name} {value}" for name, value in per_arm.items()))
            lines.append(f"# {p.full_name(spec.name)}={values[p.name]}")
        else:
            lines.append(f"{p.full_name(spec.name)}={values[p.name]}")
    return "\n".join(lines) + "\n"
