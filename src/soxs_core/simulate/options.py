"""Command-line options of the simulator, shared by ``soxs-simulate`` and ``soxs-demo``.

Every value is checked before anything is written, so that a bad argument costs the user one
line on stderr and leaves no directory behind:

* each option's own range is checked while the command line is parsed (the ``argparse``
  ``type`` callables below: frame counts, seeds, finite and positive numbers, binnings, order
  lists, arms, standards);
* what depends on the arm (supported binnings, the single NIR readout mode, the orders of the
  spectral format, the slit length) is checked by :func:`check_arm_options`;
* :func:`prepare_output_dir` refuses a path that is not a directory or cannot be made one.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from soxs_core.commandline import OneLineParser, refusal
from soxs_core.detector.instruments import ARMS, Arm
from soxs_core.errors import InputError
from soxs_core.simulate._common import resolve_arm
from soxs_core.simulate.echelle import load_format
from soxs_core.simulate.spectra import STANDARD_STARS

__all__ = ["OneLineParser", "refusal", "number", "COUNT", "SEED", "POSITIVE", "NON_NEGATIVE",
           "FINITE", "AIRMASS", "binning", "order_list", "arm_list", "single_arm",
           "standard_name", "check_arm_options", "prepare_output_dir"]

#: seeds are 32-bit: a larger or negative one would silently repeat another seed's night
SEED_LIMIT = 2**32


def _invalid(text: str, requirement: str) -> argparse.ArgumentTypeError:
    # argparse puts "argument --option: " in front of this
    return argparse.ArgumentTypeError(f"invalid value {text!r}: must be {requirement}")


def number(kind: type, *, minimum: float | None = None, above: float | None = None,
           below: float | None = None) -> Callable[[str], float]:
    """An ``argparse`` type accepting a finite ``int``/``float`` within the given bounds.

    Parameters
    ----------
    kind : type
        ``int`` or ``float``.
    minimum, above, below : float, optional
        Inclusive lower bound, exclusive lower bound, exclusive upper bound.

    Returns
    -------
    callable
        Parses the text or raises :class:`argparse.ArgumentTypeError` saying what is allowed.
    """
    limits = [f"{sign} {int(bound) if float(bound).is_integer() else bound}"
              for sign, bound in ((">=", minimum), (">", above), ("<", below))
              if bound is not None]
    requirement = " and ".join(
        [("a whole number " if kind is int else "a finite number ") + limits[0]] + limits[1:]
    ) if limits else ("a whole number" if kind is int else "a finite number")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise _invalid(text, requirement) from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or (
                above is not None and value <= above) or (below is not None and value >= below):
            raise _invalid(text, requirement)
        return value

    parse.__name__ = requirement
    return parse


COUNT = number(int, minimum=0)
SEED = number(int, minimum=0, below=SEED_LIMIT)
POSITIVE = number(float, above=0)
NON_NEGATIVE = number(float, minimum=0)
FINITE = number(float)
AIRMASS = number(float, minimum=1)


def binning(text: str) -> str:
    """``argparse`` type of ``<binx>x<biny>`` (each at least 1); the arm's support is checked
    by :func:`check_arm_options`."""
    parts = text.strip().lower().split("x")
    try:
        bx, by = (int(v) for v in parts)
    except ValueError:
        raise _invalid(text, "<binx>x<biny>, e.g. 2x2") from None
    if bx < 1 or by < 1:
        raise _invalid(text, "<binx>x<biny> with factors of at least 1, e.g. 2x2")
    return f"{bx}x{by}"


def order_list(text: str) -> list[int]:
    """``argparse`` type of a comma-separated list of distinct order numbers."""
    try:
        orders = [int(v) for v in text.split(",")]
    except ValueError:
        raise _invalid(text, "order numbers separated by commas, e.g. 20,21,22") from None
    if len(set(orders)) != len(orders):
        raise _invalid(text, "distinct order numbers (one is repeated)")
    return orders


def arm_list(text: str) -> list[Arm]:
    """``argparse`` type of one or more comma-separated, distinct arm codes."""
    codes = [c.strip() for c in text.split(",") if c.strip()]
    if not codes:
        raise _invalid(text, f"one or more of {', '.join(ARMS)}, comma separated")
    try:
        arms = [resolve_arm(c) for c in codes]
    except InputError:
        raise _invalid(text, f"one or more of {', '.join(ARMS)}, comma separated") from None
    if len({a.code for a in arms}) != len(arms):
        raise _invalid(text, "distinct arms (one is repeated)")
    return arms


def single_arm(text: str) -> Arm:
    """``argparse`` type of exactly one arm code."""
    try:
        return resolve_arm(text)
    except InputError:
        raise _invalid(text, f"one of {', '.join(ARMS)}") from None


def standard_name(text: str) -> str:
    """``argparse`` type of a flux standard, in any case; returns the tabulated spelling."""
    for name in STANDARD_STARS:
        if name.upper() == text.strip().upper():
            return name
    raise _invalid(text, f"one of {', '.join(STANDARD_STARS)}")


def check_arm_options(arm: Arm, binning: str, readout: str = "slow",
                      orders: Sequence[int] | None = None,
                      object_position: float = 0.0) -> None:
    """Refuse options that the arm cannot take, naming the option, value and what is allowed.

    Raises
    ------
    InputError
        With a message starting ``argument --<option>:``.
    """
    if binning not in arm.binnings:
        why = "; the NIR arrays are not binned" if not arm.is_ccd else ""
        raise InputError(f"argument --binning: invalid value {binning!r} for {arm.code}: "
                         f"it supports {', '.join(arm.binnings)}{why}")
    if not arm.is_ccd and readout != "slow":
        raise InputError(f"argument --readout: invalid value {readout!r} for {arm.code}: the "
                         "NIR array has a single readout mode (leave --readout out)")
    fmt = load_format(arm.code)
    if orders is not None:
        try:
            fmt.checked_orders(orders)
        except InputError as exc:
            raise InputError(f"argument --orders: {exc}") from None
    half = 0.5 * fmt.slit_length
    if abs(object_position) > half:
        raise InputError(f"argument --object-position: invalid value {object_position:g} for "
                         f"{arm.code}: the slit is {fmt.slit_length:g} arcsec long, so the "
                         f"position must be within +-{half:g}")


def prepare_output_dir(path: Path) -> Path:
    """Create the output directory (and its parents) or say in one line why it cannot be.

    Raises
    ------
    InputError
        ``<path>: exists and is not a directory``, ``<path>: cannot create the directory
        (<reason>)`` or ``<path>: directory is not writable``.
    """
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{path}: directory is not writable")
    return path
