"""Echelle format of each arm: order traces, slit geometry and wavelength solution.

Coordinates are in the *prepared, unbinned* pixel grid (0-based pixel centres).  ``B`` is the
along-order coordinate (row ``y`` for X-shooter and SOXS VIS, column ``x`` for SOXS NIR) and
``A`` the cross-order coordinate.  The model, fitted once to the multi-pinhole predicted line
tables (see :mod:`soxs_core.simulate.formatfit`), is the *truth* of the simulator:

* order centre ``A_c(n, B) = sum_ij c_ij (n/n_ref)^i (B/b_ref)^j`` (a global polynomial in order
  number and along-order pixel);
* slit scale ``k(n, B)`` (px per arcsec, signed) and tilt ``t(n, B)`` (along-order px per arcsec);
* wavelength at the slit centre ``lambda_n(B)`` (one polynomial per order).

A pixel ``(A, B)`` of order ``n`` sees slit position ``s = (A - A_c(n, B)) / k(n, B)`` (arcsec)
and wavelength ``lambda_n(B - t(n, B) * s)``: lines of constant wavelength are straight,
slightly tilted segments across the order.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import polynomial as npoly

from soxs_core.calib import static_dir
from soxs_core.detector.instruments import Arm
from soxs_core.errors import InputError
from soxs_core.simulate._common import resolve_arm

__all__ = ["EchelleFormat", "load_format", "OrderGeometry", "poly2d_raw"]


def poly2d_raw(coeffs: np.ndarray, x_ref: float, y_ref: float) -> np.ndarray:
    """Convert ``sum c_ij (x/x_ref)^i (y/y_ref)^j`` into plain monomial coefficients."""
    c = np.asarray(coeffs, float)
    i = np.arange(c.shape[0])[:, None]
    j = np.arange(c.shape[1])[None, :]
    return c / (float(x_ref) ** i * float(y_ref) ** j)


@dataclass(frozen=True)
class OrderGeometry:
    """Valid along-order range of one order (unbinned px) and its wavelength limits."""

    order: int
    b_min: float
    b_max: float
    wl_min: float
    wl_max: float


class EchelleFormat:
    """The echelle-format truth of one arm.

    Parameters
    ----------
    arm : str or Arm
        Arm code (``xsh_vis`` ...) or :class:`~soxs_core.detector.instruments.Arm`.
    """

    def __init__(self, arm: str | Arm) -> None:
        self.arm = resolve_arm(arm)
        path = static_dir() / "simulator" / f"FORMAT_{self.arm.code.upper()}.json"
        model = json.loads(path.read_text())
        self.model = model
        self.source = model["source"]
        self.orders = np.array(model["orders"], dtype=int)
        self._wlmin = dict(zip(self.orders.tolist(), model["wlminful"]))
        self._wlmax = dict(zip(self.orders.tolist(), model["wlmaxful"]))
        self.n_ref = float(model["n_ref"])
        self.b_ref = float(model["b_ref"])
        self.b_mid = float(model["b_mid"])
        self.b_half = float(model["b_half"])
        self._centre = np.array(model["centre"], float)
        self._scale = None if model["scale"] is None else np.array(model["scale"], float)
        self._tilt = None if model["tilt"] is None else np.array(model["tilt"], float)
        self._scale_po = model["scale_per_order"]
        self._tilt_po = model["tilt_per_order"]
        self._wave = {int(k): np.array(v, float) for k, v in model["wavelength"].items()}
        self.dispersion_axis = self.arm.dispersion_axis
        rows, cols = self.arm.prepared_shape()
        self.shape = (rows, cols)
        #: number of unbinned pixels along (B) and across (A) the orders
        self.n_along = rows if self.dispersion_axis == "y" else cols
        self.n_across = cols if self.dispersion_axis == "y" else rows
        self.slit_length = float(self.arm.slit_length_arcsec)
        self._geometry = {int(n): self._order_geometry(int(n)) for n in self.orders}

    def checked_orders(self, orders) -> list[int]:
        """The requested orders as ints, or :class:`InputError` naming those not in the format
        and the orders that are."""
        wanted = [int(o) for o in orders]
        known = set(self.orders.tolist())
        missing = [o for o in wanted if o not in known]
        if missing or not wanted:
            lo, hi = int(self.orders.min()), int(self.orders.max())
            have = (f"{lo} to {hi}" if len(known) == hi - lo + 1
                    else ", ".join(str(o) for o in sorted(known)))
            which = ("no order given" if not wanted else
                     f"has no order {', '.join(str(o) for o in missing)}")
            raise InputError(f"{self.arm.code} {which}; its orders are {have}")
        return wanted

    # ------------------------------------------------------------------ polynomials
    def centre(self, order, b):
        """Cross-order position of the slit centre (unbinned px)."""
        n, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
        return npoly.polyval2d(n / self.n_ref, b / self.b_ref, self._centre)

    def scale(self, order, b):
        """Slit scale dA/ds in px per arcsec (signed: the slit may run towards lower A)."""
        n, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
        if self._scale is not None:
            return npoly.polyval2d(n / self.n_ref, b / self.b_ref, self._scale)
        return self._per_order(self._scale_po, n) * (1.0 + self.scale_variation(n, b))

    def scale_variation(self, order, b):
        """Relative along-order change of the slit scale of arms whose fitted format has one
        scale per order (SOXS VIS, whose predicted tables fix no variation).

        Real slit images change width along each order (camera distortion); a smooth
        ``w1 u + w2 (u² - 1/3)`` in ``u = (B - B_mid) / B_half``, with a slope that changes
        with the order, makes the slit 3-4 px (about 8 %) wider at one end of each order
        than at its narrowest.  Zero for the arms whose scale is a 2-D polynomial already.
        """
        n, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
        if self._scale is not None:
            return np.zeros(n.shape)
        u = (b - self.b_mid) / self.b_half
        w1 = 0.030 + 0.006 * (n - float(np.mean(self.orders)))
        return w1 * u + 0.040 * (u * u - 1.0 / 3.0)

    def tilt(self, order, b):
        """Slit tilt dB/ds (along-order px per arcsec) of lines of constant wavelength."""
        n, b = np.broadcast_arrays(np.asarray(order, float), np.asarray(b, float))
        if self._tilt is not None:
            return npoly.polyval2d(n / self.n_ref, b / self.b_ref, self._tilt)
        return self._per_order(self._tilt_po, n)

    @staticmethod
    def _per_order(table: dict, n: np.ndarray) -> np.ndarray:
        out = np.zeros(n.shape, float)
        for key, value in table.items():
            out[n == int(key)] = value[0]
        return out

    def wavelength(self, order: int, b):
        """Wavelength (nm) at the slit centre of along-order pixel ``b`` of one order."""
        u = (np.asarray(b, float) - self.b_mid) / self.b_half
        return npoly.polyval(u, self._wave[int(order)])

    def dispersion(self, order: int, b):
        """dλ/dB (nm per unbinned px) at the slit centre."""
        u = (np.asarray(b, float) - self.b_mid) / self.b_half
        return npoly.polyval(u, npoly.polyder(self._wave[int(order)])) / self.b_half

    def pixel_to_world(self, order: int, a, b):
        """Slit position (arcsec) and wavelength (nm) of the point ``(A, B)`` of an order."""
        a, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
        s = (a - self.centre(order, b)) / self.scale(order, b)
        return s, self.wavelength(order, b - self.tilt(order, b) * s)

    def world_to_pixel(self, order: int, wavelength, s, iterations: int = 6):
        """Inverse of :meth:`pixel_to_world` (Newton iterations, vectorised)."""
        wavelength, s = np.broadcast_arrays(np.asarray(wavelength, float),
                                            np.asarray(s, float))
        geo = self._geometry[int(order)]
        grid = np.linspace(geo.b_min - 50, geo.b_max + 50, 2048)
        wl_grid = self.wavelength(order, grid)
        sort = np.argsort(wl_grid)
        b0 = np.interp(wavelength, wl_grid[sort], grid[sort])
        b = b0.copy()
        for _ in range(iterations):
            bc = b - self.tilt(order, b) * s
            f = self.wavelength(order, bc) - wavelength
            b = b - f / self.dispersion(order, bc)
        a = self.centre(order, b) + self.scale(order, b) * s
        return a, b

    # ------------------------------------------------------------------ geometry
    def _order_geometry(self, order: int) -> OrderGeometry:
        b = np.arange(self.n_along, dtype=float)
        wl = self.wavelength(order, b)
        ok = (wl >= self._wlmin[order]) & (wl <= self._wlmax[order])
        cen = self.centre(order, b)
        ok &= (cen >= 0) & (cen <= self.n_across - 1)
        if not ok.any():
            return OrderGeometry(order, np.nan, np.nan, np.nan, np.nan)
        idx = np.flatnonzero(ok)
        b0, b1 = float(idx[0]), float(idx[-1])
        w0, w1 = sorted((float(wl[idx[0]]), float(wl[idx[-1]])))
        return OrderGeometry(order, b0, b1, w0, w1)

    def geometry(self, order: int) -> OrderGeometry:
        """Along-order range (unbinned px) and wavelength range of one order."""
        return self._geometry[int(order)]

    def edges(self, order, b):
        """Lower and upper cross-order edges (slit ends, unbinned px) at along-order ``b``."""
        half = 0.5 * self.slit_length * np.abs(self.scale(order, b))
        cen = self.centre(order, b)
        return cen - half, cen + half

    def centre_raw_coefficients(self) -> np.ndarray:
        """Centre polynomial as plain monomials ``c_ij n^i B^j`` (ORDER_TAB convention)."""
        return poly2d_raw(self._centre, self.n_ref, self.b_ref)

    def fit_edges(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Global polynomials (plain monomials) of the lower and upper order edges.

        Returns
        -------
        low, up : ndarray
            Coefficient matrices ``c_ij`` (order degree i, along-order degree j).
        rms : float
            rms (px) of the fits against the exact edges.
        """
        dn, db = self._centre.shape[0] - 1, self._centre.shape[1] - 1
        ns, bs = [], []
        for n in self.orders:
            g = self._geometry[int(n)]
            if np.isfinite(g.b_min):
                b = np.linspace(g.b_min, g.b_max, 200)
                ns.append(np.full(b.size, float(n)))
                bs.append(b)
        n, b = np.concatenate(ns), np.concatenate(bs)
        lo, up = self.edges(n, b)
        design = np.stack([(n / self.n_ref) ** i * (b / self.b_ref) ** j
                           for i in range(dn + 1) for j in range(db + 1)], axis=1)
        targets = np.stack([lo, up], axis=1)
        coef = np.linalg.lstsq(design, targets, rcond=None)[0]   # both edges in one solve
        rms = float(np.max(np.std(design @ coef - targets, axis=0)))
        out = [poly2d_raw(coef[:, k].reshape(dn + 1, db + 1), self.n_ref, self.b_ref)
               for k in range(2)]
        return out[0], out[1], rms


@functools.lru_cache(maxsize=8)
def load_format(code: str) -> EchelleFormat:
    """Cached :class:`EchelleFormat` of an arm code."""
    return EchelleFormat(code)
