"""The ``dbnode`` command (installed as ``dbnode.cli``)."""

from .main import main

__all__ = ["main"]
