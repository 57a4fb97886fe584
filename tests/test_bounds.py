"""Bounds on every number of the control protocol, end to end.

A real slave refuses out-of-range requests and changes nothing (issue 7
items 5, 7 and 10); the coordinator survives whatever a slave reports.  The
misbehaving slave is ``FakeSlave``: a tiny control server that answers with
canned replies.  It stands in for a broken peer on the control channel only;
no data path goes through it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading

import nbd
import pytest

import cgtest
from cgtest import need
from coordinator import group
from coordinator.errors import ConfigError, EstablishAborted, ExitCode, SlaveError, \
    SlaveUnreachable
from coordinator.link import SlaveLink
from wire import protocol
from coordinator.control import ControlError
from wire.protocol import Kind

MB = 1 << 20
BIG = 2**63 + 5     # once saved by a freeze, it crashed every later copy (SQLite)


class FakeSlave:
    """A control server at ``path`` that answers each op from ``replies``
    ({op: reply dict, or raw bytes without the newline}) and records every
    request.  Started and stopped (threads joined) by the context manager."""

    def __init__(self, path: str, replies: dict):
        self.path, self.replies = path, replies
        self.requests: list[dict] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []

    def __enter__(self) -> "FakeSlave":
        self._srv.bind(self.path)
        self._srv.listen(8)
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc) -> None:
        self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for c in list(self._conns):
            c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=10)
            assert not t.is_alive(), "fake slave thread did not end"
        for c in self._conns:
            c.close()
        os.unlink(self.path)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        # Framed by hand, not with the codec under test.
        with conn.makefile("rb") as rf:
            for line in rf:
                req = json.loads(line)
                self.requests.append(req)
                r = self.replies.get(req["op"], {"ok": True, "n": req.get("n", 1)})
                conn.sendall((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def status_reply(n=1, size=4 * MB) -> dict:
    """A status reply that is right for a session with volume "db" of ``size``."""
    vol = {"size": size, "granularity": 65536, "dirty_blocks": 0, "cr_blocks": 0,
           "oos_blocks": 0, "synced_target": None, "copy": None, "gate": "open",
           "pit": None, "lease_ms_left": None}
    return {"ok": True, "pid": 4242, "phase": "idle", "n": n, "ended": None,
            "last_copy": None, "volumes": {"db": vol}}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------- real slave

@pytest.fixture(autouse=True)
def _need():
    need("nbdkit")


def test_freeze_with_a_huge_cut_number_is_refused_and_nothing_is_saved(slaves):
    """freeze n=2^63+5 is refused; the slave's cut number stays, also across
    a restart, and the next freeze works."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        with pytest.raises(ControlError) as exc:
            c.call("freeze", n=BIG, lease_ms=500)
        assert exc.value.kind is Kind.PROTOCOL
        assert "'n' must be between 1 and" in one_line(exc.value)
        st = c.call("status")
        assert (st["phase"], st["n"], st["volumes"]["a"]["gate"]) == ("idle", 0, "open")
    proc.stop(timeout=10)
    proc = slaves.restart(proc.spec)
    with proc.control() as c:
        assert c.call("status")["n"] == 0
        c.call("freeze", n=1, lease_ms=500)
        c.call("abort", n=1)


def test_lease_above_the_cap_is_refused(slaves):
    """A lease of an hour (3,600,000 ms) is refused; the gates stay open."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        with pytest.raises(ControlError, match="'lease_ms' must be between 1 and 60000"):
            c.call("freeze", n=1, lease_ms=3_600_000)
        st = c.call("status")
        assert (st["phase"], st["volumes"]["a"]["gate"]) == ("idle", "open")
        c.call("freeze", n=1, lease_ms=protocol.MAX_LEASE_MS)   # the cap itself is fine
        c.call("abort", n=1)


def test_establish_refuses_a_lease_above_the_cap_before_freezing(slaves):
    """The coordinator checks the cap too, before any slave is frozen."""
    proc = slaves(volumes=[("a", MB)])
    with SlaveLink("s1", proc.spec.control) as lk:
        with pytest.raises(ConfigError, match="above the cap of 60000 ms"):
            group.establish([lk], 1, lease_ms=3_600_000, max_coordination_ms=1000)
        assert lk.status()["n"] == 0


@pytest.mark.parametrize("timeout_ms", [-1, 0, 99, 3_600_001, BIG])
def test_copy_timeout_out_of_range_is_refused(slaves, timeout_ms):
    """copy with timeout_ms -1, 0, too small or huge is refused; the cut stays."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        with pytest.raises(ControlError) as exc:
            c.call("copy", n=1, targets={"a": "nbd+unix:///a?socket=/nonexistent"},
                   timeout_ms=timeout_ms)
        assert exc.value.kind is Kind.PROTOCOL
        assert "'timeout_ms' must be between 100 and 3600000" in one_line(exc.value)
        st = c.call("status")
        assert (st["phase"], st["n"], st["volumes"]["a"]["copy"]) == ("cut", 1, None)
        c.call("abort", n=1)


def test_dirty_start_beyond_any_volume_is_refused(slaves):
    """dirty with start = 2^63+5 is a protocol error, not a crash of the slave."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        with pytest.raises(ControlError, match="'start' must be between 0 and"):
            c.call("dirty", volume="a", start=BIG)
        assert c.call("dirty", volume="a")["runs"] == []


# ---------------------------------------------------------------- bad slave

@pytest.mark.parametrize("reply, words", [
    (status_reply(n=BIG), "'n' must be between 0 and 9007199254740991"),
    (status_reply(n="7"), "'n' must be int"),
    (status_reply(size="4M"), "'volumes[db].size' must be int"),
    (b"{not json", "not JSON"),
    (b'{"ok":true,"pad":"' + b"x" * protocol.MAX_LINE + b'"}', "longer than 1048576 bytes"),
])
def test_link_reports_a_bad_status_reply_as_the_slaves_fault(run_dir, reply, words):
    """A slave reporting n = 2^63+5, a string where a number belongs or
    garbage gives one line naming the slave: a SlaveError of kind REPLY."""
    path = os.path.join(run_dir, "fake.ctl")
    with FakeSlave(path, {"status": reply}), SlaveLink("fake", path) as lk:
        with pytest.raises(SlaveError) as exc:
            lk.status()
    assert not isinstance(exc.value, SlaveUnreachable)
    assert exc.value.kind is Kind.REPLY and exc.value.exit_code == ExitCode.FAILED
    text = one_line(exc.value)
    assert text.startswith("slave fake: ") and "bad reply to status" in text and words in text


@pytest.mark.parametrize("bad", [{"ok": True, "n": BIG, "drain_ms": "soon", "blocks": {}},
                                 b'{"ok":true,"n":1,"drain_ms":NaN,"blocks":{}}',
                                 b"\xff\xfe"])
def test_establish_aborts_on_a_bad_freeze_reply_and_still_sends_the_abort(run_dir, bad):
    """A freeze reply out of schema (or not JSON) aborts the cut with one
    line; the abort still goes out on the same connection behind the freeze."""
    path = os.path.join(run_dir, "fake.ctl")
    with FakeSlave(path, {"freeze": bad}) as fake, SlaveLink("fake", path) as lk:
        with pytest.raises(EstablishAborted) as exc:
            group.establish([lk], 3, lease_ms=5000, max_coordination_ms=1000)
    text = one_line(exc.value)
    assert "cut 3 aborted: fake: freeze failed" in text and "bad reply to freeze" in text
    assert [r["op"] for r in fake.requests] == ["freeze", "abort"]
    assert exc.value.aborts == {"fake": "aborted"}


def test_cli_copy_survives_a_slave_reporting_a_huge_cut_number(run_dir, capsys):
    """cgmirror copy against a slave reporting n = 2^63+5: one line, exit
    FAILED, nothing frozen and nothing written to the history."""
    p = cgtest.write_session(run_dir, {"s1": {"db": 4 * MB}})
    (p.parent / "run").mkdir()
    with FakeSlave(str(p.parent / "run" / "s1.ctl"), {"status": status_reply(n=BIG)}) as fake:
        code = cgtest.run(p, "copy")
        err = capsys.readouterr().err
        assert code == ExitCode.FAILED, err
        assert err.count("\n") == 1 and err.startswith("cgmirror: slave s1: "), err
        assert "bad reply to status" in err
        assert [r["op"] for r in fake.requests] == ["status"]
        assert cgtest.run(p, "history", "--json") == ExitCode.OK
        assert json.loads(capsys.readouterr().out)["copies"] == []


# ---------------------------------------------------------------- fuzz

SEEDS = [b'{"op":"freeze","n":7,"lease_ms":300,"volumes":["a"],"full":["a"]}',
         b'{"op":"thaw","n":7}', b'{"op":"abort","n":7}', b'{"op":"status"}',
         b'{"op":"copy","n":7,"targets":{"a":"nbd+unix:///a?socket=/nonexistent"},'
         b'"timeout_ms":100,"inflight":2}',
         b'{"op":"dirty","volume":"a","start":3,"max_runs":2}', b'{"op":"clear"}']
SPICE = [b"9223372036854775813", b"-1", b"0", b"1e400", b"NaN", b'"7"', b"true", b"null",
         b"[]", b"{}", b'"' + b"x" * 70 + b'"', b"\xff", b"1.5"]


def mutate(rng, line: bytes) -> bytes:
    """One random damage to a good request: a flipped byte, a cut, a value
    swapped for an out-of-range or wrong-typed one."""
    how = rng.randrange(4)
    if how == 0:
        i = rng.randrange(len(line))
        line = line[:i] + bytes([rng.randrange(256)]) + line[i + 1:]
    elif how == 1:
        line = line[:rng.randrange(1, len(line))]
    else:
        msg = json.loads(line)
        keys = [k for k in msg if k != "op"] or ["op"]
        k = rng.choice(keys)
        # In place of the value, or of the first item inside a list or map.
        inner = {list: ["@"], dict: {"a": "@"}}.get(type(msg[k]), "@")
        line = json.dumps({**msg, k: inner}).encode().replace(b'"@"', rng.choice(SPICE))
    line = line.replace(b"\n", b" ")
    return line if line.strip() else b"x"


def test_fuzzed_requests_get_checked_replies_and_nbd_keeps_serving(slaves):
    """Hundreds of damaged requests: each gets one well-formed reply (never
    a crash, never a reply out of schema), host I/O keeps working throughout,
    and the slave's state is still sane afterwards."""
    proc = slaves(volumes=[("a", MB)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    rng = random.Random(8)
    try:
        with proc.control(timeout=10) as c:
            for i in range(400):
                line = mutate(rng, rng.choice(SEEDS))
                try:
                    c.call_raw(line + b"\n")
                except ControlError as exc:
                    assert exc.kind not in (Kind.UNREACHABLE, Kind.REPLY), (line, exc)
                    assert "\n" not in str(exc)
                if i % 20 == 0:
                    # A freeze a mutation let through is over by its lease
                    # (at most 300 ms here, or the cap), so a write waits at
                    # most that long.
                    h.pwrite(bytes([i % 251]) * 4096, (i * 4096) % MB)
                    assert h.pread(4096, (i * 4096) % MB) == bytes([i % 251]) * 4096
            st = c.call("status")          # checked against the reply schema
            if st["phase"] != "idle":
                c.call("abort", n=st["n"])
            assert c.call("status")["phase"] == "idle"
    finally:
        h.shutdown()
    assert proc.alive()
