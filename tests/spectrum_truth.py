"""Extracted-orders tables built from the simulator's truth, for the merging and flux
calibration tests (tests/test_merge.py, tests/test_fluxcal.py).

The extraction is not run: each order row gets the true object counts of the simulator
(``object_truth_table``) with Poisson noise of object + sky under a 10-pixel window and read
noise, and the model variance an optimal extraction reports.  ``flat=True`` divides each
order by a smooth function of its true blaze (what flat-fielding does); ``flat="blaze"`` by
the blaze itself, so that orders agree where they overlap.
"""

from __future__ import annotations

import functools

import numpy as np
from astropy.table import Table

from soxs_core.simulate.instrument import InstrumentSimulator, SceneParameters
from soxs_core.simulate.spectra import blaze

#: Pixels of the window the sky and read noise come from.
WINDOW_PX = 10
#: Binning used per arm (binned X-shooter UVB/VIS: half the rows, same physics).
BINNING = {"xsh_uvb": "1x2", "xsh_vis": "1x2", "xsh_nir": "1x1", "soxs_vis": "1x1",
           "soxs_nir": "1x1"}
ARM_META = {"xsh_uvb": ("UVB", "XSHOOTER"), "xsh_vis": ("VIS", "XSHOOTER"),
            "xsh_nir": ("NIR", "XSHOOTER"), "soxs_vis": ("VIS", "SOXS"),
            "soxs_nir": ("NIR", "SOXS")}


@functools.cache
def simulator(arm: str, orders: tuple[int, ...] | None = None, airmass: float = 1.2,
              standard: str = "GD71") -> InstrumentSimulator:
    scene = SceneParameters(airmass=airmass, standard=standard)
    return InstrumentSimulator(arm, BINNING[arm], orders=None if orders is None else
                               list(orders), scene=scene)


@functools.cache
def _truth(arm: str, kind: str, exptime: float, orders, airmass: float, standard: str):
    sim = simulator(arm, orders, airmass, standard)
    return sim, sim.object_truth_table(kind, exptime).data


def truth_orders_table(arm: str, kind: str = "STD_FLUX", exptime: float = 300.0,
                       seed: int | None = 1, flat: bool | str = False, orders=None,
                       airmass: float = 1.2, standard: str = "GD71"
                       ) -> tuple[Table, dict[str, np.ndarray]]:
    """``(extracted-orders table, truth)``; ``seed=None``: no noise.

    ``truth`` holds per row ``counts`` (true e- after the flat factor), ``flux`` (true F_λ),
    ``factor`` (the flat factor) and ``blaze``.
    """
    orders = None if orders is None else tuple(orders)
    sim, d = _truth(arm, kind, float(exptime), orders, float(airmass), standard)
    order = np.asarray(d["order"], int)
    wave = np.asarray(d["wavelength"], float)
    counts = np.asarray(d["counts"], float)
    sky = np.asarray(d["sky_per_pixel"], float) * WINDOW_PX
    ron2 = WINDOW_PX * sim.detector.read_noise ** 2
    bl = np.ones_like(wave)
    for n in np.unique(order):
        s = order == n
        bl[s] = blaze(sim.format, int(n), wave[s])
    # a smooth stand-in for the master flat: the blaze (plus a floor, as a lamp flat's
    # light never vanishes at the order ends), normalised to about 1 at the peak;
    # flat="blaze": divided by the blaze itself (orders then agree where they overlap)
    if flat == "blaze":
        factor = 1.0 / bl
    else:
        factor = 1.05 / (bl + 0.05) if flat else np.ones_like(wave)
    var = counts + sky + ron2
    if seed is None:
        measured = counts.copy()
    else:
        rng = np.random.default_rng(seed)
        measured = (rng.poisson(counts + sky) - sky
                    + rng.normal(0.0, np.sqrt(ron2), counts.size))
    along = "xcoord" if arm == "soxs_nir" else "ycoord"
    across = "ycoord_centre" if arm == "soxs_nir" else "xcoord_centre"
    t = Table()
    t["order"] = order
    t[across] = np.asarray(d["centre"], float)
    t[along] = np.asarray(d["pixel"], int)
    t["wavelengthMean"] = wave
    t["pixelScaleNm"] = np.asarray(d["dispersion"], float)
    t["varianceSpectrum"] = var * factor**2
    t["snr"] = measured / np.sqrt(var)
    t["extractedFluxOptimal"] = measured * factor
    t["extractedFluxBoxcar"] = measured * factor
    t["extractedFluxBoxcarRobust"] = measured * factor
    t["skyFlux"] = sky * factor
    t["varianceBoxcar"] = var * factor**2
    t["nRejected"] = np.zeros(len(t), np.int16)
    t["qual"] = np.zeros(len(t), np.uint8)
    arm_name, instrument = ARM_META[arm]
    t.meta.update(EXPTIME=float(exptime), AIRMASS=float(airmass), ARM=arm_name,
                  INSTRUME=instrument,
                  OBJECT=standard if kind == "STD_FLUX" else "SIM-STAR")
    truth = dict(counts=counts * factor, flux=np.asarray(d["flux"], float), factor=factor,
                 blaze=bl, variance=var * factor**2)
    return t, truth
