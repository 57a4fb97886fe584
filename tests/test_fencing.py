"""Epoch fencing (issue 19): a node records the highest leader epoch it has
seen and refuses, kind FENCED, what a deposed leader sends.

The first part checks the codec and the coordinator's side without a node;
the rest drives real nodes (nbdkit, its control socket and its C gate
socket) as tests/test_node_record.py does.
"""

from __future__ import annotations

import pytest

from coordinator.link import SlaveLink
from coordinator.mirror.recovery import Links
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
    assert protocol.fenced_message("s1", 41, 37, "demo") == (
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
