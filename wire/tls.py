"""Every TLS setting of cgmirror, in one place: Python ``ssl`` contexts for the
control channel, nbdkit's and libnbd's settings for NBD exports.

One PKI serves both planes (``cgmirror pki``; docs/TLS.md).  A
host's certificate directory is in nbdkit's ``--tls-certificates`` layout::

    ca-cert.pem       the session CA: the only trust anchor
    server-cert.pem   this host's certificate (EKU serverAuth + clientAuth)
    server-key.pem    its key (0600)
    client-cert.pem   the same certificate, under the name libnbd looks for
    client-key.pem    the same key

nbdkit reads ``ca-cert.pem`` + ``server-*``; libnbd's ``set_tls_certificates``
reads ``ca-cert.pem`` + ``client-*``; the Python contexts below read the same
files, so a host has one directory whatever it talks.

Rules every context follows (callers never touch ``ssl`` options; urllib3's
``util/ssl_.py`` is the model):

- TLS 1.3 only.  Both ends are ours, so there is no old peer to serve, and 1.3
  encrypts the certificates themselves.
- ``CERT_REQUIRED`` on both sides: the server asks every client for a
  certificate and refuses the handshake without one (mutual TLS).
- The session CA is the only trust anchor: the system store is never loaded,
  so a certificate from any public CA, or from another session's CA, fails.
- Names: the client checks the server's certificate against the host part of
  the address it dialled (``tcp:HOST:PORT``): a DNS name must be among the
  certificate's SAN DNS names, an IP address among its SAN IP addresses
  (``pki issue NAME --dns ... --ip ...``).  libnbd does the same check with
  the host given to ``connect_tcp``/``connect_uri``.  The server checks only
  that a client's certificate chains to the session CA (nbdkit's
  ``--tls-verify-peer`` does the same); who the client is, is its certificate's
  common name, which ``peer_name`` returns for logs.

Rejected: a private key passphrase (nbdkit cannot prompt for one; file mode
0600 is the protection, and a key readable by others is refused here), and a
pinned-certificate scheme (a CA lets a host be added without touching others).
"""

from __future__ import annotations

import os
import shlex
import ssl
import stat
from dataclasses import dataclass

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


class TLSConfigError(Exception):
    """A certificate directory or file is missing, unreadable or unsafe (local)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class HostFiles:
    """The files of one host's certificate directory (nbdkit's layout)."""

    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, CA_CERT)

    @property
    def server_cert(self) -> str:
        return os.path.join(self.dir, SERVER_CERT)

    @property
    def server_key(self) -> str:
        return os.path.join(self.dir, SERVER_KEY)

    @property
    def client_cert(self) -> str:
        return os.path.join(self.dir, CLIENT_CERT)

    @property
    def client_key(self) -> str:
        return os.path.join(self.dir, CLIENT_KEY)

    def server_context(self) -> ssl.SSLContext:
        """A server context from this directory (see ``server_context``)."""
        return server_context(self.ca, self.server_cert, self.server_key)

    def client_context(self) -> ssl.SSLContext:
        """A client context from this directory (see ``client_context``)."""
        return client_context(self.ca, self.client_cert, self.client_key)


def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from ``ca``."""
    return _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``cert`` and trusting only ``ca``.

    Wrap with ``ctx.wrap_socket(sock, server_hostname=HOST)`` where HOST is the
    host of the ``tcp:HOST:PORT`` address dialled: it is checked against the
    server certificate's SAN DNS names or IP addresses.
    """
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)
    ctx.check_hostname = True       # PROTOCOL_TLS_CLIENT's default; said here on purpose
    return ctx


def _context(protocol: int, ca: str, cert: str, key: str) -> ssl.SSLContext:
    for path in (ca, cert, key):
        if not os.path.isfile(path):
            raise TLSConfigError(f"TLS file {path} is missing ({_make_hint(path)})")
    _check_key_mode(key)
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No load_default_certs(): the session CA is the only anchor.
    try:
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"cannot load TLS files {cert}, {key} with CA {ca}:"
                             f" {getattr(exc, 'reason', None) or exc}") from exc
    return ctx


def _check_key_mode(key: str) -> None:
    """Refuse a private key that others may read (as ssh does)."""
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077:
        raise TLSConfigError(f"TLS key {key} has mode {mode:04o}; it must be readable"
                             f" by its owner only (chmod 600 {key})")


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The common name of the verified peer certificate (for logs), or None."""
    cert = sock.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


_MISNAMED = ("certificate does not name the address dialled"
             " (issue it with --dns/--ip for that host)")
# OpenSSL verify codes (x509_vfy.h) and alert reasons, in words a person can act on.
_VERIFY_CODES = {
    10: ("certificate has expired (remove that host's directory in the session's pki"
         " directory: `cgmirror check` then names the `cgmirror pki issue` that makes it)"),
    9: "certificate is not yet valid (check both clocks)",
    62: _MISNAMED,
    64: _MISNAMED,
}
_NOT_OURS = "certificate not from this session's CA"
_REASONS = {
    "CERTIFICATE_VERIFY_FAILED": _NOT_OURS,
    "TLSV1_ALERT_UNKNOWN_CA": "it refused our certificate: not from its session's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it refused our certificate: expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate and we sent none",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "sent no client certificate",
    "WRONG_VERSION_NUMBER": "does not speak TLS 1.3 (plaintext or an old TLS)",
    "HTTP_REQUEST": "does not speak TLS (plaintext)",
    "UNSUPPORTED_PROTOCOL": "speaks an older TLS than 1.3",
    "TLSV1_ALERT_PROTOCOL_VERSION": "speaks an older TLS than 1.3",
    "NO_SHARED_CIPHER": "shares no cipher with us",
}


def describe(exc: BaseException, peer: str) -> str:
    """One line saying why the TLS handshake with ``peer`` failed.

    ``peer`` names the other side for the reader (an address, a slave name).
    Works for errors seen on either side of the handshake.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _VERIFY_CODES:
            why = _VERIFY_CODES[code]
        else:
            why = f"{_NOT_OURS} ({exc.verify_message})"
        return f"peer {peer}: {why}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        why = _REASONS.get(reason) or f"TLS handshake failed: {reason or exc}"
        return f"peer {peer}: {why}"
    if isinstance(exc, (ConnectionError, EOFError)):
        return f"peer {peer}: closed the connection during the TLS handshake"
    return f"peer {peer}: {exc}"


def nbdkit_args(host_dir: str) -> list[str]:
    """nbdkit options that serve exports only over mutual TLS from ``host_dir``."""
    _require_files(host_dir, (CA_CERT, SERVER_CERT), SERVER_KEY)
    return ["--tls=require", f"--tls-certificates={os.path.abspath(host_dir)}",
            "--tls-verify-peer"]


def libnbd_setup(h, host_dir: str) -> None:
    """Make libnbd handle ``h`` require TLS with ``host_dir``'s certificate.

    libnbd checks the server certificate against the CA and against the host
    passed to ``connect_tcp``/``connect_uri``.
    """
    import nbd      # late: the control plane must not need libnbd

    _require_files(host_dir, (CA_CERT, CLIENT_CERT), CLIENT_KEY)
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(os.path.abspath(host_dir))
    h.set_tls_verify_peer(True)


def _require_files(host_dir: str, names: tuple[str, ...], key: str) -> None:
    # nbdkit and libnbd report a missing file late and vaguely; say it here.
    for name in names + (key,):
        path = os.path.join(host_dir, name)
        if not os.path.isfile(path):
            raise TLSConfigError(f"TLS file {path} is missing ({_make_hint(path)})")
    _check_key_mode(os.path.join(host_dir, key))


def _make_hint(path: str) -> str:
    """How to make the host directory that ``path`` belongs in: ``pki
    issue`` of that host into the pki directory above it (a node's
    certificate also names the address it is dialled by)."""
    host = os.path.dirname(os.path.abspath(path))
    return (f"make it with `cgmirror pki issue {shlex.quote(os.path.basename(host))} --dir"
            f" {shlex.quote(os.path.dirname(host))}`, with --ip or --dns for a node's address")
