"""Every error the coordinator reports, and the exit code each one maps to.

Each error says whose fault it was: the local configuration or machine, a
slave, or a copy target.  The CLI prints ``str(error)`` as one line on stderr
and exits with ``error.exit_code``.

    CgmirrorError                       FAILED     (base; never raised bare)
     ├── UsageError                     USAGE      the command line
     ├── ConfigError                    CONFIG     the session file (local)
     │    └── UnknownVolume             CONFIG     session and running slave disagree
     ├── LocalError                     FAILED     this machine: state dir, history DB
     ├── InternalError                  FAILED     a bug in cgmirror (any other exception)
     ├── BusyError                      BUSY       another cgmirror holds the session
     ├── SlaveError                     FAILED     a slave refused or failed a request
     │    ├── SlaveUnreachable          UNREACHABLE  its control socket does not answer
     │    └── SlaveBusy                 BUSY       it is in another cut
     ├── TargetError                    TARGET     a copy target failed, is too small, ...
     ├── EstablishAborted               ABORTED    the point in time could not be
     │                                             established; every slave was told
     │                                             to abort the cut
     ├── CopyFailed                     FAILED, TARGET or UNREACHABLE (whose fault)
     │                                             the copy of an established cut failed
     ├── MirrorError                    FAILED     the mirror could not do what was asked
     ├── MirrorNotRunning               UNREACHABLE  no mirror answers on the control socket
     ├── DirectionError                 FAILED     the command does not fit the recorded
     │                                             direction (coordinator/direction.py)
     └── FailoverError                  FAILED     a role switch cannot go on

Lower-layer errors are translated once, where they enter the coordinator:
``ControlError`` in ``link.py``, ``LaunchError`` in ``cli/slave_cmds.py`` and
``roles/failover.py``,
``tomllib``/``OSError`` of the session file in ``session.py``, ``OSError`` and
``sqlite3.Error`` of the state directory in ``lock.py`` and ``history.py``,
each with ``raise ... from exc``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The exit status of every ``cgmirror`` command."""

    OK = 0
    FAILED = 1        # the operation ran and failed (see the message)
    USAGE = 2         # bad command line
    CONFIG = 3        # bad session file, or it disagrees with a running slave
    UNREACHABLE = 4   # a slave's control socket does not answer
    BUSY = 5          # another cgmirror holds the session, or a slave is busy
    ABORTED = 6       # the consistent point in time could not be established
    TARGET = 7        # a copy target failed (unreachable, too small, I/O error)
    INTERRUPTED = 130  # Ctrl-C (SIGINT), the shell's 128 + 2


# What the user sees (and history records) when Ctrl-C stops a command.
INTERRUPTED = "interrupted by the operator (Ctrl-C)"


def describe(exc: BaseException) -> str:
    """One line for people about any exception, never a bare class name.

    Our errors are already one line; Ctrl-C is said in words; anything else
    (a bug) keeps its class name, because "list index out of range" alone
    does not say it was a bug, with its message squeezed onto one line.
    """
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(exc, CgmirrorError):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"internal error ({type(exc).__name__}): {text}" if text else \
        f"internal error ({type(exc).__name__})"


class CgmirrorError(Exception):
    """Base of every coordinator error; ``str()`` is one line."""

    exit_code: ExitCode = ExitCode.FAILED
    fault = "local"

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    def to_json(self) -> dict:
        return {"ok": False, "error": str(self), "error_type": type(self).__name__,
                "fault": self.fault, "exit_code": int(self.exit_code)}


class UsageError(CgmirrorError):
    """The command line is wrong."""

    exit_code = ExitCode.USAGE


class ConfigError(CgmirrorError):
    """The session file is missing, unreadable or invalid (local configuration)."""

    exit_code = ExitCode.CONFIG


class UnknownVolume(ConfigError):
    """The session names a volume that the running slave does not serve."""

    def __init__(self, slave: str, volume: str, message: str):
        super().__init__(message)
        self.slave, self.volume = slave, volume


class LocalError(CgmirrorError):
    """This machine failed us: state directory, history database, ..."""


class InternalError(CgmirrorError):
    """Any other exception reaching the CLI: a bug, said in one line."""


class BusyError(CgmirrorError):
    """Another cgmirror coordinates this session right now."""

    exit_code = ExitCode.BUSY

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class SlaveError(CgmirrorError):
    """A slave refused or failed a request (the slave's side)."""

    fault = "slave"

    def __init__(self, slave: str, message: str, kind: str = "protocol"):
        super().__init__(message)
        self.slave, self.kind = slave, kind


class SlaveUnreachable(SlaveError):
    """A slave's control socket cannot be reached or stopped answering."""

    exit_code = ExitCode.UNREACHABLE


class SlaveBusy(SlaveError):
    """A slave is in a cut that this command did not expect."""

    exit_code = ExitCode.BUSY


class TargetError(CgmirrorError):
    """A copy target failed: unreachable, too small, read-only, I/O error."""

    exit_code = ExitCode.TARGET
    fault = "target"


class EstablishAborted(CgmirrorError):
    """Cut ``n`` could not be established on every slave; all were told to abort.

    ``slave`` is the first slave that failed (or None if the coordination time
    ran out with several still pending), ``reason`` why; ``aborts`` maps each
    slave to the outcome of its abort ("aborted", "not in cut", or an error).
    """

    exit_code = ExitCode.ABORTED
    fault = "slave"

    def __init__(self, n: int, slave: str | None, reason: str,
                 aborts: dict[str, str] | None = None):
        who = f"{slave}: " if slave else ""
        super().__init__(f"cut {n} aborted: {who}{reason}")
        self.n, self.slave, self.reason = n, slave, reason
        self.aborts = aborts or {}


class CopyFailed(CgmirrorError):
    """The copy of established cut ``n`` failed on at least one volume.

    ``failures`` maps "slave/volume" (or "slave" for a whole slave) to its
    one-line error; ``fault`` is "target" when only targets failed, "slave"
    when a slave died or refused.  ``report`` is the partial copy report.
    """

    def __init__(self, n: int, failures: dict[str, str], fault: str,
                 report: dict | None = None):
        first = next(iter(failures.items()))
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"copy of cut {n} failed: {first[0]}: {first[1]}{more}")
        self.n, self.failures, self.fault = n, failures, fault
        self.report = report
        self.exit_code = {"target": ExitCode.TARGET,
                          "unreachable": ExitCode.UNREACHABLE}.get(fault, ExitCode.FAILED)


class MirrorError(CgmirrorError):
    """The mirror could not do what was asked (the message says why)."""


class MirrorNotRunning(CgmirrorError):
    """No ``cgmirror mirror run`` answers on the session's control socket."""

    exit_code = ExitCode.UNREACHABLE


class DirectionError(CgmirrorError):
    """The command does not fit the session's current direction (the
    message says what to run instead)."""


class FailoverError(CgmirrorError):
    """A role switch cannot go on (the message says what to do)."""
