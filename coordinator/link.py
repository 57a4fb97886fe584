"""The coordinator's handle on one slave's control channel.

This is the one place where ``nbdplugin.control.ControlError`` (and a reply
that is not JSON) becomes a coordinator error: ``SlaveUnreachable`` when the
socket does not answer, ``UnknownVolume`` when the slave does not serve a
volume we named, ``SlaveBusy`` when it is in another cut, ``SlaveError``
(with the slave's ``kind``) for any other refusal.
"""

from __future__ import annotations

import threading

from nbdplugin.control import ControlClient, ControlError

from .errors import CgmirrorError, SlaveBusy, SlaveError, SlaveUnreachable, UnknownVolume

DEFAULT_TIMEOUT = 10.0


class SlaveLink:
    """Requests to one slave.  Safe to use from several threads at once.

    ``volumes`` are the session's volumes on that slave (None: all it has).
    One connection is kept open and reused; a call made while another thread
    is using it opens a connection of its own, so a request stuck on a hung
    slave never blocks a request from another thread (an abort, a status).
    """

    def __init__(self, name: str, control: str, volumes: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.name = name
        self.control = control
        self.volumes = list(volumes) if volumes is not None else None
        self.timeout = timeout
        self._client = ControlClient(control, timeout)
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec, timeout: float = DEFAULT_TIMEOUT) -> "SlaveLink":
        """A link to the slave an ``nbdplugin.launch.SlaveSpec`` describes."""
        return cls(spec.name, spec.control, [v[0] for v in spec.volumes], timeout)

    def call(self, op: str, **args) -> dict:
        """Send one request and return the reply; raise a SlaveError if refused."""
        if self._lock.acquire(blocking=False):
            try:
                return self._call(self._client, op, args)
            finally:
                self._lock.release()
        with ControlClient(self.control, self.timeout) as client:
            return self._call(client, op, args)

    def _call(self, client: ControlClient, op: str, args: dict) -> dict:
        try:
            return client.call(op, **args)
        except ControlError as exc:
            raise translate(self.name, exc) from exc
        except ValueError as exc:   # a reply that is not JSON
            client.close()
            raise SlaveError(self.name, f"slave {self.name} sent a bad reply to {op}:"
                                        f" {exc}") from exc

    def status(self) -> dict:
        return self.call("status")

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def __repr__(self) -> str:
        return f"SlaveLink({self.name!r}, {self.control!r})"


def translate(slave: str, exc: ControlError) -> CgmirrorError:
    """The coordinator error for a ControlError from ``slave``."""
    msg = f"slave {slave}: {exc}"
    if exc.kind == "unreachable":
        return SlaveUnreachable(slave, msg, exc.kind)
    if exc.kind == "unknown":
        return UnknownVolume(slave, "", msg)
    if exc.kind == "busy":
        return SlaveBusy(slave, msg, exc.kind)
    return SlaveError(slave, msg, exc.kind)
