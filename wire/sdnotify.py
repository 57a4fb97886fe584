"""``sd_notify(3)`` without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

Both the slave (nbdplugin/plugin.py, once its control server is up) and
``cgmirror mirror run`` (once its control socket serves) say ``READY=1``, so
a ``Type=notify`` unit is "started" exactly when the process can serve.
Without ``$NOTIFY_SOCKET`` (not under systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1") -> bool:
    """Send ``state`` to the service manager; True if it was sent.  A failure
    is not an error: readiness is a courtesy, the process serves anyway."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):            # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(state.encode(), path)
        except OSError:
            return False
    return True
