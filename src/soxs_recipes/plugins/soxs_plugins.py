"""pyesorex plugin module: ``export PYESOREX_PLUGIN_DIR=$(soxs-esorex --plugin-dir)``.

It imports the public recipe classes by name and nothing else, because pyesorex instantiates
every PyRecipe subclass it finds in the module.
"""

from soxs_recipes.mbias import SoxsMbias
from soxs_recipes.mdark import SoxsMdark
from soxs_recipes.mflat import SoxsMflat
from soxs_recipes.stare import SoxsStare

__all__ = ["SoxsMbias", "SoxsMdark", "SoxsMflat", "SoxsStare"]
