"""The copier against real slaves and real targets: memory stays flat over
many copies, a target that dies mid-copy is the target's fault, and the copy
reads only through its source object."""

from __future__ import annotations

import os
import signal
import time

import nbd
import psutil
import pytest

from cgtest import MiB, closing_all, need, write
from coordinator import group
from harness import peers, sites
from coordinator.errors import CopyFailed, ExitCode
from coordinator.link import SlaveLink
from native.bitmap import Bitmap
from nbdplugin.copier import Copy

G = 64 * 1024


@pytest.fixture
def link_to(slaves):
    with closing_all(lambda proc: SlaveLink.from_spec(proc.spec)) as make:
        yield make


def test_rss_is_flat_over_100_copies(slaves, run_dir, link_to):
    """python3-libnbd keeps every buffer given to aio_pwrite: 100 full copies
    must not grow the slave by more than a few MiB after warm-up."""
    # 8 runs of 1 MiB per copy: every pooled buffer is in use from the
    # first copy on, so what follows warm-up is growth, not first touches.
    proc = slaves("s1", volumes=[("a", 8 * MiB)])
    write(proc.spec.uri("a"), 0, os.urandom(8 * MiB))
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    lk = link_to(proc)
    slave = psutil.Process(proc.pid)
    try:
        rss = []
        for n in range(1, 101):
            group.establish([lk], n, 5000, 2000, full={"s1": ["a"]})
            rep = group.copy([lk], n, {"s1": {"a": tgt.uri}}, "full", poll_s=0.005)
            assert rep.slaves["s1"]["a"].bytes == 8 * MiB
            rss.append(slave.memory_info().rss)
        # The bug grew the slave ~8 MiB per copy, i.e. ~400 MiB over these 50;
        # a buffer kept by malloc after a copy stepped it up 8 MiB once.
        grown = (rss[-1] - rss[49]) / MiB
        assert grown < 4, f"slave RSS grew {grown:.1f} MiB over the last 50 copies"
    finally:
        tgt.stop()


def test_target_killed_mid_copy_is_a_target_fault(slaves, run_dir, link_to):
    """A target killed while the copy writes to it: fault "target", exit code
    7, the message names the target -- every time (5 tries)."""
    need("nbdkit")
    proc = slaves("s1", volumes=[("a", 8 * MiB)])
    write(proc.spec.uri("a"), 0, os.urandom(8 * MiB))
    lk = link_to(proc)
    image = peers.make_image(os.path.join(run_dir, "t.img"), 8 * MiB)
    for n in range(1, 6):
        # Slow writes (0.3 s each), so the kill lands mid-copy whatever the
        # load on the machine; one connection (no multi-conn), so several
        # writes are in flight on the handle that dies.
        tgt = peers.nbdkit_file(image, os.path.join(run_dir, "t.sock"),
                                filters=("multi-conn", "delay"),
                                args=("multi-conn-mode=disable", "wdelay=300ms"))
        try:
            def kill_when_started(progress):
                if progress["done_bytes"] > 0 and tgt.proc.poll() is None:
                    tgt.proc.kill()
            group.establish([lk], n, 5000, 2000, full={"s1": ["a"]})
            with pytest.raises(CopyFailed) as ei:
                group.copy([lk], n, {"s1": {"a": tgt.uri}}, "full", kill_when_started,
                           timeout_ms=5000, inflight=2)
            e = ei.value
            assert tgt.proc.poll() is not None, "the copy ended before the kill"
            assert (e.fault, e.exit_code) == ("target", ExitCode.TARGET), str(e)
            assert f"target {tgt.uri}" in str(e)
            assert lk.status()["volumes"]["a"]["copy"]["fault"] == "target"
        finally:
            tgt.stop()


class ListSource:
    """A source that is not a PiT: blocks from a dict, everything it is told
    recorded.  The copier must need nothing else."""

    def __init__(self, blocks: dict[int, bytes], nblocks: int, g: int = G):
        self.name, self.size, self.granularity = "mem", nblocks * g, g
        self.data, self.broken = blocks, None
        self.confirmed: set[int] = set()
        self.flushed_blocks: set[int] = set()
        self._bm = Bitmap(nblocks)
        for b in blocks:
            self._bm.set(b, 1)

    def blocks(self) -> Bitmap:
        return self._bm.copy()

    def changed(self) -> Bitmap:
        return self._bm.copy()

    def read(self, buf, block: int) -> None:
        g = self.granularity
        for i in range(0, len(buf), g):
            buf[i:i + g] = self.data[block + i // g]

    def confirm(self, start: int, count: int) -> None:
        self.confirmed |= set(range(start, start + count))

    def flushed(self, start: int, count: int) -> None:
        assert set(range(start, start + count)) <= self.confirmed, "flushed before acked"
        self.flushed_blocks |= set(range(start, start + count))


def test_copy_reads_through_its_source(run_dir):
    """Copy sends exactly the source's blocks, confirms each once acked and
    reports each flushed, using only the source interface."""
    need("nbdkit")
    src = ListSource({b: bytes([b + 1]) * G for b in (0, 1, 2, 7, 30, 31)}, 32)
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=2M")
    try:
        c = Copy(src, tgt.uri, inflight=4, timeout=10)
        c.run()
        assert (c.state, c.error) == ("done", None)
        assert src.confirmed == src.flushed_blocks == set(src.data)
        h = nbd.NBD()
        h.connect_uri(tgt.uri)
        try:
            for b in range(32):
                assert h.pread(G, b * G) == src.data.get(b, bytes(G)), f"block {b}"
        finally:
            h.shutdown()
    finally:
        tgt.stop()



def test_requests_do_not_leave_buffer_objects_behind(run_dir):
    """python3-libnbd keeps whatever nbd.Buffer a request was given (~300
    bytes each): 20,000 small writes (and their baseline samples) must reuse
    the same ones, not leave one per request."""
    need("nbdkit")
    g = 4096
    src = ListSource({b: bytes([b % 251 + 1]) * g for b in range(0, 4096, 2)}, 4096, g)
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=16M")
    me = psutil.Process()
    try:
        c = Copy(src, tgt.uri, timeout=10)
        c.run()
        before = me.memory_info().rss
        for _ in range(10):      # 10 copies of 2048 runs, each checked and sampled
            c = Copy(src, tgt.uri, timeout=10, baseline=c.baseline)
            c.run()
            assert (c.state, c.error) == ("done", None)
        grown = (me.memory_info().rss - before) / MiB
        assert grown < 2, f"RSS grew {grown:.1f} MiB over 20,000 requests"
    finally:
        tgt.stop()


# ------------------------------------------------------------ silent target
#
# A target that stops answering mid-copy (SIGSTOP: the socket stays open, no
# RST, no reply -- what a dropped link between sites looks like) must end the
# copy within its timeout.  libnbd's shutdown() waits without limit for the
# server to close the connection, so the copy stayed "copying" for ever.

class StoppingSource(ListSource):
    """Stops the target (SIGSTOP) when the copy reads block ``at``."""

    def __init__(self, pid: int, at: int, *args):
        super().__init__(*args)
        self.pid, self.at = pid, at

    def read(self, buf, block: int) -> None:
        if block == self.at:
            sites.pause(self.pid)
        super().read(buf, block)


def test_python_copy_to_a_silent_target_ends_within_its_timeout(run_dir):
    need("nbdkit")
    import threading
    src_blocks = {b: bytes([b + 1]) * G for b in range(64)}
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    try:
        src = StoppingSource(tgt.pid, 32, src_blocks, 128)
        c = Copy(src, tgt.uri, inflight=2, timeout=2, streams=1)
        t = threading.Thread(target=c.run, daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(10)
        took = time.monotonic() - t0
        assert not t.is_alive(), f"copy to a silent target still running after {took:.0f} s"
        assert c.state == "failed" and c.fault == "target", (c.state, c.error)
        assert "did not answer" in c.error, c.error
        assert took < 6, f"took {took:.1f} s for a 2 s timeout"
    finally:
        os.kill(tgt.pid, signal.SIGCONT)
        tgt.stop()


def test_slave_drain_to_a_silent_target_ends_within_its_timeout(slaves, run_dir, link_to):
    """The node itself ends a drain whose target went silent (no abort from
    a coordinator needed): phase back to idle, cut failed with fault target,
    within the copy timeout plus a few seconds; then it may change role."""
    need("nbdkit")
    proc = slaves("s1", volumes=[("a", 8 * MiB)])
    write(proc.spec.uri("a"), 0, os.urandom(8 * MiB))
    lk = link_to(proc)
    image = peers.make_image(os.path.join(run_dir, "t.img"), 8 * MiB)
    # Slow writes, so the stop lands mid-copy whatever the load.
    tgt = peers.nbdkit_file(image, os.path.join(run_dir, "t.sock"),
                            filters=("delay",), args=("wdelay=200ms",))
    try:
        group.establish([lk], 1, 5000, 2000, full={"s1": ["a"]})
        lk.call("copy", n=1, targets={"a": tgt.uri}, mode="full", timeout_ms=2000,
                inflight=2)
        deadline = time.monotonic() + 10
        while lk.status()["volumes"]["a"]["copy"]["done_bytes"] == 0:
            assert time.monotonic() < deadline, "copy never started"
            time.sleep(0.02)
        sites.pause(tgt.pid)
        t0 = time.monotonic()
        while lk.status()["phase"] != "idle":
            took = time.monotonic() - t0
            assert took < 12, (f"drain to a silent target still"
                               f" {lk.status()['phase']} after {took:.0f} s")
            time.sleep(0.1)
        assert lk.status()["volumes"]["a"]["copy"]["fault"] == "target"
    finally:
        os.kill(tgt.pid, signal.SIGCONT)
        tgt.stop()


# The copy inside site a (its client must run in a namespace): reads
# commands from the test on stdin, "mid" on stdout when it reaches block 32
# (and waits for "go": the test cuts the link first), then the outcome.
SILENT_LINK_COPY = r'''
import sys, time
from native.bitmap import Bitmap
from nbdplugin.copier import Copy
G = 64 * 1024

class Source:
    name, granularity, broken = "mem", G, None
    def __init__(self, n):
        self.size, self._bm = n * G, Bitmap(n)
        for b in range(n):
            self._bm.set(b, 1)
    def blocks(self): return self._bm.copy()
    def changed(self): return self._bm.copy()
    def read(self, buf, block):
        if block == 32:
            print("mid", flush=True)
            sys.stdin.readline()
        for i in range(0, len(buf), G):
            buf[i:i + G] = bytes([(block + i // G) % 251 + 1]) * G
    def confirm(self, start, count): pass
    def flushed(self, start, count): pass

c = Copy(Source(128), sys.argv[1], inflight=2, timeout=float(sys.argv[2]), streams=1)
t0 = time.monotonic()
c.run()
print(c.state, c.fault, round(time.monotonic() - c.started, 1), "|", c.error, flush=True)
'''


def test_copy_across_a_cut_link_ends_within_its_timeout(sites):
    """A real silent link: the target in site r, the copy in site a, the
    link cut (nftables drop: no RST) in the middle of the copy.  The copy
    fails with fault target within its timeout (2 s) plus a little."""
    need("nbdkit")
    import select
    import subprocess
    import sys
    a, r = sites["a"], sites["r"]
    srv = r.popen(["nbdkit", "-f", "--exit-with-parent", "-p", "0", "-i", r.addr,
                   "memory", "16M"])
    uri = f"nbd://{r.addr}:{r.wait_port(srv)}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = a.popen([sys.executable, "-c", SILENT_LINK_COPY, uri, "2"], cwd=root,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline().strip() == "mid"
        sites.cut("a", "r")
        t0 = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        ready, _, _ = select.select([child.stdout], [], [], 15)
        took = time.monotonic() - t0
        assert ready, f"copy across a cut link still running after {took:.0f} s"
        state, fault, _, *rest = child.stdout.readline().split()
        assert (state, fault) == ("failed", "target"), rest
        assert took < 8, f"took {took:.1f} s for a 2 s timeout"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
