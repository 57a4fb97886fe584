"""Role changes of a session's sites: failover, failback, resync, switchover."""
