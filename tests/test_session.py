"""Session file parsing: a good file, then each kind of bad input (one line
naming the file, the table and the key)."""

from __future__ import annotations

import os
import textwrap

import pytest

from coordinator import cli, session
from coordinator.errors import ConfigError, ExitCode, UsageError

GOOD = """
[session]
name = "demo"
state_dir = "state"
max_coordination_ms = 500
lease_ms = 4000
copy_timeout_ms = 20000

[[slave]]
name = "s1"
state_dir = "run/s1"
nbd_socket = "run/s1.sock"
control = "run/s1.ctl"
threads = 2
granularity = "128K"

[[slave.volume]]
name = "db"
path = "data/db.img"
size = "64M"
target = "nbd+unix:///db?socket=remote/db.sock"

[[slave.volume]]
name = "log"
path = "/abs/log.img"
target = "nbds://backup.example:10809/log"

[[slave]]
name = "s2"
state_dir = "run/s2"
nbd_socket = "run/s2.sock"
control = "run/s2.ctl"

[[slave.volume]]
name = "db"
path = "data/s2-db.img"
size = 1048576
target = "nbd+unix:///?socket=/srv/remote/s2.sock"
"""


def write(tmp_path, text: str):
    p = tmp_path / "demo.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_good_file(tmp_path):
    """Every key is read; relative paths and target sockets resolve against the file."""
    s = session.load(write(tmp_path, GOOD))
    base = str(tmp_path)
    assert (s.name, s.max_coordination_ms, s.lease_ms, s.copy_timeout_ms) == \
        ("demo", 500, 4000, 20000)
    assert s.state_dir == os.path.join(base, "state")
    s1, s2 = s.slaves
    assert s1.control == os.path.join(base, "run/s1.ctl")
    assert (s1.threads, s1.granularity, s2.threads, s2.granularity) == (2, 128 << 10,
                                                                        None, None)
    db, log = s1.volumes
    assert db.size == 64 << 20 and log.size is None and log.path == "/abs/log.img"
    assert db.target == f"nbd+unix:///db?socket={base}/remote/db.sock"
    assert log.target == "nbds://backup.example:10809/log"
    assert s2.volumes[0].target == "nbd+unix:///?socket=/srv/remote/s2.sock"
    assert s.targets()["s1"] == {"db": db.target, "log": log.target}


def test_specs_for_launch(tmp_path):
    """SlaveSpecs carry the volumes, sizes and the optional keys (or launch's defaults)."""
    s1, s2 = session.load(write(tmp_path, GOOD)).specs()
    assert s1.volumes == [("db", str(tmp_path / "data/db.img"), 64 << 20),
                          ("log", "/abs/log.img", None)]
    assert (s1.threads, s1.granularity) == (2, 128 << 10)
    assert s1.statedir == str(tmp_path / "run/s1")
    assert s2.granularity == 64 << 10       # launch's default


def test_defaults(tmp_path):
    """Optional [session] keys get their documented defaults."""
    s = session.load(write(tmp_path, """
        [session]
        name = "x"
        [[slave]]
        name = "a"
        state_dir = "a"
        nbd_socket = "a.sock"
        control = "a.ctl"
        [[slave.volume]]
        name = "v"
        path = "v.img"
        target = "nbd+unix:///?socket=t.sock"
        """))
    assert (s.max_coordination_ms, s.lease_ms, s.copy_timeout_ms) == (1000, 5000, 30000)
    assert s.state_dir == str(tmp_path / "state")


# (what to change in GOOD, words the one-line error must contain)
BAD = [
    (("[session]", "[session\n"), ["not valid TOML"]),
    (('name = "demo"', 'name = "demo"\nnmae = "x"'), ["[session]", "'nmae'", "unknown key"]),
    (("[session]", "[sesion]\nname='x'\n[session]"), ["top level", "'sesion'", "unknown table"]),
    (('name = "demo"', 'name = "de mo"'), ["[session]", "'name'"]),
    (("max_coordination_ms = 500", 'max_coordination_ms = "500"'),
     ["[session]", "'max_coordination_ms'", "integer"]),
    (("max_coordination_ms = 500", "max_coordination_ms = true"),
     ["'max_coordination_ms'", "integer"]),
    (("lease_ms = 4000", "lease_ms = 400"), ["[session]", "'lease_ms'", "larger than"]),
    (("lease_ms = 4000", "lease_ms = 0"), ["'lease_ms'", "from 1"]),
    (("threads = 2", "threads = 2\ncolour = 1"), ["[[slave]] 's1'", "'colour'"]),
    (("threads = 2", "threads = 0"), ["[[slave]] 's1'", "'threads'"]),
    (('granularity = "128K"', 'granularity = "100K"'), ["'granularity'", "power of two"]),
    (('granularity = "128K"', 'granularity = "lots"'), ["'granularity'", "not a size"]),
    (('size = "64M"', 'size = "64Q"'), ["[[slave.volume]] s1/db", "'size'", "not a size"]),
    (('size = "64M"', 'size = -1'), ["s1/db", "'size'"]),
    (('size = "64M"', 'size = "64M"\nmode = "fast"'), ["s1/db", "'mode'", "unknown key"]),
    (('target = "nbd+unix:///db?socket=remote/db.sock"', ""),
     ["s1/db", "'target'", "missing"]),
    (('target = "nbd+unix:///db?socket=remote/db.sock"', 'target = "http://x/db"'),
     ["s1/db", "'target'", "not an NBD URI"]),
    (('target = "nbd+unix:///db?socket=remote/db.sock"', 'target = "nbd+unix:///db"'),
     ["s1/db", "'target'", "socket="]),
    (('target = "nbd+unix:///db?socket=remote/db.sock"',
      'target = "nbd+unix:///db?socket=' + "x" * 120 + '"'), ["'target'", "longer than"]),
    (('control = "run/s1.ctl"', 'control = "run/' + "c" * 120 + '"'),
     ["[[slave]] 's1'", "'control'", "longer than"]),
    (('name = "s2"', 'name = "s1"'), ["'name'", "s1 is also used"]),
    (('name = "log"', 'name = "db"'), ["s1/db", "'name'", "two volumes named"]),
    (('control = "run/s2.ctl"', 'control = "run/s1.ctl"'), ["[[slave]] 's2'", "'control'"]),
    (('nbd_socket = "run/s2.sock"', 'nbd_socket = "run/s1.ctl"'), ["'nbd_socket'"]),
    (('state_dir = "run/s2"', 'state_dir = "run/s1"'), ["[[slave]] 's2'", "'state_dir'"]),
    (('path = "data/s2-db.img"', 'path = "data/db.img"'), ["s2/db", "'path'", "also used"]),
    (('nbd_socket = "run/s2.sock"', ""), ["[[slave]] 's2'", "'nbd_socket'", "missing"]),
]


@pytest.mark.parametrize("change,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_one_line_naming_file_table_key(tmp_path, change, words):
    """Each kind of bad input is refused with one line naming where it is."""
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as ei:
        session.load(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(path + ": ")
    for w in words:
        assert w in msg, msg


def test_no_slaves_and_no_volumes(tmp_path):
    """A session needs a slave, a slave needs a volume."""
    head = '[session]\nname = "x"\n'
    with pytest.raises(ConfigError, match=r"top level, key 'slave': needs at least one"):
        session.load(write(tmp_path, head))
    with pytest.raises(ConfigError, match=r"\[\[slave\]\] 'a', key 'volume': missing"):
        session.load(write(tmp_path, head + '[[slave]]\nname = "a"\nstate_dir = "a"\n'
                                            'nbd_socket = "a.s"\ncontrol = "a.c"\n'))


def test_more_volumes_than_a_slave_serves(tmp_path):
    """A slave's gate core keeps a cut's volumes in a 64-bit mask: 65 volumes
    on one slave are refused at load, in one line that says what to do."""
    vols = "".join(f'[[slave.volume]]\nname = "v{i}"\npath = "v{i}.img"\n'
                   f'target = "nbd+unix:///v{i}?socket=t.sock"\n' for i in range(65))
    text = ('[session]\nname = "x"\n[[slave]]\nname = "a"\nstate_dir = "a"\n'
            'nbd_socket = "a.s"\ncontrol = "a.c"\n' + vols)
    with pytest.raises(ConfigError, match=r"65 volumes: one slave serves at most 64"):
        session.load(write(tmp_path, text))
    session.load(write(tmp_path, text.rsplit("[[slave.volume]]", 1)[0]))


def test_missing_file(tmp_path):
    """A session file that does not exist is a config error, not a traceback."""
    with pytest.raises(ConfigError, match="no such session file"):
        session.load(str(tmp_path / "nope.toml"))


def test_locate_from_env(monkeypatch):
    """-s wins, then $CGMIRROR_SESSION, else a usage error."""
    monkeypatch.setenv(session.ENV, "/from/env.toml")
    assert session.locate(None) == "/from/env.toml"
    assert session.locate("given.toml") == "given.toml"
    monkeypatch.delenv(session.ENV)
    with pytest.raises(UsageError, match="CGMIRROR_SESSION"):
        session.locate(None)


def test_cli_bad_session_exit_code(tmp_path, capsys, monkeypatch):
    """The CLI turns a bad session into exit CONFIG and one line on stderr."""
    path = write(tmp_path, GOOD.replace("threads = 2", "threads = 'x'"))
    assert cli.main(["-s", path, "status"]) == ExitCode.CONFIG
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "'threads'" in err
    monkeypatch.delenv(session.ENV, raising=False)
    assert cli.main(["status"]) == ExitCode.USAGE
    assert "CGMIRROR_SESSION" in capsys.readouterr().err
    monkeypatch.setenv(session.ENV, path)
    assert cli.main(["status", "--json"]) == ExitCode.CONFIG
    import json
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["exit_code"] == ExitCode.CONFIG
    assert cli.main(["copy", "--full", "--incremental"]) == ExitCode.USAGE


@pytest.mark.parametrize("old,new", [
    # s2/db's target, spelled as s1/db's target (another slave) ...
    ('target = "nbd+unix:///?socket=/srv/remote/s2.sock"',
     'target = "nbd+unix://localhost/db?socket=./remote/x/../db.sock"'),
    # ... and s1/log's, on the same slave.
    ('target = "nbds://backup.example:10809/log"',
     'target = "nbds+unix:///db?socket=remote/db.sock"'),
])
def test_two_volumes_one_target_image_are_refused(tmp_path, old, new):
    """Two volumes whose targets are one image, however spelled: one line naming both."""
    with pytest.raises(ConfigError) as ei:
        session.load(write(tmp_path, GOOD.replace(old, new)))
    msg = str(ei.value)
    assert "\n" not in msg and "key 'target'" in msg
    assert f"export 'db' on unix:{tmp_path}/remote/db.sock is also the target of s1/db" in msg
    assert "s2/db" in msg or "s1/log" in msg


def test_target_on_a_source_export_is_refused(tmp_path):
    """A target that is one of the session's own source exports is refused."""
    with pytest.raises(ConfigError, match=r"s1/log, key 'target': export 'db' on unix:"
                                          r".*/run/s1.sock is also the source export of s1/db"):
        session.load(write(tmp_path, GOOD.replace(
            'target = "nbds://backup.example:10809/log"',
            'target = "nbd+unix:///db?socket=run/s1.sock"')))


def test_same_tcp_target_spelled_twice_is_refused(tmp_path):
    """TCP: host case and the default port do not make two images."""
    with pytest.raises(ConfigError, match=r"export 'log' on tcp:backup.example:10809"):
        session.load(write(tmp_path, GOOD.replace(
            'target = "nbd+unix:///?socket=/srv/remote/s2.sock"',
            'target = "nbds://BACKUP.example/log"')))


MIRRORED = """
[session]
name = "m"

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
state_dir = "run/r1"
nbd_socket = "run/r1.sock"
control = "run/r1.ctl"

[[secondary.volume]]
name = "db"
path = "remote/db.img"

[[secondary]]
name = "r2"
state_dir = "run/r2"
nbd_socket = "run/r2.sock"
control = "run/r2.ctl"

[[secondary.volume]]
name = "spare"
path = "remote/spare.img"
"""


def test_slaves_and_secondaries_are_one_node_type(tmp_path):
    """A [[slave]] and a [[secondary]] are both NodeConfig, with their role."""
    s = session.load(write(tmp_path, MIRRORED))
    (s1,), (r1, r2) = s.slaves, s.secondaries
    assert type(s1) is type(r1) is session.NodeConfig
    assert (s1.role, r1.role, r2.role) == ("primary", "secondary", "secondary")
    assert r1.volume("db").path == str(tmp_path / "remote/db.img")
    assert (s1.spec().role, r1.spec().role) == ("primary", "secondary")
    assert r1.spec().volumes == [("db", str(tmp_path / "remote/db.img"), None)]


@pytest.mark.parametrize("path,who", [
    ("data/db.img", "volume s1/db"),            # a primary's file
    ("remote/db.img", "volume r1/db"),          # another secondary's
])
def test_a_secondary_volume_on_another_nodes_file_is_refused(tmp_path, path, who):
    """A secondary volume that is a primary's file, or another secondary's:
    one line naming the table, the key and the other owner."""
    text = MIRRORED.replace('path = "remote/spare.img"', f'path = "{path}"')
    with pytest.raises(ConfigError) as ei:
        session.load(write(tmp_path, text))
    msg = str(ei.value)
    assert "\n" not in msg
    assert f"[[secondary.volume]] r2/spare, key 'path': {tmp_path / path} is also used" \
           f" by {who}" in msg, msg


def test_secondary_volumes_on_files_of_their_own_are_accepted(tmp_path):
    """The check above is not a blanket refusal: distinct files load."""
    assert len(session.load(write(tmp_path, MIRRORED)).secondaries) == 2
