"""``soxs-reduce``: organise directories of raw frames into reduction steps and run them.

    soxs-reduce RAWDIR... --workspace W [--dry-run] [--scheduler tcp://HOST:PORT]
                [--workers N] [--memory-limit 4GiB] [--validity CATG=NIGHTS ...]

Scan (the frame catalogue ``W/catalogue.sqlite``), plan (``W/sof/<step>.sof``,
``W/plan.json``), then with ``--dry-run`` print the plan, else run it on Dask (products in
``W/reduced/<step>/``), print the summary table and write ``W/summary.json`` and
``W/summary.html``.  Rerunning the command resumes: steps whose products are up to date are
skipped.

Exit status: 0 when every step is done or up to date; 1 when a step failed or was blocked,
or for bad input (a directory that cannot be read, an unreachable scheduler: one line on
stderr); 2 for a bad command line; 3 for an internal error; 130/143 when interrupted by
SIGINT/SIGTERM (the running steps are cancelled and the cluster closed).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from soxs_core.commandline import OneLineParser
from soxs_core.errors import SoxsError, one_line

__all__ = ["main", "PROGRAM"]

PROGRAM = "soxs-reduce"
_SCHEDULER = re.compile(r"(tcp|tls)://[^\s:/]+:\d+/?")


def _parser() -> OneLineParser:
    from .execute import DEFAULT_MEMORY_LIMIT

    p = OneLineParser(
        prog=PROGRAM,
        description="Scan directories of raw SOXS / X-shooter frames, group them into "
                    "reduction steps with their calibrations (one SOF per step in the "
                    "workspace) and run the steps with Dask, resumably: a rerun skips the "
                    "steps whose products are up to date.")
    p.add_argument("rawdirs", nargs="+", metavar="RAWDIR",
                   help="directories scanned recursively for FITS files (.fits, .fits.gz, "
                        ".fits.fz, .fits.Z...)")
    p.add_argument("--workspace", required=True, metavar="W",
                   help="workspace directory (created): catalogue, SOFs, plan, products, "
                        "summary")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps, inputs, calibrations chosen and why, frames "
                        "in no step) and stop")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="address of a running Dask scheduler (default: start a LocalCluster "
                        "of one process per core)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the LocalCluster (default: one per core)")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help=f"memory limit of each LocalCluster worker (default: "
                        f"{DEFAULT_MEMORY_LIMIT})")
    p.add_argument("--validity", action="append", default=[], metavar="CATG=NIGHTS",
                   help="nights either side a calibration of PRO CATG stem CATG may come "
                        "from (MASTER_FLAT=3); repeatable; default: calib/static/"
                        "association.yaml")
    return p


def _validity(parser: OneLineParser, items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        catg, sep, nights = item.partition("=")
        if not sep or not catg.strip() or not nights.strip().isdigit():
            parser.error(f"--validity {item!r}: expected CATG=NIGHTS, NIGHTS a whole number "
                         ">= 0")
        out[catg.strip().upper()] = int(nights)
    return out


def _check_arguments(parser: OneLineParser, args: argparse.Namespace) -> None:
    """Refuse what the command line alone shows wrong (exit status 2)."""
    from dask.utils import parse_bytes

    if args.scheduler is not None and not _SCHEDULER.fullmatch(args.scheduler):
        parser.error(f"--scheduler {args.scheduler!r}: expected tcp://HOST:PORT")
    if args.scheduler is not None and (args.workers is not None or
                                       args.memory_limit is not None):
        parser.error("--workers and --memory-limit size the LocalCluster; an existing "
                     "cluster (--scheduler) has its own")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    if args.memory_limit is not None:
        try:
            if parse_bytes(args.memory_limit) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            parser.error(f"--memory-limit {args.memory_limit!r}: expected a size such as "
                         "4GiB")


def _check_directories(rawdirs: Sequence[str], workspace: Path) -> None:
    """Raise InputError for a raw directory that cannot be read or a workspace that cannot
    be made."""
    from soxs_core.errors import InputError

    for name in rawdirs:
        path = Path(name)
        if not path.is_dir():
            raise InputError(f"{path}: " + ("is not a directory" if path.exists()
                                            else "directory not found"))
        if not os.access(path, os.R_OK | os.X_OK):
            raise InputError(f"{path}: directory cannot be read")
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{workspace}: cannot create the workspace "
                         f"({exc.strerror or exc})") from None
    if not os.access(workspace, os.W_OK | os.X_OK):
        raise InputError(f"{workspace}: workspace is not writable")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that the cluster is closed on the way out."""


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise _Terminated


def _reduce(args: argparse.Namespace, validity: dict[str, int]) -> int:
    from .catalogue import Catalogue
    from .execute import DEFAULT_MEMORY_LIMIT, run_plan
    from .plan import format_plan, make_plan, write_sofs
    from .summary import format_summary, run_failed, summarise, write_summary

    workspace = Path(args.workspace)
    _check_directories(args.rawdirs, workspace)
    catalogue = Catalogue(workspace)
    records = catalogue.scan(args.rawdirs)
    counts = catalogue.counts
    print(f"{PROGRAM}: {len(records)} files catalogued ({counts.new} new, {counts.reread} "
          f"changed, {counts.unchanged} unchanged, {counts.dropped} gone)", file=sys.stderr)
    plan = make_plan(records, workspace, validity=validity or None)
    write_sofs(plan)
    if args.dry_run:
        print(format_plan(plan))
        return 0
    results = run_plan(plan, scheduler=args.scheduler, n_workers=args.workers,
                       memory_limit=args.memory_limit or DEFAULT_MEMORY_LIMIT,
                       progress=sys.stderr)
    summary = summarise(plan, results)
    print(format_summary(summary))
    json_path, html_path = write_summary(summary, workspace)
    print(f"summary: {json_path}, {html_path}", file=sys.stderr)
    return 1 if run_failed(results) else 0


def _log_traceback(workspace: Path) -> Path | None:
    """Append the current exception's traceback to ``W/soxs-reduce.log``; its path, or None
    when it cannot be written."""
    path = workspace / f"{PROGRAM}.log"
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(traceback.format_exc())
    except OSError:
        return None
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``soxs-reduce`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (the console script exits with it)."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    validity = _validity(parser, args.validity)
    _check_arguments(parser, args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _reduce(args, validity)
    except SoxsError as exc:
        print(f"{PROGRAM}: ERROR: {one_line(exc)}", file=sys.stderr)
        return 1
    except _Terminated:
        print(f"{PROGRAM}: ERROR: interrupted by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROGRAM}: ERROR: interrupted by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # a bug: one line here, the traceback in the workspace's log
        where = _log_traceback(Path(args.workspace))
        print(f"{PROGRAM}: ERROR: internal error {type(exc).__name__}: {one_line(exc)}"
              + (f" (traceback in {where})" if where else ""), file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
