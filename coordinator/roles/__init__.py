"""Role changes of a session's sites (DESIGN.md "Failover, failback, resync").

    failover.py  ``RoleSwitch``: failover (and the DR test), failback, resync,
                 switchover; how a node restarts in its other role (``Launcher``)
    resync.py    what a resync adds to an ordinary group: ``adopt`` (a baseline
                 without a copy) and ``keep_overwritten``

The recovery they run is the mirror's (coordinator/mirror/recovery.py); the
direction they record is coordinator/direction.py's.
"""
