"""Run soxspipe 0.17.4's soxs_mflat through its Python API on an SOF of ours.

Executed by the Python of a separate virtual environment holding soxspipe 0.17.4 and six
(``python -m venv V && V/bin/pip install soxspipe==0.17.4 six``), never imported by soxs:

    V/bin/python soxspipe_mflat_runner.py SOF WORKDIR

What soxspipe 0.17.4 needs, and why its stock command line (``soxspipe mflat SOF``) does not
get there on X-shooter flats:

* a settings file: without ``-s`` and outside a workspace prepared by ``soxspipe prep`` the
  command line looks for a ``default_settings.yaml`` that the package does not ship (it ships
  ``xsh_default_settings.yaml`` and ``soxs_default_settings.yaml``) and stops; ``soxspipe
  prep`` itself needs Python >= 3.12 (``sqlite3.connect(autocommit=...)``) and, for
  X-shooter, writes only bias SOFs (0.17.4's ``xsh_sof_map.yaml`` has every other step
  commented out).  Here the package's X-shooter (or SOXS) defaults are merged with its
  advanced settings, as ``soxspipe prep`` would write them;
* an SOF named ``<YYYYMMDDTHHMMSS>_..._MFLAT.sof`` (the night is taken from the name): the
  frames are copied into one, lines ``path TAG``;
* CDELT1/CDELT2 on every image it is given: its input check reads the binning from them on
  every frame but tables and stops with "'<' not supported between instances of 'str' and
  'float'" on a master bias that carries the binning in ``ESO DET WIN1 BINX/BINY`` only (ours
  before commit a5b0cfb); such a product is copied into WORKDIR with the two cards added;
* a logger with a PRINT level and a working directory for its ``reduced/``, ``qc/`` and
  ``tmp/`` trees.

The recipe is then ``soxs_mflat(log=..., settings=..., inputFrames=sof,
overwrite=True).produce_product()``, and that alone still crashes on every X-shooter SOF,
command line or API: ``soxs_mflat.calibrate_frame_set`` looks up the dome flats
(``domeflatCollection``) only in its SOXS branch but lists their files for every instrument,
so X-shooter input stops with ``UnboundLocalError: cannot access local variable
'domeflatCollection'``.  The work-around here (no soxspipe code is changed or copied): while
``calibrate_frame_set`` runs, a line tracer confined to that method gives the missing local an
empty collection (the recipe's own ``inputFrames.filter`` on a DPR TYPE no X-shooter frame
has) just before it is used, through ``PyFrame_LocalsToFast`` (CPython <= 3.12).  X-shooter
has no dome flats, so this is what the SOXS branch would have found.

The product paths are printed as one JSON line at the end (``..._OLOC.fits`` is the order
table with edges, ``..._MFLAT.fits`` the master flat).
"""

import glob
import json
import logging
import os
import sys

import yaml
from astropy.io import fits


def _give_xsh_an_empty_dome_flat_set(recipe_class) -> None:
    """Define ``domeflatCollection`` in ``calibrate_frame_set`` for X-shooter (module doc)."""
    import ctypes

    code = recipe_class.calibrate_frame_set.__code__
    missing = "domeflatCollection"

    def local_tracer(frame, event, arg):
        if event == "line" and missing not in frame.f_locals and \
                "qflatCollection" in frame.f_locals:
            recipe = frame.f_locals["self"]
            empty = recipe.inputFrames.filter(**{recipe.kw("DPR_TYPE"): "NO_SUCH_TYPE"})
            frame.f_locals[missing] = empty
            ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
        return local_tracer

    def tracer(frame, event, arg):
        return local_tracer if frame.f_code is code else None

    sys.settrace(tracer)


def _with_binning_cards(path: str, workdir: str) -> str:
    """A copy of an image product with CDELT1/CDELT2 from its binning keywords."""
    target = os.path.join(workdir, "binning_cards_" + os.path.basename(path))
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        for axis, card in (("X", "CDELT1"), ("Y", "CDELT2")):
            hdr[card] = float(hdr.get(f"ESO DET WIN1 BIN{axis}", hdr.get(f"ESO DET BIN{axis}", 1)))
        hdul.writeto(target, overwrite=True)
    return target


def main() -> None:
    sof_in, workdir = (os.path.abspath(a) for a in sys.argv[1:3])
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    base = os.path.dirname(sof_in)
    lines = []
    first = None
    instrument = "xsh"
    for line in open(sof_in):
        parts = line.split()
        if len(parts) < 2 or line.lstrip().startswith("#"):
            continue
        path = parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0])
        hdr = fits.getheader(path)
        if "ESO DPR TYPE" in hdr and "FLAT" in str(hdr["ESO DPR TYPE"]):
            if first is None or hdr["MJD-OBS"] < first[0]:
                first = (hdr["MJD-OBS"], hdr["DATE-OBS"], hdr["ESO SEQ ARM"].strip())
            instrument = "soxs" if "SOXS" in str(hdr.get("INSTRUME", "")).upper() else "xsh"
        if "ESO PRO CATG" in hdr and hdr.get("NAXIS", 0) and "CDELT1" not in hdr:
            path = _with_binning_cards(path, workdir)
        lines.append(f"{path} {parts[1]}\n")
    if first is None:
        sys.exit(f"{sof_in}: no raw flat in the SOF")
    stamp = first[1][:19].replace("-", "").replace(":", "")
    sof = os.path.join(workdir, f"{stamp}_{first[2]}_MFLAT.sof")
    with open(sof, "w") as fh:
        fh.writelines(lines)

    import soxspipe
    from fundamentals.logs import addLoggingLevel

    addLoggingLevel("PRINT", logging.INFO + 5)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    package = os.path.dirname(soxspipe.__file__)
    settings = {}
    for name in ("advanced_settings.yaml", f"{instrument}_default_settings.yaml"):
        with open(os.path.join(package, name)) as fh:
            settings.update(yaml.safe_load(fh))
    settings["workspace-root-dir"] = workdir
    from soxspipe.recipes import soxs_mflat

    if instrument == "xsh":
        _give_xsh_an_empty_dome_flat_set(soxs_mflat)
    recipe = soxs_mflat(log=logging.getLogger("soxspipe"), settings=settings, inputFrames=sof,
                        overwrite=True)
    recipe.produce_product()
    sys.settrace(None)
    # soxspipe writes reduced/<night>/soxs-mflat/<sof name>{.fits,_OLOC.fits,_BKGROUND.fits}
    paths = sorted(glob.glob(os.path.join(workdir, "reduced", "*", "soxs-mflat", "*.fits")))
    print(json.dumps({"products": paths}))


if __name__ == "__main__":
    main()
