"""``cgmirror secondary start|stop [NAME...]``: run the session's secondaries.

The remote site's processes: the same plugin with ``role=secondary``
(``SecondaryConfig.spec``), started detached and stopped through
``coordinator.launch`` exactly as ``cgmirror slave`` does for primaries.
"""

from __future__ import annotations

import psutil

from coordinator import direction, launch

from .errors import ExitCode, SlaveError, UsageError
from .lock import SessionLock


def register(sub) -> None:
    """``cgmirror secondary start|stop [NAME...]``."""
    sec = sub.add_parser("secondary", help="start or stop secondaries (the remote site)")
    actions = sec.add_subparsers(dest="action", required=True, metavar="ACTION")
    for fn, text in ((start, "start secondaries (all if none named), detached"),
                     (stop, "stop secondaries (all if none named)")):
        a = actions.add_parser(fn.__name__, help=text)
        a.add_argument("names", nargs="*", metavar="NAME")
        a.set_defaults(func=lambda ctx, args, fn=fn: fn(ctx, args.names))
    a = actions.add_parser("run", help="run one secondary in the foreground (systemd)")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=lambda ctx, args: run(ctx, args.name))


def select(session, names: list[str]) -> list:
    """The named secondaries (all if none named), in session order."""
    if not session.secondaries:
        raise UsageError(f"session {session.name} has no [[secondary]]")
    for n in names:
        session.secondary(n)
    return [r for r in session.secondaries if not names or r.name in names]


def start(ctx, names: list[str]) -> ExitCode:
    s = ctx.session
    with SessionLock(s.name, s.state_dir):
        for cfg in select(s, names):
            spec = direction.spec(s, cfg)      # the role failover/switchover left
            pid = launch.running_pid(spec)
            if pid:
                ctx.say(f"{cfg.name}: already running (pid {pid})")
                continue
            try:
                proc = launch.start(spec, detach=True)
            except (launch.LaunchError, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot start secondary {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: started (pid {proc.pid}), secondary of"
                    f" {', '.join(v[0] for v in cfg.volumes)} on {cfg.nbd or cfg.nbd_socket}")
    return ExitCode.OK


def run(ctx, name: str) -> ExitCode:
    """``secondary run NAME``: become the secondary (see ``launch.exec_foreground``)."""
    s = ctx.session
    cfg = select(s, [name])[0]
    try:
        launch.exec_foreground(direction.spec(s, cfg))
    except launch.LaunchError as exc:
        raise SlaveError(name, str(exc), "launch") from exc
    return ExitCode.FAILED      # not reached: exec replaced this process


def stop(ctx, names: list[str]) -> ExitCode:
    s = ctx.session
    with SessionLock(s.name, s.state_dir):
        for cfg in select(s, names):
            spec = cfg.spec()
            pid = launch.running_pid(spec)
            try:
                stopped = launch.stop(spec)
            except (psutil.Error, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot stop secondary {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: stopped (pid {pid})" if stopped
                    else f"{cfg.name}: was not running")
    return ExitCode.OK
