"""``cgmirror node run|exec NAME``: run one node of the session on this host.

A node is a ``[[slave]]`` or a ``[[secondary]]`` of the session file; which
role it runs in is its own durable fact (``STATEDIR/node.json``, written by
the node), and the file gives only the first one.  Two ways to run it:

``node run NAME``   a foreground supervisor (``launch.supervise``): nbdkit
                    is its child; when the node exits ``RESTART_STATUS``
                    (a role change it recorded) it is started again in its
                    new role; any other exit status is passed up; SIGTERM
                    stops the node cleanly and exits 0.  For a shell, a
                    container, or any service manager without
                    ``RestartForceExitStatus=``.
``node exec NAME``  becomes nbdkit (exec) in the recorded role: the unit's
                    ExecStart (units/cgmirror-node@.service), so that
                    systemd's MAINPID, SIGTERM and READY=1 concern nbdkit,
                    and the unit's ``RestartForceExitStatus=`` restarts it.

``node_spec`` is how every command that starts a node (``slave|secondary
start|run`` too) names its role: the recorded one; before the node's first
start the file's, or, for a node older than issue 18 (no record yet) on a
host where a coordinator of that time kept ``direction.json``, the role that
file gave it (``legacy_role``).  Never by asking other nodes: a node starts
from what its own host holds, at boot, with the network down or the other
site cut off.  It also names the session and the node to the plugin
(``session=``, ``node=``), which records them and refuses to start as
another node or for another session.
"""

from __future__ import annotations

import dataclasses
import json
import os

from coordinator import launch

from ..errors import ExitCode, SlaveError, UsageError
from ..lock import node_held


def register(sub) -> None:
    """``cgmirror node run|exec NAME``."""
    p = sub.add_parser("node", help="run one node (slave or secondary) in its recorded role")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("run", help="supervise the node in the foreground: start it"
                                       " again after a role change")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=lambda ctx, args: run(ctx, args.name))
    a = actions.add_parser("exec", help="become the node's nbdkit (a unit's ExecStart)")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=lambda ctx, args: exec_(ctx, args.name))


def node_config(session, name: str):
    """The ``[[slave]]`` or ``[[secondary]]`` called ``name``; UsageError
    (one line naming the nodes there are) if there is none."""
    for cfg in (*session.slaves, *session.secondaries):
        if cfg.name == name:
            return cfg
    names = ", ".join(c.name for c in (*session.slaves, *session.secondaries)) or "none"
    raise UsageError(f"session {session.name} has no node {name!r} (its slaves and"
                     f" secondaries: {names})")


def node_spec(session, cfg) -> launch.SlaveSpec:
    """How to start node ``cfg`` now: in its recorded role (see the module doc)."""
    spec = dataclasses.replace(cfg.spec(), session=session.name)
    try:
        if launch.recorded_role(spec.statedir) is None:
            spec = dataclasses.replace(spec, role=legacy_role(session, cfg) or spec.role)
        return launch.in_recorded_role(spec)
    except launch.LaunchError as exc:
        raise SlaveError(cfg.name, f"node {cfg.name}: {exc}", "launch") from exc


# Where coordinators before issue 18 kept the direction (session state_dir).
LEGACY_DIRECTION = "direction.json"


def legacy_role(session, cfg) -> str | None:
    """The role a coordinator before issue 18 gave ``cfg``'s site in this
    host's ``direction.json`` (its rule: the source's nodes are primaries,
    both sites' in a DR test, the new source's once a switchover is past
    its last group), or None without one.  TO GO with direction.json."""
    path = os.path.join(session.state_dir, LEGACY_DIRECTION)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise launch.LaunchError(f"{path} cannot be read ({exc}): restore it, or remove"
                                 f" it to start in the session file's roles") from None
    if not isinstance(d, dict) or d.get("source") not in ("a", "b"):
        return None
    site = "a" if cfg in session.slaves else "b"
    if d.get("state") == "switching":
        return "primary" if site == d.get("to") else "secondary"
    return "primary" if site == d["source"] or d.get("state") == "dr-test" else "secondary"


def run(ctx, name: str) -> ExitCode | int:
    """``node run NAME``: the foreground supervisor; returns nbdkit's status."""
    s = ctx.session
    cfg = node_config(s, name)
    with node_held(s.name, s.state_dir, cfg.name):
        # Held only to start: a start or stop of this node waits for it, and
        # sees the supervisor's pidfile afterwards.
        spec = node_spec(s, cfg)
        sup = launch.supervisor_pid(spec)
        if sup:
            raise SlaveError(name, f"node {name} is already running under its supervisor"
                                   f" (pid {sup})", "launch")
    try:
        return launch.supervise(spec)
    except launch.LaunchError as exc:
        raise SlaveError(name, str(exc), "launch") from exc


def exec_(ctx, name: str) -> ExitCode:
    """``node exec NAME``: become the node (``launch.exec_foreground``)."""
    s = ctx.session
    cfg = node_config(s, name)
    try:
        launch.exec_foreground(node_spec(s, cfg))
    except launch.LaunchError as exc:
        raise SlaveError(name, str(exc), "launch") from exc
    return ExitCode.FAILED      # not reached: exec replaced this process
