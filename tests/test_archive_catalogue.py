"""The frame catalogue against what the archive simulator wrote: classification, problems,
rescans that read only what changed, compressed copies."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import pytest
from astropy.io import fits

from archive_data import small_archive
from soxs_archive.catalogue import Catalogue, ScanCounts
from soxs_archive.model import FrameRecord
from soxs_core.errors import InputError

#: problems of the truth manifest that the catalogue reports (a setup nobody calibrated is
#: the plan's business)
FILE_PROBLEMS = ("other instrument", "truncated", "duplicate")
#: what a copy of a file may change
IDENTITY = ("path", "size", "mtime", "checksum", "problem")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return small_archive(tmp_path_factory)


@pytest.fixture(scope="module")
def scanned(archive, tmp_path_factory):
    catalogue = Catalogue(tmp_path_factory.mktemp("workspace"))
    records = catalogue.scan([archive.outdir])
    first = catalogue.counts
    again = catalogue.scan([archive.outdir])
    yield dict(records={r.path: r for r in records}, first=first, second=catalogue.counts,
               again=again)
    catalogue.close()


def _abs(archive, relative: str) -> str:
    return str((archive.outdir / relative).resolve())


def _classification(record: FrameRecord) -> dict:
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in IDENTITY}


def test_every_file_is_catalogued_and_nothing_else(archive, scanned):
    assert sorted(scanned["records"]) == sorted(_abs(archive, f["path"]) for f in archive.files)


def test_frames_are_classified_as_the_simulator_wrote_them(archive, scanned):
    checked = 0
    for f in archive.files:
        if f["problem_kind"] in FILE_PROBLEMS:
            continue
        record = scanned["records"][_abs(archive, f["path"])]
        assert record.problem == "", f["path"]
        assert (record.instrument, record.arm) == (f["instrument"], f["arm"]), f["path"]
        assert (record.frame_type, record.pro_catg) == (f["frame_type"], f["pro_catg"])
        if f["night"]:
            assert record.night == f["night"], f["path"]
        if not f["compressed"]:
            assert record.checksum == f["sha256"] and record.size == f["size"]
        if not f["pro_catg"]:
            for key, value in f["setup"].items():
                assert getattr(record, key) == value, (f["path"], key)
            assert record.mjd == pytest.approx(f["mjd"], abs=1e-8)
            assert record.template == f["template"]
            assert record.dpr_type and record.dpr_tech
        checked += 1
    assert checked >= 20


def test_lamp_flats_name_their_lamp(archive, scanned):
    flats = [scanned["records"][_abs(archive, f["path"])] for f in archive.files
             if f["frame_type"] == "FLAT"]
    assert flats and all(r.lamp == "QTH" for r in flats)
    bias = next(f for f in archive.files if f["frame_type"] == "BIAS" and not f["problem"])
    assert scanned["records"][_abs(archive, bias["path"])].lamp == ""


@pytest.mark.parametrize("kind, words", [
    ("other instrument", ("INSTRUME='FORS2'", "neither SOXS nor XSHOOTER")),
    ("truncated", ("truncated FITS file",)),
])
def test_unusable_files_say_which_and_what(archive, scanned, kind, words):
    entries = [f for f in archive.files if f["problem_kind"] == kind]
    assert entries
    for f in entries:
        problem = scanned["records"][_abs(archive, f["path"])].problem
        assert problem.startswith(_abs(archive, f["path"]) + ": ")
        assert "\n" not in problem
        for word in words:
            assert word in problem


def test_duplicates_are_marked_with_their_original(archive, scanned):
    duplicates = [f for f in archive.files if f["problem_kind"] == "duplicate"]
    assert duplicates
    for f in duplicates:
        original = f["problem"].removeprefix("duplicate of ")
        record = scanned["records"][_abs(archive, f["path"])]
        assert record.problem == (f"{_abs(archive, f['path'])}: duplicate of "
                                  f"{_abs(archive, original)}")
        kept = scanned["records"][_abs(archive, original)]
        assert kept.problem == "" and kept.checksum == record.checksum
    flagged = {p for p, r in scanned["records"].items() if r.problem}
    assert flagged == {_abs(archive, f["path"]) for f in archive.files
                       if f["problem_kind"] in FILE_PROBLEMS}


def test_a_second_scan_reads_no_file(archive, scanned):
    assert scanned["first"] == ScanCounts(new=len(archive.files))
    assert scanned["second"] == ScanCounts(unchanged=len(archive.files))
    assert {r.path: r for r in scanned["again"]} == scanned["records"]


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def test_rescan_rereads_changed_files_reads_new_ones_and_drops_vanished_ones(archive,
                                                                              tmp_path):
    tables = sorted((archive.outdir / "calib").glob("*.fits"))
    copies = [_copy(t, tmp_path / "in" / t.name) for t in tables]
    catalogue = Catalogue(tmp_path / "workspace")
    catalogue.scan([tmp_path / "in"])
    assert catalogue.counts == ScanCounts(new=len(copies))
    with fits.open(copies[0], mode="update") as hdul:
        hdul[0].header["HIERARCH ESO PRO CATG"] = "SOMETHING_ELSE_VIS"
    copies[1].unlink()
    extra = _copy(tables[1], tmp_path / "in" / "sub" / "again.fits")
    records = {r.path: r for r in catalogue.scan([tmp_path / "in"])}
    assert catalogue.counts == ScanCounts(new=1, reread=1, unchanged=len(copies) - 2,
                                          dropped=1)
    assert records[str(copies[0])].pro_catg == "SOMETHING_ELSE_VIS"
    assert str(copies[1]) not in records and str(extra) in records
    catalogue.close()
    reopened = Catalogue(tmp_path / "workspace")  # the catalogue persists in the workspace
    reopened.scan([tmp_path / "in"])
    assert reopened.counts == ScanCounts(unchanged=len(copies))
    reopened.close()


def test_the_workspace_is_not_scanned(archive, tmp_path):
    table = sorted((archive.outdir / "calib").glob("*.fits"))[0]
    _copy(table, tmp_path / "in" / table.name)
    workspace = tmp_path / "in" / "workspace"
    _copy(table, workspace / "reduced" / "product.fits")
    records = Catalogue(workspace).scan([tmp_path / "in"])
    assert [Path(r.path).name for r in records] == [table.name]


def _object_frame(archive) -> Path:
    entry = next(f for f in archive.files if f["frame_type"] == "OBJECT" and f["step"])
    return archive.outdir / entry["path"]


def _gzip(source: Path, target: Path) -> Path:
    with open(source, "rb") as src, gzip.open(target, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    return target


def _fpack(source: Path, target: Path) -> Path:
    with fits.open(source) as hdul:
        compressed = fits.CompImageHDU(hdul[0].data, hdul[0].header)
        fits.HDUList([fits.PrimaryHDU(), compressed]).writeto(target)
    return target


def _compress(source: Path, target: Path) -> Path:
    ncompress = pytest.importorskip("ncompress")
    with open(source, "rb") as src, open(target, "wb") as dst:
        ncompress.compress(src, dst)
    return target


@pytest.mark.parametrize("suffix, pack", [(".fits.gz", _gzip), (".fits.fz", _fpack),
                                          (".fits.Z", _compress)])
def test_a_compressed_copy_is_classified_the_same(archive, scanned, tmp_path, suffix, pack):
    source = _object_frame(archive)
    (tmp_path / "in").mkdir()
    packed = pack(source, tmp_path / "in" / (source.name.removesuffix(".fits") + suffix))
    record, = Catalogue(tmp_path / "workspace").scan([tmp_path / "in"])
    original = scanned["records"][str(source.resolve())]
    assert record.path == str(packed) and record.problem == ""
    assert _classification(record) == _classification(original)
    if suffix != ".fits.fz":  # the expanded stream is the original file: a duplicate
        assert record.checksum == original.checksum


def test_a_compressed_copy_beside_its_original_is_a_duplicate(archive, tmp_path):
    source = _copy(_object_frame(archive), tmp_path / "in" / "a.fits")
    packed = _gzip(source, tmp_path / "in" / "b.fits.gz")
    records = {r.path: r for r in Catalogue(tmp_path / "workspace").scan([tmp_path / "in"])}
    assert records[str(source)].problem == ""
    assert records[str(packed)].problem == f"{packed}: duplicate of {source}"


def test_a_truncated_gzip_stream_is_unusable(archive, tmp_path):
    (tmp_path / "in").mkdir()
    packed = _gzip(_object_frame(archive), tmp_path / "whole.fits.gz")
    cut = tmp_path / "in" / "cut.fits.gz"
    cut.write_bytes(packed.read_bytes()[:os.path.getsize(packed) // 2])
    record, = Catalogue(tmp_path / "workspace").scan([tmp_path / "in"])
    assert record.problem.startswith(f"{cut}: ") and "truncated" in record.problem


def test_a_missing_directory_is_refused_in_one_line(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path / 'nowhere'}: no such directory$"):
        Catalogue(tmp_path / "workspace").scan([tmp_path / "nowhere"])


def test_a_corrupt_catalogue_is_refused_in_one_line(tmp_path):
    (tmp_path / "catalogue.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(InputError, match="catalogue.sqlite: unusable catalogue database"):
        Catalogue(tmp_path)
