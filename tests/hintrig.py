"""A shell for ``tests/test_hints.py``: the real ``cgmirror`` command as a
child process in a session's directory, and the commands a message names.

Not a test module: the ``Shell`` of tests/test_operator.py, copied and
grown (the mirror's stderr goes to a file, so a long run never fills a
pipe; every wait has a deadline).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "coordinator.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIRRORED = """\
[session]
name = "hint"
state_dir = "state"
lease_ms = 10000
max_coordination_ms = 2000

[mirror]
interval_ms = 100
control = "m.ctl"

[[slave]]
name = "s1"
state_dir = "s1"
nbd_socket = "s1.sock"
control = "s1.ctl"

[[slave.volume]]
name = "a"
path = "s1-a.img"
size = "4M"
secondary = "r1"

[[secondary]]
name = "r1"
state_dir = "r1"
nbd_socket = "r1.sock"
control = "r1.ctl"

[[secondary.volume]]
name = "a"
path = "r1-a.img"
size = "4M"
"""

COPIED = """\
[session]
name = "hint"
state_dir = "state"
lease_ms = 10000
max_coordination_ms = 2000

[[slave]]
name = "s1"
state_dir = "s1"
nbd_socket = "s1.sock"
control = "s1.ctl"

[[slave.volume]]
name = "a"
path = "s1-a.img"
size = "4M"
target = "nbd+unix:///?socket={target}"
"""

# A command a message names: `cgmirror ...` in backquotes, or after "with: ".
_QUOTED = re.compile(r"`(cgmirror [^`]+)`")
_AFTER_WITH = re.compile(r"with: (cgmirror [^)`;,]+)")


def commands(message: str) -> list[list[str]]:
    """Every ``cgmirror`` command ``message`` names, as argv without the
    leading ``cgmirror``, in the order they appear."""
    found = sorted([(m.start(), m.group(1)) for m in _QUOTED.finditer(message)]
                   + [(m.start(), m.group(1).strip()) for m in _AFTER_WITH.finditer(message)])
    return [shlex.split(cmd)[1:] for _, cmd in found]


def the_command(message: str, verb: str | None = None) -> list[str]:
    """The one command ``message`` names (starting with ``verb`` if given)."""
    cmds = [c for c in commands(message) if verb is None or c[0] == verb]
    assert cmds, f"no `cgmirror {verb or ''}...` in: {message}"
    return cmds[0]


class Shell:
    """``cgmirror`` as a child with ``CGMIRROR_SESSION`` set, in ``run_dir``;
    ``close`` stops the mirror it started and every node of the session."""

    def __init__(self, run_dir: str, text: str = MIRRORED):
        self.dir = run_dir
        self.session = os.path.join(run_dir, "hint.toml")
        with open(self.session, "w") as f:
            f.write(text)
        self.env = dict(os.environ, CGMIRROR_SESSION=self.session, PYTHONPATH=ROOT)
        self.mirror: subprocess.Popen | None = None
        self.mirror_log = os.path.join(run_dir, "mirror.log")

    def path(self, *p: str) -> str:
        return os.path.join(self.dir, *p)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=self.dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 120) -> str:
        p = self.run(*args, timeout=timeout)
        assert p.returncode == 0, f"cgmirror {' '.join(args)}: {p.returncode} {p.stderr}"
        return p.stdout

    def fails(self, *args: str, timeout: float = 120) -> str:
        """Run a command that must fail; return its one line of error."""
        p = self.run(*args, timeout=timeout)
        assert p.returncode != 0, f"cgmirror {' '.join(args)} succeeded: {p.stdout}"
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("cgmirror: "), p.stderr
        return p.stderr.strip()

    def start_mirror(self, args: tuple[str, ...] = ("mirror", "run")) -> None:
        assert self.mirror is None
        with open(self.mirror_log, "a") as log:
            self.mirror = subprocess.Popen([*CLI, *args], cwd=self.dir, env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=log)

    def stop_mirror(self) -> None:
        if self.mirror is not None:
            self.mirror.send_signal(signal.SIGTERM)
            try:
                self.mirror.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait()
            self.mirror = None

    def status(self) -> dict | None:
        p = self.run("mirror", "status", "--json")
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait_hardened(self, above: int = 0, timeout: float = 90) -> int:
        """Poll ``mirror status --json`` until a group above ``above`` hardened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.mirror is None or self.mirror.poll() is None, self.log_tail()
            st = self.status()
            h = st and st.get("hardened")
            if h is not None and h > above:
                return h
            time.sleep(0.2)
        raise AssertionError(f"no group above {above} hardened in {timeout} s: "
                             + self.log_tail())

    def wait_group_error(self, needle: str, timeout: float = 60) -> str:
        """Poll ``history --json`` until a failed group's error holds ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = json.loads(self.ok("history", "--json", "--limit", "20"))
            for g in doc["groups"]:
                if g["outcome"] == "failed" and needle in (g["error"] or ""):
                    return g["error"]
            time.sleep(0.2)
        raise AssertionError(f"no group failed with {needle!r} in {timeout} s: "
                             + self.log_tail())

    def log_tail(self) -> str:
        try:
            with open(self.mirror_log) as f:
                return "".join(f.readlines()[-5:])
        except OSError:
            return "(no mirror log)"

    def close(self) -> None:
        self.stop_mirror()
        for noun in ("slave", "secondary"):
            self.run(noun, "stop", timeout=60)


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def scribble(path: str) -> None:
    """Overwrite a whole image in place (same inode, same size) with other bytes."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
