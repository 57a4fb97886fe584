"""nbdplugin.threadstate: nbdkit worker threads keep their Python thread
state between requests, and give it back when they end.

In-process, the threads Python did not start are made with pthread_create
and a ctypes callback, which enters Python through PyGILState_Ensure and
leaves through PyGILState_Release exactly as nbdkit's python plugin does;
the interpreter's own list of thread states is the witness.  Through nbdkit,
the slave's minor page faults are: a thread state built per request brings
a freshly mapped 16 KiB frame stack, so at least one fault per request.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

import nbd

from cgtest import wait_until
from nbdplugin import threadstate

_libc = ctypes.CDLL(None, use_errno=True)
_START = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_api = ctypes.pythonapi
_api.PyThreadState_GetInterpreter.restype = ctypes.c_void_p
_api.PyThreadState_GetInterpreter.argtypes = [ctypes.c_void_p]
_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Next.restype = ctypes.c_void_p
_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]


def thread_states() -> int:
    """How many thread states the interpreter holds (no thread starts
    meanwhile in these tests, so reading the list under the GIL is safe)."""
    ts = _api.PyInterpreterState_ThreadHead(
        _api.PyThreadState_GetInterpreter(_api.PyThreadState_Get()))
    n = 0
    while ts:
        n += 1
        ts = _api.PyThreadState_Next(ts)
    return n


class Foreign:
    """Native threads, each running ``fn`` once as a callback."""

    def __init__(self, fn, n=1):
        self.errors: list[BaseException] = []

        def body(_arg):
            try:
                fn()
            except BaseException as exc:     # ctypes would only print it
                self.errors.append(exc)
            return None

        self._cb = _START(body)              # must outlive the threads
        self._tids = [ctypes.c_ulong() for _ in range(n)]

    def start(self):
        for t in self._tids:
            assert _libc.pthread_create(ctypes.byref(t), None, self._cb, None) == 0
        return self

    def join(self):
        for t in self._tids:                 # a CDLL call: the GIL is released
            assert _libc.pthread_join(t, None) == 0
        assert not self.errors, self.errors


def release_all(want: int) -> None:
    """Release kept states until ``want`` were (a joined thread's /proc
    entry can outlive pthread_join by a moment)."""
    got = [0]

    def done():
        got[0] += threadstate.release_dead()
        return got[0] >= want
    wait_until(done, 10, f"{want} kept thread states released")
    assert got[0] == want


def test_a_foreign_thread_keeps_its_state_until_it_ends():
    """Kept: three native threads that called keep() leave three thread
    states behind; release_dead() frees exactly them once the threads end."""
    base, kept = thread_states(), threadstate.kept()
    Foreign(threadstate.keep, 3).start().join()
    assert thread_states() == base + 3
    assert threadstate.kept() == kept + 3
    release_all(3)
    assert thread_states() == base
    assert threadstate.kept() == kept


def test_without_keep_a_foreign_thread_state_lives_one_callback():
    """Not kept: the state of a callback that did not call keep() is gone
    when the callback returns (nbdkit's cost per request)."""
    base = thread_states()
    Foreign(lambda: None, 3).start().join()
    assert thread_states() == base


def test_keep_twice_on_one_thread_keeps_one_state():
    """keep() at every request of a thread keeps one state, not one per call."""
    base = thread_states()

    def twice():
        threadstate.keep()
        threadstate.keep()
    Foreign(twice).start().join()
    assert thread_states() == base + 1
    release_all(1)
    assert thread_states() == base


def test_a_live_thread_keeps_its_state_through_release_dead():
    """release_dead() leaves the state of a thread that is still running."""
    base = thread_states()
    inside, go = threading.Event(), threading.Event()

    def hold():
        threadstate.keep()
        inside.set()
        go.wait(30)
    f = Foreign(hold).start()
    try:
        assert inside.wait(10)
        assert threadstate.release_dead() == 0
        assert thread_states() == base + 1
    finally:
        go.set()
        f.join()
    release_all(1)
    assert thread_states() == base


def test_a_forked_child_forgets_the_kept_states():
    """In a child forked while a kept thread runs, nothing is kept: CPython
    already deleted the other threads' states there."""
    inside, go = threading.Event(), threading.Event()

    def hold():
        threadstate.keep()
        inside.set()
        go.wait(30)
    f = Foreign(hold).start()
    try:
        assert inside.wait(10)
        assert threadstate.kept() >= 1
        pid = os.fork()
        if pid == 0:
            os._exit(0 if threadstate.kept() == 0 and threadstate.release_dead() == 0
                     else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        go.set()
        f.join()
    release_all(1)


def test_a_python_thread_is_not_kept():
    """A thread Python started is left alone: CPython frees its state."""
    kept = threadstate.kept()
    t = threading.Thread(target=threadstate.keep)
    t.start()
    t.join(10)
    assert threadstate.kept() == kept


# ------------------------------------------------------------------ nbdkit

def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[7])   # field 10, minflt


def write_some(proc, n=2000):
    """One connection: mark and cache every block, then ``n`` 4 KiB writes;
    returns the slave's minor page faults during those ``n``."""
    buf = b"w" * 4096
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    try:
        for i in range(1024):
            h.pwrite(buf, i * 4096)
        before = minor_faults(proc.pid)
        for i in range(n):
            h.pwrite(buf, (i * 7 % 1024) * 4096)
        return minor_faults(proc.pid) - before
    finally:
        h.shutdown()


def thread_dump(proc) -> list[str]:
    """The thread headers of one faulthandler dump (``kill -USR1``) from the
    slave's log: every Python thread state, live or kept."""
    with open(proc.spec.logfile, "rb") as f:
        f.seek(0, 2)
        start = f.tell()
    os.kill(proc.pid, signal.SIGUSR1)
    text = [""]

    def dumped():
        # The signal handler writes the dump in a burst: done once it has
        # the thread that took the signal and stopped growing.
        with open(proc.spec.logfile, "rb") as f:
            f.seek(start)
            now = f.read().decode(errors="replace")
        done = "Current thread 0x" in now and now.endswith("\n") and now == text[0]
        text[0] = now
        return done
    wait_until(dumped, 10, "a thread dump in the slave's log")
    return [line for line in text[0].splitlines()
            if line.startswith(("Thread 0x", "Current thread 0x"))]


def test_slave_writes_build_no_thread_state_per_request(slaves):
    """2000 4 KiB writes on one connection cost the slave far fewer minor
    page faults than requests (one each when every request builds a
    thread state)."""
    proc = slaves(volumes=[("a", 4 << 20)])
    faults = write_some(proc)
    assert faults < 200, f"{faults} minor page faults for 2000 writes"


def test_slave_releases_the_thread_states_of_closed_connections(slaves):
    """Five more connections, each writing and then closing, leave the
    slave with as many Python thread states as after the first."""
    proc = slaves(volumes=[("a", 4 << 20)])
    write_some(proc, 10)
    first = thread_dump(proc)
    for _ in range(5):
        write_some(proc, 10)
    assert len(thread_dump(proc)) == len(first), first
