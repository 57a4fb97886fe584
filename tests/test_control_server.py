"""The slave's control server: nothing can starve it, a freeze belongs to its
connection, only its owner (unix) or a certified peer (TCP+TLS) gets in.

Real nbdkit slaves where the data path or the process matters (SIGSTOP, the
descriptor limit, a second plugin); an in-process ``Slave`` with real volume
files and real sockets where only the server is under test.
"""

import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import psutil
import pytest
import trustme

from ctlrig import assert_aborted_by_its_connection, connect_nbd, log_text, raw, read_line
from cgtest import wait_until
from harness.sites import pause
from coordinator import launch
from nbdplugin.server import ControlServerError
from nbdplugin.slave import Slave
from nbdplugin.volume import Volume

G = 64 * 1024
MB = 1 << 20


def ask(s, **req) -> dict:
    s.sendall(json.dumps(req).encode() + b"\n")
    return json.loads(read_line(s))


@pytest.fixture
def inproc(run_dir):
    """Factory: an in-process Slave (one 1 MiB volume) serving ``address``."""
    made = []

    def make(address=None, ssl_context=None, **kw):
        d = tempfile.mkdtemp(dir=run_dir)
        vol = Volume("a", os.path.join(d, "a.img"), d, G, MB, create_size=MB)
        s = Slave({"a": vol}, d)
        made.append(s)
        s.start(address or os.path.join(d, "c.ctl"), ssl_context, **kw)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.shutdown()


# ------------------------------------------------------------ one socket, one owner

def test_second_slave_on_a_live_control_socket_is_refused(slaves, run_dir):
    """A second plugin given a live control path fails to start with one line
    naming the other pid; the first keeps its channel."""
    first = slaves("s1")
    spec = launch.SlaveSpec(name="s2", statedir=os.path.join(run_dir, "s2"),
                            nbd_socket=os.path.join(run_dir, "s2.sock"),
                            control=first.spec.control,
                            volumes=[("b", os.path.join(run_dir, "s2-b.img"), MB)])
    with pytest.raises(launch.LaunchError) as exc:
        slaves.restart(spec)
    assert (f"control socket {first.spec.control} is served by another process"
            f" (pid {first.pid}): stop it or choose another path") in str(exc.value)
    with first.control() as c:
        assert c.call("status")["pid"] == first.pid


def test_stale_control_socket_is_replaced(slaves, run_dir):
    """A leftover socket nobody listens on is removed and the slave starts."""
    spec = slaves("s1", start=False)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(spec.control)
    left.close()
    proc = slaves.restart(spec)
    with proc.control() as c:
        assert c.call("status")["pid"] == proc.pid


def test_a_file_that_is_not_a_socket_is_never_removed(inproc, run_dir):
    """A regular file at the control path is refused, not deleted."""
    path = os.path.join(run_dir, "not-a-socket")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(ControlServerError, match="exists and is not a socket"):
        inproc(path)
    with open(path) as f:
        assert f.read() == "keep me"


# ------------------------------------------------------------ nothing starves it

def test_200_concurrent_connects_meet_no_full_queue_and_extras_get_one_line(slaves):
    """200 connects at once: none meets a full queue (EAGAIN); 64 are served,
    the rest get one "busy" line and are closed; afterwards status answers."""
    proc = slaves()
    socks, eagain = [], 0
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            try:
                s.connect(proc.spec.control)
            except BlockingIOError:
                eagain += 1
        assert eagain == 0
        refused = {}

        def all_answered():
            for i, s in enumerate(socks):
                if i in refused:
                    continue
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                refused[i] = data
            return len(refused) >= 200 - 64

        wait_until(all_answered, timeout=60, what="136 refusals")
        assert len(refused) == 136
        for data in refused.values():
            reply = json.loads(data)
            assert reply["kind"] == "busy" and "too many control connections (64)" \
                in reply["error"]
        # The other 64 are served: a status request on each gets its answer
        # (a wrongly refused one would read its "busy" line here instead).
        for i, s in enumerate(socks):
            if i not in refused:
                s.settimeout(30)
                reply = ask(s, op="status")
                assert reply["ok"] and reply["pid"] == proc.pid, reply
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: _status_ok(proc), timeout=10, what="status after the burst")


def _waiting(proc, vol="a") -> int:
    """Host writes waiting at ``vol``'s closed gate (asked on a connection
    of its own: the freezing one stays as the test left it)."""
    with proc.control(timeout=10) as c:
        return c.call("status")["volumes"][vol]["waiting"]


def _status_ok(proc) -> bool:
    try:
        with proc.control(timeout=2) as c:
            return c.call("status")["pid"] == proc.pid
    except Exception:
        return False


def test_idle_connection_is_closed(inproc):
    """A connection that sends nothing is closed after the idle timeout, not
    before; one that keeps asking outlives it."""
    timeout = 2.0           # far above the gaps between asks, even on a busy machine
    s = inproc(idle_timeout=timeout)
    t0 = time.monotonic()
    busy, idle = raw(s.control_path), raw(s.control_path)
    idle.settimeout(0.05)
    try:
        while True:
            assert ask(busy, op="status")["ok"]
            try:
                if idle.recv(10) == b"":         # closed by the slave
                    break
                raise AssertionError("the idle connection got data")
            except TimeoutError:
                pass
            assert time.monotonic() - t0 < 60, "the idle connection was never closed"
        assert time.monotonic() - t0 >= timeout, "closed before the idle timeout"
        assert ask(busy, op="status")["ok"]      # older than the timeout, still served
    finally:
        busy.close()
        idle.close()


def test_accept_survives_the_descriptor_limit(slaves):
    """At RLIMIT_NOFILE the accept loop logs one line and backs off; NBD keeps
    serving, and the control channel answers again once descriptors free up."""
    proc = slaves()
    h = connect_nbd(proc)
    p = psutil.Process(proc.pid)
    old = p.rlimit(psutil.RLIMIT_NOFILE)
    clients = []
    try:
        p.rlimit(psutil.RLIMIT_NOFILE, (p.num_fds() + 2, old[1]))
        for _ in range(6):
            clients.append(raw(proc.spec.control))
        wait_until(lambda: "control: accept failed" in log_text(proc), timeout=10,
                   what="the accept failure's log line")
        h.pwrite(b"still served", 0)
        assert h.pread(12, 0) == b"still served"
        # One line per streak of failures, not one per retry (a second
        # streak only if a descriptor of the slave's own came free meanwhile).
        assert log_text(proc).count("control: accept failed") <= 2
    finally:
        p.rlimit(psutil.RLIMIT_NOFILE, old)
        for c in clients:
            c.close()
    wait_until(lambda: _status_ok(proc), timeout=10, what="status after EMFILE")
    h.shutdown()


# ------------------------------------------------------------ a freeze belongs to its connection

def test_closing_the_freezing_connection_aborts_the_cut_at_once(slaves):
    """A held host write goes through as soon as the connection that froze the
    cut closes (not at the lease); the cut is aborted and nothing is lost."""
    proc = slaves(volumes=[("a", MB)])
    h = connect_nbd(proc)
    h.pwrite(b"x", 0)
    s = raw(proc.spec.control)
    assert ask(s, op="freeze", n=1, lease_ms=30000)["ok"]
    done = []
    t = threading.Thread(target=lambda: (h.pwrite(b"y", G), done.append(time.monotonic())))
    t.start()
    wait_until(lambda: _waiting(proc) == 1, 30, "the write waiting at the gate")
    assert not done                       # held by the gate
    closed = time.monotonic()
    s.close()
    t.join(10)
    # At once, not at the 30 s lease (the bound only catches that on a busy machine).
    assert done and done[0] - closed < 10.0, "write held after its freezer left"
    print(f"write released {1000 * (done[0] - closed):.1f} ms after the close")
    assert_aborted_by_its_connection(proc, 1, {0, 1})
    h.shutdown()


def test_a_thawed_cut_outlives_its_connection(inproc):
    """After thaw the cut no longer depends on the establishing connection
    (the coordinator copies over others)."""
    slave = inproc()
    s = raw(slave.control_path)
    assert ask(s, op="freeze", n=1, lease_ms=30000)["ok"]
    assert ask(s, op="thaw", n=1)["ok"]
    s.close()
    wait_until(lambda: slave.server.connections == 0, what="the slave to see the close")
    assert slave.machine.phase.value == "cut"
    assert slave.handle(b'{"op":"abort","n":1}')["ok"]


def test_a_stale_freeze_after_sigstop_never_closes_the_gate(slaves):
    """FREEZE and ABORT sent to a stopped slave by a coordinator that then gave
    up: when the slave resumes, no gate closes and host writes flow."""
    proc = slaves(volumes=[("a", MB)])
    h = connect_nbd(proc)
    pause(proc.pid)
    try:
        s = raw(proc.spec.control)          # queued by the kernel while stopped
        s.sendall(b'{"op":"freeze","n":1,"lease_ms":20000}\n{"op":"abort","n":1}\n')
        s.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    def handled():
        if "refused a freeze whose connection is gone" in log_text(proc):
            return True
        with proc.control() as c:
            return c.call("status")["phase"] != "idle"

    wait_until(handled, timeout=10, what="the slave to handle the stale freeze")
    t0 = time.monotonic()
    h.pwrite(b"z", 0)
    assert time.monotonic() - t0 < 2.0, "a stale freeze held host writes"
    with proc.control() as c:
        assert c.call("status")["phase"] == "idle"
    h.shutdown()


# ------------------------------------------------------------ who may connect

def test_socket_is_0600_whatever_the_umask(inproc):
    """Under umask 000 the control socket is still 0600."""
    old = os.umask(0)
    try:
        s = inproc()
    finally:
        os.umask(old)
    assert os.stat(s.control_path).st_mode & 0o777 == 0o600


def test_a_peer_of_another_uid_is_refused(inproc, run_dir, caplog):
    """A connection from uid 65534 gets one "denied" line and is closed, even
    where the socket file would let it in."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    d = tempfile.mkdtemp(dir=run_dir)
    for p in (run_dir, d):
        os.chmod(p, 0o711)
    s = inproc(os.path.join(d, "c.ctl"))
    os.chmod(s.control_path, 0o666)          # what a careless operator might do
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # child: only plain syscalls, then _exit
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            c = raw(s.control_path, timeout=5)
            os.write(w, read_line(c) or b"EOF")
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            got = f.read()
    finally:
        os.waitpid(pid, 0)
    reply = json.loads(got)
    assert reply["kind"] == "denied" and "uid 65534" in reply["error"], got
    assert "control: refused a connection from uid 65534" in caplog.text
    ok = raw(s.control_path)
    assert ask(ok, op="status")["ok"]        # the owner still gets in
    ok.close()


# ------------------------------------------------------------ TCP with mutual TLS

@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    ca.issue_cert("127.0.0.1", "::1").configure_cert(server)

    def client(with_cert=True, authority=ca):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ca.configure_trust(ctx)
        if with_cert:
            authority.issue_cert("coordinator").configure_cert(ctx)
        return ctx

    return server, client


def tcp(slave, timeout=10.0):
    host, port = slave.address.removeprefix("tcp:").rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_tls_peer_with_a_certificate_is_served(inproc, pki, host):
    """A client with a certificate from the CA gets answers over TCP+TLS
    (IPv4 and IPv6)."""
    server, client = pki
    s = inproc(f"tcp:{host}:0", server)
    with client().wrap_socket(tcp(s), server_hostname=host.strip("[]")) as c:
        assert c.version() == "TLSv1.3"
        assert ask(c, op="status")["ok"]


@pytest.mark.parametrize("how", ["no certificate", "another CA"])
def test_tls_peer_without_a_good_certificate_is_refused(inproc, pki, how):
    """No certificate, or one from another CA: refused before any op is read."""
    server, client = pki
    s = inproc("tcp:127.0.0.1:0", server)
    ctx = client(with_cert=False) if how == "no certificate" else client(authority=trustme.CA())
    got = b""
    try:
        with ctx.wrap_socket(tcp(s), server_hostname="127.0.0.1") as c:
            c.sendall(b'{"op":"status"}\n')
            got = read_line(c)
    except (ssl.SSLError, ConnectionError):
        pass
    assert b'"ok"' not in got


def test_plaintext_and_stalled_handshakes_do_not_block_others(inproc, pki):
    """A plaintext peer gets no answer; a peer that never finishes the handshake
    is dropped after the deadline and blocks no one meanwhile."""
    server, client = pki
    s = inproc("tcp:127.0.0.1:0", server, handshake_timeout=0.5)
    stalled, plain = tcp(s), tcp(s)
    try:
        plain.sendall(b'{"op":"status"}\n')
        with client().wrap_socket(tcp(s), server_hostname="127.0.0.1") as c:
            assert ask(c, op="status")["ok"]
        try:
            assert b'"ok"' not in plain.recv(4096)
        except ConnectionResetError:
            pass
        t0 = time.monotonic()
        assert stalled.recv(10) == b""
        assert time.monotonic() - t0 < 5
    finally:
        stalled.close()
        plain.close()


@pytest.mark.parametrize("mode", ["none", "no client certs"])
def test_tcp_without_mutual_tls_is_refused(inproc, mode):
    """A TCP control address without a TLS context that requires client
    certificates does not start."""
    ctx = None
    if mode == "no client certs":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ControlServerError, match="tcp:127.0.0.1:0"):
        inproc("tcp:127.0.0.1:0", ctx)


def test_bad_address_is_one_line(inproc):
    """An unusable control address is refused in one line."""
    with pytest.raises(ControlServerError, match="unknown scheme 'udp'"):
        inproc("udp:1.2.3.4:5")


@pytest.mark.parametrize("control, says", [
    ("localhost:7000", "unknown scheme 'localhost'"),
    ("tcp:127.0.0.1:0", "needs mutual TLS (plaintext TCP is refused)"),
])
def test_plugin_refuses_a_bad_control_address(slaves, control, says):
    """nbdkit exits non-zero with one line naming the control address."""
    spec = slaves(start=False)
    cmd = [control if a.startswith("control=") else a for a in spec.command()]
    cmd[cmd.index(control)] = f"control={control}"
    os.makedirs(spec.statedir, exist_ok=True)
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert any(line.startswith("cgmirror: error: control=") and says in line
               for line in r.stderr.splitlines()), r.stderr
