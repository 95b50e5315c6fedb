"""Dispersion solution: the wavelength, slit position and order of every pixel.

Two products describe it, both in soxspipe 0.17.4's layout (INSTRUMENTS.md §5.3-5.4) so that
either pipeline reads the other's:

- ``DISP_TAB_<ARM>``: two rows (``axis`` x and y) of coefficients ``c{i}{j}{k}`` of
  ``x (or y) = sum c_ijk n^i lambda^j s^k`` (n order, lambda nm, s arcsec), in the pixel grid of
  the frame it was fitted on (its binning in the header);
- ``DISP_IMAGE_<ARM>``: three images ``WAVELENGTH`` (nm), ``SLIT`` (arcsec) and ``ORDER`` of the
  *unbinned* prepared frame, NaN outside the orders.

:func:`read_dispersion_map` brings the image onto a binned frame's pixels, which is what the
sky model and the extraction use.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.errors import InputError

__all__ = ["DispersionMap", "DispersionSolution", "read_dispersion_map",
           "read_dispersion_table", "bin_dispersion_image"]

_COEFF = re.compile(r"^c(\d)(\d)(\d)$")


@contextlib.contextmanager
def _quiet_astropy():
    """astropy's own warnings (a truncated file) off the terminal: the one-line error that
    follows says it."""
    from astropy import log
    from astropy.utils.exceptions import AstropyUserWarning

    level = log.level
    log.setLevel("ERROR")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            yield
    finally:
        log.setLevel(level)


@dataclass
class DispersionMap:
    """Per-pixel wavelength (nm), slit position (arcsec) and order of a binned frame.

    Attributes
    ----------
    wavelength, slit : ndarray of float32
        NaN outside the orders (and where a binned pixel straddles an order's end).
    order : ndarray of int16
        Order number, 0 outside the orders.
    header : dict
        Primary-header cards of the product, ``{key: value}``.
    source : str
        File it came from.
    """

    wavelength: np.ndarray
    slit: np.ndarray
    order: np.ndarray
    header: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.wavelength.shape

    @property
    def orders(self) -> np.ndarray:
        """Order numbers present on the frame, ascending.

        Remembered for the ``order`` array it was found in: a recipe asks many times, and
        each search sorts the whole frame (0.04 s on X-shooter VIS).
        """
        cached = self.__dict__.get("_orders")
        if cached is None or cached[0]() is not self.order:
            values = np.unique(self.order)
            cached = (weakref.ref(self.order), values[values > 0].astype(int))
            self.__dict__["_orders"] = cached
        return cached[1].copy()


def bin_dispersion_image(wave: np.ndarray, slit: np.ndarray, order: np.ndarray, binx: int,
                         biny: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average an unbinned map over ``biny`` x ``binx`` blocks.

    A binned pixel gets the mean wavelength and slit position of its unbinned pixels when all
    of them lie in one order, and NaN / order 0 otherwise (a pixel at an order's end or edge
    is partly outside the solution).
    """
    rows, cols = wave.shape[0] // biny, wave.shape[1] // binx
    if (binx, biny) == (1, 1):
        o = np.where(np.isfinite(order), order, 0).astype(np.int16)
        return wave.astype(np.float32), slit.astype(np.float32), o

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:rows * biny, :cols * binx].reshape(rows, biny, cols, binx)

    w, s, o = blocks(wave), blocks(slit), blocks(np.where(np.isfinite(order), order, 0))
    first = o[:, :1, :, :1]
    whole = np.all(o == first, axis=(1, 3)) & np.all(np.isfinite(w), axis=(1, 3))
    with np.errstate(invalid="ignore"):
        wb = np.where(whole, w.mean(axis=(1, 3)), np.nan).astype(np.float32)
        sb = np.where(whole, s.mean(axis=(1, 3)), np.nan).astype(np.float32)
    ob = np.where(whole, first[:, 0, :, 0], 0).astype(np.int16)
    return wb, sb, ob


def read_dispersion_map(path: str | os.PathLike, binx: int = 1, biny: int = 1,
                        shape: tuple[int, int] | None = None) -> DispersionMap:
    """Read a ``DISP_IMAGE`` (ours or soxspipe's) onto the pixels of a binned frame.

    Parameters
    ----------
    path : path-like
    binx, biny : int
        Binning of the frame it will be used with.
    shape : (rows, cols), optional
        Shape of that frame: checked against the map.

    Raises
    ------
    InputError
        Not three images WAVELENGTH/SLIT/ORDER of one shape, no order on it, or a size that
        does not fit the frame.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with _quiet_astropy(), fits.open(path, memmap=False) as hdul:
            images = {}
            for k, hdu in enumerate(hdul):
                name = str(hdu.header.get("EXTNAME", "")).strip().upper()
                if k == 0 and not name and hdu.data is not None:
                    name = "WAVELENGTH"
                if hdu.data is not None and name:
                    images[name] = np.asarray(hdu.data, dtype=np.float32)
            header = {k: v for k, v in hdul[0].header.items() if k not in ("COMMENT",
                                                                           "HISTORY", "")}
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable FITS dispersion map (truncated or "
                         f"corrupt: {str(exc).splitlines()[0][:80]})") from None
    missing = [n for n in ("WAVELENGTH", "SLIT", "ORDER") if n not in images]
    if missing:
        raise InputError(f"{path}: not a dispersion map (no {', '.join(missing)} image; a "
                         "DISP_IMAGE has WAVELENGTH, SLIT and ORDER)")
    wave, slit, order = images["WAVELENGTH"], images["SLIT"], images["ORDER"]
    if not (wave.shape == slit.shape == order.shape) or wave.ndim != 2:
        raise InputError(f"{path}: its WAVELENGTH, SLIT and ORDER images differ in shape")
    if shape is not None:
        expected = (shape[0] * biny, shape[1] * binx)
        if wave.shape != expected and wave.shape != tuple(shape):
            raise InputError(f"{path}: dispersion map is {wave.shape[1]}x{wave.shape[0]} px, "
                             f"a {binx}x{biny} frame of {shape[1]}x{shape[0]} px needs the "
                             f"unbinned {expected[1]}x{expected[0]} (another arm?)")
        if wave.shape == tuple(shape) and (binx, biny) != (1, 1):
            binx = biny = 1  # already on the binned grid
    w, s, o = bin_dispersion_image(wave, slit, order, binx, biny)
    result = DispersionMap(w, s, o, header=header, source=str(path))
    if not result.orders.size:
        raise InputError(f"{path}: the dispersion map covers no order")
    return result


@dataclass
class DispersionSolution:
    """A ``DISP_TAB``: pixel position as a polynomial in order, wavelength and slit.

    Attributes
    ----------
    coefficients : dict
        ``{"x": {(i, j, k): c}, "y": {...}}``.
    binning : (binx, biny)
        Binning of the frame the solution was fitted on.
    header : dict
    """

    coefficients: dict[str, dict[tuple[int, int, int], float]]
    binning: tuple[int, int] = (1, 1)
    header: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def evaluate(self, axis: str, order, wavelength, slit=0.0, binx: int = 1,
                 biny: int = 1) -> np.ndarray:
        """Pixel coordinate along ``axis`` ("x"/"y") on a frame of binning ``binx x biny``
        (0-based pixel centres)."""
        n = np.asarray(order, float)
        lam = np.asarray(wavelength, float)
        s = np.asarray(slit, float)
        out = np.zeros(np.broadcast(n, lam, s).shape)
        for (i, j, k), c in self.coefficients[axis].items():
            out = out + c * n ** i * lam ** j * s ** k
        own = self.binning[0] if axis == "x" else self.binning[1]
        new = binx if axis == "x" else biny
        # pixel centres, as the order tables convert them (soxspipe divides by the binning,
        # a quarter of a pixel off for 2x binning)
        return (out * own + 0.5 * (own - 1) - 0.5 * (new - 1)) / new


def read_dispersion_table(path: str | os.PathLike) -> DispersionSolution:
    """Read a ``DISP_TAB`` (ours, the simulator's or soxspipe's).

    Raises
    ------
    InputError
        When the table lacks the ``axis`` rows or coefficient columns.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with _quiet_astropy(), fits.open(path, memmap=False) as hdul:
            header = {k: v for k, v in hdul[0].header.items() if k not in ("COMMENT",
                                                                           "HISTORY", "")}
            table = hdul[1].data if len(hdul) > 1 else None
            names = list(table.columns.names) if table is not None else []
            if table is None or "axis" not in names:
                raise InputError(f"{path}: not a dispersion table (no 'axis' column in HDU1)")
            coeffs: dict[str, dict[tuple[int, int, int], float]] = {}
            for row in table:
                axis = str(row["axis"]).strip().lower()
                terms = {}
                for name in names:
                    m = _COEFF.match(name)
                    if m and np.isfinite(row[name]):
                        terms[tuple(int(g) for g in m.groups())] = float(row[name])
                coeffs[axis] = terms
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: not a readable FITS dispersion table (truncated or "
                         f"corrupt: {str(exc).splitlines()[0][:80]})") from None
    if set(coeffs) != {"x", "y"} or not all(coeffs.values()):
        raise InputError(f"{path}: a dispersion table needs x and y rows with coefficients")
    binx = int(header.get("ESO DET WIN1 BINX", header.get("ESO DET BINX", 1)) or 1)
    biny = int(header.get("ESO DET WIN1 BINY", header.get("ESO DET BINY", 1)) or 1)
    return DispersionSolution(coeffs, (binx, biny), header, str(path))
