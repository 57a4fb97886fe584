"""A node never reports or serves as hardened an image that is not group h
(issue 16, items 1 and 4), through real nbdkit slaves and secondaries, the
real CLI (``cli.main`` in this process) and the dependent-write checker of
harness/workload.py.

The rig is tests/failoverrig.py's: s1 (volumes a, b) mirrored to r1,
role switches restarting nodes as children of the test.

Item 1: a volume file unlinked or replaced under a running node is noticed
at the next status, prepare, commit or checksums (``Volume.problem``).
Item 4: ``failover --end-test`` brings r1 back to group h on the node
itself before it reports hardened h or serves its host export, also when
killed -9 in the middle, and a ``failover`` right after promotes group h.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import nbd
import pytest

from harness import workload as wl
from coordinator import direction, launch
from coordinator.mirror import Mirror
from coordinator.roles import failover
from coordinator.roles.failover import Node, RoleSwitch
from failoverrig import G, LAYOUT, NBLOCKS, VOLS, Rig, Writes


@pytest.fixture
def rig(slaves, run_dir, monkeypatch):
    r = Rig(slaves, run_dir, monkeypatch)
    try:
        yield r
    finally:
        print("\n".join(r.logs))


def host_images(rig, node) -> list[bytes]:
    """What ``node``'s host exports serve, read through NBD."""
    out = []
    for uri in rig.uris(node):
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            size = h.get_size()
            out.append(b"".join(h.pread(min(1 << 20, size - o), o)
                                for o in range(0, size, 1 << 20)))
        finally:
            h.shutdown()
    return out


def run_group(rig, source="a"):
    m = Mirror(direction.oriented(rig.session, source), log=rig.logs.append,
               serve_control=False).open()
    try:
        return m.run_once()
    finally:
        m.close()


def vol_path(rig, node, v) -> str:
    return os.path.join(rig.dir, f"{node}-{v}.img")


# ------------------------------------------------------------------ item 1

@pytest.mark.parametrize("how, says", [("unlink", "was deleted"),
                                       ("replace", "was replaced by another file")])
def test_lost_secondary_volume_fails_the_group_and_says_so(rig, capsys, how, says):
    """r1's volume file unlinked (or replaced) under the running mirror: r1's
    status names it with the group it holds, no group hardens onto it,
    verify's checksums are refused, `mirror status` shows the problem
    instead of "hardened"; the hint (cp from /proc, restart) repairs it
    without a full copy."""
    Writes().workload(rig.uris("s1"), 20, resume=False)
    h = rig.group()
    st = rig.status("r1")
    assert st.get("problem") is None and st["volumes"]["a"].get("problem") is None
    path = vol_path(rig, "r1", "a")
    if how == "unlink":
        os.unlink(path)
    else:
        with open(path, "rb") as src, open(path + ".new", "wb") as f:
            f.write(src.read())
        os.replace(path + ".new", path)
    st = rig.status("r1")
    problem = st["volumes"]["a"].get("problem") or ""
    assert says in problem and f"it holds group {h}" in problem, st
    assert "\n" not in problem and st["volumes"]["b"]["problem"] is None
    assert st["problem"] == problem
    # The primary's volumes are where they were.
    assert rig.status("s1")["volumes"]["a"]["problem"] is None
    with pytest.raises(Exception, match=says):
        rig.call("r1", "checksums", volume="a", start=0, count=1)

    Writes().workload(rig.uris("s1"), 5)
    res = run_group(rig)
    assert res.outcome != "hardened" and says in (res.error or ""), res
    assert rig.status("r1")["hardened"] == h
    capsys.readouterr()
    assert rig.cli("mirror", "status") == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("secondary r1:")]
    assert len(line) == 1 and says in line[0] and "hardened" not in line[0], line

    if how == "unlink":
        # Follow the hint: copy the open file back, restart the node.
        cmd = problem.split("`")[1]
        assert cmd.startswith("cp /proc/"), problem
        subprocess.run(shlex.split(cmd), check=True)
        spec = rig.session.secondaries[0].spec()
        spec.region = G
        rig.procs["r1"].stop(timeout=30)
        rig.procs["r1"] = rig.slaves.restart(spec, detach=True)
        assert rig.status("r1")["volumes"]["a"]["problem"] is None
        # Another inode at the path: the node cannot tell the copy from any
        # other file, so the pair needs a full resync, said in one line.
        assert "is not the file node r1 served" in rig.status("r1")["volumes"]["a"]["replaced"]
        with pytest.raises(Exception, match="only a full resync joins it again"):
            run_group(rig)
        assert rig.cli("resync", "--from", "a", "--to", "b", "--full") == 0
        rig.assert_equal()
        rig.check("r1")


def test_lost_primary_volume_is_in_its_status(rig):
    """The primary (same Volume class): its status names a deleted volume
    file with the hint; the other volume and the pair's true side say
    nothing."""
    assert rig.status("s1")["volumes"]["a"].get("problem") is None
    os.unlink(vol_path(rig, "s1", "b"))
    vols = rig.status("s1")["volumes"]
    assert vols["a"].get("problem") is None
    p = vols["b"].get("problem") or ""
    assert p.startswith("volume b: ") and "was deleted" in p and "cp /proc/" in p, p


# ------------------------------------------------------------------ item 4

def tear(uri: str) -> None:
    """A DR test's writes that no dependent-write order allows: zero every
    record block of one volume (the other keeps records that follow them)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for b in range(0, NBLOCKS, 8):
            h.pwrite(bytes(G), b * G)
        h.flush()
    finally:
        h.shutdown()


def kept(rig, node) -> int:
    return sum(v.get("kept_blocks", 0) for v in rig.status(node)["volumes"].values())


def dr_test_writes(rig) -> tuple[Writes, int]:
    """Start a DR test and write at r1; the writes and how many blocks of
    group h the test primary kept."""
    assert rig.cli("failover", "--test") == 0
    assert rig.status("r1").get("role", "primary") == "primary"
    test = Writes()
    test.workload(rig.uris("r1"), 8)
    test.scatter(rig.uris("r1"), 7, seed=4)
    tear(rig.uris("r1")[0])
    return test, kept(rig, "r1")


def test_end_test_restores_group_h_then_failover_promotes_it(rig):
    """After --end-test r1 reports hardened h and its host exports serve
    exactly group h (byte-equal, the checker passes) with no group in
    between; site a lost right then, `failover` makes exactly group h
    writable, and a real failover keeps nothing."""
    Writes().workload(rig.uris("s1"), 30, resume=False)
    h = rig.group()
    before = host_images(rig, "r1")
    rig.check("r1")
    test, kept_blocks = dr_test_writes(rig)
    assert not wl.check_targets(rig.uris("r1"), LAYOUT).ok, "the test writes tear"
    assert rig.cli("failover", "--end-test") == 0
    st = rig.status("r1")
    assert st["role"] == "secondary" and st["hardened"] == h and st["prepared"] is None
    rig.check("r1")
    assert host_images(rig, "r1") == before
    # The test primary kept group h's content of every block it wrote,
    # and the test's blocks stay target indicators (returned to s1's cr).
    written = {(v, b) for v in VOLS for b in test.blocks[v]} | {
        ("a", b) for b in range(0, NBLOCKS, 8)}
    assert kept_blocks == len(written)
    assert sum(v["dirty_blocks"] for v in rig.status("s1")["volumes"].values()) \
        >= len(written)

    rig.procs["s1"].kill9()
    assert rig.cli("failover") == 0
    assert direction.load(rig.session)["hardened"] == h
    assert rig.images("r1") == before
    rig.check("r1")
    Writes().scatter(rig.uris("r1"), 3, seed=9)
    assert kept(rig, "r1") == 0


@pytest.mark.parametrize("point", ["secondary:test-restore-mid@3",
                                   "secondary:test-restore-before-clear"])
def test_kill_while_ending_the_test_comes_back_to_group_h(rig, point, monkeypatch):
    """r1 killed -9 while it restores group h at --end-test: the command
    fails, its rerun finishes, and r1 serves exactly group h.  Nothing
    starts r1 again until the test does (its supervisor passes the kill
    up), so the command's wait for it is cut from 120 s to 10."""
    monkeypatch.setattr(failover, "ROLE_RESTART_TIMEOUT_S", 10.0)
    Writes().workload(rig.uris("s1"), 30, resume=False)
    h = rig.group()
    before = host_images(rig, "r1")
    _, kept_blocks = dr_test_writes(rig)
    rig.restart("r1", point)            # armed in its next start, as a secondary
    killed = rig.cli("failover", "--end-test") != 0
    if killed:
        assert launch.running_pid(rig.session.secondaries[0].spec()) is None
        rig.revive("r1")                # its host starts it again
        assert rig.cli("failover", "--end-test") == 0
    st = rig.status("r1")
    assert st["role"] == "secondary" and st["hardened"] == h
    rig.check("r1")
    assert host_images(rig, "r1") == before
    assert rig.images("r1") == before
    assert killed and kept_blocks, "the restore was never reached"
    # The mirror goes on from there: r1 ends equal to s1.
    rig.group()
    rig.assert_equal()
    rig.check("r1")


def test_dr_test_refuses_what_is_not_the_settled_hardened_group(rig):
    """dr_test keeps only the hardened group with nothing in flight; a
    refusal changes nothing."""
    Writes().workload(rig.uris("s1"), 10, resume=False)
    h = rig.group()
    with pytest.raises(Exception, match=f"holds group {h}"):
        rig.call("r1", "dr_test", n=h + 1)
    rig.call("r1", "prepare", n=h + 1)
    with pytest.raises(Exception, match=f"group {h + 1} is in flight"):
        rig.call("r1", "dr_test", n=h)
    rig.call("r1", "rollback")
    assert rig.status("r1")["test"] is None
    assert rig.call("r1", "dr_test", n=h)["hardened"] == h
    assert rig.status("r1")["test"] == h


def test_a_test_never_promoted_leaves_no_record_behind(rig):
    """failover --test dies after r1 recorded the test but before promoting
    it: --end-test clears the record on the running secondary, so a real
    failover later keeps nothing and a later start restores nothing."""
    Writes().workload(rig.uris("s1"), 10, resume=False)
    h = rig.group()
    rig.call("r1", "dr_test", n=h)
    direction.save(rig.session, source="a", state="dr-test", hardened=h)
    assert rig.cli("failover", "--end-test") == 0
    assert rig.status("r1")["test"] is None
    rig.procs["s1"].kill9()
    assert rig.cli("failover") == 0
    Writes().scatter(rig.uris("r1"), 3, seed=7)
    assert kept(rig, "r1") == 0
    after = rig.images("r1")
    # Demoted again (a later failback's first step): its image stays.
    # (its role op; its supervisor starts it again)
    RoleSwitch(rig.session, log=rig.logs.append).become(
        Node("b", rig.session.secondaries[0]), "secondary")
    assert rig.status("r1")["role"] == "secondary"
    assert rig.images("r1") == after


def test_test_primary_killed_mid_write_still_ends_at_group_h(rig):
    """The DR test's primary killed -9 between saving a block of group h and
    writing it (and after earlier test writes): --end-test still restores
    exactly group h."""
    Writes().workload(rig.uris("s1"), 20, resume=False)
    h = rig.group()
    before = host_images(rig, "r1")
    rig.restart("r1", "keep:after-save@6")     # fires once it runs as the test's primary
    assert rig.cli("failover", "--test") == 0
    died = None
    for v, uri in zip(VOLS, rig.uris("r1")):
        h_ = nbd.NBD()
        h_.connect_uri(uri)
        try:
            for b in range(1, NBLOCKS, 3):
                h_.pwrite(b"\xa5" * G, b * G)
        except nbd.Error as exc:
            died = exc
            break
        finally:
            try:
                h_.shutdown()
            except nbd.Error:
                pass
    dead = launch.running_pid(rig.session.secondaries[0].spec()) is None
    rig.revive("r1")                    # its host starts it again (a primary: its record)
    assert rig.cli("failover", "--end-test") == 0
    st = rig.status("r1")
    assert st["role"] == "secondary" and st["hardened"] == h and st.get("test") is None
    rig.check("r1")
    assert host_images(rig, "r1") == before == rig.images("r1")
    assert died is not None and dead, ("the failpoint never fired", died, dead)


def test_volume_problem_says_what_happened_to_its_file(tmp_path):
    """Volume.problem (no nbdkit): None while the path is the open file;
    then replaced, truncated, deleted, each one line naming the path."""
    from nbdplugin.volume import Volume
    path = str(tmp_path / "v.img")
    os.makedirs(tmp_path / "st")
    vol = Volume("v", path, str(tmp_path / "st"), G, G, create_size=4 * G)
    try:
        assert vol.problem() is None
        os.truncate(path, 2 * G)
        assert f"is now {2 * G} bytes" in vol.problem() and "truncate -s" in vol.problem()
        os.truncate(path, 4 * G)
        assert vol.problem() is None
        with open(path + ".x", "wb") as f:
            f.write(bytes(4 * G))
        os.replace(path + ".x", path)
        assert "was replaced by another file" in vol.problem()
        os.unlink(path)
        p = vol.problem()
        assert p.startswith(f"volume v: {path} was deleted") and "\n" not in p
    finally:
        vol.close()
