"""The Cython raw-frame preparation kernel against its numpy reference, and raw geometry."""

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.instruments import ARMS
from soxs_core.detector.quality import Qual
from soxs_core.detector.rawframe import RawFrame, prepare_band_reference, rotated_rows


@pytest.mark.parametrize("rotation", [0, 1, 2, 3])
def test_rotated_rows_equals_numpy_rot90(rotation):
    raw = np.arange(7 * 5).reshape(7, 5)
    full = np.rot90(raw, rotation)
    for start, stop in [(0, full.shape[0]), (1, 3), (2, full.shape[0])]:
        np.testing.assert_array_equal(rotated_rows(raw, rotation, start, stop),
                                      full[start:stop])


def _write_raw(path, arm, data, header_extra=None):
    header = fits.Header()
    header["INSTRUME"] = arm.instrument
    header["HIERARCH ESO SEQ ARM"] = arm.name
    header["HIERARCH ESO DPR CATG"] = "CALIB"
    header["HIERARCH ESO DPR TYPE"] = "DARK"
    header["HIERARCH ESO DPR TECH"] = "IMAGE"
    header["EXPTIME"] = 10.0
    header["HIERARCH " + arm.keywords["gain"]] = 1.7
    header["HIERARCH " + arm.keywords["ron"]] = 4.0
    for key, value in (header_extra or {}).items():
        header[key] = value
    fits.PrimaryHDU(data, header=header).writeto(path)


@pytest.mark.parametrize("code", ["xsh_uvb", "xsh_nir", "soxs_vis"])
@pytest.mark.parametrize("bias", ["none", "level", "image"])
def test_kernel_equals_reference(tmp_path, code, bias):
    arm = ARMS[code]
    rng = np.random.default_rng(len(code) + len(bias))
    data = rng.integers(0, 65536, arm.raw_shape, dtype=np.uint16)
    data[rng.random(data.shape) < 0.001] = 65535
    path = tmp_path / "raw.fits"
    _write_raw(path, arm, data)
    frame = RawFrame.open(path)
    rows, cols = frame.prepared_shape
    start, stop = 3, min(rows, 70)
    static = (rng.random((stop - start, cols)) < 0.01).astype(np.uint8) * np.uint8(
        Qual.STATIC_BAD)
    level = {"none": None, "level": 5000.0,
             "image": rng.uniform(0, 60000, (stop - start, cols)).astype(np.float32)}[bias]
    out = [np.empty((stop - start, cols), t) for t in (np.float32, np.float32, np.uint8)]
    frame.prepare_into(start, stop, *out, static, 4.0, level)
    ref = prepare_band_reference(frame.read_adu(start, stop), frame.gain, np.float32(4.0) ** 2,
                                 frame.saturation_adu, static, level)
    for fast, slow in zip(out, ref):
        np.testing.assert_array_equal(fast, slow)
    # the orientation: prepared = rot90(raw) trimmed, in electrons
    expected = np.rot90(data.astype(np.float32), arm.rotation)[arm.science_slices()[0],
                                                               arm.science_slices()[1]]
    np.testing.assert_array_equal(out[0], expected[start:stop] * np.float32(1.7))
    assert np.all((out[2] & Qual.SATURATED) == np.where(
        expected[start:stop] >= frame.saturation_adu, Qual.SATURATED, 0))


def test_compressed_inputs_read_like_plain_ones(tmp_path):
    import gzip
    import shutil

    arm = ARMS["xsh_nir"]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 40000, arm.raw_shape, dtype=np.uint16)
    plain = tmp_path / "plain.fits"
    _write_raw(plain, arm, data)
    with open(plain, "rb") as src, gzip.open(tmp_path / "g.fits.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    header = fits.getheader(plain)
    fits.HDUList([fits.PrimaryHDU(header=header),
                  fits.CompImageHDU(data, header=header)]).writeto(tmp_path / "t.fits.fz")
    reference = RawFrame.open(plain).read_band()[0]
    for name in ("g.fits.gz", "t.fits.fz"):
        frame = RawFrame.open(tmp_path / name)
        np.testing.assert_array_equal(frame.read_band()[0], reference)
    ncompress = pytest.importorskip("ncompress")
    with open(plain, "rb") as src, open(tmp_path / "z.fits.Z", "wb") as dst:
        ncompress.compress(src, dst)
    np.testing.assert_array_equal(RawFrame.open(tmp_path / "z.fits.Z").read_band()[0],
                                  reference)


def test_missing_gain_falls_back_to_the_arm_value_and_says_so(tmp_path, caplog):
    arm = ARMS["xsh_vis"]
    data = np.full(arm.raw_shape, 1000, np.uint16)
    path = tmp_path / "nogain.fits"
    _write_raw(path, arm, data)
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header["HIERARCH " + arm.keywords["gain"]]
    with caplog.at_level("WARNING"):
        frame = RawFrame.open(path)
    assert frame.gain == arm.gain and frame.gain_source == "default"
    assert "nogain.fits" in caplog.text and "default gain" in caplog.text
    assert frame.read_band(0, 1)[0][0, 0] == pytest.approx(1000 * arm.gain)
