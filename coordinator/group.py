"""Forming a point in time across slaves, and copying it: the reusable core.

``cgmirror copy`` is ``preflight`` -> ``full_volumes`` -> ``establish`` ->
``copy``; the consistency-group cycle reuses the same.  Every function takes a list
of ``link.SlaveLink`` (one per slave; build them with
``SlaveLink(name, control_path, volumes)`` or ``SlaveLink.from_spec(spec)``)
and raises only ``errors.CgmirrorError`` subclasses.

Establish (DESIGN.md "The cycle", step 1).  One thread, one connection per
slave, opened before the clock starts: FREEZE(n) goes to every slave at
once, and the coordinator reads replies as they come (select) until every
slave is FROZEN or ``max_coordination_ms`` has passed.  All frozen ->
THAW(n) to all at once.  Otherwise -> ABORT(n) to every slave, and
``EstablishAborted``.  Each abort goes on the connection that carried the
slave's freeze, and a slave answers one connection in order: an abort can
therefore never overtake the freeze it undoes (an abort on a second
connection could reach the slave first, be refused as "no such cut", and
leave the late freeze holding the gates until the lease ran out); a slave
whose freeze is still pending handles its abort the moment its freeze is
done.  A slave that died answers nothing; the others are thawed by the
abort within the coordination time, and the lease is the backstop if the
coordinator dies too.

Rejected: sending THAW to each slave as soon as it is frozen (a thawed write
could depend on a write that is not yet in another slave's cut), and a
thread per slave (the wake-ups between the threads sat inside the hold).

Copy (DESIGN.md "Consistent copy").  COPY(n, targets) to each slave, then
``status`` every ~150 ms until every slave is idle with ``last_copy.n == n``.
A slave that stops answering fails the copy: the others are told ABORT(n), so
what they did not confirm goes back into change recording, and
``CopyFailed`` names the dead slave.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import (CgmirrorError, ConfigError, CopyFailed, EstablishAborted, SlaveBusy,
                     SlaveError, SlaveUnreachable, TargetError, UnknownVolume, UsageError)
from nbdplugin import protocol
from nbdplugin.control import ControlError
from nbdplugin.protocol import Kind

from .link import Channel, SlaveLink, translate

POLL_S = 0.15
# How long after the freeze was sent we still wait for aborts to be answered;
# past it the lease thaws any slave we could not reach.
ABORT_GRACE_S = 1.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _parallel(links: list[SlaveLink], fn: Callable[[SlaveLink], object],
              timeout: float | None = None) -> dict[str, object]:
    """Run ``fn(link)`` for every link at once; {name: result or the exception}.

    A call still running after ``timeout`` is reported as a SlaveUnreachable.
    """
    out: dict[str, object] = {}

    def run(link: SlaveLink) -> None:
        try:
            out[link.name] = fn(link)
        except Exception as exc:   # reported to the caller, which decides
            out[link.name] = exc

    threads = [threading.Thread(target=run, args=(lk,), name=f"cg-{lk.name}", daemon=True)
               for lk in links]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    for lk in links:
        if lk.name not in out:
            out[lk.name] = SlaveUnreachable(lk.name, f"slave {lk.name}: no answer"
                                                     f" within {timeout:.1f} s")
    return out


def _check_links(links: list[SlaveLink]) -> None:
    names = [lk.name for lk in links]
    if not links or len(set(names)) != len(names):
        raise ValueError(f"links must name each slave once: {names}")


# ------------------------------------------------------------------ preflight

def statuses(links: list[SlaveLink]) -> dict[str, dict | CgmirrorError]:
    """Every slave's status reply (or the error reaching it), asked at once."""
    _check_links(links)
    return _parallel(links, lambda lk: lk.status(),
                     timeout=max(lk.timeout for lk in links) + 1)


def preflight(links: list[SlaveLink], abort_leftover: bool = True,
              warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Check every slave before a cut; return {name: status}.

    Raises ``SlaveUnreachable`` for a slave that does not answer,
    ``UnknownVolume`` if a link names a volume its slave does not serve, and
    ``SlaveBusy`` if a slave is in a cut and ``abort_leftover`` is false.  With
    ``abort_leftover`` (the caller holds the session lock, so any cut in
    progress was left by a coordinator that died), that cut is aborted and
    ``warn`` is told.
    """
    replies = statuses(links)
    for lk in links:
        r = replies[lk.name]
        if isinstance(r, Exception):
            raise r
        for v in lk.volumes or ():
            if v not in r["volumes"]:
                raise UnknownVolume(lk.name, v, f"slave {lk.name} has no volume {v!r}"
                                    f" (it serves: {', '.join(r['volumes']) or 'none'});"
                                    f" fix the session file or restart the slave")
    for lk in links:
        r = replies[lk.name]
        if r["phase"] != "idle":
            if not abort_leftover:
                raise SlaveBusy(lk.name, f"slave {lk.name} is in cut {r['n']}"
                                         f" ({r['phase']})")
            if warn:
                warn(f"slave {lk.name}: aborting cut {r['n']} ({r['phase']}) left by"
                     f" a coordinator that stopped")
            abort_one(lk, r["n"])
            replies[lk.name] = lk.status()
    return replies


def next_n(replies: dict[str, dict], floor: int = 0) -> int:
    """A cut number above ``floor`` and above every cut any slave has seen."""
    return max([floor] + [r["n"] for r in replies.values()]) + 1


def full_volumes(replies: dict[str, dict], targets: dict[str, dict[str, str]],
                 mode: str = "auto") -> dict[str, list[str]]:
    """Which volumes a copy in ``mode`` copies whole: {slave: [volume, ...]}.

    A slave preserves for a cut exactly the blocks its copy will read, so
    this is decided before the freeze and passed to ``establish(full=...)``.
    "full": every volume in ``targets``; "auto": those whose last completed
    copy (``synced_target`` in ``replies``, from ``statuses``/``preflight``)
    is not on the same target; "incremental": none, and a volume without
    such a copy raises ``UsageError`` (before anything is frozen).
    """
    out: dict[str, list[str]] = {}
    for slave, vols in targets.items():
        status = replies[slave]["volumes"]
        synced = {v: status[v]["synced_target"] == uri for v, uri in vols.items()}
        if mode == "incremental":
            missing = [v for v, ok in synced.items() if not ok]
            if missing:
                raise UsageError(f"--incremental: {slave}/{missing[0]} has no completed"
                                 f" copy on {vols[missing[0]]}; run a full copy first")
        out[slave] = [v for v, ok in synced.items() if mode == "full" or not ok]
    return out


def verify_baselines(links: list[SlaveLink], targets: dict[str, dict[str, str]],
                     full: dict[str, list[str]], timeout_ms: int = 30000) -> None:
    """Before the freeze: raise ``TargetError`` (one line naming --full) if a
    volume to be copied incrementally has a target that no longer holds its
    last copy (replaced, reformatted, written by someone else)."""
    for lk in links:
        incremental = {v: uri for v, uri in targets[lk.name].items()
                       if v not in full.get(lk.name, ())}
        if incremental:
            # A silent target must fail as a target, within the link's own
            # timeout, not make the slave look unreachable.
            failed = lk.call("verify", targets=incremental,
                             timeout_ms=min(timeout_ms, int(lk.timeout * 500)))["failed"]
            if failed:
                v, line = next(iter(failed.items()))
                raise TargetError(f"{lk.name}/{v}: {line}")


# ------------------------------------------------------------------ establish

@dataclass
class SlaveTiming:
    """One slave's part in an establish."""

    frozen_ms: float          # coordinator: freeze sent -> FROZEN received
    drain_ms: float           # slave: close gates, wait for writes inside
    held_ms: float | None     # slave: how long its gates stayed closed
    blocks: dict[str, int]    # blocks in the cut, per volume


@dataclass
class Established:
    """Cut ``n`` holds on every slave (each is in phase "cut")."""

    n: int
    coordination_ms: float    # freeze sent to all -> the last FROZEN
    total_ms: float           # freeze sent to all -> the last THAW answered
    slaves: dict[str, SlaveTiming] = field(default_factory=dict)

    @property
    def max_held_ms(self) -> float:
        return max((t.held_ms or 0.0) for t in self.slaves.values())

    def to_json(self) -> dict:
        return asdict(self) | {"max_held_ms": self.max_held_ms}


# Refusals of an abort that mean the slave is not (or no longer) in the cut.
_NOT_IN_CUT = (Kind.ENDED, Kind.ORDER)


def abort_one(link: SlaveLink | Channel, n: int) -> str:
    """ABORT(n) to one slave: "aborted", "not in cut" (it had not frozen n, or
    n already ended there, e.g. by lease expiry), or "unreachable: ...".
    Any other refusal is raised."""
    try:
        link.call("abort", n=n)
        return "aborted"
    except SlaveUnreachable as exc:
        return f"unreachable: {exc}"
    except SlaveError as exc:
        if exc.kind in _NOT_IN_CUT:
            return "not in cut"
        raise


def abort_all(links: list[SlaveLink], n: int) -> dict[str, str]:
    """ABORT(n) to every slave at once; {name: outcome} (see ``abort_one``)."""
    res = _parallel(links, lambda lk: abort_one(lk, n),
                    timeout=max(lk.timeout for lk in links) + 1)
    return {k: (f"failed: {v}" if isinstance(v, Exception) else v) for k, v in res.items()}


def establish(links: list[SlaveLink], n: int, lease_ms: int,
              max_coordination_ms: int, *,
              full: dict[str, list[str]] | None = None) -> Established:
    """Establish point in time ``n`` on every slave, or abort it on all.

    FREEZE(n, lease_ms) goes to all slaves at once (each link's ``volumes``,
    or all of the slave's volumes if None).  ``full`` names, per slave, the
    volumes whose PiT will be copied whole (see ``full_volumes``); the others
    can only be copied incrementally (their changes since the last copy),
    so a later ``copy(mode="full")`` of them is refused.  If every slave answers FROZEN
    within ``max_coordination_ms``, THAW(n) goes to all at once and the
    timings are returned; every slave is then in phase "cut" with PiT n,
    ready for ``copy``.  Otherwise ABORT(n) goes to every slave (queued right
    behind its freeze) and ``EstablishAborted`` is raised naming the first
    slave that failed and why; its ``aborts`` says how each abort ended.  A
    thaw that fails (the slave died, or its lease ran out) also aborts n
    everywhere.  Returns within about ``max_coordination_ms`` plus a round
    trip when all goes well; on failure within the coordination time plus
    the aborts (at most ``lease_ms`` + 1 s for a hung slave).
    """
    _check_links(links)
    if not 0 < max_coordination_ms < lease_ms:
        raise ValueError("need 0 < max_coordination_ms < lease_ms")
    if lease_ms > protocol.MAX_LEASE_MS:
        # Refused here, before any slave freezes: a slave would refuse it too.
        raise ConfigError(f"lease_ms {lease_ms} is above the cap of"
                          f" {protocol.MAX_LEASE_MS} ms (host writes stall that long"
                          f" if the coordinator dies mid-freeze); lower it in the"
                          f" session file")
    wires = [_Wire(lk) for lk in links]          # connected before the clock starts
    try:
        return _establish(wires, links, n, lease_ms, max_coordination_ms, full or {})
    finally:
        for w in wires:
            w.close()


def _establish(wires: list["_Wire"], links: list[SlaveLink], n: int, lease_ms: int,
               max_coordination_ms: int, full: dict[str, list[str]]) -> Established:
    t0 = time.monotonic()
    for w in wires:
        args = {"n": n, "lease_ms": lease_ms}
        if w.link.volumes is not None:
            args["volumes"] = w.link.volumes
        if full.get(w.name):
            args["full"] = list(full[w.name])
        w.send("freeze", args)

    def settled() -> bool:
        return all(w.dead or w.replies for w in wires) or any(
            w.dead or (w.replies and not w.replies[0]["ok"]) for w in wires)

    try:
        _pump(wires, settled, t0 + max_coordination_ms / 1000)
    except BaseException:
        # Interrupted (Ctrl-C) while slaves freeze: abort them before leaving.
        for w in wires:
            w.send("abort", {"n": n})
        _pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
              time.monotonic() + ABORT_GRACE_S)
        raise
    coordination = time.monotonic() - t0
    frozen = {w.name: w.replies[0] for w in wires if w.replies and w.replies[0]["ok"]}

    if len(frozen) < len(wires):
        failed = [w for w in wires if w.dead or (w.replies and not w.replies[0]["ok"])]
        if failed:
            culprit = failed[0].name
            reason = f"freeze failed: {failed[0].error(0)}"
        else:
            pending = [w.name for w in wires if not w.replies]
            culprit = pending[0]
            reason = (f"not frozen within {max_coordination_ms} ms"
                      + (f" (nor {', '.join(pending[1:])})" if pending[1:] else ""))
        # Each abort queues behind its slave's freeze on the same connection,
        # so it can never overtake the freeze it undoes.
        for w in wires:
            w.send("abort", {"n": n})
        _pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
              t0 + lease_ms / 1000 + ABORT_GRACE_S)
        aborts = {w.name: w.abort_outcome() for w in wires}
        raise EstablishAborted(n, culprit, reason + _abort_problems(aborts, culprit), aborts)

    for w in wires:
        w.send("thaw", {"n": n})
    _pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
          time.monotonic() + max(lk.timeout for lk in links) + 1)
    total = time.monotonic() - t0
    bad = [w for w in wires if len(w.replies) < 2 or not w.replies[1]["ok"]]
    if bad:
        name = bad[0].name
        why = bad[0].error(1) if len(bad[0].replies) >= 2 else (
            bad[0].dead or "no answer to thaw")
        aborts = abort_all(links, n)
        raise EstablishAborted(n, name, f"thaw failed: {why}"
                               + _abort_problems(aborts, name), aborts)
    timings = {}
    for w in wires:
        fr = frozen[w.name]
        timings[w.name] = SlaveTiming(frozen_ms=_ms(w.answered[0] - t0),
                                      drain_ms=fr.get("drain_ms", 0.0),
                                      held_ms=w.replies[1].get("held_ms"),
                                      blocks=fr.get("blocks", {}))
    return Established(n=n, coordination_ms=_ms(coordination), total_ms=_ms(total),
                       slaves=timings)


class _Wire:
    """One connection to a slave for an establish, used pipelined from a
    single thread: requests go out without waiting, replies are read as they
    arrive (a slave answers one connection's requests in order).  Framing
    and reply checks are ``protocol``'s, as for ``ControlClient``: each
    reply is checked against the schema of the op it answers, and one that
    does not match becomes a refusal of kind REPLY (the wire stays usable,
    so the abort that follows still goes out behind the freeze).

    Rejected: a thread per slave (the first version).  Its wake-ups -- go,
    each reply, the decision, each thaw -- sat between the first gate
    closing and the last opening, and it needed a condition variable and
    two events to keep each abort behind its freeze.  Measured on two cores
    (4 slaves): gates held p50 1.6 -> 1.4 ms with no load, no change under
    write load, where the slaves' own scheduling dominates.
    """

    def __init__(self, link: SlaveLink):
        self.link, self.name = link, link.name
        self.replies: list[dict] = []
        self.answered: list[float] = []     # monotonic time of each reply
        self.dead: str | None = None        # why the connection is gone
        self._sent: list[str] = []          # the op of each request, in order
        self._framer = protocol.Framer()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(link.timeout)
            self.sock.connect(link.control)
            self.sock.setblocking(False)
        except OSError as exc:
            self.dead = f"slave at {link.control} is unreachable: {exc.strerror or exc}"

    def send(self, op: str, args: dict) -> None:
        if self.dead:
            return
        try:
            # A few hundred bytes: they fit the socket buffer at once.
            self.sock.sendall(protocol.encode({"op": op, **args}))
            self._sent.append(op)
        except OSError as exc:
            self.dead = f"slave at {self.link.control} stopped answering: {exc}"

    def pump(self) -> None:
        """Read what has arrived; called when the socket is readable."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            self.dead = f"slave at {self.link.control} stopped answering: {exc}"
            return
        if not data:
            self.dead = f"slave at {self.link.control} closed the connection"
            return
        try:
            lines = self._framer.feed(data)
        except protocol.ProtocolError as exc:       # out of step: give up on it
            op = self._sent[len(self.replies)] if len(self.replies) < len(self._sent) \
                else None
            self.dead = f"slave at {self.link.control} sent a {protocol.bad_reply(op, exc)}"
            return
        for line in lines:
            if len(self.replies) >= len(self._sent):
                self.dead = f"slave at {self.link.control} sent a reply to no request"
                return
            op = self._sent[len(self.replies)]
            try:
                reply = protocol.decode_reply(op, line)
            except protocol.Refused as exc:
                reply = protocol.error(str(exc), exc.kind)
            except protocol.ProtocolError as exc:
                reply = protocol.error(f"slave at {self.link.control} sent a {exc}",
                                       exc.kind)
            self.replies.append(reply)
            self.answered.append(time.monotonic())

    def error(self, i: int) -> str:
        """The coordinator's one line for reply ``i`` (a refusal), or why the
        connection died before it."""
        if i >= len(self.replies):
            return str(SlaveUnreachable(self.name, f"slave {self.name}: {self.dead}"))
        r = self.replies[i]
        return str(translate(self.name, ControlError(r["error"], r["kind"])))

    def abort_outcome(self) -> str:
        """How the abort ended, in ``abort_one``'s words."""
        if len(self.replies) >= 2:
            r = self.replies[1]
            if r["ok"]:
                return "aborted"
            if r["kind"] in _NOT_IN_CUT:
                return "not in cut"
            return f"failed: {self.error(1)}"
        if self.dead:
            return f"unreachable: {self.error(len(self.replies))}"
        return "no answer (its lease will thaw it)"

    def close(self) -> None:
        self.sock.close()


def _pump(wires: list[_Wire], done: Callable[[], bool], until: float) -> None:
    """Read replies from every live wire until ``done()`` or ``until``."""
    with selectors.DefaultSelector() as sel:
        for w in wires:
            if not w.dead:
                sel.register(w.sock, selectors.EVENT_READ, w)
        while not done() and sel.get_map():
            left = until - time.monotonic()
            if left <= 0:
                return
            for key, _ in sel.select(left):
                w = key.data
                w.pump()
                if w.dead:
                    sel.unregister(w.sock)


def _abort_text(result: object) -> str:
    if result is None:
        return "no answer (its lease will thaw it)"
    if isinstance(result, Exception):
        return f"failed: {result}"
    return str(result)


def _abort_problems(aborts: dict[str, str], culprit: str) -> str:
    """A suffix naming slaves other than the culprit whose abort went wrong."""
    bad = [f"{k}: {v}" for k, v in aborts.items()
           if k != culprit and v not in ("aborted", "not in cut")]
    return f"; abort did not reach {'; '.join(bad)}" if bad else ""


# ------------------------------------------------------------------ copy

@dataclass
class VolumeCopy:
    """How one volume's copy went (bytes are what the target confirmed)."""

    target: str
    mode: str                 # "full" or "incremental"
    bytes: int                # confirmed at the target
    total_bytes: int          # what the copy had to send
    seconds: float
    state: str                # "done", "failed", "running"
    error: str | None = None

    @property
    def mb_per_s(self) -> float:
        return round(self.bytes / 1e6 / self.seconds, 1) if self.seconds > 0 else 0.0


@dataclass
class CopyReport:
    """The copy of cut ``n``: per slave, per volume."""

    n: int
    mode: str                 # what was asked: auto, full or incremental
    seconds: float            # wall time, COPY sent -> every slave idle
    slaves: dict[str, dict[str, VolumeCopy]] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(v.bytes for vols in self.slaves.values() for v in vols.values())

    @property
    def ok(self) -> bool:
        return bool(self.slaves) and all(v.state == "done" for vols in self.slaves.values()
                                         for v in vols.values())

    def to_json(self) -> dict:
        return {"n": self.n, "mode": self.mode, "ok": self.ok, "bytes": self.bytes,
                "seconds": self.seconds,
                "slaves": {s: {v: asdict(c) | {"mb_per_s": c.mb_per_s}
                               for v, c in vols.items()}
                           for s, vols in self.slaves.items()}}


def copy(links: list[SlaveLink], n: int, targets: dict[str, dict[str, str]],
         mode: str = "auto", progress_cb: Callable[[dict], None] | None = None, *,
         timeout_ms: int = 30000, inflight: int | None = None,
         poll_s: float = POLL_S) -> CopyReport:
    """Copy established PiT ``n`` of every slave to its targets; wait for the end.

    ``targets``: {slave: {volume: NBD URI}}, one entry per link, naming every
    volume of the cut.  ``mode``: "auto" copies each volume the way its cut
    was taken (``establish(full=...)``: whole, else its changes); "full" or
    "incremental" insist, and a slave refuses a volume cut the other way.  ``timeout_ms``: a target silent this long
    fails its copy.  ``progress_cb(progress)`` is called after every poll
    with ``{"n", "done_bytes", "total_bytes", "slaves": {slave: {volume:
    {"done_bytes", "total_bytes", "state"}}}}``.

    Returns a ``CopyReport`` when every volume is done.  Raises ``CopyFailed``
    (with ``.report``) when any volume failed: fault "target" if only
    targets failed, "unreachable" if a slave stopped answering (the others
    are aborted first), "slave" otherwise.  On any exception (also
    KeyboardInterrupt) in the middle, every slave is told ABORT(n) first.
    """
    _check_links(links)
    missing = [lk.name for lk in links if lk.name not in targets]
    if missing:
        raise ValueError(f"no targets for slave {missing[0]}")
    t0 = time.monotonic()
    modes: dict[str, dict[str, str]] = {}
    report = CopyReport(n=n, mode=mode, seconds=0.0)
    try:
        for lk in links:
            args = {"n": n, "targets": targets[lk.name], "mode": mode,
                    "timeout_ms": timeout_ms}
            if inflight is not None:
                args["inflight"] = inflight
            try:
                modes[lk.name] = lk.call("copy", **args)["modes"]
            except CgmirrorError as exc:
                abort_all(links, n)
                fault = "unreachable" if isinstance(exc, SlaveUnreachable) else "slave"
                raise CopyFailed(n, {lk.name: str(exc)}, fault) from exc
        finals = _poll(links, n, targets, modes, progress_cb, poll_s)
    except CopyFailed:
        raise
    except BaseException:
        abort_all(links, n)
        raise
    report.seconds = round(time.monotonic() - t0, 3)
    failures: dict[str, str] = {}
    faults: set[str | None] = set()
    for lk in links:
        last, err = finals[lk.name]
        vols = {}
        for v, uri in targets[lk.name].items():
            p = (last or {}).get("volumes", {}).get(v) or {}
            vc = VolumeCopy(target=uri, mode=modes[lk.name].get(v, "?"),
                            bytes=p.get("done_bytes", 0), total_bytes=p.get("total_bytes", 0),
                            seconds=p.get("seconds", 0.0), state=p.get("state", "failed"),
                            error=p.get("error") or err)
            if vc.state != "done":
                failures[f"{lk.name}/{v}"] = vc.error or vc.state
                faults.add(p.get("fault"))
            vols[v] = vc
        report.slaves[lk.name] = vols
    if failures:
        dead = [k for k, (_, e) in finals.items() if e and e.startswith("unreachable")]
        if dead:
            fault = "unreachable"
            failures = {k: finals[k][1] for k in dead} | failures
        elif faults == {"target"}:
            fault = "target"
        else:
            fault = "slave"
        raise CopyFailed(n, failures, fault, report.to_json())
    return report


def _poll(links, n, targets, modes, progress_cb, poll_s):
    """Status every slave until each is idle after copy n; {name: (last_copy, error)}.

    A slave that stops answering ends as (None, "unreachable: ...") after
    every other slave still copying was told ABORT(n).
    """
    finals: dict[str, tuple[dict | None, str | None]] = {}
    progress = {lk.name: {} for lk in links}
    delay = 0.02          # small copies end fast: start polling quickly
    while len(finals) < len(links):
        time.sleep(delay)
        delay = min(poll_s, delay * 2)
        for lk in links:
            if lk.name in finals:
                continue
            try:
                st = _status_retry(lk)
            except SlaveUnreachable as exc:
                finals[lk.name] = (None, f"unreachable: {exc}")
                others = [o for o in links if o.name not in finals]
                if others:
                    abort_all(others, n)
                    for o in others:
                        try:
                            r = _status_retry(o)
                            finals[o.name] = (r.get("last_copy"), None)
                        except SlaveUnreachable as exc2:
                            finals[o.name] = (None, f"unreachable: {exc2}")
                break
            last = st.get("last_copy")
            if st["phase"] == "idle":
                if last and last.get("n") == n:
                    finals[lk.name] = (last, None)
                else:
                    finals[lk.name] = (None, f"cut {n} ended ({st.get('ended')})"
                                             f" without finishing its copy")
            elif st["n"] != n:
                finals[lk.name] = (None, f"slave is in cut {st['n']}, not {n}")
            for v in targets[lk.name]:
                c = (last or {}).get("volumes", {}).get(v) if lk.name in finals \
                    else st["volumes"].get(v, {}).get("copy")
                if c:
                    progress[lk.name][v] = {k: c.get(k) for k in
                                            ("done_bytes", "total_bytes", "state")}
        if progress_cb:
            vols = [p for s in progress.values() for p in s.values()]
            progress_cb({"n": n, "done_bytes": sum(p["done_bytes"] or 0 for p in vols),
                         "total_bytes": sum(p["total_bytes"] or 0 for p in vols),
                         "slaves": progress})
    return finals


def _status_retry(link: SlaveLink) -> dict:
    """status, trying once more on a fresh connection before calling it dead."""
    try:
        return link.status()
    except SlaveUnreachable:
        time.sleep(0.05)
        return link.status()
