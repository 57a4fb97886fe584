"""The cgmirror CLI in process (main(argv) + capsys) against real slaves and
nbdkit file targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import cgtest
from cgtest import MiB, need, read_all, run, write
from coordinator import session as session_mod
from harness import peers
from coordinator.errors import ExitCode
from coordinator.lock import SessionLock
from coordinator import launch
from coordinator.control import ControlClient

BLOCK = 64 * 1024
TWO = {"s1": {"db": 4 * MiB, "log": 2 * MiB}, "s2": {"data": 4 * MiB}}


@pytest.fixture(autouse=True)
def _need():
    need("nbdkit")


def one_json(capsys) -> dict:
    """stdout holds exactly one JSON document."""
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cgmirror: "), err
    return err


def sources_equal_targets(sess, tg) -> None:
    for s in sess.slaves:
        for v in s.volumes:
            assert read_all(s.spec().uri(v.name)) == read_all(tg[f"{s.name}/{v.name}"].uri), \
                f"{s.name}/{v.name} differs from its target"


def test_slave_start_stop_and_status(run_dir, capsys):
    """slave start is idempotent, status --json shows every volume, stop stops."""
    p = cgtest.write_session(run_dir, TWO)
    with cgtest.slaves(p):
        assert run(p, "slave", "start", "s1") == ExitCode.OK
        assert "s1: already running" in capsys.readouterr().out
        assert run(p, "status", "--json") == ExitCode.OK
        doc = one_json(capsys)
        assert doc["ok"] and set(doc["slaves"]) == {"s1", "s2"}
        s1 = doc["slaves"]["s1"]
        assert s1["reachable"] and s1["phase"] == "idle" and set(s1["volumes"]) == {"db", "log"}
        db = s1["volumes"]["db"]
        assert db["present"] and db["size"] == 4 * MiB and db["gate"] == "open"
        assert db["synced"] is False and db["dirty_bytes"] == 0
        assert run(p, "slave", "stop", "s2") == ExitCode.OK
        assert "s2: stopped" in capsys.readouterr().out
        assert run(p, "status") == ExitCode.UNREACHABLE
        cap = capsys.readouterr()
        assert "UNREACHABLE" in cap.out and "s2 is not running" in cap.out
        assert cap.err == ("cgmirror: slave s2 is not running (start it with: cgmirror"
                           " slave start s2)\n")
        assert run(p, "slave", "start", "nope") == ExitCode.USAGE
        assert "no slave 'nope'" in one_error_line(capsys)


def test_copy_full_then_incremental(run_dir, capsys):
    """A full copy makes every target equal its source; the next (auto) copy is
    incremental and sends exactly the changed blocks; history lists both."""
    p = cgtest.write_session(run_dir, TWO)
    with cgtest.targets(p) as tg, cgtest.slaves(p) as sess:
        s1, s2 = (s.spec() for s in sess.slaves)
        write(s1.uri("db"), 0, os.urandom(MiB))
        write(s2.uri("data"), 3 * MiB + 5, os.urandom(100_000))
        assert run(p, "copy", "--full", "--json") == ExitCode.OK
        doc = one_json(capsys)
        assert doc["ok"] and doc["result"] == "ok" and doc["n"] == 1
        assert doc["copy"]["bytes"] == 10 * MiB
        assert doc["copy"]["slaves"]["s1"]["log"]["mode"] == "full"
        assert set(doc["establish"]["slaves"]) == {"s1", "s2"}
        sources_equal_targets(sess, tg)

        # 3 blocks on db (one write spanning two blocks, one unaligned), 1 on data.
        write(s1.uri("db"), 2 * MiB - 10, b"a" * 20)
        write(s1.uri("db"), 3 * MiB + 7, b"b")
        write(s2.uri("data"), 0, b"c" * BLOCK)
        assert run(p, "copy") == ExitCode.OK
        out = capsys.readouterr().out
        assert "cut 2: established in" in out and "incremental" in out
        assert run(p, "copy", "--json") == ExitCode.OK   # nothing changed
        assert one_json(capsys)["copy"]["bytes"] == 0
        sources_equal_targets(sess, tg)

        assert run(p, "history", "--json") == ExitCode.OK
        hist = one_json(capsys)["copies"]
        assert [(c["n"], c["result"]) for c in hist] == [(3, "ok"), (2, "ok"), (1, "ok")]
        second = hist[1]
        assert second["bytes"] == 4 * BLOCK
        assert second["volumes"]["s1"]["db"] == {
            "target": sess.slaves[0].volume("db").target, "mode": "incremental",
            "bytes": 3 * BLOCK, "seconds": second["volumes"]["s1"]["db"]["seconds"],
            "result": "done", "error": None}
        assert hist[2]["mode"] == "full" and hist[2]["establish_ms"] > 0
        assert run(p, "history") == ExitCode.OK
        assert "ESTABLISH MS" in capsys.readouterr().out


def test_incremental_without_baseline_is_refused(run_dir, capsys):
    """--incremental before any full copy: one line, and the slave is left idle."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})
    with cgtest.targets(p), cgtest.slaves(p):
        assert run(p, "copy", "--incremental") == ExitCode.USAGE
        assert "s1/db has no completed copy on" in one_error_line(capsys)
        assert run(p, "status", "--json") == ExitCode.OK
        assert one_json(capsys)["slaves"]["s1"]["phase"] == "idle"


def test_copy_to_target_too_small(run_dir, capsys):
    """A target smaller than its volume: exit TARGET, one line; the changes stay recorded."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 4 * MiB}})
    with cgtest.targets(p, sizes={"s1/db": 1 * MiB}), cgtest.slaves(p) as sess:
        write(sess.slaves[0].spec().uri("db"), 0, b"x" * BLOCK)
        assert run(p, "copy") == ExitCode.TARGET
        err = one_error_line(capsys)
        assert "s1/db" in err and "too small for db: 1048576 bytes, needs 4194304" in err
        assert run(p, "copy", "--json") == ExitCode.TARGET
        doc = one_json(capsys)
        assert doc["ok"] is False and doc["fault"] == "target" and doc["result"] == "failed"
        assert doc["copy"]["slaves"]["s1"]["db"]["state"] == "failed"
        assert run(p, "status", "--json") == ExitCode.OK
        st = one_json(capsys)["slaves"]["s1"]
        assert st["phase"] == "idle" and st["volumes"]["db"]["dirty_blocks"] == 1
        assert run(p, "history", "--json") == ExitCode.OK
        assert [c["result"] for c in one_json(capsys)["copies"]] == ["failed", "failed"]


def test_unreachable_slave(run_dir, capsys):
    """copy with a slave down: exit UNREACHABLE naming it; nothing is frozen."""
    p = cgtest.write_session(run_dir, TWO)
    with cgtest.targets(p), cgtest.slaves(p):
        assert run(p, "slave", "stop", "s2") == ExitCode.OK
        capsys.readouterr()
        assert run(p, "copy") == ExitCode.UNREACHABLE
        err = one_error_line(capsys)
        assert "slave s2" in err and "unreachable" in err
        assert run(p, "status", "--json") == ExitCode.UNREACHABLE
        doc = one_json(capsys)
        assert doc["ok"] is False and doc["slaves"]["s2"]["reachable"] is False
        assert doc["slaves"]["s1"]["phase"] == "idle"


def test_unknown_volume(run_dir, capsys):
    """The session names a volume the running slave does not serve: exit CONFIG."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})
    with cgtest.targets(p), cgtest.slaves(p):
        cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB, "ghost": 2 * MiB}})
        assert run(p, "copy") == ExitCode.CONFIG
        err = one_error_line(capsys)
        assert "slave s1 has no volume 'ghost' (it serves: db)" in err
        assert run(p, "status") == ExitCode.CONFIG
        assert "MISSING" in capsys.readouterr().out
        cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})   # for slave stop


def test_second_coordinator_is_busy(run_dir, capsys):
    """While another cgmirror holds the session, copy exits BUSY (starting a
    node never needs the session: coordinator/lock.py)."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})
    state = os.path.join(run_dir, "state")
    with SessionLock("t", state):
        for args in (["copy"], ["copy", "--json"]):
            assert run(p, *args) == ExitCode.BUSY
            cap = capsys.readouterr()
            assert cap.err == (f"cgmirror: session t is busy: another cgmirror (pid"
                               f" {os.getpid()}) holds {state}/coordinator.lock\n")
        assert json.loads(cap.out)["exit_code"] == ExitCode.BUSY
        assert run(p, "history") == ExitCode.OK     # read-only: no lock needed


def test_slaves_outlive_the_cli_process(run_dir, capsys):
    """`cgmirror slave start` run as its own process leaves the slaves running."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})
    spec = session_mod.load(str(p)).slaves[0].spec()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run([sys.executable, "-m", "coordinator.cli", "-s", str(p), "slave",
                            "start"], cwd=root, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # It must keep answering after its parent is gone (death is immediate).
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert run(p, "status") == ExitCode.OK
            time.sleep(0.05)
    finally:
        assert run(p, "slave", "stop") == ExitCode.OK
        assert launch.running_pid(spec) is None


def test_progress_bar_only_on_a_terminal():
    """The bar draws on a tty and stays silent otherwise (pipes, logs, --json)."""
    import io

    from coordinator.output import ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    p = {"n": 1, "done_bytes": 3 * MiB, "total_bytes": 4 * MiB, "slaves": {}}
    for out in (tty, pipe):
        bar = ProgressBar("copy 1", out)
        bar(p)
        bar.close()
    assert "copy 1 [" in tty.getvalue() and " 75.0%" in tty.getvalue()
    assert "3.0 MiB / 4.0 MiB" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    assert pipe.getvalue() == ""


def test_coordinator_killed_mid_copy_loses_nothing(run_dir, capsys):
    """kill -9 of `cgmirror copy` while it copies: the lock dies with it, the
    next copy takes over (the leftover cut is ended first), history says the
    first was interrupted, and the targets end up equal to the sources."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 8 * MiB}})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sock = os.path.join(run_dir, "remote", "s1-db.sock")
    img = peers.make_image(os.path.join(run_dir, "remote", "s1-db.img"), 8 * MiB)
    # A slow target (8 runs of 1 MiB, 0.3 s each) keeps the copy running.
    slow = peers.nbdkit_file(img, sock, filters=("delay",), args=("wdelay=300ms",))
    try:
        with cgtest.slaves(p) as sess:
            spec = sess.slaves[0].spec()
            write(spec.uri("db"), 0, os.urandom(8 * MiB))
            cli = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", str(p),
                                    "copy", "--full"], cwd=root, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            try:
                with ControlClient(spec.control) as c:
                    deadline = time.monotonic() + 30
                    while c.call("status")["phase"] != "copying":
                        assert time.monotonic() < deadline, "copy never started"
                        time.sleep(0.02)
            finally:
                cli.kill()
                cli.wait(30)
            slow.stop()
            slow = peers.nbdkit_file(img, sock)
            assert run(p, "copy", "--json") == ExitCode.OK
            doc = one_json(capsys)
            assert doc["n"] == 2 and doc["result"] == "ok"
            assert read_all(slow.uri) == read_all(spec.uri("db"))
            assert run(p, "history", "--json") == ExitCode.OK
            results = [(c["n"], c["result"]) for c in one_json(capsys)["copies"]]
            assert results == [(2, "ok"), (1, "interrupted")]
    finally:
        slow.stop()
