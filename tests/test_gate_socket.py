"""The native gate: FREEZE, THAW and ABORT on a slave's gate socket, served
by a C thread (native/gate.c), and the core behind both sockets.

Real nbdkit slaves and libnbd clients where the data path is involved; the
core in-process (native.gate.Core with real gates) for its state machine.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import nbd
import pytest

from ctlrig import assert_aborted_by_its_connection, connect_nbd, log_text, raw, read_line
from cgtest import wait_until
from harness.sites import pause
from coordinator.control import ControlError
from native.bitmap import Bitmap
from native.gate import Core, Gate, GateRefused
from nbdplugin.slave import Slave
from nbdplugin.volume import Volume
from wire import protocol

G = 64 * 1024
MB = 1 << 20


def gate_of(proc) -> str:
    with proc.control() as c:
        path = c.call("status")["gate"]
    assert path == proc.spec.control + ".gate"
    return path


def ask(s, line) -> dict:
    """Send one request (a dict or raw bytes); the reply, checked against the
    protocol's reply schema for its op."""
    if isinstance(line, dict):
        op, line = line["op"], json.dumps(line).encode()
    else:
        op = None
    s.sendall(line + b"\n")
    got = read_line(s)
    try:
        return protocol.decode_reply(op, got)
    except protocol.Refused as exc:
        return {"ok": False, "kind": exc.kind.value, "error": str(exc)}


# ------------------------------------------------------------------ served by C

def test_freeze_thaw_abort_on_the_gate_socket_hold_and_release_writes(slaves):
    """A write is held from the gate socket's FROZEN to its THAW (reads flow);
    the thawed cut is the slave's like any other: its status says so, the
    first write after the thaw preserves the block for the PiT, and ABORT on
    the control socket ends it with every change still marked."""
    proc = slaves(volumes=[("a", MB)])
    h, reader = connect_nbd(proc), connect_nbd(proc)
    h.pwrite(b"before", 0)
    g = raw(gate_of(proc))
    r = ask(g, {"op": "freeze", "n": 1, "lease_ms": 30000})
    assert r["ok"] and r["blocks"] == {"a": 1}, r
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"after!")), 0)
    with proc.control() as c:
        wait_until(lambda: c.call("status")["volumes"]["a"]["waiting"] == 1,
                   what="the write to be held")
        assert c.call("status")["phase"] == "frozen"
    assert reader.pread(6, 0) == b"before"
    h.poll(0)
    assert not h.aio_command_completed(cookie)
    thawed = ask(g, {"op": "thaw", "n": 1})
    assert thawed["ok"] and thawed["held_ms"] > 0
    while not h.aio_command_completed(cookie):
        h.poll(1000)
    with proc.control() as c:
        st = c.call("status")
        assert st["phase"] == "cut" and st["n"] == 1
        assert st["volumes"]["a"]["preserved_blocks"] == 1      # before -> PiT
        assert st["volumes"]["a"]["oos_blocks"] == 1
        assert c.call("abort", n=1)["ok"]
        assert c.call("status")["ended"] == "aborted"
        assert {s for s, _ in c.dirty_runs("a")} == {0}
    g.close()
    h.shutdown()
    reader.shutdown()


def test_bad_input_on_the_gate_socket_gets_one_line_and_the_gate_serves_on(slaves):
    """Malformed, unknown and out-of-range requests each get one error line
    with its kind; the same connection then freezes and thaws as usual.  A
    line past the limit ends the connection (it is out of step)."""
    proc = slaves(volumes=[("a", MB), ("b", MB)])
    g = raw(gate_of(proc))
    cases = [
        (b"not json", "protocol", "not a JSON object"),
        (b"[1, 2]", "protocol", "not a JSON object"),
        (b'{"op": "freeze"}', "protocol", "missing key 'n'"),
        (b'{"op": "freeze", "n": 1}', "protocol", "missing key 'lease_ms'"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 0}', "protocol", "'lease_ms' must be between"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 60001}', "protocol", "'lease_ms' must be between"),
        (b'{"op": "freeze", "n": -1, "lease_ms": 100}', "protocol", "'n' must be >= 1"),
        (b'{"op": "freeze", "n": 1.5, "lease_ms": 100}', "protocol", "'n' must be an integer"),
        (b'{"op": "freeze", "n": 99999999999999999999, "lease_ms": 100}', "protocol",
         "'n' must be <="),
        (b'{"op": "freeze", "n": "1", "lease_ms": 100}', "protocol", "'n' must be an integer"),
        (b'{"op": "status"}', "protocol", "use the control socket"),
        (b'{"op": "nope", "n": 1}', "protocol", "not served on the gate socket"),
        (b'{"op": "thaw", "n": 1, "x": 1}', "protocol", "unknown key 'x'"),
        (b'{"op": "thaw", "n": 1, "lease_ms": 5}', "protocol", "unknown key 'lease_ms'"),
        (b'{"op": "thaw", "n": 1, "n": 2}', "protocol", "duplicate key 'n'"),
        (b'{"op": "thaw", "n": 1} x', "protocol", "text after the object"),
        (b'{"op": "fr\\u0065eze", "n": 1}', "protocol", "escapes"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 100, "volumes": ["zz"]}', "unknown",
         "unknown volume 'zz' (this slave has: a, b)"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 100, "volumes": []}', "protocol",
         "must name each volume once"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 100, "volumes": ["a", "a"]}', "protocol",
         "must name each volume once"),
        (b'{"op": "freeze", "n": 1, "lease_ms": 100, "volumes": ["a"], "full": ["b"]}',
         "unknown", "'full' names 'b', which is not frozen"),
        (b'{"op": "thaw", "n": 1}', "order", "thaw 1 does not match: no cut yet"),
    ]
    for line, kind, text in cases:
        r = ask(g, line)
        assert not r["ok"] and r["kind"] == kind and text in r["error"], (line, r)
        assert "\n" not in r["error"]
    with proc.control() as c:
        assert c.call("status")["phase"] == "idle"      # nothing was frozen
    r = ask(g, {"op": "freeze", "n": 3, "lease_ms": 30000, "volumes": ["b"], "full": ["b"]})
    assert r["ok"] and set(r["blocks"]) == {"b"}
    stale = ask(g, {"op": "freeze", "n": 4, "lease_ms": 100})
    assert stale["kind"] == "busy" and "cut 3 is frozen" in stale["error"]
    assert ask(g, {"op": "thaw", "n": 3})["ok"]
    assert ask(g, {"op": "abort", "n": 3})["kind"] == "order"   # thawed: control socket
    with proc.control() as c:
        assert c.call("abort", n=3)["ok"]
    assert ask(g, {"op": "freeze", "n": 3, "lease_ms": 100})["kind"] == "stale"
    g.sendall(b"x" * (protocol.GATE_MAX_LINE + 1))
    r = json.loads(read_line(g))
    assert r["kind"] == "protocol" and "longer than" in r["error"]
    assert g.recv(10) == b""                    # closed: the stream is out of step
    g.close()


# ------------------------------------------------------------------ one verdict
#
# The gate socket parses its three ops in C (native/gate.c) beside the
# protocol's own parser (wire/protocol.py, behind the control socket).  These
# lines go to both sockets of one slave and must get the same verdict: ok, or
# an error of the same kind.  Each leaves the slave idle.

SAME_VERDICT = [
    b'{"op":"thaw","n":1}', b'{"op":"abort","n":1}', b'{"n":1,"op":"abort"}',
    b' \t{ "op" : "thaw" ,\r"n" : 1 } ', b'{"op":"thaw","n":9007199254740991}',
    # not a JSON object, not one of ours
    b"not json", b"[1, 2]", b'"thaw"', b"null", b"{}", b"\xff\xfe", b'{"op":"thaw","n":1',
    b'{"op":"thaw","n":1,}', b'{"op":"thaw","n":1} x', b'{"op":"thaw","n":1}\x00',
    b'{"op":"thaw" "n":1}', b'{"op":1,"n":1}', b'{"op":"","n":1}', b'{"op":"nope","n":1}',
    b'{"op":["thaw"],"n":1}', b'{"n":1}',
    # numbers
    b'{"op":"thaw"}', b'{"op":"thaw","n":0}', b'{"op":"thaw","n":-1}', b'{"op":"thaw","n":-0}',
    b'{"op":"thaw","n":1.0}', b'{"op":"thaw","n":1e3}', b'{"op":"thaw","n":01}',
    b'{"op":"thaw","n":"1"}', b'{"op":"thaw","n":true}', b'{"op":"thaw","n":null}',
    b'{"op":"thaw","n":[1]}', b'{"op":"thaw","n":{}}', b'{"op":"thaw","n":9007199254740992}',
    b'{"op":"thaw","n":99999999999999999999999}', b'{"op":"thaw","n":NaN}',
    # keys
    b'{"op":"thaw","n":1,"x":1}', b'{"op":"thaw","n":1,"lease_ms":5}',
    b'{"op":"abort","n":1,"volumes":["a"]}', b'{"op":"thaw","n":1,"volumes":["zz"]}',
    b'{"op":"abort","n":1,"full":[]}', b'{"op":"thaw","n":1,"' + b"k" * 40 + b'":1}',
    # freeze: required keys, the lease
    b'{"op":"freeze","n":1}', b'{"op":"freeze","lease_ms":100}',
    b'{"op":"freeze","n":1,"lease_ms":0}', b'{"op":"freeze","n":1,"lease_ms":60001}',
    b'{"op":"freeze","n":1,"lease_ms":"100"}', b'{"op":"freeze","n":1,"lease_ms":1.5}',
    # freeze: lists of names (the checks after the schema come in one order)
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":[]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["zz"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a","a"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a","a","zz"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a","zz","zz"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a b"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":[""]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["' + b"x" * 65 + b'"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["' + b"x" * 64 + b'"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["\xc3\xa9"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":[1]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a",]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":"a"}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":null}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":[' + b'"zz",' * 1024 + b'"zz"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"full":["zz"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"full":["a","a"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a"],"full":["b"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["a"],"full":["zz","b"]}',
    b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["zz"],"full":["a","a"]}',
]

# Freezes both take (%d: the cut number), each then aborted.
GOOD_FREEZES = [
    b'{"op":"freeze","n":%d,"lease_ms":30000}',
    b'{"op":"freeze","n":%d,"lease_ms":60000,"volumes":["b"],"full":["b"]}',
    b'{ "full" : [ ] , "lease_ms" : 30000 , "volumes" : [ "b" , "a" ] ,'
    b' "op" : "freeze" , "n" : %d }',
    b'{"op":"freeze","n":%d,"lease_ms":30000,"full":["a","b"]}',
]


def verdict(s, line: bytes) -> str:
    """"ok" or the error kind of the one reply to ``line``; a success is
    checked against the protocol's reply schema for its op."""
    s.sendall(line + b"\n")
    reply = read_line(s)
    try:
        op = protocol.parse(line).get("op")
    except protocol.ProtocolError:
        op = None
    try:
        protocol.decode_reply(op if isinstance(op, str) and op in protocol.REPLY_SCHEMA
                              else None, reply)
    except protocol.Refused as exc:
        return exc.kind.value
    return "ok"


def test_the_gate_socket_and_the_control_socket_give_every_line_one_verdict(slaves):
    """Malformed, out-of-range and valid lines, idle, frozen, thawed and after
    the cut: the C parser and the protocol's agree on every one (ok, or the
    same error kind), and every reply fits the protocol's reply schema."""
    proc = slaves(volumes=[("a", MB), ("b", MB)])
    g, ctl = raw(gate_of(proc)), raw(proc.spec.control)

    def same(line: bytes, want: str | None = None) -> str:
        got = verdict(g, line), verdict(ctl, line)
        assert got[0] == got[1], (line[:120], "gate, control:", got)
        assert want is None or got[0] == want, (line[:120], got)
        return got[0]

    kinds = {same(line) for line in SAME_VERDICT}
    assert kinds == {"order", "protocol", "unknown"}, kinds
    n = 0
    for template in GOOD_FREEZES:
        for s in (g, ctl):
            n += 1
            assert verdict(s, template % n) == "ok", template
            assert verdict(s, b'{"op":"abort","n":%d}' % n) == "ok"
    # A blank line gets no reply from either: the next reply is the thaw's.
    for s in (g, ctl):
        s.sendall(b" \t \n")
    same(b'{"op":"thaw","n":%d}' % n, "ended")
    same(b'{"op":"freeze","n":%d,"lease_ms":30000}' % n, "stale")
    # Frozen (by the gate socket): the cut's rules, the same on both.
    n += 1
    assert verdict(g, b'{"op":"freeze","n":%d,"lease_ms":30000}' % n) == "ok"
    same(b'{"op":"freeze","n":%d,"lease_ms":30000}' % (n + 1), "busy")
    same(b'{"op":"freeze","n":%d,"lease_ms":30000,"volumes":["zz"]}' % (n + 1), "unknown")
    same(b'{"op":"thaw","n":%d}' % (n + 1), "order")
    same(b'{"op":"abort","n":%d}' % (n - 1), "order")
    assert verdict(ctl, b'{"op":"thaw","n":%d}' % n) == "ok"
    # Thawed: the control socket's from now on, refused alike on both.
    same(b'{"op":"thaw","n":%d}' % n, "order")
    same(b'{"op":"freeze","n":%d,"lease_ms":30000}' % (n + 1), "busy")
    assert verdict(ctl, b'{"op":"abort","n":%d}' % n) == "ok"
    same(b'{"op":"abort","n":%d}' % n, "ended")
    for line in SAME_VERDICT[:20]:
        same(line)
    g.close()
    ctl.close()


def test_where_the_gate_socket_is_stricter_than_the_control_socket(slaves):
    """The deliberate differences, each pinned: ops other than its three, string
    escapes and duplicate keys are refused on the gate socket (kind protocol)
    and taken on the control socket; so is a thawed cut's abort (the gate
    serves the frozen phase)."""
    proc = slaves(volumes=[("a", MB)])
    g, ctl = raw(gate_of(proc)), raw(proc.spec.control)
    for line, control in [
        (b'{"op":"status"}', "ok"),
        (b'{"op":"dirty","volume":"a"}', "ok"),
        (b'{"op":"th\\u0061w","n":1}', "order"),
        (b'{"op":"thaw","n":1,"n":2}', "order"),
    ]:
        assert (verdict(g, line), verdict(ctl, line)) == ("protocol", control), line
    assert verdict(ctl, b'{"op":"freeze","n":1,"lease_ms":30000}') == "ok"
    assert verdict(ctl, b'{"op":"thaw","n":1}') == "ok"
    assert verdict(g, b'{"op":"abort","n":1}') == "order"
    assert verdict(ctl, b'{"op":"abort","n":1}') == "ok"
    g.close()
    ctl.close()


def test_the_longest_freeze_of_a_full_slave_fits_the_gate_socket(run_dir):
    """64 volumes of 64-character names, all in 'volumes' and 'full', spaced
    as json.dumps writes them: the C gate (in-process core, real socket)
    freezes and its reply names all 64; a line one byte past
    GATE_MAX_LINE is refused and ends the connection."""
    names = [f"{i:02d}" + "v" * (protocol.MAX_NAME - 2) for i in range(protocol.MAX_SLAVE_VOLUMES)]
    core, _gates = _core(names)
    path = os.path.join(run_dir, "g.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    core.start()
    core.serve(listener.fileno(), os.getuid())
    try:
        g = raw(path)
        line = json.dumps({"op": "freeze", "n": protocol.MAX_N, "lease_ms": 30000,
                           "volumes": names, "full": names}).encode()
        assert verdict(g, line) == "ok"
        assert core.state().full == names
        assert verdict(g, b'{"op":"thaw","n":%d}' % protocol.MAX_N) == "ok"
        padded = b'{"op":"thaw","n":1}'.ljust(protocol.GATE_MAX_LINE)
        assert verdict(g, padded) == "order"        # as long as a line may be
        g.sendall(padded + b" \n")
        r = json.loads(read_line(g))
        assert r["kind"] == "protocol" and "longer than" in r["error"]
        assert g.recv(10) == b""
        g.close()
    finally:
        core.close()
        listener.close()


def test_the_control_socket_and_the_gate_socket_drive_one_cut(slaves):
    """Frozen on one socket, thawed on the other, both ways."""
    proc = slaves(volumes=[("a", MB)])
    g = raw(gate_of(proc))
    with proc.control() as c:
        assert ask(g, {"op": "freeze", "n": 1, "lease_ms": 30000})["ok"]
        with pytest.raises(ControlError) as exc:
            c.call("freeze", n=2, lease_ms=1000)
        assert exc.value.kind == "busy"
        assert c.call("thaw", n=1)["ok"]
        assert c.call("abort", n=1)["ok"]
        assert c.call("freeze", n=2, lease_ms=30000)["ok"]
        assert ask(g, {"op": "thaw", "n": 2})["ok"]
        st = c.call("status")
        assert (st["phase"], st["n"]) == ("cut", 2)
        assert c.call("abort", n=2)["ok"]
    g.close()


def _waiting(proc, vol="a") -> int:
    """Host writes waiting at ``vol``'s closed gate (asked on the control socket)."""
    with proc.control(timeout=10) as c:
        return c.call("status")["volumes"][vol]["waiting"]


def test_killing_the_freezing_process_aborts_the_cut_at_once(slaves):
    """kill -9 of a coordinator that froze over the gate socket: the held
    write goes through as soon as the kernel closes its socket (not at the
    lease); the cut is aborted and its block is still marked."""
    proc = slaves(volumes=[("a", MB)])
    h = connect_nbd(proc)
    h.pwrite(b"x", 0)
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(b'{\"op\":\"freeze\",\"n\":1,\"lease_ms\":30000}\\n')\n"
            "print(s.recv(4096).decode(), flush=True); time.sleep(60)\n")
    coord = subprocess.Popen([sys.executable, "-c", code, gate_of(proc)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(coord.stdout.readline())["ok"]
        done = []
        t = threading.Thread(target=lambda: (h.pwrite(b"y", G),
                                             done.append(time.monotonic())))
        t.start()
        wait_until(lambda: _waiting(proc) == 1, 30, "the write waiting at the gate")
        assert not done                       # held by the gate
        killed = time.monotonic()
        coord.kill()
        t.join(10)
    finally:
        coord.kill()
        coord.wait()
        coord.stdout.close()
    # At once, not at the 30 s lease (the bound only catches that on a busy machine).
    assert done and done[0] - killed < 10.0, "write held after its freezer died"
    assert_aborted_by_its_connection(proc, 1, {0, 1})
    h.shutdown()


def test_lease_expiry_of_a_gate_socket_freeze(slaves):
    """Frozen on the gate socket and then silent: the C thread thaws at the
    lease and the cut is aborted ("expired")."""
    proc = slaves(volumes=[("a", MB)])
    h = connect_nbd(proc)
    g = raw(gate_of(proc))
    assert ask(g, {"op": "freeze", "n": 7, "lease_ms": 300})["ok"]
    t0 = time.monotonic()
    h.pwrite(b"y", 0)                         # held until the lease ends
    assert 0.15 < time.monotonic() - t0 < 5
    with proc.control() as c:
        st = c.call("status")
        assert (st["phase"], st["n"], st["ended"]) == ("idle", 7, "expired")
    assert ask(g, {"op": "thaw", "n": 7})["kind"] == "ended"
    assert "lease expired without thaw or abort" in log_text(proc)
    g.close()
    h.shutdown()


def test_a_stale_freeze_on_the_gate_socket_never_closes_a_gate(slaves):
    """FREEZE and ABORT queued to a stopped slave by a coordinator that gave
    up: on SIGCONT no gate closes and host writes flow."""
    proc = slaves(volumes=[("a", MB)])
    h = connect_nbd(proc)
    path = gate_of(proc)
    pause(proc.pid)
    try:
        s = raw(path)
        s.sendall(b'{"op":"freeze","n":1,"lease_ms":20000}\n{"op":"abort","n":1}\n')
        s.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: "refused a freeze whose connection is gone" in log_text(proc),
               60, what="the slave to refuse the stale freeze")
    t0 = time.monotonic()
    h.pwrite(b"z", 0)
    assert time.monotonic() - t0 < 10.0, "a stale freeze held host writes"  # lease: 20 s
    with proc.control() as c:
        assert c.call("status")["phase"] == "idle"
    h.shutdown()


def test_the_gate_socket_admits_its_owner_only_and_bounds_connections(slaves, run_dir):
    """0600 whatever the umask; a peer of another uid gets one "denied" line;
    past 16 connections the longest idle one gets "busy" and is closed, and
    the newcomer is served (issue 16: idle connections never lock it out)."""
    old = os.umask(0)
    try:
        proc = slaves(volumes=[("a", MB)])
    finally:
        os.umask(old)
    path = gate_of(proc)
    assert os.stat(path).st_mode & 0o777 == 0o600
    if os.getuid() == 0:
        os.chmod(run_dir, 0o711)
        os.chmod(path, 0o666)                # what a careless operator might do
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                         # child: only plain syscalls, then _exit
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                os.write(w, read_line(raw(path, timeout=5)) or b"EOF")
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                got = f.read()
        finally:
            os.waitpid(pid, 0)
        assert json.loads(got)["kind"] == "denied", got
    conns = [raw(path) for _ in range(16)]
    for c in conns:                           # each is being served
        assert ask(c, {"op": "abort", "n": 1})["kind"] == "order"
    extra = raw(path)
    assert ask(extra, {"op": "abort", "n": 1})["kind"] == "order"
    assert json.loads(read_line(conns[0]))["kind"] == "busy"
    assert read_line(conns[0]) == b""
    extra.close()
    conns.pop().close()
    wait_until(lambda: _answers(path), what="a free slot")
    for c in conns:
        c.close()


def _answers(path) -> bool:
    s = raw(path)
    try:
        return ask(s, {"op": "abort", "n": 1})["kind"] == "order"
    finally:
        s.close()


# ------------------------------------------------------------------ the core in-process

def _core(names=("a", "b"), last_n=0):
    gates = [Gate() for _ in names]
    return Core(list(names), gates, last_n), gates


def test_core_refusals_are_the_protocols():
    core, gates = _core(last_n=5)
    with pytest.raises(GateRefused) as exc:
        core.freeze(5, 1000, ["a"], [])
    assert exc.value.kind == "stale"
    core.freeze(6, 1000, ["a"], ["a"], owner=1)
    assert gates[0].closed and not gates[1].closed
    for call, kind, text in ((lambda: core.freeze(7, 1000, ["b"], []), "busy", "cut 6 is frozen"),
                             (lambda: core.thaw(5), "order", "thaw 5 does not match: cut 6"),
                             (lambda: core.end(6, "done") or core.thaw(9), "order", "")):
        with pytest.raises(GateRefused) as exc:
            call()
        assert exc.value.kind == kind and text in str(exc.value)
    st = core.state()
    assert (st.phase, st.n, st.volumes, st.full) == ("frozen", 6, ["a"], ["a"])
    assert 0 < st.lease_left_ms <= 1000
    core.abort(6)
    assert not gates[0].closed
    with pytest.raises(GateRefused) as exc:
        core.abort(6)
    assert exc.value.kind == "ended" and "already ended (aborted)" in str(exc.value)
    core.close()


def test_core_generation_moves_at_every_transition_and_gates_carry_it():
    core, gates = _core()
    seen = [core.state().gen]
    core.freeze(1, 1000, ["a", "b"], [])
    seen.append(core.state().gen)
    core.thaw(1)
    seen.append(core.state().gen)
    assert gates[0].enter() == seen[-1]       # a writer admitted after the thaw
    gates[0].leave()
    assert core.end(1, "done")
    seen.append(core.state().gen)
    assert seen == sorted(set(seen))
    assert core.state().ended == "done"
    core.close()


def test_core_counts_the_cut_from_the_change_maps():
    core, _ = _core()
    cr, oos = Bitmap(100), Bitmap(100)
    cr.set(3, 4)
    oos.set(5, 10)
    core.bitmaps("a", cr, oos)
    _, blocks = core.freeze(1, 1000, ["a", "b"], [])
    assert blocks == {"a": 12, "b": 0}        # cr | oos: blocks 3..14
    core.abort(1)
    core.close()


def test_a_freeze_from_an_owner_already_gone_is_refused():
    """The Python server's connection may end before its freeze is served:
    the core remembers it and refuses, and no gate closes."""
    core, gates = _core()
    core.owner_gone(42)
    with pytest.raises(GateRefused) as exc:
        core.freeze(1, 1000, ["a"], [], owner=42)
    assert exc.value.kind == "gone" and not gates[0].closed
    core.freeze(1, 1000, ["a"], [], owner=43)
    core.owner_gone(43)
    st = core.state()
    assert (st.phase, st.ended) == ("idle", "aborted") and not gates[0].closed
    core.close()


def test_the_core_thread_expires_the_lease():
    core, gates = _core()
    core.start()
    core.freeze(1, 200, ["a"], [])
    wait_until(lambda: core.state().phase == "idle", timeout=5, what="the lease")
    assert core.state().ended == "expired" and not gates[0].closed
    core.close()


def test_a_freeze_times_out_on_a_write_that_never_leaves_and_opens_again():
    core, gates = _core()
    gates[1].enter()
    with pytest.raises(GateRefused) as exc:
        core.freeze(1, 100, ["a", "b"], [])
    assert exc.value.kind == "timeout" and "writes to b did not finish" in str(exc.value)
    assert not gates[0].closed and not gates[1].closed
    assert core.state().phase == "idle"
    gates[1].leave()
    core.close()


def test_a_cut_taken_natively_is_taken_by_the_first_writer(tmp_path):
    """In-process slave: a freeze and thaw on the core alone (as the gate
    socket does them); the first write after it takes the PiT (cr -> oos)
    before it marks, and preserves the old content of its block."""
    d = str(tmp_path)
    vol = Volume("a", os.path.join(d, "a.img"), d, G, MB, create_size=MB)
    slave = Slave({"a": vol}, d)
    try:
        vol.pwrite(b"old", 0)
        slave.core.freeze(1, 10000, ["a"], [])
        slave.core.thaw(1)
        assert vol.pit is None                # nobody has looked yet
        vol.pwrite(b"new", 0)
        assert vol.pit is not None and vol.pit.n == 1
        assert vol.changes.counts() == (1, 1)     # the new write in cr, the old in oos
        buf = bytearray(G)
        vol.pit.read(buf, 0)
        assert bytes(buf[:3]) == b"old"
        assert slave.machine.phase.value == "cut"
    finally:
        slave.shutdown()


# ------------------------------------------------------------------ over TCP, mutual TLS

def test_the_gate_over_tcp_serves_session_certificates_only(certs, run_dir, capfd):
    """Beside a TCP control socket the gate listens on a free port of the same
    host with mutual TLS 1.3 (the C thread's own OpenSSL): the coordinator
    learns it from status and establishes over it; a client without a
    certificate, with one of another CA, or in plaintext gets nothing and
    the slave logs one line."""
    import ssl
    from coordinator import group
    from coordinator.link import SlaveLink
    from wire import tls

    d = os.path.join(run_dir, "tcp")
    os.mkdir(d)
    vol = Volume("a", os.path.join(d, "a.img"), d, G, MB, create_size=MB)
    slave = Slave({"a": vol}, d)
    files = tls.HostFiles(certs["server"])
    slave.start("tcp:127.0.0.1:0", files.server_context(), tls_files=files)
    link = SlaveLink("s1", slave.address,
                     ssl_context=tls.HostFiles(certs["good"]).client_context())
    try:
        port = int(slave.gate_path.rsplit(":", 1)[1])
        assert slave.gate_path == f"tcp:127.0.0.1:{port}" and port != 0
        link.status()
        assert link.gate == slave.gate_path
        vol.pwrite(b"x", 0)
        e = group.establish([link], 1, 5000, 2000)
        assert e.slaves["s1"].blocks == {"a": 1}
        assert slave.handle(b'{"op":"status"}')["phase"] == "cut"
        group.abort_all([link], 1)

        def refused(ctx) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                if ctx is None:                 # plaintext: no handshake at all
                    sock.sendall(b'{"op":"freeze","n":2,"lease_ms":1000}\n')
                    try:
                        assert sock.recv(100) == b""
                    except ConnectionResetError:
                        pass
                    return
                # TLS 1.3: the client may finish before the server has
                # refused its certificate; then its first read fails.
                with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
                    with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as s:
                        s.sendall(b'{"op":"freeze","n":2,"lease_ms":1000}\n')
                        if not s.recv(100):
                            raise EOFError

        ca_only = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca_only.load_verify_locations(os.path.join(certs["no-cert"], tls.CA_CERT))
        bad = [ca_only] + [tls.HostFiles(certs[who]).client_context()
                           for who in ("foreign-ca", "other-session", "expired")]
        for ctx in bad + [None]:
            refused(ctx)
        err = []
        wait_until(lambda: err.append(capfd.readouterr().err) or
                   "".join(err).count("refused a TLS connection") == len(bad) + 1,
                   what="one line per refusal")
        assert slave.handle(b'{"op":"status"}')["phase"] == "idle"
    finally:
        link.close()
        slave.shutdown()


def test_a_control_path_too_long_for_a_gate_beside_it_freezes_over_control(run_dir, caplog):
    """sun_path is 107 bytes: a control socket of 104 bytes has no room for
    ".gate"; the slave serves without a gate socket (one warning), status
    names none, and the establish goes over the control socket."""
    from coordinator import group
    from coordinator.link import SlaveLink

    d = os.path.join(run_dir, "long")
    os.mkdir(d)
    control = os.path.join(d, "c" * (104 - len(d) - 1))
    assert len(control) == 104
    vol = Volume("a", os.path.join(d, "a.img"), d, G, MB, create_size=MB)
    slave = Slave({"a": vol}, d)
    slave.start(control)
    link = SlaveLink("s1", control)
    try:
        assert "no gate socket" in caplog.text
        assert "gate" not in link.status() and link.gate is None
        group.establish([link], 1, 5000, 2000)
        assert slave.handle(b'{"op":"status"}')["phase"] == "cut"
        group.abort_all([link], 1)
    finally:
        link.close()
        slave.shutdown()


def test_a_slave_of_more_volumes_than_its_core_holds_is_refused(slaves):
    """65 volumes on one nbdkit: one line at start, naming the limit."""
    from coordinator import launch
    spec = slaves(volumes=[(f"v{i}", MB) for i in range(65)], start=False)
    with pytest.raises(launch.LaunchError, match="a slave serves at most 64"):
        launch.start(spec, timeout=30)


def test_python_catches_up_with_any_sequence_the_core_ran_alone(tmp_path):
    """In-process: transitions made on the core alone (as the gate socket and
    the lease make them), seen by Python late, in every order that matters:
    a cut aborted before anyone looked, one looked at while frozen and then
    aborted, and an abort followed by the next cut -- never a lost change,
    never a PiT of the wrong cut."""
    d = str(tmp_path)
    vol = Volume("a", os.path.join(d, "a.img"), d, G, MB, create_size=MB)
    slave = Slave({"a": vol}, d)
    status = lambda: slave.handle(b'{"op":"status"}')          # noqa: E731
    try:
        vol.pwrite(b"1", 0)
        slave.core.freeze(1, 10000, ["a"], [])
        slave.core.abort(1)
        st = status()
        assert (st["phase"], st["n"], st["ended"]) == ("idle", 1, "aborted")
        assert vol.pit is None and vol.changes.counts() == (1, 0)

        slave.core.freeze(2, 10000, ["a"], [])
        assert status()["phase"] == "frozen" and vol.pit.n == 2       # taken while frozen
        assert vol.changes.counts() == (0, 1)
        slave.core.abort(2)
        vol.pwrite(b"2", G)                 # the writer drops PiT 2 before it marks
        assert vol.pit is None and vol.changes.counts() == (2, 0)
        assert status()["ended"] == "aborted"

        slave.core.freeze(3, 10000, ["a"], [])
        status()                            # PiT 3 taken ...
        slave.core.abort(3)
        slave.core.freeze(4, 10000, ["a"], ["a"])
        slave.core.thaw(4)                  # ... and 4 taken over it, unseen
        vol.pwrite(b"3", 2 * G)
        assert vol.pit.n == 4 and vol.pit.full
        assert vol.changes.counts() == (1, 2)   # block 2 is cut 5's; 0 and 1 are cut 4's
        st = status()
        assert (st["phase"], st["n"]) == ("cut", 4)
        assert slave.handle(b'{"op":"abort","n":4}')["ok"]
        assert vol.changes.counts() == (3, 0)
        with open(os.path.join(d, "slave.json")) as f:
            assert json.load(f)["last_n"] == 4
    finally:
        slave.shutdown()
