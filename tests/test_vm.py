"""Loopback VM: real /dev/nbdX + ext4 against nbdkit exports (marker vm).

Plain nbdkit first (memory + file), then the cgmirror slave end to end.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.vmfixture import (  # noqa: F401  (fixtures)
    nbdkit_server,
    vm_artifacts,
    vm_dir,
    vm_guest,
    workload,
)
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
    g = vm_guest(script, [mem.export(), fil.export()], timeout=60)
    sectors = g.wait_sync("written", timeout=45)
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
