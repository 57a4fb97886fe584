"""Online verify (``cgmirror verify [--repair]``): does the remote hold what
the primaries say it holds, checked without stopping host writes?

What is compared.  The secondary's hardened image of group h against the
primary's content of the same group.  The primary keeps no image of an old
group, but it does not need one: right after group h hardened, and until the
next cut, a block that is *clean* on the primary (in neither ``cr`` nor
``oos``) has not been written since the cut of h, and every change before
that cut was drained and confirmed, so its live content is its content in
h -- and in every group since it last changed.  So the mirror runs verify
in its own cycle, between groups (after commit h, before establishing
h+1), when the last group hardened; host writes go on, and a block they
change while it is read is marked dirty before its data changes (the write
path marks first), so the primary reports null for it (dirty before or
after its read) and it is skipped: it goes with the next group anyway.

Where the work is done.  Each side reads its own blocks and answers
digests only (the ``checksums`` op of both roles, MAX_CHECKSUMS blocks a
request): the primary reads its live volume, the secondary its hardened
group through its undo overlay, in blocks of the primary's granularity.

``--repair`` marks every differing block in the primary's ``cr`` (its
``mark`` op, durable on return), so the next group sends it.

How long a verify waits.  It needs a hardened last group; when none can
form (a primary down, a secondary out of space or refusing, a baseline
that no longer matches) it must not wait forever.  A request gives up
(``NoHardenedGroup``, exit 4 UNREACHABLE in the CLI) after ``GIVE_UP_AFTER``
group attempts in a row that failed since it was asked (a drain timeout
does not count: its bits go on with the next group, and the timer lifts),
or after its wait bound: ``--timeout``, else ``default_wait_s`` (three
groups' intervals, coordination and drain times, plus 30 s), whichever
comes first; its line names the group it waited for and the mirror's last
failure.  A verify already reading when the bound passes finishes.

Rejected: comparing a fresh PiT of cut h+1 (the secondary does not hold
h+1 until it is drained, and holding the cycle for a whole-volume read
would stop the RPO clock for that long); reading the remote's data at the
primary (the link would carry the whole volume, not its digests).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from wire.protocol import MAX_CHECKSUMS, MAX_RUNS

from ..errors import CgmirrorError, ExitCode, MirrorError, SlaveError

GIVE_UP_AFTER = 3               # failed group attempts in a row before a verify gives up


class Unreachable(MirrorError):
    """A verify could not reach what it compares: a node, or a hardened
    group (exit UNREACHABLE, not FAILED: that one says blocks differ)."""

    exit_code = ExitCode.UNREACHABLE


class NoHardenedGroup(Unreachable):
    """A verify gave up: no group hardened within its bound (the line says
    which group it waited after and why none came)."""


def default_wait_s(settings, session) -> float:
    """How long a verify waits for a hardened group unless told: three
    groups' worth of interval, coordination and drain, plus 30 s."""
    return 3 * (max(settings.interval_ms, 1000) + session.max_coordination_ms
                + settings.max_drain_ms) / 1000 + 30


def runs_of(blocks: list[int]) -> list[list[int]]:
    """Sorted block numbers as [start, count] runs."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return out


def compare_volume(primary, volume: str, secondary, remote_volume: str,
                   size: int, granularity: int) -> dict:
    """Compare one pair block by block; return {"blocks", "compared",
    "skipped", "differ" (runs of primary blocks)}."""
    nblocks = -(-size // granularity)
    differ: list[int] = []
    skipped = 0
    for start in range(0, nblocks, MAX_CHECKSUMS):
        count = min(MAX_CHECKSUMS, nblocks - start)
        mine = primary.call("checksums", volume=volume, start=start, count=count)
        theirs = secondary.call("checksums", volume=remote_volume, start=start,
                                count=count, block=granularity)
        if len(mine["digests"]) != count or len(theirs["digests"]) != count:
            raise SlaveError(primary.name, f"checksums of {volume} [{start}, +{count})"
                             f" came back short", "reply")
        for i, (a, b) in enumerate(zip(mine["digests"], theirs["digests"])):
            if a is None:
                skipped += 1
            elif a != b:
                differ.append(start + i)
    return {"blocks": nblocks, "compared": nblocks - skipped, "skipped": skipped,
            "differ": runs_of(differ)}


def verify(session, primaries: dict, secondaries: dict, hardened: int,
           repair: bool) -> dict:
    """Compare every mirrored pair (see the module doc); with ``repair``
    mark the differing blocks on their primary.  ``primaries`` and
    ``secondaries`` map names to links the caller's thread owns."""
    statuses = {name: lk.status() for name, lk in primaries.items()}
    volumes: dict[str, dict] = {}
    total = 0
    for s, v, r, rv in session.pairs():
        vs = statuses[s]["volumes"][v]
        res = compare_volume(primaries[s], v, secondaries[r], rv, vs["size"],
                             vs["granularity"])
        res["secondary"] = f"{r}/{rv}"
        res["marked"] = 0
        if repair and res["differ"]:
            for i in range(0, len(res["differ"]), MAX_RUNS):
                reply = primaries[s].call("mark", volume=v,
                                          runs=res["differ"][i:i + MAX_RUNS])
                res["marked"] += reply["blocks"]
        total += sum(c for _, c in res["differ"])
        volumes.setdefault(s, {})[v] = res
    return {"ok": True, "session": session.name, "group": hardened,
            "differing_blocks": total, "repaired": repair and total > 0,
            "volumes": volumes}


@dataclass
class _Request:
    repair: bool
    since: float = field(default_factory=time.monotonic)
    failures: int = 0                   # failed group attempts in a row since asked
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: CgmirrorError | None = None


class Requests:
    """Verify requests from the control threads, run by the cycle's thread
    between groups (its links, its moment: see the module doc)."""

    def __init__(self, wake):
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._wake = wake               # wakes a paused cycle
        self.hardened = 0               # the cycle's, for the lines below
        self.last_failure: str | None = None

    def _gave_up(self, req: _Request, why: str) -> NoHardenedGroup:
        waited = time.monotonic() - req.since
        return NoHardenedGroup(
            f"verify gave up after {waited:.0f} s waiting for a group to harden after"
            f" group {self.hardened or 'none'} ({why}); last failure:"
            f" {self.last_failure or 'none (still forming)'}; `cgmirror mirror status`"
            f" shows which pair or node fails")

    def ask(self, repair: bool, wait_s: float, read_s: float = 3600.0) -> dict:
        """Queue a verify and wait for its report (raise what it raised):
        at most ``wait_s`` for it to begin (see the module doc), then at
        most ``read_s`` for its reads."""
        req = _Request(repair)
        with self._lock:
            self._pending.append(req)
        self._wake()
        if not req.done.wait(wait_s):
            with self._lock:
                if req in self._pending:           # not begun: give up
                    self._pending.remove(req)
                    req.error = self._gave_up(req, f"the {wait_s:.0f} s bound passed")
                    req.done.set()
            if not req.done.wait(read_s):
                raise MirrorError(f"verify did not finish reading within {read_s:.0f} s")
        if req.error is not None:
            raise req.error
        return req.result

    def group_ended(self, n: int | None, hardened: int, ok: bool, counts: bool,
                    error: str | None) -> None:
        """The cycle tried group ``n`` (None: none could begin; ``ok``: it
        hardened; ``hardened``: the mirror's hardened group now); a request
        that saw ``GIVE_UP_AFTER`` failures in a row (``counts``) is answered."""
        with self._lock:
            self.hardened = hardened
            if ok:
                for req in self._pending:
                    req.failures = 0
                return
            if error:
                self.last_failure = (f"group {n}: {error}" if n is not None
                                     else f"no group could begin: {error}")
            if not counts:
                return
            keep = []
            for req in self._pending:
                req.failures += 1
                if req.failures >= GIVE_UP_AFTER:
                    req.error = self._gave_up(req, f"{req.failures} attempts in a row"
                                                   f" failed")
                    req.done.set()
                else:
                    keep.append(req)
            self._pending = keep

    def pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def serve(self, run) -> None:
        """Run every pending request with ``run(repair) -> report``."""
        with self._lock:
            todo, self._pending = self._pending, []
        for req in todo:
            try:
                req.result = run(req.repair)
            except CgmirrorError as exc:
                req.error = exc
            req.done.set()

    def refuse(self, error: CgmirrorError) -> None:
        """Answer every pending request with ``error``."""
        with self._lock:
            todo, self._pending = self._pending, []
        for req in todo:
            req.error = error
            req.done.set()
