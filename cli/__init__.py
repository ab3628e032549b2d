"""The ``dbnode`` command (installed as ``dbnode.cli``)."""

import signal
import sys
import threading

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``dbnode`` command (see :func:`dbnode.cli.main.main`).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code; 130 for a Ctrl-C at any point, loading included.
    """
    # A Ctrl-C while numpy and trio load is held until they have: raised
    # inside an import it can surface as an ImportError (numpy's) or leave
    # the interpreter to end itself by the signal, not as an interruption.
    held: list[int] = []
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(1)) if on_main else None
    try:
        from .main import main as run
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)
    try:
        if held:
            raise KeyboardInterrupt
        return run(argv)
    except KeyboardInterrupt:
        print("dbnode: interrupted", file=sys.stderr)
        return 130
