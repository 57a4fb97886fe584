"""Run a shell script in the loopback VM against NBD exports of host servers.

    from vm.runner import Guest, run_guest

    res = run_guest('mkfs.ext4 -q /dev/nbd0; result ok yes',
                    exports=[(sock, "vol0")], timeout=60)
    res.results["ok"]            # "yes"

    g = Guest(script, exports=[(sock_a, "a"), (sock_b, "b")]).start()
    payload = g.wait_sync("mounted")       # guest ran `host_sync mounted ...`
    ... host acts (freeze, clear, copy files, kill a server) ...
    g.release("mounted", "some words")     # guest's host_sync prints them
    res = g.wait()                          # GuestResult, raises on failure

The guest (qemu TCG, the kernel + initramfs of vm/build.py) sees export i as
/dev/nbdI: qemu user-net, restricted (no route out of the VM), forwards
10.0.2.100:(10809+i) to the host unix socket of export i through a socat
spawned per connection, so several connections per export work.

Guest -> host: console lines (serial 0, streamed to the logger
``vm.console``; ``wait_line`` waits for a regex) and ``host_sync NAME`` which
also sends "WAIT NAME ..." on the control channel.  Host -> guest: the control
channel is the guest's second serial port (/dev/ttyS1), a chardev connected to
a unix socket this class listens on; ``release(NAME)`` answers "GO NAME ...".
No network traffic leaves loopback.

Success needs both the console line ``CGMVM-EXIT 0 PASS`` and qemu's exit
status 1 from isa-debug-exit (written by the guest's /init after the script).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vm import build

log = logging.getLogger("vm.runner")
console_log = logging.getLogger("vm.console")
# pytest's log capture keeps only records the logger lets through: INFO and up.
for _l in (log, console_log):
    if _l.level == logging.NOTSET:
        _l.setLevel(logging.INFO)

GUEST_FWD_ADDR = "10.0.2.100"
NBD_BASE_PORT = 10809
QEMU = "qemu-system-x86_64"


class GuestError(RuntimeError):
    """The guest failed: bad exit status, no exit line, or qemu trouble."""

    def __init__(self, msg: str, result: "GuestResult | None" = None):
        super().__init__(msg)
        self.result = result


class GuestTimeout(GuestError):
    """The guest did not finish (or reach a sync point) in time."""


@dataclass
class Export:
    sock: str
    name: str = ""
    opts: str = ""  # extra nbd-client arguments inside the guest, e.g. "-C 2"

    @classmethod
    def of(cls, x) -> "Export":
        if isinstance(x, Export):
            return x
        if isinstance(x, (str, os.PathLike)):
            return cls(os.fspath(x))
        return cls(os.fspath(x[0]), *x[1:])


@dataclass
class GuestResult:
    status: int                      # the script's exit status in the guest
    results: dict[str, str]          # RESULT KEY VALUE... lines (last wins)
    result_lines: list[str]          # every RESULT line, without the prefix
    console: list[str]               # the whole console, one str per line
    elapsed: float                   # seconds from qemu start to exit
    boot: float | None = None        # seconds until the guest ran the script
    qemu_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0


def _cmd_quote(s: str) -> str:
    # qemu option values: a comma is written as two commas.
    return s.replace(",", ",,")


class Guest:
    """One VM run.  Use start() + wait(), or as a context manager (which kills
    the VM on exit if still running)."""

    def __init__(
        self,
        script: str,
        exports=(),
        timeout: float = 60.0,
        *,
        name: str = "guest",
        errexit: bool = True,
        attach: bool = True,
        files: dict[str, bytes | str] | None = None,
        memory_mb: int = 512,
        append: str = "",
        qemu_args=(),
        tail_lines: int = 40,
    ):
        self.script = script
        self.exports = [Export.of(e) for e in exports]
        self.timeout = timeout
        self.name = name
        self.errexit = errexit
        self.attach = attach
        self.files = dict(files or {})
        self.memory_mb = memory_mb
        self.append = append
        self.qemu_args = list(qemu_args)
        self.tail_lines = tail_lines

        self.console: list[str] = []
        self._cond = threading.Condition()
        self._syncs: dict[str, str] = {}        # NAME -> text, waiting guest
        self._released: set[str] = set()
        self._ctl_conn: socket.socket | None = None
        self._ctl_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._t0 = 0.0
        self._boot: float | None = None
        self._result: GuestResult | None = None
        self._error: GuestError | None = None
        self._done = threading.Event()
        self._exit_line: tuple[int, str] | None = None

    # ------------------------------------------------------------ set-up

    def _env_file(self) -> str:
        lines = [
            f"CGMVM_NBD_COUNT={len(self.exports)}",
            f"CGMVM_ATTACH={1 if self.attach else 0}",
            f"CGMVM_NBDS_MAX={max(16, len(self.exports))}",
        ]
        for i, e in enumerate(self.exports):
            lines.append(f"CGMVM_NBD_NAME_{i}={shlex.quote(e.name)}")
            lines.append(f"CGMVM_NBD_OPTS_{i}={shlex.quote(e.opts)}")
        return "\n".join(lines) + "\n"

    def _initrd(self, base: Path, tmp: Path) -> Path:
        c = build.Cpio()
        prefix = "set -e\n" if self.errexit else ""
        c.file("run.sh", (prefix + self.script + "\n").encode(), 0o755)
        c.file("etc/cgmvm.env", self._env_file().encode())
        for path, data in self.files.items():
            c.file(path, data.encode() if isinstance(data, str) else data, 0o644)
        extra = gzip.compress(c.finish(), compresslevel=1, mtime=0)
        out = tmp / "initrd.gz"
        with open(out, "wb") as f, open(base, "rb") as b:
            shutil.copyfileobj(b, f)
            f.write(extra)
        return out

    def _qemu_argv(self, art: dict, initrd: Path, ctl_path: str) -> list[str]:
        socat = shutil.which("socat") or "socat"
        fwds = []
        for i, e in enumerate(self.exports):
            if not os.path.exists(e.sock):
                log.warning("%s: export %d socket %s does not exist (yet)",
                            self.name, i, e.sock)
            cmd = (f"{socat} FD:0,nodelay "
                   f"UNIX-CONNECT:{shlex.quote(os.path.abspath(e.sock))}")
            fwds.append(f",guestfwd=tcp:{GUEST_FWD_ADDR}:{NBD_BASE_PORT + i}"
                        f"-cmd:{_cmd_quote(cmd)}")
        append = "console=ttyS0 panic=-1 quiet"
        if self.append:
            append += " " + self.append
        return [
            QEMU,
            "-accel", "tcg", "-cpu", "max", "-m", str(self.memory_mb),
            "-smp", "1", "-nodefaults", "-nographic", "-no-reboot",
            "-serial", "stdio",
            "-chardev", f"socket,id=ctl,path={_cmd_quote(ctl_path)}",
            "-serial", "chardev:ctl",
            "-kernel", str(art["kernel"]),
            "-initrd", str(initrd),
            "-append", append,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-netdev", "user,id=n0,restrict=on" + "".join(fwds),
            "-device", "virtio-net-pci,netdev=n0,romfile=",
            *self.qemu_args,
        ]

    def start(self) -> "Guest":
        if self._proc is not None:
            raise RuntimeError("guest already started")
        art = build.ensure()
        self._tmp = tempfile.TemporaryDirectory(prefix="cgmvm-")
        tmp = Path(self._tmp.name)
        initrd = self._initrd(art["initrd"], tmp)
        ctl_path = str(tmp / "ctl.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(ctl_path)
        lsock.listen(1)
        argv = self._qemu_argv(art, initrd, ctl_path)
        log.info("%s: starting qemu: %s", self.name, shlex.join(argv))
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        t = threading.Thread(target=self._accept_ctl, args=(lsock,),
                             name=f"{self.name}-ctl", daemon=True)
        t.start()
        self._threads.append(t)
        t = threading.Thread(target=self._read_console,
                             name=f"{self.name}-console", daemon=True)
        t.start()
        self._threads.append(t)
        t = threading.Thread(target=self._watch, name=f"{self.name}-watch",
                             daemon=True)
        t.start()
        self._threads.append(t)
        return self

    # ------------------------------------------------------------ threads

    def _read_console(self):
        assert self._proc and self._proc.stdout
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            console_log.info("[%s %6.2f] %s", self.name,
                             time.monotonic() - self._t0, line)
            with self._cond:
                self.console.append(line)
                if "CGMVM-BOOTED" in line and self._boot is None:
                    self._boot = time.monotonic() - self._t0
                m = re.match(r"CGMVM-EXIT (\d+) (PASS|FAIL)\s*$", line)
                if m:
                    self._exit_line = (int(m.group(1)), m.group(2))
                self._cond.notify_all()
        self._proc.stdout.close()

    def _accept_ctl(self, lsock: socket.socket):
        lsock.settimeout(1.0)
        try:
            while not self._done.is_set():
                try:
                    conn, _ = lsock.accept()
                    break
                except socket.timeout:
                    continue
            else:
                return
        finally:
            lsock.close()
        with self._ctl_lock:
            self._ctl_conn = conn
        buf = b""
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._on_ctl(line.decode("utf-8", "replace").strip("\r"))
        except OSError:
            pass

    def _on_ctl(self, line: str):
        log.info("%s: ctl <- %s", self.name, line)
        parts = line.split(" ", 2)
        if parts[0] == "WAIT" and len(parts) >= 2:
            with self._cond:
                self._syncs[parts[1]] = parts[2] if len(parts) > 2 else ""
                self._cond.notify_all()

    def _watch(self):
        assert self._proc
        try:
            rc = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            self._finish(None, timed_out=True)
            return
        self._finish(rc, timed_out=False)

    def _finish(self, qrc: int | None, timed_out: bool):
        for t in self._threads:
            if t.name.endswith("-console"):
                t.join(5)
        elapsed = time.monotonic() - self._t0
        with self._cond:
            console = list(self.console)
            exit_line = self._exit_line
        results: dict[str, str] = {}
        rlines = []
        for line in console:
            if line.startswith("RESULT "):
                rest = line[len("RESULT "):]
                rlines.append(rest)
                k, _, v = rest.partition(" ")
                results[k] = v
        status = exit_line[0] if exit_line else -1
        res = GuestResult(status, results, rlines, console, elapsed,
                          self._boot, qrc)
        err = None
        if timed_out:
            err = GuestTimeout(
                f"{self.name}: no exit after {self.timeout:.0f} s"
                + self._tail(console), res)
        elif exit_line is None:
            err = GuestError(
                f"{self.name}: qemu exited with {qrc} without a CGMVM-EXIT line"
                + self._tail(console), res)
        elif qrc != (2 * exit_line[0] + 1) & 0xFF:
            err = GuestError(
                f"{self.name}: exit line says {exit_line} but qemu exited "
                f"with {qrc} (want {2 * exit_line[0] + 1})" + self._tail(console),
                res)
        elif exit_line[0] != 0:
            err = GuestError(
                f"{self.name}: guest script failed with status {exit_line[0]}"
                + self._tail(console), res)
        log.info("%s: qemu exit %s, guest status %s, %.2f s (boot %s)",
                 self.name, qrc, status, elapsed,
                 f"{self._boot:.2f} s" if self._boot else "?")
        with self._cond:
            self._result = res
            self._error = err
            self._done.set()
            self._cond.notify_all()
        with self._ctl_lock:
            if self._ctl_conn is not None:
                self._ctl_conn.close()
                self._ctl_conn = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _tail(self, console: list[str] | None = None) -> str:
        if console is None:
            with self._cond:
                console = list(self.console)
        tail = console[-self.tail_lines:]
        return "\n--- console tail ---\n" + "\n".join(tail)

    # ------------------------------------------------------------ API

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._done.is_set()

    def wait(self, timeout: float | None = None, check: bool = True) -> GuestResult:
        """Wait for the guest to end (at most `timeout`, default: the guest's
        own timeout, after which qemu is killed).  Raises GuestError on
        failure when check is true."""
        if self._proc is None:
            raise RuntimeError("guest not started")
        limit = self.timeout + 10 if timeout is None else timeout
        if not self._done.wait(limit):
            raise GuestTimeout(f"{self.name}: still running after {limit} s"
                               + self._tail())
        for t in self._threads:
            t.join(5)
        if check and self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def wait_line(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait for a console line matching regex `pattern` (searched from
        console line index `start`); return the match."""
        rx = re.compile(pattern)
        pos = [start]

        def found():
            while pos[0] < len(self.console):
                m = rx.search(self.console[pos[0]])
                pos[0] += 1
                if m:
                    return m
            return None

        return self._await(found, f"a line matching {pattern!r}", timeout)

    def wait_sync(self, name: str, timeout: float = 30.0) -> str:
        """Wait until the guest calls `host_sync NAME ...`; return its text.
        The guest stays blocked until release(NAME) or fail(NAME)."""
        return self._await(lambda: self._syncs.get(name), f"host_sync {name}", timeout)

    def _await(self, found, what: str, timeout: float):
        """Wait (under the console condition) until ``found()`` returns
        something; raise if the guest ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (got := found()) is None:
                if self._done.is_set():
                    raise self._error or GuestError(
                        f"{self.name}: ended before {what}" + self._tail(self.console))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"{self.name}: no {what} in {timeout} s"
                                       + self._tail(self.console))
                self._cond.wait(left)
            return got

    def _send(self, line: str):
        with self._ctl_lock:
            if self._ctl_conn is None:
                raise GuestError(f"{self.name}: control channel not connected")
            log.info("%s: ctl -> %s", self.name, line)
            self._ctl_conn.sendall(line.encode() + b"\n")

    def release(self, name: str, payload: str = ""):
        """Let the guest's `host_sync NAME` return; it prints `payload`."""
        if "\n" in payload:
            raise ValueError("payload must be one line")
        with self._cond:
            self._syncs.pop(name, None)
            self._released.add(name)
        self._send(f"GO {name} {payload}".rstrip())

    def fail(self, name: str, reason: str = ""):
        """Make the guest's `host_sync NAME` return 1 (the script then ends
        under set -e)."""
        with self._cond:
            self._syncs.pop(name, None)
        self._send(f"FAIL {name} {reason}".rstrip())

    def sync(self, name: str, timeout: float = 30.0, payload: str = "") -> str:
        """wait_sync + release: for a rendezvous with nothing to do."""
        text = self.wait_sync(name, timeout)
        self.release(name, payload)
        return text

    def kill(self):
        """Kill qemu now (idempotent)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._done.wait(15)

    def __enter__(self) -> "Guest":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.kill()
        for t in self._threads:
            t.join(5)
        return False


def run_guest(script: str, exports=(), timeout: float = 60.0, *,
              check: bool = True, **kw) -> GuestResult:
    """Boot, run `script`, return its GuestResult (raises GuestError if the
    guest failed and check is true)."""
    with Guest(script, exports, timeout, **kw) as g:
        return g.wait(check=check)
