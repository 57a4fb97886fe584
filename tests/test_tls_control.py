"""The control channel over TCP with mutual TLS, against a real slave
(``control=tcp:127.0.0.1:PORT tls=DIR``, started by ``coordinator.launch``).

A coordinator with the session's certificate works through the real
``ControlClient``; a peer with a certificate of a foreign CA, none, an
expired one, one of another session, or no TLS at all is refused before any
op is read (it gets no reply), and the slave logs one line for each.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl

import pytest

from coordinator import launch
from coordinator.control import ControlClient, ControlError
from coordinator.link import SlaveLink
from cgtest import wait_until
from tlsrig import free_port
from wire import protocol, tls
from wire.protocol import Kind

pytestmark = pytest.mark.timeout(120)

# The slave's log line for a refused peer (nbdplugin/slave.py).
REFUSED = "control: refused"


@pytest.fixture
def tcp_slave(certs, slaves):
    """A slave whose control listens on 127.0.0.1 with mutual TLS; launch's
    readiness check itself goes over TCP+TLS with the good certificate."""
    spec = slaves("s1", start=False)
    spec = dataclasses.replace(spec, control=f"tcp:127.0.0.1:{free_port()}",
                               tls=certs["server"], client_tls=certs["good"])
    return slaves.restart(spec)


def refusals(proc) -> list[str]:
    with open(proc.spec.logfile, errors="replace") as f:
        return [line for line in f if REFUSED in line]


def no_cert_context(ca_dir: str) -> ssl.SSLContext:
    """A TLS 1.3 client that trusts the session CA but has no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=f"{ca_dir}/{tls.CA_CERT}")
    return ctx


def test_good_client_works(tcp_slave):
    """The coordinator's ControlClient and SlaveLink over TCP+TLS."""
    with tcp_slave.control(timeout=10) as c:
        assert c.call("status")["pid"] == tcp_slave.pid
        assert c.call("status")["pid"] == tcp_slave.pid      # the connection is kept
    with SlaveLink.from_spec(tcp_slave.spec) as link:
        assert "a" in link.status()["volumes"]
    assert refusals(tcp_slave) == []


@pytest.mark.parametrize("who", ["foreign-ca", "no-cert", "expired", "other-session",
                                 "plaintext"])
def test_bad_peer_refused_before_any_op(certs, tcp_slave, who):
    """Each bad peer sends a request and gets no reply: the handshake fails
    first.  The slave logs one line per refusal and keeps serving."""
    spec = tcp_slave.spec
    port = int(spec.control.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock = raw
        if who != "plaintext":
            ctx = (no_cert_context(certs["no-cert"]) if who == "no-cert"
                   else tls.HostFiles(certs[who]).client_context())
        try:
            if who != "plaintext":
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(protocol.encode({"op": "status"}))
            got = sock.recv(1 << 16)
        except (ssl.SSLError, ConnectionError):
            # Refused during the handshake, or at our first write or read.
            got = b""
        assert got == b"", f"a reply to a refused peer: {got!r}"
    finally:
        sock.close()        # wrap_socket detached raw: close both
        raw.close()
    wait_until(lambda: len(refusals(tcp_slave)) == 1, timeout=15,
               what="the slave to log the refusal")
    line = refusals(tcp_slave)[0]
    assert "TLS handshake failed" in line and "127.0.0.1" in line, line
    # Still serving the good client.
    with tcp_slave.control(timeout=10) as c:
        assert c.call("status")["pid"] == tcp_slave.pid


@pytest.mark.parametrize("who", ["other-session", "expired"])
def test_control_client_says_why_in_one_line(certs, tcp_slave, who):
    """The coordinator's own client with a bad certificate: one line, kind UNREACHABLE."""
    ctx = tls.HostFiles(certs[who]).client_context()
    with ControlClient(tcp_slave.spec.control, 10, ctx) as c:
        with pytest.raises(ControlError) as ei:
            c.call("status")
    assert ei.value.kind is Kind.UNREACHABLE
    msg = str(ei.value)
    # The alert's reason ("expired"), or, if our request raced it, the drop.
    assert "\n" not in msg and "refused our certificate" in msg, msg
    assert tcp_slave.spec.control in msg, msg


def test_client_checks_the_slave_name(certs, slaves):
    """A slave whose certificate does not name the address dialled is refused
    by the coordinator (the server-name check), in one line."""
    spec = slaves("s1", start=False)
    spec = dataclasses.replace(spec, control=f"tcp:127.0.0.1:{free_port()}",
                               tls=certs["misnamed"], client_tls=certs["good"])
    with pytest.raises(launch.LaunchError) as ei:
        slaves.restart(spec, timeout=5)
    msg = str(ei.value)
    assert "\n" not in msg and "does not name the address dialled" in msg, msg


def test_plaintext_tcp_is_refused_by_the_client(tcp_slave):
    """No context for a tcp: address: refused before connecting."""
    with pytest.raises(ControlError, match="TCP needs TLS"):
        ControlClient(tcp_slave.spec.control, 5).call("status")


def test_kept_connection_survives_a_slave_restart(tcp_slave, slaves):
    """A kept TCP+TLS connection to a slave that has since restarted: the
    next request goes to the new process (TCP, unlike a unix socket, lets us
    write to a connection the peer closed, so the client must notice first)."""
    spec = tcp_slave.spec
    with SlaveLink.from_spec(spec) as link:
        assert link.status()["pid"] == tcp_slave.pid
        tcp_slave.stop(timeout=10)
        new = slaves.restart(spec)
        assert link.status()["pid"] == new.pid
