"""``cgmirror events`` and ``cgmirror mirror status --watch``.

``events`` prints the running mirror's events, one JSON object a line (see
coordinator/events.py for the kinds), until Ctrl-C or the mirror goes away
(then exit UNREACHABLE: a script that follows the stream learns it ended).
``--watch`` redraws ``mirror status`` every second until Ctrl-C.
"""

from __future__ import annotations

import json
import time

from ..errors import ExitCode
from ..mirror import events

CLEAR = "\x1b[H\x1b[2J"         # cursor home, clear screen (what watch(1) does)


def register(sub) -> None:
    """``cgmirror events``."""
    e = sub.add_parser("events", help="stream the running mirror's events (JSON lines)")
    e.set_defaults(func=lambda ctx, args: stream(ctx))


def stream(ctx) -> ExitCode:
    from .mirror_cmds import _control_path
    for doc in events.subscribe(_control_path(ctx)):
        print(json.dumps(doc, separators=(",", ":")), file=ctx.out, flush=True)
    return ExitCode.OK          # not reached: subscribe raises when the mirror leaves


def watch(ctx, draw, interval: float = 1.0, rounds: int | None = None) -> ExitCode:
    """Call ``draw()`` every ``interval`` seconds, clearing the screen first,
    until Ctrl-C (exit OK: stopping a watch is not an error)."""
    n = 0
    try:
        while rounds is None or n < rounds:
            print(CLEAR, end="", file=ctx.out)
            print(time.strftime("%Y-%m-%d %H:%M:%S"), file=ctx.out)
            draw()
            ctx.out.flush()
            n += 1
            if rounds is None or n < rounds:
                time.sleep(interval)    # the redraw period itself, not a wait for a state
    except KeyboardInterrupt:
        pass
    return ExitCode.OK
