"""Payloads through shared memory between two processes of one host.

Two node processes on one machine need not push every tensor through the
kernel's TCP stack (two copies, a wakeup per chunk, a handful of system
calls per 64 KiB): the client of a connection to a loopback address offers
a shared segment during the handshake (AUTH meta ``shm``), the server maps
it if it can (AUTH_OK meta ``shm`` = true), and from then on a big payload
is copied into the sender's ring and only its frame header travels over the
socket, flagged :data:`FLAG_SHM` (docs/protocol.md section 18). Frames keep
their order, their validation and their authentication: the socket still
carries every header, in order, and only an authenticated peer learns the
segment's name.

A segment is one file in ``/dev/shm`` (owner-only, unlinked as soon as both
ends have mapped it, so nothing outlives the two processes)::

    [0, 64)      the tail of ring A, written by the server (its reader)
    [64, 128)    the tail of ring B, written by the client
    [128, +R)    ring A: the client's payloads to the server
    [128+R, +R)  ring B: the server's payloads to the client

Each ring has one writer and one reader. Positions are byte counters that
only grow; a payload takes the next ``ceil(n / 64) * 64`` bytes, and when
that would cross the ring's end it starts at the ring's start instead (the
bytes skipped are used up). The reader follows the same rule, so headers
need no offsets: both ends derive every position from the payload lengths,
in frame order. When the writer finds its ring empty it may restart at the
ring's start (flag :data:`FLAG_SHM_RESTART`), which keeps a request-answer
exchange in the first pages. The reader publishes how far it has consumed
(its tail) after each copy; the writer sends a payload inline, over the
socket, whenever its ring has no room for it, so neither side ever waits
for the other.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from ..errors import ErrorCode, RemoteProtocolError
from .frames import FLAG_SHM, FLAG_SHM_RESTART

__all__ = [
    "MIN_PAYLOAD",
    "RING_BYTES",
    "SharedRings",
    "enabled",
    "is_loopback",
]

#: Payloads of fewer bytes go over the socket: copying them is nothing.
MIN_PAYLOAD = 64 << 10
#: Bytes of each ring; a payload of more than half a ring goes inline.
RING_BYTES = 16 << 20

_ALIGN = 64
_CONTROL = 128
_DIR = "/dev/shm"
_NAME = re.compile(r"dbnode-[0-9]{1,7}-[0-9a-f]{32}")


def enabled() -> bool:
    """Whether this process offers shared memory to loopback peers
    (``DBNODE_SHM=0`` turns it off, e.g. to measure TCP alone)."""
    return os.environ.get("DBNODE_SHM", "1") != "0" and os.path.isdir(_DIR)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface: a peer there is on
    this machine (any other address is treated as another machine's, even
    one of ours).

    Args:
        host: an address or host name.

    Returns:
        True for 127.0.0.0/8, ::1 and "localhost".
    """
    return host == "localhost" or host == "::1" or host.startswith("127.")


_swept = False


def _sweep() -> None:
    """Once per process: remove the names of segments whose creator died
    between making one and its server's answer (the only way one lingers)."""
    global _swept
    if _swept:
        return
    _swept = True
    for name in os.listdir(_DIR):
        if not _NAME.fullmatch(name):
            continue
        pid = int(name.split("-")[1])  # anyone can name a file here: check it
        if not 0 < pid < 2**22:  # Linux's pid_max is at most 2^22
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(_DIR, name))
            except OSError:
                pass
        except OSError:  # alive, someone else's
            pass


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass
class _Ring:
    """One direction of a segment, as one end sees it."""

    data: memoryview  # the ring's R bytes
    tail: np.ndarray  # one uint64: how far the reader has consumed
    pos: int = 0  # writer: next free byte; reader: next payload's start

    def place(self, n: int, restart: bool) -> int:
        """Where a payload of ``n`` bytes goes (advancing ``pos``), by the
        rule both ends follow."""
        size = len(self.data)
        if restart:
            self.pos = -(-self.pos // size) * size
        at = self.pos % size
        if at + n > size:  # it would cross the end: start over
            self.pos += size - at
            at = 0
        self.pos += _aligned(n)
        return at


class SharedRings:
    """The two rings of one connection's segment: ours to write, the peer's
    to read.

    Use :meth:`offer` (client) and :meth:`attach` (server); then
    :meth:`put` to send a payload and :meth:`take` to receive one.

    Args:
        mm: the segment, mapped.
        size: bytes per ring.
        client: which end we are (the client writes ring A).
    """

    def __init__(self, mm: mmap.mmap, size: int, client: bool) -> None:
        self._mm = mm
        self.size = size
        whole = memoryview(mm)
        tails = np.frombuffer(mm, np.uint64, count=9)  # [0] ring A's tail, [8] ring B's
        a = _Ring(whole[_CONTROL : _CONTROL + size], tails[0:1])
        b = _Ring(whole[_CONTROL + size : _CONTROL + 2 * size], tails[8:9])
        self._out: _Ring | None = a if client else b
        self._in: _Ring | None = b if client else a
        self._views = [whole, a.data, b.data]  # released on close, or the map cannot go
        self.path = ""

    # -- setting up ----------------------------------------------------------------

    @classmethod
    def offer(cls, size: int = RING_BYTES) -> SharedRings:
        """Create a segment for a connection we opened (its :attr:`path` goes
        to the server; :meth:`unlink` it once the server has answered).

        Args:
            size: bytes per ring.

        Returns:
            The client's end.

        Raises:
            OSError: no segment can be made here.
        """
        _sweep()
        name = f"dbnode-{os.getpid()}-{os.urandom(16).hex()}"
        path = os.path.join(_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Every page reserved now: a full /dev/shm (a container's 64 MB)
            # fails here, and the connection goes without, rather than
            # killing a process with SIGBUS on its first write to a hole.
            os.posix_fallocate(fd, 0, _CONTROL + 2 * size)
            mm = mmap.mmap(fd, _CONTROL + 2 * size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        rings = cls(mm, size, client=True)
        rings.path = path
        return rings

    @classmethod
    def attach(cls, offer: object) -> SharedRings:
        """Map the segment an authenticated client offered.

        Only a regular file of ``/dev/shm`` named as :meth:`offer` names
        them, owned by our own user, private to it, of exactly the offered
        size and allocated throughout, is mapped: a peer cannot make a node
        open anything else, nor fault on a page that has no memory.

        Args:
            offer: the AUTH meta's ``shm``: ``{"path": ..., "size": ...}``.

        Returns:
            The server's end.

        Raises:
            ValueError: the offer is malformed or names an unsuitable file.
            OSError: the file cannot be opened or mapped (e.g. another host's).
        """
        if not isinstance(offer, dict):
            raise ValueError(f"shm offer {offer!r} is not an object")
        path, size = offer.get("path"), offer.get("size")
        if not isinstance(path, str) or os.path.dirname(path) != _DIR:
            raise ValueError(f"shm path {path!r} is not in {_DIR}")
        if not _NAME.fullmatch(os.path.basename(path)):
            raise ValueError(f"shm path {path!r} is not a dbnode segment")
        if type(size) is not int or not 2 * MIN_PAYLOAD <= size <= 4 * RING_BYTES:
            raise ValueError(f"shm size {size!r} out of range")
        if size % _ALIGN:
            raise ValueError(f"shm size {size} is not a multiple of {_ALIGN}")
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise ValueError(f"shm path {path!r} is not a file of ours")
            if st.st_mode & 0o077 or st.st_size != _CONTROL + 2 * size:
                raise ValueError(f"shm path {path!r} has the wrong mode or size")
            if st.st_blocks * 512 < st.st_size:  # a hole would be a SIGBUS waiting
                raise ValueError(f"shm path {path!r} is not allocated")
            mm = mmap.mmap(fd, _CONTROL + 2 * size)
        finally:
            os.close(fd)
        return cls(mm, size, client=False)

    def unlink(self) -> None:
        """Remove the segment's name (both ends keep their mapping)."""
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = ""

    def close(self) -> None:
        """Drop our mapping (and the name, if still there)."""
        self.unlink()
        self._out = self._in = None
        for view in self._views:
            view.release()
        self._views = []
        try:
            self._mm.close()
        except BufferError:  # an array still views it: unmapped with the last one
            pass

    # -- moving payloads -----------------------------------------------------------

    def put(self, payload: memoryview) -> int | None:
        """Copy a payload into our ring, if there is room.

        Args:
            payload: its bytes (a byte view).

        Returns:
            The header flags to send it with (:data:`FLAG_SHM`, and
            :data:`FLAG_SHM_RESTART` if it went to the ring's start), or
            None: no room, or too big; send it inline.
        """
        ring = self._out
        n = len(payload)
        if ring is None or n < MIN_PAYLOAD or 2 * n > self.size:
            return None
        tail = int(ring.tail[0])
        empty = tail >= ring.pos  # the reader has consumed everything
        before = ring.pos
        at = ring.place(n, restart=empty)
        if not empty and ring.pos - tail > self.size:  # it would overwrite unread bytes
            ring.pos = before
            return None
        ring.data[at : at + n] = payload
        return FLAG_SHM | (FLAG_SHM_RESTART if empty else 0)

    def take(self, dest: memoryview, flags: int) -> None:
        """Copy the next payload out of the peer's ring, and release it.

        Args:
            dest: where it goes (a byte view of the frame's array; its
                length is the header's payload length).
            flags: the frame's header flags.

        Raises:
            RemoteProtocolError: BAD_HEADER, the payload cannot be in a ring.
        """
        ring = self._in
        n = len(dest)
        if ring is None or 2 * n > self.size:
            raise RemoteProtocolError(
                ErrorCode.BAD_HEADER, "flags", flags, f"a payload of {n} bytes cannot be shared"
            )
        at = ring.place(n, restart=bool(flags & FLAG_SHM_RESTART))
        dest[:] = ring.data[at : at + n]
        ring.tail[0] = ring.pos
