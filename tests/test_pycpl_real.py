"""With ESO's PyCPL installed, the recipes are genuine cpl.ui.PyRecipe subclasses.

Skipped where PyCPL is not importable (it is not on PyPI); run it on an observatory machine or
in a virtual environment with PyCPL built against libcpl-dev.
"""

import os

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.instruments import ARMS
from soxs_core.io.products import PIPE_ID
from soxs_core.simulate import DetectorSimulator
from soxs_recipes import compat, mbias, mdark
from soxs_recipes.compat import HAVE_PYCPL
from soxs_recipes.framework import RecipeContext, execute, resolve_parameters

pytestmark = pytest.mark.skipif(not HAVE_PYCPL, reason="ESO PyCPL is not installed")


def test_recipes_are_real_pyrecipes_and_run(tmp_path, monkeypatch):
    import cpl.ui

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
    # the CPL that runs, as cpl_dfs writes it
    assert header["ESO PRO REC1 DRS ID"] == compat.drs_id() == f"cpl-{compat.cpl_version()}"


# written by the FITS layer, not by cpl_dfs: the image's structure, CFITSIO's boilerplate, our
# FLUX plane's name and unit, the checksums esorex adds
_NOT_DFS = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT", "EXTNAME",
            "BUNIT", "DATASUM", "CHECKSUM"}


def _cards(header):
    return [(c.keyword, c.value, c.comment) for c in header.cards if c.keyword not in _NOT_DFS]


def _cpl_save_image(spec, product, frames, settings, workdir):
    """Write ``product``'s primary header again with the real cpl.dfs.save_image, from the same
    frames, parameters and recipe cards (PRO CATG/TYPE/TECH and QC, CPL's applist)."""
    import cpl

    ours = fits.getheader(product)
    frameset = cpl.ui.FrameSet([cpl.ui.Frame(str(path), tag=tag, group=group)
                                for path, tag, group in frames])
    arm = ARMS["soxs_vis"]
    context = RecipeContext(spec=spec, arm=arm, params=resolve_parameters(spec, settings, arm),
                            raw={}, calib={}, output_dir=workdir)
    parameters = []
    for record in context.param_records():
        param = cpl.ui.ParameterValue(name=f"soxs.{spec.name}.{record.name}",
                                      context=f"soxs.{spec.name}", description=record.help,
                                      default=record.default)
        param.value = record.value
        param.cli_alias = record.name
        parameters.append(param)
    applist = cpl.core.PropertyList(
        [cpl.core.Property(key, ours[key], ours.comments[key])
         for key in ("ESO PRO CATG", "ESO PRO TYPE", "ESO PRO TECH")]
        + [cpl.core.Property(c.keyword, c.value, c.comment) for c in ours.cards
           if c.keyword.startswith("ESO QC ")])
    here = os.getcwd()
    os.chdir(workdir)
    try:
        cpl.dfs.save_image(frameset, cpl.ui.ParameterList(parameters), frameset,
                           cpl.core.Image(np.zeros((2, 2), np.float32)), spec.name, applist,
                           PIPE_ID, product.name)
    finally:
        os.chdir(here)
    return ours, fits.getheader(workdir / product.name)


def test_product_headers_are_those_of_cpl_dfs_save_image(tmp_path):
    import cpl

    sim = DetectorSimulator("soxs_vis", "2x2", "fast", seed=4)
    biases = sim.write_bias(tmp_path / "raw", n=3)[::-1]  # the first listed is not the earliest
    darks = sim.write_dark(tmp_path / "raw", n=3, exptime=60.0)[::-1]
    assert all("ARCFILE" in fits.getheader(p) for p in biases + darks)
    bias_settings = {"stacked-clipping-sigma": 4.5, "stacking-method": "median"}
    master_bias = execute(mbias.SPEC, [(str(p), "BIAS_VIS") for p in biases], bias_settings,
                          mbias.reduce, output_dir=tmp_path / "ours")[0].path
    master_dark = execute(mdark.SPEC, [(str(p), "DARK_VIS") for p in darks]
                          + [(str(master_bias), "MASTER_BIAS_VIS")], {}, mdark.reduce,
                          output_dir=tmp_path / "ours")[0].path
    raw, calib = cpl.ui.Frame.FrameGroup.RAW, cpl.ui.Frame.FrameGroup.CALIB
    cases = [(mbias.SPEC, master_bias, [(p, "BIAS_VIS", raw) for p in biases], bias_settings),
             (mdark.SPEC, master_dark, [(p, "DARK_VIS", raw) for p in darks]
              + [(master_bias, "MASTER_BIAS_VIS", calib)], {})]
    for spec, product, frames, settings in cases:
        workdir = tmp_path / f"cpl_{spec.name}"
        workdir.mkdir()
        ours, theirs = _cpl_save_image(spec, product, frames, settings, workdir)
        mine, cpls = _cards(ours), _cards(theirs)
        assert [c[0] for c in mine] == [c[0] for c in cpls], spec.name  # names and order
        for (key, value, comment), (_, cpl_value, cpl_comment) in zip(mine, cpls):
            if key == "DATAMD5":  # cpl_dfs leaves the placeholder for esorex to fill in
                assert cpl_value == "Not computed" and len(value) == 32
            elif key == "DATE":  # the file's creation time
                assert len(value) == len(cpl_value) == 19
            elif key == "ESO PRO DID" and not compat.cpl_version().startswith("7.2."):
                continue  # newer CPL writes a newer dictionary; ours is CPL 7.2's
            elif isinstance(value, float):
                assert value == pytest.approx(cpl_value, rel=1e-14, abs=1e-300), key
            else:
                assert value == cpl_value, key
            if key != "DATE":
                assert comment == cpl_comment, key
        assert theirs["ESO PRO ANCESTOR"] == fits.getheader(frames[0][0])["ARCFILE"]
