"""Every hint names a command that works in the state that shows it (issue
16, item 16), and each is run here as printed.

Each test puts real nodes (started with the ``cgmirror`` CLI) in the state
that shows a hint, takes the command out of the message
(``hintrig.commands``), runs exactly that, and checks that it succeeds
and that the state it promised follows (a group hardens, the images are
equal, the node answers).  The hints:

- a mirrored pair whose secondary no longer holds the baseline, the mirror
  running: restart ``cgmirror mirror run`` (it said ``cgmirror copy
  --full``, which exits BUSY beside the mirror and "'targets' must have 1
  to 1024 entries" without it);
- a fixed copy target that no longer holds the baseline, and ``copy
  --incremental`` without one: ``cgmirror copy --full``;
- ``cgmirror copy`` of a mirrored session: with the mirror stopped
  ``cgmirror resync --from a --to b --full`` and ``cgmirror mirror run``;
  beside the running mirror ``cgmirror mirror status``; after a failover
  ``cgmirror failback``;
- ``mirror pause`` with no mirror: ``cgmirror mirror run``;
- ``status`` of a stopped node: ``cgmirror slave|secondary start NAME``,
  also after a failover (the ``[[secondary]]`` nodes are the primaries and
  ``slave start`` does not know their names); of a node in the wrong role
  (a healthy primary after a failover: the split): ``cgmirror failback``;
- ``failover`` with a secondary down: ``cgmirror secondary start``, then the
  command again; the role commands' own lines (``failover --end-test``,
  ``failback``, ``failover --test``);
- ``mirror run`` after a failover: ``cgmirror failback`` or ``cgmirror
  resync --from b --to a``; in a half-done switchover (and ``copy``):
  ``cgmirror switchover``; ``failover`` to site a with a ``[[slave]]`` down:
  ``cgmirror slave start``;
- ``verify`` finding blocks that differ: ``cgmirror verify --repair``;
- a secondary's volume deleted (``cp /proc/PID/fd/N PATH`` or not, a
  restart and ``cgmirror resync --from a --to b --full``: a file copied
  back is a replaced one too), resized (``truncate -s SIZE
  PATH``), its state file damaged (remove the named directory);
- a DR test's site running as a primary is not reported as a wrong role;
- ``check`` of a TCP session without certificates: ``cgmirror pki issue``
  with the directory and the address the node is dialled by, and ``pki
  issue`` without a CA: ``cgmirror pki init --dir DIR``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time

import pytest

from cgtest import need
from clishell import CLI
from hintrig import COPIED, MIRRORED, Shell, commands, same_bytes, scribble, the_command

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def shell(run_dir):
    need("nbdkit")
    made = []

    def make(text: str = MIRRORED) -> Shell:
        made.append(Shell(run_dir, text))
        return made[-1]

    yield make
    for sh in made:
        sh.close()


def mirrored(shell) -> Shell:
    """A mirrored session's nodes, started, with s1/a holding data (a zero
    image would pass any baseline sample of a zero target)."""
    import nbd
    sh = shell()
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///a?socket={sh.path('s1.sock')}")
    try:
        h.pwrite(os.urandom(4 << 20), 0)
        h.flush()
    finally:
        h.shutdown()
    return sh


def test_the_commands_of_a_message_are_found_as_printed():
    """The extraction the other tests rely on."""
    msg = ("cgmirror: x: start the mirror with `cgmirror mirror run`, or copy every pair"
           " whole with `cgmirror resync --from a --to b --full`")
    assert commands(msg) == [["mirror", "run"], ["resync", "--from", "a", "--to", "b",
                                                   "--full"]]
    assert commands("s1 is not running (start it with: cgmirror slave start s1)") == [
        ["slave", "start", "s1"]]
    assert commands("no hint here") == []


def test_a_mirrored_pair_that_lost_its_baseline_is_copied_whole_by_a_restart(shell):
    """The secondary's image is overwritten behind the mirror's back: every
    group fails naming a restart of the mirror, and the restart, run as
    printed, copies the pair whole (the images are equal again)."""
    sh = mirrored(shell)
    sh.start_mirror()
    h = sh.wait_hardened()
    scribble(sh.path("r1-a.img"))
    import nbd                             # a group with data checks the baseline
    w = nbd.NBD()
    w.connect_uri(f"nbd+unix:///a?socket={sh.path('s1.sock')}")
    w.pwrite(b"x" * 4096, 0)
    w.shutdown()
    err = sh.wait_group_error("no longer holds the baseline")
    assert "copy --full" not in err, err
    cmd = the_command(err)
    assert cmd == ["mirror", "run"], err
    sh.stop_mirror()
    sh.start_mirror(tuple(cmd))
    sh.wait_hardened(h)
    sh.stop_mirror()                       # nothing written since: the images match
    assert same_bytes(sh.path("s1-a.img"), sh.path("r1-a.img"))


@pytest.fixture
def nbdkit_target(run_dir):
    """An ``nbdkit file`` copy target on a unix socket (4 MiB), stopped by pid."""
    need("nbdkit")
    sock, img = os.path.join(run_dir, "t.sock"), os.path.join(run_dir, "t.img")
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            break
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
    yield sock, img
    p.terminate()
    p.wait(timeout=30)


def test_a_copy_target_without_its_baseline_is_copied_whole_as_the_hint_says(
        shell, nbdkit_target):
    """``copy --incremental`` to a target never copied to, and ``copy`` to
    a target overwritten since: both name ``cgmirror copy --full``, which
    then succeeds and leaves the target equal to the volume."""
    sock, img = nbdkit_target
    sh = shell(COPIED.format(target=sock))
    sh.ok("slave", "start")
    err = sh.fails("copy", "--incremental")
    cmd = the_command(err)
    assert cmd == ["copy", "--full"], err
    sh.ok(*cmd)
    assert same_bytes(sh.path("s1-a.img"), img)
    sh.ok("copy")                          # incremental: the baseline holds
    scribble(img)
    err = sh.fails("copy")
    assert "no longer holds the baseline" in err, err
    cmd = the_command(err)
    assert cmd == ["copy", "--full"], err
    sh.ok(*cmd)
    assert same_bytes(sh.path("s1-a.img"), img)


def test_copy_of_a_mirrored_session_names_what_to_run_in_each_state(shell):
    """``cgmirror copy`` of a session that mirrors: one line (exit 2,
    USAGE), no cut taken, and a command that works: stopped, ``resync
    --full`` and ``mirror run``; beside the mirror, ``mirror status``;
    after a failover, ``failback``."""
    sh = mirrored(shell)
    n0 = json.loads(sh.ok("status", "--json"))["slaves"]["s1"]["n"]
    p = sh.run("copy", "--full")
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "'targets'" not in err and "mirrors s1/a" in err, err
    assert json.loads(sh.ok("status", "--json"))["slaves"]["s1"]["n"] == n0  # no cut
    resync = the_command(err, "resync")
    assert resync == ["resync", "--from", "a", "--to", "b", "--full"], err
    assert "hardened as group" in sh.ok(*resync)
    assert same_bytes(sh.path("s1-a.img"), sh.path("r1-a.img"))
    sh.start_mirror(tuple(the_command(err, "mirror")))
    h = sh.wait_hardened()

    err = sh.fails("copy")                             # beside the running mirror
    assert "BUSY" not in err and "busy" not in err, err
    cmd = the_command(err)
    assert cmd == ["mirror", "status"], err
    assert "hardened group" in sh.ok(*cmd)
    assert sh.wait_hardened(h) > h                     # and the mirror goes on

    sh.stop_mirror()
    sh.ok("failover")
    err = sh.fails("copy")
    assert "failover" in err, err
    cmd = the_command(err, "failback")
    sh.ok(*cmd, timeout=240)
    assert json.loads(sh.ok("status", "--json"))["direction"]["source"] == "a"


def test_a_mirror_command_without_a_mirror_names_mirror_run(shell):
    """``mirror pause`` with no mirror exits 4 naming ``cgmirror mirror
    run``; started as printed, the mirror forms groups and pauses."""
    sh = mirrored(shell)
    p = sh.run("mirror", "pause")
    assert p.returncode == 4, p.stderr
    sh.start_mirror(tuple(the_command(p.stderr)))
    sh.wait_hardened()
    sh.ok("mirror", "pause")


def test_mirror_run_after_a_failover_names_failback(shell):
    """After a failover ``mirror run`` refuses in one line naming
    ``failback``, which then works; the mirror runs after it."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    out = sh.run("failover")
    assert out.returncode == 0, out.stderr
    assert ["failback"] in commands(out.stderr), out.stderr     # its own last line
    p = sh.run("mirror", "run", timeout=60)
    assert p.returncode != 0
    assert ["failback"] in commands(p.stderr), p.stderr
    cmd = the_command(p.stderr, "resync")            # the other command it names
    assert cmd == ["resync", "--from", "b", "--to", "a"], p.stderr
    sh.ok(*cmd, timeout=240)
    sh.start_mirror()                                # now from site b
    sh.wait_hardened()


def test_verify_names_its_repair_and_the_repair_makes_the_images_equal(shell):
    """A block of the primary's image changed behind nbdkit's back (no bit
    marks it): ``verify`` exits 1 naming ``cgmirror verify --repair``; run as
    printed, the next group sends the block and ``verify`` finds none."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    with open(sh.path("s1-a.img"), "r+b") as f:
        f.write(b"\xa5" * 4096)
        f.flush()
        os.fsync(f.fileno())
    p = sh.run("verify", timeout=200)
    assert p.returncode == 1, p.stdout + p.stderr
    cmd = the_command(p.stdout)
    assert cmd == ["verify", "--repair"], p.stdout
    h = sh.status()["hardened"]
    sh.ok(*cmd, timeout=200)
    sh.wait_hardened(h + 1)
    sh.ok("verify", timeout=200)
    sh.stop_mirror()
    assert same_bytes(sh.path("s1-a.img"), sh.path("r1-a.img"))


def test_a_switchover_killed_half_way_names_itself_again(shell):
    """``switchover`` killed -9 once site a is demoted: ``mirror run`` (and
    ``copy``) name ``cgmirror switchover`` again, which finishes it; the
    mirror then runs from site b."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    p = subprocess.Popen([*CLI, "switchover"], cwd=sh.dir, env=sh.env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in p.stderr:                # killed at its first demotion
            if "now runs as a secondary" in line:
                p.kill()
                break
    finally:
        p.kill()
        p.wait(timeout=60)
        p.stderr.close()
    doc = json.loads(sh.run("status", "--json").stdout)  # exit 3: nodes half switched
    assert doc["direction"]["state"] == "switching", doc["direction"]
    for args in (("mirror", "run"), ("copy",)):
        p = sh.run(*args, timeout=60)
        assert p.returncode != 0
        assert the_command(p.stderr, "switchover") == ["switchover"], p.stderr
    sh.ok("switchover", timeout=240)
    assert json.loads(sh.run("status", "--json").stdout)["direction"] == {
        "source": "b", "state": "mirroring"}
    sh.start_mirror()
    sh.wait_hardened()
    # Site a holds the secondaries now: a failover to it with s1 down names
    # `cgmirror slave start` (it named `secondary start`: "no secondary 's1'").
    sh.stop_mirror()
    sh.ok("slave", "stop")
    err = sh.fails("failover")
    start = the_command(err, "slave")
    assert start == ["slave", "start"], err
    sh.ok(*start)
    sh.ok("failover")
    assert json.loads(sh.run("status", "--json").stdout)["direction"]["source"] == "a"


def test_status_names_the_start_of_a_stopped_node_in_either_direction(shell):
    """``status`` of a stopped node names ``cgmirror slave|secondary start
    NAME`` as the session file spells the node; after a failover r1 is a
    primary but still ``secondary start r1`` (``slave start r1`` is "no
    slave 'r1'").  A node in the wrong role (s1, a healthy primary after the
    failover: the sites are split) names the role command that ends it --
    not its stop and start: a node starts in its recorded role (issue 18)."""
    sh = mirrored(shell)
    sh.ok("slave", "stop", "s1")
    p = sh.run("status", "--json")
    err = json.loads(p.stdout)["slaves"]["s1"]["error"]
    cmd = the_command(err)
    assert cmd == ["slave", "start", "s1"], err
    sh.ok(*cmd)
    assert json.loads(sh.ok("status", "--json"))["slaves"]["s1"]["reachable"]

    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    sh.ok("failover")

    sh.ok("secondary", "stop", "r1")
    doc = json.loads(sh.run("status", "--json").stdout)
    err = doc["slaves"]["r1"]["error"]
    cmd = the_command(err)
    assert cmd == ["secondary", "start", "r1"], err
    sh.ok(*cmd)
    doc = json.loads(sh.run("status", "--json").stdout)
    assert doc["slaves"]["r1"]["reachable"] and doc["slaves"]["r1"]["error"] is None

    # s1 still runs as a primary (its own record), the direction makes it a
    # secondary: status shows the split, and s1's row names the command.
    assert doc["split"] and "`cgmirror failback`" in doc["split"]["line"], doc["split"]
    err = doc["secondaries"]["s1"]["error"]
    cmd = the_command(err)
    assert cmd == ["failback"], err
    sh.ok(*cmd, timeout=240)
    doc = json.loads(sh.ok("status", "--json"))
    assert doc["direction"]["source"] == "a" and doc["split"] is None, doc
    assert doc["slaves"]["s1"]["error"] is None and doc["slaves"]["s1"]["role"] == "primary"
    assert doc["secondaries"]["r1"]["error"] is None, doc["secondaries"]["r1"]
    assert doc["secondaries"]["r1"]["role"] == "secondary"


def test_the_role_commands_name_commands_that_work(shell):
    """``failover --end-test`` without a test names ``failover --test``;
    the test's line names ``failover --end-test``; ``failover`` with its
    secondary down names ``secondary start`` and then itself again."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    err = sh.fails("failover", "--end-test")
    cmd = the_command(err)
    assert cmd == ["failover", "--test"], err
    p = sh.run(*cmd)
    assert p.returncode == 0, p.stderr
    cmd = the_command(p.stderr, "failover")
    assert cmd == ["failover", "--end-test"], p.stderr
    # r1 runs as a primary for the test, as the direction says: no restart hint.
    doc = json.loads(sh.run("status", "--json").stdout)
    assert doc["secondaries"]["r1"]["error"] is None, doc["secondaries"]["r1"]
    sh.ok(*cmd)

    sh.ok("secondary", "stop")
    err = sh.fails("failover")
    start = the_command(err, "secondary")
    assert start == ["secondary", "start"], err
    assert "run the command again" in err
    sh.ok(*start)
    sh.ok("failover")


def test_certificate_hints_make_certificates_that_work(shell):
    """``check`` of a TCP session without certificates names, per node,
    ``cgmirror pki issue`` with the directory and the address it is
    dialled by; without a CA that command names ``pki init --dir``.  Run
    as printed (and the coordinator's), the nodes start and mirror."""
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    text = MIRRORED.replace('[session]\n', '[session]\npki = "pki"\ncert = "coordinator"\n')
    for n in ("s1", "r1"):
        text = text.replace(f'nbd_socket = "{n}.sock"\ncontrol = "{n}.ctl"',
                            f'control = "tcp:127.0.0.1:{port()}"\n'
                            f'nbd = "tcp:127.0.0.1:{port()}"')
    sh = shell(text)
    p = sh.run("check")
    assert p.returncode == 3, p.stderr
    issues = [c for c in commands(p.stderr) if c[:2] == ["pki", "issue"]]
    assert {c[2] for c in issues} == {"s1", "r1", "coordinator"}, p.stderr
    assert all("--ip" in c for c in issues if c[2] != "coordinator"), p.stderr
    err = sh.fails(*issues[0])
    init = the_command(err, "pki")
    assert init[:2] == ["pki", "init"] and "--dir" in init, err
    sh.ok(*init)
    for c in issues:
        if c[2] != "coordinator":
            sh.ok(*c)
    err = sh.fails("status")                 # the coordinator's certificate is missing
    cmd = the_command(err, "pki")
    assert cmd[:3] == ["pki", "issue", "coordinator"], err
    sh.ok(*cmd)
    sh.ok("check")
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    sh.wait_hardened()


def shell_command(message: str, pattern: str) -> list[str]:
    """A shell command a message names (``cp ...`` in backquotes,
    ``truncate ...`` in parentheses), as argv."""
    m = re.search(pattern, message)
    assert m, f"no {pattern!r} in: {message}"
    return shlex.split(m.group(1))


@pytest.mark.parametrize("how", ["copy-back", "only-restart"])
def test_a_deleted_secondary_volume_is_brought_back_as_its_hint_says(shell, how):
    """The secondary's image is unlinked while the mirror runs: groups fail
    naming ``cp /proc/PID/fd/N PATH`` (which keeps the site's data), a
    restart of the node and ``cgmirror resync --from a --to b --full``.
    Copied back or not, the file at the path after the restart is a new one
    to the pair (issue 18: a replaced image): ``mirror run`` forms no group
    over it.  Run as printed, the resync copies it whole, groups harden
    again and the images match."""
    sh = mirrored(shell)
    sh.start_mirror()
    h = sh.wait_hardened()
    os.unlink(sh.path("r1-a.img"))
    err = sh.wait_group_error("was deleted")
    if how == "copy-back":
        subprocess.run(shell_command(err, r"`(cp [^`]+)`"), check=True, timeout=60)
    sh.stop_mirror()
    sh.ok("secondary", "stop", "r1")
    sh.ok("secondary", "start", "r1")
    def mirror_log() -> str:
        with open(sh.mirror_log) as f:
            return f.read()

    if how == "copy-back":
        # The copy is a new inode (made while the node still held the old
        # one): a replaced image, no group forms over it.  (A file the node
        # makes after the restart may get the freed inode number back; the
        # mirror's baseline sample then catches it instead.)
        before = len(mirror_log())
        sh.start_mirror()
        deadline = time.monotonic() + 60
        while "is not the file node r1 served" not in (log := mirror_log()[before:]):
            assert time.monotonic() < deadline, log
            time.sleep(0.2)
        sh.stop_mirror()
        assert "--full" in log and " hardened" not in log, log
    cmd = the_command(err)
    assert cmd == ["resync", "--from", "a", "--to", "b", "--full"], err
    sh.ok(*cmd, timeout=240)
    sh.start_mirror()
    sh.wait_hardened(h)
    sh.stop_mirror()
    assert same_bytes(sh.path("s1-a.img"), sh.path("r1-a.img"))


def test_a_resized_secondary_volume_is_restored_by_the_printed_truncate(shell):
    """The secondary's image grows behind its node: groups fail naming
    ``truncate -s SIZE PATH``; run as printed, groups harden again with no
    restart."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    with open(sh.path("r1-a.img"), "r+b") as f:
        f.truncate(8 << 20)
    err = sh.wait_group_error("bytes, it was")
    subprocess.run(shell_command(err, r"\((truncate -s \d+ [^)]+)\)"), check=True, timeout=60)
    h = sh.status()["hardened"]
    sh.wait_hardened(h)
    assert os.path.getsize(sh.path("r1-a.img")) == 4 << 20


def test_a_damaged_secondary_state_file_names_a_directory_to_remove(shell):
    """``secondary.json`` edited into garbage: the node does not start, and
    the line names the state directory to remove; removed as printed, the
    node starts and the mirror copies its volume whole (new export name)."""
    sh = mirrored(shell)
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    sh.ok("secondary", "stop", "r1")
    with open(sh.path("r1", "secondary.json"), "w") as f:
        f.write("{not json")
    p = sh.run("secondary", "start", "r1")
    assert p.returncode != 0
    sh.run("secondary", "stop", "r1")   # a start that timed out under load leaves none
    gone = shell_command(p.stderr, r"or remove (\S+) and start the node again")
    assert len(gone) == 1 and os.path.samefile(gone[0], sh.path("r1")), p.stderr
    shutil.rmtree(gone[0])
    sh.ok("secondary", "start", "r1")
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    with open(sh.mirror_log) as f:
        assert "first full copy" in f.read()
    assert same_bytes(sh.path("s1-a.img"), sh.path("r1-a.img"))


def test_an_expired_certificate_names_how_to_issue_it_again(shell):
    """A slave whose certificate has expired: the coordinator's line says so
    and names ``cgmirror check``, which (its directory removed) names the
    ``cgmirror pki issue`` that makes a new one; the slave then starts."""
    import datetime
    from coordinator import pki

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    text = COPIED.replace('[session]\n', '[session]\npki = "pki"\ncert = "coordinator"\n')
    text = text.replace('nbd_socket = "s1.sock"\ncontrol = "s1.ctl"',
                        f'control = "tcp:127.0.0.1:{port()}"\nnbd = "tcp:127.0.0.1:{port()}"')
    sh = shell(text.format(target="/nonexistent.sock"))
    sh.ok("pki", "init", "--dir", "pki")
    sh.ok("pki", "issue", "coordinator", "--dir", "pki")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    pki.issue(sh.path("pki"), "s1", ips=["127.0.0.1"], days=1, valid_from=past)
    p = sh.run("slave", "start", timeout=90)
    assert p.returncode != 0 and "certificate has expired" in p.stderr, p.stderr
    assert the_command(p.stderr, "check") == ["check"], p.stderr
    sh.run("slave", "stop")
    shutil.rmtree(sh.path("pki", "s1"))            # "that host's directory"
    p = sh.run("check")
    issue = the_command(p.stderr, "pki")
    assert issue[:3] == ["pki", "issue", "s1"], p.stderr
    sh.ok(*issue)
    sh.ok("slave", "start")
    assert json.loads(sh.ok("status", "--json"))["slaves"]["s1"]["reachable"]
