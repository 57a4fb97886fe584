"""The coordinator's handle on one slave's control channel.

This is the one place where ``coordinator.control.ControlError`` becomes a coordinator error: ``SlaveUnreachable`` when the
socket does not answer, ``UnknownVolume`` when the slave does not serve a
volume we named, ``SlaveBusy`` when it is in another cut, ``SlaveError``
(with the slave's ``kind``, a ``protocol.Kind``) for any other refusal and
for a reply that does not match its op's reply schema (kind REPLY: the
slave's fault, never a crash of ours).
"""

from __future__ import annotations

import ssl
import threading
import time
from typing import Callable

from coordinator.control import ControlClient, ControlError
from wire import address as wire_address
from wire.protocol import EPOCH_KEY, SESSION_KEY, Kind
from wire.tls import TLSConfigError

from .errors import (CgmirrorError, ConfigError, SlaveBusy, SlaveError, SlaveUnreachable,
                     UnknownVolume)

DEFAULT_TIMEOUT = 10.0


def gate_address(control: str, gate: str | None) -> str | None:
    """Where to reach a slave's gate socket, from its status's ``gate``:
    beside a unix control socket, the path it names; beside a TCP one, its
    port on the host we dial for control (the name its certificate is
    checked against).  None when it has none, or names the other kind."""
    if not gate:
        return None
    try:
        ctl, g = wire_address.parse(control), wire_address.parse(gate)
    except wire_address.AddressError:
        return None
    if ctl.is_tcp != g.is_tcp:
        return None
    return str(wire_address.Address("tcp", host=ctl.host, port=g.port)) if g.is_tcp else gate


class SlaveLink:
    """Requests to one slave.  Safe to use from several threads at once.

    ``volumes`` are the session's volumes on that slave (None: all it has).
    One connection is kept open and reused; a call made while another thread
    is using it opens a connection of its own, so a request stuck on a hung
    slave never blocks a request from another thread (an abort, a status).
    """

    def __init__(self, name: str, control: str, volumes: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, ssl_context: ssl.SSLContext | None = None,
                 session: str | None = None):
        self.name = name
        # Every request carries it (top-level "session"): a node serves one
        # session and refuses another's (wire/protocol.py).  None: a tool.
        self.session = session
        # The leading coordinator's epoch (cluster mode, coordinator/cluster.py),
        # sent top-level in every request like "session": a node refuses
        # data, state and role changes from a lower one, kind FENCED
        # (wire/protocol.py).  None: not sent (no cluster, or not leading).
        self.epoch: int | None = None
        self.control = control      # unix path or tcp:HOST:PORT (then ssl_context)
        self.volumes = list(volumes) if volumes is not None else None
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._client = ControlClient(control, timeout, ssl_context)
        self._lock = threading.Lock()
        # The slave's gate socket (freeze, thaw, abort served without its
        # GIL), learnt from its status; the establish uses it when known.
        self.gate: str | None = None

    @classmethod
    def from_spec(cls, spec, timeout: float = DEFAULT_TIMEOUT) -> "SlaveLink":
        """A link to the slave an ``coordinator.launch.SlaveSpec`` describes."""
        try:
            ctx = spec.client_context()
        except TLSConfigError as exc:
            # The coordinator's certificate directory: local configuration.
            raise ConfigError(f"slave {spec.name}: {exc}") from exc
        return cls(spec.name, spec.control, [v[0] for v in spec.volumes], timeout, ctx,
                   getattr(spec, "session", None))

    def envelope(self) -> dict:
        """The top-level keys every request of this link carries (session
        and leader epoch, where set); the establish's wire adds them too."""
        env = {}
        if self.session is not None:
            env[SESSION_KEY] = self.session
        if self.epoch is not None:
            env[EPOCH_KEY] = self.epoch
        return env

    def call(self, op: str, **args) -> dict:
        """Send one request and return the reply; raise a SlaveError if refused."""
        args = {**args, **self.envelope()}
        if self._lock.acquire(blocking=False):
            try:
                return _call(self.name, self._client, op, args)
            finally:
                self._lock.release()
        with self.channel() as ch:
            return _call(self.name, ch._client, op, args)

    def channel(self) -> "Channel":
        """A connection of its own (close it), for a thread that may block on it."""
        return Channel(self.name, ControlClient(self.control, self.timeout,
                                                   self.ssl_context), self.envelope())

    def status(self) -> dict:
        reply = self.call("status")
        self.gate = gate_address(self.control, reply.get("gate"))
        return reply

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def __enter__(self) -> "SlaveLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlaveLink({self.name!r}, {self.control!r})"


class Channel:
    """One dedicated connection to a slave; requests answered in order."""

    def __init__(self, name: str, client: ControlClient, envelope: dict | None = None):
        # envelope: the link's top-level keys (SlaveLink.envelope) when it was opened
        self.name, self._client, self._envelope = name, client, dict(envelope or {})

    def call(self, op: str, **args) -> dict:
        args = {**args, **self._envelope}
        return _call(self.name, self._client, op, args)

    def connect(self) -> None:
        """Connect now, so that a later call pays no connection set-up."""
        try:
            self._client.connect()
        except ControlError as exc:
            raise translate(self.name, exc) from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(name: str, client: ControlClient, op: str, args: dict) -> dict:
    try:
        return client.call(op, **args)
    except ControlError as exc:
        raise translate(name, exc) from exc


def translate(slave: str, exc: ControlError) -> CgmirrorError:
    """The coordinator error for a ControlError from ``slave``."""
    msg = f"slave {slave}: {exc}"
    if exc.kind is Kind.UNREACHABLE:
        return SlaveUnreachable(slave, msg, exc.kind)
    if exc.kind is Kind.UNKNOWN:
        return UnknownVolume(slave, "", msg)
    if exc.kind is Kind.BUSY:
        return SlaveBusy(slave, msg, exc.kind)
    return SlaveError(slave, msg, exc.kind)


# ------------------------------------------------------------ many links at once
# (the group's fan-out and the direction record's: below both)

def parallel(links: list[SlaveLink], fn: Callable[[SlaveLink], object],
            timeout: float | None = None) -> dict[str, object]:
    """Run ``fn(link)`` for every link at once; {name: result or the exception}.

    A call still running after ``timeout`` is reported as a SlaveUnreachable.
    """
    out: dict[str, object] = {}

    def run(link: SlaveLink) -> None:
        try:
            out[link.name] = fn(link)
        except Exception as exc:   # reported to the caller, which decides
            out[link.name] = exc

    threads = [threading.Thread(target=run, args=(lk,), name=f"cg-{lk.name}", daemon=True)
               for lk in links]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    for lk in links:
        if lk.name not in out:
            out[lk.name] = SlaveUnreachable(lk.name, f"slave {lk.name}: no answer"
                                                     f" within {timeout:.1f} s")
    return out


def check_links(links: list[SlaveLink]) -> None:
    names = [lk.name for lk in links]
    if not links or len(set(names)) != len(names):
        raise ValueError(f"links must name each slave once: {names}")


def statuses(links: list[SlaveLink]) -> dict[str, dict | CgmirrorError]:
    """Every slave's status reply (or the error reaching it), asked at once."""
    check_links(links)
    return parallel(links, lambda lk: lk.status(),
                    timeout=max(lk.timeout for lk in links) + 1)
