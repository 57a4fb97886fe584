"""`cgmirror copy` to a target that no longer holds the last copy: refused in
one line naming --full, through the real CLI, slaves and targets."""

from __future__ import annotations

import json
import os

import cgtest
from cgtest import MiB, need, read_all, run, write
from harness import peers
from coordinator.errors import ExitCode


def test_blank_target_at_same_uri_is_refused_then_full_copy_fixes_it(run_dir, capsys):
    """The target image replaced by a blank one behind the same socket: the
    next copy exits TARGET with one line naming `cgmirror copy --full`, before
    any cut is taken, and sends nothing; --full then makes the target equal
    the source."""
    need("nbdkit")
    p = cgtest.write_session(run_dir, {"s1": {"db": 4 * MiB}})
    with cgtest.targets(p) as tg, cgtest.slaves(p) as sess:
        src = sess.slaves[0].spec().uri("db")
        write(src, 0, os.urandom(4 * MiB))
        assert run(p, "copy", "--full") == ExitCode.OK
        old = tg["s1/db"]
        old.stop()
        blank = peers.nbdkit_file(peers.make_image(old.image, 4 * MiB), old.sock)
        try:
            write(src, MiB, b"new" * 1000)
            capsys.readouterr()
            assert run(p, "copy") == ExitCode.TARGET
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("cgmirror: "), err
            assert "no longer holds the baseline of db" in err
            assert "cgmirror copy --full" in err
            assert read_all(blank.uri) == bytes(4 * MiB)     # nothing was sent
            assert run(p, "history", "--json") == ExitCode.OK  # no cut was taken
            assert [c["n"] for c in json.loads(capsys.readouterr().out)["copies"]] == [1]
            assert run(p, "copy", "--full") == ExitCode.OK
            assert read_all(blank.uri) == read_all(src)
        finally:
            blank.stop()
