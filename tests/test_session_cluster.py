"""The session's ``[cluster]`` table: a good one, the defaults, its absence,
and every bad value refused in one line naming the file, the table and the key."""

from __future__ import annotations

import os
import textwrap

import pytest

from coordinator import session
from coordinator.errors import ConfigError

BASE = """
[session]
name = "demo"
cert = "coord"

[[slave]]
name = "s1"
state_dir = "run/s1"
nbd_socket = "run/s1.sock"
control = "run/s1.ctl"

[[slave.volume]]
name = "db"
path = "data/db.img"
target = "nbd+unix:///db?socket=remote/db.sock"
"""

GOOD = BASE + """
[cluster]
etcd = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://etcd3.example:2379"]
ttl_s = 7
fence = "lease"
lease_ttl_s = 4
prefix = "/cg/prod"
"""


def write(tmp_path, text: str) -> str:
    p = tmp_path / "demo.toml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_good_cluster_table(tmp_path):
    """Every key is read; the coordinator's certificate dir is pki/<[session] cert>."""
    s = session.load(write(tmp_path, GOOD))
    c = s.cluster
    assert c.etcd == ("https://10.0.0.1:2379", "https://10.0.0.2:2379",
                      "https://etcd3.example:2379")
    assert (c.ttl_s, c.fence, c.lease_ttl_s, c.prefix) == (7, "lease", 4, "/cg/prod")
    assert c.coordinator_tls == os.path.join(str(tmp_path), "state", "pki", "coord")


def test_defaults(tmp_path):
    """Only etcd given: ttl 5, no fence, the lease TTL follows ttl_s, prefix /cgmirror."""
    s = session.load(write(tmp_path, BASE + '[cluster]\netcd = ["https://h:2379"]\nttl_s = 3\n'))
    c = s.cluster
    assert (c.ttl_s, c.fence, c.lease_ttl_s, c.prefix) == (3, "none", 3, "/cgmirror")


def test_no_cluster_table_is_none(tmp_path):
    """Without [cluster] the session runs on local files as before."""
    assert session.load(write(tmp_path, BASE)).cluster is None


@pytest.mark.parametrize("table, key, words", [
    ('etcd = ["http://10.0.0.1:2379"]', "etcd", "plaintext http"),
    ('etcd = []', "etcd", "1 to 7"),
    ('etcd = [' + ", ".join(f'"https://h{i}:2379"' for i in range(8)) + ']', "etcd", "1 to 7"),
    ('etcd = ["https://10.0.0.1"]', "etcd", "not an etcd URL"),
    ('etcd = ["https://10.0.0.1:2379/v3"]', "etcd", "not an etcd URL"),
    ('etcd = ["10.0.0.1:2379"]', "etcd", "not an etcd URL"),
    ('etcd = ["https://a:2379", "https://A:2379"]', "etcd", "listed twice"),
    ('etcd = [2379]', "etcd", "not a URL"),
    ('etcd = 5', "etcd", "list of 1 to 7"),
    ('etcd = "https://h:2379"', "etcd", "list of 1 to 7"),
    ('ttl_s = 1\netcd = ["https://h:1"]', "ttl_s", "from 2 to 60"),
    ('ttl_s = 2.5\netcd = ["https://h:1"]', "ttl_s", "integer"),
    ('ttl_s = 61\netcd = ["https://h:1"]', "ttl_s", "from 2 to 60"),
    ('lease_ttl_s = 0\netcd = ["https://h:1"]', "lease_ttl_s", "from 2 to 60"),
    ('fence = "lock"\netcd = ["https://h:1"]', "fence", '"none" or "lease"'),
    ('fence = true\netcd = ["https://h:1"]', "fence", '"none" or "lease"'),
    ('prefix = "cgmirror"\netcd = ["https://h:1"]', "prefix", "key prefix"),
    ('prefix = "/a//b"\netcd = ["https://h:1"]', "prefix", "key prefix"),
    ('prefix = "/"\netcd = ["https://h:1"]', "prefix", "key prefix"),
    ('ttl_s = 5', "etcd", "missing"),
    ('etcd = ["https://h:1"]\nleader = "x"', "leader", "unknown key"),
])
def test_bad_cluster_values_are_one_line(tmp_path, table, key, words):
    """Each bad value: ConfigError, one line, naming file, [cluster] and the key."""
    path = write(tmp_path, BASE + "[cluster]\n" + table + "\n")
    with pytest.raises(ConfigError) as e:
        session.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: [cluster], key {key!r}: "), msg
    assert words in msg, msg


def test_cluster_must_be_a_table(tmp_path):
    """``cluster = 1`` is refused like any other table that is not one."""
    path = write(tmp_path, 'cluster = 1\n' + BASE)
    with pytest.raises(ConfigError, match=r"\[cluster\]: must be a table"):
        session.load(path)
