"""NBD URIs and addresses, and the canonical identity of the image they name.

Two spellings can name one image: ``nbd+unix:///db?socket=x``,
``nbd+unix:///db?socket=./x`` and ``nbd+unix://localhost/db?socket=x`` all
reach export ``db`` on socket ``x``.  Two volumes whose targets are the same
image would overwrite each other, so the session compares ``identity()``,
never the text.

Identity rules (the NBD URI spec, docs/uri.md of the NBD project, and what
libnbd does with it):

* Schemes ``nbd``/``nbds`` (TCP), ``nbd+unix``/``nbds+unix`` (unix socket),
  ``nbd+vsock``/``nbds+vsock``.  TLS (``nbds``) does not change the image, so
  it is not part of the identity.
* Export name: the URI path without its one leading ``/``, percent-decoded.
  No path and ``/`` are both the empty name, which is the server's *default
  export*.  We cannot know which named export (if any) a server serves as its
  default without asking it, so ``""`` and ``"db"`` count as different; an
  export literally named ``/`` is spelled ``nbd+unix:////?socket=...``.
* Unix: the socket path, made absolute against ``base`` (the session file's
  directory) and then ``os.path.realpath``: symlinks, ``.`` and ``..`` are
  resolved as far as the path exists.  The authority (``localhost`` or empty)
  is ignored, as libnbd ignores it.  Other query keys (``tls-*``) do not
  change the image.
* TCP: host lower-cased, a trailing dot and IPv6 brackets dropped, port 10809
  made explicit.  Host names are not resolved: ``localhost`` and
  ``127.0.0.1`` stay different (resolving would make loading a session
  depend on DNS); compare what was written.
* Our own addresses ``unix:PATH`` and ``tcp:HOST:PORT`` (control channels,
  exports named without a URI) parse to the same endpoint identities.

Pure functions, no I/O besides ``realpath``'s look at the file system.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: ("unix", "/real/path"), ("tcp", "host:port"),
    ("vsock", "cid:port")."""

    transport: str
    where: str

    def __str__(self) -> str:
        return f"{self.transport}:{self.where}"


@dataclass(frozen=True)
class NbdUri:
    """A parsed NBD URI: ``identity`` is what two spellings of one image share."""

    uri: str
    endpoint: Endpoint
    export: str
    tls: bool

    @property
    def identity(self) -> tuple[Endpoint, str]:
        return (self.endpoint, self.export)

    def describe(self) -> str:
        """For people: ``export 'db' on unix:/run/x.sock``."""
        name = repr(self.export) if self.export else "(the default export)"
        return f"export {name} on {self.endpoint}"


def _unix(path: str, base: str | None) -> Endpoint:
    if not path:
        raise ValueError("empty socket path")
    if "\0" in path:
        raise ValueError("socket path contains a NUL byte")
    return Endpoint("unix", os.path.realpath(os.path.join(base or os.getcwd(), path)))


def _tcp(host: str, port: int | None) -> Endpoint:
    host = host.lower().strip("[]").rstrip(".")
    if not host:
        raise ValueError("no host")
    port = DEFAULT_PORT if port is None else port
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not from 1 to 65535")
    return Endpoint("tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def parse(uri: str, base: str | None = None) -> NbdUri:
    """Parse an NBD URI; relative ``socket=`` paths are relative to ``base``
    (default: the current directory).  Raises ValueError (one line)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not an NBD URI: {uri!r} (schemes: {', '.join(SCHEMES)})")
    export = urllib.parse.unquote(parts.path.removeprefix("/"))
    tls = parts.scheme.startswith("nbds")
    try:
        port = parts.port        # ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{uri!r}: the port is not a number from 0 to 65535") from None
    if parts.scheme.endswith("+unix"):
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        socks = [v for k, v in query if k == "socket"]
        if len(socks) != 1 or not socks[0]:
            raise ValueError(f"{uri!r} needs exactly one ?socket=PATH")
        endpoint = _unix(socks[0], base)
    elif parts.scheme.endswith("+vsock"):
        if not parts.hostname or not parts.hostname.isdigit():
            raise ValueError(f"{uri!r}: a vsock URI needs a numeric CID as its host")
        endpoint = Endpoint("vsock", f"{int(parts.hostname)}:{port or DEFAULT_PORT}")
    else:
        try:
            endpoint = _tcp(parts.hostname or "", port)
        except ValueError as exc:
            raise ValueError(f"{uri!r}: {exc}") from None
    return NbdUri(uri=uri, endpoint=endpoint, export=export, tls=tls)


def parse_address(text: str, base: str | None = None) -> Endpoint:
    """Parse our own ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT``).
    Raises ValueError (one line)."""
    kind, sep, rest = text.partition(":")
    if kind == "unix" and sep:
        return _unix(rest, base)
    if kind == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if not colon or not port.isdigit():
            raise ValueError(f"{text!r}: needs tcp:HOST:PORT")
        return _tcp(host, int(port))
    raise ValueError(f"not an address: {text!r} (unix:PATH or tcp:HOST:PORT)")


def same_image(a: str, b: str, base: str | None = None) -> bool:
    """Whether two NBD URIs name the same image (False if either is unparsable
    and the texts differ)."""
    try:
        return parse(a, base).identity == parse(b, base).identity
    except ValueError:
        return a == b
