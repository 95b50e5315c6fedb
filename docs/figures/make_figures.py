"""Regenerate the simulator figures of ``docs/simulator.md``.

Run from the repository root with the package installed::

    python docs/figures/make_figures.py

Raw frames are shown as stored (ADU, raw orientation), with an asinh stretch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from soxs_core.simulate import DetectorSimulator, InstrumentSimulator  # noqa: E402
from soxs_core.simulate.tables import disp_image_arrays  # noqa: E402

OUT = Path(__file__).resolve().parent


def show(ax, data, title, lo=1.0, hi=99.7, cmap="gray"):
    data = np.asarray(data, float)
    vmin, vmax = np.percentile(data, [lo, hi])
    scale = max(vmax - vmin, 1e-6)
    ax.imshow(np.arcsinh((data - vmin) / (0.05 * scale)), origin="lower", cmap=cmap,
              aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def save(fig, name):
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=80)
    plt.close(fig)
    print(OUT / name)


def bias_and_dark():
    det = DetectorSimulator("xsh_vis", "1x1", "slow", seed=1)
    bias, _ = det.make_frame("BIAS", index=0)
    raw = bias[0].data.astype(float)
    t = det.truth
    fig, ax = plt.subplots(1, 4, figsize=(14, 4.5))
    show(ax[0], raw[::4, ::4], "XSH VIS raw bias (1x1 slow), ADU")
    show(ax[1], raw[2000:2100, 0:200], "zoom: prescan (cols <10), column offsets,\n"
         "periodic pattern", lo=2, hi=98)
    smooth = t.bias.reshape(250, 16, 128, 16).mean(axis=(1, 3))
    show(ax[2], smooth, "truth: noiseless bias, 16x16 block means (e-)", lo=0.5, hi=99.5)
    prof = np.clip(raw[:, 10:2058] - np.median(raw), -15, 15).mean(axis=0)
    ax[3].plot(np.abs(np.fft.rfft(prof))[1:400], lw=0.7)
    ax[3].axvline(2048 / t.pattern_period_px, color="r", ls=":", lw=1)
    ax[3].set_title("|FFT| of the mean row: pattern at the true period", fontsize=9)
    ax[3].set_xlabel("frequency (cycles per 2048 px)", fontsize=8)
    save(fig, "bias.png")

    nir = DetectorSimulator("xsh_nir", "1x1", seed=1)
    dark, info = nir.make_frame("DARK", 600.0, 0)
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.5))
    show(ax[0], dark[0].data, "XSH NIR raw dark, 600 s (raw orientation)", lo=1, hi=99.9)
    show(ax[1], dark[0].data[300:500, 900:1150], "zoom: hot pixels and cosmic-ray tracks",
         lo=1, hi=99.5)
    rows, cols, rates = nir.truth.hot_pixels()
    ax[2].hist(np.log10(rates), bins=40, color="0.3")
    ax[2].set_xlabel("log10 dark rate of hot pixels (e-/s)", fontsize=8)
    ax[2].set_title(f"truth: {rows.size} hot pixels, {info['n_cosmics']} cosmic rays",
                    fontsize=9)
    save(fig, "dark.png")


def flats():
    vis = InstrumentSimulator("xsh_vis", "1x1", "slow", seed=1)
    flat, _ = vis.make_flat("FLAT", 0)
    uvb = InstrumentSimulator("xsh_uvb", "1x1", "slow", seed=1)
    d2, _ = uvb.make_flat("DFLAT", 0)
    qth, _ = uvb.make_flat("QFLAT", 1)
    fig, ax = plt.subplots(1, 4, figsize=(14, 5))
    show(ax[0], flat[0].data[::2, ::2], "XSH VIS QTH lamp flat (LAMP,FLAT)")
    show(ax[1], flat[0].data[1900:2000, 1100:1400], "zoom: slit edges, pixel response, "
         "\ninter-order scattered light", lo=1, hi=99.5)
    show(ax[2], d2[0].data[::2, ::2], "XSH UVB D2 flat (LAMP,DFLAT), raw = rotated 180°")
    show(ax[3], qth[0].data[::2, ::2], "XSH UVB QTH flat (LAMP,QFLAT)")
    save(fig, "flat.png")

    nir = InstrumentSimulator("soxs_nir", "1x1", seed=1)
    on, _ = nir.make_flat("FLAT", 0)
    off, _ = nir.make_lamp_off(1)
    fig, ax = plt.subplots(1, 2, figsize=(10, 5))
    show(ax[0], on[0].data[::2, ::2], "SOXS NIR lamp-on flat (orders along x)")
    show(ax[1], off[0].data[::2, ::2], "SOXS NIR lamp-off flat (LAMP,FLAT / IMAGE)",
         lo=1, hi=99.9)
    save(fig, "nir_flat_on_off.png")


def science():
    vis = InstrumentSimulator("xsh_vis", "1x1", "slow", seed=1)
    sci, info = vis.make_science(0, 600.0, "OBJECT")
    data = sci[0].data
    fig, ax = plt.subplots(1, 3, figsize=(14, 5))
    show(ax[0], data[::2, ::2], "XSH VIS science stare, 600 s, AB=17 star", lo=5, hi=99.5)
    show(ax[1], data[2950:3150, 1250:1500], "zoom: object trace, tilted sky lines,\n"
         "cosmic rays", lo=5, hi=99.7)
    table = vis.object_truth_table("OBJECT", 600.0).data
    for order in (17, 20, 24, 28):
        m = table["order"] == order
        ax[2].plot(table["wavelength"][m], table["counts"][m], lw=0.5)
    ax[2].set_xlabel("wavelength (nm)", fontsize=8)
    ax[2].set_ylabel("true object e- per row", fontsize=8)
    ax[2].set_title("truth: extracted object counts (4 orders)", fontsize=9)
    save(fig, "science.png")

    nir = InstrumentSimulator("xsh_nir", "1x1", seed=1)
    sci, _ = nir.make_science(0, 600.0, "OBJECT")
    fig, ax = plt.subplots(1, 1, figsize=(10, 4))
    show(ax, sci[0].data, "XSH NIR science stare, 600 s (raw orientation: orders along x)",
         lo=5, hi=99.8)
    save(fig, "science_nir.png")

    std = InstrumentSimulator("soxs_vis", "1x1", "slow", seed=1)
    frame, _ = std.make_science(0, 300.0, "STD_FLUX")
    table = std.object_truth_table("STD_FLUX", 300.0).data
    fig, ax = plt.subplots(1, 2, figsize=(11, 5))
    show(ax[0], frame[0].data[:, :900], "SOXS VIS standard GD71, 300 s (STD,FLUX)", lo=5,
         hi=99.8)
    for order in (1, 2, 3, 4):
        m = table["order"] == order
        ax[1].plot(table["wavelength"][m], table["counts"][m] / table["dispersion"][m] / 300,
                   lw=0.6, label=f"order {order}")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("wavelength (nm)", fontsize=8)
    ax[1].set_ylabel("true e- s-1 nm-1", fontsize=8)
    ax[1].legend(fontsize=7)
    ax[1].set_title("truth: standard-star count rate (NTT, 3.58 m)", fontsize=9)
    save(fig, "standard.png")


def format_truth():
    sim = InstrumentSimulator("xsh_uvb", "1x1", "slow", seed=1)
    wave, slit, order = disp_image_arrays(sim.format)
    fig, ax = plt.subplots(1, 3, figsize=(13, 5))
    im = ax[0].imshow(wave, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax[0], label="nm")
    ax[0].set_title("XSH UVB DISP_IMAGE: WAVELENGTH", fontsize=9)
    im = ax[1].imshow(slit, origin="lower", aspect="auto", cmap="coolwarm")
    fig.colorbar(im, ax=ax[1], label="arcsec")
    ax[1].set_title("DISP_IMAGE: SLIT", fontsize=9)
    fmt = sim.format
    for n in fmt.orders:
        g = fmt.geometry(n)
        b = np.linspace(g.b_min, g.b_max, 100)
        lo, up = fmt.edges(n, b)
        ax[2].plot(fmt.centre(n, b), b, "k", lw=0.6)
        ax[2].plot(lo, b, "r", lw=0.4)
        ax[2].plot(up, b, "b", lw=0.4)
        ax[2].text(fmt.centre(n, b[50]), b[50], str(n), fontsize=6)
    ax[2].set_xlim(0, fmt.n_across)
    ax[2].set_title("true order centres (black) and edges", fontsize=9)
    save(fig, "format_truth.png")


if __name__ == "__main__":
    bias_and_dark()
    flats()
    science()
    format_truth()
