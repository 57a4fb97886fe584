"""Copy throughput of a slave's PiT copier against nbdcopy: full, loaded, incremental.

    .venv/bin/python bench/bench_copy.py [--size-mib 1024] [--repeats 3]
        [--load-iops 2000] [--changed-pct 1]

One volume of random data (no zero stretches, so nobody can skip any) on
/dev/shm, served by a cgmirror slave.  Each run copies it whole to a fresh
``nbdkit file`` target on /dev/shm (image created sparse, server restarted,
so every run pays the same tmpfs page allocation):

  cgmirror        freeze (volume named for a full copy) + thaw, then COPY
                  mode full; the slave reads its file through the PiT and
                  writes with libnbd, ``--inflight`` requests of up to 1 MiB;
                  ends with a flush.  Time: the slave's own copy clock (COPY
                  received -> target flushed); the wall time from COPY sent
                  to the slave idle (polled every 5 ms) is shown too.
  nbdcopy-file    ``nbdcopy --flush IMAGE TARGET``: the same bytes read
                  straight from the file; the stronger baseline.
  nbdcopy-export  ``nbdcopy --flush SLAVE-EXPORT TARGET``: read through the
                  slave's NBD export (the Python plugin's read path).

Loaded (a mirror's drain always shares the CPUs with the application): a
host writer (libnbd, one connection, random 4 KiB writes paced at
--load-iops) writes to the slave's export during the copy:

  cgmirror-loaded full copy as above; the writes overwrite blocks of the
                  cut, so the slave preserves them (its real cost).
  nbdcopy-loaded  ``nbdcopy --flush SLAVE-EXPORT TARGET`` with the same
                  writer running (nbdcopy's image is not a PiT: it pays no
                  preservation; the comparison flatters it).

nbdcopy runs with its defaults (multi-conn, threads = cores).  These five
are interleaved, the order rotating each repeat; medians.  The writer's
achieved rate is reported for each.

Incremental (after the above; each copier has its own target, filled by
one untimed full copy first): each repeat rewrites --changed-pct % of the
64 KiB blocks (scattered, random data) through the slave's export, and times

  cgmirror-incr   a cut and its incremental copy (only the changed blocks,
                  after checking that the target holds the baseline); time:
                  the slave's copy clock, as above
  nbdcopy-full    ``nbdcopy --flush IMAGE TARGET``: the whole image, which
                  is what a user without change tracking must send.

Prints a table, then one JSON line last: ratio_vs_nbdcopy (cgmirror /
nbdcopy-file throughput), ratio_vs_nbdcopy_export, ratio_vs_nbdcopy_loaded
(cgmirror-loaded / nbdcopy-loaded MB/s), ratio_incremental_vs_nbdcopy_full
(our seconds / theirs: below 1 is faster), the bytes each sent, the MB/s of
each, and the load average.  Cleans up /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from harness import peers  # noqa: E402
from coordinator import launch  # noqa: E402
from coordinator.control import ControlClient  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10
KINDS = ["cgmirror", "nbdcopy-file", "nbdcopy-export", "cgmirror-loaded", "nbdcopy-loaded"]
INCR_KINDS = ["cgmirror-incr", "nbdcopy-full"]
BLOCK = 64 * KiB          # what --changed-pct counts (the default granularity)


class Writer(threading.Thread):
    """Host writes at a fixed rate: random 4 KiB writes through one libnbd
    connection, paced on the monotonic clock (no catch-up bursts after a
    stall, e.g. a freeze, so the offered load stays the same for everyone)."""

    def __init__(self, uri: str, size: int, iops: int, seed: int):
        super().__init__(name="host-writer", daemon=True)
        self.uri, self.size, self.iops, self.seed = uri, size, iops, seed
        self.halt = threading.Event()
        self.done = 0
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        rnd = random.Random(self.seed)
        h = nbd.NBD()
        h.set_handle_name("host-writer")
        buf = os.urandom(4 * KiB)
        pages = self.size // (4 * KiB)
        t0 = nxt = time.monotonic()
        try:
            h.connect_uri(self.uri)
            while not self.halt.is_set():
                h.pwrite(buf, rnd.randrange(pages) * 4 * KiB)
                self.done += 1
                nxt += 1 / self.iops
                delay = nxt - time.monotonic()
                if delay > 0:
                    self.halt.wait(delay)
                elif delay < -0.05:
                    nxt = time.monotonic()
        except BaseException as exc:   # reported by stop()
            self.error = exc
        finally:
            self.seconds = time.monotonic() - t0
            if self.error is None:
                h.shutdown()

    def stop(self) -> float:
        """Stop, join and return the achieved IOPS (raise what it raised)."""
        self.halt.set()
        self.join(30)
        if self.is_alive():
            raise RuntimeError("host writer did not stop within 30 s")
        if self.error is not None:
            raise RuntimeError(f"host writer failed: {self.error}") from self.error
        return self.done / max(self.seconds, 1e-9)


def change_blocks(uri: str, size: int, pct: float, seed: int) -> int:
    """Rewrite ``pct`` % of the 64 KiB blocks, scattered; return bytes written."""
    rnd = random.Random(seed)
    nblocks = size // BLOCK
    picks = rnd.sample(range(nblocks), max(1, round(nblocks * pct / 100)))
    h = nbd.NBD()
    h.set_handle_name("changer")
    h.connect_uri(uri)
    try:
        for b in picks:
            h.pwrite(os.urandom(BLOCK), b * BLOCK)
        h.flush()
    finally:
        h.shutdown()
    return len(picks) * BLOCK


def _fill(path: str, size: int) -> None:
    """Random bytes, written in 64 MiB chunks from /dev/urandom."""
    with open("/dev/urandom", "rb") as src, open(path, "wb") as dst:
        left = size
        while left:
            chunk = src.read(min(left, 64 * MiB))
            dst.write(chunk)
            left -= len(chunk)


def _wait_idle(c: ControlClient, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = c.call("status")
        if st["phase"] == "idle" and (st.get("last_copy") or {}).get("n") == n:
            return st
        if st["phase"] == "idle":
            raise RuntimeError(f"cut {n} ended ({st.get('ended')}) without a copy")
        if time.monotonic() > deadline:
            raise RuntimeError(f"copy of cut {n} not done after {timeout} s")
        time.sleep(0.005)


def run_cgmirror(c: ControlClient, n: int, volume: str, uri: str, inflight: int,
                 size: int | None) -> dict:
    """One cut and copy: full when ``size`` is given (and checked), else
    incremental.  ``wall`` runs from COPY sent to the slave idle."""
    full = size is not None
    c.call("freeze", n=n, lease_ms=10_000, volumes=[volume], full=[volume] if full else [])
    c.call("thaw", n=n)
    t0 = time.monotonic()
    r = c.call("copy", n=n, targets={volume: uri}, mode="full" if full else "incremental",
               inflight=inflight, timeout_ms=60_000)
    st = _wait_idle(c, n, 300)
    wall = time.monotonic() - t0
    last = st["last_copy"]
    vc = last["volumes"][volume]
    if not last["ok"]:
        raise RuntimeError(f"copy failed: {vc['error']}")
    if full and vc["done_bytes"] != size:
        raise RuntimeError(f"copied {vc['done_bytes']} bytes, not {size}")
    return {"seconds": vc["seconds"], "wall": wall, "bytes": r["bytes"][volume]}


def run_nbdcopy(source: str, uri: str) -> dict:
    t0 = time.monotonic()
    r = subprocess.run(["nbdcopy", "--flush", source, uri], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nbdcopy failed ({r.returncode}): {r.stderr.strip()}")
    return {"seconds": wall, "wall": wall}


def _same(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for _ in range(0, size, 64 * MiB):
            if fa.read(64 * MiB) != fb.read(64 * MiB):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats (3 keeps five copiers under ~3 minutes)")
    ap.add_argument("--inflight", type=int, default=8, help="cgmirror requests in flight")
    ap.add_argument("--threads", type=int, default=1,
                    help="slave nbdkit --threads (1: the product default)")
    ap.add_argument("--verify", action="store_true",
                    help="compare the target with the source after every unloaded run")
    ap.add_argument("--load-iops", type=int, default=2000,
                    help="host writer's rate (4 KiB random writes) in the loaded cases")
    ap.add_argument("--changed-pct", type=float, default=1.0,
                    help="%% of 64 KiB blocks changed before each incremental copy")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "nbdcopy"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    free = shutil.disk_usage("/dev/shm").free
    if free < 4 * size:
        print(f"/dev/shm has {free / MiB:.0f} MiB free, needs {4 * size / MiB:.0f}",
              file=sys.stderr)
        return 2

    base = tempfile.mkdtemp(prefix="cgm-copy-", dir="/dev/shm")
    proc = None
    target = target2 = None
    results: dict[str, list[dict]] = {k: [] for k in KINDS + INCR_KINDS}
    load = {"start": round(os.getloadavg()[0], 2)}
    try:
        image = os.path.join(base, "vol.img")
        _fill(image, size)
        spec = launch.SlaveSpec(name="s1", statedir=os.path.join(base, "s1"),
                                nbd_socket=os.path.join(base, "s1.sock"),
                                control=os.path.join(base, "s1.ctl"),
                                volumes=[("v", image, size)], threads=args.threads)
        proc = launch.start(spec)
        timg = os.path.join(base, "target.img")
        tsock = os.path.join(base, "target.sock")
        timg2 = os.path.join(base, "target2.img")
        tsock2 = os.path.join(base, "target2.sock")
        def fresh_target():
            nonlocal target
            if target is not None:
                target.stop()
                target = None
            os.unlink(timg) if os.path.exists(timg) else None
            peers.make_image(timg, size)
            target = peers.nbdkit_file(timg, tsock)

        with ControlClient(spec.control) as c:
            n = c.call("status")["n"]
            for rep in range(args.repeats):
                order = KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]
                for kind in order:
                    fresh_target()
                    writer = None
                    if kind.endswith("-loaded"):
                        writer = Writer(spec.uri("v"), size, args.load_iops, seed=rep)
                        writer.start()
                    try:
                        if kind.startswith("cgmirror"):
                            n += 1
                            r = run_cgmirror(c, n, "v", target.uri, args.inflight, size)
                        elif kind == "nbdcopy-file":
                            r = run_nbdcopy(image, target.uri)
                        else:
                            r = run_nbdcopy(spec.uri("v"), target.uri)
                    finally:
                        writer_iops = writer.stop() if writer is not None else None
                    if writer is not None:
                        r["writer_iops"] = writer_iops
                    if args.verify and writer is None and not _same(image, timg, size):
                        raise RuntimeError(f"{kind}: target differs from the source")
                    results[kind].append(r)
                    print(f"repeat {rep + 1}/{args.repeats} {kind:15} "
                          f"{size / r['seconds'] / 1e6:8.0f} MB/s", file=sys.stderr)
            load["after_full"] = round(os.getloadavg()[0], 2)

            # -- incremental: each copier keeps its own target throughout ------
            # (nbdcopy writing cgmirror's target would change the baseline
            # under it, and the slave rightly refuses an incremental copy.)
            fresh_target()
            n += 1
            run_cgmirror(c, n, "v", target.uri, args.inflight, size)
            peers.make_image(timg2, size)
            target2 = peers.nbdkit_file(timg2, tsock2)
            run_nbdcopy(image, target2.uri)        # allocates its pages, as above
            for rep in range(args.repeats):
                changed = change_blocks(spec.uri("v"), size, args.changed_pct, seed=rep)
                order = INCR_KINDS[rep % 2:] + INCR_KINDS[:rep % 2]
                for kind in order:
                    if kind == "cgmirror-incr":
                        n += 1
                        r = run_cgmirror(c, n, "v", target.uri, args.inflight, None)
                    else:
                        r = run_nbdcopy(image, target2.uri)
                        r["bytes"] = size
                    r["changed"] = changed
                    results[kind].append(r)
                    print(f"repeat {rep + 1}/{args.repeats} {kind:15} "
                          f"{r['seconds']:8.3f} s  {r['bytes'] / MiB:8.1f} MiB", file=sys.stderr)
                if args.verify and not (_same(image, timg, size) and _same(image, timg2, size)):
                    raise RuntimeError("incremental: a target differs from the source")
    finally:
        for t in (target, target2):
            if t is not None:
                t.stop()
        if proc is not None:
            proc.stop(timeout=15)
        shutil.rmtree(base, ignore_errors=True)

    load["end"] = round(os.getloadavg()[0], 2)
    loaded = max(load.values()) > os.cpu_count()
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    mbps = {k: size / s / 1e6 for k, s in med.items() if k in KINDS}
    wiops = {k: statistics.median(r["writer_iops"] for r in results[k])
             for k in KINDS if k.endswith("-loaded")}
    sent = {k: statistics.median(r["bytes"] for r in results[k]) for k in INCR_KINDS}
    changed = statistics.median(r["changed"] for r in results["cgmirror-incr"])
    print(f"\nfull copy of {args.size_mib} MiB of random data, /dev/shm -> nbdkit file"
          f" on /dev/shm, {args.repeats} interleaved repeats, medians"
          f" (cgmirror: --inflight {args.inflight}, slave --threads {args.threads});"
          f" loadavg {load} ({'LOADED' if loaded else 'quiet'}: {os.cpu_count()} cores)")
    print(f"{'copier':16} {'seconds':>8} {'MB/s':>8} {'wall s':>8} {'vs nbdcopy-file':>16}"
          f" {'writer IOPS':>12}")
    for k in KINDS:
        print(f"{k:16} {med[k]:8.3f} {mbps[k]:8.0f} {wall[k]:8.3f}"
              f" {mbps[k] / mbps['nbdcopy-file']:16.2f}"
              + (f" {wiops[k]:12,.0f}" if k in wiops else ""))
    print(f"loaded: host writer at {args.load_iops} x 4 KiB/s offered;"
          f" cgmirror-loaded / nbdcopy-loaded = {mbps['cgmirror-loaded'] / mbps['nbdcopy-loaded']:.2f}")
    print(f"\nincremental: {args.changed_pct} % of 64 KiB blocks changed"
          f" ({changed / MiB:.1f} MiB), then")
    print(f"{'copier':16} {'seconds':>8} {'MiB sent':>9} {'wall s':>8}")
    for k in INCR_KINDS:
        print(f"{k:16} {med[k]:8.3f} {sent[k] / MiB:9.1f} {wall[k]:8.3f}")
    print(f"cgmirror-incr / nbdcopy-full time = {med['cgmirror-incr'] / med['nbdcopy-full']:.3f}")
    result = {
        "bench": "copy", "size_mib": args.size_mib, "repeats": args.repeats,
        "ratio_vs_nbdcopy": round(mbps["cgmirror"] / mbps["nbdcopy-file"], 3),
        "ratio_vs_nbdcopy_export": round(mbps["cgmirror"] / mbps["nbdcopy-export"], 3),
        "ratio_vs_nbdcopy_loaded": round(mbps["cgmirror-loaded"] / mbps["nbdcopy-loaded"], 3),
        "ratio_incremental_vs_nbdcopy_full": round(med["cgmirror-incr"] / med["nbdcopy-full"], 4),
        "cgmirror_mb_s": round(mbps["cgmirror"]),
        "cgmirror_wall_mb_s": round(size / wall["cgmirror"] / 1e6),
        "nbdcopy_file_mb_s": round(mbps["nbdcopy-file"]),
        "nbdcopy_export_mb_s": round(mbps["nbdcopy-export"]),
        "cgmirror_loaded_mb_s": round(mbps["cgmirror-loaded"]),
        "nbdcopy_loaded_mb_s": round(mbps["nbdcopy-loaded"]),
        "load_iops": args.load_iops,
        "writer_iops": {k: round(v) for k, v in wiops.items()},
        "incremental_changed_bytes": changed,
        "incremental_bytes": {k: sent[k] for k in INCR_KINDS},
        "incremental_seconds": {k: round(med[k], 4) for k in INCR_KINDS},
        "incremental_wall_seconds": {k: round(wall[k], 4) for k in INCR_KINDS},
        "inflight": args.inflight,
        "loadavg": load["end"], "loadavg_phases": load, "loaded": loaded,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
