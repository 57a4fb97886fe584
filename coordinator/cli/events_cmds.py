"""``cgmirror events [--once]``: the running mirror's events, one JSON
object a line (see coordinator/mirror/events.py for the kinds), until
Ctrl-C or the mirror goes away (then exit UNREACHABLE: a script that
follows the stream learns it ended).

Cluster mode (``[cluster]``): the events every coordinator of the session
stored in etcd (``P/events/``, kept about ten minutes: a takeover on
another host shows here), oldest first, then new ones as they come (etcd
read every 0.5 s), until Ctrl-C; each carries the ``host`` and ``pid`` of
the coordinator that emitted it.  ``--once``: the stored ones, then exit.
"""

from __future__ import annotations

import json
import time

from .. import cluster
from ..errors import ExitCode, UsageError
from ..mirror import client

FOLLOW_EVERY_S = 0.5


def register(sub) -> None:
    """``cgmirror events``."""
    e = sub.add_parser("events", help="stream the running mirror's events (JSON lines)")
    e.add_argument("--once", action="store_true",
                   help="cluster mode: the events stored in etcd, then exit")
    e.set_defaults(func=lambda ctx, args: stream(ctx, args.once))


def stream(ctx, once: bool = False) -> ExitCode:
    if getattr(ctx.session, "cluster", None) is not None:
        return _from_etcd(ctx, once)
    if once:
        raise UsageError("events --once reads the events stored in etcd: the session"
                         " has no [cluster] (without it, `cgmirror events` follows the"
                         " running mirror)")
    for doc in client.subscribe(client.control_path(ctx.session)):
        _print(ctx, doc)
    return ExitCode.OK          # not reached: subscribe raises when the mirror leaves


def _from_etcd(ctx, once: bool) -> ExitCode:
    with cluster.client(ctx.session) as etcd:
        after = ""
        while True:
            for key, doc in cluster.events(etcd, ctx.session.name, after):
                _print(ctx, doc)
                after = key
            if once:
                return ExitCode.OK
            time.sleep(FOLLOW_EVERY_S)      # polling, as the module doc says


def _print(ctx, doc: dict) -> None:
    print(json.dumps(doc, separators=(",", ":")), file=ctx.out, flush=True)
