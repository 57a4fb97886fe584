"""The secondary role (DESIGN.md, "The secondary"): the remote copy of a
primary's volumes, which always holds the last hardened group.

Each volume is served twice:

host export ``NAME``          read-only while secondary; every read shows the
                              last hardened group h: live blocks overlaid with
                              the undo store (``SecondaryVolume.read_hardened``).
replication export            the only way to write: the primary's drain
``repl-TOKEN/NAME``           writes group n+1 here.

The replication export has a packed twin, ``repl-TOKEN/NAME/packed``, the
same capability: each write there (at offset 0) is a batch of records
(offset, length, data or zeros; native/copy.c, "Packed"), applied as one
replication write -- one undo save for all its blocks, then the records.
The native drain uses it where the secondary offers it: scattered sub-block
pieces then cost one request per ~1 MiB, not one each.

Why a capability in the export name is the access control: nbdkit 1.32's
python plugin exposes no peer identity per NBD connection (no credentials,
no certificate), so ``open`` can only judge by the export name.  TOKEN is 32
hex characters of a random secret made at first start and kept 0600 in the
state directory (stable across restarts, so a primary's baseline URI stays
valid); it is handed out only in the ``status`` reply of the authenticated
control channel.  On a unix socket only the socket's owner can connect at
all; on TCP the NBD session is TLS, so the name is never on the wire in
clear.  The host export never lists it (``list_exports`` names only NAMEs).

Undo store (one per volume, a durable ``BlockStore`` named
``NAME.undo.<h>`` after the group it protects): before the first replication
overwrite (write, zero, trim; partial blocks too) of a block since h, its old
content is saved and made durable, and only then is the live block
overwritten.  A reader reads live first and looks at the store's index
after, so a block whose live read could have seen group n+1 data is already
in the index with its old content (the same argument as ``Pit.read``).

Before the first group is hardened (h = 0: the first full copy is still
arriving) there is nothing to protect: no undo store is kept, so the first
copy does not need the volume's size again in undo space, a rollback has
nothing to restore (the primary still holds a change bit for every block
not yet confirmed), and the host export refuses to open ("no hardened group
yet") rather than show a half-copied volume.

Group state (``secondary.json``, written with ``files.write_atomic``):
``hardened`` (0 = none yet) and ``prepared`` (a group number or null).

- ``prepare n``: replication writes stop (new ones get EROFS), the volumes
  are fdatasynced, then "prepared n" is recorded.
- ``commit n``: "hardened n, prepared null" is recorded, then the undo
  stores of the old h are dropped and the next write starts
  ``NAME.undo.<n>``.
- ``rollback``: every undo block is written back and fdatasynced, the
  rolled-back blocks are set in ``tgt`` (durable), the undo store is
  dropped, prepared is cleared.

Crash points and what recovery does (a secondary never decides alone: at
start it keeps its undo store and prepared state and waits for the
coordinator's commit or rollback):

- mid-replication (``secondary:after-undo``: old content durable, live not
  yet written; ``secondary:after-write``): the store lists every block that
  may have changed since h, so reads show h and a rollback restores it.
- in prepare, data durable, "prepared n" not yet recorded
  (``secondary:prepare-before-record``): as mid-replication; the primary
  has cleared the bits of every block the drain flushed, so a resync run
  again sends none of them.
- between prepare and commit: prepared n survives; ``commit n`` works, and
  so does ``rollback``.
- in commit after the record (``secondary:commit-before-drop``): hardened is
  n, the store ``NAME.undo.<h_old>`` is stale and is deleted at start (its
  name tells it from a store of the current h).
- in rollback (``secondary:rollback-mid`` after a block is restored,
  ``secondary:rollback-before-drop`` once tgt is durable): the store is
  still there, so running rollback again restores the same blocks (the
  same bytes) and sets the same tgt bits.

DR test (``failover --test``, coordinator/roles/failover.py).  Before the node is
promoted for a test, ``dr_test n`` records "test n" (n = hardened).  The
primary it then runs as (plugin.py) takes up the store ``NAME.undo.<n>``
as ``Volume.keep``: the first test write to a block saves its group-n
content there, durably, before the write (the undo store's own rule, so
it is the same store and the same file).  When the node starts as a
secondary again with "test n" recorded, it restores group n on itself
before it serves anything or answers a status: every kept block written
back and fdatasynced, the blocks set in ``tgt`` and checkpointed, the
store dropped, then "test" cleared.  Its host export and ``hardened n``
are then true, and a ``failover`` right after promotes exactly group n.
A node that was never promoted after ``dr_test`` (a failed ``failover
--test``) still runs with "test n": ``assume n`` (which ``--end-test``
sends then), ``prepare``, ``commit`` and ``rollback`` clear it, so that no
later, real promotion keeps blocks and no later start restores an old group.
The test's blocks stay in ``tgt`` (the primary's cut of ``cr | oos``
folds them there anyway): the end of the test returns them to the
primary, whose next group sends them again.  They hold group n's bytes
by then, so that resend is not needed for correctness; it is kept
because ``tgt`` cannot tell them from target writes before the test
(folded into the same ``cr`` at promotion), and it is what the resync
has always sent: S | T with T a superset of what differs, never a
subset.  Crash points: the test primary killed -9 mid-write (the store
lists every block the write may have reached); the restore killed
(``secondary:test-restore-mid``, ``secondary:test-restore-before-clear``):
"test n" and the store are still there, so the next start restores the
same blocks again (the same bytes); after the store is dropped and before
"test" is cleared, the next start finds an empty store and only clears.

Identity: ``prepare``, ``commit`` and ``checksums`` are refused while a
volume is no longer the file (or device) at its path (``Volume.problem``),
and ``status`` carries the problem per volume, with the group the node
still holds: a group never hardens, and ``verify`` never passes, on an
image nobody can open again.  The exports still open (the open inode does
hold group h, and a refused replication export would only send the primary
into a full copy that fails the same way at prepare).

Rejected: a copy-on-write overlay that keeps group n+1 aside until commit
(reads of the host export would be free, but commit would copy every block
of the group, and a crash mid-commit would need its own journal); rolling
back by ourselves at start (the coordinator alone knows whether another
secondary committed n, in which case this one must roll forward).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import struct
import threading
import time

from wire import lineage, protocol
from wire.protocol import Kind, ProtocolError

from wire import failpoints
from .blockstore import BlockStore, StoreClosed
from wire.files import fsync_dir, pwrite_all, write_atomic
from .copier import PACKED_SUFFIX, block_digest
from .server import ControlServer, OpHandler
from .volume import Volume

log = logging.getLogger(__name__)

STATE_FILE = "secondary.json"
TOKEN_FILE = "replication.token"
_TOKEN = re.compile(r"[0-9a-f]{32}")
# prepare and rollback wait this long for replication writes in flight.
WRITERS_TIMEOUT_S = 30.0


def undo_path(statedir: str, name: str, h: int) -> str:
    """The undo store protecting group ``h`` of volume ``name`` (also the
    store a DR test keeps group ``h`` in)."""
    return os.path.join(statedir, f"{name}.undo.{h}")


class SecondaryVolume(Volume):
    """A volume of a secondary.  Its own I/O methods (``pread``, ``pwrite``,
    ``zero``, ``trim``, ``flush``) are the replication export's; the host
    export is ``HostView``.  Writes pass ``_modify``: refused while writes
    are blocked (prepared, or a rollback running), undo save, then data."""

    owner = None        # the Secondary serving it: its node record holds the direction

    def lost_fix(self, pid: int) -> str:
        # Any file at the path after a restart -- the copy from /proc/PID/fd
        # included -- is a new inode: the node reports it replaced (issue
        # 18), and only a full resync from the source joins it again.  The
        # copy still keeps the site's data until then.  The source is the
        # direction record's (none recorded yet: a).
        node = getattr(self.owner, "node", None)
        rec = (node.data.get("record") if node is not None else None) or {}
        src = rec.get("source") if rec.get("source") in ("a", "b") else "a"
        dst = "b" if src == "a" else "a"
        return (f"copy it back with `cp /proc/{pid}/fd/{self.fd} {self.path}` before"
                f" stopping the node (its data is gone with the process otherwise),"
                f" then restart the node and run `cgmirror resync --from {src} --to {dst}"
                f" --full` (the copy is a new file to the pair: only a full resync"
                f" joins it again)")

    def __init__(self, name: str, path: str, statedir: str, granularity: int,
                 region: int, create_size: int | None = None):
        # ``tgt``: blocks written by anyone but the replication stream, or
        # rolled back, since the stream last wrote them (DESIGN.md).
        super().__init__(name, path, statedir, granularity, region, create_size,
                         extra_maps=("tgt",))
        self.cond = threading.Condition()   # guards writers, blocked, counters
        self.writers = 0
        self.blocked: str | None = None     # why replication writes are refused
        self.replication_bytes = 0
        self.host_writes_refused = 0
        self.undo: BlockStore | None = None     # None while nothing is hardened

    # ------------------------------------------------------------ undo store

    def undo_path(self, h: int) -> str:
        return undo_path(self.statedir, self.name, h)

    def open_undo(self, h: int) -> None:
        """Take up the store protecting group ``h`` (left by a crash, or new)
        and delete stores of other groups: those were left by a commit that
        crashed before dropping them, and protect a group no longer hardened.
        Group 0 (nothing hardened) has no store."""
        pattern = re.compile(re.escape(self.name) + r"\.undo\.(\d+)(\.idx)?")
        for f in os.listdir(self.statedir):
            m = pattern.fullmatch(f)
            if m and int(m[1]) != h:
                log.info("%s: removing stale undo store %s (hardened is %d)",
                         self.name, f, h)
                os.unlink(os.path.join(self.statedir, f))
        self.undo = BlockStore.reopen(self.undo_path(h), self.fd, self.granularity,
                                      self.size) if h else None

    def drop_undo(self, h: int) -> None:
        """Delete the store and start an empty one protecting ``h``; readers
        holding the old one find it closed and read again."""
        old = self.undo
        self.undo = BlockStore(self.undo_path(h), self.fd, self.granularity, self.size,
                               durable=True) if h else None
        if old is not None:
            old.close()

    def undo_blocks(self) -> dict[int, bytes]:
        """Every saved block and its saved content."""
        store = self.undo
        if store is None:
            return {}
        with store.lock:
            blocks = sorted(store.index)
        saved = {}
        for b in blocks:
            buf = bytearray(store.block_len(b))
            store.overlay(buf, b)
            saved[b] = bytes(buf)
        return saved

    # ------------------------------------------------------------ writes

    def block_writes(self, why: str, timeout: float = WRITERS_TIMEOUT_S) -> None:
        """Refuse new replication writes and wait for those in flight."""
        deadline = time.monotonic() + timeout
        with self.cond:
            before, self.blocked = self.blocked, why
            while self.writers:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.blocked = before
                    raise ProtocolError(f"replication writes to {self.name} did not"
                                        f" finish within {timeout:g} s", Kind.TIMEOUT)
                self.cond.wait(left)

    def allow_writes(self) -> None:
        with self.cond:
            self.blocked = None

    def _modify(self, offset: int, length: int, action, *args) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, +{length}) beyond {self.size}")
        g = self.granularity
        with self._replicating(range(offset // g, (offset + length - 1) // g + 1)
                               if length else ()):
            action(*args)
            with self.cond:
                self.replication_bytes += length
            failpoints.hit("secondary:after-write")

    def apply_packed(self, buf) -> None:
        """Apply one batch of the packed export (``parse_packed``): as one
        replication write of every record in it -- one undo save (one pair
        of syncs) for all their blocks, then the records."""
        records = parse_packed(buf, self.size)
        g = self.granularity
        with self._replicating([b for off, n, _ in records
                                for b in range(off // g, (off + n - 1) // g + 1)]):
            total = 0
            try:
                for off, n, data in records:
                    if data is None:
                        self.zero_raw(n, off, False)
                    else:
                        pwrite_all(self.fd, data, off)
                    total += n
                    # Per record, as per plain write: the fault campaigns'
                    # crash points stay as fine, and a kill mid-batch is one.
                    failpoints.hit("secondary:after-write")
            finally:
                with self.cond:
                    self.replication_bytes += total

    @contextlib.contextmanager
    def _replicating(self, blocks):
        """One replication write, plain or a packed batch: refused while
        writes are blocked, counted in ``writers`` (a prepare waits for
        them), and ``blocks`` saved in the undo store first -- durable
        before the overwrite: after a crash the index lists every block the
        overwrite may have reached."""
        with self.cond:
            if self.blocked:
                raise OSError(errno.EROFS, f"{self.name}: replication writes refused:"
                                           f" {self.blocked}")
            self.writers += 1
        try:
            store = self.undo
            if blocks and store is not None and store.save(blocks):
                failpoints.hit("secondary:after-undo")
            yield
        finally:
            with self.cond:
                self.writers -= 1
                self.cond.notify_all()

    # ------------------------------------------------------------ host reads

    def read_hardened(self, buf, offset: int) -> None:
        """Fill ``buf`` with the last hardened group's bytes at ``offset``.

        Live first, store after (see the module docstring).  A store closed
        under us (a commit or rollback dropped it) means the group moved on:
        read again against the new one.  The overlay wants a buffer that
        starts on a block; an unaligned read goes through a larger one.
        """
        g = self.granularity
        first = offset // g
        view = memoryview(buf)
        lead = offset - first * g
        work = view if not lead else memoryview(bytearray(lead + len(view)))
        while True:
            self.pread(work, first * g)
            store = self.undo
            if store is None:
                raise OSError(errno.EIO, f"{self.name} has no hardened group yet")
            try:
                store.overlay(work, first)
                break
            except StoreClosed:
                continue
        if lead:
            view[:] = work[lead:]

    def status(self) -> dict:
        with self.cond:
            written, refused = self.replication_bytes, self.host_writes_refused
        with self.changes.lock:
            tgt = self.changes.maps["tgt"].count()
        return {"size": self.size, "granularity": self.granularity,
                "undo_blocks": len(self.undo) if self.undo is not None else 0, "tgt_blocks": tgt,
                "replication_bytes": written, "host_writes_refused": refused,
                "path": self.path, "problem": self.problem()}

    def close(self) -> None:
        if self.undo is not None:
            self.undo.close(remove=False)     # it protects h across the restart
        super().close()


class HostView:
    """The host export of a secondary volume: reads show the hardened group,
    writes are refused (nbdkit refuses them already, as ``writable`` is
    false; these count any that reach the plugin anyway)."""

    writable = False

    def __init__(self, volume: SecondaryVolume):
        self.volume = volume
        self.size = volume.size

    def pread(self, buf, offset: int) -> None:
        self.volume.read_hardened(buf, offset)

    def _refuse(self, *args) -> None:
        with self.volume.cond:
            self.volume.host_writes_refused += 1
        raise OSError(errno.EROFS, f"{self.volume.name} is a secondary: its host"
                                   f" export is read-only")

    pwrite = zero = trim = _refuse

    def flush(self) -> None:
        pass


# The packed replication export (``repl-TOKEN/NAME/packed``): each write
# is a batch of records (native/copy.c, "Packed"), written at offset 0; its
# size only bounds a batch.
PACKED_SIZE = 64 << 20
_PACK_HEAD = struct.Struct("<8sII")
_PACK_REC = struct.Struct("<QII")
_PACK_MAGIC = b"CGMPACK1"
_PACK_ZERO = 1


def parse_packed(buf, size: int) -> list[tuple[int, int, memoryview | None]]:
    """The records of a batch: (volume offset, length, data or None for
    zeros).  The whole batch is checked before any of it is applied, and
    a bad one is refused in one line (EINVAL)."""
    view = memoryview(buf)
    if len(view) < _PACK_HEAD.size:
        raise OSError(errno.EINVAL, f"packed write of {len(view)} bytes: no batch header")
    magic, count, zero = _PACK_HEAD.unpack_from(view)
    if magic != _PACK_MAGIC or zero:
        raise OSError(errno.EINVAL, "packed write does not start with a CGMPACK1 header")
    out, pos = [], _PACK_HEAD.size
    for i in range(count):
        if pos + _PACK_REC.size > len(view):
            raise OSError(errno.EINVAL, f"packed write ends inside record {i} of {count}")
        off, n, flags = _PACK_REC.unpack_from(view, pos)
        pos += _PACK_REC.size
        if not n or off + n > size or flags & ~_PACK_ZERO:
            raise OSError(errno.EINVAL, f"packed record {i}: [{off}, +{n}) flags {flags}"
                                        f" outside the volume of {size} bytes")
        if flags & _PACK_ZERO:
            out.append((off, n, None))
            continue
        if pos + n > len(view):
            raise OSError(errno.EINVAL, f"packed write ends inside the data of record {i}")
        out.append((off, n, view[pos:pos + n]))
        pos += n
    if pos != len(view):
        raise OSError(errno.EINVAL, f"packed write has {len(view) - pos} bytes after its"
                                    f" {count} records")
    return out


class PackedView:
    """The packed replication export of a secondary volume: a write at
    offset 0 is a batch of records for the volume (``parse_packed``); reads
    and other writes are refused; a flush is the volume's."""

    def __init__(self, volume: SecondaryVolume):
        self.volume = volume
        self.size = PACKED_SIZE

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        if offset:
            raise OSError(errno.EINVAL, f"packed write at offset {offset}: batches go"
                                        f" at offset 0")
        self.volume.apply_packed(buf)
        if fua:
            self.volume.flush()

    def _refuse(self, *args) -> None:
        raise OSError(errno.EINVAL, f"the packed export of {self.volume.name} takes"
                                    f" only batches of records (writes at offset 0)")

    pread = zero = trim = _refuse

    def flush(self) -> None:
        self.volume.flush()


class Secondary(OpHandler):
    """The volumes of one secondary nbdkit process and their control ops.
    ``lock`` serialises prepare, commit and rollback; the I/O path never
    takes it."""

    ROLE = "secondary"

    def __init__(self, volumes: dict[str, SecondaryVolume], statedir: str):
        self.volumes = volumes
        self.statedir = statedir
        self.lock = threading.RLock()
        self.server: ControlServer | None = None
        self.token = load_token(statedir)
        self.state = self._load_state()
        for vol in volumes.values():
            vol.owner = self
            vol.open_undo(self.state["hardened"])
            if self.state["prepared"] is not None:
                vol.blocked = f"group {self.state['prepared']} is prepared"
        if self.state["test"] is not None:
            self._end_test()
        undo = {n: v.status()["undo_blocks"] for n, v in volumes.items()}
        if self.state["prepared"] is not None or any(undo.values()):
            log.info("secondary: hardened %d, prepared %s, undo blocks %s: waiting for"
                     " the coordinator's commit or rollback", self.state["hardened"],
                     self.state["prepared"], undo)

    # ------------------------------------------------------------ state

    def _state_path(self) -> str:
        return os.path.join(self.statedir, STATE_FILE)

    def _load_state(self) -> dict:
        path = self._state_path()
        try:
            with open(path) as f:
                state = json.load(f)
            h, p = state["hardened"], state["prepared"]
            t = state.get("test")
            if not isinstance(h, int) or not (p is None or isinstance(p, int) and p > h) \
                    or not (t is None or t == h and p is None):
                raise ValueError("bad values")
        except FileNotFoundError:
            return {"hardened": 0, "prepared": None, "test": None}
        except (ValueError, KeyError, TypeError) as exc:
            # write_atomic never leaves a torn file: someone edited it.
            raise ValueError(f"{path} is damaged ({exc}): restore it, or remove"
                             f" {shlex.quote(self.statedir)} and start the node again (its"
                             f" new export name makes the primary copy its volumes in"
                             f" full)") from None
        return {"hardened": h, "prepared": p, "test": t}

    def _save_state(self, **updates) -> None:
        state = {**self.state, **updates}
        write_atomic(self._state_path(), json.dumps(state).encode())
        self.state = state

    def export_name(self, name: str) -> str:
        return f"repl-{self.token}/{name}"

    def open_export(self, name: str):
        """The handle for an NBD export name: ``HostView`` for NAME, the
        volume itself for its replication export, ``PackedView`` for that
        export's packed twin (NAME + ``/packed``), None for anything else.
        Raises ``LookupError`` for a host export with no hardened group yet."""
        vol = self.volumes.get(name)
        if vol is not None:
            if vol.undo is None:
                raise LookupError(f"{name} has no hardened group yet (the first copy"
                                  f" has not completed): nothing consistent to read")
            return HostView(vol)
        cap, _, vname = name.partition("/")
        packed = vname.endswith(PACKED_SUFFIX)
        vol = self.volumes.get(vname[:-len(PACKED_SUFFIX)] if packed else vname)
        # Constant time: the name is the secret.
        if vol is not None and hmac.compare_digest(cap.encode(),
                                                   f"repl-{self.token}".encode()):
            return PackedView(vol) if packed else vol
        return None

    def _volume(self, name: str) -> SecondaryVolume:
        vol = self.volumes.get(name)
        if vol is None:
            raise ProtocolError(f"unknown volume {name!r} (this secondary has:"
                                f" {', '.join(self.volumes)})", Kind.UNKNOWN)
        return vol

    def _holds(self) -> str:
        h, p = self.state["hardened"], self.state["prepared"]
        return f"it holds group {h}" + (f", group {p} prepared" if p is not None else "")

    def _problems(self) -> dict[str, str]:
        """Volumes no longer at their paths: one line each, with the group
        this node still holds."""
        return {name: f"{problem}; {self._holds()}" for name, v in self.volumes.items()
                if (problem := v.problem()) is not None}

    def _refuse_lost(self, what: str) -> None:
        problems = self._problems()
        if problems:
            raise ProtocolError(f"cannot {what}: " + " | ".join(problems.values()),
                                Kind.LOCAL)

    # ------------------------------------------------------------ ops

    def op_checksums(self, volume: str, start: int, count: int,
                     block: int | None = None) -> dict:
        """Digests of the hardened group's blocks of ``block`` bytes (the
        primary's granularity; default ours) [start, start+count), read here
        through the undo overlay as the host export shows them (online
        verify, coordinator/mirror/verify.py)."""
        vol = self._volume(volume)
        if (problem := vol.problem()) is not None:
            raise ProtocolError(problem, Kind.LOCAL)
        block = block or vol.granularity
        nblocks = -(-vol.size // block)
        if start + count > nblocks:
            raise ProtocolError(f"blocks [{start}, +{count}) beyond the {nblocks} of"
                                f" {volume} at {block} bytes", Kind.PROTOCOL)
        buf = bytearray(block)
        digests = []
        for b in range(start, start + count):
            view = memoryview(buf)[:min(block, vol.size - b * block)]
            try:
                vol.read_hardened(view, b * block)
            except OSError as exc:
                raise ProtocolError(f"{volume}: {exc.strerror or exc}", Kind.LOCAL) \
                    from exc
            digests.append(block_digest(view))
        return protocol.ok(volume=volume, start=start, block=block, digests=digests)

    def op_status(self) -> dict:
        vols = {}
        for name, v in self.volumes.items():
            vols[name] = {**v.status(), "export": self.export_name(name)}
            if vols[name]["problem"] is not None:
                vols[name]["problem"] += f"; {self._holds()}"
        problems = [v["problem"] for v in vols.values() if v["problem"]]
        extra = self.node_status(
            vols, lambda n: self.node.lineage(n)["own"])
        return protocol.ok(pid=os.getpid(), role=self.ROLE,
                           hardened=self.state["hardened"],
                           prepared=self.state["prepared"], test=self.state["test"],
                           volumes=vols, problem=" | ".join(problems) or None, **extra)

    def op_prepare(self, n: int) -> dict:
        with self.lock:
            h, p = self.state["hardened"], self.state["prepared"]
            if n <= h:
                raise ProtocolError(f"group {n} is not above the hardened group {h}",
                                    Kind.STALE)
            if p == n:
                return protocol.ok(n=n)         # a coordinator's retry
            if p is not None:
                raise ProtocolError(f"cannot prepare group {n}: group {p} is prepared;"
                                    f" commit or roll it back first", Kind.ORDER)
            self._refuse_lost(f"prepare group {n}")
            vols = list(self.volumes.values())
            try:
                for vol in vols:
                    vol.block_writes(f"group {n} is prepared")
                for vol in vols:
                    vol.flush()
                failpoints.hit("secondary:prepare-before-record")
                self._save_state(prepared=n, test=None)
            except BaseException:
                for vol in vols:
                    vol.allow_writes()
                raise
            return protocol.ok(n=n)

    def op_commit(self, n: int, gens: dict | None = None) -> dict:
        """Harden group ``n``; ``gens``: the generation each volume's image
        now belongs to (the primary's; lineage event 4)."""
        with self.lock:
            h, p = self.state["hardened"], self.state["prepared"]
            self._check_gens(gens)
            if p is None and h == n:
                self._take(gens, n)             # a crash between the two records
                return protocol.ok(n=n)         # a coordinator's retry
            if p != n:
                now = f"group {p} is prepared" if p is not None else "nothing is prepared"
                raise ProtocolError(f"cannot commit group {n}: {now} (hardened: {h})",
                                    Kind.STALE if n < h else Kind.ORDER)
            self._refuse_lost(f"commit group {n}")
            # Record first, then drop: a crash in between leaves a store
            # named after the old group, which the next start deletes.
            self._save_state(hardened=n, prepared=None, test=None)
            self._take(gens, n)
            failpoints.hit("secondary:commit-before-drop")
            for vol in self.volumes.values():
                vol.drop_undo(n)
                vol.allow_writes()
            log.info("secondary: group %d hardened", n)
            return protocol.ok(n=n)

    def op_rollback(self) -> dict:
        with self.lock:
            h = self.state["hardened"]
            vols = list(self.volumes.values())
            try:
                for vol in vols:
                    vol.block_writes("a rollback is running")
                rolled = {}
                for vol in vols:
                    rolled[vol.name] = self._roll_back(vol)
                # Order: restored data durable, then tgt durable, then drop
                # the store: until the drop, running rollback again redoes it.
                failpoints.hit("secondary:rollback-before-drop")
                for vol in vols:
                    vol.drop_undo(h)
                if self.state["prepared"] is not None or self.state["test"] is not None:
                    self._save_state(prepared=None, test=None)
            finally:
                # Writes stay refused if the prepared record could not go.
                if self.state["prepared"] is None:
                    for vol in vols:
                        vol.allow_writes()
            log.info("secondary: rolled back to group %d: %s", h, rolled)
            return protocol.ok(hardened=h, rolled_back=rolled)

    def _roll_back(self, vol: SecondaryVolume,
                   failpoint: str = "secondary:rollback-mid") -> int:
        """Write the undo blocks back, fdatasync, set them in tgt durably."""
        saved = vol.undo_blocks()
        g = vol.granularity
        for b, data in saved.items():
            vol.pwrite_all(data, b * g)
            failpoints.hit(failpoint)
        vol.flush()
        cm = vol.changes
        with cm.lock:
            for b in saved:
                cm.maps["tgt"].set(b, 1)
        cm.checkpoint(final=True)       # nothing marks cr here: always writes the map
        return len(saved)

    def op_tgt(self, volume: str, start: int = 0, max_runs: int = protocol.MAX_RUNS) -> dict:
        vol = self._volume(volume)
        with vol.changes.lock:
            bm = vol.changes.maps["tgt"].copy()
        return protocol.runs_page(volume, vol.granularity, bm, start, max_runs)

    def op_clear_tgt(self, volume: str, runs: list) -> dict:
        vol = self._volume(volume)
        cm = vol.changes
        protocol.check_runs(runs, cm.nblocks, volume)
        with cm.lock:
            for start, count in runs:
                cm.maps["tgt"].clear(start, count)
        cm.checkpoint(final=True)
        return protocol.ok(volume=volume, blocks=sum(c for _, c in runs))

    def _check_gens(self, gens: dict | None) -> None:
        unknown = [v for v in gens or () if v not in self.volumes]
        if unknown:
            raise ProtocolError(f"unknown volume {unknown[0]!r} in 'gens' (this secondary"
                                f" has: {', '.join(self.volumes)})", Kind.UNKNOWN)

    def _take(self, gens: dict | None, n: int) -> None:
        """Lineage events 4 and 5, after the group state is recorded: a
        crash between the two records leaves hardened n in secondary.json
        and the old lineage, and the coordinator's retry of the same commit
        or assume (answered as a retry) records the lineage then.  The
        other order could record a lineage at group n over an image that a
        recovery then rolls back to n-1."""
        if self.node is None:
            return
        wanted = {name: (gens or {}).get(name, self.node.lineage(name)["current"])
                  for name in self.volumes}
        if all(self.node.lineage(name)["current"] == gen
               and self.node.lineage(name)["hardened"] == n
               and not self.node.lineage(name)["own"] and not self.node.replaced(name)
               for name, gen in wanted.items()):
            return
        self.node.take(gens, n)

    def op_assume(self, n: int, gens: dict | None = None) -> dict:
        """Take the whole image as hardened group ``n`` (a primary demoted
        by a resync or switchover: coordinator/roles/failover.py).  From now on
        the undo store keeps this image until the resync hardens; the host
        export shows it.  Refused while anything is in flight (a prepared
        group or undo blocks): that image is not one group."""
        with self.lock:
            h, p = self.state["hardened"], self.state["prepared"]
            undo = {v.name: len(v.undo) for v in self.volumes.values() if v.undo}
            if p is not None or undo:
                raise ProtocolError(f"cannot take the image as group {n}: group"
                                    f" {p if p is not None else h + 1} is in flight"
                                    f" ({undo or 'prepared'}); commit or roll it back"
                                    f" first", Kind.ORDER)
            if n < h:
                raise ProtocolError(f"group {n} is below the hardened group {h}",
                                    Kind.STALE)
            self._check_gens(gens)
            if n != h or self.state["test"] is not None:
                self._save_state(hardened=n, test=None)
                for vol in self.volumes.values():
                    vol.drop_undo(n)
            self._take(gens, n)
            log.info("secondary: the image is group %d", n)
            return protocol.ok(hardened=n)

    def op_dr_test(self, n: int) -> dict:
        """Keep group ``n`` through a DR test (module doc, "DR test"): the
        primary this node runs as next saves every block's group-n content
        before its first write, and the next start as a secondary restores
        it.  Refused unless ``n`` is the hardened group and nothing is in
        flight (the coordinator settles the site first)."""
        with self.lock:
            h, p = self.state["hardened"], self.state["prepared"]
            undo = {v.name: len(v.undo) for v in self.volumes.values() if v.undo}
            if p is not None or undo:
                raise ProtocolError(f"cannot keep group {h} for a DR test: group"
                                    f" {p if p is not None else h + 1} is in flight"
                                    f" ({undo or 'prepared'}); settle it first",
                                    Kind.ORDER)
            if n != h or h == 0:
                raise ProtocolError(f"cannot keep group {n} for a DR test: this node"
                                    f" holds group {h}", Kind.STALE)
            self._refuse_lost(f"keep group {n} for a DR test")
            if self.state["test"] != n:
                self._save_state(test=n)
                log.info("secondary: group %d is kept through a DR test", n)
            return protocol.ok(hardened=n)

    def _end_test(self) -> None:
        """At start, after a DR test: restore the kept group on this node
        (module doc, "DR test"), before it serves or answers anything."""
        h = self.state["test"]
        rolled = {}
        for vol in self.volumes.values():
            rolled[vol.name] = self._roll_back(vol, "secondary:test-restore-mid")
        failpoints.hit("secondary:test-restore-before-clear")
        for vol in self.volumes.values():
            vol.drop_undo(h)
        self._save_state(test=None)
        log.info("secondary: DR test ended: group %d restored on this node (blocks"
                 " written back: %s; they stay in tgt)", h, rolled)

    def _leave_role(self, to: str):
        """Before ``role primary``: nothing of a drain may be in flight (a
        prepared group, or undo blocks of an unfinished one: the image is
        not one group), else kind busy naming what settles it; then
        replication writes are refused from here to the exit, the maps
        checkpointed, and promotion (lineage event 2) starts a new
        generation from the hardened group."""
        h, p = self.state["hardened"], self.state["prepared"]
        undo = {v.name: len(v.undo) for v in self.volumes.values() if v.undo}
        if p is not None:
            raise ProtocolError(f"cannot become a {to}: group {p} is prepared (hardened"
                                f" {h}); commit or roll it back first (`cgmirror failover`"
                                f" settles it)", Kind.BUSY)
        if undo:
            raise ProtocolError(f"cannot become a {to}: the drain of group {h + 1} is"
                                f" unfinished ({undo} blocks kept to undo); roll it back"
                                f" first (`cgmirror failover` settles it)", Kind.BUSY)
        vols = list(self.volumes.values())
        try:
            for vol in vols:
                vol.block_writes(f"this node is becoming a {to}")
            for vol in vols:
                vol.flush()
                vol.changes.checkpoint(final=True)
        except BaseException:
            for vol in vols:
                vol.allow_writes()
            raise

        def undo_():
            for vol in vols:
                vol.allow_writes()
        return (lambda name, lin: lineage.promote(lin)), undo_

    # ------------------------------------------------------------ life

    def start(self, address: str, ssl_context=None, **bounds) -> None:
        """Start the control server (after fork); see ``ControlServer.start``."""
        self.server = ControlServer(self, **bounds)
        self.server.start(address, ssl_context)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for vol in self.volumes.values():
            vol.close()


def prepared_group(statedir: str) -> int | None:
    """The group a secondary left prepared in ``statedir`` (None if none, or
    never a secondary): such a state directory must not start as a primary,
    since its image is neither group h nor group n until a commit or
    rollback decides."""
    try:
        with open(os.path.join(statedir, STATE_FILE)) as f:
            prepared = json.load(f).get("prepared")
    except (FileNotFoundError, ValueError, AttributeError):
        return None         # a damaged file is refused when started as a secondary
    return prepared if isinstance(prepared, int) else None


def dr_test_group(statedir: str) -> int | None:
    """The group a secondary keeps through a DR test in ``statedir`` (None
    if none): its primary run saves that group's blocks before writing."""
    try:
        with open(os.path.join(statedir, STATE_FILE)) as f:
            kept = json.load(f).get("test")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return kept if isinstance(kept, int) and kept > 0 else None


def forget_replaced(vol: Volume, why: str) -> None:
    """A volume whose file was replaced behind the node (noderecord.py,
    event 6): its image is unknown to the pair and only a full copy joins
    it, so nothing kept for the old file may touch the new one.  Its undo
    stores go (a rollback would write the old file's blocks into the new
    one; a DR test's kept blocks are the same store) and its change maps
    are emptied (a full copy sends every block anyway), durably, before
    the node records the new identity: a crash in between finds the file
    replaced again and forgets again.  One log line."""
    pattern = re.compile(re.escape(vol.name) + r"\.undo\.\d+(\.idx)?")
    gone = sorted(f for f in os.listdir(vol.statedir) if pattern.fullmatch(f))
    for f in gone:
        os.unlink(os.path.join(vol.statedir, f))
    if gone:
        fsync_dir(vol.statedir)
    blocks = vol.changes.clear_all()
    log.warning("%s: %s; its undo store (%d files) and change maps (%d blocks) of the"
                " old file are dropped", vol.name, why, len(gone), blocks)


def fold_maps(vol: Volume, into: str, names: tuple[str, ...]) -> int:
    """Role switch at start (coordinator/roles/failover.py): OR the maps ``names``
    into ``into``, empty them, and make that durable in one checkpoint (one
    atomic map file, so a crash before it leaves the old maps, and the next
    start folds them again).  A secondary's ``cr | oos`` (its writes as a
    primary) become its ``tgt``; a primary's ``tgt`` (blocks a rollback
    restored, or target indicators of a demoted past) become ``cr``, sent
    with its next group.  Returns the number of blocks folded."""
    cm = vol.changes
    with cm.lock:
        moved = 0
        for name in names:
            bits = cm.maps[name]
            if bits.any():
                moved += bits.count()
                cm.maps[into].or_(bits)
                bits.clear_all()
    if moved:
        # The map file now holds them under ``into``: ``checkpoint`` writes
        # every named map.
        cm.checkpoint(final=True)
        log.info("%s: %d blocks of %s moved into %s", vol.name, moved,
                 "|".join(names), into)
    return moved


def load_token(statedir: str) -> str:
    """The replication export's secret: made at first start, then kept."""
    path = os.path.join(statedir, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = secrets.token_hex(16)
        write_atomic(path, token.encode() + b"\n")
        return token
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{path} does not hold 32 hex characters: remove it to make"
                         f" a new one (the primary then needs the new export name)")
    return token
