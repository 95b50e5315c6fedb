"""Exceptions raised by soxs.

Every message is meant to be shown to an astronomer as one line: it names the file (when there
is one) and says what is wrong with it.
"""

import re

__all__ = ["SoxsError", "InputError", "ProductError", "shorten", "one_line"]

#: Longest word (a path, usually) a message shows whole.
LONGEST_WORD = 160


def shorten(text: str, limit: int = LONGEST_WORD) -> str:
    """``text`` when it has at most ``limit`` characters, else its head and tail around "…".

    The tail is the longer part: of a path, the file name is what tells most.
    """
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "\N{HORIZONTAL ELLIPSIS}" + text[len(text) - (limit - 1 - head):]


def one_line(message: object) -> str:
    """A message as one line for the terminal: whitespace collapsed, long words shortened.

    Every error a program prints goes through this, so that a path of 100 000 characters
    (or a message quoting one) is never echoed whole.
    """
    text = " ".join(str(message).split())
    return re.sub(rf"\S{{{LONGEST_WORD + 1},}}", lambda m: shorten(m.group()), text)


class SoxsError(Exception):
    """Base class of every error the pipeline reports to the user."""


class InputError(SoxsError, ValueError):
    """The input frames, SOF or parameters cannot be reduced as given."""


class ProductError(SoxsError, OSError):
    """A product could not be written."""
