"""Pytest fixtures for the loopback VM (register with
``pytest_plugins = ["vmfixture"]`` in tests/conftest.py, or import the
fixtures into a test module).

    def test_x(vm_guest, nbdkit_server):
        srv = nbdkit_server("memory", "64M")
        g = vm_guest(workload.mkfs_mount(0) + "host_sync mounted\\n" + ...,
                     exports=[(srv.sock, "")])
        g.wait_sync("mounted")      # guest blocked in host_sync
        ...                         # host: freeze, kill, cut links, copy images
        g.release("mounted")
        res = g.wait()              # raises GuestError/GuestTimeout on failure

Fixtures:

* ``vm_artifacts`` (session): builds or finds the guest kernel + initramfs.
* ``vm_guest``: factory ``vm_guest(script, exports, timeout=60, **Guest kw)``
  that *starts* a guest (vm.runner.Guest) and returns it at once; every guest
  is killed at teardown.  Export i is /dev/nbdI in the guest.
* ``nbdkit_server``: factory ``nbdkit_server(plugin, *args, filters=())``
  starting a plain ``nbdkit -f -U SOCK`` (memory, file, ...) and stopping it
  at teardown; ``(srv.sock, "")`` is the (socket, name) pair for a guest.
* ``vm_dir``: a short private directory (unix socket paths are limited).

``workload`` holds shell snippets for guest scripts (mkfs + mount, files with
checksums, verify).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from cgtest import need
from harness import peers
from vm import build
from vm.runner import Guest

VM_BINARIES = ("qemu-system-x86_64", "socat", "nbdkit")


@pytest.fixture(scope="session")
def vm_artifacts():
    """Paths of the guest kernel and initramfs (built if missing/stale)."""
    need(*VM_BINARIES)
    return build.ensure()


@pytest.fixture
def vm_dir():
    d = tempfile.mkdtemp(prefix="cgmvm-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm_guest(vm_artifacts, request):
    """Factory: start a guest running `script` against `exports`."""
    guests: list[Guest] = []

    def start(script: str, exports=(), timeout: float = 60.0, **kw) -> Guest:
        kw.setdefault("name", f"{request.node.name[:24]}#{len(guests)}")
        g = Guest(script, exports, timeout, **kw)
        guests.append(g)
        return g.start()

    try:
        yield start
    finally:
        for g in guests:
            g.kill()
            g.__exit__(None, None, None)


@pytest.fixture
def nbdkit_server(vm_dir):
    """Factory: ``nbdkit_server("memory", "64M")`` -> a started
    harness.peers.Server; ``(srv.sock, "")`` is the export for a guest."""
    need("nbdkit")
    servers: list[peers.Server] = []

    def start(plugin: str, *args: str, filters=()) -> peers.Server:
        n = len(servers)
        srv = peers.nbdkit(os.path.join(vm_dir, f"nbdkit{n}.sock"), plugin, *args,
                           filters=tuple(filters),
                           log=os.path.join(vm_dir, f"nbdkit{n}.log"))
        servers.append(srv)
        return srv

    try:
        yield start
    finally:
        for s in servers:
            s.stop()


class workload:
    """Shell snippets for guest scripts (busybox ash; the script runs under
    set -e).  Devices are /dev/nbdI, mount points /mnt/I."""

    @staticmethod
    def mkfs_mount(i: int, mkfs_opts: str = "", lazy: bool = True) -> str:
        """mkfs.ext4 + mount.  lazy=False writes inode tables and journal in
        full at mkfs (slower, ~0.4 s per 64 MiB here) so that no background
        ext4lazyinit writes follow the mount."""
        if not lazy:
            mkfs_opts = "-E lazy_itable_init=0,lazy_journal_init=0 " + mkfs_opts
        return (
            f"mkfs.ext4 -q -F {mkfs_opts} /dev/nbd{i}\n"
            f"mkdir -p /mnt/{i}\n"
            f"mount -t ext4 /dev/nbd{i} /mnt/{i}\n"
        )

    @staticmethod
    def write_files(i: int, nfiles: int = 8, kib: int = 256, tag: str = "f") -> str:
        """Files of random data + a checksum list /mnt/I/SUMS-tag (fsync'd)."""
        return (
            f"cd /mnt/{i}\n"
            f"n=0; while [ $n -lt {nfiles} ]; do\n"
            f"  dd if=/dev/urandom of={tag}$n bs=1024 count={kib} 2>/dev/null\n"
            f"  sync -d {tag}$n\n"
            f"  n=$((n + 1))\n"
            f"done\n"
            f"sha256sum {tag}* > SUMS-{tag}; sync -d SUMS-{tag}; sync -f .\n"
            f"cd /\n"
        )

    @staticmethod
    def verify(i: int, tag: str = "f") -> str:
        return f"(cd /mnt/{i} && sha256sum -c -s SUMS-{tag}) || fail checksums of {tag} on nbd{i}\n"

    @staticmethod
    def umount_fsck(i: int) -> str:
        return (
            f"umount /mnt/{i}\n"
            f"e2fsck -fn /dev/nbd{i} >/tmp/fsck.{i} 2>&1 || {{ cat /tmp/fsck.{i}; fail e2fsck nbd{i}; }}\n"
            f"result fsck{i} clean\n"
        )
