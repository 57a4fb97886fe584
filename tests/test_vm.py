"""Loopback VM: real /dev/nbdX + ext4 against nbdkit exports (marker vm).

Plain nbdkit first (memory + file), then the cgmirror slave end to end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time

import pytest

from vmfixture import workload
from vm.runner import GuestError, GuestTimeout, run_guest

pytestmark = pytest.mark.vm

MiB = 1 << 20


def test_plain_nbdkit_memory_and_file(vm_guest, nbdkit_server, vm_dir):
    """Two exports (nbdkit memory, nbdkit file): mkfs, mount, write, host
    rendezvous, umount, fsck, remount, verify; then the host fscks the file."""
    img = os.path.join(vm_dir, "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    mem = nbdkit_server("memory", "64M")
    fil = nbdkit_server("file", img)
    script = (
        workload.mkfs_mount(0)
        + workload.mkfs_mount(1)
        + "ready mounted 2 volumes\n"
        + workload.write_files(0, nfiles=4, tag="a")
        + workload.write_files(1, nfiles=4, tag="b")
        + 'word=$(host_sync written "$(cat /sys/block/nbd1/size)")\n'
        + 'result word "$word"\n'
        + workload.umount_fsck(0)
        + workload.umount_fsck(1)
        + "mount /dev/nbd0 /mnt/0; mount /dev/nbd1 /mnt/1\n"
        + workload.verify(0, "a")
        + workload.verify(1, "b")
        + "result verified yes\n"
        + "umount /mnt/0; umount /mnt/1\n"
    )
    t0 = time.monotonic()
    g = vm_guest(script, [(mem.sock, ""), (fil.sock, "")], timeout=60)
    m = g.wait_line(r"READY mounted (\d+)", timeout=45)   # guest -> host, no wait
    assert m.group(1) == "2"
    sectors = g.wait_sync("written", timeout=45)       # guest blocks until release
    assert int(sectors) * 512 == 64 * MiB
    g.release("written", "hello from the host")
    res = g.wait()
    print(f"VM run {time.monotonic() - t0:.1f} s (boot {res.boot:.1f} s)")
    assert res.results["word"] == "hello from the host"
    assert res.results["fsck0"] == "clean" and res.results["fsck1"] == "clean"
    assert res.results["verified"] == "yes"
    # the guest detached cleanly: the host sees a clean ext4 on the file
    fil.stop()
    out = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_guest_failure_and_timeout_are_reported(vm_artifacts):
    """A failing script raises GuestError with the console tail; a hang ends
    at the timeout with GuestTimeout."""
    with pytest.raises(GuestError) as ei:
        run_guest('say about to fail\nfalse\nsay not reached\n', timeout=40)
    msg = str(ei.value)
    assert "status 1" in msg and "SAY about to fail" in msg
    assert "SAY not reached" not in msg
    assert ei.value.result is not None and ei.value.result.status == 1

    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as ei:
        run_guest("sleep 600\n", timeout=2)
    assert time.monotonic() - t0 < 15
    assert "no exit after" in str(ei.value)


# ---------------------------------------------------------------- cgmirror

def _image_blocks_differ(before: bytes, path: str, g: int) -> set[int]:
    """Indexes of g-byte blocks where the file at `path` differs from `before`."""
    with open(path, "rb") as f:
        after = f.read()
    assert len(after) == len(before)
    return {i for i in range(len(after) // g)
            if after[i * g:(i + 1) * g] != before[i * g:(i + 1) * g]}


def _marked(runs) -> set[int]:
    return {b for start, n in runs for b in range(start, start + n)}


def test_cgmirror_change_bits_cover_fs_workload(vm_guest, slaves):
    """ext4 on two cgmirror volumes: after the host clears the change bits,
    every block the guest's workload changes (write + fsync, rename, delete,
    umount, fsck, remount) is marked.  Reports over-marking."""
    gran = 4096
    s = slaves("s1", volumes=[("a", 64 * MiB), ("b", 64 * MiB)], granularity=gran)
    sock = s.spec.nbd_socket
    paths = {name: path for name, path, _ in s.spec.volumes}
    script = (
        workload.mkfs_mount(0, lazy=False)
        + workload.mkfs_mount(1, lazy=False)
        + "sync\n"
        + "host_sync cleared >/dev/null\n"
        + "for i in 0 1; do\n"
        + "  cd /mnt/$i; mkdir -p dir\n"
        + "  n=0; while [ $n -lt 12 ]; do\n"
        + "    dd if=/dev/urandom of=dir/f$n bs=4096 count=$((n * 7 + 1)) 2>/dev/null\n"
        + "    sync -d dir/f$n; n=$((n + 1))\n"
        + "  done\n"
        + "  mv dir/f3 dir/renamed3; mv dir/f4 top4; rm dir/f5 dir/f6\n"
        + "  dd if=/dev/urandom of=dir/f7 bs=1000 count=3 seek=5 conv=notrunc 2>/dev/null\n"
        + "  sync -d dir/f7\n"
        + "  find . -type f | sort | xargs sha256sum > /tmp/sums.$i\n"
        + "  sync -f .; cd /\n"
        + "done\n"
        + workload.umount_fsck(0)
        + workload.umount_fsck(1)
        + "for i in 0 1; do\n"
        + "  mount /dev/nbd$i /mnt/$i\n"
        + "  (cd /mnt/$i && sha256sum -c -s /tmp/sums.$i) || fail checksums nbd$i\n"
        + "  result files$i $(wc -l < /tmp/sums.$i)\n"
        + "  umount /mnt/$i\n"
        + "done\n"
        + "result verified yes\n"
    )
    t0 = time.monotonic()
    g = vm_guest(script, [(sock, "a"), (sock, "b")], timeout=90)
    g.wait_sync("cleared", timeout=60)
    with s.control() as c:
        c.call("clear", volumes=["a", "b"])
        kept = {}
        for name, path in paths.items():
            with open(path, "rb") as f:
                kept[name] = f.read()
    g.release("cleared")
    res = g.wait()
    took = time.monotonic() - t0
    assert res.results["verified"] == "yes"
    assert res.results["fsck0"] == res.results["fsck1"] == "clean"

    report = []
    with s.control() as c:
        for name, path in paths.items():
            assert c.call("status")["volumes"][name]["granularity"] == gran
            marked = _marked(c.dirty_runs(name))
            changed = _image_blocks_differ(kept[name], path, gran)
            assert changed, f"{name}: the workload changed nothing?"
            unmarked = sorted(changed - marked)
            assert not unmarked, (f"{name}: {len(unmarked)} changed blocks not marked,"
                                  f" first {unmarked[:10]}")
            report.append(f"{name}: changed {len(changed)} blocks, marked {len(marked)},"
                          f" marked but unchanged {len(marked - changed)}"
                          f" (granularity {gran})")
    print(f"VM run {took:.1f} s (boot {res.boot:.1f} s); " + "; ".join(report))
    logging.getLogger("test_vm").info("%s", "; ".join(report))


def test_cgmirror_freeze_holds_guest_writes(vm_guest, slaves):
    """The host freezes both volumes while the guest writes with O_DIRECT:
    the writes wait until thaw, the images do not change while frozen, and
    both file systems are clean afterwards."""
    hold = 1.5
    s = slaves("s1", volumes=[("a", 64 * MiB), ("b", 64 * MiB)])
    sock = s.spec.nbd_socket
    paths = {name: path for name, path, _ in s.spec.volumes}
    script = (
        workload.mkfs_mount(0, lazy=False)
        + workload.mkfs_mount(1, lazy=False)
        + "dd if=/dev/urandom of=/tmp/blob bs=65536 count=16 2>/dev/null\n"
        + "sync\n"
        + "host_sync frozen >/dev/null\n"
        + "for i in 0 1; do\n"
        + "  ( t=$(now_ms)\n"
        + "    dd if=/tmp/blob of=/mnt/$i/x bs=65536 oflag=direct conv=fsync 2>/dev/null\n"
        + "    result write${i}_ms $(( $(now_ms) - t )) ) &\n"
        + "  eval p$i=$!\n"
        + "done\n"
        + "wait $p0; wait $p1\n"
        + "for i in 0 1; do cmp /tmp/blob /mnt/$i/x; done\n"
        + workload.umount_fsck(0)
        + workload.umount_fsck(1)
    )
    g = vm_guest(script, [(sock, "a"), (sock, "b")], timeout=90)
    g.wait_sync("frozen", timeout=60)

    def digests():
        out = {}
        for name, path in paths.items():
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        return out

    with s.control() as c:
        c.call("freeze", n=1, lease_ms=10000)
        frozen_at = time.monotonic()
        before = digests()
        g.release("frozen")
        time.sleep(max(0.0, hold - (time.monotonic() - frozen_at)))
        during = digests()
        held = time.monotonic() - frozen_at
        r = c.call("thaw", n=1)
        c.call("abort", n=1)   # nothing to copy: end the cut
    res = g.wait()
    assert before == during, "an image changed while its volume was frozen"
    w0, w1 = int(res.results["write0_ms"]), int(res.results["write1_ms"])
    print(f"held {held:.2f} s (slave says {r.get('held_ms')} ms);"
          f" guest writes took {w0} ms and {w1} ms; boot {res.boot:.1f} s,"
          f" VM {res.elapsed:.1f} s")
    # The guest started its writes right after release; they could not end
    # before thaw: allow 300 ms for GO to reach the guest and dd to start.
    assert min(w0, w1) >= (hold - 0.3) * 1000
    assert res.results["fsck0"] == res.results["fsck1"] == "clean"
