"""Test-only failpoints: make a slave or the coordinator die at a named point.

``CGMIRROR_FAILPOINTS=name[@N][:stop][,name[@N][:stop]...]`` in the process's
environment kills it with SIGKILL the N-th time (default: first) execution
reaches ``hit(name)``; with ``:stop`` it stops itself instead (SIGSTOP: a
leader frozen at that point until the test sends SIGCONT, issue 19).  Used by the crash tests to cut the durability orderings at
every step.  Unset (the normal case) ``hit`` is one dict lookup.

Slave points: ``write:after-intent`` (intent durable, data not yet
written), ``write:after-data`` (data written, reply not sent),
``checkpoint:before-rename`` (new map written, not yet in place),
``checkpoint:after-map`` (map in place, intent not yet shrunk),
``preserve:after-save`` (PiT content saved, host write not yet done),
``copy:mid`` (copy half done), ``keep:after-save`` (a DR test's
primary: group h's block saved, the test write not yet done); the
secondary's ``secondary:*`` (nbdplugin/secondary.py).  Coordinator points
(coordinator/mirror/cycle.py):
``mirror:after-cut`` (thawed, before COPY), ``mirror:mid-drain`` (COPY
sent, first poll), ``mirror:after-prepare`` (every secondary prepared, no
commit sent), ``mirror:mid-commit`` (the first secondary committed, the
others not yet); in cluster mode ``mirror:leader-checked`` (leadership
checked, the freeze not yet sent) and ``mirror:commit-checked`` (checked,
no commit sent).
"""

import os
import signal
import threading

_armed: dict[str, int] = {}
_stops: set[str] = set()            # points that SIGSTOP instead of SIGKILL
for _item in filter(None, os.environ.get("CGMIRROR_FAILPOINTS", "").split(",")):
    _item, _stop, _ = _item.partition(":stop")
    _name, _, _nth = _item.partition("@")
    _armed[_name] = int(_nth or 1)
    if _stop:
        _stops.add(_name)
_lock = threading.Lock()


def hit(name: str) -> None:
    if name in _armed:
        with _lock:
            _armed[name] -= 1
            if _armed[name] == 0:
                os.kill(os.getpid(), signal.SIGSTOP if name in _stops else signal.SIGKILL)
