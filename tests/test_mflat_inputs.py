"""soxs_mflat refuses input that does not belong together: one line naming the file and the
problem, a non-zero exit status, nothing written, no input touched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.simulate import simulate_night
from soxs_core.simulate.instrument import InstrumentSimulator
from soxs_recipes.cli import run as esorex

ORDERS = {"xsh_vis": [20, 21, 22], "soxs_nir": [15, 16, 17], "xsh_uvb": [20, 21, 22]}
BINNING = {"xsh_vis": "2x2", "soxs_nir": "1x1", "xsh_uvb": "2x2"}


def _night(root: Path, arm: str) -> dict:
    night = root / arm
    result = simulate_night(night, arm=arm, binning=BINNING[arm], n_bias=3, n_dark=0,
                            n_flat=5, n_science=0, n_std=0, orders=ORDERS[arm])
    if "bias" in result.sofs:
        assert esorex(["--output-dir", str(night / "reduced" / "soxs_mbias"),
                       "soxs_mbias", str(result.sofs["bias"])]) == 0
    entries = [line.split() for line in result.sofs["flat"].read_text().splitlines()]
    return {"night": night, "entries": entries}


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("mflat_inputs")
    return {arm: _night(root, arm) for arm in ("xsh_vis", "soxs_nir", "xsh_uvb")}


def _digest(paths) -> dict:
    return {p: hashlib.md5(Path(p).read_bytes()).hexdigest() for p in paths}


def _refused(tmp_path: Path, entries, capsys, *expected: str) -> str:
    """Run soxs_mflat on ``entries``; assert a one-line refusal holding ``expected``."""
    sof = tmp_path / "flat.sof"
    sof.write_text("".join(f"{p} {t}\n" for p, t in entries))
    before = _digest(p for p, _ in entries)
    out = tmp_path / "out"
    capsys.readouterr()
    code = esorex(["--output-dir", str(out), "soxs_mflat", str(sof)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists() or not any(out.glob("*.fits")) and not any(out.glob("*.pdf"))
    assert _digest(p for p, _ in entries) == before
    return lines[0]


def _copy_with(tmp_path: Path, path: str, name: str, **cards) -> str:
    target = tmp_path / name
    shutil.copy(path, target)
    with fits.open(target, mode="update") as hdul:
        for key, value in cards.items():
            hdul[0].header[key.replace("__", " ")] = value
    return str(target)


def test_fewer_than_five_flats(nights, tmp_path, capsys):
    entries = nights["xsh_vis"]["entries"]
    flats = [e for e in entries if e[1] == "LAMP_FLAT_VIS"]
    rest = [e for e in entries if e[1] != "LAMP_FLAT_VIS"]
    _refused(tmp_path, flats[:4] + rest, capsys, "4", "at least 5")


def test_flats_of_different_exposure_times(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_vis"]["entries"]]
    odd = _copy_with(tmp_path, entries[2][0], "odd_exptime.fits", EXPTIME=3.0)
    entries[2][0] = odd
    _refused(tmp_path, entries, capsys, "odd_exptime.fits", "EXPTIME")


def test_flats_of_different_slits(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_vis"]["entries"]]
    odd = _copy_with(tmp_path, entries[1][0], "odd_slit.fits",
                     **{"HIERARCH ESO INS OPTI4 NAME": "5.0x11"})
    entries[1][0] = odd
    _refused(tmp_path, entries, capsys, "odd_slit.fits", "slit", "5.0x11")


def test_master_bias_of_another_binning(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_vis"]["entries"]]
    k = next(i for i, e in enumerate(entries) if e[1] == "MASTER_BIAS_VIS")
    bias = tmp_path / "bias_1x2.fits"
    with fits.open(entries[k][0]) as hdul:
        for hdu in hdul:
            if hdu.data is not None:
                hdu.data = np.repeat(hdu.data, 2, axis=1)
        hdul.writeto(bias)
    entries[k][0] = str(bias)
    _refused(tmp_path, entries, capsys, "bias_1x2.fits", "binning")


def test_master_bias_of_another_arm(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_vis"]["entries"]]
    k = next(i for i, e in enumerate(entries) if e[1] == "MASTER_BIAS_VIS")
    entries[k][0] = _copy_with(tmp_path, entries[k][0], "bias_uvb.fits",
                               **{"HIERARCH ESO SEQ ARM": "UVB"})
    _refused(tmp_path, entries, capsys, "bias_uvb.fits", "UVB")


def test_order_table_of_another_arm(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_vis"]["entries"]]
    k = next(i for i, e in enumerate(entries) if e[1] == "ORDER_TAB_VIS")
    other = tmp_path / "order_tab_nir.fits"
    InstrumentSimulator("soxs_nir", orders=[15]).order_table().writeto(other)
    entries[k][0] = str(other)
    _refused(tmp_path, entries, capsys, "order_tab_nir.fits", "NIR")


def test_uvb_with_one_lamp_says_which_is_missing(nights, tmp_path, capsys):
    entries = [e for e in nights["xsh_uvb"]["entries"] if e[1] != "LAMP_QFLAT_UVB"]
    _refused(tmp_path, entries, capsys, "LAMP_QFLAT_UVB", "QTH")


def test_lamp_off_frames_that_do_not_match(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["soxs_nir"]["entries"]]
    offs = [i for i, e in enumerate(entries)
            if fits.getheader(e[0]).get("HIERARCH ESO DPR TECH") == "IMAGE"]
    assert offs, "the NIR night has lamp-off frames"
    entries[offs[0]][0] = _copy_with(tmp_path, entries[offs[0]][0], "off_exptime.fits",
                                     EXPTIME=99.0)
    _refused(tmp_path, entries, capsys, "off_exptime.fits", "EXPTIME")


def test_nir_without_lamp_off_or_dark(nights, tmp_path, capsys):
    entries = [e for e in nights["soxs_nir"]["entries"]
               if fits.getheader(e[0]).get("HIERARCH ESO DPR TECH") != "IMAGE"]
    _refused(tmp_path, entries, capsys, "lamp-off", "MASTER_DARK")


def test_tag_must_agree_with_header(nights, tmp_path, capsys):
    entries = [list(e) for e in nights["xsh_uvb"]["entries"]]
    k = next(i for i, e in enumerate(entries) if e[1] == "LAMP_DFLAT_UVB")
    entries[k][1] = "LAMP_QFLAT_UVB"
    _refused(tmp_path, entries, capsys, Path(entries[k][0]).name, "LAMP_DFLAT_UVB")


def test_soxspipe_comma_tags_are_accepted(nights, tmp_path, capsys):
    """soxspipe's organiser writes ``LAMP,FLAT_VIS``: read as LAMP_FLAT_VIS (this SOF then
    fails only for its 4 flats, not for its tags)."""
    entries = [[p, t.replace("LAMP_FLAT", "LAMP,FLAT")] for p, t in nights["xsh_vis"]["entries"]]
    flats = [e for e in entries if e[1] == "LAMP,FLAT_VIS"]
    rest = [e for e in entries if e[1] != "LAMP,FLAT_VIS"]
    _refused(tmp_path, flats[:4] + rest, capsys, "at least 5")


def test_self_tracing_that_finds_no_orders(nights, tmp_path, capsys):
    """Five lamp-flat frames with no lamp light (a bias given as a flat) and no ORDER_TAB."""
    sim = InstrumentSimulator("xsh_vis", binning=BINNING["xsh_vis"], orders=ORDERS["xsh_vis"])
    entries = [e for e in nights["xsh_vis"]["entries"] if e[1] == "MASTER_BIAS_VIS"]
    for k in range(5):
        hdul, _ = sim.detector.make_frame("FLAT", 15.0, 40 + k, signal=None)
        path = tmp_path / f"dark_flat_{k}.fits"
        hdul.writeto(path)
        entries.append([str(path), "LAMP_FLAT_VIS"])
    _refused(tmp_path, entries, capsys, "dark_flat_", "no ", "order")
