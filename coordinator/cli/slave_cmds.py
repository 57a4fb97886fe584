"""``cgmirror slave|secondary start|stop|run [NAME...]``: run the session's nodes.

Both nouns work alike; they differ in which tables of the session they take
(``[[slave]]`` or ``[[secondary]]``) and how a started node is described.
Nodes are started detached (their own session, so they outlive this
command) through ``coordinator.launch``, under a supervisor that starts
them again after a role change; launch removes stale sockets, writes the
pidfile and waits until the control socket answers.  Each starts in the role
it recorded itself (``node_cmds.node_spec``).  ``LaunchError`` and psutil
errors become ``SlaveError`` here.

Starting and stopping a node is always allowed, also while ``cgmirror mirror
run`` holds the session (coordinator/lock.py has the rule for every
command): the node's own locks protect its state directory and volumes,
the mirror reconnects to a node that comes back, and cgmirror's per-node
lock (``node-NAME.lock``) keeps two starts or stops of one node, or one and
a role switch restarting it, from racing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import psutil

from coordinator import launch

from ..errors import ExitCode, SlaveError, UsageError
from ..lock import node_held
from .node_cmds import node_spec


@dataclass(frozen=True)
class Noun:
    """One kind of node: its CLI noun, how to pick its tables from a session,
    and what ``start`` says it serves."""

    name: str                                   # "slave" or "secondary"
    select: Callable[[object, list[str]], list]
    serves: Callable[[object], str]


def _secondaries(session, names: list[str]) -> list:
    """The named secondaries (all if none named), in session order."""
    if not session.secondaries:
        raise UsageError(f"session {session.name} has no [[secondary]]")
    for n in names:
        session.secondary(n)
    return [r for r in session.secondaries if not names or r.name in names]


SLAVE = Noun("slave", lambda s, names: s.select(names),
             lambda cfg: f"serving {', '.join(v.name for v in cfg.volumes)}"
                         f" on {cfg.nbd or cfg.nbd_socket}")
SECONDARY = Noun("secondary", _secondaries,
                 lambda cfg: f"secondary of {', '.join(v.name for v in cfg.volumes)}"
                             f" on {cfg.nbd or cfg.nbd_socket}")


def register(sub) -> None:
    """``cgmirror slave ...`` (the primary site) and ``cgmirror secondary ...``."""
    for noun, where in ((SLAVE, "slaves"), (SECONDARY, "secondaries (the remote site)")):
        p = sub.add_parser(noun.name, help=f"start, stop or run {where}")
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        for fn, text in ((start, "start {} (all if none named), detached"),
                         (stop, "stop {} (all if none named)")):
            a = actions.add_parser(fn.__name__, help=text.format(where))
            a.add_argument("names", nargs="*", metavar="NAME")
            a.set_defaults(func=lambda ctx, args, fn=fn, noun=noun: fn(ctx, noun, args.names))
        a = actions.add_parser("run", help=f"run one {noun.name} in the foreground (systemd)")
        a.add_argument("name", metavar="NAME")
        a.set_defaults(func=lambda ctx, args, noun=noun: run(ctx, noun, args.name))


def start(ctx, noun: Noun, names: list[str]) -> ExitCode:
    s = ctx.session
    for cfg in noun.select(s, names):
        with node_held(s.name, s.state_dir, cfg.name):
            spec = node_spec(s, cfg)            # the role the node recorded
            pid = launch.running_pid(spec) or launch.supervisor_pid(spec)
            if pid:
                ctx.say(f"{cfg.name}: already running (pid {pid})")
                continue
            try:
                proc = launch.start(spec, detach=True)
            except (launch.LaunchError, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot start {noun.name} {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: started (pid {proc.pid}), {noun.serves(cfg)}")
    return ExitCode.OK


def run(ctx, noun: Noun, name: str) -> ExitCode:
    """``run NAME``: become the node (see ``launch.exec_foreground``)."""
    s = ctx.session
    cfg = noun.select(s, [name])[0]
    try:
        launch.exec_foreground(node_spec(s, cfg))
    except launch.LaunchError as exc:
        raise SlaveError(name, str(exc), "launch") from exc
    return ExitCode.FAILED      # not reached: exec replaced this process


def stop(ctx, noun: Noun, names: list[str]) -> ExitCode:
    s = ctx.session
    for cfg in noun.select(s, names):
        with node_held(s.name, s.state_dir, cfg.name):
            spec = cfg.spec()
            pid = launch.running_pid(spec) or launch.supervisor_pid(spec)
            try:
                stopped = launch.stop(spec)
            except (psutil.Error, OSError) as exc:
                raise SlaveError(cfg.name, f"cannot stop {noun.name} {cfg.name}: {exc}",
                                 "launch") from exc
            ctx.say(f"{cfg.name}: stopped (pid {pid})" if stopped
                    else f"{cfg.name}: was not running")
    return ExitCode.OK
