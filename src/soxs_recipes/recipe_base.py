"""The glue between a declared recipe and PyCPL's ``PyRecipe`` interface."""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import Any

from .framework import (
    RecipeContext,
    RecipeSpec,
    execute,
    frames_from_frameset,
    parameter_list,
    product_frameset,
    recipe_class_attrs,
)

__all__ = ["pyrecipe"]


def pyrecipe(spec: RecipeSpec, reduce: Callable[[RecipeContext], None]):
    """Class decorator that turns an empty ``cpl.ui.PyRecipe`` subclass into a recipe.

    It sets the seven descriptive attributes PyCPL requires (from the declaration), an
    ``__init__`` that builds the parameter list, and ``run(frameset, settings)``.  Products go
    to ``recipe.output_dir`` when the caller set it (our runner does), otherwise to the current
    directory as with esorex.  Existing products are replaced only when ``recipe.overwrite`` is
    true or the environment has ``SOXS_OVERWRITE=1``.
    """

    def decorate(cls: type) -> type:
        for name, value in recipe_class_attrs(spec).items():
            setattr(cls, name, value)
        base_init = cls.__init__

        def __init__(self) -> None:
            base_init(self)
            self.parameters = parameter_list(spec)

        def run(self, frameset: Any, settings: dict) -> Any:
            output_dir = getattr(self, "output_dir", None) or os.getcwd()
            overwrite = bool(getattr(self, "overwrite", False)) or os.environ.get(
                "SOXS_OVERWRITE", "") in ("1", "true", "yes")
            products = execute(spec, frames_from_frameset(frameset), settings, reduce,
                               output_dir=output_dir, overwrite=overwrite)
            return product_frameset(products)

        cls.__init__ = __init__
        cls.run = run
        cls.spec = spec
        abc.update_abstractmethods(cls)  # PyCPL's PyRecipe declares run abstract
        return cls

    return decorate
