"""``cgmirror slave start|stop [NAME...]``: run the session's slaves.

Slaves are started detached (their own session, so they outlive this
command) through ``coordinator.launch``, which removes stale sockets, writes
the pidfile and waits until the control socket answers.  ``LaunchError`` and
psutil errors become ``SlaveError`` here.
"""

from __future__ import annotations

import psutil

from coordinator import direction, launch

from .errors import ExitCode, SlaveError
from .lock import SessionLock


def register(sub) -> None:
    """``cgmirror slave start|stop [NAME...]``."""
    slave = sub.add_parser("slave", help="start or stop slaves")
    actions = slave.add_subparsers(dest="action", required=True, metavar="ACTION")
    for fn, text in ((start, "start slaves (all if none named), detached"),
                     (stop, "stop slaves (all if none named)")):
        a = actions.add_parser(fn.__name__, help=text)
        a.add_argument("names", nargs="*", metavar="NAME")
        a.set_defaults(func=lambda ctx, args, fn=fn: fn(ctx, args.names))
    a = actions.add_parser("run", help="run one slave in the foreground (systemd)")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=lambda ctx, args: run(ctx, args.name))


def start(ctx, names: list[str]) -> ExitCode:
    s = ctx.session
    with SessionLock(s.name, s.state_dir):
        for cfg in s.select(names):
            spec = direction.spec(s, cfg)      # the role failover/switchover left
            pid = launch.running_pid(spec)
            if pid:
                ctx.say(f"{cfg.name}: already running (pid {pid})")
                continue
            try:
                proc = launch.start(spec, detach=True)
            except (launch.LaunchError, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot start slave {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: started (pid {proc.pid}), serving"
                    f" {', '.join(v.name for v in cfg.volumes)} on {cfg.nbd or cfg.nbd_socket}")
    return ExitCode.OK


def run(ctx, name: str) -> ExitCode:
    """``slave run NAME``: become the slave (see ``launch.exec_foreground``)."""
    s = ctx.session
    cfg = s.select([name])[0]
    try:
        launch.exec_foreground(direction.spec(s, cfg))
    except launch.LaunchError as exc:
        raise SlaveError(name, str(exc), "launch") from exc
    return ExitCode.FAILED      # not reached: exec replaced this process


def stop(ctx, names: list[str]) -> ExitCode:
    s = ctx.session
    with SessionLock(s.name, s.state_dir):
        for cfg in s.select(names):
            spec = cfg.spec()
            pid = launch.running_pid(spec)
            try:
                stopped = launch.stop(spec)
            except (psutil.Error, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot stop slave {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: stopped (pid {pid})" if stopped
                    else f"{cfg.name}: was not running")
    return ExitCode.OK
