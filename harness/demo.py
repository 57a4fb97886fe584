"""``make demo``: two slaves, three volumes, consistent copies while a writer runs.

In a fresh temporary directory: three ``nbdkit file`` targets on unix
sockets, two slaves started with ``cgmirror slave start`` (s1 serves db and
log, s2 serves data), a writer thread writing with libnbd to all three
volumes, then ``cgmirror copy --full`` and ``cgmirror copy`` (incremental)
while the writer runs, ``cgmirror status`` and ``cgmirror history``.  Finally
the writer stops and one more copy must make every target byte-for-byte
equal to its volume.  Everything started is stopped by PID and the directory
removed (``--keep`` keeps it).

Then the mirror (``mirror_demo``): two more slaves with one volume each,
their secondaries (``cgmirror secondary start``), a writer, ``cgmirror
mirror run`` in the background, ``cgmirror mirror status`` with the RPO,
and, while the writer runs, the remote's hardened group read through the
secondaries' host exports and checked the same way: one point of the
writer's sequence.

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

``--sites`` (``make demo-sites``, root): the same demo across network
namespaces (harness/sites.py) over TCP with mutual TLS.  A session PKI is made
(``coordinator.pki``); s1 runs in site ``a`` and s2 in ``b`` (``cgmirror
slave start NAME`` run inside each), their control channels and NBD exports
on ``tcp:`` addresses; the targets are ``nbdkit file`` with TLS in ``r``;
the demo's body (writer, copies, checks: the coordinator) runs inside ``c``.
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


# The certificate directory nbds:// handles present (--sites: the coordinator's).
TLS_DIR: str | None = None


def session_toml(sites: dict | None = None) -> str:
    """The demo's session file: unix sockets, or with ``sites`` ({"pki": DIR,
    slave: (control, nbd), vol: target URI}) TCP addresses and TLS."""
    out = ['[session]', 'name = "demo"', 'state_dir = "state"',
           'max_coordination_ms = 1000', 'lease_ms = 5000', 'copy_timeout_ms = 30000']
    if sites:
        out.append(f'pki = "{sites["pki"]}"')
    for slave, vols in LAYOUT.items():
        out += ["", "[[slave]]", f'name = "{slave}"', f'state_dir = "run/{slave}"']
        if sites:
            out += [f'control = "{sites[slave][0]}"', f'nbd = "{sites[slave][1]}"']
        else:
            out += [f'nbd_socket = "run/{slave}.sock"', f'control = "run/{slave}.ctl"']
        out += ["threads = 2", 'granularity = "64K"']
        for vol, size in vols.items():
            target = sites[vol] if sites else f"nbd+unix:///{vol}?socket=remote/{vol}.sock"
            out += ["", "[[slave.volume]]", f'name = "{vol}"', f'path = "data/{vol}.img"',
                    f'size = "{size // MiB}M"', f'target = "{target}"']
    return "\n".join(out) + "\n"


def _connect(uri: str, name: str = "demo") -> "nbd.NBD":
    """A libnbd handle on ``uri``; nbds:// with TLS_DIR's certificate."""
    h = nbd.NBD()
    h.set_handle_name(name)
    if uri.startswith("nbds"):
        from wire import tls
        tls.libnbd_setup(h, TLS_DIR)
    h.connect_uri(uri)
    return h


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
                h = _connect(uri, f"demo-writer-{vol}")
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
    h = _connect(uri)
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
        return body(workdir, session, {vol: t.image for vol, t in targets.items()},
                    {vol: t.uri for vol, t in targets.items()})
    finally:
        if started:
            cgmirror(session, "slave", "stop")
        for t in targets.values():
            t.stop()


def body(workdir: str, session: str, images: dict[str, str],
         target_uris: dict[str, str]) -> bool:
    """Writer, copies and checks (the coordinator's side of the demo)."""
    from coordinator import session as session_mod
    specs = {s.name: s.spec() for s in session_mod.load(session).slaves}
    uris = {vol: specs[slave].uri(vol) for slave, vols in LAYOUT.items() for vol in vols}
    checks: list[tuple[str, bool]] = []
    writer = None
    try:

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
        for vol, image in images.items():
            same_size = os.path.getsize(image) == os.path.getsize(
                os.path.join(workdir, "data", f"{vol}.img"))
            checks.append((f"{vol}: target has the volume's size", same_size))
            checks.append((f"{vol}: target equals the volume after the last copy",
                           read_all(target_uris[vol]) == read_all(uris[vol])))
        return _report(checks)
    finally:
        if writer is not None:
            writer.stop_event.set()
            writer.join(timeout=10)


def _report(checks: list[tuple[str, bool]]) -> bool:
    """Print each check as PASS or FAIL; True if all passed."""
    print()
    for text, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return all(p for _, p in checks)


MIRROR_LAYOUT = {"m1": {"db": 8 * MiB}, "m2": {"log": 8 * MiB}}
MIRROR_REMOTE = {"m1": "r1", "m2": "r2"}


def mirror_toml() -> str:
    """The mirror part's session: two slaves, one secondary each, groups
    200 ms apart."""
    out = ['[session]', 'name = "mirror-demo"', 'state_dir = "state"',
           'max_coordination_ms = 1000', 'lease_ms = 5000', 'copy_timeout_ms = 30000',
           '', '[mirror]', 'interval_ms = 200', 'max_drain_ms = 5000',
           'rpo_threshold_s = 30']
    for slave, vols in MIRROR_LAYOUT.items():
        out += ["", "[[slave]]", f'name = "{slave}"', f'state_dir = "run/{slave}"',
                f'nbd_socket = "run/{slave}.sock"', f'control = "run/{slave}.ctl"',
                "threads = 2"]
        for vol, size in vols.items():
            out += ["", "[[slave.volume]]", f'name = "{vol}"', f'path = "data/{vol}.img"',
                    f'size = "{size // MiB}M"', f'secondary = "{MIRROR_REMOTE[slave]}"']
    for slave, r in MIRROR_REMOTE.items():
        out += ["", "[[secondary]]", f'name = "{r}"', f'state_dir = "remote/{r}"',
                f'nbd_socket = "remote/{r}.sock"', f'control = "remote/{r}.ctl"']
        for vol, size in MIRROR_LAYOUT[slave].items():
            out += ["", "[[secondary.volume]]", f'name = "{vol}"',
                    f'path = "remote/{vol}.img"', f'size = "{size // MiB}M"']
    return "\n".join(out) + "\n"


def mirror_demo(workdir: str, seconds: float = 6.0) -> bool:
    """Two slaves, their secondaries, a writer and `cgmirror mirror run` in
    the background; while the writer runs, the remote host exports are read
    as one group (both secondaries at the same hardened group before and
    after the read) and must be one point of the writer's sequence."""
    import subprocess

    from coordinator import session as session_mod
    for d in ("data", "remote", "run"):
        os.makedirs(os.path.join(workdir, d), exist_ok=True)
    session = os.path.join(workdir, "mirror.toml")
    with open(session, "w") as f:
        f.write(mirror_toml())
    print(f"\n---- the mirror ----\nsession {session}:\n{mirror_toml()}")
    sess = session_mod.load(session)
    specs = {s.name: s.spec() for s in sess.slaves}
    uris = {vol: specs[slave].uri(vol) for slave, vols in MIRROR_LAYOUT.items()
            for vol in vols}
    host = {vol: f"nbd+unix:///{vol}?socket={sess.secondary(r).nbd_socket}"
            for slave, r in MIRROR_REMOTE.items() for vol in MIRROR_LAYOUT[slave]}
    checks: list[tuple[str, bool]] = []
    started, writer, proc = [], None, None
    try:
        for noun in ("slave", "secondary"):
            if cgmirror(session, noun, "start")[0] != 0:
                return False
            started.append(noun)
        writer = Writer(uris)
        writer.start()
        writer.filled.wait()
        print("\n$ cgmirror mirror run &", flush=True)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "-s", session,
                                 "mirror", "run"], cwd=root, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=root))

        def hardened() -> tuple:
            code, out = cgmirror(session, "mirror", "status", "--json", capture=True)
            doc = json.loads(out) if code == 0 else {}
            return tuple((doc.get("secondaries") or {}).get(r, {}).get("hardened")
                         for r in MIRROR_REMOTE.values())

        deadline = time.monotonic() + 30
        while not all(hardened()) and time.monotonic() < deadline:
            time.sleep(0.1)
        reads, seen = 0, set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            before = hardened()
            if None in before or len(set(before)) != 1:
                time.sleep(0.05)
                continue
            done = len(writer.log)
            snap = {v: read_all(u) for v, u in host.items()}
            if hardened() != before:
                continue                # a commit came between: read again
            log = list(writer.log)      # the writer goes on appending
            ks = point_in_log(log, snap)
            reads += 1
            seen.add(before[0])
            good = len(ks) == 1 and ks[0] <= len(log)
            checks.append((f"remote group {before[0]} (read after write {done}) is one"
                           f" point of the writer: " + (f"write {ks[0]}" if len(ks) == 1
                                                         else f"{len(ks)} points"), good))
        cgmirror(session, "mirror", "status")
        checks.append((f"the remote was read as a group {reads} times, {len(seen)}"
                       f" different groups, while the writer ran", reads >= 2
                       and len(seen) >= 2))
        proc.terminate()
        checks.append(("`mirror run` stopped cleanly on SIGTERM", proc.wait(60) == 0))
        writer.stop_event.set()
        writer.join()
        checks.append((f"writer: {len(writer.log)} writes, no error", writer.error is None))
        return _report(checks)
    finally:
        if writer is not None:
            writer.stop_event.set()
            writer.join(timeout=10)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for noun in reversed(started):
            cgmirror(session, noun, "stop")


def demo_sites(workdir: str) -> bool:
    """The demo across namespaces: set-up from here, the body inside ``c``."""
    import subprocess

    from coordinator import pki
    from .sites import Sites, free_port

    hosts = {"s1": "a", "s2": "b"}
    for d in ("data", "remote", "run"):
        os.makedirs(os.path.join(workdir, d), exist_ok=True)
    with Sites(("a", "b", "c", "r")) as net:
        d = os.path.join(workdir, "pki")
        pki.init(d, "demo")
        pki.issue(d, "coordinator")
        r = net["r"]
        r_dir = pki.issue(d, "r", ips=[r.addr])
        sites: dict = {"pki": d}
        images = {}
        log = os.path.join(workdir, "remote", "targets.log")
        for slave, vols in LAYOUT.items():
            site = net[hosts[slave]]
            pki.issue(d, slave, ips=[site.addr])
            sites[slave] = (f"tcp:{site.addr}:{free_port(site)}",
                            f"tcp:{site.addr}:{free_port(site)}")
            for vol, size in vols.items():
                port = free_port(r)
                images[vol] = peers.make_image(os.path.join(workdir, "remote", f"{vol}.img"),
                                               size)
                with open(log, "ab") as out:
                    r.popen(peers.nbdkit_file_tcp_argv(images[vol], r.addr, port, r_dir),
                            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                sites[vol] = f"nbds://{r.addr}:{port}/{vol}"
        session = os.path.join(workdir, "demo.toml")
        with open(session, "w") as f:
            f.write(session_toml(sites))
        print(f"session {session}:\n{session_toml(sites)}")
        cmd = [sys.executable, "-m", "coordinator.cli", "-s", session, "slave"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        started = []
        try:
            for slave, host in hosts.items():
                print(f"\n$ ip netns exec <{host}> cgmirror slave start {slave}", flush=True)
                if net[host].run(cmd + ["start", slave], timeout=60, check=False,
                                 cwd=root, capture_output=False).returncode != 0:
                    return False
                started.append(slave)
            print("\n(the demo's coordinator and writer now run inside site c)", flush=True)
            inner = net["c"].run([sys.executable, "-m", "harness.demo", "--body",
                                  json.dumps([workdir, session, images, sites])],
                                 timeout=600, check=False, cwd=root, capture_output=False)
            return inner.returncode == 0
        finally:
            for slave in started:
                net[hosts[slave]].run(cmd + ["stop", slave], timeout=60, check=False,
                                      cwd=root, capture_output=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--sites", action="store_true",
                   help="across network namespaces over TCP with mutual TLS (root)")
    p.add_argument("--body", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.body:       # --sites, inside site c
        global TLS_DIR
        workdir, session, images, sites = json.loads(args.body)
        TLS_DIR = os.path.join(sites["pki"], "coordinator")
        return 0 if body(workdir, session, images, {v: sites[v] for v in images}) else 1
    workdir = tempfile.mkdtemp(prefix="cgmirror-demo-")
    try:
        ok = demo_sites(workdir) if args.sites else demo(workdir)
        if not args.sites:
            ok = mirror_demo(os.path.join(workdir, "mirror")) and ok
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
