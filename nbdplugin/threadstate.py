"""Keep a Python thread state on each nbdkit worker thread between requests.

nbdkit's python plugin (1.32) wraps every callback in ``PyGILState_Ensure``
/ ``PyGILState_Release``.  nbdkit's worker threads are not Python threads:
between two callbacks such a thread has no thread state, so Ensure makes a
new one and Release destroys it.  Each request then pays for a thread
state's allocation, its 16 KiB frame stack (an mmap, a page fault and a
munmap) and a gettid: measured with strace and perf on a bare pass-through
plugin (bench/passthrough.py), that is about half of its CPU time per 4 KiB
write.

``keep()``, called at the top of a callback, takes one more Ensure on a
thread's first call and never releases it, so nbdkit's Release no longer
brings the count to zero: the thread state lives as long as the thread.
``release_dead()`` deletes the kept states of threads that have ended.  The
plugin calls it when a connection closes (nbdkit ends a connection's worker
threads before its close callback runs), so kept states are bounded by the
threads alive, not by the connections ever served.

Why deleting is safe: a kept state is deleted only once its thread is gone
(``/proc/self/task/TID`` no longer exists: the kernel removes it when the
thread has exited, and a reused TID belongs to a newer thread whose own
state is not the one recorded).  A state whose thread ended outside a
callback has no frame; it is cleared and deleted with the GIL held, as the
interpreter itself does for the threads of a forked child.  ``_kept`` is
changed only with the GIL held, and ``pop`` decides which caller deletes.

Rejected: one long-lived Python thread doing the I/O for nbdkit's threads
(a hand-off and a wake-up per request: the cost this module removes, moved);
nothing to release (a thread state and 16 KiB leaked per connection).
"""

from __future__ import annotations

import ctypes
import os
import threading

_api = ctypes.pythonapi         # a PyDLL: calls keep the GIL
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Ensure.argtypes = []
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Get.argtypes = []
_api.PyThreadState_Clear.restype = None
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.restype = None
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]

_local = threading.local()      # lives in the thread state: ``seen`` once checked
_kept: dict[int, int] = {}      # kept thread state's address -> its thread's TID
# A forked child has only the forking thread: CPython deletes every other
# thread state there, so the child must not delete them again.
os.register_at_fork(after_in_child=_kept.clear)


def keep() -> None:
    """Keep the calling thread's Python thread state until the thread ends.

    Only a thread that Python did not start (nbdkit's) is kept: CPython
    deletes a Python thread's state itself when it ends, and a kept entry
    for it would dangle.  Either way the check runs once per thread.  Call
    it from plugin callbacks only: a thread started with ``_thread`` alone
    would not be recognised as Python's.
    """
    if "seen" in _local.__dict__:
        return
    _local.seen = True
    if threading.get_ident() in {t.ident for t in threading.enumerate()}:
        return
    _api.PyGILState_Ensure()
    _kept[_api.PyThreadState_Get()] = threading.get_native_id()


def release_dead() -> int:
    """Delete the kept thread states of threads that have ended; return how many."""
    n = 0
    for ts, tid in list(_kept.items()):
        if os.path.exists(f"/proc/self/task/{tid}"):
            continue
        if _kept.pop(ts, None) is None:
            continue            # another thread deleted it meanwhile
        _api.PyThreadState_Clear(ts)
        _api.PyThreadState_Delete(ts)
        n += 1
    return n


def kept() -> int:
    """How many thread states are kept (alive threads and not yet released)."""
    return len(_kept)
