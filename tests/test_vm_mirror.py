"""Loopback VM: the mirror under live ext4 file systems (marker vm).

Two slaves, one 64 MiB volume each, ext4 on both, mounted in the guest and
written by the guest's writers of tests/ext4guest.py (files fsync'd two
of three, each fsync announced on the console with its checksum).  Each
volume mirrors to a secondary; the mirror forms groups 2.5 s apart, in this
process (a read of both remote volumes from the guest-loaded host takes
about a second: it must fit between two commits).

At random moments while the guest writes, the remote host exports are read
as one group (both secondaries at the same hardened group h before and
after the read) into images.  Which files were fsync'd before h's cut: the
SYNCED lines the host had received before the cut's time (the history's
cut time of h; a sampler notes the console's length every 20 ms, and a line
is printed only after its fsync returned).  Each image, after journal
replay, must pass ``e2fsck -f -n`` and hold every one of those files with
its checksum (``check_copy`` of tests/ext4guest.py).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from cgtest import MiB, need
from coordinator import launch, session as session_mod
from coordinator.history import History
from coordinator.link import SlaveLink
from coordinator.mirror import Mirror
from ext4guest import SCRIPT, SYNCED_BEFORE, check_copy, synced, wait_synced
from harness import workload as wl

pytestmark = pytest.mark.vm

VOL_SIZE = 64 * MiB
DEVICES = [("s1", "a", "r1"), ("s2", "b", "r2")]      # guest device i
READS = 3


def session_text() -> str:
    out = ['[session]', 'name = "vmmirror"', 'state_dir = "state"',
           'max_coordination_ms = 2000', 'lease_ms = 10000', 'copy_timeout_ms = 30000',
           '', '[mirror]', 'interval_ms = 2500', 'max_drain_ms = 10000']
    for s, v, r in DEVICES:
        out += ["", "[[slave]]", f'name = "{s}"', f'state_dir = "{s}"',
                f'nbd_socket = "{s}.sock"', f'control = "{s}.ctl"', "threads = 2",
                "", "[[slave.volume]]", f'name = "{v}"', f'path = "{s}-{v}.img"',
                f"size = {VOL_SIZE}", f'secondary = "{r}"']
    for s, v, r in DEVICES:
        out += ["", "[[secondary]]", f'name = "{r}"', f'state_dir = "{r}"',
                f'nbd_socket = "{r}.sock"', f'control = "{r}.ctl"',
                "", "[[secondary.volume]]", f'name = "{v}"', f'path = "{r}-{v}.img"',
                f"size = {VOL_SIZE}"]
    return "\n".join(out) + "\n"


def hardened(sess) -> tuple[int, ...]:
    out = []
    for _, _, r in DEVICES:
        with SlaveLink(r, sess.secondary(r).control) as lk:
            out.append(lk.status()["hardened"])
    return tuple(out)


def test_mirror_of_live_ext4_across_two_slaves(vm_guest, run_dir):
    """Groups read from the remote while the guest writes and fsyncs: each
    is a clean ext4 after journal replay holding every file fsync'd before
    its cut."""
    need("nbdkit", "e2fsck", "debugfs", "dumpe2fs")
    path = os.path.join(run_dir, "m.toml")
    with open(path, "w") as f:
        f.write(session_text())
    sess = session_mod.load(path)
    rng = random.Random()
    procs, mirror, thread = [], None, None
    marks: list[tuple[float, int]] = []
    stop = threading.Event()
    reports = []
    try:
        for spec in [s.spec() for s in sess.slaves] + [r.spec() for r in sess.secondaries]:
            procs.append(launch.start(spec))
        mirror = Mirror(sess, log=print).open()
        thread = threading.Thread(target=mirror.run, name="mirror", daemon=True)
        thread.start()
        exports = [(sess.slave(s).spec().nbd_socket, v) for s, v, _ in DEVICES]
        g = vm_guest(SCRIPT, exports, timeout=120)

        def sample():
            while not stop.is_set():
                marks.append((time.time(), len(g.console)))
                stop.wait(0.02)
        sampler = threading.Thread(target=sample, name="console-sampler", daemon=True)
        sampler.start()
        g.wait_line(r"^READY writing", timeout=60)
        wait_synced(g, 0, SYNCED_BEFORE, timeout=60)
        t_files = time.time()           # groups cut from now hold the file systems
        seen = set()
        deadline = time.monotonic() + 60
        while len(reports) < READS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.5))
            before = hardened(sess)
            if len(set(before)) != 1 or before[0] in seen:
                continue
            h = before[0]
            with History(sess.state_dir) as hist:
                cut = hist.group_cut_time(h)
            if cut is None or cut < t_files:
                continue
            images = []
            for dev, (s, v, r) in enumerate(DEVICES):
                img = os.path.join(run_dir, f"g{h}-{dev}.img")
                d = wl.Device(f"nbd+unix:///{v}?socket={sess.secondary(r).nbd_socket}",
                              "group-reader")
                try:
                    with open(img, "wb") as f:
                        for off in range(0, VOL_SIZE, 4 * MiB):
                            f.write(d.pread(off, 4 * MiB))
                finally:
                    d.close()
                images.append(img)
            if hardened(sess) != before:
                continue                       # a commit came between: again
            idx = max((n for t, n in marks if t < cut), default=0)
            synced_before = synced(g.console[:idx])
            out_dir = os.path.join(run_dir, f"g{h}")
            os.mkdir(out_dir)
            rep = [check_copy(img, dev, synced_before, {}, out_dir)
                   for dev, img in enumerate(images)]
            reports.append((h, rep))
            seen.add(h)
            for img in images:
                os.unlink(img)
        g.wait_sync("stop", timeout=30)
        g.release("stop")
        g.wait()
    finally:
        stop.set()
        if mirror is not None:
            mirror.stop()
            if thread is not None:
                thread.join(60)
            mirror.close()
        for p in procs:
            p.stop(timeout=10)
    print(f"groups read from the remote while the guest wrote: {reports}")
    assert len(reports) >= 2, reports
    assert all(r["fsynced_before"] > 0 for _, rep in reports for r in rep), reports
