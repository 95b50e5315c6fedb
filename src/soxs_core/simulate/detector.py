"""Detector-level simulation: bias structure, dark current, defects, noise, cosmic rays.

:class:`DetectorSimulator` owns the *truth* of one detector on one night — everything that does
not change from frame to frame — and renders raw frames from it.  Pixels are produced in the
*prepared* orientation (rotated and trimmed, as
:meth:`soxs_core.detector.rawframe.RawFrame.read_band` returns them) and then put back into
the raw layout by the inverse of the preparation:
prescan/overscan columns are filled with bias and read noise, and the frame is rotated with
``np.rot90(..., -arm.rotation)``.

Units: all truth images are electrons (e-) or e-/s; raw pixels are ADU stored as ``uint16``
(``BITPIX=16``, ``BZERO=32768``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from soxs_core.calib import load_bad_pixel_map
from soxs_core.detector.instruments import Arm
from soxs_core.errors import InputError
from soxs_core.io.safety import write_atomically
from soxs_core.simulate._common import (
    PIXEL_SIZE_UM,
    ReadoutMode,
    parse_binning,
    readout_mode,
    resolve_arm,
    rng_for,
)
from soxs_core.simulate.headers import (
    FrameKind,
    build_header,
    default_mjd,
    frame_kind,
    raw_file_name,
)

__all__ = ["DetectorSimulator", "DetectorTruth", "DETECTOR_DEFAULTS"]

#: Per-arm defaults of the detector model that do not depend on the readout mode.
#: ``dark_rate`` e-/s per unbinned pixel; ``hot_rates`` log-uniform range (e-/s) of hot pixels;
#: ``prnu`` rms pixel-to-pixel response; ``cosmic_rate`` events cm^-2 s^-1;
#: ``pattern_period`` px (unbinned, along raw rows); amplitudes are fractions of the read noise.
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    code: dict(
        dark_rate=1.0e-4 if ccd else 5.0e-3,
        hot_pixel_fraction=2.0e-4 if ccd else 1.0e-3,
        cold_pixel_fraction=1.0e-4 if ccd else 5.0e-4,
        hot_rates=(0.01, 10.0) if ccd else (0.05, 50.0),
        bad_columns=2 if ccd else 1,
        prnu=0.008 if ccd else 0.02,
        cosmic_rate=0.025,
        bias_drift=0.5,
        bias_gradient=(-4.0e-4, 1.0e-4),
        pattern_period=13.7 if ccd else 9.3,
        pattern_fraction=0.4,
        column_fraction=0.15,
        smooth_fraction=0.4,
        channel_fraction=0.0 if ccd else 0.6,
        low_sensitivity_pixels=300,
        dust_clumps=6,
    )
    for code, ccd in (("xsh_uvb", True), ("xsh_vis", True), ("xsh_nir", False),
                      ("soxs_vis", True), ("soxs_nir", False))
}

_N_OFFSETS = 4096


@dataclass
class DetectorTruth:
    """Noise-free description of one detector on one night (prepared orientation).

    Attributes
    ----------
    arm : Arm
        The arm.
    binning : str
        ``<binx>x<biny>``.
    readout : str
        ``slow`` / ``fast`` (NIR: ``slow``, the single up-the-ramp mode).
    bias : ndarray of float32
        Expected bias (CCD) or pedestal (NIR) in electrons, prepared orientation.  Includes the
        charge hot pixels collect while the CCD is read out.
    dark_rate : ndarray of float32
        Dark current in e-/s per (binned) pixel, hot pixels included.
    sensitivity : ndarray of float32
        Relative pixel response (1 = nominal): PRNU, cold/dead pixels and bad columns.
    hot_mask, cold_mask, static_bad_mask : ndarray of bool
        Hot pixels (random and static-map ones), low-response pixels (cold, dead, bad
        columns, dead static-map pixels) and the shipped static bad-pixel map.
    gain : float
        e-/ADU.
    read_noise : float
        e-.
    bias_level : float
        Mean of :attr:`bias` over the science region without defects (e-).
    bias_gradient : tuple of float
        ``(gx, gy)`` e-/px: least-squares slopes of the column-mean profile vs column and of the
        row-mean profile vs row of the defect-free bias structure.
    pattern_period_px : float
        Period (binned px) of the periodic pattern along the raw rows.
    pattern_amplitude : float
        Amplitude (e-) of that sinusoid.  Its phase changes from frame to frame
        (``pattern_phases``), so it is not part of :attr:`bias`; see :meth:`pattern`.
    frame_offsets : list of float
        Bias-level drift (e-) of frame ``index`` (same list for every frame type).
    bad_columns : list of tuple
        ``(column, row_start, row_stop)`` of each bad column segment (prepared, binned px).
    bad_column_offsets : list of float
        Bias excess (e-) of each bad column.
    saturation_adu : float
        Raw level at which the simulated ADC/readout saturates.
    low_sensitivity_mask : ndarray of bool
        Low-sensitivity pixels inside the orders (response 0.05-0.4 of nominal: single pixels
        and small dust-like clumps), apart from every hot, cold, dead, bad-column and
        static-map pixel.  All False unless the detector belongs to an
        :class:`~soxs_core.simulate.instrument.InstrumentSimulator` (which says where the
        orders are); see :meth:`low_sensitivity_pixels`.
    low_sensitivity_clumps : list of tuple
        ``(row, col, radius)`` (prepared binned px) of each dust clump.
    """

    arm: Arm
    binning: str
    readout: str
    bias: np.ndarray
    dark_rate: np.ndarray
    sensitivity: np.ndarray
    hot_mask: np.ndarray
    cold_mask: np.ndarray
    static_bad_mask: np.ndarray
    gain: float
    read_noise: float
    bias_level: float
    bias_gradient: tuple[float, float]
    pattern_period_px: float
    pattern_amplitude: float
    frame_offsets: list[float]
    bad_columns: list[tuple[int, int, int]] = field(default_factory=list)
    bad_column_offsets: list[float] = field(default_factory=list)
    saturation_adu: float = 65535.0
    base_dark_rate: float = 0.0
    pattern_phases: list[float] = field(default_factory=list)
    pattern_parts: tuple = ()
    low_sensitivity_mask: np.ndarray | None = None
    low_sensitivity_clumps: list[tuple[float, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.low_sensitivity_mask is None:
            self.low_sensitivity_mask = np.zeros(self.bias.shape, dtype=bool)

    @property
    def shape(self) -> tuple[int, int]:
        """Prepared image shape (rows, cols)."""
        return self.bias.shape

    def hot_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns and dark rates (e-/s) of the hot pixels."""
        rows, cols = np.nonzero(self.hot_mask)
        return rows, cols, self.dark_rate[rows, cols]

    def cold_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns and relative response of the cold/dead/bad-column pixels."""
        rows, cols = np.nonzero(self.cold_mask)
        return rows, cols, self.sensitivity[rows, cols]

    def low_sensitivity_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows, columns, relative response and clump number (-1: a single pixel; else the
        index in :attr:`low_sensitivity_clumps`) of the low-sensitivity pixels."""
        rows, cols = np.nonzero(self.low_sensitivity_mask)
        clump = np.full(rows.size, -1, dtype=np.int64)
        for k, (r0, c0, rad) in enumerate(self.low_sensitivity_clumps):
            clump[np.hypot(rows - r0, cols - c0) <= rad] = k
        return rows, cols, self.sensitivity[rows, cols], clump

    def bias_profile_slopes(self, mask: np.ndarray | None = None) -> tuple[float, float]:
        """Least-squares slopes (e-/px) of the column-mean and row-mean profiles of :attr:`bias`.

        Parameters
        ----------
        mask : ndarray of bool, optional
            Pixels to leave out (e.g. ``hot_mask | cold_mask``); default: none.

        Returns
        -------
        tuple of float
            ``(slope along columns, slope along rows)``.  Without defects these equal
            :attr:`bias_gradient`; hot pixels and bad columns perturb them slightly.
        """
        data = np.ma.masked_array(self.bias, mask=mask if mask is not None else False)
        colprof = data.mean(axis=0).filled(np.nan)
        rowprof = data.mean(axis=1).filled(np.nan)
        out = []
        for prof in (colprof, rowprof):
            coord = np.arange(prof.size, dtype=np.float64)
            ok = np.isfinite(prof)
            out.append(float(np.polyfit(coord[ok], prof[ok], 1)[0]))
        return out[0], out[1]

    def pattern(self, index: int) -> np.ndarray:
        """The periodic pattern of frame ``index`` (prepared orientation, e-)."""
        phase = self.pattern_phases[index]
        return (np.float32(np.cos(phase)) * self.pattern_parts[0]
                + np.float32(np.sin(phase)) * self.pattern_parts[1])

    def expected_electrons(self, exptime: float, index: int | None = None) -> np.ndarray:
        """Expected prepared electrons of a dark of ``exptime`` s; with ``index``, including
        that frame's bias drift and periodic pattern."""
        out = self.bias + self.dark_rate * np.float32(exptime)
        if index is not None:
            out += np.float32(self.frame_offsets[index])
            out += self.pattern(index)
        return out


def _low_counts(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Exact Poisson draws for means below 1 by inverse CDF (one uniform number each)."""
    u = rng.random(lam.size, dtype=np.float32)
    p = np.exp(-lam)
    k = (u > p).astype(np.float32)
    idx = np.flatnonzero(k)            # only a small fraction continues
    if idx.size:
        lo, uu, pp = lam[idx], u[idx], p[idx]
        pp = pp * lo
        c = p[idx] + pp
        extra = np.zeros(idx.size, dtype=np.float32)
        for j in range(2, 10):
            extra += uu > c
            pp = pp * lo / np.float32(j)
            c = c + pp
        k[idx] += extra
    return k


def _poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson draws of float32 means, fast.

    * λ < 0.02 e-: the mean itself (variance deficit < 0.02 e-², far below any read noise);
    * 0.02 <= λ < 1: exact inverse-CDF draws (truncated at 9 counts, probability < 1e-7);
    * 1 <= λ < 30: numpy's exact Poisson generator;
    * λ >= 30: the Gaussian limit ``λ + √λ·N(0, 1)``.
    """
    flat = np.maximum(lam, np.float32(0)).reshape(-1)
    out = flat.copy()
    size = flat.size
    high = flat >= 30.0
    n_high = int(np.count_nonzero(high))
    if n_high > 0.5 * size:
        noise = rng.standard_normal(size, dtype=np.float32)
        noise *= np.sqrt(flat)
        np.add(out, noise, out=out, where=high)
    elif n_high:
        idx = np.flatnonzero(high)
        sub = flat[idx]
        out[idx] = sub + np.sqrt(sub) * rng.standard_normal(idx.size, dtype=np.float32)
    low = (flat >= 0.02) & (flat < 1.0)
    n_low = int(np.count_nonzero(low))
    if n_low > 0.3 * size:
        k = _low_counts(rng, flat)
        np.copyto(out, k, where=low)
    elif n_low:
        idx = np.flatnonzero(low)
        out[idx] = _low_counts(rng, flat[idx])
    mid = np.flatnonzero((flat >= 1.0) & (flat < 30.0))
    if mid.size:
        out[mid] = rng.poisson(flat[mid]).astype(np.float32)
    return out.reshape(lam.shape)


class DetectorSimulator:
    """Render raw frames of one arm, binning and readout mode with a fixed detector truth.

    Parameters
    ----------
    arm : str or Arm
        ``xsh_uvb``, ``xsh_vis``, ``xsh_nir``, ``soxs_vis`` or ``soxs_nir``.
    binning : str
        ``<binx>x<biny>`` (NIR arms: ``1x1`` only).
    readout : str
        ``slow`` or ``fast`` (ignored for NIR arms).
    seed : int
        Master seed.  The truth depends only on ``(arm, binning, readout, seed)``; the noise of
        frame ``index`` of a type on ``(seed, arm, binning, readout, type, index)``.
    gain, read_noise : float, optional
        e-/ADU and e-; default from the readout mode (``INSTRUMENTS.md`` header values).
    bias_level : float, optional
        Mean bias (CCD) / pedestal (NIR) in **electrons**; default a few hundred ADU × gain.
    bias_gradient : tuple of float, optional
        ``(gx, gy)`` linear bias slopes in e-/px (prepared columns, rows).
    pattern_amplitude : float, optional
        Periodic-pattern sinusoid amplitude in e- (default 0.4 × read noise).
    pattern_period : float, optional
        Its period in unbinned pixels along the raw rows.
    dark_rate : float, optional
        Base dark current in e-/s per unbinned pixel.
    hot_pixel_fraction, cold_pixel_fraction : float, optional
        Fractions of randomly placed hot / cold-or-dead pixels.
    hot_rates : tuple of float, optional
        Range of the log-uniform hot-pixel dark rates (e-/s).
    bad_columns : int, optional
        Number of bad column segments.
    cosmic_rate : float, optional
        Cosmic-ray events per cm² per s (default 0.025 ≈ 1.5 cm⁻² min⁻¹).
    bias_drift : float, optional
        rms (e-) of the frame-to-frame bias-level drift.
    prnu : float, optional
        rms pixel-to-pixel response non-uniformity.
    low_sensitivity_pixels, dust_clumps : int, optional
        Numbers of single low-sensitivity pixels and of dust-like clumps (discs of radius
        1.5-3.5 binned px) placed where :attr:`low_sensitivity_region` allows (default 300 and
        6; none without a region).
    night_offset : float
        Days by which the night is moved (:func:`~soxs_core.simulate.headers.default_mjd`):
        the frames' times and template starts follow, and a non-zero offset draws another
        night's noise from the same detector truth.

    Attributes
    ----------
    low_sensitivity_region : callable or None
        Returns the bool mask (prepared shape) of the pixels where low-sensitivity pixels may
        go; set (before the truth is built) by
        :class:`~soxs_core.simulate.instrument.InstrumentSimulator` to the well-lit inner
        part of its orders.  ``None``: no low-sensitivity pixels.
    """

    def __init__(self, arm: str | Arm = "xsh_vis", binning: str = "1x1",
                 readout: str = "slow", seed: int = 1, *, gain: float | None = None,
                 read_noise: float | None = None, bias_level: float | None = None,
                 bias_gradient: tuple[float, float] | None = None,
                 pattern_amplitude: float | None = None, pattern_period: float | None = None,
                 dark_rate: float | None = None, hot_pixel_fraction: float | None = None,
                 cold_pixel_fraction: float | None = None,
                 hot_rates: tuple[float, float] | None = None, bad_columns: int | None = None,
                 cosmic_rate: float | None = None, bias_drift: float | None = None,
                 prnu: float | None = None, low_sensitivity_pixels: int | None = None,
                 dust_clumps: int | None = None, night_offset: float = 0.0) -> None:
        self.arm = resolve_arm(arm)
        self.binx, self.biny = parse_binning(binning)
        self.binning = f"{self.binx}x{self.biny}"
        if self.binning not in self.arm.binnings:
            raise InputError(f"binning {binning!r} not supported for {self.arm.code} "
                             f"(supported: {', '.join(self.arm.binnings)})")
        self.mode: ReadoutMode = readout_mode(self.arm, readout)
        self.readout = self.mode.name
        self.seed = int(seed)
        self.night_offset = float(night_offset)
        d = dict(DETECTOR_DEFAULTS[self.arm.code])
        self.gain = float(gain if gain is not None else self.mode.gain)
        self.read_noise = float(read_noise if read_noise is not None else self.mode.read_noise)
        self.params: dict[str, Any] = dict(
            bias_level=float(bias_level) if bias_level is not None
            else self.mode.bias_adu * self.gain,
            bias_gradient=tuple(float(v) for v in (bias_gradient if bias_gradient is not None
                                                   else d["bias_gradient"])),
            pattern_amplitude=float(pattern_amplitude) if pattern_amplitude is not None
            else d["pattern_fraction"] * self.read_noise,
            pattern_period=float(pattern_period or d["pattern_period"]),
            dark_rate=float(dark_rate if dark_rate is not None else d["dark_rate"]),
            hot_pixel_fraction=float(hot_pixel_fraction if hot_pixel_fraction is not None
                                     else d["hot_pixel_fraction"]),
            cold_pixel_fraction=float(cold_pixel_fraction if cold_pixel_fraction is not None
                                      else d["cold_pixel_fraction"]),
            hot_rates=tuple(hot_rates or d["hot_rates"]),
            bad_columns=int(bad_columns if bad_columns is not None else d["bad_columns"]),
            cosmic_rate=float(cosmic_rate if cosmic_rate is not None else d["cosmic_rate"]),
            bias_drift=float(bias_drift if bias_drift is not None else d["bias_drift"]),
            prnu=float(prnu if prnu is not None else d["prnu"]),
            low_sensitivity_pixels=int(low_sensitivity_pixels if low_sensitivity_pixels
                                       is not None else d["low_sensitivity_pixels"]),
            dust_clumps=int(dust_clumps if dust_clumps is not None else d["dust_clumps"]),
            column_fraction=d["column_fraction"], smooth_fraction=d["smooth_fraction"],
            channel_fraction=d["channel_fraction"],
        )
        # geometry of the rotated (un-trimmed) frame and of the raw frame
        self.raw_shape = self.arm.raw_shape_binned(self.binx, self.biny)
        ny, nx = self.raw_shape
        self.rot_shape = (nx, ny) if self.arm.rotation % 2 else (ny, nx)
        self.rows, self.cols = self.arm.science_slices(self.binx, self.biny)
        self.shape = self.arm.prepared_shape(self.binx, self.biny)
        self._saturation = (65535.0 if self.arm.is_ccd
                            else min(65535.0, float(self.arm.saturation_adu)))
        self._truth: DetectorTruth | None = None
        self.low_sensitivity_region = None
        self._electronic: np.ndarray | None = None
        self._readout_dark: np.ndarray | None = None

    # ------------------------------------------------------------------ truth
    @property
    def truth(self) -> DetectorTruth:
        """The detector truth (built on first access, then cached)."""
        if self._truth is None:
            self._build_truth()
        return self._truth

    def _seed_keys(self, *keys: object) -> np.random.Generator:
        return rng_for(self.seed, self.arm.code, self.binning, *keys)

    def _build_truth(self) -> None:
        p = self.params
        arm = self.arm
        nr, nc = self.shape
        rr, rc = self.rot_shape
        ron = self.read_noise
        rs, cs = self.rows, self.cols
        rng_bias = self._seed_keys(self.readout, "bias-structure")
        rng_def = self._seed_keys("defects")

        # ---- electronic bias structure, built in raw orientation then rotated
        ny, nx = self.raw_shape
        struct_raw = np.empty((ny, nx), dtype=np.float32)
        col_off = rng_bias.normal(0.0, p["column_fraction"] * ron, nx).astype(np.float32)
        period = p["pattern_period"] / self.binx
        # the periodic pattern (pick-up noise) keeps its period but not its phase from one
        # read-out to the next; it is added per frame, from its sine and cosine parts
        xr = np.arange(nx, dtype=np.float64)
        self._pattern_parts = [
            np.ascontiguousarray(np.rot90(np.broadcast_to(
                (p["pattern_amplitude"] * f(2 * np.pi * xr / period)).astype(np.float32),
                (ny, nx)), arm.rotation)) for f in (np.sin, np.cos)]
        struct_raw[:] = col_off[None, :]
        if p["channel_fraction"] > 0:  # H2RG: 32 output channels of 64 columns
            nchan = max(1, nx // 64)
            chan = rng_bias.normal(0.0, p["channel_fraction"] * ron, nchan).astype(np.float32)
            struct_raw += chan[np.minimum(np.arange(nx) // 64, nchan - 1)][None, :]
        struct = np.ascontiguousarray(np.rot90(struct_raw, arm.rotation))
        del struct_raw
        # smooth low-order 2-D shape (even / odd-odd terms, no linear part by symmetry)
        x = (np.arange(rc, dtype=np.float64) - 0.5 * (cs.start + cs.stop - 1))
        y = (np.arange(rr, dtype=np.float64) - 0.5 * (rs.start + rs.stop - 1))
        u = x / (0.5 * nc)
        v = y / (0.5 * nr)
        a = rng_bias.normal(0.0, p["smooth_fraction"] * ron, 3)
        struct += (a[0] * 0.5 * (3 * u**2 - 1)).astype(np.float32)[None, :]
        struct += (a[1] * 0.5 * (3 * v**2 - 1)).astype(np.float32)[:, None]
        struct += (a[2] * np.outer(v, u)).astype(np.float32)
        # remove the mean and linear trend of the structure over the science region so that
        # the requested level and gradient are exactly the linear part of the bias
        sci = struct[rs, cs]
        xs, ys = x[cs], y[rs]
        colprof = sci.mean(axis=0, dtype=np.float64)
        rowprof = sci.mean(axis=1, dtype=np.float64)
        sx = np.polyfit(xs, colprof, 1)[0]
        sy = np.polyfit(ys, rowprof, 1)[0]
        mean = float(sci.mean(dtype=np.float64))
        gx, gy = p["bias_gradient"]
        level = p["bias_level"]
        struct += ((gx - sx) * x).astype(np.float32)[None, :]
        struct += ((gy - sy) * y).astype(np.float32)[:, None]
        struct += np.float32(level - mean)

        # ---- defects in the prepared orientation
        npix = nr * nc
        base = p["dark_rate"] * self.binx * self.biny
        dark = np.full((nr, nc), base, dtype=np.float32)
        if not arm.is_ccd:  # amplifier glow in one corner of the array
            glow = base * 3.0 * np.exp(-np.hypot(*np.ogrid[0:nr, 0:nc]) / 150.0)
            dark += glow.astype(np.float32)
        sens = rng_def.normal(1.0, p["prnu"], (nr, nc)).astype(np.float32)
        hot = np.zeros((nr, nc), dtype=bool)
        cold = np.zeros((nr, nc), dtype=bool)
        flat_dark, flat_sens = dark.reshape(-1), sens.reshape(-1)
        flat_hot, flat_cold = hot.reshape(-1), cold.reshape(-1)

        n_hot = rng_def.binomial(npix, min(p["hot_pixel_fraction"], 1.0))
        idx = rng_def.choice(npix, n_hot, replace=False)
        lo, hi = p["hot_rates"]
        flat_dark[idx] += np.exp(rng_def.uniform(np.log(lo), np.log(hi), n_hot))
        flat_hot[idx] = True

        n_cold = rng_def.binomial(npix, min(p["cold_pixel_fraction"], 1.0))
        idx = rng_def.choice(npix, n_cold, replace=False)
        dead = rng_def.random(n_cold) < 0.3
        flat_sens[idx] = np.where(dead, rng_def.uniform(0.0, 0.02, n_cold),
                                  rng_def.uniform(0.2, 0.8, n_cold))
        flat_cold[idx] = True

        try:
            bpm = np.array(load_bad_pixel_map(arm, self.binning), dtype=bool)
        except InputError:
            bpm = np.zeros((nr, nc), dtype=bool)
        bidx = np.flatnonzero(bpm)
        is_hot = rng_def.random(bidx.size) < 0.6
        h, dd = bidx[is_hot], bidx[~is_hot]
        flat_dark[h] += np.exp(rng_def.uniform(np.log(0.5), np.log(50.0), h.size))
        flat_hot[h] = True
        flat_sens[dd] = rng_def.uniform(0.0, 0.05, dd.size)
        flat_cold[dd] = True

        bad_cols: list[tuple[int, int, int]] = []
        bad_offsets: list[float] = []
        for _ in range(p["bad_columns"]):
            col = int(rng_def.integers(nc // 20, nc - nc // 20))
            start = int(rng_def.integers(0, nr // 2))
            offset = float(rng_def.uniform(4.0, 12.0) * ron)
            resp = float(rng_def.uniform(0.55, 0.8))
            bad_cols.append((col, start, nr))
            bad_offsets.append(offset)
            struct[rs.start + start:rs.stop, cs.start + col] += np.float32(offset)
            sens[start:, col] *= np.float32(resp)
            cold[start:, col] = True

        low_mask, clumps = self._low_sensitivity(sens, hot | cold | bpm)

        # charge collected by each pixel while the CCD is read out (rows read in order)
        if arm.is_ccd:
            wait_raw = ((np.arange(ny, dtype=np.float32) + 1.0) / ny
                        * np.float32(self.mode.readout_time))
            wait = np.rot90(np.broadcast_to(wait_raw[:, None], (ny, nx)), arm.rotation)[rs, cs]
            readout_dark = (dark * wait).astype(np.float32)
        else:
            readout_dark = np.zeros((nr, nc), dtype=np.float32)

        rng_off = self._seed_keys(self.readout, "bias-drift")
        white = rng_off.normal(0.0, 1.0, _N_OFFSETS)
        rho = 0.7
        ar = np.empty(_N_OFFSETS)
        ar[0] = white[0]
        scale = math.sqrt(1 - rho * rho)
        for i in range(1, _N_OFFSETS):  # 4096 scalars once per truth: negligible
            ar[i] = rho * ar[i - 1] + scale * white[i]
        offsets = (ar * p["bias_drift"]).tolist()
        phases = self._seed_keys(self.readout, "pattern-phase").uniform(
            0, 2 * np.pi, _N_OFFSETS).tolist()

        self._electronic = struct
        self._readout_dark = readout_dark
        bias = struct[rs, cs] + readout_dark
        self._truth = DetectorTruth(
            arm=arm, binning=self.binning, readout=self.readout,
            bias=np.ascontiguousarray(bias, dtype=np.float32), dark_rate=dark,
            sensitivity=sens, hot_mask=hot, cold_mask=cold, static_bad_mask=bpm,
            gain=self.gain, read_noise=ron, bias_level=float(level),
            bias_gradient=(float(gx), float(gy)), pattern_period_px=float(period),
            pattern_amplitude=float(p["pattern_amplitude"]), frame_offsets=offsets,
            pattern_phases=phases,
            pattern_parts=tuple(np.ascontiguousarray(part[rs, cs])
                                for part in self._pattern_parts),
            bad_columns=bad_cols, bad_column_offsets=bad_offsets,
            saturation_adu=self._saturation, base_dark_rate=float(base),
            low_sensitivity_mask=low_mask, low_sensitivity_clumps=clumps,
        )

    def _low_sensitivity(self, sens: np.ndarray, taken: np.ndarray
                         ) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
        """Inject low-sensitivity pixels into ``sens`` (in place) where the region allows.

        Its own random stream keeps every other defect as it was without them.  Clumps are
        flat-bottomed discs (every affected pixel is in the list, none half-affected) and
        neither they nor the single pixels touch ``taken`` pixels or each other.
        """
        mask = np.zeros(sens.shape, dtype=bool)
        clumps: list[tuple[float, float, float]] = []
        if self.low_sensitivity_region is None:
            return mask, clumps
        allowed = np.asarray(self.low_sensitivity_region(), dtype=bool) & ~taken
        rng = self._seed_keys("low-sensitivity")
        nr, nc = sens.shape
        free = allowed.copy()
        for _ in range(self.params["dust_clumps"]):
            cand = np.flatnonzero(free)
            if cand.size == 0:
                break
            centre = int(cand[rng.integers(cand.size)])
            r0, c0 = centre // nc, centre % nc
            rad = float(rng.uniform(1.5, 3.5))
            level = float(rng.uniform(0.1, 0.35))
            ri = int(np.ceil(rad))
            rr, cc = np.mgrid[max(r0 - ri, 0):min(r0 + ri + 1, nr),
                              max(c0 - ri, 0):min(c0 + ri + 1, nc)]
            disc = np.hypot(rr - r0, cc - c0) <= rad
            rr, cc = rr[disc], cc[disc]
            ok = allowed[rr, cc]
            rr, cc = rr[ok], cc[ok]
            sens[rr, cc] = np.clip(level * (1 + 0.1 * rng.standard_normal(rr.size)),
                                   0.05, 0.4).astype(np.float32)
            mask[rr, cc] = True
            clumps.append((float(r0), float(c0), rad))
            # nothing else within a few pixels of a clump: the clumps stay separate objects
            r1, r2 = max(r0 - ri - 3, 0), min(r0 + ri + 4, nr)
            c1, c2 = max(c0 - ri - 3, 0), min(c0 + ri + 4, nc)
            free[r1:r2, c1:c2] = False
        cand = np.flatnonzero(free)
        n = min(self.params["low_sensitivity_pixels"], cand.size)
        idx = rng.choice(cand, n, replace=False)
        flat = sens.reshape(-1)
        flat[idx] = rng.uniform(0.05, 0.4, n).astype(np.float32)
        mask.reshape(-1)[idx] = True
        return mask, clumps

    # ------------------------------------------------------------------ frames
    def _cosmics(self, rng: np.random.Generator, t_eff: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Cosmic-ray tracks: pixel rows, columns, deposited electrons and event count."""
        nr, nc = self.shape
        pix_cm = PIXEL_SIZE_UM[self.arm.code] * 1e-4
        area = nr * nc * self.binx * self.biny * pix_cm * pix_cm
        n = int(rng.poisson(self.params["cosmic_rate"] * area * max(t_eff, 0.0)))
        if n == 0:
            empty = np.zeros(0, dtype=np.intp)
            return empty, empty, np.zeros(0, dtype=np.float32), 0
        length = 1.0 + 14.0 * rng.random(n) ** 2           # 1..15 unbinned px, mostly short
        theta = rng.uniform(0.0, np.pi, n)
        r0 = rng.uniform(0, nr, n)
        c0 = rng.uniform(0, nc, n)
        per_px = rng.lognormal(np.log(500.0), 0.5, n)     # e- per pixel of track
        total = per_px * np.maximum(length, 1.0)
        npts = np.ceil(2.0 * length).astype(np.intp) + 1
        owner = np.repeat(np.arange(n), npts)
        starts = np.repeat(np.cumsum(npts) - npts, npts)
        frac = (np.arange(owner.size) - starts) / np.repeat(npts - 1, npts)
        dr = frac * length[owner] * np.sin(theta[owner]) / self.biny
        dc = frac * length[owner] * np.cos(theta[owner]) / self.binx
        rows = np.floor(r0[owner] + dr).astype(np.intp)
        cols = np.floor(c0[owner] + dc).astype(np.intp)
        energy = total[owner] / npts[owner]
        ok = (rows >= 0) & (rows < nr) & (cols >= 0) & (cols < nc)
        flat = rows[ok] * nc + cols[ok]
        uniq, inv = np.unique(flat, return_inverse=True)
        dep = np.bincount(inv, weights=energy[ok]).astype(np.float32)
        return uniq // nc, uniq % nc, dep, n

    def frame_rng(self, frame_type: str, index: int) -> np.random.Generator:
        """The noise stream of frame ``index`` of a type (exposed for scene simulators)."""
        # another night of the same detector draws other noise (the default night's streams
        # stay as they were)
        night = ("night", self.night_offset) if self.night_offset else ()
        return rng_for(self.seed, self.arm.code, self.binning, self.readout, "frame",
                       frame_type.upper(), int(index), *night)

    def make_frame(self, frame_type: str, exptime: float = 0.0, index: int = 0, *,
                   signal: np.ndarray | None = None, mjd: float | None = None,
                   header: Mapping[str, Any] | None = None
                   ) -> tuple[fits.HDUList, dict[str, Any]]:
        """Render one raw frame in memory.

        Parameters
        ----------
        frame_type : str
            ``BIAS``, ``DARK``, ``FLAT``, ``DFLAT``, ``QFLAT``, ``FLAT_OFF``, ``OBJECT`` or
            ``STD_FLUX`` (sets the DPR keywords).
        exptime : float
            Exposure time in s (forced to 0 for ``BIAS``).
        index : int
            Frame number: selects the bias drift and the noise stream.
        signal : ndarray, optional
            Expected photo-electrons per prepared pixel *before* the pixel response
            (:attr:`DetectorTruth.sensitivity` is applied here).
        mjd : float, optional
            ``MJD-OBS``; default: the frame type's block of the simulated night plus ``index``
            exposure cycles.
        header : mapping, optional
            Extra header keywords.

        Returns
        -------
        hdul : astropy.io.fits.HDUList
            The raw frame (uint16 primary HDU).
        info : dict
            Per-frame truth: ``bias_offset`` (e-), ``cosmic_mask`` (bool, prepared),
            ``cosmic_pixels`` (rows, cols, e-), ``n_cosmics``, ``saturated_mask`` (prepared),
            ``exptime``, ``mjd``, ``index``, ``frame_type``, ``file_name``.
        """
        kind = frame_kind(frame_type, self.arm)
        if kind.name == "BIAS":
            if not self.arm.is_ccd:
                raise InputError(f"{self.arm.code}: NIR arrays take no bias frames")
            exptime = 0.0
        truth = self.truth
        if not 0 <= index < len(truth.frame_offsets):
            raise InputError(f"frame index {index} outside 0..{len(truth.frame_offsets) - 1}")
        rng = self.frame_rng(kind.name, index)
        offset = float(truth.frame_offsets[index])
        phase = truth.pattern_phases[index]
        full = self._electronic + np.float32(offset)
        full += np.float32(np.cos(phase)) * self._pattern_parts[0]
        full += np.float32(np.sin(phase)) * self._pattern_parts[1]
        sci = full[self.rows, self.cols]
        lam = self._readout_dark.copy()
        if exptime > 0:
            lam += truth.dark_rate * np.float32(exptime)
        if signal is not None:
            signal = np.asarray(signal, dtype=np.float32)
            if signal.shape != self.shape:
                raise InputError(f"signal shape {signal.shape} != prepared {self.shape}")
            lam += np.maximum(signal, 0) * truth.sensitivity
        sci += _poisson(rng, lam)
        t_eff = exptime + 0.5 * self.mode.readout_time
        cr_rows, cr_cols, cr_e, n_cr = self._cosmics(rng, t_eff)
        sci[cr_rows, cr_cols] += cr_e
        full += rng.standard_normal(full.shape, dtype=np.float32) * np.float32(self.read_noise)
        full *= np.float32(1.0 / self.gain)
        np.rint(full, out=full)
        np.clip(full, 0.0, self._saturation, out=full)
        raw = np.rot90(full, -self.arm.rotation).astype(np.uint16)
        sat = full[self.rows, self.cols] >= min(self._saturation, self.arm.saturation_adu)
        if mjd is None:
            mjd = default_mjd(kind, index, exptime, night_offset=self.night_offset)
        hdr = self.raw_header(kind.name, exptime, index, mjd=mjd, header=header)
        hdul = fits.HDUList([fits.PrimaryHDU(data=raw, header=hdr)])
        cmask = np.zeros(self.shape, dtype=bool)
        cmask[cr_rows, cr_cols] = True
        info = dict(frame_type=kind.name, index=int(index), exptime=float(exptime),
                    mjd=float(mjd), bias_offset=offset, cosmic_mask=cmask,
                    cosmic_pixels=(cr_rows, cr_cols, cr_e), n_cosmics=n_cr,
                    saturated_mask=sat, file_name=raw_file_name(self.arm, kind, index))
        return hdul, info

    def raw_header(self, frame_type: str, exptime: float = 0.0, index: int = 0, *,
                   mjd: float | None = None, header: Mapping[str, Any] | None = None
                   ) -> fits.Header:
        """The primary header :meth:`make_frame` gives frame ``index`` of a type, without
        rendering its pixels (truth calibrations inherit it as products do their first raw
        frame's).  ``mjd`` defaults as in :meth:`make_frame`."""
        kind = frame_kind(frame_type, self.arm)
        if kind.name == "BIAS":
            exptime = 0.0
        if mjd is None:
            mjd = default_mjd(kind, index, exptime, night_offset=self.night_offset)
        prescan = self.cols.start
        overscan = self.rot_shape[1] - self.cols.stop
        return build_header(self.arm, self.mode, kind, binx=self.binx, biny=self.biny,
                            exptime=exptime, mjd=mjd, index=index, gain=self.gain,
                            read_noise=self.read_noise, raw_shape=self.raw_shape,
                            prescan=prescan if self.arm.is_ccd else 0,
                            overscan=overscan if self.arm.is_ccd else 0, extra=header,
                            night_offset=self.night_offset)

    def write_frame(self, outdir: str | os.PathLike, frame_type: str, exptime: float = 0.0,
                    index: int = 0, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
        """Render a frame and write it to ``outdir``; returns its path and per-frame truth."""
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        hdul, info = self.make_frame(frame_type, exptime, index, **kwargs)
        path = outdir / info["file_name"]
        write_atomically(path, lambda tmp: hdul.writeto(tmp, overwrite=True))
        info["path"] = path
        return path, info

    def write_bias(self, outdir: str | os.PathLike, n: int = 5,
                   start_index: int = 0) -> list[Path]:
        """Write ``n`` raw bias frames (CCD arms only); returns their paths."""
        return [self.write_frame(outdir, "BIAS", 0.0, start_index + i)[0] for i in range(n)]

    def write_dark(self, outdir: str | os.PathLike, n: int = 3, exptime: float = 600.0,
                   start_index: int = 0) -> list[Path]:
        """Write ``n`` raw dark frames of ``exptime`` s; returns their paths."""
        return [self.write_frame(outdir, "DARK", exptime, start_index + i)[0]
                for i in range(n)]

    def kind(self, frame_type: str) -> FrameKind:
        """The :class:`~soxs_core.simulate.headers.FrameKind` of a frame type."""
        return frame_kind(frame_type, self.arm)
