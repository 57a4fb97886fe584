"""Loopback VM: failover and failback of a mounted ext4 (marker vm).

Site a is primary s1 (volume a, 64 MiB), site b is secondary r1.  The guest
sees three exports: /dev/nbd0 and /dev/nbd2 are s1's host export (nbd2 is
attached only after the failback, so that no device is reused while the
kernel may still hold the dead connection of nbd0), /dev/nbd1 is r1's.

1. The guest makes ext4 on s1 and writes files ``f*`` with fsync while the
   host's mirror forms groups; the host then waits for a group cut after
   the last fsync and stops the mirror.
2. The guest writes files ``u*`` (fsync'd, never replicated) and, still
   mounted, hands over: the host kills s1 -9 and runs ``cgmirror failover``.
3. The guest mounts r1's export read-write (the journal of the mounted file
   system replays), finds every ``f`` file, writes files ``g*``, unmounts;
   e2fsck is clean.
4. s1 comes back (a primary, as it recorded, under its supervisor).
   ``cgmirror failback`` refuses: s1 holds the ``u`` writes site b never
   got (split brain).  ``cgmirror resync --from b --to a`` names b the
   winner, ``cgmirror switchover --to a`` swaps back: the host checks
   both images equal; the guest mounts s1's export again and finds every
   ``f`` and ``g`` file with its checksum, and no ``u`` file (the losing
   side's writes were overwritten by the resync); it writes ``h*``,
   unmounts, e2fsck is clean; one more group mirrors them to r1.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from cgtest import need, wait_until
from coordinator import cli, launch, session as session_mod
from coordinator.mirror import Mirror
from harness.mirrorrig import mirror_session
from vmfixture import workload

pytestmark = pytest.mark.vm

MiB = 1 << 20
SIZE = 64 * MiB

# Every node's write-intent region: the granularity, as in tests/test_failover.py.
REGION = 64 * 1024
SESSION = mirror_session("vmf", {"s1": "r1"}, size=SIZE,
                         session={"max_coordination_ms": 5000, "copy_timeout_ms": 60000},
                         mirror={"max_drain_ms": 60000})


def _mount(i: int) -> str:
    return f"nbd_attach {i}\nmkdir -p /mnt/{i}\nmount -t ext4 /dev/nbd{i} /mnt/{i}\n"


def _absent(i: int, tag: str) -> str:
    return (f"for x in /mnt/{i}/{tag}*; do [ ! -e \"$x\" ] || fail \"$x: the losing"
            f" side's file is there\"; done\n")


SCRIPT = (
    "nbd_attach 0\n"
    + workload.mkfs_mount(0, lazy=False)
    + "ready mounted\n"
    + workload.write_files(0, nfiles=8, kib=256, tag="f")
    + "host_sync replicated\n"
    + workload.write_files(0, nfiles=4, kib=128, tag="u")
    + "host_sync failover\n"
    # s1 is dead: nothing of nbd0 is dirty (all synced); the unmount's own
    # superblock write fails, which is what a dead primary does.
    + "umount /mnt/0 2>/dev/null || umount -l /mnt/0 || true\n"
    + "say unmounted nbd0\n"
    + "nbd_detach 0 >/dev/null 2>&1 || true\n"
    + "say detached nbd0\n"
    + _mount(1)
    + workload.verify(1, "f")
    + workload.write_files(1, nfiles=6, kib=256, tag="g")
    + workload.umount_fsck(1)
    + "nbd_detach 1\n"
    + "host_sync failback\n"
    + _mount(2)
    + workload.verify(2, "f")
    + workload.verify(2, "g")
    + _absent(2, "u")
    + "result verified yes\n"
    + workload.write_files(2, nfiles=2, kib=128, tag="h")
    + workload.umount_fsck(2)
    + "nbd_detach 2\n"
    + "host_sync done\n"
)


def _images_equal(d: str) -> bool:
    with open(os.path.join(d, "s1-a.img"), "rb") as x, \
            open(os.path.join(d, "r1-a.img"), "rb") as y:
        return x.read() == y.read()


def test_ext4_failover_and_failback(vm_guest, slaves, run_dir, capsys):
    """ext4 written at the primary while groups form; the primary killed
    -9; the guest mounts the promoted secondary read-write and writes;
    split-brain failback refused, resync from b, switchover back; the old
    primary mounts with every file written after the failover (checksums),
    none of its own unreplicated ones, e2fsck clean."""
    need("nbdkit")
    t0 = time.monotonic()
    path = os.path.join(run_dir, "vmf.toml")
    with open(path, "w") as f:
        f.write(SESSION)
    sess = session_mod.load(path)
    # Both nodes under their supervisors (detached, as in production): a
    # role switch is the node's role op, its supervisor starts it again in
    # the recorded role with the same spec (REGION).
    specs = [sess.slaves[0].spec(), sess.secondaries[0].spec()]
    for spec in specs:
        spec.region = REGION
    s1 = slaves.restart(specs[0], detach=True)
    slaves.restart(specs[1], detach=True)
    logs: list[str] = []
    s1_sock, r1_sock = sess.slaves[0].nbd_socket, sess.secondaries[0].nbd_socket
    # nbd0 dies with s1.  Without a request timeout the guest hung past 60 s
    # whenever the dying connection delivered garbage ("Wrong magic": the
    # text of socat's error message, read as a reply); with one, the
    # unmount goes on after 5 s.
    g = vm_guest(SCRIPT, [(s1_sock, "a", "-t 5"), (r1_sock, "a"), (s1_sock, "a")],
                 timeout=120, attach=False)
    g.wait_line(r"^READY mounted", timeout=60)

    # 1. Groups form while the guest writes and fsyncs.
    m = Mirror(sess, log=logs.append, serve_control=False).open()
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    try:
        g.wait_sync("replicated", timeout=60)
        # A group in flight now may have been cut before the last fsync:
        # the one after it was not.
        want = m.hardened + 2
        wait_until(lambda: m.hardened >= want, 60, "a group after the guest's fsyncs")
    finally:
        m.stop()
        t.join(60)
        m.close()
    groups = m.hardened
    g.release("replicated")

    # 2. The primary is lost with the file system mounted.
    g.wait_sync("failover", timeout=60)
    s1.kill9()
    assert cli.main(["-s", path, "failover"]) == 0
    g.release("failover")

    # 3, 4. The guest used r1; site a's host starts s1 again (a primary, as
    # it recorded) once its supervisor passed the kill up; fail back.
    g.wait_sync("failback", timeout=60)
    wait_until(lambda: launch.supervisor_pid(specs[0]) is None, 30,
               "s1's supervisor to exit")
    slaves.restart(specs[0], detach=True)
    capsys.readouterr()
    assert cli.main(["-s", path, "failback"]) != 0
    err = capsys.readouterr().err
    assert "split brain" in err and "resync --from b --to a" in err, err
    assert cli.main(["-s", path, "resync", "--from", "b", "--to", "a"]) == 0
    assert cli.main(["-s", path, "switchover", "--to", "a"]) == 0
    assert _images_equal(run_dir), "s1 and r1 differ after the failback"
    g.release("failback")
    g.wait_sync("done", timeout=60)
    m = Mirror(sess, log=logs.append, serve_control=False).open()
    try:
        assert m.run_once().outcome == "hardened", logs[-5:]
    finally:
        m.close()
    assert _images_equal(run_dir), "r1 misses the guest's last writes"
    g.release("done")
    res = g.wait()
    print(f"VM failover test {time.monotonic() - t0:.1f} s (guest boot {res.boot:.1f} s,"
          f" {groups} groups before the failover)")
    assert res.results["verified"] == "yes"
    assert res.results["fsck1"] == "clean" and res.results["fsck2"] == "clean"
