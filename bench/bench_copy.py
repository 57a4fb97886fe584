"""Full-copy throughput of a slave's PiT copier against nbdcopy.

    .venv/bin/python bench/bench_copy.py [--size-mib 1024] [--repeats 5]

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

nbdcopy runs with its defaults (multi-conn, threads = cores).  The three are
interleaved, the order rotating each repeat; medians.  Nothing writes to the
volume meanwhile (no preservation cost: that is the test suite's business).

Prints a table, then one JSON line last: ratio_vs_nbdcopy (cgmirror /
nbdcopy-file throughput), ratio_vs_nbdcopy_export, and the MB/s of each.
Cleans up /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import peers  # noqa: E402
from coordinator import launch  # noqa: E402
from coordinator.control import ControlClient  # noqa: E402

MiB = 1 << 20
KINDS = ["cgmirror", "nbdcopy-file", "nbdcopy-export"]


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
                 size: int) -> dict:
    c.call("freeze", n=n, lease_ms=10_000, volumes=[volume], full=[volume])
    c.call("thaw", n=n)
    t0 = time.monotonic()
    c.call("copy", n=n, targets={volume: uri}, mode="full", inflight=inflight,
           timeout_ms=60_000)
    st = _wait_idle(c, n, 300)
    wall = time.monotonic() - t0
    last = st["last_copy"]
    vc = last["volumes"][volume]
    if not last["ok"]:
        raise RuntimeError(f"copy failed: {vc['error']}")
    if vc["done_bytes"] != size:
        raise RuntimeError(f"copied {vc['done_bytes']} bytes, not {size}")
    return {"seconds": vc["seconds"], "wall": wall}


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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inflight", type=int, default=8, help="cgmirror requests in flight")
    ap.add_argument("--threads", type=int, default=1,
                    help="slave nbdkit --threads (1: the product default)")
    ap.add_argument("--verify", action="store_true",
                    help="compare the target with the source after every run")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "nbdcopy"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    free = shutil.disk_usage("/dev/shm").free
    if free < 3 * size:
        print(f"/dev/shm has {free / MiB:.0f} MiB free, needs {3 * size / MiB:.0f}",
              file=sys.stderr)
        return 2

    base = tempfile.mkdtemp(prefix="cgm-copy-", dir="/dev/shm")
    proc = None
    target = None
    results: dict[str, list[dict]] = {k: [] for k in KINDS}
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
        with ControlClient(spec.control) as c:
            n = c.call("status")["n"]
            for rep in range(args.repeats):
                order = KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]
                for kind in order:
                    if target is not None:
                        target.stop()
                        target = None
                    os.unlink(timg) if os.path.exists(timg) else None
                    peers.make_image(timg, size)
                    target = peers.nbdkit_file(timg, tsock)
                    if kind == "cgmirror":
                        n += 1
                        r = run_cgmirror(c, n, "v", target.uri, args.inflight, size)
                    elif kind == "nbdcopy-file":
                        r = run_nbdcopy(image, target.uri)
                    else:
                        r = run_nbdcopy(spec.uri("v"), target.uri)
                    if args.verify and not _same(image, timg, size):
                        raise RuntimeError(f"{kind}: target differs from the source")
                    results[kind].append(r)
                    print(f"repeat {rep + 1}/{args.repeats} {kind:15} "
                          f"{size / r['seconds'] / 1e6:8.0f} MB/s", file=sys.stderr)
    finally:
        if target is not None:
            target.stop()
        if proc is not None:
            proc.stop(timeout=15)
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    mbps = {k: size / s / 1e6 for k, s in med.items()}
    print(f"\nfull copy of {args.size_mib} MiB of random data, /dev/shm -> nbdkit file"
          f" on /dev/shm, {args.repeats} interleaved repeats, medians"
          f" (cgmirror: --inflight {args.inflight}, slave --threads {args.threads})")
    print(f"{'copier':16} {'seconds':>8} {'MB/s':>8} {'wall s':>8} {'vs nbdcopy-file':>16}")
    for k in KINDS:
        print(f"{k:16} {med[k]:8.3f} {mbps[k]:8.0f} {wall[k]:8.3f}"
              f" {mbps[k] / mbps['nbdcopy-file']:16.2f}")
    result = {
        "bench": "copy", "size_mib": args.size_mib, "repeats": args.repeats,
        "ratio_vs_nbdcopy": round(mbps["cgmirror"] / mbps["nbdcopy-file"], 3),
        "ratio_vs_nbdcopy_export": round(mbps["cgmirror"] / mbps["nbdcopy-export"], 3),
        "cgmirror_mb_s": round(mbps["cgmirror"]),
        "cgmirror_wall_mb_s": round(size / wall["cgmirror"] / 1e6),
        "nbdcopy_file_mb_s": round(mbps["nbdcopy-file"]),
        "nbdcopy_export_mb_s": round(mbps["nbdcopy-export"]),
        "inflight": args.inflight,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
