"""What a node is doing, for an operator: its trio task tree and every
thread's stack, as text (``dbnode serve`` writes it on SIGUSR1, ``dbnode
status --dump`` asks for it)."""

from __future__ import annotations

import sys
import threading
import traceback

import trio

__all__ = ["MAX_DUMP", "dump_text"]

#: A dump is cut to this many characters: it travels in a control reply's
#: meta (64 KiB at most, JSON-escaped: a margin for the escapes).
MAX_DUMP = 40 * 1024


def _task_lines(task: trio.lowlevel.Task, depth: int, out: list[str]) -> None:
    frame = task.coro.cr_frame if hasattr(task.coro, "cr_frame") else None
    where = f"  at {frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else ""
    out.append(f"{'  ' * depth}- {task.name}{where}")
    for nursery in task.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda t: t.name):
            _task_lines(child, depth + 1, out)


def dump_text() -> str:
    """The trio task tree (when called inside ``trio.run``) and every
    thread's Python stack.

    Returns:
        The text, at most :data:`MAX_DUMP` characters.
    """
    out = ["== trio tasks"]
    try:
        _task_lines(trio.lowlevel.current_root_task(), 0, out)
    except RuntimeError:  # not inside trio.run
        out.append("(no trio run in this thread)")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():  # the stdlib's own way to see threads
        out.append(f"== thread {names.get(ident, '?')} ({ident})")
        out.extend(line.rstrip() for line in traceback.format_stack(frame))
    text = "\n".join(out).encode("ascii", "replace").decode()  # no escapes beyond \n and \"
    return text if len(text) <= MAX_DUMP else text[:MAX_DUMP] + "\n... (cut)"
