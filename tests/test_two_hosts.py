"""Issue 18, item 7, on the host rig (harness/hosts.py, tests/hostrig.py):
hosts a1 a2 (primaries), b1 b2 (secondaries) and c, each a network
namespace with its own /etc, /var/lib and /run, every node under its unit
(cgmirror-node@NAME) run by its host's supervisor, TCP with mutual TLS
everywhere.  Every ``cgmirror`` command runs inside the host the scenario
names; the dependent-write workload runs inside a host of the site it
writes to, and the checker reads every image a user would read (a
primary's host exports, a secondary's last hardened group) from inside a
host too.

- Site a cut off, ``failover`` on b1, writes at b; a's hosts reboot while
  cut off and come back as the primaries they recorded; the link heals;
  status on either site reports the split; a mirror from site a refuses;
  ``failback`` sends exactly |S u T| and a's images pass the checker.
  With writes at a that b never got (a is "ahead": wire/lineage.py),
  failback is refused as split brain and ``resync --from b --to a
  --keep-overwritten`` keeps a's blocks.
- Both sites written after the failover: refused as split brain until a
  resync names the winner; ``--keep-overwritten`` keeps the loser's blocks.
- kill -9 of a node just before and just after it records a new role
  (failpoints node:role:before-record / after-record, armed in the node's
  unit by a drop-in): it comes back in exactly one role, and the command
  run again finishes.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from cgtest import need, need_netns
from harness.hosts import Hosts
from hostrig import G, SITE_NODES, Rig, node_unit, places

KEEP = "/var/lib/cgmirror/kept"


@pytest.fixture
def rig(tmp_path):
    need("nbdkit", "unshare", "nsenter")
    need_netns()
    with Hosts(str(tmp_path)) as h:
        yield Rig(h)


def union(*writes: list[set]) -> list[set]:
    """Blocks per workload position written by any of ``writes``."""
    return [set().union(*(w[p] for w in writes)) for p in range(len(places("a")))]


def mirrored(rig: Rig) -> int:
    """A workload at site a (run in a1), a group hardened at site b."""
    rig.write("a1", "a", 40, fresh=True)
    n = rig.group()
    rig.check("b1", "b")                    # b's host exports: the group
    return n


def fail_over_cut_off(rig: Rig) -> None:
    """Site a cut off from everything, ``failover`` run on b1."""
    rig.h.isolate("a")
    out = rig.ok("b1", "failover")
    assert "site b is writable" in out, out
    for n in SITE_NODES["b"]:
        assert rig.role(n, "b1") == "primary"


def reboot_site_a(rig: Rig) -> None:
    """a1 and a2 crash (kill -9 of everything on them) and boot while cut
    off: each node comes back, from its own disk, as the primary it
    recorded."""
    for n in SITE_NODES["a"]:
        before = rig.record(n)
        rig.h[n].reboot()
        u = rig.h[n].wait_unit(node_unit(n))
        assert u["starts"] == 1
        after = rig.record(n)
        assert (after["role"], after["role_seq"]) == ("primary", before["role_seq"])
        assert rig.role(n, "a1") == "primary"       # asked at its own site


def split_lines(rig: Rig, host: str) -> list[str]:
    r = rig.cgmirror(host, "status")
    assert r.returncode != 0, r.stdout
    return [x for x in r.stderr.splitlines() if x.startswith("cgmirror: split:")]


def assert_kept(rig: Rig, host: str, site: str, before: list[bytes],
                wrote: list[set]) -> int:
    """The resync run on ``host`` kept, per volume of ``site``, the
    overwritten blocks as ``before`` held them, and every block in
    ``wrote`` is among them.  Returns the bytes kept."""
    total = 0
    for p, (node, vol) in enumerate(places(site)):
        path = rig.h[host].file(f"{KEEP}/{node}-{vol}")
        with open(path + ".runs.json") as f:
            runs = json.load(f)["bytes"]
        with open(path + ".img", "rb") as f:
            kept = f.read()
        blocks = set()
        for off, n in runs:
            assert kept[off:off + n] == before[p][off:off + n], (node, vol, off)
            blocks |= {b for b in range(off // G, -(-(off + n) // G))}
            total += n
        assert wrote[p] <= blocks, (node, vol, sorted(wrote[p] - blocks))
    return total


# ------------------------------------------------------------ failover and back

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_failover_with_site_a_cut_off_then_failback_sends_exactly_the_union(rig):
    """a's writes stop and a group hardens; site a is cut off; failover on
    b1; writes at b; a's hosts reboot while cut off and come back as
    primaries; the link heals: status from a1 and from b1 reports the
    split, a mirror from a1 refuses in one line, and failback (from c)
    sends exactly |S u T| blocks; both sites are equal and consistent."""
    mirrored(rig)
    # Two checkpoints with no write between: a's write-intent map forgets
    # the regions already sent, so its reboot marks nothing (S is empty).
    for n in SITE_NODES["a"]:
        for _ in range(2):
            rig.call("c", n, "checkpoint")
    fail_over_cut_off(rig)
    t = union(rig.write("b1", "b", 12), rig.scatter("b1", "b", 5, seed=2))
    rig.check("b2", "b")
    reboot_site_a(rig)
    rig.check("a1", "a")                            # a, alone, as it was
    # Status at a while cut off: site b's nodes run, on hosts a cannot reach.
    r = rig.cgmirror("a1", "status")
    lines = [x for x in r.stderr.splitlines() if x.startswith("cgmirror: ")]
    for n in SITE_NODES["b"]:
        said = [x for x in lines if f"{n}:" in x or f"{n} " in x]
        assert said and "unreachable" in said[0] and "not running" not in said[0], lines
    rig.h.rejoin("a")

    for host in ("a1", "b1"):
        lines = split_lines(rig, host)
        assert len(lines) == 1 and "both run primaries" in lines[0], (host, lines)
        assert "`cgmirror failback`" in lines[0], lines
    err = rig.fails("a1", "mirror", "run", timeout=60)
    assert len(err.splitlines()) == 1 and "took over from site a" in err, err

    before = rig.images("a")
    doc = json.loads(rig.ok("c", "failback", "--json"))
    want = sum(len(b) for b in t)
    assert want > 0 and doc["resync"]["bytes"] == want * G, (doc["resync"]["bytes"] // G, want)
    # a changed where b was written (S is empty: a's writes were sent), only there.
    for p, (x, y) in enumerate(zip(before, rig.images("a"))):
        changed = {b for b in range(len(x) // G) if x[b * G:(b + 1) * G] != y[b * G:(b + 1) * G]}
        assert changed <= t[p] and changed, (places("a")[p], sorted(changed - t[p]))
    assert doc["switchover"]["source"] == "a"
    rig.assert_joined("a", "primary")
    assert rig.cgmirror("b1", "status").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_site_a_cut_off_holding_unsent_writes_is_refused_as_split_brain(rig):
    """Site a is cut off holding acknowledged writes b never got, then
    reboots: a comes back "ahead" (its intent map kept them), so once the
    link heals status on both sites says split brain, failback is refused
    in one line, and a resync naming b keeps every block of a it
    overwrites, as a held it."""
    mirrored(rig)
    old = union(rig.write("a1", "a", 15), rig.scatter("a2", "a", 6, seed=1))
    fail_over_cut_off(rig)
    rig.write("b1", "b", 12)
    rig.scatter("b2", "b", 5, seed=2)
    rig.check("b2", "b")
    reboot_site_a(rig)
    rig.check("a2", "a")                            # a's acknowledged writes, all there
    rig.h.rejoin("a")

    for host in ("a1", "b1"):
        lines = split_lines(rig, host)
        assert len(lines) == 1 and "both written since generation" in lines[0], (host, lines)
        assert "cgmirror resync --from b --to a" in lines[0], lines
    err = rig.fails("b1", "failback")
    assert len(err.splitlines()) == 1 and "split brain" in err, err
    assert "resync --from b --to a" in err and "--keep-overwritten" in err, err
    for n in (*SITE_NODES["a"], *SITE_NODES["b"]):
        assert rig.role(n, "c") == "primary", n          # nothing changed

    before = rig.images("a")
    r = rig.cgmirror("b1", "resync", "--from", "b", "--to", "a", "--keep-overwritten", KEEP)
    assert r.returncode == 0, r.stderr
    said = [x for x in r.stderr.splitlines() if "named the winner: the resync overwrites" in x]
    assert said and "kept in" in said[0], r.stderr
    assert assert_kept(rig, "b1", "a", before, old) > 0
    rig.assert_joined("a", "secondary")             # a: its hardened group, b's data
    assert rig.cgmirror("a1", "status").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_both_sites_written_after_the_failover_until_a_resync_names_the_winner(rig):
    """Writes at b after the failover and at a, cut off, too: once the link
    heals, failback and a mirror are refused as split brain; a resync
    naming a (run on a1) keeps b's overwritten blocks as b held them;
    then groups form a -> b again."""
    mirrored(rig)
    fail_over_cut_off(rig)
    at_b = union(rig.write("b1", "b", 10), rig.scatter("b1", "b", 4, seed=3))
    rig.check("b2", "b")
    rig.write("a2", "a", 10)                        # site a, cut off, still serving
    rig.scatter("a1", "a", 4, seed=4)
    rig.check("a1", "a")
    rig.h.rejoin("a")

    lines = split_lines(rig, "c")
    assert len(lines) == 1 and "both written since generation" in lines[0], lines
    err = rig.fails("b1", "failback")
    assert len(err.splitlines()) == 1 and "split brain" in err, err
    err = rig.fails("a1", "mirror", "run", timeout=60)
    assert len(err.splitlines()) == 1 and "cgmirror resync --from" in err, err

    before = rig.images("b")
    r = rig.cgmirror("a1", "resync", "--from", "a", "--to", "b", "--keep-overwritten", KEEP)
    assert r.returncode == 0, r.stderr
    assert assert_kept(rig, "a1", "b", before, at_b) > 0
    rig.assert_joined("b", "secondary")
    assert rig.cgmirror("c", "status").returncode == 0
    rig.write("a1", "a", 5)
    rig.group()
    rig.check("b2", "b")


# ------------------------------------------------------------ kill -9 around a role record

@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", ["node:role:before-record", "node:role:after-record"])
def test_a_node_killed_around_its_role_record_comes_back_in_one_role(rig, point):
    """b1 killed -9 (failpoint in its unit) as failover promotes it, a1 as
    failback demotes it: each is restarted by its unit in exactly one role
    (before the record: the old; after it: the new, and its status says
    the same as its record), and the command run again finishes."""
    mirrored(rig)
    for node, host, cmd, old, new in (("b1", "b1", "failover", "secondary", "primary"),
                                      ("a1", "c", "failback", "primary", "secondary")):
        rig.arm(node, point)
        seq = rig.record(node)["role_seq"]
        pid = rig.h[node].unit(node_unit(node))["pid"]
        r = rig.cgmirror(host, cmd)
        assert r.returncode != 0, f"{cmd} finished with {node} killed at {point}"
        u = rig.h[node].wait_unit(node_unit(node), not_pid=pid)
        assert u["exits"] == [-signal.SIGKILL], u
        rec = rig.record(node)
        want = old if point.endswith("before-record") else new
        assert (rec["role"], rec["role_seq"]) == (want, seq + (want == new)), rec
        assert rig.role(node, host) == want
        rig.arm(node, None)
        assert rig.record(node)["role"] == want
        rig.ok(host, cmd)
        if cmd == "failover":
            for n in SITE_NODES["b"]:
                assert rig.role(n, host) == "primary"
            rig.write("b1", "b", 10)
            rig.check("b2", "b")
    rig.assert_joined("a", "primary")


# ------------------------------------------------------------ without the rig

def test_a_file_system_renumbered_by_a_reboot_is_the_same_file(tmp_path):
    """A host's reboot may give the file system of a volume another st_dev
    (an overlay's or a device-mapper volume's number, as the host rig's
    reboots do) while its fsid stays: the file is the one the node served,
    not a replaced one; another fsid, or another inode, is another file."""
    from nbdplugin.noderecord import NodeRecord, identity_of
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    fd = os.open(img, os.O_RDONLY)
    try:
        ident = identity_of(fd, 4096)
    finally:
        os.close(fd)
    assert ident["fsid"] == os.statvfs(img).f_fsid
    (tmp_path / "st").mkdir()
    (tmp_path / "st2").mkdir()
    rec = NodeRecord.create(str(tmp_path / "st"), "h", "a1", "primary", {"v0": ident})
    renumbered = {**ident, "dev": ident["dev"] + 3}
    assert rec.start("h", "a1", {"v0": str(img)}, {"v0": renumbered}) == []
    assert rec.start("h", "a1", {"v0": str(img)}, {"v0": {**renumbered,
                                                          "fsid": ident["fsid"] + 1}}) == ["v0"]
    assert "fsid" in rec.replaced("v0")
    # A record made before fsid was recorded: st_dev still decides.
    old = {k: v for k, v in ident.items() if k != "fsid"}
    rec = NodeRecord.create(str(tmp_path / "st2"), "h", "a1", "primary", {"v0": old})
    assert rec.start("h", "a1", {"v0": str(img)}, {"v0": ident}) == []


def test_a_drop_in_environment_reaches_the_unit(tmp_path):
    """The rig hook that arms failpoints: Environment= of the unit, of its
    template's drop-ins and of its instance's (same file name: the
    instance's wins), in systemd's order; an empty one resets; a word that
    is not KEY=VALUE is one line."""
    from harness.hosts import HostError, Unit
    (tmp_path / "n@.service").write_text("[Service]\nExecStart=/bin/true\n"
                                         "Environment=A=1 'B=two words'\n")
    (tmp_path / "n@.service.d").mkdir()
    (tmp_path / "n@.service.d" / "10-x.conf").write_text("[Service]\nEnvironment=C=3\n")
    (tmp_path / "n@.service.d" / "20-y.conf").write_text("[Service]\nEnvironment=D=t\n")
    (tmp_path / "n@a1.service.d").mkdir()
    (tmp_path / "n@a1.service.d" / "20-y.conf").write_text("[Service]\nEnvironment=D=a1\n")
    u = Unit("n@a1.service", str(tmp_path / "n@.service"))
    assert u.environment == {"A": "1", "B": "two words", "C": "3", "D": "a1"}
    assert Unit("n@b1.service", str(tmp_path / "n@.service")).environment["D"] == "t"
    (tmp_path / "n@a1.service.d" / "30-z.conf").write_text("[Service]\nEnvironment=\n"
                                                           "Environment=E=5\n")
    assert Unit("n@a1.service", str(tmp_path / "n@.service")).environment == {"E": "5"}
    (tmp_path / "n@a1.service.d" / "40-bad.conf").write_text("[Service]\nEnvironment=oops\n")
    with pytest.raises(HostError, match="'oops' is not KEY=VALUE"):
        Unit("n@a1.service", str(tmp_path / "n@.service"))
