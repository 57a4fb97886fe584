"""The launcher starts real slaves whatever the caller's Python environment
and umask."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys

import pytest

from cgtest import MiB, read_all, write


def _fake_python_prefix(d: str) -> str:
    """A Python prefix of our own (a venv without system site-packages, so
    without the ``nbd`` module): what pyenv, conda or a tool's venv put first
    on PATH.  Returns its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", d], check=True)
    return os.path.join(d, "bin")


@pytest.mark.parametrize("how", ["PATH", "PYTHONHOME", "PYTHONPATH"])
def test_slave_starts_with_another_python_first(how, slaves, run_dir, monkeypatch):
    """Another Python first on PATH (or PYTHONHOME/PYTHONPATH meant for
    another Python) in the caller's environment: the slave starts and serves."""
    other = os.path.join(run_dir, "other")
    bin_dir = _fake_python_prefix(other)
    if how == "PATH":
        monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    elif how == "PYTHONHOME":
        monkeypatch.setenv("PYTHONHOME", other)
    else:
        shadow = os.path.join(run_dir, "shadow")
        os.makedirs(shadow)
        with open(os.path.join(shadow, "nbd.py"), "w") as f:
            f.write("raise ImportError('the nbd module of another Python')\n")
        monkeypatch.setenv("PYTHONPATH", shadow)
    proc = slaves("s1", volumes=[("a", 1 * MiB)])
    write(proc.spec.uri("a"), 0, b"x" * 4096)
    assert read_all(proc.spec.uri("a"))[:4096] == b"x" * 4096


def test_files_and_dirs_private_under_umask_000(slaves, run_dir):
    """Under umask 000, what the launcher creates -- state dir, socket dirs,
    nbdkit.log, pidfile -- and slave.json are the owner's alone."""
    old = os.umask(0)
    try:
        spec = slaves("s1", volumes=[("a", 1 * MiB)], start=False)
        spec.statedir = os.path.join(run_dir, "new", "state")
        spec.nbd_socket = os.path.join(run_dir, "run", "nbd", "s1.sock")
        spec.control = os.path.join(run_dir, "run", "ctl", "s1.ctl")
        proc = slaves.restart(spec)
        write(proc.spec.uri("a"), 0, b"x" * 4096)
        with proc.control() as c:     # a cut: the slave writes slave.json
            c.call("freeze", n=1, lease_ms=5000)
            c.call("thaw", n=1)
    finally:
        os.umask(old)
    for d in ("new", "new/state", "run", "run/nbd", "run/ctl"):
        mode = stat.S_IMODE(os.stat(os.path.join(run_dir, d)).st_mode)
        assert mode == 0o700, f"{d} is {mode:o}"
    for name in ("nbdkit.log", "nbdkit.pid", "slave.json"):
        mode = stat.S_IMODE(os.stat(os.path.join(spec.statedir, name)).st_mode)
        assert mode == 0o600, f"{name} is {mode:o}"
    # A unix socket needs write permission to connect to.
    for sock in (spec.nbd_socket, spec.control):
        mode = stat.S_IMODE(os.stat(sock).st_mode)
        assert mode & 0o022 == 0, f"{sock} is {mode:o}"


def _connect_as_nobody(path: str) -> str:
    """Connect to the unix socket ``path`` as uid/gid 65534 in a forked child;
    return "connected" or the error's name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # child: plain syscalls, then _exit
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            os.write(w, b"connected")
        except OSError as exc:
            os.write(w, (errno.errorcode.get(exc.errno) or repr(exc)).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def test_nbd_socket_refuses_another_uid_under_umask_000(slaves, run_dir):
    """nbdkit cannot check NBD peers' credentials: file modes keep other
    users off the volumes (nbdkit makes its socket 0755 whatever the umask,
    and the launcher's socket directory is 0700).  A connect as another uid
    fails, even under umask 000; the owner still gets in."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    os.chmod(run_dir, 0o711)                 # others may traverse the test dir
    old = os.umask(0)
    try:
        spec = slaves("s1", volumes=[("a", 1 * MiB)], start=False)
        spec.nbd_socket = os.path.join(run_dir, "run", "s1.sock")
        proc = slaves.restart(spec)
    finally:
        os.umask(old)
    assert _connect_as_nobody(proc.spec.nbd_socket) == "EACCES"
    write(proc.spec.uri("a"), 0, b"y" * 512)
    assert read_all(proc.spec.uri("a"))[:512] == b"y" * 512
