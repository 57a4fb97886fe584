"""One coordinator per session: an flock on ``<state_dir>/coordinator.lock``.

The lock is held for the whole of a command that forms groups (``copy``,
``mirror run``, and the role commands that run while no mirror does);
read-only commands (``status``, ``history``) do not take it, so a copy can
be watched.  flock is released by the kernel when the holder dies, so a
crashed coordinator never leaves the session locked; the pid written into
the file only names the holder.

Two smaller locks sit beside it, files of the same kind in the same
directory: ``role.lock``, held by every role command (failover, failback,
resync, switchover) so that two never interleave, also beside a running
mirror; and ``node-NAME.lock``, held while cgmirror starts, stops or
restarts node NAME (``slave|secondary start|stop``, a role switch), so
that two starts of one node never race.  Neither is the session lock: a
node may be started, stopped or restarted while a mirror runs.

What may run beside a running ``cgmirror mirror run`` (the one rule; the
README's "Failover" section has the same table):

=============================  ==============================================
``slave|secondary start|stop``  always (node lock; the mirror reconnects to
                                a node that comes back)
``status``, ``history``,        always (read only, or a request to the
``check``, ``mirror status|``   running mirror)
``pause|resume|rate``,
``events``, ``verify``
``failover``                    pauses the mirror and waits (bounded) until
                                its group in flight hardened or was
                                abandoned, then settles and promotes; the
                                mirror stays paused (it forms no group while
                                the sites are split); if the group does not
                                end in time: refused before any change
``failover --test|--end-test``  parks the mirror / resumes it
``failback``, ``resync``,       refused before any change, exit 5 (BUSY):
``switchover``                  they form groups themselves, and one
                                coordinator forms groups per session; the
                                line names the mirror's pid and
                                ``systemctl stop cgmirror-mirror@SESSION``;
                                a rerun with nothing left to do still
                                answers "nothing to do" (exit 0)
``copy``                        refused, exit 2, in a session that mirrors
                                (running or not): copy sends to fixed
                                targets, a mirrored pair is the mirror's
                                (cli/copy_cmds.py)
``mirror run``                  refused, exit 5: one mirror per session
=============================  ==============================================

Cluster mode (``[cluster]``) changes the rule for the role commands: the
session lock guards one host only, and ``mirror run`` units run on every
coordinator host (one leads, the others stand by), so a mirror on this
host says nothing about who forms groups.  There a role command takes
``role.lock`` and the etcd role lock (``cluster.RoleLock``: one role
command at a time across hosts, BUSY naming the holder), parks the leader
through etcd, and forms its groups beside any local ``mirror run``: the
session lock is stood in for by ``standing_in`` (the parked leader and the
role lock are the guard).  coordinator/roles/failover.py says when the
leader goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from wire import files

from .errors import BusyError, LocalError

LOCK_NAME = "coordinator.lock"
ROLE_LOCK = "role.lock"
NODE_WAIT_S = 120.0             # a start or stop of the same node by someone else


def node_lock_name(node: str) -> str:
    return f"node-{node}.lock"


@contextlib.contextmanager
def node_held(session: str, state_dir: str, node: str):
    """Hold ``node-NODE.lock`` (waiting up to NODE_WAIT_S for another start
    or stop of that node) while this process starts, stops or restarts it."""
    lk = SessionLock(session, state_dir, node_lock_name(node)).acquire(NODE_WAIT_S)
    try:
        yield lk
    finally:
        lk.release()


def mirror_runs(session: str, pid, command: str) -> BusyError:
    """The refusal of ``command`` beside a running mirror (the table in the
    module doc): one line naming what to run."""
    return BusyError(f"`cgmirror mirror run` (pid {pid}) mirrors session {session}:"
                     f" stop it (`systemctl stop cgmirror-mirror@{session}`, or"
                     f" `kill {pid}` if you started it by hand), run `cgmirror"
                     f" {command}` again, then start the mirror again", pid)


class SessionLock:
    """``with SessionLock(name, state_dir):`` or ``acquire()``/``release()``."""

    def __init__(self, session: str, state_dir: str, name: str = LOCK_NAME):
        self.session = session
        self.path = os.path.join(state_dir, name)
        self._fd: int | None = None
        self._borrowed = False

    def acquire(self, wait: float = 0.0) -> "SessionLock":
        """Take the lock; BusyError at once (``wait``: after that many
        seconds) if another holds it.  In a process that ``lend``s it (a
        role command forming its groups through a Mirror), it is taken as
        the lender's."""
        lender = _lent.get(self.path)
        if lender is not None and lender.held():
            self._borrowed = True
            return self
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._acquire()
            except BusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def held(self) -> bool:
        """This object holds the lock now."""
        return self._fd is not None

    def lend(self) -> "_Lending":
        """``with lock.lend():`` this process's other SessionLocks of the same
        file take this one instead of failing BUSY."""
        return _Lending(self)

    def _acquire(self) -> "SessionLock":
        try:
            files.make_dirs(os.path.dirname(self.path), files.READABLE_DIR)
            fd = files.open_private(self.path, mode=files.READABLE_FILE)
        except OSError as exc:
            raise LocalError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            try:
                pid = int(os.pread(fd, 32, 0).split()[0])
            except (OSError, ValueError, IndexError):
                pid = None
            os.close(fd)
            raise BusyError(f"session {self.session} is busy: another cgmirror"
                            f" (pid {pid if pid else '?'}) holds {self.path}", pid) from exc
        except OSError as exc:
            os.close(fd)
            raise LocalError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> int | None:
        """The pid of a live process holding the lock now, else None; reads
        only, so watching (``status``) never makes a starting copy BUSY.  The
        holder truncates the pid on release; a pid left by one that died is
        not alive (pid reuse aside, which only delays "interrupted")."""
        try:
            with open(self.path, "rb") as f:
                pid = int(f.read(32).split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass                # alive, someone else's
        return pid

    def release(self) -> None:
        if self._borrowed:
            self._borrowed = False
            return
        if self._fd is not None:
            # Keep the file (others may have it open); just drop our pid and lock.
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "SessionLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_lent: dict[str, SessionLock] = {}


class _StandIn:
    """Lent in place of the session lock (``standing_in``)."""

    def __init__(self, path: str):
        self.path = path

    def held(self) -> bool:
        return True


def standing_in(session: str, state_dir: str) -> "_Lending":
    """``with standing_in(session, state_dir):`` this process's SessionLocks
    of the session lock are taken as held although another process (a
    local ``mirror run``) holds the flock: cluster mode's role commands,
    whose guard is the parked leader and the etcd role lock (module doc).
    Only for them: everything else keeps the flock."""
    return _Lending(_StandIn(SessionLock(session, state_dir).path))


class _Lending:
    def __init__(self, lock: SessionLock):
        self.lock = lock

    def __enter__(self) -> SessionLock:
        _lent[self.lock.path] = self.lock
        return self.lock

    def __exit__(self, *exc) -> None:
        _lent.pop(self.lock.path, None)
