"""The role-command tests' rig (tests/test_role_commands.py): ``cgmirror``
run as an operator runs it, a child process with ``CGMIRROR_SESSION`` set,
against nodes that ``cgmirror slave|secondary start`` started (detached, as
in production) and a ``cgmirror mirror run`` child; a writer of
tests/workload.py through libnbd.  Every node and mirror it started is
stopped at the end, by its pidfile or its Popen.

Site a is primary s1 (volumes a, b), site b is secondary r1 (a, b).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from harness import workload as wl
from coordinator import direction, session as session_mod
from coordinator.link import SlaveLink
from harness.mirrorrig import mirror_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "coordinator.cli"]
SIZE = 8 << 20
VOLS = ("a", "b")
LAYOUT = wl.Layout(("s1/a", "s1/b"), SIZE, writers=2, slots=16, granularity=64 << 10)
NAME = "rc"


class Shell:
    def __init__(self, run_dir: str):
        self.dir = run_dir
        self.path = os.path.join(run_dir, f"{NAME}.toml")
        with open(self.path, "w") as f:
            f.write(mirror_session(NAME, {"s1": "r1"}, VOLS, size=SIZE,
                                   mirror={"interval_ms": 100}))
        self.session = session_mod.load(self.path)
        self.env = dict(os.environ, CGMIRROR_SESSION=self.path, PYTHONPATH=ROOT)
        self.env.pop("CGMIRROR_FAILPOINTS", None)
        self.mirror: subprocess.Popen | None = None
        self.mirror_log = os.path.join(run_dir, "mirror.log")

    # ------------------------------------------------------------ commands

    def run(self, *args: str, timeout: float = 300,
            failpoints: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env, CGMIRROR_FAILPOINTS=failpoints) if failpoints else self.env
        return subprocess.run([*CLI, *args], cwd=self.dir, env=env, text=True,
                              capture_output=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 300) -> str:
        p = self.run(*args, timeout=timeout)
        assert p.returncode == 0, f"cgmirror {' '.join(args)}: {p.returncode} {p.stderr}"
        return p.stdout

    def start_nodes(self) -> None:
        self.ok("slave", "start")
        self.ok("secondary", "start")

    def start_mirror(self) -> None:
        log = open(self.mirror_log, "a")
        try:
            self.mirror = subprocess.Popen([*CLI, "mirror", "run"], cwd=self.dir,
                                           env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=log)
        finally:
            log.close()

    def stop_mirror(self) -> None:
        """SIGTERM, as ``systemctl stop`` does; it must end by itself."""
        if self.mirror is not None:
            self.mirror.send_signal(signal.SIGTERM)
            try:
                assert self.mirror.wait(timeout=120) == 0, self.tail()
            finally:
                if self.mirror.poll() is None:
                    self.mirror.kill()
                    self.mirror.wait()
                self.mirror = None

    def tail(self) -> str:
        with open(self.mirror_log) as f:
            return "".join(f.readlines()[-15:])

    def mirror_status(self) -> dict:
        return json.loads(self.ok("mirror", "status", "--json"))

    def wait_hardened(self, above: int = 0, timeout: float = 120) -> int:
        """Poll the running mirror until a group above ``above`` hardened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.mirror is None or self.mirror.poll() is None, self.tail()
            p = self.run("mirror", "status", "--json")
            if p.returncode == 0:
                h = json.loads(p.stdout).get("hardened")
                if h is not None and h > above:
                    return h
            time.sleep(0.2)
        raise AssertionError(f"no group above {above} hardened in {timeout} s:"
                             f" {self.tail()}")

    # ------------------------------------------------------------ nodes and images

    def node(self, name: str) -> dict:
        with SlaveLink(name, os.path.join(self.dir, f"{name}.ctl")) as lk:
            return lk.status()

    def role(self, name: str) -> str:
        return self.node(name).get("role", "primary")

    def direction(self) -> dict:
        return direction.load(self.session)

    def uris(self, node: str) -> list[str]:
        return [f"nbd+unix:///{v}?socket={os.path.join(self.dir, node + '.sock')}"
                for v in VOLS]

    def check(self, node: str) -> wl.Report:
        rep = wl.check_targets(self.uris(node), LAYOUT)
        assert rep.ok, f"{node}: {rep.summary()}"
        return rep

    def images(self, node: str) -> list[bytes]:
        out = []
        for v in VOLS:
            with open(os.path.join(self.dir, f"{node}-{v}.img"), "rb") as f:
                out.append(f.read())
        return out

    def assert_equal(self) -> None:
        for v, x, y in zip(VOLS, self.images("s1"), self.images("r1")):
            assert x == y, f"volume {v} differs between s1 and r1"

    def write(self, node: str, records: int, fresh: bool = False) -> None:
        """``records`` dependent writes to ``node``'s host exports."""
        w = (wl.Workload(self.uris(node), LAYOUT, max_records=records) if fresh
             else wl.Workload.resume(self.uris(node), LAYOUT, max_records=records))
        w.start()
        for t in w._threads:
            t.join(120)
        w.stop()
        assert not w.errors, w.errors

    def close(self) -> None:
        if self.mirror is not None and self.mirror.poll() is None:
            self.mirror.send_signal(signal.SIGTERM)
            try:
                self.mirror.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait()
        for noun in ("slave", "secondary"):
            self.run(noun, "stop", timeout=120)
