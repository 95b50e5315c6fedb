"""Order tables (``ORDER_TAB_<ARM>``): order centres, trace widths and edges of an echelle frame.

The layout is soxspipe 0.17.4's (INSTRUMENTS.md §5.2), so either pipeline reads the other's
tables: HDU1 is one row of global polynomial coefficients, HDU2 one row per order.  Every
coordinate is in the *unbinned* prepared pixel grid, 0-based pixel centres.  A binned pixel
index ``i`` has its centre at unbinned ``i * bin + (bin - 1) / 2``
(:func:`to_binned` / :func:`to_unbinned`); soxspipe divides by the binning, which differs from
this by a quarter of a binned pixel for 2x binning.

``B`` is the along-order coordinate (``y`` for X-shooter and SOXS VIS, ``x`` for SOXS NIR) and
``A`` the cross-order one.  The table's column names say which: ``degy_cent`` means B = y.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from soxs_core.echelle.polynomial import OrderPolynomial
from soxs_core.errors import InputError
from soxs_core.io.fits import BinTable, FitsFile, Header, write_fits

__all__ = ["OrderTable", "read_order_table", "to_binned", "to_unbinned"]


def to_binned(unbinned, binning: int) -> np.ndarray:
    """Binned pixel coordinate of an unbinned one."""
    return (np.asarray(unbinned, float) - 0.5 * (binning - 1)) / binning


def to_unbinned(binned, binning: int) -> np.ndarray:
    """Unbinned pixel coordinate of a binned one."""
    return np.asarray(binned, float) * binning + 0.5 * (binning - 1)


@dataclass
class OrderTable:
    """Order centres (and, from soxs_mflat, edges) of one arm.

    Attributes
    ----------
    dispersion_axis : str
        ``"y"`` when the orders run along the rows' index (B = y), ``"x"`` for SOXS NIR.
    orders : ndarray of int
        Order numbers, one per HDU2 row.
    b_min, b_max : ndarray of float
        Along-order range (unbinned px) where each order's traces are valid.
    centre : OrderPolynomial
        Cross-order position of the order centre.
    std : OrderPolynomial or None
        Gaussian sigma (px) of a pinhole trace (order-centre tables).
    edge_up, edge_low : OrderPolynomial or None
        Upper (larger A) and lower order edges.
    min_threshold, max_threshold : ndarray or None
        Per-order flux levels (e-) used by the edge detection.
    n_across : int
        Unbinned size of the frame across the orders (for the mirrored ``xmin/xmax`` columns).
    header : dict
        Extra primary-header cards (MJD-OBS, DATE-OBS, EXPTIME, ESO SEQ ARM...) as
        ``{key: (value, comment)}``.
    """

    dispersion_axis: str
    orders: np.ndarray
    b_min: np.ndarray
    b_max: np.ndarray
    centre: OrderPolynomial
    std: OrderPolynomial | None = None
    edge_up: OrderPolynomial | None = None
    edge_low: OrderPolynomial | None = None
    min_threshold: np.ndarray | None = None
    max_threshold: np.ndarray | None = None
    n_across: int = 0
    header: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.orders = np.asarray(self.orders, dtype=int)
        self.b_min = np.asarray(self.b_min, float)
        self.b_max = np.asarray(self.b_max, float)

    # ------------------------------------------------------------------ axes
    @property
    def along(self) -> str:
        return self.dispersion_axis

    @property
    def across(self) -> str:
        return "x" if self.dispersion_axis == "y" else "y"

    @property
    def has_edges(self) -> bool:
        return self.edge_up is not None and self.edge_low is not None

    def along_range(self, order: int) -> tuple[float, float]:
        """Valid along-order range (unbinned px) of ``order``."""
        k = self.index(order)
        return float(self.b_min[k]), float(self.b_max[k])

    def index(self, order: int) -> int:
        hit = np.flatnonzero(self.orders == int(order))
        if not hit.size:
            raise KeyError(f"order {order} not in the table")
        return int(hit[0])

    def subset(self, orders) -> OrderTable:
        """The table restricted to ``orders`` (kept in the table's order)."""
        keep = np.isin(self.orders, np.asarray(list(orders), int))
        def cut(v):
            return None if v is None else np.asarray(v)[keep]
        return replace(self, orders=self.orders[keep], b_min=self.b_min[keep],
                       b_max=self.b_max[keep], min_threshold=cut(self.min_threshold),
                       max_threshold=cut(self.max_threshold))

    # ------------------------------------------------------------------ geometry on a frame
    def image_axes(self, shape: tuple[int, int], binx: int, biny: int
                   ) -> tuple[int, int, int, int]:
        """``(n_along, n_across, bin_along, bin_across)`` of a binned frame of ``shape``."""
        rows, cols = shape
        if self.dispersion_axis == "y":
            return rows, cols, biny, binx
        return cols, rows, binx, biny

    def in_order_mask(self, shape: tuple[int, int], binx: int = 1, biny: int = 1,
                      widen: float = 0.0, orders=None, extend: float = 0.0) -> np.ndarray:
        """Pixels of a binned frame lying between an order's edges (widened by ``widen``
        unbinned px on each side) within its valid along-order range (extended by ``extend``
        unbinned px at both ends, the edges extrapolated there).

        Without edges (an order-centre table), no pixel is in an order: use
        :meth:`centre_band_mask`.
        """
        if not self.has_edges:
            raise ValueError("order table has no edges")
        return self._band(shape, binx, biny, orders,
                          lambda n, b: (self.edge_low(n, b) - widen,
                                        self.edge_up(n, b) + widen), extend)

    def centre_band_mask(self, shape: tuple[int, int], binx: int, biny: int,
                         half_width: float, orders=None) -> np.ndarray:
        """Pixels within ``half_width`` unbinned px of an order centre."""
        def band(n, b):
            c = self.centre(n, b)
            return c - half_width, c + half_width
        return self._band(shape, binx, biny, orders, band)

    def order_label_image(self, shape: tuple[int, int], binx: int = 1, biny: int = 1,
                          widen: float = 0.0) -> np.ndarray:
        """int16 image: the order number of each pixel between its edges, 0 elsewhere (a
        pixel between two orders' widened edges takes the later order of the table)."""
        n_along, n_across, bb, ba = self.image_axes(shape, binx, biny)
        out = np.zeros((n_along, n_across), dtype=np.int16)
        for n, ib, first, last in self._runs(shape, binx, biny, None, lambda o, b: (
                self.edge_low(o, b) - widen, self.edge_up(o, b) + widen)):
            c0, c1 = int(first.min()), int(last.max()) + 1  # the order's bounding box only
            cols = np.arange(c0, c1)
            inside = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
            box = out[ib, c0:c1]
            box[inside] = n
            out[ib, c0:c1] = box
        return out if self.dispersion_axis == "y" else out.T

    def _runs(self, shape, binx, biny, orders, limits, extend: float = 0.0):
        """Per order with pixels on the frame: ``(order, rows, first, last)``, the
        (along-order) rows of the binned frame and the first and last (across-order) pixel
        between ``limits`` on each, ``first <= last``."""
        n_along, n_across, bb, ba = self.image_axes(shape, binx, biny)
        for n in (self.orders if orders is None else orders):
            b0, b1 = self.along_range(int(n))
            b0, b1 = b0 - extend, b1 + extend
            ib = np.arange(max(int(np.ceil(to_binned(b0, bb))), 0),
                           min(int(np.floor(to_binned(b1, bb))), n_along - 1) + 1)
            if not ib.size:
                continue
            lo, up = limits(float(n), to_unbinned(ib, bb))
            lo_b, up_b = to_binned(lo, ba), to_binned(up, ba)
            first = np.clip(np.ceil(lo_b).astype(int), 0, n_across)
            last = np.clip(np.floor(up_b).astype(int), -1, n_across - 1)
            run = first <= last
            if run.any():
                yield int(n), ib[run], first[run], last[run]

    def _band(self, shape, binx, biny, orders, limits, extend: float = 0.0) -> np.ndarray:
        n_along, n_across, _, _ = self.image_axes(shape, binx, biny)
        # +1 where a run of in-order pixels starts, -1 after it ends, summed along each row:
        # one pass over the frame instead of a full-frame comparison per order
        steps = np.zeros((n_along, n_across + 1), dtype=np.int16)
        for _, ib, first, last in self._runs(shape, binx, biny, orders, limits, extend):
            np.add.at(steps, (ib, first), 1)
            np.add.at(steps, (ib, last + 1), -1)
        mask_t = np.cumsum(steps, axis=1, dtype=np.int16)[:, :n_across] > 0
        return mask_t if self.dispersion_axis == "y" else mask_t.T

    # ------------------------------------------------------------------ FITS
    def to_hdus(self, primary_header: Any = None) -> list[tuple[Header, BinTable | None]]:
        """``(header, data)`` HDUs in soxspipe's layout (HDU0 header, HDU1 one row of
        coefficients, HDU2 one row per order), for :func:`soxs_core.io.fits.write_fits`.

        ``primary_header`` (ours or astropy's) is HDU0's; the table's own cards
        (:attr:`header`) are added where it has none of the same keyword.
        """
        b, a = self.along, self.across
        coeffs: dict[str, np.ndarray] = {}

        def poly_cols(poly: OrderPolynomial, name: str, prefix: str) -> None:
            coeffs[f"degorder_{name}"] = np.array([poly.order_deg], np.int64)
            coeffs[f"deg{b}_{name}"] = np.array([poly.along_deg], np.int64)
            for i in range(poly.order_deg + 1):
                for j in range(poly.along_deg + 1):
                    coeffs[f"{prefix}{i}{j}"] = np.array([float(poly.coeffs[i, j])])

        poly_cols(self.centre, "cent", "cent_")
        # soxspipe evaluates std_ij with the centre's degrees, so it is written with them
        std = self.std if self.std is not None else OrderPolynomial.constant(
            float("nan"), self.centre.order_deg, self.centre.along_deg)
        if std.coeffs.shape != self.centre.coeffs.shape:
            padded = np.zeros(self.centre.coeffs.shape)
            ni, nj = (min(s, t) for s, t in zip(std.coeffs.shape, padded.shape))
            padded[:ni, :nj] = std.coeffs[:ni, :nj]
            std = OrderPolynomial(padded)
        poly_cols(std, "std", "std_")
        if self.has_edges:
            poly_cols(self.edge_up, "edgeup", "edgeup_c")
            poly_cols(self.edge_low, "edgelow", "edgelow_c")
        amin, amax = [], []
        for n, b0, b1 in zip(self.orders, self.b_min, self.b_max):
            along = np.linspace(b0, b1, 64)
            cen = self.centre(float(n), along)
            # mirrored (frame width - value), as soxspipe 0.17.4 writes them
            amin.append(int(round(self.n_across - np.min(cen))))
            amax.append(int(round(self.n_across - np.max(cen))))
        rows = {"order": np.asarray(self.orders, np.int64),
                f"{b}min": np.floor(self.b_min).astype(np.int64),
                f"{b}max": np.ceil(self.b_max).astype(np.int64),
                f"{a}min": np.array(amin, np.int64), f"{a}max": np.array(amax, np.int64)}
        if self.has_edges:
            nrow = self.orders.size
            rows["minThreshold"] = (np.full(nrow, np.nan) if self.min_threshold is None
                                    else np.asarray(self.min_threshold, float))
            rows["maxThreshold"] = (np.full(nrow, np.nan) if self.max_threshold is None
                                    else np.asarray(self.max_threshold, float))
        primary = Header(primary_header if primary_header is not None else ())
        for key, value in self.header.items():
            if key not in primary:
                primary[key] = value if isinstance(value, tuple) else (value, "")
        return [(primary, None), (Header(), BinTable(coeffs)), (Header(), BinTable(rows))]

    def write(self, path: str | os.PathLike, primary_header: Any = None) -> Path:
        """Write the table (not atomically: products go through the recipe framework)."""
        write_fits(path, self.to_hdus(primary_header))
        return Path(path)


def _poly_from_row(row: dict, name: str, prefix: str, along: str, path: Path
                   ) -> OrderPolynomial | None:
    deg_i, deg_j = row.get(f"degorder_{name}"), row.get(f"deg{along}_{name}")
    if deg_i is None or deg_j is None:
        return None
    try:
        deg_i, deg_j = int(deg_i), int(deg_j)
    except (TypeError, ValueError):
        raise InputError(f"{path}: degrees of {name!r} are not integers") from None
    if not (0 <= deg_i <= 9 and 0 <= deg_j <= 9):
        raise InputError(f"{path}: degrees ({deg_i}, {deg_j}) of {name!r} outside 0..9")
    values = []
    for i in range(deg_i + 1):
        for j in range(deg_j + 1):
            key = f"{prefix}{i}{j}"
            if key not in row:
                raise InputError(f"{path}: column {key} missing for the degrees "
                                 f"({deg_i}, {deg_j}) of {name!r}")
            values.append(float(row[key]))
    return OrderPolynomial.from_flat(values, deg_i, deg_j)


def read_order_table(path: str | os.PathLike) -> OrderTable:
    """Read an ``ORDER_TAB`` (ours or soxspipe's).

    Raises
    ------
    InputError
        Naming the file and what is wrong with its layout.
    """
    path = Path(path)
    try:
        hdus = FitsFile(path)
        if len(hdus) < 3:
            raise InputError(f"{path}: an order table has 3 HDUs (header, coefficients, "
                             f"orders), this file has {len(hdus)}")
        primary = hdus[0].header
        if hdus[1].xtension != "BINTABLE" or hdus[2].xtension != "BINTABLE":
            raise InputError(f"{path}: HDU1 and HDU2 of an order table must be binary "
                             "tables")
        coeffs, meta = hdus.read_table(1), hdus.read_table(2)
        if coeffs.n_rows != 1:
            raise InputError(f"{path}: HDU1 of an order table has one row, this has "
                             f"{coeffs.n_rows}")
        row = {name: coeffs[name][0] for name in coeffs.names}
        metacols = dict(meta.columns)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: cannot be read as an order table ({exc})") from None
    if "degy_cent" in row:
        along = "y"
    elif "degx_cent" in row:
        along = "x"
    else:
        raise InputError(f"{path}: no degy_cent/degx_cent column: not an order table")
    across = "x" if along == "y" else "y"
    centre = _poly_from_row(row, "cent", "cent_", along, path)
    std = _poly_from_row(row, "std", "std_", along, path)
    up = _poly_from_row(row, "edgeup", "edgeup_c", along, path)
    low = _poly_from_row(row, "edgelow", "edgelow_c", along, path)
    for key in ("order", f"{along}min", f"{along}max"):
        if key not in metacols:
            raise InputError(f"{path}: HDU2 has no {key!r} column")
    amin = metacols.get(f"{across}min")
    n_across = 0
    if amin is not None and amin.size:
        # the mirrored columns hold width - centre; recover the width from one order
        b0 = float(metacols[f"{along}min"][0])
        b1 = float(metacols[f"{along}max"][0])
        cen = centre(float(metacols["order"][0]), np.linspace(b0, b1, 64))
        n_across = int(round(float(amin[0]) + np.min(cen)))
    header = {}
    for key in ("MJD-OBS", "DATE-OBS", "EXPTIME", "ESO SEQ ARM", "INSTRUME", "ESO PRO CATG"):
        if key in primary:
            header[key] = (primary[key], primary.comment(key))
    return OrderTable(
        dispersion_axis=along, orders=metacols["order"].astype(int),
        b_min=metacols[f"{along}min"].astype(float),
        b_max=metacols[f"{along}max"].astype(float), centre=centre, std=std, edge_up=up,
        edge_low=low,
        min_threshold=metacols.get("minThreshold"), max_threshold=metacols.get("maxThreshold"),
        n_across=n_across, header=header, source=str(path))
