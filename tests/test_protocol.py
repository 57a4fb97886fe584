"""The control protocol and the cut state machine, without sockets."""

import json

import pytest

from nbdplugin import protocol
from nbdplugin.protocol import CutMachine, Event, Phase, ProtocolError


def test_decode_accepts_a_good_freeze():
    """A well-formed freeze decodes to its fields."""
    msg = protocol.decode(b'{"op":"freeze","n":3,"lease_ms":500,"volumes":["a"]}\n')
    assert msg == {"op": "freeze", "n": 3, "lease_ms": 500, "volumes": ["a"]}


@pytest.mark.parametrize("line, words", [
    (b"not json", "not JSON"),
    (b"[1,2]", "not a JSON object"),
    (b'{"n":1}', "no 'op'"),
    (b'{"op":"fly"}', "unknown op 'fly'"),
    (b'{"op":"status","x":1}', "unknown key 'x'"),
    (b'{"op":"freeze","n":1}', "missing key 'lease_ms'"),
    (b'{"op":"freeze","n":"1","lease_ms":5}', "op 'freeze': 'n' must be int"),
    (b'{"op":"freeze","n":true,"lease_ms":5}', "op 'freeze': 'n' must be int"),
    (b'{"op":"thaw","n":0}', "between 1 and"),
    (b'{"op":"freeze","n":1,"lease_ms":0}', "lease_ms"),
    (b'{"op":"freeze","n":1,"lease_ms":5,"volumes":[1]}', "must be a volume name"),
    (b'{"op":"copy","n":1,"targets":{"a":"x"},"mode":"fast"}', "'mode' must be"),
    (b'{"op":"copy","n":1,"targets":{"a":5}}', "must be an NBD URI"),
    (b"\xff\xfe", "not UTF-8"),
    (b"x" * (protocol.MAX_LINE + 1), "longer than"),
])
def test_decode_rejects_bad_messages(line, words):
    """Each kind of bad message is refused with a message that says what is wrong."""
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(line)
    assert words in str(exc.value)


def test_encode_is_one_line():
    """A frame is one line of JSON."""
    frame = protocol.encode(protocol.error("two\nlines"))
    assert frame.count(b"\n") == 1
    assert json.loads(frame) == {"ok": False, "error": "two lines", "kind": "protocol"}


def test_machine_full_cycle():
    """freeze -> thaw -> copy -> done walks the phases in order."""
    m = CutMachine()
    assert m.step(Event.FREEZE, 1) is Phase.FROZEN
    assert m.step(Event.THAW, 1) is Phase.CUT
    assert m.step(Event.COPY, 1) is Phase.COPYING
    assert m.step(Event.COPY_DONE, 1, ended="done") is Phase.IDLE
    assert (m.n, m.ended) == (1, "done")


@pytest.mark.parametrize("setup, event, n, kind", [
    ([], Event.THAW, 1, "order"),                                  # thaw before freeze
    ([(Event.FREEZE, 2)], Event.FREEZE, 3, "busy"),                # freeze while frozen
    ([(Event.FREEZE, 2)], Event.THAW, 3, "order"),                 # wrong number
    ([(Event.FREEZE, 2)], Event.COPY, 2, "order"),                 # copy before thaw
    ([(Event.FREEZE, 2), (Event.ABORT, 2)], Event.FREEZE, 2, "stale"),  # reused number
    ([(Event.FREEZE, 2), (Event.EXPIRE, 2)], Event.THAW, 2, "ended"),   # thaw after lease
])
def test_machine_refuses_out_of_order_and_changes_nothing(setup, event, n, kind):
    """An illegal event raises and leaves the machine as it was."""
    m = CutMachine()
    for ev, k in setup:
        m.step(ev, k, ended="aborted" if ev in (Event.ABORT, Event.EXPIRE) else None)
    before = (m.phase, m.n, m.ended)
    with pytest.raises(ProtocolError) as exc:
        m.step(event, n)
    assert exc.value.kind == kind
    assert (m.phase, m.n, m.ended) == before


def test_machine_abort_from_every_active_phase():
    """abort ends a cut whether frozen, cut or copying."""
    for path in ([Event.FREEZE], [Event.FREEZE, Event.THAW],
                 [Event.FREEZE, Event.THAW, Event.COPY]):
        m = CutMachine()
        for ev in path:
            m.step(ev, 7)
        assert m.step(Event.ABORT, 7, ended="aborted") is Phase.IDLE
