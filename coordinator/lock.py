"""One coordinator per session: an flock on ``<state_dir>/coordinator.lock``.

The lock is held for the whole of a command that drives slaves (``copy``,
``slave start``, ``slave stop``); read-only commands (``status``,
``history``) do not take it, so a copy can be watched.  flock is released by
the kernel when the holder dies, so a crashed coordinator never leaves the
session locked; the pid written into the file only names the holder.
"""

from __future__ import annotations

import fcntl
import os

from wire import files

from .errors import BusyError, LocalError

LOCK_NAME = "coordinator.lock"


class SessionLock:
    """``with SessionLock(name, state_dir):`` or ``acquire()``/``release()``."""

    def __init__(self, session: str, state_dir: str):
        self.session = session
        self.path = os.path.join(state_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "SessionLock":
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
