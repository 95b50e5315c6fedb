"""The body of ``soxs-esorex`` (see :mod:`soxs_recipes.cli`, its light entry point).

    soxs-esorex [options] RECIPE [--param=value ...] SOF

Before anything is reduced, every output path (products, products SOF, log, rc file written
by ``--create-config``) is checked: none may be an input (the SOF, a frame it lists, the rc or
settings file given), each must be writable, and an existing products SOF or rc file is
replaced only with ``--overwrite``.  So a run cannot end with an error and a product written
anyway, and no input is ever touched.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soxs_core import __version__
from soxs_core.commandline import OneLineParser, refusal
from soxs_core.detector.instruments import ARMS, Arm, arm_from_header
from soxs_core.errors import InputError, ProductError, SoxsError, one_line
from soxs_core.io.fits import read_header
from soxs_core.io.safety import (
    find_same_file,
    remove_stale_temporaries,
    sibling_temporary,
    write_atomically,
)

from .cli import PROGRAM, plugin_dir
from .compat import HAVE_PYCPL, ui
from .framework import (
    RecipeSpec,
    check_output_dir,
    frames_from_sof,
    man_page,
    params_text,
)
from .registry import RECIPES, recipe_module
from .settings import (
    ArmSettings,
    read_recipe_config,
    read_soxspipe_settings,
    recipe_config_text,
)

__all__ = ["run"]

log = logging.getLogger("soxs")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "off": logging.CRITICAL + 10}

#: Spellings of esorex's boolean option values.
_TRUE, _FALSE = ("true", "t", "yes", "1"), ("false", "f", "no", "0")


def _parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROGRAM, formatter_class=argparse.HelpFormatter,
        usage=f"{PROGRAM} [options] RECIPE [--param=value ...] SOF",
        description="Run a soxs recipe on a set of frames (SOF), like esorex/pyesorex. "
                    "Without arguments, this help.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--recipes", action="store_true", help="list the available recipes")
    p.add_argument("--plugin-dir", action="store_true",
                   help="print the pyesorex plugin directory (for PYESOREX_PLUGIN_DIR)")
    p.add_argument("--man-page", action="store_true", help="print the recipe's manual page")
    p.add_argument("--params", action="store_true",
                   help="list the recipe's parameters (with SOF: the values for its arm)")
    p.add_argument("--recipe-config", metavar="FILE",
                   help="ESO rc file of 'soxs.<recipe>.<param>=value' lines")
    p.add_argument("--create-config", nargs="?", const="TRUE", default=None,
                   metavar="TRUE|FALSE|FILE",
                   help="write an rc file of the recipe's parameters and exit: TRUE (or the "
                        "bare option) writes <recipe>.rc, FILE writes FILE; with an SOF the "
                        "values for its arm, without one the values that differ between "
                        "arms are commented out")
    p.add_argument("--settings", metavar="FILE",
                   help="soxspipe-style YAML settings file; its recipe keys map onto "
                        "parameters (other keys are ignored with a warning)")
    p.add_argument("--output-dir", default=".", metavar="DIR",
                   help="where products go (created if needed)")
    p.add_argument("--products-sof", metavar="FILE",
                   help="write 'path TAG' lines of the products to FILE")
    p.add_argument("--log-file", metavar="FILE", help="log file, appended to (default none, "
                   "or esorex.log in --log-dir); its directory must exist")
    p.add_argument("--log-dir", metavar="DIR", help="existing directory of the log file")
    p.add_argument("--log-level", default="info", choices=sorted(_LEVELS),
                   help="level of the log file")
    p.add_argument("--msg-level", default="info", choices=sorted(_LEVELS),
                   help="level of terminal messages")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing products, products SOF and rc file")
    p.add_argument("recipe", nargs="?", help="recipe name, e.g. soxs_mbias")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="--param=value options, then the SOF file")
    return p


def _bare_create_config(argv: Sequence[str]) -> list[str]:
    """``--create-config RECIPE`` means ``--create-config=TRUE RECIPE``, as with esorex.

    argparse would otherwise take the recipe name for the file name.  (To write a file
    named like a recipe, spell it ``--create-config=FILE``.)
    """
    out = list(argv)
    for i, token in enumerate(out[:-1]):
        if not token.startswith("-"):
            break  # the recipe: options of the runner come before it
        if token == "--create-config":
            try:
                recipe_module(out[i + 1])
            except KeyError:
                continue
            out[i] = "--create-config=TRUE"
    return out


def _keep_off_terminal(record: logging.LogRecord) -> bool:
    """Tracebacks of failures go to the log file only: the terminal gets one line."""
    return not getattr(record, "log_file_only", False)


def _setup_terminal_logging(msg_level: str) -> None:
    root = logging.getLogger("soxs")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    terminal = logging.StreamHandler(sys.stdout)
    terminal.setLevel(_LEVELS[msg_level])
    terminal.setFormatter(logging.Formatter("[ %(levelname)7s ] %(message)s"))
    terminal.addFilter(_keep_off_terminal)
    root.addHandler(terminal)
    for name in ("soxs_core", "soxs_recipes"):
        sub = logging.getLogger(name)
        sub.handlers = root.handlers  # the same list: a log file added later serves all
        sub.setLevel(logging.DEBUG)
        sub.propagate = False


def _open_log_file(path: Path, level: str) -> logging.Handler:
    try:
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the log file ({exc.strerror})") from None
    handler.setLevel(_LEVELS[level])
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)7s] %(name)s: "
                                           "%(message)s"))
    logging.getLogger("soxs").addHandler(handler)
    return handler


def _split_recipe_args(spec: RecipeSpec, rest: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    params: dict[str, Any] = {}
    sof = None
    for token in rest:
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            if not sep:
                raise InputError(f"{spec.name}: option {token!r} needs a value "
                                 "(--name=value)")
            try:
                param = spec.param(name)
            except KeyError:
                raise InputError(f"{spec.name}: unknown parameter --{name}") from None
            params[param.name] = param.convert(value, "command line")
        elif sof is None:
            sof = token
        else:
            raise InputError(f"{spec.name}: more than one SOF given ({sof}, {token})")
    return params, sof


def _arm_of_sof(frames: list[tuple[str, str]]) -> Arm | None:
    """The arm of the first readable frame of an SOF (for --params and --create-config)."""
    for path, _ in frames:
        try:
            return arm_from_header(read_header(path), path)
        except Exception:  # unreadable or foreign file: try the next one
            continue
    return None


def _config_target(value: str | None, spec: RecipeSpec) -> Path | None:
    """Where ``--create-config`` writes: None (not asked, or FALSE), ``<recipe>.rc`` or FILE."""
    if value is None or value.strip().lower() in _FALSE:
        return None
    if value.strip().lower() in _TRUE:
        return Path(f"{spec.name}.rc")
    return Path(value)


@dataclass(frozen=True)
class _Known:
    """A path this run reads or writes, with what it is (for messages)."""

    path: Path
    role: str


def _refuse_clash(path: Path, what: str, others: Iterable[_Known],
                  verb: str = "overwrite") -> None:
    """Refuse ``path`` when it is the same file (links included) as one of ``others``."""
    for other in others:
        if find_same_file(path, [other.path]) is not None:
            alias = "" if other.path == path else f" (the same file as {other.path})"
            raise InputError(f"{path}: the {what} would {verb} {other.role}{alias}")


def _check_output_file(path: Path, what: str, others: Iterable[_Known], *,
                       replace: bool = True, overwrite: bool = False,
                       output_dir: Path | None = None) -> None:
    """Refuse an output file that is an input (or another output), or cannot be written.

    ``replace``: the file is replaced (atomically; an existing one only with ``overwrite``);
    otherwise it is appended to (the log).  A file directly in ``output_dir``, which the run
    creates when needed, may name it before it exists; no other directory is ever created.
    """
    try:
        _refuse_clash(path, what, others, "overwrite" if replace else "be written into")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, the {what} cannot be written there")
        parent = path.parent
        if not parent.exists():
            if output_dir is not None and parent.resolve() == output_dir.resolve():
                return  # created with the output directory (checked there)
            raise InputError(f"{path}: directory {parent} of the {what} does not exist")
        if not parent.is_dir():
            raise InputError(f"{path}: {parent} is not a directory, the {what} cannot be "
                             "written")
        exists = path.exists()
        if replace and exists and not overwrite:
            raise InputError(f"{path}: the {what} exists already (use --overwrite to "
                             "replace it)")
        if not os.access(parent, os.W_OK | os.X_OK) or (
                not replace and exists and not os.access(path, os.W_OK)):
            raise InputError(f"{path}: the {what} is not writable")
    except OSError as exc:  # a name too long, a loop of links, ...
        raise InputError(f"{path}: the {what} cannot be written ({exc.strerror})") from None


def _write_text_atomically(path: Path, text: str, what: str) -> None:
    remove_stale_temporaries(path.parent)
    try:
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ProductError(f"{path}: cannot write the {what} ({exc.strerror or exc})") \
            from None


def _log_path(args: argparse.Namespace) -> Path | None:
    if args.log_file:
        return Path(args.log_file)
    if not args.log_dir:
        return None
    log_dir = Path(args.log_dir)
    try:
        is_dir, exists = log_dir.is_dir(), log_dir.exists()
    except OSError as exc:
        raise InputError(f"{log_dir}: --log-dir cannot be used ({exc.strerror})") from None
    if not is_dir:
        raise InputError(f"{log_dir}: --log-dir " + ("is not a directory" if exists
                                                     else "does not exist"))
    return log_dir / "esorex.log"


def _product_candidates(spec: RecipeSpec, output_dir: Path) -> list[_Known]:
    """Every product path the recipe may write in ``output_dir`` (the arm is not known yet)."""
    paths = dict.fromkeys(output_dir / o.filename_for(arm) for o in spec.outputs
                          for arm in spec.accepted_arms() or ARMS.values())
    return [_Known(p, "a product of this run") for p in paths]


def reuse_freed_memory() -> None:
    """Let glibc serve large arrays from the heap and keep freed ones there for reuse.

    A master is built from many short-lived arrays of tens of MB.  By default each one is a
    fresh mapping whose pages the kernel faults in and zeroes again, about a fifth of a run's
    time on a virtual machine.  Only the soxs-esorex program does this (one short process per
    recipe), for the recipes that declare it (:attr:`RecipeSpec.reuse_freed_memory`);
    importing the package changes nothing.  Elsewhere than glibc the call is skipped.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def run(argv: Sequence[str] | None = None, *, tune_memory: bool = False) -> int:
    """Run a recipe as esorex does; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The command line without the program name (default ``sys.argv[1:]``).  Empty: the
        help is printed (status 0).
    tune_memory : bool
        Set glibc's allocator up for the recipe (:func:`reuse_freed_memory`, when its spec
        asks for it): the soxs-esorex program does, a caller running many recipes in one
        process does not.

    Returns
    -------
    int
        0 when everything asked was done; 1 for bad input (one line on stderr names the file
        and the problem), 2 for a bad command line, 3 for a bug (the traceback is in the log
        file, when there is one), 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        _parser().print_help()
        return 0
    args = _parser().parse_args(_bare_create_config(argv))
    _setup_terminal_logging(args.msg_level)
    log_files: list[logging.Handler] = []
    try:
        return _run(args, log_files, tune_memory)
    except SoxsError as exc:
        # stderr has the line; the log file gets it too, and the traceback at debug level
        log.error("%s", one_line(exc), extra={"log_file_only": True})
        log.debug("failure", exc_info=True, extra={"log_file_only": True})
        print(f"{PROGRAM}: ERROR: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROGRAM}: ERROR: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, and the traceback in the log
        log.error("internal error\n%s", traceback.format_exc(), extra={"log_file_only": True})
        print(f"{PROGRAM}: ERROR: internal error {type(exc).__name__}: {one_line(exc)}",
              file=sys.stderr)
        return 3
    finally:
        for handler in log_files:
            logging.getLogger("soxs").removeHandler(handler)
            handler.close()


def _run(args: argparse.Namespace, log_files: list[logging.Handler],
         tune_memory: bool = False) -> int:
    """The body of :func:`run`; raises SoxsError for bad input."""
    if args.version:
        print(f"{PROGRAM} {__version__} (PyCPL {'present' if HAVE_PYCPL else 'absent'})")
        return 0
    if args.plugin_dir:
        print(plugin_dir())
        return 0
    if args.recipes:
        for name, module in RECIPES.items():
            print(f"  {name:<14} : {module.SPEC.synopsis}")
        return 0
    if not args.recipe:
        print(refusal(PROGRAM, f"no recipe given (see {PROGRAM} --help)"), file=sys.stderr)
        return 2
    try:
        module = recipe_module(args.recipe)
    except KeyError:
        print(f"{PROGRAM}: ERROR: unknown recipe {one_line(repr(args.recipe))} "
              f"(available: {', '.join(RECIPES)})", file=sys.stderr)
        return 2
    spec: RecipeSpec = module.SPEC
    cli_params, sof = _split_recipe_args(spec, args.rest)
    if args.man_page:
        print(man_page(spec))
        return 0
    frames = frames_from_sof(sof) if sof else None
    settings = ArmSettings()
    if args.settings:
        settings.update_from(read_soxspipe_settings(args.settings, spec))
    if args.recipe_config:
        settings.update_from(read_recipe_config(args.recipe_config, spec))
    settings.update_from(ArmSettings(common=cli_params))
    arm = _arm_of_sof(frames) if frames else None
    if args.params:
        print(params_text(spec, arm))
        return 0

    inputs = [_Known(Path(path), "an input frame") for path, _ in frames or ()]
    if sof:
        inputs.append(_Known(Path(sof), "the input SOF"))
    if args.recipe_config:
        inputs.append(_Known(Path(args.recipe_config), "the --recipe-config file"))
    if args.settings:
        inputs.append(_Known(Path(args.settings), "the --settings file"))

    config = _config_target(args.create_config, spec)
    if config is not None:
        _check_output_file(config, "configuration file", inputs, overwrite=args.overwrite)
        _write_text_atomically(config, recipe_config_text(spec, settings, arm),
                               "configuration file")
        print(f"wrote {config}")
        return 0
    if sof is None:
        raise InputError(f"{spec.name}: no SOF file given")

    # every output checked before anything is reduced
    output_dir = Path(args.output_dir)
    products = _product_candidates(spec, output_dir)
    for product in products:
        _refuse_clash(product.path, "product", inputs)
    products_sof = Path(args.products_sof) if args.products_sof else None
    outputs = list(products)
    if products_sof is not None:
        _check_output_file(products_sof, "products SOF", inputs + outputs,
                           overwrite=args.overwrite, output_dir=output_dir)
        outputs.append(_Known(products_sof, "the --products-sof file"))
    log_path = _log_path(args)
    if log_path is not None:
        _check_output_file(log_path, "log file", inputs + outputs, replace=False,
                           output_dir=output_dir)
    if any(not path.parent.exists() for path in (products_sof, log_path) if path):
        check_output_dir(output_dir)  # they go there: create it now
    if log_path is not None:
        log_files.append(_open_log_file(log_path, args.log_level))
    log.debug("%s %s: %s, output directory %s%s%s", PROGRAM, __version__, sof, output_dir,
              f", products SOF {products_sof}" if products_sof else "",
              f", log {log_path}" if log_path else "")

    if tune_memory and spec.reuse_freed_memory:
        reuse_freed_memory()
    # the same PyRecipe class and run() that pyesorex calls
    recipe = module.RECIPE_CLASS()
    recipe.output_dir = str(output_dir)
    recipe.overwrite = args.overwrite
    frameset = ui.FrameSet()
    for path, tag in frames:
        try:
            found = Path(path).is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
        if not found:  # cpl.ui.Frame itself refuses a missing file
            raise InputError(f"{path}: file not found")
        frameset.append(ui.Frame(path, tag=tag))
    with contextlib.ExitStack() as stack:
        tmp_sof = None
        if products_sof is not None:
            # its temporary file made now: the true test that it can be written
            remove_stale_temporaries(products_sof.parent)
            try:
                tmp_sof = stack.enter_context(sibling_temporary(products_sof))
            except OSError as exc:
                raise InputError(f"{products_sof}: cannot write the products SOF "
                                 f"({exc.strerror or exc})") from None
        result = recipe.run(frameset, settings)
        if tmp_sof is not None:
            try:
                tmp_sof.write_text("".join(f"{frame.file} {frame.tag}\n" for frame in result),
                                   encoding="utf-8")
                os.replace(tmp_sof, products_sof)
            except OSError as exc:
                raise ProductError(f"{products_sof}: cannot write the products SOF "
                                   f"({exc.strerror or exc})") from None
    return 0
