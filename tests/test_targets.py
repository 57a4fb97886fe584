"""A point-in-time copy lands intact on every kind of NBD target.

One slave, one volume of random data (with zero stretches), no writer while
it is copied, so the PiT equals the source.  Each target starts out filled
with a pattern so that a block the copy skipped would show.  A full copy,
then a few scattered writes and an incremental copy; after each, what the
target serves (read back over NBD) equals the source.

An incremental copy goes only to the image that holds its baseline: a
target replaced by a blank image, reformatted, or written at a block sampled
at the last copy is refused with a line naming ``--full``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import nbd
import pytest

from harness import peers
from cgtest import need
from coordinator import group
from coordinator.errors import CopyFailed, ExitCode
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


def _serve(kind: str, img: str, d: str) -> peers.Server:
    if kind == "nbdkit-file":
        return peers.nbdkit_file(img, os.path.join(d, "nbdkit.sock"))
    if kind == "qemu-nbd":
        return peers.qemu_nbd(img, os.path.join(d, "qemu.sock"))
    return peers.nbd_server(img, d)


@pytest.fixture
def target(run_dir, slaves):
    """Factory: ``target(kind) -> URI`` of a fresh target of SIZE bytes,
    pre-filled with a pattern; every server is stopped at the end.
    ``target.restart(uri, change)`` stops the server of ``uri``, calls
    ``change(image_path)`` and serves the image again at the same URI."""
    servers: dict[str, tuple[str, str, peers.Server]] = {}

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
        srv = _serve(kind, img, d)
        servers[srv.uri] = (kind, img, srv)
        return srv.uri

    def restart(uri: str, change) -> None:
        kind, img, srv = servers.pop(uri)
        srv.stop()
        change(img)
        srv = _serve(kind, img, os.path.dirname(img))
        assert srv.uri == uri
        servers[uri] = (kind, img, srv)

    make.restart = restart
    try:
        yield make
    finally:
        for _, _, s in servers.values():
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


# ------------------------------------------------------------------ baseline

THIRD_PARTY = ["nbdkit-file", "qemu-nbd", "nbd-server"]


def _blank(img: str) -> None:
    """A new, empty image of the same size in place of the old one."""
    os.unlink(img)
    peers.make_image(img, SIZE)


def _mkfs(img: str) -> None:
    need("mkfs.ext4")
    subprocess.run(["mkfs.ext4", "-F", "-q", img], check=True, capture_output=True)


def _overwrite_a_sample(statedir: str, avoid: set[int] = frozenset(), changed=False):
    """Change one of the blocks the slave sampled at the last copy (as a
    foreign writer that happened to hit it would): one the source has not
    changed since (not in ``avoid``), or with ``changed`` one it has."""
    with open(os.path.join(statedir, "slave.json")) as f:
        samples = [b for b, _ in json.load(f)["synced"]["a"]["samples"]
                   if (b in avoid) == changed]

    def change(img: str) -> None:
        block = samples[len(samples) // 2]
        with open(img, "r+b") as f:
            f.seek(block * G + 100)
            f.write(b"foreign")
    return change


def _copy(link, n: int, uri: str, mode: str = "auto"):
    """What `cgmirror copy` does: decide full/incremental from the slave's
    status, establish, copy."""
    full = group.full_volumes(group.preflight([link]), {"s1": {"a": uri}}, mode)
    group.establish([link], n, lease_ms=5000, max_coordination_ms=1000, full=full)
    return group.copy([link], n, {"s1": {"a": uri}}, mode)


@pytest.mark.parametrize("change", ["blank", "mkfs", "sampled-block"])
@pytest.mark.parametrize("kind", THIRD_PARTY)
def test_incremental_refused_when_target_no_longer_holds_baseline(
        kind, change, slaves, target, run_dir):
    """A target replaced, reformatted or written at a sampled block at the
    same URI: the incremental copy is refused (target fault, one line naming
    --full), nothing is lost, and a full copy then makes it right."""
    rng = random.Random(7)
    proc = slaves("s1", volumes=[("a", SIZE)])
    source = os.path.join(run_dir, "s1-a.img")
    _fill(proc.spec.uri("a"), rng)
    uri = target(kind)
    link = SlaveLink.from_spec(proc.spec)
    try:
        assert _copy(link, 1, uri).slaves["s1"]["a"].mode == "full"
        touched = _scribble(proc.spec.uri("a"), rng)
        target.restart(uri, {"blank": _blank, "mkfs": _mkfs,
                             "sampled-block": _overwrite_a_sample(proc.spec.statedir,
                                                                  touched)}[change])
        with pytest.raises(CopyFailed) as ei:
            _copy(link, 2, uri)
        e = ei.value
        assert (e.fault, e.exit_code) == ("target", ExitCode.TARGET)
        msg = str(e)
        assert "\n" not in msg
        assert f"target {uri} no longer holds the baseline of a" in msg
        assert "cgmirror copy --full" in msg
        # Refused again, not forgotten: the record still names the target.
        assert link.status()["volumes"]["a"]["synced_target"] == uri
        with pytest.raises(CopyFailed, match="--full"):
            _copy(link, 3, uri)
        rep = _copy(link, 4, uri, "full")
        assert rep.slaves["s1"]["a"].mode == "full"
        _assert_same(source, uri)
    finally:
        link.close()


def test_a_foreign_write_to_a_changed_sampled_block_is_not_a_refusal(slaves, target,
                                                                    run_dir):
    """A sampled block the source has changed since is sent again whatever
    the target holds there (a copy interrupted by a crash leaves such blocks):
    the incremental copy goes on and the target ends equal to the source."""
    rng = random.Random(9)
    proc = slaves("s1", volumes=[("a", SIZE)])
    _fill(proc.spec.uri("a"), rng)
    uri = target("nbdkit-file")
    link = SlaveLink.from_spec(proc.spec)
    try:
        _copy(link, 1, uri)
        touched = _scribble(proc.spec.uri("a"), rng)
        # The slave restarts, as after the crash this stands for: the
        # changed blocks are whole again (sub-blocks live in memory only).
        link.close()
        proc.stop(timeout=10)
        proc = slaves.restart(proc.spec)
        link = SlaveLink.from_spec(proc.spec)
        target.restart(uri, _overwrite_a_sample(proc.spec.statedir, touched, changed=True))
        assert _copy(link, 2, uri).slaves["s1"]["a"].mode == "incremental"
        _assert_same(os.path.join(run_dir, "s1-a.img"), uri)
    finally:
        link.close()


@pytest.mark.parametrize("kind", THIRD_PARTY)
def test_incremental_goes_on_when_target_untouched(kind, slaves, target, run_dir):
    """The same image served again (server restarted): incremental, correct."""
    rng = random.Random(8)
    proc = slaves("s1", volumes=[("a", SIZE)])
    source = os.path.join(run_dir, "s1-a.img")
    _fill(proc.spec.uri("a"), rng)
    uri = target(kind)
    link = SlaveLink.from_spec(proc.spec)
    try:
        _copy(link, 1, uri)
        target.restart(uri, lambda img: None)
        for n in (2, 3):
            touched = _scribble(proc.spec.uri("a"), rng)
            vc = _copy(link, n, uri).slaves["s1"]["a"]
            assert (vc.mode, vc.bytes) == ("incremental", len(touched) * G)
            _assert_same(source, uri)
    finally:
        link.close()


def test_failed_incremental_keeps_the_other_samples(slaves, run_dir):
    """An incremental copy whose target dies midway does not make the next
    one refuse: samples in blocks it was writing are dropped, the others
    still hold, and the retry completes the target."""
    need("nbdkit")
    rng = random.Random(9)
    proc = slaves("s1", volumes=[("a", SIZE)])
    source = os.path.join(run_dir, "s1-a.img")
    _fill(proc.spec.uri("a"), rng)
    img = peers.make_image(os.path.join(run_dir, "t.img"), SIZE)
    sock = os.path.join(run_dir, "t.sock")
    tgt = peers.nbdkit_file(img, sock)
    link = SlaveLink.from_spec(proc.spec)
    try:
        _copy(link, 1, tgt.uri)
        with open(os.path.join(proc.spec.statedir, "slave.json")) as f:
            sampled = [b for b, _ in json.load(f)["synced"]["a"]["samples"]]
        # Change every sampled block, so the failed copy was writing them all.
        h = nbd.NBD()
        h.connect_uri(proc.spec.uri("a"))
        for b in sampled:
            h.pwrite(rng.randbytes(G), b * G)
        h.shutdown()
        tgt.stop()
        # Slow writes, so the kill lands after the check and mid-copy.
        tgt = peers.nbdkit_file(img, sock, filters=("delay",), args=("wdelay=300ms",))

        def kill_when_started(progress):
            if progress["done_bytes"] > 0 and tgt.proc.poll() is None:
                tgt.proc.kill()
        group.establish([link], 2, lease_ms=5000, max_coordination_ms=1000)
        # The target killed mid-copy: libnbd says so as EOF, a closed or dead
        # handle, or (when the kill lands mid-send) a connection reset.
        with pytest.raises(CopyFailed, match="not connected|closed|dead|reset by peer"):
            group.copy([link], 2, {"s1": {"a": tgt.uri}}, progress_cb=kill_when_started,
                       inflight=2)
        tgt.stop()
        tgt = peers.nbdkit_file(img, sock)
        vc = _copy(link, 3, tgt.uri).slaves["s1"]["a"]
        assert vc.mode == "incremental"
        _assert_same(source, tgt.uri)
    finally:
        link.close()
        tgt.stop()
