"""Every CLI error is one line with an exit code from errors.ExitCode: bad
session bytes, bad numbers, Ctrl-C; and the CLI is built from its nouns."""

from __future__ import annotations

import json
import os

import pytest

import cgtest
from cgtest import MiB, need, run, write
from coordinator import cli, errors, output
from coordinator.errors import ExitCode


def one_error_line(capsys) -> str:
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("cgmirror: "), cap.err
    return cap.err


def test_non_utf8_session_is_one_line(tmp_path, capsys):
    """A session file that is not UTF-8 is a CONFIG line, not a UnicodeDecodeError."""
    p = tmp_path / "s.toml"
    p.write_bytes(b'[session]\nname = "caf\xe9"\n')
    assert cli.main(["-s", str(p), "status"]) == ExitCode.CONFIG
    err = one_error_line(capsys)
    assert "not UTF-8 text (byte 0xe9 at offset 21)" in err and str(p) in err


@pytest.mark.parametrize("limit", ["1e20", "0", "-1", str(2**63), str(10**30), "x", "2.5"])
def test_history_limit_out_of_range_is_one_usage_line(tmp_path, capsys, limit):
    """--limit takes a whole number of rows; anything else is one usage line."""
    p = cgtest.write_session(tmp_path, {"s1": {"db": MiB}})
    assert run(p, "history", "--limit", limit) == ExitCode.USAGE
    assert "--limit: must be a whole number from 1 to" in one_error_line(capsys)


def test_history_limit_in_range(tmp_path, capsys):
    """A good --limit reads the (empty) history."""
    p = cgtest.write_session(tmp_path, {"s1": {"db": MiB}})
    assert run(p, "history", "--limit", "3", "--json") == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["copies"] == []


def test_usage_errors_are_one_line(capsys):
    """argparse's own errors (missing noun, unknown option) are one line too."""
    for argv in ([], ["copy", "--fast"], ["slave"], ["frobnicate"]):
        assert cli.main(argv) == ExitCode.USAGE
        one_error_line(capsys)


def test_each_noun_registers_itself(tmp_path, capsys):
    """Every noun module registers its parser and handler; -s may follow the noun."""
    for noun in cli.NOUNS:
        assert callable(noun.register)
    parser = cli._parser()
    for argv in (["slave", "start", "a"], ["slave", "stop"], ["copy", "--full"],
                 ["status"], ["history", "--limit", "2"]):
        assert callable(parser.parse_args(argv).func), argv
    p = cgtest.write_session(tmp_path, {"s1": {"db": MiB}})
    assert cli.main(["history", "-s", str(p), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_describe_never_a_bare_class_name():
    """Ctrl-C is said in words; a bug names itself as one."""
    assert errors.describe(KeyboardInterrupt()) == "interrupted by the operator (Ctrl-C)"
    assert errors.describe(errors.TargetError("t: gone")) == "t: gone"
    assert errors.describe(IndexError()) == "internal error (IndexError)"
    assert errors.describe(ValueError("a\nb")) == "internal error (ValueError): a b"


def test_ctrl_c_during_copy_is_said_in_words(run_dir, capsys, monkeypatch):
    """Ctrl-C while a copy runs: exit INTERRUPTED, one line, and history's error
    column says what happened instead of 'KeyboardInterrupt'."""
    need("nbdkit")
    p = cgtest.write_session(run_dir, {"s1": {"db": 2 * MiB}})

    def ctrl_c(self, progress):
        raise KeyboardInterrupt

    with cgtest.targets(p), cgtest.slaves(p) as sess:
        write(sess.slaves[0].spec().uri("db"), 0, os.urandom(MiB))
        monkeypatch.setattr(output.ProgressBar, "__call__", ctrl_c)
        assert run(p, "copy", "--full") == ExitCode.INTERRUPTED
        assert one_error_line(capsys) == "cgmirror: interrupted by the operator (Ctrl-C)\n"
        monkeypatch.undo()
        assert run(p, "history", "--json") == ExitCode.OK
        (c,) = json.loads(capsys.readouterr().out)["copies"]
        assert (c["result"], c["error"]) == ("failed", errors.INTERRUPTED)
        assert run(p, "status", "--json") == ExitCode.OK   # the cut was aborted
        assert json.loads(capsys.readouterr().out)["slaves"]["s1"]["phase"] == "idle"


def test_a_bug_is_one_line_unless_debugging(tmp_path, capsys, monkeypatch):
    """Any other exception (a bug) is one line naming it, exit FAILED, one JSON
    document with --json; CGMIRROR_DEBUG=1 lets the traceback through."""
    from coordinator import history

    def bug(self, limit=None):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(history.History, "copies", bug)
    p = cgtest.write_session(tmp_path, {"s1": {"db": MiB}})
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert run(p, "history") == ExitCode.FAILED
    assert one_error_line(capsys) == (
        "cgmirror: internal error (ZeroDivisionError): division by zero; this is a bug"
        " (set CGMIRROR_DEBUG=1 for the traceback)\n")
    assert run(p, "history", "--json") == ExitCode.FAILED
    doc = json.loads(capsys.readouterr().out)
    assert doc["error_type"] == "InternalError" and doc["exit_code"] == ExitCode.FAILED
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        run(p, "history")
