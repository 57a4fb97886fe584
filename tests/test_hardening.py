"""Issue 16, items 8, 9 and 11, through real nbdkit slaves, real sockets and
real TLS: nobody without a certificate holds the slots the coordinator needs
(8), no start replaces a socket a live process serves (9), and a refused NBD
TLS handshake leaves one line in the node's log (11).
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import threading
import time

import pytest

from coordinator import group, launch
from coordinator.link import SlaveLink
from cgtest import wait_until
from tlsrig import free_port
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


# ------------------------------------------------------ item 8: connection slots

class Flood(threading.Thread):
    """Holds ``count`` idle connections (no TLS, no request) to each address
    (a unix path or a (host, port)) and reopens each one the server closes,
    as someone without a certificate would.  Bounded: at most
    ``MAX_CONNECTS`` connects and ``MAX_SECONDS`` seconds, then it stops."""

    MAX_CONNECTS = 20_000
    MAX_SECONDS = 90.0

    def __init__(self, targets: dict, count: dict):
        super().__init__(name="flood", daemon=True)
        self.targets, self.count = targets, count
        self.socks: dict = {name: [] for name in targets}
        self.connects = 0
        self.ready = threading.Event()      # every connection opened once
        self.halt = threading.Event()

    def _open(self, name):
        addr = self.targets[name]
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        self.connects += 1
        try:
            s.connect(addr)
        except BlockingIOError:
            pass                # TCP: in progress; unix: backlog full, retried later
        except OSError:
            s.close()
            return None
        return s

    def run(self):
        deadline = time.monotonic() + self.MAX_SECONDS
        try:
            while not self.halt.is_set() and time.monotonic() < deadline \
                    and self.connects < self.MAX_CONNECTS:
                for name, socks in self.socks.items():
                    for s in [s for s in socks if _closed(s)]:
                        socks.remove(s)
                        s.close()
                    while len(socks) < self.count[name] and self.connects < self.MAX_CONNECTS:
                        s = self._open(name)
                        if s is None:
                            break
                        socks.append(s)
                if all(len(v) >= self.count[k] for k, v in self.socks.items()):
                    self.ready.set()
                self.halt.wait(0.01)
        finally:
            self.ready.set()
            for socks in self.socks.values():
                for s in socks:
                    s.close()

    def __enter__(self) -> "Flood":
        self.start()
        assert self.ready.wait(60), "the flood never opened its connections"
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(30)


def _closed(s: socket.socket) -> bool:
    """The server closed ``s`` (or sent its one line before closing)."""
    p = select.poll()
    p.register(s, select.POLLIN | select.POLLRDHUP)
    if not p.poll(0):
        return False
    try:
        s.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _coordinator_gets_through(spec: launch.SlaveSpec, bound_s: float) -> None:
    """What the coordinator needs, each within ``bound_s``: a status (on a
    new control connection) and an establish (freeze and thaw on the gate
    socket), then the cut aborted again."""
    t0 = time.monotonic()
    with SlaveLink.from_spec(spec, timeout=bound_s) as link:
        replies = group.preflight([link])
        assert link.gate, "no gate socket in the status"
        assert time.monotonic() - t0 < bound_s
        n = group.next_n(replies)
        t1 = time.monotonic()
        group.establish([link], n, 10_000, 5_000)
        assert time.monotonic() - t1 < bound_s
        assert link.status()["phase"] == "cut"
        assert link.call("abort", n=n)["ok"]


def _gate(spec: launch.SlaveSpec, ctx=None):
    with SlaveLink.from_spec(spec) as link:
        link.status()
        return link.gate


def test_idle_unix_connections_never_lock_the_coordinator_out(slaves):
    """300 idle connections of the owner's uid on the control socket and 60
    on the gate socket, reopened as they are closed: status and a freeze/thaw
    still get through, each within 10 s (they got "too many control
    connections (64)" and a "busy" gate)."""
    proc = slaves("s1", volumes=[("a", 1 * MiB)])
    gate = _gate(proc.spec)
    with Flood({"control": proc.spec.control, "gate": gate},
               {"control": 300, "gate": 60}) as flood:
        _coordinator_gets_through(proc.spec, 10.0)
        assert flood.is_alive(), "the flood ended before the checks"
    assert flood.connects >= 360


def test_unauthenticated_tcp_connections_never_lock_the_coordinator_out(certs, slaves):
    """Idle TCP connections without TLS on the control port (80) and the gate
    port (40), reopened as they are closed: status and a freeze/thaw still get
    through within 10 s, and the node does not blame failed TLS handshakes."""
    spec = dataclasses.replace(
        slaves("s1", volumes=[("a", 1 * MiB)], start=False),
        control=f"tcp:127.0.0.1:{free_port()}", nbd=f"tcp:127.0.0.1:{free_port()}",
        nbd_socket="", tls=certs["server"], client_tls=certs["good"])
    slaves.restart(spec)
    port = lambda a: int(a.rsplit(":", 1)[1])            # noqa: E731
    targets = {"control": ("127.0.0.1", port(spec.control)),
               "gate": ("127.0.0.1", port(_gate(spec)))}
    start = len(read_log(spec))
    with Flood(targets, {"control": 80, "gate": 40}) as flood:
        _coordinator_gets_through(spec, 10.0)
        assert flood.is_alive(), "the flood ended before the checks"
    log = read_log(spec)[start:]
    assert "TLS handshake failed" not in log and "refused a TLS connection" not in log, log


def test_a_stalled_tls_handshake_is_closed_within_the_deadline(certs, slaves):
    """A TCP connection that never starts TLS is closed by the control port
    and by the gate port within the 2 s deadline (plus scheduling)."""
    spec = dataclasses.replace(
        slaves("s1", volumes=[("a", 1 * MiB)], start=False),
        control=f"tcp:127.0.0.1:{free_port()}", nbd=f"tcp:127.0.0.1:{free_port()}",
        nbd_socket="", tls=certs["server"], client_tls=certs["good"])
    slaves.restart(spec)
    for address in (spec.control, _gate(spec)):
        host, port = address.removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=15) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b""
            took = time.monotonic() - t0
        assert 1.5 < took < 6, f"{address}: closed after {took:.1f} s"


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
