"""The node record: what a node knows about itself, kept in its own state
directory (``STATEDIR/node.json``) -- its session, its name, its role, the
coordinator's direction record, and per volume the file's identity and the
data's lineage (wire/lineage.py).  Truth lives with the nodes: the node
writes a change here durably *before* it acts on it, and starts in the
role recorded here, whoever starts it.

    {"version": 1,
     "session": NAME | null, "node": NAME | null, "node_id": "16 hex",
     "role": "primary" | "secondary", "role_seq": INT,
     "record": null | {..., "seq": INT},
     "epoch": {"n": INT, "at": UNIX_TIME},      (absent: none seen yet)
     "volumes": {VOL: {"identity": IDENTITY, "lineage": LINEAGE,
                       "replaced": null | ONE_LINE}}}

IDENTITY is ``{"kind": "file" | "block", "dev", "ino", "rdev", "size"}``: a
file is its st_dev, st_ino and size; a block device its st_rdev and size.
A file's also carries ``fsid``, its file system's f_fsid (statfs(2)): where
both records have one (not 0) it names the file system instead of st_dev,
which a reboot may renumber (a device-mapper minor, an overlay's anonymous
device) while ext4's and xfs's f_fsid, made from their UUID, stay.

Every change goes through ``update``: a new dict is made, written with
``write_atomic`` (temp file, fdatasync, rename, fsync of the directory),
and only then adopted in memory.  Crash points and what the next start
finds:

- before the rename (failpoint ``node:before-record``; of a role op
  ``node:role:before-record``): the old record; the change never happened,
  the node starts as it was and the op that asked for it is asked again;
- after the rename (``node:after-record``; of a role op
  ``node:role:after-record``, before its reply): the new record; the node
  starts in what it records (a role op: the new role), and the op asked
  again finds it done.

A role op checkpoints the change maps first, so the record never speaks
for maps older than itself.  Nothing else is written between the record
and the exit: the role's own state files (slave.json, secondary.json) are
valid in either role (plugin.py folds the maps of the other role at start).

Start (``open``): a record of another session or node is refused (one
line: the operator gave two nodes one state directory); a record whose
volume names differ from the configuration is refused (a volume added,
removed or renamed is not the same node); a volume whose file is not the
one recorded (another inode, device or size) gets a new lineage (event 6)
and a ``replaced`` line that its status carries until the pair is joined
again by a full copy; before that is recorded the node forgets what it
kept of the old file (its undo store and change maps,
secondary.forget_replaced), so a crash in between forgets again.
session=/node= given for the first time to a node
recorded without them (started by hand before) are recorded then.

``epoch`` is the highest leader epoch the node has seen (issue 19;
nbdplugin/epoch.py has the rules and its crash points): written by
``raise_epoch`` before the request that carried it is acted on.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import threading
import time

from wire import failpoints, lineage, protocol
from wire.noderole import NODE_FILE, ROLES
from wire.files import write_atomic

log = logging.getLogger(__name__)

VERSION = 1


class NodeRecordError(Exception):
    """The node record forbids this start (another node's state directory,
    other volumes) or is damaged; the message says what to do."""


def identity_of(fd: int, size: int) -> dict:
    """The identity of the open file or block device ``fd`` of ``size`` bytes."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return {"kind": "block", "dev": 0, "ino": 0, "rdev": st.st_rdev, "size": size}
    return {"kind": "file", "dev": st.st_dev, "ino": st.st_ino, "rdev": 0, "size": size,
            "fsid": os.fstatvfs(fd).f_fsid}


def _fs(a: dict, b: dict) -> tuple:
    """What names the file system of file identities ``a`` and ``b``: the
    fsid where both have one, else st_dev (records made before fsid)."""
    if a.get("fsid") and b.get("fsid"):
        return ("fsid", a["fsid"], b["fsid"])
    return ("file system", a.get("dev"), b.get("dev"))


def _same(a: dict, b: dict) -> bool:
    if a.get("kind") != b.get("kind") or a.get("size") != b.get("size"):
        return False
    if a["kind"] == "block":
        return a.get("rdev") == b.get("rdev")
    _, x, y = _fs(a, b)
    return x == y and a.get("ino") == b.get("ino")


def _what_changed(old: dict, new: dict) -> str:
    """How an identity changed, in a few words."""
    if old.get("kind") != new.get("kind"):
        return f"a {old.get('kind')} before, a {new['kind']} now"
    if new["kind"] == "block" and old.get("rdev") != new["rdev"]:
        o, n = old.get("rdev", 0), new["rdev"]
        return (f"device {os.major(o)}:{os.minor(o)} -> {os.major(n)}:{os.minor(n)}")
    if new["kind"] == "file" and old.get("ino") != new["ino"]:
        return f"inode {old.get('ino')} -> {new['ino']}"
    what, x, y = _fs(old, new)
    if new["kind"] == "file" and x != y:
        return f"{what} {x} -> {y}"
    return f"size {old.get('size')} -> {new['size']} bytes"


def _check_loaded(path: str, data) -> dict:
    """The record as read, checked; NodeRecordError (one line) if damaged."""
    def bad(why):
        return NodeRecordError(f"{path} is damaged ({why}): restore it from a backup; a"
                               f" node without its record cannot tell its role or its"
                               f" data's lineage")
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise bad(f"not a version {VERSION} node record")
    try:
        protocol.Obj({"version": protocol.Int(), "session": protocol.Opt(protocol.SESSION_NAME),
                      "node": protocol.Opt(protocol.NODE_NAME),
                      "node_id": protocol.Str(protocol.GEN_LEN, protocol.GENERATION),
                      "role": protocol.Str(16, choices=ROLES),
                      "role_seq": protocol.Int(),
                      "record": protocol.Opt(protocol.RECORD),
                      "volumes": protocol.Map(protocol.NAME, protocol.Obj(
                          {"identity": protocol.Obj({}, {}, extra=True),
                           "lineage": protocol.LINEAGE},
                          {"replaced": protocol.Opt(protocol.Str())}), 1)},
                     {"epoch": protocol.Obj({"n": protocol.EPOCH, "at": protocol.Num()},
                                            {})}).check(data, "")
    except protocol.ProtocolError as exc:
        raise bad(str(exc)) from None
    return data


class NodeRecord:
    """A node's ``node.json``: read at start, changed only through ``update``
    (durable first, then in memory).  ``lock`` serialises updates; readers
    take ``data``, which is replaced whole, never changed in place."""

    def __init__(self, statedir: str, data: dict):
        self.statedir = statedir
        self.data = data
        self.lock = threading.Lock()

    @property
    def path(self) -> str:
        return os.path.join(self.statedir, NODE_FILE)

    # ------------------------------------------------------------ fields

    session = property(lambda self: self.data["session"])
    node = property(lambda self: self.data["node"])
    node_id = property(lambda self: self.data["node_id"])
    role = property(lambda self: self.data["role"])
    role_seq = property(lambda self: self.data["role_seq"])
    record = property(lambda self: self.data["record"])
    # The highest leader epoch recorded (0: none yet).
    epoch = property(lambda self: (self.data.get("epoch") or {}).get("n", 0))

    def lineage(self, volume: str) -> dict:
        return self.data["volumes"][volume]["lineage"]

    def replaced(self, volume: str) -> str | None:
        return self.data["volumes"][volume].get("replaced")

    def who(self) -> str:
        """This node as people name it."""
        return f"node {self.node}" if self.node else f"the node of {self.statedir}"

    # ------------------------------------------------------------ changes

    def update(self, change, failpoint: str = "node") -> dict:
        """Apply ``change(copy_of_data) -> None`` to a deep copy, write it
        durably, then adopt it; return the new data.  A failed write leaves
        the record in memory as it was on disk.  ``failpoint``: the prefix
        of the crash points around the rename (module doc)."""
        with self.lock:
            new = json.loads(json.dumps(self.data))
            change(new)
            _check_loaded(self.path, new)
            write_atomic(self.path, (json.dumps(new, indent=1) + "\n").encode(),
                         failpoint=f"{failpoint}:before-record")
            failpoints.hit(f"{failpoint}:after-record")
            self.data = new
            return new

    def set_lineages(self, fn, volumes=None) -> dict:
        """``lineage = fn(name, lineage)`` for each volume (all by default),
        in one durable write."""
        def change(d):
            for name, v in d["volumes"].items():
                if volumes is None or name in volumes:
                    v["lineage"] = fn(name, v["lineage"])
        return self.update(change)

    def take(self, gens: dict | None, n: int) -> None:
        """Events 4 and 5 (a secondary's commit or assume of group ``n``):
        each volume of ``gens`` takes the peer's generation; every volume's
        ``replaced`` ends (its image is now the pair's group n).  Without
        ``gens`` (an older coordinator) the lineage keeps its generation."""
        def change(d):
            for name, v in d["volumes"].items():
                gen = (gens or {}).get(name, v["lineage"]["current"])
                v["lineage"] = lineage.take(v["lineage"], gen, n)
                v["replaced"] = None
        self.update(change)

    def keep_record(self, record: dict) -> dict:
        """The ``record`` op: keep ``record`` if its seq is above the stored
        one's; return what is stored."""
        stored = self.record
        if stored is not None and record["seq"] <= stored["seq"]:
            return stored

        def change(d):
            d["record"] = record
        return self.update(change)["record"]

    def raise_epoch(self, n: int) -> None:
        """Record leader epoch ``n`` durably if it is above the recorded one
        (nbdplugin/epoch.py calls it before acting on the request)."""
        def change(d):
            if n > (d.get("epoch") or {}).get("n", 0):
                d["epoch"] = {"n": n, "at": round(time.time(), 3)}
        self.update(change, failpoint="node:epoch")

    # ------------------------------------------------------------ start

    @classmethod
    def load(cls, statedir: str) -> "NodeRecord | None":
        """The record of ``statedir``, or None at a node's first start."""
        path = os.path.join(statedir, NODE_FILE)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise NodeRecordError(f"{path} is not JSON ({exc}): restore it from a"
                                  f" backup") from None
        return cls(statedir, _check_loaded(path, data))

    def check_belongs(self, session: str | None, node: str | None) -> None:
        """Refuse a start as another node or for another session."""
        mine_s, mine_n = self.session, self.node
        if (session and mine_s and session != mine_s) or (node and mine_n and node != mine_n):
            raise NodeRecordError(
                f"{self.statedir} belongs to node {mine_n or '?'} of session {mine_s or '?'};"
                f" this is node {node or mine_n or '?'} of session {session or mine_s or '?'}:"
                f" give every node its own state directory")

    def check_volumes(self, names: list[str]) -> None:
        """Refuse a start with other volumes than the record's."""
        have = list(self.data["volumes"])
        added = [n for n in names if n not in have]
        gone = [n for n in have if n not in names]
        if added:
            raise NodeRecordError(
                f"volume {added[0]} is not in {self.who()}'s record (it has"
                f" {', '.join(have)}): a volume added or renamed needs a node of its own"
                f" (another state directory), or the old name back")
        if gone:
            raise NodeRecordError(
                f"volume {gone[0]} of {self.who()}'s record is not given (given:"
                f" {', '.join(names)}): give it again, or start a new node (another"
                f" state directory) for the volumes it serves now")

    @classmethod
    def create(cls, statedir: str, session: str | None, node: str | None, role: str,
               identities: dict[str, dict]) -> "NodeRecord":
        """The first start (event 1 for every volume), recorded durably."""
        rec = cls(statedir, {
            "version": VERSION, "session": session, "node": node,
            "node_id": secrets.token_hex(8), "role": role, "role_seq": 0, "record": None,
            "volumes": {name: {"identity": ident, "lineage": lineage.fresh(),
                               "replaced": None}
                        for name, ident in identities.items()}})
        rec.update(lambda d: None)
        log.info("%s: first start as a %s (node id %s)", rec.who(), role, rec.node_id)
        return rec

    def replaced_by(self, identities: dict[str, dict]) -> list[str]:
        """The volumes whose identity is not the one recorded (nothing is
        written: ``start`` records them).  The caller forgets what it keeps
        of those volumes (undo store, change maps) before ``start``, so a
        crash in between finds them replaced again and forgets again."""
        return [name for name, ident in identities.items()
                if not _same(self.data["volumes"][name]["identity"], ident)]

    def start(self, session: str | None, node: str | None, paths: dict[str, str],
              identities: dict[str, dict]) -> list[str]:
        """Check each volume's identity against the record: a volume that
        is not the file recorded gets a new lineage (event 6) and its
        ``replaced`` line.  Records session and node if they were not yet.
        Returns the names of the volumes found replaced."""
        found = {}
        for name in self.replaced_by(identities):
            ident = identities[name]
            old = self.data["volumes"][name]["identity"]
            kind = "device" if ident["kind"] == "block" else "file"
            found[name] = (
                f"volume {name}: {paths[name]} is not the {kind} {self.who()} served"
                f" ({_what_changed(old, ident)}): its image is unknown to the pair;"
                f" only a full resync joins it again (`cgmirror resync --from SOURCE"
                f" --to TARGET --full`)")
        claim = (session and not self.session) or (node and not self.node)
        if not found and not claim:
            return []

        def change(d):
            if session and not d["session"]:
                d["session"] = session
            if node and not d["node"]:
                d["node"] = node
            for name, line in found.items():
                v = d["volumes"][name]
                v["identity"] = identities[name]
                v["lineage"] = lineage.replaced()
                v["replaced"] = line
        self.update(change)
        for line in found.values():
            log.warning("%s [lineage event 6]", line)
        return list(found)

    # ------------------------------------------------------------ status

    def status_fields(self) -> dict:
        """What both roles' status carries at the top."""
        d = self.data
        return {"session": d["session"], "node": d["node"], "node_id": d["node_id"],
                "role_seq": d["role_seq"], "record": d["record"],
                "epoch": self.epoch or None}

    def volume_fields(self, name: str, dirty: bool) -> dict:
        """What both roles' status carries per volume."""
        v = self.data["volumes"][name]
        return {"lineage": v["lineage"], "dirty": bool(dirty), "replaced": v.get("replaced")}
