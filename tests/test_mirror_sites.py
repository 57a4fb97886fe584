"""The mirror with secondaries on TCP and mutual TLS.

- On loopback (127.0.0.1, ports picked by binding): a unix primary drains to
  a ``[[secondary]]`` whose control and NBD are ``tcp:`` addresses; groups
  form (``Mirror.run_once``), the second one sends only what changed, and
  the host export read over ``nbds://`` equals the primary.
- Across the namespace sites (tests/sites.py): see ``test_mirror_across_sites``.
"""

from __future__ import annotations

import os

import pytest

from conftest import need
from coordinator import pki, session as session_mod
from coordinator.mirror import Mirror
from tests.test_tls_nbd import free_port
from wire import tls

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20
SIZE = 8 * MiB


def loopback_session(run_dir: str) -> str:
    """One unix primary s1 (volume a), mirrored to r1 on tcp:127.0.0.1."""
    d = os.path.join(run_dir, "pki")
    pki.init(d, "lo")
    for name in ("coordinator", "s1", "r1"):
        pki.issue(d, name, ips=["127.0.0.1"])
    text = f"""
[session]
name = "lo"
state_dir = "state"
pki = "pki"
lease_ms = 10000
max_coordination_ms = 2000
copy_timeout_ms = 20000

[mirror]
control = "m.ctl"
max_drain_ms = 30000

[[slave]]
name = "s1"
state_dir = "s1"
nbd_socket = "s1.sock"
control = "s1.ctl"

[[slave.volume]]
name = "a"
path = "s1-a.img"
size = {SIZE}
secondary = "r1"

[[secondary]]
name = "r1"
state_dir = "r1"
control = "tcp:127.0.0.1:{free_port()}"
nbd = "tcp:127.0.0.1:{free_port()}"

[[secondary.volume]]
name = "a"
path = "r1-a.img"
size = {SIZE}
"""
    path = os.path.join(run_dir, "lo.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def write(uri: str, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def test_mirror_to_a_tcp_tls_secondary_on_loopback(slaves, run_dir):
    """Groups form with the secondary on TCP+TLS; the drain goes to nbds://,
    the second group sends only the changed block; the host export (read
    with mutual TLS) equals the primary."""
    need("nbdkit")
    s = session_mod.load(loopback_session(run_dir))
    (r1,) = s.secondaries
    prim = slaves.restart(s.slaves[0].spec())
    slaves.restart(r1.spec())
    logs: list[str] = []
    m = Mirror(s, log=logs.append).open()
    try:
        data = os.urandom(64 * 1024)
        write(prim.spec.uri("a"), data, 3 * MiB)
        res = m.run_once()
        assert res.outcome == "hardened", (res.error, logs)
        first = res.bytes
        assert first >= SIZE, res              # the first group: the full copy
        write(prim.spec.uri("a"), data[::-1], 5 * MiB)
        res = m.run_once()
        assert res.outcome == "hardened", (res.error, logs)
        assert 0 < res.bytes < first / 8, res  # incremental, not a second full copy
        st = m.secondaries[0].status()
        assert st["hardened"] == res.n
        assert all(v["export"].startswith("repl-") for v in st["volumes"].values())
    finally:
        m.close()
    h = nbd.NBD()
    tls.libnbd_setup(h, r1.client_tls)
    h.connect_uri(r1.spec().uri("a"))
    try:
        assert h.get_tls_negotiated()
        with open(os.path.join(run_dir, "s1-a.img"), "rb") as f:
            for off in range(0, SIZE, MiB):
                assert h.pread(MiB, off) == f.read(MiB), f"r1/a differs near {off}"
    finally:
        h.shutdown()
