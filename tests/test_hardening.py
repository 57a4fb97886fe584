"""Issue 16, items 8, 9 and 11, through real nbdkit slaves, real sockets and
real TLS: nobody without a certificate holds the slots the coordinator needs
(8), no start replaces a socket a live process serves (9), and a refused NBD
TLS handshake leaves one line in the node's log (11).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

from coordinator import launch
from tests.conftest import wait_until
from tests.tlsrig import free_port
from wire import tls

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


def read_log(spec: launch.SlaveSpec) -> str:
    with open(spec.logfile, errors="replace") as f:
        return f.read()


def nbd_reads(uri: str, host_dir: str | None = None) -> bytes:
    """Connect to ``uri``, read its first sector, disconnect."""
    h = nbd.NBD()
    if host_dir:
        tls.libnbd_setup(h, host_dir)
    h.connect_uri(uri)
    try:
        return h.pread(512, 0)
    finally:
        h.shutdown()


# ------------------------------------------------------------ item 9: sockets

def _second(spec: launch.SlaveSpec, run_dir: str, **paths) -> launch.SlaveSpec:
    """Another session's slave: its own state directory and volume, and
    whatever paths ``paths`` takes over from ``spec``."""
    own = {"nbd_socket": os.path.join(run_dir, "intruder.sock"),
           "control": os.path.join(run_dir, "intruder.ctl")}
    return dataclasses.replace(
        spec, name="intruder", statedir=os.path.join(run_dir, "intruder"),
        volumes=[("a", os.path.join(run_dir, "intruder-a.img"), 1 * MiB)],
        **{**own, **paths})


@pytest.mark.parametrize("which", ["nbd_socket", "control"])
def test_start_never_replaces_a_live_socket(slaves, run_dir, which):
    """A start naming another live slave's NBD or control socket fails in one
    line naming the path and the pid; the live slave goes on serving."""
    r1 = slaves("r1", volumes=[("a", 1 * MiB)])
    theirs = getattr(r1.spec, which)
    other = _second(r1.spec, run_dir, **{which: theirs})
    with pytest.raises(launch.LaunchError) as ei:
        launch.start(other, timeout=30, detach=True)
    msg = str(ei.value)
    assert "\n" not in msg and theirs in msg and f"pid {r1.pid}" in msg, msg
    assert "(empty log)" not in msg
    # r1 still owns both of its sockets.
    assert os.path.exists(r1.spec.nbd_socket) and os.path.exists(r1.spec.control)
    nbd_reads(r1.spec.uri("a"))
    with r1.control(10) as c:
        assert c.call("status")["pid"] == r1.pid


def test_start_removes_a_stale_nbd_socket(slaves, run_dir):
    """A socket file nobody listens on (nbdkit 1.32 leaves one after SIGTERM)
    is a leftover: the start removes it and serves there."""
    spec = slaves("r1", volumes=[("a", 1 * MiB)], start=False)
    os.makedirs(os.path.dirname(spec.nbd_socket), exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(spec.nbd_socket)         # bound, never listening: refused
    proc = slaves.restart(spec, detach=True)
    nbd_reads(spec.uri("a"))
    assert launch.running_pid(spec) == proc.pid


def test_stop_leaves_a_socket_another_slave_serves(slaves, run_dir):
    """``launch.stop`` of a slave that is not running removes its stale
    sockets only: a path a live slave serves stays."""
    r1 = slaves("r1", volumes=[("a", 1 * MiB)])
    other = _second(r1.spec, run_dir, nbd_socket=r1.spec.nbd_socket)
    assert launch.stop(other) is False
    nbd_reads(r1.spec.uri("a"))


# ------------------------------------------------------ item 11: TLS refusals

def test_detached_node_logs_refused_nbd_tls_handshakes(certs, slaves):
    """A detached node (``cgmirror slave|secondary start``) logs one line per
    refused NBD TLS handshake: a second CA's certificate, an expired one.
    (nbdkit's own daemon mode sent these lines to /dev/null.)"""
    spec = dataclasses.replace(
        slaves("s1", volumes=[("a", 1 * MiB)], start=False),
        control=f"tcp:127.0.0.1:{free_port()}", nbd=f"tcp:127.0.0.1:{free_port()}",
        nbd_socket="", tls=certs["server"], client_tls=certs["good"])
    slaves.restart(spec, detach=True)
    start = len(read_log(spec))
    for who in ("other-session", "expired"):
        with pytest.raises(nbd.Error):
            nbd_reads(spec.uri("a"), certs[who])

    def refusals():
        return [line for line in read_log(spec)[start:].splitlines()
                if "gnutls_handshake" in line]
    wait_until(lambda: len(refusals()) >= 2, timeout=20,
               what="two refused handshakes in the node's log")
    lines = refusals()
    assert len(lines) == 2, lines
    assert "Error in the certificate." in lines[0], lines           # second CA
    assert "Error in the certificate verification." in lines[1], lines  # expired
    assert nbd_reads(spec.uri("a"), certs["good"]) == b"\0" * 512   # still serves
