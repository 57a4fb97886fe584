"""The mirror tests' rig (tests/test_mirror.py, tests/test_operations.py):
the two-by-two rig of harness/mirrorrig.py started through the ``slaves``
fixture, a Mirror in this process or ``cgmirror mirror run`` as a child,
and reads of the remote site as one group.  The remote site is read "as a
group" through the secondaries' host exports: the hardened group of every
secondary is the same before and after the read (a commit moves one
secondary at a time, so a read that spans one is retried).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import nbd

from cgtest import need
from coordinator import session as session_mod
from coordinator.link import SlaveLink
from coordinator.mirror import Mirror
from harness import workload as wl
from harness.mirrorrig import LAYOUT, ORDER, REMOTE, SIZE, session_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Rig:
    """Two primaries, two secondaries, the session file; a Mirror in this
    process (``start_mirror``) or ``cgmirror mirror run`` as a child."""

    def __init__(self, slaves, run_dir, **kw):
        need("nbdkit")
        self.slaves, self.run_dir = slaves, run_dir
        self.path = os.path.join(run_dir, "m.toml")
        self.write(**kw)
        self.procs = {}
        for spec in self.session.specs() + [r.spec() for r in self.session.secondaries]:
            self.procs[spec.name] = slaves.restart(spec)
        self.mirror: Mirror | None = None
        self.thread: threading.Thread | None = None
        self.logs: list[str] = []
        self.children: list[subprocess.Popen] = []

    def write(self, **kw):
        with open(self.path, "w") as f:
            f.write(session_text(**kw))
        self.session = session_mod.load(self.path)

    def link(self, name) -> SlaveLink:
        cfg = next(c for c in list(self.session.slaves) + list(self.session.secondaries)
                   if c.name == name)
        return SlaveLink(name, cfg.control)

    def status(self, name) -> dict:
        with self.link(name) as lk:
            return lk.status()

    def uris(self) -> list[str]:
        return [self.procs[s].spec.uri(v) for s, v in ORDER]

    def host_uris(self) -> list[str]:
        return [f"nbd+unix:///{v}?socket={self.procs[REMOTE[s]].spec.nbd_socket}"
                for s, v in ORDER]

    def hardened(self) -> tuple[int, int]:
        return tuple(self.status(r)["hardened"] for r in ("r1", "r2"))

    def read_group(self, timeout: float = 60.0) -> tuple[int, wl.Report]:
        """Check the remote host exports as one group (see the module doc).
        Bounded by time, not by tries: with groups back to back on a busy
        machine, the moments when both secondaries stand at one group are
        short and far apart."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            before = self.hardened()
            if before[0] != before[1] or before[0] == 0:
                time.sleep(0.005)
                continue
            rep = wl.check_targets(self.host_uris(), LAYOUT)
            if self.hardened() == before:
                return before[0], rep
            self.logs.append(f"test: a read of {time.monotonic() - t0:.2f} s spanned a"
                             f" commit; again")
        raise AssertionError(f"the secondaries never stood at one hardened group"
                             f" for a whole read within {timeout:g} s")

    def replication_bytes(self) -> int:
        return sum(v["replication_bytes"] for r in ("r1", "r2")
                   for v in self.status(r)["volumes"].values())

    def assert_equal(self):
        """Host exports equal the primaries' images byte for byte."""
        for (s, v), uri in zip(ORDER, self.host_uris()):
            h = nbd.NBD()
            h.connect_uri(uri)
            try:
                with open(os.path.join(self.run_dir, f"{s}-{v}.img"), "rb") as f:
                    for off in range(0, SIZE, 1 << 20):
                        assert h.pread(1 << 20, off) == f.read(1 << 20), \
                            f"{REMOTE[s]}/{v} differs from {s}/{v} near {off}"
            finally:
                h.shutdown()

    # the mirror in this process
    def open_mirror(self) -> Mirror:
        self.mirror = Mirror(self.session, log=self.logs.append).open()
        return self.mirror

    def start_mirror(self) -> Mirror:
        m = self.open_mirror()
        self.thread = threading.Thread(target=m.run, name="mirror", daemon=True)
        self.thread.start()
        return m

    def stop_mirror(self):
        if self.mirror:
            self.mirror.stop()
            if self.thread:
                self.thread.join(60)
                assert not self.thread.is_alive(), "the mirror did not stop"
            self.mirror.close()
            self.mirror, self.thread = None, None

    # the mirror as a child process
    def spawn(self, env=None) -> subprocess.Popen:
        e = dict(os.environ, **(env or {}))
        e["PYTHONPATH"] = ROOT
        p = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", self.path,
                              "mirror", "run"], env=e, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
        self.children.append(p)
        return p

    def close(self):
        print("\n".join(self.logs))       # shown by pytest when a test fails
        try:
            self.stop_mirror()
        finally:
            for p in self.children:
                if p.poll() is None:
                    p.kill()
                p.wait(30)
                if p.stderr:
                    p.stderr.close()
