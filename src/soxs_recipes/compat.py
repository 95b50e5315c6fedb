"""PyCPL compatibility layer.

When ESO's PyCPL is importable, :data:`ui` is ``cpl.ui`` and every recipe is a genuine
``cpl.ui.PyRecipe``.  Otherwise :data:`ui` is the in-project stand-in below, which has the same
class names, constructor keywords and behaviour for the subset the recipes use.  (Debian's
unrelated ``python3-cpl`` also installs a module named ``cpl``; it has no ``ui.PyRecipe`` and is
ignored.)
"""

from __future__ import annotations

import enum
import os
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from soxs_core.io.products import NO_CPL_DRS_ID

__all__ = ["ui", "HAVE_PYCPL", "standin", "cpl_version", "drs_id", "STANDIN_DRS_ID"]


def _load_pycpl():
    if os.environ.get("SOXS_NO_PYCPL"):
        return None
    try:
        import cpl.ui  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken/unrelated 'cpl'
        return None
    return cpl.ui if hasattr(cpl.ui, "PyRecipe") else None


# ------------------------------------------------------------------------------------------
# Stand-in for cpl.ui
# ------------------------------------------------------------------------------------------
class _Parameter:
    """Common part of the stand-in parameter classes."""

    def __init__(self, name: str, context: str = "", description: str = "",
                 default: Any = None) -> None:
        self._name = name
        self._context = context
        self._description = description
        self._default = default
        self._value = default
        self.cli_alias = name
        self.cfg_alias = name
        self.env_alias = name
        self.presence = False

    name = property(lambda self: self._name)
    context = property(lambda self: self._context)
    description = property(lambda self: self._description)
    default = property(lambda self: self._default)

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, new: Any) -> None:
        self._value = new
        self.presence = True

    @property
    def data_type(self) -> type:
        return type(self._default)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r}, value={self._value!r})"


class ParameterValue(_Parameter):
    """Stand-in for ``cpl.ui.ParameterValue``."""


class ParameterRange(_Parameter):
    """Stand-in for ``cpl.ui.ParameterRange`` (like PyCPL, it does not validate)."""

    def __init__(self, name: str, context: str = "", description: str = "",
                 default: Any = None, min: Any = None, max: Any = None) -> None:  # noqa: A002
        super().__init__(name, context, description, default)
        self.min = min
        self.max = max


class ParameterEnum(_Parameter):
    """Stand-in for ``cpl.ui.ParameterEnum`` (like PyCPL, it does not validate)."""

    def __init__(self, name: str, context: str = "", description: str = "",
                 default: Any = None, alternatives: Iterable[Any] = ()) -> None:
        super().__init__(name, context, description, default)
        self.alternatives = tuple(alternatives)


class _ItemList:
    """List behaviour shared by the stand-in containers: append, iterate, count, index."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        self._items = list(items)

    def append(self, item: Any) -> None:
        self._items.append(item)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Any:
        return self._items[index]


class ParameterList(_ItemList):
    """Stand-in for ``cpl.ui.ParameterList``; also indexed by parameter name."""

    def __getitem__(self, key: int | str) -> _Parameter:
        if isinstance(key, int):
            return self._items[key]
        for item in self._items:
            if item.name == key:
                return item
        raise KeyError(key)


class Frame:
    """Stand-in for ``cpl.ui.Frame``."""

    class FrameGroup(enum.Enum):
        NONE = 0
        RAW = 1
        CALIB = 2
        PRODUCT = 3

    class FrameLevel(enum.Enum):
        NONE = 0
        TEMPORARY = 1
        INTERMEDIATE = 2
        FINAL = 3

    class FrameType(enum.Enum):
        NONE = 0
        IMAGE = 1
        MATRIX = 2
        TABLE = 3
        PAF = 4
        ANY = 5

    def __init__(self, file: str, tag: str | None = None, group: Frame.FrameGroup = None,
                 level: Frame.FrameLevel = None, frameType: Frame.FrameType = None,
                 ) -> None:  # noqa: N803 - PyCPL's keyword
        self.file = str(file)
        self.tag = tag
        self.group = group if group is not None else Frame.FrameGroup.NONE
        self.level = level if level is not None else Frame.FrameLevel.NONE
        self.type = frameType if frameType is not None else Frame.FrameType.NONE

    def __repr__(self) -> str:
        return f"Frame({self.file!r}, tag={self.tag!r}, group={self.group.name})"


class FrameSet(_ItemList):
    """Stand-in for ``cpl.ui.FrameSet``: a list of frames, optionally read from an SOF.

    An SOF has one frame per line: ``path TAG`` and an optional third column ``RAW`` or
    ``CALIB``; blank lines and ``#`` comments are skipped.  Relative paths are taken relative
    to the SOF's directory, as PyCPL does.
    """

    def __init__(self, source: str | os.PathLike | Iterable[Frame] | None = None) -> None:
        super().__init__()
        if source is None:
            return
        if isinstance(source, (str, os.PathLike)):
            self._read_sof(Path(source))
        else:
            for frame in source:
                self.append(frame)

    def _read_sof(self, path: Path) -> None:
        for line in path.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            tag = fields[1] if len(fields) > 1 else None
            group = Frame.FrameGroup.NONE
            if len(fields) > 2 and fields[2].upper() in ("RAW", "CALIB"):
                group = Frame.FrameGroup[fields[2].upper()]
            file = Path(fields[0]).expanduser()
            if not file.is_absolute():
                file = path.parent / file
            self.append(Frame(str(file), tag=tag, group=group))


class PyRecipe:
    """Stand-in for ``cpl.ui.PyRecipe``.

    Like PyCPL, it checks at instantiation that the class defines the seven descriptive
    attributes.
    """

    _required = ("_name", "_version", "_author", "_email", "_copyright", "_synopsis",
                 "_description")

    def __init__(self) -> None:
        missing = [a for a in self._required if not isinstance(getattr(self, a, None), str)]
        if missing:
            raise TypeError(f"{type(self).__name__} must define {', '.join(missing)}")

    def run(self, frameset: FrameSet, settings: dict[str, Any]) -> FrameSet:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self._name


standin = types.SimpleNamespace(
    PyRecipe=PyRecipe, ParameterList=ParameterList, ParameterValue=ParameterValue,
    ParameterRange=ParameterRange, ParameterEnum=ParameterEnum, Frame=Frame, FrameSet=FrameSet,
)

_real = _load_pycpl()
HAVE_PYCPL: bool = _real is not None
ui = _real if _real is not None else standin


def _loaded_cplcore() -> list[str]:
    """Paths of the libcplcore PyCPL's extension module has loaded (Linux), then the one the
    linker would find: the first is the library that actually runs."""
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "libcplcore" in Path(path).name and path not in paths:
                    paths.append(path)
    except OSError:  # no /proc (macOS)
        pass
    import ctypes.util

    for name in ("cplcore", "cplcore-7"):
        found = ctypes.util.find_library(name)
        if found:
            paths.append(found)
    return paths


def cpl_version() -> str | None:
    """Version of the CPL library under PyCPL (``7.2.3``); None without PyCPL or when the
    library cannot be asked."""
    if not HAVE_PYCPL:
        return None
    import ctypes

    for path in _loaded_cplcore():
        try:
            lib = ctypes.CDLL(path)
            lib.cpl_version_get_version.restype = ctypes.c_char_p
            return lib.cpl_version_get_version().decode()
        except (OSError, AttributeError):
            continue
    return None


#: ``ESO PRO RECi DRS ID`` when no CPL runs: the stand-in's own name and version.
STANDIN_DRS_ID = NO_CPL_DRS_ID


def drs_id() -> str:
    """``ESO PRO RECi DRS ID``: the data reduction system that ran.

    Under PyCPL it is what cpl_dfs writes, ``cpl-<version>`` of the CPL library (``cpl``
    alone when its version cannot be told); without PyCPL, :data:`STANDIN_DRS_ID`, since
    no CPL ran.
    """
    if not HAVE_PYCPL:
        return STANDIN_DRS_ID
    version = cpl_version()
    return f"cpl-{version}" if version else "cpl"
