"""Fast tests of the role-switch parts without nbdkit: the map fold at
start (nbdplugin/secondary.py ``fold_maps``), the switchover fence and the
``adopt``/``assume`` ops driven through ``handle`` on real volumes, and the
roles the recorded direction gives each site (coordinator/direction.py)."""

from __future__ import annotations

import errno
import json
import threading
from collections import deque

import pytest

from cgtest import wait_until
from coordinator import direction, session as session_mod
from harness.mirrorrig import mirror_session
from nbdplugin.secondary import Secondary, SecondaryVolume, fold_maps
from nbdplugin.slave import Fence, Slave
from nbdplugin.volume import Volume

G = 4096
SIZE = 64 * G


def primary_volume(tmp_path, name="a"):
    (tmp_path / "st").mkdir(exist_ok=True)
    return Volume(name, str(tmp_path / f"{name}.img"), str(tmp_path / "st"), G, G,
                  SIZE, extra_maps=("tgt",))


def secondary_volume(tmp_path, name="a"):
    (tmp_path / "st").mkdir(exist_ok=True)
    return SecondaryVolume(name, str(tmp_path / f"{name}.img"), str(tmp_path / "st"), G, G,
                           SIZE)


def bits(vol, name):
    return {b for s, n in vol.changes.maps[name].iter_runs() for b in range(s, s + n)}


def ask(handler, op, **args):
    return handler.handle(json.dumps({"op": op, **args}))


# ------------------------------------------------------------------ fold

def test_demoted_primary_writes_become_tgt_durably(tmp_path):
    """A primary's host writes (cr) are the tgt of the same state directory
    started as a secondary, and stay so after another restart."""
    v = primary_volume(tmp_path)
    v.pwrite(b"x" * 10, 3 * G + 5)
    v.pwrite(b"y" * G, 40 * G)
    v.close()
    s = secondary_volume(tmp_path)
    assert fold_maps(s, "tgt", ("cr", "oos")) == 2
    assert bits(s, "tgt") == {3, 40} and not bits(s, "cr")
    s.close()
    s = secondary_volume(tmp_path)
    assert bits(s, "tgt") == {3, 40} and not bits(s, "cr")
    s.close()


def test_promoted_secondary_sends_its_tgt(tmp_path):
    """A secondary's tgt (rolled-back blocks) is the cr of the same state
    directory started as a primary; a second fold finds nothing."""
    s = secondary_volume(tmp_path)
    with s.changes.lock:
        s.changes.maps["tgt"].set(7, 2)
    s.changes.checkpoint(final=True)
    s.close()
    v = primary_volume(tmp_path)
    assert fold_maps(v, "cr", ("tgt",)) == 2
    assert bits(v, "cr") == {7, 8} and not bits(v, "tgt")
    assert fold_maps(v, "cr", ("tgt",)) == 0
    v.close()
    v = primary_volume(tmp_path)
    assert bits(v, "cr") == {7, 8}
    v.close()


# ------------------------------------------------------------------ fence

def test_fence_refuses_new_writes_and_waits_for_those_inside():
    """raise_ returns only once a write inside has left; then writes get
    EROFS; lower lets them in again."""
    f = Fence()
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def writer():
        f.enter()
        try:
            inside.set()
            release.wait(10)
        finally:
            f.leave()

    t = threading.Thread(target=writer)
    t.start()
    inside.wait(10)
    raiser = threading.Thread(target=lambda: (f.raise_(60), done.set()))
    raiser.start()
    # Up, and the write it waits for is one only the test lets finish.
    wait_until(lambda: f.up, 30, "the fence to go up")
    assert not done.is_set(), "the fence went up with a write inside"
    release.set()
    assert done.wait(10)
    t.join(10)
    raiser.join(10)
    with pytest.raises(OSError) as ei:
        f.enter()
    assert ei.value.errno == errno.EROFS
    assert f.inflight == 0, "a refused write stayed counted"
    f.lower()
    f.enter()
    f.leave()


def test_fence_timeout_leaves_it_down():
    """A write that never leaves: raise_ gives up after its timeout and
    the fence is down again (writes go on)."""
    f = Fence()
    f.enter()
    with pytest.raises(Exception, match="did not finish"):
        f.raise_(0.05)
    assert not f.up
    f.leave()


class _PausedAppend(deque):
    """Fence._inside that holds one write inside ``enter``, between its two
    steps: ``before`` pauses it before it registers, else after."""

    def __init__(self, before: bool):
        super().__init__()
        self.before = before
        self.paused, self.resume = threading.Event(), threading.Event()

    def append(self, item):
        if not self.before:
            super().append(item)
        self.paused.set()
        self.resume.wait(10)
        if self.before:
            super().append(item)


def _pause_a_writer(before: bool):
    """A fence and a thread paused inside its ``enter``; the thread records
    whether the fence let it in."""
    f = Fence()
    f._inside = paused = _PausedAppend(before)
    result = []

    def writer():
        try:
            f.enter()
        except OSError as exc:
            result.append(exc.errno)
            return
        result.append("in")
        f.leave()

    t = threading.Thread(target=writer)
    t.start()
    assert paused.paused.wait(10)
    return f, paused, t, result


@pytest.mark.parametrize("before", [True, False], ids=["unregistered", "registered"])
def test_fence_raised_while_a_write_is_inside_enter_refuses_it(before):
    """A write caught inside ``enter`` when the fence goes up is refused
    (EROFS), whether or not it had registered: one that had not does not
    delay raise_, one that had is waited for."""
    f, paused, t, result = _pause_a_writer(before)
    done = threading.Event()
    raiser = threading.Thread(target=lambda: (f.raise_(60), done.set()))
    raiser.start()
    try:
        if before:
            assert done.wait(10), "raise_ waited for a write that had not registered"
        else:
            wait_until(lambda: f.up, 30, "the fence to go up")
            assert not done.is_set(), "raise_ returned with a registered write inside"
    finally:
        paused.resume.set()
        t.join(10)
        raiser.join(60)
    assert done.is_set()
    assert result == [errno.EROFS]
    assert f.inflight == 0


# ------------------------------------------------------------------ ops

def test_adopt_samples_only_clean_blocks(tmp_path):
    """adopt records the target as a baseline with digests of blocks that
    are not in cr|oos; an unknown volume is refused."""
    v = primary_volume(tmp_path)
    v.pwrite(b"d" * G, 0)                      # block 0 is dirty
    slave = Slave({"a": v}, str(tmp_path / "st"), 2.0)
    try:
        r = ask(slave, "adopt", volume="a", target="nbd+unix:///x?socket=/s")
        assert r["ok"] and r["samples"] > 0
        base = slave.baseline("a")
        assert base["uri"] == "nbd+unix:///x?socket=/s" and base["size"] == SIZE
        assert all(b != 0 for b, _ in base["samples"])
        assert not ask(slave, "adopt", volume="zz", target="u")["ok"]
    finally:
        slave.shutdown()


def test_assume_takes_the_image_as_a_group_unless_something_is_in_flight(tmp_path):
    """assume n: hardened n and an undo store (the host export opens);
    refused below the hardened group, or with undo blocks in flight."""
    v = secondary_volume(tmp_path)
    sec = Secondary({"a": v}, str(tmp_path / "st"))
    try:
        with pytest.raises(LookupError):
            sec.open_export("a")                # nothing hardened yet
        assert ask(sec, "assume", n=5)["hardened"] == 5
        assert sec.state["hardened"] == 5 and sec.open_export("a") is not None
        assert ask(sec, "assume", n=3)["kind"] == "stale"
        v.pwrite(b"r" * G, 2 * G)               # a replication write: undo block
        r = ask(sec, "assume", n=6)
        assert not r["ok"] and "in flight" in r["error"]
    finally:
        sec.shutdown()


# ------------------------------------------------------------------ roles

SESSION = mirror_session("d", {"s1": "r1"})


@pytest.mark.parametrize("state, a, b", [
    ({}, "primary", "secondary"),
    ({"source": "b", "state": "failed-over"}, "secondary", "primary"),
    ({"source": "a", "state": "dr-test"}, "primary", "primary"),
    ({"source": "b", "state": "resync"}, "secondary", "primary"),
    ({"source": "a", "state": "switching", "to": "b"}, "secondary", "primary"),
])
def test_start_role_follows_the_direction(tmp_path, state, a, b):
    """A node's first start takes the role the direction gives its site
    (later starts: the role it recorded)."""
    p = tmp_path / "d.toml"
    p.write_text(SESSION)
    s = session_mod.load(str(p))
    d = {"source": "a", "state": "mirroring", "seq": 1, **state}
    assert direction.spec(s, s.slaves[0], d).role == a
    assert direction.spec(s, s.secondaries[0], d).role == b


def test_a_prepared_secondary_does_not_start_as_a_primary(slaves):
    """A secondary with a group prepared stays one: role=primary at start is
    only the first role (node.json records secondary), and the role op
    refuses in one line (its image is neither group); once committed the
    role op promotes it (exit 75, started again as a primary)."""
    import dataclasses

    from coordinator.control import ControlError
    from wire.protocol import RESTART_STATUS
    r = slaves("r1", volumes=(("a", 1 << 20),), role="secondary")
    with r.control() as c:
        assert c.call("assume", n=1)["ok"]
        assert c.call("prepare", n=2)["ok"]
    r.stop()
    r2 = slaves.restart(dataclasses.replace(r.spec, role="primary"))
    with r2.control() as c:
        assert c.call("status")["role"] == "secondary"
        with pytest.raises(ControlError, match="group 2 is prepared"):
            c.call("role", to="primary")
        assert c.call("commit", n=2)["ok"]
        assert c.call("role", to="primary")["restarting"]
    assert r2.wait(60) == RESTART_STATUS
    p = slaves.restart(r.spec)
    with p.control() as c:
        assert c.call("status")["role"] == "primary"

def test_a_node_without_the_role_op_is_refused_in_one_line(tmp_path):
    """A node whose status has no ``role_seq`` (older than issue 18) is not
    restarted from here: one line says to upgrade it, and no op is sent."""
    from coordinator.errors import FailoverError
    from coordinator.roles.failover import Node, RoleSwitch
    p = tmp_path / "d.toml"
    p.write_text(SESSION)
    s = session_mod.load(str(p))
    rs = RoleSwitch(s, log=lambda line: None)
    rs.status = lambda node, timeout=10: {"role": "secondary", "volumes": {}}
    rs.call = lambda *a, **k: pytest.fail("an op was sent")
    with pytest.raises(FailoverError) as e:
        rs.become(Node("b", s.secondaries[0]), "primary")
    assert str(e.value) == f"node {s.secondaries[0].name} predates the role op: upgrade it"
