"""Write throughput of the cgmirror plugin against nbdkit's C `file` plugin,
a minimal Python pass-through plugin and qemu-storage-daemon with a dirty
bitmap, all measured with fio's nbd engine.

    .venv/bin/python bench/bench_write.py [--runtime 3] [--ramp 1] [--repeats 3]

Servers (one connection each, unix sockets, the same 1 GiB image on /dev/shm,
created sparse and then fallocated so that no server pays tmpfs page faults
for the others; all started once and left idle between their runs):

  c_file        nbdkit file file=IMG                         (nbdkit's default threads)
  passthrough   nbdkit --threads T python bench/passthrough.py file=IMG
  passthrough_kept  the same with keep=true: it keeps each nbdkit thread's
                Python thread state between requests as cgmirror does
                (nbdplugin/threadstate.py), so ours against it is what our
                own per-request Python costs
  cgmirror      nbdkit --threads T python nbdplugin/plugin.py statedir=DIR
                    control=CTLSOCK volume=bench:IMG         (export "bench")
  qsd_bitmap    qemu-storage-daemon: file + raw node on IMG, NBD export
                    "bench" (writable), and over QMP
                    block-dirty-bitmap-add granularity=64K   (the peer a user
                    would pick for change tracking; its bitmap lives in
                    memory only, ours survives a crash)

T is chosen first: passthrough at --threads 1, 2 and 4, one 4K random-write
qd16 run each; the best is used for both Python servers.

Workloads: 4K random write qd16, 4K random write qd1, 1 MiB sequential write
qd4; time-based (--runtime seconds after --ramp seconds), interleaved over
servers and workloads, --repeats times; medians.  Server CPU time per I/O is
read from /proc (psutil) around each run.

Prints a table, then one JSON line last with ratio_vs_passthrough_4k_qd16,
ratio_vs_passthrough_kept_4k_qd16, ratio_vs_c_file_4k_qd16, ratio_vs_c_file_1m, ratio_vs_qsd_bitmap_4k_qd16,
ratio_vs_qsd_bitmap_4k_qd1 (ours / theirs IOPS), the bitmap's dirty count
after the runs (proof that it tracked) and the raw numbers.  A server that
cannot start (e.g. the cgmirror plugin while it is being written, or a
machine without qemu-storage-daemon) is skipped with a note and null ratios.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSTHROUGH = os.path.join(ROOT, "bench", "passthrough.py")
PLUGIN = os.path.join(ROOT, "nbdplugin", "plugin.py")
IMAGE_SIZE = 1 << 30
EXPORT = "bench"

WORKLOADS = {
    "4k_randwrite_qd16": dict(rw="randwrite", bs="4k", iodepth=16),
    "4k_randwrite_qd1": dict(rw="randwrite", bs="4k", iodepth=1),
    "1m_seqwrite_qd4": dict(rw="write", bs="1m", iodepth=4),
}


class ServerFailed(Exception):
    """A server did not come up; carries its log tail."""


class Server:
    """One nbdkit process on a private unix socket, killed by PID on stop()."""

    def __init__(self, name, workdir, args, export=""):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.pidfile = os.path.join(self.dir, "server.pid")
        self.log = os.path.join(self.dir, "server.log")
        self.export = export
        self.cmd = self.command(args)
        self.proc = None
        self.ps = None

    def command(self, args):
        return ["nbdkit", "-f", "-U", self.sock, "--pidfile", self.pidfile] + args

    @property
    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def start(self, timeout=20.0):
        # nbdkit 1.32 leaves its socket behind after SIGTERM.
        for path in (self.sock, self.pidfile):
            if os.path.exists(path):
                os.unlink(path)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name}: nbdkit exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            if os.path.exists(self.pidfile) and self._connectable():
                self.ps = psutil.Process(self.proc.pid)
                self.ready()
                return
            time.sleep(0.02)
        self.stop()
        raise ServerFailed(f"{self.name}: not ready after {timeout:.0f} s:\n" + self.log_tail())

    def ready(self):
        """Called once the server listens (qsd adds its bitmap here)."""

    def _connectable(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def cpu_seconds(self):
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    def log_tail(self, n=15):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"


class QsdServer(Server):
    """qemu-storage-daemon exporting IMG over NBD with a 64 KiB dirty bitmap
    added over QMP, as a user of qemu's incremental backup would set it up."""

    NODE = "disk0"
    BITMAP = "cgm-bench"

    def __init__(self, name, workdir, image, export):
        self.image = image
        super().__init__(name, workdir, [], export)

    def command(self, args):
        self.qmp_sock = os.path.join(self.dir, "qmp.sock")
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                "--blockdev", f"driver=raw,node-name={self.NODE},file=file0",
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                "--export", f"type=nbd,id=exp0,node-name={self.NODE},"
                            f"name={self.export},writable=on",
                "--chardev", f"socket,id=qmp0,path={self.qmp_sock},server=on,wait=off",
                "--monitor", "chardev=qmp0",
                "--pidfile", self.pidfile]

    def qmp(self, command, **arguments):
        """One QMP command on a fresh connection; returns its "return"."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.qmp_sock)
            f = s.makefile("rwb")

            def call(cmd, args=None):
                msg = {"execute": cmd} | ({"arguments": args} if args else {})
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "error" in reply:
                        raise ServerFailed(f"{self.name}: QMP {cmd}: {reply['error']}")
                    if "return" in reply:
                        return reply["return"]
                    # events ({"event": ...}) are skipped

            json.loads(f.readline())          # the greeting
            call("qmp_capabilities")
            return call(command, arguments)

    def ready(self):
        self.qmp("block-dirty-bitmap-add", node=self.NODE, name=self.BITMAP,
                 granularity=64 * 1024)

    def dirty_bytes(self):
        """The bitmap's dirty byte count (it tracked the writes if > 0)."""
        for node in self.qmp("query-named-block-nodes"):
            for bm in node.get("dirty-bitmaps") or []:
                if bm["name"] == self.BITMAP:
                    return bm["count"]
        raise ServerFailed(f"{self.name}: bitmap {self.BITMAP} is gone")


def run_fio(server, workload, runtime, ramp, outdir):
    """One fio run; returns dict(iops, mbps, cpu_us_per_io)."""
    out = os.path.join(outdir, f"fio-{server.name}-{workload}.json")
    w = WORKLOADS[workload]
    cmd = ["fio", "--name=w", "--ioengine=nbd", f"--uri={server.uri}",
           f"--rw={w['rw']}", f"--bs={w['bs']}", f"--iodepth={w['iodepth']}",
           "--time_based=1", f"--runtime={runtime}", f"--ramp_time={ramp}",
           "--norandommap", "--randrepeat=0",
           "--output-format=json", f"--output={out}"]
    cpu0 = server.cpu_seconds()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=runtime + ramp + 60)
    cpu1 = server.cpu_seconds()
    if r.returncode != 0:
        raise RuntimeError(f"fio against {server.name} failed ({r.returncode}):\n"
                           f"{r.stdout[-2000:]}{r.stderr[-2000:]}\n{server.log_tail()}")
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio against {server.name}: job error {job['error']}")
    wr = job["write"]
    ios = wr["total_ios"]
    # Server CPU covers ramp + runtime; fio's total_ios covers runtime only.
    return {"iops": wr["iops"], "mbps": wr["bw_bytes"] / 1e6,
            "cpu_us_per_io": (cpu1 - cpu0) * 1e6 / max(ios, 1) * runtime / (runtime + ramp)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=3,
                    help="seconds per run (3 keeps the default run under ~4 minutes"
                         " with five servers)")
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="skip the 1/2/4 sweep and use this for the Python servers")
    args = ap.parse_args(argv)

    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run `make setup`", file=sys.stderr)
            return 2

    workdir = tempfile.mkdtemp(prefix="cgmirror-bench-", dir="/dev/shm")
    servers = {}
    notes = []
    qsd_dirty = None
    try:
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
            # Sparse, then allocated: otherwise tmpfs page allocation (and
            # zeroing) is charged to whichever server first touches a page.
            os.posix_fallocate(f.fileno(), 0, IMAGE_SIZE)

        # -- choose --threads for the Python servers --------------------------
        sweep = {}
        if args.threads is None:
            for t in (1, 2, 4):
                s = Server(f"passthrough-t{t}", workdir,
                           ["--threads", str(t), "python", PASSTHROUGH, f"file={image}"])
                try:
                    s.start()
                    sweep[t] = run_fio(s, "4k_randwrite_qd16", args.runtime, args.ramp, workdir)
                finally:
                    s.stop()
                print(f"passthrough --threads {t}: {sweep[t]['iops']:,.0f} IOPS 4K qd16",
                      file=sys.stderr)
            threads = max(sweep, key=lambda t: sweep[t]["iops"])
        else:
            threads = args.threads

        # -- start the three servers -----------------------------------------
        specs = {
            "c_file": (["file", f"file={image}"], ""),
            "passthrough": (["--threads", str(threads), "python", PASSTHROUGH,
                             f"file={image}"], ""),
            "passthrough_kept": (["--threads", str(threads), "python", PASSTHROUGH,
                                  f"file={image}", "keep=true"], ""),
            "cgmirror": (["--threads", str(threads), "python", PLUGIN,
                          f"statedir={os.path.join(workdir, 'cgm-state')}",
                          f"control={os.path.join(workdir, 'cgm-ctl.sock')}",
                          f"volume={EXPORT}:{image}"], EXPORT),
        }
        specs["qsd_bitmap"] = (None, EXPORT)
        # Servers whose absence skips only their ratios.
        optional = ("cgmirror", "qsd_bitmap", "passthrough_kept")
        os.makedirs(os.path.join(workdir, "cgm-state"))
        for name, (cmdargs, export) in specs.items():
            if name == "cgmirror" and not os.path.exists(PLUGIN):
                notes.append("cgmirror: skipped, nbdplugin/plugin.py does not exist yet")
                continue
            if name == "qsd_bitmap":
                if shutil.which("qemu-storage-daemon") is None:
                    notes.append("qsd_bitmap: skipped, qemu-storage-daemon not found"
                                 " (Debian: qemu-system-common)")
                    continue
                s = QsdServer(name, workdir, image, export)
            else:
                s = Server(name, workdir, cmdargs, export)
            try:
                s.start()
            except ServerFailed as exc:
                s.stop()
                notes.append(f"{name}: skipped, it did not start: {exc}")
                if name not in optional:
                    raise
                continue
            servers[name] = s

        # -- interleaved runs ----------------------------------------------------
        results = {name: {w: [] for w in WORKLOADS} for name in servers}
        for rep in range(args.repeats):
            for w in WORKLOADS:
                for name, s in list(servers.items()):
                    try:
                        results[name][w].append(run_fio(s, w, args.runtime, args.ramp, workdir))
                    except RuntimeError as exc:
                        if name not in optional:
                            raise
                        notes.append(f"{name}: dropped after a failed run: {exc}")
                        s.stop()
                        del servers[name]
                        del results[name]
            print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
        if "qsd_bitmap" in servers:
            qsd_dirty = servers["qsd_bitmap"].dirty_bytes()
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    med = {name: {w: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                  for w, runs in ws.items() if runs}
           for name, ws in results.items()}

    print(f"fio nbd engine, 1 connection, unix socket, 1 GiB image on /dev/shm; "
          f"{args.runtime} s runs after {args.ramp} s ramp, {args.repeats} interleaved repeats, "
          f"medians; Python servers at --threads {threads}")
    if sweep:
        print("passthrough 4K randwrite qd16 by --threads: "
              + ", ".join(f"{t}: {r['iops']:,.0f} IOPS" for t, r in sweep.items())
              + f" -> best {threads}")
    print(f"{'server':<16} {'workload':<19} {'IOPS':>10} {'MB/s':>9} {'srv CPU us/IO':>14}")
    for name in med:
        for w, m in med[name].items():
            print(f"{name:<16} {w:<19} {m['iops']:>10,.0f} {m['mbps']:>9,.1f} "
                  f"{m['cpu_us_per_io']:>14.1f}")
    for note in notes:
        print("NOTE:", note)

    def ratio(a, b, w, key):
        if a in med and b in med:
            return round(med[a][w][key] / med[b][w][key], 4)
        return None

    result = {
        "bench": "write",
        "threads": threads,
        "runtime_s": args.runtime,
        "ramp_s": args.ramp,
        "repeats": args.repeats,
        "ratio_vs_passthrough_4k_qd16": ratio("cgmirror", "passthrough", "4k_randwrite_qd16", "iops"),
        "ratio_vs_passthrough_kept_4k_qd16": ratio("cgmirror", "passthrough_kept",
                                                   "4k_randwrite_qd16", "iops"),
        "ratio_vs_c_file_4k_qd16": ratio("cgmirror", "c_file", "4k_randwrite_qd16", "iops"),
        "ratio_vs_c_file_1m": ratio("cgmirror", "c_file", "1m_seqwrite_qd4", "mbps"),
        "passthrough_vs_c_file_4k_qd16": ratio("passthrough", "c_file", "4k_randwrite_qd16", "iops"),
        "passthrough_kept_vs_c_file_4k_qd16": ratio("passthrough_kept", "c_file",
                                                    "4k_randwrite_qd16", "iops"),
        "ratio_vs_qsd_bitmap_4k_qd16": ratio("cgmirror", "qsd_bitmap", "4k_randwrite_qd16", "iops"),
        "ratio_vs_qsd_bitmap_4k_qd1": ratio("cgmirror", "qsd_bitmap", "4k_randwrite_qd1", "iops"),
        "qsd_bitmap_dirty_bytes": qsd_dirty,
        "threads_sweep_iops": {str(t): round(r["iops"]) for t, r in sweep.items()},
        "median": {name: {w: {k: round(v, 2) for k, v in m.items()} for w, m in ws.items()}
                   for name, ws in med.items()},
        "runs": {name: {w: [{k: round(v, 2) for k, v in r.items()} for r in runs]
                        for w, runs in ws.items()} for name, ws in results.items()},
        "notes": notes,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "loadavg": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
