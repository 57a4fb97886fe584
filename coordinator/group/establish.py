"""Establish (DESIGN.md "The cycle", step 1).

One thread (at real-time priority where allowed: pipeline.realtime), one
connection per slave (to its gate socket where it has one: FREEZE, THAW and
ABORT answered by a C thread, over TLS too on TCP), opened before the clock
starts: FREEZE(n) goes to every slave at once, and the coordinator reads
replies as they come (select) until every slave is FROZEN or
``max_coordination_ms`` has passed.  All frozen -> THAW(n) to all at once.
Otherwise -> ABORT(n) to every slave, and ``EstablishAborted``.  Each abort
goes on the connection that carried the slave's freeze, and a slave answers
one connection in order: an abort can therefore never overtake the freeze
it undoes (an abort on a second connection could reach the slave first, be
refused as "no such cut", and leave the late freeze holding the gates until
the lease ran out); a slave whose freeze is still pending handles its abort
the moment its freeze is done.  A slave that died answers nothing; the others are thawed by the
abort within the coordination time, and the lease is the backstop if the
coordinator dies too.

Rejected: sending THAW to each slave as soon as it is frozen (a thawed write
could depend on a write that is not yet in another slave's cut), and a
thread per slave (the wake-ups between the threads sat inside the hold).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from wire import protocol

from ..errors import ConfigError, EstablishAborted
from ..link import SlaveLink
from .fanout import abort_all, check_links, ms
from .pipeline import Wire, pump, realtime

# How long after the freeze was sent we still wait for aborts to be answered;
# past it the lease thaws any slave we could not reach.
ABORT_GRACE_S = 1.0


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
    check_links(links)
    if not 0 < max_coordination_ms < lease_ms:
        raise ValueError("need 0 < max_coordination_ms < lease_ms")
    if lease_ms > protocol.MAX_LEASE_MS:
        # Refused here, before any slave freezes: a slave would refuse it too.
        raise ConfigError(f"lease_ms {lease_ms} is above the cap of"
                          f" {protocol.MAX_LEASE_MS} ms (host writes stall that long"
                          f" if the coordinator dies mid-freeze); lower it in the"
                          f" session file")
    wires = [Wire(lk) for lk in links]          # connected before the clock starts
    try:
        with realtime():
            return _establish(wires, links, n, lease_ms, max_coordination_ms, full or {})
    finally:
        for w in wires:
            w.close()


def _establish(wires: list["Wire"], links: list[SlaveLink], n: int, lease_ms: int,
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
        pump(wires, settled, t0 + max_coordination_ms / 1000)
    except BaseException:
        # Interrupted (Ctrl-C) while slaves freeze: abort them before leaving.
        for w in wires:
            w.send("abort", {"n": n})
        pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
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
        pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
              t0 + lease_ms / 1000 + ABORT_GRACE_S)
        aborts = {w.name: w.abort_outcome() for w in wires}
        raise EstablishAborted(n, culprit, reason + _abort_problems(aborts, culprit), aborts)

    for w in wires:
        w.send("thaw", {"n": n})
    pump(wires, lambda: all(w.dead or len(w.replies) >= 2 for w in wires),
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
        timings[w.name] = SlaveTiming(frozen_ms=ms(w.answered[0] - t0),
                                      drain_ms=fr.get("drain_ms", 0.0),
                                      held_ms=w.replies[1].get("held_ms"),
                                      blocks=fr.get("blocks", {}))
    return Established(n=n, coordination_ms=ms(coordination), total_ms=ms(total),
                       slaves=timings)



def _abort_problems(aborts: dict[str, str], culprit: str) -> str:
    """A suffix naming slaves other than the culprit whose abort went wrong."""
    bad = [f"{k}: {v}" for k, v in aborts.items()
           if k != culprit and v not in ("aborted", "not in cut")]
    return f"; abort did not reach {'; '.join(bad)}" if bad else ""
