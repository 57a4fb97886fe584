"""A point-in-time copy lands intact on every kind of NBD target.

One slave, one volume of random data (with zero stretches), no writer while
it is copied, so the PiT equals the source.  Each target starts out filled
with a pattern so that a block the copy skipped would show.  A full copy,
then a few scattered writes and an incremental copy; after each, what the
target serves (read back over NBD) equals the source.
"""

from __future__ import annotations

import os
import random

import nbd
import pytest

from coordinator import peers
from conftest import need
from coordinator import group
from coordinator.link import SlaveLink

SIZE = 8 << 20
G = 64 * 1024
KINDS = ["nbdkit-file", "qemu-nbd", "nbd-server", "cgmirror-slave"]
BINARIES = {"nbdkit-file": "nbdkit", "qemu-nbd": "qemu-nbd", "nbd-server": "nbd-server",
            "cgmirror-slave": "nbdkit"}


def _fill(uri: str, rng: random.Random) -> None:
    """Random data, with every fourth MiB left zero (a zero run must be
    copied as zeros, not skipped)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for off in range(0, SIZE, 1 << 20):
            if (off >> 20) % 4 != 3:
                h.pwrite(rng.randbytes(1 << 20), off)
        h.flush()
    finally:
        h.shutdown()


def _scribble(uri: str, rng: random.Random, count: int = 12) -> set[int]:
    """Unaligned writes of various sizes; return the blocks touched."""
    h = nbd.NBD()
    h.connect_uri(uri)
    touched = set()
    try:
        for _ in range(count):
            off = rng.randrange(SIZE - 300_000)
            n = rng.randrange(1, 300_000)
            h.pwrite(rng.randbytes(n), off)
            touched |= set(range(off // G, (off + n - 1) // G + 1))
    finally:
        h.shutdown()
    return touched


def _assert_same(source_path: str, target_uri: str) -> None:
    h = nbd.NBD()
    h.connect_uri(target_uri)
    try:
        assert h.get_size() >= SIZE
        with open(source_path, "rb") as f:
            for off in range(0, SIZE, 1 << 20):
                want = f.read(1 << 20)
                got = h.pread(len(want), off)
                if got != want:
                    bad = next(i for i in range(len(want)) if got[i] != want[i])
                    pytest.fail(f"target {target_uri} differs from the source at"
                                f" offset {off + bad}")
    finally:
        h.shutdown()


@pytest.fixture
def target(run_dir, slaves):
    """Factory: ``target(kind) -> URI`` of a fresh target of SIZE bytes,
    pre-filled with a pattern; every server is stopped at the end."""
    servers = []

    def make(kind: str) -> str:
        need(BINARIES[kind])
        d = os.path.join(run_dir, "remote")
        os.makedirs(d, exist_ok=True)
        if kind == "cgmirror-slave":
            proc = slaves("t1", volumes=[("a", SIZE)])
            uri = proc.spec.uri("a")
            h = nbd.NBD()
            h.connect_uri(uri)
            for off in range(0, SIZE, 1 << 20):
                h.pwrite(b"\xa5" * (1 << 20), off)
            h.shutdown()
            return uri
        img = os.path.join(d, "target.img")
        with open(img, "wb") as f:
            f.write(b"\xa5" * SIZE)
        if kind == "nbdkit-file":
            srv = peers.nbdkit_file(img, os.path.join(d, "nbdkit.sock"))
        elif kind == "qemu-nbd":
            srv = peers.qemu_nbd(img, os.path.join(d, "qemu.sock"))
        else:
            srv = peers.nbd_server(img, d)
        servers.append(srv)
        return srv.uri

    try:
        yield make
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_pit_copies_to_target(kind, slaves, target, run_dir):
    """Full, then incremental: the target serves exactly the source."""
    rng = random.Random(KINDS.index(kind))
    proc = slaves("s1", volumes=[("a", SIZE)])
    source = os.path.join(run_dir, "s1-a.img")
    _fill(proc.spec.uri("a"), rng)
    uri = target(kind)
    link = SlaveLink.from_spec(proc.spec)
    try:
        n = group.next_n(group.preflight([link]))
        group.establish([link], n, lease_ms=5000, max_coordination_ms=1000,
                        full={"s1": ["a"]})
        rep = group.copy([link], n, {"s1": {"a": uri}}, "full")
        assert rep.slaves["s1"]["a"].bytes == SIZE
        _assert_same(source, uri)

        touched = _scribble(proc.spec.uri("a"), rng)
        group.establish([link], n + 1, lease_ms=5000, max_coordination_ms=1000)
        rep = group.copy([link], n + 1, {"s1": {"a": uri}})
        vc = rep.slaves["s1"]["a"]
        assert vc.mode == "incremental"
        assert vc.bytes == len(touched) * G
        _assert_same(source, uri)
    finally:
        link.close()
