"""The role-command tests' rig (tests/test_role_commands.py): ``cgmirror``
run as an operator runs it, a child process with ``CGMIRROR_SESSION`` set,
against nodes that ``cgmirror slave|secondary start`` started (detached, as
in production) and a ``cgmirror mirror run`` child; a writer of
harness/workload.py through libnbd.  Every node and mirror it started is
stopped at the end, by its pidfile or its Popen.

Site a is primary s1 (volumes a, b), site b is secondary r1 (a, b).
"""

from __future__ import annotations

import subprocess

import clishell
from coordinator import direction
from coordinator.link import SlaveLink
from harness import workload as wl
from harness.mirrorrig import mirror_session

SIZE = 8 << 20
VOLS = ("a", "b")
LAYOUT = wl.Layout(("s1/a", "s1/b"), SIZE, writers=2, slots=16, granularity=64 << 10)
NAME = "rc"


class Shell(clishell.Shell):
    """The CLI shell (tests/clishell.py) on the rig's session, with its
    nodes' state and images; role commands get five minutes."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir, mirror_session(NAME, {"s1": "r1"}, VOLS, size=SIZE,
                                                 mirror={"interval_ms": 100}),
                         name=f"{NAME}.toml")

    def run(self, *args: str, timeout: float = 300,
            failpoints: str | None = None) -> subprocess.CompletedProcess:
        return super().run(*args, timeout=timeout, failpoints=failpoints)

    def ok(self, *args: str, timeout: float = 300) -> str:
        return super().ok(*args, timeout=timeout)

    def start_nodes(self) -> None:
        self.ok("slave", "start")
        self.ok("secondary", "start")

    def mirrored(self) -> int:
        """Nodes up, a workload written at s1 and mirrored: the mirror runs
        and a group hardened; its number."""
        self.start_nodes()
        self.write("s1", 40, fresh=True)
        self.start_mirror()
        return self.wait_hardened()

    def stop_mirror(self) -> int | None:
        """SIGTERM, as ``systemctl stop`` does; it must end by itself, cleanly."""
        status = super().stop_mirror()
        assert status in (None, 0), f"mirror exit status {status}: {self.tail()}"
        return status

    # ------------------------------------------------------------ nodes and images

    def node(self, name: str) -> dict:
        with SlaveLink(name, self.path(f"{name}.ctl")) as lk:
            return lk.status()

    def role(self, name: str) -> str:
        return self.node(name).get("role", "primary")

    def direction(self) -> dict:
        return direction.load(self.session())

    def uris(self, node: str) -> list[str]:
        return [f"nbd+unix:///{v}?socket={self.path(node + '.sock')}" for v in VOLS]

    def check(self, node: str) -> wl.Report:
        rep = wl.check_targets(self.uris(node), LAYOUT)
        assert rep.ok, f"{node}: {rep.summary()}"
        return rep

    def images(self, node: str) -> list[bytes]:
        out = []
        for v in VOLS:
            with open(self.path(f"{node}-{v}.img"), "rb") as f:
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
