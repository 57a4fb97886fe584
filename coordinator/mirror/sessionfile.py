"""The session file under a running mirror (issue 16, item 15).

A running mirror holds the session it started with: its links, the
baselines it adopted, the pairs of every group.  Someone may edit the file
meanwhile: remove a volume, rename a slave, point a pair elsewhere.  Taking
the edit silently would drop a volume from the consistency group (or send
a pair to another image) without a word; ignoring it silently leaves the
operator believing the file is what runs.

Decided: before each group the mirror looks at the file (one ``stat``;
read and parsed only when its inode, size or modification time moved).  If
what it describes differs from what the mirror runs -- nodes, their
addresses and directories, volumes, pairs, the ``[session]`` and
``[mirror]`` keys; comments and layout do not count -- or it cannot be
read any more, the mirror forms no group and says so in one line, naming
what changed and to restart the mirror to take it; ``mirror status``
shows it as "severe".  Put back as it was, groups form again.  A restart
takes the new file through every check a start makes (direction,
adoption of baselines, the nodes' own records).

Rejected: taking the edit at the next group (a pair that vanished would
keep its unsent changes out of every group with nothing said, and a
renamed node is a new node the start-up checks never saw); noticing only
at the next restart (a restart may be months away).
"""

from __future__ import annotations

import dataclasses
import os

from .. import session as session_mod
from ..errors import CgmirrorError, MirrorError


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("gone", exc.strerror)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _flat(s, names: dict[str, str] | None = None) -> dict[str, object]:
    """What a session describes, as {"what": value} for the diff; node
    ``names`` maps a (renamed) node's name to the one to file it under."""
    names = names or {}
    out: dict[str, object] = {}
    for f in dataclasses.fields(s):
        if f.name in ("slaves", "secondaries", "path"):
            continue
        out[f"[session] {f.name}"] = getattr(s, f.name)
    for kind, nodes in (("slave", s.slaves), ("secondary", s.secondaries)):
        for n in nodes:
            name = names.get(n.name, n.name)
            out[f"{kind} {name}"] = dataclasses.replace(n, name=name, volumes=())
            for v in n.volumes:
                out[f"volume {name}/{v.name}"] = dataclasses.replace(
                    v, secondary=names.get(v.secondary, v.secondary))
    return out


def _renamed(old, new) -> dict[str, str]:
    """{new name: old name} of nodes whose control address stayed and
    whose name changed."""
    was = {n.control: n.name for n in old.slaves + old.secondaries}
    now = {n.name for n in old.slaves + old.secondaries}
    return {n.name: was[n.control] for n in new.slaves + new.secondaries
            if n.control in was and was[n.control] != n.name and n.name not in now}


def differences(old, new) -> list[str]:
    """How session ``new`` differs from ``old``, one phrase each."""
    names = _renamed(old, new)
    a, b = _flat(old), _flat(new, names)
    out = [f"{'slave' if any(n.name == x for n in new.slaves) else 'secondary'}"
           f" {y} renamed to {x}" for x, y in names.items()]
    out += [f"{k} removed" for k in a if k not in b]
    out += [f"{k} added" for k in b if k not in a]
    for k in a:
        if k in b and a[k] != b[k]:
            x, y = a[k], b[k]
            if dataclasses.is_dataclass(x):
                keys = [f.name for f in dataclasses.fields(x)
                        if getattr(x, f.name) != getattr(y, f.name)]
                out.append(f"{k}: {', '.join(keys)} changed")
            else:
                out.append(f"{k} changed")
    return out


class SessionFile:
    """Watches the file of the session a mirror started with."""

    def __init__(self, path: str):
        self.path = path
        self.sig = _signature(path)
        try:
            self.started = session_mod.load(path)
        except CgmirrorError:
            self.started = None         # not from a readable file: nothing to watch
        self.problem: str | None = None

    def check(self) -> None:
        """Raise MirrorError (one line) if the file no longer describes the
        session the mirror runs (see the module doc)."""
        if self.started is None:
            return
        sig = _signature(self.path)
        if sig != self.sig:
            self.sig = sig
            self.problem = self._compare()
        if self.problem:
            raise MirrorError(self.problem)

    def _compare(self) -> str | None:
        head = f"the session file {self.path} changed under the running mirror"
        tail = ("; no group forms until the mirror is restarted to take it (stop"
                " `cgmirror mirror run` and start it again, or `systemctl restart"
                f" cgmirror-mirror@{self.started.name}`), or the file is put back")
        try:
            new = session_mod.load(self.path)
        except CgmirrorError as exc:
            return f"{head} and cannot be used ({exc}){tail}"
        diff = differences(self.started, new)
        if not diff:
            return None
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        return f"{head} ({'; '.join(diff[:3])}{more}){tail}"


__all__ = ["SessionFile", "differences"]
