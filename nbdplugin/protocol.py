"""The slave control protocol, without sockets ("sans-IO").

Framing: one JSON object per line (UTF-8, ``\\n``-terminated, at most
``MAX_LINE`` bytes).  Every request is ``{"op": NAME, ...arguments}``; every
reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": ONE_LINE, "kind":
KIND}``.  A connection carries any number of requests, answered in order.

Rules:
- Each op has a fixed set of required and optional keys with fixed types.
  Unknown ops, unknown keys, missing keys and wrong types are refused before
  anything happens: a bad message changes nothing and the slave keeps serving.
- The cut state machine below is the single authority on which op may follow
  which.  ``CutMachine.step`` either returns the new state or raises
  ``ProtocolError`` and leaves the machine untouched.

Theory of operation (see DESIGN.md, "The cycle"):

    IDLE --freeze(n)--> FROZEN(n) --thaw(n)--> CUT(n) --copy(n)--> COPYING(n)
      ^                   |                      |                    |
      +------abort(n)-----+------abort(n)--------+----copy_done(n)----+
      +------expire(n)----+                      +----copy_failed(n)--+

FROZEN(n): the gates of the cut's volumes are closed; the cut is taken
(change recording moved into out-of-sync, preservation on).  A lease bounds
it: if neither thaw nor abort arrives in time the slave expires the cut
itself, thaws, and any later thaw(n) is refused.  CUT(n): the point-in-time
image n is established and host writes flow; COPYING(n): it is being copied.
Cut numbers only grow: a freeze must name a number larger than any cut the
slave has seen, so a stale or second coordinator cannot reuse one.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

MAX_LINE = 1 << 20


class ProtocolError(Exception):
    """A message that is malformed, unknown or out of order (the peer's fault)."""

    def __init__(self, message: str, kind: str = "protocol"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- messages

_INT = (int,)
_STR = (str,)
_LIST = (list,)
_DICT = (dict,)
_BOOL = (bool,)

# op -> (required {key: types}, optional {key: types})
SCHEMA: dict[str, tuple[dict, dict]] = {
    "status": ({}, {}),
    "freeze": ({"n": _INT, "lease_ms": _INT}, {"volumes": _LIST, "full": _LIST}),
    "thaw": ({"n": _INT}, {}),
    "abort": ({"n": _INT}, {}),
    "copy": ({"n": _INT, "targets": _DICT}, {"mode": _STR, "inflight": _INT,
                                              "timeout_ms": _INT}),
    "verify": ({"targets": _DICT}, {"timeout_ms": _INT}),
    "clear": ({}, {"volumes": _LIST}),
    "dirty": ({"volume": _STR}, {"start": _INT, "max_runs": _INT}),
    "checkpoint": ({}, {}),
}

COPY_MODES = ("auto", "full", "incremental")


def decode(line: bytes | str) -> dict:
    """Parse and validate one request line; raise ProtocolError if it is bad."""
    if isinstance(line, bytes):
        if len(line) > MAX_LINE:
            raise ProtocolError(f"message longer than {MAX_LINE} bytes")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8") from None
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("message has no 'op' string")
    if op not in SCHEMA:
        raise ProtocolError(f"unknown op {op!r} (known: {', '.join(SCHEMA)})")
    required, optional = SCHEMA[op]
    for key in msg:
        if key != "op" and key not in required and key not in optional:
            raise ProtocolError(f"unknown key {key!r} for op {op!r}")
    for key in required:
        if key not in msg:
            raise ProtocolError(f"op {op!r} needs key {key!r}")
    for key, value in msg.items():
        types = required.get(key) or optional.get(key)
        # bool is an int in Python; never accept it where a number is meant.
        if types and (not isinstance(value, types)
                      or (isinstance(value, bool) and types is not _BOOL)):
            want = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"key {key!r} of op {op!r} must be {want}")
    if msg.get("start", 0) < 0 or not 1 <= msg.get("max_runs", 1) <= 100_000:
        raise ProtocolError("'start' must be >= 0 and 'max_runs' between 1 and 100000")
    if "n" in msg and msg["n"] < 1:
        raise ProtocolError("cut number 'n' must be at least 1")
    if "lease_ms" in msg and not 1 <= msg["lease_ms"] <= 3_600_000:
        raise ProtocolError("'lease_ms' must be between 1 and 3600000")
    for key in ("volumes", "full"):
        if key in msg and not all(isinstance(v, str) for v in msg[key]):
            raise ProtocolError(f"{key!r} must be a list of volume names")
    if op == "copy":
        if msg.get("mode", "auto") not in COPY_MODES:
            raise ProtocolError(f"'mode' must be one of {', '.join(COPY_MODES)}")
        if not all(isinstance(v, str) for v in msg["targets"].values()):
            raise ProtocolError("'targets' must map volume names to NBD URIs")
        if not 1 <= msg.get("inflight", 8) <= 64:
            raise ProtocolError("'inflight' must be between 1 and 64")
    return msg


def encode(obj: dict) -> bytes:
    """Frame one message."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def ok(**fields) -> dict:
    return {"ok": True, **fields}


def error(message: str, kind: str = "protocol") -> dict:
    return {"ok": False, "error": " ".join(str(message).split()), "kind": kind}


# ---------------------------------------------------------------- cut state

class Phase(enum.Enum):
    IDLE = "idle"
    FROZEN = "frozen"
    CUT = "cut"
    COPYING = "copying"


class Event(enum.Enum):
    FREEZE = "freeze"
    THAW = "thaw"
    ABORT = "abort"
    EXPIRE = "expire"
    COPY = "copy"
    COPY_DONE = "copy_done"
    COPY_FAILED = "copy_failed"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.IDLE, Event.FREEZE): Phase.FROZEN,
    (Phase.FROZEN, Event.THAW): Phase.CUT,
    (Phase.FROZEN, Event.ABORT): Phase.IDLE,
    (Phase.FROZEN, Event.EXPIRE): Phase.IDLE,
    (Phase.CUT, Event.ABORT): Phase.IDLE,
    (Phase.CUT, Event.COPY): Phase.COPYING,
    (Phase.COPYING, Event.ABORT): Phase.IDLE,
    (Phase.COPYING, Event.COPY_DONE): Phase.IDLE,
    (Phase.COPYING, Event.COPY_FAILED): Phase.IDLE,
}


@dataclass
class CutMachine:
    """Which cut a slave is in and what may happen next.

    ``n`` is the current (or last) cut number; ``ended`` says how the last cut
    ended ("done", "aborted", "expired", "failed") once it is back to IDLE.
    """

    phase: Phase = Phase.IDLE
    n: int = 0
    ended: str | None = None

    def check(self, event: Event, n: int) -> Phase:
        """Return the phase ``event`` for cut ``n`` leads to, or raise."""
        if event is Event.FREEZE:
            if self.phase is not Phase.IDLE:
                raise ProtocolError(
                    f"cannot freeze cut {n}: cut {self.n} is {self.phase.value};"
                    f" abort it or wait for its copy", "busy")
            if n <= self.n:
                raise ProtocolError(
                    f"cut number {n} is not above the last cut {self.n}", "stale")
            return TRANSITIONS[(self.phase, event)]
        if n != self.n or self.phase is Phase.IDLE:
            if n == self.n and self.ended:
                raise ProtocolError(f"cut {n} already ended ({self.ended})", "ended")
            current = f"cut {self.n} is {self.phase.value}" if self.n else "no cut yet"
            raise ProtocolError(f"{event.value} {n} does not match: {current}", "order")
        try:
            return TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise ProtocolError(
                f"{event.value} is not allowed while cut {n} is {self.phase.value}",
                "order") from None

    def step(self, event: Event, n: int, ended: str | None = None) -> Phase:
        """Apply ``event``; on error raise and change nothing."""
        phase = self.check(event, n)
        self.phase, self.n = phase, n
        self.ended = ended if phase is Phase.IDLE else None
        return phase
