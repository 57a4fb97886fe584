"""Fan-out to every slave of a group: one call per slave at once, aborts,
and the small helpers the other modules share (``parallel`` and
``check_links`` live in coordinator/link.py, below every layer: the
direction record's fan-out uses them too)."""

from __future__ import annotations

import time

from wire.protocol import Kind

from ..errors import SlaveError, SlaveUnreachable
from ..link import Channel, SlaveLink, check_links, parallel  # noqa: F401 (theirs: link.py)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


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
