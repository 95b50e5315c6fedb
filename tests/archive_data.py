"""Simulated data shared by the soxs_archive tests: made once per test session.

- :func:`small_archive`: two X-shooter VIS nights with the mess of real archives
  (:func:`soxs_core.simulate.archive.simulate_archive`) and its truth manifest;
- :func:`hand_night`: one night written by the night simulator with its own SOFs
  (``bias.sof``, ``dark.sof``, ``flat.sof``, ``std.sof``, ``stare.sof``).
"""

from __future__ import annotations

from pathlib import Path

from soxs_core.simulate.archive import ArchiveTruth, simulate_archive
from soxs_core.simulate.night import simulate_night

_made: dict[str, object] = {}


def small_archive(tmp_path_factory) -> ArchiveTruth:
    """The two-night VIS archive (one illuminated order, a few frames per type)."""
    if "archive" not in _made:
        outdir = tmp_path_factory.mktemp("archive") / "archive"
        _made["archive"] = simulate_archive(outdir, nights=2, arms=("xsh_vis",))
    return _made["archive"]


def hand_night(tmp_path_factory) -> Path:
    """A small X-shooter VIS night and its hand SOFs (orders 20 and 21)."""
    if "night" not in _made:
        outdir = tmp_path_factory.mktemp("night") / "night"
        simulate_night(outdir, "xsh_vis", n_bias=3, n_dark=3, n_flat=5, orders=[20, 21])
        _made["night"] = outdir
    return _made["night"]
