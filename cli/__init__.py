"""The ``dbnode`` command (installed as ``dbnode.cli``)."""

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``dbnode`` command (see :func:`dbnode.cli.main.main`).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code; 130 for a Ctrl-C at any point, loading included.
    """
    try:
        # Imported here: a Ctrl-C while numpy and trio load is an interruption
        # like any other, not a traceback.
        from .main import main as run

        return run(argv)
    except KeyboardInterrupt:
        print("dbnode: interrupted", file=sys.stderr)
        return 130
