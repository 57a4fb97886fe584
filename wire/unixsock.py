"""Who may take a unix socket path: only a path nobody serves.

nbdkit 1.32 leaves its ``-U`` socket file after SIGTERM, and a crash leaves
any socket behind, so a start has to remove a leftover before it binds.  But
a socket file that still accepts connections belongs to a live process (a
second session naming the same paths, a slave started twice): removing it
would send that process's clients to us, or to nobody.  So the path is
probed first: a refused connect means nobody listens (a leftover: remove
it); an accepted one means a live process serves it (refuse, naming it).

Rejected: comparing the pidfile (another session has another pidfile), and
flock on a side file (nbdkit's own NBD socket has none).
"""

from __future__ import annotations

import os
import socket
import stat

from .address import peer_credentials

PROBE_TIMEOUT_S = 5.0       # a live server's backlog answers a connect at once


class SocketInUse(Exception):
    """A socket path is held by something else; the message says what to do."""


def claim(path: str, what: str) -> None:
    """Make ``path`` free for a new listening socket: nothing there, or a
    stale socket (removed here).  Raises ``SocketInUse`` (one line naming
    ``what`` and ``path``, and the serving pid where the kernel tells) if a
    live process serves it, or if it is not a socket."""
    live = _probe(path, what)
    if live is None:
        return
    raise SocketInUse(f"{what} {path} is served by another process ({live}):"
                      f" stop it or choose another path")


def remove_stale(path: str) -> bool:
    """Remove ``path`` if it is a socket nobody serves; True if it is gone
    (or was never there).  A live socket, or a file that is not a socket,
    is left alone."""
    try:
        return _probe(path, "socket") is None
    except SocketInUse:
        return False


def _probe(path: str, what: str) -> str | None:
    """None when ``path`` is free (a stale socket is removed); otherwise who
    serves it ("pid N" or "pid unknown")."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{what} {path} exists and is not a socket:"
                          f" remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)     # nobody listens: a dead process's leftover
        except FileNotFoundError:
            pass
        return None
    except FileNotFoundError:
        return None             # removed meanwhile
    except OSError as exc:
        # EAGAIN (a full backlog) or a timeout: someone is there.
        raise SocketInUse(f"{what} {path} cannot be probed ({exc.strerror or exc}):"
                          f" a live process may serve it; stop it or choose another"
                          f" path") from None
    else:
        pid = peer_credentials(probe)[0]
        return f"pid {pid}" if pid > 0 else "pid unknown"
    finally:
        probe.close()
