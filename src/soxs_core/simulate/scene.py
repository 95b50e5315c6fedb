"""Render the expected photo-electron image of an echelle exposure.

The renderer integrates each source over every detector pixel: along the dispersion through the
cumulative (LSF-convolved, efficiency- and blaze-weighted) photon spectrum of the order,
across it through the cumulative slit-illumination or object profile.  Everything is
vectorised per order on a ``(rows along the order) x (pixels across the slit)`` window.

Slit-filling sources (lamps, sky) carry photons s-1 nm-1 per arcsec of slit length; point
sources carry photons s-1 nm-1 through the telescope and a spatial profile along the slit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from scipy.special import ndtr

from soxs_core.simulate.echelle import EchelleFormat
from soxs_core.simulate.spectra import blaze, efficiency

__all__ = ["Source", "SlitIllumination", "PointProfile", "Renderer", "scattered_light",
           "RenderResult"]

Density = Callable[[np.ndarray], np.ndarray]


@dataclass
class SlitIllumination:
    """Relative illumination along the slit: smooth, not perfectly flat, with soft ends.

    ``I(s) = (1 + a1 s/L + a2 (s/L)^2 + r sin(2π s/p + φ)) · edge(s)`` with
    ``edge = ½[erf((L/2 - s)/w) + erf((L/2 + s)/w)]``, ``L`` the slit length (arcsec) and
    ``w`` the edge softness (arcsec).
    """

    length: float
    slope: float = 0.04
    curvature: float = -0.06
    ripple: float = 0.01
    ripple_period: float = 2.7
    ripple_phase: float = 0.3
    softness: float = 0.12

    def profile(self, s: np.ndarray) -> np.ndarray:
        """``I(s)`` (dimensionless, ≈1 at the slit centre)."""
        from scipy.special import erf

        x = np.asarray(s, float) / self.length
        shape = (1 + self.slope * x + self.curvature * x**2
                 + self.ripple * np.sin(2 * np.pi * s / self.ripple_period + self.ripple_phase))
        half = 0.5 * self.length
        edge = 0.5 * (erf((half - s) / self.softness) + erf((half + s) / self.softness))
        return shape * edge

    def cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """Tabulated ``∫_{-∞}^{s} I`` on a fine grid (arcsec)."""
        half = 0.5 * self.length + 6 * self.softness
        s = np.linspace(-half, half, 8001)
        prof = self.profile(s)
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (prof[1:] + prof[:-1]) * np.diff(s))])
        return s, cum


@dataclass
class PointProfile:
    """Seeing-limited object profile along the slit (Moffat, clipped by the slit width).

    Attributes
    ----------
    fwhm : float
        Seeing FWHM (arcsec) at 500 nm; scales as λ^-0.2.
    beta : float
        Moffat β.
    slit_width : float
        Slit width (arcsec): light outside ``|x| < width/2`` is lost.
    centre : float
        Slit position (arcsec) of the object at the middle of each order.
    drift : float
        Total drift (arcsec) of the object along the slit from one end of an order to the
        other (atmospheric dispersion / flexure).
    """

    fwhm: float = 0.8
    beta: float = 3.0
    slit_width: float = 1.0
    centre: float = 0.0
    drift: float = 0.25

    def fwhm_at(self, wl: float) -> float:
        return self.fwhm * (wl / 500.0) ** -0.2

    def cumulative(self, wl: float) -> tuple[np.ndarray, np.ndarray]:
        """``∫_{-∞}^{s}`` of the slit-clipped profile (fraction of the total object flux)."""
        fwhm = self.fwhm_at(wl)
        alpha = fwhm / (2 * np.sqrt(2 ** (1 / self.beta) - 1))
        s = np.linspace(-8 * fwhm - 1, 8 * fwhm + 1, 1601)
        x = np.linspace(-0.5 * self.slit_width, 0.5 * self.slit_width, 81)
        r2 = (s[:, None] ** 2 + x[None, :] ** 2) / alpha**2
        moffat = (self.beta - 1) / (np.pi * alpha**2) * (1 + r2) ** (-self.beta)
        line = np.trapezoid(moffat, x, axis=1)
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (line[1:] + line[:-1]) * np.diff(s))])
        return s, cum

    def position(self, frac: np.ndarray) -> np.ndarray:
        """Object slit position for fractional along-order position ``frac`` in [0, 1]."""
        return self.centre + self.drift * (np.asarray(frac) - 0.5)


@dataclass
class Source:
    """A spectral source.

    Attributes
    ----------
    name : str
        Label (``lamp``, ``sky``, ``object``...).
    continuum : callable
        ``f(wl_nm) -> photons s-1 nm-1`` (per arcsec of slit for slit sources).
    lines : tuple of arrays, optional
        Emission lines ``(wl_nm, photons s-1)`` added with the instrumental profile.
    profile : PointProfile, optional
        ``None`` for slit-filling sources.
    apply_blaze : bool
        Whether the order blaze and instrument efficiency apply (always True for real light).
    """

    name: str
    continuum: Density
    lines: tuple[np.ndarray, np.ndarray] | None = None
    profile: PointProfile | None = None
    apply_blaze: bool = True


@dataclass
class RenderResult:
    """Expected electrons of each source and per-order, per-row truth of point sources."""

    images: dict[str, np.ndarray]
    rows: dict[str, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)

    def total(self) -> np.ndarray:
        out = None
        for img in self.images.values():
            out = img.copy() if out is None else out + img
        return out


class Renderer:
    """Render sources onto the prepared (binned) pixel grid of one arm.

    Parameters
    ----------
    fmt : EchelleFormat
        Echelle format truth.
    binx, biny : int
        Binning.
    resolving_power : float
        λ/FWHM of the Gaussian instrumental profile.
    illumination : SlitIllumination
        Slit illumination (slit-filling sources).
    orders : sequence of int, optional
        Restrict rendering to these orders (tests); default all.
    """

    def __init__(self, fmt: EchelleFormat, binx: int, biny: int, resolving_power: float,
                 illumination: SlitIllumination, orders=None) -> None:
        self.fmt = fmt
        self.arm = fmt.arm
        self.binx, self.biny = binx, biny
        self.resolving_power = float(resolving_power)
        self.illumination = illumination
        self.orders = [int(o) for o in (fmt.orders if orders is None else orders)]
        self.shape = self.arm.prepared_shape(binx, biny)
        if fmt.dispersion_axis == "y":
            self.bb, self.ba = biny, binx
            self.n_b, self.n_a = self.shape
        else:
            self.bb, self.ba = binx, biny
            self.n_a, self.n_b = self.shape
        self._windows = {n: self._window(n) for n in self.orders}

    # ------------------------------------------------------------------ geometry
    def _window(self, order: int) -> dict[str, np.ndarray] | None:
        fmt, bb, ba = self.fmt, self.bb, self.ba
        geo = fmt.geometry(order)
        if not np.isfinite(geo.b_min):
            return None
        ib = np.arange(int(np.floor(geo.b_min / bb)), int(np.floor(geo.b_max / bb)) + 1)
        ib = ib[(ib >= 0) & (ib < self.n_b)]
        bc = ib * bb + 0.5 * (bb - 1)
        lo, up = fmt.edges(order, bc)
        margin = 3.0 + 4 * self.illumination.softness * np.abs(fmt.scale(order, bc))
        first = np.floor((lo - margin) / ba).astype(int)
        width = int(np.ceil(np.max(up - lo + 2 * margin) / ba)) + 2
        ia = first[:, None] + np.arange(width)[None, :]
        valid = (ia >= 0) & (ia < self.n_a)
        ac = ia * ba + 0.5 * (ba - 1)
        cen = fmt.centre(order, bc)[:, None]
        k = fmt.scale(order, bc)[:, None]
        t = fmt.tilt(order, bc)[:, None]
        s_c = (ac - cen) / k
        s1 = (ac - 0.5 * ba - cen) / k
        s2 = (ac + 0.5 * ba - cen) / k
        beff = bc[:, None] - t * s_c
        wl1 = fmt.wavelength(order, beff - 0.5 * bb)
        wl2 = fmt.wavelength(order, beff + 0.5 * bb)
        return dict(ib=ib, bc=bc, ia=ia, valid=valid, s_c=s_c, s_lo=np.minimum(s1, s2),
                    s_hi=np.maximum(s1, s2), wl_lo=np.minimum(wl1, wl2),
                    wl_hi=np.maximum(wl1, wl2), wl_c=fmt.wavelength(order, beff),
                    frac=(bc - geo.b_min) / max(geo.b_max - geo.b_min, 1.0))

    def _index(self, win: dict) -> tuple[np.ndarray, np.ndarray]:
        ib = np.broadcast_to(win["ib"][:, None], win["ia"].shape)
        if self.fmt.dispersion_axis == "y":
            return ib, win["ia"]
        return win["ia"], ib

    # ------------------------------------------------------------------ spectra
    def _cumulative(self, order: int, src: Source, wl_min: float, wl_max: float
                    ) -> tuple[np.ndarray, np.ndarray]:
        wl_c = 0.5 * (wl_min + wl_max)
        sigma = wl_c / self.resolving_power / 2.3548
        step = sigma / 4.0
        pad = 8 * sigma
        grid = np.arange(wl_min - pad, wl_max + pad + step, step)
        weight = np.ones_like(grid)
        if src.apply_blaze:
            weight = efficiency(self.arm, grid) * blaze(self.fmt, order, grid)
        dens = src.continuum(grid) * weight
        dens = gaussian_filter1d(dens, sigma / step, mode="nearest")
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * step)])
        if src.lines is not None:
            lw, lf = src.lines
            sel = (lw > grid[0] - 5 * sigma) & (lw < grid[-1] + 5 * sigma)
            lw, lf = lw[sel], lf[sel]
            if lw.size:
                lwt = (efficiency(self.arm, lw) * blaze(self.fmt, order, lw)
                       if src.apply_blaze else np.ones_like(lw))
                # chunk to bound memory (lines x grid)
                for start in range(0, lw.size, 64):
                    sl = slice(start, start + 64)
                    cum += ((lf[sl] * lwt[sl])[None, :]
                            * ndtr((grid[:, None] - lw[sl][None, :]) / sigma)).sum(axis=1)
        return grid, cum

    # ------------------------------------------------------------------ render
    def render(self, sources: list[Source], exptime: float) -> RenderResult:
        """Expected electrons (before pixel response) of each source over ``exptime`` s."""
        images = {src.name: np.zeros(self.shape, dtype=np.float32) for src in sources}
        rows: dict[str, dict[int, dict[str, np.ndarray]]] = {
            src.name: {} for src in sources if src.profile is not None}
        s_ill, c_ill = self.illumination.cumulative()
        for order in self.orders:
            win = self._windows[order]
            if win is None:
                continue
            valid = win["valid"]
            rr, cc = self._index(win)
            wl_lo, wl_hi = win["wl_lo"], win["wl_hi"]
            for src in sources:
                grid, cum = self._cumulative(order, src, float(wl_lo.min()),
                                             float(wl_hi.max()))
                spec = np.interp(wl_hi, grid, cum) - np.interp(wl_lo, grid, cum)
                if src.profile is None:
                    spatial = (np.interp(win["s_hi"], s_ill, c_ill)
                               - np.interp(win["s_lo"], s_ill, c_ill))
                else:
                    wl_mid = float(np.median(win["wl_c"]))
                    s_p, c_p = src.profile.cumulative(wl_mid)
                    s0 = src.profile.position(win["frac"])[:, None]
                    spatial = (np.interp(win["s_hi"] - s0, s_p, c_p)
                               - np.interp(win["s_lo"] - s0, s_p, c_p))
                value = (spec * spatial * exptime).astype(np.float32)
                value[~valid] = 0.0
                images[src.name][rr[valid], cc[valid]] += value[valid]
                if src.profile is not None:
                    s0 = src.profile.position(win["frac"])
                    beff = win["bc"] - self.fmt.tilt(order, win["bc"]) * s0
                    acen = (self.fmt.centre(order, win["bc"])
                            + self.fmt.scale(order, win["bc"]) * s0)
                    rows[src.name][order] = dict(
                        pixel=win["ib"].copy(), along=win["bc"].copy(),
                        wavelength=self.fmt.wavelength(order, beff),
                        counts=value.sum(axis=1, dtype=np.float64),
                        centre=acen, slit_position=s0)
        return RenderResult(images=images, rows=rows)

    def sample_rows(self, image: np.ndarray, order: int, offsets: np.ndarray) -> np.ndarray:
        """Values of ``image`` at the order's window pixels ``offsets`` px from the centre.

        Returns an array (rows along the order, len(offsets)) — handy for truth tables.
        """
        win = self._windows[order]
        cen = self.fmt.centre(order, win["bc"])
        ia = np.rint((cen[:, None] + np.asarray(offsets)[None, :] * self.ba
                      - 0.5 * (self.ba - 1)) / self.ba).astype(int)
        ia = np.clip(ia, 0, self.n_a - 1)
        ib = np.broadcast_to(win["ib"][:, None], ia.shape)
        return image[ib, ia] if self.fmt.dispersion_axis == "y" else image[ia, ib]


def _linear_interp_matrix(n_out: int, n_in: int, block: int) -> np.ndarray:
    """Matrix that linearly interpolates block centres (``block`` px apart) to pixels."""
    centres = (np.arange(n_in) + 0.5) * block - 0.5
    pos = np.clip(np.arange(n_out, dtype=float), centres[0], centres[-1])
    j = np.clip(np.searchsorted(centres, pos) - 1, 0, max(n_in - 2, 0))
    w = (pos - centres[j]) / block if n_in > 1 else np.zeros(n_out)
    mat = np.zeros((n_out, n_in))
    mat[np.arange(n_out), j] = 1 - w
    if n_in > 1:
        mat[np.arange(n_out), j + 1] += w
    return mat


def scattered_light(image: np.ndarray, fraction: float,
                    scale_px: float | tuple[float, float] = 60.0, block: int = 16
                    ) -> np.ndarray:
    """Smooth inter-order scattered light carrying ``fraction`` of the image's total flux.

    The image is block-summed, blurred with a Gaussian of ``scale_px`` (image pixels; a
    ``(rows, columns)`` pair for binned images, so that the halo keeps its size on the
    detector) and linearly interpolated back (separable matrix products): a broad halo,
    brightest near the brightest orders.
    """
    if fraction <= 0:
        return np.zeros_like(image)
    ny, nx = image.shape
    py, px = (-ny) % block, (-nx) % block
    padded = np.pad(image, ((0, py), (0, px)))
    small = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block,
                           block).sum(axis=(1, 3), dtype=np.float64)
    sigma = np.broadcast_to(np.asarray(scale_px, float), (2,)) / block
    small = gaussian_filter(small, tuple(sigma), mode="nearest")
    wy = _linear_interp_matrix(ny, small.shape[0], block)
    wx = _linear_interp_matrix(nx, small.shape[1], block)
    big = (wy @ small) @ wx.T
    total = float(image.sum(dtype=np.float64))
    norm = float(big.sum())
    if norm <= 0:
        return np.zeros_like(image)
    return (big * (fraction * total / norm)).astype(np.float32)
