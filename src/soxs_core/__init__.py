"""soxs_core: the science of the soxs pipeline, free of any PyCPL dependency."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soxs")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__"]
