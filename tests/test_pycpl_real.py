"""With ESO's PyCPL installed, the recipes are genuine cpl.ui.PyRecipe subclasses.

Skipped where PyCPL is not importable (it is not on PyPI); run it on an observatory machine or
in a virtual environment with PyCPL built against libcpl-dev.
"""

import pytest

from soxs_recipes.compat import HAVE_PYCPL

pytestmark = pytest.mark.skipif(not HAVE_PYCPL, reason="ESO PyCPL is not installed")


def test_recipes_are_real_pyrecipes_and_run(tmp_path, monkeypatch):
    import cpl.ui
    from astropy.io import fits

    from soxs_core.simulate import DetectorSimulator
    from soxs_recipes.mbias import SoxsMbias

    recipe = SoxsMbias()
    assert isinstance(recipe, cpl.ui.PyRecipe)
    assert isinstance(recipe.parameters, cpl.ui.ParameterList)
    aliases = {p.cli_alias: p for p in recipe.parameters}
    assert isinstance(aliases["frame-clipping-iterations"].value, int)
    paths = DetectorSimulator("xsh_vis", "2x2", "fast", seed=2).write_bias(tmp_path / "raw", n=3)
    sof = tmp_path / "bias.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in paths))
    monkeypatch.chdir(tmp_path)
    settings = {"soxs.soxs_mbias.stacked-clipping-sigma": 4.0}
    products = recipe.run(cpl.ui.FrameSet(str(sof)), settings)
    assert isinstance(products, cpl.ui.FrameSet)
    frame = products[0]
    assert frame.tag == "MASTER_BIAS_VIS" and frame.group == cpl.ui.Frame.FrameGroup.PRODUCT
    header = fits.getheader(frame.file)
    assert header["ESO PRO REC1 DRS ID"].startswith("cpl-")
