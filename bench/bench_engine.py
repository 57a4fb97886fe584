"""Full-copy throughput of the two copy engines side by side, against nbdcopy.

    .venv/bin/python bench/bench_engine.py [--size-mib 1024] [--repeats 5]

The set-up of bench_copy.py (one volume of random data on /dev/shm, a fresh
``nbdkit file`` target on /dev/shm each run), with two slaves, one per
engine (``CGMIRROR_COPY_ENGINE``), each serving its own copy of the image
(a volume belongs to one slave):

  python        the copier's Python streams (libnbd's Python binding)
  native        native/copy.c, the GIL released for the whole transfer
  nbdcopy-file  ``nbdcopy --flush IMAGE TARGET``

Interleaved, the order rotating each repeat; medians.

Then the GIL case, in this process: ``Copy`` of the same image (a plain
file source) with each engine while a Python thread spins, as the slave's
write path does under host writes: the Python engine's streams then wait
for the GIL, the native one does not (``*_gil_mb_s``).  The machine may be
shared: the 1-minute load average before and after is printed.  One JSON
line last: MB/s of each and ratio_native_vs_nbdcopy, ratio_native_vs_python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_copy import _fill, run_cgmirror, run_nbdcopy  # noqa: E402
from coordinator import launch  # noqa: E402
from coordinator.control import ControlClient  # noqa: E402
from harness import peers  # noqa: E402
from native.bitmap import Bitmap  # noqa: E402
from nbdplugin.copier import Copy  # noqa: E402

MiB = 1 << 20
ENGINES = ["python", "native"]
KINDS = ENGINES + ["nbdcopy-file"]


class FileSource:
    """A whole file as a copy source, for both engines (``native``)."""

    granularity = 64 * 1024
    broken = None

    def __init__(self, fd: int, size: int):
        self.name, self.fd, self.size = "bench", fd, size

    def blocks(self) -> Bitmap:
        bm = Bitmap(-(-self.size // self.granularity))
        bm.set(0, bm.nbits)
        return bm

    def read(self, buf, block: int) -> None:
        if os.preadv(self.fd, [buf], block * self.granularity) != len(buf):
            raise OSError("short read")

    def confirm(self, start: int, count: int) -> None:
        pass

    def flushed(self, start: int, count: int) -> None:
        pass

    def native(self):
        return self.fd, None


def copy_with_spinner(image: str, size: int, engine: str, uri: str, inflight: int) -> float:
    """Seconds for one in-process Copy with a Python thread spinning."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    fd = os.open(image, os.O_RDONLY)
    os.environ["CGMIRROR_COPY_ENGINE"] = engine
    spinner.start()
    try:
        c = Copy(FileSource(fd, size), uri, inflight=inflight, timeout=60)
        t0 = time.monotonic()
        c.run()
        if c.state != "done":
            raise RuntimeError(f"{engine} copy failed: {c.error}")
        return time.monotonic() - t0
    finally:
        stop.set()
        spinner.join()
        os.close(fd)
        os.environ.pop("CGMIRROR_COPY_ENGINE", None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inflight", type=int, default=8, help="requests in flight per copy")
    args = ap.parse_args(argv)
    for tool in ("nbdkit", "nbdcopy"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    if shutil.disk_usage("/dev/shm").free < 4 * size:
        print(f"/dev/shm needs {4 * size / MiB:.0f} MiB free", file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0]
    base = tempfile.mkdtemp(prefix="cgm-engine-", dir="/dev/shm")
    procs: dict[str, launch.SlaveProcess] = {}
    clients: dict[str, ControlClient] = {}
    target = None
    gil_kinds = [f"{e}-gil" for e in ENGINES]
    results: dict[str, list[float]] = {k: [] for k in KINDS + gil_kinds}
    try:
        image = os.path.join(base, "vol.img")
        _fill(image, size)
        for eng in ENGINES:
            own = os.path.join(base, f"vol-{eng}.img")
            shutil.copyfile(image, own)
            spec = launch.SlaveSpec(name=eng, statedir=os.path.join(base, eng),
                                    nbd_socket=os.path.join(base, f"{eng}.sock"),
                                    control=os.path.join(base, f"{eng}.ctl"),
                                    volumes=[("v", own, size)], threads=1,
                                    env={"CGMIRROR_COPY_ENGINE": eng})
            procs[eng] = launch.start(spec)
            clients[eng] = ControlClient(spec.control)
        ns = {eng: clients[eng].call("status")["n"] for eng in ENGINES}
        timg, tsock = os.path.join(base, "target.img"), os.path.join(base, "target.sock")
        for rep in range(args.repeats):
            for kind in KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]:
                if target is not None:
                    target.stop()
                    target = None
                if os.path.exists(timg):
                    os.unlink(timg)
                peers.make_image(timg, size)
                target = peers.nbdkit_file(timg, tsock)
                if kind in ENGINES:
                    ns[kind] += 1
                    r = run_cgmirror(clients[kind], ns[kind], "v", target.uri,
                                     args.inflight, size)
                else:
                    r = run_nbdcopy(image, target.uri)
                results[kind].append(r["seconds"])
                print(f"repeat {rep + 1}/{args.repeats} {kind:13}"
                      f" {size / r['seconds'] / 1e6:8.0f} MB/s", file=sys.stderr)
        for rep in range(args.repeats):
            for eng in ENGINES[rep % 2:] + ENGINES[:rep % 2]:
                if target is not None:
                    target.stop()
                    target = None
                if os.path.exists(timg):
                    os.unlink(timg)
                peers.make_image(timg, size)
                target = peers.nbdkit_file(timg, tsock)
                secs = copy_with_spinner(image, size, eng, target.uri, args.inflight)
                results[f"{eng}-gil"].append(secs)
                print(f"repeat {rep + 1}/{args.repeats} {eng + '-gil':13}"
                      f" {size / secs / 1e6:8.0f} MB/s", file=sys.stderr)
    finally:
        if target is not None:
            target.stop()
        for c in clients.values():
            c.close()
        for p in procs.values():
            p.stop(timeout=15)
        shutil.rmtree(base, ignore_errors=True)

    load_after = os.getloadavg()[0]
    mbps = {k: size / statistics.median(v) / 1e6 for k, v in results.items()}
    print(f"\nfull copy of {args.size_mib} MiB, {args.repeats} interleaved repeats,"
          f" medians; load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"{'copier':14} {'MB/s':>8} {'vs nbdcopy':>11}")
    for k in KINDS + gil_kinds:
        print(f"{k:14} {mbps[k]:8.0f} {mbps[k] / mbps['nbdcopy-file']:11.2f}")
    print(json.dumps({
        "bench": "engine", "size_mib": args.size_mib, "repeats": args.repeats,
        "python_mb_s": round(mbps["python"]), "native_mb_s": round(mbps["native"]),
        "nbdcopy_file_mb_s": round(mbps["nbdcopy-file"]),
        "ratio_native_vs_nbdcopy": round(mbps["native"] / mbps["nbdcopy-file"], 3),
        "ratio_python_vs_nbdcopy": round(mbps["python"] / mbps["nbdcopy-file"], 3),
        "ratio_native_vs_python": round(mbps["native"] / mbps["python"], 3),
        "python_gil_mb_s": round(mbps["python-gil"]), "native_gil_mb_s": round(mbps["native-gil"]),
        "ratio_native_vs_python_gil": round(mbps["native-gil"] / mbps["python-gil"], 3),
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
