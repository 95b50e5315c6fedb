"""soxs_stare refuses bad input in one line naming the file, exits non-zero and writes nothing
(issue 9, "Bad input"); a standard star not in the catalogue is still extracted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.simulate import simulate_night
from soxs_recipes.cli import run

ORDERS = (21,)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("stare_inputs")
    res = simulate_night(root / "vis", "xsh_vis", "1x1", n_bias=0, n_dark=0, n_flat=0,
                         n_science=1, n_std=1, orders=ORDERS)
    # an NIR night for another arm's calibrations
    nir = simulate_night(root / "nir", "soxs_nir", "1x1", n_bias=0, n_dark=1, n_flat=0,
                         n_science=1, n_std=0, orders=(13,))
    return root, res, nir


def _sof_lines(sof: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in sof.read_text().splitlines() if line.strip()]


def _write(path: Path, lines) -> Path:
    path.write_text("".join(f"{p} {t}\n" for p, t in lines))
    return path


def _refused(capsys, sof: Path, outdir: Path, *needles: str) -> str:
    status = run(["--output-dir", str(outdir), "soxs_stare", str(sof)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "internal error" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    written = [p for p in outdir.glob("*") if p.suffix in (".fits", ".pdf", ".txt")]
    assert not written, written
    return err[0]


def test_science_frame_of_another_arm(night, tmp_path, capsys) -> None:
    root, vis, nir = night
    lines = [(p, t) for p, t in _sof_lines(vis.sofs["stare_truth"])
             if not t.startswith("ORDER_TAB")]
    nir_tab = nir.truth["order_tab"]
    lines.append((str(nir_tab), "ORDER_TAB_VIS"))
    _refused(capsys, _write(tmp_path / "a.sof", lines), tmp_path / "out", str(nir_tab))


def test_calibration_of_another_binning(night, tmp_path, capsys) -> None:
    root, vis, _ = night
    bias = [p for p, t in _sof_lines(vis.sofs["stare_truth"]) if t.startswith("MASTER_BIAS")][0]
    binned = tmp_path / "bias_2x2.fits"
    with fits.open(bias) as hdul:
        for hdu in hdul:
            hdu.data = hdu.data[::2, ::2].copy()
        hdul.writeto(binned)
    lines = [(binned if t.startswith("MASTER_BIAS") else p, t)
             for p, t in _sof_lines(vis.sofs["stare_truth"])]
    _refused(capsys, _write(tmp_path / "b.sof", lines), tmp_path / "out", str(binned),
             "binning")


def test_missing_dispersion_map(night, tmp_path, capsys) -> None:
    _, vis, _ = night
    lines = [(p, t) for p, t in _sof_lines(vis.sofs["stare_truth"])
             if not t.startswith("DISP_IMAGE")]
    _refused(capsys, _write(tmp_path / "c.sof", lines), tmp_path / "out", "DISP_IMAGE_VIS")


def test_order_table_whose_orders_are_not_on_the_frame(night, tmp_path, capsys) -> None:
    _, vis, _ = night
    tab = [p for p, t in _sof_lines(vis.sofs["stare_truth"]) if t.startswith("ORDER_TAB")][0]
    moved = tmp_path / "order_tab_moved.fits"
    with fits.open(tab) as hdul:
        row = hdul[1].data
        for name in ("cent_00", "edgeup_c00", "edgelow_c00"):
            row[name] = row[name] + 5000.0
        hdul.writeto(moved)
    lines = [(moved if t.startswith("ORDER_TAB") else p, t)
             for p, t in _sof_lines(vis.sofs["stare_truth"])]
    _refused(capsys, _write(tmp_path / "d.sof", lines), tmp_path / "out", str(moved),
             "not", "frame")


def test_order_table_whose_edges_are_nonsense(night, tmp_path, capsys) -> None:
    """Edges that evaluate to 1e9 px (soxspipe 0.17.4's own table of a three-order night)
    are refused in one line naming the table, not used to extract."""
    _, vis, _ = night
    tab = [p for p, t in _sof_lines(vis.sofs["stare_truth"]) if t.startswith("ORDER_TAB")][0]
    wild = tmp_path / "order_tab_wild_edges.fits"
    with fits.open(tab) as hdul:
        row = hdul[1].data
        row["edgeup_c01"] = row["edgeup_c01"] + 3e5  # +3e5 px per unbinned px along
        hdul.writeto(wild)
    lines = [(wild if t.startswith("ORDER_TAB") else p, t)
             for p, t in _sof_lines(vis.sofs["stare_truth"])]
    _refused(capsys, _write(tmp_path / "w.sof", lines), tmp_path / "out", str(wild),
             "edges of order 21", "not usable")


def test_response_of_another_arm(night, tmp_path, capsys) -> None:
    from soxs_core.spectrum.fluxcal import Response

    _, vis, _ = night
    resp = tmp_path / "resp_tab_nir.fits"
    header = fits.Header()
    header["INSTRUME"] = "SOXS"
    header["HIERARCH ESO SEQ ARM"] = "NIR"
    header["HIERARCH ESO PRO CATG"] = "RESP_TAB_NIR"
    wave = np.linspace(1000, 2000, 50)
    cols = [fits.Column(name="polyOrder", format="K", array=[0]),
            fits.Column(name="c0", format="D", array=[1e-17])]
    orders = fits.BinTableHDU.from_columns([
        fits.Column(name="ORDER", format="K", array=np.full(50, 13)),
        fits.Column(name="WAVE", format="D", array=wave),
        fits.Column(name="RESPONSE", format="D", array=np.full(50, 1e-17))],
        name="RESPONSE_ORDERS")
    fits.HDUList([fits.PrimaryHDU(header=header), fits.BinTableHDU.from_columns(cols),
                  orders]).writeto(resp)
    assert Response is not None
    lines = _sof_lines(vis.sofs["stare_truth"]) + [(str(resp), "RESP_TAB_VIS")]
    _refused(capsys, _write(tmp_path / "e.sof", lines), tmp_path / "out", str(resp), "NIR")


def test_standard_not_in_the_catalogue_is_extracted(night, tmp_path) -> None:
    _, vis, _ = night
    lines = _sof_lines(vis.sofs["std_truth"])
    raw = [p for p, t in lines if t.startswith("STD_FLUX")][0]
    renamed = tmp_path / Path(raw).name
    shutil.copy(raw, renamed)
    with fits.open(renamed, mode="update") as hdul:
        hdul[0].header["OBJECT"] = "HD 999999"
        hdul[0].header["HIERARCH ESO OBS TARG NAME"] = "HD 999999"
    lines = [(renamed if p == raw else p, t) for p, t in lines]
    out = tmp_path / "out"
    logfile = tmp_path / "esorex.log"
    status = run(["--output-dir", str(out), "--log-file", str(logfile), "soxs_stare",
                  str(_write(tmp_path / "f.sof", lines))])
    assert status == 0
    said = [m for m in logfile.read_text().splitlines() if "WARNING" in m]
    assert any("HD 999999" in m and "catalogue" in m for m in said), said
    assert (out / "sci_slit_flux_vis_extracted_orders.fits").is_file()
    assert not (out / "resp_tab_vis.fits").exists()


def test_truncated_dispersion_map(night, tmp_path, capsys) -> None:
    _, vis, _ = night
    lines = _sof_lines(vis.sofs["stare_truth"])
    disp = [p for p, t in lines if t.startswith("DISP_IMAGE")][0]
    cut = tmp_path / "disp_image_truncated.fits"
    cut.write_bytes(Path(disp).read_bytes()[:30000])
    before = cut.read_bytes()
    lines = [(cut if t.startswith("DISP_IMAGE") else p, t) for p, t in lines]
    _refused(capsys, _write(tmp_path / "g.sof", lines), tmp_path / "out", str(cut),
             "truncated")
    assert cut.read_bytes() == before


def test_dispersion_map_orders_follow_the_order_plane():
    """The remembered order list is found again when the order plane is replaced."""
    from soxs_core.echelle.dispersion import DispersionMap

    order = np.zeros((20, 8), np.int16)
    order[2:5], order[9:12] = 17, 16
    dm = DispersionMap(np.zeros((20, 8), np.float32), np.zeros((20, 8), np.float32), order)
    assert dm.orders.tolist() == [16, 17]
    dm.orders[0] = 99                      # a caller's copy: the map's list is unchanged
    assert dm.orders.tolist() == [16, 17]
    dm.order = np.where(order == 16, 0, order).astype(np.int16)
    assert dm.orders.tolist() == [17]
