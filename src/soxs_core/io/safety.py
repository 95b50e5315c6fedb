"""File safety: no input is ever overwritten, no temporary file is ever left behind.

Three things live here, shared by every command-line program of the package:

- identity of files (:func:`same_file`), so an output path is compared with the inputs by
  what it is on disk (symbolic and hard links included), not by how it is spelled;
- temporary files written beside their target and renamed into place
  (:func:`sibling_temporary`).  Each is registered while it exists, so that SIGTERM or SIGINT
  (:func:`install_signal_handlers`) removes it before the process leaves; its name carries the
  writing process's id, so that a later run can recognise and remove the ones a SIGKILL left
  (:func:`remove_stale_temporaries`);
- scratch directories of decompressed inputs (:func:`scratch_directory`), tracked like the
  temporaries (:func:`track`/:func:`untrack`) and, when a SIGKILL left them, removed by a later
  run (:func:`remove_stale_scratch`).

This module imports nothing heavy: the entry points install the signal handlers before they
import numpy and the recipes, so an interruption during start-up is handled as well.
"""

from __future__ import annotations

import gc
import os
import re
import secrets
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "save_figure",
    "release_figures",
    "thaw_collector",
    "same_file", "find_same_file", "sibling_temporary", "write_atomically", "track", "untrack",
    "remove_tracked",
    "remove_stale_temporaries", "scratch_directory", "remove_stale_scratch",
    "install_signal_handlers", "STALE_AGE",
]

#: A temporary file of a process that still exists is stale when untouched for this long [s]
#: (a product is written in seconds; only a process id reused by another program keeps one
#: this long).
STALE_AGE = 24 * 3600.0

# Paths to remove when the process is interrupted: temporaries being written, scratch
# directories.  A dict keeps insertion order, so removal follows creation.
_tracked: dict[str, None] = {}


def _host_tag() -> str:
    """Eight hex digits naming this host, so that a process id is only judged on its host."""
    return f"{zlib.crc32(os.uname().nodename.encode()):08x}"


_TEMP_RE = re.compile(r"^\..+\.soxs-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


_SCRATCH_RE = re.compile(r"^soxs-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def _temp_name(target: Path) -> str:
    return f".{target.name}.soxs-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: same resolved path, or same device and inode.

    A path that does not exist is compared by its resolved spelling only.  Errors (a name too
    long, a loop of links) make the paths count as different: such a path names no file.
    """
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, RuntimeError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def find_same_file(path: str | os.PathLike,
                   others: Iterable[str | os.PathLike]) -> str | os.PathLike | None:
    """The first of ``others`` that is the same file as ``path`` (see :func:`same_file`)."""
    for other in others:
        if same_file(path, other):
            return other
    return None


def track(path: str | os.PathLike) -> None:
    """Remove ``path`` (a file or a directory) if the process is interrupted."""
    _tracked[os.fspath(path)] = None


def untrack(path: str | os.PathLike) -> None:
    """Stop tracking ``path`` (it was renamed into place or removed)."""
    _tracked.pop(os.fspath(path), None)


def remove_tracked() -> None:
    """Remove every tracked path that still exists; never raises."""
    for path in list(_tracked):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass
        _tracked.pop(path, None)


@contextmanager
def sibling_temporary(target: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary file beside ``target`` to write and then rename onto it.

    The name is ``.<target name>.soxs-<host>-<pid>-<random>.tmp`` in the target's directory
    (a rename is atomic only within one file system).  It is tracked before it is created, so
    an interruption at any moment removes it, and removed when the block raises.  The caller
    renames it onto ``target`` with :func:`os.replace` inside the block.

    Raises
    ------
    OSError
        When the file cannot be created.
    """
    target = Path(target)
    tmp = target.parent / _temp_name(target)
    track(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        yield tmp
    finally:
        try:
            os.unlink(tmp)
        except OSError:  # renamed into place, as it should be, or never created
            pass
        untrack(tmp)


def write_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a file through ``write(temporary_path)`` and rename it onto ``target``.

    Readers, and an interruption at any moment, see either no file or the complete one.

    Raises
    ------
    OSError
        From ``write`` or when the temporary cannot be created or renamed.
    """
    target = Path(target)
    with sibling_temporary(target) as tmp:
        write(tmp)
        os.replace(tmp, target)
    return target


def save_figure(figure: Any, target: str | os.PathLike, *, release: bool = True,
                **savefig: Any) -> Path:
    """Write a matplotlib figure atomically (:func:`write_atomically`), then let it go.

    A matplotlib figure is a web of reference cycles that holds its drawing buffers (C++
    memory, out of numpy's and Python's accounting), and Python's cycle collector seldom
    runs in a recipe, which makes few and large allocations: a run's QC figures used to
    stay in memory to its end, a few hundred MB of a full-frame soxs_stare.  Here the figure
    is closed (pyplot's, if pyplot made it), emptied of its artists and their data (a
    caller's reference keeps an empty figure only) and, with ``release``, the cycles are
    collected (a tenth of a second: a recipe whose peak is past passes False).

    Raises
    ------
    OSError
        From ``savefig`` or when the file cannot be written or renamed.
    """
    try:
        path = write_atomically(target, lambda tmp: figure.savefig(tmp, **savefig))
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            pyplot.close(figure)
        figure.clear()
        if release:
            release_figures()
    return path


def release_figures() -> None:
    """Collect the figures a plot let go of (see :func:`save_figure`).

    The survivors of the collection are then frozen (:func:`gc.freeze`): they are mostly the
    imported libraries' modules, classes and functions, which every later full collection
    would walk again (nine of them took 0.38 s of a soxs_stare run; now the first one does).
    Objects freed by their reference counts are freed as ever; only a cycle among survivors
    that is dropped later waits for :func:`thaw_collector`, which the recipe framework calls
    when a run ends.
    """
    gc.collect()
    gc.freeze()


def thaw_collector() -> None:
    """Give the objects frozen by :func:`release_figures` back to the cycle collector."""
    gc.unfreeze()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave the file to the age criterion
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists and belongs to someone else
        return True
    return True


def _remove_left_behind(directory: str | os.PathLike, name: re.Pattern, directories: bool,
                        max_age: float) -> list[Path]:
    """Remove the entries of ``directory`` whose ``name`` (with host and pid groups) says a
    process of ours made them, when that process (on this host) is gone or the entry has not
    been modified for ``max_age`` seconds.  Unreadable entries are skipped."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        match = name.match(entry.name)
        if match is None:
            continue
        try:
            if not (entry.is_dir(follow_symlinks=False) if directories
                    else entry.is_file(follow_symlinks=False)):
                continue
            dead = match["host"] == host and not _pid_alive(int(match["pid"]))
            if dead or now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                if directories:
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def remove_stale_temporaries(directory: str | os.PathLike,
                             max_age: float = STALE_AGE) -> list[Path]:
    """Remove the temporary files of ours that a killed process left in ``directory``.

    Only names of the form :func:`sibling_temporary` gives are considered; one is removed when
    the process that wrote it (on this host) no longer exists, or when it has not been
    modified for ``max_age`` seconds.

    Returns
    -------
    list of Path
        The files removed.
    """
    return _remove_left_behind(directory, _TEMP_RE, directories=False, max_age=max_age)


def scratch_directory() -> Path:
    """Create a private scratch directory in the system's temporary directory and track it.

    Its name carries this host and process id, so that :func:`remove_stale_scratch` can tell
    the directories of killed runs (decompressed inputs: tens of MB each) from live ones.
    """
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"soxs-{_host_tag()}-{os.getpid()}-"))
    track(path)
    return path


def remove_stale_scratch(max_age: float = STALE_AGE) -> list[Path]:
    """Remove scratch directories (:func:`scratch_directory`) that killed runs left behind.

    A directory is removed when the process that made it (on this host) no longer exists, or
    when it has not been modified for ``max_age`` seconds.

    Returns
    -------
    list of Path
        The directories removed.
    """
    import tempfile

    return _remove_left_behind(tempfile.gettempdir(), _SCRATCH_RE, directories=True,
                               max_age=max_age)


def install_signal_handlers(program: str) -> None:
    """On SIGTERM or SIGINT: remove the tracked paths, say so in one line, and exit.

    The exit status is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell
    reports a program killed by the signal.  No traceback is printed and no ``finally`` block
    runs (the tracked paths are all that needs undoing: products are renamed into place only
    when complete).  Call it first in an entry point, before importing anything heavy.
    """

    def leave(signum: int, frame: object) -> None:
        # a second signal while leaving must not interrupt the clean-up
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        remove_tracked()
        try:
            sys.stdout.flush()
        except Exception:  # a closed or broken stdout must not stop the exit
            pass
        name = signal.Signals(signum).name
        try:
            os.write(2, f"{program}: ERROR: interrupted by {name}\n".encode())
        except OSError:
            pass
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)
