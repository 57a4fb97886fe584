"""Loopback VM: ``cgmirror copy`` of live ext4 file systems (marker vm).

Two slaves, one 64 MiB volume each, ext4 on both, mounted in the guest.  The
guest keeps writing files on both, fsyncing two of every three and printing
``SYNCED VOL K GUEST_MS SHA256`` after each fsync.  While it writes, the host
runs ``cgmirror copy --json`` (in process) to qemu-nbd targets (raw images).
The guest never waits for the host while the copy runs: its only rendezvous
(``host_sync stop``) is on the main script, the writers run in the background.

The host knows which files were fsync'd before the establish began: the
SYNCED lines on the console before it called copy (a line is printed only
after its fsync returned).  After the copy, on the host: replay each copy's
journal (``e2fsck -E journal_only``), ``e2fsck -fn`` must be clean, and every
file fsync'd before the establish must be in the copy with its checksum
(read with ``debugfs rdump``).  Files written later may be there or not.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import time

import cgtest
from harness import peers
import pytest
from cgtest import MiB, need
from ext4guest import (DEVICES, LAYOUT, SCRIPT, SYNCED_AFTER, SYNCED_BEFORE, VOL_SIZE,
                       check_copy, synced, wait_synced, writer_lines)


pytestmark = pytest.mark.vm

log = logging.getLogger("test_vm_copy")


def test_copy_of_live_ext4_across_two_slaves(vm_guest, run_dir):
    """ext4 on a volume of each of two slaves, written and fsync'd by the
    guest throughout; ``cgmirror copy`` to qemu-nbd targets: each copy is a
    clean ext4 after journal replay holding every file fsync'd before the
    establish, the guest's writes were held only for the establish, and the
    guest kept writing during the copy."""
    need("nbdkit", "qemu-nbd", "e2fsck", "debugfs", "dumpe2fs")
    t_start = time.monotonic()
    session = cgtest.write_session(run_dir, LAYOUT, name="vmcopy")
    targets: list[peers.Server] = []
    images = []
    try:
        with cgtest.slaves(session) as sess:
            for slave, vol in DEVICES:
                uri = sess.slave(slave).volume(vol).target
                sock = uri.split("socket=", 1)[1]
                img = peers.make_image(sock.removesuffix(".sock") + ".img", VOL_SIZE)
                images.append(img)
                targets.append(peers.qemu_nbd(img, sock, vol))
            exports = [(sess.slave(s).nbd_socket, v) for s, v in DEVICES]
            g = vm_guest(SCRIPT, exports, timeout=50)
            g.wait_line(r"^READY writing", timeout=40)
            wait_synced(g, 0, SYNCED_BEFORE, timeout=30)

            # Everything on the console now was fsync'd before the copy began.
            i0 = len(g.console)
            before = synced(g.console[:i0])
            t0 = time.monotonic()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cgtest.run(session, "copy", "--json")
            t1 = time.monotonic()
            i1 = len(g.console)
            doc = json.loads(out.getvalue())
            assert code == 0 and doc["ok"], doc

            during = synced(g.console[i0:i1])
            finished = writer_lines(g.console[i0:i1])
            last_before = {d: t for d, t in writer_lines(g.console[:i0])}
            # The guest goes on writing after the copy, then stops.
            wait_synced(g, i1, SYNCED_AFTER, timeout=20)
            g.wait_sync("stop", timeout=10)
            g.release("stop")
            res = g.wait()
            later = synced(res.console[i0:])
        for t in targets:
            t.stop()

        est, cp = doc["establish"], doc["copy"]
        for slave, vol in DEVICES:
            c = cp["slaves"][slave][vol]
            assert c["mode"] == "full" and c["state"] == "done", c
        reports = [check_copy(img, dev, before, later, run_dir)
                   for dev, img in enumerate(images)]
    finally:
        for t in targets:
            t.stop()

    held = {s: t["held_ms"] for s, t in est["slaves"].items()}
    per_dev_during = [sum(1 for d, _ in during if d == dev) for dev in (0, 1)]
    files_during = [sum(1 for d, _ in finished if d == dev) for dev in (0, 1)]
    # The longest the guest went without finishing a file while the copy ran
    # (guest clock, 10 ms resolution), per volume, from its last file before.
    gaps = []
    for dev in (0, 1):
        ms = [last_before[dev]] + [t for d, t in finished if d == dev]
        gaps.append(max((b - a for a, b in itertools.pairwise(ms)), default=None))
    summary = (f"copy {t1 - t0:.2f} s (establish {est['total_ms']:.1f} ms, gates held"
               f" {held} ms, max {est['max_held_ms']:.1f} ms; data {cp['seconds']:.2f} s,"
               f" {cp['bytes'] // MiB} MiB); guest fsyncs: {len(before)} before,"
               f" {per_dev_during} per volume while the copy ran,"
               f" files finished while it ran {files_during} (longest gap {gaps} ms),"
               f" {len(later) - len(during)} after; written files"
               f" {res.results.get('written0')}/{res.results.get('written1')};"
               f" copies: {reports}; test {time.monotonic() - t_start:.1f} s"
               f" (guest boot {res.boot:.1f} s)")
    print(summary)
    log.info("%s", summary)
    assert est["max_held_ms"] < 1000, est
    # The guest was not stopped by the copy: it finished files while the copy
    # ran (~0.5 s here, ~10 files/s: typically 3-10 of them).
    assert sum(files_during) >= 1, summary
