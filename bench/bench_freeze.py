"""How long host writes are held while a point in time is established.

    .venv/bin/python bench/bench_freeze.py [--slaves 4] [--volumes 2]
        [--repeats 10] [--per-window 25] [--budget-ms 50]

Set-up: ``--slaves`` cgmirror slaves (nbdkit python, ``--threads``) with
``--volumes`` volumes each, all on /dev/shm (state directories too, so the
change map's fdatasyncs cost what tmpfs costs).  A separate writer process
(its own GIL; it shares only the monotonic clock with us) runs one thread per
volume doing 4 KiB random writes at queue depth 1 with libnbd, logging every
write's start and latency.

The run cycles through three kinds of window, ``--repeats`` times each, order
reversed every other repeat:

  idle    no establish: the writers' baseline latency;
  during  ``--per-window`` establishes back to back (``--gap-ms`` apart), each
          ``coordinator.group.establish`` over every slave with the budget
          ``--budget-ms`` (max coordination time), then ``abort_all`` to end
          the cut (nothing is copied);
  quiet   the same with the writers paused: the establish's own cost;
  raw     under load, a minimal fan-out instead of the coordinator: one
          thread, one persistent connection per slave, FREEZE written to
          every socket, then every reply read, then THAW likewise.  What the
          coordinator's threads and per-establish connections add.

Per establish: the gate hold each slave measured (gate closed -> open, the
largest over slaves), the coordination time (freeze sent -> last FROZEN), and
the hold as the host saw it: the longest write that was in flight at any
moment of the establish (a write that arrives just after a gate closed waits
for the whole hold, then its own service time).  Per window: p50/p99 of the
latency of writes started in it; the table shows medians over windows.

Prints a table, then one JSON line last: hold_p50_ms, hold_p99_ms (host
seen), gate_held_p50_ms, gate_held_p99_ms (slave measured),
coordination_p99_ms, write_p99_ms_during, write_p99_ms_idle, aborted, ...,
mode ("local" or "sites").

``--sites`` (``make bench-freeze-sites``, root): the slaves run alternately
in network namespaces ``a`` and ``b`` (harness/sites.py), control and NBD on
TCP with mutual TLS from a fresh session PKI; the benchmark itself (the
coordinator and the writer process) is re-run inside ``c`` with ``--attach``
and prints the same table and JSON.

``--rtt``: only the control round trip (a ``status`` request and its reply)
through the real ControlClient against real slaves on loopback, unix socket
vs TCP+TLS; JSON last (unix_p50_us, tls_p50_us, ratio_p50).  Measured here
(2 cores, shared): p50 63-93 us unix, 94-147 us TCP+TLS, ratio 1.50-1.58.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from wire import files  # noqa: E402
from coordinator import group  # noqa: E402
from coordinator.errors import EstablishAborted  # noqa: E402
from coordinator.link import SlaveLink  # noqa: E402
from coordinator import launch  # noqa: E402
from coordinator.control import ControlClient  # noqa: E402
from coordinator.group.pipeline import realtime  # noqa: E402

BLOCK = 4096


# ------------------------------------------------------------------ writer process

def _writer_main(uris: list[str], out_path: str, stop, ready, running, seed: int,
                 tls_dir: str | None = None) -> None:
    """One thread per URI: 4K random writes, QD1, only while ``running`` is set;
    log (start, seconds) of each write; on ``stop`` dump the log to
    ``out_path`` (doubles, pairs).  ``nbds://`` URIs use ``tls_dir``'s
    certificate."""
    import nbd

    from wire import tls

    logs = [array.array("d") for _ in uris]
    errors: list[str] = []
    started = threading.Barrier(len(uris) + 1)

    def run(k: int, uri: str) -> None:
        h = nbd.NBD()
        h.set_handle_name(f"bench-writer-{k}")
        try:
            if uri.startswith("nbds"):
                tls.libnbd_setup(h, tls_dir)
            h.connect_uri(uri)
            nblocks = h.get_size() // BLOCK
            rng = random.Random(seed + k)
            buf = rng.randbytes(BLOCK)
            log = logs[k]
            started.wait(30)
            while not stop.is_set():
                if not running.is_set():
                    running.wait(1.0)    # blocked, not polling: a quiet machine
                    continue
                off = rng.randrange(nblocks) * BLOCK
                t0 = time.monotonic()
                h.pwrite(buf, off)
                log.append(t0)
                log.append(time.monotonic() - t0)
        except Exception as exc:     # reported to the parent through the log file
            errors.append(f"{uri}: {exc}")
            started.abort()
        finally:
            try:
                h.shutdown()
            except Exception:
                pass

    threads = [threading.Thread(target=run, args=(k, u), daemon=True)
               for k, u in enumerate(uris)]
    for t in threads:
        t.start()
    try:
        started.wait(30)
        ready.set()
    except threading.BrokenBarrierError:
        pass
    stop.wait()
    for t in threads:
        t.join(30)
    merged = array.array("d")
    for log in logs:
        merged.extend(log)
    with open(out_path, "wb") as f:
        f.write(json.dumps(errors).encode() + b"\n")
        merged.tofile(f)


def _read_log(path: str) -> tuple[list[str], list[tuple[float, float]]]:
    with open(path, "rb") as f:
        errors = json.loads(f.readline())
        arr = array.array("d")
        arr.frombytes(f.read())
    return errors, sorted(zip(arr[0::2], arr[1::2]))


# ------------------------------------------------------------------ raw fan-out

def raw_establish(clients: list[ControlClient], n: int, lease_ms: int) -> dict:
    """FREEZE to all, read all; THAW to all, read all (the caller aborts the
    cut on the control sockets, untimed).  No budget and no error handling
    beyond raising: a yardstick, not a coordinator.  At the coordinator's
    priority (pipeline.realtime), over the same sockets (gate sockets where
    the slaves have them)."""
    def fan(op: str, **args) -> list[dict]:
        line = json.dumps({"op": op, **args}).encode() + b"\n"
        for c in clients:
            c._sock.sendall(line)
        replies = [json.loads(c._readline()) for c in clients]
        bad = [r for r in replies if not r.get("ok")]
        if bad:
            raise RuntimeError(f"raw {op} {n}: {bad[0]}")
        return replies
    with realtime():
        t0 = time.monotonic()
        fan("freeze", n=n, lease_ms=lease_ms)
        coordination = time.monotonic() - t0
        thawed = fan("thaw", n=n)
        total = time.monotonic() - t0
    return {"held_ms": max(r["held_ms"] for r in thawed),
            "coordination_ms": coordination * 1000, "total_ms": total * 1000}


# ------------------------------------------------------------------ statistics

def pct(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def _in_window(writes, start: float, end: float):
    import bisect
    lo = bisect.bisect_left(writes, (start, -1.0))
    hi = bisect.bisect_left(writes, (end, -1.0))
    return writes[lo:hi]


def _host_hold(writes, start: float, end: float, longest: float) -> float:
    """Longest write in flight at some moment of [start, end]."""
    import bisect
    lo = bisect.bisect_left(writes, (start - longest, -1.0))
    hi = bisect.bisect_left(writes, (end, -1.0))
    best = 0.0
    for s, d in writes[lo:hi]:
        if s + d >= start:
            best = max(best, d)
    return best


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slaves", type=int, default=4)
    ap.add_argument("--volumes", type=int, default=2, help="per slave")
    ap.add_argument("--size", type=int, default=64, help="MiB per volume")
    ap.add_argument("--threads", type=int, default=1,
                    help="nbdkit --threads per slave (1: the product default)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--per-window", type=int, default=25, help="establishes per window")
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--idle-s", type=float, default=1.0)
    ap.add_argument("--budget-ms", type=int, default=50, help="max coordination time")
    ap.add_argument("--lease-ms", type=int, default=5000)
    ap.add_argument("--max-seconds", type=float, default=150.0,
                    help="stop starting repeats after this long")
    ap.add_argument("--sites", action="store_true",
                    help="slaves in network namespaces a and b, this benchmark (the"
                         " coordinator and the writers) in c, over TCP with mutual TLS")
    ap.add_argument("--rtt", action="store_true",
                    help="only measure the control round trip, unix vs TCP+TLS, on"
                         " loopback through ControlClient against real slaves")
    ap.add_argument("--attach", metavar="SPECS.json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for tool in ("nbdkit",):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    if args.rtt:
        return rtt_main()
    if args.sites:
        return sites_main(args, argv or sys.argv[1:])

    base = tempfile.mkdtemp(prefix="cgm-freeze-", dir="/dev/shm")
    procs: list[launch.SlaveProcess] = []
    links: list[SlaveLink] = []
    raw: list[ControlClient] = []
    writer = None
    stop = ready = running = None
    try:
        if args.attach:
            # --sites: the slaves were started in their sites; attach to them.
            specs = load_specs(args.attach)
            links = [SlaveLink.from_spec(s) for s in specs]
            wait_ready(links)
        else:
            specs = local_specs(base, args)
            for spec in specs:
                procs.append(launch.start(spec))
            links = [SlaveLink.from_spec(s) for s in specs]
        uris = [s.uri(v[0]) for s in specs for v in s.volumes]
        tls_dir = specs[0].client_tls

        ctx = mp.get_context("spawn")
        stop, ready, running = ctx.Event(), ctx.Event(), ctx.Event()
        running.set()
        log_path = os.path.join(base, "writes.log")
        writer = ctx.Process(target=_writer_main,
                             args=(uris, log_path, stop, ready, running, 1, tls_dir),
                             name="bench-writers", daemon=True)
        writer.start()
        if not ready.wait(30):
            raise RuntimeError("writer process did not start")
        time.sleep(0.5)      # warm up

        n = group.next_n(group.preflight(links))
        raw = [ControlClient(lk.gate or s.control, ssl_context=lk.ssl_context)
               for s, lk in zip(specs, links)]
        for c in raw:
            c.connect()              # connected before the first timing
        windows: list[tuple[str, float, float]] = []
        ests: list[dict] = []
        aborted: list[str] = []
        t_begin = time.monotonic()
        reps = 0
        for rep in range(args.repeats):
            if time.monotonic() - t_begin > args.max_seconds:
                break
            reps += 1
            kinds = ["idle", "during", "quiet", "raw"]
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                if kind == "quiet":
                    running.clear()
                    time.sleep(0.05)          # let writes in flight finish
                w0 = time.monotonic()
                if kind == "idle":
                    time.sleep(args.idle_s)
                else:
                    for _ in range(args.per_window):
                        t0 = time.monotonic()
                        if kind == "raw":
                            r = raw_establish(raw, n, args.lease_ms)
                            group.abort_all(links, n)
                            ests.append({"kind": kind, "t0": t0,
                                         "t1": t0 + r["total_ms"] / 1000} | r)
                            n += 1
                            time.sleep(args.gap_ms / 1000)
                            continue
                        try:
                            e = group.establish(links, n, args.lease_ms, args.budget_ms)
                            t1 = time.monotonic()
                            ests.append({"kind": kind, "t0": t0, "t1": t1,
                                         "held_ms": e.max_held_ms,
                                         "coordination_ms": e.coordination_ms,
                                         "total_ms": e.total_ms})
                            group.abort_all(links, n)
                        except EstablishAborted as exc:
                            aborted.append(str(exc))
                        n += 1
                        time.sleep(args.gap_ms / 1000)
                windows.append((kind, w0, time.monotonic()))
                running.set()
            print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        stop.set()
        running.set()
        writer.join(60)
        errors, writes = _read_log(log_path)
        if errors:
            raise RuntimeError(f"writers failed: {errors[0]}")
    finally:
        if writer is not None and writer.is_alive():
            stop.set()
            running.set()
            writer.join(10)
            if writer.is_alive():
                writer.kill()
                writer.join(10)
        for lk in links:
            lk.close()
        for c in raw:
            c.close()
        for p in procs:
            p.stop(timeout=15)
        shutil.rmtree(base, ignore_errors=True)

    longest = max(d for _, d in writes)
    for e in ests:
        e["host_ms"] = _host_hold(writes, e["t0"], e["t1"], longest) * 1000
    win: dict[str, dict[str, list[float]]] = {"idle": {}, "during": {}}
    for kind, a, b in windows:
        if kind not in win:
            continue
        lat = [d * 1000 for _, d in _in_window(writes, a, b)]
        w = win[kind]
        w.setdefault("p50", []).append(pct(lat, 50))
        w.setdefault("p99", []).append(pct(lat, 99))
        w.setdefault("max", []).append(max(lat) if lat else float("nan"))
        w.setdefault("iops", []).append(len(lat) / (b - a))
    med = {k: {m: statistics.median(v) for m, v in w.items()} for k, w in win.items()}
    loaded = [e for e in ests if e["kind"] == "during"]
    host = [e["host_ms"] for e in loaded]
    held = [e["held_ms"] for e in loaded]
    coord = [e["coordination_ms"] for e in loaded]
    total = [e["total_ms"] for e in loaded]
    quiet = [e for e in ests if e["kind"] == "quiet"]
    q_held = [e["held_ms"] for e in quiet]
    q_coord = [e["coordination_ms"] for e in quiet]
    rawe = [e for e in ests if e["kind"] == "raw"]
    r_held = [e["held_ms"] for e in rawe]
    r_host = [e["host_ms"] for e in rawe]
    r_coord = [e["coordination_ms"] for e in rawe]

    nvol = args.slaves * args.volumes
    print(f"\nfreeze hold: {args.slaves} slaves x {args.volumes} volumes ({args.size} MiB,"
          f" /dev/shm, nbdkit --threads {args.threads}), {nvol} writers 4K random QD1,"
          f" {len(loaded)} establishes under load + {len(quiet)} with writers paused"
          f" + {len(rawe)} raw fan-outs under load,"
          f" {reps} repeats (budget {args.budget_ms} ms), {len(aborted)} aborted")
    print(f"{'':34} {'p50':>8} {'p99':>8} {'max':>8}")
    rows = [("hold as host writes saw it (ms)", host),
            ("gate held, slave-measured (ms)", held),
            ("coordination freeze->all (ms)", coord),
            ("establish total incl. thaw (ms)", total),
            ("no load: gate held (ms)", q_held),
            ("no load: coordination (ms)", q_coord),
            ("raw fan-out, load: host-seen (ms)", r_host),
            ("raw fan-out, load: gate held (ms)", r_held),
            ("raw fan-out, load: freeze->all (ms)", r_coord)]
    for label, vals in rows:
        print(f"{label:34} {pct(vals, 50):8.3f} {pct(vals, 99):8.3f} {max(vals):8.3f}")
    print(f"{'write latency (ms), window medians':34} {'p50':>8} {'p99':>8} {'max':>8}"
          f" {'IOPS':>9}")
    for kind in ("idle", "during"):
        m = med[kind]
        print(f"{'  ' + kind:34} {m['p50']:8.3f} {m['p99']:8.3f} {m['max']:8.3f}"
              f" {m['iops']:9,.0f}")
    if aborted:
        print("first abort:", aborted[0])
    with realtime() as granted:
        pass
    result = {
        "bench": "freeze",
        "hold_p50_ms": round(pct(host, 50), 3), "hold_p99_ms": round(pct(host, 99), 3),
        "gate_held_p50_ms": round(pct(held, 50), 3),
        "gate_held_p99_ms": round(pct(held, 99), 3),
        "coordination_p50_ms": round(pct(coord, 50), 3),
        "coordination_p99_ms": round(pct(coord, 99), 3),
        "write_p99_ms_during": round(med["during"]["p99"], 3),
        "write_p99_ms_idle": round(med["idle"]["p99"], 3),
        "write_p50_ms_during": round(med["during"]["p50"], 3),
        "write_p50_ms_idle": round(med["idle"]["p50"], 3),
        "quiet_gate_held_p50_ms": round(pct(q_held, 50), 3),
        "quiet_gate_held_p99_ms": round(pct(q_held, 99), 3),
        "raw_hold_p50_ms": round(pct(r_host, 50), 3),
        "raw_hold_p99_ms": round(pct(r_host, 99), 3),
        "raw_gate_held_p50_ms": round(pct(r_held, 50), 3),
        "raw_gate_held_p99_ms": round(pct(r_held, 99), 3),
        "iops_during": round(med["during"]["iops"]), "iops_idle": round(med["idle"]["iops"]),
        "establishes": len(loaded), "establishes_quiet": len(quiet), "aborted": len(aborted), "budget_ms": args.budget_ms,
        "slaves": args.slaves, "volumes_per_slave": args.volumes, "threads": args.threads,
        "repeats": reps, "mode": "sites" if args.attach else "local",
        # FREEZE/THAW served natively on every slave's gate socket (a unix
        # control socket), and the coordinator at real-time priority.
        "gate_socket": all(lk.gate for lk in links), "realtime": granted,
    }
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------ set-ups

def local_specs(base: str, args, **kw) -> list[launch.SlaveSpec]:
    """``--slaves`` slaves with ``--volumes`` volumes each, under ``base``."""
    specs = []
    for i in range(args.slaves):
        name = f"s{i + 1}"
        specs.append(launch.SlaveSpec(
            name=name, statedir=os.path.join(base, name),
            nbd_socket=os.path.join(base, f"{name}.sock"),
            control=os.path.join(base, f"{name}.ctl"),
            volumes=[(f"v{j}", os.path.join(base, f"{name}-v{j}.img"), args.size << 20)
                     for j in range(args.volumes)],
            threads=args.threads, **kw))
    return specs


def load_specs(path: str) -> list[launch.SlaveSpec]:
    with open(path) as f:
        return [launch.SlaveSpec(**{**d, "volumes": [tuple(v) for v in d["volumes"]]})
                for d in json.load(f)]


def wait_ready(links: list[SlaveLink], timeout: float = 60.0) -> None:
    """Until every slave answers status (they start in their own sites)."""
    deadline = time.monotonic() + timeout
    for link in links:
        while True:
            try:
                link.status()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def sites_main(args, argv: list[str]) -> int:
    """Slaves alternately in sites a and b (TCP control and NBD, mutual
    TLS from a fresh session PKI), this benchmark re-run inside c with
    ``--attach``; its output is ours, JSON last."""
    import dataclasses
    import subprocess

    from coordinator import pki
    from harness.sites import Sites, free_port

    base = tempfile.mkdtemp(prefix="cgm-freeze-", dir="/dev/shm")
    try:
        with Sites(("a", "b", "c")) as net:
            d = os.path.join(base, "pki")
            pki.init(d, "bench")
            coord = pki.issue(d, "coordinator")
            specs = []
            for spec in local_specs(base, args):
                site = net["ab"[len(specs) % 2]]
                host_dir = pki.issue(d, spec.name, ips=[site.addr])
                specs.append(dataclasses.replace(
                    spec, control=f"tcp:{site.addr}:{free_port(site)}",
                    nbd=f"tcp:{site.addr}:{free_port(site)}", nbd_socket="",
                    tls=host_dir, client_tls=coord))
                files.make_dirs(spec.statedir)
                with open(spec.logfile, "ab") as log:
                    site.popen(specs[-1].command(), stdin=subprocess.DEVNULL, stdout=log,
                               stderr=log, env=launch.slave_env({}))
            path = os.path.join(base, "specs.json")
            with open(path, "w") as f:
                json.dump([dataclasses.asdict(s) for s in specs], f)
            inner = [a for a in argv if a != "--sites"]
            r = net["c"].run([sys.executable, os.path.abspath(__file__), "--attach", path,
                              *inner], timeout=args.max_seconds + 300, check=False,
                             stdout=None, stderr=None)
            return r.returncode
    finally:
        shutil.rmtree(base, ignore_errors=True)


def rtt_main(calls: int = 2000) -> int:
    """The control round trip (a status request and its reply) through the
    real ControlClient, unix socket vs TCP+TLS on loopback, one slave each,
    calls interleaved in blocks so both see the same machine."""
    import types

    from coordinator import pki

    base = tempfile.mkdtemp(prefix="cgm-rtt-", dir="/dev/shm")
    procs = []
    try:
        d = os.path.join(base, "pki")
        pki.init(d, "rtt")
        one = types.SimpleNamespace(slaves=1, volumes=1, size=16, threads=1)
        unix = local_specs(os.path.join(base, "u"), one)[0]
        port = _free_loopback_port()
        tcp = local_specs(os.path.join(base, "t"), one,
                          tls=pki.issue(d, "s1", ips=["127.0.0.1"]),
                          client_tls=pki.issue(d, "coordinator"))[0]
        tcp.control = f"tcp:127.0.0.1:{port}"
        for spec in (unix, tcp):
            procs.append(launch.start(spec))
        times: dict[str, list[float]] = {"unix": [], "tls": []}
        with procs[0].control() as u, procs[1].control() as t:
            for c in (u, t):
                for _ in range(50):
                    c.call("status")      # warm up
            for _ in range(calls // 100):
                for name, c in (("unix", u), ("tls", t)):
                    for _ in range(50):
                        t0 = time.perf_counter()
                        c.call("status")
                        times[name].append(time.perf_counter() - t0)
    finally:
        for p in procs:
            p.stop(timeout=15)
        shutil.rmtree(base, ignore_errors=True)
    res = {"bench": "control_rtt", "calls": len(times["unix"])}
    for name, v in times.items():
        res[f"{name}_p50_us"] = round(pct(v, 50) * 1e6, 1)
        res[f"{name}_p99_us"] = round(pct(v, 99) * 1e6, 1)
    res["ratio_p50"] = round(res["tls_p50_us"] / res["unix_p50_us"], 2)
    print(f"control round trip (status), {res['calls']} calls each:"
          f" unix p50 {res['unix_p50_us']} us, TCP+TLS p50 {res['tls_p50_us']} us,"
          f" ratio {res['ratio_p50']}")
    print(json.dumps(res))
    return 0


def _free_loopback_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
