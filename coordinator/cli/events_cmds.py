"""``cgmirror events``: the running mirror's events, one JSON object a line
(see coordinator/mirror/events.py for the kinds), until Ctrl-C or the
mirror goes away (then exit UNREACHABLE: a script that follows the stream
learns it ended).
"""

from __future__ import annotations

import json

from ..errors import ExitCode
from ..mirror import client


def register(sub) -> None:
    """``cgmirror events``."""
    e = sub.add_parser("events", help="stream the running mirror's events (JSON lines)")
    e.set_defaults(func=lambda ctx, args: stream(ctx))


def stream(ctx) -> ExitCode:
    for doc in client.subscribe(client.control_path(ctx.session)):
        print(json.dumps(doc, separators=(",", ":")), file=ctx.out, flush=True)
    return ExitCode.OK          # not reached: subscribe raises when the mirror leaves
