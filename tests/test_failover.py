"""Failover, failback, resync, DR test and switchover (coordinator/roles/failover.py)
through ``cli.main`` in this process, with real slaves and secondaries
(nbdkit), libnbd writers and the dependent-write checker of
harness/workload.py, on one host.

The rig (tests/failoverrig.py): site a is primary s1 (volumes a, b), site b
is secondary r1 (a, b).
Nodes run under their supervisors (the ``slaves`` fixture, detached): a role
switch is the node's role op, its supervisor starts it again; every
supervisor is stopped and reaped at the test's end.  Blocks are counted at the receiving end: a secondary's
``replication_bytes``.

Every node runs with its write-intent region equal to the granularity, so
that the recovery of a primary killed -9 marks exactly the blocks it wrote
(with the default 4 MiB region it over-marks whole regions, which is safe
but would hide a count that is off).

Writes: the workload's records sit in block 0 of every 8-block stride (16
slots of 512 KiB); the tests' own writes go to the other blocks, so the
checker still reads a consistent run, and the blocks each side wrote are
known exactly (``Writes``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from cgtest import need, wait_until
from coordinator import cli, direction, launch, session as session_mod
from coordinator.cli import failover_cmds
from coordinator.link import SlaveLink
from coordinator.mirror import Mirror
from failoverrig import G, LAYOUT, NBLOCKS, SESSION, SIZE, VOLS, Rig, Writes
from harness import workload as wl


# ------------------------------------------------------------------ pure parts

def test_oriented_session_swaps_the_sites(tmp_path):
    """Site b as the source: r1 is the primary of a, b, mirrored back to s1."""
    p = tmp_path / "f.toml"
    p.write_text(SESSION)
    s = session_mod.load(str(p))
    b = direction.oriented(s, "b")
    assert [x.name for x in b.slaves] == ["r1"] and [x.name for x in b.secondaries] == ["s1"]
    assert b.pairs() == [("r1", "a", "s1", "a"), ("r1", "b", "s1", "b")]
    assert b.slaves[0].spec().role == "primary" and b.secondaries[0].spec().role == "secondary"
    assert direction.oriented(s, "a") is s


def test_direction_refuses_a_split_or_reversed_mirror(tmp_path):
    """After a failover no mirror forms groups; a mirror of the other site
    than the recorded source is refused; each in one line."""
    p = tmp_path / "f.toml"
    p.write_text(SESSION)
    s = session_mod.load(str(p))
    none = direction.load(s, {})                   # no node answers: a mirrors
    assert (none["source"], none["state"], none["answered"]) == ("a", "mirroring", [])
    direction.check_mirror(s, none)
    rec = {"source": "a", "state": "mirroring", "a_nodes": ["s1"], "seq": 1}
    with pytest.raises(direction.DirectionError, match="sends from site b"):
        direction.check_mirror(direction.oriented(s, "b"), rec)
    over = {"source": "b", "state": "failed-over", "hardened": 3, "from": "a",
            "a_nodes": ["s1"], "seq": 2}
    with pytest.raises(direction.DirectionError, match="took over") as ei:
        direction.check_mirror(direction.oriented(s, "b"), over)
    assert "\n" not in str(ei.value)


def test_direction_is_the_highest_record_the_nodes_hold(tmp_path):
    """load takes the record with the highest seq among the nodes that
    answer (an old primary that missed a failover is outvoted); a node
    that is another node, of another session, or has other volumes than
    this copy of the file says, is refused in one line."""
    p = tmp_path / "f.toml"
    p.write_text(SESSION)
    s = session_mod.load(str(p))
    vols = {"a": {}, "b": {}}
    old = {"source": "a", "state": "mirroring", "a_nodes": ["s1"], "seq": 4}
    new = {"source": "b", "state": "failed-over", "from": "a", "hardened": 7,
           "a_nodes": ["s1"], "seq": 5}
    st = {"s1": {"session": "f", "node": "s1", "record": old, "volumes": vols},
          "r1": {"session": "f", "node": "r1", "record": new, "volumes": vols}}
    d = direction.load(s, st)
    assert (d["source"], d["state"], d["seq"], d["answered"]) == ("b", "failed-over", 5,
                                                                  ["r1", "s1"])
    from coordinator.errors import SlaveUnreachable
    d = direction.load(s, {"s1": st["s1"], "r1": SlaveUnreachable("r1", "gone")})
    assert (d["source"], d["seq"], d["answered"]) == ("a", 4, ["s1"])
    for bad, what in [({"session": "other"}, "of session other"),
                      ({"node": "r1"}, "node r1 of session f"),
                      ({"volumes": {"a": {}}}, "serves volumes a,")]:
        with pytest.raises(session_mod.ConfigError, match=what) as ei:
            direction.load(s, {**st, "s1": {**st["s1"], **bad}})
        assert "\n" not in str(ei.value)


# ------------------------------------------------------------------ the rig

@pytest.fixture
def rig(slaves, run_dir, monkeypatch):
    r = Rig(slaves, run_dir, monkeypatch)
    try:
        yield r
    finally:
        print("\n".join(r.logs))


def split(rig, unsent: bool = True) -> tuple[Writes, Writes, dict]:
    """Mirror a workload, leave writes at s1 that never reach r1, kill -9
    s1, fail over, write at r1.  Returns (S_a, T_b, union)."""
    Writes().workload(rig.uris("s1"), 40, resume=False)
    rig.group()                                      # the first full copy
    Writes().workload(rig.uris("s1"), 20)
    h = rig.group()
    assert rig.check("r1").heads                     # r1's host export: group h
    # Two checkpoints with no write between: the intent map forgets the
    # regions of writes already sent (the slave does this by itself every
    # two intervals; here without waiting).
    for _ in range(2):
        rig.call("s1", "checkpoint")
    old = Writes()                                   # unreplicated at site a
    if unsent:
        old.workload(rig.uris("s1"), 15)
        old.scatter(rig.uris("s1"), 6, seed=1)
    rig.procs["s1"].kill9()
    assert rig.cli("failover") == 0
    st = rig.status("r1")
    assert st.get("role", "primary") == "primary"
    assert direction.load(rig.session)["hardened"] == h
    rig.check("r1")                                  # the new primary: group h
    new = Writes()                                   # host writes at the new primary
    new.workload(rig.uris("r1"), 12)
    new.scatter(rig.uris("r1"), 5, seed=2)
    rig.check("r1")
    rig.revive("s1")            # site a comes back, a primary as it recorded
    assert rig.status("s1")["role"] == "primary"
    return old, new, old.union(new)


# ------------------------------------------------------------------ failover, failback

def test_failover_then_failback_sends_exactly_the_union(rig, tmp_path, capsys):
    """Primary killed -9 with unreplicated writes; failover needs nothing
    of it; the new primary takes host writes; the resync back sends exactly
    |S u T| blocks (counted at the receiving secondary), keeps the
    overwritten blocks, and leaves both sites byte-equal and consistent;
    switchover makes site a the primary again with nothing lost."""
    old, new, union = split(rig)
    # The mirror refuses to run while the sites are split, in one line.
    capsys.readouterr()
    assert rig.cli("mirror", "run") != 0
    err = capsys.readouterr().err.strip()
    assert "took over from site a" in err and "\n" not in err, err
    s1_before = rig.images("s1")                    # what the resync overwrites
    keep = str(tmp_path / "kept")
    assert rig.cli("resync", "--from", "b", "--to", "a", "--keep-overwritten", keep) == 0
    assert rig.status("s1")["role"] == "secondary"
    want = sum(len(b) for b in union.values())
    assert want > 0 and rig.replication_bytes("s1") == want * G, (
        rig.replication_bytes("s1") // G, want)
    rig.assert_equal()
    rig.check("s1")                                  # s1's host export, hardened
    # The kept image holds exactly the overwritten blocks' old content.
    for v, before in zip(VOLS, s1_before):
        with open(os.path.join(keep, f"s1-{v}.img"), "rb") as f:
            kept = f.read()
        assert len(kept) == SIZE
        for b in range(NBLOCKS):
            want_b = before[b * G:(b + 1) * G] if b in union[v] else bytes(G)
            assert kept[b * G:(b + 1) * G] == want_b, (v, b)
        with open(os.path.join(keep, f"s1-{v}.runs.json")) as f:
            runs = json.load(f)["bytes"]
        assert {o // G + i for o, n in runs for i in range(n // G)} == union[v]
    # Switch the roles back: r1 fenced, a last (empty) group, swap.
    assert rig.cli("switchover") == 0
    assert rig.status("s1").get("role", "primary") == "primary"
    assert rig.status("r1")["role"] == "secondary"
    rig.assert_equal()
    more = Writes()
    more.workload(rig.uris("s1"), 10)
    sent = rig.replication_bytes("r1")
    rig.group("a")
    assert rig.replication_bytes("r1") - sent == \
        sum(len(r) for r in more.records.values()) * wl.RECORD
    rig.assert_equal()
    rig.check("r1")


@pytest.mark.parametrize("side, point", [
    ("s1", "secondary:after-write@7"),           # the target, mid-drain
    ("s1", "secondary:prepare-before-record"),   # the target, drain confirmed
    ("r1", "copy:mid"),                          # the source, mid-copy
])
def test_kill_mid_resync_resumes(rig, side, point):
    """kill -9 of the target or the source mid-resync: the target stays at
    its last consistent image, the next run resumes and sends nothing the
    target had confirmed; at the end both sites are equal."""
    if side == "r1":
        # Armed in r1's every start (its supervisor's): copy:mid fires in the
        # first copy it makes, the resync's, as a primary.
        rig.restart("r1", point)
    old, new, union = split(rig)
    want = sum(len(b) for b in union.values()) * G
    if side == "s1":
        rig.restart("s1", point)        # fires once it runs as a secondary
    assert rig.cli("resync", "--from", "b", "--to", "a") != 0
    killed = rig.session.slaves[0] if side == "s1" else rig.session.secondaries[0]
    assert launch.running_pid(killed.spec()) is None, f"{side} was not killed"
    rig.revive(side)                    # its host starts it again, unarmed
    if side == "s1":
        # The killed target: a secondary (its record) at its last consistent image.
        assert rig.status("s1")["role"] == "secondary"
        assert sum(v["undo_blocks"] for v in rig.status("s1")["volumes"].values())
        rig.check("s1")
    before = rig.replication_bytes("s1")
    assert rig.cli("resync", "--from", "b", "--to", "a") == 0
    got = rig.replication_bytes("s1") - before
    if point == "secondary:prepare-before-record":
        assert got == 0, "the drain was confirmed: nothing to send again"
    else:
        # Mid-drain nothing was confirmed yet (the copier flushes, and so
        # lets bits go, every FLUSH_EVERY bytes or at its end).
        assert got <= want, (got // G, want // G)
    rig.assert_equal()
    rig.check("s1")


# ------------------------------------------------------------------ DR test

class Events:
    """``cgmirror events`` as a child; its lines read by a thread, so that a
    test can wait for one with a bound."""

    def __init__(self, path: str):
        self.p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", path,
                                   "events"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(json.loads(line))

    def wait(self, pred, what: str) -> dict:
        wait_until(lambda: any(pred(d) for d in self.lines), 60, what)
        return next(d for d in self.lines if pred(d))

    def close(self):
        self.p.kill()
        self.p.wait(30)
        self.t.join(30)
        self.p.stdout.close()


def test_dr_test_round_trip_leaves_the_secondary_equal(rig):
    """failover --test with a running mirror: it parks, the primary keeps
    taking writes, the secondary takes test writes; --end-test throws them
    away: the next group sends exactly the union, then r1 equals s1.
    ``cgmirror events`` shows both steps as failover events."""
    Writes().workload(rig.uris("s1"), 30, resume=False)
    m = Mirror(rig.session, log=rig.logs.append).open()    # serves m.ctl
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    ev = None
    try:
        wait_until(lambda: m.hardened >= 1 and m.phase == "idle", 60, "a group")
        ev = Events(rig.path)
        # A group formed after it subscribed: from here it sees every event.
        ev.wait(lambda d: d["event"] == "group-formed", "the subscriber's first event")
        assert rig.cli("failover", "--test") == 0
        assert m.paused
        h = m.hardened
        started = ev.wait(lambda d: d["event"] == "failover", "the dr-test event")
        assert (started["action"], started["site"], started["hardened"]) == ("dr-test", "b", h)
        assert rig.status("r1").get("role", "primary") == "primary"
        prim, test = Writes(), Writes()
        prim.workload(rig.uris("s1"), 10)
        prim.scatter(rig.uris("s1"), 4, seed=3)
        test.workload(rig.uris("r1"), 8)
        test.scatter(rig.uris("r1"), 7, seed=4)
        hardened = m.hardened
        assert rig.cli("failover", "--end-test") == 0
        assert rig.status("r1")["role"] == "secondary"
        ended = ev.wait(lambda d: d["event"] == "failover" and d["action"] == "end-test",
                        "the end-test event")
        assert (ended["site"], ended["hardened"]) == ("b", h)
        wait_until(lambda: m.hardened > hardened and m.phase == "idle", 60,
                   "a group after the test")
    finally:
        if ev:
            ev.close()
        m.stop()
        t.join(60)
        m.close()
    assert rig.replication_bytes("r1") == prim.sent(test.blocks)
    rig.assert_equal()
    rig.check("r1")


# ------------------------------------------------------------------ rolled back

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_failover_rolls_back_an_unfinished_group_into_t(rig):
    """A coordinator killed -9 mid-drain leaves r1 with undo blocks of a
    group never prepared; failover rolls it back (r1 shows group h, the
    checker passes), and those blocks, now r1's T, are counted and sent
    back by the resync with the rest of S u T."""
    Writes().workload(rig.uris("s1"), 40, resume=False)
    h = rig.group()
    for _ in range(2):
        rig.call("s1", "checkpoint")
    inflight = Writes()                              # the group whose drain dies
    inflight.workload(rig.uris("s1"), 20)
    env = dict(os.environ, PYTHONPATH=ROOT, CGMIRROR_FAILPOINTS="mirror:mid-drain")
    p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", rig.path, "mirror",
                          "run"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        assert p.wait(60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    # The slave finishes its copy by itself; r1 holds it, unprepared.
    wait_until(lambda: rig.status("s1")["phase"] == "idle", 60, "s1's copy to end")
    st = rig.status("r1")
    assert st["prepared"] is None and st["hardened"] == h
    assert sum(v["undo_blocks"] for v in st["volumes"].values())
    for _ in range(2):
        rig.call("s1", "checkpoint")
    old = Writes()
    old.scatter(rig.uris("s1"), 3, seed=5)
    rig.procs["s1"].kill9()
    assert rig.cli("failover") == 0
    rig.check("r1")
    new = Writes()
    new.scatter(rig.uris("r1"), 4, seed=6)
    union = {v: inflight.blocks[v] | old.blocks[v] | new.blocks[v] for v in VOLS}
    rig.revive("s1")                                 # site a back, a primary
    assert rig.cli("resync", "--from", "b", "--to", "a") == 0
    assert rig.replication_bytes("s1") == sum(len(b) for b in union.values()) * G
    rig.assert_equal()
    rig.check("s1")


def test_failback_in_one_command(rig, capsys):
    """`cgmirror failback --json`: the resync (exactly S u T) then the
    switchover; site a is the primary again, equal to site b, and the
    mirror runs a -> b."""
    old, new, union = split(rig, unsent=False)
    capsys.readouterr()
    assert rig.cli("failback", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["resync"]["bytes"] == sum(len(b) for b in union.values()) * G
    assert doc["switchover"]["source"] == "a"
    assert direction.load(rig.session)["state"] == "mirroring"
    assert rig.status("s1").get("role", "primary") == "primary"
    rig.assert_equal()
    rig.check("s1")
    assert rig.cli("failover", "--end-test") != 0          # no test runs: one line


def test_failback_refused_while_site_a_holds_writes_site_b_never_got(rig, capsys):
    """The old primary comes back (a primary, as it recorded) holding
    acknowledged writes site b never got, and site b was written: failback
    would discard them, so it is refused in one line naming both
    generations and the resync that names the winner; status says split;
    nothing changed.  The resync that names b keeps a's blocks."""
    old, new, union = split(rig)
    capsys.readouterr()
    assert rig.cli("failback") != 0
    err = capsys.readouterr().err.strip()
    assert "split brain" in err and "\n" not in err, err
    assert "resync --from b --to a" in err and "lineage rule" in err, err
    assert rig.status("s1")["role"] == "primary" and rig.status("r1")["role"] == "primary"
    assert direction.load(rig.session)["state"] == "failed-over"
    assert rig.cli("status") != 0
    err = capsys.readouterr().err
    assert "split: site b and site a both written since generation" in err, err
    before = rig.images("s1")
    keep = os.path.join(rig.dir, "kept")
    assert rig.cli("resync", "--from", "b", "--to", "a", "--keep-overwritten", keep) == 0
    err = capsys.readouterr().err
    assert "site b named the winner: the resync overwrites" in err, err
    for v, img in zip(VOLS, before):
        with open(os.path.join(keep, f"s1-{v}.img"), "rb") as f:
            kept = f.read()
        for b in old.blocks[v]:
            assert kept[b * G:(b + 1) * G] == img[b * G:(b + 1) * G], (v, b)
    rig.assert_equal()
    rig.check("s1")


def test_switchover_under_writes_loses_nothing(rig):
    """Writers run at s1 until the switchover fences it (their next write
    gets EROFS); every write s1 acknowledged is at r1, the new primary,
    whose image passes the checker; r1 then takes writes and mirrors them
    back to s1."""
    Writes().workload(rig.uris("s1"), 20, resume=False)
    rig.group()
    work = wl.Workload.resume(rig.uris("s1"), LAYOUT).start()
    try:
        wait_until(lambda: work.written > 50, 30, "writes before the switchover")
        assert rig.cli("switchover") == 0
        wait_until(lambda: len(work.errors) == LAYOUT.writers, 30, "writers fenced")
    finally:
        work.stop()
    assert all(isinstance(e, Exception) for _, e in work.errors)
    assert rig.status("r1").get("role", "primary") == "primary"
    rep = rig.check("r1")
    assert all(h >= a for h, a in zip(rep.heads, work.acked)), (rep.heads, work.acked)
    rig.assert_equal()
    more = Writes()
    more.workload(rig.uris("r1"), 10)
    rig.group("b")
    assert rig.replication_bytes("s1") == more.sent()
    rig.assert_equal()
    rig.check("s1")


def test_resync_the_other_way_keeps_the_losers_writes(rig, tmp_path):
    """After a failover the old primary's site may win instead: resync
    --from a --to b demotes r1 (its writes become its T), restarts s1 as
    the primary, sends exactly S u T to r1, and keeps r1's overwritten
    blocks."""
    old, new, union = split(rig)
    r1_before = rig.images("r1")
    keep = str(tmp_path / "kept")
    assert rig.cli("resync", "--from", "a", "--to", "b", "--keep-overwritten", keep) == 0
    assert rig.status("r1")["role"] == "secondary"
    assert rig.replication_bytes("r1") == sum(len(b) for b in union.values()) * G
    rig.assert_equal()
    rig.check("r1")
    with open(os.path.join(keep, "r1-a.img"), "rb") as f:
        kept = f.read()
    for b in union["a"]:
        assert kept[b * G:(b + 1) * G] == r1_before[0][b * G:(b + 1) * G]
    d = direction.load(rig.session)
    assert (d["source"], d["state"], d["by"]) == ("a", "mirroring", "resync"), d


def test_resync_full_copies_every_block(rig):
    """--full: every block of every volume is sent, not only S u T."""
    split(rig)
    assert rig.cli("resync", "--from", "b", "--to", "a", "--full") == 0
    assert rig.replication_bytes("s1") == len(VOLS) * SIZE
    rig.assert_equal()
    rig.check("s1")


def test_link_errors_mid_resync_leave_the_target_consistent(rig, tmp_path):
    """Most of the target's replication writes fail (nbdkit's error filter,
    on while a file exists: a flaky link) so the resync fails mid-drain;
    the target shows its last consistent image; with the link back the
    next run completes and both sites are equal."""
    flaky = tmp_path / "link-down"
    flaky.touch()
    split(rig)
    # From here on in every start of s1 (as a secondary, after the resync's
    # role op, too).  80 %: at 50 % the resync's five group tries, each
    # confirming what got through, finished a small union now and then
    # (sub-blocks make its requests smaller, not fewer).
    rig.restart("s1", filters=(["error"], ["error-pwrite=EIO", "error-pwrite-rate=80%",
                                           f"error-pwrite-file={flaky}"]))
    assert rig.cli("resync", "--from", "b", "--to", "a") != 0
    assert rig.status("s1")["role"] == "secondary"
    rig.check("s1")                                  # the hardened image
    flaky.unlink()
    assert rig.cli("resync", "--from", "b", "--to", "a") == 0
    rig.assert_equal()
    rig.check("s1")


def test_switchover_interrupted_between_the_swaps_resumes(rig, capsys):
    """The coordinator dies (kill -9) once s1 is demoted, before r1 is
    promoted: the direction the nodes hold says "switching", no mirror
    forms a group, and running it again finishes the swap with nothing
    lost."""
    Writes().workload(rig.uris("s1"), 20, resume=False)
    rig.group()
    Writes().workload(rig.uris("s1"), 10)
    env = dict(os.environ, PYTHONPATH=ROOT,
               CGMIRROR_FAILPOINTS="role:switching-first-demoted")
    p = subprocess.run([sys.executable, "-m", "coordinator.cli", "-s", rig.path,
                        "switchover"], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert direction.load(rig.session)["state"] == "switching"
    assert rig.status("s1")["role"] == "secondary"
    assert rig.status("r1")["role"] == "secondary"
    assert rig.cli("mirror", "run") != 0                 # no group while half swapped
    assert rig.cli("switchover") == 0
    assert direction.load(rig.session)["source"] == "b"
    assert rig.status("r1").get("role", "primary") == "primary"
    rig.assert_equal()
    rig.check("r1")
