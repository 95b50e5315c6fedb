"""The recipes this package provides, by name."""

from __future__ import annotations

from types import ModuleType

from . import mbias, mdark, mflat, stare

#: recipe name -> module with SPEC, verify(context), reduce(context) and the PyRecipe class
RECIPES: dict[str, ModuleType] = {
    mbias.SPEC.name: mbias,
    mdark.SPEC.name: mdark,
    mflat.SPEC.name: mflat,
    stare.SPEC.name: stare,
}


def recipe_module(name: str) -> ModuleType:
    """The module of a recipe; accepts ``soxs_mbias``, ``soxs-mbias`` or ``mbias``."""
    key = name.strip().replace("-", "_")
    if not key.startswith("soxs_"):
        key = "soxs_" + key
    if key not in RECIPES:
        raise KeyError(name)
    return RECIPES[key]
