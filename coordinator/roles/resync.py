"""The two parts of a resync beyond an ordinary group (coordinator/roles/
failover.py runs them): ``adopt`` gives the source a baseline on the target
without a copy, ``keep_overwritten`` saves what the resync will overwrite.

Baseline.  X's copier sends incrementally only to a target it has a
baseline record for.  A resync gives X one without a copy (``adopt``):
X and Y held the same hardened group h at the split (failover settles every
secondary at one group first; a switchover hardens a last group with the
primary fenced), and every block written since on either side is in X's
``cr | oos`` (X's own writes, its rollback blocks) or Y's ``tgt`` (Y's
writes as a primary, rolled-back or unsent blocks), which recovery has put
into X's ``cr`` before ``adopt`` runs.  It relies on (1) both change maps
being complete (C1, and the fold at start); (2) nobody writing Y's images
but its nbdkit (as for any baseline); (3) the session file naming the same
images.  ``adopt`` samples X's own clean blocks, and the mirror's
``verify`` reads them back at Y before the first group, so a wrong target
(a recreated image, a wrong path) is still caught.  ``--full`` drops the
record instead, so the group copies every block.

``--keep-overwritten DIR``: before the first group of a resync, every block
of S | T is read from the target's host export (its image as of before the
resync: the undo store keeps it even after a partial drain) and written
into ``DIR/<node>-<volume>.img`` (sparse, the volume's size) with the runs
in ``DIR/<node>-<volume>.runs.json``.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import nbd

from wire import files, tls

from .. import group
from ..errors import FailoverError, LocalError
from ..link import SlaveLink
from ..mirror import Links, recovery, replication_targets
from ..session import Session

Log = Callable[[str], None]


def adopt(links: Links, log: Log, forget: bool = False) -> None:
    """Give every source volume a fresh baseline on its target (module
    doc).  Always fresh: a record of an earlier era (this node was a
    primary before) has samples of blocks the other site wrote since.
    ``forget`` (``--full``): drop every record, so the group copies whole."""
    group.preflight(links.slaves, abort_leftover=True, warn=log)
    targets = replication_targets(links.session, recovery.secondary_statuses(links))
    for lk in links.slaves:
        for v, uri in targets[lk.name].items():
            lk.call("adopt", volume=v, target=uri, forget=forget)
            if forget:
                log(f"{lk.name}/{v}: copied whole to {uri} (--full)")
                continue
            log(f"{lk.name}/{v}: baseline on {uri} adopted (both held the"
                f" same group; every difference is in S | T)")


def dirty_runs(oriented: Session, slave: str, volume: str) -> tuple[list[list[int]], int]:
    """The byte runs [offset, length] a group of ``slave`` sends for
    ``volume`` now (its ``cr | oos``: after recovery S | T), and the
    volume's granularity."""
    runs, start, g = [], 0, 0
    with SlaveLink.from_spec(oriented.slave(slave).spec()) as lk:
        while start is not None:
            page = lk.call("dirty", volume=volume, start=start)
            g = page["granularity"]
            runs += [[b * g, n * g] for b, n in page["runs"]]
            start = page["next"]
    return runs, g


def overwritten(oriented: Session) -> dict[str, tuple[int, int]]:
    """{"secondary/volume": (blocks, bytes)} that the next group of a
    resync overwrites on its target (S | T, after recovery returned T)."""
    out = {}
    for s, v, r, rv in oriented.pairs():
        runs, g = dirty_runs(oriented, s, v)
        n = sum(length for _, length in runs)
        out[f"{r}/{rv}"] = (n // g if g else 0, n)
    return out


def keep_overwritten(oriented: Session, out: str, log: Log) -> dict:
    """Save the target blocks the resync will overwrite (module doc)."""
    files.make_dirs(out)        # the loser's data: 0700, whatever the umask
    kept = {}
    for s, v, r, rv in oriented.pairs():
        tgt = oriented.secondary(r)
        runs, _ = dirty_runs(oriented, s, v)
        base = os.path.join(out, f"{r}-{rv}")
        h = nbd.NBD()
        try:
            if tgt.nbd is not None:
                # Mutual TLS: the coordinator's certificate if it has one
                # (TCP control), else the node's own (one session PKI).
                tls.libnbd_setup(h, tgt.client_tls or tgt.tls)
            h.connect_uri(tgt.spec().uri(rv))
            size = h.get_size()
            fd = files.open_private(base + ".img", os.O_WRONLY | os.O_CREAT)
            try:
                os.ftruncate(fd, size)
                for off, length in runs:
                    length = min(length, size - off)
                    for o in range(off, off + length, 1 << 20):
                        n = min(1 << 20, off + length - o)
                        files.pwrite_all(fd, h.pread(n, o), o)
                os.fsync(fd)
            finally:
                os.close(fd)
        except nbd.Error as exc:
            raise FailoverError(f"cannot read {r}/{rv} to keep its overwritten"
                                f" blocks: {exc.string}") from exc
        except OSError as exc:
            raise LocalError(f"cannot write {base}.img: {exc.strerror or exc}") from exc
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass                # never connected
        files.write_atomic(base + ".runs.json", json.dumps(
            {"bytes": [[o, min(n, size - o)] for o, n in runs]}).encode())
        kept[f"{r}/{rv}"] = sum(min(n, size - o) for o, n in runs)
        log(f"{r}/{rv}: {kept[f'{r}/{rv}']} bytes about to be overwritten kept"
        f" in {base}.img")
    return kept


__all__ = ["adopt", "dirty_runs", "keep_overwritten", "overwritten"]
