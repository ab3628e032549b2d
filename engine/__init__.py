"""dbnode: Downpour SGD on a cluster of plain CPU machines.

The public API is what ``__all__`` lists; everything else is internal.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("dbnode")
except PackageNotFoundError:  # pragma: no cover - only when run uninstalled
    __version__ = "0+unknown"

__all__ = ["__version__"]
