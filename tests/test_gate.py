"""The freeze gate, driven by threads (no nbdkit)."""

import threading
import time

from native.gate import Gate


def _writer(gate, log, tag, started=None):
    if started:
        started.set()
    # The place in the order of admission: the threads run on without the
    # GIL once admitted, so the order they append in proves nothing.
    log.append((gate.enter_seq(), tag))
    gate.leave()


def test_open_gate_admits_at_once():
    """An open gate does not make a writer wait."""
    g = Gate()
    g.enter()
    assert g.inside == 1
    g.leave()
    assert g.inside == 0


def test_close_waits_for_writers_inside():
    """close() returns only after requests already inside have left."""
    g = Gate()
    g.enter()
    threading.Timer(0.2, g.leave).start()
    t0 = time.monotonic()
    assert g.close(timeout=5)
    assert time.monotonic() - t0 >= 0.15
    g.open()


def test_close_times_out_when_a_writer_never_leaves():
    """close() reports failure rather than hang."""
    g = Gate()
    g.enter()
    assert not g.close(timeout=0.05)
    g.leave()
    g.open()


def test_closed_gate_holds_writers_and_open_releases_in_order():
    """Writers held by a closed gate enter in arrival order once it opens."""
    g = Gate()
    t0 = time.monotonic()
    assert g.close(timeout=1)
    log = []
    threads = []
    for i in range(8):
        started = threading.Event()
        t = threading.Thread(target=_writer, args=(g, log, i, started))
        t.start()
        started.wait()
        # wait until this writer is queued before starting the next
        deadline = time.monotonic() + 30
        while g.waiting < i + 1:
            assert time.monotonic() < deadline, f"writer {i} never queued at the gate"
            time.sleep(0.001)
        threads.append(t)
    assert g.waiting == 8 and log == []     # all eight queued, none admitted
    held = g.open()
    closed_for = time.monotonic() - t0
    for t in threads:
        t.join(30)
    assert [tag for _, tag in sorted(log)] == list(range(8))
    assert 0 < held <= closed_for
