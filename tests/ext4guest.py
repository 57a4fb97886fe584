"""ext4 in the loopback guest, as the VM copy and mirror tests use it: the
guest's writer script (files written on every device, two of three
fsync'd, a ``SYNCED VOL K GUEST_MS SHA256`` line after each fsync), the
parsing of its console lines, and the host's check of a copy of such a
file system (journal replay, fsck, every file fsync'd before the
establish present with its checksum).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time

from cgtest import MiB

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


def synced(lines: list[str]) -> dict[tuple[int, int], str]:
    """{(device, k): sha256} of the SYNCED lines among ``lines``."""
    out = {}
    for line in lines:
        m = SYNCED.match(line)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = m.group(4)
    return out


def writer_lines(lines: list[str]) -> list[tuple[int, int]]:
    """[(device, guest ms)] of every file the writers finished, in order."""
    out = []
    for line in lines:
        m = WRITER_LINE.match(line)
        if m:
            out.append((int(m.group(1)), int(m.group(3))))
    return out


def wait_synced(g, start: int, count: int, timeout: float) -> None:
    """Wait until the console has ``count`` SYNCED lines per device after
    line index ``start``."""
    deadline = time.monotonic() + timeout
    while True:
        per = [0, 0]
        for dev, _k in synced(g.console[start:]):
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


def check_copy(image: str, dev: int, before: dict, later: dict, out_dir: str) -> dict:
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
