"""Failover, failback, resync and DR test across the namespace sites
(harness/sites.py): primary s1 in site ``a``, secondary r1 in site ``b``, the
coordinator and every client in site ``c``.

The root namespace never connects to a node.  Everything the coordinator
does runs in one driver process inside ``c`` (this module run as ``python
-m tests.test_failover_sites``), which the test steps one JSON line at a
time (``Driver``) so that it can cut and heal links, in the hub, between
the steps.  The driver starts every node inside its own site (``ip netns
exec``) under its supervisor (``SiteSupervisors``: the stand-in for each
host's service manager, which starts a node again after its role op),
keeps them as its children and stops them when told to quit; ``Sites``
kills whatever is left in its namespaces.

The scenarios are those of tests/test_failover.py (one host), with the same
session, the same writes (``failoverrig.Writes``: the dependent-write
workload plus scattered blocks, so that S and T are known exactly) and the
same counting at the receiving end (a secondary's ``replication_bytes``).

Transport: a ``[[secondary]]`` has only unix sockets today (``nbd_socket``,
``control``; ``replication_uri`` builds ``nbd+unix`` URIs, and
``direction.oriented`` drops a primary's TCP fields when it is demoted), so
a node that changes role is reached over unix sockets, which network
namespaces do not separate.  One test puts s1 on TCP with mutual TLS and
stops after the failover (a real cut: nothing of the coordinator's reaches
s1); the round trips keep s1 on unix sockets and stop it (SIGSTOP) while
site a is cut off, so that no call to it could succeed.  The link cut
mid-resync needs a replication link over TCP: not here yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402

from cgtest import wait_until  # noqa: E402
from failoverrig import G, LAYOUT, NBLOCKS, SESSION, SIZE, VOLS, Writes  # noqa: E402
from failoverrig import session_text  # noqa: E402
from harness import workload as wl  # noqa: E402
from coordinator import cli, direction, launch  # noqa: E402
from coordinator import session as session_mod  # noqa: E402
from coordinator.link import SlaveLink  # noqa: E402
from coordinator.mirror import Mirror  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SITE = {"s1": "a", "r1": "b"}        # node -> the site it runs in
STEP_TIMEOUT = 120.0


# ------------------------------------------------------------ inside ``c``

class SiteSupervisors:
    """Each node runs inside its site under ``launch.supervise`` (what
    ``cgmirror node run`` and a detached start run), as a child of the
    driver: a role op's exit 75 is followed by a start in the recorded
    role, as each host's service manager does; nothing of the coordinator
    restarts a node.  ``start`` is the host's boot (after a kill -9, or
    with failpoints ``env`` armed in every start)."""

    CODE = ("import sys; from coordinator.launch import SlaveSpec, supervise;"
            " sys.exit(supervise(SlaveSpec.from_json(sys.argv[1])))")

    def __init__(self, netns: dict[str, str]):
        self.netns = netns
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, launch.SlaveSpec] = {}
        self.armed: dict[str, dict] = {}        # node -> env of its every start

    def start(self, spec):
        self.stop(spec.name)
        spec = dataclasses.replace(spec, env=self.armed.get(spec.name, {}))
        spec.region = G         # as tests/test_failover.py: exact counts after kill -9
        log = open(spec.logfile if os.path.isdir(spec.statedir) else os.devnull, "ab")
        with log:
            self.procs[spec.name] = subprocess.Popen(
                ["ip", "netns", "exec", self.netns[SITE[spec.name]], sys.executable, "-c",
                 self.CODE, spec.to_json()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        self.specs[spec.name] = spec
        wait_until(lambda: self._answers(spec), 60, f"{spec.name} to answer")

    def _answers(self, spec) -> bool:
        p = self.procs[spec.name]
        assert p.poll() is None, f"{spec.name}'s supervisor exited {p.returncode}"
        try:
            with SlaveLink.from_spec(spec, timeout=2) as lk:
                return lk.status()["pid"] == launch.running_pid(spec)
        except Exception:
            return False

    def stop(self, name: str):
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)     # stops nbdkit cleanly, starts nothing
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        # A supervisor killed before its nbdkit (never here): its nbdkit dies
        # with it (nbdkit sets PR_SET_PDEATHSIG).

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)


class Node:
    """The driver: one session, its nodes, the steps the test names."""

    def __init__(self, base: str, netns: dict[str, str]):
        self.base = base
        self.path = os.path.join(base, "f.toml")
        self.session = session_mod.load(self.path)
        self.launcher = SiteSupervisors(netns)
        self.cfgs = {c.name: c for c in [*self.session.slaves, *self.session.secondaries]}
        # The workload and the checker dial TCP nodes with the coordinator's
        # certificate (None: every node is on unix sockets).
        wl.TLS_DIR = self.session.slaves[0].client_tls
        self.logs: list[str] = []
        self.mirror: Mirror | None = None
        self.thread: threading.Thread | None = None

    def uris(self, node):
        return [self.cfgs[node].spec().uri(v) for v in VOLS]

    def _link(self, node):
        return SlaveLink.from_spec(self.cfgs[node].spec(), timeout=30)

    # -- steps (each returns something JSON can carry)

    def start(self):
        for cfg in [*self.session.slaves, *self.session.secondaries]:
            self.launcher.start(cfg.spec())

    def workload(self, node, records, resume=True):
        w = Writes()
        w.workload(self.uris(node), records, resume)
        return {**{v: sorted(b) for v, b in w.blocks.items()},
                "records": {v: sorted(r) for v, r in w.records.items()}}

    def scatter(self, node, count, seed):
        """``failoverrig.Writes.scatter`` through ``workload.Device``
        (which dials a TCP node with TLS)."""
        rng, out = random.Random(seed), {}
        for v, uri in zip(VOLS, self.uris(node)):
            dev = wl.Device(uri, "scatter")
            try:
                out[v] = sorted(rng.sample([b for b in range(NBLOCKS) if b % 8], count))
                for b in out[v]:
                    dev.pwrite(rng.randbytes(G), b * G)
                dev.h.flush()
            finally:
                dev.close()
        return out

    def group(self, source):
        m = Mirror(direction.oriented(self.session, source), log=self.logs.append,
                   serve_control=False).open()
        try:
            res = m.run_once()
            assert res.outcome == "hardened", (res, self.logs[-5:])
            return res.n
        finally:
            m.close()

    def cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["-s", self.path, *argv])
        return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

    def check(self, node):
        rep = wl.check_targets(self.uris(node), LAYOUT)
        assert rep.ok, rep.summary()
        return rep.heads

    def status(self, node):
        with self._link(node) as lk:
            return lk.status()

    def call(self, node, op, **args):
        with self._link(node) as lk:
            return lk.call(op, **args)

    def reachable(self, node):
        """Does ``node`` answer within 2 s?"""
        try:
            with SlaveLink.from_spec(self.cfgs[node].spec(), timeout=2) as lk:
                lk.status()
            return True
        except Exception:
            return False

    def replication_bytes(self, node):
        return sum(v["replication_bytes"] for v in self.status(node)["volumes"].values())

    def arm(self, node, points):
        """``points`` armed in every start of ``node``'s supervisor from now
        (restarted now if it runs; a failpoint of one role fires only in
        that role)."""
        self.launcher.armed[node] = {"CGMIRROR_FAILPOINTS": points}
        if node in self.launcher.procs:
            self.launcher.start(self.cfgs[node].spec())

    def pid(self, node):
        return launch.running_pid(self.launcher.specs[node])

    def running(self, node):
        return launch.running_pid(self.cfgs[node].spec()) is not None

    def restart(self, node):
        """Its host starts it again (in the role it recorded), unarmed."""
        self.launcher.armed.pop(node, None)
        self.launcher.start(self.cfgs[node].spec())

    def mirror_start(self):
        self.mirror = Mirror(self.session, log=self.logs.append).open()
        self.thread = threading.Thread(target=self.mirror.run, daemon=True)
        self.thread.start()

    def mirror_state(self):
        m = self.mirror
        return {"hardened": m.hardened, "phase": m.phase, "paused": m.paused}

    def mirror_stop(self):
        self.mirror.stop()
        self.thread.join(60)
        self.mirror.close()


def serve(base: str, netns: dict[str, str]) -> None:
    """Answer one JSON line per request line on stdin: ``[step, args...]``
    -> ``{"ok": result}`` or ``{"error": text}``.  Everything else the
    coordinator prints goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    node = Node(base, netns)
    try:
        for line in sys.stdin:
            op, *args = json.loads(line)
            if op == "quit":
                break
            try:
                out = {"ok": getattr(node, op)(*args)}
            except BaseException as exc:   # the test shows it; the driver goes on
                traceback.print_exc()
                out = {"error": f"{op}: {type(exc).__name__}: {exc}"[:2000]}
            reply.write(json.dumps(out, default=sorted) + "\n")
    finally:
        if node.mirror is not None and node.thread.is_alive():
            node.mirror_stop()
        node.launcher.stop_all()
        print("\n".join(node.logs), file=sys.stderr)


# ------------------------------------------------------------ root namespace

class Driver:
    """The driver process inside ``c``; ``d(step, *args)`` runs one step."""

    def __init__(self, net, base: str, tcp: bool = False):
        self.net, self.base = net, base
        text = self._tcp_primary() if tcp else SESSION
        with open(os.path.join(base, "f.toml"), "w") as f:
            f.write(text)
        self.log = open(os.path.join(base, "driver.log"), "ab")
        netns = {s: net[s].netns for s in ("a", "b")}
        self.proc = net["c"].popen([sys.executable, "-m", "tests.test_failover_sites",
                                    base, json.dumps(netns)], cwd=ROOT, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=self.log)

    def _tcp_primary(self) -> str:
        """s1's control and host exports on site a's address, mutual TLS
        from the session's PKI (r1 keeps its unix sockets: see the module
        doc)."""
        from coordinator import pki
        from harness.mirrorrig import tcp_node
        from harness.sites import free_port
        a = self.net["a"]
        pki.init(os.path.join(self.base, "pki"), "f")
        pki.issue(os.path.join(self.base, "pki"), "s1", ips=[a.addr])
        pki.issue(os.path.join(self.base, "pki"), "coordinator")
        return session_text(session={"pki": "pki"},
                               nodes={"s1": tcp_node(a.addr, lambda: free_port(a))})

    def __call__(self, op, *args, timeout: float = STEP_TIMEOUT):
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"driver: no answer to {op} in {timeout:g} s"
        line = self.proc.stdout.readline()
        assert line, f"driver died during {op}: see {self.log.name}"
        doc = json.loads(line)
        assert "error" not in doc, doc["error"]
        return doc["ok"]

    def close(self):
        try:
            self.proc.stdin.write('["quit"]\n')
            self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass                # Sites stops it
        self.log.close()

    def images(self, node):
        out = []
        for v in VOLS:
            with open(os.path.join(self.base, f"{node}-{v}.img"), "rb") as f:
                out.append(f.read())
        return out

    def assert_equal(self):
        for v, x, y in zip(VOLS, self.images("s1"), self.images("r1")):
            if x != y:
                bad = [b for b in range(SIZE // G) if x[b * G:(b + 1) * G] != y[b * G:(b + 1) * G]]
                raise AssertionError(f"volume {v} differs in blocks {bad[:10]}")


def union(*writes: dict) -> int:
    """|the union of the blocks of ``writes``|, over every volume."""
    return sum(len(set().union(*(set(w.get(v, ())) for w in writes))) for v in VOLS)


def sent(writes: list[dict], whole: list[dict] = ()) -> int:
    """Bytes a live primary's next group sends for ``writes`` (workloads:
    their 4 KiB records; scatters: whole blocks), with the blocks of
    ``whole`` (marked from the other site) whole: ``failoverrig.Writes.sent``."""
    w = Writes()
    for x in writes:
        for v in VOLS:
            w.blocks[v] |= set(x.get(v, ()))
            if "records" in x:
                w.records[v] |= set(x["records"][v])
            else:
                w.whole[v] |= set(x.get(v, ()))
    return w.sent({v: set().union(*(set(x.get(v, ())) for x in whole)) for v in VOLS})


@pytest.fixture
def d(sites, run_dir):
    from cgtest import need
    need("nbdkit")
    drv = Driver(sites, run_dir)
    try:
        yield drv
    finally:
        drv.close()
        with open(drv.log.name, errors="replace") as f:
            print(f.read()[-6000:])


def split(d, net, freeze: bool = True) -> tuple[list, int]:
    """Mirror a workload; leave writes at s1 that never reach r1; cut site
    a off (``freeze``: its node stopped too, where the cut alone would not
    keep the coordinator from it); fail over; write at r1.  Returns ([S, T],
    h)."""
    d("start")
    d("workload", "s1", 40, False)
    d("group", "a")                                  # the first full copy
    d("workload", "s1", 20)
    h = d("group", "a")
    d("check", "r1")                                 # r1's host export: group h
    for _ in range(2):
        d("call", "s1", "checkpoint")
    old = [d("workload", "s1", 15), d("scatter", "s1", 6, 1)]   # S: never replicated
    net.cut("a", "b")
    net.cut("a", "c")
    if freeze:
        os.kill(d("pid", "s1"), signal.SIGSTOP)      # the site is gone, not down
    assert not d("reachable", "s1")
    try:
        res = d("cli", "failover")
        assert res["rc"] == 0, res["err"]
        assert d("status", "r1")["role"] == "primary"
        d("check", "r1")                             # the new primary: group h
        new = [d("workload", "r1", 12), d("scatter", "r1", 5, 2)]   # T
        d("check", "r1")
    finally:
        if freeze:
            os.kill(d("pid", "s1"), signal.SIGCONT)
        net.heal("a", "c")
        net.heal("a", "b")
    return old + new, h


# ------------------------------------------------------------ tests

def test_failover_with_the_primary_site_cut_off_then_failback(d, sites):
    """Failover with site a cut off and its node frozen; the new primary
    takes writes; site a comes back with its unreplicated writes (still a
    primary); the resync b -> a sends exactly |S u T| blocks, counted at
    s1; both sites byte-equal; the checker passes at every step;
    switchover makes site a the primary again."""
    writes, h = split(d, sites)
    assert d("status", "s1").get("role", "primary") == "primary"   # came back as it was
    res = d("cli", "resync", "--from", "b", "--to", "a")
    assert res["rc"] == 0, res["err"]
    assert d("status", "s1")["role"] == "secondary"
    want = union(*writes)
    assert want > 0 and d("replication_bytes", "s1") == want * G, (
        d("replication_bytes", "s1") // G, want)
    d.assert_equal()
    d("check", "s1")
    res = d("cli", "switchover")
    assert res["rc"] == 0, res["err"]
    assert d("status", "s1").get("role", "primary") == "primary"
    more = d("workload", "s1", 10)
    before = d("replication_bytes", "r1")
    d("group", "a")
    assert d("replication_bytes", "r1") - before == sent([more])
    d.assert_equal()
    d("check", "r1")


def test_failover_over_tcp_with_the_primary_site_cut_off(sites, run_dir):
    """s1 on TCP with mutual TLS (control and host exports), the
    coordinator and clients in c: with the cut, no packet reaches s1, which
    keeps running as a primary; failover needs nothing of it, r1 takes
    writes and passes the checker.  (The failback would demote s1, which
    needs TCP secondaries: see the module doc.)"""
    from cgtest import need
    need("nbdkit")
    drv = Driver(sites, run_dir, tcp=True)
    try:
        _, h = split(drv, sites, freeze=False)
        assert drv("status", "s1").get("role", "primary") == "primary"
        # The direction lives on the nodes: r1 holds the failover's record;
        # s1, cut off when it was written (the first record), holds none,
        # and the highest record of those that answer is the failover's.
        rec = drv("status", "r1")["record"]
        assert {k: rec.get(k) for k in ("source", "from", "state", "hardened", "by")} == {
            "source": "b", "from": "a", "state": "failed-over", "hardened": h,
            "by": "failover"}, rec
        assert drv("status", "s1")["record"] is None
        assert not os.path.exists(os.path.join(run_dir, "state", "direction.json"))
    finally:
        drv.close()


@pytest.mark.parametrize("side, point", [
    ("s1", "secondary:after-write@7"),           # the target, mid-drain
    ("r1", "copy:mid"),                          # the source, mid-copy
])
def test_kill_mid_resync_across_sites(d, sites, side, point):
    """kill -9 of the target or of the source mid-resync: the target keeps
    its last consistent image (checker), the next run resumes, sends no
    more than S u T, and both sites end equal."""
    if side == "r1":
        d("arm", "r1", point)                        # fires once it is a primary
    writes, _ = split(d, sites)
    if side == "s1":
        d("arm", "s1", point)                        # fires once it is a secondary
    res = d("cli", "resync", "--from", "b", "--to", "a")
    assert res["rc"] != 0, "the failpoint did not fire"
    assert not d("running", side), f"{side} was not killed"
    d("restart", side)                               # its host starts it again
    if side == "s1":
        assert sum(v["undo_blocks"] for v in d("status", "s1")["volumes"].values())
        d("check", "s1")                             # its last consistent image
    before = d("replication_bytes", "s1")
    res = d("cli", "resync", "--from", "b", "--to", "a")
    assert res["rc"] == 0, res["err"]
    assert d("replication_bytes", "s1") - before <= union(*writes) * G
    d.assert_equal()
    d("check", "s1")


def test_dr_test_round_trip_across_sites(d, sites):
    """failover --test while the mirror runs: the mirror parks, both sites
    take writes; --end-test throws the test writes away; the next group
    sends exactly the union and r1 equals s1's hardened group."""
    d("start")
    d("workload", "s1", 30, False)
    d("mirror_start")
    try:
        wait_until(lambda: d("mirror_state")["hardened"] >= 1, 60, "a group")
        res = d("cli", "failover", "--test")
        assert res["rc"] == 0, res["err"]
        assert d("mirror_state")["paused"]
        assert d("status", "r1")["role"] == "primary"
        writes = [d("workload", "s1", 10), d("scatter", "s1", 4, 3),
                  d("workload", "r1", 8), d("scatter", "r1", 7, 4)]
        hardened = d("mirror_state")["hardened"]
        res = d("cli", "failover", "--end-test")
        assert res["rc"] == 0, res["err"]
        assert d("status", "r1")["role"] == "secondary"
        wait_until(lambda: (lambda s: s["hardened"] > hardened and s["phase"] == "idle")(
            d("mirror_state")), 60, "a group after the test")
    finally:
        d("mirror_stop")
    assert d("replication_bytes", "r1") == sent(writes[:2], whole=writes[2:])
    d.assert_equal()
    d("check", "r1")


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))
