"""Run a plan's steps on a Dask cluster, resumably.

Each step is one task: a worker runs the step's recipe in its own process, exactly as
``soxs-esorex --output-dir <step dir> <recipe> <sof>`` would (same runner, same SOF), with a log
file and a products SOF in the step's directory.  A step is submitted as soon as every step it
reads products of has finished; a failed step blocks its descendants only, the rest goes on.

Resuming.  Before a step is submitted it is skipped when it is up to date
(:func:`why_rerun`): the products SOF of its last run exists (the runner writes it, atomically,
after the last product), every product listed there and every product the plan expects is a
complete FITS file, and each product's processing record names exactly the step's current
inputs, by the MD5 of their bytes (``ESO PRO RECi RAWj/CALj MD5``, written by
:func:`soxs_recipes.framework.with_input_checksums`), and the parameter values the step would
use now.  Products are renamed into place only when complete, so a step killed midway leaves
nothing that passes; the temporary files it left are removed before the run starts.

Failures.  A recipe that refuses its input or raises ends its step ``failed`` with the
runner's one-line error (not retried: it would fail again).  A worker that dies (killed, out
of memory) takes its task with it; the scheduler gives the task to another worker once
(``allowed-failures`` of the cluster started here is 1), a second death fails the step.

Usage::

    results = run_plan(plan)                                   # a LocalCluster of its own
    results = run_plan(plan, scheduler="tcp://host:8786")      # an existing cluster
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from soxs_core.errors import InputError, one_line

from .model import Plan, Step, StepResult

__all__ = ["run_plan", "run_step", "why_rerun", "step_products", "PRODUCTS_SOF",
           "DEFAULT_MEMORY_LIMIT"]

#: File in a step's directory listing its products, written by the runner after the last one.
PRODUCTS_SOF = "products.sof"

#: Memory limit of each worker of the LocalCluster started by :func:`run_plan`.
DEFAULT_MEMORY_LIMIT = "4GiB"

_RUNNER_PREFIX = re.compile(r"^soxs-esorex: ERROR: ")
_INPUT_MD5 = re.compile(r"ESO PRO REC(\d+) (?:RAW|CAL)\d+ MD5")
_PARAM = re.compile(r"ESO PRO REC(\d+) PARAM(\d+) (NAME|VALUE)")


# ----------------------------------------------------------------------------- fingerprint
def _record_level(header: Any, recipe: str) -> int | None:
    """Level ``i`` of the product's own processing record ``ESO PRO RECi`` (the last one,
    which must be the step's recipe)."""
    levels = [int(m[1]) for key in header.keys()
              if (m := re.fullmatch(r"ESO PRO REC(\d+) ID", key))]
    if not levels or str(header.get(f"ESO PRO REC{max(levels)} ID", "")).strip() != recipe:
        return None
    return max(levels)


def expected_parameters(step: Step) -> dict[str, str]:
    """The parameter values the step's recipe uses, as its products record them
    (``ESO PRO RECi PARAMj NAME`` -> ``VALUE`` text): the step's own, the arm's defaults
    for the others."""
    from soxs_core.detector.instruments import get_arm
    from soxs_core.io.products import param_text
    from soxs_recipes.framework import resolve_parameters
    from soxs_recipes.registry import recipe_module

    spec = recipe_module(step.recipe).SPEC
    values = resolve_parameters(spec, step.params, get_arm(step.instrument, step.arm))
    return {name: param_text(value) for name, value in values.items()}


def _recorded_parameters(header: Any, level: int) -> dict[str, str]:
    names: dict[int, str] = {}
    values: dict[int, str] = {}
    for key in header.keys():
        m = _PARAM.fullmatch(key)
        if m and int(m[1]) == level:
            (names if m[3] == "NAME" else values)[int(m[2])] = str(header[key]).strip()
    return {names[i]: values.get(i, "") for i in names}


def _read_products_sof(path: Path) -> list[tuple[str, str]]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            entries.append((fields[0], fields[1]))
    return entries


def why_rerun(step: Step) -> str:
    """Why ``step`` must run, or ``""`` when its products are complete and current.

    Current means: every product records, in its own processing record, the MD5 of exactly
    the step's inputs as they are now, and the parameter values the step would use now.
    """
    from soxs_core.io.fits import FitsFile
    from soxs_recipes.framework import file_md5

    out = Path(step.output_dir)
    marker = out / PRODUCTS_SOF
    if not marker.is_file():
        return "no complete earlier run"
    listed = _read_products_sof(marker)
    paths = [Path(p) for p, _ in listed]
    missing = [p for p, _ in step.products if Path(p).resolve() not in
               {q.resolve() for q in paths}]
    if missing or not listed:
        return f"product {missing[0] if missing else '(none)'} not made by the last run"
    try:
        inputs = {file_md5(i.path) for i in step.inputs}
    except OSError as exc:
        return f"input cannot be read ({exc.strerror or exc})"
    wanted = expected_parameters(step)
    recorded_inputs: set[str] = set()
    for path in paths:
        try:
            header = FitsFile(path)[0].header  # the scan also proves the file complete
        except (InputError, OSError) as exc:
            return one_line(exc)
        level = _record_level(header, step.recipe)
        if level is None:
            return f"{path}: not a product of {step.recipe}"
        md5s = {str(header[k]).strip() for k in header.keys()
                if (m := _INPUT_MD5.fullmatch(k)) and int(m[1]) == level}
        if not md5s <= inputs:
            return f"{path}: made from other inputs"
        recorded_inputs |= md5s
        if _recorded_parameters(header, level) != wanted:
            return f"{path}: made with other parameters"
    if recorded_inputs != inputs:
        return "the inputs changed"
    return ""


@dataclass
class _ProductSummary:
    products: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    qc_out_of_range: list[str] = field(default_factory=list)


def step_products(step: Step) -> _ProductSummary:
    """The products of the step's last run (its products SOF), their ``ESO QC`` values (by
    keyword, the first product's where several have one) and the QC values outside their
    ranges (``ESO QC FAILi``), and the QC plots in its directory."""
    from soxs_core.io.fits import read_header

    out = Path(step.output_dir)
    summary = _ProductSummary(plots=sorted(str(p) for p in out.glob("*.pdf")))
    marker = out / PRODUCTS_SOF
    if not marker.is_file():
        return summary
    for path, _ in _read_products_sof(marker):
        summary.products.append(path)
        header = read_header(path)
        for key in header.keys():
            if not key.startswith("ESO QC "):
                continue
            name = key[len("ESO QC "):]
            if re.fullmatch(r"FAIL\d+", name):
                text = f"{Path(path).name}: {header[key]}"
                if str(header[key]) not in {t.split(": ", 1)[1]
                                            for t in summary.qc_out_of_range}:
                    summary.qc_out_of_range.append(text)
            elif name != "NFAIL":
                summary.qc.setdefault(name, header[key])
    return summary


def _result(step: Step, status: str, reason: str = "", **extra: Any) -> StepResult:
    found = step_products(step) if status in ("done", "skipped") else _ProductSummary(
        plots=sorted(str(p) for p in Path(step.output_dir).glob("*.pdf")))
    return StepResult(step_id=step.step_id, status=status, reason=reason,
                      products=found.products, plots=found.plots, qc=found.qc,
                      qc_out_of_range=found.qc_out_of_range, **extra)


# ----------------------------------------------------------------------------- in the worker
def recipe_command(step: Step) -> list[str]:
    """The runner's command line for ``step`` (without the program name)."""
    from soxs_core.io.products import param_text

    out = Path(step.output_dir)
    return ["--output-dir", str(out), "--products-sof", str(out / PRODUCTS_SOF),
            "--log-file", str(out / f"{step.step_id}.log"), "--msg-level", "off",
            "--overwrite", step.recipe,
            *(f"--{name}={param_text(value)}" for name, value in step.params.items()),
            step.sof]


def run_step(step: Step) -> StepResult:
    """Run one step's recipe in this process and describe the outcome.

    The runner's messages go to the step's log file; its one-line error, when it fails,
    becomes the result's reason.  Never raises for a recipe's failure.
    """
    from soxs_recipes.runner import run as run_recipe

    out = Path(step.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the marker of a complete run goes first: a run that stops midway leaves none
    (out / PRODUCTS_SOF).unlink(missing_ok=True)
    errors = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        status = run_recipe(recipe_command(step))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = f"pid {os.getpid()}"
    if status == 0:
        return _result(step, "done", seconds=seconds, peak_rss_mib=peak, worker=worker)
    lines = [line for line in errors.getvalue().splitlines() if line.strip()]
    reason = _RUNNER_PREFIX.sub("", lines[-1]) if lines else f"exit status {status}"
    return _result(step, "failed", one_line(reason), seconds=seconds, peak_rss_mib=peak,
                   worker=worker)


# ----------------------------------------------------------------------------- the cluster
class _Cluster:
    """The Dask client, started when the first step needs it (a run that only skips starts
    none): a LocalCluster of its own, or a connection to ``scheduler``."""

    def __init__(self, scheduler: str | None, n_workers: int | None, memory_limit: str):
        self.scheduler = scheduler
        self.n_workers_wanted = n_workers or len(os.sched_getaffinity(0))
        self.memory_limit = memory_limit
        self._client: Any = None
        self._cluster: Any = None
        self._stack = contextlib.ExitStack()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._start()
        return self._client

    def _start(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        # the distributed package's own warnings (a worker restarted, a task lost with its
        # worker) are what the results report already
        for name in ("distributed", "tornado", "bokeh"):
            logger = logging.getLogger(name)
            previous = logger.level
            logger.setLevel(logging.CRITICAL)
            self._stack.callback(logger.setLevel, previous)
        if self.scheduler:
            try:
                self._client = self._stack.enter_context(Client(self.scheduler, timeout=30))
            except (OSError, TimeoutError) as exc:
                raise InputError(f"{self.scheduler}: cannot connect to the Dask scheduler "
                                 f"({one_line(exc)})") from None
            return
        # a task whose worker dies is given to another worker once; a worker gets one task
        # at a time, so that the death of a worker running one step costs no other step
        self._stack.enter_context(dask.config.set({
            "distributed.scheduler.allowed-failures": 1,
            "distributed.scheduler.worker-saturation": 1.0,
        }))
        threads = {name: os.environ.get(name, "1")
                   for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        self._cluster = self._stack.enter_context(LocalCluster(
            n_workers=self.n_workers_wanted, threads_per_worker=1, processes=True,
            memory_limit=self.memory_limit, dashboard_address=None,
            silence_logs=logging.CRITICAL, env=threads))
        self._client = self._stack.enter_context(Client(self._cluster))

    def n_workers(self) -> int:
        if self._client is None:
            return self.n_workers_wanted
        return max(1, len(self._client.scheduler_info().get("workers", {})))

    def close(self) -> None:
        self._stack.close()


# ----------------------------------------------------------------------------- progress
class Progress:
    """Steps finished, running, failed and blocked, the elapsed and the estimated remaining
    time: one line rewritten in place on a terminal, a line per finished step otherwise."""

    def __init__(self, steps: list[Step], stream: TextIO | None, workers: int):
        self.steps = {s.step_id: s for s in steps}
        self.stream = stream
        self.workers = workers
        self.start = time.monotonic()
        self.results: dict[str, StepResult] = {}
        self.running: dict[str, float] = {}
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._width = 0

    def started(self, step_id: str) -> None:
        self.running[step_id] = time.monotonic()
        self.show()

    def finished(self, result: StepResult) -> None:
        self.running.pop(result.step_id, None)
        self.results[result.step_id] = result
        self.show(result)

    def _estimate(self) -> float | None:
        """Seconds left: the recipes' mean times of this run over the steps not finished,
        less what the running ones have done, shared by the workers."""
        ran = [r for r in self.results.values() if r.status == "done"]
        if not ran:
            return None
        by_recipe: dict[str, list[float]] = {}
        for r in ran:
            by_recipe.setdefault(self.steps[r.step_id].recipe, []).append(r.seconds)
        overall = sum(r.seconds for r in ran) / len(ran)
        now = time.monotonic()
        left = 0.0
        for step_id, step in self.steps.items():
            if step_id in self.results:
                continue
            times = by_recipe.get(step.recipe)
            mean = sum(times) / len(times) if times else overall
            if step_id in self.running:
                mean -= now - self.running[step_id]
            left += max(mean, 0.0)
        return left / self.workers

    def line(self) -> str:
        counts = {s: 0 for s in ("done", "skipped", "failed", "blocked")}
        for r in self.results.values():
            counts[r.status] += 1
        estimate = self._estimate()
        left = "" if estimate is None else f", ~{estimate:.0f} s left"
        return (f"[{time.monotonic() - self.start:6.1f} s] {len(self.results)}/"
                f"{len(self.steps)} steps: {counts['done']} done, {counts['skipped']} "
                f"skipped, {len(self.running)} running, {counts['failed']} failed, "
                f"{counts['blocked']} blocked{left}")

    def show(self, result: StepResult | None = None) -> None:
        if self.stream is None:
            return
        if self.tty:
            text = self.line()
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif result is not None:
            why = f" ({result.reason})" if result.reason else ""
            took = f" in {result.seconds:.1f} s" if result.status in ("done", "failed") \
                and result.seconds else ""
            self.stream.write(f"{result.status} {result.step_id}{took}{why}\n"
                              f"  {self.line()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- the graph
def _blocked_reason(step: Step, steps: Mapping[str, Step],
                    results: Mapping[str, StepResult]) -> str | None:
    """Why ``step`` cannot run (an upstream step failed or is blocked, or is not in the
    plan); None when it can run or must wait."""
    for upstream in step.upstream:
        if upstream not in steps:
            return f"upstream {upstream} is not in the plan"
        result = results.get(upstream)
        if result is None:
            continue
        if result.status == "failed":
            return f"upstream {upstream} failed: {result.reason}"
        if result.status == "blocked":
            return result.reason  # the step that failed, not the chain to it
    return None


def _ready(step: Step, results: Mapping[str, StepResult]) -> bool:
    return all(results.get(u) is not None and results[u].status in ("done", "skipped")
               for u in step.upstream)


def _outcome(future: Any, step: Step, memory_limit: str) -> StepResult:
    """The StepResult of a finished task, or a failed one when its worker died twice."""
    if future.status == "finished":
        return future.result()
    if future.status == "cancelled":
        return _result(step, "failed", "cancelled")
    exc = future.exception()
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return _result(step, "failed", "its worker died twice while running it (killed, or "
                       f"over the memory limit of {memory_limit} per worker)")
    return _result(step, "failed", f"{type(exc).__name__}: {one_line(exc)}")


def _tidy(plan: Plan) -> None:
    """Remove the temporary files and scratch directories killed runs left behind."""
    from soxs_core.io.safety import remove_stale_scratch, remove_stale_temporaries

    for step in plan.steps:
        if Path(step.output_dir).is_dir():
            remove_stale_temporaries(step.output_dir)
    remove_stale_scratch()


def run_plan(plan: Plan, scheduler: str | None = None, n_workers: int | None = None,
             memory_limit: str = DEFAULT_MEMORY_LIMIT,
             progress: TextIO | None = sys.stderr) -> list[StepResult]:
    """Run every step of ``plan`` that is not up to date, upstream steps first.

    Parameters
    ----------
    plan : Plan
        Its SOFs written (``soxs_archive.plan.write_sofs``).
    scheduler : str, optional
        ``tcp://HOST:PORT`` of a running Dask scheduler; by default a LocalCluster is
        started (only when a step needs to run) and closed at the end.
    n_workers : int, optional
        Worker processes of the LocalCluster, one thread each (default: one per core).
    memory_limit : str
        Memory limit of each LocalCluster worker (``4GiB``); a worker over it is restarted
        and its step given to another worker once.
    progress : text stream or None
        Where the progress goes (default stderr); None for none.

    Returns
    -------
    list of StepResult
        One per step, in the plan's order: ``done``, ``skipped`` (up to date), ``failed``
        (with the recipe's one-line error) or ``blocked`` (with the upstream failure).

    Raises
    ------
    InputError
        When the scheduler cannot be reached.
    KeyboardInterrupt
        When interrupted: the running steps are cancelled and the cluster closed first.
    """
    steps = {s.step_id: s for s in plan.steps}
    results: dict[str, StepResult] = {}
    cluster = _Cluster(scheduler, n_workers, memory_limit)
    display = Progress(plan.steps, progress, cluster.n_workers_wanted)
    _tidy(plan)
    running: dict[Any, str] = {}
    # the client's thread puts each finished future here
    finished: queue.Queue = queue.Queue()
    try:
        pending = list(plan.steps)
        while pending or running:
            for step in list(pending):
                blocked = _blocked_reason(step, steps, results)
                if blocked is not None:
                    pending.remove(step)
                    results[step.step_id] = _result(step, "blocked", blocked)
                    display.finished(results[step.step_id])
                elif _ready(step, results):
                    pending.remove(step)
                    if not why_rerun(step):
                        results[step.step_id] = _result(step, "skipped",
                                                        "up to date")
                        display.finished(results[step.step_id])
                        continue
                    future = cluster.client.submit(
                        run_step, step, key=f"{step.step_id}-{uuid.uuid4().hex[:8]}",
                        pure=False)
                    display.workers = cluster.n_workers()
                    running[future] = step.step_id
                    future.add_done_callback(finished.put)
                    display.started(step.step_id)
            if not running:
                if pending and not any(_ready(s, results) or
                                       _blocked_reason(s, steps, results)
                                       for s in pending):
                    raise RuntimeError("the plan's upstream links form a cycle: "
                                       + ", ".join(s.step_id for s in pending))
                continue
            try:
                future = finished.get(timeout=1.0)
            except queue.Empty:
                display.show()
                continue
            step = steps[running.pop(future)]
            results[step.step_id] = _outcome(future, step, memory_limit)
            display.finished(results[step.step_id])
    finally:
        for future in running:
            future.cancel()
        display.close()
        cluster.close()
    return [results[s.step_id] for s in plan.steps]
