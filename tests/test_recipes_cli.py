"""The runner, the DFS product headers, parameters and the soxspipe-style API."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.io.products import data_md5
from soxs_core.simulate import DetectorSimulator
from soxs_recipes import soxs_mbias, soxs_mdark
from soxs_recipes.cli import plugin_dir
from soxs_recipes.cli import run as esorex
from soxs_recipes.compat import ui
from soxs_recipes.mbias import SoxsMbias
from soxs_recipes.mdark import SoxsMdark


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sim = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="slow", seed=5)
    biases = sim.write_bias(root / "raw", n=4)
    darks = sim.write_dark(root / "raw", n=3, exptime=300.0)
    (root / "bias.sof").write_text("".join(f"{p} BIAS_VIS\n" for p in biases))
    return root, sim, biases, darks


def test_products_carry_dfs_keywords_and_provenance(night, tmp_path):
    root, sim, biases, darks = night
    out = tmp_path / "out"
    psof = tmp_path / "products.sof"
    assert esorex(["--output-dir", str(out), "--products-sof", str(psof),
                   "soxs_mbias", "--stacked-clipping-sigma=4.5", str(root / "bias.sof")]) == 0
    mbias = out / "master_bias_vis.fits"
    assert psof.read_text().split() == [str(mbias), "MASTER_BIAS_VIS"]
    with fits.open(mbias, checksum=True) as hdul:
        assert [h.name for h in hdul] == ["FLUX", "QUAL", "ERRS"]
        assert hdul[1].data.dtype == np.uint8 and hdul[2].data.dtype.kind == "f"
        h = hdul[0].header
        for hdu in hdul:
            assert "CHECKSUM" in hdu.header and "DATASUM" in hdu.header
        assert h["DATAMD5"] == data_md5(hdul)
    assert h["PIPEFILE"] == "master_bias_vis.fits"
    assert h["ESO PRO CATG"] == "MASTER_BIAS_VIS"
    assert (h["ESO PRO TYPE"], h["ESO PRO TECH"]) == ("REDUCED", "IMAGE")
    assert h["ESO PRO SCIENCE"] is False
    assert h["ESO PRO REC1 ID"] == "soxs_mbias"
    assert h["ESO PRO REC1 PIPE ID"].startswith("soxs/")
    assert h["ESO PRO DATANCOM"] == 4
    names = [h[f"ESO PRO REC1 RAW{i} NAME"] for i in range(1, 5)]
    assert names == [Path(p).name for p in biases]
    assert h["ESO PRO REC1 RAW1 CATG"] == "BIAS_VIS"
    params = {h[f"ESO PRO REC1 PARAM{i} NAME"]: h[f"ESO PRO REC1 PARAM{i} VALUE"]
              for i in range(1, 6)}
    # explicit value recorded, and the SOXS VIS default for the others
    assert params["stacked-clipping-sigma"] == "4.5"
    assert params["frame-clipping-sigma"] == "4"
    assert params["frame-clipping-iterations"] == "3"
    # cpl_dfs drops DPR and ORIGFILE but copies ARCFILE (see tests/test_dfs_headers.py)
    assert "ESO DPR TYPE" not in h and "ORIGFILE" not in h
    raw_header = fits.getheader(biases[0])
    assert h["INSTRUME"] == "SOXS" and h["ESO SEQ ARM"] == "VIS"
    assert h["ESO DET READ CURNAME"] == raw_header["ESO DET READ CURNAME"]
    assert h["ESO PRO ANCESTOR"] == raw_header["ARCFILE"] and "ANCESTOR" not in h

    # the master bias as calibration of mdark: CAL keywords with its DATAMD5
    dsof = tmp_path / "dark.sof"
    dsof.write_text("".join(f"{p} DARK_VIS\n" for p in darks) + f"{mbias} MASTER_BIAS_VIS\n")
    assert esorex(["--output-dir", str(out), "soxs_mdark", str(dsof)]) == 0
    d = fits.getheader(out / "master_dark_vis.fits")
    assert d["ESO PRO CATG"] == "MASTER_DARK_VIS"
    assert d["ESO PRO REC1 CAL1 NAME"] == "master_bias_vis.fits"
    assert d["ESO PRO REC1 CAL1 CATG"] == "MASTER_BIAS_VIS"
    assert d["ESO PRO REC1 CAL1 DATAMD5"] == h["DATAMD5"]
    assert d["ESO PRO DATANCOM"] == 3


def test_qc_out_of_range_is_reported(night, tmp_path, caplog):
    root, sim, biases, _ = night
    rc = tmp_path / "x.rc"
    # 5 frames are needed for nothing here; a 0.5-sigma stack clip keeps few values and the
    # SOXS range check on the master noise must then complain
    hot = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="fast", seed=9,
                            read_noise=18.0)
    paths = hot.write_bias(tmp_path / "raw", n=3)
    sof = tmp_path / "b.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in paths))
    rc.write_text("soxs.soxs_mbias.stacked-clipping-sigma=3\n")
    assert esorex(["--output-dir", str(tmp_path / "o"), "--recipe-config", str(rc),
                   "--log-file", str(tmp_path / "log.txt"), "soxs_mbias", str(sof)]) == 0
    h = fits.getheader(tmp_path / "o" / "master_bias_vis.fits")
    assert h["ESO QC RAW RON"] > 15  # SOXS range (0, 15)
    assert h["ESO QC NFAIL"] >= 1
    fails = [h[k] for k in h if k.startswith("ESO QC FAIL")]
    assert any(f.startswith("RAW RON") for f in fails)
    assert "outside the acceptable range" in (tmp_path / "log.txt").read_text()


def test_params_man_page_recipes_and_config(night, tmp_path, capsys):
    root, *_ = night
    assert esorex(["--recipes"]) == 0
    listing = capsys.readouterr().out
    assert "soxs_mbias" in listing and "soxs_mdark" in listing
    assert esorex(["--params", "soxs_mbias", str(root / "bias.sof")]) == 0
    text = capsys.readouterr().out
    assert "--stacked-clipping-sigma" in text and "SOXS VIS" in text
    assert "value: 3.0" in text  # SOXS VIS stacked-clipping-sigma default
    assert esorex(["--man-page", "soxs_mdark"]) == 0
    page = capsys.readouterr().out
    for word in ("DARK_NIR", "MASTER_BIAS_VIS", "HOTPIX NUM", "MASTER_DARK_<ARM>",
                 "--frame-clipping-sigma"):
        assert word in page
    rc = tmp_path / "mbias.rc"
    assert esorex(["--create-config", str(rc), "soxs_mbias"]) == 0
    assert "soxs.soxs_mbias.stacked-clipping-iterations=" in rc.read_text()
    capsys.readouterr()
    assert esorex(["--version"]) == 0
    # the version baked in at build time is the installed distribution's
    from importlib.metadata import version
    assert version("soxs") in capsys.readouterr().out
    assert esorex(["--plugin-dir"]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == plugin_dir()


def test_seed_page_spellings_and_settings_file(night, tmp_path):
    root, *_ = night
    settings = tmp_path / "soxs.yaml"
    settings.write_text("instrument: soxs\nsoxs-mbias:\n  frame-clipping-sigma: 6\n"
                        "  stacked-clipping-sigma: 9\n  vis:\n    stacked-clipping-sigma: 7\n"
                        "  qc-acceptable-ranges: {}\n")
    out = tmp_path / "o"
    assert esorex(["--output-dir", str(out), "--settings", str(settings), "soxs_mbias",
                   "--clipping-iteration-count=2", str(root / "bias.sof")]) == 0
    h = fits.getheader(out / "master_bias_vis.fits")
    params = {h[f"ESO PRO REC1 PARAM{i} NAME"]: h[f"ESO PRO REC1 PARAM{i} VALUE"]
              for i in range(1, 6)}
    assert params["stacked-clipping-sigma"] == "7"   # arm block wins
    assert params["frame-clipping-sigma"] == "6"
    assert params["frame-clipping-iterations"] == "2"  # seed-page synonym


def test_pyrecipe_classes_run_like_pycpl_would(night, tmp_path, monkeypatch):
    root, _, biases, _ = night
    recipe = SoxsMbias()
    for attr in ("_name", "_version", "_author", "_email", "_copyright", "_synopsis",
                 "_description"):
        assert isinstance(getattr(recipe, attr), str)
    names = [p.name for p in recipe.parameters]
    assert "soxs.soxs_mbias.stacked-clipping-sigma" in names
    assert {p.cli_alias for p in recipe.parameters} >= {"stacked-clipping-sigma"}
    monkeypatch.chdir(tmp_path)
    frameset = ui.FrameSet(str(root / "bias.sof"))
    products = recipe.run(frameset, {"soxs.soxs_mbias.stacked-clipping-sigma": 4.0})
    assert [f.tag for f in products] == ["MASTER_BIAS_VIS"]
    assert products[0].group == ui.Frame.FrameGroup.PRODUCT
    assert Path(products[0].file).parent == tmp_path
    assert SoxsMdark()._name == "soxs_mdark"


def test_plugin_module_exposes_only_the_recipes():
    module = plugin_dir() / "soxs_plugins.py"
    namespace: dict = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    classes = [v for v in namespace.values() if isinstance(v, type)]
    from soxs_recipes.registry import RECIPES

    # every registered recipe and nothing else
    assert {c.__name__ for c in classes} == {m.RECIPE_CLASS.__name__ for m in RECIPES.values()}


def test_soxspipe_style_api(night, tmp_path):
    root, sim, biases, darks = night
    log = logging.getLogger("test")
    settings = {"workspace-root-dir": str(tmp_path)}
    recipe = soxs_mbias(log=log, settings=settings, inputFrames=[str(p) for p in biases],
                        verbose=False, overwrite=False)
    recipe.verify_input_frames()
    path = recipe.produce_product()
    assert Path(path).is_file() and recipe.qc["RAW RON"] > 0
    raw_ron, master_ron = recipe.qc_ron(masterFrame=path)
    assert raw_ron == pytest.approx(sim.truth.read_noise, rel=0.05)
    assert master_ron == pytest.approx(sim.truth.read_noise / 2, rel=0.15)
    sx, sy = recipe.qc_bias_structure(path)
    assert sx == pytest.approx(recipe.qc["STRUCTX"], rel=1e-6)
    assert recipe.qc_periodic_pattern_noise() > 0
    assert recipe.qc_median_flux_level(path) == pytest.approx(
        np.median(sim.truth.bias), abs=2)
    # a directory of raw darks plus the master bias, through the mdark API
    dark_dir = tmp_path / "darks"
    dark_dir.mkdir()
    for p in darks:
        (dark_dir / Path(p).name).write_bytes(Path(p).read_bytes())
    (dark_dir / "mbias.fits").write_bytes(Path(path).read_bytes())
    dark = soxs_mdark(log=log, settings=settings, inputFrames=str(dark_dir), command=False,
                      debug=False, turnOffMP=True).produce_product()
    assert fits.getheader(dark)["ESO PRO REC1 CAL1 CATG"] == "MASTER_BIAS_VIS"
    # an SOF path works as well, with the same result
    again = soxs_mbias(log=log, settings=settings, inputFrames=str(root / "bias.sof"),
                       overwrite=True)
    assert again.produce_product() == path and again.qc["RAW RON"] == recipe.qc["RAW RON"]
    bad = soxs_mbias(log=log, settings=settings, inputFrames=[str(biases[0])])
    with pytest.raises(ValueError, match="at least 3"):
        bad.verify_input_frames()


def test_console_script_exit_status(tmp_path):
    exe = Path(sys.executable).parent / "soxs-esorex"
    assert exe.exists()
    done = subprocess.run([str(exe), "soxs_mbias", str(tmp_path / "missing.sof")],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "missing.sof" in done.stderr


def test_console_script_success_flushes_everything(night, tmp_path):
    """The runner leaves without the interpreter's teardown: output, log and products SOF
    must still be complete, and the status 0."""
    root, *_ = night
    exe = Path(sys.executable).parent / "soxs-esorex"
    log_file, psof = tmp_path / "run.log", tmp_path / "products.sof"
    done = subprocess.run([str(exe), "--output-dir", str(tmp_path / "out"), "--log-file",
                           str(log_file), "--products-sof", str(psof), "soxs_mbias",
                           str(root / "bias.sof")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    product = tmp_path / "out" / "master_bias_vis.fits"
    assert psof.read_text().split() == [str(product), "MASTER_BIAS_VIS"]
    log_text = log_file.read_text()
    assert "master_bias_vis.fits" in log_text and log_text.endswith("\n")
    assert fits.getheader(product)["ESO PRO CATG"] == "MASTER_BIAS_VIS"
