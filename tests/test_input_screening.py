"""Which raw frames a master accepts, and what the refusals and warnings say.

Every bad set below used to give exit 0 and a wrong master (ERRS sqrt(2) too small, NaN QC
and ERRS, no HOT/COLD flags) or a traceback.  Each is now either reduced correctly (checked
against the simulator's truth) or refused with one line naming the file, the problem and the
numbers.
"""

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.combine.masters import verify_frames
from soxs_core.combine.screening import screen_frames
from soxs_core.detector.instruments import ARMS
from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame
from soxs_core.errors import InputError
from soxs_core.io.image import read_image_product
from soxs_core.simulate import DetectorSimulator
from soxs_recipes.cli import run as esorex

NBIAS = 5


@pytest.fixture(scope="module")
def biases(tmp_path_factory):
    """X-shooter VIS 2x2 fast and slow bias sets (the slow one's CONAD 0.6 is not the arm's
    default 1.4, so a defaulted gain shows)."""
    root = tmp_path_factory.mktemp("screen")
    fast = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=5)
    slow = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="slow", seed=6)
    return {"sim": fast, "fast": fast.write_bias(root / "fast", n=NBIAS),
            "slow": slow.write_bias(root / "slow", n=4)}


def _copies(paths, where: Path) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, where / Path(p).name)) for p in paths]


def _set_card(path: Path, key: str, text: str) -> None:
    """Replace the first card of ``key`` by ``key = text`` written as raw bytes (so values
    astropy would refuse to write, like an unquoted ``abc`` or ``nan``, get in)."""
    data = bytearray(path.read_bytes())
    prefix = ("HIERARCH " + key if " " in key else key.ljust(8)).encode()
    at = next(i for i in range(0, 2880 * 20, 80) if data[i:i + len(prefix)] == prefix
              and data[i + len(prefix):i + len(prefix) + 2].strip() in (b"=", b""))
    card = (f"HIERARCH {key} = {text}" if " " in key else f"{key:<8}= {text}").ljust(80)
    data[at:at + 80] = card.encode()
    path.write_bytes(bytes(data))


def _delete_card(path: Path, key: str) -> None:
    with fits.open(path, mode="update", do_not_scale_image_data=True) as hdul:
        del hdul[0].header["HIERARCH " + key]


def _edit_data(path: Path, edit) -> None:
    """Apply ``edit`` to the physical ADU values of the raw image (written back as uint16)."""
    with fits.open(path, mode="update") as hdul:
        adu = hdul[0].data.astype(np.float64)
        hdul[0].data[...] = np.clip(np.round(edit(adu)), 0, 65535).astype(np.uint16)


def _refused(tmp_path, capsys, paths, tag="BIAS_VIS", recipe="soxs_mbias", sof_lines=None):
    """Run the recipe; it must fail with one line on stderr and write no product.

    Returns the line and the log."""
    sof = tmp_path / "in.sof"
    sof.write_text(sof_lines or "".join(f"{p} {tag}\n" for p in paths))
    out = tmp_path / "out"
    capsys.readouterr()
    status = esorex(["--output-dir", str(out), recipe, str(sof)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert not list(out.glob("*.fits")) if out.is_dir() else True
    return err, captured.out  # the runner's log, warnings included, goes to stdout


def _reduce(tmp_path, paths, tag="BIAS_VIS", recipe="soxs_mbias"):
    sof = tmp_path / "ok.sof"
    sof.write_text("".join(f"{p} {tag}\n" for p in paths))
    out = tmp_path / "out_ok"
    assert esorex(["--output-dir", str(out), "--msg-level", "warning", recipe, str(sof)]) == 0
    return out / "master_bias_vis.fits"


# ---------------------------------------------------------------------------- duplicates
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_one_file_listed_twice_is_refused_naming_both(tmp_path, capsys, biases, spelling):
    frames = _copies(biases["fast"][:3], tmp_path / "raw")
    again = {"same": frames[1],
             "dotdot": tmp_path / "raw" / ".." / "raw" / frames[1].name,
             "symlink": tmp_path / "link.fits",
             "hardlink": tmp_path / "hard.fits"}[spelling]
    if spelling == "symlink":
        again.symlink_to(frames[1])
    elif spelling == "hardlink":
        os.link(frames[1], again)
    err, log = _refused(tmp_path, capsys, [*frames, again])
    assert "same file" in err and str(again) in err and str(frames[1]) in err, err


def test_two_files_with_identical_data_are_refused_naming_both(tmp_path, capsys, biases):
    frames = _copies(biases["fast"][:3], tmp_path / "raw")
    copy = tmp_path / "raw" / "renamed_copy.fits"
    shutil.copy(frames[0], copy)
    # a copy whose header was touched is still the same exposure
    with fits.open(copy, mode="update") as hdul:
        hdul[0].header["ARCFILE"] = "XSHOO.2026-11-22T11:11:11.111.fits"
    err, log = _refused(tmp_path, capsys, [*frames, copy])
    assert "same pixel values" in err and copy.name in err and frames[0].name in err, err


def test_a_frame_listed_twice_would_make_errs_too_small(biases):
    """Why the refusal matters: the stack of a repeated frame claims sqrt(2) less noise
    than the frames have, and its pull against the truth would be sqrt(2) too wide."""
    frames = [RawFrame.open(p) for p in biases["fast"][:3]]
    with pytest.raises(InputError, match="same file"):
        verify_frames([*frames, RawFrame.open(biases["fast"][0])], "BIAS", 3)
    verify_frames(frames, "BIAS", 3)  # distinct files pass


# ---------------------------------------------------------------------------- bad frames
@pytest.mark.parametrize("case,expect", [
    ("saturated", "100% of the sampled pixels are saturated"),
    ("mostly_saturated", "of the sampled pixels are saturated"),
    ("zero", "every sampled pixel is 0 ADU"),
    ("noisy", "noise"),
    ("offset", "level"),
])
def test_bad_frame_data_is_refused_by_name(tmp_path, capsys, biases, case, expect):
    frames = _copies(biases["fast"], tmp_path / "raw")
    bad = frames[2]
    level = float(np.median(fits.getdata(bad)))
    edits = {
        "saturated": lambda adu: np.full_like(adu, 65535),
        # 60 % of the rows at the 16-bit ceiling
        "mostly_saturated": lambda adu: np.where(np.arange(adu.shape[0])[:, None] < 0.6 *
                                                 adu.shape[0], 65535, adu),
        "zero": lambda adu: adu * 0,
        # ten times the noise at the same level: not this detector in this mode
        "noisy": lambda adu: level + (adu - level) * 10,
        # a bias 1000 ADU (1400 e-, 260 read noises) above the others
        "offset": lambda adu: adu + 1000,
    }
    _edit_data(bad, edits[case])
    err, log = _refused(tmp_path, capsys, frames)
    assert bad.name in err and expect in err, err
    assert sum(f.name in err for f in frames) == 1, err


@pytest.mark.parametrize("key,value,expect", [
    ("BZERO", "0", "level"),
    ("BSCALE", "32768", "level"),
    ("BZERO", "1E30", "saturated"),
])
def test_damaged_scaling_in_one_header_is_refused_with_the_numbers(tmp_path, capsys, biases,
                                                                   key, value, expect):
    frames = _copies(biases["fast"], tmp_path / "raw")
    _set_card(frames[3], key, value)
    err, log = _refused(tmp_path, capsys, frames)
    assert frames[3].name in err and expect in err, err
    assert f"{key} = {float(value):g}" in err, err  # the value that differs from the others
    if expect == "level":
        # "level -4.5e+04 e- vs median 532 e- of the 5 frames": both numbers are quoted
        others = [RawFrame.open(p) for p in frames if p != frames[3]]
        median = np.median([s.level for s in screen_frames(others)])
        quoted = float(err.split("vs median ")[1].split(" e-")[0])
        assert quoted == pytest.approx(median, rel=0.01)


@pytest.mark.parametrize("key", ["BZERO", "BSCALE"])
@pytest.mark.parametrize("layout", ["be16", "int32", "fz"])
@pytest.mark.parametrize("text", ["abc", "'abc'"])
def test_non_numeric_scaling_gives_one_line_naming_file_and_keyword(tmp_path, capsys, biases,
                                                                    key, layout, text):
    """The plain 16-bit file goes through the kernel, a 32-bit one through the numpy path, a
    tile-compressed one through astropy: each names the file and the keyword."""
    frames = _copies(biases["fast"][:3], tmp_path / "raw")
    bad = frames[1]
    if layout == "int32":
        with fits.open(bad) as hdul:
            data, header = hdul[0].data.astype(np.int32), hdul[0].header.copy()
        bad.unlink()
        fits.PrimaryHDU(data, header=header).writeto(bad)
        with fits.open(bad, mode="update", do_not_scale_image_data=True) as hdul:
            hdul[0].header["BZERO"], hdul[0].header["BSCALE"] = 0, 1
    elif layout == "fz":
        with fits.open(bad) as hdul:
            data, header = hdul[0].data, hdul[0].header.copy()
        bad.unlink()
        bad = bad.with_suffix(".fits.fz")
        fits.HDUList([fits.PrimaryHDU(header=header),
                      fits.CompImageHDU(data, header=header)]).writeto(bad)
        frames[1] = bad
    if layout == "fz":  # the image's scaling sits in the compressed extension's header
        raw = bytearray(bad.read_bytes())
        at = raw.index(f"{key:<8}=".encode(), 2880)
        raw[at:at + 80] = f"{key:<8}= {text}".ljust(80).encode()
        bad.write_bytes(bytes(raw))
    else:
        _set_card(bad, key, text)
    err, log = _refused(tmp_path, capsys, frames)
    assert bad.name in err and f"{key} = 'abc'" in err, err


# ------------------------------------------------------- handled: saturated pixels, normal sets
def test_partly_saturated_frame_is_stacked_without_its_saturated_pixels(tmp_path, capsys,
                                                                        biases):
    """Saturated pixels carry SATURATED in their frame and stay out of the stack: where one
    frame of five is saturated the master is the mean of the other four (truth), with errors
    sqrt(5/4) larger; where every frame is saturated QUAL says so; nothing is NaN and every
    QC value is a finite number."""
    sim = biases["sim"]
    frames = _copies(biases["fast"], tmp_path / "raw")
    band = slice(0, 300)  # raw rows = prepared rows for this unrotated arm
    _edit_data(frames[2], lambda adu: np.where(np.arange(adu.shape[0])[:, None] < band.stop,
                                               65535, adu))
    everywhere = (slice(1000, 1010), slice(400, 410))
    for path in frames:
        _edit_data(path, lambda adu: np.where(
            (np.arange(adu.shape[0])[:, None] >= 1000) & (np.arange(adu.shape[0])[:, None] < 1010)
            & (np.arange(adu.shape[1]) >= 405) & (np.arange(adu.shape[1]) < 415), 65535, adu))
    # the bit itself, in the frame, from the kernel
    frame = RawFrame.open(frames[2])
    rows, cols = 8, frame.prepared_shape[1]
    out = [np.empty((rows, cols), t) for t in (np.float32, np.float32, np.uint8)]
    frame.prepare_into(0, rows, *out, np.zeros((rows, cols), np.uint8), frame.read_noise)
    assert np.all(out[2] & Qual.SATURATED)

    master = read_image_product(_reduce(tmp_path, frames))
    assert np.isfinite(master.data).all() and np.isfinite(master.error).all()
    header = fits.getheader(tmp_path / "out_ok" / "master_bias_vis.fits")
    for name in ("RAW RON", "MASTER RON", "MBIAS MEDIAN", "STRUCTX", "STRUCTY"):
        value = header[f"HIERARCH ESO QC {name}"]
        assert isinstance(value, float) and math.isfinite(value), (name, value)
    assert header["HIERARCH ESO QC RAW RON"] == pytest.approx(sim.truth.read_noise, rel=0.15)

    good = master.qual == 0
    others = np.mean([sim.truth.expected_electrons(0.0, k) for k in range(NBIAS) if k != 2],
                     axis=0)
    pull = (master.data - others)[band][good[band]] / master.error[band][good[band]]
    assert abs(np.mean(pull)) < 0.05 and 0.9 < np.std(pull) < 1.1
    ratio = np.median(master.error[band][good[band]]) / np.median(master.error[400:][good[400:]])
    assert ratio == pytest.approx(np.sqrt(NBIAS / (NBIAS - 1)), rel=0.02)
    # saturated in every frame: flagged, filled, finite error
    assert np.all(master.qual[everywhere] & Qual.SATURATED)
    assert np.all(master.qual[everywhere] & Qual.NO_DATA)


@pytest.mark.parametrize("code,kind", [("xsh_uvb", "bias"), ("soxs_vis", "bias"),
                                       ("xsh_nir", "dark"), ("soxs_nir", "dark")])
def test_normal_sets_pass_the_screening(tmp_path, code, kind):
    """Legitimate sets are not refused: bias levels that drift by many read noises' worth of
    scatter, NIR darks with their pedestal."""
    sim = DetectorSimulator(arm=code, seed=3, bias_drift=5 * ARMS[code].read_noise)
    paths = (sim.write_bias(tmp_path, n=4) if kind == "bias"
             else sim.write_dark(tmp_path, n=4, exptime=300.0))
    samples = screen_frames([RawFrame.open(p) for p in paths])
    levels = [s.level for s in samples]
    assert np.ptp(levels) > ARMS[code].read_noise  # the levels do move
    noise = [s.noise for s in samples]
    assert max(noise) / min(noise) < 1.2


def test_darks_with_drifting_level_make_a_master(tmp_path):
    sim = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=9,
                            bias_drift=30.0)
    darks = sim.write_dark(tmp_path / "raw", n=3, exptime=60.0)
    sof = tmp_path / "d.sof"
    sof.write_text("".join(f"{p} DARK_VIS\n" for p in darks))
    assert esorex(["--output-dir", str(tmp_path / "out"), "--msg-level", "error",
                   "soxs_mdark", str(sof)]) == 0


# ---------------------------------------------------------------------------- header warnings
@pytest.mark.parametrize("value,shown", [("'abc'", "'abc'"), ("0", "0"), ("-1", "-1"),
                                         ("nan", "'nan'")])
def test_bad_gain_keyword_is_named_with_its_value_and_the_arm_default(tmp_path, capsys,
                                                                      biases, value, shown):
    frames = _copies(biases["slow"], tmp_path / "raw")
    bad = frames[1]
    _set_card(bad, "ESO DET OUT1 CONAD", value)
    arm = ARMS["xsh_vis"]
    err, log = _refused(tmp_path, capsys, frames)
    assert (f"ESO DET OUT1 CONAD = {shown} in {bad.name} is not a positive number; using the "
            f"XSHOOTER VIS default gain {arm.gain:g}") in log
    assert "no ESO DET OUT1 CONAD" not in log
    # the agreement check names the odd frame, its keyword and value, and the value the
    # other frames actually carry
    assert f"{bad}: gain differs" in err, err
    assert f"ESO DET OUT1 CONAD = {shown}" in err, err
    assert f"ESO DET OUT1 CONAD = 0.6 in {frames[0].name}" in err, err


def test_bad_gain_equal_to_the_default_is_used_with_a_warning(tmp_path, capsys, biases):
    frames = _copies(biases["fast"], tmp_path / "raw")
    _set_card(frames[0], "ESO DET OUT1 CONAD", "'abc'")
    capsys.readouterr()
    _reduce(tmp_path, frames)
    assert f"ESO DET OUT1 CONAD = 'abc' in {frames[0].name} is not a positive number" \
        in capsys.readouterr().out


def test_bad_read_noise_keyword_is_named(tmp_path, capsys, biases):
    frames = _copies(biases["slow"], tmp_path / "raw")
    _set_card(frames[2], "ESO DET OUT1 RON", "-3")
    err, log = _refused(tmp_path, capsys, frames)
    assert (f"ESO DET OUT1 RON = -3 in {frames[2].name} is not a positive number; using the "
            "XSHOOTER VIS default read noise 5.3 e-") in log
    assert f"{frames[2]}: read noise differs" in err and "ESO DET OUT1 RON = -3" in err, err
    assert f"ESO DET OUT1 RON = 3.2 in {frames[0].name}" in err, err


@pytest.mark.parametrize("position", [0, 2])
def test_missing_readout_keyword_is_named(tmp_path, capsys, biases, position):
    """Even when the odd frame is listed first, it is the one named."""
    frames = _copies(biases["fast"][:4], tmp_path / "raw")
    _delete_card(frames[position], "ESO DET READ SPEED")
    err, log = _refused(tmp_path, capsys, frames)
    assert f"{frames[position]}: readout mode differs" in err, err
    assert "no ESO DET READ SPEED" in err, err
    other = frames[1 if position == 0 else 0].name
    assert f"ESO DET READ SPEED = '1pt/400k/lg' in {other}" in err, err
