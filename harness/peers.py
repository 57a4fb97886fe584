"""Third-party NBD servers on unix sockets: the copy targets of the demo, the
tests and the benchmarks (nbdkit, qemu-nbd, nbd-server).

Each is started by us and stopped by PID: our child's, or, for a server that
daemonizes (nbd-server), the PID its pidfile names.  A server is ready when
its socket accepts a connection.  No TCP ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from coordinator.launch import alive, remove, wait_gone


class PeerError(Exception):
    """A peer server did not start; the message carries its last words."""


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text else None
    except (FileNotFoundError, ValueError):
        return None


def _accepts(sock: str) -> bool:
    if not os.path.exists(sock):
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sock)
            return True
        except OSError:
            return False


def make_image(path: str, size: int) -> str:
    """A sparse file of ``size`` bytes (replacing any file there)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Server:
    """One NBD server process serving ``image`` on the unix socket ``sock``."""

    def __init__(self, argv: list[str], sock: str, uri: str, image: str | None = None,
                 pidfile: str | None = None, log: str | None = None,
                 forks: bool = False, timeout: float = 15.0):
        self.argv, self.sock, self.uri, self.image = argv, sock, uri, image
        self.pidfile, self.log, self.forks = pidfile, log, forks
        remove(sock)
        if pidfile:
            remove(pidfile)
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out)
        finally:
            if log:
                out.close()
        self.pid: int | None = None if forks else self.proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.proc.poll()
            if status is not None and (status != 0 or not self.forks):
                raise PeerError(f"{self.argv[0]} exited with status {status}: {self._tail()}")
            if self.forks and self.pid is None and status == 0:
                self.pid = _read_pid(self.pidfile)
            if (self.pid is not None or not self.forks) and _accepts(self.sock):
                return
            if time.monotonic() > deadline:
                raise PeerError(f"{self.argv[0]} not listening on {self.sock} after"
                                f" {timeout:.0f} s: {self._tail()}")
            time.sleep(0.01)

    def _tail(self) -> str:
        if not self.log:
            return "(no log)"
        with open(self.log, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:]) or "(empty log)"

    def stop(self) -> None:
        """Kill the server (SIGKILL: a target needs no clean exit) and reap it."""
        if not self.forks:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)
        else:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)
            pid = self.pid or (self.pidfile and _read_pid(self.pidfile))
            if pid and alive(pid):
                try:
                    # A daemon leading its own process group (nbd-server after
                    # setsid) takes its per-connection children along.
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_gone(pid, 30)
        remove(self.sock)
        if self.pidfile:
            remove(self.pidfile)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def nbdkit(sock: str, plugin: str, *args: str, filters: tuple[str, ...] = (),
           log: str | None = None, image: str | None = None) -> Server:
    """``nbdkit PLUGIN ARGS`` (behind ``filters``) on a unix socket."""
    argv = ["nbdkit", "-f", "-U", sock]
    for f in filters:
        argv += ["--filter", f]
    return Server(argv + [plugin, *args], sock, f"nbd+unix:///?socket={sock}", image,
                  log=log)


def nbdkit_file(image: str, sock: str, filters: tuple[str, ...] = (),
                args: tuple[str, ...] = (), log: str | None = None) -> Server:
    """``nbdkit file IMAGE`` on a unix socket, optionally behind filters
    (``filters=("error",), args=("error-pwrite-rate=1",)``)."""
    return nbdkit(sock, "file", f"file={image}", *args, filters=filters, log=log,
                  image=image)


def nbdkit_file_tcp_argv(image: str, host: str, port: int, host_dir: str) -> list[str]:
    """``nbdkit file IMAGE`` on ``host:port`` with mutual TLS from the
    certificate directory ``host_dir`` (wire.tls): the command only, for a
    caller that starts it where it must run (inside a network namespace,
    where readiness is checked from inside too)."""
    from wire import tls
    return ["nbdkit", "-f", "-i", host, "-p", str(port), *tls.nbdkit_args(host_dir),
            "file", f"file={image}"]


def qemu_nbd(image: str, sock: str, name: str = "disk", log: str | None = None) -> Server:
    """``qemu-nbd`` serving a raw file as export ``name`` (one client at a
    time, qemu-nbd's default)."""
    argv = ["qemu-nbd", "-f", "raw", "-k", sock, "-x", name, "--cache=writeback",
            "-t", image]
    return Server(argv, sock, f"nbd+unix:///{name}?socket={sock}", image, log=log)


def nbd_server(image: str, workdir: str, name: str = "disk",
               log: str | None = None) -> Server:
    """``nbd-server`` from a config file, on a unix socket, with its default
    options (no flush).  It daemonizes: stopped by the PID its pidfile names."""
    sock = os.path.join(workdir, "nbd-server.sock")
    pidfile = os.path.join(workdir, "nbd-server.pid")
    conf = os.path.join(workdir, "nbd-server.conf")
    with open(conf, "w") as f:
        f.write(f"[generic]\n"
                f"    unixsock = {sock}\n"
                f"    allowlist = true\n"
                f"[{name}]\n"
                f"    exportname = {os.path.abspath(image)}\n")
    return Server(["nbd-server", "-C", conf, "-p", pidfile], sock,
                  f"nbd+unix:///{name}?socket={sock}", image, pidfile, log, forks=True)
