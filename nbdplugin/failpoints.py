"""Test-only failpoints: make the slave die at a named point.

``CGMIRROR_FAILPOINTS=name[,name...]`` in the slave's environment kills the
process with SIGKILL the first time execution reaches ``hit(name)``.  Used by
the crash tests to cut the durability orderings at every step.  Unset (the
normal case) ``hit`` is one dict lookup.

Points: ``write:after-intent`` (intent durable, data not yet written),
``write:after-data`` (data written, reply not sent), ``checkpoint:before-rename``
(new map written, not yet in place), ``checkpoint:after-map`` (map in place,
intent not yet shrunk), ``preserve:after-save`` (PiT content saved, host write
not yet done), ``copy:mid`` (copy half done).
"""

import os
import signal

_armed = frozenset(filter(None, os.environ.get("CGMIRROR_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
