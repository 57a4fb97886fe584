"""Dependent-write consistency of copies, with the workload of harness/workload.py.

First the checker itself (no processes): it accepts consistent images and
catches each kind of inconsistency.  Then real slaves: the workload writes
through establish and copy, and every copy must pass the checker, also when
a slave dies during the establish or the copy, a target fails writes, or a
target is too small.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from harness import workload as wl
from harness import peers
from harness.sites import pause
from cgtest import closing_all, need, wait_until
from coordinator import group
from coordinator.errors import CopyFailed, EstablishAborted
from coordinator.link import SlaveLink
from coordinator.control import ControlClient, ControlError

# ------------------------------------------------------------------ checker

SMALL = wl.Layout(("s1/a", "s2/a", "s1/b", "s2/b"), 1 << 20, writers=4, slots=4)


def _steps(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(SMALL.writers) for _ in range(n)]


def _revert(images, layout, steps, w, seq):
    """Put back, in place of record (w, seq), what its slot held before it."""
    k = [i for i, s in enumerate(steps) if s == w][seq]
    before = wl.simulate(layout, steps[:k])
    v, slot = layout.place(w, seq)
    off = layout.offset(w, slot)
    images[v][off:off + wl.RECORD] = before[v][off:off + wl.RECORD]


def test_checker_accepts_consistent_images():
    """Every prefix of a serial history, and the empty image, is consistent."""
    steps = _steps(300)
    for k in (0, 1, 7, 64, 150, 299, 300):
        rep = wl.check(wl.readers_of(wl.simulate(SMALL, steps[:k])), SMALL)
        assert rep.ok, rep.summary()
    assert rep.records == SMALL.writers * SMALL.period   # every slot rewritten by now
    assert sum(h + 1 for h in rep.heads) == 300


def test_checker_catches_a_reverted_dependency():
    """A present record whose dependency (another writer's newest record) was
    reverted to the slot's older content is reported, naming both."""
    steps = _steps(300)
    images = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(images), SMALL).heads
    # The last record written depends on another writer's newest record:
    # reverting that one leaves its own chain a clean (shorter) prefix, so
    # only the cross-writer dependency is broken.
    w = steps[-1]
    v, slot = SMALL.place(w, heads[w])
    off = SMALL.offset(w, slot)
    rec = wl.decode(bytes(images[v][off:off + wl.RECORD]))
    assert rec.seq == heads[w]
    dep = next((dw, dj) for dw, dj in rec.deps if dw != w)
    assert dep[1] == heads[dep[0]]
    holder = (w, heads[w])
    _revert(images, SMALL, steps, *dep)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert not rep.ok
    assert any(f"depends on ({dep[0]},{dep[1]})" in v for v in rep.violations), rep.violations
    assert f"({holder[0]},{holder[1]})" in " ".join(rep.violations)
    with pytest.raises(wl.ConsistencyError, match="INCONSISTENT"):
        rep.raise_if_bad()


def test_checker_catches_a_record_missing_inside_a_chain():
    """A record older than its writer's head, reverted to the slot's previous
    version (or emptied), is reported as missing."""
    steps = _steps(300)
    base = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(base), SMALL).heads
    w = 2
    seq = heads[w] - 3
    images = [bytearray(i) for i in base]
    _revert(images, SMALL, steps, w, seq)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert any(f"record ({w},{seq}) is missing" in v for v in rep.violations), rep.violations
    # Emptied instead of reverted: also missing.
    images = [bytearray(i) for i in base]
    v, slot = SMALL.place(w, seq)
    off = SMALL.offset(w, slot)
    images[v][off:off + wl.RECORD] = bytes(wl.RECORD)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert any(f"record ({w},{seq}) is missing" in x and "holds empty" in x
               for x in rep.violations), rep.violations


def test_checker_catches_torn_misplaced_and_foreign_records():
    """A damaged record, a record at the wrong place and a record of another
    run are each reported."""
    steps = _steps(100)
    base = wl.simulate(SMALL, steps)
    v, slot = SMALL.place(0, 5)
    off = SMALL.offset(0, slot)

    torn = [bytearray(i) for i in base]
    torn[0][SMALL.offset(1, 0) + 100] ^= 0xFF
    rep = wl.check(wl.readers_of(torn), SMALL)
    assert any("bad digest" in x for x in rep.violations), rep.violations

    moved = [bytearray(i) for i in base]
    moved[0][SMALL.offset(3, 1):SMALL.offset(3, 1) + wl.RECORD] = \
        moved[0][SMALL.offset(0, 0):SMALL.offset(0, 0) + wl.RECORD]
    rep = wl.check(wl.readers_of(moved), SMALL)
    assert any("belongs at" in x for x in rep.violations), rep.violations

    foreign = [bytearray(i) for i in base]
    other = wl.simulate(SMALL, steps, run=99)
    foreign[v][off:off + wl.RECORD] = other[v][off:off + wl.RECORD]
    rep = wl.check(wl.readers_of(foreign), SMALL)
    assert any("several runs" in x for x in rep.violations), rep.violations
    assert not wl.check(wl.readers_of(foreign), SMALL, run=1).ok


def test_checker_report_names_volume_and_offset():
    """The first violation says where to look."""
    steps = _steps(200)
    images = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(images), SMALL).heads
    v, slot = SMALL.place(1, heads[1] - 1)
    off = SMALL.offset(1, slot)
    images[v][off:off + wl.RECORD] = bytes(wl.RECORD)
    with pytest.raises(wl.ConsistencyError) as exc:
        wl.check(wl.readers_of(images), SMALL).raise_if_bad()
    assert f"{SMALL.names[v]} offset {off}" in str(exc.value)


# ------------------------------------------------------------------ real slaves

SIZE = 16 << 20
LAYOUT = wl.two_by_two(SIZE)
ORDER = [("s1", "a"), ("s2", "a"), ("s1", "b"), ("s2", "b")]     # layout order
LEASE_MS = 10_000
COORD_MS = 1_000
SPARE = SIZE - wl.RECORD        # outside every slot: for writes that are not records
assert SPARE >= LAYOUT.offset(LAYOUT.writers, LAYOUT.slots - 1)


class Rig:
    """Two slaves x two volumes, their links, and one nbdkit file target per
    volume (each image on a socket of its own, restartable with filters)."""

    def __init__(self, slaves, run_dir: str, spec_kw: dict | None = None):
        self.run_dir = run_dir
        self.slaves = slaves
        spec_kw = spec_kw or {}
        self.procs = {s: slaves(s, volumes=[("a", SIZE), ("b", SIZE)], threads=4,
                                **spec_kw.get(s, {}))
                      for s in ("s1", "s2")}
        self.links = [SlaveLink.from_spec(p.spec) for p in self.procs.values()]
        self.servers: dict[tuple[str, str], peers.Server] = {}
        os.makedirs(os.path.join(run_dir, "remote"), exist_ok=True)
        self.n = 0

    def restart(self, name: str, env: dict | None = None) -> None:
        """Start slave ``name`` again (after it died); its link reconnects."""
        spec = self.procs[name].spec
        if env is not None:
            spec.env = env
        self.procs[name] = self.slaves.restart(spec)

    # sources, in layout order
    def uris(self) -> list[str]:
        return [self.procs[s].spec.uri(v) for s, v in ORDER]

    def sources(self) -> list[str]:
        return [os.path.join(self.run_dir, f"{s}-{v}.img") for s, v in ORDER]

    # targets
    def image(self, s, v) -> str:
        return os.path.join(self.run_dir, "remote", f"{s}-{v}.img")

    def images(self) -> list[str]:
        return [self.image(s, v) for s, v in ORDER]

    def start_targets(self, filters=(), args=(), size=SIZE, only=None) -> None:
        for s, v in ORDER:
            if only and (s, v) not in only:
                continue
            old = self.servers.pop((s, v), None)
            if old:
                old.stop()
            img = self.image(s, v)
            if not os.path.exists(img) or os.path.getsize(img) != size:
                peers.make_image(img, size)
            self.servers[(s, v)] = peers.nbdkit_file(
                img, os.path.join(self.run_dir, "remote", f"{s}-{v}.sock"),
                tuple(filters), tuple(args),
                log=os.path.join(self.run_dir, "remote", "targets.log"))

    def targets(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for (s, v), srv in self.servers.items():
            out.setdefault(s, {})[v] = srv.uri
        return out

    # the cycle
    def establish(self, mode: str = "auto", **kw):
        """Cut the next n for a copy in ``mode`` (which volumes are cut for a
        full copy is decided now, from what each slave last copied where)."""
        replies = group.preflight(self.links)
        self.n = group.next_n(replies, self.n)
        self.mode = mode
        full = group.full_volumes(replies, self.targets(), mode)
        return group.establish(self.links, self.n, kw.get("lease_ms", LEASE_MS),
                               kw.get("max_coordination_ms", COORD_MS), full=full)

    def copy(self, **kw):
        return group.copy(self.links, self.n, self.targets(), self.mode,
                          timeout_ms=10_000, **kw)

    def check(self, run=None) -> wl.Report:
        return wl.check_targets(self.images(), LAYOUT, run).raise_if_bad()

    def assert_complete(self) -> None:
        """Targets equal the sources byte for byte (call with writes stopped)."""
        for src, dst in zip(self.sources(), self.images()):
            with open(src, "rb") as a, open(dst, "rb") as b:
                for off in range(0, SIZE, 1 << 20):
                    x, y = a.read(1 << 20), b.read(1 << 20)
                    assert x == y, f"{dst} differs from {src} near offset {off}"

    def close(self) -> None:
        for srv in self.servers.values():
            srv.stop()
        self.servers.clear()
        for lk in self.links:
            lk.close()


@pytest.fixture
def rig(slaves, run_dir):
    need("nbdkit")
    with closing_all(lambda **kw: Rig(slaves, run_dir, **kw)) as make:
        yield make


class PreservePoller:
    """Samples every slave's preserved-block count while a copy runs, to show
    that host writes did overwrite blocks of the cut during the copy."""

    def __init__(self, links):
        self.links = links
        self.max = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="preserve-poller", daemon=True)

    def _run(self):
        clients = [ControlClient(lk.control, 5) for lk in self.links]
        try:
            while not self._stop.wait(0.01):
                total = 0
                for c in clients:
                    try:
                        st = c.call("status")
                    except ControlError:
                        continue
                    total += sum(v["preserved_blocks"] for v in st["volumes"].values())
                self.max = max(self.max, total)
        finally:
            for c in clients:
                c.close()

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


def _wait_written(work: wl.Workload, count: int, timeout: float = 10.0) -> None:
    start = work.written
    wait_until(lambda: work.written >= start + count or work.errors, timeout,
                f"{count} more records")
    assert not work.errors, work.errors


def test_copies_taken_during_dependent_writes_are_consistent(rig):
    """Full then incremental copies, each established and copied while the
    writers run (blocks of the cut rewritten during the copy), all pass the
    checker; with writes stopped, a last copy equals the sources."""
    r = rig()
    # A slow target keeps each copy open long enough for many overwrites.
    r.start_targets(filters=["delay"], args=["delay-write=5ms"])
    heads = [-1] * LAYOUT.writers
    preserved = 0
    deadline = time.monotonic() + 20
    with wl.Workload(r.uris(), LAYOUT) as work:
        _wait_written(work, 500)
        for i in range(4):
            r.establish("full" if i == 0 else "auto")
            _wait_written(work, 50)     # the cut is behind us: writes flow
            with PreservePoller(r.links) as poll:
                rep = r.copy()
            preserved = max(preserved, poll.max)
            modes = {c.mode for vols in rep.slaves.values() for c in vols.values()}
            assert modes == {"full" if i == 0 else "incremental"}
            got = r.check(work.run)
            assert all(g > h for g, h in zip(got.heads, heads)), (heads, got.heads)
            heads = got.heads
            if time.monotonic() > deadline:
                break
        assert not work.errors, work.errors
    assert preserved > 0, "no block of a cut was overwritten during its copy"
    r.establish()
    r.copy()
    r.check(work.run)
    r.assert_complete()


def test_slave_killed_during_establish_leaves_the_others_thawed(rig):
    """A slave that took FREEZE and died before answering: the establish is
    aborted and the surviving slave's gates open within the coordination time
    (a write held there completes); after a restart the next cut copies
    consistently."""
    r = rig()
    r.start_targets()
    s1, s2 = r.procs["s1"], r.procs["s2"]
    coord_ms = 1000
    with wl.Workload(r.uris(), LAYOUT) as work:
        _wait_written(work, 300)
    r.n = group.next_n(group.preflight(r.links), r.n)
    h = wl.Device(s1.spec.uri("a"), "held-writer")
    try:
        pause(s2.pid)         # takes FREEZE, never answers
        t, result = wl.timed(lambda: group.establish(r.links, r.n, LEASE_MS, coord_ms),
                             "establish")
        with s1.control(5) as c:
            wait_until(lambda: c.call("status")["phase"] == "frozen", 5, "s1 frozen")
        w, wt = wl.timed(lambda: h.pwrite(b"held" * 1024, SPARE), "held-write")
        s2.kill9()
        t.join(LEASE_MS / 1000)
        w.join(LEASE_MS / 1000)
        assert not t.is_alive() and not w.is_alive()
    finally:
        h.close()
    assert "exc" not in wt, wt
    exc = result.get("exc")
    assert isinstance(exc, EstablishAborted), exc
    assert exc.slave == "s2" and exc.aborts.get("s1") == "aborted", (str(exc), exc.aborts)
    # Thawed by the abort, well inside the coordination time plus a round trip
    # (the lease, 10 s, is far away).
    assert result["s"] < coord_ms / 1000 + 1.0, result
    assert wt["s"] < coord_ms / 1000 + 1.0, wt
    with s1.control(5) as c:
        st = c.call("status")
    assert (st["phase"], st["ended"]) == ("idle", "aborted")
    assert {v["gate"] for v in st["volumes"].values()} == {"open"}
    # The workload resumes from the live volumes (they are consistent too),
    # and after a restart of s2 a cut copies consistently.
    r.restart("s2")
    with wl.Workload.resume(r.uris(), LAYOUT) as work:
        _wait_written(work, 200)
        r.establish()
        r.copy()
    r.check(work.run)


def test_lease_thaws_a_slave_whose_coordinator_hung_and_peer_died(rig):
    """The backstop: FREEZE sent, then the coordinator hangs (its connection
    open but silent: a coordinator that is gone closes it, which aborts the
    cut at once) and the other slave dies; the frozen slave thaws by its
    lease and aborts the cut."""
    r = rig()
    s1 = r.procs["s1"]
    h = wl.Device(s1.spec.uri("a"), "held-writer")
    try:
        with s1.control(5) as c:
            c.call("freeze", n=1, lease_ms=300)
            r.procs["s2"].kill9()
            t0 = time.monotonic()
            h.pwrite(b"late" * 1024, SPARE)       # held until the lease ends
            waited = time.monotonic() - t0
    finally:
        h.close()
    assert waited < 0.3 + 1.0, waited
    with s1.control(5) as c:
        st = c.call("status")
    assert (st["phase"], st["ended"]) == ("idle", "expired")


def test_slave_killed_during_copy_fails_the_copy_and_next_copy_is_consistent(rig):
    """s2 dies half-way through its copy: the copy fails naming s2; after a
    restart the next copy (incremental where the baseline survived) passes
    the checker and, with writes stopped, equals the sources."""
    r = rig(spec_kw={"s2": {"env": {"CGMIRROR_FAILPOINTS": "copy:mid"}}})
    r.start_targets(filters=["delay"], args=["delay-write=2ms"])
    s2 = r.procs["s2"]
    with wl.Workload(r.uris(), LAYOUT) as work:
        _wait_written(work, 300)
        r.establish("full")
        with pytest.raises(CopyFailed) as exc:
            r.copy()
        wait_until(lambda: work.errors, 10, "writers to notice s2 is gone")
    assert exc.value.fault == "unreachable", str(exc.value)
    assert any(k.startswith("s2") for k in exc.value.failures), exc.value.failures
    assert "s2" in str(exc.value)
    assert not s2.alive()
    s2.kill9()                           # reap
    r.restart("s2", env={})
    with wl.Workload.resume(r.uris(), LAYOUT) as work:
        _wait_written(work, 300)
        r.establish()
        rep = r.copy()
        _wait_written(work, 50)
    assert not work.errors, work.errors
    modes = {(s, v): c.mode for s, vols in rep.slaves.items() for v, c in vols.items()}
    assert modes[("s2", "a")] == modes[("s2", "b")] == "full"
    r.check(work.run)
    r.establish()
    r.copy()
    r.check(work.run)
    r.assert_complete()


def test_target_write_errors_fail_the_copy_and_lose_nothing(rig):
    """Targets failing half their writes: the copy fails as the targets'
    fault; the next copy to the healthy targets is incremental, consistent,
    and (writes stopped) complete."""
    r = rig()
    r.start_targets()
    with wl.Workload(r.uris(), LAYOUT) as work:
        _wait_written(work, 300)
        r.establish("full")
        r.copy()
        r.check(work.run)
        _wait_written(work, 500)
        r.start_targets(filters=["error"], args=["error=EIO", "error-pwrite-rate=50%"])
        r.establish()
        with pytest.raises(CopyFailed) as exc:
            r.copy()
        assert exc.value.fault == "target", str(exc.value)
        assert "failed a write" in str(exc.value)
        r.start_targets()
        _wait_written(work, 200)
        r.establish()
        rep = r.copy()
        modes = {c.mode for vols in rep.slaves.values() for c in vols.values()}
        assert modes == {"incremental"}
        r.check(work.run)
    assert not work.errors, work.errors
    r.establish()
    r.copy()
    r.check(work.run)
    r.assert_complete()


def test_target_too_small_fails_the_copy_clearly(rig):
    """A target smaller than its volume fails that copy, as the target's
    fault; the slaves stay usable and a copy to a right-sized target passes."""
    r = rig()
    r.start_targets()
    r.start_targets(size=SIZE // 2, only=[("s2", "b")])
    with wl.Workload(r.uris(), LAYOUT) as work:
        _wait_written(work, 300)
    r.establish("full")
    with pytest.raises(CopyFailed) as exc:
        r.copy()
    assert exc.value.fault == "target", str(exc.value)
    assert "s2/b" in exc.value.failures
    assert "too small" in exc.value.failures["s2/b"]
    r.start_targets(only=[("s2", "b")])
    r.establish()
    r.copy()
    r.check(work.run)
    r.assert_complete()


def test_cli_copies_under_writes_are_consistent(run_dir, capsys):
    """End to end through ``cgmirror -s SESSION``: slave start, copy --full
    --json, copy --json (incremental), status --json, slave stop; every copy
    taken under the workload passes the checker."""
    need("nbdkit")
    import json

    import cgtest
    from coordinator.errors import ExitCode

    layout = {"s1": {"a": SIZE, "b": SIZE}, "s2": {"a": SIZE, "b": SIZE}}
    session = cgtest.write_session(Path(run_dir), layout)
    with cgtest.targets(session) as tg, cgtest.slaves(session) as sess:
        capsys.readouterr()
        specs = {s.name: s.spec() for s in sess.slaves}
        uris = [specs[s].uri(v) for s, v in ORDER]
        images = [tg[f"{s}/{v}"].image for s, v in ORDER]
        with wl.Workload(uris, LAYOUT) as work:
            _wait_written(work, 300)
            for args, mode in ((["--full"], "full"), ([], "incremental"),
                               ([], "incremental")):
                assert cgtest.run(session, "copy", *args, "--json") == ExitCode.OK
                doc = json.loads(capsys.readouterr().out)
                assert doc["ok"] and doc["result"] == "ok", doc
                modes = {c["mode"] for vols in doc["copy"]["slaves"].values()
                         for c in vols.values()}
                assert modes == {mode}, doc
                wl.check_targets(images, LAYOUT, work.run).raise_if_bad()
                _wait_written(work, 100)
        assert not work.errors, work.errors
        assert cgtest.run(session, "status", "--json") == ExitCode.OK
        doc = json.loads(capsys.readouterr().out)
        assert {s["phase"] for s in doc["slaves"].values()} == {"idle"}, doc
