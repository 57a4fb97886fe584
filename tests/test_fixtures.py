"""The shared fixtures hold what the tests that use them assume.

``run_dir`` must hold a socket path within sun_path's 108 bytes and be
reachable by a child of another uid, on a fresh machine too (where
pytest's own ``$TMPDIR/pytest-of-USER`` is 0700 and its path short).
"""

from __future__ import annotations

import os
import socket

import pytest

import cgtest
from cgtest import short_dir


def _connect_as(uid: int, path: str) -> str:
    """Connect to the unix socket ``path`` as ``uid`` in a forked child:
    "ok" or the child's exception."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # child: only plain syscalls, then _exit
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(10)
            c.connect(path)
            os.write(w, b"ok")
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_run_dir_is_short_and_private_to_the_test(run_dir):
    """run_dir is a fresh empty directory, 0711, short enough for a socket
    two levels down."""
    assert os.listdir(run_dir) == []
    assert os.stat(run_dir).st_mode & 0o777 == 0o711
    assert len(os.path.join(run_dir, "x" * 8, "slave-name.ctl")) < 80


def test_short_dir_is_removed_at_the_end_even_after_a_failure():
    """The directory behind run_dir is removed with what it holds, also when
    the body raises."""
    with pytest.raises(KeyError):
        with short_dir() as d:
            os.mkdir(os.path.join(d, "sub"))
            open(os.path.join(d, "sub", "f"), "w").close()
            raise KeyError("the test failed")
    assert not os.path.exists(d)


def test_run_base_refuses_a_private_tmpdir(tmp_path, monkeypatch):
    """A TMPDIR that another uid cannot traverse is passed over for the
    next base; with none left, one line says what to do."""
    private = tmp_path / "p"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(cgtest, "_RUN_BASES", (str(private), "/"))
    assert cgtest.run_base() == "/"
    monkeypatch.setattr(cgtest, "_RUN_BASES", (str(private),))
    with pytest.raises(RuntimeError, match="set TMPDIR") as ei:
        cgtest.run_base()
    assert "\n" not in str(ei.value)


def test_a_child_of_another_uid_reaches_a_socket_in_run_dir(run_dir):
    """A child running as uid 65534 can connect to a socket in run_dir (the
    control and gate socket tests rely on it to be refused by the server,
    not by the file system)."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    path = os.path.join(run_dir, "t.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        os.chmod(path, 0o666)
        srv.listen(1)
        assert _connect_as(65534, path) == "ok"
