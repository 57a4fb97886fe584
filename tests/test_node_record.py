"""The node record (nbdplugin/noderecord.py): real nbdkit nodes that keep
their session, role and lineage in node.json, change role through the
``role`` op (exit 75, started again here as a supervisor would), refuse
another session, another node's state directory and other volumes, and
find a file replaced behind them.  The pure parts (NodeRecord without
nbdkit) come first."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import nbd
import pytest

from cgtest import refused_start, wait_until
from coordinator.control import ControlError
from nbdplugin.noderecord import NODE_FILE, NodeRecord, NodeRecordError
from wire import lineage, protocol
from wire.noderole import recorded_role

G = 64 * 1024
SIZE = 2 << 20
GEN = "0123456789abcdef"


def ident(ino=7, size=SIZE):
    return {"kind": "file", "dev": 1, "ino": ino, "rdev": 0, "size": size}


# ------------------------------------------------------------------ pure

def test_first_start_records_everything_durably(tmp_path):
    """create writes node.json: session, node, id, role, event 1 per volume."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary", {"v": ident()})
    on_disk = json.loads((tmp_path / NODE_FILE).read_text())
    assert on_disk == rec.data
    assert (on_disk["session"], on_disk["node"], on_disk["role"], on_disk["role_seq"]) == \
        ("s1", "a1", "primary", 0)
    assert on_disk["volumes"]["v"]["lineage"]["history"] == []
    assert NodeRecord.load(str(tmp_path)).data == rec.data


def test_no_record_is_a_first_start(tmp_path):
    """load gives None where no node ever started."""
    assert NodeRecord.load(str(tmp_path)) is None
    assert recorded_role(str(tmp_path)) is None
    NodeRecord.create(str(tmp_path), "s1", "b1", "secondary", {"v": ident()})
    assert recorded_role(str(tmp_path)) == "secondary"


@pytest.mark.parametrize("session, node", [("s2", "a1"), ("s1", "a2"), ("s2", "a2")])
def test_another_node_or_session_is_refused(tmp_path, session, node):
    """check_belongs refuses another session or node name in one line."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary", {"v": ident()})
    with pytest.raises(NodeRecordError) as e:
        rec.check_belongs(session, node)
    assert str(e.value) == (f"{tmp_path} belongs to node a1 of session s1; this is node"
                            f" {node} of session {session}: give every node its own"
                            f" state directory")


def test_the_same_node_or_none_named_is_accepted(tmp_path):
    """The recorded names, or none given (a tool), start the node."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary", {"v": ident()})
    rec.check_belongs("s1", "a1")
    rec.check_belongs(None, None)


def test_other_volumes_are_refused(tmp_path):
    """A volume added, or one left out, is refused naming both lists."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary",
                            {"a": ident(), "b": ident(8)})
    with pytest.raises(NodeRecordError, match=r"^volume c is not in node a1's record"
                                              r" \(it has a, b\): a volume added"):
        rec.check_volumes(["a", "b", "c"])
    with pytest.raises(NodeRecordError, match=r"^volume b of node a1's record is not"
                                              r" given \(given: a\)"):
        rec.check_volumes(["a"])
    rec.check_volumes(["b", "a"])


def test_a_changed_identity_is_event_6(tmp_path):
    """Another inode: new lineage, no history, and a replaced line naming both."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary",
                            {"a": ident(), "b": ident(8)})
    old = rec.lineage("a")["current"]
    assert rec.start("s1", "a1", {"a": "/x/a.img", "b": "/x/b.img"},
                     {"a": ident(9), "b": ident(8)}) == ["a"]
    assert rec.lineage("a")["current"] != old and rec.lineage("a")["history"] == []
    assert rec.replaced("a").startswith(
        "volume a: /x/a.img is not the file node a1 served (inode 7 -> 9): its image is"
        " unknown to the pair; only a full resync joins it again")
    assert rec.replaced("b") is None
    again = NodeRecord.load(str(tmp_path))
    assert again.replaced("a") == rec.replaced("a") and again.data["volumes"]["a"][
        "identity"]["ino"] == 9


def test_the_same_identity_writes_nothing(tmp_path):
    """A start on the recorded files leaves node.json untouched."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary", {"a": ident()})
    before = os.stat(tmp_path / NODE_FILE).st_ino
    assert rec.start("s1", "a1", {"a": "/x"}, {"a": ident()}) == []
    assert os.stat(tmp_path / NODE_FILE).st_ino == before


@pytest.mark.parametrize("new, words", [(ident(size=SIZE * 2), "size 2097152 -> 4194304"),
                                         ({"kind": "block", "rdev": 2049, "size": SIZE,
                                           "dev": 0, "ino": 0}, "a file before")])
def test_size_and_kind_are_identity(tmp_path, new, words):
    """A resized file or a device in a file's place is another volume."""
    rec = NodeRecord.create(str(tmp_path), None, None, "secondary", {"a": ident()})
    rec.start(None, None, {"a": "/x"}, {"a": new})
    assert words in rec.replaced("a")


def test_names_given_later_are_recorded(tmp_path):
    """A node first started without session=/node= records them when given."""
    rec = NodeRecord.create(str(tmp_path), None, None, "primary", {"a": ident()})
    rec.start("s1", "a1", {"a": "/x"}, {"a": ident()})
    assert (NodeRecord.load(str(tmp_path)).session, rec.node) == ("s1", "a1")


def test_record_keeps_only_a_higher_seq(tmp_path):
    """keep_record stores a higher seq and answers the stored one otherwise."""
    rec = NodeRecord.create(str(tmp_path), "s1", "a1", "primary", {"a": ident()})
    assert rec.keep_record({"seq": 2, "source": "a"}) == {"seq": 2, "source": "a"}
    assert rec.keep_record({"seq": 1, "source": "b"}) == {"seq": 2, "source": "a"}
    assert rec.keep_record({"seq": 2, "source": "b"}) == {"seq": 2, "source": "a"}
    assert NodeRecord.load(str(tmp_path)).record == {"seq": 2, "source": "a"}


@pytest.mark.parametrize("text", ["{", '{"version": 1}', '{"version": 9}'])
def test_a_damaged_record_is_one_line(tmp_path, text):
    """A node.json that is not a record stops the start in one line."""
    (tmp_path / NODE_FILE).write_text(text)
    with pytest.raises(NodeRecordError) as e:
        NodeRecord.load(str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path / NODE_FILE) in str(e.value)


def test_the_new_ops_have_schemas():
    """role, record and gens are checked; a session key is allowed on any op."""
    assert protocol.decode('{"op":"role","to":"secondary","session":"s1"}')["to"] == \
        "secondary"
    for bad in ('{"op":"role","to":"tertiary"}', '{"op":"record","record":{"x":1}}',
                '{"op":"commit","n":1,"gens":{"a":"xyz"}}',
                '{"op":"status","session":"two words"}',
                '{"op":"status","session":5}'):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(bad)
    assert protocol.RESTART_STATUS == 75
    assert protocol.Kind("session") is protocol.Kind.SESSION


# ------------------------------------------------------------------ real nodes

def node(slaves, name, role="primary", session="s1", env=None, start=True, vols=("v",)):
    args = [f"session={session}", f"node={name}"] if session else []
    return slaves(name, volumes=[(v, SIZE) for v in vols], role=role, filter_args=args,
                  env=env or {}, start=start)


def status(proc, **kw):
    with proc.control() as c:
        return c.call("status", **kw)


def call(proc, op, **kw):
    with proc.control() as c:
        return c.call(op, **kw)


def role_change(slaves, proc, to):
    """The role op, its exit 75, and the start a supervisor would do (from
    the same spec, whatever role it names): the node comes back as another
    process in the new role, its role_seq one higher."""
    before = status(proc)
    reply = call(proc, "role", to=to, session="s1")
    assert reply["ok"] and reply["role"] == to and reply["restarting"] is True
    assert reply["role_seq"] == before["role_seq"] + 1
    assert proc.wait(60) == protocol.RESTART_STATUS
    proc = slaves.restart(proc.spec)
    st = status(proc)
    assert st["pid"] != before["pid"]
    assert st["role"] == to and st["role_seq"] == reply["role_seq"]
    return proc, st


def write(proc, offset, data, vol="v"):
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri(vol))
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def failing_start(spec) -> str:
    """Run ``spec``'s nbdkit expecting a refusal: exit 1 and exactly one
    line on stderr; return it without its prefix."""
    code, lines = refused_start(spec.command())
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("cgmirror: error: ")
    return lines[0].removeprefix("cgmirror: error: ")


def test_role_op_exits_75_and_the_node_comes_back_in_the_recorded_role(slaves):
    """primary -> secondary -> primary: each by the op (exit 75), each
    start from the same spec in the recorded role, role_seq 1 then 2;
    events 3 and 2."""
    a = node(slaves, "a1")
    st = status(a)
    gen = st["volumes"]["v"]["lineage"]["current"]
    assert (st["session"], st["node"], st["role_seq"], st["record"]) == ("s1", "a1", 0, None)
    write(a, 0, b"x" * G)                               # own writes: demoted dirty
    a, st = role_change(slaves, a, "secondary")
    v = st["volumes"]["v"]
    assert v["lineage"]["current"] == gen and v["lineage"]["own"] is True and v["dirty"]
    a, st = role_change(slaves, a, "primary")
    v = st["volumes"]["v"]["lineage"]
    assert v["history"][0] == [gen, 0] and v["current"] not in (gen,)
    assert st["role_seq"] == 2 and json.loads(Path(a.spec.statedir, NODE_FILE).read_text())[
        "role"] == "primary"


def test_role_op_hangs_up_on_idle_nbd_clients_and_exits_at_once(slaves):
    """Connected host clients do not hold the restart (nbdkit 1.32 waits for
    them; the node hangs up on them): exit 75 well inside the 30 s grace."""
    a = node(slaves, "a1")
    clients = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(a.spec.uri("v"))
        h.pwrite(b"c" * 512, 0)
        clients.append(h)
    t0 = time.monotonic()
    assert call(a, "role", to="secondary")["restarting"]
    assert a.wait(60) == protocol.RESTART_STATUS
    assert time.monotonic() - t0 < 10
    for h in clients:
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    assert "did not shut down" not in Path(a.spec.logfile).read_text()


def test_role_op_over_tcp_with_mutual_tls_and_a_tls_client(certs, slaves):
    """The role op on the TCP control channel (mutual TLS), an nbds client
    connected: exit 75 at once, and the node comes back as a secondary on
    the same addresses; a peer without the session's certificate gets
    nowhere near the op."""
    from tlsrig import free_port
    from coordinator.control import ControlClient, client_context
    spec = dataclasses.replace(
        node(slaves, "a1", start=False),
        control=f"tcp:127.0.0.1:{free_port()}", nbd=f"tcp:127.0.0.1:{free_port()}",
        nbd_socket="", tls=certs["server"], client_tls=certs["good"])
    a = slaves.restart(spec)
    with pytest.raises(ControlError):
        with ControlClient(spec.control, 5, client_context(certs["other-session"])) as c:
            c.call("role", to="secondary")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs["good"])
    h.set_tls_verify_peer(True)
    h.connect_uri(spec.uri("v"))
    h.pwrite(b"t" * 512, 0)
    t0 = time.monotonic()
    assert call(a, "role", to="secondary")["restarting"]
    assert a.wait(60) == protocol.RESTART_STATUS
    assert time.monotonic() - t0 < 10
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    a = slaves.restart(spec)
    st = status(a)
    assert (st["role"], st["role_seq"]) == ("secondary", 1)
    assert st["volumes"]["v"]["lineage"]["own"] is True


def test_role_op_to_the_role_it_has_does_not_restart(slaves):
    """Already a primary: restarting false, the same process serves on."""
    a = node(slaves, "a1")
    assert call(a, "role", to="primary") == {"ok": True, "role": "primary",
                                            "restarting": False, "role_seq": 0}
    assert status(a)["pid"] == a.pid


def test_a_primary_refuses_a_role_change_during_a_cut(slaves):
    """A cut in progress: kind busy, nothing recorded, the node serves on."""
    a = node(slaves, "a1")
    with a.control() as c:
        c.call("freeze", n=1, lease_ms=10_000)
        c.call("thaw", n=1)
        with pytest.raises(ControlError) as e:
            c.call("role", to="secondary")
        assert e.value.kind == "busy" and "cut 1 is cut" in str(e.value)
        c.call("abort", n=1)
        assert c.call("status")["role_seq"] == 0
    write(a, 0, b"y" * 100)                              # host writes still flow


def test_a_secondary_refuses_promotion_while_a_group_is_prepared(slaves):
    """prepared n: kind busy naming what settles it; after commit it works."""
    b = node(slaves, "b1", role="secondary")
    with b.control() as c:
        c.call("prepare", n=1)
        with pytest.raises(ControlError) as e:
            c.call("role", to="primary")
        assert e.value.kind == "busy" and "group 1 is prepared" in str(e.value)
        assert "cgmirror failover" in str(e.value)
        c.call("commit", n=1)
    role_change(slaves, b, "primary")


def test_a_node_that_is_restarting_answers_only_status(slaves):
    """Between the record and the exit nothing else is served (unit-level:
    the handler of a real node, its exit held back)."""
    from nbdplugin.server import OpHandler

    class Held(OpHandler):
        ROLE = "primary"
        lock = __import__("threading").RLock()

        def __init__(self, rec):
            self.node = rec
            self.exits = 0
            self.on_restart = lambda: setattr(self, "exits", self.exits + 1)

        def _leave_role(self, to):
            return (lambda n, lin: lineage.demote(lin, False)), (lambda: None)

        def op_status(self):
            return protocol.ok(pid=1, role=self.ROLE, phase="idle", n=0, ended=None,
                               volumes={}, last_copy=None)

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        h = Held(NodeRecord.create(d, "s1", "a1", "primary", {"v": ident()}))
        assert h.handle('{"op":"role","to":"secondary"}')["restarting"] is True
        refused = h.handle('{"op":"record","record":{"seq":1}}')
        assert refused["kind"] == "busy" and "restarting as a secondary" in refused["error"]
        assert h.handle('{"op":"status"}')["ok"]
        h.reply_sent()
        h.reply_sent()
        assert h.exits == 1 and NodeRecord.load(d).role == "secondary"


@pytest.mark.parametrize("point, comes_back", [("node:role:before-record", "primary"),
                                               ("node:role:after-record", "secondary")])
def test_kill9_around_the_record_comes_back_in_exactly_one_role(slaves, point, comes_back):
    """kill -9 just before / just after node.json is renamed: the node
    starts in the old / the new role, whole; asked again, the op finishes."""
    a = node(slaves, "a1")
    write(a, 0, b"z" * G)
    a.stop()
    a.spec.env = {"CGMIRROR_FAILPOINTS": point}
    a = slaves.restart(a.spec)
    with a.control() as c:
        with pytest.raises(ControlError):
            c.call("role", to="secondary")
    assert a.wait(30) == -9
    a.spec.env = {}
    a = slaves.restart(a.spec)
    st = status(a)
    assert st["role"] == comes_back
    assert st["role_seq"] == (0 if comes_back == "primary" else 1)
    assert st["volumes"]["v"]["dirty"] is True          # the write is still known
    reply = call(a, "role", to="secondary")
    assert reply["restarting"] is (comes_back == "primary")
    if reply["restarting"]:
        assert a.wait(60) == protocol.RESTART_STATUS
        a = slaves.restart(a.spec)
    st = status(a)
    assert (st["role"], st["role_seq"]) == ("secondary", 1)
    assert st["volumes"]["v"]["lineage"]["own"] is True


def test_another_session_is_refused_and_changes_nothing(slaves):
    """A request naming another session: kind session, on the control socket
    and on the gate socket alike; no session named (a tool) is served."""
    a = node(slaves, "a1")
    with a.control() as c:
        for op, kw in (("status", {}), ("freeze", {"n": 1, "lease_ms": 5000}),
                       ("role", {"to": "secondary"}), ("record", {"record": {"seq": 1}})):
            with pytest.raises(ControlError) as e:
                c.call(op, session="s2", **kw)
            assert e.value.kind == "session"
            assert str(e.value) == ("node a1 belongs to session s1, not s2: a node serves"
                                    " one session; give s2 nodes of its own")
        st = c.call("status")
        assert (st["phase"], st["n"], st["role_seq"], st["record"]) == ("idle", 0, 0, None)
    gate = status(a)["gate"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(gate)
        s.sendall(b'{"op":"freeze","n":1,"lease_ms":5000,"session":"s2"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["kind"] == "session" and "not s2" in reply["error"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(gate)
        f = s.makefile("rw")
        f.write('{"op":"freeze","n":1,"lease_ms":5000,"session":"s1"}\n')
        f.flush()
        assert json.loads(f.readline())["ok"]
        f.write('{"op":"abort","n":1,"session":"s1"}\n')
        f.flush()
        assert json.loads(f.readline())["ok"]


SESSION_LINES = [
    '{"op":"thaw","n":1,"session":"s2"}',
    '{"op":"abort","n":7,"session":"s1"}',
    '{"op":"freeze","n":1,"session":"s2"}',                      # missing lease_ms
    '{"op":"freeze","n":1,"lease_ms":100,"volumes":["zz"],"session":"s2"}',
    '{"op":"freeze","n":1,"lease_ms":100,"session":"two words"}',
    '{"op":"freeze","n":1,"lease_ms":100,"session":5}',
    '{"op":"freeze","n":1,"lease_ms":100,"session":"' + "s" * 65 + '"}',
    '{"op":"abort","n":1,"session":"s2","session":"s1"}',       # Python keeps the last
]


def test_the_gate_socket_and_the_control_socket_judge_sessions_alike(slaves):
    """Lines with a session key get the same kind on both sockets (the gate
    is stricter only on duplicate keys, as for every key)."""
    a = node(slaves, "a1")
    gate = status(a)["gate"]
    for line in SESSION_LINES:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(gate)
            s.sendall(line.encode() + b"\n")
            native = json.loads(s.makefile().readline())
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(a.spec.control)
            s.sendall(line.encode() + b"\n")
            python = json.loads(s.makefile().readline())
        if '"session":"s2","session"' in line:
            assert (native["kind"], python["ok"]) == ("protocol", False), (line, python)
            continue
        assert native.get("kind") == python.get("kind"), (line, native, python)
        assert native["ok"] is False


def test_a_second_session_on_a_live_secondary_is_refused(slaves):
    """Session s2's coordinator reaches s1's secondary: refused, and the
    secondary's group and lineage are untouched; s2 naming its state
    directory at start is refused in one line."""
    b = node(slaves, "b1", role="secondary")
    with b.control() as c:
        c.call("prepare", n=3, session="s1")
        c.call("commit", n=3, session="s1", gens={"v": GEN})
        before = c.call("status")
        for op, kw in (("prepare", {"n": 4}), ("commit", {"n": 4}), ("rollback", {}),
                       ("assume", {"n": 9})):
            with pytest.raises(ControlError) as e:
                c.call(op, session="s2", **kw)
            assert e.value.kind == "session"
        after = c.call("status")
    assert (after["hardened"], after["prepared"]) == (3, None)
    assert after["volumes"]["v"]["lineage"] == before["volumes"]["v"]["lineage"]
    b.stop()
    spec = node(slaves, "b1", role="secondary", session="s2", start=False)
    assert failing_start(spec) == (f"{spec.statedir} belongs to node b1 of session s1;"
                                   f" this is node b1 of session s2: give every node its"
                                   f" own state directory")


def test_volumes_changed_are_refused_at_start(slaves):
    """A volume added to the node's configuration: one line, nothing changed."""
    a = node(slaves, "a1", vols=("v", "w"))
    a.stop()
    spec = node(slaves, "a1", vols=("v", "w", "c"), start=False)
    record = Path(spec.statedir, NODE_FILE).read_text()
    assert failing_start(spec).startswith(
        "volume c is not in node a1's record (it has v, w): a volume added or renamed")
    assert Path(spec.statedir, NODE_FILE).read_text() == record


def replace_file(path):
    """The same bytes in a new inode at the same path (a restore from a
    backup, a copy made by hand)."""
    shutil.copyfile(path, path + ".new")
    os.rename(path + ".new", path)


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_a_file_replaced_behind_a_stopped_node_is_found_at_start(slaves, role):
    """Same bytes, another inode: event 6, the replaced line in status, and
    no common generation with the peer any more."""
    a = node(slaves, "a1", role=role)
    before = status(a)["volumes"]["v"]["lineage"]
    a.stop()
    path = a.spec.volumes[0][1]
    ino = os.stat(path).st_ino
    replace_file(path)
    a = slaves.restart(a.spec)
    v = status(a)["volumes"]["v"]
    assert v["replaced"] == (
        f"volume v: {path} is not the file node a1 served (inode {ino} ->"
        f" {os.stat(path).st_ino}): its image is unknown to the pair; only a full resync"
        f" joins it again (`cgmirror resync --from SOURCE --to TARGET --full`)")
    assert v["lineage"]["current"] != before["current"] and v["lineage"]["history"] == []
    assert lineage.compare({"lineage": before, "dirty": False}, v).kind == "unrelated"
    a.stop()
    a = slaves.restart(a.spec)                          # the line stays until joined
    assert status(a)["volumes"]["v"]["replaced"] == v["replaced"]


def full_group(a, b, n, full=True):
    """Cut n on a, drain it into b's replication export, harden it on b with
    a's generation; return (a's status, b's status)."""
    sb = status(b)
    uri = f"nbd+unix:///{sb['volumes']['v']['export']}?socket={b.spec.nbd_socket}"
    with a.control() as c:
        c.call("freeze", n=n, lease_ms=10_000, full=["v"] if full else [], session="s1")
        c.call("thaw", n=n, session="s1")
        c.call("copy", n=n, targets={"v": uri}, session="s1")
        wait_until(lambda: c.call("status")["phase"] == "idle", 60, "the copy to end")
        sa = c.call("status")
    assert sa["last_copy"]["ok"], sa["last_copy"]
    with b.control() as s:
        s.call("prepare", n=n, session="s1")
        s.call("commit", n=n, gens={"v": sa["volumes"]["v"]["lineage"]["current"]},
               session="s1")
        sb = s.call("status")
    return sa, sb


def test_a_replaced_primary_file_loses_its_baseline_until_a_full_copy(slaves):
    """The primary's file replaced while stopped: no baseline on its target
    (an incremental copy is refused), unrelated to the secondary; a full
    copy and commit join them again and the replaced line ends."""
    a = node(slaves, "a1")
    b = node(slaves, "b1", role="secondary")
    write(a, 0, random.Random(6).randbytes(SIZE))
    sa, sb = full_group(a, b, 1)
    assert sa["volumes"]["v"]["synced_target"] is not None
    a.stop()
    replace_file(a.spec.volumes[0][1])
    a = slaves.restart(a.spec)
    sa = status(a)
    assert sa["volumes"]["v"]["synced_target"] is None and sa["volumes"]["v"]["replaced"]
    assert lineage.compare(sa["volumes"]["v"], sb["volumes"]["v"]).kind == "unrelated"
    with a.control() as c:
        c.call("freeze", n=2, lease_ms=10_000)
        c.call("thaw", n=2)
        with pytest.raises(ControlError) as e:
            c.call("copy", n=2, targets={"v": "nbd+unix:///x?socket=/nonexistent"})
        assert e.value.kind == "baseline"
        c.call("abort", n=2)
    sa, sb = full_group(a, b, 3)
    assert sa["volumes"]["v"]["replaced"] is None
    assert lineage.compare(sa["volumes"]["v"], sb["volumes"]["v"]).kind == "in-sync"


def test_a_replaced_secondary_file_drops_its_undo_store_and_a_rollback_leaves_it(slaves):
    """b1 hardened group 1, then part of group 2 drained (undo blocks kept
    for a rollback), stopped, its file replaced by other bytes: at start
    the old file's undo store and change maps are gone (one line), and a
    rollback leaves every byte of the new file as it is."""
    a = node(slaves, "a1")
    b = node(slaves, "b1", role="secondary")
    write(a, 0, random.Random(7).randbytes(SIZE))
    full_group(a, b, 1)
    sb = status(b)
    uri = f"nbd+unix:///{sb['volumes']['v']['export']}?socket={b.spec.nbd_socket}"
    h = nbd.NBD()                                       # an unfinished drain of group 2
    h.connect_uri(uri)
    h.pwrite(b"d" * (3 * G), 0)
    h.flush()
    h.shutdown()
    assert status(b)["volumes"]["v"]["undo_blocks"] == 3
    b.stop()
    undo = sorted(p.name for p in Path(b.spec.statedir).glob("v.undo.*"))
    assert undo and os.path.getsize(Path(b.spec.statedir, "v.undo.1.idx")) > 0, undo
    path = b.spec.volumes[0][1]
    new = random.Random(8).randbytes(SIZE)
    Path(path + ".new").write_bytes(new)
    os.rename(path + ".new", path)
    b = slaves.restart(b.spec)
    v = status(b)["volumes"]["v"]
    assert v["replaced"] and (v["undo_blocks"], v["tgt_blocks"]) == (0, 0), v
    assert not any(p.stat().st_size for p in Path(b.spec.statedir).glob("v.undo.*.idx"))
    log = Path(b.spec.logfile).read_text()
    assert log.count("of the old file are dropped") == 1, log
    assert "v: " + path + " is not the file node b1 served; its undo store" in log, log
    assert call(b, "rollback", session="s1")["rolled_back"] == {"v": 0}
    assert Path(path).read_bytes() == new
    b.stop()
    b = slaves.restart(b.spec)                          # forgotten once, durably
    assert status(b)["volumes"]["v"]["undo_blocks"] == 0
    assert Path(b.spec.logfile).read_text().count("of the old file are dropped") == 1


def test_a_replaced_primary_file_starts_with_empty_change_maps(slaves):
    """The primary's writes before the replacement are the old file's: its
    maps are emptied at start (a full copy sends every block anyway)."""
    a = node(slaves, "a1")
    write(a, 0, b"w" * (4 * G))
    assert status(a)["volumes"]["v"]["dirty_blocks"] == 4
    a.stop()
    replace_file(a.spec.volumes[0][1])
    a = slaves.restart(a.spec)
    v = status(a)["volumes"]["v"]
    assert v["replaced"] and (v["dirty_blocks"], v["cr_blocks"], v["oos_blocks"]) == (0, 0, 0)
    a.stop()
    a = slaves.restart(a.spec)
    assert status(a)["volumes"]["v"]["dirty_blocks"] == 0


def test_an_unchanged_file_is_not_replaced(slaves):
    """A plain restart keeps the lineage and says nothing."""
    a = node(slaves, "a1")
    before = status(a)["volumes"]["v"]
    a.stop()
    a = slaves.restart(a.spec)
    after = status(a)["volumes"]["v"]
    assert after["replaced"] is None and after["lineage"] == before["lineage"]


def test_record_op_keeps_the_highest_seq_across_restarts(slaves):
    """record stores a higher seq only; it survives kill -9."""
    a = node(slaves, "a1")
    assert call(a, "record", record={"seq": 3, "source": "a"})["record"] == \
        {"seq": 3, "source": "a"}
    assert call(a, "record", record={"seq": 2, "source": "b"})["record"]["source"] == "a"
    a.kill9()
    a = slaves.restart(a.spec)
    assert status(a)["record"] == {"seq": 3, "source": "a"}


def test_lineage_through_a_group_a_failover_and_a_write_at_the_old_primary(slaves):
    """Group 1 drained and committed with gens: in sync.  b1 promoted by the
    role op: b1 is newer.  a1 written afterwards: diverged (split brain)."""
    a = node(slaves, "a1")
    b = node(slaves, "b1", role="secondary")
    write(a, 0, random.Random(5).randbytes(SIZE))
    sb = status(b)
    uri = f"nbd+unix:///{sb['volumes']['v']['export']}?socket={b.spec.nbd_socket}"
    with a.control() as c:
        c.call("freeze", n=1, lease_ms=10_000, full=["v"], session="s1")
        c.call("thaw", n=1, session="s1")
        c.call("copy", n=1, targets={"v": uri}, session="s1")
        wait_until(lambda: c.call("status")["phase"] == "idle", 60, "the copy to end")
        sa = c.call("status")
    assert sa["last_copy"]["ok"] and sa["volumes"]["v"]["lineage"]["cut"] == 1
    gen = sa["volumes"]["v"]["lineage"]["current"]
    with b.control() as s:
        s.call("prepare", n=1, session="s1")
        s.call("commit", n=1, gens={"v": gen}, session="s1")
        sb = s.call("status")
    lb = sb["volumes"]["v"]["lineage"]
    assert (lb["current"], lb["hardened"], lb["own"]) == (gen, 1, False)
    assert lb["history"][0][1] == 0
    assert lineage.compare(sa["volumes"]["v"], sb["volumes"]["v"]).kind == "in-sync"

    b, sb = role_change(slaves, b, "primary")
    lb = sb["volumes"]["v"]["lineage"]
    assert lb["history"][0] == [gen, 1] and lb["current"] != gen
    sa = status(a)
    assert lineage.compare(sb["volumes"]["v"], sa["volumes"]["v"]).kind == "source-newer"
    assert lineage.compare(sa["volumes"]["v"], sb["volumes"]["v"]).kind == "target-newer"

    write(a, 0, b"split")                                # a kept writing
    sa = status(a)
    v = lineage.compare(sb["volumes"]["v"], sa["volumes"]["v"], "b1/v", "a1/v")
    assert (v.kind, v.rule) == ("diverged", 5)
    assert f"b1/v at generation {lb['current'][:8]} (from {gen[:8]} at group 1)" in v.line()


def test_assume_with_gens_takes_the_peers_generation(slaves):
    """A demoted primary's assume n with gens: event 5, own cleared."""
    a = node(slaves, "a1")
    write(a, 0, b"w" * G)
    a, st = role_change(slaves, a, "secondary")
    assert st["volumes"]["v"]["lineage"]["own"] is True
    old = st["volumes"]["v"]["lineage"]["current"]
    with a.control() as c:
        with pytest.raises(ControlError) as e:
            c.call("assume", n=4, gens={"w": GEN})
        assert e.value.kind == "unknown"
        c.call("assume", n=4, gens={"v": GEN})
        lin = c.call("status")["volumes"]["v"]["lineage"]
    assert lin == {"current": GEN, "history": [[old, 0]], "hardened": 4, "cut": 0,
                   "own": False}


def test_a_dr_test_round_trip_by_the_role_op(slaves):
    """dr_test, role primary (kept group), test writes, role secondary (the
    start restores the group), assume with the primary's gens: the image is
    group 1 again and the lineage is in sync with the primary."""
    a = node(slaves, "a1")
    b = node(slaves, "b1", role="secondary")
    data = random.Random(7).randbytes(SIZE)
    write(a, 0, data)
    sa, _ = full_group(a, b, 1)
    gen = sa["volumes"]["v"]["lineage"]["current"]
    call(b, "dr_test", n=1, session="s1")
    b, st = role_change(slaves, b, "primary")
    test_gen = st["volumes"]["v"]["lineage"]["current"]
    assert st["volumes"]["v"]["lineage"]["history"][0] == [gen, 1]
    write(b, G, b"t" * G)                               # the test writes
    b, st = role_change(slaves, b, "secondary")
    assert st["volumes"]["v"]["lineage"]["own"] is True and st["hardened"] == 1
    call(b, "assume", n=1, gens={"v": gen}, session="s1")
    sb = status(b)
    lin = sb["volumes"]["v"]["lineage"]
    assert {**lin, "history": lin["history"][:2]} == {
        "current": gen, "history": [[test_gen, 1], [gen, 1]], "hardened": 1, "cut": 0,
        "own": False}
    assert lineage.compare(status(a)["volumes"]["v"], sb["volumes"]["v"]).kind == "in-sync"
    h = nbd.NBD()
    h.connect_uri(b.spec.uri("v"))
    try:
        assert h.pread(SIZE, 0) == data                 # group 1, not the test's
    finally:
        h.shutdown()
