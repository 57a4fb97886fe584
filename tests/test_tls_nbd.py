"""NBD over TCP with mutual TLS: real nbdkit (``--tls=require --tls-certificates
DIR --tls-verify-peer``) and real libnbd clients, certificates from ``pki``.

A client with a certificate the session issued reads and writes; a client with
no certificate, one of a foreign CA, an expired one, one of another session,
or no TLS at all is refused, and nbdkit logs the refusal.
"""

from __future__ import annotations

import os

import pytest

from coordinator import launch
from cgtest import need, wait_until
from tlsrig import Server, free_port
from wire import tls

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def memory_server(certs, memory_servers):
    """The server of most tests: its certificate names 127.0.0.1 and localhost."""
    return memory_servers(certs["server"])


def client(host_dir: str | None, port: int, host: str = "127.0.0.1"):
    """A libnbd handle connected over TCP; TLS from ``host_dir`` (None: plaintext)."""
    h = nbd.NBD()
    h.set_handle_name("test-client")
    if host_dir is not None and os.path.exists(os.path.join(host_dir, tls.CLIENT_CERT)):
        tls.libnbd_setup(h, host_dir)
    elif host_dir is not None:
        # A client of someone else: TLS with our CA but no certificate of its
        # own (libnbd_setup refuses such a directory, so set libnbd directly).
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(host_dir)
    h.connect_tcp(host, str(port))
    return h


def test_good_certificate_reads_and_writes(certs, memory_server):
    """A client with a certificate of the session writes, reads back, over TLS."""
    h = client(certs["good"], memory_server.port)
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"\xa5" * 4096, 8192)
        h.flush()
        assert h.pread(4096, 8192) == b"\xa5" * 4096
    finally:
        h.shutdown()


@pytest.mark.parametrize("who", ["no-cert", "foreign-ca", "expired", "other-session"])
def test_bad_client_certificate_refused(certs, memory_server, who):
    """A client whose certificate is missing, foreign, expired or of another
    session gets no export, and nbdkit logs why."""
    with pytest.raises(nbd.Error):
        h = client(certs[who], memory_server.port)
        h.pread(512, 0)
    wait_until(lambda: "error" in memory_server.log(), timeout=10,
               what="nbdkit to log the refusal")
    # One line, e.g. "nbdkit: memory[2]: error: gnutls_handshake: Error in the
    # certificate. (11/20)" ("... certificate verification." when expired).
    lines = memory_server.log().strip().splitlines()
    assert len(lines) == 1 and "gnutls_handshake" in lines[0], lines


def test_plaintext_client_refused(memory_server):
    """A client that does not start TLS is refused before any export."""
    with pytest.raises(nbd.Error, match="requires TLS"):
        client(None, memory_server.port)
    # nbdkit answers NBD_REP_ERR_TLS_REQD and logs nothing: no secret was
    # offered, nothing was served.


def test_client_checks_server_name(certs, memory_servers):
    """libnbd refuses a server whose certificate does not name the host dialled."""
    misnamed = memory_servers(certs["misnamed"])     # names elsewhere.example only
    with pytest.raises(nbd.Error, match="certificate"):
        client(certs["good"], misnamed.port, host="127.0.0.1")
    h = client(certs["good"], memory_servers(certs["server"]).port, host="localhost")
    h.shutdown()


def test_our_plugin_serves_over_tls(certs, run_dir, tmp_path):
    """The slave's own nbdkit command, moved from its unix socket to TCP with
    mutual TLS: a session client writes and reads a volume, a client of
    another session is refused."""
    need("nbdkit")
    spec = launch.SlaveSpec(name="s1", statedir=os.path.join(run_dir, "s1"),
                            nbd_socket=os.path.join(run_dir, "s1.sock"),
                            control=os.path.join(run_dir, "s1.ctl"),
                            volumes=[("a", os.path.join(run_dir, "a.img"), 1 << 20)])
    os.makedirs(spec.statedir)
    port = free_port()
    cmd = spec.command()
    i = cmd.index("-U")
    cmd[i:i + 2] = ["-i", "127.0.0.1", "-p", str(port), *tls.nbdkit_args(certs["server"])]
    srv = Server(cmd, str(tmp_path / "slave.log"), port)
    try:
        srv.wait_ready()
        h = nbd.NBD()
        h.set_export_name("a")
        tls.libnbd_setup(h, certs["good"])
        h.connect_tcp("127.0.0.1", str(port))
        try:
            h.pwrite(b"\x5a" * 65536, 65536)
            assert h.pread(65536, 65536) == b"\x5a" * 65536
        finally:
            h.shutdown()
        bad = nbd.NBD()
        bad.set_export_name("a")
        tls.libnbd_setup(bad, certs["other-session"])
        with pytest.raises(nbd.Error):
            bad.connect_tcp("127.0.0.1", str(port))
        wait_until(lambda: "gnutls_handshake" in srv.log(), timeout=10,
                   what="the slave's nbdkit to log the refusal")
    finally:
        srv.stop()
