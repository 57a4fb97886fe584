"""Primary write leases (issue 19, ``[cluster] fence = "lease"``):
native/gate.c's write deadline, nbdplugin/writelease.py against a real etcd
on loopback, real nodes with libnbd writers, and ``cgmirror failover``
waiting for the old site's lease."""

import errno
import threading
import time

import pytest

from native.gate import Gate, WriteLeaseExpired, monotonic_ns
# ---------------------------------------------------------------- the gate's write deadline
# (native/gate.c "The write lease"; no etcd, no nbdkit)


def test_gate_without_deadline_admits():
    """Deadline 0 (no lease mode): writes enter as before."""
    g = Gate()
    assert g.deadline == 0
    g.enter()
    g.leave()
    assert g.inside == 0


def test_gate_past_deadline_refuses_at_once_with_eio():
    """Past the deadline enter() raises EIO at once and admits nothing."""
    g = Gate()
    g.set_deadline(monotonic_ns() - 1)
    t0 = time.monotonic()
    with pytest.raises(WriteLeaseExpired) as ei:
        g.enter()
    assert time.monotonic() - t0 < 0.1
    assert ei.value.errno == errno.EIO and "no write lease" in str(ei.value)
    assert g.inside == 0 and g.waiting == 0
    with pytest.raises(WriteLeaseExpired):
        g.enter_seq()


def test_gate_before_deadline_admits_and_lapses_by_itself():
    """A future deadline admits; it passes with nothing running."""
    g = Gate()
    g.set_deadline(monotonic_ns() + 300_000_000)
    g.enter()
    g.leave()
    deadline = time.monotonic() + 5
    while True:
        try:
            g.enter()
            g.leave()
        except WriteLeaseExpired:
            break
        assert time.monotonic() < deadline, "the deadline never passed"
        time.sleep(0.01)
    g.set_deadline(0)
    g.enter()
    g.leave()


def test_gate_clock_is_python_monotonic():
    """monotonic_ns is CLOCK_MONOTONIC, the clock time.monotonic_ns reads."""
    a = time.monotonic_ns()
    b = monotonic_ns()
    c = time.monotonic_ns()
    assert a <= b <= c


def test_gate_held_write_fails_if_deadline_passed_while_held():
    """A write held by a closed gate across the deadline fails once admitted;
    the writers queued behind it still get their turn."""
    g = Gate()
    g.set_deadline(monotonic_ns() + 10_000_000_000)
    assert g.close(timeout=1)
    out = []

    def writer():
        try:
            g.enter()
            g.leave()
            out.append("in")
        except WriteLeaseExpired:
            out.append("refused")
    ts = [threading.Thread(target=writer) for _ in range(2)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 30
    while g.waiting < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    g.set_deadline(monotonic_ns() - 1)
    g.open()
    for t in ts:
        t.join(30)
    assert out == ["refused", "refused"] and g.inside == 0 and g.waiting == 0
    g.set_deadline(0)
    g.enter()
    g.leave()


def test_gate_deadline_out_of_range_is_refused():
    """A negative deadline is a bug, refused before C."""
    with pytest.raises(ValueError):
        Gate().set_deadline(-5)
