"""The secondary role: a real nbdkit with role=secondary, written through its
replication export by libnbd (and by a real primary's copy), read through
its host export, driven over its control socket."""

import hashlib
import os
import random
import threading

import nbd
import pytest

from cgtest import refused_start, wait_until
from wire import protocol
from coordinator.control import ControlError
from secrig import SIZE, export, harden, img, secondary

G = 64 * 1024
MB = 1 << 20
NBLOCKS = SIZE // G


def connect(proc, name):
    h = nbd.NBD()
    h.set_handle_name(f"test-{name.rsplit('/', 1)[-1]}")
    h.connect_uri(f"nbd+unix:///{name}?socket={proc.spec.nbd_socket}")
    return h


def repl(proc, vol="a"):
    return connect(proc, export(proc, vol))


def host(proc, vol="a"):
    return connect(proc, vol)


def tgt_blocks(c, vol="a"):
    r = c.call("tgt", volume=vol)
    return {b for s, n in r["runs"] for b in range(s, s + n)}


def group_writes(rng, image, count=40):
    """Random unaligned writes into ``image``; returns them for a client."""
    out = []
    for _ in range(count):
        off = rng.randrange(SIZE - 1)
        data = rng.randbytes(rng.randrange(1, min(SIZE - off, 3 * G) + 1))
        image[off:off + len(data)] = data
        out.append((off, data))
    return out


def replicate(client, rng, image, count=40):
    """``group_writes`` sent through ``client`` (a replication export)."""
    writes = group_writes(rng, image, count)
    for off, data in writes:
        client.pwrite(data, off)
    return writes


def blocks_of(writes):
    return {b for off, data in writes for b in range(off // G, (off + len(data) - 1) // G + 1)}


# ------------------------------------------------------------------ exports

def test_status_names_a_stable_secret_replication_export(slaves):
    """status hands out repl-TOKEN/NAME (32 hex), the same after a restart."""
    proc = secondary(slaves)
    with proc.control() as c:
        st = c.call("status")
    assert st["role"] == "secondary" and st["hardened"] == 0 and st["prepared"] is None
    name = st["volumes"]["a"]["export"]
    token = name.removeprefix("repl-").removesuffix("/a")
    assert len(token) == 32 and int(token, 16) >= 0
    tokfile = os.path.join(proc.spec.statedir, "replication.token")
    assert os.stat(tokfile).st_mode & 0o777 == 0o600
    proc.stop()
    proc = slaves.restart(proc.spec)
    assert export(proc) == name


def hardened_secondary(slaves, **kw):
    """A secondary whose group 1 (empty) is hardened: its host export opens."""
    proc = secondary(slaves, **kw)
    with proc.control() as c:
        harden(c, 1)
    return proc


def test_nothing_hardened_yet(slaves):
    """Before the first group: the host export refuses to open, writes keep no
    undo (the first full copy needs no second copy's space), rollback has
    nothing to restore; after the first commit the host export opens."""
    proc = secondary(slaves)
    with pytest.raises(nbd.Error):
        host(proc)
    w = repl(proc)
    w.pwrite(b"\x05" * (3 * G), 0)
    w.flush()
    with proc.control() as c:
        assert c.call("status")["volumes"]["a"]["undo_blocks"] == 0
        assert not [f for f in os.listdir(proc.spec.statedir) if ".undo." in f]
        assert c.call("rollback") == {"ok": True, "hardened": 0, "rolled_back": {"a": 0}}
        assert tgt_blocks(c) == set()
        harden(c, 1)
    assert host(proc).pread(3 * G, 0) == b"\x05" * (3 * G)
    with open(os.path.join(proc.spec.logfile)) as f:
        assert "no hardened group yet" in f.read()


def test_host_export_is_read_only(slaves):
    """The host export says read-only and a write to it fails; data unchanged."""
    proc = hardened_secondary(slaves)
    h = host(proc)
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    # A client that sends the writes anyway is refused by the server.
    h.set_strict_mode(0)
    for write in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.zero(G, 0),
                  lambda: h.trim(G, 0)):
        with pytest.raises(nbd.Error) as e:
            write()
        assert e.value.errno == "EPERM"     # from the server itself
    assert h.pread(4096, 0) == bytes(4096)
    assert img(proc) == bytes(SIZE)


@pytest.mark.parametrize("name", ["repl-" + "0" * 32 + "/a", "repl-/a", "a/a", "b",
                                  "repl-"])
def test_wrong_replication_token_is_refused(slaves, name):
    """An export name other than NAME or the right repl-TOKEN/NAME is refused."""
    proc = secondary(slaves)
    with pytest.raises(nbd.Error):
        connect(proc, name)


def test_right_replication_token_writes(slaves):
    """The real replication export is writable and counts what it was sent."""
    proc = hardened_secondary(slaves)
    h = repl(proc)
    assert not h.is_read_only()
    h.pwrite(b"\x01" * 1000, 5)
    h.flush()
    with proc.control() as c:
        v = c.call("status")["volumes"]["a"]
    assert v["replication_bytes"] == 1000 and v["undo_blocks"] == 1


def test_primary_refuses_secondary_ops_and_vice_versa(slaves):
    """Each role refuses the other's ops with kind 'role', and changes nothing."""
    p = slaves("p1", volumes=[("a", SIZE)])
    s = secondary(slaves)
    with p.control() as c:
        for op, args in (("prepare", {"n": 1}), ("commit", {"n": 1}), ("rollback", {}),
                         ("tgt", {"volume": "a"})):
            with pytest.raises(ControlError) as e:
                c.call(op, **args)
            assert e.value.kind == "role"
    with s.control() as c:
        for op, args in (("freeze", {"n": 1, "lease_ms": 1000}), ("dirty", {"volume": "a"}),
                         ("mark", {"volume": "a", "runs": [[0, 1]]})):
            with pytest.raises(ControlError) as e:
                c.call(op, **args)
            assert e.value.kind == "role"
        assert c.call("status")["hardened"] == 0


# ------------------------------------------------------------------ the cycle

def test_host_export_shows_the_hardened_group_at_every_moment(slaves):
    """While groups are replicated, prepared and committed, concurrent reads
    of the host export always equal one hardened image, byte for byte, and
    never go back to an older one."""
    proc = hardened_secondary(slaves)
    rng = random.Random(3)
    images = {1: bytes(SIZE)}
    live = bytearray(SIZE)
    stop = threading.Event()
    reads = []

    def reader():
        h = host(proc)
        while not stop.is_set():
            reads.append(hashlib.sha256(h.pread(SIZE, 0)).digest())
        h.shutdown()

    t = threading.Thread(target=reader)
    t.start()
    try:
        w = repl(proc)
        with proc.control() as c:
            for n in range(2, 7):
                replicate(w, rng, live)
                w.flush()
                harden(c, n)
                images[n] = bytes(live)
            assert c.call("status")["hardened"] == 6
    finally:
        stop.set()
        t.join(30)
    # Checked once every image is known: a read may end just after a commit.
    groups = {hashlib.sha256(im).digest(): n for n, im in images.items()}
    seen = [groups.get(d) for d in reads]
    assert None not in seen, f"{seen.count(None)} of {len(seen)} reads matched no group"
    assert seen == sorted(seen) and len(seen) > 5
    h = host(proc)
    assert h.pread(SIZE, 0) == images[6]
    # An unaligned read mid-drain shows group 6 too.
    w = repl(proc)
    w.pwrite(b"\xff" * (3 * G), G // 2)
    assert h.pread(2 * G + 7, G // 2 - 3) == images[6][G // 2 - 3:G // 2 + 2 * G + 4]


def test_prepare_commit_rules(slaves):
    """Commit is idempotent; a stale or out-of-order prepare/commit is refused
    and changes nothing; while prepared, replication writes are refused."""
    proc = secondary(slaves)
    w = repl(proc)
    with proc.control() as c:
        harden(c, 3)
        assert c.call("commit", n=3)["ok"]                  # retried commit
        for op, n, kind in (("prepare", 3, "stale"), ("prepare", 2, "stale"),
                            ("commit", 4, "order"), ("commit", 2, "stale")):
            with pytest.raises(ControlError) as e:
                c.call(op, n=n)
            assert e.value.kind == kind, (op, n)
        w.pwrite(b"\x07" * G, 0)
        assert c.call("prepare", n=5)["n"] == 5
        assert c.call("prepare", n=5)["n"] == 5             # retried prepare
        with pytest.raises(ControlError) as e:
            c.call("prepare", n=6)
        assert e.value.kind == "order"
        with pytest.raises(ControlError) as e:
            c.call("commit", n=6)
        assert e.value.kind == "order"
        with pytest.raises(nbd.Error) as e:
            w.pwrite(b"\x08" * G, G)
        assert e.value.errno == "EPERM"     # EROFS: NBD carries it as EPERM
        st = c.call("status")
        assert (st["hardened"], st["prepared"]) == (3, 5)
        assert st["volumes"]["a"]["undo_blocks"] == 1
        assert c.call("commit", n=5)["n"] == 5
        st = c.call("status")
        assert (st["hardened"], st["prepared"]) == (5, None)
        assert st["volumes"]["a"]["undo_blocks"] == 0
    w.pwrite(b"\x08" * G, G)                               # writes flow again
    assert not [f for f in os.listdir(proc.spec.statedir) if ".undo.3" in f]


def test_rollback_restores_the_hardened_group_and_marks_tgt(slaves):
    """Rollback writes the undo blocks back byte-exact, puts exactly those
    blocks in tgt, and clear_tgt clears them."""
    proc = secondary(slaves)
    rng = random.Random(5)
    live = bytearray(SIZE)
    w = repl(proc)
    with proc.control() as c:
        replicate(w, rng, live)
        harden(c, 1)
        hardened = bytes(live)
        writes = replicate(w, rng, live, 10)
        touched = blocks_of(writes)
        r = c.call("rollback")
        assert r == {"ok": True, "hardened": 1, "rolled_back": {"a": len(touched)}}
        assert img(proc) == hardened
        assert tgt_blocks(c) == touched
        runs = c.call("tgt", volume="a")["runs"]
        assert c.call("clear_tgt", volume="a", runs=runs[:1])["blocks"] == runs[0][1]
        assert tgt_blocks(c) == touched - set(range(runs[0][0], sum(runs[0])))
        with pytest.raises(ControlError) as e:
            c.call("clear_tgt", volume="a", runs=[[NBLOCKS - 1, 2]])
        assert e.value.kind == "protocol"


# ------------------------------------------------------------------ crashes

def restart(slaves, proc):
    proc.wait(30)
    proc.spec.env = {}
    return slaves.restart(proc.spec)


@pytest.mark.parametrize("point", ["secondary:after-undo@3", "secondary:after-write@5"])
def test_kill_mid_replication_keeps_the_hardened_group(slaves, point):
    """kill -9 mid-replication: after restart the host export still shows
    group 1; rollback restores it byte-exact and tgt holds exactly the
    rolled-back blocks."""
    proc = secondary(slaves)
    rng = random.Random(11)
    live = bytearray(SIZE)
    w = repl(proc)
    with proc.control() as c:
        replicate(w, rng, live)
        harden(c, 1)
    hardened = bytes(live)
    w.shutdown()
    proc.stop()
    proc.spec.env = {"CGMIRROR_FAILPOINTS": point}
    proc = slaves.restart(proc.spec)
    w = repl(proc)
    with pytest.raises(nbd.Error):
        for i in range(NBLOCKS):
            w.pwrite(rng.randbytes(G + 100), i * G if i < NBLOCKS - 1 else SIZE - G - 100)
    proc = restart(slaves, proc)
    assert host(proc).pread(SIZE, 0) == hardened
    with proc.control() as c:
        st = c.call("status")
        assert st["hardened"] == 1
        saved = st["volumes"]["a"]["undo_blocks"]
        assert saved >= 3
        r = c.call("rollback")
        assert r["rolled_back"] == {"a": saved}
        assert img(proc) == hardened
        assert len(tgt_blocks(c)) == saved


def test_commit_after_a_crash_between_prepare_and_commit(slaves):
    """Prepared n survives kill -9: writes stay refused, host shows n-1,
    commit n then makes n the hardened group."""
    proc = secondary(slaves)
    rng = random.Random(13)
    live = bytearray(SIZE)
    w = repl(proc)
    with proc.control() as c:
        replicate(w, rng, live)
        harden(c, 1)
        g1 = bytes(live)
        replicate(w, rng, live)
        c.call("prepare", n=2)
    proc.kill9()
    proc = slaves.restart(proc.spec)
    assert host(proc).pread(SIZE, 0) == g1
    with pytest.raises(nbd.Error):
        repl(proc).pwrite(b"x", 0)
    with proc.control() as c:
        assert (c.call("status")["prepared"]) == 2
        assert c.call("commit", n=2)["n"] == 2
    assert host(proc).pread(SIZE, 0) == bytes(live)


def test_crash_in_commit_before_the_store_is_dropped(slaves):
    """Hardened n recorded, old store still there: at restart it is deleted
    as stale, and the host export shows n."""
    proc = secondary(slaves, env={"CGMIRROR_FAILPOINTS": "secondary:commit-before-drop@2"})
    rng = random.Random(17)
    live = bytearray(SIZE)
    w = repl(proc)
    with proc.control() as c:
        harden(c, 1)
        replicate(w, rng, live)
        c.call("prepare", n=2)
        with pytest.raises(ControlError):
            c.call("commit", n=2)
    assert [f for f in os.listdir(proc.spec.statedir) if f.startswith("a.undo.1")]
    proc = restart(slaves, proc)
    assert not [f for f in os.listdir(proc.spec.statedir) if f.startswith("a.undo.1")]
    assert host(proc).pread(SIZE, 0) == bytes(live)
    with proc.control() as c:
        st = c.call("status")
        assert (st["hardened"], st["prepared"], st["volumes"]["a"]["undo_blocks"]) == (2, None, 0)
        assert c.call("commit", n=2)["ok"]


@pytest.mark.parametrize("point", ["secondary:rollback-mid@4",
                                   "secondary:rollback-before-drop"])
def test_kill_during_rollback_is_finished_by_rolling_back_again(slaves, point):
    """A rollback cut by kill -9 is finished by running it again: byte-exact
    group 1, tgt exactly the rolled-back blocks, no undo left."""
    proc = secondary(slaves, env={"CGMIRROR_FAILPOINTS": point})
    rng = random.Random(19)
    live = bytearray(SIZE)
    w = repl(proc)
    with proc.control() as c:
        replicate(w, rng, live)
        harden(c, 1)
        g1 = bytes(live)
        writes = replicate(w, rng, live, 12)
        c.call("prepare", n=2)
        with pytest.raises(ControlError):
            c.call("rollback")
    touched = blocks_of(writes)
    proc = restart(slaves, proc)
    assert host(proc).pread(SIZE, 0) == g1
    with proc.control() as c:
        assert c.call("rollback")["rolled_back"] == {"a": len(touched)}
        assert img(proc) == g1
        assert tgt_blocks(c) == touched
        st = c.call("status")
        assert (st["hardened"], st["prepared"], st["volumes"]["a"]["undo_blocks"]) == (1, None, 0)


# ------------------------------------------------------------------ with a primary

def test_primary_copy_into_the_replication_export(slaves):
    """A real primary's copy writes its cut into the replication export; the
    host export shows the old group until commit, the new one after."""
    sec = secondary(slaves)
    prim = slaves("p1", volumes=[("a", SIZE)])
    uri = f"nbd+unix:///{export(sec)}?socket={sec.spec.nbd_socket}"
    h = nbd.NBD()
    h.connect_uri(prim.spec.uri("a"))
    data = random.Random(23).randbytes(SIZE)
    h.pwrite(data, 0)
    with prim.control() as c, sec.control() as s:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        c.call("copy", n=1, targets={"a": uri})
        wait_until(lambda: c.call("status")["phase"] == "idle", 30, "the copy to end")
        assert c.call("status")["last_copy"]["ok"]
        with pytest.raises(nbd.Error):
            host(sec)                                       # nothing hardened yet
        assert s.call("status")["volumes"]["a"]["undo_blocks"] == 0
        harden(s, 1)
        assert host(sec).pread(SIZE, 0) == data
        assert s.call("status")["volumes"]["a"]["replication_bytes"] >= SIZE


def test_mark_on_a_primary_survives_kill9(slaves):
    """mark sets blocks in the primary's change map, in dirty at once and
    after kill -9; runs past the volume are refused."""
    # No checkpoint before the kill: only the write-intent map can save them.
    prim = slaves("p1", volumes=[("a", SIZE)], checkpoint=3600)
    with prim.control() as c:
        c.call("clear")
        assert c.call("mark", volume="a", runs=[[1, 2], [NBLOCKS - 1, 1]])["blocks"] == 3
        assert c.dirty_runs("a") == [(1, 2), (NBLOCKS - 1, 1)]
        with pytest.raises(ControlError) as e:
            c.call("mark", volume="a", runs=[[NBLOCKS - 1, 2]])
        assert e.value.kind == "protocol"
        # During a cut too: cr is the next group, which the cut does not touch.
        c.call("freeze", n=1, lease_ms=5000)
        c.call("thaw", n=1)
        c.call("mark", volume="a", runs=[[5, 1]])
        assert c.call("status")["volumes"]["a"]["cr_blocks"] == 1
        c.call("abort", n=1)
        assert c.dirty_runs("a") == [(1, 2), (5, 1), (NBLOCKS - 1, 1)]
    prim.kill9()
    prim = slaves.restart(prim.spec)
    with prim.control() as c:
        got = {b for s, n in c.dirty_runs("a") for b in range(s, s + n)}
    assert {1, 2, 5, NBLOCKS - 1} <= got


# ------------------------------------------------------------------ schemas

def test_status_reply_schema_by_role():
    """A secondary's status reply is checked by the secondary schema."""
    good = {"ok": True, "pid": 5, "role": "secondary", "hardened": 0, "prepared": None,
            "volumes": {"a": {"size": 1, "granularity": 1, "export": "repl-x/a",
                              "undo_blocks": 0, "tgt_blocks": 0, "replication_bytes": 0,
                              "host_writes_refused": 0}}}
    assert protocol.decode_reply("status", good) is good
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_reply("status", {**good, "hardened": -1})
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_reply("status", {**good, "role": "tertiary"})


def test_zero_and_trim_are_undone_too(slaves):
    """Zero and trim through the replication export (partial blocks too)
    save the old content first: host shows group 1, rollback restores it."""
    proc = secondary(slaves)
    w = repl(proc)
    g1 = random.Random(29).randbytes(SIZE)
    w.pwrite(g1, 0)
    with proc.control() as c:
        harden(c, 1)
        w.zero(G + 300, 100)
        w.trim(2 * G, 4 * G)
        w.zero(5000, 8 * G + 17, nbd.CMD_FLAG_NO_HOLE)
        w.flush()
        assert host(proc).pread(SIZE, 0) == g1
        assert c.call("rollback")["rolled_back"] == {"a": 5}
        assert tgt_blocks(c) == {0, 1, 4, 5, 8}
    assert img(proc) == g1


# ------------------------------------------------------------------ configuration

def refused_lines(cmd):
    """Run a secondary that must refuse to start; return its stderr lines."""
    code, lines = refused_start(cmd, timeout=30)
    assert code != 0
    return lines


@pytest.mark.parametrize("damage, says", [
    ("role", "role must be primary or secondary"),
    ("secondary.json", "secondary.json is damaged"),
    ("replication.token", "does not hold 32 hex characters"),
])
def test_bad_secondary_configuration_is_one_line(slaves, damage, says):
    """A bad role=, a damaged state file or token file: one error line."""
    spec = slaves("r1", volumes=[("a", SIZE)], role="secondary", start=False)
    os.makedirs(spec.statedir, mode=0o700, exist_ok=True)
    if damage == "role":
        spec.role = "tertiary"
    else:
        with open(os.path.join(spec.statedir, damage), "w") as f:
            f.write('{"hardened": 2, "prepared": 1}' if damage.endswith("json") else "xyz")
    lines = refused_lines(spec.command())
    assert len(lines) == 1 and lines[0].startswith("cgmirror: error: ") \
        and says in lines[0], lines
