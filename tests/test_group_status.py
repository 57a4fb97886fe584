"""status and history are honest about the group (issue 7 item 11): "group
consistent at cut N" only when every target holds the same completed cut;
after a copy where one target failed they say which volume holds which cut,
and no volume says synced next to its failed copy."""

from __future__ import annotations

import json
import os
import time

import pytest

import cgtest
from cgtest import MiB, need, read_all, run, write
from coordinator import history
from harness import peers
from coordinator.errors import ExitCode

LAYOUT = {"s1": {"db": 2 * MiB}, "s2": {"data": 2 * MiB}}


@pytest.fixture(autouse=True)
def _need():
    need("nbdkit")


def doc(capsys, *args) -> dict:
    assert run(*args, "--json") == ExitCode.OK
    return json.loads(capsys.readouterr().out)


def test_partial_copy_is_not_consistent(run_dir, capsys):
    """Cut 1 everywhere: consistent.  Cut 2 with s2's target failing every
    write: s1/db holds cut 2, s2/data part of cut 2, and status, history and
    synced all say so.  Cut 3 with a good target again: consistent at 3."""
    p = cgtest.write_session(run_dir, LAYOUT)
    with cgtest.targets(p) as tg, cgtest.slaves(p) as sess:
        s1, s2 = (s.spec() for s in sess.slaves)
        write(s1.uri("db"), 0, os.urandom(MiB))
        write(s2.uri("data"), 0, os.urandom(MiB))
        assert run(p, "status") == ExitCode.OK
        out = capsys.readouterr().out
        assert "group not consistent: nothing copied: s1/db, s2/data" in out
        assert "last copy: none" in out

        assert run(p, "copy", "--full") == ExitCode.OK
        capsys.readouterr()
        g = doc(capsys, p, "status")["group"]
        assert (g["consistent"], g["n"], g["last_copy"]["result"]) == (True, 1, "ok")
        assert 0 <= g["age_s"] < 600 and g["taken"].endswith("Z")
        assert run(p, "status") == ExitCode.OK
        assert f"group consistent at cut 1, taken at {g['taken']} (" in \
            capsys.readouterr().out

        # s2's target now fails every write (same image, same socket).
        bad = tg["s2/data"]
        bad.stop()
        tg["s2/data"] = peers.nbdkit_file(bad.image, bad.sock, filters=("error",),
                                          args=("error-pwrite=EIO", "error-pwrite-rate=1"))
        write(s1.uri("db"), 0, b"1" * 65536)
        write(s2.uri("data"), 0, b"2" * 65536)
        assert run(p, "copy") == ExitCode.TARGET
        assert "s2/data" in capsys.readouterr().err

        st = doc(capsys, p, "status")
        g = st["group"]
        assert g["consistent"] is False and g["n"] is None
        assert g["volumes"]["s1"]["db"] == {"state": "holds", "n": 2, "error": None}
        assert g["volumes"]["s2"]["data"]["state"] == "partial"
        assert g["volumes"]["s2"]["data"]["n"] == 2
        assert g["last_copy"]["n"] == 2 and g["last_copy"]["result"] == "failed"
        assert st["slaves"]["s1"]["volumes"]["db"]["synced"] is True
        assert st["slaves"]["s2"]["volumes"]["data"]["synced"] is False
        assert run(p, "status") == ExitCode.OK
        out = capsys.readouterr().out
        assert ("group not consistent: cut 2: s1/db; part of cut 2 (copy failed):"
                " s2/data") in out
        assert "last copy: cut 2 failed, started" in out
        assert " yes " not in out
        h = doc(capsys, p, "history")["group"]
        assert (h["consistent"], h["volumes"]) == (False, g["volumes"])
        assert run(p, "history") == ExitCode.OK
        assert "group not consistent: cut 2: s1/db" in capsys.readouterr().out

        tg["s2/data"].stop()
        tg["s2/data"] = peers.nbdkit_file(bad.image, bad.sock)
        assert run(p, "copy") == ExitCode.OK
        capsys.readouterr()
        g = doc(capsys, p, "status")["group"]
        assert (g["consistent"], g["n"]) == (True, 3)
        for s in sess.slaves:
            v = s.volumes[0]
            assert read_all(s.spec().uri(v.name)) == read_all(tg[f"{s.name}/{v.name}"].uri)


def test_interrupted_copy_is_partial(tmp_path):
    """A coordinator that died mid-copy left 'running' rows: partial unless a
    coordinator holds the session now (pure: the history alone)."""
    targets = {"s1": {"db": "nbd+unix:///db?socket=/r/db.sock"}}
    with history.History(str(tmp_path)) as h:
        h.begin(1, "t", "full")
        h.start_volumes(1, targets, {"s1": ["db"]})
        h.finish(1, "ok", None, None, {"bytes": 1, "seconds": 1.0, "slaves": {"s1": {
            "db": {"target": targets["s1"]["db"], "mode": "full", "bytes": 1,
                   "seconds": 1.0, "state": "done", "error": None}}}})
        assert h.group(targets)["consistent"] is True
        h.begin(2, "t", "auto")
        h.start_volumes(2, targets, {})
        assert h.group(targets)["volumes"]["s1"]["db"]["state"] == "copying"
        g = h.group(targets, copying=False)
        assert g["volumes"]["s1"]["db"] == {
            "state": "partial", "n": 2, "error": "the coordinator stopped before the end"}
        assert h.mark_interrupted() == 1
        assert h.group(targets)["volumes"]["s1"]["db"]["state"] == "partial"
        # Another spelling of the target is the same image; another image holds nothing.
        same = {"s1": {"db": "nbd+unix://localhost/db?socket=/r/../r/db.sock"}}
        assert h.group(same)["volumes"]["s1"]["db"]["n"] == 2
        other = {"s1": {"db": "nbd+unix:///db?socket=/r/other.sock"}}
        assert h.group(other)["volumes"]["s1"]["db"]["state"] == "none"
        assert h.group(targets, now=time.time() + 3600)["last_copy"]["age_s"] >= 3600
