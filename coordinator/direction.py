"""Which site of a session is the replication source, kept on the nodes
(each node's ``record``, nbdplugin's node.json), and the session as that
direction sees it.

Where it lives.  Truth lives with the nodes, not with whoever runs a
command (DESIGN.md "Hosts, roles and lineage"): the direction record is
stored by every node of the session through its ``record`` op and read
back from its status ("record").  ``load`` asks every node of both sites
at once and takes the record with the highest ``seq`` among those that
answer; ``save`` writes ``seq + 1`` to every node that answers, and a site
whose nodes the change concerns (``sites``) must all take it, else it is
refused in one line naming the node, before anything is written.  So a
coordinator on any host, at either site, with its own copy of the session
file, reaches the same decision; an old primary that missed a failover
holds a lower ``seq`` and is outvoted by any node that saw it, and the
lineage (wire/lineage.py, checked before every join) catches the rest.
``direction.json`` in the coordinator's state directory is gone: a file
on one host cannot be the truth of two (rejected: keeping it as a cache;
nobody could trust it, so nobody would read it).  No node answering: the
file's default (a mirrors to b), marked ``"answered": []`` -- every
command that acts on it needs the nodes anyway.

Nodes vs this copy of the session file (``check_nodes``): a node that
reports another node name, another session or other volumes than the file
says is refused in one line (a renamed node, a volume added or swapped):
the file is not acted on.

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
(coordinator/roles/failover.py, "Reruns").  ``a_nodes`` names site a's
nodes (the file's ``[[slave]]`` names), so that an oriented session tells
which site it sends from.
Every change is recorded on the nodes (each writes it durably before it
replies) before the steps it announces, so a coordinator killed between
steps finds what it was doing and the command run again resumes it.

Cluster mode (``[cluster]``): ``save`` also publishes the record to etcd
(``P/state/direction``), after the nodes took it, so that ``status`` on
any host shows it at once.  The nodes stay the truth (``load`` reads
them): etcd is a copy, and a copy that etcd did not take (no quorum) is
said in a warning and written again by the leading mirror, which publishes
the direction it reads before every group (coordinator/mirror/clustered.py).
"""

from __future__ import annotations

import dataclasses

from wire.protocol import Kind

from .errors import CgmirrorError, ConfigError, DirectionError
from .launch import SlaveSpec
from .link import SlaveLink, parallel, statuses as node_statuses
from .session import NodeConfig, Session, VolumeConfig

SITES = ("a", "b")
STATES = ("mirroring", "failed-over", "dr-test", "resync", "switching")
MIRRORS = ("mirroring", "resync")         # states in which groups may form
STATUS_TIMEOUT_S = 5.0
DEFAULT = {"source": "a", "state": "mirroring", "seq": 0}


def other(site: str) -> str:
    return "b" if site == "a" else "a"


def every_node(session: Session) -> list[tuple[str, NodeConfig]]:
    """(site, config) of every node of the file's session, site a first."""
    return [("a", c) for c in session.slaves] + [("b", c) for c in session.secondaries]


def poll(session: Session, timeout: float = STATUS_TIMEOUT_S
         ) -> dict[str, dict | CgmirrorError]:
    """Every node's status (both sites), asked at once: {name: status or
    the error reaching it}."""
    links = [SlaveLink.from_spec(c.spec(), timeout=timeout) for _, c in every_node(session)]
    try:
        return node_statuses(links)
    finally:
        for lk in links:
            lk.close()


def check_nodes(session: Session, statuses: dict) -> None:
    """Raise ConfigError (one line) if a node answering reports another
    node name, session or volumes than this copy of the session file."""
    for _, cfg in every_node(session):
        st = statuses.get(cfg.name)
        if getattr(st, "kind", None) == Kind.SESSION:
            # The node itself refused us: it belongs to another session.
            raise ConfigError(f"{st} (this copy of the session file: {session.path})")
        if not isinstance(st, dict):
            continue
        where = f"the node at {cfg.control}"
        if st.get("session") not in (None, session.name) \
                or st.get("node") not in (None, cfg.name):
            raise ConfigError(
                f"{where} is node {st.get('node', '?')} of session {st.get('session', '?')},"
                f" but {session.path} names it {cfg.name} of session {session.name}: this"
                f" copy of the session file disagrees with the nodes and is not acted on;"
                f" use the session's own file (or give each session its own nodes)")
        mine = {v.name for v in cfg.volumes}
        theirs = set(st.get("volumes", {}))
        if "node" in st and theirs != mine:
            raise ConfigError(
                f"node {cfg.name} serves volumes {', '.join(sorted(theirs)) or 'none'},"
                f" but {session.path} gives it {', '.join(sorted(mine))}: a volume added,"
                f" renamed or swapped in this copy of the file is not acted on; restore"
                f" the file the nodes were started with")


def _record(st) -> dict | None:
    r = st.get("record") if isinstance(st, dict) else None
    if not isinstance(r, dict) or r.get("source") not in SITES \
            or r.get("state") not in STATES or not isinstance(r.get("seq"), int):
        return None
    return r


def load(session: Session, statuses: dict | None = None, check: bool = True) -> dict:
    """The recorded direction: the record with the highest ``seq`` among
    the nodes that answer (``statuses``: from ``poll``, or asked now).
    None recorded: a mirrors to b (seq 0).  ``answered``: who answered.
    ``check``: refuse nodes that disagree with this file (``check_nodes``);
    only ``status``, which shows them, reads without."""
    if statuses is None:
        statuses = poll(session)
    if check:
        check_nodes(session, statuses)
    best = None
    for name, st in statuses.items():
        r = _record(st)
        if r is not None and (best is None or r["seq"] > best["seq"]):
            best = r
    d = dict(best if best is not None else DEFAULT)
    d["answered"] = sorted(n for n, st in statuses.items() if isinstance(st, dict))
    return d


def save(session: Session, sites: tuple[str, ...] = SITES, **state) -> dict:
    """Record ``state`` on the nodes as ``seq + 1``; ``session`` is the
    file's (not oriented).  Every node of ``sites`` must answer and take
    it (else DirectionError naming the node, before anything is written if
    it does not answer); the other site's nodes take it if they answer."""
    statuses = poll(session)
    current = load(session, statuses)
    for site, cfg in every_node(session):
        st = statuses.get(cfg.name)
        if site in sites and not isinstance(st, dict):
            raise DirectionError(
                f"node {cfg.name} (site {site}) does not answer on {cfg.control}"
                f" ({st}): a change of site {site} needs all its nodes; bring it back"
                f" (its unit, or `cgmirror node run {cfg.name}`) and run the command"
                f" again")
    rec = {k: v for k, v in state.items() if k not in ("answered", "seq", "a_nodes")}
    rec["a_nodes"] = sorted(s.name for s in session.slaves)
    rec["seq"] = current.get("seq", 0) + 1
    live = [(site, cfg) for site, cfg in every_node(session)
            if isinstance(statuses.get(cfg.name), dict)]
    links = [SlaveLink.from_spec(cfg.spec(), timeout=STATUS_TIMEOUT_S * 2)
             for _, cfg in live]
    try:
        replies = parallel(links, lambda lk: lk.call("record", record=rec),
                           timeout=STATUS_TIMEOUT_S * 2 + 1)
    finally:
        for lk in links:
            lk.close()
    for site, cfg in live:
        r = replies.get(cfg.name)
        if isinstance(r, Exception):
            if site in sites:
                raise DirectionError(f"node {cfg.name} (site {site}) did not take the"
                                     f" direction record ({r}): a change of site {site}"
                                     f" needs all its nodes; run the command again")
            continue
        stored = r.get("record") or {}
        if stored.get("seq") != rec["seq"]:
            raise DirectionError(
                f"node {cfg.name} holds direction record {stored.get('seq')} (by"
                f" {stored.get('by', '?')}), not the {rec['seq']} just written: another"
                f" coordinator changed the direction meanwhile; run `cgmirror status`"
                f" and the command again")
    if getattr(session, "cluster", None) is not None:
        publish(session, rec)
    return rec


def publish(session: Session, rec: dict, warn=None) -> bool:
    """Cluster mode: the record to ``P/state/direction`` (see the module
    doc); False (and a warning line on stderr, or to ``warn``) if etcd did
    not take it."""
    from . import cluster           # etcd's client only in cluster mode
    try:
        with cluster.client(session) as etcd:
            cluster.put_direction(etcd, session.name, rec)
        return True
    except CgmirrorError as exc:
        line = (f"the direction record {rec.get('seq')} is on the nodes but not in"
                f" etcd ({exc}); the leading mirror publishes it when etcd answers")
        if warn is None:
            import sys
            print(f"cgmirror: warning: {line}", file=sys.stderr)
        else:
            warn(line)
        return False


def nodes(session: Session, site: str) -> list[NodeConfig]:
    """The configs of one site's nodes (``[[slave]]`` or ``[[secondary]]``)."""
    return list(session.slaves if site == "a" else session.secondaries)


def role(session: Session, site: str, d: dict | None = None) -> str:
    """The role ``site``'s nodes run in now by the direction ``d`` (loaded
    if None): the source's are primaries (both sites' during a DR test,
    the new source's once a switchover is past its last group); any other
    is a secondary.  A node records its own role (nbdplugin's node.json)
    and starts in it; this is the role a node's first start takes."""
    d = load(session) if d is None else d
    if d["state"] == "switching":
        return "primary" if site == d["to"] else "secondary"
    return "primary" if site == d["source"] or d["state"] == "dr-test" else "secondary"


def spec(session: Session, cfg: NodeConfig, d: dict | None = None) -> SlaveSpec:
    """How to run a node (``[[slave]]`` or ``[[secondary]]``) in its role by
    the direction ``d`` (``cgmirror slave|secondary start``)."""
    site = "a" if cfg in session.slaves else "b"
    return dataclasses.replace(cfg.spec(), role=role(session, site, d))


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
    a's nodes (``a_nodes``, recorded by ``save``)?"""
    a = set(d.get("a_nodes", ()))
    return "a" if not a or {s.name for s in session.slaves} <= a else "b"


def check_mirror(session: Session, d: dict | None = None) -> None:
    """Raise DirectionError (one line) unless groups may form from this
    session's primaries now (``Mirror.run_once`` calls it); ``d``: the
    direction if already loaded."""
    d = load(session) if d is None else d
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


__all__ = ["DirectionError", "SITES", "check_mirror", "check_nodes", "every_node", "load",
           "nodes", "oriented", "other", "poll", "role", "save", "spec", "why"]
