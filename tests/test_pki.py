"""The session PKI (``coordinator.pki``, ``cgmirror pki``) and the Python ``ssl``
contexts of ``wire.tls``: files, modes and refusals, then real TLS 1.3
handshakes on 127.0.0.1 between those contexts, good and bad peers.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator import pki
from coordinator.cli import pki_cmds
from coordinator.cli import Context
from coordinator.errors import ConfigError, ExitCode, UsageError
from wire import tls

pytestmark = pytest.mark.timeout(120)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(read(path))


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
        return True
    except InvalidSignature:
        return False


# --- the library -----------------------------------------------------------

def test_init_makes_a_ca_named_after_the_session(tmp_path):
    """init writes a CA key (0600) and certificate in a 0700 directory; the CA's
    name carries the session name."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    assert mode(d) == 0o700
    assert mode(os.path.join(d, pki.CA_KEY)) == 0o600
    ca = load(os.path.join(d, tls.CA_CERT))
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == "cgmirror session prod CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_init_refuses_to_overwrite_a_ca(tmp_path):
    """A second init in the same directory fails and leaves the CA as it was."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    before = read(os.path.join(d, pki.CA_KEY))
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        pki.init(d, "prod")
    assert read(os.path.join(d, pki.CA_KEY)) == before


def test_init_refuses_a_bad_session_name(tmp_path):
    """A session name that the session file would refuse is refused here too."""
    with pytest.raises(UsageError, match="session name"):
        pki.init(str(tmp_path / "pki"), "has space")
    assert not os.path.exists(tmp_path / "pki")


def test_issue_writes_nbdkits_layout(tmp_path):
    """issue writes ca/server/client files, keys 0600, dir 0700; the certificate
    is signed by the CA, good for server and client, and names the host."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    host = pki.issue(d, "s1", dns=["s1.example"], ips=["10.0.0.1", "::1"], days=30)
    assert host == os.path.join(d, "s1")
    assert mode(host) == 0o700
    assert sorted(os.listdir(host)) == sorted([tls.CA_CERT, tls.SERVER_CERT,
                                               tls.SERVER_KEY, tls.CLIENT_CERT,
                                               tls.CLIENT_KEY])
    assert mode(os.path.join(host, tls.SERVER_KEY)) == 0o600
    assert mode(os.path.join(host, tls.CLIENT_KEY)) == 0o600
    cert = load(os.path.join(host, tls.SERVER_CERT))
    assert load(os.path.join(host, tls.CLIENT_CERT)) == cert
    assert signed_by(cert, load(os.path.join(d, tls.CA_CERT)))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["s1", "s1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("::1")]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value \
        == "cgmirror session prod"
    days = (cert.not_valid_after - cert.not_valid_before).days
    assert days == 30      # 30 days and the five minutes of skew allowance


@pytest.mark.parametrize("kw, match", [
    ({"name": "a b"}, "host name"),
    ({"name": "s1", "ips": ["10.0.0.300"]}, "--ip '10.0.0.300'"),
    ({"name": "s1", "dns": ["bad_name"]}, "--dns 'bad_name'"),
    ({"name": "s1", "days": 0}, "--days"),
    ({"name": "s1", "days": pki.CA_DAYS + 1}, "outlives the session CA"),
])
def test_issue_refuses_bad_input(tmp_path, kw, match):
    """Bad names, addresses and lifetimes are one clear line; nothing is written."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    with pytest.raises(UsageError, match=match) as e:
        pki.issue(d, **kw)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(d)) == sorted([pki.CA_KEY, tls.CA_CERT])


def test_issue_without_a_ca_says_how_to_make_one(tmp_path):
    """issue in a directory without a CA names the command that makes one."""
    with pytest.raises(ConfigError, match="cgmirror pki init"):
        pki.issue(str(tmp_path), "s1")


def test_issue_refuses_to_overwrite_a_host(tmp_path):
    """A host issued twice is refused; its key stays."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    host = pki.issue(d, "s1")
    before = read(os.path.join(host, tls.SERVER_KEY))
    with pytest.raises(ConfigError, match="remove it"):
        pki.issue(d, "s1")
    assert read(os.path.join(host, tls.SERVER_KEY)) == before
    assert sorted(os.listdir(d)) == sorted([pki.CA_KEY, tls.CA_CERT, "s1"])   # no temp dir left


def test_contexts_refuse_a_key_others_can_read(tmp_path):
    """A key with group/other bits is refused with the chmod that fixes it."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    files = tls.HostFiles(pki.issue(d, "s1"))
    files.server_context()
    os.chmod(files.server_key, 0o640)
    with pytest.raises(tls.TLSConfigError, match="chmod 600"):
        files.server_context()
    with pytest.raises(tls.TLSConfigError, match="chmod 600"):
        tls.nbdkit_args(files.dir)


def test_contexts_are_tls13_mutual_session_ca_only(tmp_path):
    """Both contexts: TLS 1.3 minimum, certificates required, only one CA."""
    d = str(tmp_path / "pki")
    pki.init(d, "prod")
    files = tls.HostFiles(pki.issue(d, "s1"))
    for ctx in (files.server_context(), files.client_context()):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.cert_store_stats()["x509_ca"] == 1
    assert files.client_context().check_hostname


def test_missing_file_is_one_line(tmp_path):
    """A host directory without its files names the file and the fix."""
    with pytest.raises(tls.TLSConfigError, match="pki issue"):
        tls.HostFiles(str(tmp_path)).client_context()


# --- the CLI handlers ------------------------------------------------------

def run_cli(argv, session=None) -> ExitCode:
    """Parse ``argv`` with only ``pki_cmds.register`` and call its handler
    (cli.main adds the same parser at merge)."""
    p = argparse.ArgumentParser(prog="cgmirror")
    pki_cmds.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    assert args.needs_session is False
    return args.func(Context(session, json=args.json), args)


def test_cli_init_and_issue_without_a_session(tmp_path, capsys):
    """pki init/issue work with --dir and --name alone; --json is one document."""
    d = str(tmp_path / "pki")
    code = run_cli(["pki", "init", "--dir", d, "--name", "prod"])
    assert code == ExitCode.OK and "session prod" in capsys.readouterr().out
    code = run_cli(["pki", "issue", "s1", "--dir", d, "--ip", "127.0.0.1",
                    "--dns", "s1.example", "--days", "10", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == ExitCode.OK and doc["ok"] and doc["host_dir"] == os.path.join(d, "s1")
    san = load(os.path.join(d, "s1", tls.SERVER_CERT)).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_cli_defaults_come_from_the_session(tmp_path):
    """With a session, DIR is state_dir/pki and the CA carries its name."""
    sess = SimpleNamespace(name="demo", state_dir=str(tmp_path / "state"))
    assert run_cli(["pki", "init"], session=sess) == ExitCode.OK
    assert run_cli(["pki", "issue", "c"], session=sess) == ExitCode.OK
    assert "session demo" in str(
        load(tmp_path / "state" / "pki" / "c" / tls.CA_CERT).subject)


def test_cli_without_session_needs_dir_and_name(tmp_path):
    """Without a session file, a missing --dir or --name is a usage error."""
    with pytest.raises(UsageError, match="--name"):
        run_cli(["pki", "init", "--dir", str(tmp_path)])
    with pytest.raises(UsageError, match="--dir"):
        run_cli(["pki", "init", "--name", "x"])
    with pytest.raises(UsageError, match="--dir"):
        run_cli(["pki", "issue", "s1"])


# --- Python ssl between the contexts, on loopback --------------------------

class EchoServer:
    """A TLS echo server on 127.0.0.1 using ``server_context``: echoes one line
    per connection; ``events`` gets ("ok", peer common name) or ("refused", line)."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)      # bounded: a test that connects no more ends
        self.port = self.sock.getsockname()[1]
        self.events: list[tuple[str, str | None]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            if self.done.is_set():      # the wake-up connection of close()
                conn.close()
                return
            with conn:
                conn.settimeout(10)
                try:
                    with self.ctx.wrap_socket(conn, server_side=True) as s:
                        line = s.recv(100)
                        s.sendall(line)
                        self.events.append(("ok", tls.peer_name(s)))
                except (ssl.SSLError, OSError) as exc:
                    self.events.append(("refused", tls.describe(exc, f"{addr[0]}")))

    def close(self) -> None:
        self.done.set()
        # accept() does not return when another thread closes the socket: wake it.
        socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture
def echo(certs):
    srv = EchoServer(tls.HostFiles(certs["server"]).server_context())
    try:
        yield srv
    finally:
        srv.close()


def talk(ctx: ssl.SSLContext | None, port: int, host: str = "127.0.0.1") -> bytes:
    """Connect, send one line, return the echo (b"" if the server hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if ctx is None:
            raw.sendall(b"ping\n")
            return raw.recv(100)
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(b"ping\n")
            return s.recv(100)


def server_event(srv: EchoServer) -> tuple[str, str | None]:
    from cgtest import wait_until
    wait_until(lambda: srv.events, timeout=10, what="the server to finish the handshake")
    return srv.events[0]


def test_ssl_good_client_echoes(certs, echo):
    """A session client completes the handshake; the server sees its name."""
    assert talk(tls.HostFiles(certs["good"]).client_context(), echo.port) == b"ping\n"
    assert server_event(echo) == ("ok", "client")


@pytest.mark.parametrize("who, why", [
    ("foreign-ca", "not from this session's CA"),
    ("other-session", "not from this session's CA"),
    ("expired", "expired"),
])
def test_ssl_bad_client_certificate_refused(certs, echo, who, why):
    """A client certificate of a foreign CA, another session or past its date is
    refused by the server in the handshake, with one line saying why."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        assert talk(tls.HostFiles(certs[who]).client_context(), echo.port) == b""
    kind, line = server_event(echo)
    print(line)
    assert kind == "refused" and why in line and "\n" not in line, line


def test_ssl_client_without_certificate_refused(certs, echo):
    """A TLS client that presents no certificate is refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs["server"], tls.CA_CERT))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        assert talk(ctx, echo.port) == b""
    kind, line = server_event(echo)
    assert kind == "refused" and "no client certificate" in line, line


def test_ssl_plaintext_client_refused(echo):
    """A plaintext client gets nothing back; the server says it spoke no TLS."""
    assert talk(None, echo.port) == b""
    kind, line = server_event(echo)
    assert kind == "refused" and "TLS" in line, line


def test_ssl_client_refuses_server_of_another_ca(certs, echo):
    """A client of the other session refuses our server, with one line."""
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        talk(tls.HostFiles(certs["other-ca"]).client_context(), echo.port)
    assert "not from this session's CA" in tls.describe(e.value, "server")


def test_ssl_client_checks_server_name(certs):
    """A server whose certificate does not name the host dialled is refused."""
    srv = EchoServer(tls.HostFiles(certs["misnamed"]).server_context())
    try:
        with pytest.raises(ssl.SSLCertVerificationError) as e:
            talk(tls.HostFiles(certs["good"]).client_context(), srv.port)
        assert "does not name the address" in tls.describe(e.value, "127.0.0.1")
    finally:
        srv.close()
