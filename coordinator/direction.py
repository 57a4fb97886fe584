"""Which site of a session is the replication source, kept durably in the
coordinator's state directory (``direction.json``), and the session as
that direction sees it.

Sites.  A session file describes two sites: site ``a`` is every
``[[slave]]`` (the primaries as the file was written), site ``b`` every
``[[secondary]]``.  A site is no new key: the tables already say which
node is where, and a pair (a volume and its ``secondary``/
``remote_volume``) names the same two images whichever way the data flows.
``oriented(session, "b")`` is the same session with the roles swapped: the
``[[secondary]]`` nodes as primaries, each volume mirrored back to the
``[[slave]]`` volume it came from.  ``cgmirror mirror run`` mirrors the
direction recorded here, and ``Mirror.run_once`` refuses (one line) a
session oriented the other way, or a split state.

States (``state``):

``mirroring``    ``source`` mirrors to the other site (the file's default:
                 a mirrors to b).
``failed-over``  ``source`` took over from ``from`` (``cgmirror failover``);
                 the sites are split until a resync or failback.
``dr-test``      ``source`` still mirrors, but its targets were made
                 writable for a DR test (``cgmirror failover --test``);
                 the mirror is parked until ``--end-test``.
``resync``       ``source`` is sending S | T to the other site; only the
                 resync (or a mirror of that direction) forms groups.
``switching``    a switchover of ``source`` to ``to`` is past its last
                 group; running it again finishes the swap.

``hardened`` is the group both sites last held in common (the split's).
``by`` is the role command that wrote the record (``failover``,
``failover --test``, ``failover --end-test``, ``resync``, ``failback``,
``switchover``), and a failback adds ``back_to`` (the site it returns to):
with them a rerun tells a step half done from a command that finished
(coordinator/roles/failover.py, "Reruns").
Every change is written with ``files.write_atomic`` (temp, fsync, rename,
fsync dir), before the steps it announces, so a coordinator killed between
steps finds what it was doing and the command run again resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from wire.files import READABLE_DIR, make_dirs, write_atomic

from .errors import ConfigError, DirectionError
from .launch import SlaveSpec
from .session import NodeConfig, Session, VolumeConfig

FILE = "direction.json"
SITES = ("a", "b")
STATES = ("mirroring", "failed-over", "dr-test", "resync", "switching")
MIRRORS = ("mirroring", "resync")         # states in which groups may form


def other(site: str) -> str:
    return "b" if site == "a" else "a"


def path(session: Session) -> str:
    return os.path.join(session.state_dir, FILE)


def load(session: Session) -> dict:
    """The recorded direction ({"source": "a", "state": "mirroring"} if none)."""
    p = path(session)
    try:
        with open(p) as f:
            d = json.load(f)
    except FileNotFoundError:
        return {"source": "a", "state": "mirroring"}
    except ValueError as exc:
        raise ConfigError(f"{p} is damaged ({exc}): write_atomic never leaves a torn"
                          f" file, so someone edited it; restore it") from None
    if not isinstance(d, dict) or d.get("source") not in SITES \
            or d.get("state") not in STATES:
        raise ConfigError(f"{p}: no valid source/state: restore it")
    return d


def save(session: Session, **state) -> dict:
    """Record ``state`` durably; ``session`` is the file's (not oriented):
    its primaries' control sockets name site a."""
    state["a_controls"] = sorted(s.control for s in session.slaves)
    make_dirs(session.state_dir, READABLE_DIR)
    write_atomic(path(session), json.dumps(state, sort_keys=True).encode())
    return state


def nodes(session: Session, site: str) -> list[NodeConfig]:
    """The configs of one site's nodes (``[[slave]]`` or ``[[secondary]]``)."""
    return list(session.slaves if site == "a" else session.secondaries)


def role(session: Session, site: str) -> str:
    """The role ``site``'s nodes run in now: the source's are primaries
    (both sites' during a DR test, the new source's once a switchover is
    past its last group); any other is a secondary, so an old primary
    brought back after a failover serves read-only and its unsent writes
    become target indicators (nothing lost, no split brain)."""
    d = load(session)
    if d["state"] == "switching":
        return "primary" if site == d["to"] else "secondary"
    return "primary" if site == d["source"] or d["state"] == "dr-test" else "secondary"


def spec(session: Session, cfg: NodeConfig) -> SlaveSpec:
    """How to run a node (``[[slave]]`` or ``[[secondary]]``) in its role now
    (``cgmirror slave|secondary start``)."""
    site = "a" if cfg in session.slaves else "b"
    return dataclasses.replace(cfg.spec(), role=role(session, site))


def oriented(session: Session, source: str) -> Session:
    """``session`` with ``source`` as the primaries (see the module doc).
    Only mirrored volumes turn around; a ``[[secondary]]`` that mirrors
    nothing stays out."""
    if source == "a":
        return session
    back: dict[str, list[VolumeConfig]] = {}
    for s, v, r, rv in session.pairs():
        rvol = session.secondary(r).volume(rv)
        back.setdefault(r, []).append(dataclasses.replace(rvol, secondary=s,
                                                          remote_volume=v))
    # Addresses, certificates and threads stay with the node: only its role
    # turns (and which volume a volume mirrors).
    slaves = tuple(dataclasses.replace(r, role="primary", volumes=tuple(back[r.name]))
                   for r in session.secondaries if r.name in back)
    secondaries = tuple(dataclasses.replace(
        s, role="secondary", volumes=tuple(VolumeConfig(v.name, v.path, v.size, None)
                                           for v in s.volumes))
        for s in session.slaves)
    return dataclasses.replace(session, slaves=slaves, secondaries=secondaries)


def sending(session: Session, d: dict) -> str:
    """Which site an (oriented) session sends from: are its primaries site
    a's nodes (``a_controls``, recorded by ``save``)?"""
    a = set(d.get("a_controls", ()))
    return "a" if not a or {s.control for s in session.slaves} <= a else "b"


def check_mirror(session: Session) -> None:
    """Raise DirectionError (one line) unless groups may form from this
    session's primaries now (``Mirror.run_once`` calls it)."""
    d = load(session)
    if d["state"] not in MIRRORS:
        raise DirectionError(why(d))
    src, frm = d["source"], sending(session, d)
    if frm != src:
        raise DirectionError(f"site {src} is the source now (state {d['state']}), this"
                             f" mirror sends from site {frm}: `cgmirror mirror run`"
                             f" follows the recorded direction")


def why(d: dict) -> str:
    """Why no group may form in state ``d`` (not mirroring, not resync): one
    line naming the command to run."""
    src, state = d["source"], d["state"]
    if state == "failed-over":
        return (f"site {src} took over from site {d.get('from', other(src))} (failover):"
                f" no group forms until `cgmirror failback` or `cgmirror resync --from"
                f" {src} --to {other(src)}`")
    if state == "dr-test":
        return (f"a DR test runs on site {other(src)}: the mirror is parked until"
                f" `cgmirror failover --end-test`")
    return f"a switchover to site {d.get('to')} is half done: run `cgmirror switchover` again"


__all__ = ["DirectionError", "SITES", "check_mirror", "load", "nodes", "oriented",
           "other", "role", "save", "spec", "why"]
