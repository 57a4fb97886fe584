"""Cluster mode's takeover: the leading coordinator killed -9, until the
next group hardened by the new leader.

    .venv/bin/python bench/bench_takeover.py [--kills 5] [--ttl 5] [--rate 50]

On the host rig (harness/hosts.py; root): hosts a1 a2 (primaries), b1 b2
(secondaries) and c; a three-member etcd, one member on each of a1, b1 and
c, TLS from the session's PKI; ``cgmirror-mirror@SESSION`` enabled on c,
b1 and a1 (harness/democluster.py), groups every 200 ms; a writer inside
a1 writes 64 KiB blocks to every primary volume, ``--rate`` a second, for
the whole run.  A watcher inside b2 reads the leader key and
``state/hardened`` from etcd every 50 ms.

Each round: once the leader hardened a group of its own and the next,
its unit's main process is killed -9 (its host's supervisor restarts it 5 s
later, as a standby); the round ends when etcd's ``state/hardened`` holds
a group of a higher epoch (the new leader's first).

- ``takeover_s``: the kill to that group, as the watcher saw it.  The goal
  is ``takeover_s <= ttl_s + 1``: the old lease runs out (at most
  ``ttl_s``), a standby wins the next campaign round, runs recovery and
  forms a group.
- ``rpo_s``: that group's hardening minus the cut of the last group hardened
  before the kill (what a disaster at that moment would have lost, at
  worst, during the takeover).

Reported (a line per round, then one JSON line last): ``takeover_s_p50``,
``takeover_s_max``, ``rpo_during_takeover_s_max``, ``ttl_s``,
``takeover_over_ttl_s_max`` (``takeover_s_max - ttl_s``), ``goal_met``,
``kills``, ``loadavg`` (1 min, at the start and at the end: 2 cores shared
with other users).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness.democluster import Cluster, Seen  # noqa: E402
from harness.hosts import Hosts, session_text  # noqa: E402


def cut_time(s: Seen) -> float:
    """The wall time of the cut of the group ``s`` shows hardened."""
    h = s.hardened
    for key in ("cut", "cut_at", "at"):
        v = h.get(key)
        if isinstance(v, (int, float)) and v > 1e9:
            return float(v)
    raise SystemExit(f"bench-takeover: state/hardened {h} has no cut time (unix seconds)")


def round_(cl: Cluster, w, timeout: float) -> dict:
    """One kill (module doc); its measures."""
    lead = cl.wait_leader(w, timeout=timeout)
    steady = w.wait(lambda s: not s.error and s.epoch == lead.epoch and s.n > lead.n,
                    timeout, "a second group of the leader")
    host = cl.leader_host(steady.leader)
    before = w.last()
    t0 = time.time()
    pid = cl.h[host].kill_unit(cl.unit, signal.SIGKILL)
    new = cl.wait_leader(w, timeout=timeout, other_than=lead.epoch)
    # The last group hardened before the kill (the watcher may have seen it
    # a moment after t0: it was the old leader's).
    last = max((s for s in w.seen if s.hardened and s.hardened_epoch == lead.epoch),
               key=lambda s: s.n, default=before)
    new_host = cl.leader_host(new.leader)
    # The killed coordinator comes back (as a standby) before the next round.
    deadline = time.monotonic() + timeout
    while cl.mirror_pid(host) in (None, pid):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-takeover: {cl.unit} on {host} not restarted")
        time.sleep(0.1)
    return {"killed": host, "new": new_host, "epoch": [lead.epoch, new.epoch],
            "groups": [last.n, new.n], "takeover_s": round(new.t - t0, 3),
            "rpo_s": round(new.t - cut_time(last), 3)}


def bench(base: str, kills: int, ttl: int, rate: float) -> dict:
    load0 = os.getloadavg()[0]
    with Hosts(base, session="bench") as h:
        cl = Cluster(h, ttl_s=ttl)
        h.install(session_text(h, mirror={"interval_ms": 200, "max_drain_ms": 5000},
                               copy_timeout_ms=5000, lease_ms=5000) + cl.table())
        h.boot()
        cl.start_etcd()
        h.enable_nodes()
        cl.enable_mirrors()
        with cl.watch("b2") as w:
            cl.wait_leader(w, timeout=180)
            secs = kills * (ttl + 30) + 60
            writer = h["a1"].popen([sys.executable, "-m", "harness.democluster", "inside",
                                    "writer", json.dumps([secs, rate])],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            rounds = []
            try:
                for i in range(kills):
                    r = round_(cl, w, timeout=ttl + 60)
                    rounds.append(r)
                    print(f"kill {i + 1}/{kills}: leader on {r['killed']} killed -9;"
                          f" {r['new']} leads (epoch {r['epoch'][0]} -> {r['epoch'][1]}),"
                          f" group {r['groups'][1]} hardened {r['takeover_s']:.2f} s after"
                          f" the kill; rpo {r['rpo_s']:.2f} s", flush=True)
            finally:
                if writer.poll() is None:
                    writer.send_signal(signal.SIGTERM)
                writer.communicate(timeout=60)
    takeovers = [r["takeover_s"] for r in rounds]
    out = {
        "takeover_s_p50": round(statistics.median(takeovers), 3),
        "takeover_s_max": max(takeovers),
        "rpo_during_takeover_s_max": max(r["rpo_s"] for r in rounds),
        "ttl_s": ttl,
        "takeover_over_ttl_s_max": round(max(takeovers) - ttl, 3),
        "goal_met": max(takeovers) <= ttl + 1,
        "kills": len(rounds),
        "writes_per_s": rate,
        "loadavg": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
        "cores": os.cpu_count(),
        "rounds": rounds,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_takeover.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5, help="leaders killed (default 5)")
    p.add_argument("--ttl", type=int, default=5, help="[cluster] ttl_s (default 5)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="64 KiB writes a second at site a (default 50)")
    p.add_argument("--keep", action="store_true", help="keep the rig's directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench-takeover: needs root (network and mount namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.kills <= 100 or not 2 <= args.ttl <= 60:
        print("bench-takeover: --kills 1..100, --ttl 2..60 (etcd leases are whole seconds)",
              file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="cgmirror-bench-takeover-")
    try:
        out = bench(base, args.kills, args.ttl, args.rate)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\ntakeover p50 {out['takeover_s_p50']:.2f} s, max {out['takeover_s_max']:.2f} s"
          f" (ttl {out['ttl_s']} s: max - ttl = {out['takeover_over_ttl_s_max']:+.2f} s, goal"
          f" <= +1 s: {'met' if out['goal_met'] else 'NOT met'}); rpo during takeover max"
          f" {out['rpo_during_takeover_s_max']:.2f} s; loadavg {out['loadavg']}"
          f" ({out['cores']} cores)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
