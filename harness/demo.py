"""``make demo``: two slaves, three volumes, consistent copies while a writer runs.

In a fresh temporary directory: three ``nbdkit file`` targets on unix
sockets, two slaves started with ``cgmirror slave start`` (s1 serves db and
log, s2 serves data), a writer thread writing with libnbd to all three
volumes, then ``cgmirror copy --full`` and ``cgmirror copy`` (incremental)
while the writer runs, ``cgmirror status`` and ``cgmirror history``.  Finally
the writer stops and one more copy must make every target byte-for-byte
equal to its volume.  Everything started is stopped by PID and the directory
removed (``--keep`` keeps it).

The point-in-time check: the writer is one thread issuing one write at a
time, across all three volumes, and logs each write once acknowledged.  A
consistent cut of the group is therefore exactly "writes 1..k" for one k,
on every volume of both slaves at once.  After each copy the demo replays
the log against zeroed shadows of the volumes and looks for the k at which
all three targets match, and that k must fall between the writes done
before the copy began and those done when it ended.

Exit 0 only if every copy succeeded, each copy's targets are one point in
the writer's sequence, the incremental copy sent less than the full one,
and after the writer stopped the targets equal the volumes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

import nbd

from coordinator import cli

from . import peers

MiB = 1 << 20
LAYOUT = {"s1": {"db": 32 * MiB, "log": 16 * MiB}, "s2": {"data": 32 * MiB}}
PAGE = 4096
FILL = 4 * MiB


def session_toml() -> str:
    out = ['[session]', 'name = "demo"', 'state_dir = "state"',
           'max_coordination_ms = 1000', 'lease_ms = 5000', 'copy_timeout_ms = 30000']
    for slave, vols in LAYOUT.items():
        out += ["", "[[slave]]", f'name = "{slave}"', f'state_dir = "run/{slave}"',
                f'nbd_socket = "run/{slave}.sock"', f'control = "run/{slave}.ctl"',
                "threads = 2", 'granularity = "64K"']
        for vol, size in vols.items():
            out += ["", "[[slave.volume]]", f'name = "{vol}"', f'path = "data/{vol}.img"',
                    f'size = "{size // MiB}M"',
                    f'target = "nbd+unix:///{vol}?socket=remote/{vol}.sock"']
    return "\n".join(out) + "\n"


def _disconnect(h: "nbd.NBD") -> None:
    with contextlib.suppress(nbd.Error):
        h.shutdown()


class Writer(threading.Thread):
    """One thread: first FILL bytes of every volume, then random 4K-128K writes
    to all volumes, a few hundred a second.  ``log`` lists every acknowledged
    write as (volume, offset, data), in order."""

    def __init__(self, uris: dict[str, str], rate: float = 300.0):
        super().__init__(name="demo-writer", daemon=True)
        self.uris, self.rate = uris, rate
        self.stop_event = threading.Event()
        self.filled = threading.Event()
        self.log: list[tuple[str, int, bytes]] = []
        self.error: Exception | None = None

    def run(self) -> None:
        handles = {}
        try:
            for vol, uri in self.uris.items():
                h = nbd.NBD()
                h.set_handle_name(f"demo-writer-{vol}")
                h.connect_uri(uri)
                handles[vol] = (h, h.get_size())
            for vol, (h, _) in handles.items():
                self._write(h, vol, 0, os.urandom(FILL))
            self.filled.set()
            rng = random.Random(1)
            while not self.stop_event.is_set():
                vol = rng.choice(list(handles))
                h, size = handles[vol]
                length = rng.choice((4096, 16384, 65536, 131072))
                self._write(h, vol, rng.randrange(0, size - length) // PAGE * PAGE,
                            os.urandom(length))
                time.sleep(1 / self.rate)
        except Exception as exc:   # reported by the demo, which then fails
            self.error = exc
        finally:
            self.filled.set()
            for h, _ in handles.values():
                _disconnect(h)

    def _write(self, h, vol: str, off: int, data: bytes) -> None:
        h.pwrite(data, off)
        self.log.append((vol, off, data))


def point_in_log(log: list[tuple[str, int, bytes]], images: dict[str, bytes]) -> list[int]:
    """Every k such that applying writes 1..k to zeroed volumes gives ``images``.

    Replays the log once, keeping the set of pages where the shadow differs
    from the image; only the pages of write k change at step k.
    """
    shadow = {v: bytearray(len(img)) for v, img in images.items()}
    zero = bytes(PAGE)
    differ = {(v, p) for v, img in images.items()
              for p in range(0, len(img), PAGE) if img[p:p + PAGE] != zero}
    found = [0] if not differ else []
    for k, (vol, off, data) in enumerate(log, 1):
        sh, img = shadow[vol], images[vol]
        sh[off:off + len(data)] = data
        for p in range(off - off % PAGE, off + len(data), PAGE):
            if sh[p:p + PAGE] == img[p:p + PAGE]:
                differ.discard((vol, p))
            else:
                differ.add((vol, p))
        if not differ:
            found.append(k)
    return found


def read_all(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(8 * MiB, size - o), o) for o in range(0, size, 8 * MiB))
    finally:
        _disconnect(h)


def cgmirror(session: str, *args: str, capture: bool = False) -> tuple[int, str]:
    """Run one cgmirror command in process, echoing it like a shell would."""
    if not capture:
        print(f"\n$ cgmirror {' '.join(args)}", flush=True)
        return cli.main(["-s", session, *args]), ""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["-s", session, *args])
    return code, buf.getvalue()


def demo(workdir: str) -> bool:
    for d in ("data", "remote", "run"):
        os.makedirs(os.path.join(workdir, d), exist_ok=True)
    session = os.path.join(workdir, "demo.toml")
    with open(session, "w") as f:
        f.write(session_toml())
    print(f"session {session}:\n{session_toml()}")
    targets: dict[str, peers.Server] = {}
    writer = None
    started = False
    try:
        for vols in LAYOUT.values():
            for vol, size in vols.items():
                remote = os.path.join(workdir, "remote", vol)
                targets[vol] = peers.nbdkit_file(peers.make_image(remote + ".img", size),
                                                 remote + ".sock")
        code, _ = cgmirror(session, "slave", "start")
        started = code == 0
        if not started:
            return False
        uris = {vol: f"nbd+unix:///{vol}?socket={workdir}/run/{slave}.sock"
                for slave, vols in LAYOUT.items() for vol in vols}
        images = {vol: t.image for vol, t in targets.items()}
        checks: list[tuple[str, bool]] = []

        def copy_and_check(label: str, *args: str) -> bool:
            """cgmirror copy ARGS, then: are the targets one point of the log?"""
            before = len(writer.log)
            ok = cgmirror(session, "copy", *args)[0] == 0
            after = len(writer.log)
            snap = {v: open(p, "rb").read() for v, p in images.items()}
            ks = point_in_log(writer.log[:after + 1], snap)
            good = ok and len(ks) == 1 and before <= ks[0] <= after + 1
            where = f"write {ks[0]}" if len(ks) == 1 else f"{len(ks)} points"
            checks.append((f"{label}: targets are one point in time, {where} of the"
                           f" writer (copy began after {before}, ended after {after})",
                           good))
            return ok

        writer = Writer(uris)
        writer.start()
        writer.filled.wait()
        time.sleep(0.3)
        ok = copy_and_check("full copy while writing", "--full")
        time.sleep(1.0)
        ok &= copy_and_check("incremental copy while writing")
        cgmirror(session, "status")
        writer.stop_event.set()
        writer.join()
        print(f"\nwriter: {len(writer.log)} writes"
              + (f", then failed: {writer.error}" if writer.error else ""))
        ok &= writer.error is None
        ok &= copy_and_check("copy after the writer stopped")
        cgmirror(session, "history")

        _, out = cgmirror(session, "history", "--json", capture=True)
        doc = json.loads(out)
        hist = {c["n"]: c for c in doc["copies"]}
        full, incr = hist.get(1, {}), hist.get(2, {})
        group = doc["group"]
        checks += [
            (f"the targets hold one cut, the last ({group['n']} of {max(hist, default=0)})",
             group["consistent"] and group["n"] == max(hist, default=0)),
            ("every copy succeeded", ok and all(c["result"] == "ok" for c in hist.values())),
            (f"incremental sent less than full ({incr.get('bytes')} < {full.get('bytes')})",
             (incr.get("bytes") or 0) < (full.get("bytes") or 0)),
        ]
        for vol, t in targets.items():
            same_size = os.path.getsize(t.image) == os.path.getsize(
                os.path.join(workdir, "data", f"{vol}.img"))
            checks.append((f"{vol}: target has the volume's size", same_size))
            checks.append((f"{vol}: target equals the volume after the last copy",
                           read_all(t.uri) == read_all(uris[vol])))
        print()
        for text, passed in checks:
            print(f"{'PASS' if passed else 'FAIL'}  {text}")
        return all(p for _, p in checks)
    finally:
        if writer is not None:
            writer.stop_event.set()
            writer.join(timeout=10)
        if started:
            cgmirror(session, "slave", "stop")
        for t in targets.values():
            t.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="cgmirror-demo-")
    try:
        ok = demo(workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
