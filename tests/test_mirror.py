"""The mirror (coordinator/mirror/) with real slaves, real secondaries
(``role=secondary``), real libnbd writers and the dependent-write checker
of harness/workload.py.

The rig (tests/mirror2x2.py): primaries s1, s2 with volumes a, b each;
secondaries r1 (mirrors s1) and r2 (mirrors s2), read "as a group".
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import nbd
import pytest

from cgtest import closing_all, wait_until
from coordinator import cli, launch, mirror as mirror_mod, session as session_mod
from coordinator.mirror import LIFT_AFTER, Mirror, map_runs, percentile
from coordinator.mirror import recovery
from harness import workload as wl
from harness.mirrorrig import LAYOUT, ORDER, REMOTE, SIZE, session_text
from mirror2x2 import Rig


# ------------------------------------------------------------------ pure parts

def test_map_runs_covers_the_same_bytes():
    """Secondary runs map to primary blocks covering every byte, clipped."""
    assert map_runs([[0, 1]], 4096, 65536, 10) == [[0, 1]]
    assert map_runs([[15, 2]], 4096, 65536, 10) == [[0, 2]]
    assert map_runs([[0, 1], [2, 1]], 65536, 4096, 100) == [[0, 16], [32, 16]]
    assert map_runs([[9, 5]], 65536, 65536, 10) == [[9, 1]]
    assert map_runs([[12, 1]], 65536, 65536, 10) == []


def test_percentile_nearest_rank():
    """p50/p99 of hold times by nearest rank; None without samples."""
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99


def test_mirror_control_refuses_bad_requests():
    """The mirror's control schema refuses unknown ops and keys in one line."""
    class Fake:
        def status(self):
            return {"ok": True}
    assert mirror_mod.handle(Fake(), b'{"op":"explode"}')["kind"] == "protocol"
    assert "unknown key" in mirror_mod.handle(Fake(), b'{"op":"status","x":1}')["error"]
    assert mirror_mod.handle(Fake(), b"not json")["ok"] is False


def test_mirror_control_turns_a_role_request_into_the_failover_event():
    """op role emits the failover event on the mirror's bus; a bad action is
    refused and emits nothing."""
    from coordinator.mirror import events

    class Fake:
        def __init__(self):
            self.events, self.logs = events.EventBus("m"), []
            self.log = self.logs.append

        def status(self):
            return {"ok": True}
    m = Fake()
    q = m.events.subscribe()
    bad = mirror_mod.handle(m, b'{"op":"role","action":"explode","site":"b","hardened":3}')
    assert bad["ok"] is False and "action" in bad["error"] and q.empty()
    assert mirror_mod.handle(
        m, b'{"op":"role","action":"failover","site":"b","hardened":3}')["ok"]
    doc = q.get_nowait()
    assert (doc["event"], doc["action"], doc["site"], doc["hardened"]) == \
        ("failover", "failover", "b", 3)


# ------------------------------------------------------------------ session

def test_session_mirror_tables(tmp_path):
    """[mirror], [[secondary]] and secondary= load; the pairs are as written."""
    p = tmp_path / "m.toml"
    p.write_text(session_text(max_drain_ms=500))
    s = session_mod.load(str(p))
    assert s.mirror.max_drain_ms == 500 and s.mirror.control == str(tmp_path / "m.ctl")
    assert ("s2", "b", "r2", "b") in s.pairs() and len(s.pairs()) == 4
    assert "role=secondary" in s.secondary("r1").spec().command()
    assert s.targets() == {"s1": {}, "s2": {}}


@pytest.mark.parametrize("edit, words", [
    (('secondary = "r1"', 'secondary = "r9"'), ["no [[secondary]] is named 'r9'"]),
    (('secondary = "r2"', 'secondary = "r2"\nremote_volume = "zz"'),
     ["secondary r2 has no volume 'zz'"]),
    (('secondary = "r1"', 'secondary = "r1"\ntarget = "nbd://h/x"'), ["only one of"]),
    (("max_drain_ms = 30000", "max_drain_ms = 0"), ["max_drain_ms", "from 10"]),
    (("rpo_threshold_s = 30", "rpo_threshold_s = -1"), ["rpo_threshold_s"]),
    (("interval_ms = 0", "interval_ms = 0\nbogus = 1"), ["key 'bogus': unknown key"]),
])
def test_session_mirror_errors_are_one_line(tmp_path, edit, words):
    """Every mistake in the mirror tables is one line naming the key."""
    p = tmp_path / "m.toml"
    p.write_text(session_text().replace(*edit, 1))
    with pytest.raises(session_mod.ConfigError) as ei:
        session_mod.load(str(p))
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_two_volumes_on_one_secondary_volume_refused(tmp_path):
    """Two primary volumes may not mirror to one secondary volume."""
    text = session_text()
    # s1/b onto r1/a, which s1/a mirrors already.
    i = text.index('name = "b"\npath = "s1-b.img"')
    j = text.index('secondary = "r1"', i)
    text = text[:j] + 'secondary = "r1"\nremote_volume = "a"' + text[j + 16:]
    p = tmp_path / "m.toml"
    p.write_text(text)
    with pytest.raises(session_mod.ConfigError, match="already mirrors s1/a"):
        session_mod.load(str(p))


def test_mirror_refuses_a_volume_with_a_fixed_target(tmp_path):
    """A mirrored session mirrors every volume: a fixed target is refused."""
    text = session_text().replace('secondary = "r2"',
                                  'target = "nbd+unix:///x?socket=x.sock"', 1)
    p = tmp_path / "m.toml"
    p.write_text(text)
    with pytest.raises(mirror_mod.MirrorError, match="s2/a has a fixed target"):
        Mirror(session_mod.load(str(p)))


def test_pause_without_a_running_mirror_is_one_line(tmp_path, capsys):
    """pause with no mirror: exit UNREACHABLE, one line saying how to start one."""
    p = tmp_path / "m.toml"
    p.write_text(session_text())
    assert cli.main(["-s", str(p), "mirror", "pause"]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cgmirror mirror run" in err, err


# ------------------------------------------------------------------ the rig

@pytest.fixture
def rig(slaves, run_dir):
    with closing_all(lambda **kw: Rig(slaves, run_dir, **kw)) as make:
        yield make


def parked(thread, mirror) -> bool:
    """``thread`` is blocked in a Condition's wait called straight from
    ``mirror.run``'s loop of groups (``Mirror._groups``) -- the pause wait
    (the pause between groups is an Event's wait, one frame further down)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_back is not None:
        caller = frame.f_back
        if frame.f_code is threading.Condition.wait.__code__ \
                and caller.f_code.co_name == "_groups" \
                and caller.f_locals.get("self") is mirror:
            return True
        frame = caller
    return False


def gates_open(rig) -> bool:
    return all(v["gate"] == "open" for s in ("s1", "s2")
               for v in rig.status(s)["volumes"].values())


# ------------------------------------------------------------------ the cycle

def test_groups_form_while_writing_and_the_remote_is_always_consistent(rig):
    """Back-to-back groups under a dependent-write workload: the first one is
    the full copy (nothing hardened before it), every read of the remote
    host exports as a group passes the checker, and once the writer stops
    and one more group hardens the remote equals the primaries.  Groups
    are 1 s apart: a read of the group must fit between two commits (see
    ``Rig.read_group``), and under this load it takes longer than a drain."""
    r = rig(interval_ms=1000)
    assert r.hardened() == (0, 0)
    m = r.start_mirror()
    work = wl.Workload(r.uris(), LAYOUT).start()
    try:
        wait_until(lambda: m.formed >= 1, 60, "the first full copy")
        first = r.status("r1")["volumes"]["a"]["replication_bytes"]
        assert first >= SIZE, "the first group is not a full copy"
        reads, seen = 0, set()
        deadline = time.monotonic() + 60
        while (reads < 5 or len(seen) < 3) and time.monotonic() < deadline:
            n, rep = r.read_group()
            assert rep.ok, rep.summary()
            reads += 1
            seen.add(n)
        assert reads >= 5 and len(seen) >= 3, (reads, seen)
    finally:
        work.stop()
    assert not work.errors, work.errors
    r.stop_mirror()
    # One more group now that nothing writes: the remote is complete.
    m = r.open_mirror()
    assert m.run_once().outcome == "hardened"
    r.stop_mirror()
    r.assert_equal()
    with r.link("r1") as lk:
        assert lk.status()["prepared"] is None
    assert any("hardened" in line for line in r.logs)
    assert work.written > 0


def test_pause_resume_and_status_over_the_control_socket(rig, capsys):
    """pause stops new groups, resume starts them again, status says so."""
    r = rig()
    m = r.start_mirror()
    wait_until(lambda: m.formed >= 1, 60, "a group")
    assert cli.main(["-s", r.path, "mirror", "pause"]) == 0
    assert "paused" in capsys.readouterr().out
    wait_until(lambda: m.state == "paused", 30, "paused")
    formed = m.formed
    # Not a window of time: the loop waits on the resume condition, which
    # only resume, stop or a verify request wakes; no group starts from there.
    wait_until(lambda: parked(r.thread, m), 30, "the loop parked by pause")
    assert m.formed == formed and m.state == "paused"
    assert cli.main(["-s", r.path, "mirror", "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "paused" and doc["hardened"] >= 1
    assert doc["secondaries"]["r1"]["hardened"] == doc["hardened"]
    assert set(doc["volumes"]["s1"]) == {"a", "b"}
    assert doc["hold_ms"]["p99"] is not None
    assert cli.main(["-s", r.path, "mirror", "status"]) == 0
    text = capsys.readouterr().out
    assert "session m: paused" in text and "RPO" in text and "s2     b" in text, text
    assert cli.main(["-s", r.path, "mirror", "resume"]) == 0
    wait_until(lambda: m.formed > formed, 30, "a group after resume")
    r.stop_mirror()
    assert cli.main(["-s", r.path, "mirror", "status"]) == 0
    out = capsys.readouterr().out
    assert "no mirror is running" in out and "secondary r1: hardened" in out
    assert cli.main(["-s", r.path, "history", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    hardened = [g for g in groups if g["outcome"] == "hardened"]
    assert len(hardened) >= 2 and hardened[-1]["n"] == 1
    g = hardened[0]
    assert g["hardened"] >= g["cut"] and g["hold_ms"] is not None
    assert g["drain_ms"] is not None and g["prepare_ms"] is not None
    assert hardened[-1]["bytes"] == 4 * SIZE        # the first full copy
    assert cli.main(["-s", r.path, "history"]) == 0
    assert "OUTCOME" in capsys.readouterr().out


def test_rpo_severe_when_the_threshold_passes(rig):
    """No group for longer than rpo_threshold_s: state severe, with the reason."""
    r = rig(rpo=2)
    m = r.open_mirror()
    try:
        assert m.run_once().outcome == "hardened"
        m.state = "running"
        assert m.status()["state"] == "running"
        wait_until(lambda: m.status()["state"] == "severe", 20, "severe")
        doc = m.status()
        assert "past rpo_threshold_s 2" in doc["why"] and doc["rpo_s"] > 2
        assert m.run_once().outcome == "hardened"
        assert m.status()["state"] == "running"
    finally:
        r.stop_mirror()


def test_drain_timeouts_give_bits_back_then_the_timer_lifts(rig):
    """A slow remote: incremental drains time out (the first full copy never
    does), each counted; after LIFT_AFTER in a row the timer is lifted and a
    group forms; with writes stopped one more group makes the remote equal
    to the primaries (nothing lost)."""
    r = rig(max_drain_ms=10)
    m = r.open_mirror()
    try:
        res = m.run_once()
        assert res.outcome == "hardened", res.error          # full copy: no timer
        assert res.measures["drain_ms"] > 10, res.measures  # it ran past the timer
        for name in ("r1", "r2"):
            r.procs[name].stop(timeout=10)
            spec = r.procs[name].spec
            spec.filters, spec.filter_args = ["delay"], ["wdelay=30ms"]
            r.procs[name] = r.slaves.restart(spec)
        work = wl.Workload(r.uris(), LAYOUT).start()
        outcomes = []
        try:
            wait_until(lambda: work.written > 200, 30, "writes")
            for _ in range(LIFT_AFTER + 1):
                outcomes.append(m.run_once().outcome)
                if outcomes[-1] == "hardened":
                    break
        finally:
            work.stop()
        assert outcomes == ["drain-timeout"] * LIFT_AFTER + ["hardened"], outcomes
        assert m.timer_lifted == 1 and m.consecutive_drain_failures == 0
        assert any("drain timer lifted" in line for line in r.logs)
        rows = {g["n"]: g["outcome"] for g in m.history.groups()}
        assert list(rows.values()).count("drain-timeout") == LIFT_AFTER
        n, rep = r.read_group()
        assert rep.ok, rep.summary()
        m.consecutive_drain_failures = LIFT_AFTER       # no timer for the last one
        assert m.run_once().outcome == "hardened"
    finally:
        r.stop_mirror()
    r.assert_equal()


def test_a_second_mirror_gets_busy(rig):
    """One mirror per session: the second `mirror run` exits BUSY in one line."""
    r = rig()
    r.start_mirror()
    p = r.spawn()
    assert p.wait(60) == 5
    err = p.stderr.read().strip()
    assert "busy" in err and len(err.splitlines()) == 1, err


def test_sigterm_exits_zero_with_gates_open(rig):
    """SIGTERM mid-stream: exit 0, every gate open, no cut left on a slave."""
    r = rig()
    work = wl.Workload(r.uris(), LAYOUT).start()
    try:
        p = r.spawn()
        wait_until(lambda: r.hardened()[0] >= 2, 60, "groups")
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, p.stderr.read()
    finally:
        work.stop()
    assert "stopped" in p.stderr.read()
    assert gates_open(r)
    assert all(r.status(s)["phase"] == "idle" for s in ("s1", "s2"))


def kill_mirror_at(r, point: str) -> None:
    """One group hardened, then `mirror run` killed -9 at ``point`` while
    the workload writes; the workload is stopped before anything restarts,
    so what a restart sends is bounded by what the primaries hold dirty."""
    m = r.open_mirror()
    assert m.run_once().outcome == "hardened"
    r.stop_mirror()
    work = wl.Workload(r.uris(), LAYOUT).start()
    try:
        wait_until(lambda: work.written > 100, 30, "writes")
        p = r.spawn({"CGMIRROR_FAILPOINTS": point})
        assert p.wait(60) == -signal.SIGKILL, p.stderr.read()
    finally:
        work.stop()


# The N-th time the child reaches the point (mid-drain: once a poll; mid-commit:
# once a secondary, so @3 is the first commit of its second group).
@pytest.mark.parametrize("point", ["mirror:mid-drain@2", "mirror:after-prepare@2",
                                   "mirror:mid-commit@3"])
def test_kill9_of_the_coordinator_recovers_without_a_full_copy(rig, point):
    """kill -9 mid-drain, after prepare, mid-commit: `mirror run` again
    brings the secondaries to one group (forward or back) and continues,
    sending far less than a full copy; the remote stays consistent."""
    r = rig()
    kill_mirror_at(r, point)
    st = {x: r.status(x) for x in ("r1", "r2")}
    point = point.partition("@")[0]
    if point == "mirror:after-prepare":
        assert all(s["prepared"] for s in st.values())
    if point == "mirror:mid-commit":
        assert st["r1"]["hardened"] != st["r2"]["hardened"]
    # A drain the dead coordinator left runs on to its end in the slave (a cut
    # after thaw is not the connection's); measure once it is over.
    wait_until(lambda: all(r.status(x)["phase"] == "idle" for x in ("s1", "s2")), 60,
               "the orphaned drain")
    base = r.replication_bytes()
    dirty = sum(v["dirty_blocks"] * v["granularity"] for x in ("s1", "s2")
                for v in r.status(x)["volumes"].values())
    p = r.spawn()
    before = max(r.hardened())
    wait_until(lambda: min(r.hardened()) >= before + 2, 60, "groups after restart")
    n, rep = r.read_group()
    assert rep.ok, rep.summary()
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    log = p.stderr.read()
    if point != "mirror:mid-drain":
        assert "recovery:" in log, log
    assert "full copy" not in log, log
    sent = r.replication_bytes() - base
    assert sent <= dirty < 4 * SIZE, f"{sent} bytes sent after the restart, {dirty}" \
                                     f" were dirty"
    m = r.open_mirror()
    assert m.run_once().outcome == "hardened"
    r.stop_mirror()
    r.assert_equal()


def test_adopting_a_remote_made_by_cgmirror_copy_sends_only_changes(rig, run_dir):
    """`cgmirror copy` to the secondaries' replication exports, then the
    mirror: its first group is incremental (baseline verified), not full."""
    r = rig()
    # A copy session naming the replication exports as fixed targets.
    with open(r.path) as f:
        text = f.read()
    for s, v in ORDER:
        rname = REMOTE[s]
        export = r.status(rname)["volumes"][v]["export"]
        uri = session_mod.replication_uri(r.session.secondary(rname), export)
        i = text.index(f'path = "{s}-{v}.img"')
        j = text.index(f'secondary = "{rname}"', i)
        text = text[:j] + f'target = "{uri}"' + text[j + len(f'secondary = "{rname}"'):]
    copy_path = os.path.join(run_dir, "copy.toml")
    with open(copy_path, "w") as f:
        f.write(text)
    work = wl.Workload(r.uris(), LAYOUT).start()
    try:
        wait_until(lambda: work.written > 100, 30, "writes")
    finally:
        work.stop()
    assert cli.main(["-s", copy_path, "copy"]) == 0
    copied = r.replication_bytes()
    assert copied >= 4 * SIZE
    assert r.hardened() == (0, 0)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///a?socket={r.procs['s1'].spec.nbd_socket}")
    h.pwrite(b"\x5a" * 4096, 0)
    h.shutdown()
    m = r.open_mirror()
    try:
        assert m.run_once().outcome == "hardened"
    finally:
        r.stop_mirror()
    sent = r.replication_bytes() - copied
    assert 0 < sent <= 64 * 1024, f"{sent} bytes sent: not only the changes"
    assert any("adopted" in line for line in r.logs)
    r.assert_equal()
    assert launch.running_pid(r.procs["r1"].spec)


def test_recovery_resends_blocks_a_secondary_rolled_back(rig):
    """Blocks in a secondary's tgt map (here: replication writes rolled back)
    are marked on the primary volume they mirror, then cleared on the
    secondary, and the next group sends them again."""
    r = rig()
    m = r.open_mirror()
    assert m.run_once().outcome == "hardened"
    r.stop_mirror()
    export = r.status("r2")["volumes"]["b"]["export"]
    h = nbd.NBD()
    h.connect_uri(session_mod.replication_uri(r.session.secondary("r2"), export))
    h.pwrite(b"\xa5" * 4096, 5 << 20)           # block 80 at 64 KiB
    h.flush()
    h.shutdown()
    with r.link("r2") as lk:
        assert lk.call("rollback")["rolled_back"]["b"] == 1
    assert r.status("r2")["volumes"]["b"]["tgt_blocks"] == 1
    assert r.status("s2")["volumes"]["b"]["dirty_blocks"] == 0
    m = r.open_mirror()
    try:
        m.recover()
        assert r.status("r2")["volumes"]["b"]["tgt_blocks"] == 0
        with r.link("s2") as lk:
            assert lk.call("dirty", volume="b")["runs"] == [[80, 1]]
        base = r.replication_bytes()
        assert m.run_once().outcome == "hardened"
        assert r.replication_bytes() - base == 64 << 10
    finally:
        r.stop_mirror()
    assert any("1 target-side blocks of r2/b marked for resend on s2/b" in line
               for line in r.logs), r.logs
    r.assert_equal()


def test_rollback_when_roll_forward_is_refused_resends_the_group(rig, monkeypatch):
    """If a prepared group cannot roll forward, every secondary rolls back to
    the common hardened group, the restored blocks are marked on the
    primaries, and the next group resends them: no full copy, consistent."""
    r = rig()
    kill_mirror_at(r, "mirror:after-prepare@2")
    hardened = r.hardened()
    # The branch under test: what a refused prepare or commit leads to.
    monkeypatch.setattr(recovery, "_roll_forward", lambda links, st, n, log: False)
    base = r.replication_bytes()
    m = r.open_mirror()
    try:
        assert m.recover() == hardened[0]
        assert all(r.status(x)["prepared"] is None for x in ("r1", "r2"))
        n, rep = r.read_group()
        assert n == hardened[0] and rep.ok, rep.summary()
        res = m.run_once()
        assert res.outcome == "hardened", res.error
    finally:
        r.stop_mirror()
    assert sum("rolled back group" in line for line in r.logs) == 2, r.logs
    assert not any("whole" in line or "full copy" in line for line in r.logs[1:]), r.logs
    assert 0 < r.replication_bytes() - base < 4 * SIZE
    r.assert_equal()


# ------------------------------------------------------------------ silent nodes

def test_control_socket_answers_while_every_node_is_silent(tmp_path):
    """Site a cut off (the README walkthrough): nodes that accept a
    connection and never answer (a silent link looks the same to a socket
    with a timeout).  The mirror's control socket still answers pause,
    resume and status within its usual time (CONTROL_TIMEOUT_S): each reply
    carries the status document, which asked every node twice in a row
    (direction 5 s, then the primaries over the cycle's links, 10 s), so
    ``mirror resume`` timed out."""
    import socket as socket_mod
    from coordinator.mirror import client
    p = tmp_path / "m.toml"
    p.write_text(session_text())
    s = session_mod.load(str(p))
    silent = []
    for cfg in [*s.slaves, *s.secondaries]:
        path = str(tmp_path / cfg.control) if not os.path.isabs(cfg.control) else cfg.control
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ls = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        ls.bind(path)
        ls.listen(64)                   # never accepted: connects, never answered
        silent.append(ls)
    try:
        with Mirror(s) as m:
            for op in ("pause", "resume", "status"):
                t0 = time.monotonic()
                reply = client.call(s.mirror.control, op)
                took = time.monotonic() - t0
                assert took < client.CONTROL_TIMEOUT_S, f"{op} took {took:.1f} s"
                assert reply["ok"] and reply["paused"] is (op == "pause")
                assert reply["volumes"]["s1"]["a"]["error"], reply["volumes"]
            assert not m.paused
    finally:
        for ls in silent:
            ls.close()
