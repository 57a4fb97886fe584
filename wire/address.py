"""Where a control channel or an NBD export listens: ``unix:PATH`` or ``tcp:HOST:PORT``.

Accepted spellings:

- ``unix:PATH`` -- a unix socket; PATH may be relative.
- a plain path (``/run/s1.ctl``, ``s1.ctl``) -- the same, so that every
  existing ``control=PATH`` keeps working.
- ``tcp:HOST:PORT`` -- HOST is an IPv4 address, an IPv6 address in brackets
  (``tcp:[::1]:7000``) or a host name; PORT 1-65535 (0, "any free port",
  only where the address is listened on).

Anything else is refused with one line that says what to write instead.  A
word followed by ``:`` is read as a scheme, so ``localhost:7000`` is an error
(write ``tcp:localhost:7000``), not a relative path; a path that really
contains a colon is written ``unix:PATH`` or ``./PATH``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

# sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    """An address that cannot be used; the message says what to write."""


@dataclass(frozen=True)
class Address:
    """A parsed address: ``kind`` "unix" with ``path``, or "tcp" with ``host``, ``port``."""

    kind: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_tcp(self) -> bool:
        return self.kind == "tcp"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse(text: str, listen: bool = False) -> Address:
    """Parse one address; raise AddressError with one line if it is unusable.

    ``listen``: the address is to be bound, so port 0 (any free port) is allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise AddressError("empty address: use unix:PATH or tcp:HOST:PORT")
    if "\0" in text or any(c.isspace() for c in text):
        raise AddressError(f"address {text!r} contains a space or control character")
    m = _SCHEME.match(text)
    if m is None:
        return _unix(text, text)
    scheme, rest = m.group(1).lower(), text[m.end():]
    if scheme == "unix":
        return _unix(text, rest)
    if scheme == "tcp":
        return _tcp(text, rest, listen)
    raise AddressError(f"address {text!r}: unknown scheme {m.group(1)!r}; use unix:PATH or"
                       f" tcp:HOST:PORT (a path with a colon: unix:PATH or ./PATH)")


def _unix(text: str, path: str) -> Address:
    if not path:
        raise AddressError(f"address {text!r} names no path: use unix:PATH")
    if len(path.encode()) > MAX_UNIX_PATH:
        raise AddressError(f"unix socket path {path!r} is longer than {MAX_UNIX_PATH}"
                           f" bytes: choose a shorter path")
    return Address("unix", path=path)


def _tcp(text: str, rest: str, listen: bool) -> Address:
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise AddressError(f"address {text!r}: expected tcp:HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise AddressError(f"address {text!r}: {host} is not an IPv6 address") from None
    elif ":" in host:
        raise AddressError(f"address {text!r}: write an IPv6 address in brackets,"
                           f" e.g. tcp:[::1]:{port_text}")
    elif not _valid_host(host):
        raise AddressError(f"address {text!r}: {host!r} is not an IPv4 address or host name")
    lowest = 0 if listen else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise AddressError(f"address {text!r}: port must be a number from {lowest} to 65535")
    return Address("tcp", host=host, port=int(port_text))


def _valid_host(host: str) -> bool:
    """An IPv4 literal, or a DNS name made of RFC 1123 labels."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
            return True
        except ValueError:
            return False
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket
    (SO_PEERCRED: what the kernel recorded at connect, not what it claims)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)
