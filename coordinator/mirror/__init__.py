"""The continuous mirror of a session (``cgmirror mirror``)."""

from .cycle import (GroupResult, LIFT_AFTER, Mirror, MirrorError, MirrorNotRunning,
                    VERIFY_TIMEOUT_S, call, connect, handle, map_runs, percentile)

__all__ = ["GroupResult", "LIFT_AFTER", "Mirror", "MirrorError", "MirrorNotRunning",
           "VERIFY_TIMEOUT_S", "call", "connect", "handle", "map_runs", "percentile"]
