"""Fan-out to every slave of a group: one call per slave at once, aborts,
and the small helpers the other modules share."""

from __future__ import annotations

import threading
import time
from typing import Callable

from wire.protocol import Kind

from ..errors import SlaveError, SlaveUnreachable
from ..link import Channel, SlaveLink


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def parallel(links: list[SlaveLink], fn: Callable[[SlaveLink], object],
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


def check_links(links: list[SlaveLink]) -> None:
    names = [lk.name for lk in links]
    if not links or len(set(names)) != len(names):
        raise ValueError(f"links must name each slave once: {names}")



# Refusals of an abort that mean the slave is not (or no longer) in that cut.
NOT_IN_CUT = (Kind.ENDED, Kind.ORDER)


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
        if exc.kind in NOT_IN_CUT:
            return "not in cut"
        raise


def abort_all(links: list[SlaveLink], n: int) -> dict[str, str]:
    """ABORT(n) to every slave at once; {name: outcome} (see ``abort_one``)."""
    res = parallel(links, lambda lk: abort_one(lk, n),
                   timeout=max(lk.timeout for lk in links) + 1)
    return {k: (f"failed: {v}" if isinstance(v, Exception) else v) for k, v in res.items()}



def status_retry(link: SlaveLink) -> dict:
    """status, trying once more on a fresh connection before calling it dead."""
    try:
        return link.status()
    except SlaveUnreachable:
        time.sleep(0.05)
        return link.status()
