"""The mirror under load: RPO, drain amplification, hold times, host write cost.

    .venv/bin/python bench/bench_mirror.py [--size-mib 128] [--seconds 20]
        [--subblock BYTES] [--pin] [--link 1gbit,20ms] [--db] [--no-default]
        [--max-drain-ms 5000] [--link-load 0.5]

``make bench-mirror`` runs ``--pin --link 1gbit,20ms --db`` (all four).

Runs (each a fresh rig; the fields of each under its own prefix, the
default run's without one, all in one JSON line last):

  default  the two-by-two rig of harness/mirrorrig.py on /dev/shm (2 slaves
           x 2 volumes, their two secondaries, unix sockets, everything on
           both cores), 4 KiB random writes.
  pin_     (``--pin``) the same rig as two hosts would run it: the
           primaries' nbdkit and the writers (this process) on core 0, the
           secondaries and ``mirror run`` on core 1 (sched_setaffinity,
           inherited from the thread that starts them).
  link_    (``--link RATE,RTT``, root) the sites in network namespaces:
           site a holds the primaries, the writers and ``mirror run`` (the
           master at the primary site, as Global Mirror's; freeze and thaw
           stay local); site r the secondaries, reached over TCP with
           mutual TLS (session PKI) through ``tbf`` at RATE on r's link and
           harness/relay.py, which delays every byte by RTT/2 each way (no
           netem here; see relay.py for why not nbdkit's delay filter).  The
           replication NBD and the secondaries' control (PREPARE, COMMIT)
           pay the link; the host writes do not.  ``relay_cpu_s``: the CPU
           seconds the relay used (from its start), a cost of the rig on
           the shared cores, not of the product.
  db_      (``--db``) the default rig with a database-like workload: per
           volume, sequential 16 KiB log writes, each followed by a flush
           (one commit in flight, as a log writer), at most one op in five;
           the rest random 8-16 KiB page writes, 90% of them into a hot set
           of 1/8 of the data area.  Log in the first 1/16 of the volume.
           Its amplification can fall below 1: a page rewritten within one
           group is sent once.

Phases of every run:

1. Maximum rate: the writers (one libnbd connection per volume, ``--qd`` in
   flight each) as fast as they go for --max-seconds, no mirror running
   (the plugin records changes as it always does).
2. Base: the same writers paced at half that rate, still no mirror, for
   --base-seconds: their latency is the base of ``write_p99_ratio``.
3. ``cgmirror mirror run`` as a child process, groups back to back
   (``interval_ms = 0``); its first group (the full copy) hardens.
4. Sustained: the writers at the same pace as 2, the mirror running, for
   --seconds.  Every 100 ms the mirror's status is sampled: ``rpo_s`` is
   the age of the last hardened group (its cut to now).

Fields (per run):

- ``rpo_p50_s``, ``rpo_p99_s``: of the 100 ms samples (nearest rank).
- ``drain_amplification``: bytes the groups sent to the remote (the
  secondaries' ``replication_bytes`` over phase 4) / bytes the host wrote.
  ``block_amplification``: the blocks the groups covered (the history's
  bytes, groups cut during phase 4) / bytes written.
- ``hold_p99_ms``/``hold_p50_ms``: the mirror's freeze hold (gate closed to
  thawed).  ``write_p99_ms``/``write_max_ms``: the host writes' latency in
  phase 4 (db: page writes, and log write + its flush as one commit);
  ``write_p99_base_ms`` the same writers' p99 in phase 2;
  ``write_p99_ratio`` = write_p99_ms / write_p99_base_ms.
- ``groups_per_s`` (hardened, cut in phase 4), ``drain_mb_s`` (bytes sent
  / the time drains ran within phase 4, whichever group);
  ``drain_request_bytes``: bytes per replication request (when the
  secondaries count ``replication_requests`` in their status; else null):
  over a link a drain with k requests in flight sends at most k x this
  per round trip; ``groups_not_hardened`` and
  ``groups_drain_timeout`` (of those cut in phase 4), ``max_drain_ms``
  (the session's limit, ``--max-drain-ms``: 5000 by default, 30000 on a
  link, where a group takes longer), ``groups_failed`` (the mirror's
  count since it started).
- ``unique_bytes_per_group``: mean over the groups of phase 4 of the bytes
  the host wrote between the group's cut and the previous one, each 4 KiB
  block once (what a perfect drain must send).  ``link_mb_s``: the link's
  rate (``--link``), or, on unix sockets, the rate the first group (the full
  copy) drained at.  ``rtt_ms``: the link's round trip (0 on unix sockets).
  ``harden_ms``: median over those groups of prepare + commit.
  ``rpo_bound_s`` = unique_bytes_per_group / link rate + rtt + harden: the
  least a group can take from cut to hardened for what was written.  RPO
  just before a group hardens is the age of the previous cut, so back-to-
  back groups at the bound give an rpo_p99_s near twice it.
  ``rpo_vs_bound`` = rpo_p99_s / rpo_bound_s.  The bound grows with the
  product's own group length (a longer group gathers more unique bytes);
  ``rpo_floor_s`` = (rtt + harden) / (1 - bytes written per second / link
  rate) does not: the group length at which each group carries what was
  written during the one before (every byte counted, so an upper bound of
  the floor); none when the writes outrun the link.
- Where a group's time goes, medians over the groups of phase 4:
  ``group_ms_p50`` (cut to hardened), ``coordination_ms_p50`` (freeze sent
  to all frozen), ``drain_ms_p50``, ``harden_ms`` (above) and
  ``between_ms_p50`` (the previous group hardened to this one's cut).
- ``goal_rpo_p99_s`` (rpo_p99_s <= 1.0), ``goal_drain_amplification``
  (<= 1.5), ``goal_write_p99_ratio`` (<= 2), ``goal_hold_p99_ms`` (<= 1).
- ``max_write_iops``, ``target_write_iops`` (half of it: phases 2 and 4),
  ``base_write_iops`` (achieved in phase 2), ``load_write_iops`` (achieved in phase 4; ops: a db commit is one).
  On a link the pace is at most --link-load (0.5) of the link's rate in
  bytes written: a link is sized for what it carries, and past its rate no
  group catches up.
- ``loadavg_start``, ``loadavg`` (1 min, at the start and end of the run;
  2 cores, shared with other users: no figure without it).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from coordinator import launch, session as session_mod  # noqa: E402
from coordinator.control import ControlClient, ControlError  # noqa: E402
from coordinator.history import History  # noqa: E402
from coordinator.mirror import MirrorNotRunning, call, percentile  # noqa: E402
from harness.mirrorrig import ORDER, SIZE, session_text  # noqa: E402

BLOCK = 4096
MiB = 1 << 20
GOALS = {"rpo_p99_s": 1.0, "drain_amplification": 1.5, "write_p99_ratio": 2.0,
         "hold_p99_ms": 1.0}


# -- workloads --------------------------------------------------------------

class Random4k:
    """4 KiB random writes over the whole volume."""

    name = "random"
    mean_bytes = BLOCK

    def __init__(self, size: int, rng: random.Random):
        self.blocks, self.rng = size // BLOCK, rng

    def next(self, commit_free: bool) -> tuple[int, int, bool]:
        """(offset, length, a log write to flush after)."""
        return self.rng.randrange(self.blocks) * BLOCK, BLOCK, False


class Database:
    """A database's writes: sequential 16 KiB log writes, each flushed
    (one commit in flight), one op in five; random 8-16 KiB page writes,
    90% into a hot set of 1/8 of the data area."""

    name = "db"
    LOG_BYTES = 16 << 10
    LOG_SHARE = 0.2
    HOT_SHARE = 0.9
    mean_bytes = LOG_SHARE * LOG_BYTES + (1 - LOG_SHARE) * (12 << 10)

    def __init__(self, size: int, rng: random.Random):
        self.rng = rng
        self.log_blocks = size // 16 // BLOCK
        self.data0 = self.log_blocks
        self.data_blocks = size // BLOCK - self.data0
        self.hot_blocks = self.data_blocks // 8
        self.log_at = 0

    def next(self, commit_free: bool) -> tuple[int, int, bool]:
        rng = self.rng
        if commit_free and rng.random() < self.LOG_SHARE:
            n = self.LOG_BYTES // BLOCK
            if self.log_at + n > self.log_blocks:
                self.log_at = 0                     # the log wraps
            off = self.log_at * BLOCK
            self.log_at += n
            return off, self.LOG_BYTES, True
        pages = rng.choice((2, 3, 4))               # 8, 12 or 16 KiB
        span = self.hot_blocks if rng.random() < self.HOT_SHARE else self.data_blocks
        return (self.data0 + rng.randrange(span - pages)) * BLOCK, pages * BLOCK, False


WORKLOADS = {"random": Random4k, "db": Database}


class Writer(threading.Thread):
    """One export's writes from ``workload``, ``qd`` in flight, at ``rate``
    ops/s (None: as fast as they go), until ``stop`` is set.  Records each
    op's latency and, when ``record``, each write's (unix time, offset,
    length).  One buffer for every write: python3-libnbd 1.14 keeps each
    buffer it is given."""

    def __init__(self, uri: str, size: int, qd: int, rate: float | None,
                 stop: threading.Event, seed: int, workload: str = "random",
                 record: bool = False):
        super().__init__(name=f"writer-{uri}", daemon=True)
        self.uri, self.qd, self.rate, self.stop, self.record = uri, qd, rate, stop, record
        self.work = WORKLOADS[workload](size, random.Random(seed))
        self.done = 0
        self.latencies: list[float] = []
        self.writes: list[tuple[float, int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        h = nbd.NBD()
        h.set_handle_name(f"bench-{self.name}")
        bufs = {}                   # one slice per length, made once
        flushes: list[float] = []   # log writes done, their flush not yet sent
        commit = [False]            # a commit (log write + flush) in flight
        try:
            h.connect_uri(self.uri)
            t0, issued = time.monotonic(), 0

            def done(start, err, count=True):
                if err.value:
                    self.error = OSError(err.value, os.strerror(err.value))
                if count:
                    self.latencies.append(time.monotonic() - start)
                    self.done += 1
                return 1

            def logged(start, err):
                # libnbd forbids a command from inside a callback: the loop
                # sends the flush.
                done(start, err, count=False)
                flushes.append(start)
                return 1

            def flushed(start, err):
                commit[0] = False
                return done(start, err)

            while not self.stop.is_set() and self.error is None:
                if flushes:
                    s = flushes.pop()
                    h.aio_flush(completion=lambda err, s=s: flushed(s, err))
                    continue
                due = self.rate is None or issued < (time.monotonic() - t0) * self.rate
                if due and h.aio_in_flight() < self.qd:
                    off, n, log = self.work.next(not commit[0])
                    b = bufs.get(n)
                    if b is None:
                        b = bufs[n] = nbd.Buffer.from_bytearray(bytearray(os.urandom(n)))
                    start = time.monotonic()
                    if self.record:
                        self.writes.append((time.time(), off, n))
                    if log:
                        commit[0] = True
                        h.aio_pwrite(b, off, completion=lambda err, s=start: logged(s, err))
                    else:
                        h.aio_pwrite(b, off, completion=lambda err, s=start: done(s, err))
                    issued += 1
                    continue
                # The completion callbacks retire each command (they return 1).
                if h.aio_in_flight() > 0:
                    h.poll(1)               # a reply, or 1 ms
                else:
                    self.stop.wait(0.0005)  # paced, nothing in flight: not yet due
            while h.aio_in_flight() > 0:
                h.poll(1000)
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass


def write_phase(uris, size, qd, rate_each, seconds, seed, workload="random",
                record=False):
    """Run one writer per URI for ``seconds``; (ops done, latencies,
    [(volume index, writes)])."""
    stop = threading.Event()
    ws = [Writer(u, size, qd, rate_each, stop, seed + i, workload, record)
          for i, u in enumerate(uris)]
    for w in ws:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in ws:
        w.join(60)
    errs = [w.error for w in ws if w.error]
    if errs:
        raise RuntimeError(f"a writer failed: {errs[0]}")
    return (sum(w.done for w in ws), [x for w in ws for x in w.latencies],
            [(i, w.writes) for i, w in enumerate(ws)])


def unique_per_group(cuts: list[float], writes) -> list[int]:
    """For each consecutive pair of cut times, the bytes written between
    them, each (volume, 4 KiB block) once."""
    flat = sorted((t, vol, off, n) for vol, ws in writes for t, off, n in ws)
    times = [w[0] for w in flat]
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        blocks = set()
        for _, vol, off, n in flat[bisect.bisect_left(times, lo):
                                   bisect.bisect_left(times, hi)]:
            for b in range(off // BLOCK, (off + n + BLOCK - 1) // BLOCK):
                blocks.add((vol, b))
        out.append(len(blocks) * BLOCK)
    return out


# -- rigs -------------------------------------------------------------------

class Rig:
    """Where the nodes and ``mirror run`` live: here, on both cores."""

    prefix = ""
    link_bytes_s: float | None = None    # None: measured from the first group
    rtt_s = 0.0
    max_drain_ms = 5000

    def __init__(self, base: str, size: int, subblock: int | None):
        self.base, self.size, self.subblock = base, size, subblock
        self.procs: list[launch.SlaveProcess] = []
        self.mirror: subprocess.Popen | None = None

    def session_keys(self) -> dict:
        return {}

    def write_session(self) -> None:
        self.path = os.path.join(self.base, "m.toml")
        with open(self.path, "w") as f:
            f.write(session_text(interval_ms=0, max_drain_ms=self.max_drain_ms, rpo=30,
                                 **self.session_keys())
                    .replace(f"size = {SIZE}", f"size = {self.size}"))
        self.sess = session_mod.load(self.path)

    def specs(self, group: str) -> list:
        nodes = self.sess.slaves if group == "primary" else self.sess.secondaries
        out = [n.spec() for n in nodes]
        if self.subblock is not None:
            for spec in out:
                spec.env = {**spec.env, "CGMIRROR_SUBBLOCK": str(self.subblock)}
        return out

    def start_nodes(self) -> None:
        for spec in self.specs("primary") + self.specs("secondary"):
            self.procs.append(launch.start(spec))
        self.by = {p.spec.name: p.spec for p in self.procs}
        self.uris = [self.by[s].uri(v) for s, v in ORDER]

    def start_mirror(self) -> None:
        log = open(os.path.join(self.base, "mirror.log"), "ab")
        self.mirror = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "-s", self.path, "mirror", "run"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT))
        log.close()

    def extra(self) -> dict:
        """The rig's own fields, read at the end of phase 4."""
        return {}

    def remote_bytes(self) -> tuple[int, int | None]:
        """The secondaries' replication bytes and requests received (None
        when a secondary does not count its requests)."""
        total, requests = 0, 0
        for spec in self.specs("secondary"):
            # A status call over the link once met a closed connection at
            # load 29 -- likely the node's 2 s TLS handshake deadline
            # (nbdplugin/server.py): a counter read may be retried.
            for attempt in range(3):
                try:
                    with ControlClient(spec.control, 30, spec.client_context()) as c:
                        vols = c.call("status")["volumes"].values()
                    break
                except ControlError as exc:
                    if attempt == 2:
                        raise
                    print(f"bench_mirror: {spec.name} status: {exc}; again",
                          file=sys.stderr, flush=True)
                    time.sleep(0.5)
            for v in vols:
                total += v["replication_bytes"]
                if requests is not None and "replication_requests" in v:
                    requests += v["replication_requests"]
                else:
                    requests = None
        return total, requests

    def close(self) -> None:
        if self.mirror is not None and self.mirror.poll() is None:
            self.mirror.terminate()
            try:
                self.mirror.wait(60)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait(30)
        for p in self.procs:
            p.stop(timeout=10)


class PinRig(Rig):
    """Two hosts' worth of cores: the primaries and the writers on core 0,
    the secondaries and the mirror on core 1.  The thread that starts a
    process gives it its mask; this thread ends on core 0, so the writer
    threads it starts run there."""

    prefix = "pin_"
    PRIMARY, SECONDARY = {0}, {1}

    def __init__(self, *a):
        super().__init__(*a)
        self.all_cores = os.sched_getaffinity(0)
        if len(self.all_cores) < 2:
            raise SystemExit(f"--pin needs 2 cores; this process may use"
                             f" {sorted(self.all_cores)}")

    def start_nodes(self) -> None:
        os.sched_setaffinity(0, self.SECONDARY)
        for spec in self.specs("secondary"):
            self.procs.append(launch.start(spec))
        os.sched_setaffinity(0, self.PRIMARY)
        for spec in self.specs("primary"):
            self.procs.append(launch.start(spec))
        self.by = {p.spec.name: p.spec for p in self.procs}
        self.uris = [self.by[s].uri(v) for s, v in ORDER]

    def start_mirror(self) -> None:
        os.sched_setaffinity(0, self.SECONDARY)
        try:
            super().start_mirror()
        finally:
            os.sched_setaffinity(0, self.PRIMARY)

    def close(self) -> None:
        try:
            super().close()
        finally:
            os.sched_setaffinity(0, self.all_cores)


class LinkRig(Rig):
    """Run inside site a (see ``link_run``): the primaries, the writers and
    the mirror here, the secondaries in site r behind the relay."""

    prefix = "link_"
    # A group over the link drains for longer than over unix sockets; the
    # rig's usual budget (harness/mirrorrig.py), so that groups harden and
    # their time shows, rather than a loop of drain timeouts.
    max_drain_ms = 30000

    def __init__(self, base, size, subblock, net, rate_bytes_s: float, rtt_s: float):
        super().__init__(base, size, subblock)
        self.net, self.link_bytes_s, self.rtt_s = net, rate_bytes_s, rtt_s
        self.popens: list[subprocess.Popen] = []

    def session_keys(self) -> dict:
        from coordinator import pki
        from harness.sites import free_port
        r = self.net["r"]
        d = os.path.join(self.base, "pki")
        pki.init(d, "m")
        for name in ("coordinator", "s1", "s2"):
            pki.issue(d, name)
        for name in ("r1", "r2"):
            pki.issue(d, name, ips=[r.addr])
        self.ports = [free_port(r) for _ in range(4)]
        p = iter(self.ports)
        return {"session": {"pki": d},
                "nodes": {name: {"nbd_socket": None, "control": f"tcp:{r.addr}:{next(p)}",
                                 "nbd": f"tcp:{r.addr}:{next(p)}"}
                          for name in ("r1", "r2")}}

    def start_nodes(self) -> None:
        from harness.sites import SitesError
        r = self.net["r"]
        # The secondaries listen on 127.0.0.1 of site r, at the port the
        # session names on r's address, where the relay listens.
        relay = r.popen([sys.executable, "-m", "harness.relay", "--one-way-ms",
                         str(self.rtt_s * 1000 / 2),
                         *[f"{r.addr}:{p}=127.0.0.1:{p}" for p in self.ports]],
                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.popens.append(relay)
        if relay.stdout.readline().strip() != "ready":
            raise SitesError(f"the relay in site r exited with {relay.wait()}")
        for spec in self.specs("secondary"):
            local = dataclasses.replace(
                spec, nbd=spec.nbd.replace(r.addr, "127.0.0.1"),
                control=spec.control.replace(r.addr, "127.0.0.1"))
            cmd = launch.prepare(local)
            with open(spec.logfile, "ab") as log:
                self.popens.append(r.popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=log, env=launch.slave_env(spec.env)))
            deadline = time.monotonic() + 60
            while True:
                try:
                    # nbdkit writes its pidfile once it listens.
                    if not os.path.exists(spec.pidfile):
                        raise FileNotFoundError(spec.pidfile)
                    with ControlClient(spec.control, 5, spec.client_context()) as c:
                        c.call("status")
                    break
                except Exception:
                    if self.popens[-1].poll() is not None or time.monotonic() > deadline:
                        raise SitesError(f"secondary {spec.name} in site r did not answer;"
                                         f" see {spec.logfile}") from None
                    time.sleep(0.1)
        for spec in self.specs("primary"):
            self.procs.append(launch.start(spec))
        self.by = {p.spec.name: p.spec for p in self.procs}
        self.uris = [self.by[s].uri(v) for s, v in ORDER]

    def extra(self) -> dict:
        # The relay is this rig's own cost on the shared cores, not the link's.
        import psutil
        t = psutil.Process(self.popens[0].pid).cpu_times()
        return {"relay_cpu_s": round(t.user + t.system, 2)}

    def close(self) -> None:
        from harness.sites import stop
        try:
            super().close()             # the mirror, then the primaries
        finally:
            for p in reversed(self.popens):     # the secondaries, then the relay
                stop(p, 10)


# -- one run ----------------------------------------------------------------

def measure(rig: Rig, a, workload: str) -> dict:
    """Phases 1-4 on ``rig`` (started here, closed by the caller)."""
    load0 = round(os.getloadavg()[0], 2)
    if a.max_drain_ms is not None:
        rig.max_drain_ms = a.max_drain_ms
    rig.write_session()
    os.chdir(rig.base)
    rig.start_nodes()
    uris, size, sess = rig.uris, rig.size, rig.sess
    n_max, _, _ = write_phase(uris, size, a.qd, None, a.max_seconds, a.seed, workload)
    max_rate = n_max / a.max_seconds
    rate = max_rate / 2
    if rig.link_bytes_s is not None:
        # A link is sized for the writes it carries: past its rate no group
        # ever catches up and RPO only grows.
        rate = min(rate, a.link_load * rig.link_bytes_s / WORKLOADS[workload].mean_bytes)
    n_base, base_lat, _ = write_phase(uris, size, a.qd, rate / len(uris), a.base_seconds,
                                      a.seed + 50, workload)

    rig.start_mirror()
    # The first full copy, then the sustained phase.
    deadline = time.monotonic() + 300
    while True:
        try:
            if (call(sess.mirror.control, "status").get("hardened") or 0) >= 1:
                break
        except MirrorNotRunning:
            pass
        if rig.mirror.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the mirror never hardened its first group;"
                               " its log follows")
        time.sleep(0.1)
    remote0, req0 = rig.remote_bytes()
    t_start = time.time()
    rpo: list[float] = []
    out: dict = {}

    def sustained():
        out["n"], out["lat"], out["writes"] = write_phase(
            uris, size, a.qd, rate / len(uris), a.seconds, a.seed + 100, workload, True)
    th = threading.Thread(target=sustained, name="writers")
    th.start()
    next_t = time.monotonic()
    while th.is_alive():
        st = call(sess.mirror.control, "status")
        if st.get("rpo_s") is not None:
            rpo.append(st["rpo_s"])
        next_t += 0.1
        time.sleep(max(0.0, next_t - time.monotonic()))
    th.join()
    extra = rig.extra()
    if "n" not in out:
        raise RuntimeError("the writers failed (see above)")
    t_end = time.time()
    remote, req = rig.remote_bytes()
    remote -= remote0
    req = req - req0 if req is not None and req0 is not None else None
    st = call(sess.mirror.control, "status")
    with History(sess.state_dir) as h:
        groups = sorted(h.groups(), key=lambda g: g["n"])
    hardened = [g for g in groups if g["outcome"] == "hardened" and g["cut"]]
    rows = [g for g in hardened if t_start <= _unix(g["cut"]) <= t_end]
    missed = [g for g in groups if g["outcome"] not in ("hardened", "running") and g["cut"]
              and t_start <= _unix(g["cut"]) <= t_end]
    blocks = sum(g["bytes"] or 0 for g in rows)
    # The time the drains ran within phase 4, as the bytes were counted: a
    # drain that began before it, timed out or had not ended counts too.
    drain_s = 0.0
    for g in groups:
        if not g["cut"]:
            continue
        d0 = _unix(g["cut"]) + (g["coordination_ms"] or 0) / 1000
        d1 = t_end if g["outcome"] == "running" else d0 + (g["drain_ms"] or 0) / 1000
        drain_s += max(0.0, min(d1, t_end) - max(d0, t_start))
    written = sum(n for _, ws in out["writes"] for _, _, n in ws)
    lat = out["lat"]

    # The bound: what a perfect drain must send per group, over the link.
    cuts = [_unix(g["cut"]) for g in hardened]
    first = bisect.bisect_left(cuts, t_start)
    # Writes are recorded from t_start, and none were made between the
    # base phase and t_start: the window of the first group cut in the
    # phase starts at the cut before it.
    uniq = unique_per_group(cuts[max(first - 1, 0):bisect.bisect_right(cuts, t_end)],
                            out["writes"])
    link = rig.link_bytes_s
    if link is None and hardened and hardened[0]["drain_ms"]:
        link = hardened[0]["bytes"] / (hardened[0]["drain_ms"] / 1000)
    harden = [(g["prepare_ms"] or 0) + (g["commit_ms"] or 0) for g in rows]
    harden_s = statistics.median(harden) / 1000 if harden else None
    bound = (statistics.mean(uniq) / link + rig.rtt_s + harden_s) \
        if uniq and link and harden_s is not None else None

    # Where a group's time goes (medians over the phase's hardened groups).
    def p50_ms(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 1) if values else None
    by_n = {g["n"]: g for g in groups}
    where = {
        "group_ms_p50": p50_ms([(_unix(g["hardened"]) - _unix(g["cut"])) * 1000
                                for g in rows if g["hardened"]]),
        "coordination_ms_p50": p50_ms([g["coordination_ms"] for g in rows]),
        "drain_ms_p50": p50_ms([g["drain_ms"] for g in rows]),
        "between_ms_p50": p50_ms([(_unix(g["cut"]) - _unix(by_n[g["n"] - 1]["hardened"]))
                                  * 1000 for g in rows
                                  if (by_n.get(g["n"] - 1) or {}).get("hardened")]),
    }

    # The floor whatever the group length: a group that carries what was
    # written during the one before, at the link's rate, plus the round trip
    # and the harden, T = (rtt + harden) / (1 - write rate / link rate);
    # none if the writes outrun the link.
    w_rate = written / a.seconds
    floor = (rig.rtt_s + harden_s) / (1 - w_rate / link) \
        if link and harden_s is not None and w_rate < link else None

    p99 = percentile(lat, 99) if lat else None
    p99_base = percentile(base_lat, 99) if base_lat else None
    res = {
        "rpo_p50_s": percentile(rpo, 50), "rpo_p99_s": percentile(rpo, 99),
        "rpo_samples": len(rpo),
        "drain_amplification": round(remote / written, 2) if written else None,
        "block_amplification": round(blocks / written, 2) if written else None,
        "granularity": rig.by["s1"].granularity,
        "write_bytes": BLOCK if workload == "random" else "4K-16K",
        "workload": workload, "subblock": rig.subblock,
        "hold_p99_ms": st["hold_ms"]["p99"], "hold_p50_ms": st["hold_ms"]["p50"],
        "write_p99_ms": round(p99 * 1000, 2) if lat else None,
        "write_max_ms": round(max(lat) * 1000, 2) if lat else None,
        "write_p99_base_ms": round(p99_base * 1000, 3) if base_lat else None,
        "write_p99_ratio": round(p99 / p99_base, 2) if p99 and p99_base else None,
        "groups_per_s": round(len(rows) / (t_end - t_start), 2),
        "drain_mb_s": round(remote / 1e6 / drain_s, 1) if drain_s else None,
        "drain_request_bytes": round(remote / req) if req else None,
        "unique_bytes_per_group": round(statistics.mean(uniq)) if uniq else None,
        "link_mb_s": round(link / 1e6, 1) if link else None,
        "rtt_ms": round(rig.rtt_s * 1000, 1),
        "harden_ms": round(harden_s * 1000, 2) if harden_s is not None else None,
        "rpo_bound_s": round(bound, 3) if bound else None,
        "rpo_floor_s": round(floor, 3) if floor else None,
        **where,
        # Asked for half the maximum (on a link, at most --link-load of its
        # rate); what the writers achieved with the mirror draining on the
        # same two cores may fall short of it.
        "max_write_iops": round(max_rate), "target_write_iops": round(rate),
        "base_write_iops": round(n_base / a.base_seconds),
        "load_write_iops": round(out["n"] / a.seconds),
        "volumes": len(uris), "volume_mib": size // MiB, "seconds": a.seconds,
        "groups_failed": st["groups_failed"],
        "groups_not_hardened": len(missed),
        "groups_drain_timeout": sum(g["outcome"] == "drain-timeout" for g in missed),
        "max_drain_ms": rig.max_drain_ms,
    }
    res.update(extra)
    rpo99 = res["rpo_p99_s"]
    res["rpo_vs_bound"] = round(rpo99 / bound, 2) if rpo99 is not None and bound else None
    for k, goal in GOALS.items():
        res[f"goal_{k}"] = res[k] is not None and res[k] <= goal
    if not rows:
        # No group formed in the phase: say where to look before the files go.
        with open(os.path.join(rig.base, "mirror.log"), errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        print(f"bench_mirror: {rig.prefix or 'default '}run: no group hardened in"
              f" {a.seconds} s; the mirror's last lines:", *tail, sep="\n  ",
              file=sys.stderr, flush=True)
    res.update(loadavg_start=load0, loadavg=round(os.getloadavg()[0], 2),
               cores=os.cpu_count())
    return res


def tails(base: str, lines: int = 8) -> None:
    """The last lines of every log under ``base`` to stderr: a failed run's
    files are removed with it."""
    for d, _, names in sorted(os.walk(base)):
        for name in sorted(names):
            if name.endswith(".log"):
                with open(os.path.join(d, name), errors="replace") as f:
                    tail = f.read().splitlines()[-lines:]
                print(f"bench_mirror: {os.path.relpath(os.path.join(d, name), base)}:",
                      *tail, sep="\n  ", file=sys.stderr, flush=True)


def local_run(rig_class, a, workload: str) -> dict:
    base = tempfile.mkdtemp(prefix="cgm-bench-mirror-", dir="/dev/shm")
    return measured(rig_class(base, a.size_mib * MiB, a.subblock), base, a, workload)


def measured(rig, base: str, a, workload: str) -> dict:
    """``measure`` on ``rig`` (built in ``base``); its logs' tails if it
    fails; the rig closed and ``base`` removed after."""
    try:
        return measure(rig, a, workload)
    except BaseException:
        tails(base)
        raise
    finally:
        rig.close()
        os.chdir(ROOT)
        shutil.rmtree(base, ignore_errors=True)


# -- the link run: namespaces ------------------------------------------------

def parse_link(text: str) -> tuple[float, float]:
    """``1gbit,20ms`` -> (bytes/s, round trip s); a one-line error else."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)bit\s*,\s*([\d.]+)\s*(ms|s)\s*", text.lower())
    if not m or not float(m.group(1)) > 0:
        raise SystemExit(f"bench_mirror: --link {text!r}: give RATE,RTT as in"
                         f" 1gbit,20ms (rate in kbit|mbit|gbit, round trip in ms|s)")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    rtt = float(m.group(3)) / (1000 if m.group(4) == "ms" else 1)
    return bits / 8, rtt


def link_run(a) -> dict:
    """Make sites a and r, limit r's link, and run ``--inside`` site a."""
    from harness.sites import Sites, unavailable
    why = unavailable()
    if why:
        raise SystemExit(f"bench_mirror: --link: {why}")
    rate, _ = parse_link(a.link)
    with Sites(("a", "r"), subnet="10.213.120.0/24") as net:
        net.rate("r", rate * 8 / 1e6)
        doc = {"names": net.names, "subnet": str(net.subnet), "tag": net.tag,
               "hub": net.hub, "sites": {n: (s.netns, s.addr) for n, s in net.sites.items()}}
        argv = [sys.executable, os.path.abspath(__file__), "--inside", json.dumps(doc),
                "--link", a.link, "--size-mib", str(a.size_mib), "--seconds", str(a.seconds),
                "--max-seconds", str(a.max_seconds), "--base-seconds", str(a.base_seconds),
                "--qd", str(a.qd), "--seed", str(a.seed), "--link-load", str(a.link_load)]
        if a.max_drain_ms is not None:
            argv += ["--max-drain-ms", str(a.max_drain_ms)]
        if a.subblock is not None:
            argv += ["--subblock", str(a.subblock)]
        r = net["a"].run(argv, timeout=900, check=False, stdout=subprocess.PIPE,
                         stderr=None, text=True, cwd=ROOT)
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"the link run inside site a failed ({r.returncode})")
        return json.loads(lines[-1])


def inside(a) -> dict:
    """The link run, in site a (``doc``: the parent's Sites, torn down by it)."""
    from harness.sites import Site, Sites
    doc = json.loads(a.inside)
    net = Sites(doc["names"], doc["subnet"])
    net.tag, net.hub = doc["tag"], doc["hub"]
    for name, (ns, addr) in doc["sites"].items():
        net.sites[name] = Site(net, name, ns, addr)
    rate, rtt = parse_link(a.link)
    base = tempfile.mkdtemp(prefix="cgm-bench-link-", dir="/dev/shm")
    return measured(LinkRig(base, a.size_mib * MiB, a.subblock, net, rate, rtt), base, a,
                    "random")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128, help="per volume")
    ap.add_argument("--seconds", type=float, default=20.0, help="sustained phase")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="maximum-rate phase")
    ap.add_argument("--base-seconds", type=float, default=5.0,
                    help="paced phase with no mirror (the base of write_p99_ratio)")
    ap.add_argument("--qd", type=int, default=16, help="writes in flight per volume")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--subblock", type=int, default=None,
                    help="the primaries' sub-block size in bytes ($CGMIRROR_SUBBLOCK);"
                         " the granularity turns sub-blocks off; default: the product's")
    ap.add_argument("--pin", action="store_true",
                    help="also a run with each site's processes on its own core")
    ap.add_argument("--link", metavar="RATE,RTT",
                    help="also a run over namespaces, e.g. 1gbit,20ms (root)")
    ap.add_argument("--max-drain-ms", type=int, default=None,
                    help="the session's max_drain_ms (a group past it times out; its"
                         " unsent blocks go into the next); default 5000, 30000 on"
                         " a link")
    ap.add_argument("--link-load", type=float, default=0.5,
                    help="the link run's writers at most this share of the link's rate")
    ap.add_argument("--db", action="store_true", help="also the database-like run")
    ap.add_argument("--no-default", action="store_true", help="skip the default run")
    ap.add_argument("--inside", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.link:
        parse_link(a.link)                  # refuse a bad one before any run
    if a.inside:
        print(json.dumps(inside(a)))
        return 0
    runs = ([] if a.no_default else [("", lambda: local_run(Rig, a, "random"))]) \
        + ([("pin_", lambda: local_run(PinRig, a, "random"))] if a.pin else []) \
        + ([("link_", lambda: link_run(a))] if a.link else []) \
        + ([("db_", lambda: local_run(Rig, a, "db"))] if a.db else [])
    if not runs:
        raise SystemExit("bench_mirror: --no-default with no other run: nothing to do")
    res: dict = {}
    for prefix, run in runs:
        print(f"-- run {prefix.rstrip('_') or 'default'}", file=sys.stderr, flush=True)
        one = run()
        print(f"{'measure':<26} value")
        for k, v in one.items():
            print(f"{prefix + k:<26} {v}")
        print(flush=True)
        res.update({prefix + k: v for k, v in one.items()})
    print(json.dumps(res))
    return 0


def _unix(iso: str) -> float:
    """The history's ISO times back to unix time."""
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


if __name__ == "__main__":
    sys.exit(main())
