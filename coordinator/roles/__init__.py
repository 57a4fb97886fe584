"""Role changes of a session's sites (DESIGN.md "Failover, failback, resync").

    failover.py  ``RoleSwitch``: failover (and the DR test), failback, resync,
                 switchover; a node changes role through its own ``role`` op
                 and its supervisor starts it again (``become``)
    resync.py    what a resync adds to an ordinary group: ``adopt`` (a baseline
                 without a copy) and ``keep_overwritten``

The recovery they run is the mirror's (coordinator/mirror/recovery.py); the
direction they record on the nodes is coordinator/direction.py's; the
lineage checks before each join are coordinator/mirror/joins.py's.
"""
