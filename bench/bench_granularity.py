"""What each change-map granularity costs: drain bytes, write path, map and checkpoint.

    .venv/bin/python bench/bench_granularity.py [--granularities 4K,16K,64K]
        [--sub 4K] [--writes 4096] [--repeats 3] [--runtime 3] [--big-gib 64]

One slave per granularity (plain maps: sub-blocks off), plus one at the
coarsest granularity with --sub sub-blocks (the ``64K+4K`` row: the
product's default), all running at once (one 1 GiB volume each on
/dev/shm, fallocated), so that every case is measured side by side and
interleaved over the same minutes of machine load:

(a) drain bytes.  After a full copy to an ``nbdkit file`` target, a workload
    is written through the slave's export with libnbd (the same seeded
    offsets and data at every granularity), then one cut and one incremental
    copy.  ``drain_amplification`` = bytes the copy wrote to the target
    (its ``sent_bytes``) / bytes the host
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

The finer scheme that does not pay everywhere (``64K+4K``, built: see
nbdplugin/changemap.py, "Sub-blocks") is measured as a row of its own: 64
KiB bits persisted and checkpointed as plain 64 KiB, 4 KiB sub-records in
memory only (a dict of block -> mask, capped).  Its map costs add the
records' memory after the rand4k workload's marks (tracemalloc), and the
rule's check (1) decides whether sub-blocks are on by default: (2) and (3)
are those of its granularity.  The JSON keeps ``model_64k_plus_4k_sub``
(now measured, ``"measured": true``) and adds the row under the key
``"65536+4096"`` in the per-row fields.
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
from nbdplugin import changemap  # noqa: E402
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


def label(g: int, sub: int) -> str:
    """The row's key: the granularity, or "G+S" with sub-blocks."""
    return str(g) if sub >= g else f"{g}+{sub}"


def short(key: str) -> str:
    return "+".join(f"{int(x) // KiB}K" for x in key.split("+"))


class Slave:
    """One slave at one granularity (and sub-block size), with its copy
    target and a libnbd handle."""

    def __init__(self, base: str, g: int, sub: int):
        self.g, self.sub = g, sub
        self.name = f"g{g // KiB}k" + (f"s{sub // KiB}k" if sub < g else "")
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
                                     volumes=[("v", self.image, None)], granularity=g,
                                     env={"CGMIRROR_SUBBLOCK": str(sub)})
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
        """One cut and its copy to the target; returns the bytes written to
        the target (``sent_bytes``), those of the blocks, and seconds."""
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
        p = last["volumes"]["v"]
        assert p["done_bytes"] == r["bytes"]["v"]
        return {"bytes": p["sent_bytes"], "block_bytes": p["done_bytes"],
                "seconds": p["seconds"]}

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

def record_bytes(cm: ChangeMap, ops: list[tuple[int, int]]) -> tuple[int, int]:
    """(bytes, count) of the sub-records ``ops`` leave in a fresh cr
    (tracemalloc: what the dict and its ints take)."""
    import tracemalloc
    cm.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for off, n in ops:
            cm.mark(off, n)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    count = len(cm.sub_cr)
    cm.clear()
    return used, count


def map_costs(g: int, sub: int, size: int, repeats: int, workdir: str,
              writes: int) -> dict:
    """Memory, checkpoint bytes/time and lock hold of a ChangeMap of ``size``."""
    d = tempfile.mkdtemp(prefix=f"ckpt-{g}-", dir=workdir)
    try:
        cm = ChangeMap(d, "v", size, g, max(REGION, g), sub=sub)
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
        out = {"size": size, "map_memory_bytes": mem, "checkpoint_bytes": ckpt_bytes,
               "checkpoint_ms": statistics.median(times) * 1000,
               "lock_hold_ms": statistics.median(holds) * 1000, "mark_us": mark_us}
        if sub < g:
            # The records a rand4k group leaves, and the most a map can hold.
            ops = [(rnd.randrange(npages) * PAGE, PAGE) for _ in range(writes)]
            out["sub_record_bytes"], out["sub_records"] = record_bytes(cm, ops)
            cap = min(changemap.SUB_RECORDS_MAX, cm.nblocks)
            out["sub_record_bytes_max"] = round(
                2 * cap * out["sub_record_bytes"] / max(1, out["sub_records"]))
        cm.close()
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pick_default(rows: list[str], fio: dict, maps: dict) -> tuple[int, int | None, dict]:
    """Apply the rule of the module docstring (``fio[row][w]``: the list of
    runs of one row and workload w; a row is ``label(g, sub)``); return
    (granularity, sub-block size or None, why).  Sub-blocks are on when the
    chosen granularity's sub-block row passes the same checks."""
    why = {}
    cpu_us = statistics.median(r["cpu_us_per_io"] for k in rows
                               for r in fio[k]["4k_randwrite_qd16"])
    cheapest = min(maps[k]["1gib"]["mark_us"] for k in rows)
    ok = []
    for k in rows:
        m = maps[k]["tib"]
        checks = {
            "mark_within": maps[k]["1gib"]["mark_us"] - cheapest <= IOPS_WITHIN_COST * cpu_us,
            "ckpt_bytes_tib": m["checkpoint_bytes"] <= MAX_CKPT_BYTES_TIB,
            "lock_ms_tib": m["lock_hold_ms"] <= MAX_LOCK_MS_TIB,
        }
        why[k] = checks
        if all(checks.values()):
            ok.append(k)
    plain = [int(k) for k in ok if "+" not in k]
    g = min(plain) if plain else max(int(k.split("+")[0]) for k in rows)
    subs = [int(k.split("+")[1]) for k in ok if k.startswith(f"{g}+")]
    return g, (min(subs) if subs else None), why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--granularities", default="4K,16K,64K")
    ap.add_argument("--sub", default="4K",
                    help="sub-block size of the extra row at the coarsest granularity")
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
    sub = parse_size(args.sub)
    # (granularity, sub-block size) per row; sub == g: plain bits.
    cases = [(g, g) for g in grans] + ([(grans[-1], sub)] if sub < grans[-1] else [])
    rows = [label(g, s) for g, s in cases]
    for tool in ("nbdkit", "fio"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    need = 2 * SIZE * len(cases) + GiB
    if shutil.disk_usage("/dev/shm").free < need:
        print(f"/dev/shm needs {need // MiB} MiB free", file=sys.stderr)
        return 2

    load = {"start": loadavg()}
    data = os.urandom(MiB)
    drains = {k: {w: [] for w in DRAIN_WORKLOADS} for k in rows}
    written = {w: [] for w in DRAIN_WORKLOADS}
    distinct = {w: [] for w in DRAIN_WORKLOADS}
    fio = {k: {w: [] for w in FIO_WORKLOADS} for k in rows}
    base = tempfile.mkdtemp(prefix="cgm-gran-", dir="/dev/shm")
    slaves: dict[str, Slave] = {}
    try:
        for (g, s), k in zip(cases, rows):
            slaves[k] = Slave(base, g, s)
            slaves[k].start()
            slaves[k].copy(full=True)      # the baseline of every incremental copy
        # -- (a) drain bytes --------------------------------------------------
        for rep in range(args.repeats):
            for w in DRAIN_WORKLOADS:
                ops = workload(w, args.writes, seed=rep * 101 + DRAIN_WORKLOADS.index(w))
                written[w].append(sum(n for _, n in ops))
                distinct[w].append(distinct_pages(ops) * PAGE)
                for k in rows:
                    slaves[k].write(ops, data)
                    drains[k][w].append(slaves[k].copy(full=False))
            print(f"drain repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        load["after_drain"] = loadavg()
        # -- (b) write path ------------------------------------------------------
        if not args.skip_fio:
            for rep in range(args.repeats):
                order = rows[rep % len(rows):] + rows[:rep % len(rows)]
                for w in FIO_WORKLOADS:
                    for k in order:
                        fio[k][w].append(run_fio(slaves[k], w, args.runtime, args.ramp, base))
                print(f"fio repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        load["after_fio"] = loadavg()
    finally:
        for s in slaves.values():
            s.stop()
        shutil.rmtree(base, ignore_errors=True)

    # -- (c) map memory and checkpoint, on the real disk -------------------------
    maps = {}
    for (g, s), row in zip(cases, rows):
        small = map_costs(g, s, GiB, args.repeats, tempfile.gettempdir(), args.writes)
        big = map_costs(g, s, args.big_gib * GiB, args.repeats, tempfile.gettempdir(),
                        args.writes)
        scale = TiB / big["size"]
        # Records do not scale with the volume (capped; a group's writes).
        tib = {k: (v * scale if v is not None and not k.startswith("sub_") else small[k])
               for k, v in big.items()}
        maps[row] = {"1gib": small, "tib": tib}
        if big["size"] != TiB:
            maps[row][f"{args.big_gib}gib"] = big
    load["end"] = loadavg()
    loaded = max(load.values()) > os.cpu_count()

    med_fio = {g: {w: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                   for w, runs in ws.items() if runs} for g, ws in fio.items()}
    med_drain = {}
    for g in rows:
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

    state = "LOADED" if loaded else "quiet"
    print(f"\n1 GiB volume per slave on /dev/shm, {args.repeats} repeats, medians;"
          f" loadavg {load} ({state}: {os.cpu_count()} cores)")
    print(f"(a) drain: {args.writes} writes per workload, then one incremental copy")
    print(f"{'gran':>7} {'workload':8} {'written MiB':>11} {'sent MiB':>9}"
          f" {'amplif.':>8} {'vs distinct':>11} {'copy s':>7}")
    for g in rows:
        for w in DRAIN_WORKLOADS:
            m = med_drain[g][w]
            print(f"{short(g):>7} {w:8} {statistics.median(written[w]) / MiB:11.1f}"
                  f" {m['bytes_sent'] / MiB:9.1f} {m['drain_amplification']:8.2f}"
                  f" {m['drain_vs_distinct']:11.2f} {m['seconds']:7.3f}")
    if med_fio[rows[0]]:
        print("(b) write path, fio nbd engine, 1 connection")
        print(f"{'gran':>7} {'workload':19} {'IOPS':>9} {'srv CPU us/IO':>14}")
        for g in rows:
            for w, m in med_fio[g].items():
                print(f"{short(g):>7} {w:19} {m['iops']:9,.0f} {m['cpu_us_per_io']:14.1f}")
    print(f"(c) change map, on {tempfile.gettempdir()} (fdatasync'd); 1 TiB "
          + ("measured" if args.big_gib == 1024 else f"extrapolated from {args.big_gib} GiB"))
    print(f"{'gran':>7} {'size':>6} {'maps MiB':>9} {'ckpt MiB':>9} {'ckpt ms':>8}"
          f" {'lock ms':>8} {'mark us':>8} {'records KiB (max)':>18}")
    for g in rows:
        for key, m in maps[g].items():
            rec = (f"{m['sub_record_bytes'] / KiB:8.0f} ({m['sub_record_bytes_max'] / KiB:.0f})"
                   if "sub_record_bytes" in m else "")
            print(f"{short(g):>7} {key:>6} {m['map_memory_bytes'] / MiB:9.2f}"
                  f" {m['checkpoint_bytes'] / MiB:9.2f} {m['checkpoint_ms']:8.2f}"
                  f" {m['lock_hold_ms']:8.3f} {m['mark_us'] or float('nan'):8.2f} {rec:>18}")

    # The sub-block row, under the fields the model row had.
    hybrid = None
    srow = next((k for k in rows if "+" in k), None)
    if srow is not None:
        m1 = maps[srow]["1gib"]
        hybrid = {
            "measured": True, "row": srow,
            "drain_amplification": {w: round(med_drain[srow][w]["drain_amplification"], 3)
                                    for w in DRAIN_WORKLOADS},
            "sub_bitmap_bytes_after_workload": {"rand4k": m1["sub_record_bytes"]},
            "sub_records_after_workload": {"rand4k": m1["sub_records"]},
            "sub_bitmap_bytes_per_tib_worst": m1["sub_record_bytes_max"],
            "checkpoint_bytes_tib": round(maps[srow]["tib"]["checkpoint_bytes"]),
            "lock_hold_ms_tib": round(maps[srow]["tib"]["lock_hold_ms"], 3),
            "mark_us": round(m1["mark_us"], 3),
        }
        print(f"{short(srow)} (built): drain amplification "
              + ", ".join(f"{w} {v:.2f}" for w, v in hybrid["drain_amplification"].items())
              + f"; records after rand4k {m1['sub_record_bytes'] / KiB:.0f} KiB"
              f" ({m1['sub_records']} blocks), at most"
              f" {m1['sub_record_bytes_max'] / MiB:.1f} MiB a volume"
              f"; checkpoint and lock hold {hybrid['checkpoint_bytes_tib'] / MiB:.1f}"
              f" MiB, {hybrid['lock_hold_ms_tib']} ms per TiB")

    chosen, chosen_sub, why = (pick_default(rows, fio, maps) if med_fio[rows[0]]
                               else (None, None, {}))
    if chosen:
        print(f"default by the rule: {chosen // KiB} KiB,"
              f" sub-blocks {f'{chosen_sub // KiB} KiB' if chosen_sub else 'off'}  ({why})")

    def r(x, n=3):
        return round(x, n) if isinstance(x, float) else x

    result = {
        "bench": "granularity", "size_gib": SIZE // GiB, "writes": args.writes,
        "repeats": args.repeats, "runtime_s": args.runtime,
        "loadavg": load["end"], "loadavg_phases": load, "loaded": loaded,
        "chosen_default": chosen, "chosen_sub": chosen_sub, "rule": why,
        "drain_amplification": {g: {w: r(med_drain[g][w]["drain_amplification"])
                                    for w in DRAIN_WORKLOADS} for g in rows},
        "drain": {g: {w: {k: r(v) for k, v in m.items()} for w, m in ws.items()}
                  for g, ws in med_drain.items()},
        "write_iops": {g: {w: round(m["iops"]) for w, m in ws.items()}
                       for g, ws in med_fio.items()},
        "write_iops_best": {g: {w: round(max(r["iops"] for r in runs))
                                for w, runs in ws.items() if runs}
                            for g, ws in fio.items()},
        "write_cpu_us_per_io": {g: {w: r(m["cpu_us_per_io"], 2) for w, m in ws.items()}
                                for g, ws in med_fio.items()},
        "bitmap_bytes_per_tib": {label(g, s): TiB // g // 8 for g, s in cases},
        "model_64k_plus_4k_sub": hybrid,
        "maps": {g: {k: {f: r(v) for f, v in m.items()} for k, m in ms.items()}
                 for g, ms in maps.items()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
