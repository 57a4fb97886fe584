"""The packed replication export (nbdplugin/secondary.py, native/copy.c
"Packed"): batches of records, each applied as one replication write; the
native drain sends its runs and sub-block pieces that way to a cgmirror
secondary, and plainly to anyone else."""

import os
import random
import struct

import nbd
import pytest

from cgtest import wait_until
from nbdplugin.copier import packed_uri
from nbdplugin.secondary import parse_packed

from secrig import SIZE, export, harden, img, secondary

G = 64 * 1024
S = 4096


def batch(records):
    """A packed batch of (offset, data or (length, None) for zeros)."""
    out = [struct.pack("<8sII", b"CGMPACK1", len(records), 0)]
    for off, data in records:
        if isinstance(data, tuple):
            out.append(struct.pack("<QII", off, data[0], 1))
        else:
            out += [struct.pack("<QII", off, len(data), 0), data]
    return b"".join(out)


# ------------------------------------------------------------------ pure parts

def test_parse_packed_gives_the_records_in_order():
    """Known answer: a data record and a zero record."""
    recs = parse_packed(batch([(4096, b"ab"), (8192, (512, None))]), 1 << 20)
    assert [(o, n, None if d is None else bytes(d)) for o, n, d in recs] == [
        (4096, 2, b"ab"), (8192, 512, None)]


@pytest.mark.parametrize("damage, says", [
    (lambda b: b"CGMPACK2" + b[8:], "CGMPACK1 header"),
    (lambda b: b[:-1], "inside the data of record 0"),
    (lambda b: b + b"x", "1 bytes after its 1 records"),
    (lambda b: b[:16] + struct.pack("<QII", 1 << 20, 2, 0) + b[32:], "outside the volume"),
    (lambda b: b[:16] + struct.pack("<QII", 0, 2, 4) + b[32:], "flags 4"),
    (lambda b: b[:10], "no batch header"),
])
def test_a_bad_batch_is_refused_whole_in_one_line(damage, says):
    """Nothing of a damaged batch is applied: the parse refuses it first."""
    with pytest.raises(OSError) as e:
        parse_packed(damage(batch([(0, b"ab")])), 1 << 20)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_packed_uri_only_for_a_replication_export():
    """A cgmirror replication export has a packed twin; other URIs none."""
    assert packed_uri("nbd+unix:///repl-ab/a?socket=/r/r1.sock") == \
        "nbd+unix:///repl-ab/a/packed?socket=/r/r1.sock"
    assert packed_uri("nbds://h:10809/repl-ab/v") == "nbds://h:10809/repl-ab/v/packed"
    assert packed_uri("nbd+unix:///a?socket=/r/t.sock") is None
    assert packed_uri("nbd://h/disk") is None


# ------------------------------------------------------------------ a secondary

def packed(proc, vol="a"):
    h = nbd.NBD()
    h.set_handle_name("test-packed")
    h.connect_uri(f"nbd+unix:///{export(proc, vol)}/packed?socket={proc.spec.nbd_socket}")
    return h


def test_a_packed_batch_lands_and_is_undone_like_plain_writes(slaves):
    """Data and zero records land at their offsets, count as replication
    bytes, and save their blocks' old content: a rollback restores it."""
    proc = secondary(slaves)
    rng = random.Random(7)
    base = rng.randbytes(SIZE)
    with proc.control() as c:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{export(proc)}?socket={proc.spec.nbd_socket}")
        h.pwrite(base, 0)
        h.flush()
        harden(c, 1)
        p = packed(proc)
        piece = rng.randbytes(S)
        p.pwrite(batch([(G + S, piece), (5 * G, (2 * S, None))]), 0)
        p.flush()
        want = bytearray(base)
        want[G + S:G + 2 * S] = piece
        want[5 * G:5 * G + 2 * S] = bytes(2 * S)
        assert img(proc) == bytes(want)
        v = c.call("status")["volumes"]["a"]
        assert v["replication_bytes"] == SIZE + 3 * S and v["undo_blocks"] == 2
        c.call("rollback")
        assert img(proc) == base


def test_the_packed_export_takes_nothing_but_batches_at_zero(slaves):
    """A batch at another offset, a read or a damaged batch is refused, and
    nothing of it lands."""
    proc = secondary(slaves)
    p = packed(proc)
    with pytest.raises(nbd.Error):
        p.pwrite(batch([(0, b"\x01" * S)]), 4096)
    with pytest.raises(nbd.Error):
        p.pread(S, 0)
    with pytest.raises(nbd.Error):
        p.pwrite(batch([(0, b"\x01" * S)])[:-1], 0)
    assert img(proc) == bytes(SIZE)


# ------------------------------------------------------------------ a drain

@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_drain_of_pieces_lands_the_same_image_packed_or_not(slaves, mode):
    """A full copy, then an incremental one of scattered 4 KiB writes: the
    secondary ends equal to the primary, sent the pieces' bytes, and went
    through the packed export unless told not to."""
    sec = secondary(slaves)
    prim = slaves("p1", volumes=[("a", SIZE)], env={"CGMIRROR_PACKED": mode,
                                                     "CGMIRROR_COPY_ENGINE": "native"})
    uri = f"nbd+unix:///{export(sec)}?socket={sec.spec.nbd_socket}"
    rng = random.Random(11)
    h = nbd.NBD()
    h.connect_uri(prim.spec.uri("a"))
    h.pwrite(rng.randbytes(SIZE), 0)
    with prim.control() as c, sec.control() as s:
        def group(n, full):
            c.call("freeze", n=n, lease_ms=5000, **({"full": ["a"]} if full else {}))
            c.call("thaw", n=n)
            c.call("copy", n=n, targets={"a": uri})
            wait_until(lambda: c.call("status")["phase"] == "idle", 30, "the copy to end")
            last = c.call("status")["last_copy"]
            assert last["ok"], last
            harden(s, n)
            return last["volumes"]["a"]
        group(1, True)
        before = s.call("status")["volumes"]["a"]["replication_bytes"]
        offsets = sorted(rng.sample(range(SIZE // S), 40))
        for off in offsets:
            h.pwrite(rng.randbytes(S), off * S)
        h.pwrite(bytes(S), offsets[0] * S)            # a zero piece among them
        h.flush()
        v = group(2, False)
        assert v["packed"] == (mode == "on")
        sent = s.call("status")["volumes"]["a"]["replication_bytes"] - before
        assert sent == v["sent_bytes"] == 40 * S
    with open(dict((n, p) for n, p, _ in prim.spec.volumes)["a"], "rb") as f:
        assert img(sec) == f.read()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_pieces_overwritten_after_the_cut_go_as_they_were_at_the_cut(slaves, mode):
    """Pieces rewritten between the cut and the drain reach the secondary
    with their content at the cut (read from the PiT's saved block), and
    the rewrite goes with the next group."""
    sec = secondary(slaves)
    prim = slaves("p1", volumes=[("a", SIZE)], env={"CGMIRROR_PACKED": mode,
                                                     "CGMIRROR_COPY_ENGINE": "native"})
    uri = f"nbd+unix:///{export(sec)}?socket={sec.spec.nbd_socket}"
    rng = random.Random(13)
    image = bytearray(rng.randbytes(SIZE))
    h = nbd.NBD()
    h.connect_uri(prim.spec.uri("a"))
    h.pwrite(bytes(image), 0)
    with prim.control() as c, sec.control() as s:
        def cut(n, full=False):
            c.call("freeze", n=n, lease_ms=5000, **({"full": ["a"]} if full else {}))
            c.call("thaw", n=n)

        def drain(n):
            c.call("copy", n=n, targets={"a": uri})
            wait_until(lambda: c.call("status")["phase"] == "idle", 30, "the copy to end")
            assert c.call("status")["last_copy"]["ok"]
            harden(s, n)
        cut(1, full=True)
        drain(1)
        pieces = [3 * G + S, 3 * G + 9 * S, 7 * G]
        for off in pieces:
            data = rng.randbytes(S)
            h.pwrite(data, off)
            image[off:off + S] = data
        at_cut = bytes(image)
        cut(2)
        for off in pieces:                       # after the cut: preserved first
            data = rng.randbytes(S)
            h.pwrite(data, off)
            image[off:off + S] = data
        drain(2)
        assert img(sec) == at_cut
        cut(3)
        drain(3)
        assert img(sec) == bytes(image)
