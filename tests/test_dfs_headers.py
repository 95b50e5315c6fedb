"""Product headers as CPL's ``cpl_dfs_setup_product_header`` writes them.

Each rule is read from CPL's cpldfs/cpl_dfs.c (7.2 and 7.3) and the order from its DICB sort
(cplcore/cpl_property_dicb.c), and was checked against a product written by the real
``cpl_dfs_save_image`` of CPL 7.2.3; tests/test_pycpl_real.py repeats that comparison
whenever PyCPL is importable.  The inputs carry ARCFILE, as real raw frames do.
"""

import random
import re
from pathlib import Path

import pytest
from astropy.io import fits

from soxs_core import __version__
from soxs_core.calib import arm_defaults
from soxs_core.detector.instruments import ARMS
from soxs_core.io.fits import Card, Header, card_images
from soxs_core.io.products import (
    NO_CPL_DRS_ID,
    FrameRef,
    ParamRecord,
    ProductInfo,
    QcValue,
    dfs_header,
)
from soxs_core.simulate import DetectorSimulator
from soxs_recipes import compat, mbias, mdark
from soxs_recipes.framework import execute

ARCFILE = "SOXS.2026-11-22T10:00:00.000.fits"

# the primary keywords cpl_dfs copies from the first input frame (its "mandatory" list)
CPL_PRIMARY = ["ORIGIN", "TELESCOP", "INSTRUME", "OBJECT", "RA", "DEC", "EPOCH", "EQUINOX",
               "RADESYS", "DATE-OBS", "MJD-OBS", "UTC", "LST", "PI-COI", "OBSERVER"]


def raw_header(**extra) -> fits.Header:
    """A raw primary header with a card of every kind cpl_dfs treats differently."""
    h = fits.Header()
    for key in CPL_PRIMARY:
        h[key] = (f"value of {key}", f"comment of {key}")
    for key, value in [("EXPTIME", 0.0), ("DATE", "2026-11-22T10:00:05"),
                       ("ORIGFILE", "SOXS_VIS_BIAS_0000.fits"), ("CHECKSUM", "x" * 16),
                       ("DATASUM", "0"), ("HDRVER", "1"), ("BZERO", 32768), ("BSCALE", 1),
                       ("ARCFILE", ARCFILE)]:
        h[key] = (value, f"comment of {key}")
    for key in ["ESO OBS NAME", "ESO TPL ID", "ESO INS MODE", "ESO DET READ SPEED",
                "ESO SEQ ARM", "ESO DPR CATG", "ESO DPR TYPE", "ESO DPR TECH", "ESO DRS X",
                "ESO QC OLD", "ESO PRO CATG", "ESO PRO DATANCOM"]:
        h[f"HIERARCH {key}"] = (f"value of {key}", f"comment of {key}")
    h["COMMENT"] = "a comment"
    h["HISTORY"] = "a history"
    for key, value in extra.items():
        h[f"HIERARCH {key}" if " " in key else key] = value
    return h


def header_for(first, **kwargs) -> Header:
    args = dict(recipe="soxs_mbias", product=ProductInfo(catg="MASTER_BIAS_VIS"),
                filename="master_bias_vis.fits",
                raw_frames=[FrameRef(Path("/raw/b1.fits"), "BIAS_VIS"),
                            FrameRef(Path("/raw/b2.fits"), "BIAS_VIS")],
                inherit_from=first, drs_id="cpl-7.2.3", date="2026-11-23T08:00:00")
    args.update(kwargs)
    return dfs_header(**args)


def test_first_frame_gives_its_primary_keywords_eso_keywords_and_arcfile_only():
    raw = raw_header()
    h = header_for(raw)
    inherited = [k for k in h if k in raw and h.comment(k) == raw.comments[k]]
    # in CPL's order: EPOCH is no descriptive keyword of the DICB, so it goes with ARCFILE
    assert inherited == [k for k in CPL_PRIMARY if k != "EPOCH"] + [
        "EPOCH", "ARCFILE", "ESO OBS NAME", "ESO TPL ID", "ESO INS MODE", "ESO DET READ SPEED",
        "ESO SEQ ARM"]
    assert all(h[k] == raw[k] for k in inherited)
    # left behind: other primary keywords, DPR, DRS, QC and PRO (but the history), commentary
    for key in ["EXPTIME", "ORIGFILE", "CHECKSUM", "DATASUM", "HDRVER", "BZERO", "BSCALE",
                "ESO DPR CATG", "ESO DPR TYPE", "ESO DPR TECH", "ESO DRS X", "ESO QC OLD",
                "COMMENT", "HISTORY"]:
        assert key not in h, key
    assert h["DATE"] == "2026-11-23T08:00:00"  # the product's own creation date
    assert h["ESO PRO CATG"] == "MASTER_BIAS_VIS" and h["ESO PRO DATANCOM"] == 2


def test_radecsys_is_inherited_as_radesys():
    raw = raw_header()
    del raw["RADESYS"]
    raw["RADECSYS"] = ("FK5", "old spelling")
    h = header_for(raw)
    assert h["RADESYS"] == "FK5" and h.comment("RADESYS") == "old spelling"
    assert "RADECSYS" not in h
    raw["RADESYS"] = ("ICRS", "new spelling")  # both: RADESYS is the right one
    h = header_for(raw)
    assert h["RADESYS"] == "ICRS" and "RADECSYS" not in h


def test_ancestor_is_the_first_frames_arcfile_or_its_own_ancestor():
    h = header_for(raw_header())
    assert h["ESO PRO ANCESTOR"] == ARCFILE and h.comment("ESO PRO ANCESTOR") == ""
    assert "ANCESTOR" not in h
    older = "SOXS.2026-11-20T09:00:00.000.fits"
    product = raw_header(**{"ESO PRO ANCESTOR": (older, "ancestor of the input")})
    h = header_for(product)
    assert h["ESO PRO ANCESTOR"] == older and h.comment("ESO PRO ANCESTOR") == \
        "ancestor of the input"
    raw = raw_header()
    del raw["ARCFILE"]
    assert "ESO PRO ANCESTOR" not in header_for(raw)


def test_history_of_an_input_product_is_kept_and_the_new_record_comes_next():
    history = {"ESO PRO REC1 ID": ("soxs_mbias", "first step"),
               "ESO PRO REC1 RAW1 NAME": ("b1.fits", "its raw frame"),
               "ESO PRO REC2 ID": ("soxs_mflat", "second step"),
               "ESO PRO REC2 CAL1 NAME": ("master_bias_vis.fits", "its calibration")}
    first = raw_header(**history)
    h = header_for(first, parameters=[ParamRecord("sigma", 4.5, 5.0, "Clipping sigma.")])
    for key, (value, comment) in history.items():
        assert (h[key], h.comment(key)) == (value, comment)
    assert h["ESO PRO REC3 ID"] == "soxs_mbias" and h["ESO PRO REC3 DRS ID"] == "cpl-7.2.3"
    assert h["ESO PRO REC3 RAW2 NAME"] == "b2.fits"
    assert h["ESO PRO REC3 PARAM1 NAME"] == "sigma"
    assert "ESO PRO REC1 PIPE ID" not in h and "ESO PRO REC4 ID" not in h
    # not history: the input's other PRO keywords are its own, not the product's
    assert h["ESO PRO CATG"] == "MASTER_BIAS_VIS" and h["ESO PRO DATANCOM"] == 2


def test_calibrations_are_listed_with_their_md5_after_the_raw_frames():
    md5 = "0123456789abcdef0123456789abcdef"
    h = header_for(raw_header(), calib_frames=[
        FrameRef(Path("/c/master_bias_vis.fits"), "MASTER_BIAS_VIS", md5),
        FrameRef(Path("/c/hot.fits"), "HOT_PIXELS_VIS")])
    assert h["ESO PRO REC1 CAL1 NAME"] == "master_bias_vis.fits"
    assert h["ESO PRO REC1 CAL1 CATG"] == "MASTER_BIAS_VIS"
    assert h["ESO PRO REC1 CAL1 DATAMD5"] == md5
    assert h.comment("ESO PRO REC1 CAL1 DATAMD5") == "MD5 signature of calib frame"
    assert "ESO PRO REC1 CAL2 DATAMD5" not in h  # only a calibration that has one
    keys = h.keys()
    assert keys.index("ESO PRO DATANCOM") < keys.index("ESO PRO REC1 CAL1 NAME")
    assert keys.index("ESO PRO REC1 RAW2 CATG") < keys.index("ESO PRO DATANCOM")


def test_type_tech_and_science_follow_the_first_frame_unless_the_recipe_sets_them():
    unset = ProductInfo(catg="X", type=None, tech=None, science=None)
    h = header_for(raw_header(**{"ESO DPR TECH": "ECHELLE", "ESO DPR CATG": "SCIENCE"}),
                   product=unset)
    assert (h["ESO PRO TYPE"], h["ESO PRO TECH"], h["ESO PRO SCIENCE"]) == \
        ("REDUCED", "ECHELLE", True)
    raw = raw_header(**{"ESO DPR CATG": "CALIB"})
    del raw["ESO DPR TECH"]
    h = header_for(raw, product=unset)
    assert (h["ESO PRO TECH"], h["ESO PRO SCIENCE"]) == ("UNDEFINED", False)
    h = header_for(raw_header(**{"ESO DPR CATG": "SCIENCE"}),
                   product=ProductInfo(catg="X", type="TEMPORARY", tech="IMAGE",
                                       science=False))
    assert (h["ESO PRO TYPE"], h["ESO PRO TECH"], h["ESO PRO SCIENCE"]) == \
        ("TEMPORARY", "IMAGE", False)


def test_parameters_carry_their_help_and_default():
    params = [ParamRecord("stacked-clipping-sigma", 4.5, 5.0, "Sigma of the stack clipping."),
              ParamRecord("tolerance", 1e-05, 2.5e-07),
              ParamRecord("iterations", 3, 5, "Clipping iterations."),
              ParamRecord("flag", False, True, "A switch."),
              ParamRecord("stacking-method", "median", "mean", "How to combine.")]
    h = header_for(raw_header(), parameters=params)
    rec = "ESO PRO REC1 PARAM"
    got = [(h[f"{rec}{i} NAME"], h.comment(f"{rec}{i} NAME"), h[f"{rec}{i} VALUE"],
            h.comment(f"{rec}{i} VALUE")) for i in range(1, 6)]
    assert got == [
        ("stacked-clipping-sigma", "Sigma of the stack clipping.", "4.5", "Default: 5"),
        ("tolerance", "Floating point recipe parameter", "1e-05", "Default: 2.5e-07"),
        ("iterations", "Clipping iterations.", "3", "Default: 5"),
        ("flag", "A switch.", "false", "Default: true"),
        ("stacking-method", "How to combine.", "median", "Default: 'mean'")]
    for record, generic in [(ParamRecord("a", True, True), "Boolean recipe parameter"),
                            (ParamRecord("b", 1, 1), "Integer recipe parameter"),
                            (ParamRecord("c", "s", "s"), "String recipe parameter")]:
        h = header_for(raw_header(), parameters=[record])
        assert h.comment(f"{rec}1 NAME") == generic
    # a help too long for the card is cut at the card's end, as CFITSIO does
    long_help = "Number of sigma from the median beyond which a stacked value is rejected."
    h = header_for(raw_header(), parameters=[ParamRecord("stacked-clipping-sigma", 4.5, 5.0,
                                                         long_help)])
    image = card_images(Card(f"{rec}1 NAME", "stacked-clipping-sigma",
                             h.comment(f"{rec}1 NAME")))
    assert image == [f"HIERARCH {rec}1 NAME = 'stacked-clipping-sigma' / {long_help}"[:80]]


def test_cards_come_in_cpl_order_with_the_data_dictionary_comments():
    raw = raw_header(**{"ESO PRO REC1 ID": ("soxs_mbias", "history")})
    qc = {"RAW RON": QcValue(3.25, "read noise [e-]")}
    h = header_for(raw, product=ProductInfo(catg="MASTER_BIAS_VIS", tech=None, qc=qc),
                   calib_frames=[FrameRef(Path("m.fits"), "MASTER_BIAS_VIS", "f" * 32)],
                   parameters=[ParamRecord("sigma", 4.5, 5.0, "Sigma.")])
    # as CPL 7.2.3 wrote the same product: DATE, the descriptive keywords, the other primary
    # ones, then HIERARCH ESO by class (OBS TPL INS DET PRO), the rest (QC, SEQ) last; within a
    # class, the recipe's own cards first, then cpl_dfs's in the order it sets them
    assert h.keys() == ["DATE"] + CPL_PRIMARY[:6] + CPL_PRIMARY[7:] + [
        "EPOCH", "ARCFILE", "DATAMD5", "PIPEFILE",
        "ESO OBS NAME", "ESO TPL ID", "ESO INS MODE", "ESO DET READ SPEED",
        "ESO PRO CATG", "ESO PRO TYPE", "ESO PRO REC1 ID", "ESO PRO ANCESTOR", "ESO PRO DID",
        "ESO PRO TECH", "ESO PRO SCIENCE", "ESO PRO REC2 ID", "ESO PRO REC2 DRS ID",
        "ESO PRO REC2 PIPE ID", "ESO PRO REC2 RAW1 NAME", "ESO PRO REC2 RAW1 CATG",
        "ESO PRO REC2 RAW2 NAME", "ESO PRO REC2 RAW2 CATG", "ESO PRO DATANCOM",
        "ESO PRO REC2 CAL1 NAME", "ESO PRO REC2 CAL1 CATG", "ESO PRO REC2 CAL1 DATAMD5",
        "ESO PRO REC2 PARAM1 NAME", "ESO PRO REC2 PARAM1 VALUE",
        "ESO QC RAW RON", "ESO QC NFAIL", "ESO SEQ ARM"]
    comments = {
        "DATE": "file creation date (YYYY-MM-DDThh:mm:ss UT)",
        "DATAMD5": "MD5 checksum", "PIPEFILE": "Filename of data product",
        "ESO PRO DID": "Data dictionary for PRO",
        "ESO PRO CATG": "Category of pipeline product frame", "ESO PRO TYPE": "Product type",
        "ESO PRO TECH": "Observation technique", "ESO PRO SCIENCE": "Scientific product if T",
        "ESO PRO REC2 ID": "Pipeline recipe (unique) identifier",
        "ESO PRO REC2 DRS ID": "Data Reduction System identifier",
        "ESO PRO REC2 PIPE ID": "Pipeline (unique) identifier",
        "ESO PRO REC2 RAW1 NAME": "File name of raw frame",
        "ESO PRO REC2 RAW1 CATG": "Category of raw frame",
        "ESO PRO DATANCOM": "Number of combined frames",
        "ESO PRO REC2 CAL1 NAME": "File name of calibration frame",
        "ESO PRO REC2 CAL1 CATG": "Category of calibration frame",
        "ESO PRO REC2 CAL1 DATAMD5": "MD5 signature of calib frame"}
    assert {key: h.comment(key) for key in comments} == comments
    assert (h["DATAMD5"], h["PIPEFILE"], h["ESO PRO DID"]) == \
        ("Not computed", "master_bias_vis.fits", "PRO-1.16")
    assert h["ESO PRO TECH"] == raw["ESO DPR TECH"]


def test_drs_id_names_the_system_that_ran():
    if compat.HAVE_PYCPL:
        assert compat.drs_id() == f"cpl-{compat.cpl_version()}"
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", compat.cpl_version())
    else:
        assert compat.cpl_version() is None
        assert compat.drs_id() == NO_CPL_DRS_ID == f"soxs-standin-{__version__}"
    assert header_for(raw_header(), drs_id=compat.drs_id())["ESO PRO REC1 DRS ID"] == \
        compat.drs_id()
    minimal = dict(recipe="r", product=ProductInfo(catg="X"), filename="p.fits", raw_frames=[])
    assert dfs_header(**minimal)["ESO PRO REC1 DRS ID"] == NO_CPL_DRS_ID


@pytest.mark.parametrize("arm, prefix", [("soxs_vis", "SOXS"), ("xsh_uvb", "XSHOO")])
def test_simulated_raw_frames_carry_eso_archive_names(tmp_path, arm, prefix):
    sim = DetectorSimulator(arm=arm, binning="2x2", readout="fast", seed=3)
    paths = sim.write_bias(tmp_path, n=2) + sim.write_dark(tmp_path, n=2, exptime=60.0)
    names = []
    for path in paths:
        h = fits.getheader(path)
        assert re.fullmatch(rf"{prefix}\.\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}\.fits",
                            h["ARCFILE"]), h["ARCFILE"]
        assert h["ARCFILE"] == f"{prefix}.{h['DATE-OBS']}.fits"
        names.append(h["ARCFILE"])
    assert len(set(names)) == len(names)


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """A master bias and a master dark made with it, from simulated frames listed out of
    time order (the first listed frame, not the earliest, is the one inherited from)."""
    root = tmp_path_factory.mktemp("dfs")
    sim = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="fast", seed=11)
    biases = sim.write_bias(root / "raw", n=3)
    darks = sim.write_dark(root / "raw", n=3, exptime=120.0)
    random.Random(1).shuffle(biases)
    biases = biases[1:] + biases[:1]  # never in time order
    master_bias = execute(mbias.SPEC, [(str(p), "BIAS_VIS") for p in biases],
                          {"stacked-clipping-sigma": 4.5}, mbias.reduce,
                          output_dir=root / "out")[0].path
    frames = [(str(p), "DARK_VIS") for p in darks[::-1]]
    master_dark = execute(mdark.SPEC, frames + [(str(master_bias), "MASTER_BIAS_VIS")], {},
                          mdark.reduce, output_dir=root / "out")[0].path
    return biases, master_bias, darks[::-1], master_dark


def test_recipe_products_inherit_from_the_first_listed_raw_frame(products):
    biases, master_bias, darks, master_dark = products
    for first, path in ((biases[0], master_bias), (darks[0], master_dark)):
        raw = fits.getheader(first)
        h = fits.getheader(path)
        assert h["ESO PRO ANCESTOR"] == raw["ARCFILE"] == h["ARCFILE"]
        assert h["DATE-OBS"] == raw["DATE-OBS"] and h["MJD-OBS"] == raw["MJD-OBS"]
        assert "ORIGFILE" not in h and "ESO DPR TYPE" not in h
        # not inherited (CPL does not), but stated by the recipe as CPL recipes do
        assert h["EXPTIME"] == raw["EXPTIME"]
        assert h["ESO PRO REC1 DRS ID"] == compat.drs_id()
        assert not h["ESO PRO REC1 DRS ID"].startswith("cpl") or compat.HAVE_PYCPL
        assert h["ESO PRO SCIENCE"] is False


def test_recipe_products_record_calibrations_and_parameters(products):
    biases, master_bias, darks, master_dark = products
    b = fits.getheader(master_bias)
    d = fits.getheader(master_dark)
    assert [d[f"ESO PRO REC1 RAW{i} NAME"] for i in (1, 2, 3)] == [p.name for p in darks]
    assert (d["ESO PRO REC1 CAL1 NAME"], d["ESO PRO REC1 CAL1 CATG"]) == \
        ("master_bias_vis.fits", "MASTER_BIAS_VIS")
    assert d["ESO PRO REC1 CAL1 DATAMD5"] == b["DATAMD5"] != "Not computed"
    # cpl_dfs keeps only the history of the frame it inherits from, the first raw dark:
    # the master bias's own record is referred to by name and MD5, not copied
    assert "ESO PRO REC2 ID" not in d and d["ESO PRO REC1 ID"] == "soxs_mdark"
    for header, recipe, given in ((b, mbias, {"stacked-clipping-sigma": 4.5}),
                                  (d, mdark, {})):
        defaults = arm_defaults(recipe.SPEC.name, ARMS["soxs_vis"])
        for i, p in enumerate(recipe.SPEC.params, start=1):
            name = f"ESO PRO REC1 PARAM{i}"
            assert header[f"{name} NAME"] == p.name
            assert p.description.startswith(header.comments[f"{name} NAME"][:20])
            default = p.type(defaults[p.name])
            assert header[f"{name} VALUE"] == cpl_text(given.get(p.name, default))
            quoted = f"'{default}'" if isinstance(default, str) else cpl_text(default)
            assert header.comments[f"{name} VALUE"] == f"Default: {quoted}"


def cpl_text(value) -> str:
    """A parameter value as cpl_dfs prints it: true/false, %d, %g, the string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)
