"""The shared secret, sans-IO: loading it, and the one rule it must meet.

The handshake (docs/protocol.md section 10) proves both sides know it; this
module only reads it from a file or the environment and checks its length.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["MIN_SECRET_BYTES", "load_secret", "check_secret"]

MIN_SECRET_BYTES = 16  # docs/protocol.md section 10

log = logging.getLogger("dbnode.wire")
_warned: set[tuple[str, int]] = set()  # (file, mode) already warned about


def load_secret(path: str | os.PathLike[str] | None = None, env: str = "DBNODE_SECRET") -> bytes:
    """Load the shared handshake secret.

    From the file ``path`` when given, otherwise from the environment
    variable ``env`` (its UTF-8 bytes). A file is used byte for byte (a
    good secret is 32 random bytes: ``head -c 32 /dev/urandom > secret``),
    except that a file holding one line of printable ASCII text, like the
    output of ``openssl rand -hex 32``, loses its line break, so it matches
    the same text in the environment.

    A file that other users may read or write (any of the group and
    others permission bits set) is still used, with a WARNING on the
    ``dbnode.wire`` logger (once per file and mode) suggesting ``chmod 600``.

    Args:
        path: the secret file, or None to use the environment.
        env: the environment variable read without ``path``.

    Returns:
        The secret's bytes.

    Raises:
        ConfigError: the file cannot be read, the variable is not set, or
            the secret is shorter than MIN_SECRET_BYTES. The message names
            the file or the variable, never the secret.
    """
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError("secret file", str(path), f"cannot read it: {exc.strerror}") from None
        _warn_if_shared(path)
        data = _strip_text_line_break(data)
        where, value = "secret file", str(path)
    else:
        text = os.environ.get(env)
        if not text:
            raise ConfigError(
                "secret", None, f"no secret: pass a secret file or set the {env} variable"
            )
        data, where, value = text.encode("utf-8"), "secret variable", env
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            where, value, f"holds {len(data)} bytes, need at least {MIN_SECRET_BYTES}"
        )
    return data


def _warn_if_shared(path: str | os.PathLike[str]) -> None:
    # Anyone who can read the secret can join the cluster (and write to it,
    # replace it). Permission bits mean little on Windows: not checked there.
    if os.name == "nt":
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077 and (str(path), mode) not in _warned:
        _warned.add((str(path), mode))
        log.warning(
            "secret file %s is open to other users (mode %s): anyone who can read it can "
            "join the cluster; restrict it with: chmod 600 %s",
            path, oct(mode), path,
        )  # fmt: skip


_TEXT_LINE = re.compile(rb"[\x20-\x7e]+(\r?\n)")


def _strip_text_line_break(data: bytes) -> bytes:
    # Only a text secret loses its line break: random bytes that happen to
    # end in 0x0a are kept whole, as any other reader of the file keeps them.
    match = _TEXT_LINE.fullmatch(data)
    return data[: match.start(1)] if match else data


def check_secret(secret: Any) -> bytes:
    """The secret as bytes, or a ConfigError (which never shows the secret).

    Args:
        secret: bytes, a bytearray or a memoryview.

    Returns:
        The secret as bytes.

    Raises:
        ConfigError: not bytes-like, or shorter than MIN_SECRET_BYTES.
    """
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise ConfigError(
            "secret", type(secret).__name__, "need bytes (see dbnode.wire.load_secret)"
        )
    secret = bytes(secret)
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            "secret", f"<{len(secret)} bytes>", f"need at least {MIN_SECRET_BYTES} bytes"
        )
    return secret
