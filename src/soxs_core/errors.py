"""Exceptions raised by soxs.

Every message is meant to be shown to an astronomer as one line: it names the file (when there
is one) and says what is wrong with it.
"""

__all__ = ["SoxsError", "InputError", "ProductError"]


class SoxsError(Exception):
    """Base class of every error the pipeline reports to the user."""


class InputError(SoxsError, ValueError):
    """The input frames, SOF or parameters cannot be reduced as given."""


class ProductError(SoxsError, OSError):
    """A product could not be written."""
