"""Command-line parsing shared by every program of the package: a refusal is one line.

``argparse`` prints its usage block before an error; at the telescope, and in workflow logs,
one line naming the option and the problem is what a user needs.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["refusal", "DefaultsHelpFormatter", "OneLineParser"]


def refusal(prog: str, message: str) -> str:
    """The one line a tool prints on stderr when it refuses its arguments."""
    return f"{prog}: error: {message}"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: ...)`` to every option's help; an option whose default is ``None``
    must say in its own help what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose every refusal is one line on stderr (no usage block)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, refusal(self.prog, f"{message} (see {self.prog} --help)") + "\n")
