"""The mirror with secondaries on TCP and mutual TLS.

- On loopback (127.0.0.1, ports picked by binding): a unix primary drains to
  a ``[[secondary]]`` whose control and NBD are ``tcp:`` addresses; groups
  form (``Mirror.run_once``), the second one sends only what changed, and
  the host export read over ``nbds://`` equals the primary.
- Across the namespace sites (harness/sites.py): primaries s1 in ``a`` and s2
  in ``b``, secondaries r1 and r2 in ``r``, TCP and mutual TLS everywhere.
  Every client is the driver below (``python -m tests.test_mirror_sites
  DOC SESSION``), run inside ``c``: the mirror (in that process), the
  dependent writers and the reader of the remote as one group.  It forms
  groups while writing, then behind a slow link to ``r`` (``tc tbf``), then
  cuts a<->r in the middle of a drain: the drain times out, s1's unsent
  bits go back to its map, no secondary moves or rolls back; once healed,
  mirroring resumes without a full copy (counted in the secondaries'
  ``replication_bytes``).  Every read of the remote passes the checker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):            # also run as a script inside site c
    if _p not in sys.path:
        sys.path.insert(0, _p)

import nbd  # noqa: E402
import pytest  # noqa: E402

from cgtest import need  # noqa: E402
from coordinator import launch, pki, session as session_mod  # noqa: E402
from coordinator.link import SlaveLink  # noqa: E402
from coordinator.mirror import Mirror  # noqa: E402
from harness import workload as wl  # noqa: E402
from harness.mirrorrig import (LAYOUT, ORDER, REMOTE, SIZE, mirror_session,  # noqa: E402
                               session_text, tcp_node)
from harness.sites import free_port as site_port  # noqa: E402
from tlsrig import free_port  # noqa: E402
from wire import files, tls  # noqa: E402

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


def loopback_session(run_dir: str) -> str:
    """One unix primary s1 (volume a), mirrored to r1 on tcp:127.0.0.1."""
    d = os.path.join(run_dir, "pki")
    pki.init(d, "lo")
    for name in ("coordinator", "s1", "r1"):
        pki.issue(d, name, ips=["127.0.0.1"])
    text = mirror_session("lo", {"s1": "r1"}, size=SIZE, session={"pki": "pki"},
                          nodes={"r1": tcp_node("127.0.0.1", free_port)})
    path = os.path.join(run_dir, "lo.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def write(uri: str, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def test_mirror_to_a_tcp_tls_secondary_on_loopback(slaves, run_dir):
    """Groups form with the secondary on TCP+TLS; the drain goes to nbds://,
    the second group sends only the changed block; the host export (read
    with mutual TLS) equals the primary."""
    need("nbdkit")
    s = session_mod.load(loopback_session(run_dir))
    (r1,) = s.secondaries
    prim = slaves.restart(s.slaves[0].spec())
    slaves.restart(r1.spec())
    logs: list[str] = []
    m = Mirror(s, log=logs.append).open()
    try:
        data = os.urandom(64 * 1024)
        write(prim.spec.uri("a"), data, 3 * MiB)
        res = m.run_once()
        assert res.outcome == "hardened", (res.error, logs)
        first = res.bytes
        assert first >= SIZE, res              # the first group: the full copy
        write(prim.spec.uri("a"), data[::-1], 5 * MiB)
        res = m.run_once()
        assert res.outcome == "hardened", (res.error, logs)
        assert 0 < res.bytes < first / 8, res  # incremental, not a second full copy
        st = m.secondaries[0].status()
        assert st["hardened"] == res.n
        assert all(v["export"].startswith("repl-") for v in st["volumes"].values())
    finally:
        m.close()
    h = nbd.NBD()
    tls.libnbd_setup(h, r1.client_tls)
    h.connect_uri(r1.spec().uri("a"))
    try:
        assert h.get_tls_negotiated()
        with open(os.path.join(run_dir, "s1-a.img"), "rb") as f:
            for off in range(0, SIZE, MiB):
                assert h.pread(MiB, off) == f.read(MiB), f"r1/a differs near {off}"
    finally:
        h.shutdown()


# ------------------------------------------------------------ across the sites

NODES = {"s1": "a", "s2": "b", "r1": "r", "r2": "r"}
MAX_DRAIN_MS = 3000
SLOW_MBIT = 160                 # r's link during the slow part (tc tbf): 20 MB/s
# The most a group carries once the full copy is done: every block the
# workload ever writes (one 64 KiB block per slot per volume).
FOOTPRINT = LAYOUT.volumes * LAYOUT.slots * LAYOUT.granularity


def sites_session(net, base: str) -> str:
    """harness/mirrorrig.py's two-by-two session, every node on ``tcp:`` in its site."""
    d = os.path.join(base, "pki")
    pki.init(d, "m")
    pki.issue(d, "coordinator")
    for name, host in NODES.items():
        pki.issue(d, name, ips=[net[host].addr])
    nodes = {name: tcp_node(net[host].addr, lambda site=net[host]: site_port(site))
             for name, host in NODES.items()}
    text = session_text(max_drain_ms=MAX_DRAIN_MS, session={"pki": d}, nodes=nodes)
    path = os.path.join(base, "m.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_mirror_across_sites(sites, run_dir):
    """See the module doc; the driver's JSON says what it saw."""
    need("nbdkit")
    path = sites_session(sites, run_dir)
    s = session_mod.load(path)
    for cfg in list(s.slaves) + list(s.secondaries):
        spec = cfg.spec()
        files.make_dirs(spec.statedir)
        with open(spec.logfile, "ab") as log:       # Sites stops and reaps them
            sites[NODES[cfg.name]].popen(spec.command(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log,
                                         env=launch.slave_env(spec.env))
    from soak_mirror import sites_doc
    t0 = time.monotonic()
    r = sites["c"].run([sys.executable, os.path.abspath(__file__),
                        json.dumps(sites_doc(sites)), path],
                       timeout=170, check=False, cwd=ROOT)
    print(r.stderr[-4000:])
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, f"driver failed ({r.returncode}): {r.stderr[-2000:]}"
    out = json.loads(lines[-1])
    print(json.dumps(out, indent=1), f"{time.monotonic() - t0:.1f} s")
    assert out["full_copy_bytes"] >= 4 * SIZE, out            # the first group
    assert out["writing"].count("hardened") >= 2, out
    assert out["slow"].count("hardened") >= 1, out
    assert out["cut"]["outcome"] == "drain-timeout", out
    # Nothing moved on the remote, the unsent bits are back on s1.
    assert out["cut"]["hardened_after"] == out["cut"]["hardened_before"], out
    assert out["cut"]["s1_dirty_blocks"] > 0, out
    assert out["cut"]["read_ok"], out
    # Healed: groups form again, and what the timed-out group and the
    # healing one sent together is far from a full copy of the 4 volumes.
    assert out["healed"]["outcome"] == "hardened", out
    assert out["healed"]["replication_bytes"] <= 2 * FOOTPRINT < 4 * SIZE, out
    assert out["reads"] >= 4 and out["violations"] == [], out


# The driver, inside site c: every client of a site address is here.

class Remote:
    """The mirror and what the driver reads of the session's nodes."""

    def __init__(self, path: str):
        self.session = session_mod.load(path)
        self.specs = {c.name: c.spec() for c in
                      list(self.session.slaves) + list(self.session.secondaries)}
        self.reads, self.violations = 0, []

    def status(self, name: str) -> dict:
        with SlaveLink.from_spec(self.specs[name], timeout=10) as lk:
            return lk.status()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for name in self.specs:
            while True:
                try:
                    self.status(name)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def hardened(self) -> tuple[int, int]:
        return tuple(self.status(r)["hardened"] for r in ("r1", "r2"))

    def replication_bytes(self) -> int:
        return sum(v["replication_bytes"] for r in ("r1", "r2")
                   for v in self.status(r)["volumes"].values())

    def read_group(self, attempts: int = 20) -> bool:
        """Check the remote host exports as one group (tests/test_mirror.py
        ``Rig.read_group``); False if no read fit between two commits."""
        uris = [self.specs[REMOTE[s]].uri(v) for s, v in ORDER]
        for _ in range(attempts):
            before = self.hardened()
            if before[0] != before[1] or before[0] == 0:
                time.sleep(0.05)
                continue
            rep = wl.check_targets(uris, LAYOUT)
            if self.hardened() == before:
                self.reads += 1
                if not rep.ok:
                    self.violations.append(f"group {before[0]}: {rep.summary()}")
                return True
        return False


def drive(doc: str, path: str) -> dict:
    """The scenario of the module doc; returns what it saw."""
    from soak_mirror import attach_sites
    net = attach_sites(json.loads(doc))
    rem = Remote(path)
    wl.TLS_DIR = rem.session.slaves[0].client_tls      # the coordinator's certificate
    rem.wait_ready()
    logs: list[str] = []
    m = Mirror(rem.session, log=lambda line: logs.append(line)).open()
    out: dict = {}
    work = None
    try:
        res = m.run_once()
        assert res.outcome == "hardened", res.error
        out["full_copy_bytes"] = res.bytes
        work = wl.Workload([rem.specs[s].uri(v) for s, v in ORDER], LAYOUT).start()
        out["writing"], out["rates"] = [], []
        for _ in range(3):
            res = m.run_once()
            out["writing"].append(res.outcome)
            if res.outcome == "hardened":
                out["rates"].append(res.bytes / (res.measures["drain_ms"] / 1000))
            rem.read_group()
        net.rate("r", SLOW_MBIT)
        try:
            out["slow"], out["slow_rates"] = [], []
            while out["slow"].count("hardened") < 2 and len(out["slow"]) < 8:
                res = m.run_once()
                out["slow"].append(res.outcome)
                if res.outcome == "hardened":
                    out["slow_rates"].append(res.bytes / (res.measures["drain_ms"] / 1000))
            rem.read_group()
            out["cut"] = cut_mid_drain(m, net, rem)
        finally:
            net.heal("a", "r")
            net.rate("r", None)
        sent = rem.replication_bytes()
        for _ in range(10):
            res = m.run_once()
            if res.outcome == "hardened":
                break
        out["healed"] = {"outcome": res.outcome, "error": res.error,
                         "replication_bytes": rem.replication_bytes() - sent
                         + out["cut"].pop("sent")}
        rem.read_group()
        work.stop()
        work = None
        res = m.run_once()
        assert res.outcome == "hardened", res.error
        rem.read_group()
    finally:
        if work is not None:
            work.stop()
        m.close()
        print("\n".join(logs), file=sys.stderr)
    out["reads"], out["violations"] = rem.reads, rem.violations
    return out


def cut_mid_drain(m: Mirror, net, rem: Remote) -> dict:
    """Cut a<->r once a group's drain runs (the slow link keeps it running
    long enough); retried if the drain ended before the cut landed."""
    before = rem.hardened()
    sent0 = rem.replication_bytes()
    for attempt in range(5):
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(res=m.run_once()), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while m.phase != "drain" and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        net.cut("a", "r")
        t.join(MAX_DRAIN_MS / 1000 + 60)
        assert not t.is_alive(), "run_once hung after the cut"
        res = box["res"]
        if res.outcome == "drain-timeout":
            dirty = sum(v["dirty_blocks"] for v in rem.status("s1")["volumes"].values())
            after = rem.hardened()
            read_ok = rem.read_group()          # r stays reachable from c
            return {"outcome": res.outcome, "attempts": attempt + 1,
                    "hardened_before": list(before), "hardened_after": list(after),
                    "s1_dirty_blocks": dirty, "read_ok": read_ok,
                    "sent": rem.replication_bytes() - sent0}
        net.heal("a", "r")
        before = rem.hardened()
        sent0 = rem.replication_bytes()
    return {"outcome": res.outcome, "error": res.error, "sent": 0}


if __name__ == "__main__":
    print(json.dumps(drive(sys.argv[1], sys.argv[2])))
