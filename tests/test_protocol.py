"""The control protocol and the cut state machine, without sockets."""

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from wire import protocol
from wire.protocol import CutMachine, Event, Kind, Phase, ProtocolError


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


# ---------------------------------------------------------------- bounds

BIG = 2**63 + 5     # once saved by a freeze, it crashed every later copy (SQLite)


@pytest.mark.parametrize("request_, words", [
    ({"op": "freeze", "n": BIG, "lease_ms": 500}, "'n' must be between 1 and"),
    ({"op": "freeze", "n": protocol.MAX_N + 1, "lease_ms": 500}, "'n' must be between"),
    ({"op": "thaw", "n": -1}, "'n' must be between"),
    ({"op": "freeze", "n": 1, "lease_ms": 3_600_000}, "'lease_ms' must be between 1 and 60000"),
    ({"op": "freeze", "n": 1, "lease_ms": 500, "volumes": []}, "'volumes' must have 1 to"),
    ({"op": "freeze", "n": 1, "lease_ms": 500, "volumes": ["a"] * 1025},
     "'volumes' must have 1 to 1024"),
    ({"op": "freeze", "n": 1, "lease_ms": 500, "volumes": ["a" * 65]}, "longer than 64"),
    ({"op": "freeze", "n": 1, "lease_ms": 500, "full": ["../x"]}, "volume name"),
    ({"op": "copy", "n": 1, "targets": {"a": "x"}, "timeout_ms": -1}, "'timeout_ms' must be"),
    ({"op": "copy", "n": 1, "targets": {"a": "x"}, "timeout_ms": 0}, "'timeout_ms' must be"),
    ({"op": "copy", "n": 1, "targets": {"a": "x"}, "timeout_ms": BIG}, "'timeout_ms' must be"),
    ({"op": "copy", "n": 1, "targets": {"a": "x"}, "timeout_ms": 1.5}, "must be int"),
    ({"op": "copy", "n": 1, "targets": {"a": "x"}, "inflight": 65}, "'inflight' must be"),
    ({"op": "copy", "n": 1, "targets": {}}, "'targets' must have 1 to"),
    ({"op": "copy", "n": 1, "targets": {"a": "x" * 4097}}, "longer than 4096"),
    ({"op": "copy", "n": 1, "targets": {"a b": "x"}}, "volume name"),
    ({"op": "dirty", "volume": "a", "start": BIG}, "'start' must be between 0 and"),
    ({"op": "dirty", "volume": "a", "start": -1}, "'start' must be between 0 and"),
    ({"op": "dirty", "volume": "a", "max_runs": 0}, "'max_runs' must be between 1 and"),
    ({"op": "dirty", "volume": "a", "max_runs": 20_001}, "'max_runs' must be between"),
    ({"op": "dirty", "volume": ""}, "volume name"),
    ({"op": "clear", "volumes": "a"}, "list of volume names"),
])
def test_decode_bounds_every_number_list_and_string(request_, words):
    """Out-of-range numbers, over-long lists and strings and bad names are
    refused with one line naming the key."""
    with pytest.raises(ProtocolError) as exc:
        protocol.decode(json.dumps(request_).encode())
    assert words in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.kind is Kind.PROTOCOL


@pytest.mark.parametrize("request_", [
    {"op": "freeze", "n": protocol.MAX_N, "lease_ms": protocol.MAX_LEASE_MS},
    {"op": "freeze", "n": 1, "lease_ms": 1, "volumes": ["a.b_c-D9"], "full": []},
    {"op": "copy", "n": 1, "targets": {"a": "nbd://h/a"}, "timeout_ms": 100,
     "inflight": 64, "mode": "full"},
    {"op": "copy", "n": 1, "targets": {"a": "x"}, "timeout_ms": 3_600_000},
    {"op": "dirty", "volume": "a", "start": protocol.MAX_N, "max_runs": 20_000},
])
def test_decode_accepts_the_bounds_themselves(request_):
    """The edges of every range are accepted."""
    assert protocol.decode(json.dumps(request_)) == request_


@pytest.mark.parametrize("line", [b'{"op":"thaw","n":NaN}', b'{"op":"thaw","n":Infinity}',
                                  b'{"op":"thaw","n":1e400}', b"[" * 100_000])
def test_decode_refuses_what_json_should_not_hold(line):
    """NaN, Infinity, an overflowing float and deep nesting are protocol errors."""
    with pytest.raises(ProtocolError):
        protocol.decode(line)


# ---------------------------------------------------------------- framing

def test_framer_yields_complete_lines_and_keeps_the_rest():
    """Lines come out whole however the bytes are cut; blank lines are dropped."""
    f = protocol.Framer()
    assert f.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert f.pending == 4
    assert f.feed(b':2}\n\n  \n{"c":3}\n') == [b'{"b":2}', b'{"c":3}']
    assert f.pending == 0


def test_framer_refuses_an_oversized_line_even_without_its_newline():
    """A line past the limit is refused as soon as it is too long, not when
    (if ever) its newline arrives."""
    f = protocol.Framer(limit=10)
    assert f.feed(b"0123456789") == []
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        f.feed(b"x")
    f = protocol.Framer(limit=10)
    with pytest.raises(ProtocolError):
        f.feed(b"0123456789ab\nok\n")


@given(st.lists(st.binary(max_size=40), max_size=20), st.data())
def test_framer_any_chunking_gives_the_same_lines(lines, data):
    """Feeding a stream in arbitrary pieces yields exactly its non-blank lines."""
    lines = [x.replace(b"\n", b"") for x in lines]
    stream = b"".join(x + b"\n" for x in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    f, out, last = protocol.Framer(), [], 0
    for c in cuts + [len(stream)]:
        out += f.feed(stream[last:c])
        last = c
    assert out == [x for x in lines if x.strip()]
    assert f.pending == 0


# ---------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6)
# Two shared cores: generation speed is not what these tests are about.
_fuzz = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
_keys = st.sampled_from(["op", "n", "lease_ms", "volumes", "full", "targets", "mode",
                         "inflight", "timeout_ms", "volume", "start", "max_runs", "x"])
_ops = st.sampled_from([*protocol.SCHEMA, "fly", ""])


@_fuzz
@given(st.binary(max_size=300))
def test_decode_random_bytes_raise_only_protocol_error(line):
    """Random bytes are decoded or refused with ProtocolError, nothing else."""
    try:
        protocol.decode(line)
    except ProtocolError:
        pass


@_fuzz
@given(_ops, st.dictionaries(_keys, _json, max_size=6))
def test_decode_wrong_types_raise_only_protocol_error(op, args):
    """Known ops with random keys and values of any type: a request that
    decodes is one whose every value is in its schema."""
    line = json.dumps({**args, "op": op}).encode()
    try:
        msg = protocol.decode(line)
    except ProtocolError as exc:
        assert exc.kind is Kind.PROTOCOL and "\n" not in str(exc)
        return
    for key in ("n", "lease_ms", "inflight", "timeout_ms", "start", "max_runs"):
        if key in msg:
            assert type(msg[key]) is int and 0 <= msg[key] <= protocol.MAX_N


@_fuzz
@given(st.sampled_from([
    b'{"op":"freeze","n":3,"lease_ms":500,"volumes":["a","b"],"full":["a"]}',
    b'{"op":"copy","n":3,"targets":{"a":"nbd+unix:///a?socket=/s"},"timeout_ms":500}',
    b'{"op":"dirty","volume":"a","start":12,"max_runs":5}']), st.integers(0, 90))
def test_decode_truncated_requests_raise_only_protocol_error(line, cut):
    """Every prefix of a good request is decoded or refused, nothing else."""
    try:
        protocol.decode(line[:cut])
    except ProtocolError as exc:
        assert exc.kind is Kind.PROTOCOL


@_fuzz
@given(_ops, st.one_of(st.binary(max_size=200),
                       st.dictionaries(st.sampled_from(["ok", "error", "kind", "n", "pid",
                                                        "phase", "volumes", "runs"]),
                                       _json, max_size=6).map(
                           lambda d: json.dumps(d).encode())))
def test_decode_reply_raises_only_refused_or_reply_errors(op, line):
    """Whatever a slave sends back is a checked reply, a Refused, or a
    ProtocolError of kind REPLY (the slave's fault)."""
    try:
        protocol.decode_reply(op if op in protocol.SCHEMA else None, line)
    except protocol.Refused as exc:
        assert isinstance(exc.kind, Kind)
    except ProtocolError as exc:
        assert exc.kind is Kind.REPLY and "\n" not in str(exc)


# ---------------------------------------------------------------- replies

GOOD_STATUS = {"ok": True, "pid": 42, "phase": "idle", "n": 3, "ended": "done",
               "last_copy": None,
               "volumes": {"a": {"size": 1 << 20, "granularity": 65536, "dirty_blocks": 2,
                                 "synced_target": None, "copy": None, "gate": "open"}}}


def test_decode_reply_accepts_a_good_status_and_tolerates_new_fields():
    """A well-formed reply passes; fields the client does not know are kept."""
    reply = {**GOOD_STATUS, "future": [1]}
    assert protocol.decode_reply("status", json.dumps(reply)) == reply


@pytest.mark.parametrize("op, reply, words", [
    ("status", {**GOOD_STATUS, "n": BIG}, "'n' must be between 0 and"),
    ("status", {**GOOD_STATUS, "n": "3"}, "'n' must be int"),
    ("status", {**GOOD_STATUS, "phase": "dancing"}, "'phase' must be one of"),
    ("status", {k: v for k, v in GOOD_STATUS.items() if k != "volumes"},
     "missing key 'volumes'"),
    ("status", {**GOOD_STATUS, "volumes": {"a": {**GOOD_STATUS["volumes"]["a"],
                                                  "size": -1}}},
     "'volumes[a].size' must be between"),
    ("freeze", {"ok": True, "n": 1, "drain_ms": float("nan"), "blocks": {}}, "not JSON"),
    ("freeze", {"ok": True, "n": 1, "drain_ms": 0.5, "blocks": {"a": 1.5}}, "must be int"),
    ("dirty", {"ok": True, "volume": "a", "granularity": 1, "blocks": 8,
               "runs": [[1, 2, 3]], "next": None}, "'runs[0]' must have 2 to 2"),
    ("thaw", {"ok": "yes"}, "no 'ok' true or false"),
    ("thaw", {"ok": False, "error": "x", "kind": "bored"}, "'kind' must be one of"),
    ("thaw", {"ok": False, "error": 5, "kind": "order"}, "'error' must be str"),
])
def test_decode_reply_refuses_what_a_bad_slave_sends(op, reply, words):
    """A reply outside its op's schema is a one-line error of kind REPLY."""
    line = json.dumps(reply).encode()
    with pytest.raises(ProtocolError) as exc:
        protocol.decode_reply(op, line)
    assert exc.value.kind is Kind.REPLY
    assert words in str(exc.value) and f"bad reply to {op}" in str(exc.value)


def test_the_largest_dirty_page_fits_one_line():
    """A dirty reply of max_runs runs of the largest numbers fits MAX_LINE,
    so no page the slave may send is refused by its client."""
    big = protocol.MAX_N
    reply = protocol.ok(volume="v" * 64, granularity=big, blocks=big,
                        runs=[[big, big]] * protocol.MAX_RUNS, next=big)
    line = protocol.encode(reply)
    assert len(line) <= protocol.MAX_LINE
    assert protocol.decode_reply("dirty", protocol.Framer().feed(line)[0]) == reply


def test_the_longest_gate_socket_freeze_and_its_reply_fit_its_line():
    """The gate socket (native/gate.c) takes lines of GATE_MAX_LINE bytes: the
    longest freeze of a full slave fits, spaced as json.dumps writes it, and
    so does the reply naming every volume; both are good protocol."""
    names = [f"{i:02d}" + "v" * (protocol.MAX_NAME - 2)
             for i in range(protocol.MAX_SLAVE_VOLUMES)]
    freeze = {"op": "freeze", "n": protocol.MAX_N, "lease_ms": protocol.MAX_LEASE_MS,
              "volumes": names, "full": names}
    assert len(json.dumps(freeze).encode()) <= protocol.GATE_MAX_LINE
    assert protocol.decode(json.dumps(freeze)) == freeze
    reply = protocol.ok(n=protocol.MAX_N, drain_ms=1e6, blocks=dict.fromkeys(names,
                                                                           protocol.MAX_N))
    assert len(json.dumps(reply).encode()) <= protocol.GATE_MAX_LINE
    protocol.decode_reply("freeze", json.dumps(reply))


def test_the_gate_is_built_from_these_limits():
    """native/_limits.h, which gate.c is compiled with, is what native/build.py
    makes of this module now: the C gate checks the protocol's own limits
    (and a build older than a change here fails this test: run `make ext`)."""
    from native import build

    with open(build.LIMITS, encoding="utf-8") as f:
        assert f.read() == build.limits_header(), "native/_limits.h is stale: run `make ext`"
    header = build.limits_header()
    for name, value in [("CG_MAX_N", f"{protocol.MAX_N}ULL"),
                        ("CG_MAX_LEASE_MS", f"{protocol.MAX_LEASE_MS}ULL"),
                        ("CG_MAX_NAME", protocol.MAX_NAME),
                        ("CG_MAX_VOLUMES", protocol.MAX_SLAVE_VOLUMES),
                        ("CG_GATE_MAX_LINE", protocol.GATE_MAX_LINE)]:
        assert f"#define {name} {value}\n" in header
    chars = header.split('#define CG_NAME_CHARS "')[1].split('"')[0]
    assert all(protocol.VOLUME_NAME.fullmatch(c) for c in chars)
    assert not any(protocol.VOLUME_NAME.fullmatch(chr(i)) for i in range(1, 256)
                   if chr(i) not in chars)


def test_decode_reply_turns_an_error_reply_into_refused():
    """An error reply is a Refused carrying the slave's line and its Kind."""
    with pytest.raises(protocol.Refused) as exc:
        protocol.decode_reply("thaw", protocol.encode(protocol.error("late", Kind.ENDED)))
    assert (str(exc.value), exc.value.kind) == ("late", Kind.ENDED)


def test_error_kinds_come_from_the_enum():
    """An error reply's kind must be a Kind; a free string is a bug caught at once."""
    assert protocol.error("x", "busy")["kind"] == "busy"
    with pytest.raises(ValueError):
        protocol.error("x", "bored")
    with pytest.raises(ValueError):
        ProtocolError("x", "bored")
