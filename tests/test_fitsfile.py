"""The lean FITS layer against astropy: headers, data, checksums, DATAMD5, bad files."""

import gzip
import hashlib
import io
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.errors import InputError
from soxs_core.io.compressed import scaled_float32
from soxs_core.io.fits import (
    BLOCK_SIZE,
    BinTable,
    Card,
    FitsFile,
    Header,
    checksum_encode,
    read_header,
    read_image_data,
    read_table,
    scan_hdus,
    write_fits,
)
from soxs_core.io.products import data_md5

#: values that must come back exactly (type and, for floats, every bit)
VALUES = {
    "STR": "plain",
    "QUOTES": "O'Brien's 'x'",
    "EMPTY": "",
    "LEADING": "  two leading blanks",
    "TRUE": True,
    "FALSE": False,
    "INT": 42,
    "NEGINT": -7,
    "BIGINT": 2**62 + 1,
    "ZERO": 0.0,
    "TENTH": 0.1,
    "TINY": 1e-300,
    "NEGBIG": -2.5e10,
    "THIRD": 1 / 3,
    "HUGE": 1.7976931348623157e308,
    "SUBNORM": 5e-324,
    "NEGZERO": -0.0,
    "ROUND": 3.0,
    "UNDEF": None,
    "ESO DPR TYPE": "BIAS",
    "ESO DET OUT1 GAIN": 1.6667,
    "ESO QC STRUCTX": -0.0004357391482324417,
    "ESO PRO SCIENCE": False,
    "ESO PRO DATANCOM": 11,
    "ESO OBS NAME": "quote ' inside a hierarch value",
    "LONGSTR": "a long string with 'quotes' that needs CONTINUE cards, " * 4 + "end",
    "ESO OBS COMMENT": "x" * 150 + "'" * 7 + "y" * 30,
}


def _header() -> Header:
    header = Header()
    for i, (key, value) in enumerate(VALUES.items()):
        header[key] = (value, f"comment {i}")
    header["COMMENT"] = "a comment card  with two blanks"
    header["HISTORY"] = "a history card"
    return header


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and struct.pack(">d", a) == struct.pack(">d", b)
    return type(a) is type(b) and a == b


def _astropy_value(value):
    return None if type(value).__name__ == "Undefined" else value


def _hdu_data_bytes(path):
    """Data units (with padding) of every HDU, located by astropy."""
    with open(path, "rb") as fh:
        raw = fh.read()
    with fits.open(path) as hdul:
        spans = [hdul.fileinfo(i) for i in range(len(hdul))]
    return [raw[s["datLoc"]:s["datLoc"] + s["datSpan"]] for s in spans]


# ------------------------------------------------------------------------------ headers

def test_our_header_read_by_astropy(tmp_path):
    path = tmp_path / "h.fits"
    write_fits(path, [(_header(), np.zeros((2, 3), np.int16))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "card is not FITS standard" or similar
        theirs = fits.getheader(path)
    for i, (key, value) in enumerate(VALUES.items()):
        assert _same(_astropy_value(theirs[key]), value), key
        assert theirs.comments[key] == f"comment {i}", key
    assert list(theirs["COMMENT"]) == ["a comment card  with two blanks"]
    assert list(theirs["HISTORY"]) == ["a history card"]
    assert (theirs["NAXIS1"], theirs["NAXIS2"], theirs["BITPIX"]) == (3, 2, 16)


def test_our_header_read_back_by_us(tmp_path):
    path = tmp_path / "h.fits"
    write_fits(path, [(_header(), None)])
    ours = read_header(path)
    for i, (key, value) in enumerate(VALUES.items()):
        assert _same(ours[key], value), key
        assert ours.comment(key) == f"comment {i}", key
    comments = [c.value for c in ours.cards if c.keyword == "COMMENT"]
    assert comments == ["a comment card  with two blanks"]


def test_astropy_header_read_by_us(tmp_path):
    header = fits.Header()
    for i, (key, value) in enumerate(VALUES.items()):
        header[("HIERARCH " + key) if " " in key else key] = (
            fits.card.UNDEFINED if value is None else value, f"comment {i}")
    header["COMMENT"] = "first comment"
    header["COMMENT"] = "second comment"
    header["HISTORY"] = "some history"
    path = tmp_path / "a.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        fits.PrimaryHDU(header=header).writeto(path)
    ours = read_header(path)
    theirs = fits.getheader(path)
    for key in VALUES:
        # astropy writes floats as at most 20 characters: compare with what it reads itself
        assert _same(ours[key], _astropy_value(theirs[key])), key
        assert ours.comment(key) == theirs.comments[key], key
    for key in ("STR", "QUOTES", "LONGSTR", "ESO OBS COMMENT", "TENTH", "TINY", "NEGBIG",
                "BIGINT", "TRUE", "UNDEF"):
        assert _same(ours[key], VALUES[key]), key
    assert [c.value for c in ours.cards if c.keyword == "COMMENT"] == \
        ["first comment", "second comment"]
    assert ours["HISTORY"] == "some history"
    assert Header.from_cards(theirs.cards)["ESO DPR TYPE"] == "BIAS"


def test_header_parsing_details():
    cards = [
        "SIMPLE  =                    T",
        "DBL     =             1.5D-3 / D exponent",
        "EXP     =                 1E5",
        "INTPLUS =                  +12",
        "STR     = 'it''s   '           / trailing blanks dropped",
        "SLASH   = 'a/b' / comment / with slash",
        "JUNK    = what is this / unparsable value kept as text",
        "NOVAL   =",
        "HIERARCH ESO DPR TYPE = 'DARK' / hierarch",
        "HIERARCH ESO DET WIN1 BINX = 2",
        "LONG    = 'abc&'",
        "CONTINUE  'def&' / first part",
        "CONTINUE  'ghi' / second part",
        "COMMENT   keeps its leading blanks",
        "        blank keyword text",
        "DUP     = 1",
        "DUP     = 2",
        "END",
    ]
    raw = "".join(f"{c:80}" for c in cards).encode("ascii")
    raw += b" " * (-len(raw) % BLOCK_SIZE)
    h = Header.parse(raw)
    assert _same(h["DBL"], 1.5e-3) and _same(h["EXP"], 1e5) and _same(h["INTPLUS"], 12)
    assert h["STR"] == "it's" and h.comment("STR") == "trailing blanks dropped"
    assert h["SLASH"] == "a/b" and h.comment("SLASH") == "comment / with slash"
    assert h["JUNK"] == "what is this"
    assert h["NOVAL"] is None and "NOVAL" in h
    assert h["ESO DPR TYPE"] == "DARK" and h["HIERARCH ESO DPR TYPE"] == "DARK"
    assert h["eso dpr type"] == "DARK" and h["simple"] is True
    assert h["ESO DET WIN1 BINX"] == 2
    assert h["LONG"] == "abcdefghi" and h.comment("LONG") == "first part second part"
    assert h["COMMENT"] == "  keeps its leading blanks"
    assert h[""] == "blank keyword text"
    assert h["DUP"] == 1
    assert list(h) == ["SIMPLE", "DBL", "EXP", "INTPLUS", "STR", "SLASH", "JUNK", "NOVAL",
                       "ESO DPR TYPE", "ESO DET WIN1 BINX", "LONG", "COMMENT", "", "DUP", "DUP"]
    with pytest.raises(KeyError):
        h["MISSING"]
    assert h.get("MISSING", 3) == 3
    with pytest.raises(ValueError, match="END"):
        Header.parse(raw[:80 * 5])


def test_header_api():
    h = Header()
    h["hierarch ESO PRO CATG"] = ("MASTER_BIAS", "category")
    h["EXPTIME"] = (1.5, "exposure")
    h["EXPTIME"] = 2.0  # keeps the comment
    assert h.comment("EXPTIME") == "exposure" and h["exptime"] == 2.0
    assert h["HIERARCH ESO PRO CATG"] == "MASTER_BIAS" and "eso pro catg" in h
    h["ESO PRO CATG"] = ("OTHER", "new")
    assert len(h) == 2 and h.cards[0] == Card("ESO PRO CATG", "OTHER", "new")
    h.append(fits.Card("HIERARCH ESO DPR TYPE", "BIAS", "from astropy"))
    h.append(Card("EXPTIME", 9.0, "duplicate"))
    assert h["ESO DPR TYPE"] == "BIAS" and h["EXPTIME"] == 2.0 and len(h) == 4
    copy = h.copy()
    copy["NEW"] = 1
    assert "NEW" not in h and "NEW" in copy
    h["NP"] = (np.float32(0.5), "numpy scalar")
    h["NPI"] = np.int64(3)
    assert type(h["NP"]) is float and type(h["NPI"]) is int
    del h["ESO DPR TYPE"]
    assert "ESO DPR TYPE" not in h and h["EXPTIME"] == 2.0


def test_header_bytes_layout():
    h = Header()
    h["ESO PRO CATG"] = ("MASTER_BIAS_VIS", "Category of pipeline product frame")
    h["ESO PRO TYPE"] = ("REDUCED", "Product type")
    h["EXPTIME"] = (0.0, "Integration time [s]")
    h["OBJECT"] = ("BIAS", "Original target")
    h["ESO QC FPN FRACMAX"] = (39.387032378022035, "pattern noise: FFT peak, white-noise units")
    raw = h.tobytes()
    assert len(raw) == BLOCK_SIZE
    lines = [raw[i:i + 80].decode() for i in range(0, 80 * 6, 80)]
    assert lines[0].rstrip() == \
        "HIERARCH ESO PRO CATG = 'MASTER_BIAS_VIS' / Category of pipeline product frame"
    assert lines[1].rstrip() == "HIERARCH ESO PRO TYPE = 'REDUCED ' / Product type"
    assert lines[2].rstrip() == "EXPTIME =                  0.0 / Integration time [s]"
    assert lines[3].rstrip() == "OBJECT  = 'BIAS    '           / Original target"
    # the comment is shortened to fit, silently
    assert lines[4] == "HIERARCH ESO QC FPN FRACMAX = 39.387032378022035 / pattern noise: FFT " \
        "peak, whit"
    assert lines[5].rstrip() == "END"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf])
def test_non_finite_float_is_refused(value):
    h = Header()
    with pytest.raises(ValueError, match="ESO QC BAD"):
        h["ESO QC BAD"] = value
    h.append(Card("ESO QC BAD", value, ""))  # appended unchecked: refused when written
    with pytest.raises(ValueError, match="ESO QC BAD"):
        h.tobytes()


def test_unwritable_values_are_refused():
    h = Header()
    with pytest.raises(ValueError, match="OBJECT"):
        h["OBJECT"] = "Ångström"
    with pytest.raises(ValueError, match="ODD"):
        h["ODD"] = object()


# ------------------------------------------------------------------------------ data

@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64,
                                   ">f4", ">i2"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (17, 333), (2, 3, 5), (1000, 727)])
def test_data_round_trip_and_checksums(tmp_path, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind == "f":
        data = rng.normal(0, 1e3, shape).astype(dtype)
        data.flat[0] = np.nan
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, dtype=np.int64, endpoint=True) \
            .astype(dtype)
    extension = (rng.random((5, 11)) * 255).astype(np.uint8)
    header = Header()
    header["DATAMD5"] = ("Not computed", "MD5 checksum")
    path = tmp_path / "d.fits"
    write_fits(path, [(header, data), (Header([Card("EXTNAME", "EXT", "")]), extension)])
    size = path.stat().st_size
    assert size % BLOCK_SIZE == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path, checksum=True, do_not_scale_image_data=True) as hdul:
            assert len(hdul) == 2 and hdul[1].name == "EXT"
            for hdu in hdul:
                assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
            np.testing.assert_array_equal(hdul[0].data, data)
            assert hdul[0].data.dtype == np.dtype(dtype).newbyteorder(">")
            np.testing.assert_array_equal(hdul[1].data, extension)
            md5 = hdul[0].header["DATAMD5"]
    assert md5 == hashlib.md5(b"".join(_hdu_data_bytes(path))).hexdigest()
    assert md5 == data_md5([(None, data), (None, extension)])
    ours = FitsFile(path)
    np.testing.assert_array_equal(ours.read(0), data)
    np.testing.assert_array_equal(ours.read("EXT"), extension)
    assert ours[0].shape == shape and ours[1].header["EXTNAME"] == "EXT"


def test_header_only_primary_and_file_object(tmp_path):
    buffer = io.BytesIO()
    buffer.write(b"x" * 10)  # the HDUs start where the file is
    write_fits(buffer, [(Header(), None), (Header(), np.arange(6, dtype=np.int32))])
    path = tmp_path / "f.fits"
    path.write_bytes(buffer.getvalue()[10:])
    with fits.open(path, checksum=True) as hdul:
        assert hdul[0].data is None
        assert all(h.verify_checksum() == 1 and h.verify_datasum() == 1 for h in hdul)
        np.testing.assert_array_equal(hdul[1].data, np.arange(6))
        assert "DATAMD5" not in hdul[0].header


def test_structural_keywords_of_the_user_are_replaced(tmp_path):
    header = Header()
    header["NAXIS"] = 5
    header["NAXIS1"] = 99
    header["BITPIX"] = 64
    header["CHECKSUM"] = "stale"
    header["OBJECT"] = "kept"
    path = tmp_path / "s.fits"
    write_fits(path, [(header, np.ones((4, 6), np.float32))])
    with fits.open(path, checksum=True) as hdul:
        h = hdul[0].header
        assert (h["NAXIS"], h["NAXIS1"], h["NAXIS2"], h["BITPIX"]) == (2, 6, 4, -32)
        assert h["OBJECT"] == "kept" and hdul[0].verify_checksum() == 1
        assert list(h).count("NAXIS1") == 1 and list(h).count("CHECKSUM") == 1


def test_checksum_encoding_adds_its_value_to_the_sum():
    """Written from column 12 of a card (byte 3 of a 4-byte word) in place of 16 zeros, the
    encoding raises the ones'-complement sum of the words by exactly the encoded value."""

    def ones_sum(raw: bytes) -> int:
        total = sum(struct.unpack(f">{len(raw) // 4}I", raw))
        while total >> 32:
            total = (total & 0xFFFFFFFF) + (total >> 32)
        return total

    zeros = ones_sum(b"\0\0\0" + b"0" * 16 + b"\0")
    for value in (0, 1, 0x12345678, 0xDEADBEEF, 0x3A3A3A3A, 0x5B5B5B5B, 0xFFFFFFFE):
        text = checksum_encode(value)
        assert len(text) == 16 and text.isalnum(), text
        encoded = ones_sum(b"\0\0\0" + text.encode() + b"\0")
        assert (encoded - zeros - value) % 0xFFFFFFFF == 0, hex(value)


# ------------------------------------------------------------------------------ reading

def test_astropy_files_read_by_us(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 65536, (40, 31), dtype=np.uint16)
    ext = rng.normal(size=(3, 4, 5)).astype(np.float64)
    header = fits.Header()
    header["HIERARCH ESO DPR TYPE"] = "BIAS"
    path = tmp_path / "a.fits"
    fits.HDUList([fits.PrimaryHDU(raw, header=header),
                  fits.ImageHDU(ext, name="SCI"),
                  fits.ImageHDU(raw.astype(np.int16), name="INT")]).writeto(path, checksum=True)
    hdus = scan_hdus(path)
    assert [h.name for h in hdus] == ["PRIMARY", "SCI", "INT"]
    assert [h.bitpix for h in hdus] == [16, -64, 16]
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        for i, hdu in enumerate(hdul):
            stored = read_image_data(path, i)
            assert stored.dtype == hdu.data.dtype and stored.shape == hdu.data.shape
            np.testing.assert_array_equal(stored, hdu.data)
            assert hdus[i].data_offset == hdul.fileinfo(i)["datLoc"]
            assert hdus[i].header["CHECKSUM"] == hdu.header["CHECKSUM"]
    assert hdus[0].header["BZERO"] == 32768 and hdus[0].header["ESO DPR TYPE"] == "BIAS"
    np.testing.assert_array_equal(scaled_float32(read_image_data(path), hdus[0].header),
                                  raw.astype(np.float32))


def test_gzip_file_read_like_plain(tmp_path):
    data = (np.arange(50 * 7).reshape(50, 7) % 3).astype(np.uint8)
    plain = tmp_path / "m.fits"
    fits.PrimaryHDU(data).writeto(plain)
    packed = tmp_path / "m.fits.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_image_data(packed), data)
    assert read_header(packed)["NAXIS1"] == 7


def test_bad_files_give_one_line_input_errors(tmp_path):
    good = tmp_path / "good.fits"
    write_fits(good, [(Header(), np.ones((100, 100), np.float32))])
    blob = good.read_bytes()
    cases = {
        "junk.fits": (b"this is not a FITS file\n", "not a FITS file"),
        "empty.fits": (b"", "not a FITS file"),
        "cut.fits": (blob[:len(blob) // 2], "truncated"),
        "cuthdr.fits": (blob[:1000], "truncated"),
        "noend.fits": (blob[:BLOCK_SIZE].replace(b"END     ", b"XND     ") + blob[BLOCK_SIZE:],
                       "no END"),
        "badaxis.fits": (blob.replace(b"NAXIS1  =                  100",
                                      b"NAXIS1  =                 'ab'"), "NAXIS1"),
        "nonascii.fits": (blob[:200] + b"\xff" + blob[201:], "non-ASCII"),
        "badgz.fits.gz": (gzip.compress(blob)[:len(gzip.compress(blob)) // 2], "gzip"),
    }
    for name, (content, expect) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError) as info:
            FitsFile(path)
        message = str(info.value)
        assert name in message and expect in message and "\n" not in message, message
    with pytest.raises(InputError, match="not found"):
        FitsFile(tmp_path / "missing.fits")
    with pytest.raises(InputError, match="directory"):
        FitsFile(tmp_path)


def test_dfs_header_inherits_from_astropy_and_our_headers_alike(tmp_path):
    from pathlib import Path

    from soxs_core.io.products import FrameRef, ParamRecord, ProductInfo, QcValue, dfs_header

    raw = fits.Header()
    raw["INSTRUME"] = ("XSHOOTER", "Instrument used")
    raw["HIERARCH ESO DPR TYPE"] = ("BIAS", "not inherited")
    raw["HIERARCH ESO DET OUT1 RON"] = (3.2, "Readout noise (e-)")
    raw["RADECSYS"] = ("FK5", "old spelling")
    raw["ARCFILE"] = ("XSHOO.2026-11-22T10:00:00.000.fits", "Archive File Name")
    raw["BZERO"] = 32768
    raw["COMMENT"] = "not inherited either"
    kwargs = dict(recipe="soxs_mbias", filename="master_bias_vis.fits",
                  product=ProductInfo(catg="MASTER_BIAS_VIS", qc={
                      "RAW RON": QcValue(3.2944445392896418, "read noise of a raw bias [e-]"),
                      "STRUCTX": QcValue(-0.0004357391482324417, "slope", (-1.0, 1.0)),
                      "BAD": QcValue(float("nan"), "not finite", (0.0, 1.0))}),
                  raw_frames=[FrameRef(Path("/x/raw1.fits"), "BIAS_VIS")],
                  parameters=[ParamRecord("stacking-method", "mean", "mean"),
                              ParamRecord("sigma", 5.0, 5.0), ParamRecord("flag", True, True)])
    from_astropy = dfs_header(inherit_from=raw, **kwargs)
    from_ours = dfs_header(inherit_from=Header.from_cards(raw.cards), **kwargs)
    assert isinstance(from_astropy, Header)
    assert from_astropy.cards == from_ours.cards
    h = from_astropy
    assert h["ESO DET OUT1 RON"] == 3.2 and h["RADESYS"] == "FK5" and "RADECSYS" not in h
    assert "ESO DPR TYPE" not in h and "BZERO" not in h and "COMMENT" not in h
    assert h["ESO PRO ANCESTOR"] == raw["ARCFILE"] and h["DATAMD5"] == "Not computed"
    # a QC that could not be computed is left out (never a 'NaN' string) and fails nothing
    assert h["ESO QC STRUCTX"] == -0.0004357391482324417 and "ESO QC BAD" not in h
    assert h["ESO QC NFAIL"] == 0 and "ESO QC FAIL1" not in h
    assert [h[f"ESO PRO REC1 PARAM{i} VALUE"] for i in (1, 2, 3)] == ["mean", "5", "true"]
    path = tmp_path / "p.fits"
    write_fits(path, [(h, np.zeros((2, 2), np.float32))])
    with fits.open(path, checksum=True) as hdul:
        theirs = hdul[0].header
        assert theirs["ESO QC STRUCTX"] == -0.0004357391482324417
        assert theirs["ESO PRO CATG"] == "MASTER_BIAS_VIS" and theirs["ESO PRO SCIENCE"] is False
        assert theirs["DATAMD5"] == hashlib.md5(b"".join(_hdu_data_bytes(path))).hexdigest()


# ------------------------------------------------------------------------------ hot path

def test_recipe_path_does_not_import_astropy(tmp_path):
    from soxs_core.simulate import DetectorSimulator

    sim = DetectorSimulator(arm="xsh_vis", binning="2x2", readout="fast", seed=2)
    biases = sim.write_bias(tmp_path / "raw", n=3)
    sof = tmp_path / "bias.sof"
    sof.write_text("".join(f"{p} BIAS_VIS\n" for p in biases))
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from soxs_recipes.cli import run\n"
        f"status = run(['--output-dir', {str(out)!r}, '--msg-level', 'error', 'soxs_mbias', "
        f"{str(sof)!r}])\n"
        "print(status, 'astropy' in sys.modules, any(m.startswith('astropy') "
        "for m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["0", "False", "False"], result.stdout + result.stderr
    product = out / "master_bias_vis.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(product, checksum=True) as hdul:
            assert [h.name for h in hdul] == ["FLUX", "QUAL", "ERRS"]
            assert all(h.verify_checksum() == 1 and h.verify_datasum() == 1 for h in hdul)
            assert hdul[0].header["DATAMD5"] == data_md5(hdul)
            assert hdul[0].header["DATAMD5"] == hashlib.md5(
                b"".join(_hdu_data_bytes(product))).hexdigest()


# ------------------------------------------------------------------------------ binary tables
def _table_columns():
    rng = np.random.default_rng(5)
    return {"order": np.arange(7, dtype=np.int64), "x": rng.normal(size=7),
            "f": rng.normal(size=7).astype(np.float32), "n": np.arange(7, dtype=np.int32),
            "ok": rng.random(7) > 0.5, "name": np.array(["a", "bcd", "", "e", "f", "g", "h"]),
            "v": rng.normal(size=(7, 3))}


def test_our_binary_table_read_by_astropy_with_valid_checksums(tmp_path):
    columns = _table_columns()
    path = tmp_path / "t.fits"
    head = Header()
    head["EXTNAME"] = "ORDERS"
    head["TFORM1"] = "junk"  # a caller's field description is replaced by the table's own
    write_fits(path, [(Header(), None), (head, BinTable(columns, units={"x": "px"}))])
    with fits.open(path, checksum=True) as hdul:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hdul.verify("exception")
            assert hdul[1].verify_checksum() == 1 and hdul[1].verify_datasum() == 1
        data = hdul["ORDERS"].data
        assert hdul[1].columns["x"].unit == "px"
        for name, values in columns.items():
            got = data[name]
            if values.dtype.kind == "U":
                assert got.tolist() == values.tolist()
            else:
                np.testing.assert_array_equal(got, values)


def test_astropy_binary_table_read_by_us(tmp_path):
    columns = _table_columns()
    cols = [fits.Column(name=k, format={"order": "K", "x": "D", "f": "E", "n": "J", "ok": "L",
                                        "name": "3A", "v": "3D"}[k], array=v)
            for k, v in columns.items()]
    cols.append(fits.Column(name="u", format="J", bzero=2 ** 31,
                            array=np.array([0, 1, 2, 3, 4, 5, 2 ** 32 - 1], np.uint32)))
    path = tmp_path / "a.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    table = read_table(path, 1)
    for name, values in columns.items():
        if values.dtype.kind == "U":
            assert table[name].tolist() == values.tolist()
        else:
            np.testing.assert_array_equal(table[name], values)
    assert table["u"].tolist() == [0, 1, 2, 3, 4, 5, 2 ** 32 - 1]
    # and round trip through our writer
    write_fits(tmp_path / "b.fits", [(Header(), None), (Header(), table)])
    again = read_table(tmp_path / "b.fits", 1)
    for name in columns:
        np.testing.assert_array_equal(again[name], table[name])


def test_table_hdu_errors_are_one_line_input_errors(tmp_path):
    path = tmp_path / "img.fits"
    write_fits(path, [(Header(), np.zeros((2, 2), np.float32))])
    with pytest.raises(InputError, match="not a binary table"):
        read_table(path, 0)
    cols = [fits.Column(name="p", format="PJ()", array=[np.arange(3)])]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(
        tmp_path / "var.fits")
    with pytest.raises(InputError, match="does not take"):
        read_table(tmp_path / "var.fits", 1)


def test_table_products_write_floats_as_image_products_do(tmp_path):
    """A product written through astropy (the stare tables) carries each float exactly as our
    writer does: astropy's own 16-digit text reads back a different double for some values,
    and the same QC keyword then differs between the products of one recipe run."""
    from soxs_core.io.products import astropy_primary_hdu

    rng = np.random.default_rng(3)
    values = [0.000763405869742909, 1.0 / 3.0, *rng.random(200)]
    header = [(f"ESO QC V{i}", v, "a value") for i, v in enumerate(values)]
    fits.HDUList([astropy_primary_hdu(header)]).writeto(tmp_path / "t.fits")
    write_fits(tmp_path / "i.fits", [(Header(header), None)])
    ours, theirs = read_header(tmp_path / "i.fits"), fits.getheader(tmp_path / "t.fits")
    assert [ours[f"ESO QC V{i}"] for i in range(len(values))] == values
    assert [theirs[f"ESO QC V{i}"] for i in range(len(values))] == values
