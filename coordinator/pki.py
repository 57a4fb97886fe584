"""The session's PKI: one CA per session, one key and certificate per host.

    DIR/                  0700
      ca-key.pem          0600  the session CA's key: stays on the coordinator
      ca-cert.pem         0644
      NAME/               0700  one per host; copy it to that host
        ca-cert.pem             the CA again (the only trust anchor there)
        server-cert.pem         the host's certificate
        server-key.pem    0600  its key
        client-cert.pem         the same certificate ...
        client-key.pem    0600  ... and key, under libnbd's names

A host directory is in nbdkit's ``--tls-certificates`` layout and is what
libnbd's ``set_tls_certificates`` and ``wire.tls`` read (see that module).
Every host certificate is good for both ends of a connection (EKU serverAuth +
clientAuth): a slave serves control and NBD and dials targets, the coordinator
dials slaves.

Keys are ECDSA P-256: GnuTLS (nbdkit, libnbd) and OpenSSL (Python ``ssl``)
both accept it in TLS 1.3.  Ed25519 was rejected: GnuTLS 3.7 handles it, but
client certificates with it are less tested across versions, and nothing here
needs it.

The CA's subject carries the session name ("cgmirror session NAME CA"), and
every host certificate's organisation is "cgmirror session NAME": a
certificate of another session is told apart by eye (``openssl x509 -text``)
and refused by every peer, since it chains to another CA's key.

Files appear whole or not at all: each is written to a temporary name and
linked into place (a link never replaces an existing file, so a CA is never
overwritten); a host directory is built under a temporary name and renamed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import shutil
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wire import tls
from wire.files import fsync_dir, private_dir

from .errors import ConfigError, LocalError, UsageError

CA_KEY = "ca-key.pem"
CA_DAYS = 3650
HOST_DAYS = 365
# Host names: what a session allows for slave names.  Also the directory name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A DNS SAN: letters, digits, hyphens, dots (RFC 1123), optionally a leading "*.".
_DNS = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                  r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Clocks of two hosts differ: a certificate is valid from a little before now.
_SKEW = datetime.timedelta(minutes=5)


def init(pki_dir: str, session_name: str) -> str:
    """Make the CA of session ``session_name`` in ``pki_dir``; return its cert path.

    Refuses if ``pki_dir`` already holds a CA key or certificate.
    """
    if not _NAME.match(session_name or ""):
        raise UsageError(f"pki init: session name {session_name!r} must be 1-64"
                         f" letters, digits, '_', '.' or '-'")
    for name in (CA_KEY, tls.CA_CERT):
        if os.path.exists(os.path.join(pki_dir, name)):
            raise ConfigError(f"pki init: {pki_dir} already holds a CA ({name});"
                              f" refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"cgmirror session {session_name}"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"cgmirror session {session_name} CA"),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=True, crl_sign=True, encipher_only=False,
                decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    try:
        private_dir(pki_dir)
        # Key first: a crash in between leaves a key without a certificate,
        # which the next init refuses (and says so) rather than a certificate
        # whose key is lost.
        _write_new(os.path.join(pki_dir, CA_KEY), _key_pem(key), 0o600)
        _write_new(os.path.join(pki_dir, tls.CA_CERT), _cert_pem(cert), 0o644)
    except FileExistsError as exc:
        raise ConfigError(f"pki init: {exc.filename} appeared meanwhile;"
                          f" refusing to overwrite it") from exc
    except OSError as exc:
        raise LocalError(f"pki init: cannot write the CA in {pki_dir}:"
                         f" {exc.strerror or exc}") from exc
    return os.path.join(pki_dir, tls.CA_CERT)


def issue(pki_dir: str, name: str, dns: list[str] | tuple[str, ...] = (),
          ips: list[str] | tuple[str, ...] = (), days: int = HOST_DAYS,
          valid_from: datetime.datetime | None = None) -> str:
    """Make host ``name``'s key and certificate in ``pki_dir/name``; return that dir.

    The certificate names the host by ``name`` (common name, and a DNS SAN when
    ``name`` is a valid DNS name), every ``dns`` name and every ``ips`` address:
    clients check the host they dial against these.  It is valid from
    ``valid_from`` (default: now, less five minutes of clock skew) for ``days``.
    """
    if not _NAME.match(name or ""):
        raise UsageError(f"pki issue: host name {name!r} must be 1-64 letters,"
                         f" digits, '_', '.' or '-', starting with a letter or digit")
    if not isinstance(days, int) or days < 1:
        raise UsageError(f"pki issue: --days must be a whole number of days >= 1,"
                         f" not {days!r}")
    for d in dns:
        if not _DNS.match(d) or len(d) > 253:
            raise UsageError(f"pki issue: --dns {d!r} is not a DNS name")
    addrs = []
    for a in ips:
        try:
            addrs.append(ipaddress.ip_address(a))
        except ValueError as exc:
            raise UsageError(f"pki issue: --ip {a!r} is not an IPv4 or IPv6"
                             f" address") from exc
    ca_key, ca_cert = _load_ca(pki_dir)
    dest = os.path.join(pki_dir, name)
    if os.path.exists(dest):
        raise ConfigError(f"pki issue: {dest} exists; remove it to issue {name} again")
    start = (valid_from or _now()) - _SKEW
    end = start + _SKEW + datetime.timedelta(days=days)
    if end > ca_cert.not_valid_after.replace(tzinfo=datetime.timezone.utc):
        raise UsageError(f"pki issue: --days {days} outlives the session CA"
                         f" (valid until {ca_cert.not_valid_after:%Y-%m-%d})")

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in dict.fromkeys(
        ([name] if _DNS.match(name) else []) + list(dns))]
    names += [x509.IPAddress(a) for a in dict.fromkeys(addrs)]
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=False, crl_sign=False, encipher_only=False,
                decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    key_pem, cert_pem = _key_pem(key), _cert_pem(cert)
    files = {tls.CA_CERT: (_cert_pem(ca_cert), 0o644),
             tls.SERVER_CERT: (cert_pem, 0o644), tls.SERVER_KEY: (key_pem, 0o600),
             tls.CLIENT_CERT: (cert_pem, 0o644), tls.CLIENT_KEY: (key_pem, 0o600)}
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=pki_dir)   # mode 0700
        for fname, (data, mode) in files.items():
            _write_new(os.path.join(tmp, fname), data, mode)
        fsync_dir(tmp)
        os.rename(tmp, dest)    # fails if dest appeared meanwhile and is not empty
        tmp = None
        fsync_dir(pki_dir)
    except OSError as exc:
        raise LocalError(f"pki issue: cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_ca(pki_dir: str):
    key_path = os.path.join(pki_dir, CA_KEY)
    cert_path = os.path.join(pki_dir, tls.CA_CERT)
    if not os.path.isfile(key_path) or not os.path.isfile(cert_path):
        raise ConfigError(f"pki issue: no session CA in {pki_dir}"
                          f" (make one with: cgmirror pki init --dir {pki_dir})")
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise LocalError(f"pki issue: cannot read the CA in {pki_dir}:"
                         f" {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"pki issue: the CA in {pki_dir} is not a PEM key and"
                          f" certificate: {exc}") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(f"pki issue: {key_path} is not the key of {cert_path}")
    return key, cert


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _serial() -> int:
    # RFC 5280: positive, at most 20 octets; random so two issues never collide.
    return secrets.randbits(159) | 1


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` whole and durably; FileExistsError if it exists."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)    # created 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)      # unlike rename, never replaces an existing file
    finally:
        os.unlink(tmp)
    fsync_dir(d)
