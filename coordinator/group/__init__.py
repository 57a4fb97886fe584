"""Forming a point in time across slaves, and copying it: the reusable core.

``cgmirror copy`` is ``preflight`` -> ``full_volumes`` -> ``establish`` ->
``copy``; the consistency-group cycle reuses the same.  Every function takes
a list of ``link.SlaveLink`` (one per slave; build them with
``SlaveLink(name, control_path, volumes)`` or ``SlaveLink.from_spec(spec)``)
and raises only ``errors.CgmirrorError`` subclasses.

One module per job:

    fanout     one call per slave at once; aborts; a status retried once
    preflight  statuses, leftover cuts, next cut number, full or incremental,
               baselines still held
    pipeline   the establish's wire client: pipelined, one thread, select
    establish  FREEZE to all, THAW or ABORT to all (the consistency argument
               is at its top)
    copyjob    COPY to each slave, poll until every one is done; the reports
"""

from .copyjob import POLL_S, CopyReport, VolumeCopy, copy
from .establish import ABORT_GRACE_S, Established, SlaveTiming, establish
from .fanout import abort_all, abort_one
from .preflight import full_volumes, next_n, preflight, statuses, verify_baselines

__all__ = ["ABORT_GRACE_S", "POLL_S", "CopyReport", "Established", "SlaveTiming",
           "VolumeCopy", "abort_all", "abort_one", "copy", "establish", "full_volumes",
           "next_n", "preflight", "statuses", "verify_baselines"]
