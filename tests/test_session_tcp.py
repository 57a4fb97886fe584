"""Session keys for two sites (``control``/``nbd`` on TCP, ``pki``, ``cert``)
and ``cgmirror pki`` through ``cli.main`` without a session file."""

from __future__ import annotations

import os
import textwrap

import pytest

from coordinator import cli, session
from coordinator.errors import ConfigError, ExitCode


def write(tmp_path, text: str) -> str:
    """tmp_path/demo.toml holding ``text`` (dedented); its path."""
    p = tmp_path / "demo.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


TCP = """
[session]
name = "two"
pki = "certs"
cert = "coord"

[[slave]]
name = "s1"
state_dir = "run/s1"
nbd = "tcp:10.0.0.2:10809"
control = "tcp:10.0.0.2:7001"

[[slave.volume]]
name = "db"
path = "data/db.img"
target = "nbds://10.0.0.9:10809/db"

[[slave]]
name = "s2"
state_dir = "run/s2"
nbd = "unix:run/s2.sock"
control = "unix:run/s2.ctl"
cert = "host-b"

[[slave.volume]]
name = "db"
path = "data/s2-db.img"
target = "nbds://10.0.0.9:10809/db2"
"""


def test_tcp_session_names_addresses_and_certificates(tmp_path):
    s = session.load(write(tmp_path, TCP))
    s1, s2 = s.slaves
    certs = os.path.join(tmp_path, "certs")
    assert (s1.control, s1.nbd) == ("tcp:10.0.0.2:7001", "tcp:10.0.0.2:10809")
    assert s1.tls == os.path.join(certs, "s1")             # default: the slave's name
    assert s1.client_tls == os.path.join(certs, "coord")   # [session] cert
    spec = s1.spec()
    assert spec.uri("db") == "nbds://10.0.0.2:10809/db"
    assert spec.nbd == s1.nbd and spec.tls == s1.tls and spec.client_tls == s1.client_tls
    # unix spellings, as nbd_socket/control paths; no TCP control: no
    # coordinator certificate; an nbds target: the slave's own certificate.
    assert s2.nbd is None and s2.nbd_socket == os.path.join(tmp_path, "run", "s2.sock")
    assert s2.control == os.path.join(tmp_path, "run", "s2.ctl")
    assert s2.tls == os.path.join(certs, "host-b") and s2.client_tls is None


def test_unix_session_needs_no_pki(tmp_path):
    s = session.load(write(tmp_path, TCP.replace("nbds://10.0.0.9:10809/db2",
                                                 "nbd+unix:///db?socket=t.sock")))
    assert s.slaves[1].tls is None and s.slaves[1].spec().command()[2] == "-U"


@pytest.mark.parametrize("old,new,words", [
    ('target = "nbds://10.0.0.9:10809/db"', 'target = "nbd://10.0.0.9:10809/db"',
     ["[[slave.volume]] s1/db, key 'target'", "plaintext TCP", "nbds://"]),
    ('control = "tcp:10.0.0.2:7001"', 'control = "localhost:7001"',
     ["[[slave]] 's1', key 'control'", "unknown scheme"]),
    ('control = "tcp:10.0.0.2:7001"', 'control = "tcp:10.0.0.2:0"',
     ["[[slave]] 's1', key 'control'", "port"]),
    ('nbd = "tcp:10.0.0.2:10809"', 'nbd = "tcp:10.0.0.2:10809"\nnbd_socket = "x.sock"',
     ["[[slave]] 's1', key 'nbd'", "not both"]),
    ('cert = "host-b"', 'cert = "../etc"', ["[[slave]] 's2', key 'cert'"]),
    ('cert = "coord"', 'cert = 7', ["[session], key 'cert'"]),
    ('nbd = "unix:run/s2.sock"', 'nbd = "tcp:10.0.0.2:10809"',
     ["[[slave]] 's2', key 'nbd'", "also used by slave s1"]),
])
def test_bad_tcp_keys_are_one_line(tmp_path, old, new, words):
    assert old in TCP
    with pytest.raises(ConfigError) as ei:
        session.load(write(tmp_path, TCP.replace(old, new)))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "demo.toml") + ": ")
    for w in words:
        assert w in msg, msg


def test_nodes_on_two_hosts_may_use_the_same_paths(tmp_path):
    """Paths are a host's own: s1 on 10.0.0.2 and s3 on 10.0.0.3 may both
    keep state in run/n and an image at data/db.img (the README's two-host
    walkthrough does); on one host (unix control) they may not."""
    s3 = ("\n[[slave]]\nname = \"s3\"\nstate_dir = \"run/s1\"\n"
          "nbd = \"tcp:10.0.0.3:10809\"\ncontrol = \"tcp:10.0.0.3:7001\"\n"
          "\n[[slave.volume]]\nname = \"db\"\npath = \"data/db.img\"\n"
          "target = \"nbds://10.0.0.9:10809/db3\"\n")
    s = session.load(write(tmp_path, TCP + s3))
    assert s.slaves[0].volumes[0].path == s.slaves[2].volumes[0].path
    local = TCP.replace('path = "data/s2-db.img"', 'path = "data/db.img"') \
        .replace('control = "tcp:10.0.0.2:7001"', 'control = "tcp:127.0.0.1:7001"')
    with pytest.raises(ConfigError, match="also used by volume s1/db"):
        session.load(write(tmp_path, local))


def test_pki_runs_without_a_session_file(tmp_path, monkeypatch, capsys):
    """``cgmirror pki`` needs no session file; with one, its defaults come from it."""
    monkeypatch.delenv(session.ENV, raising=False)
    d = str(tmp_path / "pki")
    assert cli.main(["pki", "init", "--dir", d, "--name", "x"]) == ExitCode.OK
    assert cli.main(["pki", "issue", "s1", "--dir", d, "--ip", "10.0.0.2"]) == ExitCode.OK
    assert os.path.isfile(os.path.join(d, "s1", "server-cert.pem"))
    # Without a session, --dir is needed: one line, a usage error.
    capsys.readouterr()
    assert cli.main(["pki", "issue", "s2"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dir DIR" in err
    # With one (-s), the session's name and state_dir/pki are the defaults.
    path = write(tmp_path, TCP.replace('pki = "certs"\n', ""))
    assert cli.main(["-s", path, "pki", "init"]) == ExitCode.OK
    assert os.path.isfile(os.path.join(tmp_path, "state", "pki", "ca-cert.pem"))
    # Other nouns still need one.
    assert cli.main(["status"]) == ExitCode.USAGE


def test_missing_coordinator_certificate_is_a_config_error(tmp_path, capsys):
    """A TCP session whose pki has no coordinator directory yet: exit CONFIG,
    one line naming the missing file and how to make it (not a bug)."""
    path = write(tmp_path, TCP)
    capsys.readouterr()
    assert cli.main(["-s", path, "status"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert os.path.join(tmp_path, "certs", "coord", "ca-cert.pem") in err
    assert "cgmirror pki issue" in err


MIRRORED = """
[session]
name = "m"
pki = "certs"

[[slave]]
name = "s1"
state_dir = "run/s1"
nbd_socket = "run/s1.sock"
control = "run/s1.ctl"

[[slave.volume]]
name = "db"
path = "data/db.img"
secondary = "r1"

[[secondary]]
name = "r1"
state_dir = "remote/r1"
nbd = "tcp:10.0.0.9:10809"
control = "tcp:10.0.0.9:7001"
cert = "remote"

[[secondary.volume]]
name = "db"
path = "remote/db.img"
"""


def test_tcp_secondary_addresses_certificates_and_uri(tmp_path):
    """A [[secondary]] on TCP: its spec serves NBD with TLS, the drain goes
    to nbds://, the unix primary gets its certificate for that drain, and a
    role switch keeps every address and certificate."""
    from coordinator import direction

    s = session.load(write(tmp_path, MIRRORED))
    certs = os.path.join(tmp_path, "certs")
    (r,), (s1,) = s.secondaries, s.slaves
    assert (r.control, r.nbd, r.nbd_socket) == ("tcp:10.0.0.9:7001", "tcp:10.0.0.9:10809", "")
    assert r.tls == os.path.join(certs, "remote")
    assert r.client_tls == os.path.join(certs, "coordinator")
    spec = r.spec()
    assert spec.role == "secondary" and spec.nbd == r.nbd and spec.tls == r.tls
    assert spec.client_tls == r.client_tls
    assert session.replication_uri(r, "repl-ab/db") == "nbds://10.0.0.9:10809/repl-ab/db"
    assert s1.tls == os.path.join(certs, "s1") and s1.client_tls is None
    # Failover/failback: the secondary becomes the primary and back.
    back = direction.oriented(s, "b")
    (p,), (q,) = back.slaves, back.secondaries
    assert (p.name, p.nbd, p.control, p.tls, p.client_tls) == \
        ("r1", r.nbd, r.control, r.tls, r.client_tls)
    assert (q.name, q.nbd_socket, q.control, q.tls) == ("s1", s1.nbd_socket, s1.control,
                                                        s1.tls)
    assert session.replication_uri(q, "repl-x/db") == \
        f"nbd+unix:///repl-x/db?socket={s1.nbd_socket}"


def test_unix_secondary_needs_no_pki(tmp_path):
    text = MIRRORED.replace('nbd = "tcp:10.0.0.9:10809"', 'nbd_socket = "remote/r1.sock"')
    s = session.load(write(tmp_path, text.replace('control = "tcp:10.0.0.9:7001"',
                                                  'control = "remote/r1.ctl"')))
    (r,), (s1,) = s.secondaries, s.slaves
    assert r.tls is None and r.client_tls is None and s1.tls is None
    assert r.spec().command()[2] == "-U"


@pytest.mark.parametrize("old,new,words", [
    ('nbd = "tcp:10.0.0.9:10809"', 'nbd = "tcp:10.0.0.9:10809"\nnbd_socket = "x.sock"',
     ["[[secondary]] 'r1', key 'nbd'", "not both"]),
    ('nbd = "tcp:10.0.0.9:10809"', '',
     ["[[secondary]] 'r1', key 'nbd_socket'", "missing"]),
    ('control = "tcp:10.0.0.9:7001"', 'control = "localhost:7001"',
     ["[[secondary]] 'r1', key 'control'", "unknown scheme"]),
    ('nbd = "tcp:10.0.0.9:10809"', 'nbd = "tcp:10.0.0.9:99999"',
     ["[[secondary]] 'r1', key 'nbd'", "port"]),
    ('cert = "remote"', 'cert = "a/b"', ["[[secondary]] 'r1', key 'cert'"]),
])
def test_bad_secondary_tcp_keys_are_one_line(tmp_path, old, new, words):
    assert old in MIRRORED
    with pytest.raises(ConfigError) as ei:
        session.load(write(tmp_path, MIRRORED.replace(old, new)))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "demo.toml") + ": ")
    for w in words:
        assert w in msg, msg


def test_secondary_address_taken_by_a_slave_is_one_line(tmp_path):
    """A secondary on the slave's own NBD address: refused, naming both."""
    text = MIRRORED.replace('nbd_socket = "run/s1.sock"', 'nbd = "tcp:10.0.0.9:10809"')
    with pytest.raises(ConfigError) as ei:
        session.load(write(tmp_path, text))
    msg = str(ei.value)
    assert "\n" not in msg and "[[secondary]] 'r1', key 'nbd'" in msg, msg
    assert "also used by slave s1 nbd" in msg, msg
