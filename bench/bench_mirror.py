"""The mirror under load: RPO, drain amplification, hold times.

    .venv/bin/python bench/bench_mirror.py [--size-mib 128] [--seconds 20]
        [--subblock BYTES]

The two-by-two rig of harness/mirrorrig.py on /dev/shm (2 slaves x 2 volumes, their two
secondaries on this machine, unix sockets), ``cgmirror mirror run`` as a
child process with groups back to back (``interval_ms = 0``).

1. Maximum rate: 4 KiB random writes, one libnbd connection per volume,
   ``--qd`` in flight each, for --max-seconds, with no mirror running (the
   plugin records changes as it always does).  The sum over the volumes is
   the plugin's maximum on this machine now.
2. Sustained: the same writers paced at half that rate, the mirror running,
   for --seconds.  Every 100 ms the mirror's status (``mirror status
   --json``) is sampled: ``rpo_s`` is the age of the last hardened group
   (its cut to now).

Reported (table, then one JSON line last):

- ``rpo_p50_s``, ``rpo_p99_s``: of the 100 ms samples (nearest rank).
- ``drain_amplification``: bytes the groups sent to the remote (the
  secondaries' ``replication_bytes``, over the sustained phase) / bytes the
  host wrote.  The price of the change granularity: a 4 KiB write marks a
  whole ``granularity`` block, so scattered writes cost up to granularity /
  4 KiB (16 at 64 KiB) -- unless sub-blocks (``subblock``, 4 KiB by
  default; ``--subblock 65536`` turns them off) send only the dirty pieces;
  writes landing in a block already dirty in the same group cost nothing
  more.  ``block_amplification``: the blocks the groups covered (the
  history's bytes, cut during the phase) / bytes written.
- ``hold_p99_ms``: the mirror's own p99 of the freeze hold (gate closed
  to thawed), and ``write_p99_ms``/``write_max_ms``: the host writes'
  latency as the writers saw it, mirroring running.
- ``groups_per_s``, ``drain_mb_s`` (bytes sent / time spent draining).
- ``loadavg`` (1 min at the end; 2 cores, shared with other users).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
from coordinator.control import ControlClient  # noqa: E402
from coordinator.history import History  # noqa: E402
from coordinator.mirror import MirrorNotRunning, call, percentile  # noqa: E402
from harness.mirrorrig import ORDER, SIZE, session_text  # noqa: E402

BLOCK = 4096
MiB = 1 << 20


class Writer(threading.Thread):
    """4 KiB random writes to one export, ``qd`` in flight, at ``rate``
    writes/s (None: as fast as it goes), until ``stop`` is set.  One buffer
    for every write: python3-libnbd 1.14 keeps each buffer it is given."""

    def __init__(self, uri: str, size: int, qd: int, rate: float | None,
                 stop: threading.Event, seed: int):
        super().__init__(name=f"writer-{uri}", daemon=True)
        self.uri, self.blocks, self.qd, self.rate, self.stop = uri, size // BLOCK, qd, \
            rate, stop
        self.rng = random.Random(seed)
        self.done = 0
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        h = nbd.NBD()
        h.set_handle_name(f"bench-writer-{self.name}")
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
        try:
            h.connect_uri(self.uri)
            t0, issued = time.monotonic(), 0

            def done(start, err):
                if err.value:
                    self.error = OSError(err.value, os.strerror(err.value))
                self.latencies.append(time.monotonic() - start)
                self.done += 1
                return 1
            while not self.stop.is_set() and self.error is None:
                due = self.rate is None or issued < (time.monotonic() - t0) * self.rate
                if due and h.aio_in_flight() < self.qd:
                    start = time.monotonic()
                    h.aio_pwrite(buf, self.rng.randrange(self.blocks) * BLOCK,
                                 completion=lambda err, s=start: done(s, err))
                    issued += 1
                    continue
                # The completion callback retires each command (it returns 1).
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


def write_phase(uris, size, qd, rate_each, seconds, seed):
    """Run one writer per URI for ``seconds``; (writes done, latencies)."""
    stop = threading.Event()
    ws = [Writer(u, size, qd, rate_each, stop, seed + i) for i, u in enumerate(uris)]
    for w in ws:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in ws:
        w.join(60)
    errs = [w.error for w in ws if w.error]
    if errs:
        raise RuntimeError(f"a writer failed: {errs[0]}")
    return sum(w.done for w in ws), [x for w in ws for x in w.latencies]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128, help="per volume")
    ap.add_argument("--seconds", type=float, default=20.0, help="sustained phase")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="maximum-rate phase")
    ap.add_argument("--qd", type=int, default=16, help="writes in flight per volume")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--subblock", type=int, default=None,
                    help="the primaries' sub-block size in bytes ($CGMIRROR_SUBBLOCK);"
                         " the granularity turns sub-blocks off; default: the product's")
    a = ap.parse_args(argv)
    size = a.size_mib * MiB
    base = tempfile.mkdtemp(prefix="cgm-bench-mirror-", dir="/dev/shm")
    procs: list[launch.SlaveProcess] = []
    mirror = None
    try:
        path = os.path.join(base, "m.toml")
        with open(path, "w") as f:
            f.write(session_text(interval_ms=0, max_drain_ms=5000, rpo=30)
                    .replace(f"size = {SIZE}", f"size = {size}"))
        os.chdir(base)
        sess = session_mod.load(path)
        specs = [s.spec() for s in sess.slaves] + [r.spec() for r in sess.secondaries]
        if a.subblock is not None:
            for spec in specs:
                spec.env = {**spec.env, "CGMIRROR_SUBBLOCK": str(a.subblock)}
        for spec in specs:
            procs.append(launch.start(spec))
        by = {p.spec.name: p.spec for p in procs}
        uris = [by[s].uri(v) for s, v in ORDER]

        n_max, _ = write_phase(uris, size, a.qd, None, a.max_seconds, a.seed)
        max_rate = n_max / a.max_seconds
        rate = max_rate / 2

        log = open(os.path.join(base, "mirror.log"), "ab")
        mirror = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", path,
                                   "mirror", "run"], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log, cwd=ROOT,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
        log.close()
        # The first full copy, then the sustained phase.
        deadline = time.monotonic() + 300
        while True:
            try:
                if (call(sess.mirror.control, "status").get("hardened") or 0) >= 1:
                    break
            except MirrorNotRunning:
                pass
            if mirror.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mirror never hardened its first group;"
                                   f" see {base}/mirror.log")
            time.sleep(0.1)
        remotes = [r.spec().control for r in sess.secondaries]

        def remote_bytes() -> int:
            total = 0
            for ctl in remotes:
                with ControlClient(ctl) as c:
                    total += sum(v["replication_bytes"]
                                 for v in c.call("status")["volumes"].values())
            return total
        remote0 = remote_bytes()
        t_start = time.time()
        rpo: list[float] = []
        out: dict = {}
        def sustained():
            out["n"], out["lat"] = write_phase(uris, size, a.qd, rate / len(uris),
                                               a.seconds, a.seed + 100)
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
        t_end = time.time()
        remote = remote_bytes() - remote0
        st = call(sess.mirror.control, "status")
        with History(sess.state_dir) as h:
            rows = [g for g in h.groups() if g["outcome"] == "hardened"
                    and g["cut"] and t_start <= _unix(g["cut"]) <= t_end]
        blocks = sum(g["bytes"] or 0 for g in rows)
        drain_s = sum((g["drain_ms"] or 0) for g in rows) / 1000
        written = out["n"] * BLOCK
        lat = out["lat"]
        res = {
            "rpo_p50_s": percentile(rpo, 50), "rpo_p99_s": percentile(rpo, 99),
            "rpo_samples": len(rpo),
            "drain_amplification": round(remote / written, 2) if written else None,
            "block_amplification": round(blocks / written, 2) if written else None,
            "granularity": by["s1"].granularity, "write_bytes": BLOCK,
            "subblock": a.subblock,
            "hold_p99_ms": st["hold_ms"]["p99"], "hold_p50_ms": st["hold_ms"]["p50"],
            "write_p99_ms": round(percentile(lat, 99) * 1000, 2) if lat else None,
            "write_max_ms": round(max(lat) * 1000, 2) if lat else None,
            "groups_per_s": round(len(rows) / (t_end - t_start), 2),
            "drain_mb_s": round(remote / 1e6 / drain_s, 1) if drain_s else None,
            # Asked for half the maximum; what the writers achieved with the
            # mirror draining on the same two cores may fall short of it.
            "max_write_iops": round(max_rate), "target_write_iops": round(rate),
            "load_write_iops": round(out["n"] / a.seconds),
            "volumes": len(uris), "volume_mib": a.size_mib, "seconds": a.seconds,
            "groups_failed": st["groups_failed"],
            "loadavg": round(os.getloadavg()[0], 2), "cores": os.cpu_count(),
        }
        print(f"{'measure':<22} value")
        for k, v in res.items():
            print(f"{k:<22} {v}")
        print(json.dumps(res))
        return 0
    finally:
        if mirror is not None and mirror.poll() is None:
            mirror.terminate()
            try:
                mirror.wait(60)
            except subprocess.TimeoutExpired:
                mirror.kill()
                mirror.wait(30)
        for p in procs:
            p.stop(timeout=10)
        os.chdir(ROOT)
        shutil.rmtree(base, ignore_errors=True)


def _unix(iso: str) -> float:
    """The history's ISO times back to unix time."""
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


if __name__ == "__main__":
    sys.exit(main())
