"""``cgmirror`` run as an operator runs it: a child process in the session's
directory with ``CGMIRROR_SESSION`` set.  The one ``Shell`` of the CLI tests
(test_operator, test_hints, test_mirror_reports, test_role_commands: the
last two through their rigs' subclasses), here because one test module
never imports another.

``Shell.close`` stops the mirror it started (SIGTERM, then SIGKILL, by its
PID) and every node through ``cgmirror slave|secondary stop``; nodes a
test started itself (``start_node``) are stopped by their PID.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from coordinator import launch, session as session_mod

CLI = [sys.executable, "-m", "coordinator.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mirrored_session(name: str, state_dir: str = "state") -> str:
    """A session as an operator writes it: primary s1 mirrors its volume a
    (4 MiB) to secondary r1, every node on unix sockets in the session's
    directory, groups 100 ms apart, the mirror's control ``m.ctl``."""
    return f"""\
[session]
name = "{name}"
state_dir = "{state_dir}"
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


class Shell:
    """``run_dir`` holds the session file ``name`` (``text``); ``umask``, if
    given, is every child's."""

    def __init__(self, run_dir: str, text: str, name: str = "op.toml",
                 umask: int | None = None):
        self.dir = run_dir
        self.file = os.path.join(run_dir, name)
        self.umask = umask
        self.write_session(text)
        self.env = dict(os.environ, CGMIRROR_SESSION=self.file, PYTHONPATH=ROOT)
        for inherited in ("JOURNAL_STREAM", "CGMIRROR_FAILPOINTS"):
            self.env.pop(inherited, None)
        self.mirror: subprocess.Popen | None = None
        self.mirror_log = os.path.join(run_dir, "mirror.log")
        self.nodes: list[launch.SlaveProcess] = []

    def path(self, *p: str) -> str:
        """A path in the session's directory."""
        return os.path.join(self.dir, *p)

    def write_session(self, text: str) -> None:
        with open(self.file, "w") as f:
            f.write(text)

    def session(self) -> session_mod.Session:
        return session_mod.load(self.file)

    # ------------------------------------------------------------ commands

    def _preexec(self):
        if self.umask is not None:
            os.umask(self.umask)

    def run(self, *args: str, timeout: float = 120,
            failpoints: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env, CGMIRROR_FAILPOINTS=failpoints) if failpoints else self.env
        return subprocess.run([*CLI, *args], cwd=self.dir, env=env, text=True,
                              capture_output=True, timeout=timeout,
                              preexec_fn=self._preexec)

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

    def pipe(self, args: str, reader: str) -> subprocess.CompletedProcess:
        """``cgmirror ARGS | READER`` in a shell (pipefail: cgmirror's status)."""
        cmd = " ".join(shlex.quote(c) for c in CLI) + f" {args} | {reader}"
        return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=self.dir,
                              env=self.env, text=True, capture_output=True, timeout=60)

    # ------------------------------------------------------------ the mirror

    def start_mirror(self, args: tuple[str, ...] = ("mirror", "run")) -> None:
        assert self.mirror is None
        with open(self.mirror_log, "ab") as log:
            self.mirror = subprocess.Popen([*CLI, *args], cwd=self.dir, env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=log,
                                           preexec_fn=self._preexec)

    def stop_mirror(self) -> int | None:
        """SIGTERM, as ``systemctl stop`` does; SIGKILL after 60 s.  Its exit
        status (None if none ran)."""
        if self.mirror is None:
            return None
        self.mirror.send_signal(signal.SIGTERM)
        try:
            status = self.mirror.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.mirror.kill()
            status = self.mirror.wait()
        self.mirror = None
        return status

    def log(self) -> str:
        try:
            with open(self.mirror_log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "".join(self.log().splitlines(True)[-lines:]) or "(no mirror log)"

    def status(self) -> dict:
        """``mirror status --json``."""
        return json.loads(self.ok("mirror", "status", "--json"))

    def quiet(self, *args: str) -> tuple[int, str]:
        """``cgmirror ARGS`` in this process (the CLI's own ``main``, the
        session given by ``-s``): (exit code, stdout).  For the polls and
        the clean-up only (a poll asks every 0.2 s: a child each time costs
        a second of a loaded core and holds the wait a second past its
        event).  What a test checks of the CLI itself goes through ``run``
        (a child, as an operator runs it)."""
        from coordinator.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["-s", self.file, *args])
        return rc, out.getvalue()

    def poll(self, pred, timeout: float = 60, what: str = "condition"):
        """``pred(mirror status document)`` until it is true (its value)."""
        deadline = time.monotonic() + timeout
        doc = None
        while time.monotonic() < deadline:
            assert self.mirror is None or self.mirror.poll() is None, self.tail()
            rc, out = self.quiet("mirror", "status", "--json")
            if rc == 0:
                doc = json.loads(out)
                v = pred(doc)
                if v:
                    return v
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {doc};"
                             f" {self.tail()}")

    def wait_hardened(self, above: int = 0, timeout: float = 120) -> int:
        """The number of the first group above ``above`` seen hardened."""
        return self.poll(lambda d: (d.get("hardened") or 0) > above and d["hardened"],
                         timeout, f"a group above {above} hardened")

    def wait_group_error(self, needle: str, timeout: float = 60) -> str:
        """Poll ``history --json`` until a failed group's error holds ``needle``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc, out = self.quiet("history", "--json", "--limit", "20")
            assert rc == 0, f"cgmirror history --json: exit {rc}"
            for g in json.loads(out)["groups"]:
                if g["outcome"] == "failed" and needle in (g["error"] or ""):
                    return g["error"]
            time.sleep(0.2)
        raise AssertionError(f"no group failed with {needle!r} in {timeout} s: "
                             + self.tail())

    # ------------------------------------------------------------ nodes

    def node_spec(self, name: str) -> launch.SlaveSpec:
        """How the session runs node ``name`` (a [[slave]] or [[secondary]])."""
        s = self.session()
        cfg = next(n for n in s.slaves + s.secondaries if n.name == name)
        return cfg.spec()

    def start_node(self, spec: launch.SlaveSpec) -> launch.SlaveProcess:
        """Start a node ourselves (with filters, say); stopped by PID at the end."""
        proc = launch.start(spec)
        self.nodes.append(proc)
        return proc

    def __enter__(self) -> "Shell":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        Shell.stop_mirror(self)     # not a subclass's: its checks are the test's

        for proc in self.nodes:
            proc.stop()
        # The clean-up, not a check: the CLI's own code in this process
        # (``quiet``), a second saved per child on a loaded machine.
        for noun in ("slave", "secondary"):
            self.quiet(noun, "stop")
