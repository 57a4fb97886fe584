"""Split brain and identity as an operator meets them (issue 18, items 3-5):
the real ``cgmirror`` CLI as child processes, nodes started by ``cgmirror
slave|secondary start`` (each under its supervisor, so that a role op's
exit 75 is followed by a start in the recorded role), a real ``cgmirror
mirror run``, and the dependent-write checker (harness/workload.py) on the
images a user would read (rig: tests/rolerig.py).

- ``failover`` run while site a is healthy: a stays a primary (its own
  record) and takes writes, b takes writes; ``status`` says the sites are
  split, with the command that resolves it; ``failback`` is refused in one
  line naming both generations; ``resync --from b --to a
  --keep-overwritten DIR`` names the winner, says how many blocks of a it
  overwrites and keeps them.
- A primary's file replaced behind its stopped node: the mirror forms no
  group and says so; status says so; ``resync --full`` joins them again.
- A second session naming a live secondary: every request it sends is
  refused by the node (kind session), so its commands stop in one line
  before anything is done, and the first session's image is untouched.
"""

from __future__ import annotations

import json
import os

import pytest

from cgtest import need, wait_until
from coordinator import launch, session
from coordinator.errors import SlaveError
from coordinator.link import SlaveLink
from harness import workload as wl
from harness.mirrorrig import mirror_session
from rolerig import LAYOUT, NAME, SIZE, VOLS, Shell

G = LAYOUT.granularity


@pytest.fixture
def sh(run_dir):
    need("nbdkit")
    with Shell(run_dir) as shell:
        yield shell


def mirrored(sh: Shell) -> int:
    """Nodes up, a workload mirrored, the mirror stopped; the group hardened."""
    sh.mirrored()
    sh.stop_mirror()
    return sh.node("r1")["hardened"]


def test_failover_with_site_a_healthy_then_failback_is_refused_as_split_brain(sh):
    """Both sites written after a failover that site a survived: status on
    the session reports the split and the resolving command; failback is
    refused in one line and changes nothing; a resync naming b the winner
    overwrites a's blocks only after keeping them, and says how many."""
    mirrored(sh)
    sh.ok("failover")
    assert sh.role("r1") == "primary"
    assert sh.role("s1") == "primary"           # healthy: it never heard of it
    sh.write("s1", 20)                          # acknowledged at a, after the split
    sh.write("r1", 15)                          # and at b
    sh.check("r1")
    p = sh.run("status")
    assert p.returncode != 0
    line = [x for x in p.stderr.splitlines() if "split:" in x]
    assert line and "both written since generation" in line[0], p.stderr
    assert "cgmirror resync --from b --to a" in line[0], line
    doc = json.loads(sh.run("status", "--json").stdout)
    assert doc["split"] and {x["kind"] for x in doc["split"]["pairs"]} == {"diverged"}

    err = sh.fails("failback")
    assert "split brain" in err and "lineage rule" in err, err
    assert "resync --from b --to a" in err and len(err.strip().splitlines()) == 1, err
    assert sh.role("s1") == "primary" and sh.role("r1") == "primary"   # nothing changed
    assert sh.direction()["state"] == "failed-over"

    before = sh.images("s1")
    keep = sh.path("kept")
    p = sh.run("resync", "--from", "b", "--to", "a", "--keep-overwritten", keep)
    assert p.returncode == 0, p.stderr
    said = [x for x in p.stderr.splitlines() if "named the winner: the resync overwrites" in x]
    assert said and "kept in" in said[0], p.stderr
    assert sh.role("s1") == "secondary"
    sh.assert_equal()
    sh.check("s1")
    # Every block the resync overwrote is kept with a's content of before.
    kept_any = 0
    for v, img in zip(VOLS, before):
        with open(os.path.join(keep, f"s1-{v}.runs.json")) as f:
            runs = json.load(f)["bytes"]
        with open(os.path.join(keep, f"s1-{v}.img"), "rb") as f:
            kept = f.read()
        for off, n in runs:
            assert kept[off:off + n] == img[off:off + n], (v, off)
            kept_any += n
    assert kept_any > 0
    assert sh.run("status").returncode == 0, "still split after the resync"


def test_a_replaced_primary_file_is_refused_by_the_mirror(sh):
    """s1's volume a replaced behind its stopped node by a copy with other
    blocks: the node marks it replaced at start, the mirror forms no group
    and says why (history), status says so; `resync --full` joins them."""
    h = mirrored(sh)
    sh.ok("slave", "stop", "s1")
    img = sh.path("s1-a.img")
    with open(img, "rb") as f:
        data = bytearray(f.read())
    # 60 pieces outside every record slot of the workload (its checker
    # reads the slots only), so the replaced image is still consistent.
    slots = {LAYOUT.offset(w, x) // wl.RECORD for w in range(LAYOUT.writers)
             for x in range(LAYOUT.slots)}
    free = [p for p in range(SIZE // wl.RECORD) if p not in slots][::7][:60]
    for p in free:
        data[p * wl.RECORD:p * wl.RECORD + 4] = b"\x5a\x5a\x5a\x5a"
    tmp = img + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, img)
    sh.ok("slave", "start", "s1")
    p = sh.run("status")
    assert p.returncode != 0 and "is not the file node s1 served" in p.stderr, p.stderr
    sh.start_mirror()
    wait_until(lambda: "is not the file node s1 served" in sh.log(), 120,
               "the mirror to refuse the replaced file")
    err = next(x for x in sh.log().splitlines() if "is not the file node s1 served" in x)
    assert "cannot form a group" in err and "--full" in err, err
    assert sh.node("r1")["hardened"] == h                 # nothing formed
    sh.stop_mirror()
    sh.ok("resync", "--from", "a", "--to", "b", "--full")
    assert sh.images("s1")[0] == sh.images("r1")[0]
    sh.check("r1")


def test_a_second_session_on_a_live_secondary_is_refused(sh):
    """A second session file naming r1 (its sockets, its paths) with a
    primary of its own: the node refuses its requests (kind session) and
    the session file check refuses it in one line; r1 keeps its group."""
    h = mirrored(sh)
    text = mirror_session("other", {"s9": "r1"}, VOLS, size=SIZE)
    with open(sh.path("other.toml"), "w") as f:
        f.write(text)
    with pytest.raises(SlaveError, match=f"belongs to session {NAME}") as ei:
        with SlaveLink("r1", sh.path("r1.ctl"), session="other") as lk:
            lk.status()
    assert "\n" not in str(ei.value)
    p = sh.run("-s", sh.path("other.toml"), "status")
    assert p.returncode != 0
    assert f"node r1 belongs to session {NAME}, not other" in p.stderr, p.stderr
    other = sh.path("other.toml")
    # Its own primary starts (a node of its own); its full copy (which would
    # overwrite r1's image) and its mirror are refused in one line before
    # anything is done.
    sh.ok("-s", other, "slave", "start", "s9")
    try:
        for args in (("resync", "--from", "a", "--to", "b", "--full"), ("mirror", "run")):
            err = sh.fails("-s", other, *args)
            assert f"belongs to session {NAME}, not other" in err, (args, err)
    finally:
        # `slave stop` of the other session is refused too (its file names
        # r1): stop s9 and its supervisor by their pidfiles.
        launch.stop(session.load(other).slave("s9").spec())
    st = sh.node("r1")
    assert st["hardened"] == h and st["session"] == NAME
    sh.check("r1")
