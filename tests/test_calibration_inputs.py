"""Calibration images given to a recipe: a damaged one is refused in one line naming it."""

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.errors import InputError
from soxs_core.io.image import read_image_product


def _write_product(path, damaged_plane: str) -> None:
    planes = {"FLUX": np.ones((4, 5), np.int16), "QUAL": np.zeros((4, 5), np.uint8),
              "ERRS": np.ones((4, 5), np.int16)}
    hdus = [fits.PrimaryHDU(planes["FLUX"]), fits.ImageHDU(planes["QUAL"], name="QUAL"),
            fits.ImageHDU(planes["ERRS"], name="ERRS")]
    hdus[0].header["EXTNAME"] = "FLUX"
    fits.HDUList(hdus).writeto(path)
    # damage the scaling of one plane in the bytes, as a broken writer would leave it
    raw = bytearray(path.read_bytes())
    index = {"FLUX": 0, "ERRS": 2}[damaged_plane]
    start = 0
    for _ in range(index + 1):
        start = raw.index(b"BITPIX", start) + 1
    end = raw.index(b"END" + b" " * 77, start)
    card = b"BZERO   = 'abc'".ljust(80)
    raw[end:end] = card
    # keep the header a whole number of 2880-byte blocks: drop one card of blank padding
    pad = raw.index(b" " * 80, end + 160)
    del raw[pad:pad + 80]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("plane", ["FLUX", "ERRS"])
def test_unusable_bzero_in_a_calibration_names_the_file_and_plane(tmp_path, plane):
    path = tmp_path / "master_bias_vis.fits"
    _write_product(path, plane)
    with pytest.raises(InputError) as err:
        read_image_product(path)
    message = str(err.value)
    assert str(path) in message and plane in message and "BZERO" in message
