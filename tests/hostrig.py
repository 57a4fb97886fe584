"""The two-host scenarios' rig (tests/test_two_hosts.py) over the host rig
of harness/hosts.py: hosts a1 a2 (primaries), b1 b2 (secondaries) and c,
every node under its host's unit, TCP with mutual TLS everywhere.

Two halves:

- **inside a host** (``python tests/hostrig.py STEP ARGS-JSON``, run by
  ``Rig.inside``): the dependent-write workload, scattered writes, the
  checker and control calls, dialling the nodes over TCP with the
  coordinator's certificate of that host (``/etc/cgmirror/pki``).  It
  prints one JSON line.  A client runs only inside a host, never in the
  machine's own namespace (the sites' addresses are routed out there).
- **the test's side** (``Rig``): the rig booted with its nodes enabled,
  steps run inside a named host, a mirror run in c until a group hardens,
  failpoints armed in a node's unit (a drop-in with ``Environment=``, as
  ``systemctl edit`` writes it), images and node records read from a
  host's disk.

The workload spans both nodes of a site, volumes in the order a1/v0, a2/v0,
a1/v1, a2/v1 (neighbours on different hosts); at site b the same positions
are b1/v0, b2/v0, b1/v1, b2/v1.  Its records sit in block 0 of every
8-block stride (16 slots of 512 KiB); scattered writes go to the other
blocks, so the checker still reads a consistent run and the blocks each
side wrote are known exactly.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import workload as wl  # noqa: E402

G = 64 << 10
SIZE = 8 << 20
NBLOCKS = SIZE // G
VOLS = ("v0", "v1")
SITE_NODES = {"a": ("a1", "a2"), "b": ("b1", "b2")}
LAYOUT = wl.Layout(("a1/v0", "a2/v0", "a1/v1", "a2/v1"), SIZE, writers=2, slots=16,
                   granularity=G)


def places(site: str) -> list[tuple[str, str]]:
    """(node, volume) of every workload position at ``site``."""
    n1, n2 = SITE_NODES[site]
    return [(n1, "v0"), (n2, "v0"), (n1, "v1"), (n2, "v1")]


# ------------------------------------------------------------ inside a host

class _Inside:
    """The steps a host runs (module doc); every one returns JSON data."""

    def __init__(self):
        from coordinator import session as session_mod
        from harness.hosts import SESSION
        self.session = session_mod.load(SESSION)
        self.cfgs = {c.name: c for c in [*self.session.slaves, *self.session.secondaries]}
        wl.TLS_DIR = self.session.slaves[0].client_tls

    def uris(self, site: str) -> list[str]:
        return [self.cfgs[n].spec().uri(v) for n, v in places(site)]

    def workload(self, site: str, records: int, fresh: bool = False) -> dict:
        """``records`` dependent writes per writer; the blocks they wrote
        per position."""
        uris = self.uris(site)
        work = (wl.Workload(uris, LAYOUT, max_records=records) if fresh
                else wl.Workload.resume(uris, LAYOUT, max_records=records)).start()
        for t in work._threads:
            t.join(120)
        work.stop()
        if work.errors:
            raise RuntimeError(f"workload at site {site}: {work.errors}")
        blocks = [set() for _ in places(site)]
        for w in range(LAYOUT.writers):
            for i in range(work.start_heads[w] + 1, work.acked[w] + 1):
                p, s = LAYOUT.place(w, i)
                blocks[p].add(LAYOUT.offset(w, s) // G)
        return {"blocks": [sorted(b) for b in blocks], "acked": work.acked}

    def scatter(self, site: str, count: int, seed: int) -> dict:
        """``count`` whole blocks per position outside the workload's."""
        rng = random.Random(seed)
        out = []
        for uri in self.uris(site):
            dev = wl.Device(uri, "scatter")
            try:
                picked = sorted(rng.sample([b for b in range(NBLOCKS) if b % 8], count))
                for b in picked:
                    dev.pwrite(rng.randbytes(G), b * G)
                dev.h.flush()
            finally:
                dev.close()
            out.append(picked)
        return {"blocks": out}

    def check(self, site: str) -> dict:
        rep = wl.check_targets(self.uris(site), LAYOUT)
        return {"ok": rep.ok, "summary": rep.summary(), "heads": rep.heads}

    def call(self, node: str, op: str, args: dict | None = None) -> dict:
        import dataclasses
        from coordinator.link import SlaveLink
        spec = dataclasses.replace(self.cfgs[node].spec(), session=self.session.name)
        with SlaveLink.from_spec(spec, timeout=30) as lk:
            return lk.call(op, **(args or {}))


def _inside(argv: list[str]) -> int:
    step, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else []
    out = getattr(_Inside(), step)(*args)
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------ the test's side

def node_unit(name: str) -> str:
    return f"cgmirror-node@{name}.service"


class Rig:
    """The host rig booted, the session installed, every node enabled
    (``Hosts.enable_nodes``).  ``h``: the ``Hosts``."""

    def __init__(self, hosts, **session_keys):
        from harness.hosts import session_text
        self.h = hosts
        # Short drains and copies: a group across a cut link fails in
        # seconds, not minutes.
        hosts.install(session_text(hosts, mirror={"max_drain_ms": 4000, "interval_ms": 200},
                                   copy_timeout_ms=4000, **session_keys))
        hosts.boot()
        hosts.enable_nodes()

    # -- commands inside a host

    def inside(self, host: str, step: str, *args, timeout: float = 180,
               script: str = os.path.abspath(__file__)):
        """Step ``step`` of ``script`` (this module, or a test module whose
        steps extend ``_Inside``) inside ``host``; its JSON result."""
        r = self.h[host].python(script, step, json.dumps(args), timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"{step} {args} inside {host} exited {r.returncode}:"
                                 f" {r.stderr.strip()[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def cgmirror(self, host: str, *args: str, timeout: float = 240):
        """``cgmirror ARGS`` inside ``host``: CompletedProcess (text)."""
        return self.h[host].cgmirror(*args, timeout=timeout)

    def ok(self, host: str, *args: str, timeout: float = 240) -> str:
        r = self.cgmirror(host, *args, timeout=timeout)
        assert r.returncode == 0, (f"cgmirror {' '.join(args)} on {host} exited"
                                   f" {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def fails(self, host: str, *args: str, timeout: float = 240) -> str:
        """``cgmirror ARGS`` inside ``host`` must fail; its error lines
        ("cgmirror: ..."), the log lines of the run left out."""
        r = self.cgmirror(host, *args, timeout=timeout)
        assert r.returncode != 0, f"cgmirror {' '.join(args)} on {host} succeeded: {r.stdout}"
        return "\n".join(x for x in r.stderr.splitlines() if x.startswith("cgmirror:"))

    def write(self, host: str, site: str, records: int, fresh: bool = False) -> list[set]:
        """The workload at ``site``, run inside ``host``; blocks per position."""
        out = self.inside(host, "workload", site, records, fresh)
        return [set(b) for b in out["blocks"]]

    def scatter(self, host: str, site: str, count: int, seed: int) -> list[set]:
        return [set(b) for b in self.inside(host, "scatter", site, count, seed)["blocks"]]

    def check(self, host: str, site: str) -> list[int]:
        """The checker on ``site``'s images (host exports: a secondary's
        shows its last hardened group), run inside ``host``."""
        rep = self.inside(host, "check", site)
        assert rep["ok"], f"site {site} (checked from {host}): {rep['summary']}"
        return rep["heads"]

    def call(self, host: str, node: str, op: str, **args) -> dict:
        return self.inside(host, "call", node, op, args)

    # -- groups

    def hardened(self, node: str, host: str | None = None) -> int:
        """The group a secondary last hardened (asked from ``host``: its own
        by default)."""
        return self.call(host or node, node, "status")["hardened"] or 0

    def group(self, timeout: float = 120) -> int:
        """``cgmirror mirror run`` in c until a group hardens at b1 and b2
        past the one they hold now, then SIGTERM (``systemctl stop``)."""
        c = self.h["c"]
        start = min(self.hardened(n, "c") for n in SITE_NODES["b"])
        log = open(os.path.join(c.dir, "mirror.log"), "ab")
        with log:
            p = c.popen([sys.executable, "-m", "coordinator.cli", "-s",
                         "/etc/cgmirror/session.toml", "mirror", "run"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while True:
                got = min(self.hardened(n, "c") for n in SITE_NODES["b"])
                if got > start:
                    break
                assert p.poll() is None, (f"the mirror exited {p.returncode}:"
                                          f" {_tail(log.name)}")
                assert time.monotonic() < deadline, (f"no group past {start} in {timeout} s:"
                                                     f" {_tail(log.name)}")
                time.sleep(0.3)
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                rc = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
                raise
        assert rc == 0, f"the mirror's exit status {rc}: {_tail(log.name)}"
        return got

    # -- nodes and their hosts

    def record(self, node: str) -> dict:
        """``node.json`` as ``node``'s host holds it on its disk."""
        with open(self.h[node].file(f"/var/lib/cgmirror/{node}/node.json")) as f:
            return json.load(f)

    def role(self, node: str, host: str | None = None) -> str:
        return self.call(host or node, node, "status").get("role", "primary")

    def image(self, node: str, vol: str) -> bytes:
        """A volume's file as its host's disk holds it."""
        with open(self.h[node].file(f"/var/lib/cgmirror/images/{node}-{vol}.img"), "rb") as f:
            return f.read()

    def images(self, site: str) -> list[bytes]:
        return [self.image(n, v) for n, v in places(site)]

    def assert_equal(self) -> None:
        for (na, v), (nb, _), x, y in zip(places("a"), places("b"), self.images("a"),
                                          self.images("b")):
            assert x == y, f"{na}/{v} and {nb}/{v} differ"

    def assert_joined(self, site: str, role: str) -> None:
        """``site``'s nodes run as ``role`` (as c sees them), the checker
        passes on both sites' images, and the two sites hold the same."""
        for n in SITE_NODES[site]:
            assert self.role(n, "c") == role, n
        self.check("a1", "a")
        self.check("b1", "b")
        self.assert_equal()

    def arm(self, node: str, points: str | None) -> None:
        """Failpoints ``points`` in every start of ``node``'s unit from now
        (None: disarm): a drop-in ``failpoints.conf`` with ``Environment=``
        written inside the host, then the unit disabled and enabled again
        (the supervisor loads a unit's files when it is enabled)."""
        host, unit = self.h[node], node_unit(node)
        d = f"/etc/systemd/system/{unit}.d"
        if points:
            script = (f"mkdir -p {d} && printf '[Service]\\nEnvironment=%s\\n'"
                      f" {shlex.quote('CGMIRROR_FAILPOINTS=' + points)} > {d}/failpoints.conf")
        else:
            script = f"rm -f {d}/failpoints.conf"
        host.run(["sh", "-c", script], timeout=30)
        host.disable(unit)
        deadline = time.monotonic() + 60
        while host.unit(unit) is not None:
            assert time.monotonic() < deadline, f"{unit} not stopped in 60 s"
            time.sleep(0.05)
        host.enable(unit)
        u = host.wait_unit(unit)
        assert u["environment"].get("CGMIRROR_FAILPOINTS") == points, u


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


if __name__ == "__main__":
    sys.exit(_inside(sys.argv[1:]))
