"""The simulated archive (``soxs-simulate archive``): its files against its truth manifest.

Every check reads the written files (headers, bytes) and compares them with what the
manifest says, and the manifest with what the simulator was asked for; one small archive
is shared by the module.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from datetime import date, timedelta
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.time import Time

from soxs_core.detector.instruments import arm_from_header, slit_keyword
from soxs_core.detector.rawframe import frame_type_from_dpr
from soxs_core.errors import InputError
from soxs_core.simulate.archive import TRUTH_FILE, load_truth, simulate_archive
from soxs_core.simulate.cli import main
from soxs_core.simulate.headers import night_of

ARMS = ("xsh_vis", "soxs_nir")
DAYS = (0, 1, 3)  # a gap: the flat-less last night borrows from the nearest, 2 nights earlier
# fewer frames than the default small archive: what is checked does not depend on counts
COUNTS = dict(n_bias=1, n_dark=1, n_flat=1, n_std=1, n_science=1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("archive") / "arch"
    truth = simulate_archive(outdir, nights=DAYS, arms=ARMS, seed=3, orders=1, counts=COUNTS)
    return outdir, truth


def _header(path: Path) -> fits.Header:
    return fits.getheader(path)  # astropy reads .fits.gz as well


def _raw(truth, **match):
    return [f for f in truth.files if f["path"].startswith("raw/")
            and all(f[k] == v for k, v in match.items())]


def _first(truth, kind):
    return next(f for f in truth.files if f["problem_kind"] == kind)


def test_manifest_lists_every_file_with_its_checksum(archive):
    outdir, truth = archive
    on_disk = {p.relative_to(outdir).as_posix() for p in outdir.rglob("*") if p.is_file()}
    assert on_disk - {TRUTH_FILE} == {f["path"] for f in truth.files}
    for f in truth.files:
        data = (outdir / f["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"])
    assert load_truth(outdir).to_dict() == truth.to_dict()


def test_nights_are_the_requested_dates(archive):
    outdir, truth = archive
    first = date(2026, 11, 21)
    assert truth.nights == [(first + timedelta(days=d)).isoformat() for d in DAYS]
    assert sorted(p.name for p in (outdir / "raw").iterdir()) == truth.nights
    for f in _raw(truth):
        assert f["path"].split("/")[1] == f["night"], f["path"]


def test_headers_match_the_manifest(archive):
    outdir, truth = archive
    checked = 0
    for f in _raw(truth):
        if f["problem_kind"] in ("other instrument", "truncated"):
            continue
        h = _header(outdir / f["path"])
        arm = arm_from_header(h)
        mjd = h["MJD-OBS"]
        night = f["night"]
        # every date of the frame lies in its night (noon UT to noon UT)
        noon = Time(f"{night}T12:00:00", scale="utc").mjd
        assert noon <= mjd < noon + 1 and night_of(mjd) == night, f["path"]
        assert h["DATE-OBS"] == Time(mjd, format="mjd", scale="utc").isot[:23]
        assert abs(h["UTC"] - (mjd % 1) * 86400) < 0.01
        tpl = Time(h["ESO TPL START"], scale="utc").mjd
        assert noon <= tpl <= mjd + 1e-5 and h["ESO TPL START"] == f["template"]
        assert h["ARCFILE"].endswith(f"{h['DATE-OBS']}.fits")
        if f["problem_kind"] != "duplicate":
            assert Path(f["path"]).name.removesuffix(".gz") == h["ARCFILE"]
        assert (arm.instrument, arm.name, arm.code) == (f["instrument"], f["arm"],
                                                         f["arm_code"])
        assert frame_type_from_dpr(h["ESO DPR TYPE"], h["ESO DPR TECH"]) == f["frame_type"]
        setup = f["setup"]
        binning = (f"{h[arm.keywords['binx']]}x{h[arm.keywords['biny']]}" if arm.is_ccd
                   else "1x1")
        assert binning == setup["binning"]
        assert setup["readout"] == (h[arm.keywords["readout"]] if arm.is_ccd else "")
        assert (h["EXPTIME"], h[slit_keyword(arm)]) == (setup["exptime"], setup["slit"])
        checked += 1
    assert checked > 15


def test_each_night_and_arm_has_its_calibration_plan(archive):
    _, truth = archive
    last = truth.nights[-1]
    for night in truth.nights:
        for code in ARMS:
            types = [f["frame_type"] for f in _raw(truth, night=night, arm_code=code)
                     if f["setup"].get("binning") == "1x1" and not f["problem"]]
            ccd = code != "soxs_nir"
            assert types.count("BIAS") == (COUNTS["n_bias"] if ccd else 0)
            assert types.count("DARK") == COUNTS["n_dark"]
            flats = types.count("FLAT") + types.count("FLAT_OFF")
            assert flats == (0 if night == last else COUNTS["n_flat"] * (1 if ccd else 2))
            assert types.count("STD_FLUX") == COUNTS["n_std"]
            assert types.count("OBJECT") == COUNTS["n_science"]
    # NIR darks have the exposure time of the frames they calibrate
    for f in _raw(truth, arm_code="soxs_nir", frame_type="OBJECT"):
        if not f["problem"]:
            darks = _raw(truth, arm_code="soxs_nir", frame_type="DARK", night=f["night"])
            assert {d["setup"]["exptime"] for d in darks} >= {f["setup"]["exptime"]}


def test_calibration_tables_once_per_arm(archive):
    outdir, truth = archive
    tables = [f for f in truth.files if f["path"].startswith("calib/")]
    assert sorted((f["arm_code"], f["pro_catg"]) for f in tables) == sorted(
        (code, f"{catg}_{code[-3:].upper()}") for code in ARMS
        for catg in ("DISP_TAB", "DISP_IMAGE", "ORDER_TAB"))
    for f in tables:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a wrong checksum is a warning
            with fits.open(outdir / f["path"], checksum=True) as hdul:
                h = hdul[0].header
                assert [hdu.header["CHECKSUM"] for hdu in hdul]
        assert h["ESO PRO CATG"] == f["pro_catg"]
        assert night_of(h["MJD-OBS"]) == truth.nights[0]


def test_truncated_file_is_truncated(archive):
    outdir, truth = archive
    f = _first(truth, "truncated")
    path = outdir / f["path"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy says it may be truncated: it is
        h = _header(path)  # the header is whole, the data are not
    data_bytes = abs(h["BITPIX"]) // 8 * h["NAXIS1"] * h["NAXIS2"]
    assert path.stat().st_size < len(h.tostring()) + data_bytes
    assert path.stat().st_size % 2880 != 0
    assert f["problem"].startswith("truncated") and not f["step"]


def test_duplicate_has_the_same_bytes(archive):
    outdir, truth = archive
    f = _first(truth, "duplicate")
    original = f["problem"].removeprefix("duplicate of ")
    assert original != f["path"] and (outdir / original).is_file()
    assert (outdir / original).read_bytes() == (outdir / f["path"]).read_bytes()
    assert truth.file(original)["step"] and not f["step"]


def test_foreign_frame_is_of_another_instrument(archive):
    outdir, truth = archive
    f = _first(truth, "other instrument")
    h = _header(outdir / f["path"])
    assert h["INSTRUME"] == f["instrument"] == "FORS2" and "ESO SEQ ARM" not in h
    with pytest.raises(InputError):
        arm_from_header(h)
    assert not f["step"]


def test_uncalibrated_setup_has_no_calibration_anywhere(archive):
    outdir, truth = archive
    f = _first(truth, "no calibration")
    binning = f["setup"]["binning"]
    assert binning != "1x1"
    calibrating = [g for g in _raw(truth, arm_code=f["arm_code"])
                   if g["frame_type"] in ("BIAS", "FLAT") and not g["problem"]
                   and _header(outdir / g["path"])["ESO DET WIN1 BINX"] == int(binning[0])]
    assert calibrating == []
    (step,) = [s for s in truth.impossible_steps if s["raw"][0]["path"] == f["path"]]
    assert set(step["missing"]) == {"MASTER_BIAS_VIS", "ORDER_TAB_VIS"}  # required ones
    assert binning in f["problem"]


def test_some_frames_are_gzipped_and_used(archive):
    outdir, truth = archive
    packed = [f for f in truth.files if f["compressed"]]
    assert packed and all(f["path"].endswith(".fits.gz") for f in packed)
    assert any(f["step"] for f in packed)
    for f in packed:
        data = (outdir / f["path"]).read_bytes()
        assert data[:2] == b"\x1f\x8b" and gzip.decompress(data)[:6] == b"SIMPLE"
    assert all(not f["compressed"] for f in truth.files if f["path"].endswith(".fits"))


def test_flatless_night_borrows_the_nearest_flat(archive):
    outdir, truth = archive
    last = truth.nights[-1]
    for f in _raw(truth, night=last):
        if f["problem_kind"] != "other instrument":
            assert "FLAT" not in _header(outdir / f["path"])["ESO DPR TYPE"]
    with_flats = {s["night"] for s in truth.steps if s["recipe"] == "soxs_mflat"}
    nearest = min(with_flats, key=lambda n: abs(date.fromisoformat(n)
                                                 - date.fromisoformat(last)))
    stare = [s for s in truth.steps if s["recipe"] == "soxs_stare" and s["night"] == last]
    assert len(stare) == 2 * len(ARMS)
    for s in stare:
        borrowed = {c["tag"].rsplit("_", 1)[0]: c for c in s["calibrations"]
                    if not c["same_night"]}
        assert set(borrowed) == {"MASTER_FLAT", "ORDER_TAB"}
        for c in borrowed.values():
            assert c["night"] == nearest != last
            assert truth.step(c["step"])["recipe"] == "soxs_mflat"


def test_steps_partition_the_usable_frames(archive):
    outdir, truth = archive
    usable = {f["path"] for f in _raw(truth) if not f["problem"]}
    in_steps = [r["path"] for s in truth.steps for r in s["raw"]]
    assert sorted(in_steps) == sorted(usable)
    seen = set()
    for s in truth.steps:
        frames = [truth.file(r["path"]) for r in s["raw"]]
        assert {(f["night"], f["arm_code"], f["step"]) for f in frames} == {
            (s["night"], s["arm_code"], s["key"])}
        for key, value in s["setup"].items():
            values = {f["template"] if key == "template" else f["setup"][key]
                      for f in frames}
            assert values == {value}, (s["key"], key)
        for c in s["calibrations"]:
            if "step" in c:
                assert c["step"] in seen  # upstream steps come first
                assert truth.step(c["step"])["night"] == c["night"]
            else:
                assert (outdir / c["path"]).is_file()
        seen.add(s["key"])


def _tiny(outdir: Path, seed: int) -> list[str]:
    return ["archive", str(outdir), "--nights", "1", "--arms", "soxs_nir", "--seed",
            str(seed), "--n-dark", "1", "--n-flat", "0", "--n-std", "0", "--n-science", "1",
            "-q"]


def test_same_seed_gives_the_same_archive(tmp_path, capsys):
    def simulated(outdir, seed, *more):
        assert main(_tiny(outdir, seed) + list(more)) == 0
        data = json.loads((outdir / TRUTH_FILE).read_text())
        data.pop("seconds")
        return data

    a = simulated(tmp_path / "a", 5)
    assert simulated(tmp_path / "b", 5) == a  # gzip, checksum cards, noise: all the same
    assert capsys.readouterr().out == ""  # -q
    other = simulated(tmp_path / "c", 6, "--no-mess")
    # (without flats its science frame has no order table: that problem stays)
    assert {f["problem_kind"] for f in other["files"]} <= {"", "no calibration"}
    assert not any(f["compressed"] for f in other["files"])
    assert {f["sha256"] for f in other["files"] if f["path"].startswith("raw/")}.isdisjoint(
        f["sha256"] for f in a["files"] if f["path"].startswith("raw/"))


@pytest.mark.parametrize("args, words", [
    (["--nights", "0"], "--nights"),
    (["--nights", "1,1"], "--nights"),
    (["--arms", "fors2"], "--arms"),
    (["--arms", "xsh_vis,xsh_vis"], "--arms"),
    (["--orders", "0"], "--orders"),
    (["--seed", "-1"], "--seed"),
    (["--n-flat", "-2"], "--n-flat"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments_one_line(tmp_path, capsys, args, words):
    outdir = tmp_path / "arch"
    assert main(["archive", str(outdir), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soxs-simulate archive: error:")
    assert words in err and not outdir.exists()


def test_bad_output_directory_one_line(tmp_path, capsys, archive):
    afile = tmp_path / "file"
    afile.write_text("x")
    partial = tmp_path / "partial"
    (partial / "raw").mkdir(parents=True)
    for outdir, words in ((afile, "not a directory"), (archive[0], "already holds an"),
                          (partial, "interrupted")):
        assert main(["archive", str(outdir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(outdir) in err and words in err
    assert afile.read_text() == "x"


def test_night_mode_is_unchanged(tmp_path, capsys):
    # without "archive" first the night parser answers (a directory may be named archive)
    assert main([str(tmp_path / "archive"), "--arm", "fors2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("soxs-simulate: error: argument --arm")
    assert not (tmp_path / "archive").exists()


def test_night_offset_moves_every_date(tmp_path, capsys):
    """``soxs-simulate --night-offset N``: the same night N days later, with other noise."""
    common = ["--arm", "soxs_nir", "--orders", "12", "--n-dark", "1", "--n-flat", "0",
              "--n-science", "0", "--n-std", "0", "-q"]
    frames = {}
    for days in (0, 3):
        night = tmp_path / f"night{days}"
        assert main([str(night), "--night-offset", str(days), *common]) == 0
        (path,) = (night / "raw").iterdir()
        frames[days] = fits.getheader(path), fits.getdata(path), night
    (h0, d0, n0), (h3, d3, n3) = frames[0], frames[3]
    assert h3["MJD-OBS"] - h0["MJD-OBS"] == pytest.approx(3.0, abs=1e-7)
    for h in (h0, h3):
        t = Time(h["MJD-OBS"], format="mjd", scale="utc")
        assert h["DATE-OBS"] == t.isot[:23] and h["ARCFILE"] == f"SOXS.{h['DATE-OBS']}.fits"
    shifted = Time(Time(h0["ESO TPL START"], scale="utc").mjd + 3, format="mjd", scale="utc")
    assert h3["ESO TPL START"] == shifted.isot[:19]
    assert night_of(h3["MJD-OBS"]) == (date.fromisoformat(night_of(h0["MJD-OBS"]))
                                       + timedelta(days=3)).isoformat()
    table = fits.getheader(n3 / "calib" / "DISP_TAB_NIR.fits")
    assert table["MJD-OBS"] - fits.getheader(n0 / "calib" / "DISP_TAB_NIR.fits")[
        "MJD-OBS"] == pytest.approx(3.0, abs=1e-7)
    assert (d0 != d3).mean() > 0.5  # another night's noise


def test_a_uvb_arm_gets_the_two_orders_its_flats_are_stitched_on():
    """One order per arm would leave the UVB's D2 and QTH flats nothing to stitch on
    (soxs_mflat fails on it): the simulated UVB arm always has at least two."""
    from soxs_core.detector.instruments import get_arm
    from soxs_core.simulate.archive import _normalised_orders, central_orders

    uvb, vis = get_arm("XSHOOTER", "UVB"), get_arm("XSHOOTER", "VIS")
    chosen = _normalised_orders([uvb, vis], 1)
    assert chosen == {uvb.code: central_orders(uvb, 2), vis.code: central_orders(vis, 1)}
    assert len(chosen[uvb.code]) == 2
