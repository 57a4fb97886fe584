"""``cgmirror`` run as an operator runs it: a child process in the session's
directory with ``CGMIRROR_SESSION`` set (tests/test_operator.py's pattern,
shared here because one test module never imports another).

``Shell.close`` stops the mirror it started (SIGTERM, then SIGKILL, by its
PID) and every node through ``cgmirror slave|secondary stop``; nodes a
test started itself (``start_node``) are stopped by their PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from coordinator import launch, session as session_mod

CLI = [sys.executable, "-m", "coordinator.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Shell:
    def __init__(self, run_dir: str, text: str, name: str = "op.toml"):
        self.dir = run_dir
        self.path = os.path.join(run_dir, name)
        self.write(text)
        self.env = dict(os.environ, CGMIRROR_SESSION=self.path, PYTHONPATH=ROOT)
        self.env.pop("JOURNAL_STREAM", None)
        self.mirror: subprocess.Popen | None = None
        self.mirror_log = os.path.join(run_dir, "mirror.log")
        self.nodes: list[launch.SlaveProcess] = []

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=self.dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 120) -> str:
        p = self.run(*args, timeout=timeout)
        assert p.returncode == 0, f"cgmirror {' '.join(args)}: {p.returncode} {p.stderr}"
        return p.stdout

    def status(self) -> dict:
        return json.loads(self.ok("mirror", "status", "--json"))

    def start_mirror(self) -> None:
        with open(self.mirror_log, "ab") as log:
            self.mirror = subprocess.Popen([*CLI, "mirror", "run"], cwd=self.dir,
                                           env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=log)

    def log(self) -> str:
        with open(self.mirror_log, errors="replace") as f:
            return f.read()

    def stop_mirror(self) -> None:
        if self.mirror is not None:
            self.mirror.send_signal(signal.SIGTERM)
            try:
                self.mirror.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait()
            self.mirror = None

    def poll(self, pred, timeout: float = 60, what: str = "condition"):
        """``pred(status document)`` until it is true (returns its value)."""
        deadline = time.monotonic() + timeout
        doc = None
        while time.monotonic() < deadline:
            p = self.run("mirror", "status", "--json")
            if p.returncode == 0:
                doc = json.loads(p.stdout)
                v = pred(doc)
                if v:
                    return v
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {doc}")

    def wait_hardened(self, at_least: int = 1) -> int:
        return self.poll(lambda d: (d.get("hardened") or 0) >= at_least
                         and d["hardened"], what=f"group {at_least} hardened")

    def node_spec(self, name: str) -> launch.SlaveSpec:
        """How the session runs node ``name`` (a [[slave]] or [[secondary]])."""
        s = session_mod.load(self.path)
        cfg = next(n for n in s.slaves + s.secondaries if n.name == name)
        return cfg.spec()

    def start_node(self, spec: launch.SlaveSpec) -> launch.SlaveProcess:
        """Start a node ourselves (with filters, say); stopped by PID at the end."""
        proc = launch.start(spec)
        self.nodes.append(proc)
        return proc

    def close(self) -> None:
        self.stop_mirror()
        for proc in self.nodes:
            proc.stop()
        for noun in ("slave", "secondary"):
            self.run(noun, "stop", timeout=60)
