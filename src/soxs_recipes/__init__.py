"""soxs_recipes: ESO-style recipes (PyCPL plugins), the soxs-esorex runner and the
soxspipe-style Python API."""

from .api import soxs_mbias, soxs_mdark

__all__ = ["soxs_mbias", "soxs_mdark"]
