"""Copy an established cut (DESIGN.md "Consistent copy").

COPY(n, targets) to each slave, then ``status`` every ~150 ms until every slave is idle with ``last_copy.n == n``.
A slave that stops answering fails the copy: the others are told ABORT(n), so
what they did not confirm goes back into change recording, and
``CopyFailed`` names the dead slave."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import CgmirrorError, CopyFailed, SlaveUnreachable
from ..link import SlaveLink
from .fanout import abort_all, check_links, status_retry

POLL_S = 0.15


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
         poll_s: float = POLL_S, rate: int | None = None) -> CopyReport:
    """Copy established PiT ``n`` of every slave to its targets; wait for the end.

    ``targets``: {slave: {volume: NBD URI}}, one entry per link, naming every
    volume of the cut.  ``mode``: "auto" copies each volume the way its cut
    was taken (``establish(full=...)``: whole, else its changes); "full" or
    "incremental" insist, and a slave refuses a volume cut the other way.  ``timeout_ms``: a target silent this long
    fails its copy.  ``progress_cb(progress)`` is called after every poll
    with ``{"n", "done_bytes", "total_bytes", "slaves": {slave: {volume:
    {"done_bytes", "total_bytes", "state"}}}}``.  ``rate``: each volume's
    copy limited to that many bytes per second (the slave's ``rate`` op
    changes it while it runs).

    Returns a ``CopyReport`` when every volume is done.  Raises ``CopyFailed``
    (with ``.report``) when any volume failed: fault "target" if only
    targets failed, "unreachable" if a slave stopped answering (the others
    are aborted first), "slave" otherwise.  On any exception (also
    KeyboardInterrupt) in the middle, every slave is told ABORT(n) first.
    """
    check_links(links)
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
            if rate:
                args["rate"] = rate
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
                st = status_retry(lk)
            except SlaveUnreachable as exc:
                finals[lk.name] = (None, f"unreachable: {exc}")
                others = [o for o in links if o.name not in finals]
                if others:
                    abort_all(others, n)
                    for o in others:
                        try:
                            r = status_retry(o)
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
