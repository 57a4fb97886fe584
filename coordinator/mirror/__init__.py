"""The continuous mirror of a session (``cgmirror mirror``): one home per part.

    cycle.py     ``Mirror``: one group after another (establish, drain, harden)
    recovery.py  the secondaries' recovery rule, plain functions over links
                 (the role commands run it too)
    status.py    the status document, RPO and severity
    control.py   the control socket the running mirror serves
    client.py    its clients: ``call``, ``subscribe``, ``control_path``
    events.py    the event stream (``cgmirror events``) and the peer watch
    metrics.py   the Prometheus endpoint (loaded only when configured)
    verify.py    online verify, between groups
    joins.py     the lineage check before every join of two sides (mirror,
                 resync, failback, switchover) and what each verdict does
    clustered.py cluster mode's part of a running mirror: its leadership,
                 what it publishes to etcd, the pause flag (coordinator/
                 cluster.py has the keys and the reasoning)
"""

from ..errors import MirrorError, MirrorNotRunning
from .client import VERIFY_TIMEOUT_S, call, connect, control_path, subscribe
from .control import handle
from .cycle import LIFT_AFTER, GroupResult, Mirror, replication_targets
from .recovery import Links, map_runs
from .status import percentile

__all__ = ["GroupResult", "LIFT_AFTER", "Links", "Mirror", "MirrorError",
           "MirrorNotRunning", "VERIFY_TIMEOUT_S", "call", "connect", "control_path",
           "handle", "map_runs", "percentile", "replication_targets", "subscribe"]
