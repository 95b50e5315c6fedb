"""A minimal FITS layer: headers, plain image HDUs, checksums — numpy and the standard library.

This is what the recipes need on their hot path, without the import cost of astropy:

* :class:`Header` — ordered cards with the dict-like API the pipeline uses (a drop-in for the
  part of ``astropy.io.fits.Header`` it relies on).  ``HIERARCH`` keywords are stored without
  the prefix (``ESO DPR TYPE``), as astropy does.
* :class:`FitsFile`, :func:`scan_hdus`, :func:`read_image_data`, :func:`read_header` — the HDU
  layout of a plain or gzip-compressed file and the stored (big-endian, unscaled) pixels of an
  image HDU.
* :func:`write_fits` — primary and IMAGE extension HDUs with ``DATASUM``/``CHECKSUM`` on every
  HDU (FITS checksum convention) and, when the primary header has a ``DATAMD5`` card, the MD5 of
  the data units, all computed while the data are written.

Tile-compressed images (``.fits.fz``) and tables are recognised but not decoded here.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import queue
import re
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from soxs_core.errors import InputError

__all__ = [
    "Card",
    "Header",
    "HDUInfo",
    "FitsFile",
    "BinTable",
    "read_table",
    "scan_hdus",
    "read_image_data",
    "read_header",
    "write_fits",
    "checksum_encode",
    "BLOCK_SIZE",
]

BLOCK_SIZE = 2880
_CARD = 80

#: keywords whose cards hold free text instead of a value
_COMMENTARY = frozenset(("COMMENT", "HISTORY", ""))
_STANDARD_KEY = re.compile(r"[A-Z0-9_-]{0,8}\Z")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_INT = re.compile(r"[+-]?[0-9]+\Z")
_REAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[EeDd][+-]?[0-9]+)?\Z")
_AXIS_KEY = re.compile(r"NAXIS[0-9]{1,3}\Z")
#: a table's field descriptions, generated from its :class:`BinTable` when written
_TABLE_KEY = re.compile(r"(TFIELDS|(TTYPE|TFORM|TUNIT|TSCAL|TZERO|TNULL|TDIM|TDISP)[0-9]{1,3})\Z")
#: written by :func:`write_fits` itself, ignored in the headers it is given
_GENERATED = frozenset(("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT",
                        "GROUPS", "END", "CHECKSUM", "DATASUM"))


# ---------------------------------------------------------------------------------------- cards

class Card(NamedTuple):
    """One header entry.  ``keyword`` has no ``HIERARCH`` prefix; commentary cards (``COMMENT``,
    ``HISTORY``, blank keyword) carry their text as ``value``."""

    keyword: str
    value: Any = None
    comment: str = ""


def normalize_keyword(key: str) -> str:
    """A keyword as stored: without ``HIERARCH``, standard (short) keywords in upper case."""
    key = key.strip()
    if key[:9].upper() == "HIERARCH ":
        key = key[9:].strip()
    upper = key.upper()
    if _STANDARD_KEY.match(upper):
        return upper
    return key


def _normalize_value(value: Any) -> Any:
    """Python scalar for a header value (numpy scalars and astropy's undefined value too)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if type(value).__name__ == "Undefined":  # astropy.io.fits.card.Undefined
        return None
    raise TypeError(type(value).__name__)


def _check_text(keyword: str, text: str, what: str) -> None:
    if _NOT_PRINTABLE.search(text):
        raise ValueError(f"{keyword or 'blank keyword'}: {what} holds characters that are not "
                         "printable ASCII")


def _format_value(keyword: str, value: Any) -> str:
    """Value field of a card (without padding); strings quoted and padded to 8 characters."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{keyword}: {value} is not representable in a FITS header")
        return repr(float(value)).upper()  # shortest text that reads back to the same double
    if isinstance(value, str):
        _check_text(keyword, value, "value")
        return "'" + f"{value.replace(chr(39), chr(39) * 2):<8}" + "'"
    raise ValueError(f"{keyword}: a value of type {type(value).__name__} cannot be written to "
                     "a FITS header")


def _with_comment(body: str, comment: str) -> str:
    """``body / comment``, the comment shortened (or dropped) to fit 80 characters."""
    if comment:
        room = _CARD - len(body) - 3
        if room > 0:
            return f"{body} / {comment[:room]}"
    return body


def card_images(card: Card) -> list[str]:
    """The 80-character card image(s) of a card (several for a long string or comment text).

    Raises
    ------
    ValueError
        When the value cannot be written (non-finite float, non-ASCII text, unsupported type,
        keyword too long).
    """
    keyword, value, comment = card
    comment = "" if comment is None else str(comment)
    if keyword.upper() in _COMMENTARY:
        text = "" if value is None else str(value)
        _check_text(keyword, text, "text")
        pieces = [text[i:i + 72] for i in range(0, len(text), 72)] or [""]
        return [f"{keyword.upper():8}{piece}" for piece in pieces]
    _check_text(keyword, keyword, "keyword")
    _check_text(keyword, comment, "comment")
    if "=" in keyword:
        raise ValueError(f"{keyword}: '=' is not allowed in a keyword")
    hierarch = not _STANDARD_KEY.match(keyword)
    text = _format_value(keyword, value)
    if hierarch:
        prefix = f"HIERARCH {keyword} = "
        body = prefix + text
        if len(body) > _CARD and not isinstance(value, str):
            prefix = f"HIERARCH {keyword}= "
            body = prefix + text
    else:
        prefix = f"{keyword:8}= "
        body = prefix + (f"{text:<20}" if isinstance(value, str) else f"{text:>20}")
    if len(body.rstrip()) <= _CARD:
        return [_with_comment(body.rstrip() if not comment else body, comment)]
    if not isinstance(value, str):
        raise ValueError(f"{keyword}: keyword and value do not fit in an 80-character card")
    return _long_string_images(keyword, prefix, value, comment)


def _long_string_images(keyword: str, prefix: str, value: str, comment: str) -> list[str]:
    """A string continued over ``CONTINUE`` cards (``&`` at the end of every part but the last)."""
    room = _CARD - len(prefix) - 3  # two quotes and the ampersand
    if room < 1:
        raise ValueError(f"{keyword}: keyword too long for a string value")
    parts: list[str] = []
    current = ""
    for char in value:
        escaped = "''" if char == "'" else char
        if len(current) + len(escaped) > room:
            parts.append(current)
            current = ""
            room = _CARD - 10 - 3
        current += escaped
    parts.append(current)
    images = [(prefix if i == 0 else "CONTINUE  ") + "'" + part + "&'"
              for i, part in enumerate(parts)]
    images[-1] = images[-1][:-2] + "'"  # the last part has no ampersand
    if comment:
        if len(images[-1]) + 3 + min(len(comment), 20) <= _CARD:
            images[-1] = _with_comment(images[-1], comment)
        else:  # no room left: an empty last part that carries the comment
            images[-1] = images[-1][:-1] + "&'"
            images.append(_with_comment("CONTINUE  ''", comment))
    return images


def _parse_value(text: str) -> tuple[Any, str, bool]:
    """(value, comment, is_string) from the part of a card after ``=``."""
    stripped = text.lstrip()
    if stripped.startswith("'"):
        pieces = []
        pos = 1
        while True:
            end = stripped.find("'", pos)
            if end < 0:  # unterminated string: keep what there is
                return stripped[1:].rstrip(), "", True
            if stripped[end + 1:end + 2] == "'":
                pieces.append(stripped[pos:end + 1])
                pos = end + 2
                continue
            pieces.append(stripped[pos:end])
            rest = stripped[end + 1:]
            break
        _, slash, comment = rest.partition("/")
        return "".join(pieces).rstrip(), comment.strip() if slash else "", True
    field_, _, comment = stripped.partition("/")
    field_ = field_.strip()
    comment = comment.strip()
    if not field_:
        return None, comment, False
    if field_ == "T":
        return True, comment, False
    if field_ == "F":
        return False, comment, False
    if _INT.match(field_):
        return int(field_), comment, False
    if _REAL.match(field_):
        return float(field_.replace("D", "E").replace("d", "e")), comment, False
    return field_, comment, False  # not a FITS value (complex, junk): the raw text


def _parse_cards(text: str) -> tuple[list[Card], bool]:
    """Cards of a header text up to END; also whether END was found."""
    cards: list[Card] = []
    continued = False  # the previous card is a string ending in '&'
    for start in range(0, len(text) - _CARD + 1, _CARD):
        image = text[start:start + _CARD]
        name = image[:8].rstrip().upper()
        if name == "END" and not image[3:].strip():
            return cards, True
        if name == "CONTINUE" and continued:
            value, comment, is_string = _parse_value(image[8:])
            if is_string:
                prev = cards[-1]
                joined = " ".join(c for c in (prev.comment, comment) if c)
                cards[-1] = Card(prev.keyword, prev.value[:-1] + value, joined)
                continued = value.endswith("&")
                continue
        continued = False
        if name == "HIERARCH" and "=" in image[8:]:
            key, _, rest = image[8:].partition("=")
            keyword = key.strip()
            value, comment, is_string = _parse_value(rest)
        elif name not in _COMMENTARY and image[8:9] == "=":
            keyword = name
            value, comment, is_string = _parse_value(image[9:])
        else:
            cards.append(Card(name, image[8:].rstrip(), ""))
            continue
        cards.append(Card(keyword, value, comment))
        continued = is_string and value.endswith("&")
    return cards, False


# --------------------------------------------------------------------------------------- header

class Header:
    """Ordered FITS header cards with a dict-like interface.

    Keys are case-insensitive and may carry a ``HIERARCH`` prefix (ignored).  Lookup returns the
    first card with the keyword; assignment replaces the first such card or appends a new one.
    ``h[key] = value`` keeps the card's comment, ``h[key] = (value, comment)`` replaces it.
    ``COMMENT``/``HISTORY``/blank cards are always appended.
    """

    __slots__ = ("_cards", "_index")

    def __init__(self, cards: Iterable[Any] = ()) -> None:
        self._cards: list[Card] = []
        self._index: dict[str, int] = {}
        for card in getattr(cards, "cards", cards):  # an astropy Header too
            self.append(card)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_cards(cls, cards: Iterable[Any]) -> Header:
        """A header from cards: ours, astropy's, or ``(keyword, value, comment)`` tuples."""
        return cls(cards)

    @classmethod
    def parse(cls, raw: bytes | str) -> Header:
        """Parse header block(s) up to ``END`` (trailing padding is ignored).

        Raises
        ------
        ValueError
            When the text is not ASCII or has no ``END`` card.
        """
        if isinstance(raw, (bytes, bytearray, memoryview)):
            try:
                text = bytes(raw).decode("ascii")
            except UnicodeDecodeError as exc:
                raise ValueError(f"non-ASCII byte at position {exc.start}") from None
        else:
            text = raw
        cards, ended = _parse_cards(text)
        if not ended:
            raise ValueError("no END card")
        header = cls()
        header._cards = cards
        header._reindex()
        return header

    def copy(self) -> Header:
        new = Header()
        new._cards = list(self._cards)
        new._index = dict(self._index)
        return new

    def _reindex(self) -> None:
        index: dict[str, int] = {}
        for i, card in enumerate(self._cards):
            index.setdefault(card.keyword.upper(), i)
        self._index = index

    @staticmethod
    def _key(key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"header keys are strings, not {type(key).__name__}")
        return normalize_keyword(key).upper()

    # ------------------------------------------------------------------ mapping API
    def __getitem__(self, key: str) -> Any:
        i = self._index.get(self._key(key))
        if i is None:
            raise KeyError(f"keyword {key!r} not found")
        return self._cards[i].value

    def get(self, key: str, default: Any = None) -> Any:
        i = self._index.get(self._key(key)) if isinstance(key, str) else None
        return default if i is None else self._cards[i].value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._key(key) in self._index

    def __setitem__(self, key: str, value: Any) -> None:
        comment = None
        if isinstance(value, tuple):
            if len(value) == 2:
                value, comment = value
            elif len(value) == 1:
                (value,) = value
            else:
                raise ValueError(f"{key}: set a value or a (value, comment) pair")
        keyword = normalize_keyword(key)
        try:
            value = _normalize_value(value)
        except TypeError:
            raise ValueError(f"{keyword}: a value of type {type(value).__name__} cannot be "
                             "written to a FITS header") from None
        upper = keyword.upper()
        if upper in _COMMENTARY:
            card = Card(upper, "" if value is None else str(value), "")
            card_images(card)
            self._append(card)
            return
        i = self._index.get(upper)
        if comment is None:
            comment = self._cards[i].comment if i is not None else ""
        card = Card(keyword, value, str(comment))
        card_images(card)  # raises ValueError for what cannot be written
        if i is None:
            self._append(card)
        else:
            self._cards[i] = card

    def __delitem__(self, key: str) -> None:
        i = self._index.get(self._key(key))
        if i is None:
            raise KeyError(f"keyword {key!r} not found")
        del self._cards[i]
        self._reindex()

    def remove(self, key: str, ignore_missing: bool = False) -> None:
        """Delete the first card with ``key``."""
        if key in self or not ignore_missing:
            del self[key]

    def append(self, card: Any) -> None:
        """Append a card (anything with ``keyword``/``value``/``comment``, or a 3-tuple)."""
        if isinstance(card, tuple):
            keyword, value, comment = (tuple(card) + (None, ""))[:3]
        else:
            keyword, value, comment = card.keyword, card.value, card.comment
        keyword = normalize_keyword(str(keyword))
        try:
            value = _normalize_value(value)
        except TypeError:
            value = str(value)
        self._append(Card(keyword, value, "" if comment is None else str(comment)))

    def _append(self, card: Card) -> None:
        self._index.setdefault(card.keyword.upper(), len(self._cards))
        self._cards.append(card)

    def __iter__(self) -> Iterator[str]:
        return (card.keyword for card in self._cards)

    def __len__(self) -> int:
        return len(self._cards)

    def keys(self) -> list[str]:
        return [card.keyword for card in self._cards]

    def values(self) -> list[Any]:
        return [card.value for card in self._cards]

    def items(self) -> list[tuple[str, Any]]:
        return [(card.keyword, card.value) for card in self._cards]

    @property
    def cards(self) -> list[Card]:
        return list(self._cards)

    def comment(self, key: str) -> str:
        """Comment of the first card with ``key``."""
        i = self._index.get(self._key(key))
        if i is None:
            raise KeyError(f"keyword {key!r} not found")
        return self._cards[i].comment

    # ------------------------------------------------------------------ serialisation
    def images(self) -> list[str]:
        """The card images, without END."""
        return [image for card in self._cards for image in card_images(card)]

    def tobytes(self) -> bytes:
        """Header block(s): the cards, ``END``, spaces up to a multiple of 2880 bytes."""
        text = "".join(f"{image:80}" for image in self.images()) + f"{'END':80}"
        text += " " * (-len(text) % BLOCK_SIZE)
        return text.encode("ascii")

    def __repr__(self) -> str:
        return "\n".join(self.images())


# -------------------------------------------------------------------------------------- reading

_DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}


@dataclass
class HDUInfo:
    """Where one HDU is in its file and what its data are.

    For a tile-compressed image (``compressed``), ``bitpix`` and ``shape`` describe the image
    (``ZBITPIX``, ``ZNAXISn``) while ``data_size`` is that of the stored table.
    """

    header: Header
    header_offset: int
    data_offset: int
    data_size: int  # bytes, PCOUNT/GCOUNT included, padding excluded
    bitpix: int
    shape: tuple[int, ...]  # numpy order (NAXISn, ..., NAXIS1); () without data
    xtension: str | None = None  # None for the primary HDU
    compressed: bool = False

    @property
    def name(self) -> str:
        """EXTNAME (stripped, upper case), ``PRIMARY`` for an unnamed primary HDU."""
        name = str(self.header.get("EXTNAME", "")).strip().upper()
        return name or ("PRIMARY" if self.xtension is None else "")

    @property
    def is_image(self) -> bool:
        """A primary or IMAGE extension HDU (not a table, not compressed)."""
        return self.xtension in (None, "IMAGE") and not self.compressed

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.bitpix]

    @property
    def padded_size(self) -> int:
        return self.data_size + (-self.data_size % BLOCK_SIZE)


def _int_value(header: Header, key: str, default: int | None = None) -> int:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} = {value!r} is not an integer" if key in header
                         else f"no {key} keyword")
    return value


def _layout(header: Header, primary: bool
            ) -> tuple[int, tuple[int, ...], int, str | None, bool]:
    """(BITPIX, shape, data size in bytes, XTENSION, compressed) from a header."""
    bitpix = _int_value(header, "BITPIX")
    if bitpix not in _DTYPES:
        raise ValueError(f"BITPIX = {bitpix} is not valid")
    naxis = _int_value(header, "NAXIS")
    if not 0 <= naxis <= 999:
        raise ValueError(f"NAXIS = {naxis} is not valid")
    axes = [_int_value(header, f"NAXIS{i}") for i in range(1, naxis + 1)]
    if any(n < 0 for n in axes):
        raise ValueError("negative NAXISn")
    if naxis == 0:
        size = 0
    else:
        if primary and axes[0] == 0 and header.get("GROUPS") is True:
            count = math.prod(axes[1:])
        else:
            count = math.prod(axes)
        pcount = _int_value(header, "PCOUNT", 0)
        gcount = _int_value(header, "GCOUNT", 1)
        size = abs(bitpix) // 8 * gcount * (pcount + count)
    shape = tuple(reversed(axes))
    xtension = None if primary else str(header.get("XTENSION", "")).strip().upper()
    compressed = xtension == "BINTABLE" and header.get("ZIMAGE") is True
    if compressed:
        bitpix = _int_value(header, "ZBITPIX")
        znaxis = _int_value(header, "ZNAXIS")
        shape = tuple(_int_value(header, f"ZNAXIS{i}") for i in range(znaxis, 0, -1))
    return bitpix, shape, size, xtension, compressed


def _has_end(block: bytes) -> bool:
    return any(block[i:i + 8] == b"END     " for i in range(0, len(block), _CARD))


def _scan(read_at, size: int, name: str) -> list[HDUInfo]:
    """HDU layout of a FITS byte stream; ``read_at(offset, n)`` returns up to n bytes."""
    hdus: list[HDUInfo] = []
    offset = 0
    while offset < size:
        first = read_at(offset, BLOCK_SIZE)
        if not hdus:
            if not first.startswith(b"SIMPLE  ="):
                raise InputError(f"{name}: not a FITS file (no SIMPLE card at the start)")
        elif not first.startswith(b"XTENSION="):
            break  # zero padding or junk after the last HDU, as other readers tolerate
        blocks = [first]
        pos = offset + len(first)
        while len(blocks[-1]) == BLOCK_SIZE and not _has_end(blocks[-1]):
            blocks.append(read_at(pos, BLOCK_SIZE))
            pos += len(blocks[-1])
        if len(blocks[-1]) < BLOCK_SIZE:
            raise InputError(f"{name}: truncated or corrupt FITS header in HDU {len(hdus)} "
                             "(no END card before the end of the file)")
        try:
            header = Header.parse(b"".join(blocks))
            bitpix, shape, nbytes, xtension, compressed = _layout(header, primary=not hdus)
        except ValueError as exc:
            raise InputError(f"{name}: corrupt FITS header in HDU {len(hdus)} ({exc})") \
                from None
        if pos + nbytes > size:
            raise InputError(f"{name}: truncated FITS file ({size} bytes, data needs "
                             f"{pos + nbytes})")
        hdus.append(HDUInfo(header=header, header_offset=offset, data_offset=pos,
                            data_size=nbytes, bitpix=bitpix, shape=shape, xtension=xtension,
                            compressed=compressed))
        offset = pos + nbytes + (-nbytes % BLOCK_SIZE)
    if not hdus:
        raise InputError(f"{name}: empty file, not a FITS file")
    return hdus


#: binary-table field codes (TFORM) <-> big-endian numpy types, for the fields read/written
_TFORM_DTYPES = {"L": "S1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4",
                 "D": ">f8", "A": "S"}
_TFORM = re.compile(r"\s*([0-9]*)([A-Z])")


def _tform_of(values: np.ndarray) -> tuple[str, np.dtype]:
    """TFORM and stored (big-endian) dtype of a column of ``values`` (rows first)."""
    repeat = math.prod(values.shape[1:]) if values.ndim > 1 else 1
    kind, size = values.dtype.kind, values.dtype.itemsize
    if kind == "b":
        code = "L"
    elif kind in "SU":
        width = max(1, max((len(v) for v in values.reshape(-1).tolist()), default=1)
                    if kind == "U" else size)
        return f"{width * repeat}A", np.dtype(f"S{width}")
    else:
        code = {("u", 1): "B", ("i", 2): "I", ("i", 4): "J", ("i", 8): "K", ("f", 4): "E",
                ("f", 8): "D"}.get((kind, size), "")
        if not code:
            raise ValueError(f"cannot write {values.dtype} values in a FITS binary table")
    return (f"{repeat}{code}" if repeat != 1 else code), np.dtype(_TFORM_DTYPES[code])


@dataclass
class BinTable:
    """The data of a binary-table extension: named columns, one value (or a fixed-size
    array: a 2-D column) per row, all of the same length.

    Read with :meth:`FitsFile.read_table`; written by :func:`write_fits` as a ``BINTABLE``
    HDU, with TTYPEn/TFORMn (and TUNITn when ``units`` names one) generated.  Logical
    columns read as bool, character columns as str (trailing blanks removed); TSCALn/TZEROn
    are applied.
    """

    columns: dict[str, np.ndarray]
    units: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = {k: np.asarray(v) for k, v in self.columns.items()}
        lengths = {v.shape[0] if v.ndim else 1 for v in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"binary-table columns of different lengths {sorted(lengths)}")
        self.columns = {k: (v.reshape(1) if v.ndim == 0 else v)
                        for k, v in self.columns.items()}

    @property
    def n_rows(self) -> int:
        return next(iter(self.columns.values())).shape[0] if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def structural_cards(self) -> list[Card]:
        """TFIELDS and the TTYPEn/TFORMn (TUNITn) cards of the layout :meth:`records`
        writes."""
        cards = [Card("TFIELDS", len(self.columns), "number of fields in each row")]
        for i, (name, values) in enumerate(self.columns.items(), start=1):
            tform, _ = _tform_of(values)
            cards.append(Card(f"TTYPE{i}", name, f"label for field {i}"))
            cards.append(Card(f"TFORM{i}", tform, f"data format of field {i}"))
            if self.units.get(name):
                cards.append(Card(f"TUNIT{i}", self.units[name], f"physical unit of field {i}"))
        return cards

    def records(self) -> np.ndarray:
        """The rows as stored: a big-endian structured array."""
        fields = []
        for name, values in self.columns.items():
            _, dtype = _tform_of(values)
            fields.append((name, dtype, values.shape[1:]) if values.ndim > 1
                          else (name, dtype))
        out = np.zeros(self.n_rows, np.dtype(fields))
        for name, values in self.columns.items():
            if values.dtype.kind == "b":
                out[name] = np.where(values, b"T", b"F")
            elif values.dtype.kind == "U":
                out[name] = np.char.encode(values, "ascii")
            else:
                out[name] = values
        return out

    @classmethod
    def from_hdu(cls, header: Header, raw: bytes) -> BinTable:
        """Columns of a BINTABLE data unit (``raw``, padding excluded) described by its
        ``header``."""
        n_fields = _int_value(header, "TFIELDS")
        row_bytes, n_rows = _int_value(header, "NAXIS1"), _int_value(header, "NAXIS2")
        fields, names, units = [], [], {}
        for i in range(1, n_fields + 1):
            name = str(header.get(f"TTYPE{i}", f"col{i}")).strip()
            match = _TFORM.match(str(header.get(f"TFORM{i}", "")).upper())
            if not match or match.group(2) not in _TFORM_DTYPES:
                raise ValueError(f"field {name!r} has the format {header.get(f'TFORM{i}')!r}, "
                                 "which this reader does not take")
            repeat = int(match.group(1) or 1)
            code = match.group(2)
            if code == "A":
                fields.append((name, np.dtype(f"S{repeat}")))
            elif repeat == 1:
                fields.append((name, np.dtype(_TFORM_DTYPES[code])))
            else:
                fields.append((name, np.dtype(_TFORM_DTYPES[code]), (repeat,)))
            names.append((name, code, i))
            if header.get(f"TUNIT{i}"):
                units[name] = str(header[f"TUNIT{i}"]).strip()
        dtype = np.dtype(fields)
        if dtype.itemsize != row_bytes:
            raise ValueError(f"NAXIS1 = {row_bytes} but the fields take {dtype.itemsize} bytes")
        rows = np.frombuffer(raw, dtype, n_rows)
        columns = {}
        for name, code, i in names:
            values = rows[name]
            if code == "L":
                values = values == b"T"
            elif code == "A":
                values = np.char.rstrip(np.char.decode(values, "ascii", "replace"))
            else:
                values = values.astype(values.dtype.newbyteorder("="))
                scale, zero = header.get(f"TSCAL{i}", 1), header.get(f"TZERO{i}", 0)
                if scale != 1 or zero != 0:  # e.g. unsigned integers stored with an offset
                    whole = (values.dtype.kind in "iu" and scale == 1
                             and float(zero).is_integer())
                    values = (values.astype(np.int64) + int(zero) if whole
                              else values.astype(np.float64) * scale + zero)
            columns[name] = values
        return cls(columns, units)


def read_table(path: str | os.PathLike, hdu: int | str = 1) -> BinTable:
    """The columns of one binary-table HDU of a plain or gzip-compressed FITS file."""
    return FitsFile(path).read_table(hdu)


def _open_error(path: Path, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: file not found")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory, not a FITS file")
    return InputError(f"{path}: cannot be read ({exc.strerror or exc})")


class HduSequence:
    """The HDU list of an open file: ``len``, iteration, and lookup by index or EXTNAME.

    Subclasses set ``hdus`` (list of :class:`HDUInfo`) and ``name`` (for messages).
    """

    hdus: list[HDUInfo]
    name: str

    def __len__(self) -> int:
        return len(self.hdus)

    def __iter__(self) -> Iterator[HDUInfo]:
        return iter(self.hdus)

    def __getitem__(self, key: int | str) -> HDUInfo:
        if isinstance(key, str):
            index = self.index_of(key)
            if index is None:
                raise KeyError(f"{self.name}: no HDU named {key!r}")
            key = index
        return self.hdus[key]

    def index_of(self, name: str) -> int | None:
        """Index of the first HDU whose EXTNAME is ``name`` (case-insensitive)."""
        name = name.strip().upper()
        for i, hdu in enumerate(self.hdus):
            if hdu.name == name:
                return i
        return None


class FitsFile(HduSequence):
    """The HDUs of a plain or gzip-compressed FITS file; pixels read on demand.

    A gzip file is decompressed into memory once (meant for small files such as static maps);
    a plain file is read with positioned reads, nothing stays open or mapped.

    Parameters
    ----------
    path : path-like
    name : str, optional
        How error messages name the file (default: ``path``).

    Raises
    ------
    InputError
        When the file is missing, not FITS, corrupt or truncated.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        self._buffer: bytes | None = None
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(2)
                if magic == b"\x1f\x8b":
                    fh.seek(0)
                    self._buffer = _gunzip(fh.read(), self.name)
                    size = len(self._buffer)
                    self.hdus = _scan(self._buffer_at, size, self.name)
                else:
                    size = os.fstat(fh.fileno()).st_size

                    def read_at(offset: int, n: int) -> bytes:
                        return os.pread(fh.fileno(), n, offset)

                    self.hdus = _scan(read_at, size, self.name)
        except OSError as exc:
            raise _open_error(self.path, exc) from None
        self.size = size

    def _buffer_at(self, offset: int, n: int) -> bytes:
        return self._buffer[offset:offset + n]

    def read(self, key: int | str | HDUInfo = 0) -> np.ndarray:
        """Stored pixels of an image HDU: big-endian dtype of BITPIX, BZERO/BSCALE not applied.

        Raises
        ------
        InputError
            When the HDU is not an uncompressed image or the file is shorter than its data.
        """
        hdu = key if isinstance(key, HDUInfo) else self[key]
        if not hdu.is_image:
            raise InputError(f"{self.name}: HDU {hdu.name or hdu.xtension} is not an "
                             "uncompressed image")
        count = math.prod(hdu.shape) if hdu.shape else 0
        shape = hdu.shape if hdu.shape else (0,)
        if self._buffer is not None:
            if hdu.data_offset + count * hdu.dtype.itemsize > len(self._buffer):
                raise InputError(f"{self.name}: truncated FITS data in HDU {hdu.name}")
            return np.frombuffer(self._buffer, hdu.dtype, count,
                                 hdu.data_offset).reshape(shape).copy()
        out = np.empty(shape, hdu.dtype)
        if count:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(hdu.data_offset)
                    got = fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            except OSError as exc:
                raise _open_error(self.path, exc) from None
            if got != out.nbytes:
                raise InputError(f"{self.name}: truncated FITS data in HDU {hdu.name}")
        return out

    def _data_bytes(self, hdu: HDUInfo) -> bytes:
        """The data unit of ``hdu`` as stored (padding excluded)."""
        if self._buffer is not None:
            raw = self._buffer[hdu.data_offset:hdu.data_offset + hdu.data_size]
        else:
            try:
                with open(self.path, "rb") as fh:
                    raw = os.pread(fh.fileno(), hdu.data_size, hdu.data_offset)
            except OSError as exc:
                raise _open_error(self.path, exc) from None
        if len(raw) != hdu.data_size:
            raise InputError(f"{self.name}: truncated FITS data in HDU {hdu.name}")
        return raw

    def read_table(self, key: int | str | HDUInfo = 1) -> BinTable:
        """The columns of a binary-table HDU (fixed-size fields; :class:`BinTable`).

        Raises
        ------
        InputError
            When the HDU is not a binary table, or has a field this reader does not take
            (variable-length arrays, bit fields, complex numbers).
        """
        hdu = key if isinstance(key, HDUInfo) else self[key]
        if hdu.xtension != "BINTABLE" or hdu.compressed:
            raise InputError(f"{self.name}: HDU {hdu.name or hdu.xtension or 'PRIMARY'} is "
                             "not a binary table")
        try:
            return BinTable.from_hdu(hdu.header, self._data_bytes(hdu))
        except ValueError as exc:
            raise InputError(f"{self.name}: HDU {hdu.name or len(self.hdus)}: {exc}") from None

    def close(self) -> None:
        self._buffer = None

    def __enter__(self) -> FitsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gunzip(data: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{name}: corrupt or truncated gzip file ({exc})") from None


def scan_hdus(path: str | os.PathLike) -> list[HDUInfo]:
    """Headers and data layout of every HDU of a plain or gzip-compressed FITS file."""
    return FitsFile(path).hdus


def read_image_data(path: str | os.PathLike, hdu: int | str | HDUInfo = 0) -> np.ndarray:
    """Stored pixels (big-endian, unscaled) of one image HDU of a file."""
    return FitsFile(path).read(hdu)


def read_header(path: str | os.PathLike, hdu: int | str = 0) -> Header:
    """Header of one HDU of a plain or gzip-compressed FITS file."""
    return FitsFile(path)[hdu].header


# -------------------------------------------------------------------------------------- writing

_BITPIX = {("u", 1): 8, ("i", 2): 16, ("i", 4): 32, ("i", 8): 64, ("f", 4): -32, ("f", 8): -64}
_CHUNK_BYTES = 2 << 20
_EXCLUDED = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))


def _fold(total: int) -> int:
    """32-bit ones'-complement value of a sum: carries added back in (end-around carry)."""
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _word_sum(buf: np.ndarray | bytes) -> int:
    """Plain sum of the big-endian 32-bit words of a buffer (zero-padded to 4 bytes)."""
    data = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray)) \
        else buf.reshape(-1).view(np.uint8)
    whole = data.size - data.size % 4
    total = int(data[:whole].view(">u4").sum(dtype=np.uint64)) if whole else 0
    if whole < data.size:
        total += int.from_bytes(data[whole:].tobytes().ljust(4, b"\0"), "big")
    return total


def checksum_encode(value: int) -> str:
    """The 16-character ASCII encoding of a 32-bit value used by the CHECKSUM keyword.

    Each byte is spread over four characters (a quarter of it each, the remainder on the
    first) offset from ``'0'``; pairs are nudged up/down until no character is punctuation;
    the result is rotated by one so that it lines up with 4-byte words when it starts in
    column 12 of the card.
    """
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        quarter, rest = divmod(byte, 4)
        group = [0x30 + quarter + rest, 0x30 + quarter, 0x30 + quarter, 0x30 + quarter]
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                if group[j] in _EXCLUDED or group[j + 1] in _EXCLUDED:
                    group[j] += 1
                    group[j + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = group[j]
    return "".join(chr(chars[(k + 15) % 16]) for k in range(16))


class _Md5Thread:
    """MD5 of a byte stream, updated in a second thread (hashlib releases the GIL)."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5()
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="fits-md5", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after a failure, keep draining so that put never blocks
                try:
                    self._md5.update(item)
                except BaseException as exc:  # re-raised by hexdigest
                    self._error = exc

    def update(self, data: Any) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self.stop()
        if self._error is not None:
            raise self._error
        return self._md5.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _bitpix_of(data: np.ndarray) -> int:
    try:
        return _BITPIX[(data.dtype.kind, data.dtype.itemsize)]
    except KeyError:
        raise ValueError(f"cannot write {data.dtype} data as a FITS image (uint8, int16, "
                         "int32, int64, float32 or float64)") from None


def _full_header(user: Header | None, data: np.ndarray | BinTable | None, primary: bool,
                 stamp: str) -> Header:
    """Structural cards, the user's cards (structural ones dropped), DATASUM/CHECKSUM."""
    cards = []
    if isinstance(data, BinTable):
        if primary:
            raise ValueError("a binary table cannot be the primary HDU")
        records = data.records()
        cards += [Card("XTENSION", "BINTABLE", "binary table extension"),
                  Card("BITPIX", 8, "array data type"),
                  Card("NAXIS", 2, "number of array dimensions"),
                  Card("NAXIS1", records.dtype.itemsize, "length of dimension 1"),
                  Card("NAXIS2", data.n_rows, "length of dimension 2"),
                  Card("PCOUNT", 0, "number of group parameters"),
                  Card("GCOUNT", 1, "number of groups"),
                  *data.structural_cards()]
        for card in (user.cards if user is not None else ()):
            key = card.keyword.upper()
            if key in _GENERATED or _AXIS_KEY.match(key) or _TABLE_KEY.match(key):
                continue
            cards.append(card)
        cards.append(Card("DATASUM", "0", f"data unit checksum {stamp}"))
        cards.append(Card("CHECKSUM", "0" * 16, f"HDU checksum {stamp}"))
        return Header(cards)
    if primary:
        cards.append(Card("SIMPLE", True, "conforms to the FITS standard"))
    else:
        cards.append(Card("XTENSION", "IMAGE", "image extension"))
    bitpix = _bitpix_of(data) if data is not None else 8
    shape = data.shape if data is not None else ()
    cards.append(Card("BITPIX", bitpix, "bits per data value"))
    cards.append(Card("NAXIS", len(shape), "number of data axes"))
    for i, n in enumerate(reversed(shape), start=1):
        cards.append(Card(f"NAXIS{i}", int(n), f"length of data axis {i}"))
    if primary:
        cards.append(Card("EXTEND", True, "extensions may follow"))
    else:
        cards.append(Card("PCOUNT", 0, "no parameters"))
        cards.append(Card("GCOUNT", 1, "one group"))
    for card in (user.cards if user is not None else ()):
        key = card.keyword.upper()
        if key in _GENERATED or _AXIS_KEY.match(key):
            continue
        cards.append(card)
    cards.append(Card("DATASUM", "0", f"data unit checksum {stamp}"))
    cards.append(Card("CHECKSUM", "0" * 16, f"HDU checksum {stamp}"))
    return Header(cards)


def _write_data(fh: BinaryIO, data: np.ndarray, md5: _Md5Thread | None) -> int:
    """Write a data unit big-endian in pieces, with padding; return its (unfolded) word sum."""
    big = data.dtype.newbyteorder(">")
    if data.ndim == 0:
        data = data.reshape(1)
    row_bytes = max(1, data[:1].nbytes) if data.shape[0] else 1
    rows = max(4, (_CHUNK_BYTES // row_bytes) // 4 * 4)  # whole 4-byte words per piece
    total = 0
    written = 0
    for start in range(0, data.shape[0], rows):
        piece = np.ascontiguousarray(data[start:start + rows], dtype=big)
        flat = piece.reshape(-1).view(np.uint8)
        total += _word_sum(flat)
        if md5 is not None:
            md5.update(flat)
        fh.write(flat)
        written += flat.size
    pad = -written % BLOCK_SIZE
    if pad:
        zeros = bytes(pad)
        if md5 is not None:
            md5.update(zeros)
        fh.write(zeros)
    return total


def write_fits(target: str | os.PathLike | BinaryIO,
               hdus: Sequence[tuple[Header | None, np.ndarray | BinTable | None]]) -> None:
    """Write HDUs with checksums: the first as the primary HDU, the rest as IMAGE
    extensions, or BINTABLE ones for :class:`BinTable` data.

    Parameters
    ----------
    target : path or binary file
        A file object must be seekable (the headers are completed once the data are written).
    hdus : sequence of (Header, ndarray)
        Data of dtype uint8, int16, int32, int64, float32 or float64 (any byte order), or
        None for no data.  Structural keywords (SIMPLE, XTENSION, BITPIX, NAXIS*, EXTEND,
        PCOUNT, GCOUNT) and CHECKSUM/DATASUM in the headers are ignored and generated.  When
        the first header has ``DATAMD5``, it is set to the MD5 digest of all data units as
        written (data and padding, in HDU order).

    Raises
    ------
    ValueError
        For an unsupported dtype or a header value that cannot be written.
    OSError
        When writing fails.
    """
    if not hdus:
        raise ValueError("no HDU to write")
    stamp = time.strftime("updated %Y-%m-%dT%H:%M:%S", time.gmtime())
    given = [data if isinstance(data, BinTable) or data is None else np.asarray(data)
             for _, data in hdus]
    headers = [_full_header(header, data, i == 0, stamp)
               for i, ((header, _), data) in enumerate(zip(hdus, given))]
    # a table's data unit is its rows as bytes
    arrays = [data.records().view(np.uint8) if isinstance(data, BinTable) else data
              for data in given]
    with_md5 = "DATAMD5" in headers[0]
    if with_md5:
        headers[0]["DATAMD5"] = "0" * 32
    blocks = [h.tobytes() for h in headers]
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as fh:
            _write_hdus(fh, headers, blocks, arrays, with_md5)
    else:
        _write_hdus(target, headers, blocks, arrays, with_md5)


def _write_hdus(fh: BinaryIO, headers: list[Header], blocks: list[bytes],
                arrays: list[np.ndarray | None], with_md5: bool) -> None:
    offsets = []
    sums = []
    md5 = _Md5Thread() if with_md5 else None
    try:
        for block, data in zip(blocks, arrays):
            offsets.append(fh.tell())
            fh.write(block)  # provisional: completed below
            sums.append(_write_data(fh, data, md5) if data is not None and data.size else 0)
        digest = md5.hexdigest() if md5 is not None else None
    finally:
        if md5 is not None:
            md5.stop()
    end = fh.tell()
    if digest is not None:
        headers[0]["DATAMD5"] = digest
    for header, block, offset, total in zip(headers, blocks, offsets, sums):
        datasum = _fold(total)
        header["DATASUM"] = str(datasum)
        header["CHECKSUM"] = "0" * 16
        raw = header.tobytes()
        hdu_sum = _fold(_word_sum(raw) + datasum)
        header["CHECKSUM"] = checksum_encode(~hdu_sum & 0xFFFFFFFF)
        raw = header.tobytes()
        if len(raw) != len(block):  # cannot happen: every card keeps its one image
            raise RuntimeError("FITS header changed length while completing it")
        fh.seek(offset)
        fh.write(raw)
    fh.seek(end)
