"""The slave control protocol, without sockets ("sans-IO").

This is the one codec of the control channel: the slave's server, the
coordinator's ``ControlClient`` and the pipelined establish wire all frame,
check and build messages here.  One exception, by design: a primary's gate
socket parses its three ops (freeze, thaw, abort) in C (native/gate.c), so
that a cut is established with no Python thread involved -- no GIL to win
from the writers it holds.  Measured on 2 shared cores, gates were held p50
1.4-2.6 ms per establish through Python and 0.24 ms through the C gate.
Its limits are generated from this module's constants (native/build.py
writes native/_limits.h; ``make ext`` reruns when this file changes), and
tests/test_gate_socket.py sends the same lines to both parsers and compares
their verdicts, so the two cannot drift apart unnoticed.

Framing: one JSON object per line (UTF-8, ``\\n``-terminated, at most
``MAX_LINE`` bytes; ``Framer`` cuts a byte stream into lines for a blocking
reader and a select loop alike).  Every request is ``{"op": NAME,
...arguments}``; every reply is ``{"ok": true, ...}`` or ``{"ok": false,
"error": ONE_LINE, "kind": KIND}`` with KIND a ``Kind``.  A connection
carries any number of requests, answered in order.

Rules:
- Each op has a schema (``SCHEMA``): fixed required and optional keys, and
  for each a type and a range.  Unknown ops, unknown keys, missing keys,
  wrong types and out-of-range values are refused before anything happens:
  a bad message changes nothing and the slave keeps serving.  Every number
  is bounded (cut numbers 1 .. 2^53-1, exact in any JSON peer and in
  SQLite), every list and string has a maximum length, and volume names
  follow the plugin's rule.
- Each op's successful reply has a schema too (``REPLY_SCHEMA``), checked by
  the client: a reply out of schema is the slave's fault (kind REPLY), so
  the coordinator never computes with a value it did not check.  Replies may
  carry fields a client does not know (a newer slave); requests may not.
- Error kinds come from one enum, ``Kind``; nobody compares free strings.
- A slave is a primary or a secondary (``ROLE_OPS``): an op of the other
  role is refused with kind ROLE.  ``status`` is both roles' op; its reply
  is checked by the schema its ``role`` field names.
- Every request may carry a top-level ``"session": NAME`` (``SESSION_KEY``):
  a node that belongs to a session refuses, with kind SESSION, a request
  that names another one, before anything happens (the coordinator always
  sends it; tools may leave it out).  ``decode`` checks its form; the node
  compares it (nbdplugin/server.py, and native/gate.c on the gate socket).
- Every request may carry a top-level ``"epoch": N`` (``EPOCH_KEY``, an int
  1 .. MAX_N): the epoch of the leading coordinator that sends it (cluster
  mode: its etcd election revision).  A node records the highest epoch it
  has seen durably before it acts on a request that carries a higher one,
  and refuses, with kind FENCED, a request that changes data, state, role or
  the record (``FENCED_OPS``) and carries a lower one: a deposed leader can
  neither freeze, drain nor commit (a fencing token).  Thaw, abort, status
  and the other reads are served whatever the epoch (a stale thaw or abort
  only releases); a request without an epoch is served as before (tools and
  coordinators without a cluster).  ``status`` reports the recorded epoch.
- A role change is an op the node serves itself (``role``): it records the
  new role durably, answers, and its process exits with ``RESTART_STATUS``
  so that its service manager starts it again in the recorded role.
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

Rejected: a schema library (jsonschema, pydantic).  This module is imported
inside nbdkit's embedded interpreter, where every dependency must be a
Debian package, and their error texts are neither one line nor in the
words of the protocol.  The schema nodes below are a hundred lines.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

MAX_LINE = 1 << 20

# Every number on the wire stays within what JSON peers (a double holds
# integers exactly up to 2^53) and SQLite (signed 64 bit) both keep exactly:
# a cut number n = 2^63+5 once saved made every later copy crash.
MAX_N = (1 << 53) - 1
# A frozen slave holds its host's writes until thaw, abort or the lease runs
# out; if the coordinator dies mid-freeze the lease is the only way out.
# Host I/O stalled for longer than a minute looks like a dead disk to the
# guest (Linux's SCSI command timeout is 30 s, most guests give up well
# before two minutes), so no operator would accept more.  A healthy
# establish needs milliseconds.
MAX_LEASE_MS = 60_000
# A copy target silent this long fails its copy: from a tenth of a second
# (tests, local targets) to an hour (a slow remote link).
MIN_COPY_TIMEOUT_MS, MAX_COPY_TIMEOUT_MS = 100, 3_600_000
MAX_INFLIGHT = 64
MAX_RATE = 1 << 40             # bytes per second a copy may be limited to (0: no limit)
MAX_CHECKSUMS = 1024           # blocks per checksums request (online verify)
# A page of dirty runs must fit one line: 20,000 pairs of at most
# 2 x 16 digits are 740 kB, under MAX_LINE (100,000 could reach 3.7 MB, and
# the client refused the page).
MAX_RUNS = 20_000
# Volumes per slave, and characters of an NBD URI or path, and of an error
# text (a copy error quotes a URI and libnbd's message: room for both).
MAX_VOLUMES = 1024
# Volumes of one slave process: its gate core (native/gate.c) keeps a cut's
# volumes as a 64-bit mask.  A secondary is held to it too: a failover
# restarts it as a primary.
MAX_SLAVE_VOLUMES = 64
MAX_URI = 4096
MAX_TEXT = 16384
# The plugin's rule for a volume (export) name.  One character class and a
# length: native/build.py derives the gate's copy of the rule from these.
MAX_NAME = 64
VOLUME_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME}}}")
# Longest line the gate socket (native/gate.c) takes: room for the longest
# freeze of a full slave -- MAX_SLAVE_VOLUMES names of MAX_NAME characters
# in both 'volumes' and 'full', about 8.7 kB as json.dumps writes it, spaces
# and all.  Its replies fit too (tests/test_protocol.py checks both).
GATE_MAX_LINE = 16384
# The exit status of a node that recorded a new role and must be started
# again in it (EX_TEMPFAIL, sysexits.h): the units' RestartForceExitStatus=
# and the foreground supervisor treat it as "start me again", nothing else.
RESTART_STATUS = 75
# The optional top-level key of every request that names the session the
# sender works for (see the rules above).
SESSION_KEY = "session"
# The optional top-level key of every request that carries the sending
# leader's epoch (see the rules above).
EPOCH_KEY = "epoch"
# A lineage generation (wire/lineage.py): 64 random bits as 16 hex digits.
GEN_LEN = 16
GENERATION = re.compile(rf"[0-9a-f]{{{GEN_LEN}}}")
# Lineage history entries a node keeps per volume, newest first.
MAX_HISTORY = 8
# The direction record a node keeps for the coordinator (the ``record`` op),
# as json.dumps writes it: opaque to the node, bounded.
MAX_RECORD = 65536


class Kind(enum.StrEnum):
    """Why a request failed: the ``kind`` of every error reply, and of the
    client's own errors.  A str enum, so it goes on the wire as its value."""

    PROTOCOL = "protocol"        # malformed, unknown op or key, out of bounds
    UNKNOWN = "unknown"          # names a volume the slave does not serve
    BUSY = "busy"                # in another cut, or too many connections
    STALE = "stale"              # a cut number not above the last one
    ORDER = "order"              # op not allowed in this phase / for this cut
    ENDED = "ended"              # the cut already ended (aborted, expired, ...)
    TIMEOUT = "timeout"          # writes did not drain within the lease
    BROKEN = "broken"            # the cut's PiT store failed
    MODE = "mode"                # copy mode does not match how the cut was taken
    BASELINE = "baseline"        # incremental copy without a baseline on the target
    LOCAL = "local"              # the slave itself failed
    GONE = "gone"                # the connection that asked has hung up
    DENIED = "denied"            # the peer may not use this control channel
    ROLE = "role"                # an op of the other role (primary vs secondary)
    SESSION = "session"          # the request names another session than the node's
    FENCED = "fenced"            # the request carries an epoch below the node's (deposed leader)
    # Only raised on the client side:
    UNREACHABLE = "unreachable"  # the control socket does not answer
    REPLY = "reply"              # the slave's reply does not match its schema


class ProtocolError(Exception):
    """A message that is malformed, unknown or out of order (the peer's fault)."""

    def __init__(self, message: str, kind: Kind | str = Kind.PROTOCOL):
        super().__init__(message)
        self.kind = Kind(kind)


# ---------------------------------------------------------------- framing

class Framer:
    """Incremental line framing: ``feed(bytes)`` returns the complete lines
    received so far (without ``\\n``; blank lines dropped), keeping a partial
    line for the next call.  A line longer than ``MAX_LINE`` raises
    ``ProtocolError``; the stream is then out of step and must be closed.
    Used alike by a blocking reader and by the select loop of an establish.
    """

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self.limit or any(len(x) > self.limit for x in lines):
            self._buf.clear()
            raise ProtocolError(f"message longer than {self.limit} bytes")
        self._buf = bytearray(rest)
        return [bytes(x) for x in lines if x.strip()]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def parse(line: bytes | str) -> dict:
    """One line of JSON to an object; raise ProtocolError if it is not one."""
    if isinstance(line, (bytes, bytearray)):
        if len(line) > MAX_LINE:
            raise ProtocolError(f"message longer than {MAX_LINE} bytes")
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8") from None
    try:
        # NaN and Infinity are not JSON; Python would accept them.
        msg = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    return msg


def encode(obj: dict) -> bytes:
    """Frame one message."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# ---------------------------------------------------------------- schemas
#
# A schema node checks one value and says in one line what is wrong with it;
# ``where`` is the value's path in the message ("targets[a]", "runs[3][0]").
# Requests are checked by the slave, replies by the client, with the same
# nodes: every number has a range, every list and string a length.

class _Node:
    def check(self, value, where: str):
        raise NotImplementedError


def _at(where: str) -> str:
    return f"'{where}'" if where else "the message"


def _check_entries(node: "List | Map", value, where: str, kind: type) -> None:
    """What List and Map check first: the JSON type, then how many entries."""
    if not isinstance(value, kind):
        raise ProtocolError(f"{_at(where)} must be {node.what}")
    if not node.min_len <= len(value) <= node.max_len:
        raise ProtocolError(f"{_at(where)} must have {node.min_len} to {node.max_len}"
                            f" entries")


@dataclass(frozen=True)
class Int(_Node):
    lo: int = 0
    hi: int = MAX_N

    def check(self, value, where):
        # bool is an int in Python; never accept it where a number is meant.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{_at(where)} must be int")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{_at(where)} must be between {self.lo} and {self.hi}")
        return value


@dataclass(frozen=True)
class Num(_Node):
    lo: float = 0.0
    hi: float = float(MAX_N)

    def check(self, value, where):
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise ProtocolError(f"{_at(where)} must be a number")
        if not self.lo <= value <= self.hi:
            raise ProtocolError(f"{_at(where)} must be between {self.lo:g} and {self.hi:g}")
        return value


@dataclass(frozen=True)
class Bool(_Node):
    def check(self, value, where):
        if not isinstance(value, bool):
            raise ProtocolError(f"{_at(where)} must be true or false")
        return value


@dataclass(frozen=True)
class Str(_Node):
    max_len: int = MAX_TEXT
    pattern: re.Pattern | None = None
    choices: tuple[str, ...] | None = None
    what: str = "str"

    def check(self, value, where):
        if not isinstance(value, str):
            raise ProtocolError(f"{_at(where)} must be {self.what}")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(f"{_at(where)} must be one of {', '.join(self.choices)}")
        if len(value) > self.max_len:
            raise ProtocolError(f"{_at(where)} is longer than {self.max_len} characters")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise ProtocolError(f"{_at(where)} must be {self.what}")
        return value


@dataclass(frozen=True)
class Opt(_Node):
    """The inner node, or null."""

    inner: _Node

    def check(self, value, where):
        return None if value is None else self.inner.check(value, where)


@dataclass(frozen=True)
class List(_Node):
    item: _Node
    min_len: int = 0
    max_len: int = MAX_VOLUMES
    what: str = "a list"

    def check(self, value, where):
        _check_entries(self, value, where, list)
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")
        return value


@dataclass(frozen=True)
class Map(_Node):
    """An object with keys checked by ``key`` and values by ``value``."""

    key: Str
    value: _Node
    min_len: int = 0
    max_len: int = MAX_VOLUMES
    what: str = "an object"

    def check(self, value, where):
        _check_entries(self, value, where, dict)
        for k, v in value.items():
            try:
                self.key.check(k, "")
            except ProtocolError:
                raise ProtocolError(f"{_at(where)} has key {k[:80]!r}, which is not"
                                    f" {self.key.what}") from None
            self.value.check(v, f"{where}[{k[:80]}]")
        return value


@dataclass(frozen=True)
class Obj(_Node):
    """An object with fixed keys.  ``extra``: tolerate unknown keys (replies
    may grow fields a client does not know yet; requests may not)."""

    required: dict
    optional: dict
    extra: bool = False

    def check(self, value, where):
        if not isinstance(value, dict):
            raise ProtocolError(f"{_at(where)} must be an object")
        for key in self.required:
            if key not in value:
                raise ProtocolError(f"missing key {_join(where, key)!r}")
        for key, v in value.items():
            node = self.required.get(key) or self.optional.get(key)
            if node is None:
                if not self.extra:
                    raise ProtocolError(f"unknown key {_join(where, key[:80])!r}")
                continue
            node.check(v, _join(where, key))
        return value


@dataclass(frozen=True)
class Switch(_Node):
    """An object checked by the schema its ``key`` names (a status reply by
    its ``role``); without the key, by ``default``'s schema."""

    key: str
    cases: dict
    default: str

    def check(self, value, where):
        if not isinstance(value, dict):
            raise ProtocolError(f"{_at(where)} must be an object")
        case = value.get(self.key, self.default)
        node = self.cases.get(case) if isinstance(case, str) else None
        if node is None:
            raise ProtocolError(f"{_at(_join(where, self.key))} must be one of"
                                f" {', '.join(self.cases)}")
        return node.check(value, where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


NAME = Str(MAX_NAME, VOLUME_NAME, what="a volume name (letters, digits, '_', '-', '.')")
NAMES = List(NAME, 1, MAX_VOLUMES, what="a list of volume names")
CUT = Int(1, MAX_N)
COPY_MODES = ("auto", "full", "incremental")
# Runs of blocks, [start, count], as the dirty op pages them.
RUN = List(Int(0, MAX_N), 2, 2, what="a [start, blocks] pair")
RUNS = List(RUN, 0, MAX_RUNS)
# A session's or a node's name: the rule of a volume name.
SESSION_NAME = Str(MAX_NAME, VOLUME_NAME,
                   what="a session name (letters, digits, '_', '-', '.')")
NODE_NAME = Str(MAX_NAME, VOLUME_NAME, what="a node name (letters, digits, '_', '-', '.')")
# A leader's epoch (EPOCH_KEY): etcd revisions start at 1.
EPOCH = Int(1, MAX_N)
GEN = Str(GEN_LEN, GENERATION, what="a generation (16 hex digits)")
GENS = Map(NAME, GEN, 1, MAX_VOLUMES,
           what="an object that maps volume names to generations")


@dataclass(frozen=True)
class Record(_Node):
    """The direction record (``record`` op): any JSON object with an integer
    ``seq``, at most ``MAX_RECORD`` bytes.  Its other keys are the
    coordinator's (coordinator/direction.py); the node only keeps it."""

    def check(self, value, where):
        if not isinstance(value, dict):
            raise ProtocolError(f"{_at(where)} must be an object")
        if "seq" not in value:
            raise ProtocolError(f"missing key {_join(where, 'seq')!r}")
        Int(0, MAX_N).check(value["seq"], _join(where, "seq"))
        if len(json.dumps(value, separators=(",", ":"))) > MAX_RECORD:
            raise ProtocolError(f"{_at(where)} is longer than {MAX_RECORD} bytes")
        return value


RECORD = Record()

# op -> schema of its arguments
SCHEMA: dict[str, Obj] = {
    "status": Obj({}, {}),
    "freeze": Obj({"n": CUT, "lease_ms": Int(1, MAX_LEASE_MS)},
                  {"volumes": NAMES, "full": List(NAME, 0, MAX_VOLUMES,
                                                  what="a list of volume names")}),
    "thaw": Obj({"n": CUT}, {}),
    "abort": Obj({"n": CUT}, {}),
    "copy": Obj({"n": CUT,
                 "targets": Map(NAME, Str(MAX_URI, what="an NBD URI"), 1, MAX_VOLUMES,
                                what="an object that maps volume names to NBD URIs")},
                {"mode": Str(16, choices=COPY_MODES),
                 "inflight": Int(1, MAX_INFLIGHT),
                 "timeout_ms": Int(MIN_COPY_TIMEOUT_MS, MAX_COPY_TIMEOUT_MS),
                 "rate": Int(0, MAX_RATE)}),
    # primary: the running copies' rate limit, bytes per second (0: none)
    "rate": Obj({"rate": Int(0, MAX_RATE)}, {}),
    # both roles: digests of blocks as this node holds them (online verify,
    # coordinator/mirror/verify.py); a secondary reads its hardened group in blocks
    # of ``block`` bytes (the primary's granularity), a primary its own
    "checksums": Obj({"volume": NAME, "start": Int(0, MAX_N),
                      "count": Int(1, MAX_CHECKSUMS)}, {"block": Int(512, 1 << 30)}),
    "verify": Obj({"targets": Map(NAME, Str(MAX_URI, what="an NBD URI"), 1, MAX_VOLUMES,
                                  what="an object that maps volume names to NBD URIs")},
                  {"timeout_ms": Int(MIN_COPY_TIMEOUT_MS, MAX_COPY_TIMEOUT_MS)}),
    "clear": Obj({}, {"volumes": NAMES}),
    "dirty": Obj({"volume": NAME}, {"start": Int(0, MAX_N), "max_runs": Int(1, MAX_RUNS)}),
    "checkpoint": Obj({}, {}),
    # primary: set blocks in cr (resend what a secondary rolled back)
    "mark": Obj({"volume": NAME, "runs": RUNS}, {}),
    # secondary (DESIGN.md, "The secondary"; the group numbers are cut numbers)
    "prepare": Obj({"n": CUT}, {}),
    # gens: the generation each volume's image now belongs to (the
    # primary's current one; wire/lineage.py, events 4 and 5)
    "commit": Obj({"n": CUT}, {"gens": GENS}),
    "rollback": Obj({}, {}),
    "tgt": Obj({"volume": NAME}, {"start": Int(0, MAX_N), "max_runs": Int(1, MAX_RUNS)}),
    "clear_tgt": Obj({"volume": NAME, "runs": RUNS}, {}),
    # role switch (coordinator/roles/failover.py): primary -- refuse host writes,
    # take a target as a baseline without a copy; secondary -- take the
    # whole image as hardened group n (a demoted primary)
    "fence": Obj({"on": Bool()}, {"timeout_ms": Int(1, MAX_LEASE_MS)}),
    "adopt": Obj({"volume": NAME, "target": Str(MAX_URI, what="an NBD URI")},
                 {"forget": Bool()}),
    "assume": Obj({"n": CUT}, {"gens": GENS}),
    # secondary: keep hardened group n through a DR test (nbdplugin/secondary.py)
    "dr_test": Obj({"n": CUT}, {}),
    # both roles: become ``to``; the node records it, answers, and exits with
    # RESTART_STATUS to be started again in it (nbdplugin/noderecord.py)
    "role": Obj({"to": Str(16, choices=("primary", "secondary"))}, {}),
    # both roles: keep the coordinator's direction record if its seq is higher
    "record": Obj({"record": RECORD}, {}),
}

# Which ops each role serves; any other op is refused with kind ROLE.
ROLE_OPS: dict[str, frozenset[str]] = {
    "primary": frozenset({"status", "freeze", "thaw", "abort", "copy", "rate", "verify",
                          "checksums", "clear",
                          "dirty", "checkpoint", "mark", "fence", "adopt",
                          "role", "record"}),
    "secondary": frozenset({"status", "prepare", "commit", "rollback", "tgt",
                            "clear_tgt", "assume", "checksums", "dr_test",
                            "role", "record"}),
}


assert set(SCHEMA) == set().union(*ROLE_OPS.values()), "every op belongs to a role"

# The ops a node refuses, kind FENCED, when they carry an epoch below the
# one it has recorded: everything that changes data, cut state, role or the
# node record.  Not thaw and abort (a stale one only releases what its own
# freeze took: the gate must open whoever asks), nor the reads (status,
# dirty, tgt, checksums, verify).
FENCED_OPS = frozenset({"freeze", "copy", "rate", "clear", "checkpoint", "mark", "fence",
                        "adopt", "prepare", "commit", "rollback", "clear_tgt", "assume",
                        "dr_test", "role", "record"})
assert FENCED_OPS <= set(SCHEMA)


def fenced_message(who: str, seen: int, carried: int, session: str | None) -> str:
    """The one line of a FENCED refusal (``who``: "node s1"; the C gate
    writes the same words)."""
    return (f"{who} has seen leader epoch {seen}; this request carries epoch {carried}:"
            f" its coordinator was deposed (another leads session"
            f" {session or '(none)'})")


def decode(line: bytes | str) -> dict:
    """Parse and validate one request line; raise ProtocolError if it is bad."""
    msg = parse(line)
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("message has no 'op' string")
    if op not in SCHEMA:
        raise ProtocolError(f"unknown op {op[:80]!r} (known: {', '.join(SCHEMA)})")
    args = dict(msg)
    del args["op"]
    try:
        if SESSION_KEY in args:
            SESSION_NAME.check(args.pop(SESSION_KEY), SESSION_KEY)
        if EPOCH_KEY in args:
            EPOCH.check(args.pop(EPOCH_KEY), EPOCH_KEY)
        SCHEMA[op].check(args, "")
    except ProtocolError as exc:
        raise ProtocolError(f"op {op!r}: {exc}") from None
    return msg


# ---------------------------------------------------------------- replies

_COUNT = Int(0, MAX_N)
_MS = Num(0.0, float(MAX_N))


@dataclass(frozen=True)
class _GenAt(_Node):
    """A lineage history entry: [generation, hardened group it was left at]."""

    def check(self, value, where):
        if not isinstance(value, list) or len(value) != 2:
            raise ProtocolError(f"{_at(where)} must be a [generation, group] pair")
        GEN.check(value[0], f"{where}[0]")
        _COUNT.check(value[1], f"{where}[1]")
        return value


# A volume's lineage as a node records and reports it (wire/lineage.py has
# the events and the compare).
LINEAGE = Obj({"current": GEN, "history": List(_GenAt(), 0, MAX_HISTORY),
               "hardened": _COUNT, "cut": _COUNT, "own": Bool()}, {}, extra=True)
# What both roles' status adds per volume, and at the top (issue 18): optional,
# so that a node of the last version still answers in schema.
_NODE_VOLUME = {"lineage": LINEAGE, "dirty": Bool(), "replaced": Opt(Str())}
_NODE_STATUS = {"session": Opt(SESSION_NAME), "node": Opt(NODE_NAME),
                "node_id": Opt(Str(GEN_LEN, GENERATION, what="16 hex digits")),
                "role_seq": _COUNT, "record": Opt(RECORD),
                # the highest leader epoch the node has recorded (null: none yet)
                "epoch": Opt(EPOCH)}

_PROGRESS = Obj({"target": Str(MAX_URI), "state": Str(16, choices=("running", "done",
                                                                     "failed")),
                 "error": Opt(Str()), "fault": Opt(Str(32)),
                 "total_bytes": _COUNT, "done_bytes": _COUNT, "seconds": _MS},
                {}, extra=True)
_VOLUME_STATUS = Obj({"size": _COUNT, "granularity": Int(1, MAX_N),
                      "dirty_blocks": _COUNT, "synced_target": Opt(Str(MAX_URI)),
                      "copy": Opt(_PROGRESS)},
                     {"cr_blocks": _COUNT, "oos_blocks": _COUNT, "pit": Opt(_COUNT),
                      "preserved_blocks": _COUNT, "inflight": _COUNT, "waiting": _COUNT,
                      "lease_ms_left": Opt(_MS), "path": Str(MAX_URI), "blockdev": Bool(),
                      "gate": Str(16, choices=("open", "closed")), "pit_full": Opt(Bool()),
                      **_NODE_VOLUME},
                     extra=True)
ENDINGS = ("done", "aborted", "expired", "failed")


ROLES = ("primary", "secondary")
_PRIMARY_STATUS = Obj({"pid": Int(1, 1 << 31),
                       "phase": Str(16, choices=("idle", "frozen", "cut", "copying")),
                       "n": _COUNT, "ended": Opt(Str(16, choices=ENDINGS)),
                       "volumes": Map(NAME, _VOLUME_STATUS),
                       "last_copy": Opt(Obj({"n": CUT, "ok": Bool(),
                                             "volumes": Map(NAME, _PROGRESS)}, {},
                                            extra=True))},
                      # gate: the unix socket that serves freeze, thaw and abort
                      # natively (nbdplugin/slave.py), beside a unix control socket.
                      {"role": Str(16, choices=ROLES), "gate": Str(107), **_NODE_STATUS},
                      extra=True)
# A secondary's volume: its replication export's name (a capability: see
# nbdplugin/secondary.py) and what its undo store and tgt map hold.
_SECONDARY_VOLUME = Obj({"size": _COUNT, "granularity": Int(1, MAX_N),
                         "export": Str(MAX_URI), "undo_blocks": _COUNT,
                         "tgt_blocks": _COUNT, "replication_bytes": _COUNT,
                         "host_writes_refused": _COUNT}, dict(_NODE_VOLUME), extra=True)
_SECONDARY_STATUS = Obj({"pid": Int(1, 1 << 31), "role": Str(16, choices=ROLES),
                         "hardened": _COUNT, "prepared": Opt(CUT),
                         "volumes": Map(NAME, _SECONDARY_VOLUME)}, dict(_NODE_STATUS),
                        extra=True)
_RUNS_PAGE = Obj({"volume": NAME, "granularity": Int(1, MAX_N), "blocks": _COUNT,
                  "runs": RUNS, "next": Opt(_COUNT)}, {}, extra=True)

# op -> schema of its successful reply (besides "ok")
REPLY_SCHEMA: dict[str, _Node] = {
    # A status reply says its role (a primary's may omit it: older slaves).
    "status": Switch("role", {"primary": _PRIMARY_STATUS,
                              "secondary": _SECONDARY_STATUS}, "primary"),
    "freeze": Obj({"n": CUT, "drain_ms": _MS, "blocks": Map(NAME, _COUNT)}, {}, extra=True),
    "thaw": Obj({"n": CUT, "held_ms": _MS}, {}, extra=True),
    "abort": Obj({"n": CUT}, {}, extra=True),
    "copy": Obj({"n": CUT, "modes": Map(NAME, Str(16, choices=("full", "incremental"))),
                 "bytes": Map(NAME, _COUNT)}, {}, extra=True),
    "verify": Obj({"failed": Map(NAME, Str(MAX_TEXT))}, {}, extra=True),
    "clear": Obj({"volumes": List(NAME)}, {}, extra=True),
    "dirty": _RUNS_PAGE,
    "checkpoint": Obj({"written": List(NAME)}, {}, extra=True),
    "mark": Obj({"volume": NAME, "blocks": _COUNT}, {}, extra=True),
    "prepare": Obj({"n": CUT}, {}, extra=True),
    "commit": Obj({"n": CUT}, {}, extra=True),
    "rollback": Obj({"hardened": _COUNT, "rolled_back": Map(NAME, _COUNT)}, {}, extra=True),
    "tgt": _RUNS_PAGE,
    "clear_tgt": Obj({"volume": NAME, "blocks": _COUNT}, {}, extra=True),
    "fence": Obj({"fenced": Bool()}, {}, extra=True),
    "adopt": Obj({"volume": NAME, "samples": _COUNT}, {}, extra=True),
    "assume": Obj({"hardened": CUT}, {}, extra=True),
    "dr_test": Obj({"hardened": CUT}, {}, extra=True),
    "rate": Obj({"copies": List(NAME)}, {}, extra=True),
    # restarting: the node exits with RESTART_STATUS once this reply is sent
    "role": Obj({"role": Str(16, choices=ROLES), "restarting": Bool()},
                {"role_seq": _COUNT}, extra=True),
    "record": Obj({"record": Opt(RECORD)}, {}, extra=True),
    # null: a block a primary could not vouch for (changed since the last
    # group: in cr or oos before or after it was read)
    "checksums": Obj({"volume": NAME, "start": _COUNT, "block": Int(1, MAX_N),
                      "digests": List(Opt(Str(64)), 0, MAX_CHECKSUMS)}, {}, extra=True),
}

_ERROR_REPLY = Obj({"ok": Bool(), "error": Str(MAX_TEXT),
                    "kind": Str(16, choices=tuple(Kind), what="an error kind")}, {},
                   extra=True)


class Refused(Exception):
    """The slave answered with an error reply: ``kind`` says why."""

    def __init__(self, message: str, kind: Kind):
        super().__init__(message)
        self.kind = kind


def decode_reply(op: str | None, line: bytes | str | dict) -> dict:
    """Parse and check the slave's reply to ``op`` (None: only the envelope).

    Returns the reply of a success; raises ``Refused`` for an error reply and
    ``ProtocolError`` (kind REPLY: the slave's fault) for anything else.
    """
    try:
        msg = line if isinstance(line, dict) else parse(line)
        if not isinstance(msg.get("ok"), bool):
            raise ProtocolError("reply has no 'ok' true or false")
        if not msg["ok"]:
            _ERROR_REPLY.check(msg, "")
            raise Refused(msg["error"], Kind(msg["kind"]))
        if op is not None:
            REPLY_SCHEMA[op].check(msg, "")
    except ProtocolError as exc:
        raise bad_reply(op, exc) from None
    return msg


def bad_reply(op: str | None, why: object) -> ProtocolError:
    """The error for a reply to ``op`` that is not what the protocol says."""
    return ProtocolError(f"bad reply{f' to {op}' if op else ''}: {why} (a broken slave,"
                         f" or one of another version: see its log)", Kind.REPLY)


def check_runs(runs: list, nblocks: int, volume: str) -> None:
    """Refuse runs of blocks that go past a volume's ``nblocks``."""
    for i, (start, count) in enumerate(runs):
        if start + count > nblocks:
            raise ProtocolError(f"'runs[{i}]' [{start}, {count}] goes past the"
                                f" {nblocks} blocks of {volume}")


def runs_page(volume: str, granularity: int, bitmap, start: int, max_runs: int) -> dict:
    """The reply of a page of runs of ``bitmap`` (the ``dirty`` and ``tgt``
    ops) from block ``start``; ``next`` is where the next page starts (None
    after the last)."""
    if start > bitmap.nbits:
        raise ProtocolError(f"'start' {start} is past the {bitmap.nbits} blocks of {volume}")
    runs, nxt = bitmap.runs(start, max_runs=max_runs)
    return ok(volume=volume, granularity=granularity, blocks=bitmap.nbits,
              runs=[list(r) for r in runs], next=nxt if nxt < bitmap.nbits else None)


def ok(**fields) -> dict:
    return {"ok": True, **fields}


def error(message: str, kind: Kind | str = Kind.PROTOCOL) -> dict:
    return {"ok": False, "error": " ".join(str(message).split())[:MAX_TEXT],
            "kind": Kind(kind).value}


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
                    f" abort it or wait for its copy", Kind.BUSY)
            if n <= self.n:
                raise ProtocolError(
                    f"cut number {n} is not above the last cut {self.n}", Kind.STALE)
            return TRANSITIONS[(self.phase, event)]
        if n != self.n or self.phase is Phase.IDLE:
            if n == self.n and self.ended:
                raise ProtocolError(f"cut {n} already ended ({self.ended})", Kind.ENDED)
            current = f"cut {self.n} is {self.phase.value}" if self.n else "no cut yet"
            raise ProtocolError(f"{event.value} {n} does not match: {current}", Kind.ORDER)
        try:
            return TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise ProtocolError(
                f"{event.value} is not allowed while cut {n} is {self.phase.value}",
                Kind.ORDER) from None

    def step(self, event: Event, n: int, ended: str | None = None) -> Phase:
        """Apply ``event``; on error raise and change nothing."""
        phase = self.check(event, n)
        self.phase, self.n = phase, n
        self.ended = ended if phase is Phase.IDLE else None
        return phase
