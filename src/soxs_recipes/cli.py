"""``soxs-esorex``: run soxs recipes the way esorex/pyesorex does.

    soxs-esorex [options] RECIPE [--param=value ...] SOF

Exit status is 0 only when every product was written; otherwise one line on stderr names
the file and the problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soxs_core import __version__
from soxs_core.detector.instruments import arm_from_header
from soxs_core.errors import SoxsError
from soxs_core.io.fits import read_header

from .compat import HAVE_PYCPL, ui
from .framework import RecipeSpec, frames_from_sof, man_page, params_text, resolve_parameters
from .registry import RECIPES, recipe_module
from .settings import ArmSettings, read_recipe_config, read_soxspipe_settings

__all__ = ["main", "plugin_dir"]

log = logging.getLogger("soxs")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "off": logging.CRITICAL + 10}


def plugin_dir() -> Path:
    """Directory to put in ``PYESOREX_PLUGIN_DIR``."""
    return Path(__file__).resolve().parent / "plugins"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soxs-esorex",
        usage="soxs-esorex [options] RECIPE [--param=value ...] SOF",
        description="Run a soxs recipe on a set of frames (SOF), like esorex/pyesorex.",
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
    p.add_argument("--create-config", nargs="?", const=True, default=None, metavar="FILE",
                   help="write an rc file with the recipe's parameters (default <recipe>.rc)")
    p.add_argument("--settings", metavar="FILE",
                   help="soxspipe-style YAML settings file; its recipe keys map onto "
                        "parameters")
    p.add_argument("--output-dir", default=".", metavar="DIR", help="where products go")
    p.add_argument("--products-sof", metavar="FILE",
                   help="write 'path TAG' lines of the products to FILE")
    p.add_argument("--log-file", metavar="FILE", help="log file (default none, or "
                   "esorex.log in --log-dir)")
    p.add_argument("--log-dir", metavar="DIR", help="directory of the log file")
    p.add_argument("--log-level", default="info", choices=sorted(_LEVELS),
                   help="level of the log file")
    p.add_argument("--msg-level", default="info", choices=sorted(_LEVELS),
                   help="level of terminal messages")
    p.add_argument("--overwrite", action="store_true", help="replace existing products")
    p.add_argument("recipe", nargs="?", help="recipe name, e.g. soxs_mbias")
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="--param=value options, then the SOF file")
    return p


def _setup_logging(args: argparse.Namespace) -> None:
    root = logging.getLogger("soxs")
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    root.propagate = False
    terminal = logging.StreamHandler(sys.stdout)
    terminal.setLevel(_LEVELS[args.msg_level])
    terminal.setFormatter(logging.Formatter("[ %(levelname)7s ] %(message)s"))
    root.addHandler(terminal)
    for name in ("soxs_core", "soxs_recipes"):
        sub = logging.getLogger(name)
        sub.handlers = root.handlers
        sub.setLevel(logging.DEBUG)
        sub.propagate = False
    log_file = args.log_file
    if log_file is None and args.log_dir:
        log_file = str(Path(args.log_dir) / "esorex.log")
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setLevel(_LEVELS[args.log_level])
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)7s] %(name)s: "
                                               "%(message)s"))
        root.addHandler(handler)


def _split_recipe_args(spec: RecipeSpec, rest: Sequence[str]) -> tuple[dict[str, str], str | None]:
    params: dict[str, str] = {}
    sof = None
    for token in rest:
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            if not sep:
                raise SoxsError(f"{spec.name}: option {token!r} needs a value "
                                "(--name=value)")
            try:
                spec.param(name)
            except KeyError:
                raise SoxsError(f"{spec.name}: unknown parameter --{name}") from None
            params[name] = value
        elif sof is None:
            sof = token
        else:
            raise SoxsError(f"{spec.name}: more than one SOF given ({sof}, {token})")
    return params, sof


def _arm_of_sof(frames: list[tuple[str, str]]):
    """The arm of the first readable frame of an SOF (for --params with an SOF)."""
    for path, _ in frames:
        try:
            return arm_from_header(read_header(path), path)
        except Exception:  # unreadable or foreign file: try the next one
            continue
    return None


def _create_config(spec: RecipeSpec, target: Any) -> Path:
    path = Path(spec.name + ".rc") if target is True else Path(target)
    values = resolve_parameters(spec, None, None)
    lines = [f"# {spec.name} {__version__} parameters (generic defaults; without an explicit "
             "value the data's arm selects the default)"]
    for p in spec.params:
        lines.append(f"# {p.description}")
        lines.append(f"{p.full_name(spec.name)}={values[p.name]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point body; returns the exit status."""
    args = _parser().parse_args(argv)
    _setup_logging(args)
    if args.version:
        print(f"soxs-esorex {__version__} (PyCPL {'present' if HAVE_PYCPL else 'absent'})")
        return 0
    if args.plugin_dir:
        print(plugin_dir())
        return 0
    if args.recipes:
        for name, module in RECIPES.items():
            print(f"  {name:<14} : {module.SPEC.synopsis}")
        return 0
    if not args.recipe:
        _parser().print_usage(sys.stderr)
        print("soxs-esorex: error: no recipe given", file=sys.stderr)
        return 2
    try:
        module = recipe_module(args.recipe)
    except KeyError:
        print(f"soxs-esorex: ERROR: unknown recipe {args.recipe!r} "
              f"(available: {', '.join(RECIPES)})", file=sys.stderr)
        return 2
    spec: RecipeSpec = module.SPEC
    try:
        cli_params, sof = _split_recipe_args(spec, args.rest)
        if args.man_page:
            print(man_page(spec))
            return 0
        if args.create_config is not None:
            print(f"wrote {_create_config(spec, args.create_config)}")
            return 0
        frames = frames_from_sof(sof) if sof else None
        settings = ArmSettings()
        if args.settings:
            settings.update_from(read_soxspipe_settings(args.settings, spec))
        if args.recipe_config:
            settings.update_from(read_recipe_config(args.recipe_config, spec))
        settings.update_from(ArmSettings(common=cli_params))
        if args.params:
            print(params_text(spec, _arm_of_sof(frames) if frames else None))
            return 0
        if sof is None:
            raise SoxsError(f"{spec.name}: no SOF file given")
        # the same PyRecipe class and run() that pyesorex calls
        recipe = module.RECIPE_CLASS()
        recipe.output_dir = args.output_dir
        recipe.overwrite = args.overwrite
        frameset = ui.FrameSet()
        for path, tag in frames:
            if not Path(path).is_file():  # cpl.ui.Frame itself refuses a missing file
                raise SoxsError(f"{path}: file not found")
            frameset.append(ui.Frame(path, tag=tag))
        products = recipe.run(frameset, settings)
        if args.products_sof:
            Path(args.products_sof).write_text(
                "".join(f"{frame.file} {frame.tag}\n" for frame in products))
        return 0
    except SoxsError as exc:
        message = " ".join(str(exc).split())
        log.debug("failure", exc_info=True)
        print(f"soxs-esorex: ERROR: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("soxs-esorex: ERROR: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, and the traceback in the log
        log.debug("unexpected failure\n%s", traceback.format_exc())
        message = " ".join(str(exc).split())
        print(f"soxs-esorex: ERROR: internal error {type(exc).__name__}: {message}",
              file=sys.stderr)
        return 3


def _reuse_freed_memory() -> None:
    """Let glibc serve large arrays from the heap and keep freed ones there for reuse.

    A master is built from many short-lived arrays of tens of MB.  By default each one is a
    fresh mapping whose pages the kernel faults in and zeroes again, about a fifth of a run's
    time on a virtual machine.  Only this runner does this (one short process per recipe);
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


def main() -> None:
    """Console-script entry point."""
    _reuse_freed_memory()
    status = run()
    # The interpreter's teardown (a garbage collection of every module) would add a tenth of
    # a second to each run; everything the run opened is closed by now, so flush and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
