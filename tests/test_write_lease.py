"""Primary write leases (issue 19, ``[cluster] fence = "lease"``):
native/gate.c's write deadline, nbdplugin/writelease.py against a real etcd
on loopback, real nodes with libnbd writers, and ``cgmirror failover``
waiting for the old site's lease."""

import dataclasses
import errno
import json
import os
import socket
import threading
import time

import pytest

import clishell
from cgtest import need, refused_start, short_dir, wait_until
from coordinator.link import SlaveLink
from harness.mirrorrig import mirror_session
from native.gate import Gate, WriteLeaseExpired, monotonic_ns
from nbdplugin.writelease import WriteLease, margin_s, parse_writer, writer_value
from wire.etcd import Etcd, EtcdError
# ---------------------------------------------------------------- the gate's write deadline
# (native/gate.c "The write lease"; no etcd, no nbdkit)


def test_gate_without_deadline_admits():
    """Deadline 0 (no lease mode): writes enter as before."""
    g = Gate()
    assert g.deadline == 0
    g.enter()
    g.leave()
    assert g.inside == 0


def test_gate_past_deadline_refuses_at_once_with_eio():
    """Past the deadline enter() raises EIO at once and admits nothing."""
    g = Gate()
    g.set_deadline(monotonic_ns() - 1)
    t0 = time.monotonic()
    with pytest.raises(WriteLeaseExpired) as ei:
        g.enter()
    assert time.monotonic() - t0 < 0.1
    assert ei.value.errno == errno.EIO and "no write lease" in str(ei.value)
    assert g.inside == 0 and g.waiting == 0
    with pytest.raises(WriteLeaseExpired):
        g.enter_seq()


def test_gate_before_deadline_admits_and_lapses_by_itself():
    """A future deadline admits; it passes with nothing running."""
    g = Gate()
    g.set_deadline(monotonic_ns() + 300_000_000)
    g.enter()
    g.leave()
    deadline = time.monotonic() + 5
    while True:
        try:
            g.enter()
            g.leave()
        except WriteLeaseExpired:
            break
        assert time.monotonic() < deadline, "the deadline never passed"
        time.sleep(0.01)
    g.set_deadline(0)
    g.enter()
    g.leave()


def test_gate_clock_is_python_monotonic():
    """monotonic_ns is CLOCK_MONOTONIC, the clock time.monotonic_ns reads."""
    a = time.monotonic_ns()
    b = monotonic_ns()
    c = time.monotonic_ns()
    assert a <= b <= c


def test_gate_held_write_fails_if_deadline_passed_while_held():
    """A write held by a closed gate across the deadline fails once admitted;
    the writers queued behind it still get their turn."""
    g = Gate()
    g.set_deadline(monotonic_ns() + 10_000_000_000)
    assert g.close(timeout=1)
    out = []

    def writer():
        try:
            g.enter()
            g.leave()
            out.append("in")
        except WriteLeaseExpired:
            out.append("refused")
    ts = [threading.Thread(target=writer) for _ in range(2)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 30
    while g.waiting < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    g.set_deadline(monotonic_ns() - 1)
    g.open()
    for t in ts:
        t.join(30)
    assert out == ["refused", "refused"] and g.inside == 0 and g.waiting == 0
    g.set_deadline(0)
    g.enter()
    g.leave()


def test_gate_deadline_out_of_range_is_refused():
    """A negative deadline is a bug, refused before C."""
    with pytest.raises(ValueError):
        Gate().set_deadline(-5)


# ---------------------------------------------------------------- the keeper against a real etcd

NAME = "wl"
# The write lease's ttl: renewals every second.  Three rather than two: on
# a loaded 2-core host an etcd write (the guarded put) was seen to take
# most of a second.  The leader's ttl_s is tests/test_leadership.py's.
TTL = 3
LEADER_TTL = 4


@pytest.fixture(scope="module")
def etcd_cluster():
    """A three-member etcd with TLS on loopback (harness/etcd.py), one for
    the module (starting one costs seconds), and its PKI: certificates for
    the nodes s1, r1 and the coordinator, which the sessions here use."""
    need("etcd", "etcdctl")
    from coordinator import pki
    from harness.etcd import EtcdCluster
    with short_dir() as d:
        pki_dir = os.path.join(d, "pki")
        pki.init(pki_dir, NAME)
        for name in ("s1", "r1", "coordinator"):
            pki.issue(pki_dir, name, ips=["127.0.0.1"])
        with EtcdCluster(os.path.join(d, "etcd"), pki_dir, n=3) as cluster:
            cluster.pki_dir = pki_dir
            yield cluster


@pytest.fixture
def etcd(etcd_cluster):
    """The module's etcd, every member running and healthy, and nothing
    under the session's keys (a test before may have stopped members or
    left keys)."""
    etcd_cluster.start_all()
    etcd_cluster.wait_healthy(60)
    etcd_cluster.clients = []
    c = client(etcd_cluster)
    c.delete_prefix(c.key(NAME, ""))
    try:
        yield etcd_cluster
    finally:
        for c in etcd_cluster.clients:
            c.close()


def client(etcd, endpoints=None, node="coordinator") -> Etcd:
    """A client as ``node`` (its certificate); closed at the end."""
    c = Etcd(endpoints or etcd.endpoints(), os.path.join(etcd.pki_dir, node), timeout=0.5)
    etcd.clients.append(c)
    return c


def keeper(etcd, site="a", node="s1", endpoints=None, gates=None) -> WriteLease:
    return WriteLease(client(etcd, endpoints, node), NAME, site, node, TTL,
                      gates if gates is not None else [Gate()])


def writes(gate: Gate) -> bool:
    """One write through ``gate``: taken (True) or refused (False)."""
    try:
        gate.enter()
    except WriteLeaseExpired:
        return False
    gate.leave()
    return True


def test_keeper_takes_the_lease_when_its_site_is_the_writer(etcd):
    """No P/writer yet: the first round creates it as site a and site a's
    node holds its lease: its key exists and its gates take writes."""
    g = Gate()
    k = keeper(etcd, gates=[g])
    assert not writes(g)                    # before the first round: refused
    assert k.round() and writes(g)
    c = client(etcd)
    assert parse_writer(c.get(c.key(NAME, "writer")).value) == "a"
    kv = c.get(c.key(NAME, "leases", "a", "s1"))
    assert kv is not None and kv.lease == k.lease
    st = k.status()
    assert st["held"] and 0 < st["expires_in_s"] <= TTL and st["writer"] == "a"
    k.stop()
    assert not writes(g) and c.get(c.key(NAME, "leases", "a", "s1")) is None


def test_keeper_creates_the_writer_as_the_direction_source(etcd):
    """No P/writer, the direction in etcd says b is the source: the first
    round creates P/writer = b, and site b's node takes its lease."""
    c = client(etcd)
    c.put(c.key(NAME, "state", "direction"), json.dumps({"source": "b", "seq": 7}))
    g = Gate()
    k = keeper(etcd, site="b", node="r1", gates=[g])
    assert k.round() and writes(g)
    assert parse_writer(c.get(c.key(NAME, "writer")).value) == "b"
    k.stop()


def test_keeper_of_the_other_site_takes_no_lease(etcd):
    """Site b's node, site a the writer: no key, writes refused, the status
    says why."""
    c = client(etcd)
    c.put(c.key(NAME, "writer"), writer_value("a"))
    g = Gate()
    k = keeper(etcd, site="b", node="r1", gates=[g])
    assert not k.round() and not writes(g)
    assert c.get_prefix(c.key(NAME, "leases") + "/") == []
    st = k.status()
    assert not st["held"] and st["writer"] == "a" and "site a is the writer" in st["why"]


def test_keeper_refuses_then_revokes_when_the_writer_moves(etcd):
    """P/writer moved to b: the next round refuses writes and the key goes;
    moved back with no b key left, the node takes a new lease."""
    g = Gate()
    k = keeper(etcd, gates=[g])
    assert k.round() and writes(g)
    c = client(etcd)
    c.put(c.key(NAME, "writer"), writer_value("b"))
    assert not k.round() and not writes(g)
    assert c.get_prefix(c.key(NAME, "leases", "a") + "/") == []
    # A key of site b blocks site a even once a is the writer again.
    lease_b = c.grant(TTL)
    c.put(c.key(NAME, "leases", "b", "r1"), b"{}", lease=lease_b)
    c.put(c.key(NAME, "writer"), writer_value("a"))
    assert not k.round() and not writes(g)
    assert "site b still holds write leases (r1)" in k.status()["why"]
    c.revoke(lease_b)
    assert k.round() and writes(g)
    k.stop()


def test_keeper_looks_again_after_its_put(etcd):
    """A key of site b that appears between the keeper's first look and its
    guarded put (a race, staged by creating it just before the put): the
    second look sees it, the new lease is revoked, writes stay refused."""
    c = client(etcd)
    c.put(c.key(NAME, "writer"), writer_value("a"))
    lease_b = c.grant(TTL)

    class Racing(Etcd):
        def put_if_value(self, *args, **kw):
            c.put(c.key(NAME, "leases", "b", "r1"), b"{}", lease=lease_b)
            return super().put_if_value(*args, **kw)
    e = Racing(etcd.endpoints(), os.path.join(etcd.pki_dir, "s1"), timeout=0.5)
    etcd.clients.append(e)
    g = Gate()
    k = WriteLease(e, NAME, "a", "s1", TTL, [g])
    assert not k.round() and not writes(g)
    assert "site b still holds write leases (r1)" in k.status()["why"]
    assert c.get(c.key(NAME, "leases", "a", "s1")) is None      # its lease revoked
    c.revoke(lease_b)


def test_keeper_deadline_lapses_when_etcd_is_gone_and_comes_back(etcd):
    """Every member stopped: no round succeeds, the deadline passes by
    itself within ttl - margin of the last good round; etcd back: the next
    round takes writes again (a new lease if the old one expired)."""
    g = Gate()
    k = keeper(etcd, gates=[g])
    before = monotonic_ns()
    assert k.round()
    after = monotonic_ns()
    # The deadline counts from the round's start, before its first request.
    span = int((TTL - margin_s(TTL)) * 1e9)
    assert before + span <= k.deadline <= after + span
    for i in range(3):
        etcd.kill(i)
    with pytest.raises(EtcdError):
        k.round()
    wait_until(lambda: not writes(g), TTL + 1, "writes refused")
    assert monotonic_ns() >= k.deadline
    etcd.start_all()
    etcd.wait_healthy(60)

    def renewed():
        try:
            return k.round()
        except EtcdError:
            return False
    wait_until(renewed, 30, "a round after etcd came back")
    assert writes(g)
    k.stop()


# ---------------------------------------------------------------- real nodes, real writers

SIZE = 4 << 20
PROBE = SIZE - 4096        # the samplers' block: the end of volume a


class Relay:
    """A TCP relay on loopback in front of one etcd member: a node given
    the relays' URLs reaches etcd only through them, so ``cut`` cuts that
    node off (as a partition does: its connections go silent and new ones
    are accepted but never answered) while every other client still gets
    through.  ``heal`` lets traffic through again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.cut_off = False
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:
                    c.close()
                    return
                self.socks.append(c)
                if self.cut_off:
                    continue            # held open, never answered
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                continue                # c is closed with the others
            u.settimeout(None)
            with self.lock:
                self.socks.append(u)
                if self.closed:
                    continue
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data or self.cut_off:
                    break
                b.sendall(data)
        except OSError:
            pass
        if self.cut_off:
            return                  # silent until heal or close ends it
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Silence: bytes in flight and new connections go nowhere."""
        self.cut_off = True

    def heal(self):
        """Traffic again; every connection so far ends (clients reconnect)."""
        with self.lock:
            self.cut_off = self.closed
            old, self.socks = self.socks, []
        for x in old:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()

    def close(self):
        """Stop; every socket it ever opened is closed (the pumps end)."""
        with self.lock:
            self.closed = True
            self.cut_off = True
        self.lsock.close()
        self.heal()


def session_text(etcd) -> str:
    return mirror_session(NAME, {"s1": "r1"}, ("a",), size=SIZE,
                          session={"pki": etcd.pki_dir},
                          mirror={"interval_ms": 100}) + f"""
[cluster]
etcd = {json.dumps(etcd.endpoints())}
ttl_s = {LEADER_TTL}
fence = "lease"
lease_ttl_s = {TTL}
"""


@pytest.fixture
def sh(run_dir, etcd):
    """The CLI shell (tests/clishell.py) on a session in lease mode; its
    nodes are stopped at the end."""
    need("nbdkit")
    with clishell.Shell(run_dir, session_text(etcd), name=f"{NAME}.toml") as shell:
        yield shell


class Sampler:
    """A libnbd writer of one node's host export that tries one 4 KiB
    write every ``every`` s and keeps (start, end, ok, errno) of each,
    reconnecting when the node goes away (a role change restarts it)."""

    def __init__(self, sock: str, every: float = 0.02):
        self.uri = f"nbd+unix:///a?socket={sock}"
        self.every = every
        self.log: list[tuple[float, float, bool, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import nbd
        h = None
        buf = b"\x5a" * 4096
        while not self.stop.is_set():
            if h is None:
                try:
                    h = nbd.NBD()
                    h.connect_uri(self.uri)
                except nbd.Error:
                    h = None
                    self.stop.wait(0.05)
                    continue
            t0 = time.monotonic()
            try:
                h.pwrite(buf, PROBE)
                self.log.append((t0, time.monotonic(), True, None))
            except nbd.Error as exc:
                self.log.append((t0, time.monotonic(), False, exc.errno))
                # EIO: the lease refusal (libnbd names errnos).  Anything
                # else (EPERM: libnbd's own answer for a read-only export,
                # a secondary's; a dead connection): connect again.
                if exc.errno != "EIO":
                    h = None        # dropped: libnbd closes it
            self.stop.wait(self.every)

    def close(self):
        self.stop.set()
        self.thread.join(30)

    def accepted(self):
        return [(s, e) for s, e, ok, _ in self.log if ok]

    def refused_since(self, t: float):
        return [(s, e, err) for s, e, ok, err in self.log if not ok and s >= t]


def assert_one_site_writes(*samplers: "Sampler") -> None:
    """No write one sampler's node took overlaps in time a write another's
    took: in start order, each accepted write starts after every accepted
    write of the other nodes ended."""
    events = sorted((s, e, i) for i, smp in enumerate(samplers) for s, e in smp.accepted())
    last_end = [float("-inf")] * len(samplers)
    for s, e, i in events:
        other = max(t for j, t in enumerate(last_end) if j != i)
        assert other < s, f"sampler {i} took a write at {s:.3f} while another's ended {other:.3f}"
        last_end[i] = max(last_end[i], e)


def node_status(sh, name: str) -> dict:
    with SlaveLink(name, sh.path(f"{name}.ctl"), session=NAME) as lk:
        return lk.status()


def test_node_writes_only_while_its_site_holds_the_lease(sh, etcd):
    """A primary in lease mode takes writes while its lease is held; every
    etcd member stopped, a libnbd writer gets EIO within lease_ttl + 1 s,
    each refusal at once, reads still served; etcd back, writes are taken
    again; the writer moved to site b, the node lets its lease go and
    refuses."""
    sh.ok("slave", "start")
    wait_until(lambda: node_status(sh, "s1")["write_lease"]["held"], 30, "the lease")
    st = node_status(sh, "s1")["write_lease"]
    assert st["writer"] == "a" and st["site"] == "a" and 0 < st["expires_in_s"] <= TTL
    s = Sampler(sh.path("s1.sock"))
    try:
        wait_until(lambda: len(s.accepted()) >= 5, 30, "writes accepted")
        t_stop = time.monotonic()
        for i in range(3):
            etcd.kill(i)
        wait_until(lambda: s.refused_since(t_stop), TTL + 1 + 1, "a refused write")
        first = min(r[0] for r in s.refused_since(t_stop))
        assert first - t_stop <= TTL + 1
        assert {r[2] for r in s.refused_since(t_stop)} == {"EIO"}
        wait_until(lambda: len(s.refused_since(t_stop)) >= 20, 30, "20 refusals")
        took = sorted(e - b for b, e, _ in s.refused_since(t_stop))
        # Refused at once: the median is a round trip through nbdkit; the
        # slowest, on a 2-core host shared with other suites, a scheduling
        # delay -- a write held for the lease would wait seconds (a
        # renewal, an etcd timeout).
        assert took[len(took) // 2] < 0.1 and took[-1] < 1.0, \
            f"refusals took {took[len(took) // 2]:.3f} s (median), {took[-1]:.3f} s (max)"
        st = node_status(sh, "s1")["write_lease"]
        assert not st["held"] and "etcd" in st["why"]
        import nbd
        h = nbd.NBD()
        h.connect_uri(s.uri)
        assert h.pread(4096, 0) is not None          # reads are served
        h.shutdown()
        etcd.start_all()
        etcd.wait_healthy(60)
        t_back = time.monotonic()
        wait_until(lambda: any(b >= t_back for b, _ in s.accepted()), 30,
                   "writes accepted again")
        # The writer moves: the node refuses, then its key goes.
        c = client(etcd)
        c.put(c.key(NAME, "writer"), writer_value("b"))
        t_moved = time.monotonic()
        wait_until(lambda: not c.get_prefix(c.key(NAME, "leases", "a") + "/"), TTL + 1,
                   "site a's key gone")
        t_gone = time.monotonic()
        assert not [x for x in s.accepted() if x[0] >= t_gone]
        wait_until(lambda: len(s.refused_since(t_gone)) >= 3, 10, "refusals")
        assert not [x for x in s.accepted() if x[0] >= t_gone]
        st = node_status(sh, "s1")["write_lease"]
        assert not st["held"] and st["writer"] == "b", st
        assert t_gone - t_moved <= TTL / 3 + 1
    finally:
        s.close()


def test_failover_waits_for_the_cut_off_site_lease_and_no_two_sites_write(sh, etcd):
    """Site a cut off from etcd (its primary alive, its host writing):
    ``cgmirror failover`` makes b the writer, waits until a's lease expired,
    then promotes b.  Writers sample both sites all along: the last write a
    took ends before the first write b takes starts.  a, back in touch with
    etcd, stays refused (b is the writer); ``resync --from b --to a`` and
    ``switchover --to a`` bring the writes back to a, and at no moment of
    it all did both sites take writes."""
    from coordinator import launch
    relays = [Relay(int(u.rsplit(":", 1)[1])) for u in etcd.endpoints()]
    samplers: list[Sampler] = []
    try:
        spec = dataclasses.replace(sh.node_spec("s1"), etcd=[r.url for r in relays])
        launch.start(spec, detach=True)
        sh.ok("secondary", "start")
        wait_until(lambda: node_status(sh, "s1")["write_lease"]["held"], 30, "a's lease")
        sh.start_mirror()
        sh.wait_hardened()
        sh.stop_mirror()
        a, b = Sampler(sh.path("s1.sock")), Sampler(sh.path("r1.sock"))
        samplers += [a, b]
        wait_until(lambda: len(a.accepted()) >= 5, 30, "writes at a")
        # When site a's last lease key went, as etcd saw it.
        c = client(etcd)
        gone: list[float] = []

        def watch_a():
            while not gone:
                if not c.get_prefix(c.key(NAME, "leases", "a") + "/"):
                    gone.append(time.monotonic())
                time.sleep(0.02)
            c.close()           # this thread's connections
        watcher = threading.Thread(target=watch_a, daemon=True)
        t_cut = time.monotonic()
        for r in relays:
            r.cut()
        watcher.start()
        p = sh.run("failover", timeout=300)
        t_done = time.monotonic()
        assert p.returncode == 0, p.stderr
        assert "site b is the writer now" in p.stderr, p.stderr
        watcher.join(30)
        try:
            wait_until(lambda: b.accepted(), 30, "writes at b")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: r1 {node_status(sh, 'r1').get('write_lease')},"
                                 f" sampler {b.log[-3:]}") from None
        first_b = min(s for s, _ in b.accepted())
        last_a = max(e for _, e in a.accepted())
        assert last_a < gone[0] < first_b, (
            f"site a took a write until {last_a - t_cut:.3f} s after the cut, its lease"
            f" went at {gone[0] - t_cut:.3f} s, site b took one from {first_b - t_cut:.3f} s")
        assert gone[0] - t_cut <= TTL + 1
        assert a.refused_since(t_cut)
        assert min(s for s, _, _ in a.refused_since(t_cut)) - t_cut <= TTL + 1
        assert first_b <= t_done + 30
        # a hears from etcd again: b is the writer, a stays refused.
        for r in relays:
            r.heal()
        wait_until(lambda: node_status(sh, "s1")["write_lease"]["writer"] == "b", 30,
                   "a reads the writer")
        t_heal = time.monotonic()
        wait_until(lambda: len(a.refused_since(t_heal)) >= 3, 10, "refusals at a")
        assert max(e for _, e in a.accepted()) == last_a
        st = node_status(sh, "r1")["write_lease"]
        assert st["held"] and st["writer"] == "b" and st["site"] == "b"
        # Back to a: a took writes b never got (split), so a resync names b
        # the winner; then a switchover: b lets its lease go before a is
        # promoted (s1 restarts under its supervisor, through the relays).
        sh.ok("resync", "--from", "b", "--to", "a")
        p = sh.run("switchover", "--to", "a", timeout=300)
        assert p.returncode == 0, p.stderr
        assert "site a is the writer now" in p.stderr, p.stderr
        wait_until(lambda: node_status(sh, "s1")["write_lease"]["held"], 30, "a's lease")
        t_back = time.monotonic()
        wait_until(lambda: any(s >= t_back for s, _ in a.accepted()), 30, "writes at a")
        assert not node_status(sh, "r1").get("write_lease", {}).get("held")
        assert_one_site_writes(a, b)
    finally:
        for s in samplers:
            s.close()
        for r in relays:
            r.close()


# ---------------------------------------------------------------- take_writer (failover's wait)

def role_switch(sh):
    from coordinator.roles.failover import RoleSwitch
    lines: list[str] = []
    return RoleSwitch(sh.session(), log=lines.append), lines


def test_take_writer_waits_until_the_old_site_lease_is_gone(sh, etcd):
    """Site a's keeper renews no more (cut off): take_writer makes b the
    writer and returns only once a's key expired in etcd."""
    k = keeper(etcd)
    assert k.round()
    rs, lines = role_switch(sh)
    t0 = time.monotonic()
    rs.take_writer("b", "failover")
    c = client(etcd)
    assert c.get_prefix(c.key(NAME, "leases", "a") + "/") == []
    assert parse_writer(c.get(c.key(NAME, "writer")).value) == "b"
    assert 0.5 < time.monotonic() - t0 <= TTL + 2 + 1
    assert any("waiting (at most" in line and "s1" in line for line in lines), lines
    rs.take_writer("b", "failover")         # again: nothing to wait for
    k.stop()


def test_take_writer_refuses_when_the_old_site_keeps_its_lease(sh, etcd):
    """A key of site a renewed past the bound (no keeper of ours does that:
    a stand-in for a broken one): refused in one line naming the key, and
    P/writer is site a again."""
    from coordinator.errors import FailoverError
    c = client(etcd)
    c.put(c.key(NAME, "writer"), writer_value("a"))
    lease = c.grant(TTL)
    c.put(c.key(NAME, "leases", "a", "s1"), b"{}", lease=lease)
    stop = threading.Event()

    def renew():
        r = client(etcd)
        while not stop.wait(0.3):
            r.keepalive(lease)
        r.close()
    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        rs, _ = role_switch(sh)
        with pytest.raises(FailoverError) as ei:
            rs.take_writer("b", "failover")
        msg = str(ei.value)
        assert "\n" not in msg and "site a still holds write leases" in msg, msg
        assert "/cgmirror/wl/leases/a/s1" in msg and "nothing was promoted" in msg
        assert parse_writer(c.get(c.key(NAME, "writer")).value) == "a"
    finally:
        stop.set()
        t.join(10)
        c.revoke(lease)


# ---------------------------------------------------------------- configuration

def test_session_in_lease_mode_passes_site_and_etcd_to_every_node(run_dir):
    """[cluster] fence = "lease": [[slave]] nodes are site a, [[secondary]]
    nodes site b; their command lines carry fence, etcd, site, lease_ttl
    and a certificate directory; fence = "none" passes none of them."""
    from coordinator import session as session_mod
    text = mirror_session(NAME, {"s1": "r1"}, ("a",), size=SIZE) + """
[cluster]
etcd = ["https://127.0.0.1:2379", "https://127.0.0.2:2379"]
fence = "lease"
lease_ttl_s = 3
"""
    path = os.path.join(run_dir, "s.toml")
    with open(path, "w") as f:
        f.write(text)
    s = session_mod.load(path)
    for node, site in ((s.slaves[0], "a"), (s.secondaries[0], "b")):
        cmd = node.spec().command()
        assert "fence=lease" in cmd and f"site={site}" in cmd and "lease_ttl=3" in cmd
        assert "etcd=https://127.0.0.1:2379,https://127.0.0.2:2379" in cmd
        assert any(c.startswith("tls=") and c.endswith(f"/{node.name}") for c in cmd)
        assert not any(c.startswith("etcd_prefix=") for c in cmd)
    with open(path, "w") as f:
        f.write(text.replace('fence = "lease"', 'fence = "none"'))
    cmd = session_mod.load(path).slaves[0].spec().command()
    assert not any(c.split("=")[0] in ("fence", "etcd", "site", "lease_ttl") for c in cmd)


def plain_spec(run_dir: str):
    """A node s1 of session NAME with one volume and no lease keys."""
    from coordinator import launch
    spec = launch.SlaveSpec(name="s1", statedir=os.path.join(run_dir, "s1"),
                            nbd_socket=os.path.join(run_dir, "s1.sock"),
                            control=os.path.join(run_dir, "s1.ctl"),
                            volumes=[("a", os.path.join(run_dir, "s1-a.img"), SIZE)])
    spec.session = NAME
    return spec


@pytest.mark.parametrize("keys, line", [
    (["fence=lease"], "fence=lease needs etcd="),
    (["fence=lease", "etcd=http://127.0.0.1:2379", "site=a"], "is not https://"),
    (["fence=lease", "etcd=https://127.0.0.1:2379", "site=c"], "site must be a or b"),
    (["fence=lease", "etcd=https://127.0.0.1:2379", "site=a", "lease_ttl=1"],
     "lease_ttl must be 2 to 60"),
    (["fence=maybe"], "fence must be none or lease"),
    (["site=a"], "site= only apply with fence=lease"),
])
def test_plugin_refuses_bad_lease_keys_in_one_line(run_dir, keys, line):
    """Each bad write-lease key of the plugin is one `cgmirror: error:` line."""
    need("nbdkit")
    spec = plain_spec(run_dir)
    cmd = spec.command()
    rc, err = refused_start(cmd + [f"tls={run_dir}"] + keys)
    errors = [e for e in err if e.startswith("cgmirror: error:")]
    assert rc == 1 and len(errors) == 1 and line in errors[0], err


def test_plugin_without_client_certificate_refuses_lease_mode_in_one_line(run_dir):
    """fence=lease with a tls= directory that holds no client certificate:
    one line naming what is missing, before serving."""
    need("nbdkit")
    spec = plain_spec(run_dir)
    rc, err = refused_start(spec.command() + [
        f"tls={run_dir}", "fence=lease", "etcd=https://127.0.0.1:2379", "site=a"])
    errors = [e for e in err if e.startswith("cgmirror: error:")]
    assert rc == 1 and len(errors) == 1 and "fence=lease: the etcd client" in errors[0], err
