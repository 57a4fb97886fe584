"""``cgmirror install-units [--dir DIR] [--exec CMD]``: the systemd units.

The templates live in the project's ``units/`` directory:
``cgmirror-node@NAME`` (instance: a ``[[slave]]`` or ``[[secondary]]`` of
the session file: one template for both, since a node's role is its own
record, not its table) and ``cgmirror-mirror@SESSION`` (instance: the
session's name).  Installing fills in how to run cgmirror (``--exec``;
default: the ``cgmirror`` script beside this Python, else ``PYTHON -m
coordinator.cli``), the session file (absolute), the role-change status
(``protocol.RESTART_STATUS``, the node unit's ``RestartForceExitStatus=``)
and the mirror's ``After=`` on the nodes, then says how to enable them.
Every unit is ``Type=notify``: ``READY=1`` comes from the process itself
once it serves.

Decided where the issue is silent: the session file is written into the
units, so one unit directory serves one session (as LINSTOR's satellite
units serve one node).  The mirror only *orders after* the session's nodes,
it no longer *wants* them: a coordinator may run on a host of either site or
on neither, and a ``Wants=`` there would start a node that host does not
hold (a fresh, empty one); the mirror reconnects to nodes that come up later.

The old templates ``cgmirror-slave@`` and ``cgmirror-secondary@`` are gone:
two templates for one node would start it twice at boot.  ``install-units``
removes them from the directory it installs into and says how to move
enabled instances over (``systemctl disable`` the old, ``enable`` the new).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from wire import files
from wire.protocol import RESTART_STATUS

from ..errors import ExitCode, LocalError

# coordinator/cli/units_cmds.py -> the project's units/
UNITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "units")
UNITS = ("cgmirror-node@.service", "cgmirror-mirror@.service")
# Installed by earlier versions; replaced by cgmirror-node@.
OLD_UNITS = ("cgmirror-slave@.service", "cgmirror-secondary@.service")
SYSTEM_DIR = "/etc/systemd/system"


def register(sub) -> None:
    """``cgmirror install-units``."""
    a = sub.add_parser("install-units", help="write the systemd units for this session")
    a.add_argument("--dir", default=SYSTEM_DIR, help=f"where (default {SYSTEM_DIR})")
    a.add_argument("--exec", dest="exec_", metavar="CMD", default=None,
                   help="how units run cgmirror (default: this installation)")
    a.set_defaults(func=lambda ctx, args: install(ctx, args.dir, args.exec_))


def default_exec() -> str:
    """The cgmirror of this installation, as a command line."""
    script = os.path.join(os.path.dirname(sys.executable), "cgmirror")
    if os.access(script, os.X_OK):
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m coordinator.cli"


def render(session, template: str, exec_: str) -> str:
    """One unit's text for ``session``."""
    nodes = " ".join(f"cgmirror-node@{c.name}.service"
                     for c in (*session.slaves, *session.secondaries))
    return (template.replace("@CGMIRROR@", exec_)
            .replace("@SESSION@", shlex.quote(session.path))
            .replace("@RESTART_STATUS@", str(RESTART_STATUS))
            .replace("@NEEDS@", f"After={nodes}" if nodes else ""))


def install(ctx, directory: str, exec_: str | None) -> ExitCode:
    s = ctx.session
    exec_ = exec_ or default_exec()
    try:
        files.make_dirs(directory, files.READABLE_DIR)     # as systemd's own
        for name in UNITS:
            with open(os.path.join(UNITS_DIR, name)) as f:
                text = render(s, f.read(), exec_)
            tmp = os.path.join(directory, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(directory, name))
        removed = []
        for name in OLD_UNITS:
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    except OSError as exc:
        raise LocalError(f"cannot install units in {directory}:"
                         f" {exc.strerror or exc}") from exc
    ctx.say(f"installed {', '.join(UNITS)} in {directory} for session {s.name}")
    if removed:
        old = " ".join(f"{n.split('@')[0]}@{c.name}" for n in removed
                       for c in (s.slaves if n.startswith("cgmirror-slave") else s.secondaries))
        ctx.say(f"removed the old {', '.join(removed)}: nodes run as cgmirror-node@NAME"
                f" now; where one ran: systemctl disable --now {old}")
    if shutil.which("systemctl") and directory == SYSTEM_DIR:
        ctx.say("then: systemctl daemon-reload")
    ctx.say(f"on each host, enable its own nodes: systemctl enable --now"
            f" {' '.join(f'cgmirror-node@{c.name}' for c in (*s.slaves, *s.secondaries))}"
            f" (only those the host holds)")
    if s.mirror:
        ctx.say(f"on the coordinator's host: systemctl enable --now cgmirror-mirror@{s.name}")
    return ExitCode.OK
