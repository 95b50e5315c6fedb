"""soxs_recipes: ESO-style recipes (PyCPL plugins), the soxs-esorex runner and the
soxspipe-style Python API."""

from __future__ import annotations

from typing import Any

__all__ = ["soxs_mbias", "soxs_mdark", "soxs_mflat", "soxs_stare"]


def __getattr__(name: str) -> Any:
    # The API is imported on first use, not with the package: the soxs-esorex entry point
    # (soxs_recipes.cli) must be able to install its signal handlers before numpy loads.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'soxs_recipes' has no attribute {name!r}")
