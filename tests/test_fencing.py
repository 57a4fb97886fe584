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

import pytest

from ctlrig import raw, read_line
from coordinator.link import SlaveLink
from coordinator.mirror.recovery import Links
from native.gate import Core, Gate
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
