"""Epoch fencing (issue 19): a node refuses what a deposed leader sends.

In cluster mode every request of the leading coordinator carries its epoch
(``protocol.EPOCH_KEY``: the revision of its etcd election key, so a later
leader always has a higher one).  The node keeps the highest epoch it has
seen in its record (node.json ``"epoch": {"n", "at"}``) and:

- a request carrying a higher epoch -- any op, a status too: the leader's
  preflight announces it -- is recorded durably (``NodeRecord.raise_epoch``:
  write_atomic) *before* the request is acted on, then handed to the C gate
  (``on_raise``: ``cg_core_set_epoch``), whose FREEZE compares against it;
- a request carrying a lower epoch is refused, kind FENCED, in one line,
  when its op changes data, cut state, role or the record
  (``protocol.FENCED_OPS``); thaw, abort and reads are served (a stale thaw
  or abort only releases what its own freeze holds);
- a request without an epoch is served as before (tools, no cluster).

Ordering, a fencing token's whole point: once a node has answered a
request of epoch N, no op of an epoch below N runs or starts.  So a raise
waits for the fenced ops already admitted (``_active``) to finish -- each
is bounded: a freeze by its lease, a fence by its timeout -- and no fenced
op is admitted while a raise waits or writes (``_raising``); one that
hangs past ``raise_wait_s`` makes the raise refuse, kind BUSY.  Ops that are
not fenced and requests without an epoch never touch the lock.

Crash points: the raise is one ``NodeRecord.update`` (temp, fsync, rename,
fsync dir).  Killed before the rename, the node restarts with the old epoch
and the request that carried the new one was never acted on (its leader
asks again and it is recorded then); after it, the node restarts with the
new epoch and hands it to the C gate before the gate socket serves
(``Slave.attach``).

Rejected: checking the epoch in each op under the role's own lock (every
op would need to know of it, and the C gate's freeze holds no Python lock);
an in-memory epoch with a periodic write (a restart would forget it, and a
deposed leader could freeze a node that just restarted).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from wire import protocol
from wire.protocol import Kind, ProtocolError

log = logging.getLogger(__name__)


class EpochFence:
    """The epoch check of one node's requests (module doc).  ``node`` is its
    NodeRecord; ``on_raise(n)`` is called once the epoch ``n`` is durable."""

    # How long a raise waits for the fenced ops in flight: every one is
    # bounded (a freeze by its lease, at most MAX_LEASE_MS; a fence by its
    # timeout, as long), so this is only the guard against one that hangs
    # (a target that never answers an adopt): the new leader is told BUSY
    # and asks again, rather than a thread waiting forever.
    raise_wait_s = protocol.MAX_LEASE_MS / 1000 + 5

    def __init__(self, node, on_raise: Callable[[int], None] | None = None):
        self.node = node
        self.on_raise = on_raise
        self._cond = threading.Condition()
        self._active = 0            # fenced ops admitted and still running
        self._raising = 0           # raises waiting or writing

    @property
    def epoch(self) -> int:
        """The recorded epoch (0: none yet)."""
        return self.node.epoch

    @contextmanager
    def admit(self, op: str, epoch: int | None) -> Iterator[None]:
        """Around one request of ``op`` carrying ``epoch`` (None: none):
        record a higher one first, refuse a lower one on a fenced op
        (ProtocolError, kind FENCED), else let the op run inside."""
        if epoch is None:
            yield
            return
        if epoch > self.node.epoch:
            self._raise(epoch)
        if op not in protocol.FENCED_OPS:
            yield
            return
        with self._cond:
            while self._raising:
                self._cond.wait()
            seen = self.node.epoch
            if epoch < seen:
                raise ProtocolError(protocol.fenced_message(self.node.who(), seen, epoch,
                                                            self.node.session), Kind.FENCED)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def _raise(self, epoch: int) -> None:
        with self._cond:
            self._raising += 1
            try:
                deadline = time.monotonic() + self.raise_wait_s
                while self._active:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ProtocolError(
                            f"{self.node.who()} cannot record leader epoch {epoch} yet:"
                            f" {self._active} op(s) of epoch {self.node.epoch} still run"
                            f" after {self.raise_wait_s:g} s; ask again", Kind.BUSY)
                    self._cond.wait(left)
                old = self.node.epoch
                if epoch <= old:
                    return              # another request recorded it meanwhile
                self.node.raise_epoch(epoch)
                if self.on_raise is not None:
                    self.on_raise(epoch)
            finally:
                self._raising -= 1
                self._cond.notify_all()
        log.info("%s: leader epoch %d recorded (was %s)", self.node.who(), epoch,
                 old or "none")
