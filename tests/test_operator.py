"""What an operator runs, run as an operator runs it (issue 16): the
``cgmirror`` command in a shell, against nodes it started itself, on a
mirrored session.

- ``cgmirror status`` on a mirrored session (item 3): a volume mirrored to a
  secondary shows the group the secondary hardened, every secondary has a
  row, and after a failover it still answers (the nodes in the roles the
  direction gives them) instead of an internal error.
- Files and directories under ``umask 000`` (item 10) have the modes
  cgmirror chose.
- Output to a reader that goes away (``| head``) ends quietly, and a role
  command's result is a sentence, not a Python dict (item 17).
"""

from __future__ import annotations

import os
import stat

import pytest

from cgtest import need
from clishell import ROOT, Shell, mirrored_session

SESSION = mirrored_session("op", state_dir="state/op")     # a parent to create


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_session() -> str:
    """SESSION with every node on TCP (loopback) and mutual TLS."""
    text = SESSION.replace('[session]\n', '[session]\npki = "pki"\ncert = "coordinator"\n')
    for n in ("s1", "r1"):
        text = text.replace(f'nbd_socket = "{n}.sock"\ncontrol = "{n}.ctl"',
                            f'control = "tcp:127.0.0.1:{free_port()}"\n'
                            f'nbd = "tcp:127.0.0.1:{free_port()}"')
    return text


@pytest.fixture
def shell(run_dir):
    need("nbdkit")
    made = []

    def make(text: str = SESSION, umask: int | None = None):
        made.append(Shell(run_dir, text, umask=umask))
        return made[-1]

    yield make
    for sh in made:
        sh.close()


def test_status_of_a_mirrored_session_shows_each_secondary_and_what_it_hardened(shell):
    """``cgmirror status`` answers on a mirrored session (it failed with
    KeyError 's1'), and still after a failover (KeyError 'dirty_blocks')."""
    sh = shell()
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    h = sh.wait_hardened(1)
    out = sh.ok("status")
    assert "internal error" not in out
    row = next(line for line in out.splitlines() if line.startswith("s1 "))
    assert "r1/a: hardened group" in row, out
    sec = next(line for line in out.splitlines() if line.startswith("r1 "))
    assert int(sec.split()[2]) >= h, out
    sh.stop_mirror()
    sh.ok("failover")
    p = sh.run("status")
    assert "internal error" not in p.stderr, p.stderr
    assert p.returncode in (0, 3), p.stderr      # a's nodes may still run as primaries
    assert "direction: site b is the source (failed-over)" in p.stdout, p.stdout


def test_files_and_directories_keep_their_modes_under_umask_000(shell, run_dir):
    """The session state directory and its parents, the history, the
    ``--keep-overwritten`` directory and its files, and ``install-units
    --dir`` have the modes cgmirror chose, not 0777/0666."""
    sh = shell(umask=0)
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    sh.wait_hardened()
    sh.stop_mirror()
    sh.ok("failover")
    keep = os.path.join(run_dir, "kept", "deep")
    sh.ok("failback", "--keep-overwritten", keep, timeout=180)
    units = os.path.join(run_dir, "units", "here")
    sh.ok("install-units", "--dir", units, "--exec", "cgmirror")

    def mode(*p):
        return stat.S_IMODE(os.stat(os.path.join(run_dir, *p)).st_mode)

    assert mode("state") == 0o755 and mode("state", "op") == 0o755
    for f in os.listdir(os.path.join(run_dir, "state", "op")):
        assert mode("state", "op", f) & 0o022 == 0, f"state/op/{f}: {oct(mode('state', 'op', f))}"
    assert mode("kept") == mode("kept", "deep") == 0o700
    for f in os.listdir(keep):
        assert mode("kept", "deep", f) == 0o600, f
    assert mode("units") == mode("units", "here") == 0o755
    for f in os.listdir(units):
        assert mode("units", "here", f) == 0o644, f


def test_a_reader_that_goes_away_ends_output_quietly_and_results_are_sentences(shell):
    """``cgmirror history | head -1`` exits 0 with no internal error; a
    failback says what it did in words."""
    sh = shell()
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    sh.wait_hardened(29)                 # a history longer than a pipe's buffer
    for args in ("history", "history --json", "status --json"):
        p = sh.pipe(args, "head -c 10")
        assert p.returncode == 0, (args, p.stderr)
        assert "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    sh.stop_mirror()
    sh.ok("failover")
    out = sh.ok("failback", timeout=180)
    assert "{" not in out and "=" not in out, out
    assert out.startswith("failback: resync hardened as group"), out
    assert "site a is the source at group" in out, out


def test_mirror_status_reaches_tls_secondaries_and_follows_the_direction(shell):
    """In a session on TCP with mutual TLS, ``mirror status`` asks the
    secondaries with the session's certificates (it said "TCP needs TLS");
    after a failover it lists site a's nodes, the secondaries now."""
    sh = shell(text=tls_session())
    sh.ok("pki", "init", "--dir", "pki", "--name", "op")
    for n in ("s1", "r1"):
        sh.ok("pki", "issue", n, "--dir", "pki", "--ip", "127.0.0.1")
    sh.ok("pki", "issue", "coordinator", "--dir", "pki")
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    h = sh.wait_hardened()
    out = sh.ok("mirror", "status")
    line = next(x for x in out.splitlines() if x.startswith("secondary r1:"))
    assert "TLS" not in line and int(line.split("hardened ")[1].split()[0].rstrip(",")) >= h
    sh.stop_mirror()
    sh.ok("failover")
    out = sh.ok("mirror", "status")
    assert any(x.startswith("secondary s1:") for x in out.splitlines()), out


def readme_block(heading: str, lang: str) -> str:
    """The first ``lang`` code block under README's ``heading``."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index(heading):]
    start = section.index(f"```{lang}\n") + len(lang) + 4
    return section[start:section.index("```", start)]


def test_the_readme_mirrored_session_mirrors_as_written(shell):
    """The README's mirrored session, copied as it stands, forms groups
    (its example used to leave out ``secondary =``: "mirrors no volume")."""
    text = readme_block("### Mirroring: a secondary per volume", "toml")
    assert 'secondary = "r1"' in text
    sh = shell(text=text)
    sh.ok("check")
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    sh.wait_hardened(1)
    assert "r1/db: hardened group" in sh.ok("status")


@pytest.mark.parametrize("control", ["tcp:127.0.0.1:17100", "tcp:[::1]:7000"])
def test_a_tcp_mirror_control_is_refused_in_one_line(shell, control):
    """``[mirror] control = "tcp:..."`` made a unix socket named ``tcp:...``;
    it is refused, naming the key and what to write."""
    sh = shell(text=SESSION.replace('control = "m.ctl"', f'control = "{control}"'))
    p = sh.run("check")
    assert p.returncode == 3, p.stderr
    assert p.stderr.count("\n") == 1 and "[mirror], key 'control'" in p.stderr
    assert "unix socket" in p.stderr
    assert not os.path.exists(os.path.join(sh.dir, control))


def test_a_node_with_a_wrong_certificate_is_refused_at_once(shell):
    """``secondary start`` of a node whose certificate names another address
    says so within seconds (it waited the whole 30 s start timeout)."""
    import time
    sh = shell(text=tls_session())
    sh.ok("pki", "init", "--dir", "pki", "--name", "op")
    sh.ok("pki", "issue", "r1", "--dir", "pki", "--ip", "127.0.0.2")    # dialled at .1
    sh.ok("pki", "issue", "coordinator", "--dir", "pki")
    t0 = time.monotonic()
    p = sh.run("secondary", "start")
    took = time.monotonic() - t0
    assert p.returncode != 0
    assert "127.0.0.1" in p.stderr and "certificate" in p.stderr, p.stderr
    assert took < 20, f"took {took:.1f} s: {p.stderr}"     # generous: the bound is 30 s
    assert p.stderr.count("\n") == 1, p.stderr


def test_idle_connections_never_lock_commands_out_of_the_mirror(shell):
    """300 idle connections of the owner's uid to the mirror's control
    socket (reopened as they are closed): ``mirror status`` still answers,
    because a full table closes the oldest idle connection, not the new one."""
    import socket as socket_mod
    import time
    sh = shell()
    sh.ok("slave", "start")
    sh.ok("secondary", "start")
    sh.start_mirror()
    sh.wait_hardened()
    path = os.path.join(sh.dir, "m.ctl")
    held, closed, deadline = [], 0, time.monotonic() + 60
    try:
        while len(held) < 300 and time.monotonic() < deadline:
            c = socket_mod.socket(socket_mod.AF_UNIX)
            c.connect(path)
            held.append(c)
        # The flood evicts itself: the newest connections still get slots.
        p = sh.run("mirror", "status", timeout=60)
        assert p.returncode == 0 and "too many" not in p.stdout + p.stderr, p.stderr
        for c in held[:10]:
            c.settimeout(10)
            line = c.recv(4096)
            closed += bool(b"too many control connections" in line or line == b"")
        assert closed == 10, "the oldest idle connections were not the ones closed"
    finally:
        for c in held:
            c.close()
