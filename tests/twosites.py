"""Two sites over TCP with mutual TLS: slaves in namespaces ``a`` and ``b``,
the coordinator in ``c``, the targets in ``r`` (harness/sites.py).

``TwoSites`` (used by the tests in the root namespace) makes the session PKI,
a session file whose control channels and NBD exports are ``tcp:`` addresses
of the sites, one ``nbdkit file`` target per volume inside ``r`` and one
slave per host (``site.popen`` of the launcher's own nbdkit command).  No
process of the root namespace ever connects to a site address: every client
is the driver below, run as ``python -m tests.twosites SCENARIO ...`` inside
``c``, which prints one JSON document as its last line.

Scenarios (ports of tests/test_consistency.py):

- ``consistency SESSION``: copies taken while dependent writes run pass the
  checker; with writes stopped, a last copy equals the sources.
- ``kill SESSION PID``: the slave PID (s2) takes FREEZE and never answers
  (SIGSTOP once the establish's connection to it is up), then, once s1 is
  frozen and a write waits at its gate, is killed -9; the establish aborts
  and s1 thaws as soon as s2 is gone, not at the coordination time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from wire import files  # noqa: E402
from coordinator import group, launch, pki, session as session_mod  # noqa: E402
from coordinator.errors import EstablishAborted  # noqa: E402
from coordinator.group import pipeline  # noqa: E402
from coordinator.link import SlaveLink  # noqa: E402
from harness import peers  # noqa: E402
from harness import workload as wl  # noqa: E402
from harness.sites import free_port, pause  # noqa: E402

SIZE = 16 << 20
LAYOUT = wl.two_by_two(SIZE)
ORDER = [("s1", "a"), ("s2", "a"), ("s1", "b"), ("s2", "b")]     # layout order
HOSTS = {"s1": "a", "s2": "b"}
LEASE_MS = 10_000
COORD_MS = 1_000
# The kill scenario's establish: a coordination time long enough that s1
# is seen frozen and a write seen held before s2 dies even on a busy
# machine, so that "thawed at once when s2 died" is told from "thawed at
# the coordination time".
KILL_COORD_MS = 20_000
KILL_LEASE_MS = 40_000
SPARE = SIZE - wl.RECORD        # outside every slot


# ------------------------------------------------------------ root namespace

class TwoSites:
    """PKI, session file, targets in ``r`` and slaves in ``a``/``b``."""

    def __init__(self, net, base: str):
        self.net, self.base = net, base
        self.pki = os.path.join(base, "pki")
        pki.init(self.pki, "two")
        for slave, host in HOSTS.items():
            pki.issue(self.pki, slave, ips=[net[host].addr])
        pki.issue(self.pki, "coordinator")
        self.r_dir = pki.issue(self.pki, "r", ips=[net["r"].addr])
        os.makedirs(os.path.join(base, "remote"), exist_ok=True)
        self.targets = {}
        for s, v in ORDER:
            self.targets[(s, v)] = self._target(s, v)
        self.session_path = self._session()
        self.session = session_mod.load(self.session_path)
        self.procs: dict[str, subprocess.Popen] = {}
        for slave in HOSTS:
            self.start_slave(slave)

    def image(self, s: str, v: str) -> str:
        return os.path.join(self.base, "remote", f"{s}-{v}.img")

    def _target(self, s: str, v: str) -> str:
        r = self.net["r"]
        port = free_port(r)
        img = peers.make_image(self.image(s, v), SIZE)
        log = open(os.path.join(self.base, "remote", "targets.log"), "ab")
        with log:
            r.popen(peers.nbdkit_file_tcp_argv(img, r.addr, port, self.r_dir),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return f"nbds://{r.addr}:{port}/{v}"

    def _session(self) -> str:
        lines = ["[session]", 'name = "two"', 'state_dir = "state"', 'pki = "pki"',
                 f"max_coordination_ms = {COORD_MS}", f"lease_ms = {LEASE_MS}",
                 "copy_timeout_ms = 20000"]
        for slave, host in HOSTS.items():
            site = self.net[host]
            lines += ["", "[[slave]]", f'name = "{slave}"', f'state_dir = "run/{slave}"',
                      f'control = "tcp:{site.addr}:{free_port(site)}"',
                      f'nbd = "tcp:{site.addr}:{free_port(site)}"', "threads = 4"]
            for v in ("a", "b"):
                lines += ["", "[[slave.volume]]", f'name = "{v}"',
                          f'path = "data/{slave}-{v}.img"', f"size = {SIZE}",
                          f'target = "{self.targets[(slave, v)]}"']
        os.makedirs(os.path.join(self.base, "data"), exist_ok=True)
        path = os.path.join(self.base, "session.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start_slave(self, name: str) -> subprocess.Popen:
        """nbdkit with the plugin, in the slave's site, in the foreground
        (tracked by Sites: stopped and reaped at teardown)."""
        spec = self.session.slave(name).spec()
        files.make_dirs(spec.statedir)
        log = open(spec.logfile, "ab")
        with log:
            proc = self.net[HOSTS[name]].popen(
                spec.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=launch.slave_env(spec.env))
        self.procs[name] = proc
        return proc

    def drive(self, *args: str, timeout: float = 240) -> dict:
        """Run the driver inside ``c``; its last line, parsed."""
        r = self.net["c"].run([sys.executable, "-m", "tests.twosites", *args],
                              timeout=timeout, check=False, cwd=ROOT)
        lines = r.stdout.strip().splitlines()
        assert r.returncode == 0 and lines, f"driver failed ({r.returncode}): {r.stderr}"
        return json.loads(lines[-1])


# ------------------------------------------------------------ inside ``c``

class Driver:
    """The coordinator's side: links to both slaves, establish and copy."""

    def __init__(self, session_path: str):
        self.sess = session_mod.load(session_path)
        self.specs = {s.name: s.spec() for s in self.sess.slaves}
        # The workload and the checker dial the slaves and targets with the
        # coordinator's certificate: any certificate of the session will do.
        wl.TLS_DIR = self.sess.slaves[0].client_tls
        self.links = [SlaveLink.from_spec(sp) for sp in self.specs.values()]
        self.n, self.mode = 0, "auto"
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for link in self.links:
            while True:
                try:
                    link.status()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def uris(self) -> list[str]:
        return [self.specs[s].uri(v) for s, v in ORDER]

    def target_uris(self) -> list[str]:
        return [self.sess.slave(s).volume(v).target for s, v in ORDER]

    def establish(self, mode: str = "auto"):
        replies = group.preflight(self.links)
        self.n = group.next_n(replies, self.n)
        self.mode = mode
        full = group.full_volumes(replies, self.sess.targets(), mode)
        return group.establish(self.links, self.n, LEASE_MS, COORD_MS, full=full)

    def copy(self):
        return group.copy(self.links, self.n, self.sess.targets(), self.mode,
                          timeout_ms=20_000)

    def check(self, run=None) -> wl.Report:
        return wl.check_targets(self.target_uris(), LAYOUT, run).raise_if_bad()

    def assert_complete(self) -> None:
        for src, dst in zip(self.uris(), self.target_uris()):
            a, b = wl.Device(src, "cmp-src"), wl.Device(dst, "cmp-dst")
            try:
                for off in range(0, SIZE, 1 << 20):
                    if a.pread(off, 1 << 20) != b.pread(off, 1 << 20):
                        raise AssertionError(f"{dst} differs from {src} near {off}")
            finally:
                a.close()
                b.close()


def _wait_written(work: wl.Workload, count: int, timeout: float = 30.0) -> None:
    start, deadline = work.written, time.monotonic() + timeout
    while work.written < start + count and not work.errors:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {count} more records")
        time.sleep(0.005)
    assert not work.errors, work.errors


def consistency(session_path: str) -> dict:
    d = Driver(session_path)
    heads = [-1] * LAYOUT.writers
    times = []
    copies = 0
    deadline = time.monotonic() + 40
    with wl.Workload(d.uris(), LAYOUT) as work:
        _wait_written(work, 300)
        for i in range(3):
            rep = d.establish("full" if i == 0 else "auto")
            times.append(rep.coordination_ms)
            _wait_written(work, 50)     # the cut is behind us: writes flow
            cp = d.copy()
            modes = {c.mode for vols in cp.slaves.values() for c in vols.values()}
            assert modes == {"full" if i == 0 else "incremental"}, modes
            got = d.check(work.run)
            assert all(g > h for g, h in zip(got.heads, heads)), (heads, got.heads)
            heads, copies = got.heads, copies + 1
            if time.monotonic() > deadline:
                break
        assert not work.errors, work.errors
    d.establish()
    d.copy()
    d.check(work.run)
    d.assert_complete()
    return {"ok": True, "copies": copies, "heads": heads, "coordination_ms": times}


def kill(session_path: str, victim_pid: str) -> dict:
    d = Driver(session_path)
    pid = int(victim_pid)
    with wl.Workload(d.uris(), LAYOUT) as work:
        _wait_written(work, 300)
    d.n = group.next_n(group.preflight(d.links), d.n)
    h = wl.Device(d.specs["s1"].uri("a"), "held-writer")
    # The victim must take FREEZE and never answer.  On a unix socket a
    # SIGSTOP before the establish does it (the kernel accepts for it); over
    # TLS a stopped slave cannot finish the handshake, so it is stopped right
    # after the establish's own connection to it is up: FREEZE then waits in
    # its socket, unread.
    victim = d.specs["s2"].control
    real_settle = pipeline.Wire._settle

    def settle_then_stop(wire):
        real_settle(wire)
        if wire.link.control == victim:
            pause(pid)
    pipeline.Wire._settle = settle_then_stop
    try:
        t, result = wl.timed(lambda: group.establish(d.links, d.n, KILL_LEASE_MS,
                                                     KILL_COORD_MS), "establish")
        s1 = d.links[0]
        deadline = time.monotonic() + KILL_COORD_MS / 2000
        while (st1 := s1.status())["phase"] != "frozen":
            assert time.monotonic() < deadline, \
                f"s1 never frozen: establish {'running' if t.is_alive() else result}, s1 {st1}"
            time.sleep(0.005)
        w, wt = wl.timed(lambda: h.pwrite(b"held" * 1024, SPARE), "held-write")
        while s1.status()["volumes"]["a"]["waiting"] < 1:
            assert time.monotonic() < deadline, "the write never waited at s1's gate"
            time.sleep(0.005)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        t.join(KILL_LEASE_MS / 1000)
        w.join(KILL_LEASE_MS / 1000)
        assert not t.is_alive() and not w.is_alive()
    finally:
        h.close()
    assert "exc" not in wt, wt
    exc = result.get("exc")
    assert isinstance(exc, EstablishAborted), exc
    st = d.links[0].status()
    return {"ok": True, "slave": exc.slave, "aborts": exc.aborts,
            "establish_s": result["s"], "held_write_s": wt["s"],
            "abort_after_kill_s": result["end"] - killed,
            "write_after_kill_s": wt["end"] - killed,
            "s1": {"phase": st["phase"], "ended": st["ended"],
                   "gates": sorted({v["gate"] for v in st["volumes"].values()})}}


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    out = {"consistency": consistency, "kill": kill}[scenario](*rest)
    print(json.dumps(out, default=str))
