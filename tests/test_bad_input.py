"""Bad input: one clear line naming the file, a non-zero exit, no product, inputs untouched."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.simulate import DetectorSimulator
from soxs_recipes.cli import run as esorex


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    vis = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=1)
    out = {
        "bias": vis.write_bias(root / "vis", n=3),
        "dark": vis.write_dark(root / "vis", n=3, exptime=60.0),
        "dark_long": vis.write_dark(root / "vis_long", n=1, exptime=120.0),
        "uvb": DetectorSimulator(arm="xsh_uvb", binning="2x2", readout="fast",
                                 seed=1).write_bias(root / "uvb", n=1),
        "vis12": DetectorSimulator(arm="xsh_vis", binning="1x2", readout="fast",
                                   seed=1).write_bias(root / "vis12", n=1),
        "slow": DetectorSimulator(arm="xsh_vis", binning="2x2", readout="slow",
                                  seed=1).write_bias(root / "slow", n=1),
    }
    return root, out


def _digest(paths):
    return {p: hashlib.md5(Path(p).read_bytes()).hexdigest() for p in paths}


def _run_fails(tmp_path, capsys, recipe, lines, expect, extra=(), sof_text=None,
               outdir=None):
    sof = tmp_path / "in.sof"
    sof.write_text(sof_text if sof_text is not None else
                   "".join(f"{p} {t}\n" for p, t in lines))
    inputs = [p for p, _ in lines if Path(p).is_file()]
    before = _digest(inputs)
    outdir = outdir or tmp_path / "out"
    status = esorex(["--output-dir", str(outdir), *extra, recipe, str(sof)])
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    assert not list(Path(outdir).glob("*.fits")) if Path(outdir).is_dir() else True
    assert _digest(inputs) == before
    return err


def test_empty_sof(tmp_path, capsys):
    err = _run_fails(tmp_path, capsys, "soxs_mbias", [], "lists no frames",
                     sof_text="# nothing here\n")
    assert "in.sof" in err


def test_missing_sof(tmp_path, capsys):
    status = esorex(["--output-dir", str(tmp_path), "soxs_mbias", str(tmp_path / "no.sof")])
    err = capsys.readouterr().err
    assert status != 0 and "no.sof" in err and "not found" in err


def test_missing_listed_file(tmp_path, capsys, frames):
    _, f = frames
    lines = [(p, "BIAS_VIS") for p in f["bias"]] + [(tmp_path / "gone.fits", "BIAS_VIS")]
    err = _run_fails(tmp_path, capsys, "soxs_mbias", lines, "not found")
    assert "gone.fits" in err


def test_not_fits(tmp_path, capsys, frames):
    _, f = frames
    junk = tmp_path / "junk.fits"
    junk.write_text("this is not a FITS file\n")
    err = _run_fails(tmp_path, capsys, "soxs_mbias",
                     [(p, "BIAS_VIS") for p in f["bias"]] + [(junk, "BIAS_VIS")],
                     "not a FITS file")
    assert "junk.fits" in err


def test_truncated_fits(tmp_path, capsys, frames):
    _, f = frames
    cut = tmp_path / "cut.fits"
    data = Path(f["bias"][0]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    err = _run_fails(tmp_path, capsys, "soxs_mbias",
                     [(p, "BIAS_VIS") for p in f["bias"]] + [(cut, "BIAS_VIS")], "truncated")
    assert "cut.fits" in err


def test_unknown_tag(tmp_path, capsys, frames):
    _, f = frames
    _run_fails(tmp_path, capsys, "soxs_mbias", [(f["bias"][0], "FLAT_VIS")] +
               [(p, "BIAS_VIS") for p in f["bias"][1:]], "unknown tag 'FLAT_VIS'")


def test_tag_contradicts_header(tmp_path, capsys, frames):
    _, f = frames
    _run_fails(tmp_path, capsys, "soxs_mbias", [(f["dark"][0], "BIAS_VIS")] +
               [(p, "BIAS_VIS") for p in f["bias"]], "header says DARK_VIS")


@pytest.mark.parametrize("key,tag,expect", [
    ("uvb", "BIAS_UVB", "mixed with XSHOOTER VIS"),
    ("vis12", "BIAS_VIS", "binning"),
    ("slow", "BIAS_VIS", "differs"),
])
def test_mixed_setups(tmp_path, capsys, frames, key, tag, expect):
    _, f = frames
    err = _run_fails(tmp_path, capsys, "soxs_mbias",
                     [(p, "BIAS_VIS") for p in f["bias"]] + [(f[key][0], tag)], expect)
    assert Path(f[key][0]).name in err


def test_mixed_exposure_times(tmp_path, capsys, frames):
    _, f = frames
    err = _run_fails(tmp_path, capsys, "soxs_mdark",
                     [(p, "DARK_VIS") for p in f["dark"]] + [(f["dark_long"][0], "DARK_VIS")],
                     "EXPTIME")
    assert Path(f["dark_long"][0]).name in err


def test_too_few_frames(tmp_path, capsys, frames):
    _, f = frames
    _run_fails(tmp_path, capsys, "soxs_mbias", [(p, "BIAS_VIS") for p in f["bias"][:2]],
               "at least 3")


def test_all_nan_frame(tmp_path, capsys, frames):
    _, f = frames
    nan = tmp_path / "nan.fits"
    with fits.open(f["bias"][0]) as hdul:
        header = hdul[0].header.copy()
        shape = hdul[0].data.shape
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(np.full(shape, np.nan, np.float32), header=header).writeto(nan)
    err = _run_fails(tmp_path, capsys, "soxs_mbias",
                     [(p, "BIAS_VIS") for p in f["bias"]] + [(nan, "BIAS_VIS")], "all NaN")
    assert "nan.fits" in err


def test_unwritable_output_dir(tmp_path, capsys, frames):
    _, f = frames
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = _run_fails(tmp_path, capsys, "soxs_mbias", [(p, "BIAS_VIS") for p in f["bias"]],
                     "output directory", outdir=blocker / "sub")
    assert "afile" in err


def test_existing_product_is_kept_unless_overwrite(tmp_path, capsys, frames):
    _, f = frames
    sof = tmp_path / "b.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in f["bias"]))
    out = tmp_path / "out"
    assert esorex(["--output-dir", str(out), "soxs_mbias", str(sof)]) == 0
    product = out / "master_bias_vis.fits"
    first = product.read_bytes()
    capsys.readouterr()
    assert esorex(["--output-dir", str(out), "soxs_mbias", str(sof)]) != 0
    assert "exists" in capsys.readouterr().err
    assert product.read_bytes() == first
    assert esorex(["--output-dir", str(out), "--overwrite", "soxs_mbias", str(sof)]) == 0
    assert not list(out.glob(".*.tmp"))


def test_bad_parameter_value(tmp_path, capsys, frames):
    _, f = frames
    sof = tmp_path / "b.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in f["bias"]))
    status = esorex(["--output-dir", str(tmp_path / "out"), "soxs_mbias",
                     "--stacking-method=sum", str(sof)])
    err = capsys.readouterr().err
    assert status != 0 and "stacking-method" in err and "not one of" in err
    assert not (tmp_path / "out" / "master_bias_vis.fits").exists()


def test_master_bias_of_another_binning(tmp_path, capsys, frames):
    _, f = frames
    sof = tmp_path / "b.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in f["bias"]))
    assert esorex(["--output-dir", str(tmp_path / "mb"), "soxs_mbias", str(sof)]) == 0
    capsys.readouterr()
    other = DetectorSimulator(arm="xsh_vis", binning="1x2", readout="fast", seed=1)
    darks = other.write_dark(tmp_path / "d12", n=3, exptime=60.0)
    mbias = tmp_path / "mb" / "master_bias_vis.fits"
    err = _run_fails(tmp_path, capsys, "soxs_mdark",
                     [(p, "DARK_VIS") for p in darks] + [(mbias, "MASTER_BIAS_VIS")],
                     "different binning")
    assert "master_bias_vis.fits" in err
