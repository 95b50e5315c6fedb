"""Where the tests find the project's shared data: ``../shared`` beside the repository.

CI runs on a clean clone with ``shared/`` beside it, so there a missing file is an error (the
test fails and says which path); elsewhere a developer without the data gets a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: ``shared/`` beside the repository (tests/ -> repository -> its parent).
SHARED = Path(__file__).resolve().parents[2] / "shared"


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where the shared data must be present."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_shared(relative: str, module_level: bool = False) -> Path:
    """The path ``shared/<relative>``, or a loud failure in CI / a skip elsewhere when it is
    missing.

    Parameters
    ----------
    relative : str
        Path inside ``shared/``.
    module_level : bool
        Called while a test module is imported (the skip then covers the whole module).
    """
    path = SHARED / relative
    if path.exists():
        return path
    message = f"{path} is missing (shared data beside the repository)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=module_level)
    raise AssertionError("unreachable")  # pytest.skip raises
