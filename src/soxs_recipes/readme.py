"""The README's parameter, QUAL and QC tables, generated from the declarations.

The tables sit in README.md between ``<!-- generated: NAME ... -->`` and
``<!-- end generated: NAME -->`` markers; a test asserts that they equal what this module
renders, so the README cannot drift from the recipes.  After changing a declaration run::

    python -m soxs_recipes.readme README.md
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from soxs_core.detector.quality import legend
from soxs_core.io.products import QC_SUMMARY

from .framework import Param, RecipeSpec
from .registry import RECIPES

__all__ = ["parameter_table", "qual_table", "qc_table", "SECTIONS", "render", "main"]

REGENERATE = "python -m soxs_recipes.readme README.md"


def _specs() -> list[RecipeSpec]:
    return [module.SPEC for module in RECIPES.values()]


def _cell(text: str) -> str:
    """Text for a markdown table cell (a bar would end the cell)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parameter_table(specs: Sequence[RecipeSpec] | None = None) -> str:
    """Every recipe parameter: CLI name, allowed values and meaning."""
    specs = _specs() if specs is None else list(specs)
    seen: dict[str, tuple[Param, list[str]]] = {}
    for spec in specs:
        for p in spec.params:
            seen.setdefault(p.name, (p, []))[1].append(spec.name)
    rows = []
    for name, (p, recipes) in seen.items():
        only = "" if len(recipes) == len(specs) else f" ({', '.join(recipes)} only)"
        rows.append((f"`{name}`", p.allowed(), p.description + only))
    return _table(("parameter", "allowed", "meaning"), rows)


def qual_table() -> str:
    """The QUAL bits and their meanings (from :data:`soxs_core.detector.quality.MEANING`)."""
    return _table(("bit", "name", "meaning"),
                  [(str(value), f"`{name}`", meaning) for value, name, meaning in legend()])


def qc_table(specs: Sequence[RecipeSpec] | None = None) -> str:
    """Every recipe's QC keywords with unit and meaning, and the range-check summary."""
    specs = _specs() if specs is None else list(specs)
    rows = [(spec.name, f"`ESO QC {q.name}`", q.unit,
             f"{q.description} ({q.scope})" if q.scope else q.description)
            for spec in specs for q in spec.qc]
    rows += [("every recipe", f"`ESO QC {name}`", "", meaning) for name, meaning in QC_SUMMARY]
    return _table(("recipe", "keyword", "unit", "meaning"), rows)


#: Section name in the README markers -> renderer.
SECTIONS: dict[str, Callable[[], str]] = {
    "parameters": parameter_table,
    "qual": qual_table,
    "qc": qc_table,
}


def _marker_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name}\b[^\n]*-->\n)(.*?)(<!-- end generated: "
                      rf"{name} -->)", re.S)


def generated_sections(text: str) -> dict[str, str | None]:
    """The text between each section's markers in ``text`` (None when they are missing)."""
    out: dict[str, str | None] = {}
    for name in SECTIONS:
        match = _marker_pattern(name).search(text)
        out[name] = match.group(2) if match else None
    return out


def render(text: str) -> str:
    """``text`` (a README) with every generated section replaced by its current rendering.

    Raises
    ------
    ValueError
        When a section's markers are missing.
    """
    for name, renderer in SECTIONS.items():
        pattern = _marker_pattern(name)
        if not pattern.search(text):
            raise ValueError(f"no '<!-- generated: {name} -->' ... '<!-- end generated: "
                             f"{name} -->' markers")
        text = pattern.sub(lambda m, r=renderer: m.group(1) + r() + "\n" + m.group(3), text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated tables of a README in place (``--check``: only report)."""
    parser = argparse.ArgumentParser(prog="python -m soxs_recipes.readme",
                                     description="Regenerate the README's tables from the "
                                     "recipe declarations.")
    parser.add_argument("readme", nargs="?", default="README.md", help="default: README.md")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the tables are out of date, change nothing")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    try:
        text = path.read_text()
        new = render(text)
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{path}: tables up to date")
        return 0
    if args.check:
        print(f"{path}: tables out of date (run {REGENERATE})", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
