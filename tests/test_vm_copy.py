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
import hashlib
import io
import itertools
import json
import logging
import os
import re
import subprocess
import time

import cgtest
from harness import peers
import pytest
from cgtest import MiB
from conftest import need


pytestmark = pytest.mark.vm

log = logging.getLogger("test_vm_copy")

VOL_SIZE = 64 * MiB
LAYOUT = {"s1": {"a": VOL_SIZE}, "s2": {"b": VOL_SIZE}}
# guest device i <- (slave, volume)
DEVICES = [("s1", "a"), ("s2", "b")]
SYNCED = re.compile(r"^SYNCED (\d) (\d+) (\d+) ([0-9a-f]{64})$")
# Every file the writers finish: SYNCED or WROTE (not fsync'd), with guest ms.
WRITER_LINE = re.compile(r"^(?:SYNCED|WROTE) (\d) (\d+) (\d+)\b")
# Before the copy, wait for this many fsync'd files on each volume.
SYNCED_BEFORE = 6
# After the copy, wait for this many more on each (the guest keeps going).
SYNCED_AFTER = 3

# One writer per volume, in the background.  Files f0, f1, ... of 16-64 KiB
# of random data; k % 3 != 2 is written with conv=fsync and announced with
# its checksum (SYNCED), k % 3 == 2 is not fsync'd (WROTE) and is deleted 6
# files later (only files never fsync'd are deleted).  Stops when /tmp/stop
# exists.
WRITER = r"""
writer() {
	i=$1; k=0
	while [ ! -e /tmp/stop ]; do
		f=/mnt/$i/w/f$k
		n=$(( (k % 4) + 1 ))
		if [ $((k % 3)) -ne 2 ]; then
			dd if=/dev/urandom of=$f bs=16384 count=$n conv=fsync 2>/dev/null
			echo "SYNCED $i $k $(now_ms) $(sha256sum $f | cut -c1-64)"
		else
			dd if=/dev/urandom of=$f bs=16384 count=$n 2>/dev/null
			echo "WROTE $i $k $(now_ms)"
			if [ $k -ge 6 ]; then rm -f /mnt/$i/w/f$((k - 6)); fi
		fi
		k=$((k + 1))
	done
	result written$i $k
}
"""


def _mkfs_mount(i: int) -> str:
    # Inode tables and journal written at mkfs: no ext4lazyinit afterwards.
    return (f"mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd{i}\n"
            f"mkdir -p /mnt/{i}\n"
            f"mount -t ext4 /dev/nbd{i} /mnt/{i}\n"
            f"mkdir /mnt/{i}/w\n")


SCRIPT = (
    _mkfs_mount(0) + _mkfs_mount(1) + "sync\n"
    + WRITER
    + "writer 0 & p0=$!\n"
    + "writer 1 & p1=$!\n"
    + "ready writing\n"
    + "host_sync stop >/dev/null\n"
    + "touch /tmp/stop\n"
    + "wait $p0; wait $p1\n"
    + "umount /mnt/0; umount /mnt/1\n"
)


def _synced(lines: list[str]) -> dict[tuple[int, int], str]:
    """{(device, k): sha256} of the SYNCED lines among ``lines``."""
    out = {}
    for line in lines:
        m = SYNCED.match(line)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = m.group(4)
    return out


def _writer_lines(lines: list[str]) -> list[tuple[int, int]]:
    """[(device, guest ms)] of every file the writers finished, in order."""
    out = []
    for line in lines:
        m = WRITER_LINE.match(line)
        if m:
            out.append((int(m.group(1)), int(m.group(3))))
    return out


def _wait_synced(g, start: int, count: int, timeout: float) -> None:
    """Wait until the console has ``count`` SYNCED lines per device after
    line index ``start``."""
    deadline = time.monotonic() + timeout
    while True:
        per = [0, 0]
        for dev, _k in _synced(g.console[start:]):
            per[dev] += 1
        if min(per) >= count:
            return
        if not g.running:
            g.wait()          # raises the guest's failure
            raise AssertionError("guest ended while writing")
        if time.monotonic() > deadline:
            raise AssertionError(f"only {per} fsync'd files after {timeout} s")
        time.sleep(0.05)


def _sh(argv: list[str], ok=(0,)) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode in ok, (f"{' '.join(argv[:3])}... exit {p.returncode}:\n"
                                f"{p.stdout}{p.stderr}")
    return p


def _check_copy(image: str, dev: int, before: dict, later: dict, out_dir: str) -> dict:
    """Replay the journal of the copy on ``image``, fsck it, check files."""
    hdr = _sh(["dumpe2fs", "-h", image]).stdout
    # A copy of a mounted ext4 must have a journal to replay.
    assert "needs_recovery" in hdr, f"nbd{dev}: the copy is not of a mounted ext4?"
    # 0: nothing to do, 1: journal replayed (file system changed).
    _sh(["e2fsck", "-E", "journal_only", "-y", image], ok=(0, 1))
    assert "needs_recovery" not in _sh(["dumpe2fs", "-h", image]).stdout
    # Exit 0.  (It still notes the superblock's free block/inode counts,
    # which ext4 updates only at unmount: not an error.)
    _sh(["e2fsck", "-f", "-n", image])
    dump = os.path.join(out_dir, f"dev{dev}")
    os.mkdir(dump)
    _sh(["debugfs", "-R", f"rdump /w {dump}", image])
    files = {}
    for name in os.listdir(os.path.join(dump, "w")):
        with open(os.path.join(dump, "w", name), "rb") as f:
            files[int(name[1:])] = hashlib.sha256(f.read()).hexdigest()
    mine = {k: sha for (d, k), sha in before.items() if d == dev}
    missing = sorted(k for k in mine if k not in files)
    wrong = sorted(k for k, sha in mine.items() if k in files and files[k] != sha)
    assert not missing, f"nbd{dev}: files fsync'd before the establish missing: {missing}"
    assert not wrong, f"nbd{dev}: files fsync'd before the establish differ: {wrong}"
    # Files fsync'd after the establish began: may be there, in any state.
    late = {k: sha for (d, k), sha in later.items() if d == dev and k not in mine}
    return {"files": len(files),
            "fsynced_before": len(mine),
            "fsynced_later_present": sum(1 for k in late if k in files),
            "fsynced_later_complete": sum(1 for k, s in late.items() if files.get(k) == s)}


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
            _wait_synced(g, 0, SYNCED_BEFORE, timeout=30)

            # Everything on the console now was fsync'd before the copy began.
            i0 = len(g.console)
            before = _synced(g.console[:i0])
            t0 = time.monotonic()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cgtest.run(session, "copy", "--json")
            t1 = time.monotonic()
            i1 = len(g.console)
            doc = json.loads(out.getvalue())
            assert code == 0 and doc["ok"], doc

            during = _synced(g.console[i0:i1])
            finished = _writer_lines(g.console[i0:i1])
            last_before = {d: t for d, t in _writer_lines(g.console[:i0])}
            # The guest goes on writing after the copy, then stops.
            _wait_synced(g, i1, SYNCED_AFTER, timeout=20)
            g.wait_sync("stop", timeout=10)
            g.release("stop")
            res = g.wait()
            later = _synced(res.console[i0:])
        for t in targets:
            t.stop()

        est, cp = doc["establish"], doc["copy"]
        for slave, vol in DEVICES:
            c = cp["slaves"][slave][vol]
            assert c["mode"] == "full" and c["state"] == "done", c
        reports = [_check_copy(img, dev, before, later, run_dir)
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
