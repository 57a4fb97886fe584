"""The hints' rig (``tests/test_hints.py``): its sessions, the CLI shell
(tests/clishell.py) on them, and the commands a message names."""

from __future__ import annotations

import os
import re
import shlex

import clishell

MIRRORED = clishell.mirrored_session("hint")

COPIED = """\
[session]
name = "hint"
state_dir = "state"
lease_ms = 10000
max_coordination_ms = 2000

[[slave]]
name = "s1"
state_dir = "s1"
nbd_socket = "s1.sock"
control = "s1.ctl"

[[slave.volume]]
name = "a"
path = "s1-a.img"
size = "4M"
target = "nbd+unix:///?socket={target}"
"""

# A command a message names: `cgmirror ...` in backquotes, or after "with: ".
_QUOTED = re.compile(r"`(cgmirror [^`]+)`")
_AFTER_WITH = re.compile(r"with: (cgmirror [^)`;,]+)")


def commands(message: str) -> list[list[str]]:
    """Every ``cgmirror`` command ``message`` names, as argv without the
    leading ``cgmirror``, in the order they appear."""
    found = sorted([(m.start(), m.group(1)) for m in _QUOTED.finditer(message)]
                   + [(m.start(), m.group(1).strip()) for m in _AFTER_WITH.finditer(message)])
    return [shlex.split(cmd)[1:] for _, cmd in found]


def the_command(message: str, verb: str | None = None) -> list[str]:
    """The one command ``message`` names (starting with ``verb`` if given)."""
    cmds = [c for c in commands(message) if verb is None or c[0] == verb]
    assert cmds, f"no `cgmirror {verb or ''}...` in: {message}"
    return cmds[0]


class Shell(clishell.Shell):
    """The one CLI shell (tests/clishell.py) on the hints' session file."""

    def __init__(self, run_dir: str, text: str = MIRRORED):
        super().__init__(run_dir, text, name="hint.toml")


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def scribble(path: str) -> None:
    """Overwrite a whole image in place (same inode, same size) with other bytes."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
