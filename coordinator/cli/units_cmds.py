"""``cgmirror install-units [--dir DIR] [--exec CMD]``: the systemd units.

The templates live in the project's ``units/`` directory:
``cgmirror-slave@NAME``, ``cgmirror-secondary@NAME`` (instance: the name in
the session file) and ``cgmirror-mirror@SESSION`` (instance: the session's
name).  Installing fills in how to run cgmirror (``--exec``; default: the
``cgmirror`` script beside this Python, else ``PYTHON -m coordinator.cli``),
the session file (absolute), and the mirror's ``Wants=``/``After=`` on the
slaves it needs, then says how to enable them.  Every unit is ``Type=notify``:
``READY=1`` comes from the process itself once it serves.

Decided where the issue is silent: the session file is written into the
units, so one unit directory serves one session (as LINSTOR's satellite
units serve one node); the mirror *wants* the session's slaves (this
machine runs them) but only *orders after* its secondaries (they usually
run at the remote site, where a unit here cannot start them).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from wire import files

from ..errors import ExitCode, LocalError

# coordinator/cli/units_cmds.py -> the project's units/
UNITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "units")
UNITS = ("cgmirror-slave@.service", "cgmirror-secondary@.service",
         "cgmirror-mirror@.service")
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
    slaves = " ".join(f"cgmirror-slave@{s.name}.service" for s in session.slaves)
    seconds = " ".join(f"cgmirror-secondary@{r.name}.service"
                       for r in session.secondaries)
    needs = f"Wants={slaves}\nAfter={slaves}" if slaves else ""
    if seconds:
        needs += f"\nAfter={seconds}"
    return (template.replace("@CGMIRROR@", exec_)
            .replace("@SESSION@", shlex.quote(session.path))
            .replace("@NEEDS@", needs))


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
    except OSError as exc:
        raise LocalError(f"cannot install units in {directory}:"
                         f" {exc.strerror or exc}") from exc
    ctx.say(f"installed {', '.join(UNITS)} in {directory} for session {s.name}")
    if shutil.which("systemctl") and directory == SYSTEM_DIR:
        ctx.say("then: systemctl daemon-reload")
    names = [f"cgmirror-slave@{c.name}" for c in s.slaves] + \
            ([f"cgmirror-mirror@{s.name}"] if s.mirror else [])
    ctx.say(f"enable: systemctl enable --now {' '.join(names)}")
    if s.secondaries:
        ctx.say(f"at the remote site: systemctl enable --now"
                f" {' '.join(f'cgmirror-secondary@{r.name}' for r in s.secondaries)}")
    return ExitCode.OK
