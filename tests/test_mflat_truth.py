"""soxs_mflat end to end against the simulator's truth (issue 8, "Accuracy").

Each set-up is a simulated night (``simulate_night``: 3 biases for the CCD arms, 5 lamp flats
per lamp, NIR lamp-off partners, a few orders for speed) reduced through the real entry point
(``soxs_recipes.cli.run``): ``soxs_mbias`` on ``bias.sof``, then ``soxs_mflat`` on the night's
``flat.sof`` (master bias + the simulator's ORDER_TAB) and again on the same SOF without its
ORDER_TAB line (self-tracing).  Every check compares a product with the truth the simulator
wrote (``truth/``) with tolerances from the truth or the counting noise, never from the
product's own QC.

What the products must equal
----------------------------
A raw flat k receives ``f_k (L + S) s`` photo-electrons per pixel (``L`` the order light and
``S`` the scattered light of one nominal exposure -- ``truth/model_lamp_<lamp>.fits`` is
``L + S`` and ``truth/scattered_light_<lamp>.fits`` is ``S`` --, ``s`` the true pixel
response ``SENSITIVITY`` and ``f_k`` the lamp factor of ``truth/frames.fits``).  The
two-stage normalisation divides frame k by a level proportional to ``f_k``, so the stack is
``c (L + S) s``; the background model (fitted to the inter-order light, which is ``c S s``
smoothed) takes ``c S`` away, and the finishing divides by the mean over the good (QUAL 0)
pixels between the product's own edges.  The expected master is therefore

    E = L s / K,   K = mean of L s over the product's good in-order pixels,

with the product's mask (its definition of the normalisation) and the truth's values; no
constant is fitted.  The lamp factors cancel (they vary by the simulator's 1.5 % jitter; a
master normalised with wrong levels would show it in the pulls), and so do the frames' own
bias drifts and the uniform dark current (a pedestal the background takes).  Truth hot,
cold and static-bad pixels (dark current not in the model) and the low-sensitivity pixels
(tested on their own) are left out of the pulls.

UVB: the stitched master is ``scale x D2 master`` on the crossover order's side of the seam
and the QTH master on the other side; its expectation is the same with ``L`` of the lamp
each order comes from, the D2 part multiplied by the true flux ratio QTH / D2 in the
product's window (a square of ``centre-order-window`` px at the centre of the crossover
order, computed on the truth).

Scattered light: the products do not hold the background model, so the recipe's own call
of ``background.fit_background`` is watched while it runs (:class:`_BackgroundSpy`) and its
model compared with ``c S`` (``c`` the master's scale, measured on the master before the
subtraction against ``(L + S) s``).  A check on the finished flat alone cannot tell a
scattered-light error proportional to ``S`` from the normalisation, because inside an order
``S`` follows ``L`` closely (S / L is about 2.5 % nearly everywhere); the pulls above see
what is left.

"Usable length" of an order (edge accuracy): the truth rows (``order_edges_truth``) where
both true edges are on the detector (``inside``) and the lamp lights the order centre to at
least :data:`USABLE_LIGHT` of that order's brightest point.  The fainter ends of the blaze,
where no edge can be measured to a tenth of a pixel with five flats, and the parts of an
order that run off the detector across the dispersion, are left out.  The product's
along-order range must still cover the usable length, to within :data:`RANGE_SLACK` px at
each end.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from soxs_core.detector.quality import Qual
from soxs_core.echelle import background
from soxs_core.echelle.ordertable import (
    OrderTable,
    read_order_table,
    to_binned,
    to_unbinned,
)
from soxs_core.echelle.polynomial import OrderPolynomial
from soxs_core.simulate import simulate_night
from soxs_core.simulate.echelle import load_format
from soxs_core.simulate.night import reduction_dir
from soxs_recipes.cli import run

#: name -> (arm, binning, simulated orders); every arm and one binned set-up
SETUPS = {
    "xsh_uvb": ("xsh_uvb", "1x1", (18, 19, 20, 21)),
    "xsh_vis": ("xsh_vis", "1x1", (20, 21, 22)),
    "xsh_nir": ("xsh_nir", "1x1", (14, 15, 16)),
    "soxs_vis": ("soxs_vis", "1x1", (1, 2, 3, 4)),
    "soxs_nir": ("soxs_nir", "1x1", (12, 13, 14)),
    "xsh_vis_2x2": ("xsh_vis", "2x2", (27, 28, 29, 30)),
}
MODES = ("ordertab", "selftrace")

#: Edge accuracy required by issue 8 (px, unbinned).
EDGE_RMS, EDGE_MAX = 0.1, 0.5
#: Fraction of an order's brightest centre light below which its ends are not "usable".
USABLE_LIGHT = 0.10
#: Unbinned px by which the product's along-order range may stop short of either end of the
#: usable length: the outermost edge cuts are centred about half a cut (slice) from where
#: the light ends, and the table's range ends there.
RANGE_SLACK = 30.0
#: Seed page's X RES SD range (calib/static/defaults.yaml: VIS [0, 0.37], NIR [0, 0.2]);
#: the UVB CCD takes the VIS one.
X_RES_SD = {"UVB": 0.37, "VIS": 0.37, "NIR": 0.2}
#: Pixels whose true order light is below this fraction of the in-order 99th percentile are
#: left out of the pull statistics: there the master is noise on the (subtracted) scattered
#: light, and what it shows is the background model, tested on its own below.
PULL_LIGHT = 0.2
#: Along-order length (unbinned px) of the segments in which the scattered-light residual is
#: measured (each order's range cut into equal segments of about this length).
SEGMENT = 128
#: Required recovery of the scattered light (fraction of its amplitude, issue 8).
SCATTER_TOL = 0.10
LOW_SENS = np.uint8(Qual.LOW_SENS)
#: The simulator puts low-sensitivity pixels where a lamp gives 20 % of the flat level.
LIT_LOW_SENS = 0.2

TIMES: dict[str, float] = {}


# ------------------------------------------------------------------------------- the nights
def _products(outdir: Path, arm: str) -> dict[str, tuple[Path, Path]]:
    """Lamp suffix ("" final, "dlamp"/"qlamp" UVB) -> (master flat, order table)."""
    name = arm.lower()
    out = {"": (outdir / f"master_flat_{name}.fits", outdir / f"order_tab_{name}.fits")}
    if arm == "UVB":
        for lamp in ("dlamp", "qlamp"):
            out[lamp] = (outdir / f"master_flat_{name}_{lamp}.fits",
                         outdir / f"order_tab_{name}_{lamp}.fits")
    return out


@dataclasses.dataclass
class Product:
    flux: np.ndarray
    qual: np.ndarray
    errs: np.ndarray
    header: fits.Header
    table: OrderTable

    @classmethod
    def read(cls, image: Path, table: Path) -> Product:
        with fits.open(image, memmap=False) as hdul:
            return cls(hdul["FLUX"].data.astype(np.float32), hdul["QUAL"].data.astype(np.uint8),
                       hdul["ERRS"].data.astype(np.float32), hdul[0].header.copy(),
                       read_order_table(table))


class _BackgroundSpy:
    """Keeps what soxs_mflat's background step saw and returned (the product does not hold
    the model): the stacked master (FLUX), its order mask and the fitted model, per call
    (UVB: D2 then QTH).  The recipe runs in this process, and masterflat calls
    ``background.fit_background`` through the module, so wrapping it there sees every call
    and changes nothing."""

    def __enter__(self) -> _BackgroundSpy:
        self.calls: list[dict[str, np.ndarray]] = []
        self.original = background.fit_background

        def spy(flux, qual, in_order, *args, **kwargs):
            model = self.original(flux, qual, in_order, *args, **kwargs)
            self.calls.append(dict(flux=np.array(flux, np.float32), in_order=in_order.copy(),
                                   model=np.array(model.model, np.float32)))
            return model

        background.fit_background = spy
        return self

    def __exit__(self, *exc) -> None:
        background.fit_background = self.original


class Night:
    """One simulated night, reduced with and without its ORDER_TAB, and its truth."""

    def __init__(self, name: str, root: Path, reduce: bool = True) -> None:
        arm_code, binning, orders = SETUPS[name]
        self.name, self.orders = name, list(orders)
        self.fmt = load_format(arm_code)
        self.arm = self.fmt.arm
        self.binx, self.biny = (int(v) for v in binning.split("x"))
        # along / across binning of the (rows, cols) image
        self.bin_along, self.bin_across = ((self.biny, self.binx) if self.fmt.dispersion_axis
                                           == "y" else (self.binx, self.biny))
        self.lamps = ["D2", "QTH"] if self.arm.name == "UVB" else ["QTH"]
        self.outdirs = {"ordertab": reduction_dir(root, "soxs_mflat"),
                        "selftrace": root / "reduced" / "soxs_mflat_selftrace"}
        if reduce:  # (False: look at a night reduced before, when developing)
            self._reduce(root, arm_code, binning, orders)
        self._read_truth(root)
        self._products: dict[tuple[str, str], Product] = {}

    def _reduce(self, root: Path, arm_code: str, binning: str, orders) -> None:
        t0 = time.perf_counter()
        res = simulate_night(root, arm_code, binning, n_bias=3, n_dark=0, n_flat=5,
                             n_science=0, n_std=0, orders=orders, write_models=True)
        t1 = time.perf_counter()
        name = self.name
        if "bias" in res.sofs:
            assert run(["--output-dir", str(reduction_dir(root, "soxs_mbias")), "soxs_mbias",
                        str(res.sofs["bias"])]) == 0
        flat_sof = res.sofs["flat"]
        lines = flat_sof.read_text().splitlines()
        self_sof = root / "flat_selftrace.sof"
        self_sof.write_text("\n".join(ln for ln in lines if not ln.split()[-1].startswith(
            "ORDER_TAB")) + "\n")
        for mode, sof in (("ordertab", flat_sof), ("selftrace", self_sof)):
            with _BackgroundSpy() as spy:
                status = run(["--output-dir", str(self.outdirs[mode]), "soxs_mflat",
                              str(sof)])
            assert status == 0, (name, mode, status)
            if mode == "ordertab":
                self.backgrounds = dict(zip(self.lamps, spy.calls))
        TIMES[name] = time.perf_counter() - t0
        TIMES[name + " (simulation)"] = t1 - t0

    def _read_truth(self, root: Path) -> None:
        truth = root / "truth"
        with fits.open(truth / "detector_truth.fits", memmap=False) as hdul:
            self.sensitivity = hdul["SENSITIVITY"].data.astype(np.float32)
            self.low_sens = hdul["LOW_SENS"].data.astype(bool)
            self.defects = (hdul["HOT"].data.astype(bool) | hdul["COLD"].data.astype(bool)
                            | hdul["STATIC_BAD"].data.astype(bool))
        self.light, self.scattered = {}, {}
        for lamp in self.lamps:
            scat = fits.getdata(truth / f"scattered_light_{lamp.lower()}.fits").astype(
                np.float32)
            model = fits.getdata(truth / f"model_lamp_{lamp.lower()}.fits", "LAMP").astype(
                np.float32)
            self.light[lamp] = model - scat
            self.scattered[lamp] = scat
        self.edges = fits.getdata(truth / f"order_edges_truth_{self.arm.name.lower()}.fits",
                                  "ORDER_EDGES")
        self.frames = fits.getdata(truth / "frames.fits", "FRAMES")
        self.truth_labels = self._truth_labels()

    def _truth_labels(self) -> np.ndarray:
        """int16 image: the order number of each binned pixel whose centre lies between the
        true edges of an order (``order_edges_truth``, interpolated to the binned rows)."""
        shape = self.along(self.sensitivity).shape
        out = np.zeros(shape, np.int16)
        a = to_unbinned(np.arange(shape[1]), self.bin_across)
        for order in self.orders:
            rows = self.edges["order"] == order
            b = self.edges["b"][rows].astype(float)
            ib = np.arange(int(np.ceil(to_binned(b.min(), self.bin_along))),
                           int(np.floor(to_binned(b.max(), self.bin_along))) + 1)
            bc = to_unbinned(ib, self.bin_along)
            lo = np.interp(bc, b, self.edges["a_low"][rows])
            up = np.interp(bc, b, self.edges["a_up"][rows])
            inside = (a[None, :] >= lo[:, None]) & (a[None, :] <= up[:, None])
            out[ib] = np.where(inside, np.int16(order), out[ib])
        return out if self.fmt.dispersion_axis == "y" else out.T

    # -------------------------------------------------------------------- products
    def product(self, mode: str = "ordertab", lamp: str = "") -> Product:
        key = (mode, lamp)
        if key not in self._products:
            image, table = _products(self.outdirs[mode], self.arm.name)[lamp]
            self._products[key] = Product.read(image, table)
        return self._products[key]

    def product_lamps(self) -> list[str]:
        return ["", "dlamp", "qlamp"] if self.arm.name == "UVB" else [""]

    # -------------------------------------------------------------------- truth helpers
    def along(self, image: np.ndarray) -> np.ndarray:
        """``image`` as (along-order, across-order)."""
        return image if self.fmt.dispersion_axis == "y" else image.T

    def centre_light(self, light: np.ndarray, order: int, b: np.ndarray) -> np.ndarray:
        """True light at the order centre at unbinned along-order positions ``b``."""
        img = self.along(light)
        ib = np.clip(np.rint(to_binned(b, self.bin_along)).astype(int), 0, img.shape[0] - 1)
        ia = np.clip(np.rint(to_binned(self.fmt.centre(order, b), self.bin_across)
                             ).astype(int), 0, img.shape[1] - 1)
        return img[ib, ia]

    def order_lamp(self, order: int) -> str:
        """The lamp that gives an order the most light (truth; QTH outside the UVB)."""
        if self.arm.name != "UVB":
            return "QTH"
        rows = self.edges["order"] == order
        b = self.edges["b"][rows]
        d = np.median(self.centre_light(self.light["D2"], order, b))
        q = np.median(self.centre_light(self.light["QTH"], order, b))
        return "D2" if d > q else "QTH"

    def usable(self, order: int, lamp: str | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray, np.ndarray]:
        """``b, a_low, a_up, usable`` of one order's truth rows (see the module docstring)."""
        rows = self.edges["order"] == order
        b = self.edges["b"][rows].astype(float)
        lo, up = self.edges["a_low"][rows], self.edges["a_up"][rows]
        light = self.centre_light(self.light[lamp or self.order_lamp(order)], order, b)
        ok = self.edges["inside"][rows].astype(bool) & (light >= USABLE_LIGHT * light.max())
        return b, lo, up, ok

    def expected(self, lamp: str, product: Product) -> np.ndarray:
        """Unnormalised expectation ``L s`` of a product (UVB stitched: per order's lamp)."""
        return self.combined(self.light, lamp, product) * self.sensitivity

    def combined(self, images: dict[str, np.ndarray], lamp: str, product: Product
                 ) -> np.ndarray:
        """The truth image (order light or scattered light) of a product's lamp; for the
        UVB stitched master, the D2 one times the true QTH / D2 light ratio in the
        stitching window of the product's crossover order where the product takes D2, the
        QTH one elsewhere."""
        if lamp == "dlamp":
            return images["D2"]
        if lamp == "qlamp" or self.arm.name != "UVB":
            return images["QTH"]
        order = self.product_crossover(product)
        assert product.header["ESO QC STITCH ORDER"] == order
        win = self.window(product)
        scale = float(np.median(self.light["QTH"][win]) / np.median(self.light["D2"][win]))
        labels = product.table.order_label_image(product.flux.shape, self.binx, self.biny)
        return np.where(labels >= order, images["D2"] * np.float32(scale), images["QTH"])

    def product_crossover(self, product: Product) -> int:
        """The crossover order the stitched product used: the reddest order whose FLUX is
        proportional to the D2 product's."""
        mode = next(m for (m, _), p in self._products.items() if p is product)
        d_orders = [n for n, lamp in self.sources(mode).items() if lamp == "dlamp"]
        assert d_orders, "no order of the stitched master comes from the D2 master"
        return min(d_orders)

    def sources(self, mode: str) -> dict[int, str]:
        """Order -> the UVB per-lamp product (``dlamp``/``qlamp``) whose FLUX the stitched
        master's is, up to one factor, on 99.9 % of the order's good pixels inside both
        products' edges (their edges may differ by a pixel somewhere)."""
        s = self.product(mode, "")
        labels = s.table.order_label_image(s.flux.shape, self.binx, self.biny)
        out = {}
        for lamp in ("dlamp", "qlamp"):
            p = self.product(mode, lamp)
            inside = p.table.in_order_mask(p.flux.shape, self.binx, self.biny)
            for n in s.table.orders:
                sel = (labels == n) & inside & (s.qual == 0) & (p.qual == 0)
                r = s.flux[sel] / p.flux[sel]
                if sel.sum() and np.mean(np.abs(r / np.median(r) - 1) < 1e-5) >= 0.999:
                    out[int(n)] = lamp
        return out

    def window(self, product: Product) -> np.ndarray:
        """The stitched product's window: a square of centre-order-window (20) unbinned px
        centred where its header says (``QC STITCH WIN X/Y``), binned pixels.  (The QTH / D2
        ratio changes along an order by 0.05 % per pixel: the truth must be taken where the
        product took its scale; :func:`test_stitch_window_at_the_centre_of_the_order` checks
        that this is the centre of the crossover order.)"""
        x, y = product.header["ESO QC STITCH WIN X"], product.header["ESO QC STITCH WIN Y"]
        b, a = (y, x) if self.fmt.dispersion_axis == "y" else (x, y)
        img = np.zeros(self.along(self.sensitivity).shape, bool)
        ib, ia = to_binned(b, self.bin_along), to_binned(a, self.bin_across)
        hb, ha = 10.0 / self.bin_along, 10.0 / self.bin_across
        img[int(np.ceil(ib - hb)):int(np.floor(ib + hb)) + 1,
            int(np.ceil(ia - ha)):int(np.floor(ia + ha)) + 1] = True
        return img if self.fmt.dispersion_axis == "y" else img.T


@pytest.fixture(scope="module", params=list(SETUPS))
def night(request, tmp_path_factory):
    n = Night(request.param, tmp_path_factory.mktemp(request.param))
    yield n
    sim = TIMES[request.param + " (simulation)"]
    print(f"\n{request.param}: simulation + soxs_mbias + 2 x soxs_mflat "
          f"{TIMES[request.param]:.1f} s (simulation {sim:.1f} s)")


# ------------------------------------------------------------------------------- measures
def edge_errors(n: Night, table: OrderTable, lamp: str | None = None) -> dict[int, dict]:
    """Per true order: rms and max |fitted - true| of both edges over the usable length,
    and how much of the usable length the product's along-order range covers."""
    out = {}
    for order in n.orders:
        b, lo, up, ok = n.usable(order, lamp)
        if order not in table.orders.tolist() or not ok.any():
            out[order] = None
            continue
        bu = b[ok]
        d = np.concatenate([table.edge_low(float(order), bu) - lo[ok],
                            table.edge_up(float(order), bu) - up[ok]])
        b0, b1 = table.along_range(order)
        out[order] = dict(rms=float(np.sqrt(np.mean(d ** 2))), max=float(np.max(np.abs(d))),
                          covered=bool(b0 <= bu.min() + RANGE_SLACK
                                       and b1 >= bu.max() - RANGE_SLACK),
                          range=(b0, b1), usable=(float(bu.min()), float(bu.max())))
    return out


def pulls(n: Night, p: Product, lamp: str, errs_factor: float = 1.0) -> dict:
    """Pulls (FLUX - E) / ERRS of the well-lit good in-order pixels (module docstring)."""
    light = n.combined(n.light, lamp, p)
    expected = light * n.sensitivity
    in_order = p.table.in_order_mask(p.flux.shape, n.binx, n.biny)
    good = in_order & (p.qual == 0)
    k = float(np.mean(expected[good], dtype=np.float64))
    lit = light >= PULL_LIGHT * np.percentile(light[in_order], 99)
    sel = good & lit & ~n.defects & ~n.low_sens & (p.errs > 0)
    pull = (p.flux[sel] - expected[sel] / k) / (p.errs[sel] * errs_factor)
    return dict(std=float(np.std(pull)), mean=float(np.mean(pull)), n=int(sel.sum()),
                k=k, pull=pull, sel=sel)


def low_sens_rates(n: Night, p: Product, lamp: str = "") -> tuple[float, float, int, int]:
    """Recall of the injected low-sensitivity pixels and false-flag rate on normal pixels.

    Both over the product's in-order pixels that the truth lights: to :data:`LIT_LOW_SENS`
    of the flat level for the injected ones (where the simulator puts them, from either lamp;
    a per-lamp UVB product is judged where its own lamp does), to 1 % for the normal ones.
    A pixel between the product's edges that no lamp lights (beyond the wavelength end of an
    order, when a self-traced range overshoots it) has no response to measure: flagging it is
    no false flag of a normal pixel.
    """
    in_order = p.table.in_order_mask(p.flux.shape, n.binx, n.biny)
    flagged = (p.qual & LOW_SENS) != 0
    lamps = {"dlamp": ["D2"], "qlamp": ["QTH"]}.get(lamp, n.lamps)
    lit = np.zeros(p.flux.shape, bool)
    faint = np.zeros(p.flux.shape, bool)
    for name in lamps:
        light = n.light[name]
        top = np.percentile(light[in_order], 99.5)
        lit |= light >= LIT_LOW_SENS * top
        faint |= light >= 0.01 * top
    injected = n.low_sens & in_order & lit
    normal = in_order & faint & ~n.low_sens & ~n.defects
    recall = float(np.count_nonzero(flagged & injected) / max(injected.sum(), 1))
    false = float(np.count_nonzero(flagged & normal) / normal.sum())
    return recall, false, int(injected.sum()), int(np.count_nonzero(flagged & normal))


def pedestal(n: Night, lamp: str) -> float:
    """The uniform level (e-) the calibrated flats of ``lamp`` keep: their mean bias offset
    (``truth/frames.fits``) minus that of the frames subtracted from them (the biases of the
    master bias; the NIR lamp-off frames).  It is real signal of the stacked frame, not order
    light, so the background model takes it along with the scattered light."""
    kind = np.char.strip(np.asarray(n.frames["frame_type"]).astype(str))
    lamps = np.char.strip(np.asarray(n.frames["lamp"]).astype(str))
    offset = np.asarray(n.frames["bias_offset"], float)
    on = (lamps == lamp) & ~np.isin(kind, ("BIAS", "DARK", "FLAT_OFF"))
    off = kind == ("FLAT_OFF" if n.arm.name == "NIR" else "BIAS")
    assert on.any() and off.any(), (n.name, lamp, sorted(set(kind)))
    return float(offset[on].mean() - offset[off].mean())


def background_errors(n: Night, lamp: str, extra: float = 0.0) -> list[dict]:
    """The recipe's scattered-light model against the truth, per order and segment.

    The stacked master the model was fitted to is ``c ((L + S) s + P)``; ``c`` is its median
    ratio to ``(L + S) s`` over the brightly lit in-order pixels (no model involved; ``P`` is
    far below ``L`` there) and ``P`` the pedestal of :func:`pedestal`, so the model should be
    ``c (S + P)`` (its fit is smooth, ``s`` averages to 1).  Per along-order segment of the
    usable length of each order (its pixels between the true edges, rows where the lamp
    lights the order centre to :data:`USABLE_LIGHT` of its brightest point: beyond, the
    scattered light of a few e- per pixel is at the level of the noise and of the pedestal's
    own uncertainty), ``(mean model - mean c (S + P)) / mean c (S + P)`` is the fraction of
    the scattered light the model gets wrong.  ``extra`` scales the model by ``1 + extra``
    first (break-to-verify)."""
    call = n.backgrounds[lamp]
    light, scat = n.light[lamp], n.scattered[lamp]
    total = (light + scat) * n.sensitivity
    truth_in = n.truth_labels > 0
    bright = truth_in & (light >= 0.3 * np.percentile(light[truth_in], 99)) & ~n.defects
    c = float(np.median(call["flux"][bright] / total[bright]))
    model = call["model"] * np.float32(1.0 + extra)
    expected = np.float32(c) * (scat + np.float32(pedestal(n, lamp)))
    lab_t, m_t, s_t = (n.along(v) for v in (n.truth_labels, model, expected))
    seg = max(SEGMENT // n.bin_along, 8)
    out = []
    for order in n.orders:
        b, _, _, ok = n.usable(order, lamp)
        b0, b1 = to_binned(b[ok].min(), n.bin_along), to_binned(b[ok].max(), n.bin_along)
        rows = np.flatnonzero((lab_t == order).any(axis=1))
        rows = rows[(rows >= b0) & (rows <= b1)]
        count = max(int(round(rows.size / seg)), 1)
        for chunk in np.array_split(rows, count):
            sel = lab_t[chunk] == order
            want = float(np.mean(s_t[chunk][sel], dtype=np.float64))
            got = float(np.mean(m_t[chunk][sel], dtype=np.float64))
            out.append(dict(order=int(order), start=int(chunk[0]) * n.bin_along,
                            frac=(got - want) / want))
    return out


#: (test, set-up[, mode]) -> why the product fails it today.  Marked strict xfail, so a fix
#: shows as XPASS and the entry must go; the tests themselves are not weakened.
KNOWN_FAILURES: dict[tuple[str, ...], str] = {}


def known_failure(request, *key: str) -> None:
    """Mark this test strict-xfail when ``(test name, *key)`` is a known product failure."""
    reason = KNOWN_FAILURES.get((request.node.originalname, *key))
    if reason:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
def test_every_order_found_and_numbered(request, night, mode):
    """The product tables hold exactly the simulated orders (all on the detector), with the
    simulated numbers -- with the input ORDER_TAB and self-traced."""
    known_failure(request, night.name, mode)
    for lamp in night.product_lamps():
        table = night.product(mode, lamp).table
        assert sorted(table.orders.tolist()) == sorted(night.orders), (night.name, mode, lamp)
        assert table.has_edges


@pytest.mark.parametrize("mode", MODES)
def test_edges_match_truth(request, night, mode):
    """Fitted lower and upper edges within 0.1 px rms and 0.5 px max of the true slit ends
    over the usable length of every order, and the table's range covers that length."""
    known_failure(request, night.name, mode)
    for lamp in night.product_lamps():
        table = night.product(mode, lamp).table
        only = {"dlamp": "D2", "qlamp": "QTH"}.get(lamp)
        errs = edge_errors(night, table, only)
        for order, e in errs.items():
            assert e is not None, (night.name, mode, lamp, order)
            where = (night.name, mode, lamp or "final", order, e)
            assert e["rms"] <= EDGE_RMS, where
            assert e["max"] <= EDGE_MAX, where
            assert e["covered"], where


@pytest.mark.parametrize("mode", MODES)
def test_x_res_sd_in_seed_range(night, mode):
    """QC X RES SD within the seed page's range for the arm."""
    for lamp in night.product_lamps():
        sd = night.product(mode, lamp).header["ESO QC X RES SD"]
        assert 0.0 <= sd <= X_RES_SD[night.arm.name], (night.name, mode, lamp, sd)


def test_flat_matches_truth_within_errs(request, night):
    """Inside the orders the master flat is L x sensitivity / K (module docstring) to within
    its own ERRS: pull std 0.9-1.1 and no mean offset beyond 0.1 sigma."""
    known_failure(request, night.name)
    for lamp in night.product_lamps():
        p = night.product("ordertab", lamp)
        r = pulls(night, p, lamp)
        assert r["n"] > 20_000, (night.name, lamp, r["n"])
        assert 0.9 <= r["std"] <= 1.1, (night.name, lamp or "final", r["std"], r["mean"])
        assert abs(r["mean"]) <= 0.1, (night.name, lamp or "final", r["std"], r["mean"])


@pytest.mark.parametrize("mode", MODES)
def test_stitch_window_at_the_centre_of_the_order(night, mode):
    """UVB: the window where the D2 master is scaled to the QTH one is centred on the
    crossover order's true centre line, at the middle of its true extent on the detector
    (to 1 % of that extent along the order and 1 px across)."""
    if night.arm.name != "UVB":
        pytest.skip("only the UVB stitches two lamps")
    p = night.product(mode, "")
    order = p.header["ESO QC STITCH ORDER"]
    x, y = p.header["ESO QC STITCH WIN X"], p.header["ESO QC STITCH WIN Y"]
    b, a = (y, x) if night.fmt.dispersion_axis == "y" else (x, y)
    rows = night.edges["order"] == order
    on_detector = night.edges["b"][rows][night.edges["inside"][rows].astype(bool)]
    b0, b1 = float(on_detector.min()), float(on_detector.max())
    assert abs(b - 0.5 * (b0 + b1)) <= 0.01 * (b1 - b0), (mode, order, b, b0, b1)
    assert abs(a - float(night.fmt.centre(order, b))) <= 1.0, (mode, order, a)


def test_self_traced_flat_matches_truth_within_errs(request, night):
    """The same for the self-traced run (its normalisation uses its own edges)."""
    known_failure(request, night.name)
    p = night.product("selftrace", "")
    r = pulls(night, p, "")
    assert 0.9 <= r["std"] <= 1.1 and abs(r["mean"]) <= 0.1, (night.name, r["std"],
                                                              r["mean"])


@pytest.mark.parametrize("mode", MODES)
def test_low_sensitivity_pixels_recovered(night, mode):
    """Recall >= 99 % of the injected low-sensitivity pixels (QUAL bit 128), false flags
    <= 1e-4 of the normal in-order pixels."""
    for lamp in night.product_lamps():
        recall, false, n_inj, n_false = low_sens_rates(night, night.product(mode, lamp),
                                                       lamp)
        where = (night.name, mode, lamp or "final")
        assert n_inj >= 50, (*where, n_inj)
        assert recall >= 0.99, (*where, recall, n_inj)
        assert false <= 1e-4, (*where, false, n_false)


def test_scattered_light_model_matches_truth(request, night):
    """The background model soxs_mflat subtracts recovers the simulator's scattered light
    (and the flats' pedestal) to within 10 % in every along-order segment of the usable
    length of every order (per lamp on the UVB; :func:`background_errors`)."""
    known_failure(request, night.name)
    for lamp in night.lamps:
        res = background_errors(night, lamp)
        assert len(res) >= 3 * len(night.orders)
        bad = [(r["order"], r["start"], round(r["frac"], 3)) for r in res
               if abs(r["frac"]) > SCATTER_TOL]
        assert not bad, (night.name, lamp, len(bad), len(res), bad)


# ------------------------------------------------------------------------------- UVB
@pytest.mark.parametrize("night", ["xsh_uvb"], indirect=True)
def test_uvb_products_and_provenance(night):
    """D2, QTH and stitched products exist with the seed's PRO CATG/TYPE/TECH, and each
    per-lamp product lists only its lamp's raw frames (PRO REC1 RAWi NAME) and names its
    lamp (PRO FLAT LAMP); the stitched one lists both and names none."""
    frames = night.frames
    names = {lamp: sorted(Path(f).name for f, t in zip(frames["file"], frames["frame_type"])
                          if t == kind) for lamp, kind in (("dlamp", "DFLAT"),
                                                           ("qlamp", "QFLAT"))}
    names[""] = sorted(names["dlamp"] + names["qlamp"])
    for mode in MODES:
        for lamp, (image, table) in _products(night.outdirs[mode], "UVB").items():
            for path, catg, tech in ((image, "MASTER_FLAT_UVB", "IMAGE"),
                                     (table, "ORDER_TAB_UVB", "ECHELLE,SLIT")):
                h = fits.getheader(path)
                assert (h["ESO PRO CATG"], h["ESO PRO TYPE"], h["ESO PRO TECH"]) == (
                    catg, "REDUCED", tech), (path, lamp)
                raws = sorted(v for k, v in h.items()
                              if k.startswith("ESO PRO REC1 RAW") and k.endswith("NAME"))
                assert raws == names[lamp], (path, raws)
                # what tells a per-lamp product from the stitched one of its PRO CATG
                assert h.get("ESO PRO FLAT LAMP") == {"dlamp": "D2", "qlamp": "QTH"}.get(
                    lamp), (path, lamp)


@pytest.mark.parametrize("night", ["xsh_uvb"], indirect=True)
def test_uvb_stitched_orders_from_the_right_lamp(night):
    """Each order of the stitched master comes from the lamp that lights it best (truth),
    unchanged but for one scale per lamp; orders where the two lamps' light is within a
    factor AMBIGUOUS of each other may come from either, the D2 orders being the bluest."""
    ambiguous = 1.5
    for mode in MODES:
        source = night.sources(mode)
        assert sorted(source) == sorted(night.orders), (mode, source)
        d_orders = [n for n, lamp in source.items() if lamp == "dlamp"]
        assert d_orders and all(n >= min(d_orders) for n in source if source[n] == "dlamp")
        assert all(n < min(d_orders) for n in source if source[n] == "qlamp"), source
        for n, lamp in source.items():
            rows = night.edges["order"] == n
            b = night.edges["b"][rows]
            d = np.median(night.centre_light(night.light["D2"], n, b))
            q = np.median(night.centre_light(night.light["QTH"], n, b))
            if max(d, q) > ambiguous * min(d, q):
                want = "dlamp" if d > q else "qlamp"
                assert lamp == want, (mode, n, lamp, want, d, q)


# ------------------------------------------------------------------------------- breaks
def _shifted(table: OrderTable, shift: float) -> OrderTable:
    def move(poly: OrderPolynomial) -> OrderPolynomial:
        c = np.array(poly.coeffs, float)
        c[0, 0] += shift
        return OrderPolynomial(c)
    return dataclasses.replace(table, edge_up=move(table.edge_up),
                               edge_low=move(table.edge_low))


@pytest.mark.parametrize("night", ["xsh_vis"], indirect=True)
def test_checks_can_fail(night):
    """Break-to-verify, kept as a test: each check above fails on a product copy broken by
    a little more than its tolerance -- edges shifted by 0.3 px, ERRS doubled, LOW_SENS
    cleared, the scattered-light model scaled by 1.2 and 0.8."""
    p = night.product("ordertab", "")
    worst = max(e["max"] for e in edge_errors(night, _shifted(p.table, 0.3)).values())
    rms = min(e["rms"] for e in edge_errors(night, _shifted(p.table, 0.3)).values())
    assert rms > EDGE_RMS and worst > 0.3 - EDGE_RMS
    assert pulls(night, p, "", errs_factor=2.0)["std"] < 0.9
    cleared = dataclasses.replace(p, qual=p.qual & np.uint8(0xFF ^ int(LOW_SENS)))
    assert low_sens_rates(night, cleared)[0] < 0.99
    # the scattered-light model 20 % too high or too low fails in (nearly) every segment
    for extra in (0.2, -0.2):
        res = background_errors(night, "QTH", extra)
        failing = sum(abs(r["frac"]) > SCATTER_TOL for r in res)
        assert failing >= 0.9 * len(res), (extra, failing, len(res))
