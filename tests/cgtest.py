"""Plain helpers of the tests, imported as ``cgtest`` (conftest.py holds
only fixtures and is never imported): ``need``, ``wait_until``,
``closing_all``, the short directories of ``run_dir``; and for the
coordinator tests, session files, nbdkit file targets (harness/peers.py),
slaves.

Where CI=true, a test that needs nbdkit, libnbd or qemu must run: ``need()``
fails there instead of skipping.

Every process started here is started with Popen and killed and reaped by
PID in a ``finally``; sockets live under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import nbd
import pytest

from coordinator import cli, session as session_mod
from harness import peers
from coordinator import launch

MiB = 1 << 20

IN_CI = os.environ.get("CI") == "true"

# `make soak` sets CGMIRROR_SOAK=1: the campaigns of the test files (rounds
# of faults, power cuts, failovers) run their full count there, and a
# bounded slice of it in `make test` (the same rounds, fewer of them).
SOAK = os.environ.get("CGMIRROR_SOAK") == "1"


def soak(slice_, full):
    """``full`` under `make soak` (CGMIRROR_SOAK=1), else ``slice_``."""
    return full if SOAK else slice_


def need(*binaries: str) -> None:
    """Skip (or, in CI, fail) unless every binary is on PATH."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        msg = f"needs {', '.join(missing)} (run `make setup`)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def need_netns() -> None:
    """Skip (or, in CI, fail) unless network namespaces can be made here."""
    # Imported here, not at the top: pyroute2 takes ~0.16 s to import and
    # most test runs never make a namespace.
    from harness import sites
    why = sites.unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` every 5 ms; fail the test if it is not true in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def need_lazyfs() -> None:
    """Skip (or, in CI, fail) unless a FUSE file system can be mounted here."""
    from lazyfs import unavailable
    why = unavailable()
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


@contextlib.contextmanager
def lazyfs_at(path, survive=0.0):
    """A LazyFS mounted on ``path`` for a test; unmounted (and checked) after."""
    need_lazyfs()
    from lazyfs import LazyFS, mounted
    fs = LazyFS(path, survive=survive)
    try:
        with fs:
            yield fs
    finally:
        assert not mounted(fs.mountpoint), "lazyfs left a mount behind"


@contextlib.contextmanager
def closing_all(factory):
    """The body of a factory fixture: yields ``make(...)``, which builds with
    ``factory``; everything built is closed at the end, even after a failure."""
    made = []

    def make(*args, **kw):
        obj = factory(*args, **kw)
        made.append(obj)
        return obj

    try:
        yield make
    finally:
        for obj in made:
            obj.close()


# Where run_dir makes its directories: short (sun_path is 108 bytes, and a
# test nests sockets two levels down) and traversable by every uid, because
# some tests connect as uid 65534.  pytest's own tmp_path is neither for sure:
# $TMPDIR/pytest-of-USER is 0700, and its path grows with every run.
_RUN_BASES = (tempfile.gettempdir(), "/tmp")
_RUN_BASE_MAX = 40


def _traversable_by_all(path: str) -> bool:
    """Every directory from / down to ``path`` is searchable by others."""
    path = os.path.abspath(path)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def run_base() -> str:
    """The directory under which ``run_dir`` makes its own (see _RUN_BASES)."""
    for base in _RUN_BASES:
        if len(base) <= _RUN_BASE_MAX and _traversable_by_all(base):
            return base
    raise RuntimeError(f"no short directory that every uid can traverse among"
                       f" {', '.join(_RUN_BASES)}: set TMPDIR to one")


@contextlib.contextmanager
def short_dir():
    """A fresh directory 0711 under ``run_base()``, removed at the end: a
    child of another uid can reach a socket in it, no other uid can list it."""
    d = tempfile.mkdtemp(prefix="cgm-", dir=run_base())
    try:
        os.chmod(d, 0o711)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_session(tmp_path: Path | str, layout: dict[str, dict[str, int]], *,
                  name: str = "t", granularity: str = "64K", threads: int = 2,
                  extra_session: str = "", **session_keys) -> Path:
    """Write tmp_path/session.toml for ``layout`` = {slave: {volume: size}}.

    Volume files are data/SLAVE-VOL.img (created by the slave at the size),
    targets remote/SLAVE-VOL.img served on remote/SLAVE-VOL.sock.
    """
    tmp_path = Path(tmp_path)
    keys = {"max_coordination_ms": 2000, "lease_ms": 10000, "copy_timeout_ms": 10000}
    keys.update(session_keys)
    lines = ["[session]", f'name = "{name}"', 'state_dir = "state"']
    lines += [f"{k} = {v}" for k, v in keys.items()]
    lines.append(extra_session)
    for slave, vols in layout.items():
        lines += ["", "[[slave]]", f'name = "{slave}"', f'state_dir = "run/{slave}"',
                  f'nbd_socket = "run/{slave}.sock"', f'control = "run/{slave}.ctl"',
                  f"threads = {threads}", f'granularity = "{granularity}"']
        for vol, size in vols.items():
            lines += ["", "[[slave.volume]]", f'name = "{vol}"',
                      f'path = "data/{slave}-{vol}.img"', f"size = {size}",
                      f'target = "nbd+unix:///{vol}?socket=remote/{slave}-{vol}.sock"']
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "remote").mkdir(exist_ok=True)
    path = tmp_path / "session.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(session: Path, *args: str) -> int:
    """cgmirror -s SESSION ARGS..., in process."""
    return cli.main(["-s", str(session), *args])


@contextlib.contextmanager
def targets(session_path: Path, sizes: dict[str, int] | None = None):
    """Start one nbdkit file target per session volume; {"slave/vol": Target}.

    Each target image is as large as the volume unless ``sizes`` says
    otherwise for "slave/vol".
    """
    sess = session_mod.load(str(session_path))
    out: dict[str, peers.Server] = {}
    try:
        for s in sess.slaves:
            for v in s.volumes:
                key = f"{s.name}/{v.name}"
                sock = v.target.split("socket=", 1)[1]
                image = peers.make_image(sock.removesuffix(".sock") + ".img",
                                         (sizes or {}).get(key, v.size))
                out[key] = peers.nbdkit_file(image, sock)
        yield out
    finally:
        for t in out.values():
            t.stop()


@contextlib.contextmanager
def slaves(session_path: Path):
    """``cgmirror slave start``; ``slave stop`` (and a kill by PID) in finally."""
    sess = session_mod.load(str(session_path))
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = run(session_path, "slave", "start")
        assert code == 0, out.getvalue()
        yield sess
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            run(session_path, "slave", "stop")
        for spec in sess.specs():
            pid = launch.running_pid(spec)
            if pid:
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


def close(h: "nbd.NBD") -> None:
    """Disconnect (libnbd 1.14's python binding has no close(); del frees it)."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def nbd_handle(uri: str) -> "nbd.NBD":
    h = nbd.NBD()
    h.set_handle_name("cgtest")
    h.connect_uri(uri)
    return h


def write(uri: str, offset: int, data: bytes) -> None:
    h = nbd_handle(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        close(h)


def read_all(uri: str) -> bytes:
    h = nbd_handle(uri)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(4 * MiB, size - off), off)
                        for off in range(0, size, 4 * MiB))
    finally:
        close(h)


def refused_start(cmd: list[str], timeout: float = 60) -> tuple[int, list[str]]:
    """Run a node's ``cmd`` that must refuse to start: its exit status and
    its stderr lines.  A node that starts instead fails the test (killed)."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
            pytest.fail(f"the node started instead of refusing: {cmd}")
    return p.returncode, err.splitlines()
