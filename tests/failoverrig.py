"""The failover tests' rig (tests/test_failover.py, test_failover_sites.py,
test_secondary_image.py):
site a is primary s1 (volumes a, b), site b is secondary r1 (a, b); every
node with its write-intent region equal to the granularity G.

Writes: the workload's records sit in block 0 of every 8-block stride (16
slots of 512 KiB); the tests' own writes go to the other blocks, so the
checker still reads a consistent run, and the blocks each side wrote are
known exactly (``Writes``).
"""

from __future__ import annotations

import os
import random

import nbd

from cgtest import need, wait_until
from coordinator import cli, direction, launch, session as session_mod
from coordinator.cli import failover_cmds
from coordinator.link import SlaveLink
from coordinator.mirror import Mirror
from harness import workload as wl
from harness.mirrorrig import mirror_session
from nbdplugin.changemap import keeps_record, sends_pieces

G = 64 * 1024
SIZE = 8 << 20
NBLOCKS = SIZE // G
LAYOUT = wl.Layout(("s1/a", "s1/b"), SIZE, writers=2, slots=16, granularity=G)
VOLS = ("a", "b")



def session_text(**keys) -> str:
    """The rig's session (``keys``: more of harness/mirrorrig.py's)."""
    return mirror_session("f", {"s1": "r1"}, VOLS, size=SIZE, **keys)


SESSION = session_text()


class Writes:
    """Blocks written per volume, by the workload and by ``scatter`` (and
    the workload's 4 KiB records: a live primary sends only those pieces)."""

    def __init__(self):
        self.blocks = {v: set() for v in VOLS}
        self.records = {v: set() for v in VOLS}
        self.whole = {v: set() for v in VOLS}

    def workload(self, uris, records: int, resume: bool = True) -> None:
        work = (wl.Workload.resume(uris, LAYOUT, max_records=records) if resume
                else wl.Workload(uris, LAYOUT, max_records=records)).start()
        for t in work._threads:
            t.join(60)
        work.stop()
        assert not work.errors, work.errors
        for w in range(LAYOUT.writers):
            for i in range(work.start_heads[w] + 1, work.acked[w] + 1):
                v, s = LAYOUT.place(w, i)
                self.blocks[VOLS[v]].add(LAYOUT.offset(w, s) // G)
                self.records[VOLS[v]].add(LAYOUT.offset(w, s))

    def scatter(self, uris, count: int, seed: int) -> None:
        """``count`` blocks per volume outside the workload's, fresh bytes."""
        rng = random.Random(seed)
        for v, uri in zip(VOLS, uris):
            h = nbd.NBD()
            h.connect_uri(uri)
            try:
                for b in rng.sample([b for b in range(NBLOCKS) if b % 8], count):
                    h.pwrite(rng.randbytes(G), b * G)
                    self.blocks[v].add(b)
                    self.whole[v].add(b)
                h.flush()
            finally:
                h.shutdown()

    def sent(self, whole: dict[str, set] | None = None) -> int:
        """Bytes a live primary's next group sends for these writes: a
        block written whole (here, or in ``whole``: marked from the other
        site) goes whole, one with only records just those."""
        whole = whole or {v: set() for v in VOLS}
        total = 0
        for v in VOLS:
            for b in self.blocks[v] | whole[v]:
                mask = sum(1 << (r % G // wl.RECORD) for r in self.records[v] if r // G == b)
                total += (G if b in self.whole[v] | whole[v]
                          or not keeps_record(mask, wl.RECORD, G)
                          or not sends_pieces(mask, wl.RECORD, G)
                          else wl.RECORD * bin(mask).count("1"))
        return total

    def union(self, other: "Writes") -> dict[str, set]:
        return {v: self.blocks[v] | other.blocks[v] for v in VOLS}


class Rig:
    """s1 and r1 started under their supervisors by the test (``slaves``,
    detached: stopped and reaped with the test); role switches go through
    each node's role op and its supervisor starts it again."""

    def __init__(self, slaves, run_dir, monkeypatch):
        need("nbdkit")
        self.dir = run_dir
        self.path = os.path.join(run_dir, "f.toml")
        with open(self.path, "w") as f:
            f.write(SESSION)
        self.session = session_mod.load(self.path)
        # Nodes run under their supervisors: role commands switch them through
        # their role op.  ``slaves``: the fixture, for starts.
        self.slaves = slaves
        self.procs = {}
        for spec in [self.session.slaves[0].spec(), self.session.secondaries[0].spec()]:
            spec.region = G
            # Under a supervisor (launch.start detached): a role op's exit 75
            # is followed by a start in the recorded role, as under the unit.
            self.procs[spec.name] = slaves.restart(spec, detach=True)
        self.logs: list[str] = []

    def revive(self, name: str, failpoints: str | None = None,
               filters: tuple[list, list] | None = None) -> None:
        """Start ``name`` again under its supervisor, as its host does at
        boot: in the role it recorded itself (``failpoints``, ``filters``:
        nbdkit filters and their arguments, in every start its supervisor
        makes)."""
        spec = (self.session.slaves[0] if name == "s1" else self.session.secondaries[0]).spec()
        spec.region = G
        if failpoints:
            spec.env = {"CGMIRROR_FAILPOINTS": failpoints}
        if filters:
            spec.filters, spec.filter_args = filters
        # A node that died (kill -9, a failpoint): its supervisor passes the
        # status up and exits; wait for that before the host starts it again.
        wait_until(lambda: launch.supervisor_pid(spec) is None, 30,
                   f"{name}'s supervisor to exit")
        self.procs[name] = self.slaves.restart(spec, detach=True)

    def restart(self, name: str, failpoints: str | None = None,
                filters: tuple[list, list] | None = None) -> None:
        """Stop ``name`` cleanly (SIGTERM to its supervisor) and ``revive`` it."""
        self.procs[name].stop(timeout=30)
        self.revive(name, failpoints, filters)

    def cli(self, *argv) -> int:
        return cli.main(["-s", self.path, *argv])

    def status(self, name) -> dict:
        with SlaveLink(name, os.path.join(self.dir, f"{name}.ctl")) as lk:
            return lk.status()

    def call(self, name, op, **args) -> dict:
        with SlaveLink(name, os.path.join(self.dir, f"{name}.ctl")) as lk:
            return lk.call(op, **args)

    def uris(self, node) -> list[str]:
        return [f"nbd+unix:///{v}?socket={os.path.join(self.dir, node + '.sock')}"
                for v in VOLS]

    def group(self, source="a", full_ok=False) -> int:
        """Form one group of ``source``'s direction; its number."""
        m = Mirror(direction.oriented(self.session, source), log=self.logs.append,
                   serve_control=False).open()
        try:
            res = m.run_once()
            assert res.outcome == "hardened", (res, self.logs)
            return res.n
        finally:
            m.close()

    def check(self, node) -> wl.Report:
        rep = wl.check_targets(self.uris(node), LAYOUT)
        assert rep.ok, rep.summary()
        return rep

    def images(self, node) -> list[bytes]:
        out = []
        for v in VOLS:
            with open(os.path.join(self.dir, f"{node}-{v}.img"), "rb") as f:
                out.append(f.read())
        return out

    def assert_equal(self):
        for v, x, y in zip(VOLS, self.images("s1"), self.images("r1")):
            if x != y:
                bad = [b for b in range(NBLOCKS) if x[b * G:(b + 1) * G] != y[b * G:(b + 1) * G]]
                raise AssertionError(f"volume {v} differs in blocks {bad[:10]}")

    def replication_bytes(self, node) -> int:
        return sum(v["replication_bytes"] for v in self.status(node)["volumes"].values())
