"""The role a node starts in, read from its record ``STATEDIR/node.json``.

The node owns the record (nbdplugin/noderecord.py writes it, durably,
before it acts on a role change); whoever starts the node -- the launcher
and supervisor (coordinator/launch.py), ``cgmirror node run`` -- reads only
its role here, so both sides read it one way and the coordinator never
loads the plugin package.
"""

from __future__ import annotations

import json
import os

NODE_FILE = "node.json"
ROLES = ("primary", "secondary")


class NodeRoleError(Exception):
    """The record cannot be read or records no role (one line)."""


def recorded_role(statedir: str) -> str | None:
    """The role the node of ``statedir`` starts in, or None before its
    first start (then the role it is given is the first one).  Raises
    NodeRoleError (one line) on a damaged record."""
    path = os.path.join(statedir, NODE_FILE)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NodeRoleError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}):"
                            f" the node writes it whole, so it was damaged or edited;"
                            f" restore it from a backup") from None
    role = doc.get("role") if isinstance(doc, dict) else None
    if role not in ROLES:
        raise NodeRoleError(f"{path} records no role ({role!r}, not one of"
                            f" {', '.join(ROLES)}): restore it from a backup")
    return role
