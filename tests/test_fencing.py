"""Epoch fencing (issue 19): a node records the highest leader epoch it has
seen and refuses, kind FENCED, what a deposed leader sends.

The first part checks the codec and the coordinator's side without a node;
the rest drives real nodes (nbdkit, its control socket and its C gate
socket) as tests/test_node_record.py does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import nbd
import pytest

from cgtest import wait_until
from ctlrig import raw, read_line
from coordinator.control import ControlError
from coordinator import group
from coordinator.errors import EstablishAborted, SlaveError
from coordinator.link import SlaveLink
from coordinator.mirror.recovery import Links
from native.gate import Core, Gate
from nbdplugin.epoch import EpochFence
from nbdplugin.noderecord import NODE_FILE, NodeRecord
from wire import protocol
from wire.protocol import EPOCH_KEY, Kind, ProtocolError


# ---------------------------------------------------------------- the codec

@pytest.mark.parametrize("epoch", [1, 41, protocol.MAX_N])
def test_decode_takes_an_epoch(epoch):
    """An epoch 1 .. MAX_N is a top-level key of any request."""
    msg = protocol.decode(protocol.encode({"op": "freeze", "n": 3, "lease_ms": 100,
                                           "session": "demo", EPOCH_KEY: epoch}))
    assert msg[EPOCH_KEY] == epoch


@pytest.mark.parametrize("epoch", [0, -1, protocol.MAX_N + 1, True, 1.5, "7", None])
def test_decode_refuses_a_bad_epoch(epoch):
    """An epoch that is not an int 1 .. MAX_N is refused in one line naming it."""
    with pytest.raises(ProtocolError) as ei:
        protocol.decode(protocol.encode({"op": "status", EPOCH_KEY: epoch}))
    assert ei.value.kind is Kind.PROTOCOL
    assert "'epoch'" in str(ei.value) and "\n" not in str(ei.value)


def test_fenced_ops_are_the_changing_ones():
    """Thaw, abort and the reads are never fenced; every op that changes data,
    cut state, role or the record is."""
    assert not {"thaw", "abort", "status", "dirty", "tgt", "checksums",
                "verify"} & protocol.FENCED_OPS
    assert {"freeze", "copy", "prepare", "commit", "rollback", "assume", "role",
            "record", "mark", "clear", "clear_tgt", "adopt", "fence"} <= protocol.FENCED_OPS


def test_fenced_message_is_the_spec_line():
    """The refusal is the one line the spec gives."""
    assert protocol.fenced_message("node s1", 41, 37, "demo") == (
        "node s1 has seen leader epoch 41; this request carries epoch 37: its"
        " coordinator was deposed (another leads session demo)")


def test_status_reply_takes_an_epoch():
    """A status reply may report the recorded epoch, or null."""
    base = {"ok": True, "pid": 5, "role": "secondary", "hardened": 0, "prepared": None,
            "volumes": {}}
    protocol.decode_reply("status", {**base, "epoch": 9})
    protocol.decode_reply("status", {**base, "epoch": None})
    with pytest.raises(ProtocolError):
        protocol.decode_reply("status", {**base, "epoch": 0})


# ------------------------------------------------------ the coordinator's side

def test_link_sends_epoch_only_when_set():
    """SlaveLink.envelope has "epoch" exactly when the link's epoch is set."""
    lk = SlaveLink("s1", "unix:/nonexistent", session="demo")
    assert lk.envelope() == {"session": "demo"}
    lk.epoch = 12
    assert lk.envelope() == {"session": "demo", "epoch": 12}


def test_links_set_epoch_sets_every_link():
    """Links.set_epoch reaches primaries and secondaries alike."""
    links = Links(None, [SlaveLink("s1", "unix:/x1")], [SlaveLink("r1", "unix:/x2")])
    links.set_epoch(7)
    assert [lk.epoch for lk in links.slaves + links.secondaries] == [7, 7]
    links.set_epoch(None)
    assert [lk.envelope() for lk in links.slaves + links.secondaries] == [{}, {}]


# ------------------------------------------------- the C gate's parse, in-process

@pytest.fixture
def core(run_dir):
    """A gate core of volumes a, b serving a real unix socket (no nbdkit):
    (core, gates, a connected client)."""
    names = ["a", "b"]
    gates = [Gate() for _ in names]
    c = Core(names, gates, 0)
    path = os.path.join(run_dir, "g.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    c.identity("demo", "node s1")
    c.start()
    c.serve(listener.fileno(), os.getuid())
    g = raw(path)
    try:
        yield c, gates, g
    finally:
        g.close()
        c.close()
        listener.close()


def ask(s, obj_or_line) -> dict:
    line = obj_or_line if isinstance(obj_or_line, bytes) else json.dumps(obj_or_line).encode()
    s.sendall(line + b"\n")
    return json.loads(read_line(s))


def test_gate_parses_epoch(core):
    """FREEZE, THAW and ABORT take an optional epoch 1..MAX_N; a bad one is
    refused kind protocol naming 'epoch', a repeated one too."""
    c, gates, g = core
    c.set_epoch(5)
    for bad in (b'{"op":"freeze","n":1,"lease_ms":1000,"epoch":0}',
                b'{"op":"freeze","n":1,"lease_ms":1000,"epoch":-3}',
                b'{"op":"freeze","n":1,"lease_ms":1000,"epoch":"5"}',
                b'{"op":"freeze","n":1,"lease_ms":1000,"epoch":5.0}',
                b'{"op":"thaw","n":1,"epoch":9007199254740992}',
                b'{"op":"freeze","n":1,"lease_ms":1000,"epoch":5,"epoch":5}'):
        r = ask(g, bad)
        assert (r["ok"], r["kind"]) == (False, "protocol"), bad
        assert "'epoch'" in r["error"], r
        if b'"epoch":5,"epoch"' not in bad:     # Python's json keeps the last of two
            with pytest.raises(ProtocolError, match="'epoch'"):
                protocol.decode(bad)
    assert not any(gt.closed for gt in gates)
    assert ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "epoch": 5})["ok"]
    assert all(gt.closed for gt in gates)
    assert ask(g, {"op": "thaw", "n": 1, "epoch": 5})["ok"]


def test_gate_freeze_with_another_epoch_is_fenced(core):
    """Below the recorded epoch: the spec's line; above it: not yet recorded;
    either way kind fenced and the gates stay open.  Without an epoch, or
    with the recorded one, it freezes."""
    c, gates, g = core
    c.set_epoch(41)
    r = ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "session": "demo", "epoch": 37})
    assert r == {"ok": False, "kind": "fenced", "error": protocol.fenced_message(
        "node s1", 41, 37, "demo")}
    r = ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "epoch": 42})
    assert r["kind"] == "fenced" and "not yet recorded" in r["error"]
    assert not any(gt.closed for gt in gates) and c.state().phase == "idle"
    c.set_epoch(40)                              # it only grows
    r = ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "epoch": 41})
    assert r["ok"], r
    assert ask(g, {"op": "abort", "n": 1, "epoch": 3})["ok"]    # a stale abort releases
    assert ask(g, {"op": "freeze", "n": 2, "lease_ms": 10_000})["ok"]   # no epoch: a tool
    assert ask(g, {"op": "thaw", "n": 2, "epoch": 1})["ok"]


# ------------------------------------------------ EpochFence over a NodeRecord

def _record(tmp_path):
    return NodeRecord.create(str(tmp_path), "demo", "s1", "primary",
                             {"v": {"kind": "file", "dev": 1, "ino": 7, "rdev": 0,
                                    "size": 1 << 20}})


def test_a_higher_epoch_is_durable_before_the_op_runs(tmp_path):
    """Inside admit the new epoch is already in node.json and handed on."""
    told = []
    fence = EpochFence(_record(tmp_path), told.append)
    with fence.admit("status", 9):
        assert NodeRecord.load(str(tmp_path)).epoch == 9 and told == [9]
    with fence.admit("freeze", 9):
        pass
    with fence.admit("freeze", None):                   # a tool: served
        pass
    assert NodeRecord.load(str(tmp_path)).data["epoch"]["n"] == 9 and told == [9]


def test_a_lower_epoch_is_refused_only_on_changing_ops(tmp_path):
    """freeze with a lower epoch: FENCED and the op never runs; thaw and
    status with it: served; nothing written."""
    fence = EpochFence(_record(tmp_path))
    with fence.admit("commit", 41):
        pass
    before = (tmp_path / NODE_FILE).read_bytes()
    with pytest.raises(ProtocolError) as ei:
        with fence.admit("freeze", 37):
            pytest.fail("a fenced op ran")
    assert ei.value.kind is Kind.FENCED
    assert str(ei.value) == protocol.fenced_message("node s1", 41, 37, "demo")
    for op in ("thaw", "abort", "status", "dirty"):
        with fence.admit(op, 37):
            pass
    assert (tmp_path / NODE_FILE).read_bytes() == before


def test_a_raise_waits_for_fenced_ops_in_flight(tmp_path):
    """A commit of epoch 5 still running holds back the record of epoch 6
    (and the request that carries it); once it ends, 6 is recorded and a
    later epoch-5 op is refused."""
    fence = EpochFence(_record(tmp_path))
    inside, release, raised = threading.Event(), threading.Event(), threading.Event()

    def old_commit():
        with fence.admit("commit", 5):
            inside.set()
            release.wait(30)

    def new_status():
        with fence.admit("status", 6):
            raised.set()

    t1 = threading.Thread(target=old_commit)
    t1.start()
    assert inside.wait(30)
    t2 = threading.Thread(target=new_status)
    t2.start()
    wait_until(lambda: fence._raising == 1, what="the raise to wait")
    assert not raised.is_set() and fence.epoch == 5
    release.set()
    assert raised.wait(30)
    t1.join(30)
    t2.join(30)
    assert NodeRecord.load(str(tmp_path)).epoch == 6
    with pytest.raises(ProtocolError):
        with fence.admit("commit", 5):
            pass


def test_a_raise_behind_a_hung_op_is_busy_not_stuck(tmp_path):
    """A fenced op that never ends: the raise gives up after raise_wait_s,
    kind busy, epoch unchanged, and fenced ops are admitted again."""
    fence = EpochFence(_record(tmp_path))
    fence.raise_wait_s = 0.2
    inside, release = threading.Event(), threading.Event()

    def hung_adopt():
        with fence.admit("adopt", 5):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hung_adopt)
    t.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ProtocolError) as ei:
            with fence.admit("status", 6):
                pytest.fail("served before its epoch was recorded")
        assert ei.value.kind is Kind.BUSY and "ask again" in str(ei.value)
        assert fence.epoch == 5 and fence._raising == 0
        with fence.admit("mark", 5):
            pass
    finally:
        release.set()
        t.join(30)


def test_a_failed_record_refuses_the_request(tmp_path, monkeypatch):
    """node.json cannot be written: the request that carried the higher
    epoch fails and its op does not run; the epoch stays the old one."""
    rec = _record(tmp_path)
    fence = EpochFence(rec)

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("nbdplugin.noderecord.write_atomic", broken)
    with pytest.raises(OSError):
        with fence.admit("freeze", 3):
            pytest.fail("the op ran without its epoch recorded")
    assert rec.epoch == 0 and fence._raising == 0


# ------------------------------------------------------------------ real nodes

SIZE = 2 << 20
G = 64 * 1024


def node(slaves, name, role="primary"):
    return slaves(name, volumes=[("v", SIZE)], role=role,
                  filter_args=["session=demo", f"node={name}"])


def call(proc, op, **kw) -> dict:
    with proc.control() as c:
        return c.call(op, **kw)


def refusal(proc, op, **kw) -> ControlError:
    with pytest.raises(ControlError) as ei:
        call(proc, op, **kw)
    return ei.value


def on_disk(proc) -> bytes:
    return Path(proc.spec.statedir, NODE_FILE).read_bytes()


def write(proc, offset, data):
    """One host write through NBD, flushed: it completes only if the gate is open."""
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("v"))
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


PRIMARY_OPS = [("freeze", {"n": 1, "lease_ms": 10_000}),
               ("copy", {"n": 1, "targets": {"v": "nbd+unix:///v?socket=/nonexistent"}}),
               ("rate", {"rate": 1 << 20}), ("clear", {}), ("checkpoint", {}),
               ("mark", {"volume": "v", "runs": [[0, 4]]}), ("fence", {"on": True}),
               ("adopt", {"volume": "v", "target": "nbd+unix:///v?socket=/nonexistent"}),
               ("role", {"to": "secondary"}), ("record", {"record": {"seq": 9}})]
SECONDARY_OPS = [("prepare", {"n": 1}), ("commit", {"n": 1}), ("rollback", {}),
                 ("assume", {"n": 1}), ("dr_test", {"n": 1}),
                 ("clear_tgt", {"volume": "v", "runs": [[0, 1]]}),
                 ("role", {"to": "primary"}), ("record", {"record": {"seq": 9}})]


def test_a_primary_refuses_an_older_epoch_and_changes_nothing(slaves):
    """Epoch 41 recorded; then freeze, copy (the drain), role, record and every
    other changing op with epoch 37: kind fenced, the spec's one line; the
    gate stays open, no cut, record and role unchanged; thaw, abort and
    reads with 37 are served."""
    a = node(slaves, "s1")
    write(a, 0, b"w" * G)
    assert call(a, "status", session="demo", epoch=41)["epoch"] == 41
    before, st0 = on_disk(a), call(a, "status")
    for op, args in PRIMARY_OPS:
        e = refusal(a, op, session="demo", epoch=37, **args)
        assert e.kind == "fenced", (op, e)
        assert str(e).endswith(protocol.fenced_message("node s1", 41, 37, "demo")), str(e)
        assert "\n" not in str(e)
    st = call(a, "status", epoch=37)
    assert on_disk(a) == before
    assert (st["phase"], st["n"], st["role_seq"], st["record"], st["epoch"]) == \
        ("idle", 0, 0, None, 41)
    assert st["volumes"]["v"]["gate"] == "open"
    assert st["volumes"]["v"]["cr_blocks"] == st0["volumes"]["v"]["cr_blocks"] == 1
    write(a, G, b"x" * G)                                   # not fenced, not frozen
    call(a, "dirty", volume="v", epoch=37)
    for op in ("thaw", "abort"):                            # served: refused by the
        assert refusal(a, op, n=1, epoch=37).kind == "order"  # cut machine, not fenced


def test_a_secondary_refuses_an_older_epoch_and_changes_nothing(slaves):
    """prepare, commit, rollback, assume, role, record ... with an older
    epoch: fenced; hardened and prepared as they were, node.json unchanged."""
    b = node(slaves, "r1", role="secondary")
    call(b, "prepare", n=1, epoch=41)
    call(b, "commit", n=1, epoch=41)
    before = on_disk(b)
    for op, args in SECONDARY_OPS:
        e = refusal(b, op, epoch=40, **args)
        assert e.kind == "fenced" and "has seen leader epoch 41" in str(e), (op, e)
    st = call(b, "status", epoch=40)
    assert (st["hardened"], st["prepared"], st["role"], st["epoch"]) == \
        (1, None, "secondary", 41)
    assert on_disk(b) == before
    call(b, "tgt", volume="v", epoch=40)                    # reads are served


def test_the_epoch_survives_kill9_and_the_gate_refuses_the_old_one(slaves):
    """A freeze on the control socket carrying epoch 41 records it (node.json)
    and freezes; after kill -9 and a restart the node reports 41, and both
    its gate socket and its control socket refuse a freeze of epoch 37
    with the gate left open; epoch 41 freezes again on the gate socket."""
    a = node(slaves, "s1")
    with a.control() as c:          # a cut belongs to its connection
        assert c.call("freeze", n=1, lease_ms=10_000, session="demo", epoch=41)["ok"]
        assert json.loads(on_disk(a))["epoch"]["n"] == 41
        assert c.call("abort", n=1, epoch=41)["ok"]
    a.kill9()
    a = slaves.restart(a.spec)
    st = call(a, "status")
    assert st["epoch"] == 41 and json.loads(on_disk(a))["epoch"]["n"] == 41
    g = raw(st["gate"])
    try:
        r = ask(g, {"op": "freeze", "n": 2, "lease_ms": 10_000, "session": "demo",
                    "epoch": 37})
        assert r == {"ok": False, "kind": "fenced", "error": protocol.fenced_message(
            "node s1", 41, 37, "demo")}
        assert refusal(a, "freeze", n=2, lease_ms=10_000, epoch=37).kind == "fenced"
        st = call(a, "status")
        assert (st["phase"], st["volumes"]["v"]["gate"]) == ("idle", "open")
        write(a, 0, b"z" * 512)
        assert ask(g, {"op": "freeze", "n": 2, "lease_ms": 10_000, "epoch": 41})["ok"]
        assert ask(g, {"op": "thaw", "n": 2, "epoch": 41})["ok"]
    finally:
        g.close()
    call(a, "abort", n=2)


def test_the_gate_refuses_an_epoch_not_yet_recorded(slaves):
    """A FREEZE on the gate socket with an epoch above the recorded one is
    refused (the gate writes no record) and records nothing; once the
    control socket has recorded it (the leader's preflight), it freezes."""
    a = node(slaves, "s1")
    call(a, "status", epoch=3)
    g = raw(call(a, "status")["gate"])
    try:
        r = ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "epoch": 8})
        assert r["kind"] == "fenced" and "not yet recorded" in r["error"], r
        assert "\n" not in r["error"]
        assert call(a, "status")["epoch"] == 3
        assert json.loads(on_disk(a))["epoch"]["n"] == 3
        assert call(a, "status")["volumes"]["v"]["gate"] == "open"
        call(a, "status", epoch=8)
        assert ask(g, {"op": "freeze", "n": 1, "lease_ms": 10_000, "epoch": 8})["ok"]
        assert ask(g, {"op": "abort", "n": 1})["ok"]
    finally:
        g.close()


def test_requests_without_an_epoch_are_served_as_before(slaves):
    """A node that recorded epoch 41 serves a tool's freeze, thaw, abort,
    record and role op (no epoch) as it always did, on both sockets; a node
    that never saw an epoch reports null."""
    a = node(slaves, "s1")
    assert call(a, "status")["epoch"] is None
    assert "epoch" not in json.loads(on_disk(a))
    call(a, "status", epoch=41)
    with a.control() as c:
        assert c.call("freeze", n=1, lease_ms=10_000)["ok"]
        assert c.call("thaw", n=1)["ok"]
        assert c.call("abort", n=1)["ok"]
        assert c.call("record", record={"seq": 1})["record"] == {"seq": 1}
        assert c.call("role", to="primary")["restarting"] is False
    g = raw(call(a, "status")["gate"])
    try:
        assert ask(g, {"op": "freeze", "n": 2, "lease_ms": 10_000})["ok"]
        assert ask(g, {"op": "thaw", "n": 2})["ok"]
    finally:
        g.close()
    call(a, "abort", n=2)
    assert call(a, "status")["epoch"] == 41


def test_a_deposed_links_requests_are_refused(slaves):
    """The coordinator's side end to end: a SlaveLink whose epoch is set
    sends it (a newer leader's link records 41); the old leader's link
    (epoch 37) is refused kind fenced on freeze, and its status is served."""
    a = node(slaves, "s1")
    new, old = (SlaveLink.from_spec(a.spec) for _ in range(2))
    try:
        new.epoch, old.epoch = 41, 37
        assert new.status()["epoch"] == 41
        with pytest.raises(SlaveError) as ei:
            old.call("freeze", n=1, lease_ms=10_000)
        assert ei.value.kind is Kind.FENCED and "coordinator was deposed" in str(ei.value)
        assert old.status()["phase"] == "idle"
    finally:
        new.close()
        old.close()


def test_a_deposed_leaders_establish_is_refused_on_the_gate_sockets(slaves):
    """The establish's pipelined wire (to the C gate sockets) carries the
    link's epoch: after the new leader's preflight (status, epoch 41) on two
    nodes, the old leader's establish (epoch 37) is aborted with kind
    fenced, no gate closed; the new leader's forms the cut."""
    nodes = [node(slaves, name) for name in ("s1", "s2")]
    old = [SlaveLink.from_spec(p.spec) for p in nodes]
    new = [SlaveLink.from_spec(p.spec) for p in nodes]
    try:
        for lk in new:
            lk.epoch = 41
            lk.status()                                     # the preflight records it
        for lk in old:
            lk.epoch = 37
            assert lk.status()["epoch"] == 41 and lk.gate   # the establish uses the gate
        with pytest.raises(EstablishAborted) as ei:
            group.establish(old, 1, lease_ms=10_000, max_coordination_ms=5_000)
        assert "has seen leader epoch 41; this request carries epoch 37" in str(ei.value)
        for p in nodes:
            st = call(p, "status")
            assert (st["phase"], st["volumes"]["v"]["gate"]) == ("idle", "open")
            write(p, 0, b"h" * 512)
        est = group.establish(new, 1, lease_ms=10_000, max_coordination_ms=5_000)
        assert est.n == 1
        group.abort_all(new, 1)
    finally:
        for lk in old + new:
            lk.close()
