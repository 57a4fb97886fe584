"""A slave on TCP end to end, on loopback: control and NBD on ``tcp:``
addresses with mutual TLS (``launch.SlaveSpec(nbd=..., tls=...)``), and its
copier writing to an ``nbds://`` target with its own certificate.  A slave
without a certificate refuses an ``nbds://`` target in one line.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from coordinator import group
from coordinator.errors import CopyFailed
from coordinator.link import SlaveLink
from tlsrig import free_port
from wire import tls

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def nbds(host_dir: str, uri: str) -> "nbd.NBD":
    h = nbd.NBD()
    tls.libnbd_setup(h, host_dir)
    h.connect_uri(uri)
    return h


def cut_and_copy(link: SlaveLink, target: str) -> group.CopyReport:
    """One consistent cut of the slave's volume ``a`` copied to ``target``."""
    replies = group.preflight([link])
    n = group.next_n(replies)
    targets = {link.name: {"a": target}}
    group.establish([link], n, 5000, 1000, full=group.full_volumes(replies, targets, "full"))
    return group.copy([link], n, targets, "full", timeout_ms=10_000)


def test_slave_serves_and_copies_over_tls(certs, slaves, memory_servers):
    """NBD on tcp:127.0.0.1 (nbdkit's TLS), control on TCP, a copy to an
    nbdkit with TLS: the target ends equal to what a client wrote."""
    spec = dataclasses.replace(
        slaves("s1", volumes=[("a", 1 * MiB)], start=False),
        control=f"tcp:127.0.0.1:{free_port()}", nbd=f"tcp:127.0.0.1:{free_port()}",
        nbd_socket="", tls=certs["server"], client_tls=certs["good"])
    assert spec.uri("a").startswith("nbds://127.0.0.1:")
    slaves.restart(spec)
    data = os.urandom(64 * 1024)
    h = nbds(certs["good"], spec.uri("a"))
    try:
        assert h.get_tls_negotiated()
        h.pwrite(data, 128 * 1024)
        h.flush()
    finally:
        h.shutdown()
    target = memory_servers(certs["server"])      # names 127.0.0.1
    uri = f"nbds://127.0.0.1:{target.port}/"
    with SlaveLink.from_spec(spec) as link:
        rep = cut_and_copy(link, uri)
    assert rep.slaves["s1"]["a"].state == "done"
    t = nbds(certs["good"], uri)
    try:
        assert t.pread(len(data), 128 * 1024) == data
    finally:
        t.shutdown()


def test_slave_without_certificate_refuses_an_nbds_target(certs, slaves,
                                                          memory_servers):
    proc = slaves("s1", volumes=[("a", 1 * MiB)])       # unix only, no tls=
    target = memory_servers(certs["server"])
    with SlaveLink.from_spec(proc.spec) as link:
        with pytest.raises(CopyFailed) as ei:
            cut_and_copy(link, f"nbds://127.0.0.1:{target.port}/")
    msg = str(ei.value)
    assert "\n" not in msg and "needs TLS but the slave has no certificate" in msg, msg
