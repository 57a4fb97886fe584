"""The history survives any number a slave reports or an old row holds
(issue 7 item 5, the coordinator's half)."""

from __future__ import annotations

import json
import math
import os
import sqlite3

import pytest

import cgtest
from cgtest import MiB, need, run
from coordinator import history
from coordinator.errors import ExitCode, LocalError

BAD_NUMBERS = [2**63 + 5, -1, math.inf, math.nan, 1e300, "12", True, None]


def one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("cgmirror: "), cap.err
    return cap.err


@pytest.mark.parametrize("v", BAD_NUMBERS)
def test_measure_refuses_nonsense(v):
    """Not a finite number in 0..1e18: None, so it is stored as NULL."""
    assert history.measure(v) is None


def test_measure_keeps_real_numbers():
    assert [history.measure(v) for v in (0, 5, 2.5, 10**18)] == [0, 5, 2.5, 10**18]


@pytest.mark.parametrize("n", [0, -1, 2**63, 2**63 + 5, 1.0, "3", True])
def test_begin_refuses_a_cut_number_sqlite_cannot_hold(tmp_path, n):
    """One line, not OverflowError, and nothing is written."""
    with history.History(str(tmp_path)) as h:
        with pytest.raises(LocalError, match="out of range for the history"):
            h.begin(n, "t", "full")
        assert h.copies() == []


def test_finish_stores_nonsense_measurements_as_null(tmp_path):
    """A copy that went well is recorded even if a slave reported nonsense numbers."""
    report = {"bytes": 2**70, "seconds": math.inf, "slaves": {"s1": {"db": {
        "target": "nbd+unix:///db?socket=/x", "mode": "full", "bytes": 2**64,
        "seconds": math.nan, "state": "done", "error": None}}}}
    with history.History(str(tmp_path)) as h:
        h.begin(1, "t", "full")
        h.finish(1, "ok", None, None, report)
        (c,) = h.copies()
    assert (c["result"], c["bytes"], c["seconds"]) == ("ok", None, None)
    assert c["volumes"]["s1"]["db"]["bytes"] == 0
    json.dumps(c, allow_nan=False)


def craft_bad_db(state_dir: str) -> None:
    """Rows with values no reader expected: a time beyond year 9999, text where
    numbers go, infinities, and the largest n SQLite holds (so the next cut
    number does not fit)."""
    os.makedirs(state_dir, exist_ok=True)
    history.History(state_dir).close()
    db = sqlite3.connect(os.path.join(state_dir, history.DB_NAME))
    with db:
        db.execute("INSERT INTO copies VALUES (?, 't', 1e300, 'soon', 'full', 'ok', NULL,"
                   " 'x', ?, -5, 1e300, 'fast')", (2**63 - 1, math.inf))
        db.execute("INSERT INTO copy_volumes VALUES (?, 's1', 'db', 'nbd+unix:///db?"
                   "socket=/x', 'full', 'lots', ?, 'done', NULL)", (2**63 - 1, math.inf))
    db.close()


def test_history_and_status_read_a_bad_row(run_dir, capsys):
    """history (table and JSON) reads such rows; copy then says in one line that
    the history is full and how to go on; status still answers."""
    need("nbdkit")
    p = cgtest.write_session(run_dir, {"s1": {"db": MiB}})
    craft_bad_db(os.path.join(run_dir, "state"))
    assert run(p, "history") == ExitCode.OK
    assert str(2**63 - 1) in capsys.readouterr().out
    assert run(p, "history", "--json") == ExitCode.OK
    (c,) = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["copies"]
    assert (c["started"], c["finished"], c["coordination_ms"], c["establish_ms"],
            c["max_held_ms"], c["bytes"], c["seconds"]) == (None,) * 7
    with cgtest.targets(p), cgtest.slaves(p):
        assert run(p, "copy") == ExitCode.FAILED
        err = one_error_line(capsys)
        assert f"cut number {2**63} is out of range" in err and "move the file aside" in err
        assert run(p, "status") == ExitCode.OK


def test_slave_with_a_huge_cut_number(run_dir, capsys):
    """A slave whose saved cut number is 2^63+5 (what main accepted) refuses
    to start, in one line naming its state file; nothing reaches the history.
    (A running slave cannot report such a number: the codec's reply schema
    bounds it, see test_bounds.)"""
    need("nbdkit")
    p = cgtest.write_session(run_dir, {"s1": {"db": MiB}})
    state = os.path.join(run_dir, "run", "s1", "slave.json")
    os.makedirs(os.path.dirname(state), exist_ok=True)
    with open(state, "w") as f:
        json.dump({"last_n": 2**63 + 5}, f)
    assert run(p, "slave", "start") == ExitCode.FAILED
    err = one_error_line(capsys)
    assert f"last_n {2**63 + 5} is not a cut number" in err and state in err
    assert "move it aside" in err
    assert run(p, "history", "--json") == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["copies"] == []
