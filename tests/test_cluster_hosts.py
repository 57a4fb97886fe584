"""Issue 19, item 6: cluster mode on the host rig (harness/hosts.py,
tests/hostrig.py, harness/democluster.py).  Hosts a1 a2 (primaries), b1 b2
(secondaries) and c; a real three-member etcd, one member on each of a1,
b1 and c, TLS from the session's PKI; ``cgmirror-mirror@h`` (``mirror
run``) enabled on c, b1 and a1 under their units: one leads, two stand by.
Every etcd read, workload, checker and control call runs inside a host;
the dependent-write checker reads site b's hardened group (its host
exports) after every scenario, and site a after the failback.

One rig serves the leadership scenarios in turn (each starts from a
healthy cluster: links up, every member and coordinator running, a leader
that hardened a group): the leader killed -9; the leader stopped
(SIGSTOP) until a standby took over, then resumed, its stale freeze,
prepare and commit refused by epoch; the leader's host cut off; one etcd
member killed; quorum lost (no group forms, no host write is held past the
gate's lease, the hardened group stays consistent; the mirror goes on
when quorum is back).  A second rig runs ``fence = "lease"``: site a cut
off, failover at b; a's primaries refuse host writes within the lease,
before b takes any; every write b acknowledged is at a after the failback.

Bounds are the spec's (takeover within the TTL plus a group) with room for
a loaded 2-core machine, and each is said in the assertion.

``python tests/test_cluster_hosts.py STEP ARGS-JSON`` runs a step of
``_Steps`` inside a host (as tests/hostrig.py does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import hostrig  # noqa: E402
from hostrig import G, NBLOCKS, SITE_NODES, Rig, places  # noqa: E402

TTL_S = 5                   # the leader's lease in the rig's session (4 lapsed under load 20)
LEASE_MS = 4000             # the gate's lease (a freeze never holds writes longer)
# A group on this rig: freeze, drain of what the writers left, prepare and
# commit across two hosts -- a second or two on a loaded machine.
GROUP_S = 6


# ------------------------------------------------------------ inside a host

class _Steps(hostrig._Inside):
    """Steps of this file run inside a host; each returns JSON data."""

    def writes(self, site: str, seconds: float, seed: int) -> dict:
        """Whole-block writes round-robin to ``site``'s volumes, outside the
        workload's blocks, one at a time for ``seconds``; a volume that
        refuses one is written no more.  Wall time of the first and last
        acknowledged write, the longest one, each volume's refusal (wall
        time and the error, or None), the blocks written per volume.
        Prints ``{"ready": T}`` at the first acknowledged write."""
        import random

        from harness import workload as wl
        rng = random.Random(seed)
        devs = [wl.Device(u, f"timed-{i}") for i, u in enumerate(self.uris(site))]
        data = rng.randbytes(G)
        oks, longest = [], 0.0
        refused: list[dict | None] = [None] * len(devs)
        written = [set() for _ in devs]
        try:
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end and None in refused:
                p = i % len(devs)
                i += 1
                if refused[p] is not None:
                    continue
                b = rng.choice([x for x in range(NBLOCKS) if x % 8])
                t = time.monotonic()
                try:
                    devs[p].pwrite(data, b * G)
                except Exception as exc:        # nbd.Error: what the host sees
                    refused[p] = {"t": time.time(), "s": time.monotonic() - t,
                                  "error": str(exc).splitlines()[0]}
                    continue
                longest = max(longest, time.monotonic() - t)
                oks.append(time.time())
                written[p].add(b)
                if len(oks) == 1:
                    print(json.dumps({"ready": oks[0]}), flush=True)
        finally:
            for d in devs:
                d.close()
        return {"count": len(oks), "first": oks[0] if oks else None,
                "last": oks[-1] if oks else None, "longest_s": longest,
                "refused": refused, "blocks": [sorted(w) for w in written]}

    def stale(self, node: str, op: str, epoch: int, args: dict) -> dict:
        """``op`` sent to ``node`` carrying ``epoch``: the reply, or the
        refusal's kind and line."""
        import dataclasses

        from coordinator.errors import SlaveError
        from coordinator.link import SlaveLink
        spec = dataclasses.replace(self.cfgs[node].spec(), session=self.session.name)
        with SlaveLink.from_spec(spec, timeout=30) as lk:
            try:
                return {"reply": lk.call(op, epoch=epoch, **args)}
            except SlaveError as exc:
                return {"kind": str(exc.kind), "error": str(exc)}


def _main(argv: list[str]) -> int:
    step, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else []
    print(json.dumps(getattr(_Steps(), step)(*args)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


# ------------------------------------------------------------ the test's side

import pytest  # noqa: E402

from cgtest import need, need_netns  # noqa: E402
from harness.democluster import Cluster  # noqa: E402
from harness.hosts import Hosts, session_text  # noqa: E402


class ClusterRig(Rig):
    """hostrig's rig with ``[cluster]``: etcd up before the nodes (a node
    under ``fence = "lease"`` dials it at start), then the nodes, then the
    coordinators."""

    def __init__(self, hosts, fence: str = "none", lease_ttl_s: int | None = None):
        self.h = hosts
        self.cl = Cluster(hosts, ttl_s=TTL_S, fence=fence, lease_ttl_s=lease_ttl_s)
        hosts.install(session_text(hosts, mirror={"max_drain_ms": 4000, "interval_ms": 200},
                                   copy_timeout_ms=4000, lease_ms=LEASE_MS) + self.cl.table())
        hosts.boot()
        self.cl.start_etcd()
        hosts.enable_nodes()
        self.cl.enable_mirrors()
        self.w = self.cl.watch("b2")

    def steps(self, host: str, step: str, *args, timeout: float = 180):
        """Step ``step`` of ``_Steps`` inside ``host``; its JSON result."""
        return self.inside(host, step, *args, timeout=timeout,
                           script=os.path.abspath(__file__))

    def steps_bg(self, host: str, step: str, *args) -> subprocess.Popen:
        return self.h[host].popen([sys.executable, os.path.abspath(__file__), step,
                                   json.dumps(args)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ready(self, p: subprocess.Popen) -> float:
        """Wait for a step's ``{"ready": T}`` line (its first write done); T."""
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"{p.args[-2:]} ended before it was ready: {self.result(p)}")
        return json.loads(line)["ready"]

    def result(self, p: subprocess.Popen, timeout: float = 120) -> dict:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{p.args[-2:]} exited {p.returncode}: {err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def leading(self, timeout: float = 120, other_than: int | None = None):
        """The leader once it hardened a group of its own, and its host."""
        s = self.cl.wait_leader(self.w, timeout=timeout, other_than=other_than)
        return s, self.cl.leader_host(s.leader)

    def next_group(self, after: int, timeout: float = 60):
        return self.w.wait(lambda s: not s.error and s.n > after, timeout,
                           f"a group past {after}")

    def healthy(self) -> tuple:
        """Links up, every etcd member and coordinator running (none
        stopped), a leader that hardened a group, and one more group."""
        for site in ("a", "b", "c"):
            self.h.rejoin(site)
        for m in self.cl.members:
            if not self.cl.member_running(m):
                self.cl.start_member(m)
        # Every member healthy (a member back from a cut has caught up).
        self.cl.wait_healthy(60)
        for name in self.cl.coordinators:
            pid = self.cl.mirror_pid(name)
            if pid:
                os.kill(pid, signal.SIGCONT)
        missing = [n for n in self.cl.coordinators if self.h[n].unit(self.cl.unit) is None]
        if missing:
            self.cl.enable_mirrors(missing)
        s, host = self.leading()
        self.next_group(s.n)
        return s, host

    def events(self, host: str, want, timeout: float = 30) -> list[dict]:
        """``cgmirror events --once`` (what etcd holds) on ``host``, again
        until an event for which ``want(event)`` holds; the events read."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.cgmirror(host, "events", "--once", timeout=60)
            assert r.returncode == 0, f"events --once on {host}: {r.stderr.strip()}"
            got = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            if any(want(e) for e in got):
                return got
            assert time.monotonic() < deadline, \
                f"events on {host}: no wanted event in {timeout} s: {got[-5:]}"
            time.sleep(0.5)


def _rig_or_skip(tmp, **kw):
    need("nbdkit", "unshare", "nsenter", "etcd")
    need_netns()
    h = Hosts(str(tmp)).__enter__()
    try:
        rig = ClusterRig(h, **kw)
    except BaseException:
        h.close()
        raise
    return h, rig


@pytest.fixture(scope="module")
def crig(tmp_path_factory):
    h, rig = _rig_or_skip(tmp_path_factory.mktemp("cluster"))
    try:
        rig.write("a1", "a", 30, fresh=True)
        rig.healthy()
        yield rig
    finally:
        rig.w.close()
        h.close()


def stale_epoch_refused(rig: ClusterRig, host: str, node: str, op: str, epoch: int,
                        now: int, **args) -> str:
    """``op`` carrying the deposed ``epoch`` is refused by ``node``, kind
    "fenced", in the spec's one line; the line."""
    r = rig.steps(host, "stale", node, op, epoch, args)
    assert r.get("kind") == "fenced", (node, op, r)
    line = r["error"]
    assert "\n" not in line and f"has seen leader epoch {now}" in line, line
    assert f"this request carries epoch {epoch}" in line and "deposed" in line, line
    return line


# ------------------------------------------------------------ leadership

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_leader_killed_a_standby_takes_over_within_the_ttl_and_a_group(crig):
    """kill -9 of the leading coordinator: a standby on another host leads
    with a higher epoch and hardens a group within TTL + a group, without a
    full copy; `events` and `mirror status` on b2 (no coordinator there)
    say so; site b's hardened group passes the checker."""
    rig = crig
    old, host = rig.healthy()
    writer = rig.steps_bg("a1", "workload", "a", 30)
    t0 = time.time()
    rig.h[host].kill_unit(rig.cl.unit, signal.SIGKILL)
    new, new_host = rig.leading(timeout=TTL_S + 60, other_than=old.epoch)
    took = new.t - t0
    assert new_host != host and new.leader["pid"] != old.leader["pid"], (host, new)
    assert took <= TTL_S + GROUP_S, (f"takeover took {took:.1f} s; bound ttl {TTL_S} s"
                                     f" + a group {GROUP_S} s")
    rig.result(writer)
    # Recovery, not a full copy: the new leader's groups send what changed.
    hist = rig.cl.inside("b2", "get", "state", "history")["value"]
    mine = [g for g in hist["groups"] if g["n"] >= new.n]
    full = 4 * hostrig.SIZE
    assert mine and all(g["bytes"] < full for g in mine), mine
    ev = rig.events("b2", lambda e: e.get("event") == "leader" and e.get("epoch") == new.epoch)
    mine = [e for e in ev if e.get("event") == "leader" and e.get("epoch") == new.epoch]
    assert (mine[0].get("previous") or {}).get("epoch") == old.epoch, mine
    doc = json.loads(rig.ok("b2", "mirror", "status", "--json"))
    lead = (doc.get("cluster") or {}).get("leader") or {}
    assert (lead.get("epoch"), lead.get("pid")) == (new.epoch, new.leader["pid"]), doc
    rig.check("b1", "b")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_stopped_leader_resumed_after_the_takeover_is_fenced(crig):
    """The leader SIGSTOPped (mid-cycle: groups form every 200 ms) until a
    standby took over and hardened a group; then SIGCONT.  The nodes hold
    the new epoch; a freeze, a prepare and a commit carrying the old one
    are refused in one line; the resumed coordinator forms no group (the
    hardened groups go on under the new epoch only) and stands by."""
    from harness.sites import pause
    rig = crig
    old, host = rig.healthy()
    pid = rig.cl.mirror_pid(host)
    pause(pid)
    try:
        new, new_host = rig.leading(timeout=TTL_S + 60, other_than=old.epoch)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert new_host != host
    # Every group the watch saw from now on is the new leader's.
    cont = time.time()
    after = rig.next_group(new.n)
    seen = [s for s in rig.w.seen if s.t >= cont and s.hardened]
    assert all(s.hardened_epoch == new.epoch for s in seen), seen
    for n in (*SITE_NODES["a"], *SITE_NODES["b"]):
        st = rig.call("c", n, "status")
        assert st.get("epoch") >= new.epoch, (n, st.get("epoch"))
    now = after.epoch
    stale_epoch_refused(rig, "c", "a1", "freeze", old.epoch, now, n=after.n + 100,
                        lease_ms=1000)
    stale_epoch_refused(rig, "c", "b1", "prepare", old.epoch, now, n=after.n + 1)
    stale_epoch_refused(rig, "c", "b2", "commit", old.epoch, now, n=after.n + 1)
    # A read is served whatever the epoch.
    assert "reply" in rig.steps("c", "stale", "a1", "status", old.epoch, {})
    # The resumed coordinator is still alive and stands by.
    assert rig.cl.mirror_pid(host) == pid
    rig.next_group(after.n)
    assert rig.w.last().epoch == new.epoch
    rig.check("b2", "b")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_leaders_host_cut_off_a_standby_takes_over(crig):
    """c leads (the others' units stopped until it does, then started
    again); c is cut off from both sites (its etcd member too: a1 and b1
    keep the quorum): a standby at a or b leads within TTL + a group; the
    cut-off coordinator forms no group (every group hardened meanwhile is
    the new epoch's); after the link heals it stands by."""
    rig = crig
    old, host = rig.healthy()
    if host != "c":
        for n in rig.cl.coordinators:
            if n != "c":
                rig.cl.disable_mirror(n)
        old, host = rig.leading(timeout=TTL_S + 60)
        assert host == "c"
        rig.cl.enable_mirrors([n for n in rig.cl.coordinators if n != "c"])
        old = rig.next_group(old.n)
    writer = rig.steps_bg("a1", "workload", "a", 20)
    t0 = time.time()
    rig.h.isolate("c")
    try:
        new, new_host = rig.leading(timeout=TTL_S + 60, other_than=old.epoch)
        took = new.t - t0
        assert new_host in ("a1", "b1")
        assert took <= TTL_S + GROUP_S, (f"takeover took {took:.1f} s; bound ttl {TTL_S} s"
                                         f" + a group {GROUP_S} s")
        rig.result(writer)
        later = rig.next_group(new.n)
        assert later.epoch == new.epoch and later.hardened_epoch == new.epoch
    finally:
        rig.h.rejoin("c")
    # Healed: c's coordinator (alive all along) stands by; groups go on.
    # (The leader may be re-elected with a newer epoch if etcd's own
    # election after c's member rejoins outlasts its lease: seen once at
    # ttl_s 4 on a loaded machine.)
    assert rig.cl.mirror_pid("c") is not None
    after = rig.next_group(rig.w.last().n)
    assert after.hardened_epoch >= new.epoch > old.epoch, (old, new, after)
    rig.check("b1", "b")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_one_etcd_member_killed_the_mirror_goes_on(crig):
    """kill -9 of the etcd member on the leader's host (or on c): groups go
    on hardening under the same leader and epoch; the member restarted
    rejoins."""
    rig = crig
    old, host = rig.healthy()
    member = host if host in rig.cl.members else "c"
    rig.cl.kill_member(member)
    try:
        s = old
        for _ in range(3):
            s = rig.next_group(s.n, timeout=TTL_S + GROUP_S + 10)
        assert s.epoch == old.epoch, f"the leader changed with one member down: {old} -> {s}"
    finally:
        rig.cl.start_member(member)
    rig.next_group(rig.w.last().n)
    rig.check("b2", "b")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quorum_lost_the_mirror_pauses_and_no_write_is_held(crig):
    """Two of three members killed: the leader says "no-quorum" within its
    lease (plus a status round through dead members) and from then on no
    group hardens, while host writes at a go on, none held longer than the
    gate's lease; b's hardened group stays consistent; the members
    restarted, groups form again, without a full copy."""
    rig = crig
    old, host = rig.healthy()
    down = [m for m in rig.cl.members if m != "c"]
    writer = rig.steps_bg("a2", "writes", "a", 4 * TTL_S + 10, 7)
    rig.ready(writer)
    t0 = time.monotonic()
    for m in down:
        rig.cl.kill_member(m)
    try:
        # Asked on the leader's host (etcd cannot answer: its own document).
        while True:
            st = json.loads(rig.ok(host, "mirror", "status", "--json", timeout=60))
            if st.get("state") == "no-quorum":
                break
            assert time.monotonic() - t0 < TTL_S + 30, \
                f"the leader says {st.get('state')!r} {time.monotonic() - t0:.0f} s after" \
                f" the quorum was lost (ttl {TTL_S} s)"
            time.sleep(0.2)
        paused = [rig.hardened(n, "c") for n in SITE_NODES["b"]]
        w = rig.result(writer, timeout=120)
        assert w["refused"] == [None] * 4, w["refused"]
        assert w["count"] > 0 and w["longest_s"] * 1000 < LEASE_MS + 1000, \
            f"a host write waited {w['longest_s']:.1f} s (the gate's lease is {LEASE_MS} ms)"
        # Writes went on for seconds after it paused: still no group.
        assert [rig.hardened(n, "c") for n in SITE_NODES["b"]] == paused, paused
        heads = rig.check("b1", "b")
    finally:
        for m in down:
            rig.cl.start_member(m)
    back = rig.w.wait(lambda s: not s.error and s.n > max(paused)
                      and s.hardened_epoch == s.epoch, TTL_S + 90,
                      "a group after quorum came back")
    hist = rig.cl.inside("b2", "get", "state", "history")["value"]
    assert all(g["bytes"] < 4 * hostrig.SIZE for g in hist["groups"] if g["n"] >= back.n)
    assert all(x >= y for x, y in zip(rig.check("b2", "b"), heads))   # heads never go back


# ------------------------------------------------------------ primary leases

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_with_leases_a_cut_off_primary_site_stops_before_b_takes_writes(tmp_path):
    """fence = "lease": site a cut off from b and c while writing; a's
    primaries refuse host writes (an NBD error the host sees) within the
    lease; `failover` on b1 promotes b only after that, so no write at b
    is acknowledged before a's last; after the link heals, failing back
    (a's writes from before its lease ran out make it a split: `resync
    --from b`, then `switchover --to a`) brings every write b
    acknowledged to a (checker, images equal), and groups go on."""
    lease = TTL_S
    h, rig = _rig_or_skip(tmp_path, fence="lease", lease_ttl_s=lease)
    try:
        rig.write("a1", "a", 30, fresh=True)
        rig.healthy()
        for n in SITE_NODES["a"]:
            wl = rig.call("a1", n, "status").get("write_lease") or {}
            assert wl.get("held") and wl.get("writer") == "a", (n, wl)
        at_a = rig.steps_bg("a1", "writes", "a", 3 * lease + 10, 11)
        rig.ready(at_a)
        t0 = time.time()
        rig.h.isolate("a")
        wa = rig.result(at_a, timeout=120)
        assert wa["first"] is not None and wa["first"] < t0, wa
        # Every volume of both primaries refused, at once, within the lease.
        for (node, vol), ref in zip(places("a"), wa["refused"]):
            assert ref, f"{node}/{vol} took host writes for {3 * lease + 10} s cut off"
            assert ref["t"] - t0 <= lease + 2 and ref["s"] < 1, \
                (f"{node}/{vol} refused a write {ref['t'] - t0:.1f} s after the cut (lease"
                 f" {lease} s), after waiting {ref['s']:.1f} s: {ref['error']}")
        out = rig.ok("b1", "failover")
        assert "site b is writable" in out, out
        wb = rig.steps("b1", "writes", "b", 3, 12)
        assert wb["refused"] == [None] * 4 and wb["count"] > 0, wb
        assert wa["last"] < wb["first"], \
            f"a acknowledged a write at {wa['last']}, after b's first at {wb['first']}"
        at_b = rig.write("b1", "b", 15)
        rig.h.rejoin("a")
        rig.cl.wait_healthy(60)
        # a acknowledged writes after its last group and before its lease
        # ran out, which b never got: failback refuses the split; the
        # operator names b the winner (a's blocks kept aside), then swaps
        # back.  From b2 here; any host would do, a mirror unit's too: each
        # command takes the etcd role lock and parks the leader meanwhile.
        err = rig.fails("b2", "failback")
        assert len(err.splitlines()) == 1 and "split brain" in err, err
        r = rig.cgmirror("b2", "resync", "--from", "b", "--to", "a", "--keep-overwritten",
                         "/var/lib/cgmirror/kept")
        assert r.returncode == 0, r.stderr
        rig.ok("b2", "switchover", "--to", "a", timeout=240)
        rig.assert_joined("a", "primary")
        # No `mirror resume`: the switchover joined the sites and cleared
        # the pause flag (the failover's, then its own park), so the leader
        # forms groups again by itself (below).
        # Every block b acknowledged is at a, as b held it.
        for p, (node, vol) in enumerate(places("a")):
            bnode, _ = places("b")[p]
            img_a, img_b = rig.image(node, vol), rig.image(bnode, vol)
            for blk in set(wb["blocks"][p]) | at_b[p]:
                assert img_a[blk * G:(blk + 1) * G] == img_b[blk * G:(blk + 1) * G], \
                    (node, vol, blk)
        # a takes writes again under its lease, and the leader forms groups.
        back = rig.steps("a1", "writes", "a", 1, 14)
        assert back["refused"] == [None] * 4 and back["count"] > 0, back
        s = rig.next_group(rig.w.last().n, timeout=60)
        rig.next_group(s.n)
        rig.check("b1", "b")
    finally:
        rig.w.close()
        h.close()


# ------------------------------------------------------------ without the rig

class _FakeHosts:
    """Names and addresses of the rig's hosts, nothing started."""

    session = "h"

    def __getitem__(self, name):
        import types
        i = ("a1", "a2", "b1", "b2", "c").index(name)
        return types.SimpleNamespace(name=name, addr=f"10.0.0.{i + 1}")


def test_the_rigs_cluster_table_is_what_a_session_file_takes(tmp_path):
    """The rig's [cluster] table (harness/democluster.py) parses as the
    session's ClusterConfig: one member per site (a1, b1, c) on etcd's
    client port, the TTLs and the fence as given, the coordinator's
    certificate directory for TLS."""
    from coordinator import session as session_mod
    h = _FakeHosts()
    for fence, lease in (("lease", 3), ("none", None)):
        cl = Cluster(h, ttl_s=TTL_S, fence=fence, lease_ttl_s=lease)
        path = tmp_path / f"{fence}.toml"
        path.write_text(session_text(h) + cl.table())
        c = session_mod.load(str(path)).cluster
        assert c.etcd == ("https://10.0.0.1:2379", "https://10.0.0.3:2379",
                          "https://10.0.0.5:2379")
        assert (c.ttl_s, c.fence, c.lease_ttl_s) == (TTL_S, fence, lease or TTL_S)
        assert c.coordinator_tls == "/etc/cgmirror/pki/coordinator"


def test_a_rig_cluster_without_a_member_on_a_host_says_so():
    """Killing the etcd member of a host that has none is one line."""
    from harness.democluster import ClusterError
    cl = Cluster(_FakeHosts())
    with pytest.raises(ClusterError, match="no etcd member on host a2 \\(members: a1, b1, c\\)"):
        cl.kill_member("a2")
