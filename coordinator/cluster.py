"""Cluster mode (issue 19): one leading coordinator per session through an
etcd lease, and the session's shared state in etcd.

Keys (``P = {prefix}/{session}/``, values JSON text):

    P/leader            {"host", "pid", "id", "since"} under the leader's lease;
                        the leader's **epoch** is this key's create revision
    P/state/direction   the direction record as the nodes keep it
    P/state/hardened    {"n", "cut", "at", "epoch"}
    P/state/lineage     {node: {volume: generation}}
    P/state/history     {"formed", "failed", "groups": [last 20]}
    P/status            the leader's ``mirror status --json`` document
    P/events/<time>     events, under a retention lease (EVENT_TTL_S)
    P/control/paused    {"paused", "by", "why"}
    P/role              {"host", "pid", "command", "since"} under the lease
                        of the role command that runs (``RoleLock``)

Leadership.  ``campaign`` grants a lease of ``ttl`` seconds and creates
``P/leader`` with it (a transaction: only if absent), polling every
``ttl/10`` while another holds it; the create revision is the epoch the
nodes fence with (coordinator/link.py sends it, nbdplugin refuses lower).
A keepalive thread renews the lease every ``ttl/3``.  ``held()`` is true
only while ``now < send time of the last successful renewal + ttl -
MARGIN_S`` (monotonic): etcd cannot have expired the lease before that,
so while ``held()`` no other coordinator can have won.  The cycle asks
``held()`` before the establish and before the commit; a leader that
loses it abandons its group (never commits), goes back to standby and
campaigns again.  A leader paused past its lease (SIGSTOP, a long GC, a
partition) and woken just after that check is stopped by the nodes: the
new leader's first request recorded a higher epoch on every node, so the
deposed leader's freeze, drain, prepare and commit are refused ("fenced").

Rejected: the epoch from the lease id (ids are not ordered); a leader that
keeps its epoch across a lost lease (after a partition two coordinators
could both believe they lead with one epoch: a new campaign always takes a
new revision); holding a group open while etcd is unreachable (no group
forms without quorum: the mirror says "no-quorum" and the hosts' writes
are never held, since nothing is frozen).

Shared state.  ``Publisher`` writes the leader's state from a thread of
its own (etcd calls may take seconds when members are down; the cycle
must never wait for them), each write a transaction guarded on
``P/leader`` still being this leader's record: a deposed leader cannot
overwrite what the new one published.  Events of every coordinator go to
``P/events/`` (the empty groups' ``group-formed`` stays out: the history
summary counts them).

Role commands.  ``failover``, ``failback``, ``resync`` and ``switchover``
run on any host, beside the ``mirror run`` units.  Two must never
interleave, wherever they run: each first creates ``P/role`` under a lease
of its own (a transaction: only if absent; renewed every third of its
ttl while the command runs, revoked at its end; a command killed -9 leaves
it for at most ROLE_LOCK_TTL_S).  A second command finds the key and is refused BUSY in
one line naming the holder's host, pid and command.  The commands that
form groups then park the leader (``P/control/paused``) and form their
groups beside it; coordinator/roles/failover.py has the rest.  Rejected: a
per-host lock file (it guards one host; the hole it left was a role
command on host c forming groups while the leader on host b did), and
etcd's lock service (v3lock is gRPC only, and tooz's locks have a key
scheme of their own: the holder could not be named in the refusal).

Everything in this module that talks to etcd turns ``EtcdError`` into
``ClusterError`` (one line, exit UNREACHABLE) at one boundary, ``_etcd``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable

from wire.etcd import DEFAULT_TIMEOUT_S, Etcd, EtcdError, KV
from wire.tls import TLSConfigError

from .errors import BusyError, CgmirrorError, ExitCode

MARGIN_S = 0.5              # held() ends this long before the lease can have expired
RETRY_S = 0.2               # a failed renewal is tried again after this, not ttl/3
EVENT_TTL_S = 600           # events are kept about ten minutes
EVENT_LEASE_RENEW_S = 300   # a new retention lease for events every five
STATUS_EVERY_S = 2.0        # the leader's status document at least this often
HISTORY_KEEP = 20           # groups in P/state/history
# P/role's lease: a role command killed -9 blocks the next for at most this
# (or ttl_s if longer); a command stopped this long (SIGSTOP, a VM paused)
# loses it.  Role commands take minutes; no one waits on this but a rerun.
ROLE_LOCK_TTL_S = 20


class ClusterError(CgmirrorError):
    """etcd did not answer or refused (one line naming what was asked)."""

    exit_code = ExitCode.UNREACHABLE
    fault = "unreachable"


@contextmanager
def _etcd(what: str):
    """The one boundary where EtcdError becomes ClusterError."""
    try:
        yield
    except EtcdError as exc:
        raise ClusterError(f"etcd: cannot {what}: {exc}") from exc


def connect(session, tls_dir: str | None = None,
            timeout: float = DEFAULT_TIMEOUT_S) -> Etcd:
    """A client of ``session``'s etcd (``[cluster]``), with the coordinator's
    certificate directory for TLS; ``timeout``: per member asked."""
    if session.cluster is None:
        raise ClusterError(f"session {session.name} has no [cluster]")
    tls_dir = tls_dir if tls_dir is not None else coordinator_tls(session)
    try:
        return Etcd.for_cluster(session.cluster, tls_dir, timeout=timeout)
    except (ValueError, OSError, TLSConfigError) as exc:
        raise ClusterError(f"etcd client for session {session.name} (certificates in"
                           f" {tls_dir}): {exc}") from exc


@contextmanager
def client(session):
    """``connect(session)`` for one command: its connections closed after."""
    etcd = connect(session)
    try:
        yield etcd
    finally:
        etcd.close()


def coordinator_tls(session) -> str | None:
    """The coordinator's certificate directory (``[session] cert`` in the
    session's PKI): its CA is the only trust anchor for etcd too."""
    return session.cluster.coordinator_tls


def key(etcd: Etcd, session: str, *parts: str) -> str:
    return etcd.key(session, *parts)


def _dump(doc) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def _load(kv: KV | None):
    if kv is None:
        return None
    try:
        return json.loads(kv.value)
    except ValueError:
        return None


def me() -> dict:
    """This coordinator's identity in ``P/leader``."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}


def leader_of(kv: KV | None) -> dict | None:
    """The leader record of ``P/leader`` with its epoch, or None."""
    doc = _load(kv)
    if not isinstance(doc, dict):
        return None
    return {**doc, "epoch": kv.create_rev}


# ---------------------------------------------------------------- leadership

def poll_interval(ttl: float) -> float:
    """How often a standby looks at ``P/leader``: a tenth of the lease,
    between 0.1 and 0.5 s (a takeover comes within ttl + this)."""
    return min(0.5, max(0.1, ttl / 10))


class Leadership:
    """Leadership of one session (see the module doc).  ``etcd`` serves the
    campaign (the caller's thread); ``keepalive_etcd`` (default: a second
    client like it) the keepalive thread, so that one never waits for the
    other."""

    def __init__(self, etcd: Etcd, session: str, ttl: int,
                 keepalive_etcd: Etcd | None = None, ident: dict | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] = lambda line: None):
        self.etcd = etcd
        self.ka_etcd = keepalive_etcd or etcd
        self.session = session
        self.ttl = int(ttl)
        self.key = etcd.key(session, "leader")
        self.me = ident or me()
        self.clock = clock
        self.log = log
        self.epoch: int | None = None
        self.lease: int | None = None
        self.record: str | None = None      # our P/leader value while we lead
        self.lost_why: str | None = None
        self.unreachable: str | None = None     # the keepalive's last etcd error
        self._renewed = float("-inf")       # send time of the last successful renewal
        self._lost = True
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._stale: list[int] = []         # leases of past terms, to revoke

    # ---- the campaign

    def campaign(self, stop: threading.Event,
                 waiting: Callable[[dict | None, Exception | None], None] | None = None
                 ) -> int | None:
        """Block until this coordinator leads (return its epoch) or ``stop``
        is set (return None).  ``waiting(leader, error)`` is called after
        each try that did not win: the current leader's record, or the
        etcd error (no quorum)."""
        self._end_term()
        lease, renewed = None, 0.0
        poll = poll_interval(self.ttl)
        while not stop.is_set():
            try:
                self._revoke_stale()
                if lease is None:
                    t0 = self.clock()
                    lease, renewed = self.etcd.grant(self.ttl), t0
                elif self.clock() - renewed > self.ttl / 3:
                    t0 = self.clock()
                    if self.etcd.keepalive(lease) <= 0:
                        lease = None
                        continue
                    renewed = t0
                value = _dump({**self.me, "since": round(time.time(), 3)})
                rev = self.etcd.create(self.key, value.encode(), lease=lease)
                if rev is not None:
                    self.epoch, self.lease, self.record = rev, lease, value
                    self._renewed, self._lost, self.lost_why = renewed, False, None
                    self._start_keepalive()
                    return rev
                kv = self.etcd.get(self.key)
                if waiting:
                    waiting(leader_of(kv), None)
            except EtcdError as exc:
                if waiting:
                    waiting(None, ClusterError(str(exc)))
            stop.wait(poll)
        if lease is not None:
            self._stale.append(lease)
            try:
                self._revoke_stale()
            except EtcdError:
                pass
        return None

    def _revoke_stale(self) -> None:
        while self._stale:
            self.etcd.revoke(self._stale[0])
            self._stale.pop(0)

    # ---- the term

    def held(self) -> bool:
        """True only while no other coordinator can lead (module doc)."""
        return not self._lost and self.clock() < self._renewed + self.ttl - MARGIN_S

    def valid_for(self) -> float:
        """Seconds ``held()`` stays true without another renewal (<= 0: lost)."""
        return -1.0 if self._lost else self._renewed + self.ttl - MARGIN_S - self.clock()

    def _start_keepalive(self) -> None:
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, args=(self._halt,),
                                        name="leader-keepalive", daemon=True)
        self._thread.start()

    def _keepalive(self, halt: threading.Event) -> None:
        lease, epoch = self.lease, self.epoch
        rounds = 0
        while not halt.is_set():
            t0 = self.clock()
            try:
                left = self.ka_etcd.keepalive(lease)
                if left <= 0:
                    self._lose("the leader's lease expired in etcd")
                    return
                if not halt.is_set() and lease == self.lease:
                    self._renewed = t0
                took = self.clock() - t0
                if took > self.ttl / 3:
                    self.log(f"etcd slow: renewing the leader's lease took {took:.2f} s"
                             f" (ttl_s {self.ttl})")
                # The key itself, every third round: only a person deleting
                # it by hand takes it from a live lease.
                rounds += 1
                if rounds % 3 == 0:
                    kv = self.ka_etcd.get(self.key)
                    if kv is None or kv.create_rev != epoch:
                        self._lose("another coordinator holds the leader key"
                                   if kv is not None else "the leader key is gone")
                        return
                self.unreachable = None
            except EtcdError as exc:
                self.unreachable = str(exc)
                if self.lost_why is None and not self.held():
                    self.lost_why = f"etcd unreachable, lease not renewed: {exc}"
                # Again soon, not in ttl/3: etcd electing a new leader of its
                # own (a member killed) answers again within about a second.
                halt.wait(RETRY_S)
                continue
            halt.wait(self.ttl / 3)

    def depose(self, why: str) -> None:
        """A node refused us as deposed (fenced): this term is over."""
        self._lose(f"fenced: {why}")

    def _lose(self, why: str) -> None:
        self._lost = True
        self.lost_why = why

    def _end_term(self) -> None:
        """Stop the keepalive; the lease of the term (if any) is revoked
        (best effort now, else at the next campaign's first try)."""
        self._halt.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(30)
        self._thread = None
        if self.lease is not None:
            self._stale.append(self.lease)
        self.lease, self.epoch, self.record = None, None, None
        self._lost = True

    def resign(self) -> None:
        """Give up leadership now: revoke the lease (the key goes with it),
        so that a standby takes over at once rather than after ttl."""
        self._end_term()
        try:
            self._revoke_stale()
        except EtcdError:
            pass                # it expires by itself within ttl

    def leader(self) -> dict | None:
        """The current leader's record with its epoch (None: none)."""
        with _etcd("read the leader"):
            return leader_of(self.etcd.get(self.key))


# ---------------------------------------------------------------- shared state

def read_state(etcd: Etcd, session: str) -> dict:
    """The session's shared state, one document: {"leader", "hardened",
    "direction", "lineage", "history", "status", "paused"} (None where
    nothing is stored)."""
    with _etcd(f"read the state of session {session}"):
        kvs = {kv.key: kv for kv in etcd.get_prefix(etcd.key(session, ""))}
    def get(*parts):
        return kvs.get(etcd.key(session, *parts))
    return {"leader": leader_of(get("leader")),
            "hardened": _load(get("state", "hardened")),
            "direction": _load(get("state", "direction")),
            "lineage": _load(get("state", "lineage")),
            "history": _load(get("state", "history")),
            "status": _load(get("status")),
            "paused": _load(get("control", "paused"))}


def set_paused(etcd: Etcd, session: str, paused: bool, by: str, why: str) -> dict:
    """Write ``P/control/paused`` (``mirror pause|resume``, failover)."""
    doc = {"paused": paused, "by": by, "why": why, "at": round(time.time(), 3)}
    with _etcd("write the pause flag"):
        etcd.put(etcd.key(session, "control", "paused"), _dump(doc).encode())
    return doc


def paused(etcd: Etcd, session: str) -> dict | None:
    """``P/control/paused`` or None."""
    with _etcd("read the pause flag"):
        return _load(etcd.get(etcd.key(session, "control", "paused")))


def put_event(etcd: Etcd, session: str, event: str, **fields) -> dict:
    """One event of a process that is no coordinator (a role command) in
    ``P/events/``, under a retention lease of its own; the event."""
    ident = me()
    doc = {"time": round(time.time(), 3), "session": session, "event": event, **fields,
           "host": ident["host"], "pid": ident["pid"]}
    with _etcd(f"write the {event} event"):
        etcd.put(event_key(etcd, session, doc, ident, 0), _dump(doc).encode(),
                 lease=etcd.grant(EVENT_TTL_S))
    return doc


def role_holder(etcd: Etcd, session: str) -> dict | None:
    """The role command holding ``P/role`` (host, pid, command, since), if any."""
    with _etcd(f"read {etcd.key(session, 'role')}"):
        kv = etcd.get(etcd.key(session, "role"))
    doc = _load(kv) if kv is not None else None
    return doc if isinstance(doc, dict) else ({} if kv is not None else None)


class RoleLock:
    """``P/role`` while one role command runs (module doc, "Role
    commands").  ``acquire()`` or BusyError; ``held()`` false once a
    renewal found the lease gone; ``release()`` revokes it."""

    def __init__(self, etcd: Etcd, session: str, command: str, ttl: int):
        self.etcd, self.session, self.command, self.ttl = etcd, session, command, int(ttl)
        self.key = etcd.key(session, "role")
        self.lease: int | None = None
        self.lost: str | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RoleLock":
        ident = me()
        doc = {"host": ident["host"], "pid": ident["pid"], "command": self.command,
               "since": round(time.time(), 3)}
        with _etcd(f"take the role lock {self.key}"):
            lease = self.etcd.grant(self.ttl)
            try:
                rev = self.etcd.create(self.key, _dump(doc).encode(), lease=lease)
                holder = None if rev is not None else _load(self.etcd.get(self.key))
            except BaseException:
                self._revoke(lease)
                raise
        if rev is None:
            self._revoke(lease)
            h = holder if isinstance(holder, dict) else {}
            raise BusyError(
                f"`cgmirror {h.get('command', '?')}` runs for session {self.session} on"
                f" host {h.get('host', '?')} (pid {h.get('pid', '?')}, it holds"
                f" {self.key}): run `cgmirror {self.command}` again once it ended",
                h.get("pid"))
        self.lease = lease
        self._thread = threading.Thread(target=self._keepalive, name="role-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def held(self) -> bool:
        return self.lease is not None and self.lost is None

    def still_held(self) -> bool:
        """Renew now and say whether the lock is still ours (a command
        stopped past the lease lost it: another may have taken it)."""
        if not self.held():
            return False
        with _etcd(f"renew the role lock {self.key}"):
            if self.etcd.keepalive(self.lease) <= 0:
                self.lost = f"the lease of {self.key} expired"
        return self.lost is None

    def _keepalive(self) -> None:
        while not self._halt.wait(self.ttl / 3):
            try:
                if self.etcd.keepalive(self.lease) <= 0:
                    self.lost = f"the lease of {self.key} expired"
                    return
            except EtcdError:
                pass            # etcd away: the next round, or the lease ends it

    def _revoke(self, lease: int) -> None:
        try:
            self.etcd.revoke(lease)
        except EtcdError:
            pass                # it ends by itself within ttl

    def release(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(self.etcd.timeout * len(self.etcd.endpoints) + 1)
            self._thread = None
        if self.lease is not None:
            self._revoke(self.lease)
            self.lease = None


def put_direction(etcd: Etcd, session: str, record: dict) -> None:
    """``P/state/direction`` (direction.save publishes every change)."""
    with _etcd("publish the direction"):
        etcd.put(etcd.key(session, "state", "direction"), _dump(record).encode())


def events(etcd: Etcd, session: str, after: str = "") -> list[tuple[str, dict]]:
    """Stored events after key ``after``, oldest first: [(key, event)]."""
    prefix = etcd.key(session, "events", "")
    with _etcd("read the events"):
        kvs = etcd.get_prefix(prefix)
    out = []
    for kv in sorted(kvs, key=lambda kv: kv.key):
        doc = _load(kv)
        if isinstance(doc, dict) and kv.key > after:
            out.append((kv.key, doc))
    return out


def event_key(etcd: Etcd, session: str, doc: dict, ident: dict, seq: int) -> str:
    """Keys sort by time: ``P/events/<ns since epoch>-<id>-<seq>`` (events
    of one coordinator within one millisecond differ by ``seq``)."""
    return etcd.key(session, "events", f"{int(doc.get('time', time.time()) * 1e9):020d}"
                                       f"-{ident['id']}-{seq:09d}")


class Publisher:
    """Writes a coordinator's events (always) and, while it leads, the
    session's shared state to etcd, from its own thread (module doc).
    State is coalesced: only the newest value of each key is written, so
    groups back to back cost one write per key per round, not one per
    group; events are kept in order (at most EVENTS_QUEUED)."""

    EVENTS_QUEUED = 1000

    def __init__(self, etcd: Etcd, session: str, ident: dict,
                 log: Callable[[str], None] = lambda line: None):
        self.etcd, self.session, self.me, self.log = etcd, session, ident, log
        self._cv = threading.Condition()
        self._events: list[dict] = []
        self._state: dict[str, object] = {}         # name -> newest doc
        self._status_due = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._event_lease: tuple[int, float] | None = None     # (id, granted at)
        self._seq = 0                                           # events written
        self.status_fn: Callable[[], dict] | None = None        # the leader's document
        self._guard: str | None = None                          # our P/leader value
        self.last_status = float("-inf")
        self.failed: str | None = None                          # last etcd failure

    def start(self) -> "Publisher":
        self._thread = threading.Thread(target=self._run, name="cluster-publish",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (bounded by ``timeout``), then stop."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None

    def lead(self, record: str | None) -> None:
        """Publish state guarded on ``P/leader == record`` (None: standby,
        only events)."""
        with self._cv:
            self._guard = record
            if record is None:
                self._state.clear()
                self._status_due = False

    def event(self, doc: dict) -> None:
        if doc.get("event") == "group-formed" and not doc.get("bytes"):
            return              # empty groups: counted in the history summary
        with self._cv:
            if len(self._events) >= self.EVENTS_QUEUED:
                self._events.pop(0)
            self._events.append({**doc, "host": self.me["host"], "pid": self.me["pid"]})
            self._cv.notify_all()

    def state(self, name: str, doc) -> None:
        """``P/state/<name>`` (leader only; the newest wins)."""
        with self._cv:
            if self._guard is not None:
                self._state[name] = doc
                self._cv.notify_all()

    def status_now(self) -> None:
        with self._cv:
            self._status_due = True
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._events or self._state or self._status_due
                           or time.monotonic() >= self.last_status + STATUS_EVERY_S):
                    self._cv.wait(max(0.05, self.last_status + STATUS_EVERY_S
                                      - time.monotonic()))
                if self._stop and not (self._events or self._state):
                    return
                events, self._events = self._events, []
                state, self._state = self._state, {}
                guard = self._guard
                status = guard is not None and self.status_fn is not None and (
                    self._status_due or time.monotonic() >= self.last_status
                    + STATUS_EVERY_S)
                self._status_due = False
                stopping = self._stop
            if status or guard is None:
                self.last_status = time.monotonic()
            try:
                self._write(events, state, guard, status)
                if self.failed:
                    self.log("cluster: etcd answers again")
                self.failed = None
            except (EtcdError, CgmirrorError, OSError) as exc:
                if self.failed is None:
                    self.log(f"cluster: cannot publish to etcd ({exc}); trying on")
                self.failed = str(exc)
                with self._cv:          # put back what was not written (newer wins)
                    self._events[:0] = events[-self.EVENTS_QUEUED:]
                    for k, v in state.items():
                        self._state.setdefault(k, v)
                if stopping:
                    return
                time.sleep(0.2)

    def _write(self, events: list[dict], state: dict, guard: str | None,
               status: bool) -> None:
        etcd, s = self.etcd, self.session
        while events:
            etcd.put(event_key(etcd, s, events[0], self.me, self._seq),
                     _dump(events[0]).encode(), lease=self._lease())
            self._seq += 1
            events.pop(0)
        if guard is None:
            return
        for name in list(state):
            self._put(etcd.key(s, "state", name), state[name], guard)
            del state[name]
        if status:
            self._put(etcd.key(s, "status"), self.status_fn(), guard)

    def _put(self, k: str, doc, guard: str) -> None:
        self.etcd.put_if_value(k, _dump(doc).encode(), self.etcd.key(self.session, "leader"),
                               guard.encode())

    def _lease(self) -> int:
        now = time.monotonic()
        if self._event_lease is None or now - self._event_lease[1] > EVENT_LEASE_RENEW_S:
            self._event_lease = (self.etcd.grant(EVENT_TTL_S), now)
        return self._event_lease[0]


def history_summary(prev: dict | None, res) -> dict:
    """``P/state/history`` after group ``res`` (a cycle.GroupResult): the
    totals (over every leader: they go on from ``prev``) and the last
    HISTORY_KEEP groups, newest last."""
    prev = prev or {}
    groups = list(prev.get("groups", []))
    formed = prev.get("formed", 0) + (res.outcome == "hardened")
    failed = prev.get("failed", 0) + (res.outcome != "hardened")
    m = res.measures
    groups.append({"n": res.n, "outcome": res.outcome, "bytes": res.bytes,
                   "cut": round(res.cut, 3), "hold_ms": m.get("hold_ms"),
                   "drain_ms": m.get("drain_ms")})
    return {"formed": formed, "failed": failed, "groups": groups[-HISTORY_KEEP:]}


__all__ = ["ClusterError", "EVENT_TTL_S", "Leadership", "MARGIN_S", "Publisher",
           "RoleLock", "client", "connect", "events", "history_summary", "leader_of", "me",
           "role_holder",
           "paused", "poll_interval", "put_direction", "put_event", "read_state",
           "set_paused"]
