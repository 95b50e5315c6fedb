"""Where explicitly set parameter values come from: rc files, soxspipe YAML, the command line.

Values may depend on the arm (soxspipe settings have ``uvb``/``vis``/``nir`` blocks), which is
known only once the frames are read; :class:`ArmSettings` therefore resolves late, through
``for_arm``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from soxs_core.detector.instruments import Arm
from soxs_core.errors import InputError

from .framework import RecipeSpec

__all__ = ["ArmSettings", "read_recipe_config", "read_soxspipe_settings"]

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
    """Read an ESO rc file (``soxs.<recipe>.<param>=value`` lines, ``#`` comments)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read recipe configuration ({exc.strerror})") \
            from None
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
            spec.param(name)
        except KeyError:
            raise InputError(f"{path}: line {number}: unknown parameter {name!r} for "
                             f"{spec.name}") from None
        values[name] = value.strip().strip('"')
    return ArmSettings(common=values)


def read_soxspipe_settings(path: str | os.PathLike | dict, spec: RecipeSpec) -> ArmSettings:
    """Map a soxspipe settings file (or its parsed dict) onto the recipe's parameters.

    The block named like the recipe (``soxs-mbias``) supplies values; its ``uvb``/``vis``/
    ``nir`` sub-blocks apply to that arm only.  Keys that are not parameters of ours (QC
    ranges, plotting switches, ...) are ignored.
    """
    if isinstance(path, dict):
        data = path
        source = "settings"
    else:
        source = str(path)
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise InputError(f"{path}: cannot read settings file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not a valid YAML settings file "
                             f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: settings must be a mapping")
    block = None
    for key in (spec.name.replace("_", "-"), spec.name):
        if isinstance(data.get(key), dict):
            block = data[key]
            break
    out = ArmSettings()
    if block is None:
        return out

    def take(values: dict, target: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            try:
                param = spec.param(str(key))
            except KeyError:
                log.debug("%s: %s has no parameter %r; ignored", source, spec.name, key)
                continue
            target[param.name] = value

    take(block, out.common)
    for arm_name in ("uvb", "vis", "nir"):
        if isinstance(block.get(arm_name), dict):
            take(block[arm_name], out.per_arm.setdefault(arm_name.upper(), {}))
    return out
