"""The mirror says what is wrong, and every wait has a bound (issue 16,
items 2, 7, 15 and the mirror-log part of 17), through the real ``cgmirror``
CLI (tests/clishell.py) against real nbdkit nodes.

- Item 2: a secondary's failure (a refused connection, an I/O error from
  nbdkit's ``error`` filter) shows in ``mirror status`` on its pair and
  node, and is cleared once a group hardens; after a DR test or a failover
  status shows the direction, parks the ETA, and says what the old
  primary is instead of "hardened none yet".
- Item 7: ``verify`` with no group able to form exits 4 within its bound,
  in one line naming the group it waited after and why.
- Item 15: the session file edited under a running mirror (a volume
  removed, a slave renamed): no group forms, one log line and status say
  what changed and to restart; put back, groups form again.
- Item 17: every mirror log line has an ISO-8601 UTC time (none under the
  journal) and idle groups are summarized, not logged one by one.
"""

from __future__ import annotations

import os
import re
import time

import nbd
import pytest

from clishell import Shell
from cgtest import need
from harness.mirrorrig import mirror_session

SIZE = 4 << 20
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z cgmirror mirror: ")


def text(volumes=("a",), **mirror) -> str:
    return mirror_session("op", {"s1": "r1"}, volumes, size=SIZE,
                          mirror={"interval_ms": 100, "max_drain_ms": 10000, **mirror})


@pytest.fixture
def shell(run_dir):
    need("nbdkit")
    made = []

    def make(t=None):
        made.append(Shell(run_dir, t or text()))
        return made[-1]

    yield make
    for sh in made:
        sh.close()


def write(sh: Shell, volume="a", data=b"x" * 65536, offset=0) -> None:
    """Host writes on s1's export ``volume``."""
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{volume}?socket={os.path.join(sh.dir, 's1.sock')}")
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def started(sh: Shell, own_r1: bool = False):
    """s1 and r1 up (r1 a child of the test if ``own_r1``: ``secondary
    stop`` waits for the mirror's lock), the mirror past group 1."""
    sh.ok("slave", "start")
    r1 = sh.start_node(sh.node_spec("r1")) if own_r1 else sh.ok("secondary", "start")
    sh.start_mirror()
    h = sh.wait_hardened()
    return (h, r1) if own_r1 else h


def pair(doc, s="s1", v="a") -> dict:
    return doc["volumes"][s][v]


# ------------------------------------------------------------------ item 2

def test_a_refusing_secondary_shows_on_its_pair_and_clears_once_a_group_hardens(shell):
    sh = shell()
    _, r1 = started(sh, own_r1=True)
    r1.stop()
    # the drain under way fails on the pair, the next groups on the node
    doc = sh.poll(lambda d: "r1" in d["failures"]["nodes"] and d, what="r1's failure")
    assert "r1" in pair(doc)["error"], doc
    out = sh.ok("mirror", "status")
    row = next(x for x in out.splitlines() if x.startswith("s1 "))
    assert pair(doc)["error"][:30] in row, out              # the ERROR column
    assert "node r1 failed" in out, out
    formed = doc["groups_formed"]
    sh.start_node(sh.node_spec("r1"))
    doc = sh.poll(lambda d: d["groups_formed"] > formed and d, what="a group after restart")
    assert pair(doc)["error"] is None and not doc["failures"]["nodes"], doc


def test_an_io_error_on_the_secondary_names_the_pair(shell):
    """nbdkit's error filter fails r1's writes: the pair's row says so."""
    sh = shell()
    sh.ok("slave", "start")
    flag = os.path.join(sh.dir, "fail-writes")
    spec = sh.node_spec("r1")
    spec.filters = ["error"]
    spec.filter_args = ["error-pwrite=EIO", "error-pwrite-rate=100%",
                        f"error-pwrite-file={flag}"]
    sh.start_node(spec)
    sh.start_mirror()
    h = sh.wait_hardened()
    open(flag, "w").close()
    write(sh)
    doc = sh.poll(lambda d: d["failures"]["pairs"].get("s1/a") and d,
                  what="the pair's drain failure")
    f = doc["failures"]["pairs"]["s1/a"]
    assert f["group"] > h and pair(doc)["error"] == f["error"], doc
    assert pair(doc)["failed_group"] == f["group"]
    out = sh.ok("mirror", "status")
    assert f["error"][:30] in next(x for x in out.splitlines() if x.startswith("s1 ")), out
    formed = sh.status()["groups_formed"]
    os.unlink(flag)
    doc = sh.poll(lambda d: d["groups_formed"] > formed and d,
                  what="a group after the errors stop")
    assert pair(doc)["error"] is None and not doc["failures"]["pairs"], doc


def test_status_after_a_dr_test_and_a_failover_shows_the_direction(shell):
    """DR test: state parked, the direction, ETA "parked" (it said "1 s");
    failover: the direction, and s1 (still a primary) is said to be one,
    not "hardened none yet"."""
    sh = shell()
    started(sh)
    sh.ok("failover", "--test")
    write(sh)
    doc = sh.poll(lambda d: pair(d)["behind_bytes"] and d, what="blocks behind")
    assert doc["state"] == "parked" and "end-test" in doc["why"], doc
    assert doc["direction"]["state"] == "dr-test", doc
    out = sh.ok("mirror", "status")
    assert "direction: site a is the source (dr-test)" in out, out
    row = next(x for x in out.splitlines() if x.startswith("s1 "))
    assert " parked " in row and " 1 s " not in row, out
    sh.ok("failover", "--end-test")
    sh.stop_mirror()
    sh.ok("failover")
    out = sh.ok("mirror", "status")
    assert "direction: site b is the source (failed-over, from site a)" in out, out
    line = next(x for x in out.splitlines() if x.startswith("secondary s1:"))
    assert "none yet" not in line and "runs as a primary" in line, out
    assert "failback" in line, out


# ------------------------------------------------------------------ item 7

def test_verify_gives_up_in_one_line_when_no_group_can_form(shell):
    """r1 down: verify exits 4 (it waited forever), saying after which
    group it waited and why none came."""
    sh = shell()
    h, r1 = started(sh, own_r1=True)
    r1.stop()
    sh.poll(lambda d: d["groups_failed"] > 0, what="a failed group")
    t0 = time.monotonic()
    p = sh.run("verify", timeout=150)
    took = time.monotonic() - t0
    assert p.returncode == 4, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert "verify gave up" in p.stderr and "r1" in p.stderr, p.stderr
    assert re.search(r"after group \d+", p.stderr) and "mirror status" in p.stderr
    assert took < 120, took                     # the bound, not a hang
    # --timeout bounds it too; a bad one is refused in one line
    p = sh.run("verify", "--timeout", "x")
    assert p.returncode == 2 and "--timeout" in p.stderr, p.stderr
    sh.start_node(sh.node_spec("r1"))
    sh.wait_hardened(h)
    out = sh.ok("verify", "--timeout", "60")
    assert "no block differs" in out, out


# ------------------------------------------------------------------ item 15

def test_a_session_file_edited_under_the_mirror_stops_groups_and_says_what_changed(shell):
    original = text(("a", "b"))
    sh = shell(original)
    started(sh)
    # a volume removed from the file
    sh.write_session(text(("a",)))
    doc = sh.poll(lambda d: d["state"] == "severe" and "session file" in (d["why"] or "")
                  and d, what="the edit noticed")
    assert "volume s1/b removed" in doc["why"] and "restart" in doc["why"], doc["why"]
    h, failed = doc["hardened"], doc["groups_failed"]
    doc = sh.poll(lambda d: d["groups_failed"] >= failed + 2 and d, what="more refusals")
    assert doc["hardened"] == h, doc                     # no group formed meanwhile
    assert sh.log().count("changed under the running mirror") == 1, sh.log()
    # put back: groups form again
    sh.write_session(original)
    sh.wait_hardened(h)
    # a slave renamed in the file
    sh.write_session(original.replace('name = "s1"', 'name = "s9"')
             .replace('"s1-', '"s9-'))
    doc = sh.poll(lambda d: "renamed" in (d["why"] or "") and d, what="the rename")
    assert "slave s1 renamed to s9" in doc["why"], doc["why"]
    out = sh.ok("mirror", "status")
    assert "slave s1 renamed to s9" in out, out
    sh.write_session(original)
    sh.wait_hardened(doc["hardened"])


# ------------------------------------------------------------------ item 17

def test_the_mirror_log_is_time_stamped_and_quiet_when_idle(shell, run_dir):
    sh = shell()
    h = started(sh)
    sh.wait_hardened(h + 19)                   # idle groups, ten a second
    write(sh)
    sh.wait_hardened(h + 24)
    sh.stop_mirror()
    lines = sh.log().splitlines()
    bad = [x for x in lines if not STAMP.match(x)]
    assert not bad, bad
    # an empty group is said alone only as the first after a failure
    failures = [x for x in lines if re.search(r"group \d+ (failed|aborted|drain-timeout)|"
                                              r"cannot form", x)]
    assert len([x for x in lines if ": 0 bytes" in x]) <= len(failures), lines
    assert any(" bytes, hold" in x for x in lines), lines    # the write's group
    empties = [re.search(r"(\d+) empty groups? hardened since (\S+), last group (\d+)", x)
               for x in lines]
    empties = [m for m in empties if m]
    assert sum(int(m.group(1)) for m in empties) >= 15, lines
    assert len(lines) < 20, lines
    # Under the journal (JOURNAL_STREAM names stderr) the journal stamps lines.
    os.unlink(sh.mirror_log)
    open(sh.mirror_log, "w").close()
    st = os.stat(sh.mirror_log)
    sh.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    sh.start_mirror()
    sh.wait_hardened(h + 25)
    sh.stop_mirror()
    lines = sh.log().splitlines()
    assert lines and all(x.startswith("cgmirror mirror: ") for x in lines), lines
