"""Declared once: QcSpec and Qual drive the header cards, man pages, --params and README."""

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import soxs_core.combine.masters as masters
from soxs_core.calib import load_defaults
from soxs_core.detector.instruments import ARMS
from soxs_core.detector.quality import MEANING, Qual
from soxs_core.io import products
from soxs_core.io.fits import Card, card_images
from soxs_core.io.products import (
    WIDEST_QC_VALUE,
    FrameRef,
    ProductInfo,
    QcMeasurements,
    QcValue,
    dfs_header,
)
from soxs_core.simulate import DetectorSimulator
from soxs_recipes import readme
from soxs_recipes.cli import run as esorex
from soxs_recipes.framework import QcSpec, RecipeContext
from soxs_recipes.registry import RECIPES

README = Path(__file__).resolve().parents[1] / "README.md"
SUMMARY_KEYS = ("ESO QC NFAIL",)


def _sof(path: Path, entries) -> Path:
    path.write_text("".join(f"{p} {t}\n" for p, t in entries))
    return path


def _qc_cards(path: Path) -> list[tuple[str, object, str]]:
    """(name after ESO QC, value, comment) of the QC cards, NFAIL/FAILi left aside."""
    header = fits.getheader(path)
    return [(card.keyword[len("ESO QC "):], card.value, card.comment) for card in header.cards
            if card.keyword.startswith("ESO QC ") and card.keyword not in SUMMARY_KEYS
            and not re.fullmatch(r"ESO QC FAIL\d+", card.keyword)]


@pytest.fixture(scope="module")
def products_of_a_night(tmp_path_factory):
    """A SOXS VIS master bias and master dark (with the master bias) from simulated frames."""
    root = tmp_path_factory.mktemp("declared")
    sim = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="slow", seed=11)
    biases = sim.write_bias(root / "raw", n=3)
    darks = sim.write_dark(root / "raw", n=3, exptime=300.0)
    out = root / "out"
    assert esorex(["--output-dir", str(out), "--msg-level", "error", "soxs_mbias",
                   str(_sof(root / "bias.sof", [(p, "BIAS_VIS") for p in biases]))]) == 0
    mbias = out / "master_bias_vis.fits"
    assert esorex(["--output-dir", str(out), "--msg-level", "error", "soxs_mdark",
                   str(_sof(root / "dark.sof", [(p, "DARK_VIS") for p in darks]
                            + [(mbias, "MASTER_BIAS_VIS")]))]) == 0
    return {"soxs_mbias": (mbias, biases), "soxs_mdark": (out / "master_dark_vis.fits", darks)}


@pytest.mark.parametrize("recipe", ["soxs_mbias", "soxs_mdark"])
def test_product_qc_cards_are_exactly_the_declared_ones(products_of_a_night, recipe):
    path, raws = products_of_a_night[recipe]
    spec = RECIPES[recipe].SPEC
    cards = _qc_cards(path)
    # every declared QC is computable on clean simulated frames, so each is written, in the
    # declared order, with the declared comment and unit whole
    assert [name for name, _, _ in cards] == [q.name for q in spec.qc]
    for (name, value, comment), q in zip(cards, spec.qc):
        expected = f"{q.comment} [{q.unit}]" if q.unit else q.comment
        assert comment == expected, name
        assert isinstance(value, (int, float)) and math.isfinite(value), name
    # the temperature is the raw header's, not a made-up number
    raw = fits.getheader(raws[0])
    key = ARMS["soxs_vis"].keywords["temperature"]
    assert dict((n, v) for n, v, _ in cards)["DETECTOR TEMP"] == raw[key]
    header = fits.getheader(path)
    fails = [k for k in header if re.fullmatch(r"ESO QC FAIL\d+", k)]
    assert header["ESO QC NFAIL"] == len(fails)
    assert header.comments["ESO QC NFAIL"] == dict(products.QC_SUMMARY)["NFAIL"]


def test_every_declared_qc_card_fits_with_its_keyword():
    # no value has a longer shortest-repr than the widest one the check assumes
    rng = random.Random(3)
    samples = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-308, 307) for _ in range(20000)]
    assert max(len(repr(v)) for v in samples) <= len(repr(WIDEST_QC_VALUE)) == 24
    for recipe, module in RECIPES.items():
        for q in module.SPEC.qc:
            comment = q.header_comment
            # the card as the FITS standard lays it out: HIERARCH, keyword, value, comment
            image = f"HIERARCH ESO QC {q.name} = {repr(WIDEST_QC_VALUE).upper()} / {comment}"
            assert len(image) <= 80, (recipe, q.name, comment)
            assert card_images(Card(f"ESO QC {q.name}", WIDEST_QC_VALUE, comment)) == [image]


def test_a_comment_that_does_not_fit_is_refused_never_cut():
    with pytest.raises(ValueError, match="FPN FRACMAX"):
        QcSpec("FPN FRACMAX", "a comment far too long for the card", description="d")
    with pytest.raises(ValueError, match="does not fit"):
        dfs_header(recipe="soxs_mbias", filename="p.fits", raw_frames=[],
                   product=ProductInfo(catg="X", qc={"RAW RON": QcValue(1.5, "x" * 60)}))


def _mbias_context(tmp_path: Path) -> tuple[RecipeContext, QcMeasurements]:
    """A soxs_mbias run's context and a value of 1 for each of its declared QC."""
    spec = RECIPES["soxs_mbias"].SPEC
    context = RecipeContext(spec=spec, arm=ARMS["soxs_vis"], params={}, raw={}, calib={},
                            output_dir=tmp_path)
    qc = QcMeasurements()
    for q in spec.qc:
        qc.add(q.name, 1.0)
    return context, qc


def test_qc_values_are_paired_with_their_declarations(tmp_path):
    context, qc = _mbias_context(tmp_path)
    spec = context.spec
    paired = context.declared_qc(qc)
    assert list(paired) == [q.name for q in spec.qc]
    assert paired["RAW RON"].comment == "raw bias read noise [e-]"
    ranges = load_defaults()["soxs_mbias"]["qc_ranges"]
    assert paired["RAW RON"].valid_range == tuple(ranges["RAW RON"]["soxs_vis"])
    qc.add("RAW NOISE", 3.0)  # a typo of a declared name
    with pytest.raises(RuntimeError, match="RAW NOISE not declared"):
        context.declared_qc(qc)
    qc.values.pop("RAW NOISE")
    qc.values.pop("STRUCTY")  # neither value nor reason
    with pytest.raises(RuntimeError, match="STRUCTY given neither"):
        context.declared_qc(qc)
    qc.omit("STRUCTY", "no good pixel in the master")
    assert paired["STRUCTY"].computed and not context.declared_qc(qc)["STRUCTY"].computed


def test_qc_ranges_name_only_declared_qc():
    for recipe, table in load_defaults().items():
        declared = {q.name for q in RECIPES[recipe].SPEC.qc}
        assert set(table.get("qc_ranges", {})) <= declared, recipe


def test_non_finite_qc_is_left_out_and_logged(caplog):
    product = ProductInfo(catg="MASTER_BIAS_VIS", qc={
        "RAW RON": QcValue(float("nan"), "raw bias read noise [e-]", (0.0, 15.0),
                           missing_reason="no finite difference in a frame pair"),
        "MASTER RON": QcValue(None, "master bias noise [e-]", (0.0, 10.0)),
        "STRUCTX": QcValue(float("inf"), "bias slope along x [e-/px]"),
        "STRUCTY": QcValue(0.7, "bias slope along y [e-/px]", (-0.01, 0.6)),
        "MBIAS MEDIAN": QcValue(np.float32(900.0), "raw bias level [e-]", (0.0, 2000.0)),
    })
    with caplog.at_level("WARNING", logger="soxs_core"):
        h = dfs_header(recipe="soxs_mbias", product=product, filename="p.fits",
                       raw_frames=[FrameRef(Path("r.fits"), "BIAS_VIS")])
    qc = {k: h[k] for k in h if k.startswith("ESO QC ")}
    assert qc == {"ESO QC STRUCTY": 0.7, "ESO QC MBIAS MEDIAN": 900.0, "ESO QC NFAIL": 1,
                  "ESO QC FAIL1": "STRUCTY = 0.7 not in (-0.01, 0.6)"}
    assert not any(v == "NaN" for v in h.values())
    messages = [r.getMessage() for r in caplog.records]
    assert ("QC RAW RON not written: could not be computed (no finite difference in a frame "
            "pair)") in messages
    assert any(m.startswith("QC MASTER RON not written") for m in messages)
    assert any(m.startswith("QC STRUCTX not written") for m in messages)


def test_an_omitted_qc_is_reported_once_per_run_not_once_per_product(tmp_path, caplog):
    context, qc = _mbias_context(tmp_path)
    qc.omit("RAW RON", "no finite difference in a frame pair")
    with caplog.at_level("WARNING", logger="soxs_core"):
        for k in range(3):          # three products of one run carry the same QC
            dfs_header(recipe="soxs_mbias", filename=f"p{k}.fits", raw_frames=[],
                       product=ProductInfo(catg="MASTER_BIAS_VIS",
                                           qc=context.declared_qc(qc)))
    said = [r for r in caplog.records if "RAW RON not written" in r.getMessage()]
    assert len(said) == 1
    # another reason is news
    qc.omit("RAW RON", "another reason")
    assert context.declared_qc(qc)["RAW RON"].report_missing
    # another run says it again
    other, _ = _mbias_context(tmp_path)
    qc.omit("RAW RON", "no finite difference in a frame pair")
    assert other.declared_qc(qc)["RAW RON"].report_missing


def test_recipe_leaves_out_what_it_cannot_compute_and_says_why(tmp_path, monkeypatch):
    sim = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="slow", seed=12)
    biases = sim.write_bias(tmp_path / "raw", n=3)
    key = ARMS["soxs_vis"].keywords["temperature"]
    with fits.open(biases[0], mode="update") as hdul:  # our own simulated input
        del hdul[0].header[key]
    # frame pairs without a finite difference: the raw read noise cannot be measured
    monkeypatch.setattr(masters, "read_noise_from_pair", lambda a, b: float("nan"))
    log = tmp_path / "log.txt"
    assert esorex(["--output-dir", str(tmp_path / "out"), "--log-file", str(log),
                   "--msg-level", "error", "soxs_mbias",
                   str(_sof(tmp_path / "b.sof", [(p, "BIAS_VIS") for p in biases]))]) == 0
    path = tmp_path / "out" / "master_bias_vis.fits"
    names = [name for name, _, _ in _qc_cards(path)]
    declared = [q.name for q in RECIPES["soxs_mbias"].SPEC.qc]
    assert names == [n for n in declared if n not in ("RAW RON", "DETECTOR TEMP")]
    header = fits.getheader(path)
    assert not any(v == "NaN" for v in header.values())
    fails = [header[k] for k in header if re.fullmatch(r"ESO QC FAIL\d+", k)]
    assert header["ESO QC NFAIL"] == len(fails) and not any("RAW RON" in f for f in fails)
    text = log.read_text()
    assert ("QC RAW RON not written: could not be computed (no finite difference in a frame "
            "pair)") in text
    assert f"QC DETECTOR TEMP not written: could not be computed ({biases[0].name} has no " \
           f"{key})" in text


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _param_section(page: str, name: str) -> str:
    flat = _normalised(page)
    start = flat.index(f"--{name} ")
    following = [i for i in (flat.find(" --", start + 3), flat.find(" PRODUCTS", start))
                 if i > 0]
    return flat[start:min(following)]


def test_man_pages_show_allowed_values_and_accepted_arms_only(capsys):
    assert esorex(["--man-page", "soxs_mbias"]) == 0
    page = capsys.readouterr().out
    # mbias takes UVB/VIS biases only: no NIR default is listed
    assert "xsh_nir" not in page and "soxs_nir" not in page
    assert "xsh_uvb 3.0, xsh_vis 3.0, soxs_vis 4.0" in _param_section(page,
                                                                      "frame-clipping-sigma")
    assert "minimum 0.1, no maximum" in _param_section(page, "frame-clipping-sigma")
    assert "minimum 0, no maximum" in _param_section(page, "stacked-clipping-iterations")
    assert "one of mean, median" in _param_section(page, "stacking-method")
    assert "ESO QC NFAIL" in page and "ESO QC FAILi" in page
    assert "ESO QC RAW RON [e-]" in page and "soxs_vis (0, 15)" in _normalised(page)
    flat = _normalised(page)
    for bit in Qual:
        assert f"{int(bit)} {bit.name} {MEANING[bit]}" in flat
    assert esorex(["--man-page", "soxs_mdark"]) == 0
    dark = capsys.readouterr().out
    # mdark takes darks of every arm: their defaults are all listed
    assert "xsh_uvb 5, xsh_vis 5, xsh_nir 5, soxs_vis 3, soxs_nir 3" in _param_section(
        dark, "stacked-clipping-iterations")


def test_params_listing_shows_allowed_values(capsys):
    assert esorex(["--params", "soxs_mbias"]) == 0
    text = capsys.readouterr().out
    assert "xsh_nir" not in text and "soxs_nir" not in text
    assert "value: 4.0   (type float; minimum 0.1, no maximum)" in text
    assert "value: mean   (type str; one of mean, median)" in text


def test_readme_tables_are_the_generated_ones():
    text = README.read_text()
    for name, section in readme.generated_sections(text).items():
        assert section == readme.SECTIONS[name]() + "\n", (
            f"README.md's generated '{name}' table is out of date: run "
            f"`{readme.REGENERATE}` from the repository root")
    # the tables carry the declarations, not a copy of them
    assert "| 32 | `NO_DATA` | " + MEANING[Qual.NO_DATA] + " |" in text
    for q in RECIPES["soxs_mdark"].SPEC.qc:
        assert f"| soxs_mdark | `ESO QC {q.name}` | {q.unit} | {q.description} |" in text


def test_qual_docstring_table_is_the_legend():
    import soxs_core.detector.quality as quality

    for bit in Qual:
        assert re.search(rf"^{int(bit)}\s+{bit.name}\s+{re.escape(MEANING[bit])}$",
                         quality.__doc__, re.M), bit.name
