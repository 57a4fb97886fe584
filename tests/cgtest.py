"""Helpers for the coordinator tests: session files, nbdkit file targets
(harness/peers.py), slaves.

Every process started here is started with Popen and killed and reaped by
PID in a ``finally``; sockets live under the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import nbd

from coordinator import cli, session as session_mod
from harness import peers
from coordinator import launch

MiB = 1 << 20


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
