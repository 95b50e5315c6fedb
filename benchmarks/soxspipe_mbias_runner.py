"""Run soxspipe 0.17.4's soxs_mbias on a directory of X-shooter raw bias frames.

Executed by the Python of a separate virtual environment holding soxspipe 0.17.4 and six
(``python -m venv V && V/bin/pip install soxspipe==0.17.4 six``), never imported by soxs:

    V/bin/python soxspipe_mbias_runner.py RAW_DIR WORKDIR

soxspipe 0.17.4 needs an SOF named ``<YYYYMMDDTHHMMSS>_..._MBIAS.sof`` (it takes the night
from the name), its default and advanced settings merged, a logger with a PRINT level, and a
working directory it may write ``sessions/`` into.
"""

import glob
import logging
import os
import sys

import yaml
from astropy.io import fits


def main() -> None:
    raw_dir, workdir = (os.path.abspath(a) for a in sys.argv[1:3])
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    frames = sorted(glob.glob(os.path.join(raw_dir, "*.fits")))
    stamp = fits.getheader(frames[0])["DATE-OBS"][:19].replace("-", "").replace(":", "")
    sof = os.path.join(workdir, f"{stamp}_VIS_MBIAS.sof")
    with open(sof, "w") as fh:
        fh.writelines(f"{p} BIAS_VIS\n" for p in frames)

    import soxspipe
    from fundamentals.logs import addLoggingLevel

    addLoggingLevel("PRINT", logging.INFO + 5)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    package = os.path.dirname(soxspipe.__file__)
    settings = {}
    for name in ("advanced_settings.yaml", "xsh_default_settings.yaml"):
        with open(os.path.join(package, name)) as fh:
            settings.update(yaml.safe_load(fh))
    settings["workspace-root-dir"] = workdir
    from soxspipe.recipes import soxs_mbias

    soxs_mbias(log=logging.getLogger("soxspipe"), settings=settings, inputFrames=sof,
               overwrite=True).produce_product()


if __name__ == "__main__":
    main()
