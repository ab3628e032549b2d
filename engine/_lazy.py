"""Lazy package namespaces: a public name is imported on first use.

So that ``import dbnode.wire.frames`` (sans-IO) costs no trio, no sockets and
no compiled kernels, a package ``__init__`` names its exports without
importing them: ``__getattr__, __dir__ = lazy(__name__, {"Name": ".module"})``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``exports`` map each
    public name to the (relative) module that defines it."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        loaded = importlib.import_module(module, package)
        # Once imported, plain attributes: every export of that module, so
        # that a submodule named like one of its exports (driver.status and
        # its status()) cannot shadow it by being imported.
        for other, where in exports.items():
            if where == module:
                namespace[other] = getattr(loaded, other)
        return namespace[name]

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
