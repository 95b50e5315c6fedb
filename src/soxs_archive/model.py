"""The records passed between the archive stages: frames, steps, the plan, step results.

They are plain dataclasses of JSON-friendly values so that a plan can be written to the
workspace, sent to a Dask worker and read back without any of the stages' code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FrameRecord:
    """One file found by the scan, classified from its primary header.

    Attributes
    ----------
    path : str
        Absolute path of the file.
    checksum : str
        Hex digest of the file's FITS bytes, of the expanded stream for ``.gz``/``.Z`` files
        (duplicates, compressed copies included, share it).
    size, mtime : int, float
        As ``os.stat`` gave them when the file was read (a rescan rereads a file only when
        they change).
    instrument : str
        ``SOXS`` or ``XSHOOTER``; empty when unknown.
    arm : str
        ``UVB``, ``VIS`` or ``NIR``; empty when unknown.
    dpr_catg, dpr_type, dpr_tech : str
        The ``ESO DPR`` keywords of a raw frame (empty for products).
    frame_type : str
        Stem of the SOF tag a raw frame gets (``BIAS``, ``FLAT``, ``FLAT_OFF``, ``OBJECT``...,
        :data:`soxs_core.detector.rawframe.FRAME_TYPES`); empty when the frame is none of
        them.
    pro_catg : str
        ``ESO PRO CATG`` of a calibration product found among the inputs (``DISP_TAB_VIS``);
        empty for raw frames.
    binning : str
        ``<binx>x<biny>`` (``1x1`` for NIR).
    readout : str
        CCD readout mode (``ESO DET READ SPEED``); empty for NIR.
    exptime : float
        ``EXPTIME`` in seconds (``ESO DET DIT`` times ``NDIT`` where that is how the arm
        gives it).
    slit : str
        Slit (or mask) name of the arm.
    lamp : str
        Lamp of a lamp frame (``QTH``, ``D2``...); empty otherwise.
    mjd : float
        ``MJD-OBS``.
    night : str
        Observing night ``YYYY-MM-DD``: the date of ``MJD-OBS`` minus 15 h (noon to noon
        in Chile, so that a night's calibrations of the next morning, which the simulator
        takes up to 13:30 UT, belong to it; :func:`soxs_archive.catalogue.night_of`).
    template : str
        ``ESO TPL START`` (frames of one template share it); empty when absent.
    problem : str
        Why the file cannot be used (unreadable, truncated, another instrument, a duplicate
        of another file...), one line; empty when usable.
    """

    path: str
    checksum: str = ""
    size: int = 0
    mtime: float = 0.0
    instrument: str = ""
    arm: str = ""
    dpr_catg: str = ""
    dpr_type: str = ""
    dpr_tech: str = ""
    frame_type: str = ""
    pro_catg: str = ""
    binning: str = ""
    readout: str = ""
    exptime: float = 0.0
    slit: str = ""
    lamp: str = ""
    mjd: float = 0.0
    night: str = ""
    template: str = ""
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepInput:
    """One line of a step's SOF, and why it is there.

    Attributes
    ----------
    path : str
        File of the input: a raw frame, a calibration found among the inputs, or the
        product an upstream step will write.
    tag : str
        Its SOF tag (``MASTER_BIAS_VIS``).
    reason : str
        Why it was chosen, for ``--dry-run``: ``same night``, ``nearest night 2026-11-21
        (1 night earlier, validity 7)``, ``from step <id>``...
    upstream : str
        Id of the step that makes this file; empty for a file that exists already.
    """

    path: str
    tag: str
    reason: str = ""
    upstream: str = ""


@dataclass
class Step:
    """One recipe run: what it reads, where it writes, which steps it waits for.

    Attributes
    ----------
    step_id : str
        Unique, readable and usable as a file name: ``<night>_<arm>_<setup>_<recipe>``
        with a counter or the first frame's time where one night has several
        (``2026-11-22_XSH_VIS_1x1_slow_soxs_mbias``).
    recipe : str
        ``soxs_mbias``...
    night, instrument, arm : str
        As in :class:`FrameRecord`.
    setup : dict
        The setup values the step was grouped by (binning, readout, exptime, slit...).
    inputs : list of StepInput
        Every SOF line, raw frames first.
    upstream : list of str
        Ids of the steps whose products it reads.
    sof : str
        Path of the SOF written into the workspace.
    output_dir : str
        The step's own product directory in the workspace.
    products : list of (path, tag)
        The products the step writes that later steps may read (from the recipe's
        OutputSpecs).
    params : dict
        Recipe parameters set for this step (command-line alias -> value), given to the
        recipe as ``--name=value``; the others take the arm's defaults.  Products record the
        values used, so a change reruns the step.
    """

    step_id: str
    recipe: str
    night: str
    instrument: str
    arm: str
    setup: dict[str, Any] = field(default_factory=dict)
    inputs: list[StepInput] = field(default_factory=list)
    upstream: list[str] = field(default_factory=list)
    sof: str = ""
    output_dir: str = ""
    products: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Unplanned:
    """A frame that fits no step, or a step that cannot run, with the reason."""

    what: str  # a path, or a step description
    reason: str


@dataclass
class Plan:
    """Every step of a workspace, in an order where upstream steps come first."""

    workspace: str
    steps: list[Step] = field(default_factory=list)
    unused_frames: list[Unplanned] = field(default_factory=list)
    impossible_steps: list[Unplanned] = field(default_factory=list)

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.step_id == step_id:
                return s
        raise KeyError(step_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepResult:
    """What became of one step in a run.

    Attributes
    ----------
    status : str
        ``done`` (ran now), ``skipped`` (products up to date), ``failed`` (the recipe
        raised or the worker died twice), ``blocked`` (an upstream step failed).
    reason : str
        One line: the recipe's error, or which upstream step failed.
    seconds : float
        Wall time of the recipe itself, in the worker.
    peak_rss_mib : float
        Peak resident memory of the worker process after the step.
    products : list of str
        Product files of the step.
    plots : list of str
        QC plots (PDF) in the step's directory.
    qc : dict
        ``ESO QC`` values of its products, by keyword.
    qc_out_of_range : list of str
        QC values outside their ranges, as the recipe logged them.
    worker : str
        Address of the worker that ran it.
    """

    step_id: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    products: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    qc_out_of_range: list[str] = field(default_factory=list)
    worker: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
