"""The mirror's Prometheus endpoint (``[mirror] metrics = "HOST:PORT"``).

Off by default.  Names follow the Prometheus naming guide: base units in the
name (``_seconds``, ``_bytes``), ``_total`` for counters, labels ``session``,
``slave`` and ``volume`` only::

    cgmirror_rpo_seconds{session}                  age of the last hardened group
    cgmirror_hardened_group{session}               its number (0: none yet)
    cgmirror_groups_formed_total{session}
    cgmirror_groups_failed_total{session}
    cgmirror_hold_seconds{session}                 histogram: write hold per cut
    cgmirror_drain_seconds{session}                histogram: drain per group
    cgmirror_sent_bytes_total{session}             bytes the drains sent
    cgmirror_dirty_bytes{session,slave,volume}     changed, not yet in a group
    cgmirror_slave_up{session,slave}               a primary answers its control
    cgmirror_secondary_up{session,slave}           a secondary answers

Counters and gauges are read from the ``Mirror`` at scrape time (one source
of truth, nothing to keep in step); the histograms are fed by ``observe``
when a group ends.  Per-volume and up/down values come from the
``events.PeerWatch`` replies, so a scrape never waits for a slave.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import LocalError

# Hold times are milliseconds, drains seconds to minutes.
HOLD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DRAIN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class _Collector:
    """Values read from the mirror when Prometheus scrapes."""

    def __init__(self, mirror):
        self.mirror = mirror

    def collect(self):
        m, name = self.mirror, self.mirror.session.name
        s = ["session"]

        def gauge(metric, text, value, labels=s, values=(name,)):
            g = GaugeMetricFamily(metric, text, labels=labels)
            if value is not None:
                g.add_metric(list(values), value)
            return g

        yield gauge("cgmirror_rpo_seconds", "Age of the last hardened group.", m.rpo())
        yield gauge("cgmirror_hardened_group", "Number of the last hardened group.",
                    m.hardened)
        for metric, text, value in (
                ("cgmirror_groups_formed", "Groups hardened.", m.formed),
                ("cgmirror_groups_failed", "Groups that failed.", m.failed),
                ("cgmirror_sent_bytes", "Bytes sent by the drains.", m.drain_bytes)):
            c = CounterMetricFamily(metric, text, labels=s)
            c.add_metric([name], value)
            yield c
        watch = m.peers
        replies = watch.replies if watch else {}
        dirty = GaugeMetricFamily("cgmirror_dirty_bytes",
                                  "Bytes changed on a primary, not yet in a group.",
                                  labels=["session", "slave", "volume"])
        up = {"primary": GaugeMetricFamily("cgmirror_slave_up",
                                           "A primary slave answers (1) or not (0).",
                                           labels=["session", "slave"]),
              "secondary": GaugeMetricFamily("cgmirror_secondary_up",
                                             "A secondary answers (1) or not (0).",
                                             labels=["session", "slave"])}
        for lk, role in (watch.links if watch else ()):
            r = replies.get(lk.name)
            if r is None:
                continue            # not polled yet: no sample, not a false 0
            up[role].add_metric([name, lk.name], 0 if isinstance(r, Exception) else 1)
            if role == "primary" and not isinstance(r, Exception):
                for v, vs in r.get("volumes", {}).items():
                    dirty.add_metric([name, lk.name, v],
                                     vs.get("cr_blocks", 0) * vs["granularity"])
        yield dirty
        yield up["primary"]
        yield up["secondary"]


class Metrics:
    """The endpoint of one mirror: ``start()``, ``observe(result)``, ``close()``."""

    def __init__(self, mirror):
        self.mirror = mirror
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(mirror))
        self.hold = Histogram("cgmirror_hold_seconds", "Write hold time of a cut.",
                              ["session"], buckets=HOLD_BUCKETS, registry=self.registry)
        self.drain = Histogram("cgmirror_drain_seconds", "Drain time of a group.",
                               ["session"], buckets=DRAIN_BUCKETS, registry=self.registry)
        self._server = None
        self._thread = None

    def start(self, address: tuple[str, int]) -> "Metrics":
        host, port = address
        try:
            self._server, self._thread = start_http_server(port, host,
                                                           registry=self.registry)
        except OSError as exc:
            raise LocalError(f"cannot serve metrics on {host}:{port}:"
                             f" {exc.strerror or exc} ([mirror] metrics)") from exc
        return self

    @property
    def port(self) -> int:
        return self._server.server_port

    def observe(self, measures: dict) -> None:
        """A group ended: its hold and drain times (milliseconds) if it had them."""
        name = self.mirror.session.name
        if measures.get("hold_ms") is not None:
            self.hold.labels(name).observe(measures["hold_ms"] / 1000)
        if measures.get("drain_ms") is not None:
            self.drain.labels(name).observe(measures["drain_ms"] / 1000)

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None
