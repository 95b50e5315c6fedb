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


class _Node:
    """A weakly referenceable object for reference cycles."""


def test_objects_frozen_by_a_plot_are_given_back_when_the_recipe_run_ends(tmp_path) -> None:
    """A cycle alive at a plot's collection and dropped later is collected once the run ends:
    freezing the survivors (which keeps later collections short) must not leak them."""
    from soxs_core.simulate import DetectorSimulator
    from soxs_recipes import mbias
    from soxs_recipes.framework import execute

    biases = DetectorSimulator(arm="soxs_vis", binning="2x2", readout="fast",
                               seed=5).write_bias(tmp_path / "raw", n=3)
    cycle = _Node()
    cycle.me = cycle
    watch = weakref.ref(cycle)

    def reduce(context) -> None:
        fig = Figure()
        fig.add_subplot().plot([1, 2], [3, 4])
        save_figure(fig, tmp_path / "qc.pdf", format="pdf")
        assert gc.get_freeze_count() > 0          # the plot's survivors are frozen
        mbias.reduce(context)

    gc.disable()
    try:
        execute(mbias.SPEC, [(str(p), "BIAS_VIS") for p in biases], {}, reduce,
                output_dir=tmp_path / "out")
        assert gc.get_freeze_count() == 0
        del cycle
        gc.collect()
        assert watch() is None, "a cycle frozen during the run was never collected"
    finally:
        gc.enable()
        gc.unfreeze()
