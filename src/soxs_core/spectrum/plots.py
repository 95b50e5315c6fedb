"""QC plots of the one-dimensional spectra: EXTRACTED ORDERS, EXTRACTED MERGED, EXTRACTED
MERGED FLUXCALIBRATED and RESPONSE (PDF, matplotlib Agg, written atomically).

The merged plots follow soxspipe's Fig. 50: flux on a linear scale, on a log scale, and the
signal-to-noise ratio, against wavelength; telluric bands are shaded so that a dip there is
not mistaken for a reduction fault.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.table import Table

from soxs_core.io.figures import few_ticks, new_figure
from soxs_core.io.safety import save_figure
from soxs_core.spectrum.fluxcal import TELLURIC_BANDS_NM, Response

__all__ = ["plot_extracted_orders", "plot_merged", "plot_fluxcal", "plot_response",
           "render_extracted_orders", "render_merged", "render_fluxcal", "render_response"]

ORDER_COLOURS = ("tab:blue", "tab:orange")
#: Most points drawn per curve (evenly thinned beyond; the PDF stays small and quick).
MAX_POINTS = 6000


def _figure(height: float, nrows: int):
    fig = new_figure(11, height)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.06, top=0.93, hspace=0.32)
    axes = [fig.add_subplot(nrows, 1, k + 1) for k in range(nrows)]
    few_ticks(*axes, x=10, y=5, labelsize=8)
    return fig, axes


def _thin(*arrays: np.ndarray, limit: int = MAX_POINTS) -> list[np.ndarray]:
    n = arrays[0].size
    step = max(1, int(np.ceil(n / limit)))
    return [np.asarray(a)[::step] for a in arrays]


def _shade_tellurics(ax, lo: float, hi: float) -> None:
    for a, b in TELLURIC_BANDS_NM:
        if b > lo and a < hi:
            ax.axvspan(max(a, lo), min(b, hi), color="0.9", zorder=0, lw=0)


def _limits(values: np.ndarray, low: float = 0.5, high: float = 99.5,
            pad: float = 0.08) -> tuple[float, float] | None:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [low, high])
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def _save(path: str | os.PathLike, fig) -> Path:
    return save_figure(fig, path, format="pdf", dpi=100)


def _orders_of(table: Table) -> np.ndarray:
    return np.unique(np.asarray(table["order"]))


# ---------------------------------------------------------------------------- orders
def render_extracted_orders(orders_table: Table, title: str = ""):
    """EXTRACTED ORDERS figure: optimal (colours) and boxcar (grey) counts, SNR and sky per
    order against wavelength; rows with ``qual`` != 0 left out."""
    fig, (ax_f, ax_s, ax_k) = _figure(12, 3)
    usable = np.ones(len(orders_table), bool)
    if "qual" in orders_table.colnames:
        usable &= np.asarray(orders_table["qual"]) == 0
    wave_all = np.asarray(orders_table["wavelengthMean"], float)
    lo, hi = np.nanmin(wave_all), np.nanmax(wave_all)
    for ax in (ax_f, ax_s, ax_k):
        _shade_tellurics(ax, lo, hi)
    order = np.asarray(orders_table["order"])
    flux_all = []
    for i, n in enumerate(_orders_of(orders_table)):
        s = usable & (order == n)
        if not s.any():
            continue
        srt = np.argsort(wave_all[s])
        w = wave_all[s][srt]
        colour = ORDER_COLOURS[i % 2]
        opt = np.asarray(orders_table["extractedFluxOptimal"], float)[s][srt]
        flux_all.append(opt)
        if "extractedFluxBoxcar" in orders_table.colnames:
            box = np.asarray(orders_table["extractedFluxBoxcar"], float)[s][srt]
            ax_f.plot(*_thin(w, box), color="0.6", lw=0.4, zorder=1, rasterized=True)
        ax_f.plot(*_thin(w, opt), color=colour, lw=0.5, zorder=2, rasterized=True)
        ax_f.text(np.median(w), np.nanpercentile(opt, 99), str(n), ha="center",
                  va="bottom", fontsize=7, color=colour)
        if "snr" in orders_table.colnames:
            snr = np.asarray(orders_table["snr"], float)[s][srt]
            ax_s.plot(*_thin(w, snr), color=colour, lw=0.5, rasterized=True)
        if "skyFlux" in orders_table.colnames:
            sky = np.asarray(orders_table["skyFlux"], float)[s][srt]
            ax_k.plot(*_thin(w, sky), color=colour, lw=0.5, rasterized=True)
    if flux_all:
        lim = _limits(np.concatenate(flux_all))
        if lim:
            ax_f.set_ylim(min(lim[0], 0.0), lim[1])
    ax_f.set_ylabel("object (e- per pixel)")
    ax_f.set_title("optimal extraction (colours, order numbers), boxcar (grey)", fontsize=9,
                   y=1.0)
    ax_s.set_ylabel("SNR per pixel")
    ax_s.set_ylim(bottom=0)
    ax_k.set_ylabel("sky under the window (e-)")
    ax_k.set_xlabel("wavelength (nm)")
    for ax in (ax_f, ax_s, ax_k):
        ax.set_xlim(lo, hi)
        ax.tick_params(labelsize=8)
    head = "EXTRACTED ORDERS"
    fig.suptitle(f"{head}: {title}" if title else head, fontsize=12)
    return fig


def plot_extracted_orders(path: str | os.PathLike, orders_table: Table,
                          title: str = "") -> Path:
    """Write the EXTRACTED ORDERS QC PLOT (PDF) atomically."""
    return _save(path, render_extracted_orders(orders_table, title))


# ---------------------------------------------------------------------------- merged
def _three_panels(wave, flux, err, snr, good, ylabel: str, head: str, title: str,
                  reference=None, reference_label: str = ""):
    fig, (ax_lin, ax_log, ax_snr) = _figure(12, 3)
    wave = np.asarray(wave, float)
    lo, hi = float(np.nanmin(wave)), float(np.nanmax(wave))
    for ax in (ax_lin, ax_log, ax_snr):
        _shade_tellurics(ax, lo, hi)
        ax.set_xlim(lo, hi)
        ax.tick_params(labelsize=8)
    f = np.where(good, flux, np.nan)
    e = np.where(good, err, np.nan)
    w_t, f_t, e_t = _thin(wave, f, e)
    ax_lin.fill_between(w_t, f_t - e_t, f_t + e_t, color="tab:blue", alpha=0.25, lw=0,
                        rasterized=True)
    ax_lin.plot(w_t, f_t, color="tab:blue", lw=0.5, label="spectrum (1σ band)",
                rasterized=True)
    ax_log.plot(w_t, np.where(f_t > 0, f_t, np.nan), color="tab:blue", lw=0.5,
                rasterized=True)
    if reference is not None:
        rw, rf = reference
        inside = (rw >= lo) & (rw <= hi)
        for ax in (ax_lin, ax_log):
            ax.plot(rw[inside], rf[inside], color="tab:red", lw=0.8, label=reference_label)
        ax_lin.legend(fontsize=8, loc="upper right")
    lim = _limits(f)
    if lim:
        ax_lin.set_ylim(min(lim[0], 0.0), lim[1])
    ax_log.set_yscale("log")
    pos = f[np.isfinite(f) & (f > 0)]
    if pos.size:
        ax_log.set_ylim(np.percentile(pos, 0.5) / 2, np.percentile(pos, 99.9) * 2)
    ax_lin.set_ylabel(ylabel)
    ax_log.set_ylabel(ylabel + " (log)")
    ax_snr.plot(*_thin(wave, np.where(good, snr, np.nan)), color="tab:green", lw=0.5,
                rasterized=True)
    ax_snr.set_ylim(bottom=0)
    finite = np.asarray(snr, float)[good & np.isfinite(snr)]
    if finite.size:
        ax_snr.axhline(np.median(finite), color="k", lw=0.6, ls="--",
                       label=f"median {np.median(finite):.1f}")
        ax_snr.legend(fontsize=8, loc="upper right")
    ax_snr.set_ylabel("SNR per bin")
    ax_snr.set_xlabel("wavelength (nm)")
    fig.suptitle(f"{head}: {title}" if title else head, fontsize=12)
    return fig


def render_merged(merged: Table, title: str = ""):
    """EXTRACTED MERGED figure (Fig. 50 layout) of a merged counts table."""
    good = np.ones(len(merged), bool)
    if "QUAL" in merged.colnames:
        good &= np.asarray(merged["QUAL"]) == 0
    step = float(merged.meta.get("MERGSTEP", np.nan))
    dens = np.asarray(merged["FLUX_DENSITY_COUNTS"], float)
    err = (np.asarray(merged["ERR_COUNTS"], float) / step if np.isfinite(step)
           else np.full(dens.size, np.nan))
    return _three_panels(merged["WAVE"], dens, err, np.asarray(merged["SNR"], float), good,
                         "flux density (e-/nm)", "EXTRACTED MERGED", title)


def plot_merged(path: str | os.PathLike, merged: Table, title: str = "") -> Path:
    """Write the EXTRACTED MERGED QC PLOT (PDF) atomically."""
    return _save(path, render_merged(merged, title))


def render_fluxcal(fluxcal: Table, title: str = "", standard=None):
    """EXTRACTED MERGED FLUXCALIBRATED figure; with ``standard`` (``(name, wave_nm, flux)``)
    the catalogue spectrum is drawn over it."""
    good = np.ones(len(fluxcal), bool)
    if "QUAL" in fluxcal.colnames:
        good &= np.asarray(fluxcal["QUAL"]) == 0
    reference, label = None, ""
    if standard is not None:
        name, w, f = standard
        reference, label = (np.asarray(w, float), np.asarray(f, float)), f"{name} catalogue"
    return _three_panels(fluxcal["WAVE"], np.asarray(fluxcal["FLUX_CALIBRATED"], float),
                         np.asarray(fluxcal["ERR_CALIBRATED"], float),
                         np.asarray(fluxcal["SNR"], float), good,
                         r"$F_\lambda$ (erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$)",
                         "EXTRACTED MERGED FLUXCALIBRATED", title, reference, label)


def plot_fluxcal(path: str | os.PathLike, fluxcal: Table, title: str = "",
                 standard=None) -> Path:
    """Write the EXTRACTED MERGED FLUXCALIBRATED QC PLOT (PDF) atomically."""
    return _save(path, render_fluxcal(fluxcal, title, standard))


# ---------------------------------------------------------------------------- response
def render_response(response: Response, efficiency_table: Table | None = None,
                    title: str = ""):
    """RESPONSE figure: measured response of every row (the standard's catalogue flux over
    its extinction-corrected count density; grey: telluric band or line core, red: clipped)
    with the fitted per-order curves; the rows' ratio to the fit; the efficiency per order
    (with its running median); soxspipe's merged polynomial against the merged response."""
    n_panels = 3 + (efficiency_table is not None)
    fig, axes = _figure(4.0 * n_panels, n_panels)
    ax_r, ax_res = axes[0], axes[1]
    ax_eff = axes[2] if efficiency_table is not None else None
    ax_sx = axes[-1]
    lo = min((float(w.min()) for w, _ in response.orders.values()), default=np.nan)
    hi = max((float(w.max()) for w, _ in response.orders.values()), default=np.nan)
    for ax in axes:
        if np.isfinite(lo):
            _shade_tellurics(ax, lo, hi)
            ax.set_xlim(lo, hi)
        ax.tick_params(labelsize=8)
    fits_by_order = {f.order: f for f in response.fits}
    resid_all = []
    for i, n in enumerate(sorted(response.orders)):
        colour = ORDER_COLOURS[i % 2]
        w, r = response.orders[n]
        ax_r.plot(w, r, color=colour, lw=1.2, zorder=3)
        fit = fits_by_order.get(n)
        if fit is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            measured = 1.0 / fit.sensitivity
        used = fit.used & np.isfinite(measured)
        clipped = ~fit.used & ~fit.masked & np.isfinite(measured)
        masked = fit.masked & np.isfinite(measured)
        for sel, c, z in ((masked, "0.6", 1), (used, colour, 2), (clipped, "tab:red", 2)):
            if sel.any():
                ax_r.scatter(*_thin(fit.wave[sel], measured[sel], limit=2500), s=1, c=c,
                             lw=0, zorder=z, rasterized=True)
        model = response.evaluate(n, fit.wave)
        ratio = measured / model
        keep = (used | clipped) & np.isfinite(ratio)
        resid_all.append(ratio[used & np.isfinite(ratio)])
        ax_res.scatter(*_thin(fit.wave[keep], ratio[keep], limit=2500), s=1,
                       c=np.where(used[keep], colour, "tab:red").tolist()
                       if keep.sum() <= 2500 else colour, lw=0, rasterized=True)
        tag = f"{n}*" if fit.telluric_fallback else str(n)
        ax_r.text(np.median(w), np.nanmax(r), tag, fontsize=7, color=colour, ha="center",
                  va="bottom")
    ax_r.set_yscale("log")
    pos = np.concatenate([r[np.isfinite(r) & (r > 0)] for _, r in response.orders.values()]
                         ) if response.orders else np.array([])
    if pos.size:
        ax_r.set_ylim(np.percentile(pos, 0.5) / 1.5, np.percentile(pos, 99.5) * 1.5)
    ax_r.set_ylabel("response R (erg cm$^{-2}$ e$^{-1}$)")
    std = f" of {response.standard}" if response.standard else ""
    ax_r.set_title(f"per-order response{std}: rows (grey masked, red clipped) and fits "
                   "(* = fitted through telluric bands)", fontsize=9, y=1.0)
    ax_res.axhline(1.0, color="k", lw=0.6)
    if resid_all:
        rr = np.concatenate(resid_all)
        spread = 1.4826 * np.median(np.abs(rr - np.median(rr))) if rr.size else 0.05
        half = min(max(6 * spread, 0.02), 0.5)
        ax_res.set_ylim(1 - half, 1 + half)
        ax_res.set_title(f"rows / fit (robust scatter {100 * spread:.2f} %)", fontsize=9,
                         y=1.0)
    ax_res.set_ylabel("measured / fitted R")
    if ax_eff is not None:
        eff = efficiency_table
        order = np.asarray(eff["ORDER"])
        good = np.asarray(eff["QUAL"]) == 0
        med_all = []
        for i, n in enumerate(np.unique(order)):
            s = (order == n) & good
            if not s.any():
                continue
            w = np.asarray(eff["WAVE"], float)[s]
            e = np.asarray(eff["EFFICIENCY"], float)[s]
            colour = ORDER_COLOURS[i % 2]
            ax_eff.scatter(*_thin(w, e, limit=1500), s=1, c=colour, alpha=0.3, lw=0,
                           rasterized=True)
            k = max(5, e.size // 50)
            run = np.array([np.median(e[j:j + k]) for j in range(0, e.size, k)])
            runw = np.array([np.median(w[j:j + k]) for j in range(0, e.size, k)])
            # no line across the rows left out (telluric bands, line cores)
            gap = np.flatnonzero(np.diff(runw) > 3 * np.median(np.diff(runw))) + 1
            ax_eff.plot(np.insert(runw, gap, np.nan), np.insert(run, gap, np.nan),
                        color=colour, lw=1.2)
            med_all.append(e)
        if med_all:
            allv = np.concatenate(med_all)
            ax_eff.axhline(np.median(allv), color="k", ls="--", lw=0.6,
                           label=f"EFF MEDIAN {np.median(allv):.3f}")
            ax_eff.legend(fontsize=8, loc="upper right")
            ax_eff.set_ylim(0, min(1.0, np.percentile(allv, 99.5) * 1.3))
        ax_eff.set_ylabel("efficiency (e- / photon)")
        ax_eff.set_title("end-to-end efficiency above the atmosphere (telescope, instrument, "
                         "detector; blaze and slit losses included)", fontsize=9, y=1.0)
    mf = response.merged_fit
    if mf:
        ax_sx.scatter(*_thin(mf["wave"], mf["measured"], limit=3000), s=1, c="tab:blue",
                      lw=0, rasterized=True, label="merged response")
        ax_sx.plot(mf["wave"], mf["fitted"], color="tab:red", lw=1.0,
                   label=f"polynomial, degree {len(response.merged_coeffs) - 1}")
        ax_sx.legend(fontsize=8, loc="upper right")
        lim = _limits(mf["measured"], 1, 99)
        if lim:
            ax_sx.set_ylim(*lim)
    ax_sx.set_ylabel("soxspipe R (1e-17 cgs per e-/s/px)")
    ax_sx.set_title("RESP_TAB HDU 1 (soxspipe's one-polynomial response, merged spectrum)",
                    fontsize=9, y=1.0)
    ax_sx.set_xlabel("wavelength (nm)")
    head = "RESPONSE"
    fig.suptitle(f"{head}: {title}" if title else head, fontsize=12)
    return fig


def plot_response(path: str | os.PathLike, response: Response,
                  efficiency_table: Table | None = None, title: str = "") -> Path:
    """Write the RESPONSE QC PLOT (PDF) atomically."""
    return _save(path, render_response(response, efficiency_table, title))
