"""What each change-map granularity costs: drain bytes, write path, map and checkpoint.

    .venv/bin/python bench/bench_granularity.py [--granularities 4K,16K,64K]
        [--writes 4096] [--repeats 3] [--runtime 3] [--big-gib 64]

One slave per granularity, all running at once (one 1 GiB volume each on
/dev/shm, fallocated), so that every case is measured side by side and
interleaved over the same minutes of machine load:

(a) drain bytes.  After a full copy to an ``nbdkit file`` target, a workload
    is written through the slave's export with libnbd (the same seeded
    offsets and data at every granularity), then one cut and one incremental
    copy.  ``drain_amplification`` = bytes the copy sent / bytes the host
    wrote; ``drain_vs_distinct`` = bytes sent / distinct 4 KiB pages written
    (what a perfect 4 KiB tracker would send).  Workloads:
      rand4k   --writes random 4 KiB writes, 4 KiB aligned
      seq1m    --writes/64 sequential 1 MiB writes (at least 16)
      mixed    --writes writes: 80 % random 4 KiB, 15 % random 64 KiB
               (4 KiB aligned, so they straddle 64 KiB blocks), 5 % 1 MiB
               continuing a sequential stream
(b) write path.  fio's nbd engine, 4 KiB random writes at qd16 and qd1
    (bench_write's runner), against each slave in turn, --repeats times.
(c) map and checkpoint.  In process, ``ChangeMap`` on the real disk (the
    temporary directory, where fdatasync costs what it costs in production)
    for a 1 GiB and a --big-gib GiB volume: bytes of the maps in memory,
    bytes written per checkpoint (map file + intent file), checkpoint time
    and the time the write lock is held (the snapshot copy, during which
    every write waits); extrapolated linearly from the bigger one to 1 TiB.
    Also the in-process cost of ``mark()`` for a random 4 KiB write.

Medians of --repeats.  The 1-minute load average is read before and after
each phase and reported: a run with loadavg above the core count is
"loaded" (others are using the CPUs) and says so.

Prints a table, the default the rule below picks, and one JSON line last.

Rule for the default: the finest granularity that (1) adds no more than
10 % of a write's cost to the write path: the in-process ``mark()`` time
above the cheapest granularity's is at most 10 % of the slave's median CPU
time per 4K write (fio, qd16), (2) writes at most 8 MiB per checkpoint for a
1 TiB volume (4 MB/s of map writes at the default 2 s interval, and as many
bytes of memory per map) and (3) holds the write lock at most 5 ms per
checkpoint for a 1 TiB volume; if none passes, the coarsest.  (2) and (3)
were written before the numbers were taken.  (1) first compared fio IOPS
(medians, then best runs): on this shared machine (loadavg 10-17) that
failed every granularity by turns, in runs that differed only in the load
of the moment.  ``mark()`` is the only part of the write path that depends
on the granularity, and timed in process (best of --repeats loops) it is
measurable under load; fio's IOPS are still reported.

A finer scheme that does not pay everywhere is shown as a *model* row
(``64K+4K``, computed, not run): persist and checkpoint 64 KiB bits as now,
and keep 4 KiB sub-bits in memory only, allocated per 4 MiB region on its
first sub-64K write (128 bytes a region).  Without a crash it drains what
the 4 KiB map drains; after a crash it falls back to 64 KiB bits (recovery
over-marks anyway); the checkpoint and the lock hold stay those of 64 KiB,
and the memory grows only with the regions small writes touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import nbd
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_write import run_fio  # noqa: E402  (same directory)
from coordinator import launch  # noqa: E402
from coordinator.control import ControlClient  # noqa: E402
from harness import peers  # noqa: E402
from nbdplugin.changemap import ChangeMap  # noqa: E402
from wire.units import parse_size  # noqa: E402

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE = GiB
PAGE = 4 * KiB
FIO_WORKLOADS = ("4k_randwrite_qd16", "4k_randwrite_qd1")
DRAIN_WORKLOADS = ("rand4k", "seq1m", "mixed")
REGION = 4 * MiB          # the product's default write-intent region

# The rule's limits (see the module docstring).
IOPS_WITHIN_COST = 0.10    # of the slave's CPU time per 4K write
MAX_CKPT_BYTES_TIB = 8 * MiB
MAX_LOCK_MS_TIB = 5.0


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def workload(kind: str, writes: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) of every write of one drain workload, seeded."""
    rnd = random.Random(seed)
    npages = SIZE // PAGE
    if kind == "rand4k":
        return [(rnd.randrange(npages) * PAGE, PAGE) for _ in range(writes)]
    if kind == "seq1m":
        start = rnd.randrange(SIZE // MiB // 2) * MiB
        return [(start + i * MiB, MiB) for i in range(max(16, writes // 64))]
    if kind == "mixed":
        out, cursor = [], rnd.randrange(SIZE // MiB // 2) * MiB
        for _ in range(writes):
            p = rnd.random()
            if p < 0.80:
                out.append((rnd.randrange(npages) * PAGE, PAGE))
            elif p < 0.95:
                out.append((rnd.randrange(npages - 16) * PAGE, 64 * KiB))
            else:
                out.append((cursor, MiB))
                cursor = (cursor + MiB) % SIZE
        return out
    raise ValueError(kind)


def distinct_pages(ops: list[tuple[int, int]]) -> int:
    pages = set()
    for off, length in ops:
        pages.update(range(off // PAGE, (off + length) // PAGE))
    return len(pages)


class Slave:
    """One slave at one granularity, with its copy target and a libnbd handle."""

    def __init__(self, base: str, g: int):
        self.g = g
        self.name = f"g{g // KiB}k"
        d = os.path.join(base, self.name)
        os.makedirs(d)
        self.dir = d
        self.image = os.path.join(d, "vol.img")
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
            # Allocated up front, as bench_write does: tmpfs page faults
            # would otherwise be charged to whichever run touches a page first.
            os.posix_fallocate(f.fileno(), 0, SIZE)
        # State on the real disk, as in production: the intent map's
        # fdatasync is part of the write path.
        self.statedir = tempfile.mkdtemp(prefix=f"cgm-gran-{self.name}-")
        self.spec = launch.SlaveSpec(name=self.name, statedir=self.statedir,
                                     nbd_socket=os.path.join(d, "nbd.sock"),
                                     control=os.path.join(d, "ctl.sock"),
                                     volumes=[("v", self.image, None)], granularity=g)
        self.proc = None
        self.target = None
        self.h = None
        self.n = 0
        self.timg = os.path.join(d, "target.img")

    def start(self) -> None:
        """Start the slave and its target; stop() undoes whatever was done."""
        self.proc = launch.start(self.spec)
        self.ps = psutil.Process(self.proc.pid)
        peers.make_image(self.timg, SIZE)
        self.target = peers.nbdkit_file(self.timg, os.path.join(self.dir, "target.sock"))
        self.h = nbd.NBD()
        self.h.set_handle_name(self.name)
        self.h.connect_uri(self.spec.uri("v"))

    # -- the face bench_write.run_fio wants --------------------------------
    @property
    def uri(self) -> str:
        return self.spec.uri("v")

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def log_tail(self) -> str:
        try:
            with open(self.spec.logfile, errors="replace") as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return "(no log)"

    # -- copies --------------------------------------------------------------
    def copy(self, full: bool) -> dict:
        """One cut and its copy to the target; returns bytes sent and seconds."""
        self.n += 1
        n = self.n
        with ControlClient(self.spec.control) as c:
            c.call("freeze", n=n, lease_ms=10_000, volumes=["v"],
                   full=["v"] if full else [])
            c.call("thaw", n=n)
            r = c.call("copy", n=n, targets={"v": self.target.uri}, timeout_ms=60_000)
            deadline = time.monotonic() + 300
            while True:
                st = c.call("status")
                if st["phase"] == "idle":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: copy of cut {n} not done in 300 s")
                time.sleep(0.005)
        last = st["last_copy"]
        if not last or last.get("n") != n or not last["ok"]:
            raise RuntimeError(f"{self.name}: copy of cut {n} failed: {last}")
        return {"bytes": r["bytes"]["v"], "seconds": last["volumes"]["v"]["seconds"]}

    def write(self, ops: list[tuple[int, int]], data: bytes) -> None:
        for off, length in ops:
            self.h.pwrite(data[:length], off)
        self.h.flush()

    def stop(self) -> None:
        if self.h is not None:
            self.h.shutdown()
            self.h = None
        if self.target is not None:
            self.target.stop()
        if self.proc is not None:
            self.proc.stop(timeout=15)
        shutil.rmtree(self.statedir, ignore_errors=True)


# ---------------------------------------------------------------- (c) maps

def map_costs(g: int, size: int, repeats: int, workdir: str) -> dict:
    """Memory, checkpoint bytes/time and lock hold of a ChangeMap of ``size``."""
    d = tempfile.mkdtemp(prefix=f"ckpt-{g}-", dir=workdir)
    try:
        cm = ChangeMap(d, "v", size, g, max(REGION, g))
        rnd = random.Random(g)
        npages = size // PAGE
        times, holds = [], []
        for _ in range(repeats):
            # Some writes since the last checkpoint, so it has work to do.
            for _ in range(64):
                cm.mark(rnd.randrange(npages) * PAGE, PAGE)
            t0 = time.perf_counter()
            with cm.lock:
                # What checkpoint() copies while writers wait on the lock.
                snap = [b.copy() for b in cm.maps.values()] + [cm.touched.copy()]
            holds.append(time.perf_counter() - t0)
            del snap
            t0 = time.perf_counter()
            cm.checkpoint()
            times.append(time.perf_counter() - t0)
        mark_us = None
        if size <= GiB:
            # mark() alone: random 4 KiB writes into regions already durable
            # (a write to a fresh region pays an fdatasync of the intent map,
            # the same at every granularity).
            for off in range(0, size, cm.region):
                cm.mark(off, PAGE)
            marks = [rnd.randrange(npages) * PAGE for _ in range(20_000)]
            loops = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for off in marks:
                    cm.mark(off, PAGE)
                loops.append(time.perf_counter() - t0)
            # The least disturbed loop: others' load only ever adds time.
            mark_us = min(loops) / len(marks) * 1e6
        ckpt_bytes = os.path.getsize(cm.map_path) + os.path.getsize(cm.intent_path)
        mem = sum(len(b.to_bytes()) for b in cm.maps.values())
        cm.close()
        return {"size": size, "map_memory_bytes": mem, "checkpoint_bytes": ckpt_bytes,
                "checkpoint_ms": statistics.median(times) * 1000,
                "lock_hold_ms": statistics.median(holds) * 1000, "mark_us": mark_us}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pick_default(grans: list[int], fio: dict, maps: dict) -> tuple[int, dict]:
    """Apply the rule of the module docstring (``fio[g][w]``: the list of
    runs of granularity g and workload w); return (granularity, why)."""
    why = {}
    cpu_us = statistics.median(r["cpu_us_per_io"] for g in grans
                               for r in fio[g]["4k_randwrite_qd16"])
    cheapest = min(maps[g]["1gib"]["mark_us"] for g in grans)
    ok = []
    for g in grans:
        m = maps[g]["tib"]
        checks = {
            "mark_within": maps[g]["1gib"]["mark_us"] - cheapest <= IOPS_WITHIN_COST * cpu_us,
            "ckpt_bytes_tib": m["checkpoint_bytes"] <= MAX_CKPT_BYTES_TIB,
            "lock_ms_tib": m["lock_hold_ms"] <= MAX_LOCK_MS_TIB,
        }
        why[str(g)] = checks
        if all(checks.values()):
            ok.append(g)
    return (min(ok) if ok else max(grans)), why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--granularities", default="4K,16K,64K")
    ap.add_argument("--writes", type=int, default=4096, help="writes per drain workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=3, help="seconds per fio run")
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--big-gib", type=int, default=1024,
                    help="volume size of the second map measure, extrapolated"
                         " linearly to 1 TiB (default: 1 TiB itself)")
    ap.add_argument("--skip-fio", action="store_true")
    args = ap.parse_args(argv)
    grans = sorted(parse_size(x) for x in args.granularities.split(","))
    for tool in ("nbdkit", "fio"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    need = 2 * SIZE * len(grans) + GiB
    if shutil.disk_usage("/dev/shm").free < need:
        print(f"/dev/shm needs {need // MiB} MiB free", file=sys.stderr)
        return 2

    load = {"start": loadavg()}
    data = os.urandom(MiB)
    drains = {g: {w: [] for w in DRAIN_WORKLOADS} for g in grans}
    written = {w: [] for w in DRAIN_WORKLOADS}
    distinct = {w: [] for w in DRAIN_WORKLOADS}
    fio = {g: {w: [] for w in FIO_WORKLOADS} for g in grans}
    base = tempfile.mkdtemp(prefix="cgm-gran-", dir="/dev/shm")
    slaves: dict[int, Slave] = {}
    try:
        for g in grans:
            slaves[g] = Slave(base, g)
            slaves[g].start()
            slaves[g].copy(full=True)      # the baseline of every incremental copy
        # -- (a) drain bytes --------------------------------------------------
        for rep in range(args.repeats):
            for w in DRAIN_WORKLOADS:
                ops = workload(w, args.writes, seed=rep * 101 + DRAIN_WORKLOADS.index(w))
                written[w].append(sum(n for _, n in ops))
                distinct[w].append(distinct_pages(ops) * PAGE)
                for g in grans:
                    slaves[g].write(ops, data)
                    drains[g][w].append(slaves[g].copy(full=False))
            print(f"drain repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        load["after_drain"] = loadavg()
        # -- (b) write path ------------------------------------------------------
        if not args.skip_fio:
            for rep in range(args.repeats):
                order = grans[rep % len(grans):] + grans[:rep % len(grans)]
                for w in FIO_WORKLOADS:
                    for g in order:
                        fio[g][w].append(run_fio(slaves[g], w, args.runtime, args.ramp, base))
                print(f"fio repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        load["after_fio"] = loadavg()
    finally:
        for s in slaves.values():
            s.stop()
        shutil.rmtree(base, ignore_errors=True)

    # -- (c) map memory and checkpoint, on the real disk -------------------------
    maps = {}
    for g in grans:
        small = map_costs(g, GiB, args.repeats, tempfile.gettempdir())
        big = map_costs(g, args.big_gib * GiB, args.repeats, tempfile.gettempdir())
        scale = TiB / big["size"]
        tib = {k: (v * scale if v is not None else small[k]) for k, v in big.items()}
        maps[g] = {"1gib": small, "tib": tib}
        if big["size"] != TiB:
            maps[g][f"{args.big_gib}gib"] = big
    load["end"] = loadavg()
    loaded = max(load.values()) > os.cpu_count()

    med_fio = {g: {w: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                   for w, runs in ws.items() if runs} for g, ws in fio.items()}
    med_drain = {}
    for g in grans:
        med_drain[g] = {}
        for w in DRAIN_WORKLOADS:
            runs = drains[g][w]
            med_drain[g][w] = {
                "bytes_sent": statistics.median(r["bytes"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "drain_amplification": statistics.median(
                    r["bytes"] / b for r, b in zip(runs, written[w])),
                "drain_vs_distinct": statistics.median(
                    r["bytes"] / b for r, b in zip(runs, distinct[w])),
            }

    label = "LOADED" if loaded else "quiet"
    print(f"\n1 GiB volume per slave on /dev/shm, {args.repeats} repeats, medians;"
          f" loadavg {load} ({label}: {os.cpu_count()} cores)")
    print(f"(a) drain: {args.writes} writes per workload, then one incremental copy")
    print(f"{'gran':>5} {'workload':8} {'written MiB':>11} {'sent MiB':>9}"
          f" {'amplif.':>8} {'vs distinct':>11} {'copy s':>7}")
    for g in grans:
        for w in DRAIN_WORKLOADS:
            m = med_drain[g][w]
            print(f"{g // KiB:>4}K {w:8} {statistics.median(written[w]) / MiB:11.1f}"
                  f" {m['bytes_sent'] / MiB:9.1f} {m['drain_amplification']:8.2f}"
                  f" {m['drain_vs_distinct']:11.2f} {m['seconds']:7.3f}")
    if med_fio[grans[0]]:
        print("(b) write path, fio nbd engine, 1 connection")
        print(f"{'gran':>5} {'workload':19} {'IOPS':>9} {'srv CPU us/IO':>14}")
        for g in grans:
            for w, m in med_fio[g].items():
                print(f"{g // KiB:>4}K {w:19} {m['iops']:9,.0f} {m['cpu_us_per_io']:14.1f}")
    print(f"(c) change map, on {tempfile.gettempdir()} (fdatasync'd); 1 TiB "
          + ("measured" if args.big_gib == 1024 else f"extrapolated from {args.big_gib} GiB"))
    print(f"{'gran':>5} {'size':>6} {'maps MiB':>9} {'ckpt MiB':>9} {'ckpt ms':>8}"
          f" {'lock ms':>8} {'mark us':>8}")
    for g in grans:
        for key, m in maps[g].items():
            print(f"{g // KiB:>4}K {key:>6} {m['map_memory_bytes'] / MiB:9.2f}"
                  f" {m['checkpoint_bytes'] / MiB:9.2f} {m['checkpoint_ms']:8.2f}"
                  f" {m['lock_hold_ms']:8.3f} {m['mark_us'] or float('nan'):8.2f}")

    # The model row (see the module docstring): 4 KiB drain bytes, 64 KiB
    # map costs, plus 128 bytes for every 4 MiB region a sub-64K write touched.
    hybrid = None
    if 4 * KiB in grans and 64 * KiB in grans:
        sub_regions = {w: statistics.median(
            len({off // REGION for off, n in workload(w, args.writes, seed=rep * 101 + i)
                 if n % (64 * KiB) or off % (64 * KiB)}) for rep in range(args.repeats))
            for i, w in enumerate(DRAIN_WORKLOADS)}
        hybrid = {
            "drain_amplification": {w: round(med_drain[4 * KiB][w]["drain_amplification"], 3)
                                    for w in DRAIN_WORKLOADS},
            "sub_bitmap_bytes_after_workload": {w: n * (REGION // PAGE // 8)
                                                for w, n in sub_regions.items()},
            "sub_bitmap_bytes_per_tib_worst": TiB // PAGE // 8,
            "checkpoint_bytes_tib": round(maps[64 * KiB]["tib"]["checkpoint_bytes"]),
            "lock_hold_ms_tib": round(maps[64 * KiB]["tib"]["lock_hold_ms"], 3),
        }
        print("model 64K+4K (not run): drain amplification "
              + ", ".join(f"{w} {v:.2f}" for w, v in hybrid["drain_amplification"].items())
              + "; in-memory sub-bits after each workload "
              + ", ".join(f"{w} {v / KiB:.0f} KiB"
                          for w, v in hybrid["sub_bitmap_bytes_after_workload"].items())
              + f"; checkpoint and lock hold as 64K ({hybrid['checkpoint_bytes_tib'] / MiB:.1f}"
              f" MiB, {hybrid['lock_hold_ms_tib']} ms per TiB)")

    chosen, why = (pick_default(grans, fio, maps) if med_fio[grans[0]]
                   else (None, {}))
    if chosen:
        print(f"default by the rule: {chosen // KiB} KiB  ({why})")

    def r(x, n=3):
        return round(x, n) if isinstance(x, float) else x

    result = {
        "bench": "granularity", "size_gib": SIZE // GiB, "writes": args.writes,
        "repeats": args.repeats, "runtime_s": args.runtime,
        "loadavg": load["end"], "loadavg_phases": load, "loaded": loaded,
        "chosen_default": chosen, "rule": why,
        "drain_amplification": {str(g): {w: r(med_drain[g][w]["drain_amplification"])
                                         for w in DRAIN_WORKLOADS} for g in grans},
        "drain": {str(g): {w: {k: r(v) for k, v in m.items()} for w, m in ws.items()}
                  for g, ws in med_drain.items()},
        "write_iops": {str(g): {w: round(m["iops"]) for w, m in ws.items()}
                       for g, ws in med_fio.items()},
        "write_iops_best": {str(g): {w: round(max(r["iops"] for r in runs))
                                     for w, runs in ws.items() if runs}
                            for g, ws in fio.items()},
        "write_cpu_us_per_io": {str(g): {w: r(m["cpu_us_per_io"], 2) for w, m in ws.items()}
                                for g, ws in med_fio.items()},
        "bitmap_bytes_per_tib": {str(g): TiB // g // 8 for g in grans},
        "model_64k_plus_4k_sub": hybrid,
        "maps": {str(g): {k: {f: r(v) for f, v in m.items()} for k, m in ms.items()}
                 for g, ms in maps.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
