"""coordinator.group against real slaves and nbdkit file targets; history and
lock as units."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cgtest import MiB, nbd_handle, close, read_all, write
from harness import peers
from harness.sites import pause
from cgtest import need, wait_until
from coordinator import group
from coordinator.errors import (BusyError, CopyFailed, EstablishAborted, ExitCode,
                                SlaveUnreachable, UnknownVolume)
from coordinator.history import History
from coordinator.link import SlaveLink
from coordinator.lock import SessionLock

BLOCK = 64 * 1024


@pytest.fixture
def links_of():
    """links_of(*slave_processes) -> [SlaveLink]; all closed at the end."""
    made: list[SlaveLink] = []

    def make(*procs) -> list[SlaveLink]:
        lks = [SlaveLink.from_spec(getattr(p, "spec", p)) for p in procs]
        made.extend(lks)
        return lks

    yield make
    for lk in made:
        lk.close()


def target_for(run_dir, name, size, **kw) -> peers.Server:
    image = peers.make_image(os.path.join(run_dir, f"t-{name}.img"), size)
    return peers.nbdkit_file(image, os.path.join(run_dir, f"t-{name}.sock"), **kw)


# ------------------------------------------------------------------ establish

def test_establish_freezes_then_thaws_all(slaves, links_of):
    """All slaves frozen in time -> all thawed, in phase cut, with timings."""
    a = slaves("a", [("x", 4 * MiB)])
    b = slaves("b", [("y", 4 * MiB), ("z", 4 * MiB)])
    write(a.spec.uri("x"), 0, b"x" * BLOCK * 2)
    lks = links_of(a, b)
    assert group.next_n(group.preflight(lks)) == 1
    est = group.establish(lks, 1, lease_ms=5000, max_coordination_ms=2000)
    assert est.n == 1 and set(est.slaves) == {"a", "b"}
    assert est.slaves["a"].blocks == {"x": 2}
    assert est.slaves["b"].blocks == {"y": 0, "z": 0}
    assert 0 < est.coordination_ms <= est.total_ms < 2000
    assert all(t.held_ms is not None and t.held_ms < 2000 for t in est.slaves.values())
    for lk in lks:
        st = lk.status()
        assert st["phase"] == "cut" and st["n"] == 1
        assert all(v["gate"] == "open" for v in st["volumes"].values())
    assert group.abort_all(lks, 1) == {"a": "aborted", "b": "aborted"}
    assert lks[0].status()["volumes"]["x"]["dirty_blocks"] == 2   # back in cr


def test_establish_dead_slave_aborts_the_others(slaves, links_of):
    """A slave that is gone fails the establish; the live one is aborted, keeps its bits."""
    a = slaves("a", [("x", 4 * MiB)])
    b = slaves("b", [("y", 4 * MiB)])
    write(a.spec.uri("x"), BLOCK, b"x" * 10)
    b.kill9()
    lks = links_of(a, b)
    t0 = time.monotonic()
    with pytest.raises(EstablishAborted) as ei:
        group.establish(lks, 5, lease_ms=30000, max_coordination_ms=10000)
    # At once on a quiet machine; the bound only catches a wait for the
    # coordination time or the lease.
    assert time.monotonic() - t0 < 8.0
    e = ei.value
    assert e.exit_code == ExitCode.ABORTED and e.slave == "b" and e.n == 5
    assert "cut 5 aborted: b: freeze failed" in str(e)
    assert e.aborts["a"] == "aborted" and e.aborts["b"].startswith("unreachable")
    st = lks[0].status()
    assert st["phase"] == "idle" and st["ended"] == "aborted"
    assert st["volumes"]["x"]["gate"] == "open" and st["volumes"]["x"]["dirty_blocks"] == 1


def test_establish_hung_slave_thaws_the_others_within_coordination_time(slaves, links_of):
    """A slave that never answers: the others' host writes wait no longer than the
    coordination time (not the lease), and the hung one is aborted once it wakes.
    The lease is far above the coordination time, so that bounds generous
    enough for a busy machine still tell the two apart; the establish itself
    waits for b's abort until the lease (+ grace) has passed."""
    coord_ms, lease_ms = 1000, 10_000
    a = slaves("a", [("x", 4 * MiB)])
    b = slaves("b", [("y", 4 * MiB)])
    lks = links_of(a, b)
    worst = [0.0]
    writes = [0]
    stop = threading.Event()

    def writer():
        h = nbd_handle(a.spec.uri("x"))
        try:
            while not stop.is_set():
                t = time.monotonic()
                h.pwrite(b"w" * 4096, 0)
                worst[0] = max(worst[0], time.monotonic() - t)
                writes[0] += 1
                time.sleep(0.002)
        finally:
            close(h)

    w = threading.Thread(target=writer)
    pause(b.pid)
    try:
        w.start()
        wait_until(lambda: writes[0] >= 1, 30, "the writer's first write")
        t0 = time.monotonic()
        with pytest.raises(EstablishAborted) as ei:
            group.establish(lks, 1, lease_ms=lease_ms, max_coordination_ms=coord_ms)
        took = time.monotonic() - t0
        # Two writes issued after the abort completed: any write the freeze
        # held has been released and measured.
        after = writes[0]
        wait_until(lambda: writes[0] >= after + 2, 30, "writes after the abort")
        stop.set()
        w.join()
    finally:
        os.kill(b.pid, signal.SIGCONT)
    assert f"b: not frozen within {coord_ms} ms" in str(ei.value)
    assert ei.value.aborts["a"] == "aborted"
    assert took < lease_ms / 1000 + group.ABORT_GRACE_S + 20, f"the establish took {took:.1f} s"
    assert worst[0] < 0.75 * lease_ms / 1000, f"a write on a waited {worst[0]:.3f} s"
    # b wakes up, gets its (late) freeze, and then the abort: not left frozen
    # (polled for less than the lease, after which b would thaw by itself).
    wait_until(lambda: lks[1].status()["phase"] == "idle", 0.75 * lease_ms / 1000,
               "b idle after the abort")
    assert lks[1].status()["volumes"]["y"]["gate"] == "open"


def test_preflight_errors(slaves, links_of):
    """preflight names an unreachable slave and a volume the slave does not serve."""
    a = slaves("a", [("x", 4 * MiB)])
    b = slaves("b", [("y", 4 * MiB)], start=False)
    with pytest.raises(SlaveUnreachable, match="slave b"):
        group.preflight(links_of(a, b))
    ghost = links_of(a)[0]
    ghost.volumes.append("ghost")
    with pytest.raises(UnknownVolume, match="slave a has no volume 'ghost'"):
        group.preflight([ghost])
    assert group.next_n({"a": {"n": 7}, "b": {"n": 3}}, floor=5) == 8


def test_preflight_aborts_a_leftover_cut(slaves, links_of):
    """A cut left by a dead coordinator is aborted (the caller holds the lock)."""
    a = slaves("a", [("x", 4 * MiB)])
    lks = links_of(a)
    group.establish(lks, 3, lease_ms=5000, max_coordination_ms=1000)
    warnings = []
    st = group.preflight(lks, warn=warnings.append)
    assert st["a"]["phase"] == "idle" and "aborting cut 3 (cut)" in warnings[0]


# ------------------------------------------------------------------ copy

def test_copy_full_then_incremental_with_progress(slaves, run_dir, links_of):
    """group.copy reports modes and bytes per volume and calls progress_cb."""
    a = slaves("a", [("x", 4 * MiB)])
    b = slaves("b", [("y", 2 * MiB)])
    tx, ty = target_for(run_dir, "x", 4 * MiB), target_for(run_dir, "y", 2 * MiB)
    try:
        lks = links_of(a, b)
        targets = {"a": {"x": tx.uri}, "b": {"y": ty.uri}}
        write(a.spec.uri("x"), 0, os.urandom(MiB))
        seen = []
        full = group.full_volumes(group.preflight(lks), targets, "auto")
        assert full == {"a": ["x"], "b": ["y"]}      # never copied: whole
        group.establish(lks, 1, 5000, 1000, full=full)
        rep = group.copy(lks, 1, targets, "auto", seen.append)
        assert rep.ok and rep.n == 1 and rep.bytes == 6 * MiB
        assert rep.slaves["a"]["x"].mode == "full" and rep.slaves["b"]["y"].bytes == 2 * MiB
        assert seen and seen[-1]["done_bytes"] == seen[-1]["total_bytes"] == 6 * MiB
        assert read_all(tx.uri) == read_all(a.spec.uri("x"))
        write(b.spec.uri("y"), 3 * BLOCK + 100, b"changed")
        full = group.full_volumes(group.preflight(lks), targets, "auto")
        assert full == {"a": [], "b": []}
        group.establish(lks, 2, 5000, 1000, full=full)
        rep = group.copy(lks, 2, targets, "auto")
        assert {v.mode for s in rep.slaves.values() for v in s.values()} == {"incremental"}
        assert rep.slaves["b"]["y"].bytes == BLOCK and rep.slaves["a"]["x"].bytes == 0
        assert read_all(ty.uri) == read_all(b.spec.uri("y"))
        assert rep.to_json()["slaves"]["b"]["y"]["state"] == "done"
    finally:
        tx.stop()
        ty.stop()


def test_full_copy_is_the_point_in_time(slaves, run_dir, links_of):
    """A full copy holds the cut's content also of blocks that were clean at the
    cut and written after it."""
    a = slaves("a", [("x", 4 * MiB)])
    tx = target_for(run_dir, "x", 4 * MiB)
    try:
        lks = links_of(a)
        write(a.spec.uri("x"), 0, b"A" * BLOCK)                  # in the cut (oos)
        group.establish(lks, 1, 5000, 1000, full={"a": ["x"]})
        write(a.spec.uri("x"), 0, b"B" * BLOCK)                  # after: preserved
        write(a.spec.uri("x"), 10 * BLOCK, b"N" * BLOCK)         # after, clean at cut
        group.copy(lks, 1, {"a": {"x": tx.uri}}, "full")
        data = read_all(tx.uri)
        assert data[:BLOCK] == b"A" * BLOCK
        assert data[10 * BLOCK:11 * BLOCK] == bytes(BLOCK)
    finally:
        tx.stop()


def test_copy_slave_dies_mid_copy(slaves, run_dir, links_of):
    """A slave killed mid-copy fails the copy naming it; the other is aborted."""
    need("nbdkit")
    a = slaves("a", [("x", 8 * MiB)])
    b = slaves("b", [("y", 8 * MiB)], env={"CGMIRROR_FAILPOINTS": "copy:mid"})
    # a's target is slow (8 runs, 2 in flight, 0.5 s each: 2 s), so a is
    # still copying when b dies, whatever the load on the machine.
    tx = target_for(run_dir, "x", 8 * MiB, filters=("delay",), args=("wdelay=500ms",))
    ty = target_for(run_dir, "y", 8 * MiB)
    try:
        lks = links_of(a, b)
        group.establish(lks, 1, 5000, 1000, full={"a": ["x"], "b": ["y"]})
        with pytest.raises(CopyFailed) as ei:
            group.copy(lks, 1, {"a": {"x": tx.uri}, "b": {"y": ty.uri}}, "full",
                       timeout_ms=5000, inflight=2)
        e = ei.value
        assert e.fault == "unreachable" and e.exit_code == ExitCode.UNREACHABLE
        assert str(e).startswith("copy of cut 1 failed: b: unreachable")
        st = lks[0].status()
        assert st["phase"] == "idle" and st["ended"] == "failed"
        assert st["last_copy"]["ok"] is False
        assert st["volumes"]["x"]["synced_target"] is None
        assert b.popen.wait(timeout=10) == -signal.SIGKILL
    finally:
        tx.stop()
        ty.stop()


def test_copy_target_too_small(slaves, run_dir, links_of):
    """A target smaller than the volume fails the copy, and it is the target's fault."""
    a = slaves("a", [("x", 4 * MiB)])
    tx = target_for(run_dir, "x", 2 * MiB)
    try:
        lks = links_of(a)
        group.establish(lks, 1, 5000, 1000, full={"a": ["x"]})
        with pytest.raises(CopyFailed, match="too small") as ei:
            group.copy(lks, 1, {"a": {"x": tx.uri}})
        assert ei.value.fault == "target" and ei.value.exit_code == ExitCode.TARGET
        assert ei.value.report["slaves"]["a"]["x"]["state"] == "failed"
    finally:
        tx.stop()


# ------------------------------------------------------------------ units

def test_history_records_and_numbers(tmp_path):
    """Rows are begun and finished; max_n never goes back; running rows get
    marked interrupted."""
    h = History(str(tmp_path / "st"))
    try:
        assert h.max_n() == 0
        h.begin(1, "t", "full")
        report = {"bytes": 10, "seconds": 0.5, "slaves": {"a": {"x": {
            "target": "nbd://t", "mode": "full", "bytes": 10, "seconds": 0.5,
            "state": "done", "error": None}}}}
        h.finish(1, "ok", None, None, report)
        h.begin(2, "t", "auto")
        assert h.max_n() == 2
        assert h.mark_interrupted() == 1
        rows = h.copies()
        assert [r["n"] for r in rows] == [2, 1]
        assert rows[0]["result"] == "interrupted"
        assert rows[1]["volumes"] == {"a": {"x": {"target": "nbd://t", "mode": "full",
                                                  "bytes": 10, "seconds": 0.5,
                                                  "result": "done", "error": None}}}
        assert rows[1]["started"].endswith("Z")
    finally:
        h.close()


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    """A second lock of the same session is refused naming pid and path."""
    first = SessionLock("demo", str(tmp_path)).acquire()
    try:
        with pytest.raises(BusyError) as ei:
            SessionLock("demo", str(tmp_path)).acquire()
        assert str(ei.value) == (f"session demo is busy: another cgmirror (pid"
                                 f" {os.getpid()}) holds {tmp_path}/coordinator.lock")
        assert ei.value.exit_code == ExitCode.BUSY
    finally:
        first.release()
    with SessionLock("demo", str(tmp_path)):
        pass
