"""soxs_core.io.safety.save_figure: a QC figure is written atomically and then let go."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from matplotlib.figure import Figure

from soxs_core.io.safety import save_figure


class _Pixels(np.ndarray):
    """An ndarray that can be weakly referenced (plain ones cannot)."""


def test_saved_figure_releases_its_data(tmp_path) -> None:
    gc.disable()          # as in a recipe, where the cycle collector seldom runs
    try:
        fig = Figure()
        ax = fig.add_subplot()
        pixels = np.random.default_rng(1).normal(size=(300, 300)).view(_Pixels)
        ax.imshow(pixels, rasterized=True)
        watch = weakref.ref(pixels)
        del pixels, ax
        out = save_figure(fig, tmp_path / "qc.pdf", format="pdf", dpi=50)
        assert out.read_bytes().startswith(b"%PDF")
        assert not list(tmp_path.glob(".*"))              # no temporary left behind
        assert fig.axes == []
        assert watch() is None, "the figure's image data outlived the plot"
    finally:
        gc.enable()


def test_a_failed_save_leaves_no_file(tmp_path) -> None:
    fig = Figure()
    fig.add_subplot().plot([1, 2], [3, 4])
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "qc.pdf", format="no-such-format")
    assert list(tmp_path.iterdir()) == []
