"""The mirror rigs' shared parts (tests, ``make soak``, bench/bench_mirror.py):
one builder for the session TOML that the mirror, failover, site and VM
tests write (so that a change of the file format is made in one place); the
two-by-two rig's layout and session.  No pytest here.

The layout: every slave serves the same volume names from ``SLAVE-VOL.img``
on ``SLAVE.sock`` with control ``SLAVE.ctl`` (paths relative to the session
file), each volume mirrored to the volume of the same name on its
secondary, which is laid out alike.
"""

from __future__ import annotations

import json

from harness import workload as wl

# The rig's usual budgets: generous, so that a loaded machine does not fail
# a cut or a drain that a test meant to succeed.
SESSION_KEYS = {"lease_ms": 10000, "max_coordination_ms": 2000, "copy_timeout_ms": 20000}
MIRROR_KEYS = {"interval_ms": 0, "max_drain_ms": 30000, "rpo_threshold_s": 60,
               "control": "m.ctl"}


def mirror_session(name: str, pairs: dict[str, str], volumes=("a",), *,
                   size: int | None = None, session: dict | None = None,
                   mirror: dict | None = None, slave: dict | None = None,
                   nodes: dict[str, dict] | None = None) -> str:
    """The text of a mirrored session.

    ``pairs``: {slave: its secondary}.  ``session``/``mirror``: keys of
    those tables over SESSION_KEYS/MIRROR_KEYS; ``slave``: keys every
    ``[[slave]]`` gets (``threads``); ``nodes``: {node: {key: value}} over
    one node's own keys.  A value None leaves the key out (a node on TCP
    has no ``nbd_socket``; a default left to the session loader)."""
    nodes = nodes or {}
    out = _table("[session]", {"name": name, "state_dir": "state",
                               **SESSION_KEYS, **(session or {})})
    out += _table("[mirror]", {**MIRROR_KEYS, **(mirror or {})})
    for s, r in pairs.items():
        out += _table("[[slave]]", {**_node(s), **(slave or {}), **nodes.get(s, {})})
        for v in volumes:
            out += _table("[[slave.volume]]", {"name": v, "path": f"{s}-{v}.img",
                                               "size": size, "secondary": r})
    for r in dict.fromkeys(pairs.values()):         # each once, in order
        out += _table("[[secondary]]", {**_node(r), **nodes.get(r, {})})
        for v in volumes:
            out += _table("[[secondary.volume]]", {"name": v, "path": f"{r}-{v}.img",
                                                   "size": size})
    return "\n".join(out) + "\n"


# The two-by-two rig: primaries s1, s2 with volumes a, b each; secondaries
# r1 (mirrors s1) and r2 (mirrors s2); the dependent-write workload across
# the four volumes, neighbours on different slaves.
SIZE = 16 << 20
LAYOUT = wl.two_by_two(SIZE)
ORDER = [("s1", "a"), ("s2", "a"), ("s1", "b"), ("s2", "b")]      # layout order
REMOTE = {"s1": "r1", "s2": "r2"}


def session_text(max_drain_ms=30_000, rpo=30, interval_ms=0, **keys) -> str:
    """The two-by-two rig's session (``keys``: more of ``mirror_session``'s)."""
    return mirror_session("m", REMOTE, ("a", "b"), size=SIZE, slave={"threads": 4},
                          mirror={"interval_ms": interval_ms, "max_drain_ms": max_drain_ms,
                                  "rpo_threshold_s": rpo}, **keys)


def tcp_node(addr: str, port) -> dict:
    """A node's keys for control and NBD on ``addr`` (mutual TLS); ``port()``
    gives a free port each call."""
    return {"nbd_socket": None, "control": f"tcp:{addr}:{port()}",
            "nbd": f"tcp:{addr}:{port()}"}


def _node(name: str) -> dict:
    return {"name": name, "state_dir": name, "nbd_socket": f"{name}.sock",
            "control": f"{name}.ctl"}


def _table(header: str, keys: dict) -> list[str]:
    # json.dumps writes ints and simple strings as TOML writes them.
    return ["", header] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()
                           if v is not None]
